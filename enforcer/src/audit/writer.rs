//! The writer: one thread owns the files; the request path enqueues into a bounded queue and
//! either waits for its record or gets an error it must treat as "refuse".
//! The work is spread so the one thread every record must pass through does only what
//! depends on the record's place in the log: callers redact, render and hash their events'
//! openings before queueing; the writer closes each line with time, seq and prev, finishes
//! its hash, signs checkpoints and writes each batch into the segment file at once; the
//! sync thread fsyncs, one fsync for every batch written while the previous one ran (group
//! commit), and acknowledges in order. A caller waits for either point ([`Until`]): written (its record survives a
//! crash of this process) or durable (fsynced: it survives a crash of the host).
use std::{
    cell::RefCell,
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    future::Future,
    io::Write as _,
    ops::Range,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::oneshot;

use super::{
    AuditError,
    event::{Event, EventKind, Recordable},
    merkle::{Frontier, Hash, LineHash, chain_hash},
    record::{Checkpoint, parse_head, push_closing, render_opening},
    verify::{Chain, Failure, Problem, StepError, list_segments, segment_name},
};

/// How the log behaves. [`AuditConfig::new`] gives sensible defaults.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// A segment is closed (with a checkpoint) once it would grow past this.
    pub segment_max_bytes: u64,
    /// A checkpoint is signed after this many records…
    pub checkpoint_every: u64,
    /// …or when this much time passed since the last one and records are waiting.
    pub checkpoint_interval: Duration,
    /// Records that may wait for the disk before `submit` refuses with `QueueFull`.
    pub queue_capacity: usize,
    /// Most records written and fsynced together.
    pub max_batch: usize,
}

impl AuditConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_max_bytes: 64 << 20,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            queue_capacity: 4096,
            max_batch: 1024,
        }
    }

    fn validate(&self) -> Result<(), AuditError> {
        let bad = |m: &str| Err(AuditError::Config(m.to_owned()));
        if self.segment_max_bytes < 4096 {
            return bad("segment_max_bytes must be at least 4096");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1");
        }
        if self.checkpoint_interval.is_zero() {
            return bad("checkpoint_interval must be positive");
        }
        if self.queue_capacity == 0 || self.max_batch == 0 {
            return bad("queue_capacity and max_batch must be at least 1");
        }
        Ok(())
    }
}

/// Proof that a record is on disk (fsynced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// SHA-256 of the record line: the `prev` of the record after it.
    pub hash: Hash,
}

/// What opening found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// The seq the next record gets.
    pub next_seq: u64,
    pub recovered: Option<Recovery>,
    /// Records no checkpoint covered when the log was opened (first and last seq). A log
    /// closed cleanly ends with a checkpoint, so these were written by a writer that
    /// crashed, or by someone with write access to the files: nothing tells the two apart.
    /// Opening records the range (in a `log_recovered` event) and signs a checkpoint over
    /// it at once, so the log says which records were taken on without a signature.
    pub adopted_unsigned: Option<(u64, u64)>,
}

/// A torn last line (a crash mid-write) that was cut away. The cut is itself recorded as a
/// `log_recovered` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub segment: PathBuf,
    /// The segment's length after the cut.
    pub offset: u64,
    pub discarded_bytes: u64,
    /// The last good record, if any.
    pub last_good_seq: Option<u64>,
}

/// Counters, for benchmarks and status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records acknowledged (written or durable, as each caller asked).
    pub records: u64,
    /// Group commits: fsyncs of a segment.
    pub batches: u64,
}

/// How far a record must get before its [`PendingRecord`] resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Written into the segment file (the kernel's page cache): it survives a crash or kill
    /// of this process; the fsync that makes it survive a crash of the host follows with
    /// the next group commit, without the caller waiting for the disk.
    Written,
    /// Written and fsynced.
    Durable,
}

/// A record or control message waiting for the writer, in the order it was queued.
enum Item {
    /// A record whose opening (see [`render_opening`]) ends at `end` in its inbox's
    /// `openings`, hashed as far as `hash`.
    Record {
        hash: LineHash,
        end: usize,
        until: Until,
        ack: oneshot::Sender<Result<Receipt, AuditError>>,
    },
    Checkpoint(oneshot::Sender<Result<u64, AuditError>>),
    Shutdown(oneshot::Sender<Result<(), AuditError>>),
}

/// What callers queued and the writer has not taken yet. The writer takes all of it at
/// once by swapping buffers: a record costs its caller one short lock, and the writer one
/// lock per batch instead of one per record, and is woken only when it ran out of work.
#[derive(Default)]
struct Inbox {
    /// Rendered record openings, back to back.
    openings: Vec<u8>,
    items: VecDeque<Item>,
    /// Records in `items`: what the capacity limits.
    records: usize,
    /// The writer sleeps until an item comes; whoever queues one wakes it.
    idle: bool,
    /// Every handle is gone: the writer seals the log and stops.
    hung_up: bool,
    /// The writer stopped: nothing is taken any more.
    stopped: bool,
    /// The writer thread must look at the log now although nothing new is queued: a
    /// caller writing in its place left it a control message or a failure.
    nudged: bool,
}

