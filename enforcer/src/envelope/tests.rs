use std::{os::unix::fs::PermissionsExt, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use serde_json::json;
use time::{Duration, OffsetDateTime, macros::datetime};

use super::*;

const EXAMPLE: &str = include_str!("../../../examples/exchange-trading.toml");
const FLOOR: &str = include_str!("../../../examples/floor.toml");
const T0: OffsetDateTime = datetime!(2026-05-01 12:00:00 UTC);

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn example() -> Envelope {
    from_toml(EXAMPLE).expect("example validates")
}

fn signed(env: &Envelope, k: &SigningKey) -> Vec<u8> {
    sign_envelope(env, k).expect("signs").to_json().into_bytes()
}

fn verifier(k: &SigningKey, now: OffsetDateTime) -> Verifier {
    let mut ring = Keyring::new();
    ring.add(k.verifying_key());
    Verifier::new(ring)
        .with_clock(Arc::new(FixedClock(now)))
        .with_options(VerifyOptions {
            max_lifetime: Duration::hours(8),
            ..VerifyOptions::default()
        })
}

fn kind(r: Result<VerifiedEnvelope, VerifyError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    }
}

#[test]
fn toml_json_round_trip() {
    let env = example();
    let json = canonical_payload(&env).unwrap();
    let back = from_json(&json).unwrap();
    assert_eq!(env, back);
    assert_eq!(canonical_payload(&back).unwrap(), json);
}

#[test]
fn template_validates() {
    let text = example_toml(OffsetDateTime::now_utc());
    let env = from_toml(&text).unwrap();
    assert!(env.id.starts_with("env-"));
    assert_eq!(env.lifetime(), Duration::hours(1));
}

#[test]
fn sign_and_verify() {
    let k = key(1);
    let bytes = signed(&example(), &k);
    let v = verifier(&k, T0 + Duration::minutes(5))
        .verify(&bytes, &UsedIds::in_memory())
        .unwrap();
    assert_eq!(v.id(), "env-2026-05-01-trader-7f3a");
    assert_eq!(v.key_id(), key_id(&k.verifying_key()));
}

/// Errors whose single problem names `path`, with a TOML location.
fn problem_paths(src: &str) -> Vec<String> {
    match from_toml(src) {
        Ok(_) => vec!["<accepted>".into()],
        Err(e) => e
            .problems()
            .iter()
            .map(|p| {
                assert!(p.location.is_some(), "no location for {p}");
                assert!(!p.fix.is_empty(), "no fix for {p}");
                p.path.clone()
            })
            .collect(),
    }
}

