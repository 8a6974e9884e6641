//! What the kernel programs need from the running kernel, probed before anything is loaded.
//! Without a probe, an older kernel fails deep inside the loader with a verifier log, or
//! worse, attaches in a way that cannot be pinned; with it, the enforcer names every missing
//! piece and refuses to start an agent at all.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// The oldest kernel with everything below: cgroup `bpf_link`s (5.7), the ring buffer and
/// `bpf_ktime_get_boot_ns` (5.8).
pub const MINIMUM_KERNEL: &str = "5.8";

const PROGRAM_TYPES: [(ProgramType, &str); 3] = [
    (ProgramType::CgroupSockAddr, "cgroup_sock_addr programs"),
    (ProgramType::CgroupSkb, "cgroup_skb programs"),
    (ProgramType::CgroupSock, "cgroup_sock programs"),
];

const MAP_TYPES: [(MapType, &str); 5] = [
    (MapType::Hash, "hash maps"),
    (MapType::PerCpuHash, "per-CPU hash maps"),
    (MapType::LruPerCpuHash, "LRU per-CPU hash maps"),
    (MapType::PerCpuArray, "per-CPU array maps"),
    (MapType::RingBuf, "ring buffer maps (Linux 5.8)"),
];

/// Helpers each program type calls, beyond map lookups.
const HELPERS: [(ProgramType, BpfHelper, &str); 8] = [
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_ktime_get_boot_ns,
        "bpf_ktime_get_boot_ns",
    ),
    (
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_ringbuf_output,
        "bpf_ringbuf_output",
    ),
    (
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_skb_cgroup_id,
        "bpf_skb_cgroup_id",
    ),
    (
        ProgramType::CgroupSkb,
        BpfHelper::BPF_FUNC_ktime_get_boot_ns,
        "bpf_ktime_get_boot_ns",
    ),
    (
        ProgramType::CgroupSock,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
    ),
    (
        ProgramType::CgroupSock,
        BpfHelper::BPF_FUNC_get_current_pid_tgid,
        "bpf_get_current_pid_tgid",
    ),
    (
        ProgramType::CgroupSock,
        BpfHelper::BPF_FUNC_ktime_get_boot_ns,
        "bpf_ktime_get_boot_ns",
    ),
];

/// Every feature the programs need that this kernel lacks, in words an operator can act
/// on; empty when all are there. A probe that cannot decide counts as missing: the
/// enforcer never guesses in favour of running.
pub fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    // aya attaches cgroup programs as pinnable bpf_links from 5.7 on and falls back to
    // legacy attachments, which cannot be pinned, before that.
    match KernelVersion::current() {
        Ok(version) if version >= KernelVersion::new(5, 7, 0) => {}
        Ok(version) => missing.push(format!(
            "cgroup bpf_link attachments (Linux 5.7; this kernel is {version:?})"
        )),
        Err(e) => missing.push(format!(
            "cgroup bpf_link attachments (the kernel version is unreadable: {e})"
        )),
    }
    for (program_type, what) in PROGRAM_TYPES {
        match is_program_supported(program_type) {
            Ok(true) => {}
            Ok(false) => missing.push(what.to_owned()),
            Err(e) => missing.push(format!("{what} (probe failed: {e})")),
        }
    }
    for (map_type, what) in MAP_TYPES {
        match is_map_supported(map_type) {
            Ok(true) => {}
            Ok(false) => missing.push(what.to_owned()),
            Err(e) => missing.push(format!("{what} (probe failed: {e})")),
        }
    }
    for (program_type, helper, name) in HELPERS {
        let what = format!("helper {name} in {}", program_name(program_type));
        match is_helper_supported(program_type, helper) {
            Ok(true) => {}
            Ok(false) => missing.push(what),
            Err(e) => missing.push(format!("{what} (probe failed: {e})")),
        }
    }
    missing.dedup();
    missing
}

fn program_name(program_type: ProgramType) -> &'static str {
    PROGRAM_TYPES
        .iter()
        .find(|(t, _)| *t == program_type)
        .map_or("programs", |(_, what)| what)
}

#[cfg(test)]
mod tests {
    use super::super::KernelError;

    #[test]
    fn the_refusal_names_every_missing_feature() {
        let err = KernelError::MissingFeatures(vec![
            "ring buffer maps (Linux 5.8)".into(),
            "helper bpf_ktime_get_boot_ns in cgroup_skb programs".into(),
        ]);
        let text = err.to_string();
        assert!(text.contains("refuses to run"), "{text}");
        assert!(text.contains("ring buffer maps (Linux 5.8); helper bpf_ktime_get_boot_ns"));
        assert!(text.contains(&format!("Linux {}", super::MINIMUM_KERNEL)));
    }
}
