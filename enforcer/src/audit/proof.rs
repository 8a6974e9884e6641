//! Inclusion and consistency proofs as self-contained JSON documents: they carry the exact
//! record and checkpoint lines, so an auditor needs nothing but the daemon's public key.
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::{
    AuditError,
    merkle::{
        Hash, consistency_path, inclusion_path, leaf_hash, verify_consistency, verify_inclusion,
    },
    record::{Checkpoint, parse_hash, parse_head},
    verify::{VerifyOptions, verify_with},
};

pub const INCLUSION_FORMAT: &str = "enforcer-audit-inclusion-proof/v1";
pub const CONSISTENCY_FORMAT: &str = "enforcer-audit-consistency-proof/v1";

/// Record `seq` is leaf `seq` of the tree the checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub format: String,
    pub seq: u64,
    /// The record line, exactly as in the log.
    pub record: String,
    pub tree_size: u64,
    /// Sibling hashes, leaf to root (RFC 9162 §2.1.3), hex.
    pub path: Vec<String>,
    /// The checkpoint line, exactly as in the log.
    pub checkpoint: String,
}

/// The tree the new checkpoint signs extends the one the old checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    pub format: String,
    pub old_checkpoint: String,
    pub new_checkpoint: String,
    /// RFC 9162 §2.1.4 consistency path, hex.
    pub path: Vec<String>,
}

/// What a verified proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proven {
    Inclusion {
        seq: u64,
        record: String,
        checkpoint: Box<Checkpoint>,
    },
    Consistency {
        old: Box<Checkpoint>,
        new: Box<Checkpoint>,
    },
}

struct Collected {
    leaves: Vec<Hash>,
    target: Option<String>,
    checkpoints: Vec<(u64, String)>,
}

/// Verifies the whole log (a proof from a damaged log would be worthless) while keeping
/// every leaf hash.
fn collect(dir: &Path, opts: &VerifyOptions, want: Option<u64>) -> Result<Collected, AuditError> {
    let mut c = Collected {
        leaves: Vec::new(),
        target: None,
        checkpoints: Vec::new(),
    };
    let opts = VerifyOptions {
        from_checkpoint: None,
        ..opts.clone()
    };
    let report = verify_with(dir, &opts, |seq, line, leaf| {
        c.leaves.push(*leaf);
        if Some(seq) == want {
            c.target = Some(String::from_utf8_lossy(line).into_owned());
        }
        if parse_head(line).is_ok_and(|h| h.is_checkpoint()) {
            c.checkpoints
                .push((seq, String::from_utf8_lossy(line).into_owned()));
        }
    })?;
    if let Some(failure) = report.failure {
        return Err(AuditError::Corrupt {
            dir: dir.to_owned(),
            failure: Box::new(failure),
        });
    }
    Ok(c)
}

fn hexes(hs: &[Hash]) -> Vec<String> {
    hs.iter().map(hex::encode).collect()
}

fn unhex(hs: &[String]) -> Result<Vec<Hash>, AuditError> {
    hs.iter()
        .map(|h| {
            parse_hash(h.as_bytes())
                .ok_or_else(|| AuditError::Proof(format!("{h:?} is not a hash")))
        })
        .collect()
}

/// An inclusion proof for record `seq` against the latest checkpoint that covers it.
pub fn prove_inclusion(
    dir: &Path,
    seq: u64,
    opts: &VerifyOptions,
) -> Result<InclusionProof, AuditError> {
    let c = collect(dir, opts, Some(seq))?;
    let record = c
        .target
        .ok_or_else(|| AuditError::Proof(format!("the log has no record seq {seq}")))?;
    let (size, cp) = c
        .checkpoints
        .iter()
        .rev()
        .find(|(cp_seq, _)| *cp_seq > seq)
        .cloned()
        .ok_or_else(|| {
            AuditError::Proof(format!(
                "no checkpoint covers seq {seq} yet; one is written every N records or T seconds"
            ))
        })?;
    let path = usize::try_from(size)
        .ok()
        .and_then(|n| c.leaves.get(..n))
        .and_then(|leaves| inclusion_path(seq as usize, leaves))
        .ok_or_else(|| AuditError::Proof("cannot build the inclusion path".into()))?;
    Ok(InclusionProof {
        format: INCLUSION_FORMAT.into(),
        seq,
        record,
        tree_size: size,
        path: hexes(&path),
        checkpoint: cp,
    })
}

