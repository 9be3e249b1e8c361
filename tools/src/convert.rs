//! `convert`: the original VideoCrafter2 `model.ckpt` -> a model folder this runtime loads
//! (`vi_model::convert::convert_checkpoint` does the tensors and configs; this adds the tokenizer
//! and the output-folder checks).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use vi_model::convert::{convert_checkpoint, ConvertOptions, OutDType};
use vi_weights::input_file::{read_bounded, Limit};

use crate::cli::{ConvertArgs, ConvertDType};
use crate::outputs::StagedDir;

pub fn run(a: ConvertArgs) -> Result<()> {
    let t = Instant::now();
    vi_weights::input_file::check_regular(&a.checkpoint, "checkpoint")?;
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
        if let Some(k) = vi_weights::input_file::wrong_kind(tok, true) {
            bail!(
                "tokenizer folder {} is {k}, expected a folder",
                tok.display()
            );
        }
        for f in ["vocab.json", "merges.txt"] {
            let p = tok.join(f);
            if let Some(k) = vi_weights::input_file::wrong_kind(&p, false) {
                bail!("{} is {k}, expected a regular file", p.display());
            }
            ensure!(p.is_file(), "tokenizer folder {} lacks {f}", tok.display());
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
    // Everything is written into a temporary folder, put into place only when complete: a failed
    // or interrupted conversion leaves nothing behind.
    let stage = StagedDir::create(&a.out)?;
    let report = convert_checkpoint(&a.checkpoint, stage.path(), &opts).with_context(|| {
        format!(
            "cannot convert {} into {}",
            a.checkpoint.display(),
            a.out.display()
        )
    })?;
    let tok_out = stage.path().join("tokenizer");
    match &a.tokenizer {
        Some(src) => {
            std::fs::create_dir_all(&tok_out)
                .with_context(|| format!("cannot create {}", tok_out.display()))?;
            for (f, limit) in [
                ("vocab.json", Limit::VOCAB_JSON),
                ("merges.txt", Limit::MERGES_TXT),
            ] {
                let bytes = read_bounded(&src.join(f), limit)?;
                std::fs::write(tok_out.join(f), bytes)
                    .with_context(|| format!("cannot write {}", tok_out.join(f).display()))?;
            }
        }
        None => vi_model::tiny::write_tokenizer(&tok_out)?,
    }
    let staged = stage.path().to_path_buf();
    stage.commit(|_| Ok(()))?;
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
        let w = w.strip_prefix(&staged).map(|r| a.out.join(r));
        eprintln!(
            "    wrote {}",
            w.as_deref().unwrap_or(Path::new("?")).display()
        );
    }
    eprintln!(
        "    check it with `video-infinity inspect {}`",
        a.out.display()
    );
    Ok(())
}
