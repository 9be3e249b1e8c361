//! `convert`: the original VideoCrafter2 `model.ckpt` -> a model folder this runtime loads
//! (`vi_model::convert::convert_checkpoint` does the tensors and configs; this adds the tokenizer
//! and the output-folder checks).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use vi_model::convert::{convert_checkpoint, ConvertOptions, OutDType};

use crate::cli::{ConvertArgs, ConvertDType};

pub fn run(a: ConvertArgs) -> Result<()> {
    let t = Instant::now();
    ensure!(
        a.checkpoint.is_file(),
        "checkpoint {} does not exist",
        a.checkpoint.display()
    );
    if a.out.exists() {
        ensure!(
            a.out.is_dir(),
            "{} exists and is not a folder",
            a.out.display()
        );
        let empty = std::fs::read_dir(&a.out)
            .with_context(|| format!("cannot read {}", a.out.display()))?
            .next()
            .is_none();
        ensure!(
            empty || a.overwrite,
            "{} already exists and is not empty (pass --overwrite to replace its files)",
            a.out.display()
        );
    }
    if let Some(tok) = &a.tokenizer {
        for f in ["vocab.json", "merges.txt"] {
            ensure!(
                tok.join(f).is_file(),
                "tokenizer folder {} lacks {f}",
                tok.display()
            );
        }
    }
    let opts = ConvertOptions {
        dtype: match a.dtype {
            ConvertDType::F32 => OutDType::F32,
            ConvertDType::F16 => OutDType::F16,
        },
        norm_num_groups: a.norm_groups,
        attention_head_dim: a.attention_head_dim,
        text_num_heads: a.text_heads,
        ..ConvertOptions::default()
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let report = convert_checkpoint(&a.checkpoint, &a.out, &opts)
        .with_context(|| format!("cannot convert {}", a.checkpoint.display()))?;
    let tok_out = a.out.join("tokenizer");
    match &a.tokenizer {
        Some(src) => {
            std::fs::create_dir_all(&tok_out)
                .with_context(|| format!("cannot create {}", tok_out.display()))?;
            for f in ["vocab.json", "merges.txt"] {
                std::fs::copy(src.join(f), tok_out.join(f))
                    .with_context(|| format!("cannot copy {f} into {}", tok_out.display()))?;
            }
        }
        None => vi_model::tiny::write_tokenizer(&tok_out)?,
    }
    eprintln!(
        "converted {} in {:.1} s: unet/ {} tensors, text_encoder/ {} tensors ({} dropped: the \
         last block is unused), vae/ {} tensors, {} schedule buffers ignored; tokenizer/ {}",
        a.checkpoint.display(),
        t.elapsed().as_secs_f64(),
        report.unet_tensors,
        report.text_tensors,
        report.discarded.len(),
        report.vae_tensors,
        report.ignored.len(),
        if a.tokenizer.is_some() {
            "copied"
        } else {
            "CLIP BPE tables (built in)"
        }
    );
    for w in &report.written {
        eprintln!("    wrote {}", w.display());
    }
    eprintln!(
        "    check it with `video-infinity inspect {}`",
        a.out.display()
    );
    Ok(())
}
