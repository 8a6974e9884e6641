//! The envelope commands, run as a user would: real binary, temporary files.
use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

fn enforcer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn keygen_new_sign_verify_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust");
    std::fs::create_dir(&trust).unwrap();
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o700)).unwrap();
    let prefix = dir.path().join("issuer");
    assert!(enforcer(&["keygen", "--out", p(&prefix)]).0);
    let (ok, _, err) = enforcer(&["keygen", "--out", p(&prefix)]);
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
    let key = dir.path().join("issuer.key");
    std::fs::copy(dir.path().join("issuer.pub"), trust.join("issuer.pub")).unwrap();

    let (ok, toml, _) = enforcer(&["envelope", "new"]);
    assert!(ok);
    let src = dir.path().join("env.toml");
    std::fs::write(&src, toml).unwrap();
    let signed = dir.path().join("env.json");
    let (ok, _, err) = enforcer(&[
        "envelope",
        "sign",
        "--key",
        p(&key),
        p(&src),
        "-o",
        p(&signed),
    ]);
    assert!(ok, "{err}");

    let used = dir.path().join("used");
    let verify = |extra: &[&str]| {
        let mut a = vec![
            "envelope",
            "verify",
            "--trust",
            p(&trust),
            "--used-ids",
            p(&used),
        ];
        a.extend_from_slice(extra);
        a.push(p(&signed));
        enforcer(&a)
    };
    assert!(verify(&[]).0);
    assert!(
        verify(&[]).0,
        "verify without --consume must not use the id up"
    );
    assert!(verify(&["--consume"]).0);
    let (ok, _, err) = verify(&[]);
    assert!(!ok && err.contains("kind: replayed"), "{err}");

    let (ok, out, _) = enforcer(&["envelope", "inspect", p(&signed)]);
    assert!(
        ok && out.contains("signature NOT checked") && out.contains("sales-api"),
        "{out}"
    );
    let (ok, out, _) = enforcer(&["envelope", "inspect", "--trust", p(&trust), p(&signed)]);
    assert!(ok && out.contains("VERIFIED"), "{out}");

    // Tampering is refused with its kind.
    let text = std::fs::read_to_string(&signed).unwrap();
    let tampered = text.replacen("\"sig\": \"", "\"sig\": \"AAAA", 1);
    std::fs::write(&signed, tampered).unwrap();
    let (ok, _, err) = enforcer(&["envelope", "verify", "--trust", p(&trust), p(&signed)]);
    assert!(!ok && err.contains("kind: bad_signature"), "{err}");

    // A world-readable private key is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = enforcer(&["envelope", "sign", "--key", p(&key), p(&src)]);
    assert!(!ok && err.contains("chmod 600"), "{err}");
}

#[test]
fn sign_reports_field_errors() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("k");
    assert!(enforcer(&["keygen", "--out", p(&prefix)]).0);
    let src = dir.path().join("bad.toml");
    let (_, toml, _) = enforcer(&["envelope", "new"]);
    std::fs::write(&src, toml.replacen("requests = 100", "requests = 0", 1)).unwrap();
    let key = dir.path().join("k.key");
    let (ok, _, err) = enforcer(&["envelope", "sign", "--key", p(&key), p(&src)]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("capabilities[0].budget.requests") && err.contains("line "),
        "{err}"
    );
    assert!(err.contains("kind: invalid"), "{err}");
}
