//! One agent's gateway: an HTTP/1.1 forward proxy (absolute-form `http://` requests and
//! `CONNECT` tunnels it intercepts with the agent's CA) that runs every request through the
//! decision order and forwards what passes with the credential injected.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    approval::{Approvals, Held, Verdict},
    breaker::{Breaker, TripHook},
    budget::{Cost, Ledger, LedgerError, Limits as BudgetLimits},
    framing::{HeadVerdict, Inspect, Verdicts},
    normalize::{self, Scheme, Target},
    secrets::{Secret, SecretStore},
    tls::AgentCa,
};
use crate::envelope::{
    VerifiedEnvelope,
    model::{Budget, Capability},
    pattern::{Body, RequestView},
};

/// Size and time limits of one agent's gateway.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// One decision, for the audit log and `tracing`. Holds no secret by construction: only
/// names, the normalized target, numbers and reasons written by the gateway.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Decision {
    pub envelope_id: String,
    pub agent: String,
    /// allowed, denied, held, approved
    pub outcome: &'static str,
    /// Which step decided: malformed, breaker, forbidden, capability, scope, approval,
    /// budget, audit, upstream, forwarded.
    pub step: &'static str,
    pub rule: String,
    /// The stable refusal code (`forbidden_effect`, `budget_exceeded`…), empty when allowed.
    pub code: &'static str,
    /// Why, in words the gateway wrote (never the agent's or upstream's bytes).
    pub reason: String,
    pub status: u16,
    pub method: String,
    pub url: String,
    /// The request's cost: spend charged to budgets, request body bytes sent upstream and
    /// response body bytes returned.
    pub spend: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub upstream_status: Option<u16>,
    pub latency_ms: u64,
}

/// A boxed future, for the async methods of the object-safe [`DecisionSink`].
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where decisions go. An error refuses the request: no action without a record.
pub trait DecisionSink: Send + Sync {
    /// Accepts a decision for recording without blocking: an outcome (a refusal, a hold,
    /// a forwarded request's result). `Err` when it cannot be recorded.
    fn record(&self, decision: &Decision) -> Result<(), String>;

    /// Records a decision the gateway is about to act on (forwarding) and resolves once the
    /// record can no longer be lost with this process; its fsync may follow. The default
    /// is [`record`](Self::record).
    fn record_before_acting<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        Box::pin(std::future::ready(self.record(decision)))
    }

    /// Records a request's outcome from async code, as [`record`](Self::record) does, but
    /// may first let the other requests ready beside it queue theirs so that they share
    /// one write. Resolves once the record is written. The default is `record`.
    fn record_outcome<'a>(&'a self, decision: &'a Decision) -> SinkFuture<'a> {
        Box::pin(std::future::ready(self.record(decision)))
    }
}

/// Logs decisions with `tracing` only.
pub struct TracingSink;

impl DecisionSink for TracingSink {
    fn record(&self, d: &Decision) -> Result<(), String> {
        tracing::info!(
            target: "enforcer::decision",
            outcome = d.outcome, step = d.step, rule = %d.rule, code = d.code,
            reason = %d.reason, status = d.status, method = %d.method, url = %d.url,
            spend = d.spend, bytes_up = d.bytes_up, bytes_down = d.bytes_down,
            upstream = ?d.upstream_status, latency_ms = d.latency_ms, "decision"
        );
        Ok(())
    }
}

/// Everything one agent's gateway needs.
pub struct GatewaySetup {
    pub agent: String,
    pub envelope: VerifiedEnvelope,
    pub secrets: SecretStore,
    /// Ledger and breaker state live here; `None` keeps them in memory only.
    pub state_dir: Option<PathBuf>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub limits: Limits,
    pub sink: Arc<dyn DecisionSink>,
    pub trip_hook: Arc<dyn TripHook>,
    /// The agent's cgroup id: only connections opened from it are served. `None` (the
    /// standalone gateway, which confines nothing) serves whoever connects.
    pub agent_cgroup: Option<u64>,
    /// Whether a capability whose host is a DNS name may be dialled at an internal address
    /// (loopback, private, link-local, …; see [`internal_address`]). Off, such addresses
    /// are refused: the gateway dials from outside the agent's confinement, so a name an
    /// issuer meant as public but that resolves inward would open the host's own network
    /// (a cloud metadata service, say) to the agent. Hosts written as an IP literal or
    /// `localhost` are dialled whatever they are: the issuer named them.
    pub allow_internal_upstreams: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error(
        "capability `{capability}` needs the secret `{secret}`, which the secret store does not hold"
    )]
    MissingSecret { capability: String, secret: String },
    #[error("capability `{capability}`: {reason}")]
    Credential {
        capability: String,
        reason: &'static str,
    },
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: {problem}; wall-clock budgets cannot be judged without it, so the gateway \
         does not start. It holds when the grant began (nanoseconds since the Unix epoch)"
    )]
    GrantStart { path: PathBuf, problem: String },
    #[error(
        "the secret store's values are too many or too long to scrub from responses; \
         the gateway does not start rather than let an echoed credential through"
    )]
    Scrubber,
}

pub struct Gateway {
    agent: String,
    envelope: VerifiedEnvelope,
    /// Replaced whole when the secret store is rotated; a request works with one snapshot.
    credentials: std::sync::RwLock<Arc<Credentials>>,
    ledger: Ledger,
    breaker: Breaker,
    approvals: Approvals,
    ca: AgentCa,
    upstream_tls: Arc<rustls::ClientConfig>,
    limits: Limits,
    sink: Arc<dyn DecisionSink>,
    connections: Arc<Semaphore>,
    /// How long the grant has run; wall-clock budgets are judged by it. Its start is
    /// persisted with the other state, so a restart does not give time back.
    started: GrantClock,
    /// Set when a newer Envelope replaced this one: connections still open to this gateway
    /// must not go on under the old grant.
    retired: std::sync::atomic::AtomicBool,
    /// Only connections whose socket belongs to this cgroup are served.
    agent_cgroup: Option<u64>,
    allow_internal_upstreams: bool,
    /// Idle keep-alive connections to each capability's upstream, by capability name.
    pool: Mutex<HashMap<String, Vec<SendRequest<Full<Bytes>>>>>,
}

