//! Budgets that concurrent requests cannot overrun.
//!
//! A request's whole cost (one request, its spend, its upload bytes) is reserved under one
//! lock before it is forwarded, against every budget that applies (the Envelope's and its
//! capability's); if any would be exceeded nothing is reserved and the request is refused.
//! Download bytes are charged chunk by chunk as the response streams, and the response is
//! cut when the budget runs out.
//!
//! Write-ahead: every reservation and charge is appended to the ledger file (a `write(2)`
//! into the kernel's page cache) under the lock, before the request leaves or the response
//! returns. From then on it survives anything that can happen to this process — a crash,
//! `kill -9`, a restart of the daemon — so no restart can refill a budget. The fsync that
//! makes it survive a crash of the whole host is group-committed by a background task
//! ([`Ledger::reserve_batched`], [`Ledger::charge_download_batched`]) instead of making
//! every request wait for the disk: after a host crash nothing resumes an agent (its
//! cgroup and processes are gone and its Envelope id is spent), so the page cache is the
//! write-ahead that matters for the grant, and the disk copy follows within one fsync. A
//! failed write or fsync poisons the ledger: every later request is refused.
//! [`Ledger::durable`] waits for the disk where a caller needs that (tests, shutdown).
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

use serde::{Deserialize, Serialize};

/// The limits of one budget scope; `None` means unlimited in that dimension.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub requests: Option<u64>,
    pub spend: Option<f64>,
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
}

/// What has been used in one scope.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub spend: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Which budget refused, for the 429 body and the audit log.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Exceeded {
    #[error("budget `{scope}`: request count {used} of {limit} used")]
    Requests {
        scope: String,
        used: u64,
        limit: u64,
    },
    #[error("budget `{scope}`: spend {used} + {cost} would exceed {limit}")]
    Spend {
        scope: String,
        used: f64,
        cost: f64,
        limit: f64,
    },
    #[error("budget `{scope}`: upload {used} + {cost} bytes would exceed {limit}")]
    BytesUp {
        scope: String,
        used: u64,
        cost: u64,
        limit: u64,
    },
    #[error("budget `{scope}`: download limit of {limit} bytes reached")]
    BytesDown { scope: String, limit: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("budget ledger {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("budget ledger {path} line {line} is corrupt: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "budget ledger {path} could not be written earlier; refusing every request until it is fixed"
    )]
    Poisoned { path: PathBuf },
}

/// One ledger line: a change of usage in one scope.
#[derive(Debug, Serialize, Deserialize)]
struct Entry<S = String> {
    scope: S,
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    spend: f64,
    #[serde(default)]
    bytes_up: u64,
    #[serde(default)]
    bytes_down: u64,
}

impl<S: AsRef<str>> Entry<S> {
    /// Appends the entry as one JSON line, exactly as its `Serialize` would write it: two
    /// lines go out per request, and serde's field-by-field map writer costs more than the
    /// write(2) that carries them.
    fn push_line(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        buf.extend_from_slice(b"{\"scope\":");
        serde_json::to_writer(&mut *buf, self.scope.as_ref())?;
        buf.extend_from_slice(b",\"requests\":");
        serde_json::to_writer(&mut *buf, &self.requests)?;
        buf.extend_from_slice(b",\"spend\":");
        serde_json::to_writer(&mut *buf, &self.spend)?;
        buf.extend_from_slice(b",\"bytes_up\":");
        serde_json::to_writer(&mut *buf, &self.bytes_up)?;
        buf.extend_from_slice(b",\"bytes_down\":");
        serde_json::to_writer(&mut *buf, &self.bytes_down)?;
        buf.extend_from_slice(b"}\n");
        Ok(())
    }
}

struct State {
    limits: BTreeMap<String, Limits>,
    used: BTreeMap<String, Usage>,
    file: Option<File>,
    poisoned: bool,
    /// Lines rendered but not yet written, in the order their tickets were given.
    pending: Vec<u8>,
    /// The last ticket given out; a [`Ticket`] names the lines of one call.
    queued: u64,
    /// Every ticket up to this one is in the ledger file.
    written: u64,
    /// A caller is gathering the pending lines into one write (see `written_through`).
    flushing: bool,
}

