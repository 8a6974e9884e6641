//! `BPF_PROG_QUERY`: which programs are attached to, or in effect for, a cgroup. aya does
//! not expose it for cgroup sock/skb programs, and the enforcer needs it to prove that an
//! agent's cgroup is really guarded before it starts the agent.
use std::{fs::File, io, os::fd::AsRawFd};

pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
pub const BPF_CGROUP_INET4_BIND: u32 = 8;
pub const BPF_CGROUP_INET6_BIND: u32 = 9;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
const MAX_PROGRAMS: usize = 64;

/// The `query` member of `union bpf_attr`, up to the fields this code uses; the kernel
/// accepts a shorter attr as long as it is zero-extended.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// Ids of the programs of `attach_type` attached directly to `cgroup`, or, with
/// `effective`, the programs that run for it (its own and its ancestors').
pub fn attached_programs(cgroup: &File, attach_type: u32, effective: bool) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; MAX_PROGRAMS];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_PROGRAMS as u32,
        ..Default::default()
    };
    // SAFETY: `attr` and `ids` outlive the call; the kernel writes at most `prog_cnt` ids.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr.prog_cnt as usize).min(MAX_PROGRAMS);
    Ok(ids[..count].to_vec())
}
