//! End-to-end tests of the log on disk: write, damage, verify, recover, prove.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use serde_json::json;

use super::{
    verify::{Problem, list_segments},
    *,
};

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        segment_max_bytes: 8 * 1024,
        checkpoint_every: 10,
        ..AuditConfig::new(dir)
    }
}

fn event(i: usize) -> Event {
    let kinds = EventKind::ALL;
    Event::new(kinds[i % kinds.len()])
        .envelope(format!("env-{}", i % 3))
        .agent(format!("agent-{}", i % 4))
        .rule(format!("cap[{i}]"))
        .detail("n", i)
}

/// Writes `n` events and closes the log (which seals it with a checkpoint).
fn write_log(
    cfg: AuditConfig,
    key: SigningKey,
    events: impl IntoIterator<Item = Event>,
) -> Vec<Receipt> {
    let (log, _) = AuditLog::open(cfg, key).unwrap();
    let pending: Vec<_> = events
        .into_iter()
        .map(|e| submit_retrying(&log, e))
        .collect();
    let receipts = pending
        .into_iter()
        .map(|p| p.wait_blocking().unwrap())
        .collect();
    log.close_blocking().unwrap();
    receipts
}

fn submit_retrying(log: &AuditLog, e: Event) -> PendingRecord {
    loop {
        match log.submit(e.clone()) {
            Ok(p) => return p,
            Err(AuditError::QueueFull { .. }) => std::thread::yield_now(),
            Err(err) => panic!("{err}"),
        }
    }
}

fn verify_with_key(dir: &Path, k: &SigningKey) -> VerifyReport {
    verify(
        dir,
        &VerifyOptions {
            trusted_key: Some(k.verifying_key()),
            from_checkpoint: None,
        },
    )
    .unwrap()
}

/// Every line of the log: (segment, line number from 1, the line with its newline).
fn all_lines(dir: &Path) -> Vec<(PathBuf, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for seg in list_segments(dir).unwrap() {
        let data = fs::read(&seg.path).unwrap();
        for (i, l) in data.split_inclusive(|b| *b == b'\n').enumerate() {
            out.push((seg.path.clone(), i as u64 + 1, l.to_vec()));
        }
    }
    out
}

fn rewrite(dir: &Path, lines: &[(PathBuf, u64, Vec<u8>)]) {
    for seg in list_segments(dir).unwrap() {
        let data: Vec<u8> = lines
            .iter()
            .filter(|(p, _, _)| *p == seg.path)
            .flat_map(|(_, _, l)| l.clone())
            .collect();
        fs::write(&seg.path, data).unwrap();
    }
}

fn failure(r: &VerifyReport) -> &Failure {
    r.failure.as_ref().expect("tampering went undetected")
}

fn seq_of(line: &[u8]) -> u64 {
    record::parse_head(line.strip_suffix(b"\n").unwrap())
        .unwrap()
        .seq
}

#[test]
fn a_clean_log_verifies_across_rotated_segments() {
    let dir = tempfile::tempdir().unwrap();
    let receipts = write_log(config(dir.path()), key(1), (0..300).map(event));
    assert_eq!(receipts.len(), 300);
    let segs = list_segments(dir.path()).unwrap();
    assert!(
        segs.len() >= 3,
        "expected rotation, got {} segments",
        segs.len()
    );
    let r = verify_with_key(dir.path(), &key(1));
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!(r.segments, segs.len());
    assert_eq!(
        r.unsigned_tail(),
        0,
        "close seals the log with a checkpoint"
    );
    assert!(r.checkpoints >= 30);
    // Each later segment starts where the previous one ended and links to its checkpoint.
    let lines = all_lines(dir.path());
    for seg in &segs[1..] {
        let i = lines
            .iter()
            .position(|(p, n, _)| *p == seg.path && *n == 1)
            .unwrap();
        let (prev, first) = (&lines[i - 1].2, &lines[i].2);
        assert!(prev.windows(12).any(|w| w == b"\"checkpoint\""));
        let h = record::parse_head(first.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(h.seq, seg.first_seq);
        assert_eq!(
            h.prev,
            merkle::chain_hash(prev.strip_suffix(b"\n").unwrap())
        );
    }
}

#[test]
fn a_flipped_byte_names_the_altered_record() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..50).map(event));
    let mut lines = all_lines(dir.path());
    // Line 5 is an event record: alter its agent.
    let target = lines[5].clone();
    let pos = target.2.windows(6).position(|w| w == b"agent-").unwrap() + 6;
    lines[5].2[pos] ^= 0x01;
    rewrite(dir.path(), &lines);
    let r = verify_with_key(dir.path(), &key(1));
    let f = failure(&r);
    assert_eq!(
        (f.segment.clone(), f.line, f.seq),
        (target.0, target.1, Some(seq_of(&target.2)))
    );
    assert!(matches!(f.problem, Problem::HashMismatch(_)), "{f}");
    assert!(f.to_string().contains("hash mismatch"), "{f}");
}