/// How a call's lines reach the file.
#[derive(Clone, Copy, PartialEq)]
enum Write {
    /// Written and fsynced before the call returns.
    Durable,
    /// Left pending; the caller awaits `written_through` before acting on them.
    Batched,
}

/// A ledger longer than this is rewritten with one line per scope when it is opened, so
/// a restart replays a few lines instead of two per request ever made.
const COMPACT_AFTER_LINES: usize = 10_000;

/// Rewrites the ledger as one line per scope holding its totals: the same usage, read back
/// in one step. The new file is written beside the old one, fsynced and renamed over it,
/// so a crash leaves the old ledger or the new one, never a mix or neither.
fn compact(path: &Path, used: &BTreeMap<String, Usage>) -> io::Result<()> {
    let mut buf = Vec::new();
    for (scope, usage) in used {
        if *usage == Usage::default() {
            continue;
        }
        let entry = Entry {
            scope: scope.as_str(),
            requests: usage.requests,
            spend: usage.spend,
            bytes_up: usage.bytes_up,
            bytes_down: usage.bytes_down,
        };
        serde_json::to_writer(&mut buf, &entry)?;
        buf.push(b'\n');
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".compacting");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The most often the background task fsyncs the ledger.
const BACKGROUND_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// What the fsyncs share with the request path, outside the state lock.
struct Syncer {
    /// A second handle on the ledger file.
    file: File,
    path: PathBuf,
    /// Writes made so far (mirrors `State::written`).
    written: AtomicU64,
    /// Writes known to be on disk.
    synced: AtomicU64,
    /// An fsync failed: the file's state on disk is unknown.
    failed: AtomicBool,
    /// The ledger is gone; the background task syncs once more and stops.
    closed: AtomicBool,
    /// Woken after every deferred write.
    wanted: Notify,
    /// One fsync at a time; whoever holds it syncs everything written so far.
    turn: tokio::sync::Mutex<()>,
}

impl Syncer {
    async fn sync_through(&self, ticket: u64) -> Result<(), LedgerError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(LedgerError::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let _turn = self.turn.lock().await;
        // The fsync that ran while this one waited may have covered it.
        if self.synced.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let upto = self.written.load(Ordering::Acquire);
        let file = match self.file.try_clone() {
            Ok(file) => file,
            Err(source) => return Err(self.fail(source)),
        };
        let result = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Err(source) = result {
            return Err(self.fail(source));
        }
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    fn fail(&self, source: io::Error) -> LedgerError {
        self.failed.store(true, Ordering::Release);
        tracing::error!(path = %self.path.display(), error = %source, "budget ledger fsync failed; refusing every request");
        LedgerError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The background half of the write-ahead: syncs whatever was written since the last
    /// fsync, one fsync at a time, until the ledger is dropped or the disk fails.
    async fn run(self: Arc<Self>) {
        loop {
            self.wanted.notified().await;
            let upto = self.written.load(Ordering::Acquire);
            if self.sync_through(upto).await.is_err() || self.closed.load(Ordering::Acquire) {
                return;
            }
            // Nobody waits on these fsyncs: one at most every BACKGROUND_SYNC_INTERVAL
            // covers every write in between and spares the disk one per request.
            tokio::time::sleep(BACKGROUND_SYNC_INTERVAL).await;
        }
    }
}

/// The usage of `scope`, allocating its name only the first time.
fn used_mut<'a>(used: &'a mut BTreeMap<String, Usage>, scope: &str) -> Option<&'a mut Usage> {
    if !used.contains_key(scope) {
        used.insert(scope.to_owned(), Usage::default());
    }
    used.get_mut(scope)
}

/// A ledger write, already in the ledger file; [`Ledger::durable`] waits until it is on
/// disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticket(u64);

/// All budgets of one agent.
pub struct Ledger {
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// `None` for a ledger kept in memory only.
    syncer: Option<Arc<Syncer>>,
    /// Woken whenever pending lines were written, or a gathering caller gave up.
    flushed: Notify,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Lines of callers that stopped waiting (their requests never left) still count.
        if let Ok(mut state) = self.state.lock()
            && !state.poisoned
        {
            let _ = self.write_pending(&mut state, false);
        }
        if let Some(syncer) = &self.syncer {
            syncer.closed.store(true, Ordering::Release);
            syncer.wanted.notify_one();
        }
    }
}

