//! The daemon: verified Envelopes in, confined agents out.
//!
//! It owns the pinned kernel state, one gateway per active agent, the audit log and the
//! control socket. Activation is all-or-nothing; trips flip the kernel entry and the
//! gateway in one step; everything that must survive a restart (budgets, breaker states,
//! used Envelope ids, revocations, agent records) is on disk before it takes effect.
pub mod config;
mod deny_log;
mod metrics;
mod systemd;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{net::UnixListener, sync::Notify};

use crate::{
    audit::{AuditConfig, AuditLog, Event, EventKind, Until},
    control::{self, Op, Request, Response},
    envelope::{UsedIds, VerifiedEnvelope},
    gateway::{
        audit_sink::AuditSink,
        breaker::{OperatorReset, TripHook},
        server::{Decision, DecisionSink, Gateway, GatewaySetup, Limits, SinkFuture},
        tls::upstream_client_config,
    },
    kernel::{self, Enforcement, events::EventReader},
    sandbox::{AgentCgroup, CgroupParent},
};
use enforcer_common::{AgentPolicy, STATE_ACTIVE, STATE_SUSPENDED};

pub use config::{ConfigError, DaemonConfig, Grants, Loaded};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Verify(#[from] crate::envelope::VerifyError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::server::GatewayError),
    #[error(transparent)]
    Tls(#[from] crate::gateway::tls::TlsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon must run as root")]
    NotRoot,
    #[error(
        "{path}: {problem}, so the control socket cannot go there: only root may write to \
         its directory. Make it so (`chown root {path} && chmod go-w {path}`), or set \
         control_socket to a path in a directory that does not exist yet, which the daemon \
         creates (root's, 0700)"
    )]
    ControlDir { path: PathBuf, problem: String },
    #[error("no free gateway port in {first}..={last} on {ip}")]
    NoPort {
        ip: std::net::IpAddr,
        first: u16,
        last: u16,
    },
    #[error("no agent named {0}")]
    UnknownAgent(String),
    #[error(
        "the daemon is stopping, so it activates, resets and reloads nothing now; \
         try again once it has started again"
    )]
    Stopping,
    #[error(
        "agent {agent} has no gateway ({reason}), so it stays cut off in the kernel; \
         a new Envelope for it, or its end, clears this"
    )]
    NoGateway { agent: String, reason: String },
    #[error("the Envelope {0} was revoked on this host")]
    Revoked(String),
    #[error(
        "agent {agent} is cut off and its Envelope {id} refused, but the revocation could \
         not be saved ({source}), so a restart of the daemon would forget it: fix the \
         state directory and revoke again"
    )]
    RevocationNotSaved {
        agent: String,
        id: String,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(
        "{path}: {fields} cannot change while the daemon runs, so nothing was reloaded; \
         restart the daemon to change them (agents stay confined meanwhile)"
    )]
    ReloadRefused { path: PathBuf, fields: String },
    #[error(
        "{path}: nothing was reloaded, since running agent {agent} would lose a credential: \
         {source}. Put the secret in the store, or end the agent first"
    )]
    ReloadSecrets {
        path: PathBuf,
        agent: String,
        #[source]
        source: crate::gateway::server::GatewayError,
    },
}

impl DaemonError {
    /// A stable kind for the control protocol and the audit log.
    pub fn kind(&self) -> &'static str {
        match self {
            DaemonError::Verify(e) => e.kind(),
            DaemonError::UnknownAgent(_) => "unknown_agent",
            DaemonError::Stopping => "stopping",
            DaemonError::NoGateway { .. } => "no_gateway",
            DaemonError::Revoked(_) => "revoked",
            DaemonError::RevocationNotSaved { .. } => "revocation_not_saved",
            DaemonError::ReloadRefused { .. } | DaemonError::ReloadSecrets { .. } => {
                "reload_refused"
            }
            DaemonError::Config(_) => "config",
            DaemonError::NoPort { .. } => "no_port",
            DaemonError::Audit(_) => "audit_unavailable",
            DaemonError::Kernel(_) => "kernel",
            DaemonError::Sandbox(_) => "sandbox",
            _ => "internal",
        }
    }
}

/// Gateways serve only their agent's connections, told apart by the cgroup the kernel
/// reports for each socket. Checked once at start on a connection of the daemon's own, so
/// a kernel that cannot tell (no `tcp_diag`) stops the daemon with the fix rather than
/// leaving every agent refused at its gateway.
fn socket_cgroups_are_told(ip: std::net::IpAddr) -> Result<(), DaemonError> {
    let context = "checking that the kernel tells which cgroup a TCP socket belongs to \
                   (sock_diag; needs the inet_diag and tcp_diag modules: `modprobe tcp_diag`)";
    let listener =
        std::net::TcpListener::bind((ip, 0)).map_err(io_err(format!("{context}: binding")))?;
    let addr = listener.local_addr().map_err(io_err(context))?;
    let _client = std::net::TcpStream::connect(addr).map_err(io_err(context))?;
    let (_server, peer) = listener.accept().map_err(io_err(context))?;
    match kernel::sock_diag::tcp_socket_cgroup(peer, addr) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(io_err(context)(std::io::Error::other(
            "the kernel found no such socket; is tcp_diag loaded?",
        ))),
        Err(e) => Err(io_err(context)(e)),
    }
}

/// Every agent's gateway, its connections and their upstream connections, the audit log
/// and the control socket take descriptors: the soft limit (often 1024) is raised to the
/// hard one, so running out of descriptors is a limit the operator set.
fn raise_open_files_limit() -> Result<u64, DaemonError> {
    let context = "raising the open files limit (RLIMIT_NOFILE) to its hard limit";
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io_err(context)(std::io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io_err(context)(std::io::Error::last_os_error()));
        }
    }
    Ok(limit.rlim_cur)
}

/// A write past the file size limit (RLIMIT_FSIZE) then fails with EFBIG, and the audit
/// log or ledger that made it refuses the action it was for and says why. By default the
/// kernel would kill the process with SIGXFSZ instead, leaving every agent without its
/// gateway and nothing in the log to say what happened. For the daemon and the standalone
/// gateway, which spawn no programs, so the ignored signal reaches no agent.
pub fn report_file_size_limit_as_an_error() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN runs no code of ours in the handler, so nothing in it can be unsafe.
    if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
        tracing::warn!(error = %e, "could not ignore SIGXFSZ; a file size limit would kill this process");
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum AgentState {
    Active,
    Tripped,
    Expired,
    Revoked,
    /// Its cgroup exists but its gateway could not be started: cut off in the kernel.
    Failed,
}

/// How long an accept loop waits after a failed accept before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Kernel denials of one agent, hook, reason and destination are summed over this long
/// into one audit record (the first of a burst is recorded at once).
const DENY_WINDOW: Duration = Duration::from_secs(1);
/// Bursts counted apart at most; more are summed with less detail (see `deny_log`).
const DENY_BURSTS: usize = 1024;
/// New bursts recorded at their first denial per window at most; the rest wait for
/// their summary.
const DENY_AT_ONCE: usize = 64;

/// The agent record in an agent's state directory, and its name once that directory
/// holds a replaced Envelope's state.
const RECORD: &str = "agent.json";
const REPLACED_RECORD: &str = "replaced-agent.json";
/// Marks an agent the daemon cut off itself when it stopped (see `Daemon::suspend`).
const SUSPENDED: &str = "suspended";

/// What is persisted of an agent so a restarted daemon can resume it.
#[derive(Debug, Serialize, Deserialize)]
struct AgentRecord {
    name: String,
    envelope_id: String,
    gateway: SocketAddr,
}

#[derive(Default)]
struct DecisionCounts {
    allowed: AtomicU64,
    denied: AtomicU64,
    held: AtomicU64,
}

struct Agent {
    name: String,
    envelope: VerifiedEnvelope,
    cgroup: AgentCgroup,
    gateway: Arc<Gateway>,
    gateway_addr: SocketAddr,
    /// The gateway's listening socket, held apart from the gateway that serves it: a new
    /// Envelope for the agent is served on this very socket, so its address is never
    /// unbound for another local process to take while the agent may still connect to it.
    listener: std::net::TcpListener,
    ca_path: PathBuf,
    dir: PathBuf,
    stop: Arc<Notify>,
    counts: Arc<DecisionCounts>,
    revoked: bool,
}

/// An agent whose cgroup exists but whose gateway could not be started (a failed resume,
/// an address another process holds, a failed end). Its kernel entry is tripped, so the
/// address its gateway had leads nowhere, whoever binds it meanwhile.
struct Stranded {
    cgroup: AgentCgroup,
    envelope_id: Option<String>,
    gateway: Option<SocketAddr>,
    /// Where its record is, removed when it ends.
    dir: Option<PathBuf>,
    reason: String,
}

impl Agent {
    fn state(&self) -> AgentState {
        if self.revoked {
            AgentState::Revoked
        } else if time::OffsetDateTime::now_utc() >= self.envelope.envelope().expires_at.0 {
            AgentState::Expired
        } else if self.gateway.breaker().open_reason().is_some() {
            AgentState::Tripped
        } else {
            AgentState::Active
        }
    }
}

pub struct Daemon {
    config: DaemonConfig,
    config_path: PathBuf,
    /// The public half of the audit key the log was opened with: a reload must not bring
    /// another.
    audit_key: ed25519_dalek::VerifyingKey,
    /// Replaced whole by a reload; each activation judges with one snapshot.
    grants: RwLock<Arc<Grants>>,
    kernel: Mutex<Enforcement>,
    parent: CgroupParent,
    audit: AuditLog,
    used_ids: Mutex<UsedIds>,
    revoked: Mutex<BTreeSet<String>>,
    agents: Mutex<BTreeMap<String, Agent>>,
    stranded: Mutex<BTreeMap<String, Stranded>>,
    /// Kernel denials counted for the audit log (see `deny_log`).
    denials: Mutex<deny_log::DenyLog>,
    /// Held by whatever may open a kernel entry (activations, replacements, resets) or
    /// change grants (reloads), and by a stop from its start to the daemon's exit.
    activation: tokio::sync::Mutex<()>,
    /// Set when a stop begins: from then on nothing takes `activation` to open an entry.
    stopping: AtomicBool,
    upstream_tls: Arc<rustls::ClientConfig>,
    shutdown: Notify,
    trips: AtomicU64,
    next_port: std::sync::atomic::AtomicU32,
    /// Gateway sockets the service manager kept while the daemon was down, by agent, until
    /// the agents are resumed.
    kept_sockets: Mutex<BTreeMap<String, std::net::TcpListener>>,
    me: Weak<Daemon>,
}

