//! Prometheus text-format metrics for operators, on their own address (never the agents').
use std::{fmt::Write, net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::{AgentState, Daemon, kernel_view};

pub(super) fn render(daemon: &Daemon) -> String {
    let mut out = String::new();
    let agents = match daemon.agents.lock() {
        Ok(agents) => agents,
        Err(_) => return "# the daemon state is unavailable\n".into(),
    };
    let _ = writeln!(
        out,
        "# HELP enforcer_agents Agents by state.\n# TYPE enforcer_agents gauge"
    );
    let failed = daemon.stranded.lock().map(|s| s.len()).unwrap_or(0);
    // As `enforcer agents` says: an agent the kernel cuts off is not counted as active.
    let states: Vec<AgentState> = {
        let kernel = daemon.kernel.lock().ok();
        agents
            .values()
            .map(|a| kernel_view(kernel.as_deref(), a).0)
            .collect()
    };
    for state in [
        AgentState::Active,
        AgentState::Tripped,
        AgentState::Expired,
        AgentState::Revoked,
        AgentState::Failed,
    ] {
        let n = match state {
            AgentState::Failed => failed,
            _ => states.iter().filter(|s| **s == state).count(),
        };
        let label = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(out, "enforcer_agents{{state=\"{label}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP enforcer_decisions_total Gateway decisions.\n# TYPE enforcer_decisions_total counter"
    );
    for a in agents.values() {
        for (outcome, n) in [
            ("allowed", a.counts.allowed.load(Ordering::Relaxed)),
            ("denied", a.counts.denied.load(Ordering::Relaxed)),
            ("held", a.counts.held.load(Ordering::Relaxed)),
        ] {
            let _ = writeln!(
                out,
                "enforcer_decisions_total{{agent=\"{}\",outcome=\"{outcome}\"}} {n}",
                a.name
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP enforcer_budget_remaining What is left of each budget.\n# TYPE enforcer_budget_remaining gauge"
    );
    for a in agents.values() {
        let Ok(snapshot) = a.gateway.ledger().snapshot() else {
            continue;
        };
        for (scope, (used, limits)) in snapshot {
            let dims = [
                (
                    "requests",
                    limits
                        .requests
                        .map(|l| l.saturating_sub(used.requests) as f64),
                ),
                ("spend", limits.spend.map(|l| (l - used.spend).max(0.0))),
                (
                    "bytes_up",
                    limits
                        .bytes_up
                        .map(|l| l.saturating_sub(used.bytes_up) as f64),
                ),
                (
                    "bytes_down",
                    limits
                        .bytes_down
                        .map(|l| l.saturating_sub(used.bytes_down) as f64),
                ),
            ];
            for (dim, left) in dims {
                if let Some(left) = left {
                    let _ = writeln!(
                        out,
                        "enforcer_budget_remaining{{agent=\"{}\",scope=\"{scope}\",dimension=\"{dim}\"}} {left}",
                        a.name
                    );
                }
            }
        }
    }
    if let Ok(kernel) = daemon.kernel.lock() {
        let _ = writeln!(
            out,
            "# HELP enforcer_kernel_verdicts_total Kernel hook verdicts.\n# TYPE enforcer_kernel_verdicts_total counter"
        );
        for a in agents.values() {
            let Ok(c) = kernel.counters(a.cgroup.id) else {
                continue;
            };
            for (i, hook) in enforcer_common::hook::NAMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "enforcer_kernel_verdicts_total{{agent=\"{}\",hook=\"{hook}\",verdict=\"allow\"}} {}",
                    a.name, c.allowed[i]
                );
                let _ = writeln!(
                    out,
                    "enforcer_kernel_verdicts_total{{agent=\"{}\",hook=\"{hook}\",verdict=\"deny\"}} {}",
                    a.name, c.denied[i]
                );
            }
        }
        if let Ok(lost) = kernel.lost_events() {
            let _ = writeln!(
                out,
                "# TYPE enforcer_kernel_lost_events_total counter\nenforcer_kernel_lost_events_total {lost}"
            );
        }
    }
    if let Ok(denials) = daemon.denials.lock() {
        let _ = writeln!(
            out,
            "# HELP enforcer_kernel_denials_pending Kernel denials counted and not yet in the audit log (summed up per second).\n# TYPE enforcer_kernel_denials_pending gauge\nenforcer_kernel_denials_pending {}",
            denials.pending()
        );
    }
    let _ = writeln!(
        out,
        "# HELP enforcer_audit_up 1 while the audit log records; 0 once a write or fsync failed, after which every request is refused until the daemon restarts.\n# TYPE enforcer_audit_up gauge\nenforcer_audit_up {}",
        u8::from(daemon.audit.failure().is_none())
    );
    let _ = writeln!(
        out,
        "# HELP enforcer_audit_records_total Records the audit log acknowledged.\n# TYPE enforcer_audit_records_total counter\nenforcer_audit_records_total {}",
        daemon.audit.stats().records
    );
    let _ = writeln!(
        out,
        "# HELP enforcer_trips_total Circuit breaker trips.\n# TYPE enforcer_trips_total counter\nenforcer_trips_total {}",
        daemon.trips.load(Ordering::Relaxed)
    );
    out
}

/// Metrics connections served at once; more are closed at accept. Each costs a file
/// descriptor, and the daemon's descriptors are what its agents' gateways need.
pub(super) const MAX_CONNECTIONS: usize = 32;
/// A scraper sends its request at once; one that does not is closed after this long.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection is kept longer, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

pub(super) async fn serve(daemon: Arc<Daemon>, addr: SocketAddr) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the metrics address");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or the like): retrying at once would spin a core
                // and free nothing.
                tracing::warn!(%addr, error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(super::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%addr, limit = MAX_CONNECTIONS, "metrics connection limit reached; closing");
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |_req| {
                let body = daemon.metrics_text();
                async move {
                    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}
