//! The circuit breaker of one agent: closed until a condition of the Envelope's `breakers`
//! holds, then open for good. Nothing on the request path can close it; only an operator
//! (through the control plane, which the agent cannot reach) or a new Envelope can.
use std::{
    collections::VecDeque,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::envelope::model::Breakers;

/// What the daemon does when a breaker opens: flip the agent's kernel map entry.
pub trait TripHook: Send + Sync {
    fn tripped(&self, reason: &str);
}

/// A hook that only logs; for the standalone gateway, which has no kernel half.
pub struct LogOnly;

impl TripHook for LogOnly {
    fn tripped(&self, reason: &str) {
        tracing::error!(
            reason,
            "circuit breaker open: every further request is refused"
        );
    }
}

/// Proof that an operator asked for a reset. Only the control plane makes one.
pub struct OperatorReset {
    operator: String,
}

impl OperatorReset {
    pub fn operator(&self) -> &str {
        &self.operator
    }

    /// For the control plane, after it checked the caller's credentials.
    pub fn checked_by_control_plane(operator: impl Into<String>) -> Self {
        OperatorReset {
            operator: operator.into(),
        }
    }
}

/// Events in a sliding time window, kept as sums per slot so that memory and the cost of
/// each event stay bounded however many requests arrive (at most about a thousand slots,
/// never one entry per request). The window is exact to one slot: 10 ms, or a thousandth
/// of the window if that is longer.
struct Window {
    span: Duration,
    slot: Duration,
    slots: VecDeque<Slot>,
    count: u64,
    bad: u64,
    sum: f64,
}

struct Slot {
    start: Instant,
    count: u64,
    bad: u64,
    sum: f64,
}

impl Window {
    fn new(window_secs: u64) -> Self {
        let span = Duration::from_secs(window_secs);
        Window {
            span,
            slot: (span / 1000).max(Duration::from_millis(10)),
            slots: VecDeque::new(),
            count: 0,
            bad: 0,
            sum: 0.0,
        }
    }

    /// Drops the slots that have left the window by `now`.
    fn forget_before(&mut self, now: Instant) {
        while let Some(front) = self.slots.front()
            && now.duration_since(front.start) > self.span
        {
            self.count -= front.count;
            self.bad -= front.bad;
            self.sum -= front.sum;
            self.slots.pop_front();
        }
        if self.slots.is_empty() {
            // No rounding left over from slots that are gone.
            self.sum = 0.0;
        }
    }

    fn add(&mut self, now: Instant, bad: bool, amount: f64) {
        self.forget_before(now);
        let bad = u64::from(bad);
        match self.slots.back_mut() {
            Some(last) if now.duration_since(last.start) < self.slot => {
                last.count += 1;
                last.bad += bad;
                last.sum += amount;
            }
            _ => self.slots.push_back(Slot {
                start: now,
                count: 1,
                bad,
                sum: amount,
            }),
        }
        self.count += 1;
        self.bad += bad;
        self.sum += amount;
    }
}

struct Windows {
    open: Option<String>,
    denied: Option<Window>,
    spend: Option<Window>,
    upstream: Option<Window>,
}

impl Windows {
    fn new(config: &Breakers) -> Self {
        Windows {
            open: None,
            denied: config.denied.as_ref().map(|r| Window::new(r.window_secs)),
            spend: config
                .spend_velocity
                .as_ref()
                .map(|r| Window::new(r.window_secs)),
            upstream: config
                .upstream_errors
                .as_ref()
                .map(|r| Window::new(r.window_secs)),
        }
    }
}

const POISONED: &str = "breaker state poisoned";

pub struct Breaker {
    config: Breakers,
    state: Mutex<Windows>,
    path: Option<PathBuf>,
    hook: Arc<dyn TripHook>,
}

impl Breaker {
    /// A breaker that starts open when `path` records an earlier trip.
    pub fn open(config: Option<Breakers>, path: Option<&Path>, hook: Arc<dyn TripHook>) -> Self {
        let config = config.unwrap_or_default();
        let mut windows = Windows::new(&config);
        if let Some(path) = path {
            match std::fs::read_to_string(path) {
                Ok(reason) => {
                    windows.open = Some(reason.trim().to_owned())
                        .filter(|r| !r.is_empty())
                        .or(Some("tripped before a restart".into()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // A state file that exists but cannot be read may hold a trip: stay open.
                Err(e) => {
                    windows.open = Some(format!("breaker state {} unreadable: {e}", path.display()))
                }
            }
        }
        Breaker {
            config,
            state: Mutex::new(windows),
            path: path.map(Path::to_owned),
            hook,
        }
    }

    /// Why the circuit is open, if it is. A poisoned lock counts as open.
    pub fn open_reason(&self) -> Option<String> {
        match self.state.lock() {
            Ok(state) => state.open.clone(),
            Err(_) => Some(POISONED.into()),
        }
    }

    pub fn record_forbidden(&self, reason: &str) {
        if self.config.on_forbidden {
            self.trip(format!("forbidden effect attempted: {reason}"));
        }
    }

    pub fn record_denied(&self) {
        let Some(rule) = &self.config.denied else {
            return;
        };
        let reason = self.with_state(|s| {
            let w = s.denied.as_mut()?;
            w.add(Instant::now(), true, 0.0);
            (w.count >= u64::from(rule.count))
                .then(|| format!("{} denied requests within {}s", w.count, rule.window_secs))
        });
        if let Some(reason) = reason {
            self.trip(reason);
        }
    }

    /// Counts a request's spend against the spend-velocity window, if it fits: a spend
    /// that would take the window over `max` is not counted, and it opens the circuit in
    /// the same step, so no interleaving of concurrent requests gets more than `max`
    /// through. `Err` (why the circuit is open) means the request must not be forwarded.
    pub fn record_spend(&self, amount: f64) -> Result<(), String> {
        let tripped = {
            let mut state = self.state.lock().map_err(|_| POISONED.to_owned())?;
            if let Some(reason) = &state.open {
                return Err(reason.clone());
            }
            let Some((rule, w)) = self
                .config
                .spend_velocity
                .as_ref()
                .zip(state.spend.as_mut())
            else {
                return Ok(());
            };
            let now = Instant::now();
            w.forget_before(now);
            let total = w.sum + amount;
            if total <= rule.max {
                w.add(now, false, amount);
                return Ok(());
            }
            let reason = format!(
                "spend {total} {} within {}s would exceed {}",
                rule.currency, rule.window_secs, rule.max
            );
            state.open = Some(reason.clone());
            reason
        };
        self.tripped(&tripped);
        Err(tripped)
    }

    pub fn record_upstream(&self, ok: bool) {
        let Some(rule) = &self.config.upstream_errors else {
            return;
        };
        let reason = self.with_state(|s| {
            let w = s.upstream.as_mut()?;
            w.add(Instant::now(), !ok, 0.0);
            let (total, errors) = (w.count, w.bad);
            (total >= u64::from(rule.min_requests) && errors as f64 / total as f64 >= rule.rate)
                .then(|| {
                    format!(
                        "{errors} of {total} upstream requests failed within {}s",
                        rule.window_secs
                    )
                })
        });
        if let Some(reason) = reason {
            self.trip(reason);
        }
    }

    /// Opens the circuit: persisted first, then the hook (the kernel flip) runs.
    pub fn trip(&self, reason: String) {
        let first = match self.state.lock() {
            Ok(mut state) => {
                let first = state.open.is_none();
                if first {
                    state.open = Some(reason.clone());
                }
                first
            }
            Err(_) => true,
        };
        if first {
            self.tripped(&reason);
        }
    }

    /// Persists a trip that was just marked open in the state, then runs the hook.
    fn tripped(&self, reason: &str) {
        if let Some(path) = &self.path {
            let written = std::fs::File::create(path).and_then(|mut f| {
                f.write_all(reason.as_bytes())?;
                f.sync_all()
            });
            if let Err(e) = written {
                tracing::error!(path = %path.display(), error = %e, "could not persist the trip; it holds until this process exits");
            }
        }
        self.hook.tripped(reason);
    }

    /// Closes the circuit on an operator's word.
    pub fn reset(&self, by: &OperatorReset) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if let Ok(mut state) = self.state.lock() {
            *state = Windows::new(&self.config);
        }
        tracing::warn!(operator = %by.operator, "circuit breaker reset by an operator");
        Ok(())
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut Windows) -> Option<T>) -> Option<T> {
        self.state
            .lock()
            .ok()
            .and_then(|mut s| if s.open.is_some() { None } else { f(&mut s) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::model::{DeniedBreaker, SpendVelocityBreaker, UpstreamErrorBreaker};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn windows_stay_small_under_load_and_forget_what_left_them() {
        let mut w = Window::new(60);
        let t0 = Instant::now();
        for i in 0..200_000u64 {
            // 200k events over 20 s: one slot per 10 ms at most.
            w.add(t0 + Duration::from_micros(i * 100), i % 4 == 0, 0.5);
        }
        assert_eq!((w.count, w.bad), (200_000, 50_000));
        assert!((w.sum - 100_000.0).abs() < 1e-6);
        assert!(w.slots.len() <= 2_001, "{} slots", w.slots.len());
        // 61 s after the last event everything has left the window.
        w.add(t0 + Duration::from_secs(81), false, 2.0);
        assert_eq!((w.count, w.bad, w.sum), (1, 0, 2.0));
        assert_eq!(w.slots.len(), 1);
        // A day-long window still holds at most about a thousand slots.
        let mut day = Window::new(86_400);
        for i in 0..100_000u64 {
            day.add(t0 + Duration::from_secs(i), false, 0.0);
        }
        assert!(day.slots.len() <= 1_001, "{} slots", day.slots.len());
    }

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl TripHook for Count {
        fn tripped(&self, _: &str) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn config() -> Breakers {
        Breakers {
            denied: Some(DeniedBreaker {
                count: 3,
                window_secs: 60,
            }),
            spend_velocity: Some(SpendVelocityBreaker {
                currency: "USD".into(),
                max: 100.0,
                window_secs: 60,
            }),
            on_forbidden: true,
            upstream_errors: Some(UpstreamErrorBreaker {
                rate: 0.5,
                min_requests: 4,
                window_secs: 60,
            }),
        }
    }

    #[test]
    fn concurrent_spend_never_gets_more_than_max_through() {
        let b = Arc::new(Breaker::open(
            Some(config()),
            None,
            Arc::new(Count::default()),
        ));
        let admitted: f64 = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| b.record_spend(30.0).map_or(0.0, |()| 30.0)))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(admitted, 90.0, "three of 30 fit in 100, the fourth trips");
        assert!(b.open_reason().unwrap().contains("would exceed"));
    }

    #[test]
    fn each_condition_trips_once_and_the_trip_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("breaker");
        let hook = Arc::new(Count::default());
        let b = Breaker::open(Some(config()), Some(&path), hook.clone());
        b.record_denied();
        b.record_denied();
        assert!(b.open_reason().is_none());
        b.record_denied();
        assert!(b.open_reason().unwrap().contains("denied"));
        b.record_forbidden("withdrawal");
        assert_eq!(hook.0.load(Ordering::SeqCst), 1, "the hook runs once");
        let again = Breaker::open(Some(config()), Some(&path), hook.clone());
        assert!(again.open_reason().unwrap().contains("denied"));
        again
            .reset(&OperatorReset::checked_by_control_plane("root"))
            .unwrap();
        assert!(again.open_reason().is_none());
        assert!(
            Breaker::open(Some(config()), Some(&path), hook)
                .open_reason()
                .is_none()
        );
    }

    #[test]
    fn spend_velocity_forbidden_and_upstream_errors_trip() {
        let hook: Arc<dyn TripHook> = Arc::new(Count::default());
        let b = Breaker::open(Some(config()), None, hook.clone());
        assert!(b.record_spend(60.0).is_ok());
        assert!(b.record_spend(40.0).is_ok(), "up to max fits");
        let refused = b.record_spend(0.5).unwrap_err();
        assert!(refused.contains("spend"), "{refused}");
        assert_eq!(
            b.open_reason(),
            Some(refused),
            "the refusal opened the circuit"
        );
        assert!(
            b.record_spend(0.5).is_err(),
            "an open circuit admits nothing"
        );
        let b = Breaker::open(Some(config()), None, hook.clone());
        b.record_forbidden("withdrawal");
        assert!(b.open_reason().unwrap().contains("withdrawal"));
        let b = Breaker::open(Some(config()), None, hook);
        for ok in [true, false, true] {
            b.record_upstream(ok);
        }
        assert!(b.open_reason().is_none(), "below min_requests");
        b.record_upstream(false);
        assert!(b.open_reason().unwrap().contains("upstream"));
    }
}
