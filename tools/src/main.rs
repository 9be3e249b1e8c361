//! `video-infinity`: see `video-infinity --help`.

use std::process::ExitCode;

use clap::Parser;
use video_infinity::cli::Command;
use video_infinity::{execute, Cli, VerifyFailed};

mod heap_peak;

#[global_allocator]
static HEAP: heap_peak::Counting = heap_peak::Counting;

fn main() -> ExitCode {
    heap_peak::start_from_env();
    let code = run();
    heap_peak::report();
    code
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    // Interrupted runs of the commands that write outputs remove their temporaries
    // (video_infinity::cleanup); `launch` forwards the signals to its workers instead.
    if matches!(
        cli.command,
        Command::Generate(_) | Command::Convert(_) | Command::WriteTiny(_)
    ) {
        if let Err(e) = video_infinity::cleanup::install_signal_handler() {
            eprintln!(
                "warning: cannot handle SIGINT/SIGTERM ({e}): an interrupted run may leave \
                 temporary files"
            );
        }
    }
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
