//! `cargo xtask bench gateway`: one upstream reached three ways in the same run, measured
//! by the same load generator (Debian's `wrk`, keep-alive, fixed connections and
//! duration, loopback only):
//! - directly;
//! - through nginx as a reverse proxy (keep-alive to the upstream, injecting a header);
//! - through the gateway (release build, standalone mode) as the agent's HTTP proxy, with
//!   a realistic Envelope (budgets, scope constraints, forbidden effects, breakers, a
//!   credential to inject) and every decision written to the audit log.
//!
//! Two more rows explain the result:
//! - the gateway without its ledger file and audit log (the decision path alone);
//! - `enforcer/examples/passthrough_proxy.rs`: hyper and tokio set up as the gateway sets
//!   them up, forwarding without any check. It is the most a gateway on this stack can
//!   reach here, so the gateway against it is the cost of the policy and its records.
//!
//! The upstream is a second nginx that answers from memory, so the figures are the cost
//! of the middle hop. Rounds alternate between all of them; each ratio is the median of
//! the ratios within a round, so a change of the machine's speed between rounds does not
//! enter it.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{build_enforcer, setup};

const CONNECTIONS: u32 = 32;
const ROUND_SECS: u32 = 5;
const ROUNDS: usize = 3;
const PATH: &str = "/api/v3/ticker/BTC-USD?symbol=BTC-USD";

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Kills what the bench started and removes its directory, also on error.
struct Cleanup {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            // SIGTERM first so nginx and the gateway shut down cleanly.
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        for child in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {addr}")
}