/// The daemon's hook for the gateway's breaker: one map write in the kernel, then a record.
struct KernelTrip {
    daemon: Weak<Daemon>,
    agent: String,
    envelope_id: String,
    cgroup_id: u64,
}

impl TripHook for KernelTrip {
    fn tripped(&self, reason: &str) {
        let Some(daemon) = self.daemon.upgrade() else {
            return;
        };
        let flipped = daemon
            .kernel
            .lock()
            .map_err(|_| "kernel state lock poisoned".to_owned())
            .and_then(|mut k| k.trip(self.cgroup_id).map_err(|e| e.to_string()));
        daemon.trips.fetch_add(1, Ordering::Relaxed);
        let mut event = Event::new(EventKind::BreakerTripped)
            .agent(&self.agent)
            .envelope(&self.envelope_id)
            .rule(reason);
        if let Err(e) = &flipped {
            tracing::error!(agent = %self.agent, error = %e, "tripping the kernel entry failed; the gateway refuses everything");
            event = event.detail("kernel_error", e.as_str());
        }
        if daemon.audit.submit(event).is_err() {
            tracing::error!(agent = %self.agent, "could not record a trip in the audit log");
        }
        tracing::warn!(agent = %self.agent, reason, "circuit open: agent cut off in the kernel");
    }
}

/// Gateway decisions into the audit log (the gateway's own audit sink: forwarding waits
/// for its record to be in the log file, any failure refuses), counted per agent for `status`.
struct AuditDecisions {
    sink: AuditSink,
    counts: Arc<DecisionCounts>,
}

