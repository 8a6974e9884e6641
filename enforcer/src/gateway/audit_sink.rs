//! Gateway decisions into the tamper-evident audit log.
//!
//! A request is forwarded only after its `request_allowed` record is in the log file
//! ([`DecisionSink::record_before_acting`] waits for the `write`, not for the disk; the
//! records of requests ready at the same time share one): from then on no crash of this process can lose it, and the group commit's fsync
//! follows without holding the request. Outcomes (refusals, holds, a forwarded request's
//! upstream status) are queued without waiting, in order. Any error — the queue full, a
//! failed write or fsync, the log closed — is returned, and the gateway refuses.
use super::server::{Decision, DecisionSink, SinkFuture};
use crate::audit::{AuditLog, Detail, Event, EventKind, EventView, Until};

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

    /// Written, not waited for until durable; requests ready beside this one share its
    /// write(2).
    fn gathered<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        let pending = with_event(decision, |event| self.log.submit_gathered(&event));
        Box::pin(async move {
            pending
                .map_err(|e| e.to_string())?
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// Hands `record` the audit event for one decision, built on the stack from the decision's
/// own strings. The URL's query is left out (it is where APIs take keys); everything else
/// is the gateway's own words and numbers.
pub fn with_event<R>(d: &Decision, record: impl FnOnce(EventView<'_>) -> R) -> R {
    let kind = kind_of(d);
    let (scheme, host, path) = url_parts(d);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let upstream_status = d
        .upstream_status
        .map_or(Detail::Null, |s| Detail::U64(s.into()));
    // In the order of their keys, which is how an `Event` would hold them.
    let all = [
        ("bytes_down", Some(Detail::U64(d.bytes_down))),
        ("bytes_up", Some(Detail::U64(d.bytes_up))),
        ("code", (!d.code.is_empty()).then_some(Detail::Str(d.code))),
        ("host", Some(Detail::Str(host))),
        ("latency_ms", Some(Detail::U64(d.latency_ms))),
        ("method", Some(Detail::Str(&d.method))),
        ("path", Some(Detail::Str(path))),
        (
            "reason",
            (!d.code.is_empty()).then_some(Detail::Str(&d.reason)),
        ),
        ("scheme", Some(Detail::Str(scheme))),
        ("spend", Some(Detail::F64(d.spend))),
        (
            "status",
            (d.status != 0).then_some(Detail::U64(d.status.into())),
        ),
        ("step", Some(Detail::Str(d.step))),
        ("upstream_status", Some(upstream_status)),
    ];
    let mut details: [(&str, Detail<'_>); 13] = [("", Detail::Null); 13];
    let mut n = 0;
    for (key, value) in all {
        if let Some(value) = value {
            details[n] = (key, value);
            n += 1;
        }
    }
    record(EventView {
        kind,
        envelope: Some(&d.envelope_id),
        agent: Some(&d.agent),
        rule: Some(&d.rule),
        details: &details[..n],
    })
}

fn kind_of(d: &Decision) -> EventKind {
    match d.outcome {
        "allowed" => EventKind::RequestAllowed,
        "held" => EventKind::RequestHeld,
        "approved" => EventKind::RequestApproved,
        _ => EventKind::RequestDenied,
    }
}

/// Scheme, host and path with query of the decision's URL.
fn url_parts(d: &Decision) -> (&str, &str, &str) {
    let (scheme, rest) = d.url.split_once("://").unwrap_or(("", d.url.as_str()));
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    (scheme, host, path)
}

/// The audit event for one decision, owned.
pub fn event(d: &Decision) -> Event {
    with_event(d, |view| view.to_event())
}

impl DecisionSink for AuditSink {
    fn record(&self, decision: &Decision) -> Result<(), String> {
        // Queued in order; a failure to queue is a failure to record. Nobody waits on it,
        // so it does not ask for an fsync of its own: the group commit takes it along.
        with_event(decision, |event| {
            self.log.submit_until(event, Until::Written)
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }

    fn record_before_acting<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        self.gathered(decision)
    }

    fn record_outcome<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        self.gathered(decision)
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

    /// The event as it was built before views: detail by detail into an owned map.
    fn event_detail_by_detail(d: &Decision) -> Event {
        let (scheme, host, path) = url_parts(d);
        let mut e = Event::new(kind_of(d))
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
            d.upstream_status
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        )
    }

    proptest::proptest! {
        #[test]
        fn the_recorded_line_is_the_one_an_owned_event_gives(
            outcome in proptest::sample::select(&["allowed", "held", "approved", "denied"][..]),
            code in proptest::sample::select(&["", "budget_exceeded"][..]),
            url in "(https?://)?[a-z.:0-9]{0,12}(/[a-z%?#=&]{0,8}){0,3}",
            reason in "\\PC{0,12}",
            spend in proptest::prelude::any::<f64>(),
            status in proptest::prelude::any::<u16>(),
            upstream_status in proptest::option::of(proptest::prelude::any::<u16>()),
            numbers in proptest::prelude::any::<(u64, u64, u64)>(),
        ) {
            let d = Decision {
                outcome,
                code,
                url,
                reason,
                spend,
                status,
                upstream_status,
                bytes_up: numbers.0,
                bytes_down: numbers.1,
                latency_ms: numbers.2,
                ..decision()
            };
            let (mut fast, mut owned) = (Vec::new(), Vec::new());
            with_event(&d, |view| crate::audit::Recordable::render_opening(&view, &mut fast))
                .unwrap();
            crate::audit::Recordable::render_opening(&event_detail_by_detail(&d), &mut owned)
                .unwrap();
            proptest::prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(owned).unwrap());
        }
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