/// What the gateway injects and what it scrubs from responses.
pub struct Credentials {
    /// Per capability, in the Envelope's order.
    prepared: Vec<Prepared>,
    /// Every secret value this gateway has held: an upstream may still echo one it was
    /// sent before a rotation.
    scrub: Vec<Secret>,
    /// Every echo form (see [`Secret::echo_forms`]) of every `scrub` value, matched in
    /// one pass over a response; `None` when there is none.
    echoes: Option<AhoCorasick>,
}

impl Credentials {
    fn prepare(
        env: &crate::envelope::Envelope,
        store: &SecretStore,
        earlier: &[Secret],
    ) -> Result<Self, GatewayError> {
        let prepared = env
            .capabilities
            .iter()
            .map(|cap| Prepared::new(cap, store))
            .collect::<Result<Vec<_>, _>>()?;
        let mut scrub = earlier.to_vec();
        for secret in store.values() {
            if !scrub.contains(secret) {
                scrub.push(secret.clone());
            }
        }
        let forms: Vec<Secret> = scrub
            .iter()
            .filter(|s| !s.expose().is_empty())
            .flat_map(Secret::echo_forms)
            .collect();
        let echoes = if forms.is_empty() {
            None
        } else {
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(forms.iter().map(|f| f.expose().as_bytes()))
                .map_err(|_| GatewayError::Scrubber)?;
            Some(matcher)
        };
        Ok(Credentials {
            prepared,
            scrub,
            echoes,
        })
    }
}

/// What forwarding through one capability needs, worked out once per Envelope instead of
/// once per request.
struct Prepared {
    /// The ledger scope of the capability's own budget (also its audit rule).
    scope: String,
    host_header: HeaderValue,
    /// The header carrying the credential, and its value (marked sensitive, so it never
    /// shows in `Debug` output).
    credential: Option<(HeaderName, HeaderValue)>,
}

impl Prepared {
    fn new(cap: &Capability, secrets: &SecretStore) -> Result<Self, GatewayError> {
        let fail = |reason| GatewayError::Credential {
            capability: cap.name.to_string(),
            reason,
        };
        let (host, port) = (&cap.upstream.host, cap.upstream.port());
        let host_header = if port == cap.upstream.scheme.default_port() {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        }
        .map_err(|_| fail("the upstream host cannot be sent as a Host header"))?;
        let credential = match &cap.credential {
            None => None,
            Some(cred) => {
                let secret =
                    secrets
                        .get(&cred.secret)
                        .map_err(|_| GatewayError::MissingSecret {
                            capability: cap.name.to_string(),
                            secret: cred.secret.to_string(),
                        })?;
                let name = HeaderName::from_bytes(cred.header.as_bytes())
                    .map_err(|_| fail("the credential header name is invalid"))?;
                let mut value = HeaderValue::from_str(&cred.header_value(secret.expose()))
                    .map_err(|_| fail("the credential cannot be sent as a header value"))?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        Ok(Prepared {
            scope: capability_scope(&cap.name),
            host_header,
            credential,
        })
    }
}

/// When the grant whose state lives at `path` began, recorded there on first use. A
/// missing file is a new grant; one that cannot be read or parsed stops the gateway,
/// since guessing would give an agent its wall-clock budget back.
fn grant_started(path: &std::path::Path) -> Result<GrantClock, GatewayError> {
    let fail = |problem: String| GatewayError::GrantStart {
        path: path.to_owned(),
        problem,
    };
    let now = std::time::SystemTime::now();
    let began = match std::fs::read_to_string(path) {
        Ok(text) => {
            let nanos: u64 = text.trim().parse().map_err(|_| {
                fail(format!(
                    "`{}` is not a number",
                    text.trim().escape_default()
                ))
            })?;
            std::time::UNIX_EPOCH + Duration::from_nanos(nanos)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let nanos = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| fail("the system clock is before 1970".into()))?
                .as_nanos();
            // Written aside and renamed: a crash leaves the whole file or none (a grant
            // that starts over at once), never a torn one.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{nanos}\n"))
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| fail(format!("cannot be written: {e}")))?;
            now
        }
        Err(e) => return Err(fail(format!("cannot be read: {e}"))),
    };
    // A clock set back to before the grant began counts as no time gone by.
    Ok(GrantClock {
        before: now.duration_since(began).unwrap_or(Duration::ZERO),
        since: Instant::now(),
    })
}

/// How long a grant has run: the time before this process took it up, plus this
/// process's own monotonic time since.
struct GrantClock {
    before: Duration,
    since: Instant,
}

