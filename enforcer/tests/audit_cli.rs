//! `enforcer audit verify` as an auditor runs it: real binary, a real log on disk.
use std::{path::Path, process::Command};

use enforcer::audit::{AuditConfig, AuditLog, Event, EventKind};

fn verify(dir: &Path, key: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["audit", "verify", "--key"])
        .arg(key)
        .arg(dir)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn verify_says_by_its_exit_status_whether_every_record_is_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let key_prefix = tmp.path().join("audit");
    enforcer::envelope::generate_keypair(&key_prefix).unwrap();
    let signing = enforcer::envelope::load_signing_key(&tmp.path().join("audit.key")).unwrap();
    let public = tmp.path().join("audit.pub");
    let dir = tmp.path().join("log");

    let (log, _) = AuditLog::open(AuditConfig::new(&dir), signing.clone()).unwrap();
    for i in 0..5 {
        log.append_blocking(Event::new(EventKind::RequestAllowed).detail("n", i))
            .unwrap();
    }
    // Written, not yet under a checkpoint: a running log between checkpoints, or a tail
    // anyone able to write the files could have appended.
    let (code, out) = verify(&dir, &public);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("NOT SIGNED") && out.contains("seq 0 to 4"),
        "{out}"
    );

    log.close_blocking().unwrap();
    let (code, out) = verify(&dir, &public);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("NOT SIGNED"), "{out}");

    // Damage is still a failure of its own.
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    std::fs::write(&segment, text.replacen("\"n\":3", "\"n\":7", 1)).unwrap();
    let (code, out) = verify(&dir, &public);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("FAILED"), "{out}");
}

#[test]
fn show_into_a_pipe_closed_early_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let config = AuditConfig {
        queue_capacity: 8192,
        ..AuditConfig::new(&dir)
    };
    let (log, _) = AuditLog::open(config, key).unwrap();
    // More than a pipe holds, so `show` is still writing when the reader goes away.
    for i in 0..5000 {
        log.submit(Event::new(EventKind::RequestAllowed).detail("n", i))
            .unwrap();
    }
    log.close_blocking().unwrap();
    // What `enforcer audit show DIR | head -n 1` does.
    let mut child = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["audit", "show"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("request_allowed"), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
