//! Requests held for a human. The request path can only wait; deciding takes the control
//! plane, which the agent cannot reach. No answer before the timeout is a denial.
use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::oneshot;

/// A held request, as an operator sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Held {
    pub id: u64,
    pub method: String,
    pub url: String,
    pub rule: String,
    /// SHA-256 of method, URL and body: the approval applies to exactly this request.
    pub request_sha256: String,
    pub timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approved,
    Denied,
    TimedOut,
}

/// How long a hold whose time ran out while an operator was deciding it waits for that
/// decision (which is recorded before it is given) before it counts as timed out.
const CLAIMED_GRACE: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Approvals {
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, (Held, oneshot::Sender<bool>)>>,
}

impl Approvals {
    /// Holds until an operator decides or `timeout` passes.
    pub async fn hold(&self, mut held: Held, timeout: Duration) -> Verdict {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        held.id = id;
        match self.pending.lock() {
            Ok(mut pending) => {
                pending.insert(id, (held, tx));
            }
            Err(_) => return Verdict::Denied,
        }
        // Removes the entry however the wait ends, also when the agent goes away and its
        // request is dropped mid-wait: operators are not shown requests nobody waits for,
        // and abandoned holds do not pile up.
        let _pending = Pending {
            approvals: self,
            id,
        };
        let mut rx = rx;
        let answer = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(answer) => answer,
            Err(_) => {
                // Time is up: the hold leaves the list now, so no operator can claim it
                // after its timeout. One who claimed it before is recording a decision
                // that is the answer, so the log never shows a decision followed by a
                // timeout of the same request.
                let claimed = match self.pending.lock() {
                    Ok(mut pending) => pending.remove(&id).is_none(),
                    Err(_) => false,
                };
                if !claimed {
                    return Verdict::TimedOut;
                }
                match tokio::time::timeout(CLAIMED_GRACE, rx).await {
                    Ok(answer) => answer,
                    Err(_) => return Verdict::TimedOut,
                }
            }
        };
        match answer {
            Ok(true) => Verdict::Approved,
            Ok(false) | Err(_) => Verdict::Denied,
        }
    }

    pub fn list(&self) -> Vec<Held> {
        self.pending
            .lock()
            .map(|p| p.values().map(|(h, _)| h.clone()).collect())
            .unwrap_or_default()
    }

    /// Decides a held request; false when no such request is waiting.
    pub fn decide(&self, id: u64, approve: bool) -> bool {
        self.claim(id).is_some_and(|claim| claim.decide(approve))
    }

    /// Takes a held request off the list for one operator to decide, so the decision can
    /// be recorded before it takes effect; `None` when no such request is waiting. A
    /// claim dropped undecided denies the request.
    pub fn claim(&self, id: u64) -> Option<Claim> {
        let (held, tx) = self.pending.lock().ok()?.remove(&id)?;
        Some(Claim { held, tx: Some(tx) })
    }
}

/// A held request one operator is deciding; see [`Approvals::claim`].
pub struct Claim {
    pub held: Held,
    tx: Option<oneshot::Sender<bool>>,
}

impl Claim {
    /// Answers the held request; false when it no longer waits (it timed out or its
    /// agent went away).
    pub fn decide(mut self, approve: bool) -> bool {
        self.tx.take().is_some_and(|tx| tx.send(approve).is_ok())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(false);
        }
    }
}

struct Pending<'a> {
    approvals: &'a Approvals,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // A poisoned map still holds the entry; it is removed all the same.
        self.approvals
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The id of the first request held, once one is.
    async fn first_held(approvals: &Approvals) -> u64 {
        loop {
            if let Some(h) = approvals.list().first() {
                return h.id;
            }
            tokio::task::yield_now().await;
        }
    }

    fn held() -> Held {
        Held {
            id: 0,
            method: "POST".into(),
            url: "http://x/".into(),
            rule: "r".into(),
            request_sha256: String::new(),
            timeout_secs: 5,
        }
    }

    /// A request held for `timeout` on its own task, and its id once it is listed.
    async fn spawn_hold(
        approvals: &Arc<Approvals>,
        timeout: Duration,
    ) -> (tokio::task::JoinHandle<Verdict>, u64) {
        let a = approvals.clone();
        let waiter = tokio::spawn(async move { a.hold(held(), timeout).await });
        (waiter, first_held(approvals).await)
    }

    #[tokio::test]
    async fn approve_deny_and_timeout() {
        let approvals = Arc::new(Approvals::default());
        for (approve, want) in [(true, Verdict::Approved), (false, Verdict::Denied)] {
            let (waiter, id) = spawn_hold(&approvals, Duration::from_secs(5)).await;
            assert!(approvals.decide(id, approve));
            assert_eq!(waiter.await.unwrap(), want);
        }
        assert_eq!(
            approvals.hold(held(), Duration::from_millis(20)).await,
            Verdict::TimedOut
        );
        assert!(approvals.list().is_empty());
        assert!(!approvals.decide(999, true));
    }

    #[tokio::test]
    async fn a_claim_is_one_operator_s_and_denies_when_dropped_undecided() {
        let approvals = Arc::new(Approvals::default());
        let (waiter, id) = spawn_hold(&approvals, Duration::from_secs(60)).await;
        let claim = approvals.claim(id).expect("held");
        assert_eq!(claim.held.id, id);
        assert!(
            approvals.list().is_empty(),
            "a claimed request is off the list"
        );
        assert!(
            approvals.claim(id).is_none(),
            "and nobody else can claim it"
        );
        drop(claim);
        assert_eq!(waiter.await.unwrap(), Verdict::Denied);
    }

    #[tokio::test]
    async fn a_decision_claimed_in_time_is_the_answer_even_after_the_timeout() {
        let approvals = Arc::new(Approvals::default());
        let (waiter, id) = spawn_hold(&approvals, Duration::from_millis(50)).await;
        let claim = approvals.claim(id).expect("held");
        // The operator's record takes longer than the hold had left.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            claim.decide(true),
            "the request still waits for the decision"
        );
        assert_eq!(waiter.await.unwrap(), Verdict::Approved);
    }

    #[tokio::test]
    async fn a_hold_that_timed_out_cannot_be_claimed() {
        let approvals = Arc::new(Approvals::default());
        let (waiter, id) = spawn_hold(&approvals, Duration::from_millis(50)).await;
        assert_eq!(waiter.await.unwrap(), Verdict::TimedOut);
        assert!(approvals.claim(id).is_none());
    }

    #[tokio::test]
    async fn a_hold_dropped_mid_wait_leaves_nothing_pending() {
        let approvals = Arc::new(Approvals::default());
        let a = approvals.clone();
        let waiter = tokio::spawn(async move { a.hold(held(), Duration::from_secs(60)).await });
        while approvals.list().is_empty() {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert!(approvals.list().is_empty());
    }
}
