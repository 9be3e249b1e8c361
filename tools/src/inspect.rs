//! `inspect`: what a safetensors file or a model folder holds, and what a model folder lacks.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use vi_model::models::{check_part, locate_part, PartKind};
use vi_model::tokenizer::ClipTokenizer;
use vi_weights::WeightStore;

use crate::cli::InspectArgs;

/// 1234567 -> "1.23 M".
pub fn human(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} G", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} k", f / 1e3)
    } else {
        format!("{n} ")
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    let p = &a.path;
    if p.is_file() {
        return inspect_file(p, a.all);
    }
    if let Some(k) = vi_weights::input_file::wrong_kind(p, true) {
        bail!(
            "{} is {k}: inspect reads a .safetensors file or a folder",
            p.display()
        );
    }
    if !p.is_dir() {
        bail!("{} does not exist", p.display());
    }
    let is_model =
        PartKind::ALL.iter().any(|k| p.join(k.folder()).is_dir()) || p.join("tokenizer").is_dir();
    if is_model {
        return inspect_model_dir(p);
    }
    let mut files: Vec<_> = std::fs::read_dir(p)
        .with_context(|| format!("cannot list {}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{} is neither a model folder (unet/, text_encoder/, vae/, tokenizer/) nor a folder \
             of .safetensors files",
            p.display()
        );
    }
    for f in files {
        inspect_file(&f, a.all)?;
    }
    Ok(())
}

fn inspect_file(path: &Path, all: bool) -> Result<()> {
    let store = WeightStore::open(path)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    crate::say!("{}: {} bytes", path.display(), size);
    let meta = store.metadata(0);
    if !meta.is_empty() {
        let mut keys: Vec<_> = meta.keys().collect();
        keys.sort();
        for k in keys {
            let v = &meta[k];
            let shown = if v.len() > 100 {
                format!(
                    "{}... ({} chars)",
                    &v[..v.floor_char_boundary(100)],
                    v.len()
                )
            } else {
                v.clone()
            };
            crate::say!("  metadata {k}: {shown}");
        }
    }
    let mut params = 0u64;
    let mut per_dtype: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let names: Vec<&str> = store.names().collect();
    const SHOWN: usize = 50;
    for (i, name) in names.iter().enumerate() {
        let info = store.info(name).expect("listed");
        let n: u64 = info.shape.iter().map(|&d| d as u64).product();
        params += n;
        let e = per_dtype.entry(info.dtype.name()).or_default();
        e.0 += 1;
        e.1 += n;
        if all || i < SHOWN {
            crate::say!(
                "  {name:<70} {:<5} {:?} ({})",
                info.dtype.name(),
                info.shape,
                human(n).trim_end()
            );
        }
    }
    if !all && names.len() > SHOWN {
        crate::say!("  ... {} more (--all lists them)", names.len() - SHOWN);
    }
    let dtypes: Vec<String> = per_dtype
        .iter()
        .map(|(d, (c, n))| format!("{d}: {c} tensors, {}", human(*n).trim_end()))
        .collect();
    crate::say!(
        "  total: {} tensors, {} parameters ({params}); {}",
        names.len(),
        human(params).trim_end(),
        dtypes.join("; ")
    );
    Ok(())
}

fn inspect_model_dir(dir: &Path) -> Result<()> {
    crate::say!("model folder {}", dir.display());
    let mut problems = Vec::new();
    const SHOWN: usize = 10;
    for kind in PartKind::ALL {
        let files = match locate_part(dir, kind) {
            Ok(f) => f,
            Err(e) => {
                crate::say!("  {}/: MISSING: {e}", kind.folder());
                problems.push(format!("{}/ missing", kind.folder()));
                continue;
            }
        };
        let check = match check_part(&files) {
            Ok(c) => c,
            Err(e) => {
                crate::say!("  {}/: UNREADABLE: {e}", kind.folder());
                problems.push(format!("{}/ unreadable", kind.folder()));
                continue;
            }
        };
        let bytes: u64 = check.bytes;
        let dtypes: Vec<String> = check
            .dtypes
            .iter()
            .map(|(d, n)| format!("{n} {d}"))
            .collect();
        crate::say!(
            "  {}/: {} — {} of {} expected tensors, {} parameters, {} bytes ({}){}",
            kind.folder(),
            if check.ok() {
                "OK"
            } else if check.missing.is_empty() && check.wrong_shape.is_empty() {
                "NOT USABLE"
            } else {
                "INCOMPLETE"
            },
            check.expected.len() - check.missing.len() - check.wrong_shape.len() - check.bad.len(),
            check.expected.len(),
            human(check.params).trim_end(),
            human(bytes).trim_end(),
            dtypes.join(", "),
            if check.ignored.is_empty() {
                String::new()
            } else {
                format!("; {} tensors not needed (ignored)", check.ignored.len())
            }
        );
        for f in &files.weights {
            crate::say!("      file {}", f.display());
        }
        for k in check.missing.iter().take(SHOWN) {
            crate::say!("      missing {k} {:?}", check.expected[k]);
        }
        if check.missing.len() > SHOWN {
            crate::say!("      ... {} more missing", check.missing.len() - SHOWN);
        }
        for (k, want, got) in check.wrong_shape.iter().take(SHOWN) {
            crate::say!("      wrong shape {k}: {got:?}, expected {want:?}");
        }
        for (k, problem) in check.bad.iter().take(SHOWN) {
            crate::say!("      refused {k}: {problem}");
        }
        if check.bad.len() > SHOWN {
            crate::say!("      ... {} more refused", check.bad.len() - SHOWN);
        }
        for k in check.unexpected.iter().take(SHOWN) {
            crate::say!("      unexpected {k}");
        }
        if check.unexpected.len() > SHOWN {
            crate::say!(
                "      ... {} more unexpected",
                check.unexpected.len() - SHOWN
            );
        }
        if !check.missing.is_empty() {
            problems.push(format!(
                "{}/ lacks {} tensors",
                kind.folder(),
                check.missing.len()
            ));
        }
        if !check.bad.is_empty() {
            problems.push(format!(
                "{}/ has {} tensors that loading refuses (first: {} {})",
                kind.folder(),
                check.bad.len(),
                check.bad[0].0,
                check.bad[0].1
            ));
        }
        if !check.wrong_shape.is_empty() {
            problems.push(format!(
                "{}/ has {} tensors of the wrong shape",
                kind.folder(),
                check.wrong_shape.len()
            ));
        }
    }
    let tok = dir.join("tokenizer");
    match ClipTokenizer::from_dir(&tok) {
        Ok(t) => crate::say!("  tokenizer/: OK — {} tokens", t.vocab_size()),
        Err(e) => {
            crate::say!("  tokenizer/: UNUSABLE: {e}");
            problems.push("tokenizer/ unusable".into());
        }
    }
    if problems.is_empty() {
        crate::say!("model folder OK");
        Ok(())
    } else {
        bail!(
            "model folder {} is not usable: {}",
            dir.display(),
            problems.join("; ")
        )
    }
}