#[test]
fn a_deleted_record_is_a_seq_gap() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..30).map(event));
    let mut lines = all_lines(dir.path());
    let removed = lines.remove(7);
    rewrite(dir.path(), &lines);
    let f = failure(&verify_with_key(dir.path(), &key(1))).clone();
    let s = seq_of(&removed.2);
    assert_eq!(
        f.problem,
        Problem::SeqGap {
            expected: s,
            found: s + 1,
            note: " (deleted)"
        }
    );
    assert_eq!(f.line, removed.1);
    assert!(f.to_string().contains("seq gap"));
}

#[test]
fn swapped_records_are_reordered() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..30).map(event));
    let mut lines = all_lines(dir.path());
    let (a, b) = (lines[3].2.clone(), lines[4].2.clone());
    lines[3].2 = b;
    lines[4].2 = a.clone();
    rewrite(dir.path(), &lines);
    let f = failure(&verify_with_key(dir.path(), &key(1))).clone();
    let s = seq_of(&a);
    assert_eq!(
        f.problem,
        Problem::Reordered {
            expected: s,
            found: s + 1
        }
    );
    assert!(f.to_string().contains("reordered"));
}

#[test]
fn a_torn_tail_is_reported_and_a_cut_tail_is_caught_by_a_saved_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..30).map(event));
    let saved = all_lines(dir.path()).last().unwrap().2.clone();
    let last = list_segments(dir.path()).unwrap().pop().unwrap().path;
    let data = fs::read(&last).unwrap();

    fs::write(&last, &data[..data.len() - 10]).unwrap();
    let f = failure(&verify_with_key(dir.path(), &key(1))).clone();
    assert_eq!(f.problem, Problem::TornTail);

    // Cut at a line boundary: only a checkpoint the auditor kept can tell.
    let lines = all_lines(dir.path());
    let keep = &lines[..lines.len() - 3];
    rewrite(dir.path(), keep);
    let plain = verify_with_key(dir.path(), &key(1));
    assert!(plain.ok() && plain.unsigned_tail() > 0);
    let from = VerifyOptions {
        trusted_key: Some(key(1).verifying_key()),
        from_checkpoint: Some(saved.clone()),
    };
    let f = verify(dir.path(), &from).unwrap().failure.unwrap();
    assert!(matches!(f.problem, Problem::TruncatedTail { .. }), "{f}");
    assert!(f.to_string().contains("truncated tail"));

    // The intact log passes from that checkpoint.
    fs::write(&last, &data).unwrap();
    let r = verify(dir.path(), &from).unwrap();
    assert!(r.ok(), "{:?}", r.failure);
}

