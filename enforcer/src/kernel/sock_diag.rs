//! Which cgroup a TCP socket belongs to, asked of the kernel with `sock_diag` (netlink
//! `SOCK_DIAG_BY_FAMILY`, `INET_DIAG_CGROUP_ID`, Linux 5.7+). A gateway uses it to serve
//! only connections its agent opened: the kernel keeps the agent from reaching anything
//! else, but nothing keeps other local processes from reaching the gateway.
use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Every TCP state.
const ALL_STATES: u32 = u32::MAX;
const NO_COOKIE: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: InetDiagReqV2,
}

/// `struct inet_diag_msg`, which the reply starts with.
const INET_DIAG_MSG_LEN: usize = 4 + size_of::<InetDiagSockId>() + 5 * 4;

fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// The cgroup id (the cgroup v2 inode number, as eBPF's `bpf_get_current_cgroup_id`
/// gives it) of the TCP socket whose own address is `local` and whose peer is `remote`.
/// `None` when no such socket exists (it closed meanwhile).
pub fn tcp_socket_cgroup(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    let family = match (local.ip(), remote.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the two ends of a TCP socket have different address families",
            ));
        }
    };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = Request {
        header: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST,
            seq: 1,
            pid: 0,
        },
        body: InetDiagReqV2 {
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: ALL_STATES,
            id: InetDiagSockId {
                sport: local.port().to_be_bytes(),
                dport: remote.port().to_be_bytes(),
                src: address_bytes(local.ip()),
                dst: address_bytes(remote.ip()),
                interface: 0,
                cookie: [NO_COOKIE, NO_COOKIE],
            },
        },
    };
    // SAFETY: `request` is a live `#[repr(C)]` value of the length given; netlink's
    // kernel end is the default destination of an unbound, unconnected netlink socket.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 8192];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let got = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(buf.get(..got as usize).unwrap_or_default())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_reply(reply: &[u8]) -> io::Result<Option<u64>> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let len = u32_at(reply, 0).ok_or_else(malformed)? as usize;
    let kind = u16_at(reply, 4).ok_or_else(malformed)?;
    let message = reply.get(..len).ok_or_else(malformed)?;
    let header = size_of::<NlMsgHdr>();
    if kind == NLMSG_ERROR {
        let errno = u32_at(message, header).ok_or_else(malformed)? as i32;
        return match -errno {
            0 => Err(malformed()),
            libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(malformed());
    }
    // Attributes follow the message, each `{len: u16, type: u16, value}`, 4-byte aligned.
    let mut at = header + INET_DIAG_MSG_LEN;
    while at + 4 <= message.len() {
        let attr_len = usize::from(u16_at(message, at).ok_or_else(malformed)?);
        let attr_type = u16_at(message, at + 2).ok_or_else(malformed)?;
        if attr_len < 4 {
            return Err(malformed());
        }
        if attr_type == INET_DIAG_CGROUP_ID {
            let value = message.get(at + 4..at + 12).ok_or_else(malformed)?;
            let id = u64::from_ne_bytes(value.try_into().map_err(|_| malformed())?);
            return Ok(Some(id));
        }
        at += attr_len.next_multiple_of(4);
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the kernel does not report socket cgroups (INET_DIAG_CGROUP_ID, Linux 5.7+)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn own_cgroup_id() -> u64 {
        use std::os::unix::fs::MetadataExt;
        let line = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let path = line
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup v2");
        std::fs::metadata(format!("/sys/fs/cgroup{path}"))
            .expect("cgroup dir")
            .ino()
    }

    #[test]
    fn a_loopback_socket_is_found_in_this_process_cgroup() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, peer) = listener.accept().expect("accept");
        let found = tcp_socket_cgroup(peer, listener.local_addr().expect("addr"))
            .expect("sock_diag answers");
        assert_eq!(found, Some(own_cgroup_id()));
        drop(client);
        // A socket that never existed.
        let none = tcp_socket_cgroup(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        )
        .expect("sock_diag answers");
        assert_eq!(none, None);
    }
}
