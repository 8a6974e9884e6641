//! Types shared by the enforcer's kernel programs and its userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding, so the kernel and userspace agree
//! on every byte and no uninitialised padding can leak into a map. Addresses are kept in
//! network byte order exactly as the kernel hands them to `cgroup/connect*` programs; ports
//! are kept in host byte order.
#![no_std]

/// Names of the pinned maps and programs. Userspace pins them under one directory in bpffs;
/// the names are part of the on-disk contract between a running daemon and its successor.
pub mod names {
    pub const POLICY_MAP: &str = "ENFORCER_POLICY";
    pub const COUNTERS_MAP: &str = "ENFORCER_COUNTERS";
    pub const EVENTS_MAP: &str = "ENFORCER_EVENTS";
    pub const LOST_EVENTS_MAP: &str = "ENFORCER_LOST_EVENTS";
    pub const GATEWAY_PORTS_MAP: &str = "ENFORCER_GATEWAY_PORTS";

    pub const PROG_CONNECT4: &str = "enforcer_connect4";
    pub const PROG_CONNECT6: &str = "enforcer_connect6";
    pub const PROG_SENDMSG4: &str = "enforcer_sendmsg4";
    pub const PROG_SENDMSG6: &str = "enforcer_sendmsg6";
    pub const PROG_SKB_EGRESS: &str = "enforcer_skb_egress";
    pub const PROG_SOCK_CREATE: &str = "enforcer_sock_create";
    pub const PROG_BIND4: &str = "enforcer_bind4";
    pub const PROG_BIND6: &str = "enforcer_bind6";
}

/// Capacity of the policy and counter maps: the number of agents one host can confine.
pub const MAX_AGENTS: u32 = 16_384;
/// Size of the deny-event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Deny events reported per agent cgroup, reason and CPU in one window; the rest are only
/// counted.
pub const EVENTS_PER_WINDOW: u64 = 100;
/// The length of that window.
pub const EVENT_WINDOW_NS: u64 = 1_000_000_000;

/// The agent may use its gateway.
pub const STATE_ACTIVE: u32 = 1;
/// The circuit is open: everything is denied, the gateway included.
pub const STATE_TRIPPED: u32 = 2;
/// Everything is denied while the daemon is stopped, since nothing serves the gateway's
/// address then. Apart from `STATE_TRIPPED` so that the next start lifts only this cut,
/// never one an operator made meanwhile.
pub const STATE_SUSPENDED: u32 = 3;

/// `AgentPolicy::flags`: `gateway_v4` holds an address.
pub const FLAG_GATEWAY_V4: u32 = 1 << 0;
/// `AgentPolicy::flags`: `gateway_v6` holds an address.
pub const FLAG_GATEWAY_V6: u32 = 1 << 1;

/// A deadline that never passes.
pub const NO_DEADLINE: u64 = u64::MAX;

/// The value of the policy map, keyed by the agent's cgroup id (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentPolicy {
    /// `STATE_ACTIVE`, `STATE_TRIPPED` or `STATE_SUSPENDED`; anything but active denies.
    pub state: u32,
    /// `FLAG_GATEWAY_V4` / `FLAG_GATEWAY_V6`.
    pub flags: u32,
    /// Gateway IPv4 address, network byte order.
    pub gateway_v4: u32,
    /// Gateway TCP port, host byte order.
    pub gateway_port: u16,
    pub _pad0: u16,
    /// Gateway IPv6 address as four network-order words, as in `bpf_sock_addr::user_ip6`.
    pub gateway_v6: [u32; 4],
    /// `CLOCK_BOOTTIME` nanoseconds after which the kernel denies everything; `NO_DEADLINE`
    /// for none.
    pub deadline_boottime_ns: u64,
}

impl AgentPolicy {
    /// True when `addr` (network order) and `port` (host order) are this agent's gateway.
    #[inline(always)]
    pub fn is_gateway_v4(&self, addr: u32, port: u16) -> bool {
        self.flags & FLAG_GATEWAY_V4 != 0 && addr == self.gateway_v4 && port == self.gateway_port
    }

    #[inline(always)]
    pub fn is_gateway_v6(&self, addr: &[u32; 4], port: u16) -> bool {
        self.flags & FLAG_GATEWAY_V6 != 0
            && addr[0] == self.gateway_v6[0]
            && addr[1] == self.gateway_v6[1]
            && addr[2] == self.gateway_v6[2]
            && addr[3] == self.gateway_v6[3]
            && port == self.gateway_port
    }

