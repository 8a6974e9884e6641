//! `enforcer confine`, `trip`, `status`, `unload`: kernel confinement without Envelopes.
use std::{ffi::OsString, net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Args;
use enforcer::{
    kernel::{
        self, Enforcement,
        events::{EventReader, KernelDeny},
    },
    sandbox::CgroupParent,
};
use enforcer_common::{
    AgentPolicy, NO_DEADLINE, STATE_ACTIVE, STATE_SUSPENDED, STATE_TRIPPED, hook,
};

use super::{KernelOpts, require_root};

/// How long leftover agent processes get to die before cleanup reports a failure.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct ConfineArgs {
    #[command(flatten)]
    kernel: KernelOpts,
    /// The only address the command may connect to (TCP), e.g. 127.0.0.1:8080 or [::1]:8080.
    #[arg(long)]
    gateway: SocketAddr,
    /// Seconds after which the kernel cuts the command off, even if no enforcer process runs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    ttl: Option<u64>,
    /// Run as this account instead of a uid of the agent's own (agents sharing a user can
    /// reach into each other's processes).
    #[arg(long)]
    user: Option<String>,
    /// Set a variable in the agent's environment, which starts empty but for PATH, HOME,
    /// TMPDIR, LANG, TERM and the enforcer's own (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Name of the agent (its cgroup); defaults to agent-<pid of this process>.
    #[arg(long)]
    name: Option<String>,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct TripArgs {
    #[command(flatten)]
    kernel: KernelOpts,
    #[command(flatten)]
    socket: super::daemon::SocketOpts,
    /// Name of the agent to cut off.
    agent: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    kernel: KernelOpts,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    #[command(flatten)]
    kernel: KernelOpts,
    /// Kill agents that are still running instead of refusing.
    #[arg(long)]
    force: bool,
}

pub fn confine(args: ConfineArgs) -> anyhow::Result<ExitCode> {
    require_root("confine")?;
    if args.gateway.ip().is_unspecified() || args.gateway.port() == 0 {
        anyhow::bail!(
            "--gateway {} is not a usable address: give a concrete IP and a non-zero port",
            args.gateway
        );
    }
    let extra_env = super::parse_env(&args.env)?;
    let mut identity = super::AgentIdentity::choose(args.user.as_deref())?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("agent-{}", std::process::id()));
    enforcer::sandbox::validate_agent_name(&name)?;

    let parent = CgroupParent::create(&args.kernel.cgroup_parent)?;
    let mut enforcement = Enforcement::install_or_adopt(&args.kernel.pin_dir, parent.path())?;
    let agent = parent.create_agent(&name)?;

    // From here on the agent cgroup exists: every exit path removes it and its policy.
    let outcome = (|| -> anyhow::Result<ExitCode> {
        enforcement.verify_in_effect(&agent.path)?;
        let deadline = match args.ttl {
            Some(ttl) => {
                kernel::boottime_now_ns()?.saturating_add(ttl.saturating_mul(1_000_000_000))
            }
            None => NO_DEADLINE,
        };
        enforcement.set_agent(agent.id, &AgentPolicy::for_gateway(args.gateway, deadline))?;
        let mut env = extra_env;
        env.push(("ENFORCER_AGENT".to_owned(), name.clone()));
        env.push(("ENFORCER_GATEWAY".to_owned(), args.gateway.to_string()));
        let env = enforcer::sandbox::agent_env(identity.home.path(), &env);
        let (program, rest) = args.command.split_first().context("no command given")?;
        let child = agent.spawn(program, rest, &identity.user, &env)?;
        // The agent runs as the uid now, so no other chooser can take it.
        identity.lease = None;
        say!(
            "enforcer: agent {name} (cgroup id {}) confined as {}; only {} is reachable{}",
            agent.id,
            identity.user.name,
            args.gateway,
            args.ttl.map(|t| format!(", for {t}s")).unwrap_or_default()
        );
        let status = supervise(&args.kernel, child)?;
        if let Ok(counters) = enforcement.counters(agent.id) {
            let denied: Vec<String> = hook::NAMES
                .iter()
                .zip(counters.denied)
                .filter(|(_, n)| *n > 0)
                .map(|(hook, n)| format!("{hook}={n}"))
                .collect();
            say!(
                "enforcer: agent {name} ended; kernel denials: {}",
                if denied.is_empty() {
                    "none".to_owned()
                } else {
                    denied.join(" ")
                }
            );
        }
        Ok(exit_code(status))
    })();

    let cleanup = agent
        .remove(KILL_TIMEOUT)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            enforcement
                .remove_agent(agent.id)
                .map_err(anyhow::Error::from)
        });
    match (outcome, cleanup) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(e)) => Err(e.context(format!("cleaning up agent {name}"))),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => {
            Err(e.context(format!("cleaning up agent {name} also failed: {cleanup:#}")))
        }
    }
}

