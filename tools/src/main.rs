//! `video-infinity`: see `video-infinity --help`.

use std::process::ExitCode;

use clap::Parser;
use video_infinity::{execute, Cli, VerifyFailed};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(v) = e.downcast_ref::<VerifyFailed>() {
                // The report's last line.
                println!("{v}");
            } else {
                eprintln!("error: {e:#}");
            }
            // 1, or 2 where `verify` could not verify anything.
            ExitCode::from(video_infinity::verify::exit_code(&e))
        }
    }
}
