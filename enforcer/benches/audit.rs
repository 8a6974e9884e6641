//! Audit log throughput: durable appends (group commit + fsync) against raw appends of the
//! same bytes into the same files with the same fsyncs, and single-core verification speed.
//!
//! `cargo bench -p enforcer --bench audit`; AUDIT_BENCH_RECORDS overrides the records per round.
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::Path,
    time::Instant,
};

use ed25519_dalek::SigningKey;
use enforcer::audit::{
    AuditConfig, AuditLog, Event, EventKind, PendingRecord, VerifyOptions, verify,
    verify::list_segments,
};

// The allocator the `enforcer` binary runs with, so the figures are those of the daemon.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Rounds of durable and raw appends; odd, so the median is one round's ratio.
const ROUNDS: usize = 7;

/// Distinct events a round cycles through. The daemon records each event right after
/// building it, while it is in the CPU's caches; a round of events all built in advance
/// would lie cold across hundreds of megabytes and charge the log a cache miss for each of
/// their strings. A thousand-odd distinct events (about a megabyte) stay as warm as that.
const DISTINCT_EVENTS: u64 = 1024;

fn event(i: u64) -> Event {
    Event::new(if i.is_multiple_of(7) {
        EventKind::RequestDenied
    } else {
        EventKind::RequestAllowed
    })
    .envelope(format!("env-{}", i % 16))
    .agent(format!("agent-{}", i % 64))
    .rule(format!("capabilities[{}]", i % 5))
    .request("POST", "api.example.com", "/v1/chat/completions")
    .detail("status", 200)
    .detail("cost_units", i % 1000)
}

/// One durable run: `records` of `events`, in turn, appended through a fresh log in `dir`,
/// as many in flight as the queue holds. Returns the seconds taken and the fsyncs the log
/// made.
fn durable_round(
    dir: &Path,
    key: &SigningKey,
    events: &[Event],
    records: u64,
) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    let cfg = AuditConfig {
        queue_capacity: 16_384,
        max_batch: 4096,
        ..AuditConfig::new(dir)
    };
    let window = cfg.queue_capacity;
    let mut pending = VecDeque::with_capacity(window);
    let start = Instant::now();
    let (log, _) = AuditLog::open(cfg, key.clone())?;
    for ev in events.iter().cycle().take(records as usize) {
        // Wait for the oldest receipt when the window is full, so `submit` never refuses.
        if pending.len() >= window
            && let Some(p) = pending.pop_front()
        {
            PendingRecord::wait_blocking(p)?;
        }
        pending.push_back(log.submit(ev)?);
    }
    for p in pending {
        p.wait_blocking()?;
    }
    log.close_blocking()?;
    Ok((start.elapsed().as_secs_f64(), log.stats().batches.max(1)))
}