/// Waits for the agent's main process while logging the kernel's deny events. SIGINT and
/// SIGTERM end the agent instead of leaving it behind.
fn supervise(
    kernel_opts: &KernelOpts,
    mut child: std::process::Child,
) -> anyhow::Result<std::process::ExitStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pin_dir = kernel_opts.pin_dir.clone();
    let pid = child.id() as i32;
    let waiter = std::thread::spawn(move || child.wait());
    runtime.block_on(async move {
        let mut reader = EventReader::try_open(&pin_dir)?;
        if reader.is_none() {
            tracing::warn!(
                "another enforcer process (the daemon, or another confine) reads this \
                 installation's deny events: this agent's denials are logged there, and \
                 counted here"
            );
        }
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(waiter.join());
        });
        loop {
            tokio::select! {
                batch = async { match reader.as_mut() {
                    Some(reader) => reader.next_batch().await,
                    None => std::future::pending().await,
                } } => log_denials(batch?),
                _ = tokio::signal::ctrl_c() => {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                _ = sigterm.recv() => {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                joined = &mut done_rx => {
                    let status = joined
                        .map_err(|_| anyhow::anyhow!("the agent waiter vanished"))?
                        .map_err(|_| anyhow::anyhow!("the agent waiter panicked"))??;
                    // The exit and the agent's last denials can be ready at once, and the
                    // exit may be picked first: those denials are logged all the same.
                    if let Some(reader) = reader.as_mut() {
                        log_denials(reader.ready_now());
                    }
                    return Ok(status);
                }
            }
        }
    })
}

fn log_denials((events, undecodable): (Vec<KernelDeny>, usize)) {
    for event in events {
        tracing::warn!(target: "enforcer::kernel", %event, "kernel denied");
    }
    if undecodable > 0 {
        tracing::error!(undecodable, "kernel events that could not be decoded");
    }
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    }
}