/// The cost reserved for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cost {
    pub requests: u64,
    pub spend: f64,
    pub bytes_up: u64,
}

impl Ledger {
    /// A ledger with the given scopes, replaying `path` (if any) so usage survives restarts.
    pub fn open(
        limits: BTreeMap<String, Limits>,
        path: Option<&Path>,
    ) -> Result<Self, LedgerError> {
        let mut used: BTreeMap<String, Usage> = limits
            .keys()
            .map(|k| (k.clone(), Usage::default()))
            .collect();
        let mut file = None;
        if let Some(path) = path {
            let io_err = |source| LedgerError::Io {
                path: path.to_owned(),
                source,
            };
            match std::fs::read(path) {
                Ok(bytes) => {
                    // Complete lines end with '\n'; anything after the last one is a write
                    // that never completed, so the request it reserved for never left.
                    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    let mut lines = 0;
                    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
                        if line.is_empty() {
                            continue;
                        }
                        lines += 1;
                        let entry: Entry =
                            serde_json::from_slice(line).map_err(|e| LedgerError::Corrupt {
                                path: path.to_owned(),
                                line: i + 1,
                                reason: e.to_string(),
                            })?;
                        let usage = used.entry(entry.scope).or_default();
                        usage.requests += entry.requests;
                        usage.spend += entry.spend;
                        usage.bytes_up += entry.bytes_up;
                        usage.bytes_down += entry.bytes_down;
                    }
                    if complete < bytes.len() {
                        tracing::warn!(path = %path.display(), "discarding a torn last ledger line");
                        let handle = OpenOptions::new().write(true).open(path).map_err(io_err)?;
                        handle.set_len(complete as u64).map_err(io_err)?;
                        handle.sync_data().map_err(io_err)?;
                    }
                    if lines > COMPACT_AFTER_LINES {
                        compact(path, &used).map_err(io_err)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
            let handle = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err)?;
            file = Some(handle);
        }
        let syncer = match (&file, path) {
            (Some(f), Some(path)) => Some(Arc::new(Syncer {
                file: f.try_clone().map_err(|source| LedgerError::Io {
                    path: path.to_owned(),
                    source,
                })?,
                path: path.to_owned(),
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                failed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                wanted: Notify::new(),
                turn: tokio::sync::Mutex::new(()),
            })),
            _ => None,
        };
        // Deferred writes are synced in the background by the runtime the ledger is opened
        // in; outside one, only explicit `durable` calls sync them.
        if let (Some(syncer), Ok(runtime)) = (&syncer, tokio::runtime::Handle::try_current()) {
            runtime.spawn(syncer.clone().run());
        }
        Ok(Ledger {
            path: path.map(Path::to_owned),
            state: Mutex::new(State {
                limits,
                used,
                file,
                poisoned: false,
                pending: Vec::new(),
                queued: 0,
                written: 0,
                flushing: false,
            }),
            syncer,
            flushed: Notify::new(),
        })
    }

    /// Reserves each scope's cost, in every scope or in none. The reservation is durable
    /// when this returns `Ok(Ok(()))`.
    pub fn reserve(&self, costs: &[(&str, Cost)]) -> Result<Result<(), Exceeded>, LedgerError> {
        self.reserve_with(costs, Write::Durable)
            .map(|r| r.map(drop))
    }

    /// [`reserve`](Self::reserve) with the fsync left to the background task, sharing its
    /// write(2): requests that reserve while one caller gathers pending lines go out in
    /// that caller's write. The reservation holds against concurrent requests at once and
    /// is in the ledger file (surviving this process) when this returns; it is on disk
    /// once [`durable`](Self::durable) returns for the ticket.
    pub async fn reserve_batched(
        &self,
        costs: &[(&str, Cost)],
    ) -> Result<Result<Ticket, Exceeded>, LedgerError> {
        let ticket = match self.reserve_with(costs, Write::Batched)? {
            Ok(ticket) => ticket,
            Err(exceeded) => return Ok(Err(exceeded)),
        };
        self.written_through(ticket).await?;
        Ok(Ok(ticket))
    }

    fn reserve_with(
        &self,
        costs: &[(&str, Cost)],
        write: Write,
    ) -> Result<Result<Ticket, Exceeded>, LedgerError> {
        let mut state = self.lock()?;
        for (scope, cost) in costs {
            let Some(limits) = state.limits.get(*scope) else {
                continue;
            };
            let used = state.used.get(*scope).cloned().unwrap_or_default();
            if let Some(limit) = limits.requests
                && used.requests + cost.requests > limit
            {
                return Ok(Err(Exceeded::Requests {
                    scope: scope.to_string(),
                    used: used.requests,
                    limit,
                }));
            }
            if let Some(limit) = limits.spend
                && used.spend + cost.spend > limit
            {
                return Ok(Err(Exceeded::Spend {
                    scope: scope.to_string(),
                    used: used.spend,
                    cost: cost.spend,
                    limit,
                }));
            }
            if let Some(limit) = limits.bytes_up
                && used.bytes_up + cost.bytes_up > limit
            {
                return Ok(Err(Exceeded::BytesUp {
                    scope: scope.to_string(),
                    used: used.bytes_up,
                    cost: cost.bytes_up,
                    limit,
                }));
            }
            if let Some(limit) = limits.bytes_down
                && used.bytes_down >= limit
            {
                return Ok(Err(Exceeded::BytesDown {
                    scope: scope.to_string(),
                    limit,
                }));
            }
        }
        let entries: Vec<Entry<&str>> = costs
            .iter()
            .filter(|(s, _)| state.limits.contains_key(*s))
            .map(|(s, cost)| Entry {
                scope: *s,
                requests: cost.requests,
                spend: cost.spend,
                bytes_up: cost.bytes_up,
                bytes_down: 0,
            })
            .collect();
        let ticket = self.persist(&mut state, &entries, write)?;
        for entry in entries {
            if let Some(usage) = used_mut(&mut state.used, entry.scope) {
                usage.requests += entry.requests;
                usage.spend += entry.spend;
                usage.bytes_up += entry.bytes_up;
            }
        }
        Ok(Ok(ticket))
    }

    /// Charges `bytes` of response to every scope; refuses (charging nothing) when any
    /// scope would go over, so the caller cuts the response there.
    pub fn charge_download(
        &self,
        scopes: &[&str],
        bytes: u64,
    ) -> Result<Result<(), Exceeded>, LedgerError> {
        self.charge_download_with(scopes, bytes, Write::Durable)
            .map(|r| r.map(drop))
    }

    /// [`charge_download`](Self::charge_download) with the fsync left to the background
    /// task, sharing its write(2) as [`reserve_batched`](Self::reserve_batched) does.
    pub async fn charge_download_batched(
        &self,
        scopes: &[&str],
        bytes: u64,
    ) -> Result<Result<Ticket, Exceeded>, LedgerError> {
        let ticket = match self.charge_download_with(scopes, bytes, Write::Batched)? {
            Ok(ticket) => ticket,
            Err(exceeded) => return Ok(Err(exceeded)),
        };
        self.written_through(ticket).await?;
        Ok(Ok(ticket))
    }

    fn charge_download_with(
        &self,
        scopes: &[&str],
        bytes: u64,
        write: Write,
    ) -> Result<Result<Ticket, Exceeded>, LedgerError> {
        let mut state = self.lock()?;
        for scope in scopes {
            if let Some(limit) = state.limits.get(*scope).and_then(|l| l.bytes_down) {
                let used = state.used.get(*scope).map(|u| u.bytes_down).unwrap_or(0);
                if used + bytes > limit {
                    return Ok(Err(Exceeded::BytesDown {
                        scope: scope.to_string(),
                        limit,
                    }));
                }
            }
        }
        let entries: Vec<Entry<&str>> = scopes
            .iter()
            .filter(|s| state.limits.contains_key(**s))
            .map(|s| Entry {
                scope: *s,
                requests: 0,
                spend: 0.0,
                bytes_up: 0,
                bytes_down: bytes,
            })
            .collect();
        let ticket = self.persist(&mut state, &entries, write)?;
        for entry in entries {
            if let Some(usage) = used_mut(&mut state.used, entry.scope) {
                usage.bytes_down += entry.bytes_down;
            }
        }
        Ok(Ok(ticket))
    }

    /// Returns once the write `ticket` names (and every one before it) is on disk. An
    /// fsync failure poisons the ledger: every later call refuses.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), LedgerError> {
        self.written_through(ticket).await?;
        match &self.syncer {
            Some(syncer) => syncer.sync_through(ticket.0).await,
            None => Ok(()),
        }
    }