#[test]
fn a_replaced_segment_is_named() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_log(config(a.path()), key(1), (0..300).map(event));
    // Same key, same shape, different content: a plausible forgery.
    write_log(
        config(b.path()),
        key(1),
        (0..300).map(|i| event(i).detail("forged", true)),
    );
    let (sa, sb) = (
        list_segments(a.path()).unwrap(),
        list_segments(b.path()).unwrap(),
    );
    let victim = sa[1].clone();
    let replacement = sb.iter().find(|s| s.first_seq == victim.first_seq).cloned();
    let replacement = replacement.unwrap_or_else(|| sb[1].clone());
    fs::copy(&replacement.path, &victim.path).unwrap();
    let f = failure(&verify_with_key(a.path(), &key(1))).clone();
    assert_eq!(f.segment, victim.path);
    assert_eq!(f.line, 1);
    assert!(
        matches!(
            f.problem,
            Problem::SegmentReplaced(_) | Problem::SeqGap { .. }
        ),
        "{f}"
    );
}

#[test]
fn a_checkpoint_forged_with_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..25).map(event));
    let mut lines = all_lines(dir.path());
    let idx = lines.len() - 1;
    let cp = Checkpoint::parse(lines[idx].2.strip_suffix(b"\n").unwrap()).unwrap();
    let forged = Checkpoint::sign(&cp.frontier().unwrap(), cp.prev, cp.ts.clone(), &key(2));
    let mut line = forged.to_line();
    line.push(b'\n');
    lines[idx].2 = line;
    rewrite(dir.path(), &lines);
    let f = failure(&verify_with_key(dir.path(), &key(1))).clone();
    assert!(
        matches!(f.problem, Problem::BadCheckpointSignature(_)),
        "{f}"
    );
    assert!(f.to_string().contains("not the trusted key"), "{f}");
    assert_eq!(f.seq, Some(cp.seq));
    // Without a trusted key the forgery is self-consistent: that is why --key matters.
    assert!(verify(dir.path(), &VerifyOptions::default()).unwrap().ok());
}

#[test]
fn a_crash_mid_write_is_recovered_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..5).map(event));
    let last = list_segments(dir.path()).unwrap().pop().unwrap().path;
    let before = fs::read(&last).unwrap();
    let mut torn = before.clone();
    torn.extend_from_slice(b"{\"kind\":\"request_allowed\",\"ts\":\"2025");
    fs::write(&last, &torn).unwrap();

    let (log, report) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    let rec = report.recovered.clone().unwrap();
    assert_eq!(rec.discarded_bytes, 36);
    assert_eq!(rec.offset, before.len() as u64);
    assert_eq!(rec.last_good_seq, Some(5));
    let r = log.append_blocking(event(99)).unwrap();
    assert_eq!(r.seq, report.next_seq);
    log.close_blocking().unwrap();
    let v = verify_with_key(dir.path(), &key(1));
    assert!(v.ok(), "{:?}", v.failure);
    let text = String::from_utf8(fs::read(&last).unwrap()).unwrap();
    assert!(text.contains("\"kind\":\"log_recovered\""));
}

#[test]
fn records_no_checkpoint_covers_are_named_and_signed_when_the_log_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..15).map(event));
    // Without the checkpoint close wrote, the records after the one before are covered by
    // nothing but the chain: what a crash leaves, and what anyone who can write the files
    // could have appended.
    let mut lines = all_lines(dir.path());
    lines.pop();
    rewrite(dir.path(), &lines);
    let unsigned = verify_with_key(dir.path(), &key(1));
    assert!(unsigned.ok(), "{:?}", unsigned.failure);
    let tail = unsigned.unsigned_tail();
    assert!(tail > 0);
    let last_seq = seq_of(&lines.last().unwrap().2);

    let (log, report) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    assert_eq!(
        report.adopted_unsigned,
        Some((last_seq + 1 - tail, last_seq))
    );
    assert_eq!(report.recovered, None);
    log.close_blocking().unwrap();

    let after = all_lines(dir.path());
    let recovered = &after[lines.len()].2;
    let text = String::from_utf8_lossy(recovered);
    assert!(text.contains("\"kind\":\"log_recovered\""), "{text}");
    assert!(
        text.contains(&format!("\"unsigned_first_seq\":{}", last_seq + 1 - tail)),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"unsigned_last_seq\":{last_seq}")),
        "{text}"
    );
    // Signed at once, not whenever the next checkpoint falls due.
    let next = &after[lines.len() + 1].2;
    assert!(
        record::parse_head(next.strip_suffix(b"\n").unwrap())
            .unwrap()
            .is_checkpoint()
    );
    let v = verify_with_key(dir.path(), &key(1));
    assert!(v.ok() && v.unsigned_tail() == 0, "{:?}", v.failure);

    // A log closed cleanly adopts nothing.
    let (log, report) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    assert_eq!(report.adopted_unsigned, None);
    log.close_blocking().unwrap();
}

