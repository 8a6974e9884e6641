//! Landlock scoping: the agent may neither connect to abstract Unix sockets nor signal
//! processes that are outside its own Landlock domain (Linux 6.12, Landlock ABI 6).
//!
//! Abstract Unix sockets have no file and so no permissions: without scoping, any agent
//! can connect to one a host process listens on (a desktop's X server, a bus, a tool's
//! control socket) and ask it to act for it, past the kernel programs, which see only
//! inet sockets. Pathname Unix sockets stay governed by file permissions and the
//! agent's uid of its own.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;
/// The first ABI with scopes.
const SCOPES_ABI: i64 = 6;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// The running kernel's Landlock ABI version; 0 when Landlock is absent or disabled.
pub fn abi_version() -> i64 {
    // SAFETY: a null attribute with size 0 and the version flag only queries the ABI.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    version.max(0)
}

/// A ruleset that scopes abstract Unix sockets and signals, made in the parent so that the
/// child, between fork and exec, only has to enforce it.
pub struct Scope(OwnedFd);

impl Scope {
    /// `Ok(None)` when the kernel has no Landlock scopes: the caller says so, since the
    /// agent can then reach abstract Unix sockets of the host.
    pub fn create() -> io::Result<Option<Self>> {
        if abi_version() < SCOPES_ABI {
            return Ok(None);
        }
        let attr = RulesetAttr {
            handled_access_fs: 0,
            handled_access_net: 0,
            scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL,
        };
        // SAFETY: `attr` is a valid `struct landlock_ruleset_attr` for the call's duration.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(Some(Scope(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })))
    }

    /// The descriptor to hand to [`enforce`] in the child.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Puts the calling process (and all it starts) in the ruleset's domain, then closes the
/// descriptor. Async-signal-safe: one system call each. Needs `no_new_privs` set first.
pub fn enforce(ruleset_fd: RawFd) -> io::Result<()> {
    // SAFETY: landlock_restrict_self(2) and close(2) on a descriptor this process owns.
    unsafe {
        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset_fd, 0u32) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(ruleset_fd);
    }
    Ok(())
}
