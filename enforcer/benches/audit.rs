//! Audit log throughput: durable appends (group commit + fsync) against raw appends of the
//! same bytes with the same fsync pattern, and single-core verification speed.
//!
//! `cargo bench -p enforcer --bench audit`; AUDIT_BENCH_RECORDS overrides the record count.
use std::{
    collections::VecDeque,
    fs::{self, OpenOptions},
    io::Write as _,
    time::Instant,
};

use ed25519_dalek::SigningKey;
use enforcer::audit::{
    AuditConfig, AuditLog, Event, EventKind, PendingRecord, VerifyOptions, verify,
    verify::list_segments,
};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::var("AUDIT_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    // Same disk as the build, not a tmpfs.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let dir = base.path().join("log");
    let key = SigningKey::from_bytes(&[7; 32]);
    let cfg = AuditConfig {
        queue_capacity: 16_384,
        max_batch: 4096,
        ..AuditConfig::new(&dir)
    };

    // Events are built before the clock starts: the raw side gets its bytes for free too,
    // so only recording (render, hash, sign, write, fsync, acknowledge) is compared.
    let events: Vec<Event> = (0..n).map(event).collect();
    let window = cfg.queue_capacity;
    let mut pending = VecDeque::with_capacity(window);

    // Durable appends: keep as many records in flight as the queue holds (so `submit`
    // never has to refuse), waiting for the oldest receipt when the window is full.
    let start = Instant::now();
    let (log, _) = AuditLog::open(cfg, key.clone())?;
    for ev in events {
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
    let audit_secs = start.elapsed().as_secs_f64();
    let batches = log.stats().batches.max(1);

    // Raw appends of exactly the bytes the log wrote, in as many write+fsync rounds.
    let mut bytes = Vec::new();
    for seg in list_segments(&dir)? {
        bytes.extend(fs::read(&seg.path)?);
    }
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    let per_batch = lines.len().div_ceil(batches as usize);
    let raw_path = base.path().join("raw.jsonl");
    let start = Instant::now();
    let mut raw = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&raw_path)?;
    let mut buf = Vec::with_capacity(4 << 20);
    for chunk in lines.chunks(per_batch) {
        buf.clear();
        for l in chunk {
            buf.extend_from_slice(l);
        }
        raw.write_all(&buf)?;
        raw.sync_data()?;
    }
    let raw_secs = start.elapsed().as_secs_f64();

    let audit_rate = n as f64 / audit_secs;
    let raw_rate = n as f64 / raw_secs;
    println!(
        "audit append (durable, group commit): {n} records in {audit_secs:.2} s = {audit_rate:.0} records/s ({batches} fsyncs, {:.1} MB)",
        bytes.len() as f64 / 1e6
    );
    println!("raw append of the same bytes, same fsyncs: {raw_rate:.0} records/s");
    println!(
        "ratio audit/raw: {:.2} (target >= 0.80)",
        audit_rate / raw_rate
    );

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