impl GrantClock {
    fn new() -> Self {
        GrantClock {
            before: Duration::ZERO,
            since: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.before.saturating_add(self.since.elapsed())
    }
}

/// Idle upstream connections kept per capability; more are closed when returned.
const MAX_IDLE_PER_CAPABILITY: usize = 256;

const ENVELOPE_SCOPE: &str = "envelope";

fn budget_limits(b: &Budget) -> BudgetLimits {
    BudgetLimits {
        requests: b.requests,
        spend: b.spend.as_ref().and_then(|s| s.max),
        bytes_up: b.bytes_up,
        bytes_down: b.bytes_down,
    }
}

fn capability_scope(name: &str) -> String {
    format!("capability:{name}")
}

impl Gateway {
    /// Builds an agent's gateway; every secret the Envelope names must be in the store.
    pub fn new(setup: GatewaySetup) -> Result<Arc<Self>, GatewayError> {
        let env = setup.envelope.envelope();
        for cap in &env.capabilities {
            if let Some(cred) = &cap.credential
                && setup.secrets.get(&cred.secret).is_err()
            {
                return Err(GatewayError::MissingSecret {
                    capability: cap.name.to_string(),
                    secret: cred.secret.to_string(),
                });
            }
        }
        if let Some(dir) = &setup.state_dir {
            std::fs::create_dir_all(dir).map_err(|source| GatewayError::StateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut scopes = BTreeMap::new();
        if let Some(b) = &env.budget {
            scopes.insert(ENVELOPE_SCOPE.to_owned(), budget_limits(b));
        }
        for cap in &env.capabilities {
            if let Some(b) = &cap.budget {
                scopes.insert(capability_scope(&cap.name), budget_limits(b));
            }
        }
        let ledger_path = setup
            .state_dir
            .as_ref()
            .map(|d| d.join("budget-ledger.jsonl"));
        let breaker_path = setup.state_dir.as_ref().map(|d| d.join("breaker-open"));
        let ledger = Ledger::open(scopes, ledger_path.as_deref())?;
        let breaker = Breaker::open(
            env.breakers.clone(),
            breaker_path.as_deref(),
            setup.trip_hook,
        );
        let credentials = Credentials::prepare(env, &setup.secrets, &[])?;
        let started = match &setup.state_dir {
            Some(dir) => grant_started(&dir.join("grant-started"))?,
            None => GrantClock::new(),
        };
        let ca = AgentCa::generate(&setup.agent, env.expires_at.0 + time::Duration::hours(1))?;
        Ok(Arc::new(Gateway {
            agent: setup.agent,
            envelope: setup.envelope,
            credentials: std::sync::RwLock::new(Arc::new(credentials)),
            ledger,
            breaker,
            approvals: Approvals::default(),
            ca,
            upstream_tls: setup.upstream_tls,
            connections: Arc::new(Semaphore::new(setup.limits.max_connections)),
            limits: setup.limits,
            sink: setup.sink,
            started,
            retired: std::sync::atomic::AtomicBool::new(false),
            pool: Mutex::new(HashMap::new()),
            agent_cgroup: setup.agent_cgroup,
            allow_internal_upstreams: setup.allow_internal_upstreams,
        }))
    }

    fn credentials(&self) -> Arc<Credentials> {
        // Written only by `install_credentials`, which cannot panic while holding it.
        self.credentials
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Works out the credentials this gateway would inject from `store`, without using
    /// them yet: fails, naming the capability and the secret, if the store lacks one the
    /// Envelope needs. Secrets of the current store stay in the scrub list.
    pub fn prepare_credentials(&self, store: &SecretStore) -> Result<Credentials, GatewayError> {
        Credentials::prepare(self.envelope.envelope(), store, &self.credentials().scrub)
    }

    /// Injects `credentials` from the next request on; requests under way finish with the
    /// ones they started with.
    pub fn install_credentials(&self, credentials: Credentials) {
        *self
            .credentials
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(credentials);
    }

    /// The CA certificate (PEM) the agent must trust for intercepted HTTPS.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    pub fn approvals(&self) -> &Approvals {
        &self.approvals
    }

    /// Ends this gateway's grant: every further request, on any connection, is refused.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Accepts connections until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => return,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = self.limits.max_connections, "connection limit reached; closing");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            tokio::spawn(async move {
                if !gateway.opened_by_the_agent(&stream, peer) {
                    return;
                }
                let (stream, verdicts) = Inspect::new(stream, gateway.head_limit());
                gateway
                    .serve_connection(TokioIo::new(stream), None, verdicts, Arc::new(permit))
                    .await;
            });
        }
    }

    /// Whether an accepted connection was opened from the agent's cgroup. The kernel keeps
    /// the agent from reaching anything but this gateway; this keeps anyone but the agent
    /// (another local user, say) from using its grant. Any doubt closes the connection.
    fn opened_by_the_agent(&self, stream: &tokio::net::TcpStream, peer: SocketAddr) -> bool {
        let Some(expected) = self.agent_cgroup else {
            return true;
        };
        let found = stream
            .local_addr()
            .and_then(|local| crate::kernel::sock_diag::tcp_socket_cgroup(peer, local));
        match found {
            Ok(Some(id)) if id == expected => true,
            Ok(found) => {
                tracing::warn!(agent = %self.agent, %peer, cgroup = ?found, "a connection from outside the agent's cgroup; closed");
                false
            }
            Err(e) => {
                tracing::warn!(agent = %self.agent, %peer, error = %e, "the cgroup of a connection cannot be told; closed");
                false
            }
        }
    }

    /// hyper's read buffer, which bounds a request head.
    fn head_limit(&self) -> usize {
        self.limits.max_header_bytes.max(8192)
    }

    /// Serves one agent connection, or one intercepted tunnel. `permit` is its place
    /// among `max_connections`: a tunnel a CONNECT opens keeps it for as long as it lives,
    /// since the connection the CONNECT came on ends when it is upgraded.
    async fn serve_connection<I>(
        self: Arc<Self>,
        io: I,
        tunnel: Option<(String, u16)>,
        verdicts: Verdicts,
        permit: Arc<OwnedSemaphorePermit>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let gateway = self.clone();
        let tunnel = tunnel.map(Arc::new);
        let service = hyper::service::service_fn(move |req| {
            let gateway = gateway.clone();
            let tunnel = tunnel.clone();
            let permit = permit.clone();
            // Taken here, in request order, before anything else can run.
            let framing = verdicts.next();
            async move {
                Ok::<_, Infallible>(
                    gateway
                        .handle(req, tunnel.as_deref().cloned(), framing, permit)
                        .await,
                )
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new());
        builder
            .max_buf_size(self.head_limit())
            .header_read_timeout(self.limits.request_timeout);
        if let Err(e) = builder.serve_connection(io, service).with_upgrades().await {
            tracing::debug!(error = %e, "agent connection ended with an error");
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        tunnel: Option<(String, u16)>,
        framing: Option<HeadVerdict>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let raw_target = req.uri().clone();
        let mut decision = Decision {
            envelope_id: self.envelope.id().to_owned(),
            agent: self.agent.clone(),
            outcome: "denied",
            step: "malformed",
            rule: String::new(),
            code: "",
            reason: String::new(),
            status: 0,
            method: req.method().as_str().to_owned(),
            // Set to the normalized target once there is one; the raw target otherwise.
            url: String::new(),
            spend: 0.0,
            bytes_up: 0,
            bytes_down: 0,
            upstream_status: None,
            latency_ms: 0,
        };
        // A message whose framing is ambiguous is refused before anything reads it, and
        // the connection is closed: what hyper takes for the next request may be what
        // another parser takes for this one's body.
        let outcome = match framing {
            Some(HeadVerdict::Ok) => {
                self.clone()
                    .decide_and_forward(req, tunnel, permit, &mut decision)
                    .await
            }
            other => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "ambiguous_framing",
                other
                    .map_or("the request's framing could not be checked", |v| v.reason())
                    .to_owned(),
            )
            .closing()),
        };
        let response = match outcome {
            Ok(response) => response,
            Err(refusal) => {
                decision.status = refusal.status.as_u16();
                decision.code = refusal.code;
                decision.reason.clone_from(&refusal.reason);
                if decision.rule.is_empty() {
                    decision.rule = refusal.code.to_owned();
                }
                if decision.step != "breaker" && decision.step != "audit" {
                    self.breaker.record_denied();
                }
                refusal.into_response()
            }
        };
        decision.latency_ms = started.elapsed().as_millis() as u64;
        if decision.url.is_empty() {
            decision.url = raw_target.to_string();
        }
        if decision.status == 0 {
            decision.status = response.status().as_u16();
        }
        if let Err(e) = self.sink.record_outcome(&decision).await {
            tracing::error!(error = %e, "could not record a decision");
            // A forwarded request's result is withheld without its record; a refusal
            // stays the refusal it was.
            if decision.outcome != "denied" {
                return Refusal::audit_unavailable().into_response();
            }
        }
        response
    }

    /// Refuses unless the grant still holds: the breaker closed (once open, nothing gets
    /// through), the Envelope neither replaced nor ended, and not expired (enforced here
    /// and, independently, by the kernel deadline).
    fn grant_in_force(&self, decision: &mut Decision) -> Result<(), Refusal> {
        if let Some(reason) = self.breaker.open_reason() {
            decision.step = "breaker";
            return Err(Refusal::circuit_open(&reason));
        }
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            decision.step = "retired";
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "envelope_replaced",
                "this Envelope was replaced or ended; reconnect to use the current one".into(),
            ));
        }
        if time::OffsetDateTime::now_utc() >= self.envelope.envelope().expires_at.0 {
            decision.step = "expired";
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "envelope_expired",
                format!(
                    "the Envelope expired at {}",
                    self.envelope.envelope().expires_at.to_rfc3339()
                ),
            ));
        }
        Ok(())
    }

    async fn decide_and_forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        tunnel: Option<(String, u16)>,
        permit: Arc<OwnedSemaphorePermit>,
        decision: &mut Decision,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        self.grant_in_force(decision)?;
        if req.method() == Method::CONNECT {
            return self.connect(req, tunnel.is_some(), permit, decision);
        }

        // 1. Parse strictly and normalize.
        normalize::method(req.method()).map_err(Refusal::malformed)?;
        normalize::headers(req.headers()).map_err(Refusal::malformed)?;
        let host_header = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        let target = match &tunnel {
            Some((host, port)) => normalize::in_tunnel(
                Scheme::Https,
                host,
                *port,
                req.uri(),
                host_header.as_deref(),
            ),
            None => normalize::absolute(req.uri(), host_header.as_deref()),
        }
        .map_err(Refusal::malformed)?;
        let origin_form = target.origin_form();
        let mut url = String::with_capacity(
            target.scheme.as_str().len() + 3 + target.host.len() + 8 + origin_form.len(),
        );
        url.push_str(target.scheme.as_str());
        url.push_str("://");
        target.push_authority(&mut url);
        url.push_str(&origin_form);
        decision.url = url;
        let method = req.method().clone();
        let (parts, body) = req.into_parts();
        // The head's read timeout does not cover the body: without a deadline of its own
        // an agent could hold a body back for as long as it likes.
        let collected = tokio::time::timeout(
            self.limits.request_timeout,
            Limited::new(body, self.limits.max_body_bytes).collect(),
        )
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {}s",
                    self.limits.request_timeout.as_secs_f64()
                ),
            )
            .closing()
        })?;
        let body = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let too_large = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                return Err(if too_large {
                    Refusal::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!(
                            "request bodies over {} bytes are not inspected and so not forwarded",
                            self.limits.max_body_bytes
                        ),
                    )
                } else {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "body_unreadable",
                        "the request body could not be read".into(),
                    )
                });
            }
        };
        // The grant may have ended (a trip, a replacement, the deadline) while the body
        // was on its way.
        self.grant_in_force(decision)?;
        normalize::form_body(&parts.headers, &body).map_err(Refusal::malformed)?;
        let json = if body.is_empty() {
            None
        } else {
            super::json_body::parse_unambiguous(&body)
        };
        let body_view = match (&json, body.is_empty()) {
            (_, true) => Body::Absent,
            (Some(value), false) => Body::Json(value),
            (None, false) => Body::Opaque,
        };
        let view = RequestView {
            method: method.as_str(),
            host: &target.host,
            path: &target.path,
            query: &target.query,
            body: body_view,
        };
        // Judged once for every rule below. Normalization made it so; a path that is not
        // is still refused by every capability and caught by every path-bound rule.
        let path_normalized = crate::envelope::is_normalized_path(view.path);

        // 2. Forbidden effects, the floor's and the Envelope's, before anything can allow.
        if let Some(effect) = self.envelope.forbidden_match_judged(&view, path_normalized) {
            decision.step = "forbidden";
            let reason = effect.reason.clone();
            self.breaker.record_forbidden(&reason);
            decision.rule = format!("forbidden:{reason}");
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden_effect",
                format!("forbidden: {reason}"),
            ));
        }

        // 3 + 4. A capability for this upstream whose route and scope fit.
        decision.step = "capability";
        let env = self.envelope.envelope();
        let serving: Vec<(usize, &Capability)> = env
            .capabilities
            .iter()
            .enumerate()
            .filter(|(_, c)| serves(c, &target))
            .collect();
        if serving.is_empty() {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "no_capability",
                format!(
                    "no capability of this Envelope reaches {}://{}",
                    target.scheme,
                    target.authority()
                ),
            ));
        }
        let mut reasons = Vec::new();
        let mut chosen = None;
        for &(index, cap) in &serving {
            match cap.check_judged(&view, path_normalized) {
                Ok(()) => {
                    chosen = Some((index, cap));
                    break;
                }
                Err(reason) => reasons.push(reason),
            }
        }
        let Some((index, cap)) = chosen else {
            let route_fits = serving
                .iter()
                .any(|(_, c)| c.routes.iter().any(|r| r.matches(view.method, view.path)));
            decision.step = if route_fits { "scope" } else { "capability" };
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                if route_fits {
                    "scope_violation"
                } else {
                    "no_route"
                },
                reasons.join("; "),
            ));
        };
        let credentials = self.credentials();
        let prepared = credentials.prepared.get(index).ok_or_else(|| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the capability's forwarding setup is missing".into(),
            )
        })?;
        decision.rule.clone_from(&prepared.scope);

        // 5. Approval.
        if let Some(approval) = env
            .approvals
            .iter()
            .find(|a| a.matches_judged(&view, path_normalized))
        {
            decision.step = "approval";
            let mut hasher = Sha256::new();
            hasher.update(method.as_str());
            hasher.update([0]);
            hasher.update(decision.url.as_bytes());
            hasher.update([0]);
            hasher.update(&body);
            let held = Held {
                id: 0,
                method: method.as_str().to_owned(),
                url: decision.url.clone(),
                rule: approval.reason.clone(),
                request_sha256: hex::encode(hasher.finalize()),
                timeout_secs: approval.timeout_secs,
            };
            let held_event = Decision {
                outcome: "held",
                status: 0,
                ..decision.clone()
            };
            // Nobody is asked to approve what the log cannot show was held.
            if let Err(e) = self.sink.record(&held_event) {
                decision.step = "audit";
                tracing::error!(error = %e, "audit unavailable; refusing");
                return Err(Refusal::audit_unavailable());
            }
            let mut abandoned = Abandoned {
                sink: self.sink.as_ref(),
                decision: Some(Decision {
                    code: "approval_abandoned",
                    reason: "the agent closed its connection while the request was held".into(),
                    ..decision.clone()
                }),
            };
            let verdict = self
                .approvals
                .hold(held, Duration::from_secs(approval.timeout_secs))
                .await;
            abandoned.decision = None;
            match verdict {
                Verdict::Approved => {
                    decision.outcome = "approved";
                    // The hold may have lasted minutes: an approval does not outlive a
                    // trip, a revocation, a replacement or the deadline that came meanwhile.
                    self.grant_in_force(decision)?;
                }
                Verdict::Denied => {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "approval_denied",
                        format!("an operator denied it ({})", approval.reason),
                    ));
                }
                Verdict::TimedOut => {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "approval_timeout",
                        format!(
                            "no operator approved it within {}s ({})",
                            approval.timeout_secs, approval.reason
                        ),
                    ));
                }
            }
        }

        // 6. Budgets: the whole cost is reserved before anything leaves.
        decision.step = "budget";
        // What the request spends is read by its capability's spend rule and counts against
        // the capability's budget and the Envelope's total alike. A read without a body
        // spends nothing; anything else must show its cost in the body, or it is refused:
        // a write that moved its amount into the query string would otherwise be free.
        let safe_read = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS)
            && matches!(body_view, Body::Absent);
        let spend = match cap.budget.as_ref().and_then(|b| b.spend.as_ref()) {
            Some(rule) if rule.amount.is_some() && !safe_read => {
                rule.cost(body_view).map_err(|reason| {
                    Refusal::new(
                        StatusCode::FORBIDDEN,
                        "spend_unknown",
                        format!("budget `{}`: {reason}", prepared.scope),
                    )
                })?
            }
            _ => 0.0,
        };
        let mut costs: Vec<(&str, Cost)> = Vec::with_capacity(2);
        for (scope, budget) in [
            (ENVELOPE_SCOPE, env.budget.as_ref()),
            (prepared.scope.as_str(), cap.budget.as_deref()),
        ] {
            let Some(budget) = budget else { continue };
            if let Some(limit) = budget.wall_clock_secs
                && self.started.elapsed() > Duration::from_secs(limit)
            {
                return Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "budget_exceeded",
                    format!("budget `{scope}`: wall-clock time of {limit}s used up"),
                ));
            }
            costs.push((
                scope,
                Cost {
                    requests: 1,
                    spend,
                    bytes_up: body.len() as u64,
                },
            ));
        }
        // The reservation is in the ledger file when this returns (the write-ahead), in
        // one write(2) with those of the requests ready beside it; its fsync is
        // group-committed in the background.
        match self.ledger.reserve_batched(&costs).await {
            Ok(Ok(_written)) => {}
            Ok(Err(exceeded)) => {
                return Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "budget_exceeded",
                    exceeded.to_string(),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "budget ledger unavailable");
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ledger_unavailable",
                    "the budget ledger is unavailable".into(),
                ));
            }
        }
        decision.spend = spend;
        decision.bytes_up = body.len() as u64;
        if spend > 0.0
            && let Err(reason) = self.breaker.record_spend(spend)
        {
            decision.step = "breaker";
            return Err(Refusal::circuit_open(&reason));
        }
        // Another request may have opened the circuit while this one was judged.
        self.grant_in_force(decision)?;

        // No action without a record.
        let (outcome, step) = (decision.outcome, decision.step);
        (decision.outcome, decision.step) = ("allowed", "forwarded");
        let recorded = self.sink.record_before_acting(decision).await;
        (decision.outcome, decision.step) = (outcome, step);
        if let Err(e) = recorded {
            decision.step = "audit";
            tracing::error!(error = %e, "audit unavailable; refusing");
            return Err(Refusal::audit_unavailable());
        }

        // Waiting for the record gave the grant time to end: nothing leaves after it did.
        self.grant_in_force(decision)?;

        // 7. Inject the credential and forward.
        decision.step = "upstream";
        let scopes: Vec<&str> = costs.iter().map(|(s, _)| *s).collect();
        let result = tokio::time::timeout(
            self.limits.request_timeout,
            self.forward(
                cap,
                prepared,
                origin_form,
                &method,
                &parts.headers,
                body,
                &scopes,
            ),
        )
        .await;
        let response = match result {
            Ok(Ok((response, bytes_down))) => {
                decision.bytes_down = bytes_down;
                response
            }
            Ok(Err(refusal)) => {
                self.breaker.record_upstream(false);
                return Err(refusal);
            }
            Err(_) => {
                self.breaker.record_upstream(false);
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream did not answer in time".into(),
                ));
            }
        };
        let status = response.status();
        self.breaker.record_upstream(!status.is_server_error());
        decision.outcome = "allowed";
        decision.step = "forwarded";
        decision.upstream_status = Some(status.as_u16());
        Ok(response)
    }

    fn connect(
        self: &Arc<Self>,
        req: Request<Incoming>,
        in_tunnel: bool,
        permit: Arc<OwnedSemaphorePermit>,
        decision: &mut Decision,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        decision.step = "capability";
        if in_tunnel {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "nested_connect",
                "CONNECT inside a tunnel is refused".into(),
            ));
        }
        let authority = req
            .uri()
            .authority()
            .ok_or_else(|| Refusal::malformed(normalize::Malformed::NoHost))?;
        let host = normalize::host_name(authority.host()).map_err(Refusal::malformed)?;
        let port = authority
            .port_u16()
            .ok_or_else(|| Refusal::malformed(normalize::Malformed::NoHost))?;
        let env = self.envelope.envelope();
        let allowed = env
            .capabilities
            .iter()
            .any(|c| c.upstream.scheme.as_str() == "https" && c.serves(&host, port));
        if !allowed {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "no_capability",
                format!(
                    "CONNECT to {host}:{port} is refused: no https capability of this Envelope reaches it"
                ),
            ));
        }
        let config = self.ca.server_config(&host).map_err(|e| {
            tracing::error!(error = %e, "minting an interception certificate failed");
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "tls_setup",
                "the gateway could not set up TLS for this host".into(),
            )
        })?;
        let gateway = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    return;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            // An agent that never finishes its handshake must not hold a connection slot
            // for ever.
            let accepted = tokio::time::timeout(
                gateway.limits.request_timeout,
                acceptor.accept(TokioIo::new(upgraded)),
            )
            .await;
            match accepted {
                Ok(Ok(tls)) => {
                    // Requests inside the tunnel get the same framing check.
                    let (tls, verdicts) = Inspect::new(tls, gateway.head_limit());
                    gateway
                        .serve_connection(TokioIo::new(tls), Some((host, port)), verdicts, permit)
                        .await
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "agent TLS handshake failed"),
                Err(_) => tracing::debug!("agent TLS handshake timed out; tunnel closed"),
            }
        });
        decision.outcome = "allowed";
        decision.step = "tunnel";
        Ok(Response::new(Full::new(Bytes::new())))
    }

    /// Forwards the checked request; returns the scrubbed response and how many body
    /// bytes it carried.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        cap: &Capability,
        prepared: &Prepared,
        origin_form: String,
        method: &Method,
        agent_headers: &HeaderMap,
        body: Bytes,
        scopes: &[&str],
    ) -> Result<(Response<Full<Bytes>>, u64), Refusal> {
        let upstream_refusal =
            |what: String| Refusal::new(StatusCode::BAD_GATEWAY, "upstream_unreachable", what);
        let host = &cap.upstream.host;
        let port = cap.upstream.port();

        let mut request = Request::builder().method(method.clone()).uri(origin_form);
        let headers = request
            .headers_mut()
            .ok_or_else(|| upstream_refusal("building the request".into()))?;
        copy_request_headers(
            agent_headers,
            headers,
            prepared.credential.as_ref().map(|(name, _)| name),
        );
        headers.insert(header::HOST, prepared.host_header.clone());
        // Only a body in the clear can be scrubbed of an echoed credential: whatever the
        // agent accepts, the upstream is asked for no content-coding.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some((name, value)) = &prepared.credential {
            headers.insert(name.clone(), value.clone());
        }
        if !body.is_empty() || agent_headers.contains_key(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut request = request
            .body(Full::new(body))
            .map_err(|_| upstream_refusal("building the request".into()))?;

        // A pooled connection first; if the upstream closed it before the request went
        // out, hyper hands the request back and it goes on a fresh connection. A request
        // that may have reached the upstream is never sent twice.
        let (response, mut sender) = loop {
            let (mut sender, reused) = match self.pooled(&cap.name) {
                Some(sender) => (sender, true),
                None => (self.dial(cap).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(upstream_refusal(format!(
                    "the connection to {host}:{port} closed"
                )));
            }
            match sender.try_send_request(request).await {
                Ok(response) => break (response, sender),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => {
                        return Err(upstream_refusal(format!(
                            "sending the request: {}",
                            e.into_error()
                        )));
                    }
                },
            }
        };

        let (mut parts, mut incoming) = response.into_parts();
        // Most responses arrive in one frame: kept as it came, copied only when there are
        // more.
        let mut first: Option<Bytes> = None;
        let mut collected: Vec<u8> = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let frame =
                frame.map_err(|e| upstream_refusal(format!("reading the response: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let so_far = first.as_ref().map_or(0, Bytes::len) + collected.len();
            if so_far + data.len() > self.limits.max_response_bytes {
                return Err(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "response_too_large",
                    format!(
                        "the response is larger than the {} bytes the gateway inspects",
                        self.limits.max_response_bytes
                    ),
                ));
            }
            match self
                .ledger
                .charge_download_batched(scopes, data.len() as u64)
                .await
            {
                Ok(Ok(_written)) => {}
                Ok(Err(exceeded)) => {
                    return Err(Refusal::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "budget_exceeded",
                        exceeded.to_string(),
                    ));
                }
                Err(_) => {
                    return Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ledger_unavailable",
                        "the budget ledger is unavailable".into(),
                    ));
                }
            }
            match &first {
                None if collected.is_empty() => first = Some(data),
                _ => {
                    if let Some(earlier) = first.take() {
                        collected.extend_from_slice(&earlier);
                    }
                    collected.extend_from_slice(&data);
                }
            }
        }
        let body = match first {
            Some(only) => only,
            None => Bytes::from(collected),
        };
        // The whole response was read, so the connection can carry the next request
        // (unless the upstream asked to close it).
        let closing = parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if !closing && sender.ready().await.is_ok() {
            self.return_to_pool(&cap.name, sender);
        }
        // An empty body (HEAD, 304) holds nothing to scrub, whatever it says of itself.
        if let Some(coding) = (!body.is_empty())
            .then_some(&parts.headers)
            .into_iter()
            .flat_map(|h| h.get_all(header::CONTENT_ENCODING))
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim)
            .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "encoded_response",
                format!(
                    "the upstream sent a body in content-coding `{}` although it was asked \
                     for none; a credential it echoed could not be scrubbed from it",
                    coding.escape_default()
                ),
            ));
        }
        let bytes_down = body.len() as u64;
        let scrubbed = self.scrub(body);
        // hyper keeps the upstream's reason phrase as an extension and writes it back
        // verbatim, where it could carry a secret; the agent gets the status's own phrase.
        parts.extensions = http::Extensions::new();
        strip_hop_by_hop(&mut parts.headers);
        self.scrub_headers(&mut parts.headers);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(scrubbed.len()));
        Ok((Response::from_parts(parts, Full::new(scrubbed)), bytes_down))
    }

    fn pooled(&self, capability: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut pool = self.pool.lock().ok()?;
        let idle = pool.get_mut(capability)?;
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn return_to_pool(&self, capability: &str, sender: SendRequest<Full<Bytes>>) {
        let Ok(mut pool) = self.pool.lock() else {
            return;
        };
        if let Some(idle) = pool.get_mut(capability) {
            if idle.len() < MAX_IDLE_PER_CAPABILITY {
                idle.push(sender);
            }
        } else {
            pool.insert(capability.to_owned(), vec![sender]);
        }
    }

    /// A new connection to the capability's upstream, over TLS for https.
    async fn dial(&self, cap: &Capability) -> Result<SendRequest<Full<Bytes>>, Refusal> {
        let upstream_refusal =
            |what: String| Refusal::new(StatusCode::BAD_GATEWAY, "upstream_unreachable", what);
        let host = &cap.upstream.host;
        let port = cap.upstream.port();
        // Resolve once, check, and dial exactly an address that was resolved and checked.
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| upstream_refusal(format!("resolving {host}: {e}")))?
            .collect();
        if resolved.is_empty() {
            return Err(upstream_refusal(format!("{host} has no address")));
        }
        let named = host.parse::<IpAddr>().is_ok()
            || host
                .strip_suffix('.')
                .unwrap_or(host)
                .eq_ignore_ascii_case("localhost");
        let (usable, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
            resolved.into_iter().partition(|addr| {
                named || self.allow_internal_upstreams || !internal_address(addr.ip())
            });
        if usable.is_empty() {
            let refused: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_address_refused",
                format!(
                    "{host} resolves only to internal addresses ({}), which the gateway does \
                     not dial for a host name",
                    refused.join(", ")
                ),
            ));
        }
        let mut failed = Vec::new();
        let mut connected = None;
        for addr in usable {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => {
                    connected = Some(tcp);
                    break;
                }
                Err(e) => failed.push(format!("{addr}: {e}")),
            }
        }
        let tcp = connected.ok_or_else(|| {
            upstream_refusal(format!(
                "connecting to {host}:{port}: {}",
                failed.join("; ")
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        match cap.upstream.scheme.as_str() {
            "https" => {
                let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|_| {
                        upstream_refusal(format!("{host} is not a valid TLS server name"))
                    })?;
                let tls = tokio_rustls::TlsConnector::from(self.upstream_tls.clone())
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| upstream_refusal(format!("TLS with {host}:{port}: {e}")))?;
                handshake(TokioIo::new(tls)).await
            }
            _ => handshake(TokioIo::new(tcp)).await,
        }
    }

    /// Replaces every secret value an upstream echoed, as it is or encoded, with a
    /// placeholder; bytes without one are returned as they are.
    fn scrub(&self, bytes: Bytes) -> Bytes {
        let credentials = self.credentials();
        match &credentials.echoes {
            Some(echoes) if echoes.is_match(&bytes[..]) => {
                let mut out = Vec::with_capacity(bytes.len());
                echoes.replace_all_with_bytes(&bytes, &mut out, |_, _, dst| {
                    dst.extend_from_slice(b"[REDACTED]");
                    true
                });
                Bytes::from(out)
            }
            _ => bytes,
        }
    }

    /// Scrubs response header values; only headers that hold a secret are rebuilt.
    fn scrub_headers(&self, headers: &mut HeaderMap) {
        let credentials = self.credentials();
        let Some(echoes) = &credentials.echoes else {
            return;
        };
        let tainted: Vec<HeaderName> = headers
            .iter()
            .filter(|(_, v)| echoes.is_match(v.as_bytes()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in tainted {
            let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
            headers.remove(&name);
            for value in values {
                let clean = self.scrub(Bytes::copy_from_slice(value.as_bytes()));
                if let Ok(v) = HeaderValue::from_bytes(&clean) {
                    headers.append(name.clone(), v);
                }
            }
        }
    }
}

async fn handshake<I>(io: I) -> Result<SendRequest<Full<Bytes>>, Refusal>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| {
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("HTTP handshake: {e}"),
            )
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Records how a held request ended when it ended by being dropped (its agent went
/// away): the hold is on record, and so is its end, though no answer was sent.
struct Abandoned<'a> {
    sink: &'a dyn DecisionSink,
    /// Taken once the hold ends by itself; then the request's own decision follows.
    decision: Option<Decision>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(decision) = self.decision.take()
            && let Err(e) = self.sink.record(&decision)
        {
            tracing::error!(error = %e, "could not record an abandoned hold");
        }
    }
}

/// Whether an address is one of the host's own or its private networks' rather than the
/// public internet's: loopback, unspecified (`0.0.0.0/8`, `::`), private (`10/8`,
/// `172.16/12`, `192.168/16`, `fc00::/7`), shared (`100.64/10`, where some clouds keep
/// their metadata service), link-local (`169.254/16`, `fe80::/10`), site-local
/// (`fec0::/10`), multicast and broadcast; IPv4 written as IPv6 (mapped, compatible or
/// behind the NAT64 prefix `64:ff9b::/96`) is judged as the IPv4 address it carries.
pub fn internal_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 0
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || (a == 100 && (64..128).contains(&b))
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4() {
        // `::` and `::1` read as IPv4-compatible too, and land in 0/8.
        return internal_v4(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., hi, lo] = s;
        return internal_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    }
    ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
}

