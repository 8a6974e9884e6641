//! `cargo xtask bench daemon` (needs root): how fast a trip reaches the kernel, and what an
//! activation costs in time and memory.
//!
//! - Trip latency: a process in an agent cgroup connects to its gateway in a tight loop;
//!   the bench writes the tripped entry and measures, on CLOCK_MONOTONIC, from just before
//!   the map write to the first denial the kernel stamps (its deny events carry the
//!   kernel's monotonic time). Each round is a new agent cgroup: the kernel reports at most
//!   EVENTS_PER_WINDOW denials a second per agent, so one agent tripped 200 times within a
//!   second would have its later denials counted but not reported.
//! - Activation: the real daemon (this build's `enforcer` binary), 1,000 signed Envelopes
//!   activated over the control socket one after another; daemon RSS and kernel slab before
//!   and after.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer::{
    control::{self, Op},
    envelope::{from_toml, load_signing_key, sign_envelope},
    kernel::{Enforcement, events::EventReader, unload},
    sandbox::CgroupParent,
};
use enforcer_common::{AgentPolicy, NO_DEADLINE};

const CHILD_ENV: &str = "ENFORCER_BENCH_TRIP_CHILD";
const ROUNDS: usize = 200;
const AGENTS: usize = 1000;
/// Agents activated before the daemon's memory is sampled for the per-agent figure.
const WARM_UP: usize = 200;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The confined side: connects to its gateway without pause until it is killed. A connect
/// whose handshake the kernel drops would wait for retransmissions, so each has a 1 ms
/// timeout and the loop goes on.
fn child(addr: &str) -> ! {
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| std::process::exit(2));
    let mut announced = false;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(1)).is_ok() && !announced {
            println!("ready");
            let _ = std::io::stdout().flush();
            announced = true;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn trip_latency() -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let unique = format!("enforcer-bench-trip-{}", std::process::id());
    let pin_dir = Path::new("/sys/fs/bpf").join(&unique);
    let parent = CgroupParent::create(&unique)?;
    let mut kernel = Enforcement::install_or_adopt(&pin_dir, parent.path())?;
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let addr = sink.local_addr()?;
    std::thread::spawn(move || for _ in sink.incoming() {});
    let policy = AgentPolicy::for_gateway(addr, NO_DEADLINE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut events = runtime
        .block_on(async { EventReader::try_open(&pin_dir) })?
        .ok_or("another process reads this bench's kernel events")?;
    let mut samples = Vec::with_capacity(ROUNDS);
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        for round in 0..ROUNDS {
            let agent = parent.create_agent(&format!("trip-{round}"))?;
            kernel.set_agent(agent.id, &policy)?;
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(agent.path.join("cgroup.procs"))?;
            let fd = procs.as_raw_fd();
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.env(CHILD_ENV, addr.to_string()).stdout(Stdio::piped());
            // SAFETY: only write(2) between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn()?;
            let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            if line.trim() != "ready" {
                return Err(format!("trip child said {line:?}").into());
            }
            std::thread::sleep(Duration::from_micros(500));
            let before = monotonic_ns();
            kernel.trip(agent.id)?;
            // The kernel stamps each denial with CLOCK_MONOTONIC: the first one after the
            // trip is the first packet or connect it stopped.
            let first = runtime.block_on(async {
                loop {
                    let (batch, _) =
                        tokio::time::timeout(Duration::from_secs(2), events.next_batch())
                            .await
                            .map_err(|_| "no kernel denial within 2 s of the trip")??;
                    if let Some(e) = batch
                        .iter()
                        .filter(|e| e.at_monotonic_ns >= before)
                        .map(|e| e.at_monotonic_ns)
                        .min()
                    {
                        break Ok::<u64, Box<dyn std::error::Error>>(e);
                    }
                }
            })?;
            let _ = child.kill();
            child.wait()?;
            samples.push(first.saturating_sub(before) as f64 / 1000.0);
            kernel.remove_agent(agent.id)?;
            agent.remove(Duration::from_secs(2))?;
        }
        Ok(())
    })();
    // After an error mid-round: whatever agent is left.
    if let Ok(left) = parent.agents() {
        for agent in left {
            let _ = kernel.remove_agent(agent.id);
            let _ = agent.remove(Duration::from_secs(2));
        }
    }
    drop(kernel);
    let _ = unload(&pin_dir);
    let _ = parent.remove_if_empty();
    result?;
    Ok(samples)
}

