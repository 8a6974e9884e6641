//! The main job: the daemon runs a trading agent under a signed Envelope against a local
//! HTTPS "exchange". The agent trades, overspends, tries a withdrawal, goes around the
//! gateway, reads secrets, and keeps going after the trip; the demo prints what happened
//! and why, then verifies the audit log.
use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{build_enforcer, is_root, setup, workspace_root};

/// Everything the demo started, stopped and removed even when a step fails.
struct Demo {
    dir: PathBuf,
    enforcer: PathBuf,
    pin_dir: String,
    parent: String,
    exchange: Option<Child>,
    daemon: Option<Child>,
}

impl Demo {
    fn enforcer(&self) -> Command {
        let mut cmd = Command::new(&self.enforcer);
        cmd.env("ENFORCER_CONTROL_SOCKET", self.dir.join("run/control.sock"))
            .env("ENFORCER_PIN_DIR", &self.pin_dir)
            .env("ENFORCER_CGROUP_PARENT", &self.parent)
            .env("RUST_LOG", "warn")
            .current_dir(&self.dir);
        cmd
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = self.enforcer().arg("shutdown").output();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(daemon.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some(mut exchange) = self.exchange.take() {
            let _ = exchange.kill();
            let _ = exchange.wait();
        }
        let _ = self.enforcer().args(["unload", "--force"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo runs the enforcer daemon (BPF programs, cgroups): run it as root");
    }
    setup::test_packages()?;
    setup::build_ebpf()?;
    let enforcer = build_enforcer(false)?;
    let examples = workspace_root().join("examples/demo");
    let id = std::process::id();
    let mut demo = Demo {
        dir: std::env::temp_dir().join(format!("enforcer-demo-{id}")),
        enforcer,
        pin_dir: format!("/sys/fs/bpf/enforcer-demo-{id}"),
        parent: format!("enforcer-demo-{id}"),
        exchange: None,
        daemon: None,
    };
    let d = demo.dir.clone();
    for (sub, mode) in [
        ("", 0o711),
        ("trust", 0o700),
        ("secrets", 0o700),
        ("exchange", 0o700),
    ] {
        std::fs::create_dir_all(d.join(sub))?;
        set_mode(&d.join(sub), mode)?;
    }
    let enforcer_ok = |cmd: &mut Command, what: &str| -> anyhow::Result<String> {
        let out = cmd
            .output()
            .with_context(|| format!("running enforcer {what}"))?;
        if !out.status.success() {
            bail!(
                "enforcer {what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };

    println!(
        "== 1. keys: a throwaway Envelope issuer, the daemon's audit key, the exchange's API key"
    );
    enforcer_ok(
        demo.enforcer().args(["keygen", "--out", "issuer"]),
        "keygen",
    )?;
    enforcer_ok(demo.enforcer().args(["keygen", "--out", "audit"]), "keygen")?;
    std::fs::copy(d.join("issuer.pub"), d.join("trust/issuer.pub"))?;
    let api_key = format!("sk-demo-{:016x}", rand_u64()?);
    std::fs::write(d.join("secrets/exchange-key"), &api_key)?;
    set_mode(&d.join("secrets/exchange-key"), 0o600)?;

    println!("== 2. a local HTTPS exchange with a test CA");
    let ca = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "enforcer demo exchange CA");
    let ca_cert = ca_params.self_signed(&ca)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?
        .signed_by(&leaf_key, &ca_cert, &ca)?;
    std::fs::write(d.join("exchange/ca.pem"), ca_cert.pem())?;
    std::fs::write(d.join("exchange/cert.pem"), leaf.pem())?;
    std::fs::write(d.join("exchange/key.pem"), leaf_key.serialize_pem())?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut exchange = Command::new("/usr/bin/python3")
        .arg(examples.join("exchange.py"))
        .arg(port.to_string())
        .arg(d.join("exchange/cert.pem"))
        .arg(d.join("exchange/key.pem"))
        .arg(&api_key)
        .arg(d.join("exchange/stats.json"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the demo exchange")?;
    let mut ready = String::new();
    BufReader::new(exchange.stdout.take().context("exchange stdout")?).read_line(&mut ready)?;
    demo.exchange = Some(exchange);
    if ready.trim() != "ready" {
        bail!("the demo exchange did not start");
    }
    println!("   https://localhost:{port}");

    println!("== 3. the Envelope: examples/demo/trader.toml, signed");
    let toml = std::fs::read_to_string(examples.join("trader.toml"))?
        .replace("EXCHANGE_PORT", &port.to_string());
    std::fs::write(d.join("trader.toml"), toml)?;
    enforcer_ok(
        demo.enforcer().args([
            "envelope",
            "sign",
            "--key",
            "issuer.key",
            "--valid-for",
            "600",
            "--new-id",
            "trader.toml",
            "-o",
            "trader.json",
        ]),
        "envelope sign",
    )?;
    print!(
        "{}",
        enforcer_ok(
            demo.enforcer().args(["envelope", "inspect", "trader.json"]),
            "envelope inspect"
        )?
    );

    println!("== 4. the daemon");
    std::fs::write(
        d.join("enforcer.toml"),
        format!(
            "state_dir = \"{d}/state\"\naudit_dir = \"{d}/audit\"\naudit_key = \"{d}/audit.key\"\n\
             trust_dir = \"{d}/trust\"\nsecrets = \"{d}/secrets\"\ncontrol_socket = \"{d}/run/control.sock\"\n\
             pin_dir = \"{pins}\"\ncgroup_parent = \"{parent}\"\nupstream_roots = [\"{d}/exchange/ca.pem\"]\n\
             no_system_roots = true\nshutdown_grace_secs = 1\n",
            d = d.display(),
            pins = demo.pin_dir,
            parent = demo.parent,
        ),
    )?;
    let log = std::fs::File::create(d.join("daemon.log"))?;
    let daemon = demo
        .enforcer()
        .args(["daemon", "--config", "enforcer.toml"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the daemon")?;
    let daemon_pid = daemon.id();
    demo.daemon = Some(daemon);
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(d.join("run/control.sock")).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "the daemon did not come up:\n{}",
                std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    println!(
        "== 5. the agent: examples/demo/agent.py, as a uid of its own, through `enforcer run`"
    );
    let agent = d.join("agent.py");
    std::fs::copy(examples.join("agent.py"), &agent)?;
    set_mode(&agent, 0o644)?;
    let out = demo
        .enforcer()
        .args(["run", "--envelope", "trader.json", "--", "/usr/bin/python3"])
        .arg(&agent)
        .arg(format!("https://localhost:{port}"))
        .arg(port.to_string())
        .arg(d.join("secrets/exchange-key"))
        .arg(daemon_pid.to_string())
        .output()
        .context("enforcer run")?;
    let results: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let expected = [
        ("read balances", true),
        ("limit order 0.5 BTC @ 100", true),
        ("limit order 1.5 BTC @ 100", true),
        ("limit order 5 BTC (over its scope)", false),
        ("limit order 0.9 BTC @ 100 (over budget)", false),
        ("withdraw all BTC", false),
        ("read balances after the trip", false),
        ("connect to the exchange directly", false),
        ("read the credential store", false),
        ("read the daemon's environment", false),
    ];
    println!(
        "\n{:<42} {:<9} {:<9} why",
        "the agent tried", "expected", "got"
    );
    let mut good = true;
    for (step, should) in expected {
        let found = results.iter().find(|r| r["step"] == step);
        let got = found.and_then(|r| r["ok"].as_bool());
        let why = found.and_then(|r| r["why"].as_str()).unwrap_or("no result");
        let ok = got == Some(should) && !why.contains("API key");
        good &= ok;
        let word = |b: bool| if b { "allowed" } else { "refused" };
        println!(
            "{step:<42} {:<9} {:<9} {why}{}",
            word(should),
            got.map(word).unwrap_or("missing"),
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }
    println!("\n{}", String::from_utf8_lossy(&out.stderr).trim_end());
    let stats = std::fs::read_to_string(d.join("exchange/stats.json")).unwrap_or_default();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap_or_default();
    println!(
        "the exchange saw {} authenticated requests, {} orders, {} withdrawals, {} without the key",
        stats["requests"].as_u64().unwrap_or(0) - stats["unauthenticated"].as_u64().unwrap_or(0),
        stats["orders"].as_u64().unwrap_or(0),
        stats["withdrawals"].as_u64().unwrap_or(0),
        stats["unauthenticated"].as_u64().unwrap_or(0),
    );
    good &= stats["withdrawals"].as_u64().unwrap_or(0) == 0 && stats["orders"].as_u64() == Some(2);

    println!("\n== 6. the audit log");
    let _ = demo.enforcer().arg("shutdown").output();
    if let Some(mut daemon) = demo.daemon.take() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(daemon.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    let verify = demo
        .enforcer()
        .args(["audit", "verify", "--key", "audit.pub", "audit"])
        .output()?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    good &= verify.status.success();
    let shown = demo.enforcer().args(["audit", "show", "audit"]).output()?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    for kind in [
        "envelope_activated",
        "request_allowed",
        "request_denied",
        "breaker_tripped",
        "kernel_deny",
    ] {
        println!(
            "  {:<20} {} records",
            kind,
            shown.lines().filter(|l| l.contains(kind)).count()
        );
    }
    drop(demo);
    if !good {
        bail!("the demo did not go as expected (see the marked rows)");
    }
    println!(
        "\n== the Envelope held: every refusal above was the gateway's or the kernel's, and the log proves it"
    );
    Ok(())
}

fn rand_u64() -> anyhow::Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_ne_bytes(b))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
