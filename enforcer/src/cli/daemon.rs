//! `enforcer daemon`, `enforcer run`, and the operator commands that talk to the daemon.
use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};
use enforcer::{
    control::{self, Op},
    daemon::{Daemon, DaemonConfig},
    sandbox::AgentCgroup,
};

use super::require_root;

#[derive(Debug, Clone, Args)]
pub struct SocketOpts {
    /// The daemon's control socket.
    #[arg(
        long,
        env = "ENFORCER_CONTROL_SOCKET",
        default_value = "/run/enforcer/control.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon configuration (TOML); see dist/enforcer.toml.
    #[arg(long, default_value = enforcer::daemon::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    socket: SocketOpts,
    /// The signed Envelope to run under.
    #[arg(long)]
    envelope: PathBuf,
    /// Run as this account instead of a uid of the agent's own (agents sharing a user can
    /// reach into each other's processes).
    #[arg(long)]
    user: Option<String>,
    /// Set a variable in the agent's environment, which starts empty but for PATH, HOME,
    /// TMPDIR, LANG, TERM, the proxy and CA variables and ENFORCER_AGENT (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// The agent command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// List active agents with their state, budgets and counters (JSON).
    Agents {
        #[command(flatten)]
        socket: SocketOpts,
        /// Only this agent.
        agent: Option<String>,
    },
    /// Close a tripped circuit: the agent may use its gateway again.
    Reset {
        #[command(flatten)]
        socket: SocketOpts,
        agent: String,
    },
    /// Revoke the agent's Envelope: cut off now, never again activatable on this host.
    Revoke {
        #[command(flatten)]
        socket: SocketOpts,
        agent: String,
    },
    /// List requests held for approval.
    Approvals {
        #[command(flatten)]
        socket: SocketOpts,
        agent: Option<String>,
    },
    /// Approve a held request.
    Approve {
        #[command(flatten)]
        socket: SocketOpts,
        agent: String,
        id: u64,
    },
    /// Deny a held request.
    Deny {
        #[command(flatten)]
        socket: SocketOpts,
        agent: String,
        id: u64,
    },
    /// Make the daemon read its config again: trusted keys, floor, revocations and secrets
    /// change live; running agents whose Envelope no longer verifies are cut off for good.
    Reload {
        #[command(flatten)]
        socket: SocketOpts,
        /// Only say which agents the new config would cut off; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask the daemon to drain and exit (agents stay confined).
    Shutdown {
        #[command(flatten)]
        socket: SocketOpts,
    },
}

pub fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let loaded = DaemonConfig::load(&args.config)?;
    if args.check {
        super::print_line(&format!("{}: ok", args.config.display()))
            .context("printing the result of the check")?;
        return Ok(ExitCode::SUCCESS);
    }
    require_root("daemon")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(Daemon::run(loaded))?;
    Ok(ExitCode::SUCCESS)
}

fn call(socket: &SocketOpts, op: Op) -> anyhow::Result<serde_json::Value> {
    Ok(control::call(
        &socket.socket,
        op,
        Some(Duration::from_secs(30)),
    )?)
}