#[test]
fn open_refuses_a_log_another_key_signed() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(2), (0..15).map(event));
    match AuditLog::open(config(dir.path()), key(1)) {
        Err(AuditError::Trust(m)) => {
            assert!(
                m.contains("not by this audit key") && m.contains("move the"),
                "{m}"
            )
        }
        other => panic!("expected Trust, got {other:?}"),
    }
    // A checkpoint by another key after one by this key is damage.
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..25).map(event));
    let mut lines = all_lines(dir.path());
    let idx = lines.len() - 1;
    let cp = Checkpoint::parse(lines[idx].2.strip_suffix(b"\n").unwrap()).unwrap();
    let mut forged =
        Checkpoint::sign(&cp.frontier().unwrap(), cp.prev, cp.ts.clone(), &key(2)).to_line();
    forged.push(b'\n');
    lines[idx].2 = forged;
    rewrite(dir.path(), &lines);
    match AuditLog::open(config(dir.path()), key(1)) {
        Err(AuditError::Trust(m)) => assert!(m.contains("not by this audit key"), "{m}"),
        other => panic!("appended under a foreign checkpoint: {other:?}"),
    }
}

#[test]
fn open_refuses_an_empty_segment_named_for_another_seq() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..5).map(event));
    fs::write(dir.path().join(verify::segment_name(999)), b"").unwrap();
    match AuditLog::open(config(dir.path()), key(1)) {
        Err(AuditError::Corrupt { failure, .. }) => {
            assert!(
                failure.segment.ends_with(verify::segment_name(999)),
                "{failure}"
            )
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn open_refuses_a_damaged_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..15).map(event));
    let mut lines = all_lines(dir.path());
    let n = lines.len();
    // A byte of the record's own content, just before the closing the writer added.
    let pos = lines[n - 2]
        .2
        .windows(6)
        .position(|w| w == b",\"ts\":")
        .unwrap()
        - 2;
    lines[n - 2].2[pos] ^= 0x04;
    rewrite(dir.path(), &lines);
    match AuditLog::open(config(dir.path()), key(1)) {
        Err(AuditError::Corrupt { failure, .. }) => {
            assert!(failure.to_string().contains("hash mismatch"), "{failure}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn reopening_continues_the_chain_and_tree() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let r = write_log(
            config(dir.path()),
            key(1),
            (0..40).map(|i| event(i + round * 40)),
        );
        assert!(r.windows(2).all(|w| w[1].seq > w[0].seq));
    }
    let v = verify_with_key(dir.path(), &key(1));
    assert!(v.ok(), "{:?}", v.failure);
    assert!(v.log_size > 120);
}

#[test]
fn credentials_never_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let e = Event::new(EventKind::RequestAllowed)
        .request("POST", "api.example", "/v1?key=QUERYSECRET")
        .detail("headers", json!({"Authorization": "Bearer HEADERSECRET"}));
    write_log(config(dir.path()), key(1), [e]);
    let text: String = all_lines(dir.path())
        .iter()
        .map(|l| String::from_utf8_lossy(&l.2).into_owned())
        .collect();
    assert!(!text.contains("SECRET"), "{text}");
    assert!(text.contains("[redacted]"));
}

