//! Verification: the only way to obtain a [`VerifiedEnvelope`].
//!
//! Fixed order, cheapest and most fundamental first, so a refusal always names the first
//! thing wrong: size → wrapper → payloadType → key id known and not revoked → signature →
//! payload parse and validation → not_before/expires_at (with skew) → host maximum
//! lifetime → envelope revocation → replay → host policy floor.
use std::{
    borrow::Cow,
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::Signature as EdSignature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use super::{
    b64,
    dsse::{SignedEnvelope, pae, pae_prefix},
    keys::Keyring,
    model::{Budget, Envelope, ForbiddenEffect, PAYLOAD_TYPE, ResourceLimits, Timestamp},
    pattern::RequestView,
    validate::{
        Checker, EnvelopeError, Fp, MAX_ENVELOPE_BYTES, Problem, from_json, location_of, span_of,
    },
};

/// A DSSE wrapper may carry several signatures (co-signing, rotation); more than this is
/// only a way to make us burn CPU.
pub const MAX_SIGNATURES: usize = 8;

/// Why an Envelope was refused. [`VerifyError::kind`] is stable and goes to the audit log.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("input is {size} bytes, more than the {limit} allowed")]
    TooLarge { size: usize, limit: usize },
    #[error("not a signed envelope: {0}")]
    Malformed(String),
    #[error("payloadType is `{found}`, expected `{PAYLOAD_TYPE}`")]
    WrongPayloadType { found: String },
    #[error("signed by unknown key(s) {}; add the issuer's .pub file to the trust directory if it is trusted", .keyids.join(", "))]
    UnknownKey { keyids: Vec<String> },
    #[error("signing key {keyid} is revoked")]
    RevokedKey { keyid: String },
    #[error(
        "signature by key {keyid} does not verify: the envelope was altered or not signed by that key"
    )]
    BadSignature { keyid: String },
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("not valid before {not_before} (now {now}, clock skew tolerance {skew_secs} s)")]
    NotYetValid {
        not_before: Timestamp,
        now: Timestamp,
        skew_secs: i64,
    },
    #[error("expired at {expires_at} (now {now}, clock skew tolerance {skew_secs} s)")]
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
        skew_secs: i64,
    },
    #[error("lifetime of {lifetime_secs} s is longer than the {max_secs} s this host allows")]
    LifetimeTooLong { lifetime_secs: i64, max_secs: i64 },
    #[error("envelope {id} is revoked")]
    Revoked { id: String },
    #[error("envelope {id} was already used; an envelope is valid for one activation")]
    Replayed { id: String },
    #[error("envelope asks for more than the host policy floor allows: {0}")]
    ExceedsFloor(String),
    #[error("used-id store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VerifyError {
    /// Stable, machine-readable kind for logs and exit messages.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "too_large",
            VerifyError::Malformed(_) => "malformed",
            VerifyError::WrongPayloadType { .. } => "wrong_payload_type",
            VerifyError::UnknownKey { .. } => "unknown_key",
            VerifyError::RevokedKey { .. } => "revoked_key",
            VerifyError::BadSignature { .. } => "bad_signature",
            VerifyError::Envelope(e) => e.kind(),
            VerifyError::NotYetValid { .. } => "not_yet_valid",
            VerifyError::Expired { .. } => "expired",
            VerifyError::LifetimeTooLong { .. } => "lifetime_too_long",
            VerifyError::Revoked { .. } => "revoked",
            VerifyError::Replayed { .. } => "replayed",
            VerifyError::ExceedsFloor(_) => "exceeds_floor",
            VerifyError::Store { .. } => "store_error",
        }
    }
}

/// Where "now" comes from; tests and replays inject their own.
pub trait Clock: Send + Sync {
    fn now(&self) -> OffsetDateTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub OffsetDateTime);

impl Clock for FixedClock {
    fn now(&self) -> OffsetDateTime {
        self.0
    }
}

