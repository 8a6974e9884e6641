//! `cargo xtask …`: everything from a fresh clone to green tests, a demo, and benchmarks.
mod bench;
mod bench_gateway;
mod demo;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test, demo and benchmark the enforcer"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build and the tests need (nightly rust-src, bpf-linker, Debian packages).
    Setup,
    /// Build the eBPF programs (installs the eBPF toolchain first when missing).
    BuildEbpf,
    /// Set up, build, check formatting and lints, and run every test, privileged ones included.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the suites in a VM on Debian's 6.1 kernel (`cargo xtask vm-test`).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The privileged suites in a VM on other kernels (Debian cloud kernels under qemu).
    VmTest(vm::Args),
    /// The main job: a confined agent tries to get out and is stopped by the kernel.
    Demo,
    /// Benchmarks, each printed as ratios against a baseline measured in the same run.
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
    },
    /// Load generator the kernel benchmark runs inside and outside confinement.
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::ebpf_toolchain().and_then(|()| setup::test_packages()),
        Task::BuildEbpf => {
            setup::build_ebpf().map(|path| eprintln!("xtask: built {}", path.display()))
        }
        Task::Test {
            no_lint,
            no_vm,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args).and_then(|()| {
            if no_vm {
                Ok(())
            } else {
                vm::after_host_tests()
            }
        }),
        Task::VmTest(args) => vm::run_vm_tests(&args),
        Task::Demo => demo::run(),
        Task::Bench { which } => bench::run(which),
        Task::BenchClient(args) => bench::client(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(no_lint: bool, cargo_test_args: &[String]) -> anyhow::Result<()> {
    require_root_or_skip_note();
    setup::test_packages()?;
    setup::build_ebpf()?;
    let root = workspace_root();
    if !no_lint {
        run(Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
        run(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .context("clippy found problems")?;
    }
    let bin = build_enforcer(false)?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--workspace"])
        .env("ENFORCER_BIN", &bin);
    if !cargo_test_args.is_empty() {
        cmd.arg("--").args(cargo_test_args);
    }
    run(&mut cmd).context("tests failed")
}

/// Privileged tests skip without root only when CI is unset; say which will happen.
fn require_root_or_skip_note() {
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false) || is_root();
    if !root {
        if std::env::var_os("CI").is_some() {
            eprintln!("xtask: not root and CI is set: the privileged tests will fail");
        } else {
            eprintln!(
                "xtask: not root: the privileged tests (BPF, cgroups, namespaces) will be skipped"
            );
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Builds the enforcer (embedding the eBPF object) and returns the binary's path.
fn build_enforcer(release: bool) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["build", "-p", "enforcer"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building the enforcer")?;
    let bin = root.join(if release {
        "target/release/enforcer"
    } else {
        "target/debug/enforcer"
    });
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command with inherited output; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} exited with {status}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}
