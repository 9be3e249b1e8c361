//! The `video-infinity` command as a library: [`run`] parses arguments and executes a
//! subcommand, so integration tests drive every subcommand in-process and check its errors.
//!
//! Output: stage lines, progress and summaries go to stderr; `inspect` and `verify` reports go to
//! stdout. A failed `verify` returns [`VerifyFailed`], whose message is the report's last line.

/// `println!` for reports on stdout that ends the process quietly when stdout is closed (e.g.
/// piped into `head`) instead of panicking.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {e}");
        }
    }};
}

pub mod bench;
pub mod checkpoints;
pub mod cleanup;
pub mod cli;
pub mod convert;
pub mod devices;
pub mod flags;
pub mod generate;
pub mod inspect;
pub mod launch;
pub mod multiprocess;
pub mod outputs;
pub mod verify;
pub mod video;

use std::ffi::OsString;

use anyhow::{Context, Result};
use clap::Parser;

pub use anyhow::Error;
pub use cli::Cli;

/// `verify` found outputs outside tolerance; the message is `verify: FAIL ...`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VerifyFailed(pub String);

/// Parses `args` (the first item is the program name) and runs the subcommand.
/// `--help`/`--version` and usage errors come back as `clap::Error` inside the error.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    execute(cli)
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        cli::Command::Generate(a) => generate::run(*a),
        cli::Command::Inspect(a) => inspect::run(a),
        cli::Command::Verify(a) => verify::run(a),
        cli::Command::Convert(a) => convert::run(a),
        cli::Command::Bench(a) => bench::run(*a),
        cli::Command::WriteTiny(a) => write_tiny(&a.dir),
        cli::Command::Launch(a) => launch::run(a),
    }
}

fn write_tiny(dir: &std::path::Path) -> Result<()> {
    outputs::check_dir_destination(dir)?;
    if dir.is_dir() {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        anyhow::ensure!(
            empty,
            "{} already exists and is not empty; choose a new folder",
            dir.display()
        );
    }
    // Written into a temporary folder, put into place when complete (nothing left on failure).
    let stage = outputs::StagedDir::create(dir)?;
    vi_model::tiny::write_model_dir(stage.path())
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
    stage.commit(|_| Ok(()))?;
    eprintln!(
        "wrote the tiny model (RANDOM weights) to {}: use `generate --model {}`",
        dir.display(),
        dir.display()
    );
    Ok(())
}
