//! The enforcer's kernel programs.
//!
//! All of them are attached to the enforcer's parent cgroup, so they judge every socket,
//! bind and packet of every agent cgroup below it. Each entry point is a thin wrapper around a
//! `try_*` function that returns an explicit verdict; every path that cannot prove the
//! traffic is bound for the agent's own gateway denies — a missing policy entry, a tripped
//! or expired agent, an unparsable packet, an unknown state value.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_skb_cgroup_id,
        },
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use core::ptr::{addr_of, read_volatile};
use enforcer_common::{
    AgentCounters, AgentPolicy, DenyEvent, EVENT_WINDOW_NS, EVENTS_PER_WINDOW, EVENTS_RING_BYTES,
    EventWindow, EventWindowKey, MAX_AGENTS, STATE_ACTIVE, STATE_SUSPENDED, STATE_TRIPPED, hook, ipv4_mapped, reason,
};

/// Kernel verdicts for cgroup programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_PACKET: u32 = 17;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_ICMPV6: u32 = 58;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[map(name = "ENFORCER_POLICY")]
static POLICY: HashMap<u64, AgentPolicy> = HashMap::pinned(MAX_AGENTS, 0);

#[map(name = "ENFORCER_COUNTERS")]
static COUNTERS: PerCpuHashMap<u64, AgentCounters> = PerCpuHashMap::pinned(MAX_AGENTS, 0);

#[map(name = "ENFORCER_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map(name = "ENFORCER_LOST_EVENTS")]
static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The ports of the gateways in the policy map (host byte order) → the cgroup of an agent
/// using it. Agents may not bind them: while a gateway is not listening (its daemon was
/// killed), an agent bound there would get the requests of the agent it serves.
#[map(name = "ENFORCER_GATEWAY_PORTS")]
static GATEWAY_PORTS: HashMap<u16, u64> = HashMap::pinned(MAX_AGENTS, 0);

/// Deny events reported per cgroup, reason and CPU in the current window. A denial loop makes
/// hundreds of thousands a second; past the budget they are only counted (COUNTERS stays
/// exact), so one agent cannot drown the others' events or the daemon's CPU.
#[map(name = "ENFORCER_EVENT_WINDOWS")]
static EVENT_WINDOWS: LruPerCpuHashMap<EventWindowKey, EventWindow> =
    LruPerCpuHashMap::pinned(MAX_AGENTS, 0);

/// What a hook decided, with enough to report a denial.
struct Verdict {
    allow: bool,
    reason: u8,
    family: u8,
    protocol: u8,
    dst_port: u16,
    dst_addr: [u32; 4],
}

impl Verdict {
    const fn deny(reason: u8) -> Self {
        Verdict { allow: false, reason, family: 0, protocol: 0, dst_port: 0, dst_addr: [0; 4] }
    }
}

/// Looks up the agent and checks it may use its gateway now. `Err` carries the deny reason.
#[inline(always)]
fn open_policy(cgroup_id: u64) -> Result<&'static AgentPolicy, u8> {
    // SAFETY: the map value is only read; userspace replaces entries whole.
    let Some(policy) = (unsafe { POLICY.get(&cgroup_id) }) else {
        return Err(reason::NO_POLICY);
    };
    match policy.state {
        STATE_ACTIVE => {}
        STATE_TRIPPED => return Err(reason::TRIPPED),
        STATE_SUSPENDED => return Err(reason::SUSPENDED),
        _ => return Err(reason::BAD_STATE),
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if !policy.is_open_at(now) {
        return Err(reason::EXPIRED);
    }
    Ok(policy)
}

/// Counts the verdict, reports a denial, and turns it into the kernel's return value.
#[inline(always)]
fn finish(cgroup_id: u64, hook_id: u8, pid: u32, verdict: Verdict) -> i32 {
    if let Some(counters) = COUNTERS.get_ptr_mut(&cgroup_id) {
        let idx = hook_id as usize;
        if idx < hook::COUNT {
            // SAFETY: per-CPU value of this CPU; no other writer while the program runs.
            unsafe {
                if verdict.allow {
                    (*counters).allowed[idx] += 1;
                } else {
                    (*counters).denied[idx] += 1;
                }
            }
        }
    }
    if verdict.allow {
        return ALLOW;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if !event_budget_left(cgroup_id, verdict.reason, now) {
        return DENY;
    }
    let event = DenyEvent {
        cgroup_id,
        pid,
        hook: hook_id,
        reason: verdict.reason,
        family: verdict.family,
        protocol: verdict.protocol,
        dst_port: verdict.dst_port,
        _pad0: [0; 6],
        dst_addr: verdict.dst_addr,
        at_monotonic_ns: now,
    };
    if EVENTS.output::<DenyEvent>(&event, 0).is_err() {
        if let Some(lost) = LOST_EVENTS.get_ptr_mut(0) {
            // SAFETY: per-CPU slot of this CPU.
            unsafe { *lost += 1 };
        }
    }
    DENY
}

/// Takes one event from the budget of the cgroup and reason on this CPU, if any is left in
/// the window.
#[inline(always)]
fn event_budget_left(cgroup_id: u64, reason: u8, now: u64) -> bool {
    let key = EventWindowKey {
        cgroup_id,
        reason: u32::from(reason),
        _pad: 0,
    };
    match EVENT_WINDOWS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU; no other writer while the program runs.
        Some(window) => unsafe {
            if now.wrapping_sub((*window).start_ns) >= EVENT_WINDOW_NS {
                (*window).start_ns = now;
                (*window).sent = 1;
                true
            } else if (*window).sent < EVENTS_PER_WINDOW {
                (*window).sent += 1;
                true
            } else {
                false
            }
        },
        None => {
            // A full map evicts the least recently used cgroup: it starts a new window.
            let first = EventWindow {
                start_ns: now,
                sent: 1,
            };
            let _ = EVENT_WINDOWS.insert(&key, &first, 0);
            true
        }
    }
}