#[test]
fn field_errors_name_their_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "id = \"env-2026-05-01-trader-7f3a\"",
            "id = \"has space\"",
            "id",
        ),
        (
            "subject = \"agent:market-maker-7\"",
            "subject = \"\"",
            "subject",
        ),
        (
            "issuer = \"desk-lead@fund.example\"",
            "issuer = \" \"",
            "issuer",
        ),
        (
            "expires_at = \"2026-05-01T16:00:00Z\"",
            "expires_at = \"2026-05-01T11:00:00Z\"",
            "expires_at",
        ),
        (
            "expires_at = \"2026-05-01T16:00:00Z\"",
            "expires_at = \"2028-05-01T16:00:00Z\"",
            "expires_at",
        ),
        ("requests = 5000", "requests = 0", "budget.requests"),
        (
            "requests = 5000",
            "requests = 10",
            "capabilities[0].budget.requests",
        ),
        (
            "name = \"orders\"",
            "name = \"market-data\"",
            "capabilities[1].name",
        ),
        (
            "name = \"orders\"",
            "name = \"Orders!\"",
            "capabilities[1].name",
        ),
        (
            "host = \"api.exchange.example\" }",
            "host = \"API.exchange.example\" }",
            "capabilities[0].upstream.host",
        ),
        (
            "host = \"api.exchange.example\", port = 443 }",
            "host = \"api.exchange.example\", port = 0 }",
            "capabilities[1].upstream.port",
        ),
        (
            "scheme = \"https\", host = \"api.exchange.example\", port = 443 }",
            "scheme = \"http\", host = \"api.exchange.example\", port = 443 }",
            "capabilities[1].upstream.scheme",
        ),
        (
            "secret = \"exchange-trading-key\"",
            "secret = \"has space\"",
            "capabilities[1].credential.secret",
        ),
        (
            "header = \"X-Api-Key\"",
            "header = \"Host\"",
            "capabilities[1].credential.header",
        ),
        (
            "format = \"{secret}\"",
            "format = \"Bearer\"",
            "capabilities[1].credential.format",
        ),
        (
            "methods = [\"GET\", \"DELETE\"]",
            "methods = [\"GET\", \"GET\"]",
            "capabilities[1].routes[1].methods",
        ),
        (
            "methods = [\"GET\", \"DELETE\"]",
            "methods = []",
            "capabilities[1].routes[1].methods",
        ),
        (
            "max = 2\n",
            "max = -1\n",
            "capabilities[1].constraints[2].min",
        ),
        (
            "body = \"/type\"\nequals",
            "body = \"type\"\nequals",
            "capabilities[1].constraints[1].body",
        ),
        (
            "query = \"symbol\"",
            "query = \"symbol\"\nbody = \"/symbol\"",
            "capabilities[0].constraints[0]",
        ),
        (
            "spend = { currency = \"USD\", max = 25000 }",
            "spend = { currency = \"usd\", max = 25000 }",
            "budget.spend.currency",
        ),
        (
            "spend = { currency = \"USD\", max = 25000 }",
            "spend = { currency = \"USD\", max = -3 }",
            "budget.spend.max",
        ),
        (
            "spend = { currency = \"USD\", max = 25000, amount",
            "spend = { currency = \"EUR\", max = 25000, amount",
            "capabilities[1].budget.spend.currency",
        ),
        (
            "max = 25000, amount = \"/quantity\"",
            "max = 25000, amount = \"quantity\"",
            "capabilities[1].budget.spend.amount",
        ),
        (
            "reason = \"withdrawals are irreversible and outside this task\"",
            "reason = \"\"",
            "forbidden_effects[0].reason",
        ),
        (
            "timeout_secs = 300",
            "timeout_secs = 0",
            "approvals[0].timeout_secs",
        ),
        (
            "denied = { count = 20, window_secs = 60 }",
            "denied = { count = 0, window_secs = 60 }",
            "breakers.denied.count",
        ),
        ("rate = 0.5", "rate = 1.5", "breakers.upstream_errors.rate"),
        (
            "spend_velocity = { currency = \"USD\"",
            "spend_velocity = { currency = \"EUR\"",
            "breakers.spend_velocity.currency",
        ),
        ("pids = 128", "pids = 0", "resources.pids"),
        (
            "cpu_percent = 200",
            "cpu_percent = 100000000",
            "resources.cpu_percent",
        ),
    ];
    for (from, to, path) in cases {
        assert!(EXAMPLE.contains(from), "example lacks {from:?}");
        let src = EXAMPLE.replacen(from, to, 1);
        let paths = problem_paths(&src);
        assert!(
            paths.iter().any(|p| p == path),
            "changing {from:?} to {to:?}: expected a problem at {path}, got {paths:?}"
        );
    }
}

#[test]
fn malformed_inputs_point_at_line_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("pids = 128", "pids = 128\nthreads = 3", "resources"),
        ("requests = 5000", "requests = -5", "budget.requests"),
        (
            "path = \"/api/v3/depth\"",
            "path = \"/api/v3/../depth\"",
            "capabilities[0].routes[1].path",
        ),
        (
            "path = \"/api/v3/depth\"",
            "path = \"/api/**/depth\"",
            "capabilities[0].routes[1].path",
        ),
        (
            "regex = \"mm7-[0-9a-f]{8}\"",
            "regex = \"mm7-[0-9a-f\"",
            "capabilities[1].constraints[3].regex",
        ),
        (
            "regex = \"mm7-[0-9a-f]{8}\"",
            "regex = \"(a{1000}){1000}\"",
            "capabilities[1].constraints[3].regex",
        ),
        (
            "methods = [\"POST\"]",
            "methods = [\"post\"]",
            "capabilities[1].routes[0].methods",
        ),
        (
            "host = \"*.exchange.example\"",
            "host = \"*.EXCHANGE\"",
            "forbidden_effects[1].host",
        ),
        (
            "issued_at = \"2026-05-01T12:00:00Z\"",
            "issued_at = \"yesterday\"",
            "issued_at",
        ),
    ];
    for (from, to, path) in cases {
        assert!(EXAMPLE.contains(from), "example lacks {from:?}");
        let src = EXAMPLE.replacen(from, to, 1);
        match from_toml(&src) {
            Err(EnvelopeError::Malformed(p)) => {
                assert!(p.location.is_some(), "{to}: no location");
                assert!(
                    p.path.starts_with(path),
                    "{to}: expected path {path}, got {:?} ({p})",
                    p.path
                );
            }
            other => panic!("{to}: expected malformed, got {other:?}"),
        }
    }
}

