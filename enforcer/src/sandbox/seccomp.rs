//! The system calls an agent is refused: the ones that reach past the kernel programs.
//!
//! The eBPF programs judge inet sockets only. An agent could still take another process's
//! sockets (`pidfd_getfd`, `ptrace`, `process_vm_writev`), open a socket of a family no
//! cgroup hook sees (`AF_VSOCK`, `AF_PACKET`, RDS, …, and `AF_INET` with the legacy type
//! `SOCK_PACKET`, which the kernel turns into a packet socket), create sockets through
//! io_uring (whose operations never pass through seccomp), have the kernel resolve names
//! for it through the key service (`request_key`), or make itself a user namespace, where
//! it holds every capability over a network stack of its own and much more kernel code is
//! in reach. This filter refuses exactly those, and allows everything else, so ordinary
//! programs run unchanged.
//!
//! The program is a dozen classic-BPF instructions, written here rather than with
//! `seccompiler`: that crate matches syscall numbers only by equality, and a filter must
//! refuse the whole x32 range (`nr & 0x4000_0000`), where every call above has a second
//! number of its own.
use std::io;

use libc::{sock_filter, sock_fprog};

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_003E; // EM_X86_64 | 64-bit | little-endian
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_00B7; // EM_AARCH64 | 64-bit | little-endian

/// x32 system calls are x86-64 calls with this bit set in the number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// The low 32 bits of args[0] on a little-endian machine: `socket`'s `int domain`, the
/// flags of `unshare` and `clone`.
const OFFSET_ARG0_LOW: u32 = 16;
/// The low 32 bits of args[1]: `socket`'s `int type`.
const OFFSET_ARG1_LOW: u32 = 24;
/// `socket`'s type without SOCK_NONBLOCK and SOCK_CLOEXEC.
const SOCK_TYPE_MASK: u32 = 0xf;
const SOCK_PACKET: u32 = 10;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;

/// Calls refused with `EPERM`: reaching into other processes and the kernel key service.
const REFUSED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_bpf,
];

/// Refused with `ENOSYS`, so that callers fall back as they do on kernels without them:
/// io_uring (runtimes use epoll) and clone3 (whose flags sit in memory a filter cannot
/// read; libc then uses clone, whose flags it can).
const UNAVAILABLE: &[libc::c_long] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_clone3,
];

/// The socket families an agent may create: inet (judged by the kernel programs), Unix
/// (local IPC, see the README) and netlink (address and route queries of libc).
const ALLOWED_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn errno(e: libc::c_int) -> u32 {
    libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA)
}

/// The filter, built before the fork so the child only has to install it.
pub struct AgentFilter {
    program: Vec<sock_filter>,
}

impl AgentFilter {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn new() -> Self {
        let mut p = vec![
            stmt(LD_W_ABS, OFFSET_ARCH),
            // Another ABI (i386 through int 0x80 on x86-64) numbers calls differently:
            // nothing of it is allowed.
            jump(JEQ_K, AUDIT_ARCH_NATIVE, 1, 0),
            stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
            stmt(LD_W_ABS, OFFSET_NR),
        ];
        if cfg!(target_arch = "x86_64") {
            p.push(jump(JSET_K, X32_SYSCALL_BIT, 0, 1));
            p.push(stmt(RET_K, errno(libc::ENOSYS)));
        }
        for (calls, answer) in [
            (REFUSED, errno(libc::EPERM)),
            (UNAVAILABLE, errno(libc::ENOSYS)),
        ] {
            for &nr in calls {
                p.push(jump(JEQ_K, nr as u32, 0, 1));
                p.push(stmt(RET_K, answer));
            }
        }
        // socket(domain, type, …): an allowed family and any type but SOCK_PACKET; the
        // rest is "not supported". Other calls jump over the block.
        let n = ALLOWED_FAMILIES.len();
        let socket_block = (n + 7) as u8;
        p.push(jump(JEQ_K, libc::SYS_socket as u32, 0, socket_block));
        p.push(stmt(LD_W_ABS, OFFSET_ARG0_LOW));
        for (i, &family) in ALLOWED_FAMILIES.iter().enumerate() {
            // A match jumps over the remaining families and the refusal to the type check.
            p.push(jump(JEQ_K, family as u32, (n - i) as u8, 0));
        }
        p.push(stmt(RET_K, errno(libc::EAFNOSUPPORT)));
        p.push(stmt(LD_W_ABS, OFFSET_ARG1_LOW));
        p.push(stmt(AND_K, SOCK_TYPE_MASK));
        p.push(jump(JEQ_K, SOCK_PACKET, 0, 1));
        p.push(stmt(RET_K, errno(libc::EAFNOSUPPORT)));
        p.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
        // unshare(flags) and clone(flags, …): no new user namespace.
        p.push(jump(JEQ_K, libc::SYS_unshare as u32, 1, 0));
        p.push(jump(JEQ_K, libc::SYS_clone as u32, 0, 3));
        p.push(stmt(LD_W_ABS, OFFSET_ARG0_LOW));
        p.push(jump(JSET_K, libc::CLONE_NEWUSER as u32, 0, 1));
        p.push(stmt(RET_K, errno(libc::EPERM)));
        p.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
        Self { program: p }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub fn new() -> Self {
        // No filter for this architecture: installing fails, so no agent starts unfiltered.
        Self {
            program: Vec::new(),
        }
    }