/// Raw appends of a durable run's segments into a new directory `dir`, with the log's file
/// handling: each segment a new file, the directory fsynced once it is made, its lines
/// written in rounds of write + fsync (`fsyncs` of them over the whole run, as the group
/// commits made), and its last round fsynced before the next file is made.
fn raw_round(dir: &Path, segments: &[Vec<u8>], fsyncs: u64) -> std::io::Result<f64> {
    let segments: Vec<Vec<&[u8]>> = segments
        .iter()
        .map(|seg| seg.split_inclusive(|b| *b == b'\n').collect())
        .collect();
    let lines: usize = segments.iter().map(Vec::len).sum();
    let per_batch = lines.div_ceil(fsyncs as usize).max(1);
    let start = Instant::now();
    fs::create_dir(dir)?;
    let mut buf = Vec::with_capacity(4 << 20);
    for (i, seg) in segments.iter().enumerate() {
        let mut raw = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(dir.join(format!("raw-{i}.jsonl")))?;
        File::open(dir)?.sync_all()?;
        for chunk in seg.chunks(per_batch) {
            buf.clear();
            for l in chunk {
                buf.extend_from_slice(l);
            }
            raw.write_all(&buf)?;
            raw.sync_data()?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::var("AUDIT_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // Same disk as the build, not a tmpfs.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let key = SigningKey::from_bytes(&[7; 32]);

    // A virtual disk's speed drifts by 2-3x within seconds, so one durable run followed by
    // one raw run compares two different disks. Instead both sides run in alternating
    // order over several rounds, each round's raw side replaying exactly the files, the bytes
    // and the fsyncs of a durable run, and the median of the per-round ratios is reported.
    // Events are built before the clock starts (see DISTINCT_EVENTS): the raw side gets its
    // bytes for free too, so only recording (render, hash, sign, write, fsync, acknowledge)
    // is compared, not the caller's making and freeing of its events.
    let events: Vec<Event> = (0..DISTINCT_EVENTS.min(n)).map(event).collect();
    let mut ratios = Vec::with_capacity(ROUNDS);
    let (mut durable_total, mut raw_total, mut fsyncs_total, mut mb) = (0.0, 0.0, 0, 0.0);
    let mut previous: Option<(Vec<Vec<u8>>, u64)> = None;
    let mut last_dir = base.path().join("log-0");
    for round in 0..ROUNDS {
        let dir = base.path().join(format!("log-{round}"));
        let raw_dir = base.path().join(format!("raw-{round}"));
        // Odd rounds run the raw side first, on the previous round's bytes.
        let raw_first = round % 2 == 1 && previous.is_some();
        let mut raw_secs = 0.0;
        if raw_first && let Some((segments, fsyncs)) = &previous {
            raw_secs = raw_round(&raw_dir, segments, *fsyncs)?;
        }
        let (durable_secs, fsyncs) = durable_round(&dir, &key, &events, n)?;
        let segments = list_segments(&dir)?
            .iter()
            .map(|seg| fs::read(&seg.path))
            .collect::<Result<Vec<_>, _>>()?;
        if !raw_first {
            raw_secs = raw_round(&raw_dir, &segments, fsyncs)?;
        }
        let ratio = raw_secs / durable_secs;
        println!(
            "  round {round}: durable {:>8.0} records/s ({fsyncs} fsyncs), raw {:>8.0} records/s{}, ratio {ratio:.2}",
            n as f64 / durable_secs,
            n as f64 / raw_secs,
            if raw_first { " (ran first)" } else { "" },
        );
        ratios.push(ratio);
        durable_total += durable_secs;
        raw_total += raw_secs;
        fsyncs_total += fsyncs;
        mb = segments.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
        previous = Some((segments, fsyncs));
        // Keep the disk footprint to one round; the last log stays for `verify` below.
        fs::remove_dir_all(&raw_dir)?;
        if round > 0 {
            fs::remove_dir_all(&last_dir)?;
        }
        last_dir = dir;
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let total = (ROUNDS as u64 * n) as f64;
    println!(
        "audit append (durable, group commit): {ROUNDS} rounds of {n} records ({mb:.1} MB each): {:.0} records/s, {fsyncs_total} fsyncs",
        total / durable_total
    );
    println!(
        "raw append of the same bytes, same fsyncs: {:.0} records/s",
        total / raw_total
    );
    println!(
        "ratio audit/raw: median {median:.2} of {ROUNDS} rounds (min {:.2}, max {:.2}; totals {:.2}) (target >= 0.80)",
        ratios[0],
        ratios[ratios.len() - 1],
        raw_total / durable_total
    );
    let dir = last_dir;

    // Verification on one core, best of three.
    let opts = VerifyOptions {
        trusted_key: Some(key.verifying_key()),
        from_checkpoint: None,
    };
    let mut best = f64::MAX;
    let mut records = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let report = verify(&dir, &opts)?;
        best = best.min(start.elapsed().as_secs_f64());
        if let Some(f) = report.failure {
            return Err(format!("benchmark log failed verification: {f}").into());
        }
        records = report.records;
    }
    let verify_rate = records as f64 / best;
    println!(
        "audit verify: {records} records in {best:.3} s = {verify_rate:.0} records/s on one core (target >= 1000000)"
    );
    Ok(())
}