impl AuditDecisions {
    fn count(&self, d: &Decision) {
        // The "allowed" record written just before forwarding has no status yet; the one
        // after the response carries it. Count each request once, at its final record.
        // Tunnels are not requests: what runs inside them is counted one by one.
        if d.status == 0 || d.step == "tunnel" {
            return;
        }
        let counter = match d.outcome {
            "allowed" | "approved" => &self.counts.allowed,
            "held" => &self.counts.held,
            _ => &self.counts.denied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl DecisionSink for AuditDecisions {
    fn record(&self, d: &Decision) -> Result<(), String> {
        self.count(d);
        self.sink.record(d)
    }

    fn record_before_acting<'a>(&'a self, d: &'a Decision) -> SinkFuture<'a> {
        self.count(d);
        self.sink.record_before_acting(d)
    }

    fn record_outcome<'a>(&'a self, d: &'a Decision) -> SinkFuture<'a> {
        self.count(d);
        self.sink.record_outcome(d)
    }
}

/// A cgroup name from an Envelope subject: `agent:market-maker-7` → `agent-market-maker-7`.
pub fn agent_name(subject: &str) -> String {
    let mut name: String = subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_start_matches('-').chars().take(64).collect();
    if name.is_empty() {
        "agent".into()
    } else {
        name
    }
}

/// `expires_at` as a `CLOCK_BOOTTIME` deadline for the kernel programs.
fn boottime_deadline(expires_at: time::OffsetDateTime) -> Result<u64, kernel::KernelError> {
    let now = kernel::boottime_now_ns()?;
    let left = (expires_at - time::OffsetDateTime::now_utc())
        .whole_nanoseconds()
        .max(0);
    Ok(now.saturating_add(u64::try_from(left).unwrap_or(u64::MAX)))
}

impl Daemon {
    /// Starts the daemon: audit log, kernel state (adopted if pinned), agents of a previous
    /// run, then the control socket and metrics. Returns when shut down.
    pub async fn run(loaded: Loaded) -> Result<(), DaemonError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(DaemonError::NotRoot);
        }
        // Before anything else opens a descriptor of its own.
        let kept_sockets = kept_gateway_sockets();
        raise_open_files_limit()?;
        report_file_size_limit_as_an_error();
        let cfg = loaded.config.clone();
        // Before anything is set up: a directory that refuses the socket stops the start.
        if let Some(dir) = cfg
            .control_socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            control_dir(dir)?;
        }
        // Agents may reach exactly one thing below the state directory: their CA file in
        // `public/`. The state directory is traversable but not listable; all else is 0700.
        for (dir, mode) in [
            (cfg.state_dir.clone(), 0o711),
            (cfg.state_dir.join("public"), 0o755),
            (cfg.state_dir.join("agents"), 0o700),
            (cfg.audit_dir.clone(), 0o700),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("restricting {}", dir.display())))?;
        }
        let (audit, report) =
            AuditLog::open(AuditConfig::new(&cfg.audit_dir), loaded.audit_key.clone())?;
        if let Some(recovered) = &report.recovered {
            tracing::warn!(?recovered, "the audit log had a torn tail, cut away");
        }
        if let Some((first, last)) = report.adopted_unsigned {
            tracing::warn!(
                first,
                last,
                "the audit log was not closed cleanly: records {first}..={last} had no checkpoint; recorded and signed now"
            );
        }
        socket_cgroups_are_told(cfg.gateway_ip)?;
        let parent = CgroupParent::create(&cfg.cgroup_parent)?;
        let enforcement = Enforcement::install_or_adopt(&cfg.pin_dir, parent.path())?;
        let used_ids = UsedIds::open(&cfg.state_dir.join("used-envelope-ids"))?;
        let revoked = read_lines(&cfg.state_dir.join("revoked-envelopes"))?;
        let roots: Vec<&Path> = cfg.upstream_roots.iter().map(PathBuf::as_path).collect();
        let upstream_tls = upstream_client_config(&roots, !cfg.no_system_roots)?;
        let Loaded {
            config,
            path: config_path,
            grants,
            audit_key,
        } = loaded;
        let daemon = Arc::new_cyclic(|me| Daemon {
            config,
            config_path,
            audit_key: audit_key.verifying_key(),
            grants: RwLock::new(Arc::new(grants)),
            kernel: Mutex::new(enforcement),
            parent,
            audit,
            used_ids: Mutex::new(used_ids),
            revoked: Mutex::new(revoked),
            agents: Mutex::new(BTreeMap::new()),
            stranded: Mutex::new(BTreeMap::new()),
            denials: Mutex::new(deny_log::DenyLog::new(
                DENY_WINDOW,
                DENY_BURSTS,
                DENY_AT_ONCE,
            )),
            activation: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            upstream_tls,
            shutdown: Notify::new(),
            trips: AtomicU64::new(0),
            next_port: std::sync::atomic::AtomicU32::new(0),
            kept_sockets: Mutex::new(kept_sockets),
            me: me.clone(),
        });
        daemon
            .audit
            .append(Event::new(EventKind::DaemonStarted).detail("config", cfg_path(&daemon)))
            .await?;
        daemon.resume().await;
        daemon.drop_unclaimed_sockets();

        let listener = bind_control(&cfg.control_socket)?;
        let control = tokio::spawn(daemon.clone().serve_control(listener));
        let events = tokio::spawn(daemon.clone().kernel_events());
        let metrics = cfg
            .metrics_listen
            .map(|addr| tokio::spawn(metrics::serve(daemon.clone(), addr)));
        let expiry = tokio::spawn(daemon.clone().watch_expiry());
        tracing::info!(control = %cfg.control_socket.display(), "enforcer daemon ready");
        if let Err(e) = systemd::notify("READY=1", &[]) {
            tracing::warn!(error = %e, "telling the service manager the daemon is ready failed");
        }

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("installing the SIGTERM handler"))?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            () = daemon.shutdown.notified() => tracing::info!("shutdown requested: draining"),
        }
        // Control connections accepted before the stop go on running: an activation or reset
        // among them could open a kernel entry after the loop below has cut every agent off,
        // leaving it open with no gateway behind its address once the daemon is gone. So
        // those waiting are refused, one in flight is waited for (it is then in `agents`),
        // and the lock is held until the daemon exits.
        let _ = systemd::notify("STOPPING=1", &[]);
        daemon.stopping.store(true, Ordering::SeqCst);
        let _no_more_openings = daemon.activation.lock().await;
        control.abort();
        events.abort();
        expiry.abort();
        if let Some(m) = metrics {
            m.abort();
        }
        let _ = std::fs::remove_file(&cfg.control_socket);
        // Gateways stop taking connections; requests in flight get the grace period.
        // Agents keep running, cut off until the next start serves their gateways again.
        if let Ok(agents) = daemon.agents.lock() {
            for agent in agents.values() {
                agent.stop.notify_one();
                daemon.suspend(agent);
            }
        }
        tokio::time::sleep(Duration::from_secs(cfg.shutdown_grace_secs)).await;
        if let Ok(mut denials) = daemon.denials.lock() {
            denials.drain(std::time::Instant::now(), |s| {
                daemon.record_denials(s, true)
            });
        }
        let _ = daemon
            .audit
            .append(Event::new(EventKind::DaemonStopped))
            .await;
        daemon.audit.close().await?;
        Ok(())
    }

    fn config(&self) -> &DaemonConfig {
        &self.config
    }

    fn grants(&self) -> Result<Arc<Grants>, DaemonError> {
        self.grants
            .read()
            .map(|g| g.clone())
            .map_err(|_| poisoned())
    }

    /// An agent's gateway, its decisions going to the audit log and its trips to the kernel.
    fn new_gateway(
        &self,
        name: &str,
        verified: &VerifiedEnvelope,
        dir: &Path,
        cgroup_id: u64,
    ) -> Result<(Arc<Gateway>, Arc<DecisionCounts>), DaemonError> {
        let counts = Arc::new(DecisionCounts::default());
        let gateway = Gateway::new(GatewaySetup {
            agent: name.to_owned(),
            envelope: verified.clone(),
            secrets: self.grants()?.secrets.clone(),
            state_dir: Some(dir.to_owned()),
            upstream_tls: self.upstream_tls.clone(),
            limits: Limits::default(),
            sink: Arc::new(AuditDecisions {
                sink: AuditSink::new(self.audit.clone()),
                counts: counts.clone(),
            }),
            trip_hook: Arc::new(KernelTrip {
                daemon: self.me.clone(),
                agent: name.to_owned(),
                envelope_id: verified.id().to_owned(),
                cgroup_id,
            }),
            agent_cgroup: Some(cgroup_id),
            allow_internal_upstreams: self.config().allow_internal_upstreams,
        })?;
        Ok((gateway, counts))
    }

    /// The agent's interception CA, where the agent (an unprivileged user) can read it.
    fn write_ca(&self, name: &str, gateway: &Gateway) -> Result<PathBuf, DaemonError> {
        self.write_ca_pem(name, &gateway.ca_pem())
    }

    fn write_ca_pem(&self, name: &str, pem: &str) -> Result<PathBuf, DaemonError> {
        let path = self
            .config()
            .state_dir
            .join("public")
            .join(format!("{name}-ca.pem"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod CA file"))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))?;
        Ok(path)
    }

    fn agent_dir(&self, name: &str) -> PathBuf {
        self.config().state_dir.join("agents").join(name)
    }

    /// The `activation` lock for something that may open a kernel entry or change grants;
    /// refused once the daemon is stopping. Checked again once the lock is held: the stop
    /// queues for it behind those that came first, and they must not open anything then.
    async fn serialized(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, DaemonError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(DaemonError::Stopping);
        }
        let serial = self.activation.lock().await;
        if self.stopping.load(Ordering::SeqCst) {
            return Err(DaemonError::Stopping);
        }
        Ok(serial)
    }

    /// Verifies, then sets everything up; any failure undoes what was done.
    async fn activate(&self, envelope_json: &str) -> Result<serde_json::Value, DaemonError> {
        let _serial = self.serialized().await?;
        let verified = {
            let used = self
                .used_ids
                .lock()
                .map_err(|_| io_err("used ids")(std::io::Error::other("lock poisoned")))?;
            self.grants()?
                .verifier
                .verify(envelope_json.as_bytes(), &used)
        };
        let verified = match verified {
            Ok(v) => v,
            Err(e) => {
                let _ = self.audit.submit(
                    Event::new(EventKind::EnvelopeRefused)
                        .rule(e.kind())
                        .detail("reason", e.to_string()),
                );
                return Err(e.into());
            }
        };
        if self
            .revoked
            .lock()
            .map(|r| r.contains(verified.id()))
            .unwrap_or(true)
        {
            let _ = self.audit.submit(
                Event::new(EventKind::EnvelopeRefused)
                    .envelope(verified.id())
                    .rule("revoked"),
            );
            return Err(DaemonError::Revoked(verified.id().to_owned()));
        }
        let name = agent_name(&verified.envelope().subject);
        // A new Envelope for a running agent replaces its grant: same cgroup, same gateway
        // socket, fresh budgets and a closed breaker. One for an agent left without a
        // gateway takes over its cgroup, which stays cut off until the new gateway serves.
        let previous = self.agents.lock().ok().and_then(|mut a| a.remove(&name));
        let stranded = match &previous {
            Some(_) => None,
            None => self
                .stranded
                .lock()
                .map_err(|_| poisoned())?
                .get(&name)
                .map(|s| s.cgroup.clone()),
        };
        let result = self
            .set_up(&name, verified, envelope_json, previous.as_ref(), stranded)
            .await;
        match result {
            Ok((agent, notes)) => {
                if let Some(prev) = &previous {
                    prev.gateway.retire();
                    prev.stop.notify_one();
                    tracing::info!(agent = %name, old = prev.envelope.id(), new = agent.envelope.id(), "Envelope replaced");
                }
                if let Ok(mut stranded) = self.stranded.lock() {
                    stranded.remove(&name);
                }
                let summary = self.describe(&agent);
                if let Ok(mut agents) = self.agents.lock() {
                    agents.insert(name, agent);
                }
                let mut summary = summary;
                summary["notes"] = json!(notes);
                Ok(summary)
            }
            Err(e) => {
                // The previous gateway was never stopped: it goes on serving its Envelope.
                if let (Some(prev), Ok(mut agents)) = (previous, self.agents.lock()) {
                    agents.insert(name, prev);
                }
                let _ = self.audit.submit(
                    Event::new(EventKind::EnvelopeRefused)
                        .rule(e.kind())
                        .detail("reason", e.to_string()),
                );
                Err(e)
            }
        }
    }

    async fn set_up(
        &self,
        name: &str,
        verified: VerifiedEnvelope,
        envelope_json: &str,
        previous: Option<&Agent>,
        stranded: Option<AgentCgroup>,
    ) -> Result<(Agent, Vec<String>), DaemonError> {
        let mut undo = Undo::default();
        let outcome = self
            .try_set_up(name, verified, envelope_json, previous, stranded, &mut undo)
            .await;
        if outcome.is_err() {
            undo.run(self);
        }
        outcome
    }

    async fn try_set_up(
        &self,
        name: &str,
        verified: VerifiedEnvelope,
        envelope_json: &str,
        previous: Option<&Agent>,
        stranded: Option<AgentCgroup>,
        undo: &mut Undo,
    ) -> Result<(Agent, Vec<String>), DaemonError> {
        let cfg = self.config();
        let mut notes = Vec::new();
        let cgroup = match (previous, stranded) {
            (Some(prev), _) => prev.cgroup.clone(),
            (None, Some(cgroup)) => cgroup,
            (None, None) => {
                let cgroup = self.parent.create_agent(name)?;
                undo.cgroup = Some(cgroup.clone());
                cgroup
            }
        };
        self.kernel
            .lock()
            .map_err(|_| poisoned())?
            .verify_in_effect(&cgroup.path)?;
        if let Some(limits) = &verified.envelope().resources {
            notes.extend(apply_resource_limits(&cgroup.path, limits));
        }
        // Fresh per-Envelope state: budgets and breaker belong to the grant, not the agent.
        let dir = self.agent_dir(name);
        if dir.exists() {
            let old = dir.with_extension(format!(
                "replaced-{}",
                time::OffsetDateTime::now_utc().unix_timestamp_nanos()
            ));
            std::fs::rename(&dir, &old)
                .map_err(io_err(format!("moving {} aside", dir.display())))?;
            undo.moved_aside = Some((old.clone(), dir.clone()));
            // What is moved aside is history, never an agent to resume.
            match std::fs::rename(old.join(RECORD), old.join(REPLACED_RECORD)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_err(format!("retiring the record in {}", old.display()))(
                        e,
                    ));
                }
            }
        }
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        undo.dir = Some(dir.clone());
        // A replacement serves the socket the previous gateway serves: the address is
        // never unbound, and if anything below fails the previous gateway goes on.
        let listener = match previous {
            Some(prev) => prev.listener.try_clone().map_err(io_err(format!(
                "sharing the gateway socket {}",
                prev.gateway_addr
            )))?,
            None => {
                // A failed agent's address may still be one its kernel entry lets it reach,
                // should cutting it off have failed: another agent's gateway stays away.
                let reserved: BTreeSet<SocketAddr> = self
                    .stranded
                    .lock()
                    .map_err(|_| poisoned())?
                    .values()
                    .filter_map(|s| s.gateway)
                    .collect();
                let listener = bind_free_port(
                    cfg.gateway_ip,
                    cfg.gateway_ports,
                    &self.next_port,
                    &reserved,
                )
                .await?;
                self.keep_socket(name, &listener);
                undo.kept_socket = Some(name.to_owned());
                listener
            }
        };
        let gateway_addr = listener.local_addr().map_err(io_err("gateway address"))?;
        let serving = serving_handle(&listener, gateway_addr)?;
        let (gateway, counts) = self.new_gateway(name, &verified, &dir, cgroup.id)?;

        let deadline = boottime_deadline(verified.envelope().expires_at.0)?;
        {
            let mut kernel = self.kernel.lock().map_err(|_| poisoned())?;
            // A cgroup that is not new has an entry of its own (its previous Envelope's, or
            // the trip of a stranded agent): a failure below puts that back.
            let before = match undo.cgroup {
                Some(_) => None,
                None => kernel.agent(cgroup.id)?,
            };
            kernel.set_agent(cgroup.id, &AgentPolicy::for_gateway(gateway_addr, deadline))?;
            undo.kernel_entry = Some((cgroup.id, before));
        }

        // The agent's CA file is rewritten last: a replacement that fails before this
        // leaves the running gateway's CA in place, which its connections still need.
        if let Some(prev) = previous {
            undo.ca = Some((name.to_owned(), prev.gateway.ca_pem()));
        }
        let ca_path = self.write_ca(name, &gateway)?;

        // An Envelope takes effect only once the log holds its activation; if it cannot,
        // everything above is undone and the refusal recorded (where the log still takes
        // records). The agent's process is not running yet, and its gateway not serving.
        self.audit
            .submit_until(
                Event::new(EventKind::EnvelopeActivated)
                    .agent(name)
                    .envelope(verified.id())
                    .detail("key_id", verified.key_id())
                    .detail("gateway", gateway_addr.to_string())
                    .detail("notes", notes.clone()),
                Until::Written,
            )?
            .await?;

        // The point of no return: the id is spent only once everything else worked.
        self.used_ids
            .lock()
            .map_err(|_| poisoned())?
            .consume(&verified)?;
        let record = AgentRecord {
            name: name.to_owned(),
            envelope_id: verified.id().to_owned(),
            gateway: gateway_addr,
        };
        // The record only lets a restarted daemon resume the agent; until it is on disk a
        // restart finds no record and the agent gets no gateway. So it is made durable off
        // the activation path: the Envelope first, then the record that points to it,
        // renamed into place.
        let record_dir = dir.clone();
        let envelope_bytes = envelope_json.to_owned();
        tokio::task::spawn_blocking(move || {
            let saved = write_synced(&record_dir.join("envelope.json"), envelope_bytes.as_bytes())
                .and_then(|()| write_json(&record_dir.join(RECORD), &record));
            if let Err(e) = saved {
                tracing::error!(error = %e, "saving the agent record failed; a restart will not resume it");
            }
        });
        let stop = Arc::new(Notify::new());
        let stop2 = stop.clone();
        tokio::spawn(
            gateway
                .clone()
                .serve(serving, async move { stop2.notified().await }),
        );
        *undo = Undo::default();
        Ok((
            Agent {
                name: name.to_owned(),
                envelope: verified,
                cgroup,
                gateway,
                gateway_addr,
                listener,
                ca_path,
                dir,
                stop,
                counts,
                revoked: false,
            },
            notes,
        ))
    }

    /// Resumes the agents of a previous run from their records. An agent whose cgroup
    /// still exists but that cannot be resumed is cut off in the kernel and listed as
    /// failed: its gateway's address is free for anyone to bind now.
    async fn resume(&self) {
        let agents_dir = self.config().state_dir.join("agents");
        let Ok(entries) = std::fs::read_dir(&agents_dir) else {
            return;
        };
        // Only `agents/NAME` holding NAME's record is an agent: anything else (the state of
        // replaced Envelopes moved aside, stray files) must not bring back a grant.
        let mut ignored = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let record_path = dir.join(RECORD);
            if !record_path.is_file() {
                // An agent's directory without its record: the daemon stopped between
                // creating the agent and saving the record (or between moving a replaced
                // Envelope's state aside and saving the new one), or the agent ended and
                // its directory stayed. A cgroup of its name whose kernel entry opens one
                // of this daemon's gateway addresses is the first case: its processes may
                // run on, with an address no gateway serves now. (A cgroup of that name
                // opening another address is `confine`'s, made after the agent ended.)
                if let Some(name) = entry
                    .file_name()
                    .to_str()
                    .filter(|n| crate::sandbox::validate_agent_name(n).is_ok())
                    && let Ok(cgroup) = self.parent.agent(name)
                    && self.opens_own_gateway_address(cgroup.id)
                {
                    let reason = format!(
                        "{} is missing: the daemon stopped before saving it",
                        record_path.display()
                    );
                    self.strand_unrecorded(name, cgroup, &dir, reason);
                }
                continue;
            }
            let Some(dir_name) = entry
                .file_name()
                .to_str()
                .filter(|n| crate::sandbox::validate_agent_name(n).is_ok())
                .map(str::to_owned)
            else {
                ignored.push(dir.display().to_string());
                continue;
            };
            let parsed = match read_json::<AgentRecord>(&record_path) {
                Ok(record) if record.name == dir_name => Ok(record),
                Ok(record) => Err(format!(
                    "its record {} names another agent ({})",
                    record_path.display(),
                    record.name
                )),
                Err(e) => Err(format!("its record cannot be used: {e}")),
            };
            let record = match parsed {
                Ok(record) => record,
                Err(reason) => {
                    // The agent of this directory may still run, its kernel entry open to an
                    // address no gateway serves now. Only a cgroup of the directory's name
                    // is the daemon's to cut: others under the parent may be `confine`'s.
                    match self.parent.agent(&dir_name) {
                        Ok(cgroup) => self.strand_unrecorded(&dir_name, cgroup, &dir, reason),
                        Err(_) => {
                            tracing::warn!(dir = %dir.display(), reason, "agent record not resumed; no cgroup of its name is left");
                        }
                    }
                    continue;
                }
            };
            let Ok(cgroup) = self.parent.agent(&record.name) else {
                // The cgroup is gone (a reboot): nothing left to resume.
                let _ = std::fs::remove_file(&record_path);
                continue;
            };
            if let Err(e) = self.resume_one(&record, &dir, &cgroup).await {
                self.strand(
                    &record.name,
                    Stranded {
                        cgroup,
                        envelope_id: Some(record.envelope_id.clone()),
                        gateway: Some(record.gateway),
                        dir: Some(dir.clone()),
                        reason: format!("could not be resumed: {e}"),
                    },
                );
            }
        }
        if !ignored.is_empty() {
            tracing::warn!(
                dirs = ?ignored,
                "agent records outside an agent's own directory were not resumed"
            );
        }
    }

    /// Whether `cgroup_id`'s kernel entry lets it reach an address of this daemon's
    /// gateway range. An entry that cannot be read counts as one that does, so the
    /// cgroup is cut off rather than left holding an address another agent may get.
    fn opens_own_gateway_address(&self, cgroup_id: u64) -> bool {
        let cfg = self.config();
        let [first, last] = cfg.gateway_ports;
        let entry = match self.kernel.lock() {
            Ok(kernel) => kernel.agent(cgroup_id),
            Err(_) => return true,
        };
        match entry {
            Ok(policy) => policy
                .and_then(|p| p.gateway())
                .is_some_and(|gw| gw.ip() == cfg.gateway_ip && (first..=last).contains(&gw.port())),
            Err(_) => true,
        }
    }

    /// Strands the agent of a directory whose record is unusable. Its gateway's address is
    /// read from its kernel entry, so it is never handed to another agent meanwhile.
    fn strand_unrecorded(&self, name: &str, cgroup: AgentCgroup, dir: &Path, reason: String) {
        let gateway = self
            .kernel
            .lock()
            .ok()
            .and_then(|k| k.agent(cgroup.id).ok().flatten())
            .and_then(|policy| policy.gateway());
        self.strand(
            name,
            Stranded {
                cgroup,
                envelope_id: None,
                gateway,
                dir: Some(dir.to_owned()),
                reason: format!("could not be resumed: {reason}"),
            },
        );
    }

    async fn resume_one(
        &self,
        record: &AgentRecord,
        dir: &Path,
        cgroup: &AgentCgroup,
    ) -> Result<(), DaemonError> {
        let envelope_json = std::fs::read_to_string(dir.join("envelope.json"))
            .map_err(io_err("reading a saved Envelope"))?;
        // The id is spent already; everything else is checked again.
        let verified = self
            .grants()?
            .verifier
            .verify(envelope_json.as_bytes(), &UsedIds::in_memory())?;
        let revoked = self
            .revoked
            .lock()
            .map(|r| r.contains(verified.id()))
            .unwrap_or(true);
        let listener = match self.claim_kept_socket(&record.name, record.gateway) {
            Some(kept) => kept,
            None => {
                let listener = bind_retry(record.gateway).await?;
                self.keep_socket(&record.name, &listener);
                listener
            }
        };
        let serving = serving_handle(&listener, record.gateway)?;
        let (gateway, counts) = self.new_gateway(&record.name, &verified, dir, cgroup.id)?;
        // A new CA: the old one died with the old process, so the agent's file is rewritten.
        let ca_path = self.write_ca(&record.name, &gateway)?;
        let cut = gateway.breaker().open_reason().is_some() || revoked;
        if cut {
            self.kernel
                .lock()
                .map_err(|_| poisoned())?
                .trip(cgroup.id)?;
        }
        // Cut off by the daemon's own stop, still in the state that stop wrote (a trip made
        // meanwhile, say `enforcer trip` with no daemon, writes another), and its gateway is
        // bound again to the address the kernel lets it reach: it may go on.
        let suspended = dir.join(SUSPENDED);
        if suspended.exists() {
            let mut kernel = self.kernel.lock().map_err(|_| poisoned())?;
            match kernel.agent(cgroup.id)? {
                Some(mut policy)
                    if !cut
                        && policy.state == STATE_SUSPENDED
                        && policy.gateway() == Some(record.gateway) =>
                {
                    policy.state = STATE_ACTIVE;
                    kernel.set_agent(cgroup.id, &policy)?;
                }
                _ => {
                    tracing::warn!(agent = %record.name, "not lifting the cut of the daemon's stop: the kernel entry is not the one it cut")
                }
            }
            drop(kernel);
            std::fs::remove_file(&suspended)
                .map_err(io_err(format!("removing {}", suspended.display())))?;
        }
        let stop = Arc::new(Notify::new());
        let stop2 = stop.clone();
        tokio::spawn(
            gateway
                .clone()
                .serve(serving, async move { stop2.notified().await }),
        );
        tracing::info!(agent = %record.name, envelope = verified.id(), "resumed");
        let agent = Agent {
            name: record.name.clone(),
            envelope: verified,
            cgroup: cgroup.clone(),
            gateway,
            gateway_addr: record.gateway,
            listener,
            ca_path,
            dir: dir.to_owned(),
            stop,
            counts,
            revoked,
        };
        if let Ok(mut agents) = self.agents.lock() {
            agents.insert(record.name.clone(), agent);
        }
        Ok(())
    }

    /// Cuts a running agent off while the daemon is down: its gateway's address is free
    /// then, for any local process to bind. A marker says the cut is the daemon's own, so
    /// the next start lifts it once the gateway serves again; without the marker the agent
    /// stays cut off, as everything that cannot be proven safe does.
    fn suspend(&self, agent: &Agent) {
        if agent.state() != AgentState::Active {
            // Tripped, revoked or expired: its kernel entry should say so already, but a
            // flip that failed back then would leave it open while nothing serves its
            // address. Cut again (it is idempotent), for good: no marker.
            if let Err(e) = self.cut_off(&agent.cgroup) {
                tracing::error!(agent = %agent.name, error = %e, "could not cut the agent off while the daemon is down");
            }
            return;
        }
        if let Err(e) = write_synced(&agent.dir.join(SUSPENDED), b"") {
            tracing::error!(agent = %agent.name, error = %e, "could not mark the agent as suspended; it stays cut off after the next start until an operator resets it");
        }
        let suspended = self
            .kernel
            .lock()
            .map_err(|_| "the kernel state lock is poisoned".to_owned())
            .and_then(|mut k| k.suspend(agent.cgroup.id).map_err(|e| e.to_string()));
        match suspended {
            Ok(true) => {
                tracing::info!(agent = %agent.name, "cut off until the daemon starts again")
            }
            Ok(false) => {
                tracing::info!(agent = %agent.name, "cut off in the kernel already; stays so")
            }
            // Not lifted by the next start, but cut off all the same.
            Err(e) => match self.cut_off(&agent.cgroup) {
                Ok(how) => {
                    tracing::warn!(agent = %agent.name, error = %e, how, "could not suspend the agent; cut off for good")
                }
                Err(cut) => {
                    tracing::error!(agent = %agent.name, error = %e, cut, "could not cut the agent off while the daemon is down");
                }
            },
        }
    }

    /// Hands a new gateway socket to the service manager's store, so that it stays bound
    /// (and nobody else can bind its address) if the daemon dies. Not having a store is
    /// no error: the socket then lives as long as the daemon.
    fn keep_socket(&self, name: &str, listener: &std::net::TcpListener) {
        if let Err(e) = systemd::store(name, std::os::fd::AsFd::as_fd(listener)) {
            tracing::warn!(agent = %name, error = %e, "handing the gateway socket to the service manager failed");
        }
    }

    /// Takes an agent's gateway socket out of the service manager's store once it ends.
    fn forget_socket(&self, name: &str) {
        if let Err(e) = systemd::forget(name) {
            tracing::warn!(agent = %name, error = %e, "taking the gateway socket out of the service manager's store failed");
        }
    }

    /// The socket the service manager kept for `name`, if it is bound to `addr`.
    fn claim_kept_socket(&self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let kept = self.kept_sockets.lock().ok()?.remove(name)?;
        match kept.local_addr() {
            Ok(bound) if bound == addr => {
                tracing::info!(agent = %name, %addr, "serving the gateway socket the service manager kept");
                Some(kept)
            }
            _ => {
                tracing::warn!(agent = %name, %addr, "the kept gateway socket is bound elsewhere; binding anew");
                self.forget_socket(name);
                None
            }
        }
    }

    /// Closes kept sockets no resumed agent claimed, and takes them out of the store.
    fn drop_unclaimed_sockets(&self) {
        let unclaimed = match self.kept_sockets.lock() {
            Ok(mut kept) => std::mem::take(&mut *kept),
            Err(_) => return,
        };
        for name in unclaimed.keys() {
            tracing::info!(agent = %name, "closing a kept gateway socket no agent claimed");
            self.forget_socket(name);
        }
    }

    /// Cuts off an agent no gateway of ours serves, lists it as failed with the reason
    /// and records it.
    fn strand(&self, name: &str, stranded: Stranded) {
        let cut = self.cut_off(&stranded.cgroup);
        // Whatever serves it later, this cut is lifted by an operator, not by a restart.
        if let Some(dir) = &stranded.dir {
            let _ = std::fs::remove_file(dir.join(SUSPENDED));
        }
        let mut event = Event::new(EventKind::BreakerTripped)
            .agent(name)
            .rule("gateway_unavailable")
            .detail("reason", stranded.reason.clone());
        if let Some(id) = &stranded.envelope_id {
            event = event.envelope(id);
        }
        match &cut {
            Ok(how) => {
                tracing::error!(agent = %name, reason = %stranded.reason, how, "no gateway for the agent: it is cut off in the kernel");
                event = event.detail("cut", *how);
            }
            Err(e) => {
                tracing::error!(agent = %name, reason = %stranded.reason, error = %e, "no gateway for the agent, and it could not be cut off");
                event = event.detail("cut_failed", e.clone());
            }
        }
        if self.audit.submit(event).is_err() {
            tracing::error!(agent = %name, "could not record a failed agent in the audit log");
        }
        if let Ok(mut list) = self.stranded.lock() {
            list.insert(name.to_owned(), stranded);
        }
    }

    /// Denies everything the cgroup sends: the map flip a breaker trip does. An entry that
    /// cannot be flipped is removed (a cgroup without one is denied everything); if even
    /// that fails the agent's processes are killed, since nothing else would stop them.
    fn cut_off(&self, cgroup: &AgentCgroup) -> Result<&'static str, String> {
        let flipped = match self.kernel.lock() {
            Ok(mut kernel) => match kernel.trip(cgroup.id) {
                Ok(_) => return Ok("kernel entry tripped"),
                Err(kernel::KernelError::UnknownAgent(_)) => {
                    return Ok("no kernel entry: denied everything");
                }
                Err(e) => match kernel.remove_agent(cgroup.id) {
                    Ok(()) => return Ok("kernel entry removed: denied everything"),
                    Err(removing) => format!("tripping: {e}; removing: {removing}"),
                },
            },
            Err(_) => "the kernel state lock is poisoned".to_owned(),
        };
        match cgroup.kill_all(Duration::from_secs(5)) {
            Ok(()) => Ok("processes killed"),
            Err(e) => Err(format!("{flipped}; killing its processes: {e}")),
        }
    }

    fn describe_stranded(&self, name: &str, s: &Stranded) -> serde_json::Value {
        json!({
            "agent": name,
            "envelope": s.envelope_id,
            "state": AgentState::Failed,
            "failure": s.reason,
            "gateway": s.gateway.map(|g| g.to_string()),
            "cgroup": s.cgroup.path.display().to_string(),
        })
    }

    /// Ends an agent left without a gateway.
    fn end_stranded(&self, name: &str) -> Result<serde_json::Value, DaemonError> {
        let stranded = self
            .stranded
            .lock()
            .map_err(|_| poisoned())?
            .remove(name)
            .ok_or_else(|| DaemonError::UnknownAgent(name.into()))?;
        let summary = self.describe_stranded(name, &stranded);
        if let Err(e) = stranded.cgroup.remove(Duration::from_secs(5)) {
            if let Ok(mut list) = self.stranded.lock() {
                list.insert(name.to_owned(), stranded);
            }
            return Err(e.into());
        }
        self.kernel
            .lock()
            .map_err(|_| poisoned())?
            .remove_agent(stranded.cgroup.id)?;
        self.forget_socket(name);
        if let Some(dir) = &stranded.dir {
            let _ = std::fs::remove_file(dir.join(RECORD));
        }
        let mut event = Event::new(EventKind::Other)
            .agent(name)
            .rule("deactivated")
            .detail("summary", summary.clone());
        if let Some(id) = &stranded.envelope_id {
            event = event.envelope(id);
        }
        let _ = self.audit.submit(event);
        Ok(summary)
    }

    fn deactivate(&self, name: &str) -> Result<serde_json::Value, DaemonError> {
        let Some(agent) = self.agents.lock().ok().and_then(|mut a| a.remove(name)) else {
            return self.end_stranded(name);
        };
        let summary = self.describe(&agent);
        agent.gateway.retire();
        agent.stop.notify_one();
        if let Err(e) = agent.cgroup.remove(Duration::from_secs(5)) {
            // Its gateway is gone and its processes live on.
            self.strand(
                name,
                Stranded {
                    cgroup: agent.cgroup.clone(),
                    envelope_id: Some(agent.envelope.id().to_owned()),
                    gateway: Some(agent.gateway_addr),
                    dir: Some(agent.dir.clone()),
                    reason: format!("ending it failed: {e}"),
                },
            );
            return Err(e.into());
        }
        self.kernel
            .lock()
            .map_err(|_| poisoned())?
            .remove_agent(agent.cgroup.id)?;
        self.forget_socket(name);
        let _ = std::fs::remove_file(agent.dir.join(RECORD));
        let _ = self.audit.submit(
            Event::new(EventKind::Other)
                .agent(name)
                .envelope(agent.envelope.id())
                .rule("deactivated")
                .detail("summary", summary.clone()),
        );
        Ok(summary)
    }

    fn with_agent<T>(&self, name: &str, f: impl FnOnce(&mut Agent) -> T) -> Result<T, DaemonError> {
        let mut agents = self.agents.lock().map_err(|_| poisoned())?;
        match agents.get_mut(name) {
            Some(agent) => Ok(f(agent)),
            None => Err(self.not_running(name)),
        }
    }

    /// Why `name` is not a running agent: unknown, or left without a gateway.
    fn not_running(&self, name: &str) -> DaemonError {
        match self
            .stranded
            .lock()
            .map(|s| s.get(name).map(|x| x.reason.clone()))
        {
            Ok(Some(reason)) => DaemonError::NoGateway {
                agent: name.into(),
                reason,
            },
            Ok(None) => DaemonError::UnknownAgent(name.into()),
            Err(_) => poisoned(),
        }
    }

    fn trip(&self, name: &str, peer: control::Peer) -> Result<serde_json::Value, DaemonError> {
        let gateway = self.with_agent(name, |a| a.gateway.clone())?;
        gateway
            .breaker()
            .trip(format!("tripped by operator (pid {})", peer.pid));
        Ok(json!({ "agent": name, "state": "tripped" }))
    }

    async fn reset(
        &self,
        name: &str,
        peer: control::Peer,
    ) -> Result<serde_json::Value, DaemonError> {
        let (gateway, cgroup_id, revoked, id, expires_at) = self.with_agent(name, |a| {
            (
                a.gateway.clone(),
                a.cgroup.id,
                a.revoked,
                a.envelope.id().to_owned(),
                a.envelope.envelope().expires_at.0,
            )
        })?;
        if revoked {
            return Err(DaemonError::Revoked(id));
        }
        // A reset gives the agent its way out back: it happens only once the log holds it.
        self.audit
            .submit_until(
                Event::new(EventKind::OperatorReset)
                    .agent(name)
                    .envelope(&id)
                    .detail("pid", peer.pid),
                Until::Written,
            )?
            .await?;
        let reopened = self.reopen(&gateway, cgroup_id, expires_at, peer);
        if let Err(e) = &reopened {
            let _ = self.audit.submit(
                Event::new(EventKind::Other)
                    .agent(name)
                    .envelope(&id)
                    .rule("operator_reset_failed")
                    .detail("error", e.to_string()),
            );
        }
        reopened?;
        Ok(json!({ "agent": name, "state": "active" }))
    }

    /// Closes the breaker and reopens the kernel entry, which the deadline still bounds.
    fn reopen(
        &self,
        gateway: &Gateway,
        cgroup_id: u64,
        expires_at: time::OffsetDateTime,
        peer: control::Peer,
    ) -> Result<(), DaemonError> {
        gateway
            .breaker()
            .reset(&OperatorReset::checked_by_control_plane(format!(
                "uid 0 pid {}",
                peer.pid
            )))
            .map_err(io_err("resetting the breaker state"))?;
        {
            let mut kernel = self.kernel.lock().map_err(|_| poisoned())?;
            let mut policy = kernel
                .agent(cgroup_id)?
                .ok_or(kernel::KernelError::UnknownAgent(cgroup_id))?;
            policy.state = STATE_ACTIVE;
            policy.deadline_boottime_ns = boottime_deadline(expires_at)?;
            kernel.set_agent(cgroup_id, &policy)?;
        }
        Ok(())
    }

    /// Cuts the agent off first, in the gateway and the kernel, and only then persists the
    /// revocation: if writing it fails the agent stays cut off and its Envelope refused
    /// until the daemon restarts, and the operator is told.
    fn revoke(&self, name: &str, peer: control::Peer) -> Result<serde_json::Value, DaemonError> {
        let running = self.with_agent(name, |a| {
            a.revoked = true;
            (
                Some(a.gateway.clone()),
                Some(a.envelope.id().to_owned()),
                a.cgroup.clone(),
            )
        });
        let (gateway, id, cgroup) = match running {
            Ok(found) => found,
            Err(DaemonError::NoGateway { .. }) => self
                .stranded
                .lock()
                .map_err(|_| poisoned())?
                .get(name)
                .map(|s| (None, s.envelope_id.clone(), s.cgroup.clone()))
                .ok_or_else(|| DaemonError::UnknownAgent(name.into()))?,
            Err(e) => return Err(e),
        };
        let id = id.ok_or_else(|| DaemonError::NoGateway {
            agent: name.into(),
            reason: "its Envelope is unknown, so there is nothing to revoke".into(),
        })?;
        if let Some(gateway) = &gateway {
            gateway
                .breaker()
                .trip(format!("Envelope {id} revoked by operator"));
        }
        // The breaker flips the kernel entry on its first trip only: an agent tripped
        // before, whose flip failed then, is cut here.
        let cut = self.cut_off(&cgroup);
        if let Ok(mut revoked) = self.revoked.lock() {
            revoked.insert(id.clone());
        }
        let saved = append_line(&self.config().state_dir.join("revoked-envelopes"), &id);
        let mut event = Event::new(EventKind::Revoked)
            .agent(name)
            .envelope(&id)
            .detail("pid", peer.pid);
        if let Err(e) = &cut {
            tracing::error!(agent = %name, error = %e, "cutting a revoked agent off in the kernel failed; its gateway refuses everything");
            event = event.detail("kernel_error", e.as_str());
        }
        if let Err(e) = &saved {
            tracing::error!(agent = %name, envelope = %id, error = %e, "the revocation could not be saved; it holds until the daemon restarts");
            event = event.detail("not_saved", e.to_string());
        }
        let _ = self.audit.submit(event);
        saved.map_err(|source| DaemonError::RevocationNotSaved {
            agent: name.into(),
            id: id.clone(),
            source: Box::new(source),
        })?;
        Ok(json!({ "agent": name, "state": "revoked" }))
    }

    /// Reads the config file again and takes up what may change live: trusted keys, floor,
    /// revocations, clock skew, lifetime and secrets. Every running agent's Envelope is then
    /// judged again, and one that no longer verifies is withdrawn: cut off in the gateway
    /// and the kernel, and not resettable. A change to anything that needs a restart
    /// refuses the reload whole. A dry run stops before changing anything and says which
    /// agents would be withdrawn.
    async fn reload(
        &self,
        peer: control::Peer,
        dry_run: bool,
    ) -> Result<serde_json::Value, DaemonError> {
        let _serial = self.serialized().await?;
        let loaded = DaemonConfig::load(&self.config_path)?;
        let mut fixed = self.config.fixed_fields_changed(&loaded.config);
        if loaded.audit_key.verifying_key() != self.audit_key {
            fixed.push("the key in audit_key");
        }
        if !fixed.is_empty() {
            return Err(DaemonError::ReloadRefused {
                path: self.config_path.clone(),
                fields: fixed.join(", "),
            });
        }
        let grants = Arc::new(loaded.grants);
        let running: Vec<(String, String, PathBuf, Arc<Gateway>)> = self
            .agents
            .lock()
            .map_err(|_| poisoned())?
            .values()
            .filter(|a| !a.revoked)
            .map(|a| {
                (
                    a.name.clone(),
                    a.envelope.id().to_owned(),
                    a.dir.clone(),
                    a.gateway.clone(),
                )
            })
            .collect();
        // Judge everything first and change nothing until all of it holds.
        let mut refused = Vec::new();
        let mut rotations = Vec::new();
        for (name, id, dir, gateway) in running {
            let refusal = match std::fs::read_to_string(dir.join("envelope.json")) {
                Err(e) => Some((
                    "unreadable",
                    format!("its saved Envelope cannot be read: {e}"),
                )),
                Ok(json) => match grants
                    .verifier
                    .verify(json.as_bytes(), &UsedIds::in_memory())
                {
                    Ok(_) => None,
                    // Expiry has its own path (the watcher and the kernel deadline).
                    Err(e) if e.kind() == "expired" => None,
                    Err(e) => Some((e.kind(), e.to_string())),
                },
            };
            match refusal {
                Some((kind, reason)) => refused.push((name, id, kind, reason)),
                None => {
                    let credentials =
                        gateway
                            .prepare_credentials(&grants.secrets)
                            .map_err(|source| DaemonError::ReloadSecrets {
                                path: self.config_path.clone(),
                                agent: name.clone(),
                                source,
                            })?;
                    rotations.push((gateway, credentials));
                }
            }
        }
        if dry_run {
            let would: Vec<serde_json::Value> = refused
                .iter()
                .map(|(name, id, kind, reason)| json!({ "agent": name, "envelope": id, "kind": kind, "reason": reason }))
                .collect();
            return Ok(json!({
                "config": self.config_path.display().to_string(),
                "dry_run": true,
                "would_withdraw": would,
            }));
        }
        let mut withdrawn = Vec::new();
        for (name, id, kind, reason) in refused {
            self.withdraw(&name, &id, kind, &reason)?;
            withdrawn
                .push(json!({ "agent": name, "envelope": id, "kind": kind, "reason": reason }));
        }
        for (gateway, credentials) in rotations {
            gateway.install_credentials(credentials);
        }
        *self.grants.write().map_err(|_| poisoned())? = grants;
        let _ = self.audit.submit(
            Event::new(EventKind::Other)
                .rule("config_reloaded")
                .detail("config", self.config_path.display().to_string())
                .detail("withdrawn", withdrawn.len())
                .detail("pid", peer.pid),
        );
        tracing::info!(config = %self.config_path.display(), withdrawn = withdrawn.len(), "config reloaded");
        Ok(json!({ "config": self.config_path.display().to_string(), "withdrawn": withdrawn }))
    }

    /// Cuts off an agent whose Envelope the host no longer accepts, for good: like
    /// `revoke`, but the id is not written to the revocation list, since restoring the
    /// config would make the Envelope valid again (a restart re-judges it).
    fn withdraw(&self, name: &str, id: &str, kind: &str, reason: &str) -> Result<(), DaemonError> {
        let gateway = self.with_agent(name, |a| {
            a.revoked = true;
            a.gateway.clone()
        })?;
        let _ = self.audit.submit(
            Event::new(EventKind::Revoked)
                .agent(name)
                .envelope(id)
                .rule(kind)
                .detail("reason", reason)
                .detail("by", "config reload"),
        );
        gateway.breaker().trip(format!(
            "Envelope {id} withdrawn by a config reload: {reason}"
        ));
        Ok(())
    }

    fn describe(&self, agent: &Agent) -> serde_json::Value {
        let kernel = self.kernel.lock().ok();
        let counters = kernel
            .as_ref()
            .and_then(|k| k.counters(agent.cgroup.id).ok())
            .unwrap_or_default();
        let (state, kernel_entry) = kernel_view(kernel.as_deref(), agent);
        let hooks = enforcer_common::hook::NAMES;
        let budgets: serde_json::Value = agent
            .gateway
            .ledger()
            .snapshot()
            .map(|snap| {
                snap.into_iter()
                    .map(|(scope, (used, limits))| {
                        (
                            scope,
                            json!({
                                "requests": [used.requests, limits.requests],
                                "spend": [used.spend, limits.spend],
                                "bytes_up": [used.bytes_up, limits.bytes_up],
                                "bytes_down": [used.bytes_down, limits.bytes_down],
                            }),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            })
            .unwrap_or(serde_json::Value::Null);
        json!({
            "agent": agent.name,
            "envelope": agent.envelope.id(),
            "subject": agent.envelope.envelope().subject,
            "state": state,
            "kernel_entry": kernel_entry,
            "breaker": agent.gateway.breaker().open_reason(),
            "gateway": agent.gateway_addr.to_string(),
            "cgroup": agent.cgroup.path.display().to_string(),
            "ca_file": agent.ca_path.display().to_string(),
            "expires_at": agent.envelope.envelope().expires_at.to_rfc3339(),
            "requests": {
                "allowed": agent.counts.allowed.load(Ordering::Relaxed),
                "denied": agent.counts.denied.load(Ordering::Relaxed),
                "held": agent.counts.held.load(Ordering::Relaxed),
            },
            "budgets": budgets,
            "kernel": {
                "allowed": hooks.iter().zip(counters.allowed).map(|(h, n)| (h.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "denied": hooks.iter().zip(counters.denied).map(|(h, n)| (h.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            },
            "pending_approvals": agent.gateway.approvals().list(),
        })
    }

    /// One agent, or all, those left without a gateway included.
    fn status(&self, name: Option<&str>) -> Result<serde_json::Value, DaemonError> {
        let agents = self.agents.lock().map_err(|_| poisoned())?;
        let stranded = self.stranded.lock().map_err(|_| poisoned())?;
        match name {
            Some(name) => match (agents.get(name), stranded.get(name)) {
                (Some(a), _) => Ok(self.describe(a)),
                (None, Some(s)) => Ok(self.describe_stranded(name, s)),
                (None, None) => Err(DaemonError::UnknownAgent(name.into())),
            },
            None => {
                let mut list: Vec<serde_json::Value> =
                    agents.values().map(|a| self.describe(a)).collect();
                list.extend(
                    stranded
                        .iter()
                        .map(|(name, s)| self.describe_stranded(name, s)),
                );
                Ok(json!({ "agents": list, "audit": self.audit_health() }))
            }
        }
    }

    /// Whether the audit log still records: once it failed, every request is refused with
    /// `audit_unavailable` until the daemon restarts and reopens it.
    fn audit_health(&self) -> serde_json::Value {
        let records = self.audit.stats().records;
        match self.audit.failure() {
            None => json!({ "state": "recording", "records": records }),
            Some(e) => json!({ "state": "failed", "records": records, "error": e.to_string() }),
        }
    }

    async fn handle(&self, request: Request, peer: control::Peer) -> Response {
        if request.version != control::VERSION {
            return Response::err(
                "unsupported_version",
                format!("this daemon speaks version {}", control::VERSION),
            );
        }
        let result = match request.op {
            Op::Activate { envelope } => self.activate(&envelope).await,
            Op::Deactivate { agent } => self.deactivate(&agent),
            Op::Status { agent } => self.status(agent.as_deref()),
            Op::Trip { agent } => self.trip(&agent, peer),
            // A reset reopens the kernel entry, so a stop must not pass it by.
            Op::Reset { agent } => match self.serialized().await {
                Ok(_serial) => self.reset(&agent, peer).await,
                Err(e) => Err(e),
            },
            Op::Revoke { agent } => self.revoke(&agent, peer),
            Op::Reload { dry_run } => self.reload(peer, dry_run).await,
            Op::Approvals { agent } => self.agents.lock().map_err(|_| poisoned()).map(|agents| {
                let list: Vec<serde_json::Value> = agents
                    .values()
                    .filter(|a| agent.as_deref().is_none_or(|n| n == a.name))
                    .flat_map(|a| {
                        a.gateway
                            .approvals()
                            .list()
                            .into_iter()
                            .map(move |h| json!({ "agent": a.name, "held": h }))
                    })
                    .collect();
                json!({ "approvals": list })
            }),
            Op::Approve { agent, id } => self.decide(&agent, id, true, peer).await,
            Op::Deny { agent, id } => self.decide(&agent, id, false, peer).await,
            Op::Shutdown => {
                self.shutdown.notify_one();
                Ok(json!({ "state": "shutting down" }))
            }
        };
        match result {
            Ok(value) => Response::ok(value),
            Err(e) => Response::err(e.kind(), e.to_string()),
        }
    }

    async fn decide(
        &self,
        name: &str,
        id: u64,
        approve: bool,
        peer: control::Peer,
    ) -> Result<serde_json::Value, DaemonError> {
        let (gateway, env) =
            self.with_agent(name, |a| (a.gateway.clone(), a.envelope.id().to_owned()))?;
        let Some(claim) = gateway.approvals().claim(id) else {
            return Err(DaemonError::UnknownAgent(format!(
                "{name} has no held request {id}"
            )));
        };
        // The decision is on record before the held request learns it. If the log cannot
        // take it, the claim is dropped, and that denies the request.
        self.audit
            .submit_until(
                Event::new(if approve {
                    EventKind::RequestApproved
                } else {
                    EventKind::RequestDenied
                })
                .agent(name)
                .envelope(&env)
                .rule("operator")
                .detail("held_id", id)
                .detail("pid", peer.pid),
                Until::Written,
            )?
            .await?;
        if !claim.decide(approve) {
            return Err(DaemonError::UnknownAgent(format!(
                "{name}'s held request {id} ended before the decision reached it"
            )));
        }
        Ok(json!({ "agent": name, "id": id, "approved": approve }))
    }

    async fn serve_control(self: Arc<Self>, listener: UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (or the like): retrying at once would spin a core
                    // and free nothing.
                    tracing::warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let daemon = self.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
                let peer = match control::peer(&stream) {
                    Ok(peer) => peer,
                    Err(e) => {
                        tracing::warn!(error = %e, "control connection without peer credentials; closed");
                        return;
                    }
                };
                let (read, mut write) = stream.into_split();
                if let Err(why) = control::authorize(peer, &daemon.config().cgroup_parent) {
                    tracing::warn!(
                        uid = peer.uid,
                        pid = peer.pid,
                        why,
                        "control connection refused"
                    );
                    let _ = daemon.audit.submit(
                        Event::new(EventKind::Other)
                            .rule("control_refused")
                            .detail("why", why.clone()),
                    );
                    // Nothing about agents is revealed to a refused peer.
                    let mut line = serde_json::to_vec(&Response::err("forbidden", "not allowed"))
                        .unwrap_or_default();
                    line.push(b'\n');
                    let _ = write.write_all(&line).await;
                    return;
                }
                let mut lines = BufReader::new(read.take(1024 * 1024)).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let response = match serde_json::from_str::<Request>(&line) {
                        Ok(request) => daemon.handle(request, peer).await,
                        Err(e) => Response::err("bad_request", e.to_string()),
                    };
                    let mut out = serde_json::to_vec(&response).unwrap_or_default();
                    out.push(b'\n');
                    if write.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    async fn kernel_events(self: Arc<Self>) {
        let mut told = false;
        let mut reader = loop {
            match EventReader::try_open(&self.config().pin_dir) {
                Ok(Some(reader)) => break reader,
                // A `confine` run reads them; the daemon takes over once it ends.
                Ok(None) => {
                    if !told {
                        tracing::warn!(
                            "another enforcer process reads the kernel's deny events; they \
                             reach the audit log once it ends (counters stay exact)"
                        );
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read kernel deny events");
                    return;
                }
            }
        };
        let mut tick = tokio::time::interval(DENY_WINDOW / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = reader.next_batch() => match batch {
                    Ok((events, undecodable)) => self.count_denials(&events, undecodable),
                    Err(e) => {
                        tracing::error!(error = %e, "reading kernel events failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                _ = tick.tick() => {
                    if let Ok(mut denials) = self.denials.lock() {
                        denials.flush(std::time::Instant::now(), |s| self.record_denials(s, false));
                    }
                }
            }
        }
    }

    fn count_denials(&self, events: &[kernel::events::KernelDeny], undecodable: usize) {
        let mut names: BTreeMap<u64, String> = self
            .agents
            .lock()
            .map(|a| a.values().map(|x| (x.cgroup.id, x.name.clone())).collect())
            .unwrap_or_default();
        if let Ok(stranded) = self.stranded.lock() {
            names.extend(stranded.iter().map(|(n, s)| (s.cgroup.id, n.clone())));
        }
        let now = std::time::Instant::now();
        if let Ok(mut denials) = self.denials.lock() {
            for e in events {
                let unknown;
                let agent = match names.get(&e.cgroup_id) {
                    Some(name) => name.as_str(),
                    None => {
                        unknown = format!("cgroup-{}", e.cgroup_id);
                        unknown.as_str()
                    }
                };
                denials.observe(agent, e, now, |s| self.record_denials(s, false));
            }
        }
        if undecodable > 0 {
            tracing::error!(undecodable, "kernel events that could not be decoded");
        }
    }

    /// Writes one summary of kernel denials; false if it must wait. Kernel records may
    /// fill a quarter of the audit queue at most: the rest is kept for the records
    /// gateways wait for before they forward, whatever an agent makes the kernel deny.
    fn record_denials(&self, s: &deny_log::Summary, stopping: bool) -> bool {
        let (queued, capacity) = self.audit.queue_load();
        if !stopping && queued >= capacity / 4 {
            return false;
        }
        let destination = match s.destination {
            deny_log::Destination::To(addr) => json!(addr.to_string()),
            deny_log::Destination::None => serde_json::Value::Null,
            deny_log::Destination::Various => json!("various"),
        };
        // The kernel reports a sample of denials when an agent makes many (and its ring
        // buffer can overflow); its counters are exact, so the record carries the total.
        let denied_total = enforcer_common::hook::NAMES
            .iter()
            .position(|h| *h == s.hook)
            .filter(|_| s.cgroup_id != 0)
            .and_then(|i| {
                let kernel = self.kernel.lock().ok()?;
                kernel.counters(s.cgroup_id).ok().map(|c| c.denied[i])
            });
        let event = Event::new(EventKind::KernelDeny)
            .agent(&*s.agent)
            .rule(s.reason)
            .detail("hook", s.hook)
            .detail("pid", s.pid)
            .detail("family", s.family)
            .detail("protocol", s.protocol)
            .detail("destination", destination)
            .detail("count", s.count)
            .detail("denied_total", denied_total)
            .detail(
                "over_ms",
                u64::try_from(s.over.as_millis()).unwrap_or(u64::MAX),
            );
        self.audit.submit(event).is_ok()
    }

    /// Records each agent's expiry once; the kernel deadline cuts it off by itself.
    async fn watch_expiry(self: Arc<Self>) {
        let mut reported: BTreeSet<String> = BTreeSet::new();
        loop {
            let expired: Vec<(String, String, u64)> = self
                .agents
                .lock()
                .map(|a| {
                    a.values()
                        .filter(|x| x.state() == AgentState::Expired)
                        .map(|x| (x.name.clone(), x.envelope.id().to_owned(), x.cgroup.id))
                        .collect()
                })
                .unwrap_or_default();
            for (name, id, cgroup_id) in expired {
                if reported.insert(id.clone()) {
                    // The kernel deadline has cut the agent already; this second, independent
                    // cut holds even if the deadline clock and the wall clock disagree.
                    if let Ok(mut kernel) = self.kernel.lock()
                        && let Err(e) = kernel.trip(cgroup_id)
                    {
                        tracing::error!(agent = %name, error = %e, "cutting an expired agent off failed");
                    }
                    let _ = self
                        .audit
                        .submit(Event::new(EventKind::Expired).agent(&name).envelope(&id));
                    tracing::info!(agent = %name, envelope = %id, "Envelope expired: agent cut off");
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(crate) fn metrics_text(&self) -> String {
        metrics::render(self)
    }
}

/// The agent's state with the kernel's word in it, and what its kernel entry holds. The
/// kernel's word wins: an agent cut off there (left without a gateway by an earlier start,
/// or suspended by a stop whose cut the start did not lift) is not active, whatever its
/// breaker says.
fn kernel_view(kernel: Option<&Enforcement>, agent: &Agent) -> (AgentState, &'static str) {
    let kernel_entry = match kernel.map(|k| k.agent(agent.cgroup.id)) {
        Some(Ok(Some(policy))) if policy.state == STATE_ACTIVE => "active",
        Some(Ok(Some(policy))) if policy.state == STATE_SUSPENDED => "suspended",
        Some(Ok(Some(_))) => "tripped",
        Some(Ok(None)) => "missing",
        Some(Err(_)) | None => "unreadable",
    };
    let state = match agent.state() {
        AgentState::Active if kernel_entry != "active" => AgentState::Tripped,
        state => state,
    };
    (state, kernel_entry)
}

fn cfg_path(d: &Daemon) -> String {
    d.config_path.display().to_string()
}

fn poisoned() -> DaemonError {
    DaemonError::Io {
        context: "daemon state".into(),
        source: std::io::Error::other("a lock was poisoned by a panic"),
    }
}

/// What an activation that failed half-way must take back.
#[derive(Default)]
struct Undo {
    cgroup: Option<AgentCgroup>,
    dir: Option<PathBuf>,
    /// The previous Envelope's state directory and where it belongs again.
    moved_aside: Option<(PathBuf, PathBuf)>,
    /// The cgroup's kernel entry and what it was before: put back, or removed if none.
    kernel_entry: Option<(u64, Option<AgentPolicy>)>,
    /// The agent whose CA file a replacement may have rewritten, and the PEM of the
    /// gateway that goes on serving it.
    ca: Option<(String, String)>,
    /// The agent whose new gateway socket was handed to the service manager's store.
    kept_socket: Option<String>,
}

impl Undo {
    fn run(self, daemon: &Daemon) {
        if let Some((id, before)) = self.kernel_entry
            && let Ok(mut k) = daemon.kernel.lock()
        {
            let restored = match before {
                Some(policy) => k.set_agent(id, &policy),
                None => k.remove_agent(id),
            };
            if let Err(e) = restored {
                // A cgroup whose entry is neither the old one nor gone must not keep the new
                // one: its gateway was never started.
                tracing::error!(cgroup = id, error = %e, "restoring a kernel entry failed");
                let _ = k.trip(id);
            }
        }
        if let Some(name) = self.kept_socket {
            daemon.forget_socket(&name);
        }
        if let Some((name, pem)) = self.ca
            && let Err(e) = daemon.write_ca_pem(&name, &pem)
        {
            tracing::error!(agent = %name, error = %e, "putting back the CA file of the gateway that goes on serving failed");
        }
        if let Some(cgroup) = self.cgroup {
            let _ = cgroup.remove(Duration::from_secs(2));
        }
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((aside, dir)) = self.moved_aside {
            let back = std::fs::rename(&aside, &dir).and_then(|()| {
                match std::fs::rename(dir.join(REPLACED_RECORD), dir.join(RECORD)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            });
            if let Err(e) = back {
                tracing::error!(from = %aside.display(), to = %dir.display(), error = %e, "moving an agent's state back failed");
            }
        }
    }
}

fn apply_resource_limits(
    cgroup: &Path,
    limits: &crate::envelope::model::ResourceLimits,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut set = |file: &str, value: String, what: &str| {
        let path = cgroup.join(file);
        if !path.exists() {
            notes.push(format!("{what} not applied: the cgroup v2 controller for {file} is not enabled on this host"));
            return;
        }
        if let Err(e) = std::fs::write(&path, &value) {
            notes.push(format!(
                "{what} not applied: writing {value} to {}: {e}",
                path.display()
            ));
        }
    };
    if let Some(pids) = limits.pids {
        set("pids.max", pids.to_string(), "pids limit");
    }
    if let Some(memory) = limits.memory_bytes {
        set("memory.max", memory.to_string(), "memory limit");
    }
    if let Some(cpu) = limits.cpu_percent {
        set("cpu.max", format!("{} 100000", cpu * 1000), "cpu limit");
    }
    notes
}

/// The control socket's directory: created root's and 0700 if missing; one that exists
/// is used only if it is root's and writable by no one else (whoever could write to it
/// could put their own socket in the daemon's place), and never changed: it may be a
/// directory other programs need as it is (`/run`).
fn control_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    // Checked after creating too: someone else may have made it first.
    let meta = std::fs::metadata(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    let problem = if !meta.is_dir() {
        Some("it is not a directory".to_owned())
    } else if meta.uid() != 0 {
        Some(format!("it belongs to uid {}, not root", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "its mode {:o} lets others than root write to it",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(DaemonError::ControlDir {
            path: dir.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        control_dir(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::Io {
            context: format!("control socket {}", path.display()),
            source: std::io::Error::other("another enforcer daemon is running"),
        });
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(listener)
}

/// The gateway sockets the service manager passed back, by agent: listening TCP sockets
/// stored under a valid agent name. Anything else passed is closed.
fn kept_gateway_sockets() -> BTreeMap<String, std::net::TcpListener> {
    let mut kept = BTreeMap::new();
    for (name, fds) in systemd::passed() {
        let valid_name = crate::sandbox::validate_agent_name(&name).is_ok();
        for fd in fds {
            if valid_name
                && !kept.contains_key(&name)
                && systemd::is_listening_tcp(std::os::fd::AsFd::as_fd(&fd))
            {
                kept.insert(name.clone(), std::net::TcpListener::from(fd));
            } else {
                tracing::warn!(name = %name, "closing a descriptor the service manager passed that is no gateway socket");
            }
        }
    }
    kept
}

/// Binds the next free port of the range that is not `reserved`, starting after the one
/// handed out last, so activation does not retry every port already in use.
async fn bind_free_port(
    ip: std::net::IpAddr,
    [first, last]: [u16; 2],
    cursor: &std::sync::atomic::AtomicU32,
    reserved: &BTreeSet<SocketAddr>,
) -> Result<std::net::TcpListener, DaemonError> {
    let span = u32::from(last - first) + 1;
    let start = cursor.load(Ordering::Relaxed);
    for step in 0..span {
        let offset = (start + step) % span;
        let port = first + offset as u16;
        if reserved.contains(&SocketAddr::new(ip, port)) {
            continue;
        }
        if let Ok(listener) = tokio::net::TcpListener::bind((ip, port)).await {
            cursor.store((offset + 1) % span, Ordering::Relaxed);
            return listener
                .into_std()
                .map_err(io_err(format!("taking the gateway socket {ip}:{port}")));
        }
    }
    Err(DaemonError::NoPort { ip, first, last })
}

/// Binds an address a gateway of a process that is stopping may still hold for a moment.
async fn bind_retry(addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                return listener
                    .into_std()
                    .map_err(io_err(format!("taking the gateway socket {addr}")));
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(io_err(format!("binding the gateway address {addr}"))(
        last.unwrap_or_else(|| std::io::Error::other("bind failed")),
    ))
}

/// A second handle on a gateway socket, for the gateway to serve and drop when it stops,
/// while the daemon keeps the socket bound.
fn serving_handle(
    listener: &std::net::TcpListener,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, DaemonError> {
    let context = format!("sharing the gateway socket {addr}");
    let handle = listener.try_clone().map_err(io_err(context.clone()))?;
    handle
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(handle))
        .map_err(io_err(context))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).map_err(io_err(format!("writing {}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), DaemonError> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| io_err("encoding")(std::io::Error::other(e)))?;
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DaemonError> {
    let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| io_err(format!("parsing {}", path.display()))(std::io::Error::other(e)))
}

fn read_lines(path: &Path) -> Result<BTreeSet<String>, DaemonError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

fn append_line(path: &Path, line: &str) -> Result<(), DaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    writeln!(file, "{line}")
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let hard = limit.rlim_max;
        limit.rlim_cur = hard.min(256);
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        assert_eq!(raise_open_files_limit().unwrap(), hard);
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, hard);
    }

    #[test]
    fn agent_names_come_from_subjects() {
        assert_eq!(agent_name("agent:market-maker-7"), "agent-market-maker-7");
        assert_eq!(agent_name("::"), "agent");
        assert_eq!(agent_name(&"x".repeat(100)).len(), 64);
        assert!(crate::sandbox::validate_agent_name(&agent_name("a b/c..d@é")).is_ok());
    }
}
