//! End-to-end: the real daemon (real BPF programs, cgroups, gateway, audit log), agents
//! started with `enforcer run` as a uid of its own, a real upstream on loopback, and python's
//! urllib as the agent's HTTP client. One test per threat of the seed model and per
//! property, plus a restart with `kill -9`.
mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Probes, enforcer_bin, privileged, wait_for_line};

const SECRET: &str = "sk-live-9d8c7b6a5f4e";

/// An upstream API that records every request head and answers 200 with a body that
/// echoes the head (secret included, so scrubbing is tested too).
struct Upstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let (h, c) = (heads.clone(), count.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (h, c) = (h.clone(), c.clone());
                std::thread::spawn(move || serve(stream, &h, &c));
            }
        });
        Upstream { addr, heads, count }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, heads: &Mutex<Vec<String>>, count: &AtomicUsize) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        count.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut h) = heads.lock() {
            h.push(head.clone());
        }
        let reply = format!("{{\"seen\":{head:?}}}");
        let _ = write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
    }
}

/// A daemon of the test's own: config, keys, secrets, pins, cgroup parent and control
/// socket all unique. Dropping it kills the daemon and removes everything.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pin_dir: PathBuf,
    cgroup_parent: String,
    probe: PathBuf,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);
const GATEWAY_PORTS_BASE: usize = 20_000;
const GATEWAY_PORTS_PER_DAEMON: usize = 16;
const GATEWAY_PORT_SLOTS: usize = 700;

impl Daemon {
    fn start(test: &str) -> Self {
        Self::start_with(test, "")
    }