#[test]
fn structural_errors() {
    let no_caps = format!(
        "{}\ncapabilities = []\n",
        EXAMPLE.split("[budget]").next().unwrap()
    );
    assert_eq!(problem_paths(&no_caps), vec!["capabilities"]);
    let unsupported = EXAMPLE.replacen("version = 1", "version = 2", 1);
    assert_eq!(
        from_toml(&unsupported).unwrap_err().kind(),
        "unsupported_version"
    );
    let unsupported_new_field = unsupported.replacen("id =", "future_field = 1\nid =", 1);
    assert_eq!(
        from_toml(&unsupported_new_field).unwrap_err().kind(),
        "unsupported_version"
    );
    let huge = "#".repeat(validate::MAX_ENVELOPE_BYTES + 1);
    assert_eq!(from_toml(&huge).unwrap_err().kind(), "too_large");
    // Native TOML datetimes are accepted too, and local times (no offset) are not.
    let native = EXAMPLE.replacen(
        "issued_at = \"2026-05-01T12:00:00Z\"",
        "issued_at = 2026-05-01T12:00:00Z",
        1,
    );
    assert_eq!(from_toml(&native).unwrap().issued_at.0, T0);
    let local = EXAMPLE.replacen(
        "issued_at = \"2026-05-01T12:00:00Z\"",
        "issued_at = 2026-05-01T12:00:00",
        1,
    );
    assert_eq!(from_toml(&local).unwrap_err().kind(), "malformed");
}

