//! Command-line parsing and dispatch. Each group of subcommands has its own file.

/// `eprintln!` that cannot panic. `run` and `confine` supervise an agent and ignore
/// SIGPIPE; a stderr that is closed, or a pipe whose reader left, must not unwind past
/// the code that ends the agent and cleans up after it. What cannot be written is lost.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod audit;
mod confine;
mod daemon;
mod envelope;
mod gateway;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// Runs AI agents inside signed, expiring Execution Envelopes: the kernel leaves an agent
/// only its gateway, the gateway checks every request, breakers cut it off.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the kernel state lives; the same values must be given to every command that
/// should act on the same agents.
#[derive(Debug, Clone, Args)]
pub struct KernelOpts {
    /// Directory in bpffs where maps and program links are pinned.
    #[arg(long, env = "ENFORCER_PIN_DIR", default_value = enforcer::kernel::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Parent cgroup of all agent cgroups, relative to the cgroup v2 mount.
    #[arg(long, env = "ENFORCER_CGROUP_PARENT", default_value = enforcer::sandbox::DEFAULT_CGROUP_PARENT)]
    pub cgroup_parent: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command confined by the kernel: it can reach the gateway address and nothing else.
    Confine(confine::ConfineArgs),
    /// Cut an agent off: everything it sends is dropped, its gateway included (through the
    /// daemon when the daemon runs the agent, so its gateway refuses too and the trip is audited).
    Trip(confine::TripArgs),
    /// Show the confined agents, their state and the kernel's allow/deny counters.
    Status(confine::StatusArgs),
    /// Detach the kernel programs and remove every pin and agent cgroup.
    Unload(confine::UnloadArgs),
    /// Generate an Envelope issuer key pair (PREFIX.key, PREFIX.pub).
    Keygen(envelope::KeygenArgs),
    /// Author, sign, verify and inspect Envelopes.
    #[command(subcommand)]
    Envelope(envelope::EnvelopeCommand),
    /// Run one agent's L7 gateway alone, without kernel confinement (development, policy tests).
    Gateway(gateway::GatewayArgs),
    /// Verify the audit log, show its records, make and check proofs.
    Audit(audit::AuditArgs),
    /// Run the daemon: verify Envelopes, confine agents, run their gateways, audit everything.
    Daemon(daemon::DaemonArgs),
    /// Run a command as an agent under a signed Envelope (asks the daemon to activate it).
    Run(daemon::RunArgs),
    #[command(flatten)]
    Operator(daemon::OperatorCommand),
    /// Print shell completions for the enforcer command.
    Completions {
        /// The shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Keygen(_)
            | Command::Envelope(_)
            | Command::Audit(_)
            | Command::Completions { .. }
    ) {
        end_quietly_on_a_closed_pipe();
    }
    match cli.command {
        Command::Confine(args) => confine::confine(args),
        Command::Trip(args) => confine::trip(args),
        Command::Status(args) => confine::status(args),
        Command::Unload(args) => confine::unload(args),
        Command::Keygen(args) => envelope::keygen(args),
        Command::Envelope(cmd) => envelope::run(cmd),
        Command::Gateway(args) => gateway::gateway(args),
        Command::Daemon(args) => daemon::daemon(args),
        Command::Run(args) => daemon::run(args),
        Command::Operator(cmd) => daemon::operator(cmd),
        Command::Audit(args) => audit::audit(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "enforcer",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `println!` that returns the error instead of panicking, for commands that keep
/// ignoring SIGPIPE (see [`end_quietly_on_a_closed_pipe`]).
fn print_line(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Commands that only print behave like other Unix tools when the reader goes away
/// (`enforcer audit show DIR | head`): SIGPIPE ends them. Rust ignores it by default, which
/// turns the closed pipe into a "Broken pipe" error or a panic in `println!`. The daemon,
/// the gateway and the commands that run an agent keep ignoring it: for them a peer that
/// goes away is an error to handle, not a reason to stop, and so it is for the operator
/// commands, whose error names the daemon that hung up.
fn end_quietly_on_a_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restoring the default disposition installs no handler of ours.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr cannot be written (a log file on a full disk, a closed pipe), the
        // subscriber would report it with `eprintln!`, which panics, taking down the task
        // that logged: a control request or a gateway connection then ends without its
        // answer. Diagnostics are best effort; the audit log is the record.
        .log_internal_errors(false)
        .init();
}

/// Operations that load BPF programs and create cgroups need root; say so plainly instead
/// of surfacing an EPERM from deep inside.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        anyhow::bail!(
            "`enforcer {what}` must run as root: it loads eBPF programs (CAP_BPF, CAP_NET_ADMIN) \
             and manages cgroups (CAP_SYS_ADMIN)"
        )
    }
}

/// Who an agent runs as, and its home, for `run` and `confine`.
pub struct AgentIdentity {
    pub user: enforcer::sandbox::AgentUser,
    /// Held until the agent runs as the uid; see [`enforcer::sandbox::lease_agent_uid`].
    pub lease: Option<enforcer::sandbox::UidLease>,
    pub home: enforcer::sandbox::AgentHome,
}

impl AgentIdentity {
    /// A uid of the agent's own unless `--user` names an account.
    pub fn choose(user: Option<&str>) -> anyhow::Result<Self> {
        let (user, lease) = match user {
            Some(name) => {
                let user = enforcer::sandbox::AgentUser::lookup(name)?;
                eprintln!(
                    "enforcer: warning: agents that share the user {name} can reach into each other's \
                     processes; leave out --user to give this agent a uid of its own"
                );
                (user, None)
            }
            None => {
                let (user, lease) = enforcer::sandbox::lease_agent_uid()?;
                (user, Some(lease))
            }
        };
        let home = enforcer::sandbox::AgentHome::create(&user)?;
        Ok(Self { user, lease, home })
    }
}

/// `--env KEY=VALUE` arguments, checked.
pub fn parse_env(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?}: give KEY=VALUE"))?;
            if key.is_empty() || key.bytes().any(|b| b == 0 || b.is_ascii_whitespace()) {
                anyhow::bail!("--env {pair:?}: {key:?} is not a usable variable name");
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}