    /// Tickets (one per reserving or charging call) whose lines are not yet known to be
    /// on disk. Lines that shared a write(2) count once each.
    pub fn unsynced_tickets(&self) -> u64 {
        self.syncer.as_ref().map_or(0, |s| {
            s.written
                .load(Ordering::Acquire)
                .saturating_sub(s.synced.load(Ordering::Acquire))
        })
    }

    /// Usage and limits of every scope.
    pub fn snapshot(&self) -> Result<BTreeMap<String, (Usage, Limits)>, LedgerError> {
        let state = self.lock()?;
        Ok(state
            .limits
            .iter()
            .map(|(k, l)| {
                (
                    k.clone(),
                    (state.used.get(k).cloned().unwrap_or_default(), l.clone()),
                )
            })
            .collect())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, LedgerError> {
        let poisoned = || LedgerError::Poisoned {
            path: self.path.clone().unwrap_or_default(),
        };
        let state = self.state.lock().map_err(|_| poisoned())?;
        if state.poisoned
            || self
                .syncer
                .as_ref()
                .is_some_and(|s| s.failed.load(Ordering::Acquire))
        {
            return Err(poisoned());
        }
        Ok(state)
    }

    fn persist(
        &self,
        state: &mut State,
        entries: &[Entry<&str>],
        write: Write,
    ) -> Result<Ticket, LedgerError> {
        if state.file.is_none() || entries.is_empty() {
            return Ok(Ticket(0));
        }
        let start = state.pending.len();
        let rendered = entries
            .iter()
            .try_for_each(|entry| entry.push_line(&mut state.pending));
        if let Err(e) = rendered {
            state.pending.truncate(start);
            return Err(self.poison(state, io::Error::other(e)));
        }
        state.queued += 1;
        let ticket = Ticket(state.queued);
        if write == Write::Durable {
            self.write_pending(state, true)?;
        }
        Ok(ticket)
    }

    /// Writes every pending line (its own and other callers'; the lines are additive, so
    /// their order across calls does not matter) in one write(2).
    fn write_pending(&self, state: &mut State, sync: bool) -> Result<(), LedgerError> {
        let Some(file) = state.file.as_mut() else {
            return Ok(());
        };
        let result = file
            .write_all(&state.pending)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(source) = result {
            return Err(self.poison(state, source));
        }
        state.pending.clear();
        let had_pending = state.written < state.queued;
        state.written = state.queued;
        if let Some(syncer) = &self.syncer {
            syncer.written.store(state.written, Ordering::Release);
            if sync {
                syncer.synced.fetch_max(state.written, Ordering::AcqRel);
            } else {
                syncer.wanted.notify_one();
            }
        }
        if had_pending {
            self.flushed.notify_waiters();
        }
        Ok(())
    }

    /// After a failed write the file's tail is unknown: refuse from now on rather than
    /// guess what was recorded.
    fn poison(&self, state: &mut State, source: io::Error) -> LedgerError {
        state.poisoned = true;
        self.flushed.notify_waiters();
        LedgerError::Io {
            path: self.path.clone().unwrap_or_default(),
            source,
        }
    }

    /// Returns once `ticket`'s lines are in the file. One waiting caller at a time gathers:
    /// it lets the other ready tasks of its thread queue their lines first, then writes
    /// them all at once; the rest wait for that write.
    async fn written_through(&self, ticket: Ticket) -> Result<(), LedgerError> {
        loop {
            let flushed = self.flushed.notified();
            tokio::pin!(flushed);
            let gather = {
                let mut state = self.lock()?;
                if state.written >= ticket.0 {
                    return Ok(());
                }
                if state.flushing {
                    // Registered before the lock is let go, so the write cannot slip by.
                    flushed.as_mut().enable();
                    false
                } else {
                    state.flushing = true;
                    true
                }
            };
            if !gather {
                flushed.await;
                continue;
            }
            let gathering = Gathering(self);
            tokio::task::yield_now().await;
            let written = self
                .lock()
                .and_then(|mut state| self.write_pending(&mut state, false));
            drop(gathering);
            written?;
        }
    }
}

/// The gathering caller's turn; ends when it wrote, failed or was dropped mid-way (its
/// request cancelled), so a waiting caller takes over.
struct Gathering<'a>(&'a Ledger);