#[test]
fn each_verification_failure_kind() {
    let k = key(1);
    let other = key(2);
    let env = example();
    let good = signed(&env, &k);
    let now = T0 + Duration::minutes(5);
    let v = verifier(&k, now);
    let none = UsedIds::in_memory();
    assert_eq!(kind(v.verify(&good, &none)), "ok");

    let big = vec![b' '; validate::MAX_ENVELOPE_BYTES + 1];
    assert_eq!(kind(v.verify(&big, &none)), "too_large");
    assert_eq!(kind(v.verify(b"{not json", &none)), "malformed");
    assert_eq!(kind(v.verify(b"{\"payloadType\":1}", &none)), "malformed");

    let mut w: SignedEnvelope = serde_json::from_slice(&good).unwrap();
    w.payload_type = "application/json".into();
    assert_eq!(
        kind(v.verify(w.to_json().as_bytes(), &none)),
        "wrong_payload_type"
    );

    assert_eq!(kind(v.verify(&signed(&env, &other), &none)), "unknown_key");

    let revoked = v.clone().with_revocations(Revocations {
        keys: [key_id(&k.verifying_key())].into(),
        ..Revocations::default()
    });
    assert_eq!(kind(revoked.verify(&good, &none)), "revoked_key");
    // The file form, with the id as an operator might paste it: upper case still revokes.
    let listed = Revocations::parse(&format!(
        "# compromised\nkey {}\n",
        key_id(&k.verifying_key()).to_ascii_uppercase()
    ))
    .unwrap();
    let from_file = v.clone().with_revocations(listed);
    assert_eq!(kind(from_file.verify(&good, &none)), "revoked_key");

    // A signature by `other` presented under `k`'s key id.
    let mut w: SignedEnvelope = serde_json::from_slice(&good).unwrap();
    let forged: SignedEnvelope = serde_json::from_slice(&signed(&env, &other)).unwrap();
    w.signatures[0].sig = forged.signatures[0].sig.clone();
    assert_eq!(
        kind(v.verify(w.to_json().as_bytes(), &none)),
        "bad_signature"
    );

    // Well signed but not a valid envelope.
    let bad_payload = dsse::sign_payload(PAYLOAD_TYPE, br#"{"version":1}"#, &k);
    assert_eq!(
        kind(v.verify(bad_payload.to_json().as_bytes(), &none)),
        "malformed"
    );
    let v2 = dsse::sign_payload(PAYLOAD_TYPE, br#"{"version":2,"x":1}"#, &k);
    assert_eq!(
        kind(v.verify(v2.to_json().as_bytes(), &none)),
        "unsupported_version"
    );
    let mut invalid = env.clone();
    invalid.capabilities[0].routes.clear();
    let payload = canonical_payload(&invalid).unwrap();
    let w = dsse::sign_payload(PAYLOAD_TYPE, &payload, &k);
    assert_eq!(kind(v.verify(w.to_json().as_bytes(), &none)), "invalid");

    assert_eq!(
        kind(verifier(&k, T0 - Duration::minutes(2)).verify(&good, &none)),
        "not_yet_valid"
    );
    assert_eq!(
        kind(verifier(&k, T0 + Duration::hours(5)).verify(&good, &none)),
        "expired"
    );
    let short = v.clone().with_options(VerifyOptions {
        max_lifetime: Duration::hours(1),
        ..VerifyOptions::default()
    });
    assert_eq!(kind(short.verify(&good, &none)), "lifetime_too_long");

    let rev = v.clone().with_revocations(Revocations {
        envelopes: [env.id.clone()].into(),
        ..Revocations::default()
    });
    assert_eq!(kind(rev.verify(&good, &none)), "revoked");

    let mut used = UsedIds::in_memory();
    assert_eq!(kind(v.verify_and_consume(&good, &mut used)), "ok");
    assert_eq!(kind(v.verify(&good, &used)), "replayed");

    let mut floor = Floor::from_toml(FLOOR).unwrap();
    assert_eq!(
        kind(v.clone().with_floor(floor.clone()).verify(&good, &none)),
        "ok"
    );
    floor.max_budget.as_mut().unwrap().requests = Some(10);
    assert_eq!(
        kind(v.clone().with_floor(floor).verify(&good, &none)),
        "exceeds_floor"
    );
}

#[test]
fn clock_skew_is_tolerated_exactly() {
    let k = key(1);
    let good = signed(&example(), &k);
    let none = UsedIds::in_memory();
    let expires = datetime!(2026-05-01 16:00:00 UTC);
    let at = |t| kind(verifier(&k, t).verify(&good, &none));
    assert_eq!(at(T0 - Duration::seconds(60)), "ok");
    assert_eq!(at(T0 - Duration::seconds(61)), "not_yet_valid");
    assert_eq!(at(expires + Duration::seconds(59)), "ok");
    assert_eq!(at(expires + Duration::seconds(60)), "expired");
    let strict = verifier(&k, T0 - Duration::seconds(1)).with_options(VerifyOptions {
        clock_skew: Duration::ZERO,
        max_lifetime: Duration::hours(8),
        ..VerifyOptions::default()
    });
    assert_eq!(kind(strict.verify(&good, &none)), "not_yet_valid");
}

#[test]
fn floor_refuses_rather_than_clips_and_merges_forbidden_effects() {
    let k = key(1);
    let mut floor = Floor::from_toml(FLOOR).unwrap();
    let v = verifier(&k, T0).with_floor(floor.clone());
    let none = UsedIds::in_memory();
    let ok = v.verify(&signed(&example(), &k), &none).unwrap();
    assert_eq!(
        ok.forbidden_effects().count(),
        2 + example().forbidden_effects.len()
    );
    assert_eq!(
        ok.forbidden_effects().next(),
        floor.forbidden_effects.first()
    );
    // The floor's rule applies though the envelope never mentions it.
    let body = json!({"destination_address": "bc1q..."});
    let req = RequestView {
        method: "POST",
        host: "api.exchange.example",
        path: "/api/v3/order",
        query: &[],
        body: Body::Json(&body),
    };
    assert!(ok.forbidden_match(&req).is_some());

    let mut env = example();
    env.resources = None;
    let e = v.verify(&signed(&env, &k), &none).unwrap_err();
    assert_eq!(e.kind(), "exceeds_floor");
    assert!(e.to_string().contains("resources.pids"), "{e}");

    let mut env = example();
    env.budget
        .as_mut()
        .unwrap()
        .spend
        .as_mut()
        .unwrap()
        .currency = "EUR".into();
    for c in &mut env.capabilities {
        if let Some(s) = c.budget.as_mut().and_then(|b| b.spend.as_mut()) {
            s.currency = "EUR".into();
        }
    }
    env.breakers.as_mut().unwrap().spend_velocity = None;
    assert_eq!(kind(v.verify(&signed(&env, &k), &none)), "exceeds_floor");

    floor.max_lifetime_secs = Some(3600);
    assert_eq!(
        kind(
            verifier(&k, T0)
                .with_floor(floor)
                .verify(&signed(&example(), &k), &none)
        ),
        "lifetime_too_long"
    );
}

#[test]
fn floor_file_errors_have_locations() {
    let bad = FLOOR.replacen("pids = 512", "pids = 0", 1);
    let e = Floor::from_toml(&bad).unwrap_err();
    let p = e.problems()[0];
    assert_eq!(p.path, "max_resources.pids");
    assert!(p.location.is_some());
    assert_eq!(
        Floor::from_toml("surprise = 1").unwrap_err().kind(),
        "malformed"
    );
}

#[test]
fn replay_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("used");
    let k = key(1);
    let good = signed(&example(), &k);
    let v = verifier(&k, T0);
    {
        let mut used = UsedIds::open(&path).unwrap();
        let env = v.verify(&good, &used).unwrap();
        assert!(!used.contains(env.id()), "verify must not consume");
        used.consume(&env).unwrap();
        assert_eq!(used.consume(&env).unwrap_err().kind(), "replayed");
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let used = UsedIds::open(&path).unwrap();
    assert_eq!(kind(v.verify(&good, &used)), "replayed");
    // A torn last line stays used and the next id starts on a fresh line.
    std::fs::write(&path, "partial-id").unwrap();
    let mut used = UsedIds::open(&path).unwrap();
    assert!(used.contains("partial-id"));
    let env = v.verify(&good, &used).unwrap();
    used.consume(&env).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, format!("partial-id\n{}\n", env.id()));
}

#[test]
fn key_files() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("issuer");
    let id = generate_keypair(&prefix).unwrap();
    let (kp, pp) = keys::key_paths(&prefix);
    let mode = std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let sk = load_signing_key(&kp).unwrap();
    let pk = load_verifying_key(&pp).unwrap();
    assert_eq!(sk.verifying_key(), pk);
    assert_eq!(key_id(&pk), id);
    assert_eq!(id.len(), 64);
    assert!(matches!(
        generate_keypair(&prefix),
        Err(KeyError::Exists { .. })
    ));
    for m in [0o640, 0o604, 0o660] {
        std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(m)).unwrap();
        assert!(
            matches!(load_signing_key(&kp), Err(KeyError::Permissions { .. })),
            "mode {m:o} accepted"
        );
    }
    std::fs::set_permissions(&kp, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert!(load_signing_key(&kp).is_ok());
    assert!(matches!(
        load_signing_key(&pp),
        Err(KeyError::Permissions { .. } | KeyError::Format { .. })
    ));
}