pub fn operator(cmd: OperatorCommand) -> anyhow::Result<ExitCode> {
    let (socket, op) = match cmd {
        OperatorCommand::Agents { socket, agent } => (socket, Op::Status { agent }),
        OperatorCommand::Reset { socket, agent } => (socket, Op::Reset { agent }),
        OperatorCommand::Revoke { socket, agent } => (socket, Op::Revoke { agent }),
        OperatorCommand::Approvals { socket, agent } => (socket, Op::Approvals { agent }),
        OperatorCommand::Approve { socket, agent, id } => (socket, Op::Approve { agent, id }),
        OperatorCommand::Deny { socket, agent, id } => (socket, Op::Deny { agent, id }),
        OperatorCommand::Reload { socket, dry_run } => (socket, Op::Reload { dry_run }),
        OperatorCommand::Shutdown { socket } => (socket, Op::Shutdown),
    };
    let result = call(&socket, op)?;
    let text = serde_json::to_string_pretty(&result)?;
    // The daemon has acted by now: a stdout that is gone must not turn that into a panic,
    // nor hide that it happened.
    if let Err(e) = super::print_line(&text) {
        say!("enforcer: the daemon answered, but its answer could not be printed: {e}");
        say!("{text}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    require_root("run")?;
    let envelope = std::fs::read_to_string(&args.envelope)
        .with_context(|| format!("reading {}", args.envelope.display()))?;
    let extra_env = super::parse_env(&args.env)?;
    let mut identity = super::AgentIdentity::choose(args.user.as_deref())?;
    let activated = call(&args.socket, Op::Activate { envelope })?;
    let field = |name: &str| {
        activated
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let agent = field("agent").context("the daemon did not name the agent")?;
    let gateway = field("gateway").context("the daemon did not name the gateway")?;
    let cgroup = field("cgroup").context("the daemon did not name the cgroup")?;
    let ca = field("ca_file").context("the daemon did not name the CA file")?;
    if let Some(notes) = activated.get("notes").and_then(|n| n.as_array()) {
        for note in notes.iter().filter_map(|n| n.as_str()) {
            say!("enforcer: note: {note}");
        }
    }
    say!(
        "enforcer: agent {agent} active until {}; gateway {gateway}",
        field("expires_at").unwrap_or_default()
    );
    let cgroup = AgentCgroup::at(PathBuf::from(cgroup), agent.clone())?;
    let proxy = format!("http://{gateway}");
    let mut env = extra_env;
    env.extend(
        [
            ("HTTP_PROXY", proxy.as_str()),
            ("HTTPS_PROXY", proxy.as_str()),
            ("http_proxy", proxy.as_str()),
            ("https_proxy", proxy.as_str()),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
            ("SSL_CERT_FILE", ca.as_str()),
            ("CURL_CA_BUNDLE", ca.as_str()),
            ("REQUESTS_CA_BUNDLE", ca.as_str()),
            ("ENFORCER_AGENT", agent.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let env = enforcer::sandbox::agent_env(identity.home.path(), &env);
    let (program, rest) = args.command.split_first().context("no command given")?;
    let status = match cgroup.spawn(program, rest, &identity.user, &env) {
        Ok(child) => {
            identity.lease = None;
            wait_ending_on_signals(child)
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    let summary = call(
        &args.socket,
        Op::Deactivate {
            agent: agent.clone(),
        },
    );
    let status = status?;
    let summary = summary?;
    if args.json {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&summary)?
        );
    } else {
        print_summary(&summary);
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    })
}

/// Waits for the agent. It leads a session of its own, so Ctrl-C at the terminal reaches
/// this process, not it: SIGINT and SIGTERM are passed on (SIGTERM, then SIGKILL), and
/// the daemon's deactivation ends whatever is left in the cgroup.
fn wait_ending_on_signals(
    mut child: std::process::Child,
) -> anyhow::Result<std::process::ExitStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pid = child.id() as i32;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    runtime.block_on(async move {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        // The first signal asks; an agent that ignores it is killed at the second.
        let mut signal = libc::SIGTERM;
        loop {
            tokio::select! {
                _ = sigint.recv() => {
                    // SAFETY: plain kill(2) of our own child, not yet reaped.
                    unsafe { libc::kill(pid, signal) };
                    signal = libc::SIGKILL;
                }
                _ = sigterm.recv() => {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, signal) };
                    signal = libc::SIGKILL;
                }
                status = &mut done_rx => {
                    return status
                        .map_err(|_| anyhow::anyhow!("the agent waiter vanished"))?
                        .context("waiting for the agent");
                }
            }
        }
    })
}

fn print_summary(s: &serde_json::Value) {
    let get = |p: &str| s.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
    say!(
        "enforcer: summary for {} (Envelope {})",
        get("/agent"),
        get("/envelope")
    );
    say!(
        "  final state:       {}{}",
        get("/state"),
        s.pointer("/breaker")
            .and_then(|b| b.as_str())
            .map(|b| format!(" ({b})"))
            .unwrap_or_default()
    );
    say!(
        "  requests:          {} allowed, {} denied, {} held",
        get("/requests/allowed"),
        get("/requests/denied"),
        get("/requests/held")
    );
    if let Some(budgets) = s.get("budgets").and_then(|b| b.as_object()) {
        for (scope, b) in budgets {
            say!(
                "  budget {scope}: requests {} spend {}",
                b["requests"],
                b["spend"]
            );
        }
    }
    let denied: u64 = s
        .pointer("/kernel/denied")
        .and_then(|d| d.as_object())
        .map(|d| d.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    say!("  kernel denials:    {denied}");
}
