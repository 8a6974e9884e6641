//! Offline verification: every link, every sequence number, every checkpoint signature and
//! root, and the first bad record named by file, line and seq. Lines are never parsed as
//! JSON except checkpoints: the fixed opening and closing give kind, seq and prev, and the
//! raw bytes are hashed, which keeps verification above a million records a second.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;

use super::{
    AuditError,
    merkle::{Frontier, GENESIS, Hash, chain_hash, leaf_hash},
    record::{Checkpoint, CheckpointError, parse_head},
};

const SEGMENT_PREFIX: &str = "audit-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// A segment file; its name carries the seq of its first record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
}

pub fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The segments in `dir`, in order. Other files are ignored.
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>, AuditError> {
    let entries =
        fs::read_dir(dir).map_err(|e| AuditError::io(format!("reading {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| AuditError::io(format!("reading {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
        else {
            continue;
        };
        if num.len() != 20 || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(first_seq) = num.parse() else { continue };
        out.push(Segment {
            path: entry.path(),
            first_seq,
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// What is wrong with the first bad record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("hash mismatch: {0}")]
    HashMismatch(String),
    #[error("seq gap: expected seq {expected}, found {found}: records {expected}..={last} are missing{note}", last = found - 1)]
    SeqGap {
        expected: u64,
        found: u64,
        note: &'static str,
    },
    #[error("reordered: expected seq {expected}, found {found}")]
    Reordered { expected: u64, found: u64 },
    #[error("bad checkpoint signature: {0}")]
    BadCheckpointSignature(String),
    #[error("checkpoint root mismatch: {0}")]
    CheckpointRootMismatch(String),
    #[error(
        "truncated tail: the trusted checkpoint covers {checkpoint_size} records but the log ends after {log_size}"
    )]
    TruncatedTail { checkpoint_size: u64, log_size: u64 },
    #[error(
        "torn tail: the last line is incomplete (no newline); opening the log for writing cuts it away"
    )]
    TornTail,
    #[error("segment replaced: {0}")]
    SegmentReplaced(String),
}

/// Where the first bad record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub segment: PathBuf,
    /// 1-based line number in the segment.
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: Problem,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.segment.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, "seq {seq}: ")?;
        }
        write!(f, "{}", self.problem)
    }
}

/// Why one line does not follow from the ones before.
#[derive(Debug)]
pub(crate) enum StepError {
    Head(&'static str),
    Seq { expected: u64, found: u64 },
    Prev,
    Checkpoint(CheckpointError),
}

/// The running state of the chain and tree.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub next_seq: u64,
    pub prev: Hash,
    pub frontier: Frontier,
    pub last_checkpoint: Option<Checkpoint>,
}

impl Chain {
    pub fn genesis() -> Self {
        Self {
            next_seq: 0,
            prev: GENESIS,
            frontier: Frontier::new(),
            last_checkpoint: None,
        }
    }

    /// The state just after the checkpoint record `line`.
    pub fn after_checkpoint(cp: Checkpoint, line: &[u8]) -> Result<Self, CheckpointError> {
        let mut frontier = cp.frontier()?;
        frontier.push(leaf_hash(line));
        Ok(Self {
            next_seq: cp.seq + 1,
            prev: chain_hash(line),
            frontier,
            last_checkpoint: Some(cp),
        })
    }

    /// Takes the next line (without newline); returns its leaf hash.
    pub fn step(&mut self, line: &[u8], trusted: Option<&VerifyingKey>) -> Result<Hash, StepError> {
        let head = parse_head(line).map_err(StepError::Head)?;
        if head.seq != self.next_seq {
            return Err(StepError::Seq {
                expected: self.next_seq,
                found: head.seq,
            });
        }
        if head.prev != self.prev {
            return Err(StepError::Prev);
        }
        if head.is_checkpoint() {
            let cp = Checkpoint::parse(line).map_err(StepError::Checkpoint)?;
            cp.verify_signature(trusted)
                .map_err(StepError::Checkpoint)?;
            if cp.root != self.frontier.root() {
                return Err(StepError::Checkpoint(CheckpointError::RootMismatch(
                    format!(
                        "signed root {} is not the root {} of the {} records before it",
                        hex::encode(cp.root),
                        hex::encode(self.frontier.root()),
                        self.frontier.size()
                    ),
                )));
            }
            if cp.frontier != self.frontier.nodes() {
                return Err(StepError::Checkpoint(CheckpointError::RootMismatch(
                    "stored frontier differs from the recomputed tree".to_owned(),
                )));
            }
            self.last_checkpoint = Some(cp);
        }
        let leaf = leaf_hash(line);
        self.frontier.push(leaf);
        self.prev = leaf;
        self.next_seq += 1;
        Ok(leaf)
    }
}

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The daemon's public key. Without it, checkpoints are checked against the key they
    /// name, which catches alteration but not a log re-signed by someone else.
    pub trusted_key: Option<VerifyingKey>,
    /// A checkpoint line saved earlier and trusted: verification starts there (records
    /// before it are not rechecked) and the log must still contain it, byte for byte.
    pub from_checkpoint: Option<Vec<u8>>,
}