#[test]
fn keyring_rotation_and_trust_dir_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let trust = dir.path().join("trust");
    std::fs::create_dir(&trust).unwrap();
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(
        Keyring::load_dir(&trust),
        Err(KeyError::NoKeys { .. })
    ));
    generate_keypair(&trust.join("old")).unwrap();
    generate_keypair(&trust.join("new")).unwrap();
    std::fs::remove_file(trust.join("old.key")).unwrap();
    let new_key = load_signing_key(&trust.join("new.key")).unwrap();
    std::fs::remove_file(trust.join("new.key")).unwrap();
    let ring = Keyring::load_dir(&trust).unwrap();
    assert_eq!(ring.len(), 2);
    let v = Verifier::new(ring).with_clock(Arc::new(FixedClock(T0)));
    let mut env = example();
    env.expires_at = model::Timestamp(T0 + Duration::hours(1));
    assert_eq!(
        kind(v.verify(&signed(&env, &new_key), &UsedIds::in_memory())),
        "ok"
    );
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        Keyring::load_dir(&trust),
        Err(KeyError::TrustWritable { .. })
    ));
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o755)).unwrap();
    if nix::unistd::geteuid().is_root() {
        // Its owner could make it writable again: read by root, trust only root's.
        std::os::unix::fs::chown(trust.join("new.pub"), Some(65534), None).unwrap();
        assert!(matches!(
            Keyring::load_dir(&trust),
            Err(KeyError::TrustOwner { uid: 65534, .. })
        ));
    }
}

