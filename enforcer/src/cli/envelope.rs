//! `enforcer keygen` and `enforcer envelope {new,sign,verify,inspect}`.
use std::{
    fmt::Write as _,
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context;
use clap::{Args, Subcommand};
use enforcer::envelope::{
    self, Envelope, Floor, Keyring, Revocations, SystemClock, UsedIds, Verifier, VerifyOptions,
    model::Budget,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (private, mode 0600) and PREFIX.pub; refuses to overwrite either.
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum EnvelopeCommand {
    /// Print a commented example Envelope (TOML), valid from now for one hour.
    New,
    /// Validate an Envelope (TOML) and sign it.
    Sign(SignArgs),
    /// Verify a signed Envelope; exit 0 if it would be accepted, non-zero with the reason.
    Verify(VerifyArgs),
    /// Summarize a signed Envelope: what the agent may reach, spend, never do, until when.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// Private key file (PEM PKCS#8, mode 0600).
    #[arg(long)]
    key: PathBuf,
    /// Envelope source (TOML).
    input: PathBuf,
    /// Where to write the signed Envelope (JSON); stdout if absent.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Set issued_at and not_before to now and expires_at to now + SECS before signing.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    valid_for: Option<u32>,
    /// Replace the id with a fresh random one before signing (ids are single use).
    #[arg(long)]
    new_id: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Directory of trusted issuer public keys (*.pub).
    #[arg(long)]
    trust: PathBuf,
    /// Host policy floor (TOML).
    #[arg(long)]
    floor: Option<PathBuf>,
    /// Used-id store; without it replay is not checked.
    #[arg(long, value_name = "FILE")]
    used_ids: Option<PathBuf>,
    /// Record the id as used after a successful verification (needs --used-ids).
    #[arg(long, requires = "used_ids")]
    consume: bool,
    /// Revocation list: lines `key <keyid>` / `envelope <id>`.
    #[arg(long)]
    revoked: Option<PathBuf>,
    /// Clock skew tolerance in seconds.
    #[arg(long, default_value_t = 60)]
    skew: u32,
    /// Longest lifetime (expires_at - not_before) accepted, in seconds.
    #[arg(long, default_value_t = 86_400)]
    max_lifetime: u32,
    /// Signed Envelope (JSON); `-` for stdin.
    input: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Also verify the signature against this trust directory (replay is not checked).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Signed Envelope (JSON); `-` for stdin.
    input: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let id = envelope::generate_keypair(&args.out)?;
    let (k, p) = envelope::keys::key_paths(&args.out);
    println!(
        "wrote {} (private, keep it secret) and {}\nkey id {id}",
        k.display(),
        p.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: EnvelopeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EnvelopeCommand::New => {
            print!("{}", envelope::example_toml(OffsetDateTime::now_utc()));
            Ok(ExitCode::SUCCESS)
        }
        EnvelopeCommand::Sign(a) => sign(a),
        EnvelopeCommand::Verify(a) => verify(a),
        EnvelopeCommand::Inspect(a) => inspect(a),
    }
}

pub(super) fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let limit = envelope::validate::MAX_ENVELOPE_BYTES as u64 + 1;
    let mut buf = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .take(limit)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

fn sign(a: SignArgs) -> anyhow::Result<ExitCode> {
    let key = envelope::load_signing_key(&a.key)?;
    let src = read_input(&a.input)?;
    let src = String::from_utf8(src).context("the envelope source is not UTF-8")?;
    let mut env = match envelope::from_toml(&src) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("{}: {e}", a.input.display());
            eprintln!("kind: {}", e.kind());
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(secs) = a.valid_for {
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        env.issued_at = envelope::model::Timestamp(now);
        env.not_before = envelope::model::Timestamp(now);
        env.expires_at = envelope::model::Timestamp(now + Duration::seconds(i64::from(secs)));
    }
    if a.new_id {
        env.id = envelope::fresh_id();
    }
    let signed = envelope::sign_envelope(&env, &key)?;
    let json = signed.to_json();
    match &a.out {
        Some(out) => {
            std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?
        }
        None => print!("{json}"),
    }
    eprintln!(
        "signed envelope {} (expires {}) with key {}",
        env.id,
        env.expires_at,
        envelope::key_id(&key.verifying_key())
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn build_verifier(
    trust: &Path,
    floor: Option<&PathBuf>,
    revoked: Option<&PathBuf>,
    options: VerifyOptions,
) -> anyhow::Result<Verifier> {
    let keyring = Keyring::load_dir(trust)?;
    let mut v = Verifier::new(keyring)
        .with_options(options)
        .with_clock(Arc::new(SystemClock));
    if let Some(f) = floor {
        v = v.with_floor(Floor::load(f)?);
    }
    if let Some(r) = revoked {
        v = v.with_revocations(Revocations::load(r)?);
    }
    Ok(v)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let options = VerifyOptions {
        clock_skew: Duration::seconds(i64::from(a.skew)),
        max_lifetime: Duration::seconds(i64::from(a.max_lifetime)),
        ..VerifyOptions::default()
    };
    let verifier = build_verifier(&a.trust, a.floor.as_ref(), a.revoked.as_ref(), options)?;
    let mut used = match &a.used_ids {
        Some(p) => UsedIds::open(p)?,
        None => UsedIds::in_memory(),
    };
    let input = read_input(&a.input)?;
    let result = if a.consume {
        verifier.verify_and_consume(&input, &mut used)
    } else {
        verifier.verify(&input, &used)
    };
    match result {
        Ok(v) => {
            println!(
                "ok: envelope {} for {} signed by key {}, valid until {}{}",
                v.id(),
                v.envelope().subject,
                v.key_id(),
                v.envelope().expires_at,
                if a.consume {
                    " (id now marked used)"
                } else {
                    ""
                }
            );
            if a.used_ids.is_none() {
                println!("note: replay not checked (no --used-ids)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("refused: {e}");
            eprintln!("kind: {}", e.kind());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let input = read_input(&a.input)?;
    let status = match &a.trust {
        Some(trust) => {
            let verifier = build_verifier(trust, None, None, VerifyOptions::default())?;
            match verifier.verify(&input, &UsedIds::in_memory()) {
                Ok(v) => format!(
                    "VERIFIED: signature by trusted key {} checked, times valid (replay not checked)",
                    v.key_id()
                ),
                Err(e) => format!("NOT ACCEPTED ({}): {e}", e.kind()),
            }
        }
        None => "signature NOT checked (no --trust given); do not rely on this content".into(),
    };
    let (wrapper, payload) = match envelope::decode_unverified(&input) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("cannot read: {e}\nkind: {}", e.kind());
            return Ok(ExitCode::FAILURE);
        }
    };
    let env = match envelope::from_json(&payload) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("cannot read the payload: {e}\nkind: {}", e.kind());
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("{status}");
    let keyids: Vec<&str> = wrapper
        .signatures
        .iter()
        .map(|s| s.keyid.as_str())
        .collect();
    println!("signed by key id(s): {}", keyids.join(", "));
    print!("{}", summary(&env));
    Ok(ExitCode::SUCCESS)
}

fn budget_line(b: &Budget) -> String {
    let mut parts = Vec::new();
    if let Some(r) = b.requests {
        parts.push(format!("{r} requests"));
    }
    if let Some(s) = &b.spend {
        let mut t = match s.max {
            Some(m) => format!("spend ≤ {m} {}", s.currency),
            None => format!("spend counted in {}", s.currency),
        };
        if let Some(a) = &s.amount {
            let _ = write!(t, " (cost = {a}");
            if let Some(m) = &s.multiplier {
                let _ = write!(t, " × {m}");
            }
            t.push(')');
        }
        parts.push(t);
    }
    if let Some(u) = b.bytes_up {
        parts.push(format!("{u} bytes up"));
    }
    if let Some(d) = b.bytes_down {
        parts.push(format!("{d} bytes down"));
    }
    if let Some(w) = b.wall_clock_secs {
        parts.push(format!("{w} s wall clock"));
    }
    if parts.is_empty() {
        "no limits at this level".into()
    } else {
        parts.join(", ")
    }
}

fn summary(env: &Envelope) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "envelope {} (version {})", env.id, env.version);
    let _ = writeln!(o, "  agent:   {}", env.subject);
    let _ = writeln!(o, "  task:    {}", env.task);
    let _ = writeln!(o, "  issuer:  {} at {}", env.issuer, env.issued_at);
    let _ = writeln!(o, "  valid:   {} until {}", env.not_before, env.expires_at);
    if let Some(b) = &env.budget {
        let _ = writeln!(o, "  total budget: {}", budget_line(b));
    }
    let _ = writeln!(o, "may reach (everything else is denied):");
    for c in &env.capabilities {
        let _ = writeln!(o, "  - {} → {}", c.name, c.upstream);
        for r in &c.routes {
            let ms: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
            let _ = writeln!(o, "      {} {}", ms.join(","), r.path);
        }
        for k in &c.constraints {
            let _ = writeln!(o, "      where {}", constraint_text(k));
        }
        if let Some(cr) = &c.credential {
            let _ = writeln!(
                o,
                "      credential: secret `{}` injected as {}",
                cr.secret, cr.header
            );
        }
        if let Some(b) = &c.budget {
            let _ = writeln!(o, "      budget: {}", budget_line(b));
        }
    }
    let _ = writeln!(o, "never (forbidden effects, checked first):");
    if env.forbidden_effects.is_empty() {
        let _ = writeln!(o, "  (none in the envelope; the host floor may add some)");
    }
    for f in &env.forbidden_effects {
        let _ = writeln!(
            o,
            "  - {}: {}",
            pattern_text(&f.methods, f.host.as_ref(), f.path.as_ref(), &f.when),
            f.reason
        );
    }
    if !env.approvals.is_empty() {
        let _ = writeln!(o, "needs a human:");
        for a in &env.approvals {
            let _ = writeln!(
                o,
                "  - {} (denied after {} s): {}",
                pattern_text(&a.methods, a.host.as_ref(), a.path.as_ref(), &a.when),
                a.timeout_secs,
                a.reason
            );
        }
    }
    if let Some(b) = &env.breakers {
        let mut parts = Vec::new();
        if let Some(d) = &b.denied {
            parts.push(format!("{} denials in {} s", d.count, d.window_secs));
        }
        if let Some(s) = &b.spend_velocity {
            parts.push(format!(
                "spend > {} {} in {} s",
                s.max, s.currency, s.window_secs
            ));
        }
        if b.on_forbidden {
            parts.push("any forbidden attempt".into());
        }
        if let Some(u) = &b.upstream_errors {
            parts.push(format!(
                "upstream error rate ≥ {} over {} s (min {} requests)",
                u.rate, u.window_secs, u.min_requests
            ));
        }
        let _ = writeln!(o, "cut off on: {}", parts.join("; "));
    }
    if let Some(r) = &env.resources {
        let _ = writeln!(
            o,
            "resources: pids {:?}, memory {:?} bytes, cpu {:?}%",
            r.pids, r.memory_bytes, r.cpu_percent
        );
    }
    o
}

fn constraint_text(c: &envelope::model::Constraint) -> String {
    let mut rules = Vec::new();
    if let Some(e) = &c.equals {
        rules.push(format!("= {e}"));
    }
    if let Some(v) = &c.one_of {
        let vs: Vec<String> = v.iter().map(ToString::to_string).collect();
        rules.push(format!("in [{}]", vs.join(", ")));
    }
    if let Some(m) = c.min {
        rules.push(format!("≥ {m}"));
    }
    if let Some(m) = c.max {
        rules.push(format!("≤ {m}"));
    }
    if let Some(m) = c.max_length {
        rules.push(format!("length ≤ {m}"));
    }
    if let Some(r) = &c.regex {
        rules.push(format!("matches /{}/", r.as_str()));
    }
    format!(
        "{} {}{}",
        c.target(),
        rules.join(" and "),
        if c.optional { " (if present)" } else { "" }
    )
}

fn pattern_text(
    methods: &[envelope::model::Method],
    host: Option<&envelope::HostPattern>,
    path: Option<&envelope::PathPattern>,
    when: &[envelope::model::Constraint],
) -> String {
    let ms = if methods.is_empty() {
        "any method".to_owned()
    } else {
        methods
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut t = format!(
        "{ms} {}{}",
        host.map_or("any host", |h| h.as_str()),
        path.map_or(String::new(), |p| p.as_str().to_owned())
    );
    for c in when {
        let _ = write!(t, " where {}", constraint_text(c));
    }
    t
}