impl Drop for Gathering<'_> {
    fn drop(&mut self) {
        let mut state = self
            .0
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.flushing = false;
        drop(state);
        self.0.flushed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    proptest::proptest! {
        #[test]
        fn ledger_lines_are_what_serde_writes(
            scope in "(\\PC|[\u{0}-\u{1f}\"\\\\]){0,16}",
            requests in proptest::prelude::any::<u64>(),
            spend in proptest::prelude::any::<f64>(),
            bytes_up in proptest::prelude::any::<u64>(),
            bytes_down in proptest::prelude::any::<u64>(),
        ) {
            let entry = Entry { scope: scope.as_str(), requests, spend, bytes_up, bytes_down };
            let mut line = Vec::new();
            entry.push_line(&mut line).unwrap();
            let mut expected = serde_json::to_vec(&entry).unwrap();
            expected.push(b'\n');
            proptest::prop_assert_eq!(String::from_utf8(line).unwrap(), String::from_utf8(expected).unwrap());
        }
    }

    fn limits(requests: u64, spend: f64) -> BTreeMap<String, Limits> {
        BTreeMap::from([(
            "envelope".to_owned(),
            Limits {
                requests: Some(requests),
                spend: Some(spend),
                bytes_up: Some(1000),
                bytes_down: Some(100),
            },
        )])
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_budget() {
        let ledger = Arc::new(Ledger::open(limits(100, 1e9), None).unwrap());
        let granted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (ledger, granted) = (ledger.clone(), granted.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let cost = Cost {
                            requests: 1,
                            spend: 0.0,
                            bytes_up: 0,
                        };
                        if ledger
                            .reserve(&[("envelope", cost.clone())])
                            .unwrap()
                            .is_ok()
                        {
                            granted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(granted.load(std::sync::atomic::Ordering::SeqCst), 100);
    }

    #[test]
    fn a_refused_reservation_charges_no_scope() {
        let mut l = limits(10, 100.0);
        l.insert(
            "cap".into(),
            Limits {
                spend: Some(5.0),
                ..Default::default()
            },
        );
        let ledger = Ledger::open(l, None).unwrap();
        let cost = Cost {
            requests: 1,
            spend: 6.0,
            bytes_up: 0,
        };
        assert!(matches!(
            ledger
                .reserve(&[("envelope", cost.clone()), ("cap", cost.clone())])
                .unwrap(),
            Err(Exceeded::Spend { .. })
        ));
        let snap = ledger.snapshot().unwrap();
        assert_eq!(snap["envelope"].0, Usage::default());
    }

    #[test]
    fn downloads_are_cut_at_the_limit() {
        let ledger = Ledger::open(limits(10, 10.0), None).unwrap();
        assert!(ledger.charge_download(&["envelope"], 60).unwrap().is_ok());
        assert!(ledger.charge_download(&["envelope"], 60).unwrap().is_err());
        assert!(ledger.charge_download(&["envelope"], 40).unwrap().is_ok());
        assert!(matches!(
            ledger
                .reserve(&[(
                    "envelope",
                    Cost {
                        requests: 1,
                        ..Default::default()
                    }
                )])
                .unwrap(),
            Err(Exceeded::BytesDown { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_reservations_share_writes_and_never_overrun() {
        let (_dir, path, ledger) = file_ledger(100);
        let cost = one_request(0.5);
        let tasks: Vec<_> = (0..300)
            .map(|_| {
                let (ledger, cost) = (ledger.clone(), cost.clone());
                tokio::spawn(async move {
                    let granted = ledger.reserve_batched(&[("envelope", cost)]).await.unwrap();
                    // What a granted caller acts on is in the file already.
                    if granted.is_ok() {
                        let other =
                            Ledger::open(limits(100, 1e9), Some(&path_of(&ledger))).unwrap();
                        assert!(other.snapshot().unwrap()["envelope"].0.requests >= 1);
                    }
                    granted.is_ok()
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            granted += usize::from(task.await.unwrap());
        }
        assert_eq!(granted, 100);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 100, "one line per granted reservation, none lost");
        let other = Ledger::open(limits(100, 1e9), Some(&path)).unwrap();
        assert_eq!(other.snapshot().unwrap()["envelope"].0.requests, 100);
    }

    fn path_of(ledger: &Ledger) -> PathBuf {
        ledger.path.clone().unwrap()
    }

    /// A ledger file in a fresh directory (kept while the returned guard lives), with an
    /// envelope-wide budget of `requests`.
    fn file_ledger(requests: u64) -> (tempfile::TempDir, PathBuf, Arc<Ledger>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = Arc::new(Ledger::open(limits(requests, 1e9), Some(&path)).unwrap());
        (dir, path, ledger)
    }

    fn one_request(spend: f64) -> Cost {
        Cost {
            requests: 1,
            spend,
            bytes_up: 0,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_gathering_caller_that_is_dropped_hands_over_its_write() {
        let (_dir, path, ledger) = file_ledger(100);
        let cost = one_request(0.0);
        let reserve = |ledger: Arc<Ledger>, cost: Cost| async move {
            ledger.reserve_batched(&[("envelope", cost)]).await
        };
        // On this one thread the first caller gathers (and yields), the second waits on it;
        // then the first is dropped mid-gathering.
        let first = tokio::spawn(reserve(ledger.clone(), cost.clone()));
        let second = tokio::spawn(reserve(ledger.clone(), cost.clone()));
        tokio::task::yield_now().await;
        assert!(
            ledger.state.lock().unwrap().flushing,
            "the first caller gathers"
        );
        first.abort();
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the waiting caller took over the write")
            .unwrap();
        assert!(second.unwrap().is_ok());
        assert!(first.await.unwrap_err().is_cancelled());
        // Both lines are in the file: the dropped caller's reservation still counts.
        let other = Ledger::open(limits(100, 1e9), Some(&path)).unwrap();
        assert_eq!(other.snapshot().unwrap()["envelope"].0.requests, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_writes_are_in_the_file_at_once_and_synced_in_the_background() {
        let (_dir, path, ledger) = file_ledger(50);
        let cost = Cost {
            bytes_up: 7,
            ..one_request(2.5)
        };
        for _ in 0..10 {
            ledger
                .reserve_batched(&[("envelope", cost.clone())])
                .await
                .unwrap()
                .unwrap();
        }
        // Another process (a restarted daemon) sees every reservation without any fsync
        // having been awaited: the write-ahead is in the file before the call returns.
        let other = Ledger::open(limits(50, 1e9), Some(&path)).unwrap();
        let (usage, _) = other.snapshot().unwrap()["envelope"].clone();
        assert_eq!(
            (usage.requests, usage.spend, usage.bytes_up),
            (10, 25.0, 70)
        );
        // Nobody awaits `durable`; the background task syncs them anyway.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.unsynced_tickets() > 0 {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn batched_reservations_are_durable_once_awaited_and_never_overrun() {
        let (_dir, path, ledger) = file_ledger(50);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    let cost = one_request(0.0);
                    match ledger.reserve_batched(&[("envelope", cost)]).await.unwrap() {
                        Ok(ticket) => {
                            ledger.durable(ticket).await.unwrap();
                            true
                        }
                        Err(_) => false,
                    }
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            granted += u64::from(t.await.unwrap());
        }
        assert_eq!(granted, 50);
        let download = ledger
            .charge_download_batched(&["envelope"], 40)
            .await
            .unwrap()
            .unwrap();
        ledger.durable(download).await.unwrap();
        drop(ledger);
        let again = Ledger::open(limits(50, 1e9), Some(&path)).unwrap();
        let (usage, _) = again.snapshot().unwrap()["envelope"].clone();
        assert_eq!((usage.requests, usage.bytes_down), (50, 40));
    }

    #[tokio::test]
    async fn a_long_ledger_is_compacted_on_open_without_changing_usage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let mut limits = limits(1_000_000, 1e12);
        if let Some(l) = limits.get_mut("envelope") {
            l.bytes_up = None;
            l.bytes_down = None;
        }
        limits.insert("capability:orders".into(), Limits::default());
        let n = COMPACT_AFTER_LINES as u64 + 500;
        {
            let ledger = Ledger::open(limits.clone(), Some(&path)).unwrap();
            for i in 0..n {
                let cost = Cost {
                    requests: 1,
                    spend: 0.1 * (i % 7) as f64,
                    bytes_up: i % 13,
                };
                ledger
                    .reserve_batched(&[("envelope", cost.clone()), ("capability:orders", cost)])
                    .await
                    .unwrap()
                    .unwrap();
                ledger
                    .charge_download_batched(&["envelope", "capability:orders"], i % 5)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        let expected = {
            // The usage a full replay gives, computed without touching the file.
            let bytes = std::fs::read(&path).unwrap();
            let mut used: BTreeMap<String, Usage> = BTreeMap::new();
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let e: Entry = serde_json::from_slice(line).unwrap();
                let u = used.entry(e.scope).or_default();
                u.requests += e.requests;
                u.spend += e.spend;
                u.bytes_up += e.bytes_up;
                u.bytes_down += e.bytes_down;
            }
            used
        };
        assert_eq!(expected["envelope"].requests, n);

        let ledger = Ledger::open(limits.clone(), Some(&path)).unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(lines, 2, "one line per scope after compaction");
        assert!(!dir.path().join("ledger.jsonl.compacting").exists());
        for (scope, (usage, _)) in ledger.snapshot().unwrap() {
            assert_eq!(usage, expected[&scope], "{scope}");
        }
        // Appends continue after the compacted lines, and a second restart reads both.
        ledger
            .reserve(&[(
                "envelope",
                Cost {
                    requests: 1,
                    spend: 0.0,
                    bytes_up: 0,
                },
            )])
            .unwrap()
            .unwrap();
        drop(ledger);
        let again = Ledger::open(limits, Some(&path)).unwrap();
        assert_eq!(again.snapshot().unwrap()["envelope"].0.requests, n + 1);
    }

    #[test]
    fn usage_survives_a_restart_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        {
            let ledger = Ledger::open(limits(3, 10.0), Some(&path)).unwrap();
            for _ in 0..2 {
                ledger
                    .reserve(&[(
                        "envelope",
                        Cost {
                            requests: 1,
                            spend: 4.0,
                            bytes_up: 10,
                        },
                    )])
                    .unwrap()
                    .unwrap();
            }
        }
        // A crash in the middle of the next write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"scope\":\"envel").unwrap();
        drop(f);
        let ledger = Ledger::open(limits(3, 10.0), Some(&path)).unwrap();
        assert_eq!(ledger.snapshot().unwrap()["envelope"].0.requests, 2);
        ledger
            .reserve(&[(
                "envelope",
                Cost {
                    requests: 1,
                    spend: 1.0,
                    bytes_up: 0,
                },
            )])
            .unwrap()
            .unwrap();
        drop(ledger);
        let ledger = Ledger::open(limits(4, 10.0), Some(&path)).unwrap();
        assert_eq!(
            ledger.snapshot().unwrap()["envelope"].0.requests,
            3,
            "the torn line was cut away"
        );
        // The restart did not refill the budget: spend 9 + 4 > 10.
        assert!(matches!(
            ledger
                .reserve(&[(
                    "envelope",
                    Cost {
                        requests: 1,
                        spend: 4.0,
                        bytes_up: 0
                    }
                )])
                .unwrap(),
            Err(Exceeded::Spend { .. })
        ));
        // A corrupt line in the middle is an error, not a silent refill.
        std::fs::write(&path, "garbage\n{\"scope\":\"envelope\",\"requests\":1}\n").unwrap();
        assert!(matches!(
            Ledger::open(limits(3, 10.0), Some(&path)),
            Err(LedgerError::Corrupt { line: 1, .. })
        ));
    }
}