#[test]
fn policy_files_others_could_write_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let floor = dir.path().join("floor.toml");
    let revocations = dir.path().join("revocations");
    std::fs::write(&floor, FLOOR).unwrap();
    std::fs::write(&revocations, "# none\n").unwrap();
    for path in [&floor, &revocations] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    assert!(Floor::load(&floor).is_ok());
    assert!(Revocations::load(&revocations).is_ok());
    for path in [&floor, &revocations] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    assert!(matches!(
        Floor::load(&floor),
        Err(FloorError::Unsafe { .. })
    ));
    assert!(matches!(
        Revocations::load(&revocations),
        Err(FloorError::Unsafe { .. })
    ));
    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(&floor, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(&floor, Some(65534), None).unwrap();
        let err = Floor::load(&floor).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }
}

#[test]
fn pae_matches_dsse_spec() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
    );
    assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
}

#[test]
fn path_patterns() {
    let p = |s: &str| PathPattern::parse(s).unwrap();
    assert!(p("/").matches("/"));
    assert!(!p("/").matches("/a"));
    assert!(p("/a/b").matches("/a/b"));
    assert!(!p("/a/b").matches("/a/b/"));
    assert!(!p("/a/b").matches("/a/B"));
    assert!(p("/a/*").matches("/a/x"));
    assert!(!p("/a/*").matches("/a"));
    assert!(!p("/a/*").matches("/a/x/y"));
    assert!(!p("/a/*").matches("/a/"));
    assert!(p("/a/**").matches("/a"));
    assert!(p("/a/**").matches("/a/"));
    assert!(p("/a/**").matches("/a/x/y"));
    assert!(!p("/a/**").matches("/ab"));
    assert!(p("/**").matches("/anything/at/all"));
    for bad in [
        "/a/../b", "/a/%2e", "/a//b", "a/b", "/a?x=1", "/a/./b", "/a\\b",
    ] {
        assert!(!p("/**").matches(bad), "{bad} matched");
    }
    for bad in [
        "", "a", "/a//b", "/a/", "/**/a", "/a*", "/a/%41", "/..", "/a b",
    ] {
        assert!(PathPattern::parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn host_patterns() {
    let h = |s: &str| HostPattern::parse(s).unwrap();
    assert!(h("api.x.example").matches("API.x.example."));
    assert!(!h("api.x.example").matches("evil-api.x.example"));
    assert!(h("*.x.example").matches("a.b.x.example"));
    assert!(!h("*.x.example").matches("x.example"));
    assert!(!h("*.x.example").matches("evilx.example"));
    assert!(HostPattern::parse("*").is_err());
    assert!(HostPattern::parse("a.*.b").is_err());
}

fn req<'a>(
    method: &'a str,
    path: &'a str,
    query: &'a [(String, String)],
    body: Body<'a>,
) -> RequestView<'a> {
    RequestView {
        method,
        host: "api.exchange.example",
        path,
        query,
        body,
    }
}

#[test]
fn capability_checks_fail_closed() {
    let env = example();
    let orders = env.capability("orders").unwrap();
    let market = env.capability("market-data").unwrap();
    let ok = json!({"symbol": "BTC-USD", "type": "limit", "quantity": "0.5", "price": 60000, "client_order_id": "mm7-0a1b2c3d"});
    assert!(
        orders
            .check(&req("POST", "/api/v3/order", &[], Body::Json(&ok)))
            .is_ok()
    );
    assert!(orders.serves("API.exchange.example", 443));
    assert!(!orders.serves("api.exchange.example", 80));
    let cases = [
        json!({"symbol": "DOGE-USD", "type": "limit", "quantity": 1}),
        json!({"symbol": "BTC-USD", "type": "limit", "quantity": 3}),
        json!({"symbol": "BTC-USD", "type": "limit", "quantity": "lots"}),
        json!({"symbol": "BTC-USD", "type": "limit", "quantity": "NaN"}),
        json!({"symbol": "BTC-USD", "type": "limit", "quantity": "1e400"}),
        json!({"symbol": "BTC-USD", "type": ["limit"], "quantity": 1}),
        json!({"symbol": "BTC-USD", "client_order_id": "xmm7-0a1b2c3d"}),
        json!({"symbol": "BTC-USD", "client_order_id": 7}),
    ];
    for body in &cases {
        assert!(
            orders
                .check(&req("POST", "/api/v3/order", &[], Body::Json(body)))
                .is_err(),
            "{body} passed"
        );
    }
    assert!(
        orders
            .check(&req("POST", "/api/v3/order", &[], Body::Opaque))
            .is_err()
    );
    assert!(
        orders
            .check(&req("PUT", "/api/v3/order", &[], Body::Absent))
            .is_err()
    );
    assert!(
        orders
            .check(&req("post", "/api/v3/order", &[], Body::Absent))
            .is_err()
    );
    assert!(
        orders
            .check(&req("GET", "/api/v3/order/../withdraw", &[], Body::Absent))
            .is_err()
    );
    let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let good = q(&[("symbol", "ETH-USD"), ("limit", "100")]);
    assert!(
        market
            .check(&req("GET", "/api/v3/depth", &good, Body::Absent))
            .is_ok()
    );
    for bad in [
        q(&[("symbol", "ETH-USD"), ("symbol", "BTC-USD")]),
        q(&[("limit", "1000")]),
        q(&[("limit", "ten")]),
        q(&[("symbol", "eth-usd")]),
    ] {
        assert!(
            market
                .check(&req("GET", "/api/v3/depth", &bad, Body::Absent))
                .is_err(),
            "{bad:?} passed"
        );
    }
}

#[test]
fn forbidden_effects_match_when_unsure() {
    let env = example();
    let market = &env.forbidden_effects[2];
    let m = json!({"type": "market"});
    let l = json!({"type": "limit"});
    assert!(market.matches(&req("POST", "/api/v3/order", &[], Body::Json(&m))));
    assert!(!market.matches(&req("POST", "/api/v3/order", &[], Body::Json(&l))));
    assert!(market.matches(&req("POST", "/api/v3/order", &[], Body::Opaque)));
    assert!(!market.matches(&req("POST", "/api/v3/order", &[], Body::Absent)));
    // Most servers route a trailing slash to the same handler.
    assert!(market.matches(&req("POST", "/api/v3/order/", &[], Body::Json(&m))));
    assert!(market.matches(&req("POST", "/API/v3/Order/", &[], Body::Json(&m))));
    assert!(!market.matches(&req("POST", "/api/v3/order/x", &[], Body::Json(&m))));
    let withdraw = &env.forbidden_effects[0];
    assert!(withdraw.matches(&req("POST", "/api/v3/withdraw/btc", &[], Body::Absent)));
    assert!(withdraw.matches(&req("POST", "/api/v3/%77ithdraw", &[], Body::Absent)));
    // Servers that route without regard to case would run these as the withdrawal.
    assert!(withdraw.matches(&req("POST", "/API/V3/Withdraw/btc", &[], Body::Absent)));
    assert!(!withdraw.matches(&req("POST", "/api/v3/order", &[], Body::Absent)));
    let approval = &env.approvals[0];
    let big = json!({"quantity": "1.5"});
    let small = json!({"quantity": 0.1});
    assert!(approval.matches(&req("POST", "/api/v3/order", &[], Body::Json(&big))));
    assert!(approval.matches(&req("POST", "/api/v3/ORDER", &[], Body::Json(&big))));
    assert!(approval.matches(&req("POST", "/api/v3/order/", &[], Body::Json(&big))));
    assert!(!approval.matches(&req("POST", "/api/v3/order", &[], Body::Json(&small))));
}

#[test]
fn spend_cost() {
    let env = example();
    let spend = env.capabilities[1]
        .budget
        .as_ref()
        .unwrap()
        .spend
        .as_ref()
        .unwrap();
    let b = json!({"quantity": "0.5", "price": 60000});
    assert_eq!(spend.cost(Body::Json(&b)), Ok(30000.0));
    for bad in [
        json!({"quantity": 1}),
        json!({"quantity": -1, "price": 2}),
        json!({"quantity": "1", "price": "x"}),
    ] {
        assert!(spend.cost(Body::Json(&bad)).is_err(), "{bad}");
    }
    assert!(spend.cost(Body::Opaque).is_err());
}

/// Which part of a signed envelope a mutation touches.
#[derive(Debug, Clone, Copy)]
enum Part {
    Payload,
    Sig,
    KeyId,
}

fn mutate(good: &[u8], part: Part, index: usize, xor: u8) -> Vec<u8> {
    let mut w: SignedEnvelope = serde_json::from_slice(good).unwrap();
    match part {
        Part::Payload => {
            let mut p = STANDARD.decode(&w.payload).unwrap();
            let i = index % p.len();
            p[i] ^= xor;
            w.payload = STANDARD.encode(p);
        }
        Part::Sig => {
            let mut s = STANDARD.decode(&w.signatures[0].sig).unwrap();
            let i = index % s.len();
            s[i] ^= xor;
            w.signatures[0].sig = STANDARD.encode(s);
        }
        Part::KeyId => {
            let mut k = w.signatures[0].keyid.clone().into_bytes();
            let i = index % k.len();
            k[i] ^= xor;
            w.signatures[0].keyid = String::from_utf8_lossy(&k).into_owned();
        }
    }
    w.to_json().into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn any_single_byte_flip_fails(part in prop_oneof![Just(Part::Payload), Just(Part::Sig), Just(Part::KeyId)],
                                  index in any::<usize>(), xor in 1u8..=255) {
        let k = key(1);
        let good = signed(&example(), &k);
        let bad = mutate(&good, part, index, xor);
        let r = verifier(&k, T0).verify(&bad, &UsedIds::in_memory());
        prop_assert!(r.is_err(), "{part:?}[{index}]^{xor} verified");
    }

    #[test]
    fn flipping_the_wrapper_never_panics_and_rarely_passes(index in any::<usize>(), xor in 1u8..=255) {
        let k = key(1);
        let good = signed(&example(), &k);
        let mut bad = good.clone();
        let i = index % bad.len();
        bad[i] ^= xor;
        if let Ok(v) = verifier(&k, T0).verify(&bad, &UsedIds::in_memory()) {
            // Only a change outside the signed data (JSON whitespace) may still verify,
            // and then the content is exactly what was signed.
            prop_assert_eq!(v.envelope(), &example());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let k = key(1);
        let v = verifier(&k, T0);
        let _ = v.verify(&bytes, &UsedIds::in_memory());
        let _ = from_json(&bytes);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            let _ = from_toml(s);
            let _ = Floor::from_toml(s);
        }
        let w = dsse::sign_payload(PAYLOAD_TYPE, &bytes, &k);
        let _ = v.verify(w.to_json().as_bytes(), &UsedIds::in_memory());
    }

    #[test]
    fn arbitrary_json_payloads_never_panic(s in "\\PC{0,400}") {
        let k = key(1);
        let w = dsse::sign_payload(PAYLOAD_TYPE, s.as_bytes(), &k);
        prop_assert!(verifier(&k, T0).verify(w.to_json().as_bytes(), &UsedIds::in_memory()).is_err());
    }
}

#[test]
fn a_revocation_that_names_nothing_is_an_error_not_a_no_op() {
    let id = "ab".repeat(32);
    assert!(Revocations::parse(&format!("key {id}\nenvelope task-42:a.b_c\n")).is_ok());
    for bad in [
        "key af6678e4eeb7c121",
        "key sha256:abababababababababababababababababababababababababababababababab",
        &format!("key {id}0"),
        &format!("key {}zz", &id[2..]),
        "envelope two words",
        "envelope ",
        "envelope caf\u{e9}",
    ] {
        let err = Revocations::parse(bad).expect_err(bad);
        assert!(err.starts_with("line 1: "), "{err}");
    }
}