#[derive(Default)]
struct Queue {
    inbox: Mutex<Inbox>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // No code holding this lock leaves the inbox half-changed, so a panic elsewhere
        // while holding it does not make its contents wrong.
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the writer thread if it sleeps; awake, it looks at the queue before sleeping.
    fn nudge(&self) {
        let mut inbox = self.lock();
        inbox.nudged = true;
        let wake = std::mem::take(&mut inbox.idle);
        drop(inbox);
        if wake {
            self.ready.notify_one();
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Wakes the writer thread if it sleeps while records wait for it.
    fn wake_for_queued(&self) {
        let mut inbox = self.lock();
        let wake = !inbox.items.is_empty() && std::mem::take(&mut inbox.idle);
        drop(inbox);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Sleeps until something is queued, the writer is nudged, every handle is gone, or
    /// `wait` runs out; takes nothing.
    fn wait_ready(&self, wait: Wait) {
        let mut inbox = self.lock();
        while inbox.items.is_empty() && !inbox.nudged && !inbox.hung_up {
            inbox = match wait {
                Wait::Forever => {
                    inbox.idle = true;
                    self.ready
                        .wait(inbox)
                        .unwrap_or_else(PoisonError::into_inner)
                }
                Wait::Until(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    inbox.idle = true;
                    self.ready
                        .wait_timeout(inbox, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        inbox.idle = false;
        inbox.nudged = false;
    }

    /// Queues a control message; these bypass the capacity: they come from the operator
    /// or shutdown, not the request path, and are few.
    fn push_control(&self, item: Item, shared: &Shared) -> Result<(), AuditError> {
        let mut inbox = self.lock();
        if inbox.stopped {
            return Err(shared.gone());
        }
        inbox.items.push_back(item);
        let wake = std::mem::take(&mut inbox.idle);
        drop(inbox);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }
}

thread_local! {
    /// Where `submit` renders a record's opening before copying it into the queue, kept per
    /// thread so rendering allocates nothing and happens outside the queue's lock.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
struct Shared {
    failed: AtomicBool,
    failure: Mutex<Option<AuditError>>,
    closed: AtomicBool,
    records: AtomicU64,
    batches: AtomicU64,
    /// The sync thread is fsyncing: records queued now make the next group at the
    /// earliest, so the writer thread need not be woken for each one (see `submit_until`).
    syncing: AtomicBool,
    /// Tests: the next write into a segment fails, as on a full or broken disk.
    #[cfg(test)]
    fail_next_write: AtomicBool,
}

impl Shared {
    fn fail(&self, err: AuditError) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(err);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The error to give when the writer is gone.
    fn gone(&self) -> AuditError {
        if self.failed.load(Ordering::SeqCst)
            && let Ok(f) = self.failure.lock()
            && let Some(err) = f.as_ref()
        {
            return AuditError::Failed(err.to_string().into());
        }
        if self.closed.load(Ordering::SeqCst) {
            AuditError::Closed
        } else {
            AuditError::Failed("the audit writer stopped".into())
        }
    }
}

/// Handle to the audit log; cheap to clone, usable from async and blocking code.
#[derive(Clone)]
pub struct AuditLog {
    handle: Arc<Handle>,
}

/// Shared by every clone of an [`AuditLog`]; dropping the last one tells the writer that
/// nothing more will come.
struct Handle {
    queue: Arc<Queue>,
    core: Arc<Mutex<Core>>,
    shared: Arc<Shared>,
    capacity: usize,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.lock().hung_up = true;
        self.queue.ready.notify_one();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A record accepted into the queue; resolves once it got as far as [`Until`] asked.
/// Dropping it does not drop the record.
pub struct PendingRecord {
    rx: oneshot::Receiver<Result<Receipt, AuditError>>,
    shared: Arc<Shared>,
}

impl PendingRecord {
    /// Waits from blocking code. Must not be called inside an async context.
    pub fn wait_blocking(self) -> Result<Receipt, AuditError> {
        self.rx
            .blocking_recv()
            .unwrap_or_else(|_| Err(self.shared.gone()))
    }
}

impl Future for PendingRecord {
    type Output = Result<Receipt, AuditError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(self.shared.gone())))
    }
}

/// Writes what is queued when dropped: a gathered record's caller may be cancelled while
/// it yields, and its record must not wait for somebody else's.
struct WriteQueuedOnDrop(AuditLog);

impl Drop for WriteQueuedOnDrop {
    fn drop(&mut self) {
        self.0.write_queued();
    }
}

impl AuditLog {
    /// Opens (or creates) the log in `config.dir`, repairs a torn tail, checks the tail
    /// since the last checkpoint, and starts the writer thread. Refuses a log whose tail
    /// does not verify: appending to it would bury the damage under good records.
    pub fn open(config: AuditConfig, key: SigningKey) -> Result<(Self, OpenReport), AuditError> {
        config.validate()?;
        let (mut writer, recovered) = Writer::open(&config, key)?;
        let adopted_unsigned = (writer.since_checkpoint > 0).then(|| {
            (
                writer.next_seq - writer.since_checkpoint,
                writer.next_seq - 1,
            )
        });
        if recovered.is_some() || adopted_unsigned.is_some() {
            let mut ev = Event::new(EventKind::LogRecovered);
            if let Some(r) = &recovered {
                ev = ev
                    .detail("segment", r.segment.display().to_string())
                    .detail("offset", r.offset)
                    .detail("discarded_bytes", r.discarded_bytes);
                if let Some(seq) = r.last_good_seq {
                    ev = ev.detail("last_good_seq", seq);
                }
            }
            if let Some((first, last)) = adopted_unsigned {
                ev = ev
                    .detail("unsigned_first_seq", first)
                    .detail("unsigned_last_seq", last)
                    .detail(
                        "note",
                        "these records were in the log without a checkpoint when it was opened",
                    );
            }
            writer.add_event(&ev)?;
            writer.add_checkpoint();
            writer.dispatch(None)?;
        }
        let report = OpenReport {
            next_seq: writer.next_seq,
            recovered,
            adopted_unsigned,
        };
        let queue = Arc::new(Queue::default());
        let shared = Arc::new(Shared::default());
        writer.shared = shared.clone();
        let intake = Intake {
            queue: queue.clone(),
            openings: Vec::new(),
            items: VecDeque::new(),
            opening_start: 0,
        };
        let core = Arc::new(Mutex::new(Core {
            writer,
            intake,
            finished: false,
        }));
        let (for_thread, queue_for_thread, shared_for_thread) =
            (core.clone(), queue.clone(), shared.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_thread(&for_thread, &queue_for_thread, &shared_for_thread))
            .map_err(|e| AuditError::io("starting the audit writer thread", e))?;
        Ok((
            Self {
                handle: Arc::new(Handle {
                    queue,
                    core,
                    shared,
                    capacity: config.queue_capacity,
                }),
            },
            report,
        ))
    }

    /// Records queued and not yet taken by a writer, and how many may wait: a caller whose
    /// records can wait or be summed up (kernel deny events) looks here to leave the queue
    /// to the records that requests wait for.
    pub fn queue_load(&self) -> (usize, usize) {
        let h = &*self.handle;
        (h.queue.lock().records, h.capacity)
    }

    /// Queues a record without waiting; the result resolves once it is durable. An error
    /// means it will not be recorded and the caller must refuse the action it describes.
    /// The event is rendered before this returns, so a borrowed one will do.
    pub fn submit(&self, event: impl Recordable) -> Result<PendingRecord, AuditError> {
        self.submit_until(event, Until::Durable)
    }

    /// [`submit`](Self::submit), resolving once the record got as far as `until` says.
    pub fn submit_until(
        &self,
        event: impl Recordable,
        until: Until,
    ) -> Result<PendingRecord, AuditError> {
        let written_by_caller = until == Until::Written;
        let pending = self.queue(event, until, written_by_caller)?;
        if written_by_caller {
            self.write_queued();
        }
        Ok(pending)
    }

    /// [`submit_until`](Self::submit_until) `Until::Written` for async callers that record
    /// one event per request: the record is queued, the caller yields so that the other
    /// ready tasks of its thread queue theirs, and one write(2) then takes them all. The
    /// returned future resolves once the record is written; dropped before that, it
    /// still writes what it queued.
    pub fn submit_gathered(
        &self,
        event: &dyn Recordable,
    ) -> Result<impl Future<Output = Result<Receipt, AuditError>> + Send + use<>, AuditError> {
        let pending = self.queue(event, Until::Written, true)?;
        let write_on_drop = WriteQueuedOnDrop(self.clone());
        Ok(async move {
            tokio::task::yield_now().await;
            drop(write_on_drop);
            pending.await
        })
    }

    /// Queues `event`. `written_by_caller`: the caller writes the queue itself (see
    /// `write_queued`), so the writer thread is not woken for it.
    fn queue(
        &self,
        event: impl Recordable,
        until: Until,
        written_by_caller: bool,
    ) -> Result<PendingRecord, AuditError> {
        let h = &*self.handle;
        if h.shared.failed.load(Ordering::SeqCst) || h.shared.closed.load(Ordering::SeqCst) {
            return Err(h.shared.gone());
        }
        SCRATCH.with(|scratch| {
            let mut opening = scratch.borrow_mut();
            opening.clear();
            event
                .render_opening(&mut opening)
                .map_err(|e| AuditError::Encode(e.to_string().into()))?;
            let hash = LineHash::of_opening(&opening);
            let (ack, rx) = oneshot::channel();
            let mut inbox = h.queue.lock();
            if inbox.stopped {
                return Err(h.shared.gone());
            }
            if inbox.records >= h.capacity {
                return Err(AuditError::QueueFull {
                    capacity: h.capacity,
                });
            }
            // A caller that waits only for the write writes its record itself (or leaves
            // it to the thread writing now, which looks at the queue again before leaving)
            // instead of waking the writer thread for it. A caller waiting for the fsync
            // hands over as before: it waits milliseconds for the disk anyway, and the
            // writer thread's batches keep group commits large.
            let inline = written_by_caller;
            inbox.openings.extend_from_slice(&opening);
            let end = inbox.openings.len();
            inbox.items.push_back(Item::Record {
                hash,
                end,
                until,
                ack,
            });
            inbox.records += 1;
            // While an fsync runs, the writer sleeps on until a batch worth its wake-up has
            // gathered, or the fsync ends (the sync thread wakes it then): one wake-up per
            // record would cost the caller more than rendering it.
            let wake = !inline
                && inbox.idle
                && (inbox.records >= h.capacity.min(WRITER_WAKE_BATCH)
                    || !h.shared.syncing.load(Ordering::SeqCst));
            if wake {
                inbox.idle = false;
            }
            drop(inbox);
            if wake {
                h.queue.ready.notify_one();
            }
            Ok(PendingRecord {
                rx,
                shared: h.shared.clone(),
            })
        })
    }

    /// Makes the next write into a segment fail.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.handle
            .shared
            .fail_next_write
            .store(true, Ordering::SeqCst);
    }

    /// Holds the writer still, as a writer busy with a long batch would; records queue up.
    #[cfg(test)]
    pub(crate) fn pause_writing(&self) -> PausedWriter<'_> {
        PausedWriter {
            core: Some(lock_core(&self.handle.core, &self.handle.shared)),
            queue: &self.handle.queue,
        }
    }

    /// Writes what is queued on the caller's thread, when no other thread is writing; when
    /// one is, that thread looks at the queue again before it lets go. This saves two
    /// thread hand-offs per record (to the writer and back), which cost more than the
    /// writing; a backlog beyond two rounds goes to the writer thread. It blocks only on the
    /// write into the page cache; rotations are the writer thread's.
    fn write_queued(&self) {
        /// Rounds a caller writes for others before it leaves the rest to the writer thread.
        const ROUNDS: usize = 2;
        let h = &*self.handle;
        for _ in 0..ROUNDS {
            let mut core = match h.core.try_lock() {
                Ok(core) => core,
                // Whoever holds it looks at the queue again once done.
                Err(std::sync::TryLockError::WouldBlock) => return,
                Err(std::sync::TryLockError::Poisoned(_)) => {
                    h.shared.fail(AuditError::Failed(
                        "a thread panicked while writing the audit log".into(),
                    ));
                    h.queue.nudge();
                    return;
                }
            };
            if core.finished {
                return;
            }
            match core.write_inline() {
                Inline::WriterNeeded => {
                    drop(core);
                    h.queue.nudge();
                    return;
                }
                Inline::BatchFull => continue,
                Inline::Done => {}
            }
            drop(core);
            if h.queue.is_empty() {
                return;
            }
        }
        h.queue.nudge();
    }

    /// Records `event` and returns once it is fsynced: the call to make before acting.
    pub async fn append(&self, event: impl Recordable) -> Result<Receipt, AuditError> {
        self.submit(event)?.await
    }

    /// [`append`](Self::append) for blocking code.
    pub fn append_blocking(&self, event: impl Recordable) -> Result<Receipt, AuditError> {
        self.submit(event)?.wait_blocking()
    }

    /// Signs a checkpoint now (if records came since the last) and returns the tree size
    /// it covers once durable.
    pub async fn checkpoint(&self) -> Result<u64, AuditError> {
        let h = &*self.handle;
        let (ack, rx) = oneshot::channel();
        h.queue.push_control(Item::Checkpoint(ack), &h.shared)?;
        rx.await.unwrap_or_else(|_| Err(h.shared.gone()))
    }

    /// Writes a final checkpoint, fsyncs and stops the writer; every clone then gets
    /// `Closed`.
    pub async fn close(&self) -> Result<(), AuditError> {
        let h = &*self.handle;
        let (ack, rx) = oneshot::channel();
        h.queue.push_control(Item::Shutdown(ack), &h.shared)?;
        rx.await.unwrap_or_else(|_| Err(h.shared.gone()))
    }

    /// [`close`](Self::close) for blocking code.
    pub fn close_blocking(&self) -> Result<(), AuditError> {
        let h = &*self.handle;
        let (ack, rx) = oneshot::channel();
        h.queue.push_control(Item::Shutdown(ack), &h.shared)?;
        rx.blocking_recv().unwrap_or_else(|_| Err(h.shared.gone()))
    }

    /// Why the log takes no more records, once a write or fsync failed (or it was closed);
    /// `None` while it records. A failure is for good: only reopening the log ends it.
    pub fn failure(&self) -> Option<AuditError> {
        let shared = &self.handle.shared;
        (shared.failed.load(Ordering::SeqCst) || shared.closed.load(Ordering::SeqCst))
            .then(|| shared.gone())
    }

    pub fn stats(&self) -> Stats {
        let shared = &self.handle.shared;
        Stats {
            records: shared.records.load(Ordering::Relaxed),
            batches: shared.batches.load(Ordering::Relaxed),
        }
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// RFC 3339 UTC timestamps for every record, byte for byte what [`now_rfc3339`] gives,
/// with the date and time of day formatted once per second instead of once per record.
/// The records of one batch are written together and share the time read as the batch
/// began ([`tick`](Self::tick)).
struct Clock {
    second: i64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: String,
    text: String,
}

impl Clock {
    fn new() -> Self {
        Self {
            second: i64::MIN,
            prefix: String::new(),
            text: String::with_capacity(40),
        }
    }

    /// Reads the system clock for the records rendered from now on.
    fn tick(&mut self) {
        self.now();
    }

    /// The time read by the last [`tick`](Self::tick) or [`now`](Self::now); read now
    /// if there was none.
    fn last(&mut self) -> &str {
        if self.text.is_empty() {
            return self.now();
        }
        &self.text
    }

    fn now(&mut self) -> &str {
        // The system clock read directly: building an `OffsetDateTime` for every record
        // would turn the time into a date each time, which is needed once a second.
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => match i64::try_from(d.as_secs()) {
                Ok(secs) => self.at_parts(secs, d.subsec_nanos()),
                Err(_) => self.at(OffsetDateTime::now_utc()),
            },
            Err(_) => self.at(OffsetDateTime::now_utc()),
        }
    }

    fn at(&mut self, t: OffsetDateTime) -> &str {
        self.at_parts(t.unix_timestamp(), t.nanosecond())
    }

    fn at_parts(&mut self, second: i64, nanos: u32) -> &str {
        if second != self.second {
            let whole = OffsetDateTime::from_unix_timestamp(second)
                .map_err(|_| ())
                .and_then(|t| t.format(&Rfc3339).map_err(|_| ()));
            match whole {
                Ok(text) => {
                    self.prefix = text.trim_end_matches('Z').to_owned();
                    self.second = second;
                }
                Err(()) => {
                    self.second = i64::MIN;
                    self.text = now_rfc3339();
                    return &self.text;
                }
            }
        }
        self.text.clear();
        self.text.push_str(&self.prefix);
        if nanos != 0 {
            // The fraction with trailing zeros dropped, as the RFC 3339 formatter writes it.
            let mut digits = [0u8; 9];
            let mut n = nanos;
            for d in digits.iter_mut().rev() {
                *d = (n % 10) as u8;
                n /= 10;
            }
            let len = 9 - digits.iter().rev().take_while(|&&d| d == 0).count();
            self.text.push('.');
            self.text
                .extend(digits[..len].iter().map(|&d| char::from(b'0' + d)));
        }
        self.text.push('Z');
        &self.text
    }
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(format!("fsync of {}", dir.display()), e))
}

enum Ack {
    Record(Receipt, oneshot::Sender<Result<Receipt, AuditError>>),
    Checkpoint(u64, oneshot::Sender<Result<u64, AuditError>>),
}

/// Acknowledgements the sync thread sends once `file`, the segment their records were
/// written to, is fsynced.
struct Job {
    file: Arc<File>,
    path: Arc<Path>,
    acks: Vec<Ack>,
    shutdown: Option<oneshot::Sender<Result<(), AuditError>>>,
}

impl Job {
    /// Someone waits for this fsync (a durable record, a checkpoint, the close).
    fn awaited(&self) -> bool {
        !self.acks.is_empty() || self.shutdown.is_some()
    }
}

/// How long a group commit may wait for company when nobody is waiting on it.
const RELAXED_SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// The hand-over from the writer to the sync thread. Not a channel: a channel wakes the
/// receiver on every send, and under load the writer sends a job per batch, thousands a
/// second, nearly all of them for records nobody waits on. Here the writer wakes the sync
/// thread only when someone waits for the fsync or when the thread sleeps with nothing
/// to do; other jobs are picked up on its own RELAXED_SYNC_INTERVAL schedule.
#[derive(Default)]
struct SyncJobs {
    state: Mutex<SyncState>,
    ready: Condvar,
}

#[derive(Default)]
struct SyncState {
    jobs: Vec<Job>,
    /// The sync thread waits without a deadline: any job must wake it.
    idle: bool,
    /// The sync thread waits for company for a group nobody waits on: a job someone
    /// waits on must wake it. Busy fsyncing, it looks at the jobs once done, unwoken.
    relaxed: bool,
    /// The writer is done: finish what is queued, then stop.
    closed: bool,
    /// The sync thread has stopped; nothing handed over now would be fsynced.
    stopped: bool,
    /// Acknowledgement buffers the sync thread emptied, for the writer's next batches: a
    /// fresh buffer per batch would be fresh pages too, zeroed by the kernel on first
    /// touch, which cost the writer more than filling them.
    spare: Vec<Vec<Ack>>,
}

/// Emptied acknowledgement buffers kept for reuse; more are dropped.
const SPARE_ACK_BUFFERS: usize = 4;

impl SyncJobs {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `job` to the sync thread, or gives it back if that thread has stopped; takes
    /// an emptied acknowledgement buffer, if there is one, for the next batch.
    fn send(&self, job: Job) -> Result<Option<Vec<Ack>>, Job> {
        let mut state = self.lock();
        if state.stopped {
            return Err(job);
        }
        let wake = state.idle || (state.relaxed && job.awaited());
        state.jobs.push(job);
        let spare = state.spare.pop();
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(spare)
    }

    /// Keeps emptied acknowledgement buffers for the writer.
    fn give_back(&self, emptied: Vec<Vec<Ack>>) {
        let mut state = self.lock();
        // Buffers that never held anything (batches nobody waited on) are not worth keeping.
        for acks in emptied.into_iter().filter(|acks| acks.capacity() > 0) {
            if state.spare.len() >= SPARE_ACK_BUFFERS {
                break;
            }
            debug_assert!(acks.is_empty());
            state.spare.push(acks);
        }
    }

    /// The next group to fsync: everything handed over by the time it is due. `None` once
    /// the writer is done and nothing is left.
    fn next_group(&self, last_sync: Instant) -> Option<Vec<Job>> {
        let mut state = self.lock();
        while state.jobs.is_empty() {
            if state.closed {
                state.stopped = true;
                return None;
            }
            state.idle = true;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.idle = false;
        // When nobody waits for this fsync (every record in it was answered once written),
        // it waits for more to share it, up to RELAXED_SYNC_INTERVAL after the last one:
        // fsyncs cost the host dearly, and the records are already safe from a crash of
        // this process.
        let deadline = last_sync + RELAXED_SYNC_INTERVAL;
        while !state.closed && !state.jobs.iter().any(Job::awaited) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state.relaxed = true;
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.relaxed = false;
        }
        Some(std::mem::take(&mut state.jobs))
    }
}

/// Marks the hand-over stopped however the sync thread ends (a panic included), and drops
/// what is still queued so those waiting learn their records were not fsynced. Records
/// queued meanwhile wake the writer again, which then finds the sync thread gone and
/// refuses them, instead of waiting for an fsync that never ends.
struct StopOnExit {
    jobs: Arc<SyncJobs>,
    shared: Arc<Shared>,
    queue: Arc<Queue>,
}

impl Drop for StopOnExit {
    fn drop(&mut self) {
        let left = {
            let mut state = self.jobs.lock();
            state.stopped = true;
            std::mem::take(&mut state.jobs)
        };
        drop(left);
        self.shared.syncing.store(false, Ordering::SeqCst);
        self.queue.wake_for_queued();
    }
}

/// The writer's end of [`SyncJobs`]; dropping it tells the sync thread to finish.
struct SyncSender(Arc<SyncJobs>);

impl Drop for SyncSender {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_one();
    }
}

/// Sends a group's acknowledgements after its fsyncs succeeded; `true` if it closed the
/// log. Their emptied buffers go to `emptied`.
fn acknowledge(jobs: Vec<Job>, shared: &Shared, emptied: &mut Vec<Vec<Ack>>) -> bool {
    let mut n = 0;
    let mut closed = false;
    for mut job in jobs {
        for ack in job.acks.drain(..) {
            match ack {
                Ack::Record(r, tx) => {
                    n += 1;
                    let _ = tx.send(Ok(r));
                }
                Ack::Checkpoint(size, tx) => {
                    let _ = tx.send(Ok(size));
                }
            }
        }
        if let Some(tx) = job.shutdown {
            shared.closed.store(true, Ordering::SeqCst);
            let _ = tx.send(Ok(()));
            closed = true;
        }
        emptied.push(job.acks);
    }
    shared.records.fetch_add(n, Ordering::Relaxed);
    closed
}

/// Fsyncs every segment a group of jobs wrote to (more than one only across a rotation),
/// in order, then acknowledges them. On failure every acknowledgement gets the error and
/// the log is marked failed: after a failed fsync the file's state is unknown.
fn sync_group(
    jobs: Vec<Job>,
    shared: &Shared,
    emptied: &mut Vec<Vec<Ack>>,
) -> Result<bool, AuditError> {
    let mut synced: Option<*const File> = None;
    let mut result = Ok(());
    for job in &jobs {
        if synced == Some(Arc::as_ptr(&job.file)) {
            continue;
        }
        synced = Some(Arc::as_ptr(&job.file));
        result = job
            .file
            .sync_data()
            .map_err(|e| AuditError::io(format!("fsync of {}", job.path.display()), e));
        if result.is_err() {
            break;
        }
        shared.batches.fetch_add(1, Ordering::Relaxed);
    }
    match result {
        Ok(()) => Ok(acknowledge(jobs, shared, emptied)),
        Err(err) => {
            tracing::error!(error = %err, "audit log failed; refusing further records");
            shared.fail(err.clone());
            for job in jobs {
                fail_job(job, &err);
            }
            Err(err)
        }
    }
}

/// The sync thread: whatever the writer handed over while the last fsync ran shares the
/// next one. After a failure it fails every job still coming.
fn sync_thread(jobs: Arc<SyncJobs>, shared: Arc<Shared>, queue: Arc<Queue>) {
    let _stop = StopOnExit {
        jobs: jobs.clone(),
        shared: shared.clone(),
        queue: queue.clone(),
    };
    let mut failed = false;
    let mut last_sync = Instant::now();
    while let Some(group) = jobs.next_group(last_sync) {
        last_sync = Instant::now();
        if failed {
            let err = shared.gone();
            for job in group {
                fail_job(job, &err);
            }
            continue;
        }
        shared.syncing.store(true, Ordering::SeqCst);
        let mut emptied = Vec::new();
        let synced = sync_group(group, &shared, &mut emptied);
        jobs.give_back(emptied);
        // Cleared before looking at the queue, so a record queued meanwhile is seen
        // either here or by its caller, who then wakes the writer itself.
        shared.syncing.store(false, Ordering::SeqCst);
        queue.wake_for_queued();
        match synced {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => failed = true,
        }
    }
}

fn fail_job(job: Job, err: &AuditError) {
    fail_acks(job.acks, err);
    if let Some(tx) = job.shutdown {
        let _ = tx.send(Err(err.clone()));
    }
}

fn fail_acks(acks: Vec<Ack>, err: &AuditError) {
    for ack in acks {
        match ack {
            Ack::Record(_, tx) => {
                let _ = tx.send(Err(err.clone()));
            }
            Ack::Checkpoint(_, tx) => {
                let _ = tx.send(Err(err.clone()));
            }
        }
    }
}

/// The segment being appended to. The writer writes every batch into it as soon as the
/// batch is rendered; the sync thread gets a handle to fsync.
struct Segment {
    file: Arc<File>,
    path: Arc<Path>,
}

struct Writer {
    config: AuditConfig,
    key: SigningKey,
    segment: Segment,
    /// Jobs for the sync thread, once started; before that, batches are fsynced here.
    jobs: Option<SyncSender>,
    sync_thread: Option<std::thread::JoinHandle<()>>,
    /// Bytes written to the current segment (not counting `buf`).
    seg_bytes: u64,
    next_seq: u64,
    prev: Hash,
    frontier: Frontier,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    clock: Clock,
    /// Lines rendered and not yet written.
    buf: Vec<u8>,
    /// Owed once what is written is fsynced.
    acks: Vec<Ack>,
    /// Owed once `buf` is written.
    written: Vec<(Receipt, oneshot::Sender<Result<Receipt, AuditError>>)>,
    /// Bytes were written since the last job went to the sync thread.
    unsynced: bool,
    shared: Arc<Shared>,
}

fn corrupt(dir: &Path, segment: &Path, line: u64, seq: Option<u64>, err: StepError) -> AuditError {
    let problem = match err {
        StepError::Head(m) => Problem::Malformed(m.to_owned()),
        StepError::Seq { expected, found } if found < expected => {
            Problem::Reordered { expected, found }
        }
        StepError::Seq { expected, found } => Problem::SeqGap {
            expected,
            found,
            note: "",
        },
        StepError::Prev => Problem::HashMismatch("prev does not match the record before".into()),
        StepError::Checkpoint(e) => Problem::Malformed(e.to_string()),
    };
    AuditError::Corrupt {
        dir: dir.to_owned(),
        failure: Box::new(Failure {
            segment: segment.to_owned(),
            line,
            seq,
            problem,
        }),
    }
}

/// A checkpoint this log's writer did not sign: someone re-signed the log, or the audit key
/// was changed under it.
fn foreign_checkpoint(
    dir: &Path,
    cp: &Checkpoint,
    own_key: &ed25519_dalek::VerifyingKey,
) -> AuditError {
    AuditError::Trust(format!(
        "the audit log in {} has a checkpoint (seq {}) signed by key {}, not by this audit key {}: \
         either someone re-signed it, or the audit key was changed. To start with a new key, move the \
         directory aside (it stays verifiable with `enforcer audit verify --key OLD.pub`) and start again",
        dir.display(),
        cp.seq,
        cp.key_id,
        crate::envelope::keys::key_id(own_key),
    ))
}

impl Writer {
    fn open(config: &AuditConfig, key: SigningKey) -> Result<(Self, Option<Recovery>), AuditError> {
        let dir = &config.dir;
        // Only this key's checkpoints are taken as the log's own: appending under a
        // checkpoint someone else signed would vouch for whatever they wrote.
        let own_key = key.verifying_key();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| AuditError::io(format!("creating {}", dir.display()), e))?;
        let mut segments = list_segments(dir)?;
        if segments.is_empty() {
            let path = dir.join(segment_name(0));
            create_segment(&path)?;
            sync_dir(dir)?;
            segments = list_segments(dir)?;
        }
        let Some(last) = segments.last().cloned() else {
            return Err(AuditError::NoLog(dir.clone()));
        };

        // A crash can leave the last line half-written; nothing after the last newline was
        // ever acknowledged, so it is cut away (and the cut recorded).
        let mut last_data = fs::read(&last.path)
            .map_err(|e| AuditError::io(format!("reading {}", last.path.display()), e))?;
        let mut recovered = None;
        if !last_data.is_empty() && !last_data.ends_with(b"\n") {
            let cut = last_data
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let f = OpenOptions::new()
                .write(true)
                .open(&last.path)
                .map_err(|e| AuditError::io(format!("opening {}", last.path.display()), e))?;
            f.set_len(cut as u64)
                .and_then(|_| f.sync_all())
                .map_err(|e| {
                    AuditError::io(
                        format!("truncating torn tail of {}", last.path.display()),
                        e,
                    )
                })?;
            let discarded = (last_data.len() - cut) as u64;
            last_data.truncate(cut);
            recovered = Some(Recovery {
                segment: last.path.clone(),
                offset: cut as u64,
                discarded_bytes: discarded,
                last_good_seq: None,
            });
            tracing::warn!(segment = %last.path.display(), offset = cut, discarded, "audit log: cut a torn last line");
        }

        // Resume the tree from the last checkpoint before the current segment (it carries
        // the frontier) and check every record after it, so the whole segment being
        // appended to is verified; rotation ends each segment with a checkpoint, so this
        // reads two segments.
        let mut loaded: Vec<(usize, Vec<u8>)> = vec![(segments.len() - 1, last_data)];
        let mut start: Option<(usize, usize)> = None; // (index into loaded, byte offset of checkpoint)
        loop {
            let (si, data) = &loaded[loaded.len() - 1];
            let mut off = 0;
            let mut found = None;
            let searched: &[u8] = if *si + 1 == segments.len() { &[] } else { data };
            for line in searched.split_inclusive(|b| *b == b'\n') {
                if parse_head(line.strip_suffix(b"\n").unwrap_or(line))
                    .is_ok_and(|h| h.is_checkpoint())
                {
                    found = Some(off);
                }
                off += line.len();
            }
            if let Some(o) = found {
                start = Some((loaded.len() - 1, o));
                break;
            }
            let (si, _) = loaded[loaded.len() - 1];
            if si == 0 {
                break;
            }
            let p = &segments[si - 1].path;
            let data =
                fs::read(p).map_err(|e| AuditError::io(format!("reading {}", p.display()), e))?;
            loaded.push((si - 1, data));
        }
        loaded.reverse();
        let (mut chain, first_idx, mut first_off) = match start {
            Some((idx_rev, off)) => {
                let idx = loaded.len() - 1 - idx_rev;
                let (si, data) = &loaded[idx];
                let rest = &data[off..];
                let line_len = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                let line = &rest[..line_len];
                let line_no = data[..off].iter().filter(|b| **b == b'\n').count() as u64 + 1;
                let seg = &segments[*si].path;
                let cp = Checkpoint::parse(line)
                    .map_err(|e| corrupt(dir, seg, line_no, None, StepError::Checkpoint(e)))?;
                if cp.key != own_key {
                    return Err(foreign_checkpoint(dir, &cp, &own_key));
                }
                cp.verify_signature(Some(&own_key)).map_err(|e| {
                    corrupt(dir, seg, line_no, Some(cp.seq), StepError::Checkpoint(e))
                })?;
                let chain = Chain::after_checkpoint(cp, line)
                    .map_err(|e| corrupt(dir, seg, line_no, None, StepError::Checkpoint(e)))?;
                (chain, idx, off + line_len + 1)
            }
            None => (Chain::genesis(), 0, 0),
        };
        for (i, (si, data)) in loaded.iter().enumerate().skip(first_idx) {
            let seg = &segments[*si];
            let off = if i == first_idx { first_off } else { 0 };
            let base_line = data[..off.min(data.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64;
            for (n, line) in data[off.min(data.len())..]
                .split_inclusive(|b| *b == b'\n')
                .enumerate()
            {
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let seq = chain.next_seq;
                if off == 0 && n == 0 && seg.first_seq != seq {
                    return Err(corrupt(
                        dir,
                        &seg.path,
                        1,
                        Some(seq),
                        StepError::Seq {
                            expected: seg.first_seq,
                            found: seq,
                        },
                    ));
                }
                if parse_head(line).is_ok_and(|h| h.is_checkpoint())
                    && let Ok(cp) = Checkpoint::parse(line)
                    && cp.key != own_key
                {
                    return Err(foreign_checkpoint(dir, &cp, &own_key));
                }
                chain
                    .step(line, Some(&own_key))
                    .map_err(|e| corrupt(dir, &seg.path, base_line + n as u64 + 1, Some(seq), e))?;
            }
            first_off = 0;
        }
        let _ = first_off;
        // The segment appended to may hold no record yet (rotation creates it empty); its
        // name must still be the seq that comes next, or every record written into it
        // would later read as a replaced segment.
        if loaded.last().is_some_and(|(_, data)| data.is_empty())
            && last.first_seq != chain.next_seq
        {
            return Err(corrupt(
                dir,
                &last.path,
                1,
                Some(chain.next_seq),
                StepError::Seq {
                    expected: last.first_seq,
                    found: chain.next_seq,
                },
            ));
        }
        if let Some(r) = recovered.as_mut() {
            r.last_good_seq = chain.next_seq.checked_sub(1);
        }

        let file = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(|e| AuditError::io(format!("opening {}", last.path.display()), e))?;
        let seg_bytes = file
            .metadata()
            .map_err(|e| AuditError::io(format!("reading {}", last.path.display()), e))?
            .len();
        let since_checkpoint = match &chain.last_checkpoint {
            Some(cp) => chain.next_seq - cp.seq - 1,
            None => chain.next_seq,
        };
        Ok((
            Self {
                config: config.clone(),
                key,
                segment: Segment {
                    file: Arc::new(file),
                    path: last.path.into(),
                },
                jobs: None,
                sync_thread: None,
                seg_bytes,
                next_seq: chain.next_seq,
                prev: chain.prev,
                frontier: chain.frontier,
                since_checkpoint,
                last_checkpoint: Instant::now(),
                clock: Clock::new(),
                buf: Vec::with_capacity(1 << 20),
                acks: Vec::new(),
                written: Vec::new(),
                unsynced: false,
                shared: Arc::new(Shared::default()),
            },
            recovered,
        ))
    }

    /// Takes the line just rendered into `self.buf`, whose hash is `hash`, into the chain
    /// and the tree, and ends it with a newline. Lines are rendered in place: no copy per
    /// record.
    fn commit_line(&mut self, hash: Hash) -> Receipt {
        self.frontier.push(hash);
        self.buf.push(b'\n');
        let receipt = Receipt {
            seq: self.next_seq,
            hash,
        };
        self.prev = hash;
        self.next_seq += 1;
        receipt
    }

    /// Records an event the log writes itself, on the writer's thread.
    fn add_event(&mut self, event: &Event) -> Result<Receipt, AuditError> {
        let mut opening = Vec::new();
        render_opening(&mut opening, event)
            .map_err(|e| AuditError::Encode(e.to_string().into()))?;
        let hash = LineHash::of_opening(&opening);
        self.clock.tick();
        self.add_record(&hash, &opening)
    }

    /// Gives a record opened by [`render_opening`] and hashed that far its place in the
    /// log.
    fn add_record(&mut self, opened: &LineHash, opening: &[u8]) -> Result<Receipt, AuditError> {
        let hash = loop {
            let start = self.buf.len();
            self.buf.extend_from_slice(opening);
            let closing = self.buf.len();
            let ts = self.clock.last();
            if let Err(e) = push_closing(&mut self.buf, ts, self.next_seq, &self.prev) {
                self.buf.truncate(start);
                return Err(AuditError::Encode(e.to_string().into()));
            }
            let line_len = (self.buf.len() - start) as u64;
            let used = self.seg_bytes + start as u64;
            if used > 0 && used + line_len + 1 > self.config.segment_max_bytes {
                self.buf.truncate(start);
                self.rotate()?;
                continue;
            }
            break opened.finish(&self.buf[closing..]);
        };
        let receipt = self.commit_line(hash);
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.config.checkpoint_every {
            self.add_checkpoint();
        }
        Ok(receipt)
    }

    fn add_checkpoint(&mut self) {
        let ts = self.clock.now().to_owned();
        let cp = Checkpoint::sign(&self.frontier, self.prev, ts, &self.key);
        let start = self.buf.len();
        cp.render(&mut self.buf);
        self.commit_line(chain_hash(&self.buf[start..]));
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
    }

    /// Writes what was rendered into the segment file and answers the records that
    /// waited only for that.
    fn write_out(&mut self) -> Result<(), AuditError> {
        if !self.buf.is_empty() {
            #[cfg(test)]
            if self.shared.fail_next_write.swap(false, Ordering::SeqCst) {
                return Err(AuditError::io(
                    format!("writing {}", self.segment.path.display()),
                    std::io::Error::from_raw_os_error(28),
                ));
            }
            (&*self.segment.file).write_all(&self.buf).map_err(|e| {
                AuditError::io(format!("writing {}", self.segment.path.display()), e)
            })?;
            self.seg_bytes += self.buf.len() as u64;
            self.buf.clear();
            self.unsynced = true;
        }
        let n = self.written.len() as u64;
        for (receipt, tx) in self.written.drain(..) {
            let _ = tx.send(Ok(receipt));
        }
        self.shared.records.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the batch and hands the acknowledgements owed after the fsync to the sync
    /// thread (or, before that thread runs, fsyncs and acknowledges here).
    fn dispatch(
        &mut self,
        shutdown: Option<oneshot::Sender<Result<(), AuditError>>>,
    ) -> Result<(), AuditError> {
        self.write_out()?;
        // Records nobody waits on are fsynced too, only with less hurry.
        if self.acks.is_empty() && shutdown.is_none() && !self.unsynced {
            return Ok(());
        }
        self.unsynced = false;
        let job = Job {
            file: self.segment.file.clone(),
            path: self.segment.path.clone(),
            acks: std::mem::take(&mut self.acks),
            shutdown,
        };
        let spare = match &self.jobs {
            Some(jobs) => jobs.0.send(job).map_err(|_| self.shared.gone())?,
            None => {
                let mut emptied = Vec::new();
                sync_group(vec![job], &self.shared, &mut emptied)?;
                emptied.pop()
            }
        };
        if let Some(acks) = spare {
            self.acks = acks;
        }
        Ok(())
    }

    /// Seals the current segment with a checkpoint and starts the next one, named for the
    /// seq it starts at; its first record links to that checkpoint. The new file is
    /// created only once the sealed segment is durable, so a crash never leaves a segment
    /// after one with a torn tail.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.add_checkpoint();
        self.write_out()?;
        let old = &self.segment.path;
        self.segment
            .file
            .sync_data()
            .map_err(|e| AuditError::io(format!("fsync of {}", old.display()), e))?;
        let path = self.config.dir.join(segment_name(self.next_seq));
        let file = create_segment(&path)?;
        sync_dir(&self.config.dir)?;
        self.segment = Segment {
            file: Arc::new(file),
            path: path.into(),
        };
        self.seg_bytes = 0;
        self.unsynced = false;
        Ok(())
    }

    fn handle(
        &mut self,
        item: Item,
        opening: &[u8],
        shutdown: &mut Option<oneshot::Sender<Result<(), AuditError>>>,
    ) -> Result<(), AuditError> {
        match item {
            Item::Record {
                hash, until, ack, ..
            } => match self.add_record(&hash, opening) {
                Ok(r) if until == Until::Written => self.written.push((r, ack)),
                Ok(r) => self.acks.push(Ack::Record(r, ack)),
                Err(e) => {
                    let _ = ack.send(Err(e.clone()));
                    return Err(e);
                }
            },
            Item::Checkpoint(ack) => {
                if self.since_checkpoint > 0 {
                    self.add_checkpoint();
                }
                self.acks.push(Ack::Checkpoint(
                    self.frontier.size() - u64::from(self.frontier.size() > 0),
                    ack,
                ));
            }
            Item::Shutdown(ack) => *shutdown = Some(ack),
        }
        Ok(())
    }

    /// Lets the sync thread finish what it was given and waits for it.
    fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
    }

    /// Stops for good after `err`: the batch being built is refused, later calls fail.
    fn fail(&mut self, err: AuditError, shutdown: Option<oneshot::Sender<Result<(), AuditError>>>) {
        self.refuse(err, shutdown);
        self.stop();
    }

    /// Marks the log failed and refuses the batch being built; the writer thread stops.
    fn refuse(
        &mut self,
        err: AuditError,
        shutdown: Option<oneshot::Sender<Result<(), AuditError>>>,
    ) {
        tracing::error!(error = %err, "audit log failed; refusing further records");
        self.shared.fail(err.clone());
        fail_acks(std::mem::take(&mut self.acks), &err);
        for (_, tx) in self.written.drain(..) {
            let _ = tx.send(Err(err.clone()));
        }
        if let Some(tx) = shutdown {
            let _ = tx.send(Err(err.clone()));
        }
    }

    fn start_sync_thread(&mut self, queue: Arc<Queue>) -> bool {
        let jobs = Arc::new(SyncJobs::default());
        let (shared, for_thread) = (self.shared.clone(), jobs.clone());
        match std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || sync_thread(for_thread, shared, queue))
        {
            Ok(t) => {
                self.sync_thread = Some(t);
                self.jobs = Some(SyncSender(jobs));
                true
            }
            Err(e) => {
                self.shared
                    .fail(AuditError::io("starting the audit sync thread", e));
                false
            }
        }
    }

    /// Whether a record with an opening of `opening_len` bytes might not fit in the current
    /// segment. Errs towards yes: the closing's length is only bounded here.
    fn may_rotate(&self, opening_len: usize) -> bool {
        /// More than the closing (`ts`, `seq`, `prev` with their keys) takes.
        const CLOSING_BOUND: u64 = 512;
        self.seg_bytes + self.buf.len() as u64 + opening_len as u64 + CLOSING_BOUND
            > self.config.segment_max_bytes
    }

    /// How long the writer thread may sleep: until the next checkpoint is due.
    fn wait(&self) -> Wait {
        if self.since_checkpoint > 0 {
            Wait::Until(self.last_checkpoint + self.config.checkpoint_interval)
        } else {
            Wait::Forever
        }
    }
}

/// The writer's state, held by whichever thread writes: the writer thread, or a caller
/// that found the queue empty and writes in its place (see `AuditLog::write_queued`).
struct Core {
    writer: Writer,
    intake: Intake,
    /// The writer thread has stopped; nothing is written any more.
    finished: bool,
}

/// The most records a caller writes in one round in the writer's place: a caller is a
/// request being served, and a backlog larger than this is the writer thread's.
const INLINE_BATCH: usize = 256;

/// Records queued while an fsync runs before a caller wakes the writer thread for them.
const WRITER_WAKE_BATCH: usize = 256;

/// What writing in the writer's place ended with.
enum Inline {
    /// Everything taken is written.
    Done,
    /// A batch is written and more was taken.
    BatchFull,
    /// A control message or a failure is the writer thread's to handle.
    WriterNeeded,
}

/// What a round of the writer thread ended with.
enum Round {
    Continue,
    Stopped,
}

impl Core {
    /// Writes queued records for a caller, up to a batch, and stops at anything else
    /// (checkpoint requests, shutdown, a failure), which is the writer thread's to handle.
    fn write_inline(&mut self) -> Inline {
        let Core { writer, intake, .. } = self;
        if writer.shared.failed.load(Ordering::SeqCst) {
            return Inline::WriterNeeded;
        }
        let mut result = Ok(());
        let mut handed_on = false;
        let batch = writer.config.max_batch.min(INLINE_BATCH);
        writer.clock.tick();
        while writer.acks.len() + writer.written.len() < batch {
            match intake.next() {
                // A record that may start a new segment is the writer thread's too: the
                // rotation fsyncs, and a request must not wait for the disk.
                Next::Item(item @ Item::Record { .. }, opening)
                    if !writer.may_rotate(opening.len()) =>
                {
                    result = writer.handle(item, &intake.openings[opening], &mut None);
                    if result.is_err() {
                        break;
                    }
                }
                Next::Item(item, opening) => {
                    intake.unread(item, opening);
                    handed_on = true;
                    break;
                }
                Next::Empty | Next::HungUp => break,
            }
        }
        if let Err(err) = result.and_then(|()| writer.dispatch(None)) {
            writer.refuse(err, None);
            return Inline::WriterNeeded;
        }
        if handed_on {
            Inline::WriterNeeded
        } else if intake.items.is_empty() {
            Inline::Done
        } else {
            Inline::BatchFull
        }
    }

    /// One round of the writer thread: everything queued, the checkpoint if due, the
    /// write; or, once every handle is gone, the seal.
    fn writer_round(&mut self) -> Round {
        let Core { writer, intake, .. } = self;
        if writer.shared.failed.load(Ordering::SeqCst) {
            // The sync thread (or a caller writing in the writer's place) failed: nothing
            // more is written, not even a seal, and callers learn why from the failure.
            writer.fail(writer.shared.gone(), None);
            return Round::Stopped;
        }
        let first = match intake.next() {
            Next::Item(item, opening) => Some((item, opening)),
            Next::Empty => None,
            Next::HungUp => {
                // Every handle is gone: seal what was written.
                writer.shared.closed.store(true, Ordering::SeqCst);
                if writer.since_checkpoint > 0 {
                    writer.add_checkpoint();
                }
                if let Err(err) = writer.dispatch(None) {
                    tracing::error!(error = %err, "audit log: final checkpoint failed");
                }
                writer.stop();
                return Round::Stopped;
            }
        };
        let mut shutdown = None;
        let mut result = Ok(());
        if let Some((item, opening)) = first {
            writer.clock.tick();
            result = writer.handle(item, &intake.openings[opening], &mut shutdown);
            while result.is_ok()
                && shutdown.is_none()
                && writer.acks.len() + writer.written.len() < writer.config.max_batch
            {
                match intake.next() {
                    Next::Item(item, opening) => {
                        result = writer.handle(item, &intake.openings[opening], &mut shutdown);
                    }
                    Next::Empty | Next::HungUp => break,
                }
            }
        }
        if let Err(err) = result {
            writer.fail(err, shutdown);
            return Round::Stopped;
        }
        if writer.since_checkpoint > 0
            && (shutdown.is_some()
                || writer.last_checkpoint.elapsed() >= writer.config.checkpoint_interval)
        {
            writer.add_checkpoint();
        }
        let closing = shutdown.is_some();
        // Written at once; the fsync is the sync thread's, shared with whatever else is
        // written while it runs.
        if let Err(err) = writer.dispatch(shutdown) {
            writer.fail(err, None);
            return Round::Stopped;
        }
        if closing {
            writer.stop();
            return Round::Stopped;
        }
        Round::Continue
    }
}

#[cfg(test)]
pub(crate) struct PausedWriter<'a> {
    core: Option<MutexGuard<'a, Core>>,
    queue: &'a Queue,
}

#[cfg(test)]
impl Drop for PausedWriter<'_> {
    fn drop(&mut self) {
        drop(self.core.take());
        self.queue.nudge();
    }
}

