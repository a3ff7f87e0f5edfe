//! `kiln`: the thin command-line entry point of the coordinator. All logic is in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = kiln_coordinator::cli::Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match kiln_coordinator::cli::run(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kiln: {error:#}");
            ExitCode::FAILURE
        }
    }
}
