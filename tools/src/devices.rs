//! `--devices`: which device each logical rank runs on.
//!
//! Grammar (comma-separated items, ranks numbered in the order written):
//! * `cpu` — one rank on the CPU; `cpu:N` — N ranks on the CPU (threads sharing one pool);
//! * `cuda:I` — one rank on GPU I; `cuda:I-J` — one rank on each GPU I..=J;
//! * `cuda:IxK` / `cuda:I-JxK` — K ranks on each of those GPUs (clips time-sharing a card);
//! * a bare `I`, `I-J`, `IxK` means `cuda:...` (so `--devices 0-7` is eight GPUs).

use anyhow::{bail, ensure, Context, Result};
use vi_runtime::Device;

/// Parses a `--devices` value into one device per rank.
pub fn parse_devices(spec: &str) -> Result<Vec<Device>> {
    let mut ranks = Vec::new();
    for item in spec.split(',') {
        let item = item.trim();
        ensure!(!item.is_empty(), "--devices `{spec}`: empty item");
        let lower = item.to_ascii_lowercase();
        if lower == "cpu" {
            ranks.push(Device::Cpu);
            continue;
        }
        if let Some(n) = lower.strip_prefix("cpu:") {
            let n: usize = n
                .parse()
                .with_context(|| format!("--devices `{item}`: `cpu:N` needs a rank count N"))?;
            ensure!(n >= 1, "--devices `{item}`: at least one rank");
            ranks.extend(std::iter::repeat_n(Device::Cpu, n));
            continue;
        }
        let gpus = lower.strip_prefix("cuda:").unwrap_or(&lower);
        let (range, per) = match gpus.split_once('x') {
            Some((r, k)) => {
                let k: usize = k.parse().with_context(|| {
                    format!("--devices `{item}`: ranks per GPU after `x` must be a number")
                })?;
                ensure!(k >= 1, "--devices `{item}`: at least one rank per GPU");
                (r, k)
            }
            None => (gpus, 1),
        };
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a, b),
            None => (range, range),
        };
        let parse = |s: &str| -> Result<usize> {
            s.parse().with_context(|| {
                format!(
                    "--devices `{item}`: expected cpu, cpu:N, cuda:I, cuda:I-J or cuda:IxK \
                     (I, J GPU indices, N and K rank counts)"
                )
            })
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            bail!("--devices `{item}`: range {a}-{b} is empty");
        }
        for g in a..=b {
            ranks.extend(std::iter::repeat_n(Device::Cuda(g), per));
        }
    }
    Ok(ranks)
}

/// Checks that every device of the plan can be used by this binary and machine.
pub fn check_available(devices: &[Device]) -> Result<()> {
    let cuda: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d {
            Device::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect();
    if cuda.is_empty() {
        return Ok(());
    }
    ensure!(
        !devices.contains(&Device::Cpu),
        "--devices mixes CPU and CUDA ranks; use one kind for the whole run"
    );
    if !cfg!(feature = "cuda") {
        bail!(
            "--devices asks for CUDA GPUs {:?}, but this binary was built without CUDA support \
             (rebuild with `cargo build --features cuda`), or use --devices cpu:N",
            dedup(&cuda)
        );
    }
    #[cfg(feature = "cuda")]
    {
        let n = vi_runtime::cuda::device_count().map_err(|e| {
            anyhow::anyhow!("--devices asks for CUDA GPUs, but CUDA is unusable: {e}")
        })?;
        if let Some(&bad) = cuda.iter().find(|&&i| i >= n) {
            bail!(
                "--devices asks for GPU {bad}, but this machine has {n} CUDA device{} (0..{})",
                if n == 1 { "" } else { "s" },
                n.saturating_sub(1)
            );
        }
    }
    Ok(())
}

fn dedup(v: &[usize]) -> Vec<usize> {
    let mut v = v.to_vec();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![Device::Cpu]);
        assert_eq!(parse_devices("cpu:3").unwrap(), vec![Device::Cpu; 3]);
        assert_eq!(parse_devices("cuda:2").unwrap(), vec![Device::Cuda(2)]);
        assert_eq!(
            parse_devices("cuda:0-2").unwrap(),
            vec![Device::Cuda(0), Device::Cuda(1), Device::Cuda(2)]
        );
        assert_eq!(parse_devices("cuda:0x4").unwrap(), vec![Device::Cuda(0); 4]);
        assert_eq!(
            parse_devices("0-1x2").unwrap(),
            vec![
                Device::Cuda(0),
                Device::Cuda(0),
                Device::Cuda(1),
                Device::Cuda(1)
            ]
        );
        assert_eq!(
            parse_devices("cuda:3,cuda:1").unwrap(),
            vec![Device::Cuda(3), Device::Cuda(1)]
        );
        for bad in [
            "", "cpu:0", "cpu:x", "cuda:", "cuda:3-1", "cuda:0x0", "gpu", "cuda:0x",
        ] {
            assert!(parse_devices(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