    /// [`start`](Self::start) with `extra_config` appended to the daemon's config.
    fn start_with(test: &str, extra_config: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let unique = format!("enforcer-dtest-{}-{n}-{test}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("enforcer-daemon-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new(enforcer_bin())
                .args(args)
                .current_dir(d)
                .output()
                .expect("enforcer");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for sub in ["trust", "secrets"] {
            std::fs::create_dir(d.join(sub)).expect("mkdir");
            set_mode(&d.join(sub), 0o700);
        }
        run(&["keygen", "--out", "issuer"]);
        run(&["keygen", "--out", "audit"]);
        std::fs::copy(d.join("issuer.pub"), d.join("trust/issuer.pub")).expect("trust");
        std::fs::write(d.join("secrets/exchange-key"), SECRET).expect("secret");
        set_mode(&d.join("secrets/exchange-key"), 0o600);
        // The agent (an unprivileged uid) must read the probe script, and nothing else here.
        set_mode(d, 0o711);
        let probe = d.join("probe.py");
        std::fs::copy(common::probe_source(), &probe).expect("probe");
        set_mode(&probe, 0o644);
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&unique);
        // Daemons of tests running in parallel must not share gateway ports: one daemon
        // taking the port another's agent was served on, while that daemon is down, is
        // what some tests make an impostor do on purpose. Below the ephemeral range, so
        // no test's port 0 lands in it.
        let first_port = GATEWAY_PORTS_BASE + (n % GATEWAY_PORT_SLOTS) * GATEWAY_PORTS_PER_DAEMON;
        let gateway_ports = format!(
            "gateway_ports = [{first_port}, {}]\n",
            first_port + GATEWAY_PORTS_PER_DAEMON - 1
        );
        std::fs::write(
            d.join("enforcer.toml"),
            format!(
                "state_dir = \"{d}/state\"\naudit_dir = \"{d}/audit\"\naudit_key = \"{d}/audit.key\"\n\
                 trust_dir = \"{d}/trust\"\nsecrets = \"{d}/secrets\"\ncontrol_socket = \"{d}/run/control.sock\"\n\
                 pin_dir = \"{pins}\"\ncgroup_parent = \"{unique}\"\nshutdown_grace_secs = 0\n{gateway_ports}{extra_config}",
                d = d.display(),
                pins = pin_dir.display(),
            ),
        )
        .expect("config");
        let mut daemon = Daemon {
            dir,
            child: None,
            pin_dir,
            cgroup_parent: unique,
            probe,
        };
        daemon.spawn();
        daemon
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn spawn(&mut self) {
        let mut daemon = Command::new(enforcer_bin());
        daemon
            .args(["daemon", "--config"])
            .arg(self.path("enforcer.toml"));
        self.spawn_command(daemon);
    }

    /// Starts `command` (one that runs the daemon) and waits for its control socket.
    fn spawn_command(&mut self, mut command: Command) {
        let log = std::fs::File::create(self.path("daemon.log")).expect("log");
        let child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.path("run/control.sock")).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the daemon did not come up:\n{}",
                self.log()
            );
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the daemon exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `enforcer shutdown`, then waits for the daemon to exit.
    fn shutdown(&mut self) {
        let out = self.ctl(&["shutdown"]);
        assert!(
            out.status.success(),
            "shutdown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut child) = self.child.take() {
            let started = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if started.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the daemon did not stop:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGTERM, then waits for the daemon to exit.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).expect("pid");
            // SAFETY: kill(2) of our own child, which has not been waited for yet.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
            let started = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if started.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the daemon did not stop:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// What the pinned maps hold for each agent cgroup (`enforcer status --json`, which
    /// needs no daemon): name → state.
    fn kernel_states(&self) -> Vec<(String, String)> {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        status["agents"]
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .map(|a| {
                        (
                            a["name"].as_str().unwrap_or_default().to_owned(),
                            a["state"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The kernel entry's state of one agent, "" if it has none.
    fn kernel_state(&self, agent: &str) -> String {
        self.kernel_states()
            .into_iter()
            .find(|(name, _)| name == agent)
            .map(|(_, state)| state)
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    fn enforcer(&self) -> Command {
        let mut cmd = Command::new(enforcer_bin());
        cmd.env("ENFORCER_CONTROL_SOCKET", self.path("run/control.sock"))
            .env("ENFORCER_PIN_DIR", &self.pin_dir)
            .env("ENFORCER_CGROUP_PARENT", &self.cgroup_parent)
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path());
        cmd
    }

    /// Signs an Envelope for `upstream`; `extra` is appended TOML.
    fn envelope(
        &self,
        name: &str,
        upstream: SocketAddr,
        lifetime_secs: i64,
        extra: &str,
    ) -> PathBuf {
        let now = time::OffsetDateTime::now_utc();
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .expect("time")
        };
        let toml = format!(
            r#"version = 1
id = "env-{name}-{nonce}"
subject = "agent:{name}"
task = "end-to-end test"
issuer = "tests"
issued_at = "{now}"
not_before = "{now}"
expires_at = "{end}"

[[capabilities]]
name = "exchange"
upstream = {{ scheme = "http", host = "127.0.0.1", port = {port} }}
credential = {{ secret = "exchange-key", header = "X-Api-Key", format = "{{secret}}" }}
[[capabilities.routes]]
methods = ["GET", "POST"]
path = "/api/**"

[[forbidden_effects]]
path = "/api/withdraw/**"
reason = "withdrawals are irreversible"
{extra}
"#,
            nonce = NEXT.fetch_add(1, Ordering::SeqCst),
            now = fmt(now - time::Duration::seconds(2)),
            end = fmt(now + time::Duration::seconds(lifetime_secs)),
            port = upstream.port(),
        );
        let src = self.path(&format!("{name}.toml"));
        let out = self.path(&format!("{name}.json"));
        std::fs::write(&src, toml).expect("write envelope");
        let signed = Command::new(enforcer_bin())
            .args(["envelope", "sign", "--key"])
            .arg(self.path("issuer.key"))
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .output()
            .expect("sign");
        assert!(
            signed.status.success(),
            "sign: {}",
            String::from_utf8_lossy(&signed.stderr)
        );
        out
    }

    /// `enforcer run --envelope E -- python3 probe.py ARGS`, to completion.
    fn run(&self, envelope: &Path, probe_args: &[String]) -> (Output, Probes) {
        let out = self
            .enforcer()
            .args(["run", "--json", "--envelope"])
            .arg(envelope)
            .arg("--")
            .arg("/usr/bin/python3")
            .arg(&self.probe)
            .args(probe_args)
            .stdin(Stdio::null())
            .output()
            .expect("enforcer run");
        let probes = Probes::parse(&out);
        (out, probes)
    }

    /// `enforcer run` of the probe with piped stdio, returned once the probe says "ready"
    /// (it waits for "go" on stdin to go on), with what it printed so far.
    fn run_until_ready(
        &self,
        envelope: &Path,
        probe_args: &[String],
    ) -> (Child, BufReader<ChildStdout>, String) {
        let mut child = self
            .enforcer()
            .args(["run", "--envelope"])
            .arg(envelope)
            .arg("--")
            .arg("/usr/bin/python3")
            .arg(&self.probe)
            .args(probe_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("enforcer run");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let mut seen = String::new();
        wait_for_line(&mut reader, "ready", &mut seen);
        (child, reader, seen)
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.enforcer().args(args).output().expect("enforcer")
    }

    fn audit_text(&self) -> String {
        let out = Command::new(enforcer_bin())
            .args(["audit", "show"])
            .arg(self.path("audit"))
            .output()
            .expect("audit show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = self.enforcer().args(["unload", "--force"]).output();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn a(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn t1_t3_t5_t6_t4_one_agent_tries_everything() {
    if !privileged("t1_t3_t5_t6_t4_one_agent_tries_everything") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("all");
    let env = d.envelope("all", up.addr, 600, "[breakers]\non_forbidden = false\n");
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let secret_file = d.path("secrets/exchange-key");
    let daemon_pid = d.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let (out, probes) = d.run(
        &env,
        &a(&[
            "http",
            "GET",
            &format!("{base}/api/ticker"),
            "",
            "http",
            "GET",
            &format!("{base}/admin"),
            "",
            "http",
            "POST",
            &format!("{base}/api/withdraw/all"),
            "{}",
            "tcp4",
            "127.0.0.1",
            &up.addr.port().to_string(),
            "read",
            secret_file.to_str().unwrap_or(""),
            "read",
            &format!("/proc/{daemon_pid}/environ"),
            "unix",
            d.path("run/control.sock").to_str().unwrap_or(""),
        ]),
    );
    assert!(
        out.status.success(),
        "run failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    // T1: inside the capability yes, outside no.
    probes.assert_ok("http GET");
    assert_eq!(
        probes.get(&format!("http GET {base}/admin")),
        (false, "403")
    );
    // T3: the forbidden effect is refused although a capability route matches it.
    assert_eq!(probes.get("http POST"), (false, "403"));
    // T6: straight to the upstream, past the gateway: the kernel says no.
    probes.assert_denied("tcp4 127.0.0.1");
    // T5: the secret reached the upstream, never the agent.
    probes.assert_denied(&format!("read {}", secret_file.display()));
    probes.assert_denied("read /proc/");
    let heads = up.heads.lock().map(|h| h.join("\n")).unwrap_or_default();
    assert!(
        heads
            .to_ascii_lowercase()
            .contains(&format!("x-api-key: {SECRET}")),
        "{heads}"
    );
    // T4: the control socket is out of the agent's reach.
    probes.assert_denied("unix ");
    assert_eq!(
        up.count(),
        1,
        "only the one allowed request reached the upstream"
    );
    // Auditability: every decision is in the log, which verifies with the daemon's key.
    let audit = d.audit_text();
    for needle in [
        "envelope_activated",
        "request_allowed",
        "request_denied",
        "forbidden",
        "kernel_deny",
    ] {
        assert!(audit.contains(needle), "audit lacks {needle}:\n{audit}");
    }
    let verify = Command::new(enforcer_bin())
        .args(["audit", "verify", "--key"])
        .arg(d.path("audit.pub"))
        .arg(d.path("audit"))
        .output()
        .expect("audit verify");
    // The daemon is running, so the newest records may wait for their checkpoint: exit 2
    // says the chain holds and names them; 1 would be damage.
    assert!(
        matches!(verify.status.code(), Some(0 | 2)),
        "audit verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn t2_t7_budget_and_breaker_cut_the_agent_off_until_an_operator_resets() {
    if !privileged("t2_t7_budget_and_breaker_cut_the_agent_off_until_an_operator_resets") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("budget");
    let env = d.envelope(
        "budget",
        up.addr,
        600,
        "[budget]\nrequests = 2\n[breakers]\ndenied = { count = 2, window_secs = 60 }\n",
    );
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    // The agent waits for "go" after its requests so the operator can act while it lives.
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&[
            "http", "GET", &url, "", "http", "GET", &url, "", "http", "GET", &url, "", "http",
            "GET", &url, "", "wait", "http", "GET", &url, "",
        ]),
    );
    // T2: two allowed, then 429s; two denials trip the breaker (T7 begins).
    let early = Probes::parse_text(&seen, "");
    let statuses: Vec<&str> = early.results.iter().map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(&statuses[..3], &["200", "200", "429"], "{seen}");
    assert_eq!(up.count(), 2);
    let agents = d.ctl(&["agents"]);
    let agents = String::from_utf8_lossy(&agents.stdout);
    assert!(agents.contains("\"state\": \"tripped\""), "{agents}");
    assert!(agents.contains("\"state\": \"recording\""), "{agents}");
    // The agent itself cannot reset; the operator can.
    let reset = d.ctl(&["reset", "agent-budget"]);
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let (status, probes) = common::go_and_finish(child, reader, seen);
    assert!(status.success(), "{}", probes.stderr);
    // After the reset the gateway is reachable again, and the budget is still spent.
    assert_eq!(
        probes.results.last().map(|r| r.2.as_str()),
        Some("429"),
        "{:?}",
        probes.results
    );
    assert_eq!(up.count(), 2);
    let audit = d.audit_text();
    assert!(
        audit.contains("breaker_tripped") && audit.contains("operator_reset"),
        "{audit}"
    );
}

#[test]
fn t8_tampered_and_replayed_envelopes_are_refused() {
    if !privileged("t8_tampered_and_replayed_envelopes_are_refused") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("t8");
    let env = d.envelope("t8", up.addr, 600, "");
    let text = std::fs::read_to_string(&env).expect("read");
    // Flip one character of the base64 payload.
    let i = text.find("\"payload\"").expect("payload") + 15;
    let mut bytes = text.into_bytes();
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let tampered = d.path("tampered.json");
    std::fs::write(&tampered, &bytes).expect("write");
    let (out, _) = d.run(&tampered, &a(&[]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad_signature") || stderr.contains("malformed"),
        "{stderr}"
    );
    let (out, _) = d.run(&env, &a(&[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, _) = d.run(&env, &a(&[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed"));
    assert!(d.audit_text().contains("envelope_refused"));
}

#[test]
fn ephemerality_and_revocability() {
    if !privileged("ephemerality_and_revocability") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("ttl");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    // The Envelope expires between the two requests; both the lifetime and the wait
    // stretch on slow machines, so the first request still comes in time.
    let lifetime = common::scaled_secs(4);
    let wait = common::scaled_secs(5).to_string();
    let env = d.envelope("ttl", up.addr, lifetime as i64, "");
    let (out, probes) = d.run(
        &env,
        &a(&[
            "http", "GET", &url, "", "sleep", &wait, "http", "GET", &url, "",
        ]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "expired: {:?}", probes.results);
    assert!(d.audit_text().contains("expired"));

    let env = d.envelope("revoke", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let revoked = d.ctl(&["revoke", "agent-revoke"]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "revoked: {:?}", probes.results);
    let reset = d.ctl(&["reset", "agent-revoke"]);
    assert!(
        !reset.status.success(),
        "a revoked Envelope cannot be reset"
    );
}

#[test]
fn reload_withdraws_grants_of_a_revoked_issuer_key_and_refuses_fixed_fields() {
    if !privileged("reload_withdraws_grants_of_a_revoked_issuer_key_and_refuses_fixed_fields") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("reload");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("reload", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let config = d.path("enforcer.toml");
    let original = std::fs::read_to_string(&config).expect("config");

    // What needs a restart refuses the reload whole.
    std::fs::write(
        &config,
        original
            .lines()
            .map(|l| {
                if l.starts_with("gateway_ports") {
                    "gateway_ports = [19000, 19999]\n".to_owned()
                } else {
                    format!("{l}\n")
                }
            })
            .collect::<String>(),
    )
    .expect("config");
    let refused = d.ctl(&["reload"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a fixed field was reloaded");
    assert!(
        stderr.contains("gateway_ports") && stderr.contains("restart"),
        "stderr: {stderr}"
    );

    // Revoking the issuer's key withdraws every grant it signed, at once.
    let issuer = enforcer::envelope::load_verifying_key(&d.path("issuer.pub")).expect("issuer key");
    let revocations = d.path("revocations");
    std::fs::write(
        &revocations,
        format!("key {}\n", enforcer::envelope::key_id(&issuer)),
    )
    .expect("revocations");
    std::fs::write(
        &config,
        format!("{original}revocations = \"{}\"\n", revocations.display()),
    )
    .expect("config");
    // A dry run names who would be cut off, and cuts no one off.
    let dry = d.ctl(&["reload", "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("json");
    assert_eq!(plan["would_withdraw"][0]["agent"], "agent-reload", "{plan}");
    let agents = d.ctl(&["agents", "agent-reload"]);
    let status: serde_json::Value = serde_json::from_slice(&agents.stdout).expect("json");
    assert_eq!(status["state"], "active", "{status}");

    let reloaded = d.ctl(&["reload"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&reloaded.stdout).expect("json");
    assert_eq!(answer["withdrawn"][0]["agent"], "agent-reload", "{answer}");
    assert_eq!(answer["withdrawn"][0]["kind"], "revoked_key", "{answer}");

    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(
        oks,
        vec![true, false],
        "after the reload: {:?}",
        probes.results
    );
    let reset = d.ctl(&["reset", "agent-reload"]);
    assert!(!reset.status.success(), "a withdrawn Envelope was reset");
    // New Envelopes by the revoked key are refused too.
    let again = d.envelope("reload-again", up.addr, 600, "");
    let (out, _) = d.run(&again, &a(&[]));
    assert!(!out.status.success(), "an Envelope by a revoked key ran");
    assert!(
        d.audit_text().contains("config reload"),
        "{}",
        d.audit_text()
    );
}

#[test]
fn reload_rotates_the_credential_of_a_running_agent() {
    if !privileged("reload_rotates_the_credential_of_a_running_agent") {
        return;
    }
    const ROTATED: &str = "sk-live-rotated-0a1b2c3d";
    let up = Upstream::start();
    let d = Daemon::start("rotate");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("rotate", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let secret = d.path("secrets/exchange-key");

    // A store without the running agent's secret refuses the reload whole.
    std::fs::remove_file(&secret).expect("remove secret");
    let refused = d.ctl(&["reload"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "an agent lost its credential");
    assert!(
        stderr.contains("agent-rotate") && stderr.contains("exchange-key"),
        "stderr: {stderr}"
    );

    std::fs::write(&secret, ROTATED).expect("rotate secret");
    set_mode(&secret, 0o600);
    let reloaded = d.ctl(&["reload"]);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, true], "{:?}", probes.results);
    let heads = up.heads.lock().expect("heads").clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].contains(SECRET) && !heads[0].contains(ROTATED),
        "{}",
        heads[0]
    );
    assert!(
        heads[1].contains(ROTATED) && !heads[1].contains(SECRET),
        "{}",
        heads[1]
    );
}

#[test]
fn only_the_agent_can_use_its_gateway() {
    if !privileged("only_the_agent_can_use_its_gateway") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("outsider");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("outsider", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let agents = d.ctl(&["agents", "agent-outsider"]);
    let status: serde_json::Value = serde_json::from_slice(&agents.stdout).expect("json");
    let gateway: SocketAddr = status["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("gateway address in {status}"));

    // This test process is outside every agent cgroup: it reaches the port, but the
    // gateway closes the connection without serving it.
    let mut outsider = TcpStream::connect(gateway).expect("the port is reachable");
    outsider
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = write!(
        outsider,
        "GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
        up.addr.port()
    );
    let mut answer = String::new();
    let _ = outsider.read_to_string(&mut answer);
    assert!(answer.is_empty(), "an outsider was served: {answer}");

    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, true], "{:?}", probes.results);
    assert_eq!(
        up.count(),
        2,
        "only the agent's requests reached the upstream"
    );
}

#[test]
fn kill_9_of_the_daemon_keeps_agents_confined_and_budgets_spent() {
    if !privileged("kill_9_of_the_daemon_keeps_agents_confined_and_budgets_spent") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("kill9");
    let env = d.envelope("kill9", up.addr, 600, "[budget]\nrequests = 3\n");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let port = up.addr.port().to_string();
    let (mut child, mut reader, mut seen) = d.run_until_ready(
        &env,
        &a(&[
            "http",
            "GET",
            &url,
            "",
            "http",
            "GET",
            &url,
            "",
            "wait",
            "tcp4",
            "127.0.0.1",
            &port,
            "http",
            "GET",
            &url,
            "",
            "wait",
            "http",
            "GET",
            &url,
            "",
            "http",
            "GET",
            &url,
            "",
        ]),
    );
    let mut stdin = child.stdin.take().expect("stdin");
    d.kill9();
    // Daemon dead: still no way around the gateway, and the gateway is gone.
    stdin.write_all(b"go\n").expect("go");
    wait_for_line(&mut reader, "ready", &mut seen);
    d.spawn();
    stdin.write_all(b"go\n").expect("go");
    drop(stdin);
    let (_, probes) = common::finish(child, reader, seen);
    let results: Vec<(bool, &str)> = probes.results.iter().map(|r| (r.1, r.2.as_str())).collect();
    assert_eq!(
        results[..2],
        [(true, "200"), (true, "200")],
        "{:?}",
        probes.results
    );
    assert!(
        !results[2].0,
        "direct connect while the daemon was dead: {:?}",
        probes.results
    );
    assert!(
        !results[3].0,
        "gateway while the daemon was dead: {:?}",
        probes.results
    );
    // Resumed: one request of the budget of three was left, then 429.
    assert_eq!(
        results[4..],
        [(true, "200"), (false, "429")],
        "{:?}\n{}",
        probes.results,
        d.log()
    );
    assert_eq!(up.count(), 3);
}

/// One request on the control socket, as the operator's tools send it.
/// Activates the Envelope in `envelope` the way `enforcer run` asks for it; the daemon's answer.
fn activate_over_control(d: &Daemon, envelope: &Path) -> serde_json::Value {
    let envelope = std::fs::read_to_string(envelope).expect("envelope");
    control(
        d,
        &serde_json::json!({ "version": 1, "op": "activate", "envelope": envelope }),
    )
}

fn control(d: &Daemon, request: &serde_json::Value) -> serde_json::Value {
    let mut stream =
        std::os::unix::net::UnixStream::connect(d.path("run/control.sock")).expect("control");
    let mut line = serde_json::to_vec(request).expect("request");
    line.push(b'\n');
    stream.write_all(&line).expect("send");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// The agent's gateway address, from `enforcer agents NAME`.
fn gateway_of(d: &Daemon, agent: &str) -> SocketAddr {
    let out = d.ctl(&["agents", agent]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "agents {agent}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    status["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("gateway address in {status}"))
}

#[test]
fn a_gateway_address_taken_while_the_daemon_is_down_leaves_the_agent_cut_off() {
    if !privileged("a_gateway_address_taken_while_the_daemon_is_down_leaves_the_agent_cut_off") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("taken");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("taken", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let gateway = gateway_of(&d, "agent-taken");
    d.shutdown();
    // Another local process takes the address while no gateway holds it, and answers
    // like a gateway would.
    let impostor = common::Server::start(&gateway.to_string());
    d.spawn();

    // The agent's proxy is that address: it must not reach it.
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "{:?}\n{}", probes.results, d.log());
    assert_eq!(impostor.accepted(), 0, "the agent reached the impostor");
    assert_eq!(up.count(), 1);
    let log = d.log();
    assert!(log.contains("cut off in the kernel"), "{log}");
}

#[test]
fn an_agent_without_a_gateway_is_listed_as_failed() {
    if !privileged("an_agent_without_a_gateway_is_listed_as_failed") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("failed");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("failed", up.addr, 600, "");
    let port = up.addr.port().to_string();
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["wait", "tcp4", "127.0.0.1", &port, "http", "GET", &url, ""]),
    );
    let gateway = gateway_of(&d, "agent-failed");
    d.kill9();
    let _impostor = TcpListener::bind(gateway).expect("take the gateway address");
    d.spawn();
    let out = d.ctl(&["agents", "agent-failed"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["state"], "failed", "{status}");
    let failure = status["failure"].as_str().unwrap_or_default();
    assert!(failure.contains(&gateway.to_string()), "{status}");
    let all = d.ctl(&["agents"]);
    assert!(
        String::from_utf8_lossy(&all.stdout).contains("agent-failed"),
        "{}",
        String::from_utf8_lossy(&all.stdout)
    );
    // Not resettable into an open kernel entry with nobody of ours behind the address.
    let reset = d.ctl(&["reset", "agent-failed"]);
    assert!(!reset.status.success(), "a failed agent was reset");
    // A new Envelope takes the agent over, with a gateway of its own elsewhere; the old
    // address stays out of reach.
    let renewed = d.envelope("failed", up.addr, 600, "");
    let answer = activate_over_control(&d, &renewed);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["state"], "active", "{answer}");
    assert_ne!(gateway_of(&d, "agent-failed"), gateway);
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![false, false], "{:?}", probes.results);
    // The agent's end (its `enforcer run` deactivates it) removes it.
    let after = d.ctl(&["agents", "agent-failed"]);
    assert!(!after.status.success(), "still listed after its end");
    assert!(d.audit_text().contains("gateway_unavailable"));
}

#[test]
fn a_new_envelope_serves_the_same_socket_and_a_failed_replacement_keeps_the_old_gateway() {
    if !privileged(
        "a_new_envelope_serves_the_same_socket_and_a_failed_replacement_keeps_the_old_gateway",
    ) {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("replace");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let first = d.envelope("replace", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &first,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let gateway = gateway_of(&d, "agent-replace");
    // A replacement that fails half-way (its interception CA cannot be written) must
    // leave the running gateway serving.
    let blocker = d.path("state/public/agent-replace-ca.tmp");
    std::fs::create_dir(&blocker).expect("block the CA file");
    let second = d.envelope("replace", up.addr, 600, "");
    let answer = activate_over_control(&d, &second);
    std::fs::remove_dir(&blocker).expect("unblock");
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(gateway_of(&d, "agent-replace"), gateway);
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, true], "{:?}\n{}", probes.results, d.log());
}

#[test]
fn a_revocation_that_cannot_be_saved_still_cuts_the_agent_off() {
    if !privileged("a_revocation_that_cannot_be_saved_still_cuts_the_agent_off") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("unsaved");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("unsaved", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    // The revocation list cannot be appended to.
    let list = d.path("state/revoked-envelopes");
    let _ = std::fs::remove_file(&list);
    std::fs::create_dir(&list).expect("block the revocation list");
    let revoked = d.ctl(&["revoke", "agent-unsaved"]);
    let stderr = String::from_utf8_lossy(&revoked.stderr);
    let status = d.ctl(&["agents", "agent-unsaved"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "{:?}\n{}", probes.results, d.log());
    assert_eq!(up.count(), 1, "a revoked agent reached the upstream");
    assert!(
        !revoked.status.success(),
        "an unsaved revocation was reported as done"
    );
    assert!(stderr.contains("cut off"), "{stderr}");
    assert_eq!(status["state"], "revoked", "{status}");
    assert_eq!(status["kernel_entry"], "tripped", "{status}");
}

#[test]
fn a_restart_resumes_the_last_envelope_of_a_replaced_agent() {
    if !privileged("a_restart_resumes_the_last_envelope_of_a_replaced_agent") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("replaced");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let first = d.envelope("replaced", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &first,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    let mut last = String::new();
    for _ in 0..2 {
        let next = d.envelope("replaced", up.addr, 600, "");
        let answer = activate_over_control(&d, &next);
        assert_eq!(answer["ok"], true, "{answer}");
        last = answer["result"]["envelope"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    // Records are saved off the activation path.
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    d.spawn();
    let out = d.ctl(&["agents", "agent-replaced"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["envelope"], last.as_str(), "{status}\n{}", d.log());
    assert_eq!(status["state"], "active", "{status}");
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, true], "{:?}\n{}", probes.results, d.log());
}

/// An agent that loops on a denied `sendto` for SECS seconds, prints how many were denied,
/// then waits for a line on stdin.
const UDP_FLOOD: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("flooding", flush=True)
end = time.time() + float(sys.argv[1])
denied = 0
while time.time() < end:
    try:
        s.sendto(b"x", ("127.0.0.1", 9))
    except OSError:
        denied += 1
print(denied, flush=True)
sys.stdin.readline()
"#;

#[test]
fn denials_of_a_confine_next_to_the_daemon_reach_its_audit_log() {
    if !privileged("denials_of_a_confine_next_to_the_daemon_reach_its_audit_log") {
        return;
    }
    let d = Daemon::start("confinenext");
    // The daemon reads the deny events of the installation; a `confine` on the same pins
    // must not take them from it.
    std::thread::sleep(Duration::from_millis(300));
    let gateway = TcpListener::bind("127.0.0.1:0").expect("gateway stand-in");
    let out = d
        .enforcer()
        .args(["confine", "--name", "next-to-daemon", "--gateway"])
        .arg(gateway.local_addr().expect("addr").to_string())
        .arg("--")
        .arg("/usr/bin/python3")
        .arg(&d.probe)
        .args(["tcp4", "127.0.0.2", "9", "udp4", "127.0.0.2", "9"])
        .stdin(Stdio::null())
        .output()
        .expect("confine");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another enforcer process")
            && stderr.contains("kernel denials: connect4=1 sendmsg4=1"),
        "{stderr}"
    );
    let started = Instant::now();
    loop {
        let shown = Command::new(enforcer_bin())
            .args(["audit", "show", "--json", "--kind", "kernel_deny"])
            .arg(d.path("audit"))
            .output()
            .expect("audit show");
        let text = String::from_utf8_lossy(&shown.stdout);
        if text.contains("connect4") && text.contains("sendmsg4") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(common::scaled_secs(10)),
            "the daemon's audit log lacks the denials:\n{text}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_kernel_deny_flood_is_summed_up_and_other_agents_stay_served() {
    if !privileged("a_kernel_deny_flood_is_summed_up_and_other_agents_stay_served") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("flood");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let flood_env = d.envelope("flood", up.addr, 600, "");
    let busy_env = d.envelope("busy", up.addr, 600, "");
    let secs = 4u64;
    let mut flood = d
        .enforcer()
        .args(["run", "--envelope"])
        .arg(&flood_env)
        .args(["--", "/usr/bin/python3", "-c", UDP_FLOOD, &secs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("enforcer run");
    let mut flood_out = BufReader::new(flood.stdout.take().expect("stdout"));
    let mut seen = String::new();
    wait_for_line(&mut flood_out, "flooding", &mut seen);

    // Meanwhile another agent works.
    let requests = 40;
    let mut probe_args = Vec::new();
    for _ in 0..requests {
        probe_args.extend(a(&["http", "GET", &url, ""]));
    }
    let (out, probes) = d.run(&busy_env, &probe_args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused: Vec<_> = probes.results.iter().filter(|r| !r.1).collect();
    assert!(
        refused.is_empty() && probes.results.len() == requests,
        "refused while another agent flooded: {refused:?}"
    );

    let mut line = String::new();
    flood_out.read_line(&mut line).expect("flood count");
    let denied_by_python: u64 = line.trim().parse().expect("a count");
    assert!(
        denied_by_python > 1000,
        "the flood was too small to mean much"
    );
    // The agent still lives: its kernel counters and the lost-event counter, then the last
    // summaries, a window later.
    let status = d.ctl(&["agents", "agent-flood"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let kernel_denied: u64 = status["kernel"]["denied"]
        .as_object()
        .map(|hooks| hooks.values().filter_map(|n| n.as_u64()).sum())
        .unwrap_or_default();
    let kstatus = d.ctl(&["status", "--json"]);
    let kstatus: serde_json::Value = serde_json::from_slice(&kstatus.stdout).expect("json");
    let lost = kstatus["lost_events"].as_u64().expect("lost_events");
    std::thread::sleep(Duration::from_millis(2500));
    let shown = Command::new(enforcer_bin())
        .args([
            "audit",
            "show",
            "--json",
            "--kind",
            "kernel_deny",
            "--agent",
            "agent-flood",
        ])
        .arg(d.path("audit"))
        .output()
        .expect("audit show");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = flood.stdin.take().map(|mut s| s.write_all(b"\n"));
    let _ = flood.wait();
    let counted: u64 = records
        .iter()
        .map(|r| r["details"]["count"].as_u64().unwrap_or(1))
        .sum();
    // One record at the start of the burst and one a second after: not one per denial.
    assert!(
        !records.is_empty() && records.len() as u64 <= 2 * (secs + 2),
        "{} kernel_deny records for {denied_by_python} denials",
        records.len()
    );
    assert_eq!(kernel_denied, denied_by_python, "{status}");
    // The records count the denials the kernel reported (it may report a sample, and its
    // ring buffer may lose some), and carry its exact counter.
    assert!(
        counted > 0 && counted + lost <= kernel_denied,
        "records count {counted}, the ring buffer lost {lost}, the kernel denied {kernel_denied}"
    );
    let totals: Vec<u64> = records
        .iter()
        .filter_map(|r| r["details"]["denied_total"].as_u64())
        .collect();
    assert_eq!(totals.len(), records.len(), "{records:?}");
    assert!(
        totals.windows(2).all(|w| w[0] <= w[1]) && totals.last() <= Some(&kernel_denied),
        "{totals:?} against {kernel_denied}"
    );
}

/// The daemon's metrics page; refused counts as no answer.
fn scrape_metrics(metrics: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(metrics) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// The first metrics page: the listener may come up after the control socket.
fn first_scrape(d: &Daemon, metrics: SocketAddr) -> String {
    let wait_for = Instant::now();
    loop {
        let page = scrape_metrics(metrics);
        if page.contains("enforcer_agents") {
            return page;
        }
        assert!(
            wait_for.elapsed() < Duration::from_secs(common::scaled_secs(10)),
            "metrics never answered:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_metrics_addr() -> SocketAddr {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    ([127, 0, 0, 1], port).into()
}

#[test]
fn metrics_connections_are_capped_and_idle_ones_closed() {
    if !privileged("metrics_connections_are_capped_and_idle_ones_closed") {
        return;
    }
    let metrics = free_metrics_addr();
    let d = Daemon::start_with("metrics", &format!("metrics_listen = \"{metrics}\"\n"));
    let scrape = || scrape_metrics(metrics);
    let first = first_scrape(&d, metrics);
    assert!(first.contains("\nenforcer_audit_up 1\n"), "{first}");

    // Connections that never finish their request head, more than the daemon serves.
    let cap = 32;
    let mut idle: Vec<TcpStream> = (0..cap + 8)
        .map(|_| {
            let mut s = TcpStream::connect(metrics).expect("connect");
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300 * common::time_scale()));
    // Past the cap, a connection is closed unserved.
    let answer = scrape();
    assert!(
        answer.is_empty(),
        "served past the connection cap: {answer}"
    );
    // The idle ones are closed after the header timeout (5 s), which frees the slots.
    let started = Instant::now();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5 + common::scaled_secs(5))))
            .expect("timeout");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(
            n == 0 || head.starts_with("HTTP/1.1 408"),
            "an idle connection got {head:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5 + common::scaled_secs(4)),
        "idle connections were kept {:?}",
        started.elapsed()
    );
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert!(scrape().contains("enforcer_agents"), "{}", d.log());
}

#[test]
fn the_control_socket_directory_must_be_roots_and_is_never_chmodded() {
    if !privileged("the_control_socket_directory_must_be_roots_and_is_never_chmodded") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut d = Daemon::start("ctldir");
    // The default: a directory the daemon made, root's and 0700.
    let run = d.path("run");
    let meta = std::fs::metadata(&run).expect("run dir");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));
    d.shutdown();

    // Starts the daemon and expects it to refuse, naming the directory.
    let refused = |why: &str| {
        let mut child = Command::new(enforcer_bin())
            .args(["daemon", "--config"])
            .arg(d.path("enforcer.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let started = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = Command::new(enforcer_bin())
                    .env("ENFORCER_CONTROL_SOCKET", d.path("run/control.sock"))
                    .arg("shutdown")
                    .output();
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon started with a control directory {why}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        let _ = child
            .stderr
            .take()
            .map(|mut e| e.read_to_string(&mut stderr));
        assert!(!status.success(), "{why}: {stderr}");
        assert!(
            stderr.contains(&run.display().to_string()),
            "{why}: {stderr}"
        );
    };

    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    refused("others may write to");
    let mode = std::fs::metadata(&run).expect("run dir").mode() & 0o777;
    assert_eq!(
        mode, 0o777,
        "the daemon changed an existing directory's mode"
    );

    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    refused("of another user");
    nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");

    // Root's and closed to others again: it starts.
    d.spawn();
}

#[test]
fn a_stopped_daemon_leaves_agents_cut_off_until_it_serves_them_again() {
    if !privileged("a_stopped_daemon_leaves_agents_cut_off_until_it_serves_them_again") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("suspend");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("suspend", up.addr, 600, "");
    let (mut child, mut reader, mut seen) = d.run_until_ready(
        &env,
        &a(&[
            "http", "GET", &url, "", "wait", "http", "GET", &url, "", "wait", "http", "GET", &url,
            "",
        ]),
    );
    let gateway = gateway_of(&d, "agent-suspend");
    let mut stdin = child.stdin.take().expect("stdin");
    d.shutdown();
    // While the daemon is down another process holds the gateway's address.
    let impostor = common::Server::start(&gateway.to_string());
    stdin.write_all(b"go\n").expect("go");
    wait_for_line(&mut reader, "ready", &mut seen);
    assert_eq!(impostor.accepted(), 0, "the agent reached the impostor");
    drop(impostor);
    std::thread::sleep(Duration::from_millis(100));
    // Back, with the address free: the agent goes on where it was.
    d.spawn();
    stdin.write_all(b"go\n").expect("go");
    drop(stdin);
    let (_, probes) = common::finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(
        oks,
        vec![true, false, true],
        "{:?}\n{}",
        probes.results,
        d.log()
    );
    assert_eq!(up.count(), 2);
}

/// One request on the control socket, or None once the daemon is gone.
fn try_control(socket: &Path, request: &serde_json::Value) -> Option<serde_json::Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let mut line = serde_json::to_vec(request).ok()?;
    line.push(b'\n');
    stream.write_all(&line).ok()?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

#[test]
fn a_stop_racing_activations_leaves_every_agent_cut_off() {
    if !privileged("a_stop_racing_activations_leaves_every_agent_cut_off") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("stoprace");
    let socket = d.path("run/control.sock");
    for round in 0..4 {
        // Activations come back to back on three connections at once, so the stop finds
        // some of them half done.
        let batches: Vec<Vec<String>> = (0..3)
            .map(|t| {
                (0..5)
                    .map(|i| {
                        let env = d.envelope(&format!("race{round}{t}{i}"), up.addr, 600, "");
                        std::fs::read_to_string(env).expect("envelope")
                    })
                    .collect()
            })
            .collect();
        let activated = Arc::new(AtomicUsize::new(0));
        let senders: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                let (socket, activated) = (socket.clone(), activated.clone());
                std::thread::spawn(move || {
                    let mut answers = Vec::new();
                    for envelope in batch {
                        let request = serde_json::json!({
                            "version": 1, "op": "activate", "envelope": envelope,
                        });
                        let Some(answer) = try_control(&socket, &request) else {
                            break;
                        };
                        if answer["ok"] == true {
                            activated.fetch_add(1, Ordering::SeqCst);
                        }
                        answers.push(answer);
                    }
                    answers
                })
            })
            .collect();
        let started = Instant::now();
        while activated.load(Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nothing was activated:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        d.terminate();
        let answers: Vec<serde_json::Value> = senders
            .into_iter()
            .flat_map(|s| s.join().expect("sender"))
            .collect();
        for answer in &answers {
            assert!(
                answer["ok"] == true || answer["kind"] == "stopping",
                "{answer}"
            );
        }
        // The daemon is gone: no agent may be let through to an address nobody serves.
        let states = d.kernel_states();
        assert!(!states.is_empty());
        let open: Vec<&(String, String)> = states.iter().filter(|(_, s)| s == "active").collect();
        assert!(
            open.is_empty(),
            "round {round}: open after the stop: {open:?}\n{}",
            d.log()
        );
        d.spawn();
    }
}

#[test]
fn an_agent_whose_record_is_unusable_after_a_restart_stays_cut_off() {
    if !privileged("an_agent_whose_record_is_unusable_after_a_restart_stays_cut_off") {
        return;
    }
    unusable_record_after_a_restart(|record| std::fs::write(record, "").expect("truncate"));
}

#[test]
fn an_agent_whose_record_was_never_saved_stays_cut_off_after_a_restart() {
    if !privileged("an_agent_whose_record_was_never_saved_stays_cut_off_after_a_restart") {
        return;
    }
    unusable_record_after_a_restart(|record| std::fs::remove_file(record).expect("remove"));
}

#[test]
fn a_cgroup_reusing_an_ended_agents_name_is_not_taken_for_that_agent_at_restart() {
    if !privileged("a_cgroup_reusing_an_ended_agents_name_is_not_taken_for_that_agent_at_restart") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("reusedname");
    let env = d.envelope("reusedname", up.addr, 600, "");
    let (out, _) = d.run(&env, &a(&[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ended agent's directory stays (its ledger and CA are kept), without a record.
    assert!(d.path("state/agents/agent-reusedname").is_dir());
    assert!(!d.path("state/agents/agent-reusedname/agent.json").exists());
    d.kill9();
    // `enforcer confine` of the same name, with a gateway the daemon never serves.
    let elsewhere = common::Server::start("127.0.0.1:0");
    let cgroup = enforcer::sandbox::CgroupParent::open(&d.cgroup_parent)
        .and_then(|p| p.create_agent("agent-reusedname"))
        .expect("cgroup");
    enforcer::kernel::Enforcement::open(&d.pin_dir)
        .expect("pins")
        .set_agent(
            cgroup.id,
            &enforcer_common::AgentPolicy::for_gateway(
                elsewhere.addr,
                enforcer_common::NO_DEADLINE,
            ),
        )
        .expect("entry");
    d.spawn();
    assert_eq!(d.kernel_state("agent-reusedname"), "active", "{}", d.log());
    let out = d.ctl(&["agents", "agent-reusedname"]);
    assert!(
        !out.status.success(),
        "listed as the daemon's: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// What systemd does with the daemon's descriptor store, done by the test: it keeps the
/// sockets the daemon stores (`FDSTORE=1`), drops those it takes out (`FDSTOREREMOVE=1`),
/// and passes the kept ones to the next daemon process (`LISTEN_FDS`).
struct ServiceManager {
    notify: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    kept: Vec<(String, std::os::fd::OwnedFd)>,
    ready: bool,
}

impl ServiceManager {
    fn new(path: PathBuf) -> Self {
        let notify = std::os::unix::net::UnixDatagram::bind(&path).expect("notify socket");
        notify.set_nonblocking(true).expect("nonblocking");
        ServiceManager {
            notify,
            path,
            kept: Vec::new(),
            ready: false,
        }
    }

    /// Takes in every notification sent so far.
    fn receive(&mut self) {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::os::fd::{AsRawFd, FromRawFd};
        loop {
            let mut buf = [0u8; 512];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
            let Ok(msg) = recvmsg::<()>(
                self.notify.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in this process.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let len = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::to_owned)
            };
            let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
            if text.lines().any(|l| l == "READY=1") {
                self.ready = true;
            }
            if text.lines().any(|l| l == "FDSTORE=1") {
                self.kept
                    .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
            }
            if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.kept.retain(|(n, _)| *n != name);
            }
        }
    }

    /// The daemon, started the way systemd starts it: told where to notify, and given
    /// the kept sockets from descriptor 3 on.
    fn daemon_command(&self, d: &Daemon) -> Command {
        use std::os::fd::AsRawFd;
        let names: Vec<&str> = self.kept.iter().map(|(n, _)| n.as_str()).collect();
        let sources: Vec<i32> = self.kept.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        // `LISTEN_PID` must be the daemon's pid: the shell's, which exec keeps.
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
            .arg(enforcer_bin())
            .args(["daemon", "--config"])
            .arg(d.path("enforcer.toml"))
            .env("NOTIFY_SOCKET", &self.path)
            .env("LISTEN_FDS", sources.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        // SAFETY: only fcntl(2) and dup2(2) between fork and exec. The sockets are first
        // copied far up, so that moving one to 3, 4, … never overwrites another.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                let mut high = [0i32; 8];
                for (i, fd) in sources.iter().enumerate().take(high.len()) {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 512);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, copy) in high.iter().enumerate().take(sources.len()) {
                    if libc::dup2(*copy, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
    }
}

#[test]
fn under_a_service_manager_a_crashed_daemons_gateway_stays_bound_and_is_served_again() {
    if !privileged(
        "under_a_service_manager_a_crashed_daemons_gateway_stays_bound_and_is_served_again",
    ) {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("fdstore");
    d.shutdown();
    let mut manager = ServiceManager::new(d.path("notify.sock"));
    let command = manager.daemon_command(&d);
    d.spawn_command(command);
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("fdstore", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(&env, &a(&["wait", "http", "GET", &url, ""]));
    let gateway = gateway_of(&d, "agent-fdstore");
    manager.receive();
    assert!(
        manager.ready,
        "the daemon never said it was ready:\n{}",
        d.log()
    );
    assert_eq!(
        manager
            .kept
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["agent-fdstore"],
        "{}",
        d.log()
    );

    d.kill9();
    // The manager holds the socket: nobody can take the agent's gateway address.
    let taken = std::net::TcpListener::bind(gateway);
    assert!(
        taken
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse),
        "the gateway address was free while the daemon was down: {taken:?}"
    );
    // And it still listens: a connection waits in its backlog for the next daemon.
    assert!(
        std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(2)).is_ok(),
        "the kept gateway socket does not listen"
    );
    let command = manager.daemon_command(&d);
    d.spawn_command(command);
    assert!(
        d.log()
            .contains("serving the gateway socket the service manager kept"),
        "{}",
        d.log()
    );
    assert_eq!(gateway_of(&d, "agent-fdstore"), gateway);
    let (_, probes) = common::go_and_finish(child, reader, seen);
    probes.assert_ok("http GET");
    // Once the agent ended, the daemon took its socket out of the store.
    manager.receive();
    assert!(manager.kept.is_empty(), "{:?}", manager.kept);
}

/// An agent whose record `damage` spoiled while the daemon was killed: after the restart it
/// is listed failed, cut off in the kernel, and its address goes to nobody else.
fn unusable_record_after_a_restart(damage: fn(&Path)) {
    let up = Upstream::start();
    let mut d = Daemon::start("badrecord");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("badrecord", up.addr, 600, "");
    let (mut child, mut reader, mut seen) = d.run_until_ready(
        &env,
        &a(&[
            "http", "GET", &url, "", "wait", "http", "GET", &url, "", "wait",
        ]),
    );
    let mut stdin = child.stdin.take().expect("stdin");
    let gateway = gateway_of(&d, "agent-badrecord");
    // Records are saved off the activation path.
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    damage(&d.path("state/agents/agent-badrecord/agent.json"));
    // Whoever binds the address while no gateway does must get nothing from the agent.
    let impostor = common::Server::start(&gateway.to_string());
    d.spawn();
    let out = d.ctl(&["agents", "agent-badrecord"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stderr), d.log()));
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("agent.json"),
        "{status}"
    );
    assert_eq!(status["gateway"], gateway.to_string(), "{status}");
    let states = d.kernel_states();
    assert!(
        states
            .iter()
            .any(|(name, state)| name == "agent-badrecord" && state != "active"),
        "{states:?}"
    );
    stdin.write_all(b"go\n").expect("go");
    wait_for_line(&mut reader, "ready", &mut seen);
    assert_eq!(impostor.accepted(), 0, "the agent reached the impostor");
    // While it is listed, its address goes to no other agent, even once it is free.
    drop(impostor);
    std::thread::sleep(Duration::from_millis(100));
    let other = d.envelope("badrecord-other", up.addr, 600, "");
    let answer = activate_over_control(&d, &other);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_ne!(gateway_of(&d, "agent-badrecord-other"), gateway);
    stdin.write_all(b"go\n").expect("go");
    drop(stdin);
    let (_, probes) = common::finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "{:?}\n{}", probes.results, d.log());
    assert!(d.audit_text().contains("gateway_unavailable"));
}

#[test]
fn a_trip_made_while_the_daemon_is_stopped_outlasts_its_restart() {
    if !privileged("a_trip_made_while_the_daemon_is_stopped_outlasts_its_restart") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("stoptrip");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("stoptrip", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(
        &env,
        &a(&["http", "GET", &url, "", "wait", "http", "GET", &url, ""]),
    );
    d.terminate();
    let state = d.kernel_state("agent-stoptrip");
    assert!(state.starts_with("suspended"), "{state}");
    // The operator cuts the agent off in the kernel while no daemon runs.
    let tripped = d.ctl(&["trip", "agent-stoptrip"]);
    assert!(
        tripped.status.success(),
        "trip: {}",
        String::from_utf8_lossy(&tripped.stderr)
    );
    assert_eq!(d.kernel_state("agent-stoptrip"), "tripped");
    d.spawn();
    // The start lifts only its own stop's cut: this one stays.
    assert_eq!(d.kernel_state("agent-stoptrip"), "tripped", "{}", d.log());
    let out = d.ctl(&["agents", "agent-stoptrip"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status["state"], "tripped", "{status}");
    assert_eq!(status["kernel_entry"], "tripped", "{status}");
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true, false], "{:?}\n{}", probes.results, d.log());
    assert_eq!(up.count(), 1);
}

#[test]
fn a_stop_cuts_off_a_tripped_agent_whose_kernel_entry_was_left_open() {
    if !privileged("a_stop_cuts_off_a_tripped_agent_whose_kernel_entry_was_left_open") {
        return;
    }
    let up = Upstream::start();
    let mut d = Daemon::start("stopopen");
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("stopopen", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(&env, &a(&["wait", "http", "GET", &url, ""]));
    let tripped = d.ctl(&["trip", "agent-stopopen"]);
    assert!(
        tripped.status.success(),
        "trip: {}",
        String::from_utf8_lossy(&tripped.stderr)
    );
    // What a kernel flip that failed at the trip leaves: a tripped agent, an open entry.
    let cgroup = enforcer::sandbox::CgroupParent::open(&d.cgroup_parent)
        .and_then(|p| p.agent("agent-stopopen"))
        .expect("agent cgroup");
    {
        let mut kernel = enforcer::kernel::Enforcement::open(&d.pin_dir).expect("pins");
        let mut policy = kernel
            .agent(cgroup.id)
            .expect("read entry")
            .expect("an entry");
        policy.state = enforcer_common::STATE_ACTIVE;
        kernel.set_agent(cgroup.id, &policy).expect("reopen");
    }
    d.terminate();
    assert_eq!(d.kernel_state("agent-stopopen"), "tripped", "{}", d.log());
    let (_, probes) = common::go_and_finish(child, reader, seen);
    probes.assert_denied("http GET");
    assert_eq!(up.count(), 0);
}

/// Caps the size of every file the daemon writes (RLIMIT_FSIZE, set from outside with
/// prlimit) at what its audit log holds now: from here on every append to the log fails,
/// as on a full disk. The cap comes off again on drop.
struct FileSizeCap(libc::pid_t);

impl FileSizeCap {
    fn at_audit_log_of(d: &Daemon) -> Self {
        let pid = d.child.as_ref().expect("daemon running").id() as libc::pid_t;
        let size = std::fs::read_dir(d.path("audit"))
            .expect("audit dir")
            .map(|e| e.expect("dir entry").metadata().expect("metadata").len())
            .max()
            .expect("an audit segment");
        set_file_size_limit(pid, size).expect("prlimit RLIMIT_FSIZE on the daemon");
        FileSizeCap(pid)
    }
}

impl Drop for FileSizeCap {
    fn drop(&mut self) {
        let _ = set_file_size_limit(self.0, libc::RLIM_INFINITY);
    }
}

fn set_file_size_limit(pid: libc::pid_t, bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads the new limit from a struct that outlives the call and is
    // given no old-limit pointer to write.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn neither_a_reset_nor_an_activation_happens_unrecorded() {
    if !privileged("neither_a_reset_nor_an_activation_happens_unrecorded") {
        return;
    }
    let up = Upstream::start();
    let metrics = free_metrics_addr();
    let d = Daemon::start_with("unlogged", &format!("metrics_listen = \"{metrics}\"\n"));
    let url = format!("http://127.0.0.1:{}/api/ticker", up.addr.port());
    let env = d.envelope("unlogged", up.addr, 600, "");
    let (child, reader, seen) = d.run_until_ready(&env, &a(&["wait", "http", "GET", &url, ""]));
    let tripped = d.ctl(&["trip", "agent-unlogged"]);
    assert!(
        tripped.status.success(),
        "trip: {}",
        String::from_utf8_lossy(&tripped.stderr)
    );
    // From here on every write to the log fails.
    let capped = FileSizeCap::at_audit_log_of(&d);
    let reset = d.ctl(&["reset", "agent-unlogged"]);
    let stderr = String::from_utf8_lossy(&reset.stderr).into_owned();
    assert!(!reset.status.success(), "an unrecorded reset went through");
    assert!(
        stderr.contains("audit_unavailable"),
        "{stderr}\n{}",
        d.log()
    );
    assert_eq!(d.kernel_state("agent-unlogged"), "tripped", "{}", d.log());
    // Operators see that the log stopped, and why.
    let agents = d.ctl(&["agents"]);
    let status: serde_json::Value = serde_json::from_slice(&agents.stdout).expect("json");
    assert_eq!(status["audit"]["state"], "failed", "{status}");
    let error = status["audit"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("File too large"), "{status}");
    let page = first_scrape(&d, metrics);
    assert!(page.contains("\nenforcer_audit_up 0\n"), "{page}");
    // Nor does a new Envelope take effect unrecorded.
    let other = d.envelope("unlogged-other", up.addr, 600, "");
    let answer = activate_over_control(&d, &other);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["kind"], "audit_unavailable", "{answer}");
    let listed = d.kernel_states();
    assert!(
        !listed
            .iter()
            .any(|(name, _)| name == "agent-unlogged-other"),
        "{listed:?}"
    );
    drop(capped);
    let (_, probes) = common::go_and_finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![false], "{:?}", probes.results);
    assert_eq!(up.count(), 0);
}

/// Starts agent `held`, whose one GET waits for a human, and returns it with the id of
/// its held request once the daemon lists it.
fn one_held_request(d: &Daemon, up: &Upstream) -> (Child, BufReader<ChildStdout>, String, u64) {
    let url = format!("http://127.0.0.1:{}/api/held", up.addr.port());
    let env = d.envelope(
        "held",
        up.addr,
        600,
        "[[approvals]]\nmethods = [\"GET\"]\npath = \"/api/held\"\ntimeout_secs = 60\nreason = \"a human decides\"\n",
    );
    let (mut child, reader, seen) = d.run_until_ready(&env, &a(&["wait", "http", "GET", &url, ""]));
    common::go(&mut child);
    let deadline = Instant::now() + Duration::from_secs(common::scaled_secs(20));
    loop {
        let listed = d.ctl(&["approvals"]);
        let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_default();
        if let Some(id) = list["approvals"][0]["held"]["id"].as_u64() {
            return (child, reader, seen, id);
        }
        assert!(Instant::now() < deadline, "nothing held\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_operator_s_approval_takes_effect_only_once_recorded() {
    if !privileged("an_operator_s_approval_takes_effect_only_once_recorded") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("unlogged-approval");
    let (child, reader, seen, id) = one_held_request(&d, &up);
    // The log stops taking records: the approval must not take effect unrecorded.
    let _capped = FileSizeCap::at_audit_log_of(&d);
    let approved = d.ctl(&["approve", "agent-held", &id.to_string()]);
    let stderr = String::from_utf8_lossy(&approved.stderr).into_owned();
    assert!(
        !approved.status.success(),
        "an unrecorded approval went through"
    );
    assert!(
        stderr.contains("audit_unavailable"),
        "{stderr}\n{}",
        d.log()
    );
    // The claimed request is denied, not left waiting for a decision that was refused.
    let (_, probes) = common::finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![false], "{:?}", probes.results);
    assert_eq!(up.count(), 0, "the held request reached the upstream");
}

#[test]
fn an_approval_whose_answer_cannot_be_printed_still_says_it_was_made() {
    if !privileged("an_approval_whose_answer_cannot_be_printed_still_says_it_was_made") {
        return;
    }
    let up = Upstream::start();
    let d = Daemon::start("unprinted-approval");
    let (child, reader, seen, id) = one_held_request(&d, &up);
    // stdout is a pipe whose reader is gone, as in `enforcer approve … | head -0`.
    let (reader_end, writer_end) = std::io::pipe().expect("pipe");
    drop(reader_end);
    let approved = d
        .enforcer()
        .args(["approve", "agent-held", &id.to_string()])
        .stdout(writer_end)
        .output()
        .expect("enforcer approve");
    let stderr = String::from_utf8_lossy(&approved.stderr).into_owned();
    assert_eq!(
        approved.status.code(),
        Some(1),
        "a failure to print, not a panic: {stderr}"
    );
    assert!(
        stderr.contains("the daemon answered, but its answer could not be printed")
            && stderr.contains("\"approved\""),
        "{stderr}"
    );
    // The approval was made all the same.
    let (_, probes) = common::finish(child, reader, seen);
    let oks: Vec<bool> = probes.results.iter().map(|r| r.1).collect();
    assert_eq!(oks, vec![true], "{:?}\n{}", probes.results, d.log());
    assert_eq!(up.count(), 1);
}
