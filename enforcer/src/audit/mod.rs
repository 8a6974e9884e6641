//! The tamper-evident audit log: every decision recorded before it takes effect, and any
//! later change, removal, reordering or truncation detectable.
//!
//! - [`event`]: what is recorded ([`Event`], [`EventKind`]), with credentials redacted.
//! - [`record`]: the exact bytes of a record line and of a signed [`Checkpoint`].
//! - [`merkle`]: RFC 9162 tree hashing, inclusion and consistency proofs.
//! - [`writer`]: [`AuditLog`], the group-committing writer the gateway and daemon use.
//! - [`verify`]: offline verification naming the first bad record.
//! - [`proof`]: proof documents an auditor checks with the public key alone.
//!
//! The format and guarantees are described in `docs/audit.md`.
use std::{io, path::PathBuf, sync::Arc};

pub mod event;
pub mod merkle;
pub mod proof;
pub mod record;
pub mod verify;
pub mod writer;

#[cfg(test)]
mod tests;

pub use event::{Detail, Event, EventKind, EventView, Recordable};
pub use proof::{
    ConsistencyProof, InclusionProof, Proven, prove_consistency, prove_inclusion, verify_proof,
};
pub use record::Checkpoint;
pub use verify::{Failure, Problem, VerifyOptions, VerifyReport, verify};
pub use writer::{
    AuditConfig, AuditLog, OpenReport, PendingRecord, Receipt, Recovery, Stats, Until,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The request path must refuse: the record could not even be queued.
    #[error("audit queue is full ({capacity} records waiting): refusing to act without a record")]
    QueueFull { capacity: usize },
    /// A write or fsync failed; the log accepts nothing more until reopened.
    #[error("the audit log cannot record anything: {0}")]
    Failed(Arc<str>),
    #[error("the audit log is closed")]
    Closed,
    /// The event cannot be written as JSON; this one record is refused, the log goes on.
    #[error("cannot encode the audit event: {0}")]
    Encode(Arc<str>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("no audit log segments (audit-<seq>.jsonl) in {0}")]
    NoLog(PathBuf),
    #[error("the audit log in {} is damaged: {failure}", dir.display())]
    Corrupt { dir: PathBuf, failure: Box<Failure> },
    #[error("{0}")]
    Trust(String),
    #[error("invalid audit configuration: {0}")]
    Config(String),
    #[error("proof: {0}")]
    Proof(String),
}

impl AuditError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
