//! The `enforcer` command line.
mod cli;

use clap::Parser;
use std::process::ExitCode;

// The gateway allocates per request (hyper's buffers, headers, decisions); mimalloc's
// thread-local free lists keep that off glibc's shared arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // Not `eprintln!`: with stderr gone it would panic and exit 101 instead of 1.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