    /// The active policy of an agent whose only way out is `gateway`. An IPv4-mapped IPv6
    /// gateway is stored as IPv4, the way the kernel programs judge such destinations.
    pub fn for_gateway(gateway: core::net::SocketAddr, deadline_boottime_ns: u64) -> Self {
        let mut policy = AgentPolicy {
            state: STATE_ACTIVE,
            flags: 0,
            gateway_v4: 0,
            gateway_port: gateway.port(),
            _pad0: 0,
            gateway_v6: [0; 4],
            deadline_boottime_ns,
        };
        let v4 = match gateway.ip() {
            core::net::IpAddr::V4(v4) => Some(v4),
            core::net::IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        match (v4, gateway.ip()) {
            (Some(v4), _) => {
                policy.flags = FLAG_GATEWAY_V4;
                policy.gateway_v4 = u32::from_ne_bytes(v4.octets());
            }
            (None, core::net::IpAddr::V6(v6)) => {
                let o = v6.octets();
                policy.flags = FLAG_GATEWAY_V6;
                for (i, word) in policy.gateway_v6.iter_mut().enumerate() {
                    *word =
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
            }
            (None, core::net::IpAddr::V4(_)) => {}
        }
        policy
    }

    /// The gateway this policy lets through.
    pub fn gateway(&self) -> Option<core::net::SocketAddr> {
        if self.flags & FLAG_GATEWAY_V4 != 0 {
            let ip = core::net::Ipv4Addr::from(self.gateway_v4.to_ne_bytes());
            return Some(core::net::SocketAddr::new(ip.into(), self.gateway_port));
        }
        if self.flags & FLAG_GATEWAY_V6 != 0 {
            let mut o = [0u8; 16];
            for (i, word) in self.gateway_v6.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let ip = core::net::Ipv6Addr::from(o);
            return Some(core::net::SocketAddr::new(ip.into(), self.gateway_port));
        }
        None
    }

    /// True while the agent may use its gateway at `now_boottime_ns`.
    #[inline(always)]
    pub fn is_open_at(&self, now_boottime_ns: u64) -> bool {
        self.state == STATE_ACTIVE && now_boottime_ns < self.deadline_boottime_ns
    }
}

/// If `addr` (four network-order words) is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// the IPv4 address in network order. Such destinations are judged as IPv4.
#[inline(always)]
pub fn ipv4_mapped(addr: &[u32; 4]) -> Option<u32> {
    // The third word is 0x0000ffff in network order, i.e. bytes 00 00 ff ff.
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

/// The hooks that count and report, as indexes into `AgentCounters`.
pub mod hook {
    pub const CONNECT4: u8 = 0;
    pub const CONNECT6: u8 = 1;
    pub const SENDMSG4: u8 = 2;
    pub const SENDMSG6: u8 = 3;
    pub const SKB_EGRESS: u8 = 4;
    pub const SOCK_CREATE: u8 = 5;
    pub const BIND4: u8 = 6;
    pub const BIND6: u8 = 7;
    pub const COUNT: usize = 8;

    pub const NAMES: [&str; COUNT] = [
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "skb_egress",
        "sock_create",
        "bind4",
        "bind6",
    ];
}

/// Why a hook denied.
pub mod reason {
    /// The cgroup has no policy entry.
    pub const NO_POLICY: u8 = 1;
    /// The agent's circuit is tripped.
    pub const TRIPPED: u8 = 2;
    /// The kernel deadline has passed.
    pub const EXPIRED: u8 = 3;
    /// The destination is not the gateway.
    pub const NOT_GATEWAY: u8 = 4;
    /// The socket kind is never allowed (raw, packet, ICMP).
    pub const SOCKET_KIND: u8 = 5;
    /// The packet could not be parsed, or is not IP.
    pub const MALFORMED: u8 = 6;
    /// The agent's state holds an unknown value.
    pub const BAD_STATE: u8 = 7;
    /// The agent is cut off while the daemon is stopped.
    pub const SUSPENDED: u8 = 8;
    /// The port of a bind is a gateway's: whoever listens there gets the requests of the
    /// agent that gateway serves.
    pub const GATEWAY_PORT: u8 = 9;

    pub fn name(reason: u8) -> &'static str {
        match reason {
            NO_POLICY => "no_policy",
            TRIPPED => "tripped",
            EXPIRED => "expired",
            NOT_GATEWAY => "not_gateway",
            SOCKET_KIND => "socket_kind",
            MALFORMED => "malformed",
            BAD_STATE => "bad_state",
            SUSPENDED => "suspended",
            GATEWAY_PORT => "gateway_port",
            _ => "unknown",
        }
    }
}

/// Per-CPU counters of one agent, keyed like the policy map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub allowed: [u64; hook::COUNT],
    pub denied: [u64; hook::COUNT],
}

/// Deny events are budgeted per cgroup and reason, so a flood of one kind (say, sends to
/// anywhere but the gateway) does not hide the first denial of another (the trip).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWindowKey {
    pub cgroup_id: u64,
    pub reason: u32,
    pub _pad: u32,
}

/// How many deny events one cgroup reported on one CPU since `start_ns` (monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventWindow {
    pub start_ns: u64,
    pub sent: u64,
}

