//! The kernel programs, built by `cargo xtask build-ebpf` and embedded at compile time
//! (see `enforcer/build.rs`), so the enforcer needs no file besides its own binary.

/// The eBPF ELF object, 8-byte aligned as the object parser requires.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(env!("ENFORCER_EBPF_OBJECT_PATH"));
