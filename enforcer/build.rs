//! Embeds the kernel programs built by `cargo xtask build-ebpf` into the enforcer binary,
//! so the daemon is one self-contained file.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_EBPF_OBJECT");
    let object = match std::env::var_os("ENFORCER_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/enforcer-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} does not exist.\n\
             Build it first with `cargo xtask build-ebpf` (it also installs the nightly \
             rust-src component and bpf-linker when they are missing), or point \
             ENFORCER_EBPF_OBJECT at a built object.",
            object.display()
        );
        std::process::exit(1);
    }
    let object = object.canonicalize().unwrap_or(object);
    println!(
        "cargo:rustc-env=ENFORCER_EBPF_OBJECT_PATH={}",
        object.display()
    );
}