/// Host-side verification settings.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    pub max_input_bytes: usize,
    /// How far the issuer's and this host's clocks may disagree.
    pub clock_skew: Duration,
    /// Longest `expires_at - not_before` this host accepts.
    pub max_lifetime: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            max_input_bytes: MAX_ENVELOPE_BYTES,
            clock_skew: Duration::seconds(60),
            max_lifetime: Duration::hours(24),
        }
    }
}

/// Revoked issuer keys and envelope ids.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    pub keys: HashSet<String>,
    pub envelopes: HashSet<String>,
}

impl Revocations {
    /// Parses the revocation file: one `key <keyid>` or `envelope <id>` per line; blank
    /// lines and `#` comments are ignored.
    pub fn parse(text: &str) -> Result<Revocations, String> {
        let mut r = Revocations::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // A revocation that names nothing would be no revocation at all: every id is
            // checked for the form the verifier compares against, so a typo is an error
            // rather than a key that stays trusted.
            match line.split_once(char::is_whitespace) {
                Some(("key", id)) => {
                    let id = id.trim();
                    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!(
                            "line {}: `{}` is not a key id; a key id is the 64 hex digits `enforcer keygen` prints (SHA-256 of the public key)",
                            n + 1,
                            id.escape_default()
                        ));
                    }
                    r.keys.insert(id.to_ascii_lowercase())
                }
                Some(("envelope", id)) => {
                    let id = id.trim();
                    if !super::validate::is_word(id, 128, b"._-:") {
                        return Err(format!(
                            "line {}: `{}` is not an envelope id; ids are 1 to 128 characters from A-Z a-z 0-9 . _ - :",
                            n + 1,
                            id.escape_default()
                        ));
                    }
                    r.envelopes.insert(id.to_owned())
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `key <keyid>` or `envelope <id>`",
                        n + 1
                    ));
                }
            };
        }
        Ok(r)
    }

    pub fn load(path: &Path) -> Result<Revocations, FloorError> {
        let text = read_policy_file(path)?;
        Revocations::parse(&text).map_err(|message| FloorError::Invalid {
            path: path.to_owned(),
            message,
        })
    }
}

/// The persistent set of envelope ids already activated. An append-only file, one id per
/// line, fsynced on every append and read back whole on open, so a replay is refused after
/// a restart too. One process (the daemon) owns it.
#[derive(Debug)]
pub struct UsedIds {
    file: Option<(PathBuf, File)>,
    ids: HashSet<String>,
}

impl UsedIds {
    /// A store that forgets on drop; for checks that activate nothing.
    pub fn in_memory() -> UsedIds {
        UsedIds {
            file: None,
            ids: HashSet::new(),
        }
    }

    /// Opens (or creates, mode 0600) the store at `path` and loads every id in it.
    pub fn open(path: &Path) -> Result<UsedIds, VerifyError> {
        let store_err = |source| VerifyError::Store {
            path: path.to_owned(),
            source,
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(store_err)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(store_err)?;
        // A crash mid-append can leave a partial last line. Keep it as used (refusing a
        // fragment costs nothing) and start the next id on a fresh line.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(store_err)?;
            file.sync_data().map_err(store_err)?;
        }
        if !existed && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the new directory entry itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(store_err)?;
        }
        let ids = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(UsedIds {
            file: Some((path.to_owned(), file)),
            ids,
        })
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Marks a verified envelope as used; refuses if it already was. Durable when this
    /// returns Ok.
    pub fn consume(&mut self, env: &VerifiedEnvelope) -> Result<(), VerifyError> {
        let id = env.id();
        if self.ids.contains(id) {
            return Err(VerifyError::Replayed { id: id.to_owned() });
        }
        if let Some((path, file)) = &mut self.file {
            // Envelope ids are validated to a charset without whitespace, so a line is an id.
            file.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| file.sync_data())
                .map_err(|source| VerifyError::Store {
                    path: path.clone(),
                    source,
                })?;
        }
        self.ids.insert(id.to_owned());
        Ok(())
    }
}

/// A money cap in the floor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendCap {
    pub currency: String,
    pub max: f64,
}

