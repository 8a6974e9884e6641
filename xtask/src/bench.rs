//! Benchmarks. Each prints its figures as ratios against a baseline measured in the same
//! run on the same machine, never against a fixed number.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

use crate::{build_enforcer, setup, workspace_root};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// TCP connects/s and bulk throughput, confined vs unconfined.
    Kernel,
    /// Envelope parse + full verification vs bare ed25519 verification.
    Envelope,
    /// Audit appends with durability vs raw appends; audit verification speed.
    Audit,
    /// Trip latency (map write to first refused connect) and activation time and memory.
    Daemon,
    /// HTTP requests/s and latency: direct, through nginx, through the gateway.
    Gateway,
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Kernel => kernel(),
        Which::Envelope => cargo_bench("envelope"),
        Which::Audit => cargo_bench("audit"),
        Which::Daemon => {
            if !crate::is_root() {
                bail!(
                    "the daemon benchmark loads BPF programs and runs the daemon: run it as root"
                );
            }
            cargo_bench("daemon")
        }
        Which::Gateway => crate::bench_gateway::run(),
    }
}

fn cargo_bench(name: &str) -> anyhow::Result<()> {
    setup::build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["bench", "-p", "enforcer", "--bench", name]);
    crate::run(&mut cmd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Connects,
    Throughput,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[arg(value_enum)]
    workload: Workload,
    addr: SocketAddr,
    /// How long to run, in milliseconds.
    millis: u64,
}

/// The load generator: prints one number, operations (or bytes) per second.
pub fn client(args: ClientArgs) -> anyhow::Result<()> {
    let duration = Duration::from_millis(args.millis);
    let start = Instant::now();
    let mut count: u64 = 0;
    match args.workload {
        Workload::Connects => {
            while start.elapsed() < duration {
                let stream = TcpStream::connect(args.addr).context("connect")?;
                // Reset instead of FIN so the client's ports do not pile up in TIME_WAIT.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt with a valid fd and a properly sized option value.
                unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                }
                drop(stream);
                count += 1;
            }
        }
        Workload::Throughput => {
            let mut stream = TcpStream::connect(args.addr).context("connect")?;
            let chunk = vec![0x5au8; 256 * 1024];
            while start.elapsed() < duration {
                stream.write_all(&chunk).context("write")?;
                count += chunk.len() as u64;
            }
        }
    }
    println!("{}", count as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

/// A sink on loopback. For `connects` it accepts and closes at once, so the accept loop
/// is never the bottleneck; for `throughput` it reads each connection to the end.
fn start_sink(workload: Workload) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind sink")?;
    // std listens with a backlog of 128; a burst of connects overflows it and the dropped
    // SYNs come back a second later, which would measure the retransmission timer.
    // SAFETY: listen(2) on a socket we own; calling it again only resizes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error()).context("resizing the sink's backlog");
    }
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Workload::Throughput = workload {
                thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = vec![0u8; 256 * 1024];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        }
    });
    Ok(addr)
}

fn kernel() -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the kernel benchmark attaches BPF programs and needs root");
    }
    setup::test_packages()?;
    setup::build_ebpf()?;
    let enforcer = build_enforcer(true)?;
    let me = std::env::current_exe().context("locating xtask")?;
    let pin_dir = format!("/sys/fs/bpf/enforcer-bench-{}", std::process::id());
    let parent = format!("enforcer-bench-{}", std::process::id());
    let _cleanup = Cleanup {
        enforcer: enforcer.clone(),
        pin_dir: pin_dir.clone(),
        parent: parent.clone(),
    };

    let measure = |workload: &str, sink: SocketAddr, confined: bool| -> anyhow::Result<f64> {
        let mut cmd = if confined {
            let mut cmd = Command::new(&enforcer);
            cmd.env("ENFORCER_PIN_DIR", &pin_dir)
                .env("ENFORCER_CGROUP_PARENT", &parent)
                .env("RUST_LOG", "error")
                .args(["confine", "--gateway", &sink.to_string(), "--"]);
            cmd.arg(&me);
            cmd
        } else {
            // Same user, same binary, no enforcer cgroup: only the BPF programs differ.
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&me);
            cmd
        };
        cmd.args(["bench-client", workload, &sink.to_string(), "1500"]);
        let out = cmd.output().context("running the bench client")?;
        if !out.status.success() {
            bail!(
                "bench client failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .context("bench client output")
    };

    const ROUNDS: usize = 7;
    println!("kernel benchmark: {ROUNDS} alternating rounds of 1.5 s each, medians");
    for (kind, workload, unit, target) in [
        (Workload::Connects, "connects", "connects/s", 0.95),
        (Workload::Throughput, "throughput", "MiB/s", 0.97),
    ] {
        let sink = start_sink(kind)?;
        let mut base = Vec::new();
        let mut conf = Vec::new();
        for _ in 0..ROUNDS {
            base.push(measure(workload, sink, false)?);
            conf.push(measure(workload, sink, true)?);
        }
        let scale = if unit == "MiB/s" {
            1.0 / (1024.0 * 1024.0)
        } else {
            1.0
        };
        let (b, c) = (median(&mut base) * scale, median(&mut conf) * scale);
        let ratio = c / b;
        println!(
            "  {workload:<10} unconfined {b:>12.0} {unit}   confined {c:>12.0} {unit}   ratio {ratio:.3} (target >= {target}) {}",
            if ratio >= target {
                "ok"
            } else {
                "BELOW TARGET"
            }
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

struct Cleanup {
    enforcer: std::path::PathBuf,
    pin_dir: String,
    parent: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = crate::run(
            Command::new(&self.enforcer)
                .env("ENFORCER_PIN_DIR", &self.pin_dir)
                .env("ENFORCER_CGROUP_PARENT", &self.parent)
                .args(["unload", "--force"]),
        );
    }
}