fn lock_core<'a>(core: &'a Mutex<Core>, shared: &Shared) -> MutexGuard<'a, Core> {
    core.lock().unwrap_or_else(|poisoned| {
        // A panic mid-write leaves the chain's state unknown: nothing more is written.
        shared.fail(AuditError::Failed(
            "a thread panicked while writing the audit log".into(),
        ));
        poisoned.into_inner()
    })
}

/// The writer thread: writes what callers queue behind one another, signs checkpoints
/// when due, takes control messages, and seals the log when every handle is gone.
fn writer_thread(core: &Mutex<Core>, queue: &Queue, shared: &Shared) {
    let started = {
        let mut core = lock_core(core, shared);
        let queue = core.intake.queue.clone();
        core.writer.start_sync_thread(queue)
    };
    if !started {
        let mut core = lock_core(core, shared);
        core.finished = true;
        core.intake.close();
        return;
    }
    loop {
        let (wait, leftovers) = {
            let core = lock_core(core, shared);
            (core.writer.wait(), !core.intake.items.is_empty())
        };
        // A round stops at a full batch; what it took beyond that is written next, at once.
        if !leftovers {
            queue.wait_ready(wait);
        }
        let mut core = lock_core(core, shared);
        if let Round::Stopped = core.writer_round() {
            core.finished = true;
            core.intake.close();
            return;
        }
    }
}

