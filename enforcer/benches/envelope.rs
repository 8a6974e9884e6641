//! Verifications per second of a realistic signed Envelope (20 capabilities): parse plus
//! full verification against the bare ed25519 verification of the same bytes, in one run.
//! Target: full ≥ 0.5 × bare, both for the same envelope verified repeatedly (steady
//! state) and for distinct envelopes each verified once (fresh).
use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signature, SigningKey};
use enforcer::envelope::{
    FixedClock, Floor, Keyring, PAYLOAD_TYPE, SignedEnvelope, UsedIds, Verifier, from_toml, pae,
    sign_envelope,
};
use time::macros::datetime;

const EXAMPLE: &str = include_str!("../../examples/exchange-trading.toml");
const FLOOR: &str = include_str!("../../examples/floor.toml");
const RUN: Duration = Duration::from_secs(4);
/// Distinct envelopes for the first-verification figure.
const FRESH: usize = 4000;

/// The example plus copies of its order capability until there are 20.
fn twenty_capabilities() -> String {
    let start = EXAMPLE
        .find("[[capabilities]]\nname = \"orders\"")
        .unwrap_or(0);
    let end = EXAMPLE.find("# Withdrawals").unwrap_or(EXAMPLE.len());
    let orders = &EXAMPLE[start..end];
    let mut src = EXAMPLE[..end].to_owned();
    for i in 0..18 {
        src.push_str(&orders.replacen("name = \"orders\"", &format!("name = \"orders-{i}\""), 1));
    }
    src.push_str(&EXAMPLE[end..]);
    src
}

fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..100 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Verifications per second over `inputs`, each verified exactly once, in order.
fn rate_once<T>(inputs: &[T], mut f: impl FnMut(&T)) -> f64 {
    let start = Instant::now();
    for input in inputs {
        f(input);
    }
    inputs.len() as f64 / start.elapsed().as_secs_f64()
}

/// The exact message and signature a bare `verify_strict` checks for a signed envelope.
fn bare_parts(bytes: &[u8]) -> (Vec<u8>, Signature) {
    let wrapper: SignedEnvelope = serde_json::from_slice(bytes).expect("wrapper");
    let payload = STANDARD.decode(&wrapper.payload).expect("payload");
    let sig_bytes = STANDARD.decode(&wrapper.signatures[0].sig).expect("sig");
    let sig = Signature::from_slice(&sig_bytes).expect("sig");
    (pae(PAYLOAD_TYPE, &payload), sig)
}

fn main() {
    let env = from_toml(&twenty_capabilities()).expect("bench envelope validates");
    assert_eq!(env.capabilities.len(), 20);
    let key = SigningKey::from_bytes(&[7; 32]);
    let signed = sign_envelope(&env, &key).expect("signs");
    let bytes = signed.to_json().into_bytes();

    let mut ring = Keyring::new();
    ring.add(key.verifying_key());
    let verifier = Verifier::new(ring)
        .with_floor(Floor::from_toml(FLOOR).expect("floor"))
        .with_clock(Arc::new(FixedClock(datetime!(2026-05-01 13:00:00 UTC))));
    let used = UsedIds::in_memory();
    verifier
        .verify(&bytes, &used)
        .expect("bench envelope verifies");

    let vk = key.verifying_key();
    let (message, sig) = bare_parts(&bytes);
    let payload_len = message.len();

    // Steady state: the same signed bytes over and over. Nothing is cached between
    // calls, so this differs from the fresh figure only by how warm the CPU caches are.
    let bare = rate(|| {
        black_box(vk.verify_strict(black_box(&message), black_box(&sig))).expect("verifies");
    });
    let full = rate(|| {
        black_box(verifier.verify(black_box(&bytes), &used)).expect("verifies");
    });

    // Fresh: distinct envelopes (own id, own signature), each verified exactly once, so
    // no state from an earlier verification of the same bytes can help.
    let fresh: Vec<Vec<u8>> = (0..FRESH)
        .map(|i| {
            let mut e = env.clone();
            e.id = format!("{}-{i}", env.id);
            sign_envelope(&e, &key)
                .expect("signs")
                .to_json()
                .into_bytes()
        })
        .collect();
    let fresh_bare_parts: Vec<(Vec<u8>, Signature)> =
        fresh.iter().map(|b| bare_parts(b)).collect();
    let fresh_bare = rate_once(&fresh_bare_parts, |(m, s)| {
        black_box(vk.verify_strict(black_box(m), black_box(s))).expect("verifies");
    });
    let fresh_full = rate_once(&fresh, |b| {
        black_box(verifier.verify(black_box(b), &used)).expect("verifies");
    });

    println!(
        "envelope: {} capabilities, {} bytes signed JSON, signed message {} bytes",
        env.capabilities.len(),
        bytes.len(),
        payload_len
    );
    println!("steady state (same envelope, no result cache):");
    println!("  bare ed25519 verify_strict:    {bare:>10.0} verifications/s");
    println!("  parse + full verification:     {full:>10.0} verifications/s");
    println!(
        "  ratio full/bare:               {:>10.2} (target >= 0.50)",
        full / bare
    );
    println!("first verification of {FRESH} fresh envelopes:");
    println!("  bare ed25519 verify_strict:    {fresh_bare:>10.0} verifications/s");
    println!("  parse + full verification:     {fresh_full:>10.0} verifications/s");
    println!(
        "  ratio full/bare:               {:>10.2} (target >= 0.50)",
        fresh_full / fresh_bare
    );
}
