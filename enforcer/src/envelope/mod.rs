//! Envelopes: the signed, expiring grant an agent runs under.
//!
//! - [`model`]: the Envelope as data (authored in TOML, signed as canonical JSON).
//! - [`pattern`]: pure matchers the gateway reuses (paths, hosts, constraints, spend).
//! - [`validate`]: parsing and validation with field paths and TOML line/column.
//! - [`keys`]: ed25519 key files and the trusted keyring.
//! - [`dsse`]: the DSSE v1 wrapper and its pre-authentication encoding.
//! - [`verify`]: the fixed-order verification that yields a [`VerifiedEnvelope`], the
//!   replay store, revocations and the host policy floor.
//!
//! The format is documented field by field in `docs/envelope.md`.
mod b64;
pub mod dsse;
pub mod keys;
pub mod model;
pub mod pattern;
pub mod text;
pub mod validate;
pub mod verify;

#[cfg(test)]
mod tests;

pub use dsse::{SignedEnvelope, canonical_payload, pae, sign_envelope};
pub use keys::{KeyError, Keyring, generate_keypair, key_id, load_signing_key, load_verifying_key};
pub use model::{Envelope, PAYLOAD_TYPE, SUPPORTED_VERSIONS};
pub use pattern::{Body, HostPattern, Outcome, PathPattern, RequestView, is_normalized_path};
pub use text::Text;
pub use validate::{EnvelopeError, Location, Problem, from_json, from_toml, validate};
pub use verify::{
    Clock, FixedClock, Floor, FloorError, Revocations, SystemClock, UsedIds, VerifiedEnvelope,
    Verifier, VerifyError, VerifyOptions, decode_unverified,
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

const TEMPLATE: &str = include_str!("template.toml");

/// A commented example Envelope, valid from `now` for one hour, with a fresh id.
pub fn example_toml(now: OffsetDateTime) -> String {
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    TEMPLATE
        .replace("{{ID}}", &fresh_id())
        .replace("{{NOW}}", &fmt(now))
        .replace("{{EXPIRES}}", &fmt(now + time::Duration::hours(1)))
}

/// A random 128-bit envelope id in hex.
pub fn fresh_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("env-{}", hex::encode(b))
}