#[inline(always)]
fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

// ---------------------------------------------------------------------------------------
// connect4 / connect6 / sendmsg4 / sendmsg6
// ---------------------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn enforcer_connect4(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::CONNECT4, current_pid(), judge_sock_addr(&ctx, cgroup_id, false))
}

#[cgroup_sock_addr(connect6)]
pub fn enforcer_connect6(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::CONNECT6, current_pid(), judge_sock_addr(&ctx, cgroup_id, true))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn enforcer_sendmsg4(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::SENDMSG4, current_pid(), judge_sock_addr(&ctx, cgroup_id, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforcer_sendmsg6(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::SENDMSG6, current_pid(), judge_sock_addr(&ctx, cgroup_id, true))
}

/// The protocol, port (host order) and address (network order) of a sock_addr hook.
#[inline(always)]
fn read_sock_addr(ctx: &SockAddrContext, v6: bool) -> (u32, u16, [u32; 4]) {
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    // Every context field is read with its own 4-byte load: the verifier rewrites context
    // accesses field by field and older kernels reject merged 8-byte loads of user_ip6.
    // SAFETY: `sa` is the context pointer the kernel passed in; fields are in bounds.
    unsafe {
        let protocol = read_volatile(addr_of!((*sa).protocol));
        let port_be = read_volatile(addr_of!((*sa).user_port));
        let addr = if v6 {
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]
        } else {
            [read_volatile(addr_of!((*sa).user_ip4)), 0, 0, 0]
        };
        (protocol, u16::from_be(port_be as u16), addr)
    }
}

/// The gateway speaks TCP only, so only a TCP connect to exactly its address and port
/// passes; every UDP `connect`/`sendmsg` is denied, whatever its destination.
#[inline(always)]
fn judge_sock_addr(ctx: &SockAddrContext, cgroup_id: u64, v6: bool) -> Verdict {
    let (protocol, port, addr) = read_sock_addr(ctx, v6);
    let mut verdict = Verdict {
        allow: false,
        reason: reason::NOT_GATEWAY,
        family: if v6 { AF_INET6 as u8 } else { AF_INET as u8 },
        protocol: protocol as u8,
        dst_port: port,
        dst_addr: addr,
    };
    let policy = match open_policy(cgroup_id) {
        Ok(policy) => policy,
        Err(why) => {
            verdict.reason = why;
            return verdict;
        }
    };
    if protocol != IPPROTO_TCP {
        return verdict;
    }
    verdict.allow = if v6 {
        match ipv4_mapped(&addr) {
            Some(v4) => policy.is_gateway_v4(v4, port),
            None => policy.is_gateway_v6(&addr, port),
        }
    } else {
        policy.is_gateway_v4(addr[0], port)
    };
    verdict
}

// ---------------------------------------------------------------------------------------
// bind4 / bind6
// ---------------------------------------------------------------------------------------

#[cgroup_sock_addr(bind4)]
pub fn enforcer_bind4(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::BIND4, current_pid(), judge_bind(&ctx, false))
}

#[cgroup_sock_addr(bind6)]
pub fn enforcer_bind6(ctx: SockAddrContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::BIND6, current_pid(), judge_bind(&ctx, true))
}

/// Denies binding a gateway's port, whatever the address: a wildcard or dual-stack bind
/// receives connections to the gateway's address as well. Every other bind passes; it
/// sends nothing, and the connect and egress hooks judge what the socket sends.
#[inline(always)]
fn judge_bind(ctx: &SockAddrContext, v6: bool) -> Verdict {
    let (protocol, port, addr) = read_sock_addr(ctx, v6);
    // SAFETY: the value is only tested for presence.
    let reserved = port != 0 && unsafe { GATEWAY_PORTS.get(&port) }.is_some();
    Verdict {
        allow: !reserved,
        reason: reason::GATEWAY_PORT,
        family: if v6 { AF_INET6 as u8 } else { AF_INET as u8 },
        protocol: protocol as u8,
        dst_port: port,
        dst_addr: addr,
    }
}