/// The most any Envelope on this host may ask for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloorBudget {
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub bytes_up: Option<u64>,
    #[serde(default)]
    pub bytes_down: Option<u64>,
    #[serde(default)]
    pub wall_clock_secs: Option<u64>,
    /// Allowed currencies and their caps; when non-empty, spending in any other currency
    /// exceeds the floor.
    #[serde(default)]
    pub spend: Vec<SpendCap>,
}

/// The host policy floor (operator configuration, TOML): forbidden effects every Envelope
/// inherits and maxima it may not exceed. An Envelope asking for more is refused, never
/// clipped, so the issuer learns what the host allows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    #[serde(default)]
    pub max_lifetime_secs: Option<u64>,
    #[serde(default)]
    pub forbidden_effects: Vec<ForbiddenEffect>,
    #[serde(default)]
    pub max_budget: Option<FloorBudget>,
    #[serde(default)]
    pub max_resources: Option<ResourceLimits>,
}

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {reason}: whoever can write it decides what is allowed")]
    Unsafe { path: PathBuf, reason: String },
}

/// Reads a policy file (floor, revocations) only if no one but its owner can write it,
/// and, when the reader is root, only if root owns it.
fn read_policy_file(path: &Path) -> Result<String, FloorError> {
    use std::os::unix::fs::MetadataExt;
    let io = |source| FloorError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let unsafe_because = |reason: String| FloorError::Unsafe {
        path: path.to_owned(),
        reason,
    };
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(format!(
            "mode {:o} lets group or others write it; run `chmod go-w {}`",
            meta.mode() & 0o7777,
            path.display()
        )));
    }
    if meta.uid() != 0 && nix::unistd::geteuid().is_root() {
        return Err(unsafe_because(format!(
            "owned by uid {}, not root; run `chown root {}`",
            meta.uid(),
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(io)
}

impl Floor {
    pub fn from_toml(src: &str) -> Result<Floor, EnvelopeError> {
        let floor: Floor = toml::from_str(src).map_err(|e| {
            EnvelopeError::Malformed(Problem {
                path: String::new(),
                message: e.message().trim().to_owned(),
                fix: "see the floor section of docs/envelope.md".into(),
                location: e.span().map(|s| location_of(src, s.start)),
            })
        })?;
        let mut c = Checker::default();
        for (i, f) in floor.forbidden_effects.iter().enumerate() {
            c.forbidden(f, &Fp::TopIndex("forbidden_effects", i));
        }
        if let Some(r) = &floor.max_resources {
            c.resources(r, &Fp::Root("max_resources"));
        }
        if floor.max_lifetime_secs == Some(0) {
            c.err(
                "max_lifetime_secs",
                "0 would refuse every envelope",
                "give a positive number of seconds",
            );
        }
        if let Some(b) = &floor.max_budget {
            for (i, s) in b.spend.iter().enumerate() {
                if !s.max.is_finite() || s.max < 0.0 {
                    c.err(
                        format!("max_budget.spend[{i}].max"),
                        "must be a finite, non-negative amount",
                        "give the cap",
                    );
                }
            }
        }
        if c.problems.is_empty() {
            return Ok(floor);
        }
        let mut problems = c.problems;
        if let Ok(doc) = toml_edit::ImDocument::parse(src) {
            for p in &mut problems {
                p.location = span_of(doc.as_table(), &p.path).map(|s| location_of(src, s.start));
            }
        }
        Err(EnvelopeError::Invalid(problems))
    }

    pub fn load(path: &Path) -> Result<Floor, FloorError> {
        let text = read_policy_file(path)?;
        Floor::from_toml(&text).map_err(|e| FloorError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The first way `env` asks for more than the floor, if any.
    pub fn check(&self, env: &Envelope) -> Result<(), String> {
        if let Some(fb) = &self.max_budget {
            let none = Budget::default();
            let eb = env.budget.as_ref().unwrap_or(&none);
            let pairs = [
                ("requests", fb.requests, eb.requests),
                ("bytes_up", fb.bytes_up, eb.bytes_up),
                ("bytes_down", fb.bytes_down, eb.bytes_down),
                ("wall_clock_secs", fb.wall_clock_secs, eb.wall_clock_secs),
            ];
            for (name, floor, asked) in pairs {
                match (floor, asked) {
                    (Some(f), None) => {
                        return Err(format!(
                            "budget.{name} is unlimited; this host allows at most {f}"
                        ));
                    }
                    (Some(f), Some(a)) if a > f => {
                        return Err(format!(
                            "budget.{name} is {a}; this host allows at most {f}"
                        ));
                    }
                    _ => {}
                }
            }
            if !fb.spend.is_empty() {
                let total = eb.spend.as_ref();
                let any_cap_spend = env
                    .capabilities
                    .iter()
                    .any(|c| c.budget.as_ref().is_some_and(|b| b.spend.is_some()));
                match total {
                    None if any_cap_spend => {
                        return Err("capabilities spend money but budget.spend sets no total; this host requires one".into());
                    }
                    None => {}
                    Some(s) => {
                        let Some(cap) = fb.spend.iter().find(|c| c.currency == s.currency) else {
                            return Err(format!(
                                "budget.spend is in {}, which this host does not allow",
                                s.currency
                            ));
                        };
                        let asked = s.max.unwrap_or(f64::INFINITY);
                        if asked > cap.max {
                            return Err(format!(
                                "budget.spend.max is {asked} {}; this host allows at most {}",
                                s.currency, cap.max
                            ));
                        }
                    }
                }
            }
        }
        if let Some(fr) = &self.max_resources {
            let er = env.resources.clone().unwrap_or_default();
            let pairs = [
                ("pids", fr.pids, er.pids),
                ("memory_bytes", fr.memory_bytes, er.memory_bytes),
                ("cpu_percent", fr.cpu_percent, er.cpu_percent),
            ];
            for (name, floor, asked) in pairs {
                match (floor, asked) {
                    (Some(f), None) => {
                        return Err(format!(
                            "resources.{name} is unlimited; this host allows at most {f}"
                        ));
                    }
                    (Some(f), Some(a)) if a > f => {
                        return Err(format!(
                            "resources.{name} is {a}; this host allows at most {f}"
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// An Envelope that passed every check. Only [`Verifier::verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedEnvelope {
    envelope: Envelope,
    key_id: String,
    /// The signed message, `PAE(payloadType, payload)`; the payload is its tail from
    /// `payload_start`. Kept whole so verification decodes the payload only once.
    signed: Vec<u8>,
    payload_start: usize,
    /// Shared with the verifier: the floor's forbidden effects are the same for every
    /// Envelope, so they are not copied into each one.
    floor: Arc<Floor>,
}

impl VerifiedEnvelope {
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    pub fn id(&self) -> &str {
        &self.envelope.id
    }
    /// The key whose signature was accepted.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
    /// SHA-256 of the signed payload bytes; names this exact grant in the audit log.
    pub fn payload_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.payload()).into()
    }
    /// The exact signed payload bytes.
    pub fn payload(&self) -> &[u8] {
        self.signed.get(self.payload_start..).unwrap_or_default()
    }
    /// The host floor's forbidden effects followed by the Envelope's own.
    pub fn forbidden_effects(&self) -> impl Iterator<Item = &ForbiddenEffect> + '_ {
        self.floor
            .forbidden_effects
            .iter()
            .chain(&self.envelope.forbidden_effects)
    }
    /// The first forbidden effect (floor or Envelope) the request is or may be.
    pub fn forbidden_match(&self, req: &RequestView<'_>) -> Option<&ForbiddenEffect> {
        self.forbidden_match_judged(req, super::is_normalized_path(req.path))
    }

    /// [`forbidden_match`](Self::forbidden_match), given
    /// [`is_normalized_path`](super::is_normalized_path) of `req.path`.
    pub fn forbidden_match_judged(
        &self,
        req: &RequestView<'_>,
        path_normalized: bool,
    ) -> Option<&ForbiddenEffect> {
        self.forbidden_effects()
            .find(|f| f.matches_judged(req, path_normalized))
    }
}

/// Checks signed Envelopes against trusted keys and host policy.
#[derive(Clone)]
pub struct Verifier {
    keyring: Keyring,
    options: VerifyOptions,
    floor: Arc<Floor>,
    revocations: Revocations,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keyring.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Decodes the wrapper and payload without checking anything cryptographic. For display
/// only (`enforcer envelope inspect`); never act on its result.
pub fn decode_unverified(input: &[u8]) -> Result<(SignedEnvelope, Vec<u8>), VerifyError> {
    if input.len() > MAX_ENVELOPE_BYTES {
        return Err(VerifyError::TooLarge {
            size: input.len(),
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    let wrapper: SignedEnvelope =
        serde_json::from_slice(input).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let payload = STANDARD
        .decode(&wrapper.payload)
        .map_err(|e| VerifyError::Malformed(format!("payload is not standard base64: {e}")))?;
    Ok((wrapper, payload))
}

/// The DSSE wrapper as [`Verifier::verify`] reads it: the same fields and the same
/// strictness as [`SignedEnvelope`], but borrowing from the input where no JSON escape
/// forces a copy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope<'a> {
    #[serde(rename = "payloadType", borrow)]
    payload_type: Cow<'a, str>,
    /// Read as the raw bytes of the JSON string: the base64 decoder rejects anything
    /// outside its alphabet, so a separate UTF-8 pass over the largest field is wasted.
    #[serde(borrow)]
    payload: Cow<'a, [u8]>,
    #[serde(borrow)]
    signatures: Vec<WireSignature<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature<'a> {
    #[serde(borrow)]
    keyid: Cow<'a, str>,
    #[serde(borrow)]
    sig: Cow<'a, str>,
}

/// Decodes the base64 payload straight into its pre-authentication encoding, so the
/// signed message is built without a second copy of the payload. Returns the message and
/// where the payload starts in it.
fn decode_into_pae(payload_type: &str, b64: &[u8]) -> Result<(Vec<u8>, usize), VerifyError> {
    let malformed = |e: base64::DecodeError| {
        VerifyError::Malformed(format!("payload is not standard base64: {e}"))
    };
    // Canonical padded base64 decodes to exactly this many bytes; anything else fails
    // to decode below or is caught by the length check after it.
    let padding = b64.iter().rev().take_while(|&&b| b == b'=').count().min(2);
    let expected = (b64.len() / 4 * 3).saturating_sub(padding);
    let mut message = pae_prefix(payload_type, expected, expected);
    let start = message.len();
    b64::decode_append(b64, &mut message).map_err(malformed)?;
    if message.len() - start != expected {
        // Not reachable for input the decoder accepts; rebuild the honest way rather
        // than sign-check a message with a wrong length prefix.
        let payload = message.split_off(start);
        let message = pae(payload_type, &payload);
        let start = message.len() - payload.len();
        return Ok((message, start));
    }
    Ok((message, start))
}

impl Verifier {
    pub fn new(keyring: Keyring) -> Verifier {
        Verifier {
            keyring,
            options: VerifyOptions::default(),
            floor: Arc::new(Floor::default()),
            revocations: Revocations::default(),
            clock: Arc::new(SystemClock),
        }
    }
    pub fn with_options(mut self, options: VerifyOptions) -> Verifier {
        self.options = options;
        self
    }
    pub fn with_floor(mut self, floor: Floor) -> Verifier {
        self.floor = Arc::new(floor);
        self
    }
    pub fn with_revocations(mut self, revocations: Revocations) -> Verifier {
        self.revocations = revocations;
        self
    }
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Verifier {
        self.clock = clock;
        self
    }

    /// Runs every check; `used` is only read (see [`Verifier::verify_and_consume`]).
    pub fn verify(&self, input: &[u8], used: &UsedIds) -> Result<VerifiedEnvelope, VerifyError> {
        let limit = self.options.max_input_bytes.min(MAX_ENVELOPE_BYTES);
        if input.len() > limit {
            return Err(VerifyError::TooLarge {
                size: input.len(),
                limit,
            });
        }
        // Borrows the base64 payload and signatures from the input instead of copying them.
        let wrapper: WireEnvelope<'_> =
            serde_json::from_slice(input).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if wrapper.payload_type != PAYLOAD_TYPE {
            return Err(VerifyError::WrongPayloadType {
                found: wrapper.payload_type.chars().take(128).collect(),
            });
        }
        if wrapper.signatures.is_empty() {
            return Err(VerifyError::Malformed("no signatures".into()));
        }
        if wrapper.signatures.len() > MAX_SIGNATURES {
            return Err(VerifyError::Malformed(format!(
                "more than {MAX_SIGNATURES} signatures"
            )));
        }
        let (signed, payload_start) = decode_into_pae(&wrapper.payload_type, &wrapper.payload)?;
        let key_id = self.check_signatures(&wrapper, &signed)?;

        let env = from_json(&signed[payload_start..])?;

        let now = self.clock.now();
        let skew = self.options.clock_skew;
        if now + skew < env.not_before.0 {
            return Err(VerifyError::NotYetValid {
                not_before: env.not_before,
                now: Timestamp(now),
                skew_secs: skew.whole_seconds(),
            });
        }
        if now - skew >= env.expires_at.0 {
            return Err(VerifyError::Expired {
                expires_at: env.expires_at,
                now: Timestamp(now),
                skew_secs: skew.whole_seconds(),
            });
        }
        let mut max = self.options.max_lifetime;
        if let Some(f) = self.floor.max_lifetime_secs {
            max = max.min(Duration::seconds(i64::try_from(f).unwrap_or(i64::MAX)));
        }
        if env.lifetime() > max {
            return Err(VerifyError::LifetimeTooLong {
                lifetime_secs: env.lifetime().whole_seconds(),
                max_secs: max.whole_seconds(),
            });
        }
        if self.revocations.envelopes.contains(&env.id) {
            return Err(VerifyError::Revoked { id: env.id });
        }
        if used.contains(&env.id) {
            return Err(VerifyError::Replayed { id: env.id });
        }
        self.floor.check(&env).map_err(VerifyError::ExceedsFloor)?;

        Ok(VerifiedEnvelope {
            envelope: env,
            key_id,
            signed,
            payload_start,
            floor: self.floor.clone(),
        })
    }

    /// Verifies and marks the id used in one step, for activation.
    pub fn verify_and_consume(
        &self,
        input: &[u8],
        used: &mut UsedIds,
    ) -> Result<VerifiedEnvelope, VerifyError> {
        let v = self.verify(input, used)?;
        used.consume(&v)?;
        Ok(v)
    }

    /// Accepts when at least one signature by a trusted, unrevoked key verifies; otherwise
    /// reports the most telling failure (bad signature > revoked key > unknown key).
    fn check_signatures(
        &self,
        wrapper: &WireEnvelope<'_>,
        message: &[u8],
    ) -> Result<String, VerifyError> {
        let mut unknown = Vec::new();
        let mut revoked = None;
        let mut bad = None;
        for s in &wrapper.signatures {
            let Some(key) = self.keyring.get(&s.keyid) else {
                unknown.push(s.keyid.chars().take(80).collect::<String>());
                continue;
            };
            if self.revocations.keys.contains(s.keyid.as_ref()) {
                revoked = Some(s.keyid.to_string());
                continue;
            }
            let sig = STANDARD
                .decode(s.sig.as_bytes())
                .ok()
                .and_then(|b| EdSignature::from_slice(&b).ok());
            match sig {
                Some(sig) if key.verify_strict(message, &sig).is_ok() => {
                    return Ok(s.keyid.to_string());
                }
                _ => bad = Some(s.keyid.to_string()),
            }
        }
        if let Some(keyid) = bad {
            Err(VerifyError::BadSignature { keyid })
        } else if let Some(keyid) = revoked {
            Err(VerifyError::RevokedKey { keyid })
        } else {
            Err(VerifyError::UnknownKey { keyids: unknown })
        }
    }
}