/// Callers writing their own records (the queue was empty) and callers queueing behind
/// them, on many threads at once, with durable records and checkpoints among them: every
/// record lands exactly once, in one unbroken chain.
#[test]
fn callers_writing_in_the_writers_place_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        checkpoint_every: 37,
        ..config(dir.path())
    };
    let (log, _) = AuditLog::open(cfg, key(1)).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..300 {
                    let until = if i % 50 == 0 {
                        Until::Durable
                    } else {
                        Until::Written
                    };
                    let p = loop {
                        match log.submit_until(event(t * 1000 + i), until) {
                            Ok(p) => break p,
                            Err(AuditError::QueueFull { .. }) => std::thread::yield_now(),
                            Err(err) => panic!("{err}"),
                        }
                    };
                    seqs.push(p.wait_blocking().unwrap().seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    log.close_blocking().unwrap();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 8 * 300, "every receipt names its own record");
    assert!(
        list_segments(dir.path()).unwrap().len() > 10,
        "the log rotated while callers wrote"
    );
    let report = verify_with_key(dir.path(), &key(1));
    assert!(report.ok(), "{:?}", report.failure);
    let events = all_lines(dir.path())
        .iter()
        .filter(|l| !l.2.windows(12).any(|w| w == b"\"checkpoint\""))
        .count();
    assert_eq!(events, 8 * 300);
}

/// A failed write fails the records in it and every later one, whichever thread wrote:
/// the caller itself (records waiting for the write) or the writer thread (records
/// waiting for the fsync). What was written before stays a valid log.
#[test]
fn a_failed_write_refuses_this_record_and_all_later_ones() {
    for until in [Until::Written, Until::Durable] {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(config(dir.path()), key(1)).unwrap();
        for i in 0..5 {
            log.submit_until(event(i), until)
                .unwrap()
                .wait_blocking()
                .unwrap();
        }
        log.fail_next_write();
        let failed = log
            .submit_until(event(5), until)
            .and_then(PendingRecord::wait_blocking);
        assert!(
            matches!(failed, Err(AuditError::Io { .. })),
            "{until:?}: {failed:?}"
        );
        for i in 6..8 {
            let later = log
                .submit_until(event(i), until)
                .and_then(PendingRecord::wait_blocking);
            assert!(
                matches!(later, Err(AuditError::Failed(_))),
                "{until:?}: {later:?}"
            );
        }
        assert!(log.close_blocking().is_err());
        drop(log);
        let report = verify_with_key(dir.path(), &key(1));
        assert!(report.ok(), "{until:?}: {:?}", report.failure);
        assert_eq!(report.records, 5, "{until:?}");
    }
}

/// Records a round took beyond a full batch are written next, not left until a timer
/// (here an hour away) wakes the writer; likewise for callers writing in its place.
#[test]
fn records_beyond_a_full_batch_are_written_at_once() {
    for until in [Until::Durable, Until::Written] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            max_batch: 1,
            checkpoint_every: 1_000_000,
            checkpoint_interval: Duration::from_secs(3600),
            ..config(dir.path())
        };
        let (log, _) = AuditLog::open(cfg, key(1)).unwrap();
        let paused = log.pause_writing();
        let pending: Vec<_> = (0..5)
            .map(|i| log.submit_until(event(i), until).unwrap())
            .collect();
        drop(paused);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for p in pending {
                p.wait_blocking().unwrap();
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!("{until:?} records beyond the first batch were not written")
            });
        log.close_blocking().unwrap();
    }
}