// ---------------------------------------------------------------------------------------
// cgroup_skb egress: the backstop for raw sockets, ICMP and connections that were open
// before a trip.
// ---------------------------------------------------------------------------------------

#[cgroup_skb(egress)]
pub fn enforcer_skb_egress(ctx: SkBuffContext) -> i32 {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: `skb` is the context pointer the kernel passed in.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    let verdict = judge_skb(&ctx, cgroup_id).unwrap_or(Verdict::deny(reason::MALFORMED));
    finish(cgroup_id, hook::SKB_EGRESS, 0, verdict)
}

#[inline(always)]
fn judge_skb(ctx: &SkBuffContext, cgroup_id: u64) -> Result<Verdict, i64> {
    // SAFETY: context field read.
    let l3_proto = u16::from_be(unsafe { read_volatile(addr_of!((*ctx.skb.skb).protocol)) } as u16);
    let (family, protocol, dst_addr, dst_port) = match l3_proto {
        ETH_P_IP => {
            let ver_ihl: u8 = ctx.load(0)?;
            if ver_ihl >> 4 != 4 {
                return Ok(Verdict::deny(reason::MALFORMED));
            }
            let header_len = ((ver_ihl & 0x0f) as usize) * 4;
            if header_len < 20 {
                return Ok(Verdict::deny(reason::MALFORMED));
            }
            // Locally generated packets reach this hook before fragmentation, so a fragment
            // here was built by hand (a raw socket): never needed, never allowed.
            let frag: u16 = u16::from_be(ctx.load(6)?);
            if frag & 0x3fff != 0 {
                return Ok(Verdict::deny(reason::MALFORMED));
            }
            let protocol: u8 = ctx.load(9)?;
            let daddr: u32 = ctx.load(16)?;
            let dport = if protocol as u32 == IPPROTO_TCP {
                u16::from_be(ctx.load(header_len + 2)?)
            } else {
                0
            };
            (AF_INET, protocol, [daddr, 0, 0, 0], dport)
        }
        ETH_P_IPV6 => {
            let ver: u8 = ctx.load(0)?;
            if ver >> 4 != 6 {
                return Ok(Verdict::deny(reason::MALFORMED));
            }
            // Only a plain TCP header may follow: extension headers are never needed to
            // reach the gateway, and skipping them would widen what the parser must trust.
            let next_header: u8 = ctx.load(6)?;
            let daddr = [ctx.load(24)?, ctx.load(28)?, ctx.load(32)?, ctx.load(36)?];
            let dport = if next_header as u32 == IPPROTO_TCP {
                u16::from_be(ctx.load(40 + 2)?)
            } else {
                0
            };
            (AF_INET6, next_header, daddr, dport)
        }
        _ => return Ok(Verdict::deny(reason::MALFORMED)),
    };
    let mut verdict = Verdict {
        allow: false,
        reason: reason::NOT_GATEWAY,
        family: family as u8,
        protocol,
        dst_port,
        dst_addr,
    };
    let policy = match open_policy(cgroup_id) {
        Ok(policy) => policy,
        Err(why) => {
            verdict.reason = why;
            return Ok(verdict);
        }
    };
    if protocol as u32 != IPPROTO_TCP {
        return Ok(verdict);
    }
    verdict.allow = if family == AF_INET {
        policy.is_gateway_v4(dst_addr[0], dst_port)
    } else {
        match ipv4_mapped(&dst_addr) {
            Some(v4) => policy.is_gateway_v4(v4, dst_port),
            None => policy.is_gateway_v6(&dst_addr, dst_port),
        }
    };
    Ok(verdict)
}

// ---------------------------------------------------------------------------------------
// sock_create
// ---------------------------------------------------------------------------------------

/// Denies raw and packet sockets and ICMP ("ping") sockets outright, and every inet socket
/// of an agent that may not talk to its gateway now.
#[cgroup_sock(sock_create)]
pub fn enforcer_sock_create(ctx: SockContext) -> i32 {
    let cgroup_id = current_cgroup();
    finish(cgroup_id, hook::SOCK_CREATE, current_pid(), judge_sock_create(&ctx, cgroup_id))
}

#[inline(always)]
fn judge_sock_create(ctx: &SockContext, cgroup_id: u64) -> Verdict {
    let sk: *const bpf_sock = ctx.sock;
    // SAFETY: context field reads.
    let (family, sock_type, protocol) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).type_)),
            read_volatile(addr_of!((*sk).protocol)),
        )
    };
    let mut verdict = Verdict {
        allow: false,
        reason: reason::SOCKET_KIND,
        family: family as u8,
        protocol: sock_type as u8,
        dst_port: 0,
        dst_addr: [0; 4],
    };
    if family == AF_PACKET
        || sock_type == SOCK_RAW
        || protocol == IPPROTO_ICMP
        || protocol == IPPROTO_ICMPV6
    {
        return verdict;
    }
    if let Err(why) = open_policy(cgroup_id) {
        verdict.reason = why;
        return verdict;
    }
    verdict.allow = true;
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program in which a panic could be reached, so this is never
    // part of a loaded program.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