/// One deny, sent to userspace through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    pub cgroup_id: u64,
    /// Thread-group id of the task, or 0 where the hook runs outside it (packet egress).
    pub pid: u32,
    pub hook: u8,
    pub reason: u8,
    /// `AF_INET`, `AF_INET6`, `AF_PACKET`…; 0 when unknown.
    pub family: u8,
    /// IP protocol (`IPPROTO_TCP` …) or socket type for `sock_create`.
    pub protocol: u8,
    /// Destination port, host byte order; 0 when none.
    pub dst_port: u16,
    pub _pad0: [u8; 6],
    /// Destination: IPv4 in `dst_addr[0]`, or all four words for IPv6; network order.
    pub dst_addr: [u32; 4],
    /// When the hook denied, `CLOCK_MONOTONIC` nanoseconds (the kernel's `ktime`).
    pub at_monotonic_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are #[repr(C)] plain data of integers with explicit padding fields,
    // so every bit pattern is a valid value and no padding byte is left uninitialised.
    unsafe impl aya::Pod for super::AgentPolicy {}
    unsafe impl aya::Pod for super::AgentCounters {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::EventWindow {}
    unsafe impl aya::Pod for super::EventWindowKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<AgentPolicy>(), 4 + 4 + 4 + 2 + 2 + 16 + 8);
        assert_eq!(align_of::<AgentPolicy>(), 8);
        assert_eq!(size_of::<AgentCounters>(), 2 * 8 * hook::COUNT);
        assert_eq!(size_of::<DenyEvent>(), 8 + 4 + 4 + 2 + 6 + 16 + 8);
    }

    fn policy(state: u32, deadline: u64) -> AgentPolicy {
        AgentPolicy {
            state,
            flags: FLAG_GATEWAY_V4,
            gateway_v4: u32::from_ne_bytes([127, 0, 0, 1]),
            gateway_port: 8080,
            _pad0: 0,
            gateway_v6: [0; 4],
            deadline_boottime_ns: deadline,
        }
    }

    #[test]
    fn gateway_match_needs_flag_address_and_port() {
        let p = policy(STATE_ACTIVE, NO_DEADLINE);
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        assert!(p.is_gateway_v4(lo, 8080));
        assert!(!p.is_gateway_v4(lo, 8081));
        assert!(!p.is_gateway_v4(u32::from_ne_bytes([127, 0, 0, 2]), 8080));
        let no_flag = AgentPolicy { flags: 0, ..p };
        assert!(!no_flag.is_gateway_v4(lo, 8080));
        // An unset IPv6 gateway never matches, not even the all-zero address.
        assert!(!p.is_gateway_v6(&[0; 4], 8080));
    }

    #[test]
    fn open_only_while_active_and_before_deadline() {
        assert!(policy(STATE_ACTIVE, 100).is_open_at(99));
        assert!(!policy(STATE_ACTIVE, 100).is_open_at(100));
        assert!(!policy(STATE_TRIPPED, NO_DEADLINE).is_open_at(0));
        assert!(!policy(STATE_SUSPENDED, NO_DEADLINE).is_open_at(0));
        assert!(!policy(0, NO_DEADLINE).is_open_at(0));
        assert!(!policy(77, NO_DEADLINE).is_open_at(0));
    }

    #[test]
    fn gateway_round_trips_and_mapped_v6_becomes_v4() {
        use core::net::SocketAddr;
        for text in ["127.0.0.1:8080", "[::1]:9000", "[fd00::7]:1"] {
            let addr: SocketAddr = text.parse().unwrap();
            let p = AgentPolicy::for_gateway(addr, NO_DEADLINE);
            assert_eq!(p.gateway(), Some(addr), "{text}");
            assert_eq!(p.state, STATE_ACTIVE);
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.9]:81".parse().unwrap();
        let p = AgentPolicy::for_gateway(mapped, 5);
        assert_eq!(p.flags, FLAG_GATEWAY_V4);
        assert!(p.is_gateway_v4(u32::from_ne_bytes([127, 0, 0, 9]), 81));
        assert_eq!(p.deadline_boottime_ns, 5);
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        let p = AgentPolicy::for_gateway(v6, NO_DEADLINE);
        assert!(p.is_gateway_v6(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])], 9000));
        assert!(!p.is_gateway_v4(0, 9000));
    }

    #[test]
    fn ipv4_mapped_addresses_are_recognised() {
        let mapped = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([127, 0, 0, 1]),
        ];
        assert_eq!(
            ipv4_mapped(&mapped),
            Some(u32::from_ne_bytes([127, 0, 0, 1]))
        );
        let loopback6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert_eq!(ipv4_mapped(&loopback6), None);
        // IPv4-compatible (::a.b.c.d, deprecated) is not mapped and stays IPv6.
        let compat = [0, 0, 0, u32::from_ne_bytes([127, 0, 0, 1])];
        assert_eq!(ipv4_mapped(&compat), None);
    }
}
