//! Golden case 5: the CLIP BPE tokenizer (`tests/golden/tokenizer/`) against open_clip 3.3.0's
//! `open_clip.tokenize` ids for every prompt of `tests/golden/tokenizer_cases.json`.

use vi_model::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};

fn cases() -> Vec<serde_json::Value> {
    let path = vi_suite::golden_dir().join("tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_case_matches_open_clip() {
    let tok = ClipTokenizer::from_dir(vi_suite::golden_dir().join("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 0)
    );
    let cases = cases();
    assert_eq!(cases.len(), 25);
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let prompt = c["prompt"].as_str().unwrap();
        let want = ids(&c["ids_open_clip"]);
        assert_eq!(want.len(), CONTEXT_LENGTH);
        let (got, n) = tok.encode_with_len(prompt);
        assert_eq!(got.len(), CONTEXT_LENGTH);
        if got != want {
            failures.push(format!(
                "case {i} {prompt:?}:\n  got  {got:?}\n  want {want:?}"
            ));
            continue;
        }
        // Where HF and open_clip agree, the untruncated count (incl. bos/eos) is shared too.
        if c["hf_equals_open_clip"].as_bool().unwrap() {
            assert_eq!(
                n + 2,
                c["n_tokens_untruncated"].as_u64().unwrap() as usize,
                "case {i}"
            );
            assert_eq!(n + 2 > CONTEXT_LENGTH, c["truncated"].as_bool().unwrap());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn missing_files_are_named() {
    let dir = vi_suite::golden_dir().join("no-such-tokenizer");
    let err = ClipTokenizer::from_dir(&dir)
        .err()
        .expect("loaded a missing folder");
    assert!(err.to_string().contains("vocab.json"), "{err}");
}
