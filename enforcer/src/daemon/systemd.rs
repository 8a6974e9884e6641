//! The parts of systemd's service protocol the daemon speaks (`sd_notify(3)`,
//! `sd_listen_fds(3)`): readiness, and the file descriptor store.
//!
//! The store is why: a gateway socket the daemon hands to systemd stays bound while the
//! daemon is down after a crash, so no other process can bind the address an agent's
//! kernel entry lets it reach and pose as its gateway; the agent's connections wait in the
//! socket's backlog, and the restarted daemon gets the socket back and serves them. Outside
//! systemd (no `NOTIFY_SOCKET`) every call here does nothing.
use std::{
    collections::BTreeMap,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
};

/// `SD_LISTEN_FDS_START`: the first descriptor systemd passes.
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, with `fds`
/// attached. `Ok(false)` when no service manager listens.
pub fn notify(state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let bytes = path.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => UnixAddr::new_abstract(name),
        Some((b'/', _)) => UnixAddr::new(bytes),
        _ => {
            return Err(io::Error::other(format!(
                "NOTIFY_SOCKET {path:?} is neither a path nor an abstract name"
            )));
        }
    }
    .map_err(io::Error::from)?;
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg(
        socket.as_raw_fd(),
        &[io::IoSlice::new(state.as_bytes())],
        cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )
    .map_err(io::Error::from)?;
    Ok(true)
}

/// Hands `socket` to the service manager's store under `name`.
pub fn store(name: &str, socket: BorrowedFd<'_>) -> io::Result<bool> {
    notify(&format!("FDSTORE=1\nFDNAME={name}"), &[socket])
}

/// Takes every socket stored under `name` out of the service manager's store.
pub fn forget(name: &str) -> io::Result<bool> {
    notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// The descriptors the service manager passed to this process (`LISTEN_FDS`, meant for it
/// when `LISTEN_PID` is its pid), by their `LISTEN_FDNAMES` name. They are made
/// close-on-exec. Empty when none were passed.
pub fn passed() -> BTreeMap<String, Vec<OwnedFd>> {
    let mut passed: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<RawFd>().ok())
        .filter(|n| (1..=65_536).contains(n));
    let (true, Some(count)) = (for_us, count) else {
        return passed;
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let name = names.next().unwrap_or("unknown").to_owned();
        // SAFETY: fcntl(2) on a descriptor number; it fails harmlessly if it is not open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            continue;
        }
        // SAFETY: LISTEN_PID names this process, so the manager passed it this descriptor
        // (open, checked just above) and nothing else in the process owns it.
        passed
            .entry(name)
            .or_default()
            .push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    passed
}

/// Whether `fd` is a TCP socket that listens: only such a descriptor is taken for a gateway.
pub fn is_listening_tcp(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::socket::{getsockopt, sockopt};
    matches!(getsockopt(&fd, sockopt::SockType), Ok(SockType::Stream))
        && matches!(getsockopt(&fd, sockopt::AcceptConn), Ok(true))
}
