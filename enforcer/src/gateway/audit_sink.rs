//! Gateway decisions into the tamper-evident audit log.
//!
//! A request is forwarded only after its `request_allowed` record is in the log file
//! ([`DecisionSink::record_before_acting`] waits for the writer's `write`, not for the
//! disk): from then on no crash of this process can lose it, and the group commit's fsync
//! follows without holding the request. Outcomes (refusals, holds, a forwarded request's
//! upstream status) are queued without waiting, in order. Any error — the queue full, a
//! failed write or fsync, the log closed — is returned, and the gateway refuses.
use serde_json::Value;

use super::server::{Decision, DecisionSink, SinkFuture};
use crate::audit::{AuditLog, Event, EventKind, Until};

pub struct AuditSink {
    log: AuditLog,
}

impl AuditSink {
    pub fn new(log: AuditLog) -> Self {
        AuditSink { log }
    }

    pub fn log(&self) -> &AuditLog {
        &self.log
    }
}

/// The audit event for one decision. The URL's query is left out (it is where APIs take
/// keys); everything else is the gateway's own words and numbers.
pub fn event(d: &Decision) -> Event {
    let kind = match d.outcome {
        "allowed" => EventKind::RequestAllowed,
        "held" => EventKind::RequestHeld,
        "approved" => EventKind::RequestApproved,
        _ => EventKind::RequestDenied,
    };
    let (scheme, rest) = d.url.split_once("://").unwrap_or(("", d.url.as_str()));
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let mut e = Event::new(kind)
        .envelope(d.envelope_id.as_str())
        .agent(d.agent.as_str())
        .rule(d.rule.as_str())
        .request(&d.method, host, path)
        .detail("scheme", scheme)
        .detail("step", d.step)
        .detail("spend", d.spend)
        .detail("bytes_up", d.bytes_up)
        .detail("bytes_down", d.bytes_down)
        .detail("latency_ms", d.latency_ms);
    if d.status != 0 {
        e = e.detail("status", d.status);
    }
    if !d.code.is_empty() {
        e = e.detail("code", d.code).detail("reason", d.reason.as_str());
    }
    e.detail(
        "upstream_status",
        d.upstream_status.map_or(Value::Null, Value::from),
    )
}

impl DecisionSink for AuditSink {
    fn record(&self, decision: &Decision) -> Result<(), String> {
        // Queued in order; a failure to queue is a failure to record. Nobody waits on it,
        // so it does not ask for an fsync of its own: the group commit takes it along.
        self.log
            .submit_until(event(decision), Until::Written)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn record_before_acting<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        let pending = self.log.submit_until(event(decision), Until::Written);
        Box::pin(async move {
            pending
                .map_err(|e| e.to_string())?
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> Decision {
        Decision {
            envelope_id: "env-1".into(),
            agent: "a".into(),
            outcome: "denied",
            step: "budget",
            rule: "capability:orders".into(),
            code: "budget_exceeded",
            reason: "budget `envelope`: request count 3 of 3 used".into(),
            status: 429,
            method: "POST".into(),
            url: "https://api.example:8443/v1/order?api_key=sk-1".into(),
            spend: 2.5,
            bytes_up: 10,
            bytes_down: 0,
            upstream_status: None,
            latency_ms: 3,
        }
    }

    #[test]
    fn events_carry_the_decision_but_not_the_query() {
        let e = event(&decision());
        assert_eq!(e.kind, EventKind::RequestDenied);
        assert_eq!(e.rule.as_deref(), Some("capability:orders"));
        assert_eq!(e.details["host"], "api.example:8443");
        assert_eq!(e.details["path"], "/v1/order");
        assert_eq!(e.details["status"], 429);
        assert_eq!(e.details["code"], "budget_exceeded");
        assert_eq!(e.details["spend"], 2.5);
        assert!(!serde_json::to_string(&e).unwrap().contains("sk-1"));
    }

    #[tokio::test]
    async fn a_closed_log_fails_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let (log, _) =
            AuditLog::open(crate::audit::AuditConfig::new(dir.path()), key.clone()).unwrap();
        let sink = AuditSink::new(log.clone());
        sink.record_before_acting(&decision()).await.unwrap();
        sink.record(&decision()).unwrap();
        log.close().await.unwrap();
        assert!(sink.record(&decision()).is_err());
        assert!(sink.record_before_acting(&decision()).await.is_err());
        let report =
            crate::audit::verify(dir.path(), &crate::audit::VerifyOptions::default()).unwrap();
        assert!(report.ok());
    }
}