    /// Installs the filter on the calling thread. Called in the child between fork and
    /// exec, so it makes one system call and allocates nothing. `no_new_privs` must be set.
    pub fn install(&self) -> io::Result<()> {
        if self.program.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let prog = sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr().cast_mut(),
        };
        // SAFETY: seccomp(2) reads `prog` and the instructions it points to, which live
        // as long as `self`; the kernel copies them before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const sock_fprog,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Default for AgentFilter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// Runs the classic-BPF program over one `seccomp_data`, as the kernel would.
    fn run(p: &[sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        run2(p, arch, nr, arg0, 0)
    }

    fn run2(p: &[sock_filter], arch: u32, nr: u32, arg0: u64, arg1: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        data[24..32].copy_from_slice(&arg1.to_le_bytes());
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let ins = p[pc];
            match ins.code {
                LD_W_ABS => {
                    let at = ins.k as usize;
                    acc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                    pc += 1;
                }
                JEQ_K | JSET_K => {
                    let hit = if ins.code == JEQ_K {
                        acc == ins.k
                    } else {
                        acc & ins.k != 0
                    };
                    pc += 1 + usize::from(if hit { ins.jt } else { ins.jf });
                }
                AND_K => {
                    acc &= ins.k;
                    pc += 1;
                }
                RET_K => return ins.k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    #[test]
    fn refuses_what_reaches_past_the_kernel_programs_and_allows_the_rest() {
        let p = AgentFilter::new().program;
        let a = AUDIT_ARCH_NATIVE;
        let sock = libc::SYS_socket as u32;
        for family in [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ] {
            assert_eq!(run(&p, a, sock, family as u64), libc::SECCOMP_RET_ALLOW);
            let stream = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64;
            assert_eq!(
                run2(&p, a, sock, family as u64, stream),
                libc::SECCOMP_RET_ALLOW
            );
        }
        // AF_INET with SOCK_PACKET is a packet socket by another name.
        for ty in [10u64, 10 | libc::SOCK_CLOEXEC as u64] {
            let inet = libc::AF_INET as u64;
            assert_eq!(run2(&p, a, sock, inet, ty), errno(libc::EAFNOSUPPORT));
        }
        let newuser = libc::CLONE_NEWUSER as u64;
        for nr in [libc::SYS_unshare, libc::SYS_clone] {
            let nr = nr as u32;
            assert_eq!(run(&p, a, nr, newuser), errno(libc::EPERM), "{nr}");
            assert_eq!(
                run(&p, a, nr, newuser | libc::CLONE_NEWNET as u64),
                errno(libc::EPERM)
            );
            assert_eq!(
                run(&p, a, nr, libc::SIGCHLD as u64),
                libc::SECCOMP_RET_ALLOW,
                "{nr}"
            );
        }
        for family in [
            libc::AF_PACKET,
            libc::AF_VSOCK,
            21, /* AF_RDS */
            libc::AF_XDP,
        ] {
            assert_eq!(run(&p, a, sock, family as u64), errno(libc::EAFNOSUPPORT));
        }
        // The kernel reads an int: high bits above a refused family change nothing.
        let vsock_high = (1u64 << 32) | libc::AF_VSOCK as u64;
        assert_eq!(run(&p, a, sock, vsock_high), errno(libc::EAFNOSUPPORT));
        for &nr in REFUSED {
            assert_eq!(run(&p, a, nr as u32, 0), errno(libc::EPERM), "{nr}");
        }
        for &nr in UNAVAILABLE {
            assert_eq!(run(&p, a, nr as u32, 0), errno(libc::ENOSYS), "{nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_socketpair,
        ] {
            assert_eq!(run(&p, a, nr as u32, 0), libc::SECCOMP_RET_ALLOW, "{nr}");
        }
        assert_eq!(run(&p, 0x4000_0003, 0, 0), libc::SECCOMP_RET_KILL_PROCESS);
        if cfg!(target_arch = "x86_64") {
            for nr in [0, 41, 101, 438, 547] {
                assert_eq!(
                    run(&p, a, X32_SYSCALL_BIT | nr, libc::AF_INET as u64),
                    errno(libc::ENOSYS),
                    "x32 call {nr}"
                );
            }
        }
    }
}