enum Wait {
    Until(Instant),
    Forever,
}

enum Next {
    /// An item, with its record opening's place in [`Intake::openings`] (empty for others).
    Item(Item, Range<usize>),
    /// Nothing came in time.
    Empty,
    /// Nothing is queued and nothing more will be.
    HungUp,
}

/// The writer's end of the queue: what it took from the inbox, used up in order.
struct Intake {
    queue: Arc<Queue>,
    openings: Vec<u8>,
    items: VecDeque<Item>,
    /// Where the next record's opening starts in `openings`.
    opening_start: usize,
}

impl Intake {
    /// The next item queued, without waiting.
    fn next(&mut self) -> Next {
        if self.items.is_empty() && !self.refill() {
            return if self.queue.lock().hung_up {
                Next::HungUp
            } else {
                Next::Empty
            };
        }
        match self.items.pop_front() {
            Some(item) => {
                let opening = match &item {
                    Item::Record { end, .. } => {
                        let opening = self.opening_start..*end;
                        self.opening_start = *end;
                        opening
                    }
                    Item::Checkpoint(_) | Item::Shutdown(_) => 0..0,
                };
                Next::Item(item, opening)
            }
            None => Next::Empty,
        }
    }

    /// Puts back the item [`next`](Self::next) just gave, to be given again.
    fn unread(&mut self, item: Item, opening: Range<usize>) {
        if let Item::Record { .. } = item {
            self.opening_start = opening.start;
        }
        self.items.push_front(item);
    }