/// The outcome of a verification.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub segments: usize,
    /// Lines checked.
    pub records: u64,
    /// Records in the log up to the first problem (the next seq).
    pub log_size: u64,
    pub checkpoints: u64,
    pub last_checkpoint: Option<Checkpoint>,
    pub trusted_key: bool,
    pub failure: Option<Failure>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// Records after the last checkpoint: only the hash chain protects them, so cutting
    /// them off cannot be told from a crash.
    pub fn unsigned_tail(&self) -> u64 {
        match &self.last_checkpoint {
            Some(cp) => self.log_size.saturating_sub(cp.seq + 1),
            None => self.log_size,
        }
    }
}

fn lines(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    // (offset, line without newline); a torn last piece is yielded too and caught by the
    // caller, which knows whether the data ended in a newline.
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= data.len() {
            return None;
        }
        let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
        let item = (start, &data[start..end]);
        start = end + 1;
        Some(item)
    })
}

fn read(path: &Path) -> Result<Vec<u8>, AuditError> {
    fs::read(path).map_err(|e| AuditError::io(format!("reading {}", path.display()), e))
}

/// Verifies the log in `dir`. `Err` only when the log cannot be read at all; a log that
/// fails verification gives `Ok` with `failure` set.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<VerifyReport, AuditError> {
    verify_with(dir, opts, |_, _, _| {})
}

/// Like [`verify`], calling `visit(seq, line, leaf_hash)` for each good record in order.
pub fn verify_with(
    dir: &Path,
    opts: &VerifyOptions,
    mut visit: impl FnMut(u64, &[u8], &Hash),
) -> Result<VerifyReport, AuditError> {
    let segments = list_segments(dir)?;
    if segments.is_empty() {
        return Err(AuditError::NoLog(dir.to_owned()));
    }
    let trusted = opts.trusted_key.as_ref();
    let mut report = VerifyReport {
        segments: segments.len(),
        records: 0,
        log_size: 0,
        checkpoints: 0,
        last_checkpoint: None,
        trusted_key: trusted.is_some(),
        failure: None,
    };

    let (mut chain, mut start_seg, mut skip_to) = (Chain::genesis(), 0, None);
    if let Some(from) = &opts.from_checkpoint {
        let from = from.strip_suffix(b"\n").unwrap_or(from);
        let cp = Checkpoint::parse(from)
            .map_err(|e| AuditError::Trust(format!("--from checkpoint: {e}")))?;
        cp.verify_signature(trusted)
            .map_err(|e| AuditError::Trust(format!("--from checkpoint: {e}")))?;
        chain = Chain::after_checkpoint(cp.clone(), from)
            .map_err(|e| AuditError::Trust(format!("--from checkpoint: {e}")))?;
        start_seg = segments
            .iter()
            .rposition(|s| s.first_seq <= cp.seq)
            .unwrap_or(0);
        skip_to = Some((cp.seq, from.to_vec()));
        report.log_size = cp.seq + 1;
        report.last_checkpoint = Some(cp);
    }

    // Where the last good line was, to blame it when the next one shows it was altered.
    let mut last_pos: Option<(usize, u64, u64)> = None;
    let mut last_was_checkpoint = false;
    for (si, seg) in segments.iter().enumerate().skip(start_seg) {
        let data = read(&seg.path)?;
        let is_last = si + 1 == segments.len();
        let fail = |line: u64, seq: Option<u64>, problem: Problem| Failure {
            segment: seg.path.clone(),
            line,
            seq,
            problem,
        };
        if data.is_empty() {
            if !is_last && skip_to.is_none() {
                report.failure = Some(fail(1, None, Problem::Malformed("empty segment".into())));
                return Ok(report);
            }
            continue;
        }
        let torn = !data.ends_with(b"\n");
        for (idx, (off, line)) in lines(&data).enumerate() {
            let line_no = idx as u64 + 1;
            if let Some((seq, expected)) = &skip_to {
                match parse_head(line) {
                    Ok(h) if h.seq < *seq => continue,
                    Ok(h) if h.seq == *seq && line == expected.as_slice() => {
                        skip_to = None;
                        last_pos = Some((si, line_no, h.seq));
                        last_was_checkpoint = true;
                        continue;
                    }
                    _ => {
                        report.failure = Some(fail(
                            line_no,
                            parse_head(line).ok().map(|h| h.seq),
                            Problem::HashMismatch(format!(
                                "the trusted checkpoint at seq {seq} is not in the log: the log was rewritten"
                            )),
                        ));
                        return Ok(report);
                    }
                }
            }
            if torn && off + line.len() == data.len() {
                report.failure = Some(fail(line_no, None, Problem::TornTail));
                return Ok(report);
            }
            let before = chain.next_seq;
            match chain.step(line, trusted) {
                Ok(leaf) => {
                    let head_seq = before;
                    if idx == 0 && seg.first_seq != head_seq {
                        report.failure = Some(fail(
                            line_no,
                            Some(head_seq),
                            Problem::SegmentReplaced(format!(
                                "file is named for seq {} but starts at seq {head_seq}",
                                seg.first_seq
                            )),
                        ));
                        return Ok(report);
                    }
                    visit(head_seq, line, &leaf);
                    report.records += 1;
                    report.log_size = chain.next_seq;
                    last_was_checkpoint = chain
                        .last_checkpoint
                        .as_ref()
                        .is_some_and(|cp| cp.seq == head_seq);
                    if last_was_checkpoint {
                        report.checkpoints += 1;
                        report.last_checkpoint = chain.last_checkpoint.clone();
                    }
                    last_pos = Some((si, line_no, head_seq));
                }
                Err(err) => {
                    let next = next_line(&segments, si, &data, off + line.len() + 1)?;
                    let seq = parse_head(line).ok().map(|h| h.seq);
                    let (blame_prev, problem) = classify(
                        err,
                        line,
                        &chain,
                        next.as_deref(),
                        trusted,
                        idx == 0,
                        last_was_checkpoint,
                    );
                    report.failure = Some(match (blame_prev, last_pos) {
                        (true, Some((psi, pline, pseq))) => Failure {
                            segment: segments[psi].path.clone(),
                            line: pline,
                            seq: Some(pseq),
                            problem,
                        },
                        _ => fail(line_no, seq, problem),
                    });
                    return Ok(report);
                }
            }
        }
    }
    if let Some((seq, _)) = skip_to {
        let last = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        report.failure = Some(Failure {
            segment: last,
            line: 0,
            seq: None,
            problem: Problem::TruncatedTail {
                checkpoint_size: seq,
                log_size: report.records,
            },
        });
        report.log_size = 0;
    }
    Ok(report)
}