/// A consistency proof from the checkpoint of tree size `old_size` to the latest one.
pub fn prove_consistency(
    dir: &Path,
    old_size: u64,
    opts: &VerifyOptions,
) -> Result<ConsistencyProof, AuditError> {
    let c = collect(dir, opts, None)?;
    let old = c
        .checkpoints
        .iter()
        .find(|(s, _)| *s == old_size)
        .ok_or_else(|| {
            AuditError::Proof(format!("the log has no checkpoint of tree size {old_size}"))
        })?;
    let (new_size, new) = c
        .checkpoints
        .last()
        .ok_or_else(|| AuditError::Proof("the log has no checkpoint".into()))?;
    let path = usize::try_from(*new_size)
        .ok()
        .and_then(|n| c.leaves.get(..n))
        .and_then(|leaves| consistency_path(old_size as usize, leaves))
        .ok_or_else(|| AuditError::Proof("cannot build the consistency path".into()))?;
    Ok(ConsistencyProof {
        format: CONSISTENCY_FORMAT.into(),
        old_checkpoint: old.1.clone(),
        new_checkpoint: new.clone(),
        path: hexes(&path),
    })
}

fn trusted_checkpoint(line: &str, key: &VerifyingKey) -> Result<Checkpoint, AuditError> {
    let cp = Checkpoint::parse(line.as_bytes()).map_err(|e| AuditError::Proof(e.to_string()))?;
    cp.verify_signature(Some(key))
        .map_err(|e| AuditError::Proof(e.to_string()))?;
    Ok(cp)
}

/// Checks a proof document offline with the daemon's public key only.
pub fn verify_proof(json: &[u8], key: &VerifyingKey) -> Result<Proven, AuditError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| AuditError::Proof(format!("not JSON: {e}")))?;
    let bad = |e: serde_json::Error| AuditError::Proof(e.to_string());
    match value.get("format").and_then(|f| f.as_str()) {
        Some(INCLUSION_FORMAT) => {
            let p: InclusionProof = serde_json::from_value(value).map_err(bad)?;
            let cp = trusted_checkpoint(&p.checkpoint, key)?;
            if cp.tree_size != p.tree_size {
                return Err(AuditError::Proof(
                    "tree_size differs from the checkpoint's".into(),
                ));
            }
            let head = parse_head(p.record.as_bytes())
                .map_err(|e| AuditError::Proof(format!("record: {e}")))?;
            if head.seq != p.seq {
                return Err(AuditError::Proof(format!(
                    "the record is seq {}, not {}",
                    head.seq, p.seq
                )));
            }
            let path = unhex(&p.path)?;
            if !verify_inclusion(
                p.seq,
                cp.tree_size,
                &leaf_hash(p.record.as_bytes()),
                &path,
                &cp.root,
            ) {
                return Err(AuditError::Proof(
                    "inclusion path does not lead to the signed root: record or proof altered"
                        .into(),
                ));
            }
            Ok(Proven::Inclusion {
                seq: p.seq,
                record: p.record,
                checkpoint: Box::new(cp),
            })
        }
        Some(CONSISTENCY_FORMAT) => {
            let p: ConsistencyProof = serde_json::from_value(value).map_err(bad)?;
            let old = trusted_checkpoint(&p.old_checkpoint, key)?;
            let new = trusted_checkpoint(&p.new_checkpoint, key)?;
            let path = unhex(&p.path)?;
            if !verify_consistency(old.tree_size, new.tree_size, &old.root, &new.root, &path) {
                return Err(AuditError::Proof(
                    "the newer checkpoint does not extend the older one: the log was rewritten or the proof altered".into(),
                ));
            }
            Ok(Proven::Consistency {
                old: Box::new(old),
                new: Box::new(new),
            })
        }
        _ => Err(AuditError::Proof(format!(
            "unknown format; expected {INCLUSION_FORMAT} or {CONSISTENCY_FORMAT}"
        ))),
    }
}
