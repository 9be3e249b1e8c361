//! The `video-infinity` command as a library: [`run`] parses arguments and executes a
//! subcommand, so integration tests drive every subcommand in-process and check its errors.
//!
//! Output: stage lines, progress and summaries go to stderr; `inspect` and `verify` reports go to
//! stdout. A failed `verify` returns [`VerifyFailed`], whose message is the report's last line.

pub mod cli;
pub mod devices;
pub mod video;

use std::ffi::OsString;

use anyhow::Result;
use clap::Parser;

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
        cli::Command::Generate(_a) => anyhow::bail!("generate: not yet available"),
        cli::Command::Inspect(_a) => anyhow::bail!("inspect: not yet available"),
        cli::Command::Verify(_a) => anyhow::bail!("verify: not yet available"),
        cli::Command::Convert(_a) => anyhow::bail!("convert: not yet available"),
    }
}
