//! Hostile and broken safetensors files: every one is rejected with an error naming the file (and
//! the tensor where there is one); none panics or reads out of bounds. Plus the happy paths:
//! typed zero-copy views, conversions, several files as one store, atomic writing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use tempfile::TempDir;
use vi_weights::{write_safetensors, WDType, WeightStore, WeightsError};

/// A raw file: 8-byte little-endian header length, the header bytes, the data bytes.
fn raw(dir: &TempDir, name: &str, header: &[u8], data: &[u8]) -> PathBuf {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    bytes(dir, name, &b)
}

fn bytes(dir: &TempDir, name: &str, b: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Open must fail; the message must name the file and (when given) the tensor.
fn expect_err(path: &Path, tensor: Option<&str>, what: &str) -> String {
    let err = match WeightStore::open(path) {
        Ok(_) => panic!("{what}: opened a broken file"),
        Err(e) => e,
    };
    let msg = err.to_string();
    let fname = path.file_name().unwrap().to_str().unwrap();
    assert!(
        msg.contains(fname),
        "{what}: error does not name the file: {msg}"
    );
    if let Some(t) = tensor {
        assert!(
            msg.contains(&format!("`{t}`")),
            "{what}: error does not name tensor {t}: {msg}"
        );
        assert!(matches!(err, WeightsError::Tensor { .. }), "{what}: {msg}");
    }
    msg
}

fn valid_file(dir: &TempDir, name: &str) -> (PathBuf, Vec<u8>) {
    let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let b = f32_bytes(&[5.0, 6.0]);
    let hdr = br#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
    let mut data = a;
    data.extend(b);
    let p = raw(dir, name, hdr, &data);
    let all = std::fs::read(&p).unwrap();
    (p, all)
}

#[test]
fn empty_file() {
    let d = TempDir::new().unwrap();
    let p = bytes(&d, "empty.safetensors", b"");
    let m = expect_err(&p, None, "empty file");
    assert!(m.contains("empty"), "{m}");
}

#[test]
fn shorter_than_8_bytes() {
    let d = TempDir::new().unwrap();
    for n in 1..8 {
        let p = bytes(&d, &format!("short{n}.safetensors"), &vec![1u8; n]);
        let m = expect_err(&p, None, "short file");
        assert!(m.contains("8-byte"), "{m}");
    }
}

#[test]
fn header_length_past_end() {
    let d = TempDir::new().unwrap();
    let mut b = 500u64.to_le_bytes().to_vec();
    b.extend_from_slice(br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#);
    let p = bytes(&d, "hdrpast.safetensors", &b);
    let m = expect_err(&p, None, "header length past end");
    assert!(m.contains("past the end"), "{m}");
    // u64::MAX must not overflow anything either.
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let p = bytes(&d, "hdrmax.safetensors", &b);
    expect_err(&p, None, "u64::MAX header length");
}

#[test]
fn claimed_100gb_header() {
    let d = TempDir::new().unwrap();
    let mut b = 100_000_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let p = bytes(&d, "huge.safetensors", &b);
    let m = expect_err(&p, None, "100 GB header");
    assert!(m.contains("exceeds the limit"), "{m}");
}

#[test]
fn invalid_json() {
    let d = TempDir::new().unwrap();
    let p = raw(
        &d,
        "badjson.safetensors",
        br#"{"a":{"dtype":"F32","shape":[1],"#,
        &[0; 4],
    );
    let m = expect_err(&p, None, "invalid JSON");
    assert!(m.contains("JSON"), "{m}");
    let p = raw(&d, "array.safetensors", b"[1,2,3]", &[]);
    let m = expect_err(&p, None, "non-object JSON");
    assert!(m.contains("not a JSON object"), "{m}");
    let p = raw(&d, "utf8.safetensors", b"{\"\xff\xfe\":1}", &[]);
    let m = expect_err(&p, None, "non-UTF-8 header");
    assert!(m.contains("UTF-8"), "{m}");
}

#[test]
fn unknown_dtype() {
    let d = TempDir::new().unwrap();
    let p = raw(
        &d,
        "dtype.safetensors",
        br#"{"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let m = expect_err(&p, Some("w"), "unknown dtype");
    assert!(m.contains("Q4_K"), "{m}");
}

#[test]
fn malformed_entries() {
    let d = TempDir::new().unwrap();
    let cases: [(&[u8], &str); 5] = [
        (
            br#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            "shape",
        ),
        (
            br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            "data_offsets",
        ),
        (br#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, "dtype"),
        (br#"{"w":5}"#, "not an object"),
        (
            br#"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#,
            "shape",
        ),
    ];
    for (i, (hdr, needle)) in cases.iter().enumerate() {
        let p = raw(&d, &format!("entry{i}.safetensors"), hdr, &[0; 4]);
        let m = expect_err(&p, Some("w"), "malformed entry");
        assert!(m.contains(needle), "{m}");
    }
    let p = raw(&d, "meta.safetensors", br#"{"__metadata__":{"k":1}}"#, &[]);
    let m = expect_err(&p, None, "non-string metadata");
    assert!(m.contains("__metadata__"), "{m}");
}

#[test]
fn truncated_data() {
    let d = TempDir::new().unwrap();
    let (_, all) = valid_file(&d, "ok.safetensors");
    // Cut inside tensor `b`'s data: `b` runs past the data section.
    let p = bytes(&d, "trunc.safetensors", &all[..all.len() - 3]);
    let m = expect_err(&p, Some("b"), "truncated data");
    assert!(m.contains("out of range"), "{m}");
    // Every prefix of a valid file is rejected without a panic.
    for n in 0..all.len() {
        let p = bytes(&d, "prefix.safetensors", &all[..n]);
        assert!(WeightStore::open(&p).is_err(), "prefix of {n} bytes opened");
    }
}

#[test]
fn offsets_out_of_range() {
    let d = TempDir::new().unwrap();
    let hdr = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"far":{"dtype":"F32","shape":[1],"data_offsets":[1000000,1000004]}}"#;
    let p = raw(&d, "range.safetensors", hdr, &[0; 8]);
    let m = expect_err(&p, Some("far"), "offsets out of range");
    assert!(m.contains("out of range"), "{m}");
    // Offsets near usize::MAX: no overflow.
    let hdr = br#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#;
    let p = raw(&d, "range2.safetensors", hdr, &[0; 1]);
    expect_err(&p, Some("x"), "offsets at u64::MAX");
    let hdr = br#"{"x":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}"#;
    let p = raw(&d, "backwards.safetensors", hdr, &[0; 4]);
    let m = expect_err(&p, Some("x"), "end before begin");
    assert!(m.contains("end before begin"), "{m}");
}

#[test]
fn overlapping_offsets() {
    let d = TempDir::new().unwrap();
    let hdr = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let p = raw(&d, "overlap.safetensors", hdr, &[0; 24]);
    let m = expect_err(&p, Some("b"), "overlap");
    assert!(m.contains("overlap") && m.contains("`a`"), "{m}");
    // Same range used twice.
    let hdr = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let p = raw(&d, "alias.safetensors", hdr, &[0; 8]);
    expect_err(&p, Some("b"), "aliased range");
}

#[test]
fn gaps_and_trailing_bytes() {
    let d = TempDir::new().unwrap();
    let hdr = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let p = raw(&d, "gap.safetensors", hdr, &[0; 8]);
    let m = expect_err(&p, Some("a"), "gap");
    assert!(m.contains("gap"), "{m}");
    let hdr = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let p = raw(&d, "trailing.safetensors", hdr, &[0; 12]);
    let m = expect_err(&p, None, "trailing bytes");
    assert!(m.contains("cover 4 bytes"), "{m}");
}

#[test]
fn data_length_not_matching_shape() {
    let d = TempDir::new().unwrap();
    let hdr = br#"{"w":{"dtype":"F16","shape":[3,3],"data_offsets":[0,16]}}"#;
    let p = raw(&d, "len.safetensors", hdr, &[0; 16]);
    let m = expect_err(&p, Some("w"), "length mismatch");
    assert!(m.contains("needs 18 bytes"), "{m}");
    // numel * size overflows usize.
    let hdr = br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    let p = raw(&d, "overflow.safetensors", hdr, &[0; 4]);
    let m = expect_err(&p, Some("w"), "shape overflow");
    assert!(m.contains("overflows"), "{m}");
}

#[test]
fn duplicate_names_across_files() {
    let d = TempDir::new().unwrap();
    let (p1, _) = valid_file(&d, "one.safetensors");
    let hdr = br#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let p2 = raw(&d, "two.safetensors", hdr, &[0; 4]);
    let err = WeightStore::open_many(&[p1, p2])
        .err()
        .expect("duplicate accepted");
    let m = err.to_string();
    assert!(
        m.contains("two.safetensors") && m.contains("one.safetensors"),
        "{m}"
    );
    assert!(m.contains("`b`") && m.contains("more than one file"), "{m}");
}

#[test]
fn missing_file_names_the_path() {
    let d = TempDir::new().unwrap();
    let p = d.path().join("nope.safetensors");
    expect_err(&p, None, "missing file");
}

/// Deterministic byte flips of a valid file: opening and reading never panics.
#[test]
fn random_corruption_never_panics() {
    let d = TempDir::new().unwrap();
    let (_, all) = valid_file(&d, "base.safetensors");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let p = d.path().join("fuzz.safetensors");
    for _ in 0..400 {
        let mut b = all.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() as usize) % b.len();
            b[i] = next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(s) = WeightStore::open(&p) {
            for n in s.names().map(String::from).collect::<Vec<_>>() {
                let _ = s.read_f32(&n, None);
                let _ = s.read_i64(&n);
                let v = s.view(&n).unwrap();
                assert_eq!(
                    v.data.len(),
                    v.numel() * v.dtype.size_bytes().unwrap_or(0).max(1)
                );
            }
        }
    }
}

// ---------------------------------------------------------------- happy paths

#[test]
fn write_then_read_back_all_float_types() {
    let d = TempDir::new().unwrap();
    let vals = [0.0f32, -1.5, 3.25, 65504.0, 1e-7, f32::MIN_POSITIVE];
    let h: Vec<u8> = vals
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let f: Vec<u8> = f32_bytes(&vals);
    let f64b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    let ids: Vec<u8> = [-3i64, 7, i64::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let tensors = vec![
        ("half".to_string(), WDType::F16, vec![2, 3], h),
        ("brain".to_string(), WDType::BF16, vec![6], b),
        ("single".to_string(), WDType::F32, vec![3, 2], f),
        ("double".to_string(), WDType::F64, vec![6], f64b),
        ("ids".to_string(), WDType::I64, vec![3], ids),
    ];
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let p = d.path().join("w.safetensors");
    write_safetensors(&p, &tensors, Some(&meta)).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary file left behind");

    let s = WeightStore::open(&p).unwrap();
    assert_eq!(s.len(), 5);
    assert_eq!(s.metadata(0).get("format").map(String::as_str), Some("pt"));
    let expect_h: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let expect_b: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(s.read_f32("half", Some(&[2, 3])).unwrap(), expect_h);
    assert_eq!(s.read_f32("brain", None).unwrap(), expect_b);
    assert_eq!(s.read_f32("single", Some(&[3, 2])).unwrap(), vals);
    assert_eq!(s.read_f32("double", None).unwrap(), vals);
    assert_eq!(s.read_i64("ids").unwrap(), vec![-3, 7, i64::MAX]);
    // Typed views without conversion.
    let hv = s.view_as::<f16>("half", Some(&[2, 3])).unwrap();
    assert_eq!(hv.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), expect_h);
    // The writer aligns the header to 8 bytes: F32 data is viewed in place.
    let v = s.view_f32("single", None).unwrap();
    assert!(matches!(v, Cow::Borrowed(_)), "aligned F32 view was copied");
    assert_eq!(&*v, &vals);
}

#[test]
fn unaligned_data_is_copied_not_misread() {
    let d = TempDir::new().unwrap();
    // Pad the header with spaces so that the data starts at an odd offset (not 4-aligned).
    let mut hdr = br#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#.to_vec();
    while (8 + hdr.len()) % 4 != 1 {
        hdr.push(b' ');
    }
    let p = raw(
        &d,
        "unaligned.safetensors",
        &hdr,
        &f32_bytes(&[1.0, -2.0, 0.5]),
    );
    let s = WeightStore::open(&p).unwrap();
    let v = s.view_f32("x", Some(&[3])).unwrap();
    assert!(matches!(v, Cow::Owned(_)));
    assert_eq!(&*v, &[1.0, -2.0, 0.5]);
    assert_eq!(&*s.view_as::<f32>("x", None).unwrap(), &[1.0, -2.0, 0.5]);
}

#[test]
fn lookup_checks_shape_and_dtype() {
    let d = TempDir::new().unwrap();
    let (p, _) = valid_file(&d, "checks.safetensors");
    let s = WeightStore::open(&p).unwrap();
    assert_eq!(s.get("a", WDType::F32, &[2, 2]).unwrap().data.len(), 16);
    let m = s.get("a", WDType::F16, &[2, 2]).unwrap_err().to_string();
    assert!(
        m.contains("checks.safetensors") && m.contains("`a`") && m.contains("F16"),
        "{m}"
    );
    let m = s.read_f32("a", Some(&[4])).unwrap_err().to_string();
    assert!(
        m.contains("`a`") && m.contains("[2, 2]") && m.contains("[4]"),
        "{m}"
    );
    let m = s.view_as::<i64>("a", None).unwrap_err().to_string();
    assert!(m.contains("expected I64"), "{m}");
    let m = s.read_i64("a").unwrap_err().to_string();
    assert!(m.contains("not an integer"), "{m}");
    let m = s.read_f32("zzz", None).unwrap_err().to_string();
    assert!(
        m.contains("`zzz`") && m.contains("checks.safetensors"),
        "{m}"
    );
}

#[test]
fn several_files_as_one_store() {
    let d = TempDir::new().unwrap();
    let (p1, _) = valid_file(&d, "part1.safetensors");
    let hdr =
        br#"{"__metadata__":{"k":"v"},"c":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
    let c: Vec<u8> = [1.0f32, -0.5]
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let p2 = raw(&d, "part2.safetensors", hdr, &c);
    let s = WeightStore::open_many(&[p1.clone(), p2.clone()]).unwrap();
    assert_eq!(s.names().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(s.paths(), vec![p1.as_path(), p2.as_path()]);
    assert_eq!(s.file_of("c"), Some(p2.as_path()));
    assert_eq!(s.info("c").unwrap().file, 1);
    assert!(s.metadata(0).is_empty());
    assert_eq!(s.metadata(1)["k"], "v");
    assert_eq!(s.read_f32("b", Some(&[2])).unwrap(), [5.0, 6.0]);
    assert_eq!(s.read_f32("c", Some(&[2])).unwrap(), [1.0, -0.5]);
    assert!(s.contains("a") && !s.contains("d"));
    let s2 = WeightStore::open_dir(d.path()).unwrap();
    assert_eq!(s2.len(), 3);
}

#[test]
fn writer_rejects_bad_input() {
    let d = TempDir::new().unwrap();
    let p = d.path().join("bad.safetensors");
    let t = vec![("w".to_string(), WDType::F32, vec![3], vec![0u8; 8])];
    let m = write_safetensors(&p, &t, None).unwrap_err().to_string();
    assert!(m.contains("`w`") && m.contains("needs 12"), "{m}");
    let t = vec![
        ("w".to_string(), WDType::U8, vec![1], vec![0u8]),
        ("w".to_string(), WDType::U8, vec![1], vec![0u8]),
    ];
    assert!(write_safetensors(&p, &t, None).is_err());
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
}

/// A tensor name repeated in one header (JSON keeps the last): refused as a duplicate, named.
#[test]
fn duplicate_key_in_header_is_named_as_a_duplicate() {
    let d = TempDir::new().unwrap();
    let hdr = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let p = raw(
        &d,
        "dup.safetensors",
        hdr,
        &f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
    );
    let m = expect_err(&p, None, "duplicate key");
    assert!(m.contains("`a`") && m.contains("duplicate"), "{m}");
    // Inside an entry too.
    let hdr = br#"{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let p = raw(&d, "dup2.safetensors", hdr, &f32_bytes(&[1.0, 2.0]));
    let m = expect_err(&p, None, "duplicate field");
    assert!(m.contains("`dtype`") && m.contains("duplicate"), "{m}");
}