    /// Takes everything queued; `false` if nothing is.
    fn refill(&mut self) -> bool {
        self.openings.clear();
        // Empty already, but a drained deque starts its next fill where the last one
        // ended; cleared, callers queue into its first, cache-warm slots again instead of
        // wandering through all of its capacity.
        self.items.clear();
        self.opening_start = 0;
        let mut inbox = self.queue.lock();
        if inbox.items.is_empty() {
            return false;
        }
        inbox.records = 0;
        std::mem::swap(&mut inbox.items, &mut self.items);
        std::mem::swap(&mut inbox.openings, &mut self.openings);
        true
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.close();
    }
}

impl Intake {
    /// Whatever way the writer stops, later callers are refused and queued ones learn
    /// (from their dropped acknowledgement) that their records were not written.
    fn close(&mut self) {
        let mut inbox = self.queue.lock();
        inbox.stopped = true;
        inbox.idle = false;
        let items = std::mem::take(&mut inbox.items);
        inbox.openings = Vec::new();
        inbox.records = 0;
        drop(inbox);
        drop(items);
        self.items.clear();
    }
}

fn create_segment(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .append(true)
        .mode(0o600)
        .create_new(true)
        .open(path)
        .map_err(|e| AuditError::io(format!("creating {}", path.display()), e))
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn cached_timestamps_match_the_rfc3339_formatter() {
        let mut clock = Clock::new();
        let base = OffsetDateTime::from_unix_timestamp(1_746_000_000).unwrap();
        for (secs, nanos) in [
            (0, 0),
            (0, 123_000_000),
            (0, 5),
            (1, 100),
            (1, 999_999_999),
            (86_399, 10_000),
            (86_400, 0),
        ] {
            let t = base + time::Duration::new(secs, nanos);
            assert_eq!(clock.at(t), t.format(&Rfc3339).unwrap());
        }
    }
}