pub fn trip(args: TripArgs) -> anyhow::Result<ExitCode> {
    require_root("trip")?;
    // An agent the daemon runs is tripped through it, so its gateway refuses too and the
    // trip is audited; agents started with `confine` are tripped in the kernel directly.
    match enforcer::control::call(
        &args.socket.socket,
        enforcer::control::Op::Trip {
            agent: args.agent.clone(),
        },
        Some(std::time::Duration::from_secs(10)),
    ) {
        Ok(_) => {
            say!(
                "enforcer: agent {} tripped by the daemon: gateway and kernel refuse everything",
                args.agent
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(enforcer::control::ControlError::NoDaemon { .. }) => {}
        Err(enforcer::control::ControlError::Refused { kind, .. }) if kind == "unknown_agent" => {}
        Err(e) => return Err(e.into()),
    }
    let parent = CgroupParent::open(&args.kernel.cgroup_parent)?;
    let agent = parent.agent(&args.agent)?;
    let mut enforcement = Enforcement::open(&args.kernel.pin_dir)?;
    enforcement.trip(agent.id)?;
    say!(
        "enforcer: agent {} (cgroup id {}) tripped: the kernel now drops everything it sends",
        agent.name,
        agent.id
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, serde::Serialize)]
struct AgentStatus {
    name: String,
    cgroup_id: u64,
    state: &'static str,
    gateway: Option<SocketAddr>,
    /// Seconds until the kernel deadline; absent when there is none.
    expires_in_s: Option<f64>,
    processes: usize,
    allowed: std::collections::BTreeMap<&'static str, u64>,
    denied: std::collections::BTreeMap<&'static str, u64>,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    require_root("status")?;
    let enforcement = Enforcement::open(&args.kernel.pin_dir)?;
    let parent = CgroupParent::open(&args.kernel.cgroup_parent)?;
    let now = kernel::boottime_now_ns()?;
    let mut rows = Vec::new();
    for agent in parent.agents()? {
        let policy = enforcement.agent(agent.id)?;
        let counters = enforcement.counters(agent.id)?;
        let state = match policy {
            None => "no-policy (denied everything)",
            Some(p) if p.state == STATE_TRIPPED => "tripped",
            Some(p) if p.state == STATE_SUSPENDED => "suspended (daemon stopped)",
            Some(p) if p.state == STATE_ACTIVE && !p.is_open_at(now) => "expired",
            Some(p) if p.state == STATE_ACTIVE => "active",
            Some(_) => "invalid (denied everything)",
        };
        let expires_in_s = policy
            .filter(|p| p.deadline_boottime_ns != NO_DEADLINE)
            .map(|p| (p.deadline_boottime_ns as f64 - now as f64) / 1e9);
        rows.push(AgentStatus {
            name: agent.name.clone(),
            cgroup_id: agent.id,
            state,
            gateway: policy.and_then(|p| p.gateway()),
            expires_in_s,
            processes: agent.pids()?.len(),
            allowed: hook::NAMES.iter().copied().zip(counters.allowed).collect(),
            denied: hook::NAMES.iter().copied().zip(counters.denied).collect(),
        });
    }
    let lost = enforcement.lost_events()?;
    if args.json {
        let programs: std::collections::BTreeMap<_, _> =
            enforcement.programs().into_iter().collect();
        let status =
            serde_json::json!({ "agents": rows, "lost_events": lost, "programs": programs });
        println!("{status}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "pins: {}   cgroup parent: {}   lost kernel events: {lost}",
        args.kernel.pin_dir.display(),
        parent.path().display()
    );
    if rows.is_empty() {
        println!("no agents");
    }
    for row in rows {
        println!(
            "{}  cgroup {}  {}  gateway {}  procs {}{}",
            row.name,
            row.cgroup_id,
            row.state,
            row.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            row.processes,
            row.expires_in_s
                .map(|s| format!("  expires in {s:.0}s"))
                .unwrap_or_default()
        );
        let fmt = |m: &std::collections::BTreeMap<&str, u64>| {
            hook::NAMES
                .iter()
                .map(|h| format!("{h}={}", m.get(h).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("    allowed: {}", fmt(&row.allowed));
        println!("    denied:  {}", fmt(&row.denied));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn unload(args: UnloadArgs) -> anyhow::Result<ExitCode> {
    require_root("unload")?;
    if let Ok(parent) = CgroupParent::open(&args.kernel.cgroup_parent) {
        let agents = parent.agents()?;
        let running: Vec<String> = agents
            .iter()
            .filter(|a| a.pids().map(|p| !p.is_empty()).unwrap_or(true))
            .map(|a| a.name.clone())
            .collect();
        if !running.is_empty() && !args.force {
            anyhow::bail!(
                "agents are still running ({}); unloading would leave them unconfined. \
                 Stop them, or pass --force to kill them",
                running.join(", ")
            );
        }
        // Agents go first: while their cgroups exist the programs must stay attached.
        for agent in &agents {
            agent.remove(KILL_TIMEOUT)?;
        }
        kernel::unload(&args.kernel.pin_dir)?;
        parent.remove_if_empty()?;
    } else {
        kernel::unload(&args.kernel.pin_dir)?;
    }
    say!(
        "enforcer: unloaded (pins under {} removed)",
        args.kernel.pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
