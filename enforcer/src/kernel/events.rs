//! Deny events from the kernel programs' ring buffer.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{Map, MapData, RingBuf};
use enforcer_common::{DenyEvent, hook, names, reason};
use tokio::io::unix::AsyncFd;

use super::{KernelError, map_error};

/// One denial, decoded for people and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KernelDeny {
    pub cgroup_id: u64,
    /// 0 when the hook ran outside the task (packet egress).
    pub pid: u32,
    pub hook: &'static str,
    pub reason: &'static str,
    pub family: &'static str,
    /// IP protocol number, or the socket type for `sock_create`.
    pub protocol: u8,
    pub destination: Option<SocketAddr>,
    /// When the kernel denied, `CLOCK_MONOTONIC` nanoseconds.
    pub at_monotonic_ns: u64,
}

impl KernelDeny {
    /// Decodes one ring-buffer record; `None` when it is not a whole `DenyEvent`.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<DenyEvent>() {
            return None;
        }
        // SAFETY: length checked above; DenyEvent is plain data valid for any bit pattern.
        let raw: DenyEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let family = match raw.family as i32 {
            libc::AF_INET => "inet",
            libc::AF_INET6 => "inet6",
            libc::AF_PACKET => "packet",
            0 => "unknown",
            _ => "other",
        };
        let destination = match raw.family as i32 {
            libc::AF_INET => Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(raw.dst_addr[0].to_ne_bytes())),
                raw.dst_port,
            )),
            libc::AF_INET6 => {
                let mut octets = [0u8; 16];
                for (i, word) in raw.dst_addr.iter().enumerate() {
                    octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
                }
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(octets)),
                    raw.dst_port,
                ))
            }
            _ => None,
        }
        .filter(|_| raw.hook != hook::SOCK_CREATE);
        Some(KernelDeny {
            cgroup_id: raw.cgroup_id,
            pid: raw.pid,
            hook: hook::NAMES
                .get(raw.hook as usize)
                .copied()
                .unwrap_or("unknown"),
            reason: reason::name(raw.reason),
            family,
            protocol: raw.protocol,
            destination,
            at_monotonic_ns: raw.at_monotonic_ns,
        })
    }
}

impl fmt::Display for KernelDeny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} denied ({}) cgroup {}",
            self.hook, self.reason, self.cgroup_id
        )?;
        if self.pid != 0 {
            write!(f, " pid {}", self.pid)?;
        }
        write!(f, " {} proto {}", self.family, self.protocol)?;
        if let Some(dst) = self.destination {
            write!(f, " to {dst}")?;
        }
        Ok(())
    }
}

/// Reads deny events as they arrive. Each event goes to exactly one reader.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Held for as long as this process reads the ring buffer.
    _reading: nix::fcntl::Flock<std::fs::File>,
}

impl EventReader {
    /// Opens the installation's ring buffer for reading, unless another enforcer process
    /// reads it (`Ok(None)`). A ring buffer has one reader: a record one process takes is
    /// gone for the others, so two readers would each see some of the denials, and the
    /// daemon's audit log would miss those a `confine` next to it took. The reader holds
    /// an exclusive lock on the pin directory.
    pub fn try_open(pin_dir: &Path) -> Result<Option<Self>, KernelError> {
        let dir = std::fs::File::open(pin_dir)
            .map_err(|e| KernelError::io(format!("opening {}", pin_dir.display()), e))?;
        let reading =
            match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => {
                    return Err(KernelError::io(
                        format!("locking {} to read kernel events", pin_dir.display()),
                        errno.into(),
                    ));
                }
            };
        Self::open_locked(pin_dir, reading).map(Some)
    }

    fn open_locked(
        pin_dir: &Path,
        reading: nix::fcntl::Flock<std::fs::File>,
    ) -> Result<Self, KernelError> {
        let maps_dir = pin_dir.join("maps");
        let data = MapData::from_pin(maps_dir.join(names::EVENTS_MAP))
            .map_err(|e| map_error(&maps_dir, names::EVENTS_MAP, e))?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .map_err(|e| map_error(&maps_dir, names::EVENTS_MAP, e))?;
        // SAFETY: the AsyncFd owns the ring buffer, so its fd stays open for as long as it
        // is registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                KernelError::io(
                    "registering the event ring buffer with tokio",
                    e.into_parts().1,
                )
            })?;
        Ok(Self {
            ring,
            _reading: reading,
        })
    }

    /// Waits for events and returns every one that is ready. Records that do not decode
    /// are counted in the second value, never silently dropped.
    pub async fn next_batch(&mut self) -> Result<(Vec<KernelDeny>, usize), KernelError> {
        loop {
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|e| KernelError::io("waiting for kernel events", e))?;
            let batch = take_ready(guard.get_inner_mut());
            guard.clear_ready();
            if !batch.0.is_empty() || batch.1 > 0 {
                return Ok(batch);
            }
        }
    }

    /// Every event in the ring buffer now, without waiting: what a reader that is about to
    /// stop (its agent just exited) still owes, since the kernel wrote it before the exit.
    pub fn ready_now(&mut self) -> (Vec<KernelDeny>, usize) {
        take_ready(self.ring.get_mut())
    }
}

fn take_ready(ring: &mut RingBuf<MapData>) -> (Vec<KernelDeny>, usize) {
    let mut events = Vec::new();
    let mut undecodable = 0;
    while let Some(item) = ring.next() {
        match KernelDeny::decode(&item) {
            Some(event) => events.push(event),
            None => undecodable += 1,
        }
    }
    (events, undecodable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(event: &DenyEvent) -> Vec<u8> {
        // SAFETY: DenyEvent is repr(C) plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const DenyEvent).cast::<u8>(),
                std::mem::size_of::<DenyEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_and_ipv6_destinations() {
        let v4 = DenyEvent {
            cgroup_id: 42,
            pid: 7,
            hook: hook::CONNECT4,
            reason: reason::NOT_GATEWAY,
            family: libc::AF_INET as u8,
            protocol: 6,
            dst_port: 443,
            _pad0: [0; 6],
            dst_addr: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
            at_monotonic_ns: 5,
        };
        let decoded = KernelDeny::decode(&encode(&v4)).unwrap();
        assert_eq!(decoded.destination, Some("127.0.0.2:443".parse().unwrap()));
        assert_eq!(decoded.hook, "connect4");
        assert_eq!(decoded.reason, "not_gateway");
        assert_eq!(
            decoded.to_string(),
            "connect4 denied (not_gateway) cgroup 42 pid 7 inet proto 6 to 127.0.0.2:443"
        );

        let v6 = DenyEvent {
            hook: hook::SENDMSG6,
            family: libc::AF_INET6 as u8,
            protocol: 17,
            dst_port: 53,
            dst_addr: [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            ..v4
        };
        let decoded = KernelDeny::decode(&encode(&v6)).unwrap();
        assert_eq!(decoded.destination, Some("[::1]:53".parse().unwrap()));
    }

    #[test]
    fn short_records_and_unknown_values_do_not_panic() {
        assert_eq!(KernelDeny::decode(&[0u8; 8]), None);
        let odd = DenyEvent {
            cgroup_id: 1,
            pid: 0,
            hook: 200,
            reason: 200,
            family: 99,
            protocol: 0,
            dst_port: 0,
            _pad0: [0; 6],
            dst_addr: [0; 4],
            at_monotonic_ns: 0,
        };
        let decoded = KernelDeny::decode(&encode(&odd)).unwrap();
        assert_eq!(
            (decoded.hook, decoded.reason, decoded.family),
            ("unknown", "unknown", "other")
        );
        assert_eq!(decoded.destination, None);
    }
}
