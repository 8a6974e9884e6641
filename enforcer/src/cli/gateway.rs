//! `enforcer gateway`: one agent's L7 gateway on its own, without kernel confinement.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Args;
use enforcer::{
    audit::{AuditConfig, AuditLog},
    envelope::{UsedIds, VerifyOptions},
    gateway::{
        audit_sink::AuditSink,
        breaker::LogOnly,
        secrets::SecretStore,
        server::{DecisionSink, Gateway, GatewaySetup, Limits, TracingSink},
        tls::upstream_client_config,
    },
};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The signed Envelope (JSON, as written by `enforcer envelope sign`).
    #[arg(long)]
    envelope: PathBuf,
    /// Directory of trusted issuer public keys (*.pub).
    #[arg(long)]
    trust: PathBuf,
    /// Secret store: a directory with one file per secret, or a `name = value` file; it
    /// must not be readable by group or others.
    #[arg(long)]
    secrets: PathBuf,
    /// Address to listen on; agents use it as HTTP_PROXY and HTTPS_PROXY.
    #[arg(long)]
    listen: SocketAddr,
    /// Host policy floor (TOML) every Envelope inherits.
    #[arg(long)]
    floor: Option<PathBuf>,
    /// Where the budget ledger and breaker state persist across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Write the agent's interception CA certificate here (PEM) for SSL_CERT_FILE.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Extra PEM root certificates to trust for upstream TLS (repeatable).
    #[arg(long = "upstream-root")]
    upstream_roots: Vec<PathBuf>,
    /// Trust only --upstream-root certificates, not the system store.
    #[arg(long)]
    no_system_roots: bool,
    /// Dial a capability's host name even where it resolves to an internal address
    /// (loopback, private, link-local, …), which is otherwise refused.
    #[arg(long)]
    allow_internal_upstreams: bool,
    /// Largest request body the gateway inspects, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds an upstream may take to answer.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Record every decision in the tamper-evident audit log in this directory; a request
    /// is forwarded only once its record is in the log file.
    #[arg(long, requires = "audit_key")]
    audit_dir: Option<PathBuf>,
    /// The key that signs the audit log's checkpoints (PEM PKCS#8, mode 0600).
    #[arg(long, requires = "audit_dir")]
    audit_key: Option<PathBuf>,
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let verifier = super::envelope::build_verifier(
        &args.trust,
        args.floor.as_ref(),
        None,
        VerifyOptions::default(),
    )?;
    let input = super::envelope::read_input(&args.envelope)?;
    let envelope = verifier
        .verify(&input, &UsedIds::in_memory())
        .map_err(|e| {
            anyhow::anyhow!(
                "the Envelope {} is refused ({}): {e}",
                args.envelope.display(),
                e.kind()
            )
        })?;
    let secrets = SecretStore::load(&args.secrets, false)?;
    let roots: Vec<&std::path::Path> = args.upstream_roots.iter().map(PathBuf::as_path).collect();
    let upstream_tls = upstream_client_config(&roots, !args.no_system_roots)?;
    let agent = envelope.envelope().subject.clone();
    let audit = match (&args.audit_dir, &args.audit_key) {
        (Some(dir), Some(key)) => {
            let key = enforcer::envelope::load_signing_key(key)?;
            let (log, report) = AuditLog::open(AuditConfig::new(dir), key)
                .with_context(|| format!("opening the audit log in {}", dir.display()))?;
            if let Some((first, last)) = report.adopted_unsigned {
                tracing::warn!(
                    "the audit log was not closed cleanly: records {first}..={last} had no checkpoint; recorded and signed now"
                );
            }
            Some(log)
        }
        _ => None,
    };
    let sink: Arc<dyn DecisionSink> = match &audit {
        Some(log) => Arc::new(AuditSink::new(log.clone())),
        None => Arc::new(TracingSink),
    };
    let gateway = Gateway::new(GatewaySetup {
        agent: agent.clone(),
        envelope,
        secrets,
        state_dir: args.state_dir.clone(),
        upstream_tls,
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            request_timeout: Duration::from_secs(args.request_timeout),
            ..Limits::default()
        },
        sink,
        trip_hook: Arc::new(LogOnly),
        agent_cgroup: None,
        allow_internal_upstreams: args.allow_internal_upstreams,
    })?;
    if let Some(path) = &args.ca_out {
        std::fs::write(path, gateway.ca_pem())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    enforcer::daemon::report_file_size_limit_as_an_error();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr()?;
        eprintln!(
            "enforcer gateway for {agent} listening on {local}\n\
             WARNING: standalone mode: egress is NOT confined. The agent can bypass this gateway; \
             use `enforcer run` under the daemon for kernel confinement."
        );
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        gateway.serve(listener, shutdown).await;
        if let Some(log) = audit {
            log.close().await.context("closing the audit log")?;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
