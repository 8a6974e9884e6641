//! Kernel deny events summed up for the audit log.
//!
//! An agent looping on a denied `sendto` makes the kernel report hundreds of thousands of
//! denials a second. One record each would fill the audit queue that gateways must write
//! to before they forward, and the disk. So denials are counted per agent, hook, reason,
//! protocol and destination: the first of a burst is recorded at once, the rest as one
//! record per window carrying how many there were. Counts are exact: a summary that
//! cannot be written now (no room in the queue) keeps counting and is written later.
//! Memory is bounded: past `max_keys` bursts, new destinations of an agent are summed
//! under "various", and past that everything is summed in one last bucket.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::kernel::events::KernelDeny;

/// Where the denied traffic went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Destination {
    To(SocketAddr),
    /// The hook has none (socket creation, non-IP packets).
    None,
    /// Many, summed up because the distinct ones outgrew the table.
    Various,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    cgroup_id: u64,
    hook: &'static str,
    reason: &'static str,
    protocol: u8,
    destination: Destination,
}

/// Everything summed in the last bucket, when even the spill-over table is full.
const UNATTRIBUTED: Key = Key {
    cgroup_id: 0,
    hook: "various",
    reason: "various",
    protocol: 0,
    destination: Destination::Various,
};

struct Bucket {
    agent: Arc<str>,
    since: Instant,
    count: u64,
    pid: u32,
    family: &'static str,
}

/// One audit record's worth of denials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Summary {
    pub agent: Arc<str>,
    pub cgroup_id: u64,
    pub hook: &'static str,
    pub reason: &'static str,
    pub family: &'static str,
    pub protocol: u8,
    pub destination: Destination,
    /// The last process seen denied (0 for packet egress, which runs outside the task).
    pub pid: u32,
    pub count: u64,
    /// How long the counted denials took to come, from the first one.
    pub over: Duration,
}

pub(super) struct DenyLog {
    window: Duration,
    max_keys: usize,
    buckets: HashMap<Key, Bucket>,
    /// Bursts recorded at their first denial per window at most; past that, a new burst
    /// waits for its summary like the rest (a scan of many ports is many bursts).
    at_once: usize,
    at_once_used: usize,
    at_once_since: Option<Instant>,
}