/// The line after the one at `at`, possibly the first line of the next segment.
fn next_line(
    segments: &[Segment],
    si: usize,
    data: &[u8],
    at: usize,
) -> Result<Option<Vec<u8>>, AuditError> {
    if at < data.len() {
        return Ok(lines(&data[at..]).next().map(|(_, l)| l.to_vec()));
    }
    match segments.get(si + 1) {
        Some(next) => Ok(lines(&read(&next.path)?).next().map(|(_, l)| l.to_vec())),
        None => Ok(None),
    }
}

/// Turns a step error into the problem to report, deciding with one line of lookahead
/// which record is the bad one: `true` blames the previous record.
fn classify(
    err: StepError,
    line: &[u8],
    chain: &Chain,
    next: Option<&[u8]>,
    trusted: Option<&VerifyingKey>,
    first_in_segment: bool,
    prev_was_checkpoint: bool,
) -> (bool, Problem) {
    let next_head = next.and_then(|n| parse_head(n).ok());
    match err {
        StepError::Head(why) => (false, Problem::Malformed(why.to_owned())),
        StepError::Seq { expected, found } => {
            let next_seq = next_head.map(|h| h.seq);
            let problem = if next_seq == Some(expected) {
                Problem::Reordered { expected, found }
            } else if next_seq == Some(expected + 1) && found != expected + 1 {
                Problem::HashMismatch(format!(
                    "record altered: its seq field reads {found} where {expected} was due"
                ))
            } else if found < expected {
                Problem::Reordered { expected, found }
            } else {
                Problem::SeqGap {
                    expected,
                    found,
                    note: if first_in_segment {
                        " (a whole segment may be missing)"
                    } else {
                        " (deleted)"
                    },
                }
            };
            (false, problem)
        }
        StepError::Prev => {
            let prev_seq = chain.next_seq.saturating_sub(1);
            if first_in_segment && prev_was_checkpoint && chain.next_seq > 0 {
                return (
                    false,
                    Problem::SegmentReplaced(format!(
                        "its first record does not link to seq {prev_seq}, the signed end of the previous segment"
                    )),
                );
            }
            // A checkpoint signs its own prev, so if it verifies, its predecessor changed.
            let signed_link = Checkpoint::parse(line)
                .ok()
                .is_some_and(|cp| cp.verify_signature(trusted).is_ok());
            let next_links = next_head.is_some_and(|h| h.prev == chain_hash(line));
            if signed_link || next_links {
                (
                    true,
                    Problem::HashMismatch(format!(
                        "record altered: its hash is not the prev of the record after it (seq {})",
                        chain.next_seq
                    )),
                )
            } else {
                (
                    false,
                    Problem::HashMismatch(format!(
                        "prev does not match the hash of record seq {prev_seq} (this record was altered or inserted)"
                    )),
                )
            }
        }
        StepError::Checkpoint(CheckpointError::BadSignature(m)) => {
            (false, Problem::BadCheckpointSignature(m))
        }
        StepError::Checkpoint(CheckpointError::RootMismatch(m)) => {
            (false, Problem::CheckpointRootMismatch(m))
        }
        StepError::Checkpoint(CheckpointError::Malformed(m)) => {
            (false, Problem::Malformed(format!("checkpoint: {m}")))
        }
    }
}