/// Whether `cap` is the upstream `target` names. An `http://` request may name an https
/// capability by its host with the default ports; the upstream leg then uses TLS.
fn serves(cap: &Capability, target: &Target) -> bool {
    if cap.serves(&target.host, target.port) {
        return true;
    }
    target.scheme == Scheme::Http
        && target.port == 80
        && cap.upstream.scheme.as_str() == "https"
        && cap.upstream.port() == 443
        && cap.serves(&target.host, 443)
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too. One pass over the names
    // present instead of a lookup per hop-by-hop name: most messages have none or one.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) {
                doomed.push(name);
            }
        }
    }
    doomed.extend(headers.keys().filter(|n| HOP_BY_HOP.contains(n)).cloned());
    for name in &doomed {
        headers.remove(name);
    }
}

/// The agent's headers minus hop-by-hop ones, anything that could carry a credential of
/// its own, and the header the capability injects.
fn copy_request_headers(from: &HeaderMap, to: &mut HeaderMap, injected: Option<&HeaderName>) {
    for (name, value) in from {
        if HOP_BY_HOP.contains(name)
            || matches!(
                name.as_str(),
                "authorization" | "proxy-authorization" | "cookie" | "host" | "content-length"
            )
            || Some(name) == injected
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// A refusal: its status and a stable reason code the body and the audit log share.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
    close: bool,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, reason: String) -> Self {
        Refusal {
            status,
            code,
            reason,
            close: false,
        }
    }

    /// Asks hyper to close the connection after this response.
    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn circuit_open(reason: &str) -> Self {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "circuit_open",
            format!("the circuit is open: {reason}"),
        )
    }

    fn audit_unavailable() -> Self {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the decision could not be recorded".into(),
        )
    }

    fn malformed(m: normalize::Malformed) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, "malformed", m.to_string())
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "refused": self.code, "reason": self.reason }).to_string();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().insert(
            HeaderName::from_static("x-enforcer-refused"),
            HeaderValue::from_static(self.code),
        );
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_in_every_spelling_are_told_from_public_ones() {
        for internal in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
        ] {
            let ip: IpAddr = internal.parse().unwrap();
            assert!(internal_address(ip), "{internal} is internal");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "100.128.0.1",
            "169.255.0.1",
            "::ffff:93.184.216.34",
            "64:ff9b::5db8:d822",
            "2606:4700:4700::1111",
            "2001:db8::1",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(!internal_address(ip), "{public} is public");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Trace"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }
}
