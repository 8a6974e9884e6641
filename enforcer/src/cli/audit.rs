//! `enforcer audit`: verify the log, show records, make and check proofs.
use std::{fs, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};
use ed25519_dalek::{VerifyingKey, pkcs8::DecodePublicKey};
use enforcer::audit::{self, EventKind, Proven, VerifyOptions, verify::list_segments};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every hash link, seq and checkpoint; report the first bad record.
    ///
    /// Exit status: 0 every record is covered by a signed checkpoint; 1 the log fails
    /// verification; 2 the chain holds but the last records are not yet signed.
    Verify {
        /// A checkpoint line saved earlier (or a proof containing one): start there, and
        /// require the log to still contain it.
        #[arg(long, value_name = "CHECKPOINT")]
        from: Option<PathBuf>,
        /// The daemon's public key (SPKI PEM). Without it, signatures are only checked
        /// against the key each checkpoint names.
        #[arg(long, value_name = "PUB")]
        key: Option<PathBuf>,
        /// The audit log directory.
        path: PathBuf,
    },
    /// Print records, filtered. Does not verify: run `verify` for that.
    Show(ShowArgs),
    /// Print an inclusion proof for record SEQ against the latest checkpoint covering it.
    Prove {
        seq: u64,
        /// The audit log directory.
        path: PathBuf,
        /// Check checkpoints against this public key (SPKI PEM) while reading the log.
        #[arg(long, value_name = "PUB")]
        key: Option<PathBuf>,
    },
    /// Print a consistency proof: the latest checkpoint extends the one of tree size OLD_SIZE.
    ProveConsistency {
        old_size: u64,
        /// The audit log directory.
        path: PathBuf,
        #[arg(long, value_name = "PUB")]
        key: Option<PathBuf>,
    },
    /// Check a proof offline with the public key only.
    VerifyProof {
        /// The daemon's public key (SPKI PEM).
        #[arg(long, value_name = "PUB")]
        key: PathBuf,
        /// The proof document printed by `prove` or `prove-consistency`.
        proof: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ShowArgs {
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    envelope: Option<String>,
    /// Event kind (e.g. request_denied) or `checkpoint`.
    #[arg(long)]
    kind: Option<String>,
    /// Only records at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    since: Option<OffsetDateTime>,
    /// Only records before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    until: Option<OffsetDateTime>,
    /// Print the raw record lines (JSON lines) instead of text.
    #[arg(long)]
    json: bool,
    /// The audit log directory.
    path: PathBuf,
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("not an RFC 3339 time: {e}"))
}

fn load_key(path: &PathBuf) -> anyhow::Result<VerifyingKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{}: not an ed25519 public key (SPKI PEM): {e}",
            path.display()
        )
    })
}

fn options(key: Option<&PathBuf>, from: Option<&PathBuf>) -> anyhow::Result<VerifyOptions> {
    let trusted_key = key.map(load_key).transpose()?;
    let from_checkpoint = match from {
        None => None,
        Some(p) => {
            let bytes = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            // A proof document carries its checkpoint line; accept it as well.
            let from_proof = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| {
                    v.get("checkpoint")
                        .or_else(|| v.get("new_checkpoint"))
                        .and_then(|c| c.as_str())
                        .map(|c| c.as_bytes().to_vec())
                });
            Some(from_proof.unwrap_or(bytes))
        }
    };
    Ok(VerifyOptions {
        trusted_key,
        from_checkpoint,
    })
}

pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AuditCommand::Verify { from, key, path } => {
            let opts = options(key.as_ref(), from.as_ref())?;
            let report = audit::verify(&path, &opts)?;
            if let Some(f) = &report.failure {
                println!("FAILED: {f}");
                println!(
                    "{} records verified before it, in {} segments",
                    report.records, report.segments
                );
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "ok: {} records ({} checkpoints) in {} segments verified",
                report.records, report.checkpoints, report.segments
            );
            if let Some(cp) = &report.last_checkpoint {
                println!(
                    "latest checkpoint: tree size {}, root {}, {} , key {}",
                    cp.tree_size,
                    hex::encode(cp.root),
                    cp.ts,
                    cp.key_id
                );
            }
            if !report.trusted_key {
                println!(
                    "warning: no --key given: checkpoints were checked against the key they name, not a trusted one"
                );
            }
            let unsigned = report.unsigned_tail();
            if unsigned > 0 {
                // The chain has no key: whoever can write the files can extend it. So these
                // records are not vouched for, and the exit status says so.
                println!(
                    "NOT SIGNED: the last {unsigned} records (seq {} to {}) are not covered by a checkpoint. \
                     The hash chain holds, but anyone able to write the log could have written them. \
                     On a running log, verify again after the next checkpoint; a stopped log ends with one, \
                     unless its writer crashed (the next start records and signs such records).",
                    report.log_size - unsigned,
                    report.log_size - 1
                );
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Show(args) => show(args),
        AuditCommand::Prove { seq, path, key } => {
            let opts = options(key.as_ref(), None)?;
            let proof = audit::prove_inclusion(&path, seq, &opts)?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::ProveConsistency {
            old_size,
            path,
            key,
        } => {
            let opts = options(key.as_ref(), None)?;
            let proof = audit::prove_consistency(&path, old_size, &opts)?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::VerifyProof { key, proof } => {
            let key = load_key(&key)?;
            let doc = fs::read(&proof).with_context(|| format!("reading {}", proof.display()))?;
            match audit::verify_proof(&doc, &key) {
                Ok(Proven::Inclusion {
                    seq,
                    record,
                    checkpoint,
                }) => {
                    println!(
                        "ok: record seq {seq} is in the log of {} records signed at {} by key {}",
                        checkpoint.tree_size, checkpoint.ts, checkpoint.key_id
                    );
                    println!("{record}");
                    Ok(ExitCode::SUCCESS)
                }
                Ok(Proven::Consistency { old, new }) => {
                    println!(
                        "ok: the log of {} records (signed {}) extends the log of {} records (signed {})",
                        new.tree_size, new.ts, old.tree_size, old.ts
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("FAILED: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    if let Some(k) = &args.kind
        && k != "checkpoint"
    {
        k.parse::<EventKind>().map_err(anyhow::Error::msg)?;
    }
    let segments = list_segments(&args.path)?;
    if segments.is_empty() {
        anyhow::bail!("no audit log segments in {}", args.path.display());
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for seg in segments {
        let data =
            fs::read(&seg.path).with_context(|| format!("reading {}", seg.path.display()))?;
        for (n, line) in data.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                eprintln!(
                    "{}:{}: not a JSON record, skipped",
                    seg.path.display(),
                    n + 1
                );
                continue;
            };
            let field = |k: &str| v.get(k).and_then(|x| x.as_str());
            if args
                .agent
                .as_deref()
                .is_some_and(|a| field("agent") != Some(a))
                || args
                    .envelope
                    .as_deref()
                    .is_some_and(|e| field("envelope") != Some(e))
                || args
                    .kind
                    .as_deref()
                    .is_some_and(|k| field("kind") != Some(k))
            {
                continue;
            }
            if args.since.is_some() || args.until.is_some() {
                let Some(ts) = field("ts").and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                else {
                    continue;
                };
                if args.since.is_some_and(|s| ts < s) || args.until.is_some_and(|u| ts >= u) {
                    continue;
                }
            }
            if args.json {
                out.write_all(line)?;
                out.write_all(b"\n")?;
                continue;
            }
            let mut text = format!(
                "{:>8} {} {}",
                v.get("seq").and_then(|s| s.as_u64()).unwrap_or_default(),
                field("ts").unwrap_or("-"),
                field("kind").unwrap_or("-")
            );
            for k in ["envelope", "agent", "rule"] {
                if let Some(x) = field(k) {
                    text.push_str(&format!(" {k}={x}"));
                }
            }
            if let Some(d) = v.get("details") {
                text.push_str(&format!(" {d}"));
            }
            if let Some(size) = v.get("tree_size") {
                text.push_str(&format!(
                    " tree_size={size} root={} key_id={}",
                    field("root").unwrap_or("-"),
                    field("key_id").unwrap_or("-")
                ));
            }
            writeln!(out, "{text}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