fn kernel_slab_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("KernelStack:") || l.starts_with("Percpu:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Activates AGENTS agents through a real daemon. Run twice: once as deployed, for the
/// activation time, and once with the allocator returning freed memory at once, so that
/// RSS follows what the daemon holds rather than what its allocator keeps for later.
fn activation(measure_memory: bool) -> Result<(), Box<dyn std::error::Error>> {
    let bin = env!("CARGO_BIN_EXE_enforcer");
    let dir = tempfile::Builder::new()
        .prefix("enforcer-bench-daemon-")
        .tempdir()?;
    let d = dir.path();
    let unique = format!(
        "enforcer-bench-act-{}-{}",
        std::process::id(),
        u8::from(measure_memory)
    );
    for sub in ["trust", "secrets"] {
        std::fs::create_dir(d.join(sub))?;
        std::fs::set_permissions(
            d.join(sub),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
    }
    enforcer::envelope::generate_keypair(&d.join("issuer"))?;
    enforcer::envelope::generate_keypair(&d.join("audit"))?;
    std::fs::copy(d.join("issuer.pub"), d.join("trust/issuer.pub"))?;
    let socket = d.join("control.sock");
    std::fs::write(
        d.join("enforcer.toml"),
        format!(
            "state_dir = \"{d}/state\"\naudit_dir = \"{d}/audit\"\naudit_key = \"{d}/audit.key\"\ntrust_dir = \"{d}/trust\"\n\
             secrets = \"{d}/secrets\"\ncontrol_socket = \"{s}\"\npin_dir = \"/sys/fs/bpf/{unique}\"\ncgroup_parent = \"{unique}\"\n\
             gateway_ports = [30000, 31999]\nshutdown_grace_secs = 0\n",
            d = d.display(),
            s = socket.display()
        ),
    )?;
    let mut daemon = Command::new(bin);
    daemon
        .args(["daemon", "--config"])
        .arg(d.join("enforcer.toml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    if measure_memory {
        daemon.env("MIMALLOC_PURGE_DELAY", "0");
    }
    let mut daemon = daemon.spawn()?;
    let pid = daemon.id();
    let outcome = (|| -> Result<(), Box<dyn std::error::Error>> {
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                return Err("the daemon did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let key = load_signing_key(&d.join("issuer.key"))?;
        let now = time::OffsetDateTime::now_utc();
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut envelopes = Vec::with_capacity(AGENTS);
        for i in 0..AGENTS {
            let toml = format!(
                "version = 1\nid = \"env-bench-{i}\"\nsubject = \"agent:bench-{i}\"\ntask = \"bench\"\nissuer = \"bench\"\n\
                 issued_at = \"{n}\"\nnot_before = \"{n}\"\nexpires_at = \"{e}\"\n[[capabilities]]\nname = \"api\"\n\
                 upstream = {{ scheme = \"http\", host = \"127.0.0.1\", port = 9 }}\n[[capabilities.routes]]\nmethods = [\"GET\"]\npath = \"/**\"\n",
                n = fmt(now - time::Duration::seconds(5)),
                e = fmt(now + time::Duration::hours(1)),
            );
            envelopes.push(sign_envelope(&from_toml(&toml)?, &key)?.to_json());
        }
        std::thread::sleep(Duration::from_millis(300));
        let (rss0, slab0) = (rss_kib(pid), kernel_slab_kib());
        let mut times = Vec::with_capacity(AGENTS);
        // The daemon's allocator keeps memory freed after start-up and hands it to the
        // first agents, so the daemon's share is measured as the growth from the
        // WARM_UP-th agent to the last one.
        let mut rss_warm = rss0;
        let all = Instant::now();
        for (i, envelope) in envelopes.into_iter().enumerate() {
            if i == WARM_UP {
                rss_warm = rss_kib(pid);
            }
            let t = Instant::now();
            control::call(
                &socket,
                Op::Activate { envelope },
                Some(Duration::from_secs(30)),
            )?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let total = all.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        let (rss1, slab1) = (rss_kib(pid), kernel_slab_kib());
        times.sort_by(|a, b| a.total_cmp(b));
        if !measure_memory {
            println!(
                "activation: {AGENTS} agents in {total:.2} s = {:.2} ms per activation (p50 {:.2} ms, p99 {:.2} ms; target <= 2 ms) {}",
                total * 1000.0 / AGENTS as f64,
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                if total * 1000.0 / AGENTS as f64 <= 2.0 {
                    "ok"
                } else {
                    "ABOVE TARGET"
                }
            );
        }
        if measure_memory {
            println!(
                "memory per agent: daemon {:.1} KiB (RSS {} -> {} KiB from agent {WARM_UP} on), kernel {:.1} KiB (slab+stacks+percpu {} -> {} KiB; includes the cgroup)",
                (rss1.saturating_sub(rss_warm)) as f64 / (AGENTS - WARM_UP) as f64,
                rss_warm,
                rss1,
                (slab1.saturating_sub(slab0)) as f64 / AGENTS as f64,
                slab0,
                slab1
            );
        }
        for i in 0..AGENTS {
            let _ = control::call(
                &socket,
                Op::Deactivate {
                    agent: format!("agent-bench-{i}"),
                },
                Some(Duration::from_secs(30)),
            );
        }
        let _ = control::call(&socket, Op::Shutdown, Some(Duration::from_secs(5)));
        Ok(())
    })();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(daemon.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = unload(&Path::new("/sys/fs/bpf").join(&unique));
    if let Ok(parent) = CgroupParent::open(&unique) {
        for agent in parent.agents().unwrap_or_default() {
            let _ = agent.remove(Duration::from_secs(2));
        }
        let _ = parent.remove_if_empty();
    }
    outcome
}

fn main() {
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        child(&addr);
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` runs benches as tests; this one needs root and minutes.
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the daemon benchmark loads BPF programs and runs the daemon: run it as root");
        std::process::exit(1);
    }
    match trip_latency() {
        Ok(mut samples) => {
            samples.sort_by(|a, b| a.total_cmp(b));
            let p99 = percentile(&samples, 0.99);
            println!(
                "trip latency (map write -> first kernel denial), {ROUNDS} trips: p50 {:.1} us, p99 {:.1} us, max {:.1} us (target p99 <= 1000 us) {}",
                percentile(&samples, 0.5),
                p99,
                samples.last().copied().unwrap_or(0.0),
                if p99 <= 1000.0 { "ok" } else { "ABOVE TARGET" }
            );
        }
        Err(e) => {
            eprintln!("trip latency failed: {e}");
            std::process::exit(1);
        }
    }
    for measure_memory in [false, true] {
        if let Err(e) = activation(measure_memory) {
            eprintln!("activation benchmark failed: {e}");
            std::process::exit(1);
        }
    }
    let _ = std::io::stdin().read(&mut [0u8; 0]);
}