fn nginx_config(dir: &Path, name: &str, workers: &str, server: &str) -> anyhow::Result<PathBuf> {
    let d = dir.display();
    let conf = format!(
        "worker_processes {workers};\n\
         daemon off;\n\
         pid {d}/{name}.pid;\n\
         error_log {d}/{name}-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           keepalive_requests 1000000;\n\
           client_body_temp_path {d}/{name}-body;\n\
           proxy_temp_path {d}/{name}-proxy;\n\
           fastcgi_temp_path {d}/{name}-fastcgi;\n\
           uwsgi_temp_path {d}/{name}-uwsgi;\n\
           scgi_temp_path {d}/{name}-scgi;\n\
           {server}\n\
         }}\n"
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn spawn_nginx(conf: &Path, dir: &Path) -> anyhow::Result<Child> {
    Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx")
}

fn enforcer(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running enforcer {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "enforcer {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn envelope_toml(upstream: u16) -> String {
    format!(
        r#"
version = 1
id = "env-bench-gateway"
subject = "agent:bench"
task = "Read market data and place small orders"
issuer = "bench"
issued_at = "2026-01-01T00:00:00Z"
not_before = "2026-01-01T00:00:00Z"
expires_at = "2026-01-01T01:00:00Z"

[budget]
requests = 100000000
bytes_up = 100000000000
bytes_down = 100000000000

[[capabilities]]
name = "market-data"
upstream = {{ scheme = "http", host = "127.0.0.1", port = {upstream} }}
credential = {{ secret = "exchange-key", header = "X-Api-Key", format = "{{secret}}" }}
[[capabilities.routes]]
methods = ["GET"]
path = "/api/v3/ticker/*"
[[capabilities.routes]]
methods = ["POST"]
path = "/api/v3/order"
[[capabilities.constraints]]
query = "symbol"
one_of = ["BTC-USD", "ETH-USD"]
optional = true
[[capabilities.constraints]]
body = "/quantity"
max = 10
optional = true
[capabilities.budget]
requests = 100000000

[[forbidden_effects]]
path = "/api/v3/withdraw/**"
reason = "withdrawals are irreversible"

[[forbidden_effects]]
methods = ["DELETE"]
path = "/api/v3/account/**"
reason = "accounts are never closed"

[[approvals]]
methods = ["POST"]
path = "/api/v3/order/large"
timeout_secs = 5
reason = "large orders need a human"

[breakers]
on_forbidden = true
"#
    )
}

/// Runs wrk against `url` (`proxy_target`: send absolute-form requests for it instead).
fn wrk(
    dir: &Path,
    url: &str,
    proxy_target: Option<(&str, &str)>,
    secs: u32,
) -> anyhow::Result<Figures> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if let Some((absolute, host)) = proxy_target {
        let script = dir.join("proxy.lua");
        std::fs::write(
            &script,
            format!("wrk.path = \"{absolute}\"\nwrk.headers[\"Host\"] = \"{host}\"\n"),
        )?;
        cmd.arg("-s").arg(&script);
    }
    cmd.arg(url);
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw failed requests against {url}; a refusing gateway is no benchmark:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let percentile = |p: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .and_then(parse_duration_ms)
            .with_context(|| format!("no {p} latency in wrk output:\n{text}"))
    };
    Ok(Figures {
        rps,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
    })
}

fn parse_duration_ms(v: &str) -> Option<f64> {
    for (suffix, scale) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)] {
        if let Some(n) = v.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn run() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the gateway benchmark installs and runs nginx and needs root");
    }
    let missing: Vec<&str> = ["nginx", "wrk"]
        .into_iter()
        .filter(|p| !setup::command_exists(p))
        .collect();
    setup::apt_install(&missing)?;
    if std::env::var_os("ENFORCER_EBPF_OBJECT").is_none() {
        setup::build_ebpf()?;
    }
    let bin = build_enforcer(true)?;
    let passthrough = build_passthrough()?;

    let dir = std::env::temp_dir().join(format!("enforcer-bench-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let (up, nx, gw, gw_mem, pass) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );

    // The upstream: answers from memory, one worker, so it is never the bottleneck of one
    // path and not the other.
    let body = r#"{"symbol":"BTC-USD","price":"64012.50","ts":1767225600}"#;
    let upstream_conf = nginx_config(
        &dir,
        "upstream",
        "1",
        &format!(
            "server {{ listen 127.0.0.1:{up}; location / {{ default_type application/json; \
             return 200 '{body}'; }} }}"
        ),
    )?;
    cleanup.children.push(spawn_nginx(&upstream_conf, &dir)?);
    // The reverse proxy: as many workers as cores, keep-alive to the upstream, injecting
    // a header the way the gateway injects the credential.
    let proxy_conf = nginx_config(
        &dir,
        "proxy",
        "auto",
        &format!(
            "upstream backend {{ server 127.0.0.1:{up}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:{nx}; location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; \
             proxy_set_header X-Api-Key \"sk-bench-0000\"; }} }}"
        ),
    )?;
    cleanup.children.push(spawn_nginx(&proxy_conf, &dir)?);

    // The gateway, with a signed Envelope, a secret store, state and an audit log.
    let trust = dir.join("trust");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&trust)?;
    std::fs::create_dir_all(&secrets)?;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700))?;
    let secret = secrets.join("exchange-key");
    std::fs::write(&secret, "sk-bench-0000")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let s = |p: &Path| p.display().to_string();
    enforcer(&bin, &["keygen", "--out", &s(&trust.join("issuer"))])?;
    enforcer(&bin, &["keygen", "--out", &s(&dir.join("audit-key"))])?;
    let toml = dir.join("envelope.toml");
    std::fs::write(&toml, envelope_toml(up))?;
    let signed = dir.join("envelope.json");
    enforcer(
        &bin,
        &[
            "envelope",
            "sign",
            "--key",
            &s(&trust.join("issuer.key")),
            "--valid-for",
            "3600",
            "--new-id",
            &s(&toml),
            "-o",
            &s(&signed),
        ],
    )?;
    // The private key must not sit among the trusted public keys.
    std::fs::rename(trust.join("issuer.key"), dir.join("issuer.key"))?;
    let gateway = Command::new(&bin)
        .args(["gateway", "--envelope", &s(&signed), "--trust", &s(&trust)])
        .args([
            "--secrets",
            &s(&secrets),
            "--listen",
            &format!("127.0.0.1:{gw}"),
        ])
        .args(["--state-dir", &s(&dir.join("state"))])
        .args(["--audit-dir", &s(&dir.join("audit"))])
        .args(["--audit-key", &s(&dir.join("audit-key.key"))])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .context("starting the gateway")?;
    cleanup.children.push(gateway);
    // The same gateway without a ledger file or an audit log: the decision path alone, so
    // the figures show what durability (one fsync per group commit) costs on this disk.
    let memory_only = Command::new(&bin)
        .args(["gateway", "--envelope", &s(&signed), "--trust", &s(&trust)])
        .args([
            "--secrets",
            &s(&secrets),
            "--listen",
            &format!("127.0.0.1:{gw_mem}"),
        ])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .context("starting the in-memory gateway")?;
    cleanup.children.push(memory_only);
    let passthrough = Command::new(&passthrough)
        .args([format!("127.0.0.1:{pass}"), format!("127.0.0.1:{up}")])
        .stderr(Stdio::null())
        .spawn()
        .context("starting the pass-through proxy")?;
    cleanup.children.push(passthrough);
    for (port, what) in [
        (up, "the upstream nginx"),
        (nx, "the proxy nginx"),
        (gw, "the gateway"),
        (gw_mem, "the in-memory gateway"),
        (pass, "the pass-through proxy"),
    ] {
        wait_listening(port, what)?;
    }

    let direct_url = format!("http://127.0.0.1:{up}{PATH}");
    let nginx_url = format!("http://127.0.0.1:{nx}{PATH}");
    let gateway_url = format!("http://127.0.0.1:{gw}/");
    let memory_url = format!("http://127.0.0.1:{gw_mem}/");
    let passthrough_url = format!("http://127.0.0.1:{pass}/");
    let host = format!("127.0.0.1:{up}");
    let measure = |which: usize, secs: u32| -> anyhow::Result<Figures> {
        match which {
            0 => wrk(&dir, &direct_url, None, secs),
            1 => wrk(&dir, &nginx_url, None, secs),
            2 => wrk(&dir, &gateway_url, Some((&direct_url, &host)), secs),
            3 => wrk(&dir, &memory_url, Some((&direct_url, &host)), secs),
            _ => wrk(&dir, &passthrough_url, Some((&direct_url, &host)), secs),
        }
    };
    println!(
        "gateway benchmark: wrk, {CONNECTIONS} keep-alive connections, {ROUNDS} alternating \
         rounds of {ROUND_SECS} s, medians"
    );
    for which in 0..ROWS.len() {
        measure(which, 1)?; // warm-up: connections, caches, leaf pools
    }
    let mut runs: Vec<Vec<Figures>> = (0..ROWS.len()).map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (which, r) in runs.iter_mut().enumerate() {
            r.push(measure(which, ROUND_SECS)?);
        }
    }
    for (name, r) in ROWS.iter().zip(&runs) {
        println!(
            "  {name:<20} {:>10.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
            median(r.iter().map(|f| f.rps).collect()),
            median(r.iter().map(|f| f.p50_ms).collect()),
            median(r.iter().map(|f| f.p99_ms).collect()),
        );
    }
    let [direct, nginx, gateway, memory, passthrough] = [0, 1, 2, 3, 4].map(|i| &runs[i]);
    let (rps, p99) = (
        ratio(gateway, nginx, |f| f.rps),
        ratio(gateway, nginx, |f| f.p99_ms),
    );
    println!(
        "  gateway vs nginx:  req/s {rps:.3}x (target >= 1.0) {}   p99 {p99:.3}x (target <= 1.0) {}",
        if rps >= 1.0 { "ok" } else { "BELOW TARGET" },
        if p99 <= 1.0 { "ok" } else { "ABOVE TARGET" },
    );
    println!(
        "  gateway vs direct: req/s {:.3}x   p50 {:.3}x   p99 {:.3}x",
        ratio(gateway, direct, |f| f.rps),
        ratio(gateway, direct, |f| f.p50_ms),
        ratio(gateway, direct, |f| f.p99_ms),
    );
    println!(
        "  gateway without ledger file and audit log vs nginx: req/s {:.3}x   p99 {:.3}x",
        ratio(memory, nginx, |f| f.rps),
        ratio(memory, nginx, |f| f.p99_ms),
    );
    println!(
        "  hyper pass-through vs nginx: req/s {:.3}x   p99 {:.3}x  (what this stack allows)",
        ratio(passthrough, nginx, |f| f.rps),
        ratio(passthrough, nginx, |f| f.p99_ms),
    );
    println!(
        "  gateway vs hyper pass-through: req/s {:.3}x (without ledger file and audit log {:.3}x)  \
         (the cost of the policy and its records)",
        ratio(gateway, passthrough, |f| f.rps),
        ratio(memory, passthrough, |f| f.rps),
    );
    drop(cleanup);
    Ok(())
}

const ROWS: [&str; 5] = [
    "direct",
    "nginx",
    "gateway",
    "gateway (no disk)",
    "hyper pass-through",
];

/// The median over rounds of `of(a) / of(b)` within each round.
fn ratio(a: &[Figures], b: &[Figures], of: impl Fn(&Figures) -> f64) -> f64 {
    median(a.iter().zip(b).map(|(a, b)| of(a) / of(b)).collect())
}

/// Builds the pass-through proxy example in release mode.
fn build_passthrough() -> anyhow::Result<PathBuf> {
    let root = crate::workspace_root();
    crate::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--release", "-p", "enforcer"])
            .args(["--example", "passthrough_proxy"]),
    )
    .context("building the pass-through proxy")?;
    let bin = root.join("target/release/examples/passthrough_proxy");
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}
