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

// The allocator the `enforcer` binary runs with, so the figures are those of the daemon.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLE: &str = include_str!("../../examples/exchange-trading.toml");
const FLOOR: &str = include_str!("../../examples/floor.toml");
const RUN: Duration = Duration::from_secs(4);
/// Distinct envelopes for the fresh figure: more than the CPU caches hold.
const FRESH: usize = 2000;

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

/// Rates of `a` and `b` in calls per second, measured in alternating slices so that load
/// from other processes on the machine weighs on both sides alike.
fn rates(mut a: impl FnMut(usize), mut b: impl FnMut(usize), n: usize) -> (f64, f64) {
    const SLICE: usize = 25;
    for i in 0..SLICE.min(n) {
        a(i);
        b(i);
    }
    let (mut ta, mut tb) = (Duration::ZERO, Duration::ZERO);
    let (mut na, mut nb) = (0usize, 0usize);
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < RUN {
        let t = Instant::now();
        for k in 0..SLICE {
            a((i + k) % n);
        }
        ta += t.elapsed();
        let t = Instant::now();
        for k in 0..SLICE {
            b((i + k) % n);
        }
        tb += t.elapsed();
        na += SLICE;
        nb += SLICE;
        i += SLICE;
    }
    (na as f64 / ta.as_secs_f64(), nb as f64 / tb.as_secs_f64())
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
    let (bare, full) = rates(
        |_| {
            black_box(vk.verify_strict(black_box(&message), black_box(&sig))).expect("verifies");
        },
        |_| {
            black_box(verifier.verify(black_box(&bytes), &used)).expect("verifies");
        },
        1,
    );

    // Fresh: distinct envelopes (own id, own signature), cycled through so that each is
    // verified again only after all the others.
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
    let fresh_parts: Vec<(Vec<u8>, Signature)> = fresh.iter().map(|b| bare_parts(b)).collect();
    let (fresh_bare, fresh_full) = rates(
        |i| {
            let (m, s) = &fresh_parts[i];
            black_box(vk.verify_strict(black_box(m), black_box(s))).expect("verifies");
        },
        |i| {
            black_box(verifier.verify(black_box(&fresh[i]), &used)).expect("verifies");
        },
        FRESH,
    );

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
    println!("fresh: {FRESH} distinct envelopes, each verified once per cycle:");
    println!("  bare ed25519 verify_strict:    {fresh_bare:>10.0} verifications/s");
    println!("  parse + full verification:     {fresh_full:>10.0} verifications/s");
    println!(
        "  ratio full/bare:               {:>10.2} (target >= 0.50)",
        fresh_full / fresh_bare
    );
}
