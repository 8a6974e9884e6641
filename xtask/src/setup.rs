//! Idempotent set-up of everything the build and the tests need on a fresh Debian machine:
//! the nightly `rust-src` component, `bpf-linker` linked against the nightly toolchain's
//! own LLVM, and the Debian packages the tests and benchmarks call.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{run, workspace_root};

/// Makes sure `cargo +nightly build -Z build-std=core --target bpfel-unknown-none` works.
pub fn ebpf_toolchain() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup: is rustup installed and on PATH?")?;
    if !installed.status.success() {
        bail!(
            "the nightly toolchain is missing (rustup said: {}). It is needed to build the \
             eBPF programs; install it with `rustup toolchain install nightly`",
            String::from_utf8_lossy(&installed.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly rust-src component (needed for -Z build-std=core)");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"])
        .status()
        .context("running rustup component add")?;
    if !status.success() {
        bail!(
            "`rustup component add rust-src --toolchain nightly` failed; without it the eBPF \
             programs cannot be built. Check network access to the Rust distribution server."
        );
    }
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo install bpf-linker` alone finds no matching system LLVM; link it against the
/// libLLVM that ships with the nightly toolchain instead, through a stable shim directory
/// that the installed binary also loads the library from at run time.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let shim = llvm_shim_dir()?;
    link_llvm_shim(&shim)?;
    if bpf_linker_works() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker against the nightly toolchain's LLVM (takes a few minutes)"
    );
    let prefix = shim.parent().context("shim directory has no parent")?;
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !bpf_linker_works() {
        bail!(
            "installing bpf-linker failed. It must be linked against the nightly toolchain's \
             libLLVM (see {}); check the output above",
            shim.display()
        );
    }
    Ok(())
}

fn llvm_shim_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/enforcer/rust-llvm/lib"))
}

fn link_llvm_shim(shim: &std::path::Path) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly")?;
    if !sysroot.status.success() {
        bail!("`rustc +nightly --print sysroot` failed: is the nightly toolchain installed?");
    }
    let lib_dir = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.ends_with("-nightly"))
        })
        .with_context(|| format!("no libLLVM.so.*-nightly in {}", lib_dir.display()))?;
    std::fs::create_dir_all(shim).with_context(|| format!("creating {}", shim.display()))?;
    let soname = llvm.file_name().context("libLLVM has no file name")?;
    for link in [shim.join("libLLVM.so"), shim.join(soname)] {
        if std::fs::read_link(&link).ok().as_deref() == Some(llvm.as_path()) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// Debian packages by the command the project runs from them.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    ("/usr/bin/python3", "python3"),
];

/// Installs the Debian packages whose commands the tests use, when any is missing.
pub fn test_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(command, _)| !command_exists(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    apt_install(&missing)
}

pub fn command_exists(command: &str) -> bool {
    if command.starts_with('/') {
        return std::path::Path::new(command).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd).with_context(|| {
            format!(
                "`apt-get {}` failed; install {} by hand (as root) and run again",
                args.join(" "),
                packages.join(" ")
            )
        })
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}

/// Builds the eBPF object into `target/ebpf`, where `enforcer/build.rs` embeds it from.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    ebpf_toolchain()?;
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("enforcer-ebpf"))
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The host workspace's RUSTFLAGS must not leak into the BPF build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd).context("building the eBPF programs")?;
    let object = target_dir.join("bpfel-unknown-none/release/enforcer-ebpf");
    if !object.is_file() {
        bail!(
            "the eBPF build finished but {} is missing",
            object.display()
        );
    }
    Ok(object)
}