impl DenyLog {
    pub fn new(window: Duration, max_keys: usize, at_once: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
            at_once,
            at_once_used: 0,
            at_once_since: None,
        }
    }

    fn may_record_at_once(&mut self, now: Instant) -> bool {
        let new_window = self
            .at_once_since
            .is_none_or(|since| now.saturating_duration_since(since) >= self.window);
        if new_window {
            self.at_once_since = Some(now);
            self.at_once_used = 0;
        }
        if self.at_once_used < self.at_once {
            self.at_once_used += 1;
            true
        } else {
            false
        }
    }

    /// Counts one denial of `agent`. The first of a burst is offered to `record` at once;
    /// if `record` says it could not be written, it is counted for the next summary.
    pub fn observe(
        &mut self,
        agent: &str,
        e: &KernelDeny,
        now: Instant,
        record: impl FnOnce(&Summary) -> bool,
    ) {
        let key = Key {
            cgroup_id: e.cgroup_id,
            hook: e.hook,
            reason: e.reason,
            protocol: e.protocol,
            destination: e.destination.map_or(Destination::None, Destination::To),
        };
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.count += 1;
            bucket.pid = e.pid;
            return;
        }
        if self.buckets.len() < self.max_keys {
            let summary = Summary {
                agent: Arc::from(agent),
                cgroup_id: key.cgroup_id,
                hook: key.hook,
                reason: key.reason,
                family: e.family,
                protocol: key.protocol,
                destination: key.destination,
                pid: e.pid,
                count: 1,
                over: Duration::ZERO,
            };
            let written = self.may_record_at_once(now) && record(&summary);
            self.buckets.insert(
                key,
                Bucket {
                    agent: summary.agent,
                    since: now,
                    count: u64::from(!written),
                    pid: e.pid,
                    family: e.family,
                },
            );
            return;
        }
        // Out of room for one more burst: keep the agent, hook and reason, drop the
        // destination; a quarter more of the table is allowed for that.
        let various = Key {
            destination: Destination::Various,
            ..key
        };
        let key = if self.buckets.contains_key(&various)
            || self.buckets.len() < self.max_keys + self.max_keys / 4
        {
            various
        } else {
            UNATTRIBUTED
        };
        let bucket = self.buckets.entry(key).or_insert_with(|| Bucket {
            agent: Arc::from(if key == UNATTRIBUTED {
                "various"
            } else {
                agent
            }),
            since: now,
            count: 0,
            pid: e.pid,
            family: if key == UNATTRIBUTED {
                "various"
            } else {
                e.family
            },
        });
        bucket.count += 1;
        bucket.pid = e.pid;
    }

    /// Offers `record` the summary of every burst whose window is over. A burst that goes
    /// on is summed again one window later; one that went quiet is forgotten, so its next
    /// denial is recorded at once. A summary `record` could not write stays counted.
    pub fn flush(&mut self, now: Instant, mut record: impl FnMut(&Summary) -> bool) {
        let window = self.window;
        self.buckets.retain(|key, bucket| {
            let over = now.saturating_duration_since(bucket.since);
            if over < window {
                return true;
            }
            if bucket.count == 0 {
                return false;
            }
            let summary = Summary {
                agent: bucket.agent.clone(),
                cgroup_id: key.cgroup_id,
                hook: key.hook,
                reason: key.reason,
                family: bucket.family,
                protocol: key.protocol,
                destination: key.destination,
                pid: bucket.pid,
                count: bucket.count,
                over,
            };
            if record(&summary) {
                bucket.count = 0;
                bucket.since = now;
            }
            true
        });
    }

    /// Offers `record` every summary still counting, window over or not (the daemon is
    /// stopping).
    pub fn drain(&mut self, now: Instant, record: impl FnMut(&Summary) -> bool) {
        self.window = Duration::ZERO;
        self.flush(now, record);
    }

    /// Denials counted and not yet written.
    pub fn pending(&self) -> u64 {
        self.buckets.values().map(|b| b.count).sum()
    }

    /// Bursts being counted.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(cgroup_id: u64, port: u16) -> KernelDeny {
        KernelDeny {
            cgroup_id,
            pid: 7,
            hook: "sendmsg4",
            reason: "udp",
            family: "inet",
            protocol: 17,
            destination: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            at_monotonic_ns: 0,
        }
    }

    #[test]
    fn a_flood_is_one_record_at_once_and_one_per_window_with_exact_counts() {
        let mut log = DenyLog::new(Duration::from_secs(1), 16, 4);
        let start = Instant::now();
        let mut written = Vec::new();
        for i in 0..100_000u64 {
            let now = start + Duration::from_micros(i * 25); // 2.5 s of denials
            log.observe("a", &deny(1, 53), now, |s| {
                written.push(s.clone());
                true
            });
            log.flush(now, |s| {
                written.push(s.clone());
                true
            });
        }
        log.flush(start + Duration::from_secs(10), |s| {
            written.push(s.clone());
            true
        });
        assert!(written.len() <= 4, "{written:?}");
        assert_eq!(written.iter().map(|s| s.count).sum::<u64>(), 100_000);
        assert_eq!(written[0].count, 1);
        assert_eq!(log.pending(), 0);
        // Quiet for a window: forgotten, and the next denial is recorded at once again.
        log.flush(start + Duration::from_secs(20), |_| true);
        assert_eq!(log.len(), 0);
    }

    #[test]
    fn what_cannot_be_written_now_is_counted_for_later() {
        let mut log = DenyLog::new(Duration::from_secs(1), 16, 4);
        let start = Instant::now();
        for _ in 0..10 {
            log.observe("a", &deny(1, 53), start, |_| false);
        }
        log.flush(start + Duration::from_secs(2), |_| false);
        assert_eq!(log.pending(), 10);
        let mut total = 0;
        log.flush(start + Duration::from_secs(3), |s| {
            total += s.count;
            true
        });
        assert_eq!(total, 10);
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn memory_is_bounded_and_counts_stay_exact_past_the_table() {
        let mut log = DenyLog::new(Duration::from_secs(1), 8, 4);
        let start = Instant::now();
        let mut total = 0;
        for cgroup in 1..=20u64 {
            for port in 0..1000u16 {
                log.observe("a", &deny(cgroup, port), start, |s| {
                    total += s.count;
                    true
                });
            }
        }
        assert!(log.len() <= 8 + 8 / 4 + 1, "{} buckets", log.len());
        assert!(
            total <= 4,
            "{total} denials recorded at once, past the budget"
        );
        log.flush(start + Duration::from_secs(1), |s| {
            total += s.count;
            true
        });
        assert_eq!(total, 20_000);
    }
}