#[test]
fn a_full_queue_refuses_instead_of_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        queue_capacity: 1,
        max_batch: 1,
        ..config(dir.path())
    };
    let (log, _) = AuditLog::open(cfg, key(1)).unwrap();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    // While the writer is busy, a second record does not fit in a queue of one.
    let paused = log.pause_writing();
    accepted.push(log.submit(event(0)).unwrap());
    assert!(matches!(
        log.submit(event(1)),
        Err(AuditError::QueueFull { capacity: 1 })
    ));
    refused += 1;
    drop(paused);
    for i in 2..2000 {
        match log.submit(event(i)) {
            Ok(p) => accepted.push(p),
            Err(AuditError::QueueFull { capacity: 1 }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a queue of one never filled");
    let n = accepted.len();
    for p in accepted {
        p.wait_blocking().unwrap();
    }
    log.close_blocking().unwrap();
    assert!(matches!(log.submit(event(0)), Err(AuditError::Closed)));
    let events = all_lines(dir.path())
        .iter()
        .filter(|l| !l.2.windows(12).any(|w| w == b"\"checkpoint\""))
        .count();
    assert_eq!(
        events, n,
        "every accepted record is on disk, no refused one is"
    );
}

#[test]
fn proofs_round_trip_and_catch_tampering() {
    let dir = tempfile::tempdir().unwrap();
    write_log(config(dir.path()), key(1), (0..57).map(event));
    let opts = VerifyOptions::default();
    let vk = key(1).verifying_key();
    for seq in [0, 1, 9, 10, 33, 57] {
        let p = prove_inclusion(dir.path(), seq, &opts).unwrap();
        let doc = serde_json::to_vec(&p).unwrap();
        match verify_proof(&doc, &vk).unwrap() {
            Proven::Inclusion { seq: s, .. } => assert_eq!(s, seq),
            other => panic!("{other:?}"),
        }
        assert!(verify_proof(&doc, &key(2).verifying_key()).is_err());
        let mut bad = p.clone();
        bad.record = bad.record.replace("agent-", "agent_");
        if bad.record != p.record {
            assert!(verify_proof(&serde_json::to_vec(&bad).unwrap(), &vk).is_err());
        }
        let mut bad = p.clone();
        bad.seq += 1;
        assert!(verify_proof(&serde_json::to_vec(&bad).unwrap(), &vk).is_err());
    }
    // The final checkpoint covers everything, so no record is left unproven.
    assert!(prove_inclusion(dir.path(), 10_000, &opts).is_err());

    let c = prove_consistency(dir.path(), 10, &opts).unwrap();
    let doc = serde_json::to_vec(&c).unwrap();
    assert!(matches!(
        verify_proof(&doc, &vk).unwrap(),
        Proven::Consistency { .. }
    ));
    let mut bad = c.clone();
    bad.path[0] = hex::encode([0u8; 32]);
    assert!(verify_proof(&serde_json::to_vec(&bad).unwrap(), &vk).is_err());
    // A checkpoint from a rewritten log does not extend the original.
    let other = tempfile::tempdir().unwrap();
    write_log(
        config(other.path()),
        key(1),
        (0..57).map(|i| event(i).detail("x", 1)),
    );
    let forged = prove_consistency(other.path(), 10, &opts).unwrap();
    let mut mixed = c.clone();
    mixed.old_checkpoint = forged.old_checkpoint;
    assert!(verify_proof(&serde_json::to_vec(&mixed).unwrap(), &vk).is_err());
}

fn arb_event() -> impl Strategy<Value = Event> {
    (
        0..EventKind::ALL.len(),
        proptest::option::of("[a-z0-9-]{1,12}"),
        proptest::option::of("\\PC{0,16}"),
        proptest::option::of("[a-z\\[\\]0-9]{1,10}"),
        proptest::collection::btree_map("[a-z_]{1,8}", "\\PC{0,20}", 0..4),
    )
        .prop_map(|(k, env, agent, rule, details)| {
            let mut e = Event::new(EventKind::ALL[k]);
            e.envelope = env;
            e.agent = agent;
            e.rule = rule;
            for (key, v) in details {
                e = e.detail(key, v);
            }
            e
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_single_byte_change_is_detected(
        events in proptest::collection::vec(arb_event(), 1..60),
        at in any::<proptest::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { segment_max_bytes: 4096, checkpoint_every: 7, ..AuditConfig::new(dir.path()) };
        write_log(cfg, key(1), events);
        prop_assert!(verify_with_key(dir.path(), &key(1)).ok());
        let segs = list_segments(dir.path()).unwrap();
        let sizes: Vec<usize> = segs.iter().map(|s| fs::metadata(&s.path).unwrap().len() as usize).collect();
        let mut i = at.index(sizes.iter().sum());
        let seg = segs.iter().zip(&sizes).find_map(|(s, n)| if i < *n { Some(s) } else { i -= n; None }).unwrap();
        let mut data = fs::read(&seg.path).unwrap();
        data[i] ^= xor;
        fs::write(&seg.path, &data).unwrap();
        let r = verify_with_key(dir.path(), &key(1));
        prop_assert!(r.failure.is_some(), "flip of byte {} in {} went unnoticed", i, seg.path.display());
    }
}

/// A record answered at `Until::Written` is in the segment file at that moment, even
/// while a second process reads it; written and durable records keep one order.
#[test]
fn written_records_are_in_the_file_when_answered_and_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    let mut seqs = Vec::new();
    for i in 0..200 {
        let until = if i % 3 == 0 {
            Until::Durable
        } else {
            Until::Written
        };
        let receipt = log
            .submit_until(event(i), until)
            .unwrap()
            .wait_blocking()
            .unwrap();
        let on_disk: String = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| fs::read_to_string(&s.path).unwrap())
            .collect();
        let needle = format!(",\"seq\":{},\"prev\":", receipt.seq);
        assert!(
            on_disk.contains(&needle),
            "record {} not in the file",
            receipt.seq
        );
        seqs.push(receipt.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    log.close_blocking().unwrap();
    let report = verify(dir.path(), &VerifyOptions::default()).unwrap();
    assert!(report.ok(), "{:?}", report.failure);
}

/// Records nobody waits to see durable are fsynced all the same, without a later record
/// or a checkpoint to carry them.
#[test]
fn written_records_are_fsynced_without_anyone_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    let before = log.stats().batches;
    for i in 0..5 {
        log.submit_until(event(i), Until::Written)
            .unwrap()
            .wait_blocking()
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while log.stats().batches == before {
        assert!(std::time::Instant::now() < deadline, "never fsynced");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    log.close_blocking().unwrap();
}

#[test]
fn a_log_in_the_earlier_seq_first_layout_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let line = format!(
        "{{\"seq\":0,\"prev\":\"{}\",\"kind\":\"daemon_started\",\"ts\":\"2025-01-01T00:00:00Z\"}}\n",
        "0".repeat(64)
    );
    fs::write(dir.path().join(verify::segment_name(0)), line).unwrap();
    let report = verify_with_key(dir.path(), &key(1));
    let f = failure(&report);
    assert!(f.to_string().contains("earlier enforcer versions"), "{f}");
    match AuditLog::open(config(dir.path()), key(1)) {
        Err(err) => assert!(
            err.to_string().contains("earlier enforcer versions"),
            "{err}"
        ),
        Ok(_) => panic!("a log in the earlier layout was opened for appending"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_records_are_written_before_their_callers_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            let dir = dir.path().to_owned();
            tokio::spawn(async move {
                let receipt = log.submit_gathered(&event(i)).unwrap().await.unwrap();
                // Written means in the file: another reader finds the line now.
                let seq = receipt.seq;
                let found = all_lines(&dir).iter().any(|(_, _, l)| seq_of(l) == seq);
                assert!(
                    found,
                    "record {seq} not in the file when its caller went on"
                );
                seq
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    log.close().await.unwrap();
    assert!(verify_with_key(dir.path(), &key(1)).ok());
}

#[tokio::test(flavor = "current_thread")]
async fn a_gathered_record_whose_caller_is_dropped_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(config(dir.path()), key(1)).unwrap();
    let before = all_lines(dir.path()).len();
    // Dropped without ever being polled: the caller went away while it would have yielded.
    drop(log.submit_gathered(&event(7)).unwrap());
    let lines = all_lines(dir.path());
    assert_eq!(lines.len(), before + 1, "the record went out with the drop");
    log.close().await.unwrap();
    assert!(verify_with_key(dir.path(), &key(1)).ok());
}
