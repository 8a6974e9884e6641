//! The main job: from a fresh clone, a confined agent tries every way out and the kernel
//! stops it, while its gateway stays reachable until an operator trips it.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, UdpSocket},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context, bail};

use crate::{build_enforcer, is_root, setup, workspace_root};

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo attaches BPF programs and creates cgroups: run it as root");
    }
    setup::test_packages()?;
    setup::build_ebpf()?;
    let enforcer = build_enforcer(false)?;

    // The gateway answers HTTP and echoes lines; "the internet" is another loopback address.
    let gateway = TcpListener::bind("127.0.0.1:0").context("bind gateway")?;
    let gateway_addr = gateway.local_addr()?;
    thread::spawn(move || {
        for stream in gateway.incoming().flatten() {
            thread::spawn(move || echo_or_http(stream));
        }
    });
    let outside =
        TcpListener::bind("127.0.0.2:0").context("bind 127.0.0.2 (the 'outside' server)")?;
    let outside_addr = outside.local_addr()?;
    thread::spawn(move || for _ in outside.incoming() {});
    let resolver = UdpSocket::bind("127.0.0.1:0").context("bind resolver")?;
    let resolver_addr = resolver.local_addr()?;

    let scratch = std::env::temp_dir().join(format!("enforcer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let probe = scratch.join("probe.py");
    std::fs::copy(workspace_root().join("tests/probe.py"), &probe)
        .context("copying the probe script")?;
    set_mode(&scratch, 0o755)?;
    set_mode(&probe, 0o644)?;

    let pin_dir = format!("/sys/fs/bpf/enforcer-demo-{}", std::process::id());
    let parent = format!("enforcer-demo-{}", std::process::id());
    let enforcer_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&enforcer);
        cmd.env("ENFORCER_PIN_DIR", &pin_dir)
            .env("ENFORCER_CGROUP_PARENT", &parent)
            .env("RUST_LOG", "warn")
            .args(args);
        cmd
    };

    println!("== enforcer demo: an agent confined to its gateway {gateway_addr}");
    let gw_port = gateway_addr.port().to_string();
    let mut child = enforcer_cmd(&[
        "confine",
        "--gateway",
        &gateway_addr.to_string(),
        "--name",
        "demo-agent",
        "--ttl",
        "120",
        "--",
    ])
    .arg("/usr/bin/python3")
    .arg(&probe)
    .args([
        "tcp4",
        "127.0.0.1",
        &gw_port,
        "tcp4",
        "127.0.0.2",
        &outside_addr.port().to_string(),
        "tcp6",
        "::1",
        &gw_port,
        "dns",
        "127.0.0.1",
        &resolver_addr.port().to_string(),
        "udp4",
        "127.0.0.1",
        &resolver_addr.port().to_string(),
        "raw-icmp",
        "127.0.0.1",
        "packet",
        "hold",
        "127.0.0.1",
        &gw_port,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .context("starting enforcer confine")?;
    let mut stdout = BufReader::new(child.stdout.take().context("agent stdout")?);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        if line.trim() == "ready" {
            let out = enforcer_cmd(&["trip", "demo-agent"])
                .output()
                .context("enforcer trip")?;
            if !out.status.success() {
                bail!("trip failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            println!("   (operator: enforcer trip demo-agent)");
            child
                .stdin
                .take()
                .context("agent stdin")?
                .write_all(b"go\n")?;
            continue;
        }
        lines.push(line);
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("agent stderr")?
        .read_to_string(&mut stderr)?;
    let status = child.wait()?;

    let expectations = [
        ("tcp4 127.0.0.1", "HTTP to its gateway", true),
        ("tcp4 127.0.0.2", "TCP to another host", false),
        ("tcp6 [::1]", "TCP over IPv6", false),
        ("dns", "DNS query to a resolver", false),
        ("udp4", "UDP datagram", false),
        ("raw-icmp", "raw ICMP socket", false),
        ("packet", "AF_PACKET socket", false),
        ("held-before", "gateway connection, before trip", true),
        ("held-after", "same connection, after trip", false),
        ("new-after", "new gateway connection, after trip", false),
    ];
    println!("{:<38} {:<10} {:<10}", "attempt", "expected", "got");
    let mut all_good = status.success();
    for (prefix, what, should_pass) in expectations {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("\"probe\": \"{prefix}")));
        let got = line.map(|l| l.contains("\"ok\": true"));
        let good = got == Some(should_pass);
        all_good &= good;
        println!(
            "{what:<38} {:<10} {:<10} {}",
            if should_pass { "allowed" } else { "denied" },
            match got {
                Some(true) => "allowed",
                Some(false) => "denied",
                None => "missing",
            },
            if good { "ok" } else { "UNEXPECTED" }
        );
    }
    let kernel_denials = stderr
        .lines()
        .filter(|l| l.contains("kernel denied"))
        .count();
    println!("kernel deny events logged by the enforcer: {kernel_denials}");

    let _ = enforcer_cmd(&["unload", "--force"]).status();
    let _ = std::fs::remove_dir_all(&scratch);
    if !all_good {
        bail!("the demo did not go as expected; enforcer output:\n{stderr}");
    }
    println!("== every escape was stopped in the kernel");
    Ok(())
}

fn echo_or_http(stream: std::net::TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    if line.starts_with("GET ") {
        let _ = writer.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        return;
    }
    loop {
        if writer.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
    }
}

fn set_mode(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
