//! The bytes of a record line. Every line opens with `{"kind":"<kind>"` and closes with
//! `,"ts":"<time>","seq":N,"prev":"<64 hex>"}`, so the verifier reads kind, sequence and
//! link without a JSON parser; checkpoint lines have a fully fixed layout so any change to
//! one of their bytes is caught even at the very end of the log.
//!
//! What the writer adds (time, seq, prev) comes last on purpose: everything before it
//! depends on the record alone, so the caller renders and hashes it on its own thread
//! ([`LineHash`](super::merkle::LineHash)) and the writer only hashes the closing.
use std::io::Write as _;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{
    event::{Event, REDACTED, is_secret_key, looks_like_secret_value},
    merkle::{Frontier, Hash},
};

pub const CHECKPOINT_KIND: &str = "checkpoint";

/// What every line opens and closes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    pub seq: u64,
    pub prev: Hash,
    pub kind: &'a str,
}

impl Head<'_> {
    pub fn is_checkpoint(&self) -> bool {
        self.kind == CHECKPOINT_KIND
    }
}

/// Lower-case hex only: the writer never produces anything else, and accepting both would
/// give one record two spellings.
pub fn parse_hash(s: &[u8]) -> Option<Hash> {
    // Every line's `prev` goes through here during verification: a table lookup per digit
    // and one check at the end instead of a branch per digit.
    let s: &[u8; 64] = s.try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let hi = HEX_DIGIT[usize::from(pair[0])];
        let lo = HEX_DIGIT[usize::from(pair[1])];
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad < 16).then_some(out)
}

/// Value of each lower-case hex digit; 0xff for every other byte.
const HEX_DIGIT: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        t[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Reads the fixed opening and closing of a line; the error says which part is wrong.
pub fn parse_head(line: &[u8]) -> Result<Head<'_>, &'static str> {
    let Some(rest) = line.strip_prefix(b"{\"kind\":\"") else {
        return Err(if line.starts_with(b"{\"seq\":") {
            "opens with seq, the record layout of earlier enforcer versions, which this one does not read"
        } else {
            "does not open with {\"kind\":"
        });
    };
    let len = rest
        .iter()
        .take_while(|b| b.is_ascii_lowercase() || **b == b'_')
        .count();
    if len == 0 || rest.get(len) != Some(&b'"') {
        return Err("kind is not a lower-case name");
    }
    let kind = std::str::from_utf8(&rest[..len]).map_err(|_| "kind is not UTF-8")?;
    // An unknown kind is an altered one: a checkpoint whose kind was changed would
    // otherwise pass as an ordinary record and escape its signature check.
    if kind != CHECKPOINT_KIND
        && !crate::audit::EventKind::ALL
            .iter()
            .any(|k| k.as_str() == kind)
    {
        return Err("kind is not a known record kind");
    }
    let rest = line
        .strip_suffix(b"\"}")
        .ok_or("does not close with the prev hash and }")?;
    let hex_start = rest
        .len()
        .checked_sub(64)
        .ok_or("prev is not 64 lower-case hex digits")?;
    let prev = parse_hash(&rest[hex_start..]).ok_or("prev is not 64 lower-case hex digits")?;
    let rest = rest[..hex_start]
        .strip_suffix(b",\"prev\":\"")
        .ok_or("prev does not follow seq")?;
    let digits = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let seq_digits = &rest[rest.len() - digits..];
    if digits == 0 || digits > 20 || (digits > 1 && seq_digits[0] == b'0') {
        return Err("seq is not a canonical decimal number");
    }
    let mut seq: u64 = 0;
    for &d in seq_digits {
        seq = seq
            .checked_mul(10)
            .and_then(|s| s.checked_add(u64::from(d - b'0')))
            .ok_or("seq overflows")?;
    }
    // No byte of `,"seq":` can be part of the opening, so the two never overlap.
    rest[..rest.len() - digits]
        .strip_suffix(b",\"seq\":")
        .ok_or("seq does not precede prev")?;
    Ok(Head { seq, prev, kind })
}

/// Appends `n` in decimal, without the formatting machinery: the writer does this for
/// every record.
pub(crate) fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends `bytes` as lower-case hex.
pub(crate) fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    // Spelled out on the stack and appended at once: a hash is one append, not 32.
    for chunk in bytes.chunks(32) {
        let mut out = [0u8; 64];
        for (pair, &b) in out.chunks_exact_mut(2).zip(chunk) {
            pair.copy_from_slice(&HEX_PAIR[usize::from(b)]);
        }
        buf.extend_from_slice(&out[..chunk.len() * 2]);
    }
}

/// The two hex digits of every byte: one lookup per byte of every `prev` written.
const HEX_PAIR: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 0x0f]];
        i += 1;
    }
    t
};

/// Appends `s` as a JSON string, byte for byte as `serde_json` writes it. Almost every
/// string in an event needs no escape: those are copied whole, the rest go to serde_json.
fn push_json_str(buf: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    if !needs_escape(s.as_bytes()) {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *buf, s)
    }
}

/// Whether `s` holds a byte serde_json escapes in a string: a control character, `"` or
/// `\\`. Every string of every event is scanned, so eight bytes at a time (the zero-byte
/// tests of "Bit Twiddling Hacks", exact for "is there any such byte").
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const SPACES: u64 = u64::from_ne_bytes([b' '; 8]);
    let any_below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGHS != 0;
    let any_equal = |v: u64, b: u8| any_below(v ^ (ONES * u64::from(b)), 1);
    let needs = |v: u64| any_below(v, 0x20) || any_equal(v, b'"') || any_equal(v, b'\\');
    // Loads of fixed width only: which lane a byte lands in does not matter for "any".
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_ne_bytes(w)
    };
    let u32_at = |i: usize| u64::from(u32::from_ne_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]));
    let u16_at = |i: usize| u64::from(u16::from_ne_bytes([s[i], s[i + 1]]));
    let n = s.len();
    let v = match n {
        0 => return false,
        // Shorter than a word (most keys, many values): overlapping loads cover it, and
        // spaces, which need no escape, fill the lanes left over.
        1 => SPACES << 8 | u64::from(s[0]),
        2 | 3 => SPACES << 32 | u16_at(n - 2) << 16 | u16_at(0),
        4..=7 => u32_at(n - 4) << 32 | u32_at(0),
        _ => {
            let mut i = 0;
            while i + 8 <= n {
                if needs(u64_at(i)) {
                    return true;
                }
                i += 8;
            }
            if i == n {
                return false;
            }
            // The last bytes, as the word that ends the string.
            u64_at(n - 8)
        }
    };
    needs(v)
}

/// Appends a detail value as compact JSON, byte for byte as `serde_json` writes it after
/// [`redact`](super::event::redact), taking the string fast path at any depth. Redacting
/// while writing reads each event once and leaves it unchanged.
fn push_json_value(buf: &mut Vec<u8>, v: &serde_json::Value) -> Result<(), serde_json::Error> {
    use serde_json::Value;
    match v {
        Value::String(s) if looks_like_secret_value(s) => push_json_str(buf, REDACTED),
        Value::String(s) => push_json_str(buf, s),
        Value::Object(map) => push_json_map(buf, map),
        Value::Array(items) => {
            buf.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                push_json_value(buf, item)?;
            }
            buf.push(b']');
            Ok(())
        }
        Value::Null => {
            buf.extend_from_slice(b"null");
            Ok(())
        }
        Value::Bool(b) => {
            buf.extend_from_slice(if *b { b"true" } else { b"false" });
            Ok(())
        }
        // Integers, the usual detail, spelled as serde_json spells them; floats go to it.
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                push_decimal(buf, u);
            } else if let Some(i) = n.as_i64() {
                buf.push(b'-');
                push_decimal(buf, i.unsigned_abs());
            } else {
                serde_json::to_writer(&mut *buf, v)?;
            }
            Ok(())
        }
    }
}

fn push_json_map(
    buf: &mut Vec<u8>,
    map: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), serde_json::Error> {
    buf.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        push_json_str(buf, k)?;
        buf.push(b':');
        if is_secret_key(k) {
            push_json_str(buf, REDACTED)?;
        } else {
            push_json_value(buf, v)?;
        }
    }
    buf.push(b'}');
    Ok(())
}

/// Appends the start of a line: `{"kind":"<kind>"`.
pub(crate) fn push_opening(buf: &mut Vec<u8>, kind: &str) {
    buf.extend_from_slice(b"{\"kind\":\"");
    buf.extend_from_slice(kind.as_bytes());
    buf.push(b'"');
}

/// Appends the end of a line, what only the writer knows: time, seq and prev.
pub(crate) fn push_closing(
    buf: &mut Vec<u8>,
    ts: &str,
    seq: u64,
    prev: &Hash,
) -> Result<(), serde_json::Error> {
    buf.extend_from_slice(b",\"ts\":");
    push_json_str(buf, ts)?;
    buf.extend_from_slice(b",\"seq\":");
    push_decimal(buf, seq);
    buf.extend_from_slice(b",\"prev\":\"");
    push_hex(buf, prev);
    buf.extend_from_slice(b"\"}");
    Ok(())
}

/// Appends the line for `event` (without newline) to `buf`, redacting as it goes.
pub fn render_event(
    buf: &mut Vec<u8>,
    seq: u64,
    prev: &Hash,
    ts: &str,
    event: &Event,
) -> Result<(), serde_json::Error> {
    render_opening(buf, event)?;
    push_closing(buf, ts, seq, prev)
}

/// Appends what a line holds before its closing: kind, envelope, agent, rule, details. It
/// depends on the event alone, not on its place in the log, so callers render it on their
/// own thread before queueing and the writer only adds the closing. Credentials in details
/// are written as `"[redacted]"` (see [`redact`](super::event::redact)).
pub(crate) fn render_opening(buf: &mut Vec<u8>, event: &Event) -> Result<(), serde_json::Error> {
    push_opening(buf, event.kind.as_str());
    for (name, value) in [
        (&b",\"envelope\":"[..], &event.envelope),
        (b",\"agent\":", &event.agent),
        (b",\"rule\":", &event.rule),
    ] {
        if let Some(v) = value {
            buf.extend_from_slice(name);
            push_json_str(buf, v)?;
        }
    }
    if !event.details.is_empty() {
        buf.extend_from_slice(b",\"details\":");
        push_json_map(buf, &event.details)?;
    }
    Ok(())
}

/// [`render_opening`] for an [`EventView`](super::event::EventView): the same bytes as for
/// the [`Event`] it stands for, redacted alike.
pub(crate) fn render_view_opening(
    buf: &mut Vec<u8>,
    view: &super::event::EventView<'_>,
) -> Result<(), serde_json::Error> {
    use super::event::Detail;
    push_opening(buf, view.kind.as_str());
    for (name, value) in [
        (&b",\"envelope\":"[..], view.envelope),
        (b",\"agent\":", view.agent),
        (b",\"rule\":", view.rule),
    ] {
        if let Some(v) = value {
            buf.extend_from_slice(name);
            push_json_str(buf, v)?;
        }
    }
    if view.details.is_empty() {
        return Ok(());
    }
    buf.extend_from_slice(b",\"details\":{");
    for (i, (key, value)) in view.details.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        push_json_str(buf, key)?;
        buf.push(b':');
        match value {
            _ if is_secret_key(key) => push_json_str(buf, REDACTED)?,
            Detail::Str(s) if looks_like_secret_value(s) => push_json_str(buf, REDACTED)?,
            Detail::Str(s) => push_json_str(buf, s)?,
            Detail::U64(n) => push_decimal(buf, *n),
            Detail::F64(f) if f.is_finite() => serde_json::to_writer(&mut *buf, f)?,
            Detail::F64(_) | Detail::Null => buf.extend_from_slice(b"null"),
        }
    }
    buf.push(b'}');
    Ok(())
}

/// Short, stable name of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// A signed tree head, stored as a record of its own (kind `checkpoint`) at `seq ==
/// tree_size`: it covers every record before it, earlier checkpoints included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    /// Hash of the line before it; signed, so the chain head is pinned too.
    pub prev: Hash,
    pub ts: String,
    pub tree_size: u64,
    pub root: Hash,
    /// Lets the writer resume the tree after a restart without rereading the whole log;
    /// not signed, but it must hash to `root`.
    pub frontier: Vec<Hash>,
    pub key_id: String,
    pub key: VerifyingKey,
    pub sig: Signature,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointJson {
    seq: u64,
    prev: String,
    kind: String,
    ts: String,
    tree_size: u64,
    root: String,
    frontier: Vec<String>,
    key_id: String,
    key: String,
    sig: String,
}

/// Why a checkpoint line is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("bad checkpoint signature: {0}")]
    BadSignature(String),
    #[error("checkpoint root mismatch: {0}")]
    RootMismatch(String),
}

/// The exact bytes the signature covers.
pub fn signed_message(tree_size: u64, root: &Hash, prev: &Hash, ts: &str, key_id: &str) -> Vec<u8> {
    format!(
        "enforcer audit checkpoint v1\ntree_size {tree_size}\nroot {}\nprev {}\ntime {ts}\nkey_id {key_id}\n",
        hex::encode(root),
        hex::encode(prev)
    )
    .into_bytes()
}

impl Checkpoint {
    /// Signs the tree `frontier` describes, as the record at `seq == frontier.size()`.
    pub fn sign(frontier: &Frontier, prev: Hash, ts: String, key: &SigningKey) -> Self {
        let vk = key.verifying_key();
        let key_id = key_id(&vk);
        let root = frontier.root();
        let sig = key.sign(&signed_message(frontier.size(), &root, &prev, &ts, &key_id));
        Self {
            seq: frontier.size(),
            prev,
            ts,
            tree_size: frontier.size(),
            root,
            frontier: frontier.nodes().to_vec(),
            key_id,
            key: vk,
            sig,
        }
    }

    pub fn render(&self, buf: &mut Vec<u8>) {
        push_opening(buf, CHECKPOINT_KIND);
        let frontier: Vec<String> = self.frontier.iter().map(hex::encode).collect();
        let frontier = serde_json::to_string(&frontier).unwrap_or_default();
        // Writing into a Vec cannot fail, and JSON strings encode any text: neither result
        // carries anything. `parse` compares a line with this rendering, so a checkpoint
        // that did not render whole would be refused, never accepted.
        let _ = write!(
            buf,
            ",\"tree_size\":{},\"root\":\"{}\",\"frontier\":{frontier},\"key_id\":\"{}\",\"key\":\"{}\",\"sig\":\"{}\"",
            self.tree_size,
            hex::encode(self.root),
            self.key_id,
            B64.encode(self.key.as_bytes()),
            B64.encode(self.sig.to_bytes()),
        );
        let _ = push_closing(buf, &self.ts, self.seq, &self.prev);
    }

    pub fn to_line(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(512);
        self.render(&mut v);
        v
    }

    /// Parses a checkpoint line and insists it is byte for byte what `render` makes of it,
    /// so no byte of it can change unnoticed. Does not check the signature.
    pub fn parse(line: &[u8]) -> Result<Self, CheckpointError> {
        let m = |s: &str| CheckpointError::Malformed(s.to_owned());
        let j: CheckpointJson =
            serde_json::from_slice(line).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        if j.kind != CHECKPOINT_KIND {
            return Err(m("kind is not checkpoint"));
        }
        let hash = |s: &str, what: &str| {
            parse_hash(s.as_bytes())
                .ok_or_else(|| CheckpointError::Malformed(format!("{what} is not a hash")))
        };
        let frontier = j
            .frontier
            .iter()
            .map(|h| hash(h, "frontier node"))
            .collect::<Result<Vec<_>, _>>()?;
        let key_bytes: [u8; 32] = B64
            .decode(&j.key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| m("key is not a base64 ed25519 public key"))?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| m("key is not a valid ed25519 public key"))?;
        let sig_bytes: [u8; 64] = B64
            .decode(&j.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| m("sig is not a base64 ed25519 signature"))?;
        let cp = Self {
            seq: j.seq,
            prev: hash(&j.prev, "prev")?,
            ts: j.ts,
            tree_size: j.tree_size,
            root: hash(&j.root, "root")?,
            frontier,
            key_id: j.key_id,
            key,
            sig: Signature::from_bytes(&sig_bytes),
        };
        if cp.to_line() != line {
            return Err(m(
                "not in canonical form (bytes added, removed or reordered)",
            ));
        }
        if cp.seq != cp.tree_size {
            return Err(m("seq differs from tree_size"));
        }
        // The record after a checkpoint needs a seq of its own.
        if cp.seq == u64::MAX {
            return Err(m("seq is out of range"));
        }
        Ok(cp)
    }

    /// Checks the signature, against `trusted` if given, else against the key the
    /// checkpoint names (which proves integrity but not who signed).
    pub fn verify_signature(&self, trusted: Option<&VerifyingKey>) -> Result<(), CheckpointError> {
        let key = match trusted {
            Some(t) if t != &self.key => {
                return Err(CheckpointError::BadSignature(format!(
                    "signed by key {} which is not the trusted key {}",
                    self.key_id,
                    key_id(t)
                )));
            }
            Some(t) => t,
            None => &self.key,
        };
        if self.key_id != key_id(key) {
            return Err(CheckpointError::BadSignature(
                "key_id does not name the key".to_owned(),
            ));
        }
        let msg = signed_message(
            self.tree_size,
            &self.root,
            &self.prev,
            &self.ts,
            &self.key_id,
        );
        key.verify_strict(&msg, &self.sig)
            .map_err(|_| CheckpointError::BadSignature("signature does not verify".to_owned()))
    }

    /// The tree the frontier describes must be the one that was signed.
    pub fn frontier(&self) -> Result<Frontier, CheckpointError> {
        let f = Frontier::from_parts(self.tree_size, self.frontier.clone()).ok_or_else(|| {
            CheckpointError::RootMismatch("frontier does not fit the tree size".to_owned())
        })?;
        if f.root() != self.root {
            return Err(CheckpointError::RootMismatch(
                "frontier does not hash to the signed root".to_owned(),
            ));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_at_the_last_seq_is_refused() {
        // No record could follow it; verifiers would overflow counting past it.
        let frontier = crate::audit::merkle::Frontier::from_parts(u64::MAX, vec![[7; 32]; 64])
            .expect("64 nodes for a size with 64 bits set");
        let key = SigningKey::from_bytes(&[3; 32]);
        let cp = Checkpoint::sign(&frontier, [1; 32], "2026-01-01T00:00:00Z".into(), &key);
        let err = Checkpoint::parse(&cp.to_line()).expect_err("seq u64::MAX");
        assert!(err.to_string().contains("out of range"), "{err}");
    }
    use crate::audit::{event::EventKind, merkle::leaf_hash};

    #[test]
    fn event_lines_parse_back() {
        let mut buf = Vec::new();
        let e = Event::new(EventKind::RequestDenied)
            .agent("a\nb")
            .detail("x", serde_json::json!({"y": "\"quoted\""}));
        render_event(&mut buf, 42, &[7; 32], "2025-01-01T00:00:00Z", &e).unwrap();
        assert!(!buf.contains(&b'\n'));
        let head = parse_head(&buf).unwrap();
        assert_eq!(
            (head.seq, head.prev, head.kind),
            (42, [7; 32], "request_denied")
        );
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["agent"], "a\nb");
    }

    #[test]
    fn openings_and_closings_render_like_the_formatter() {
        for seq in [0, 7, 10, 999, 1000, u64::MAX] {
            let prev: Hash = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
            let mut buf = Vec::new();
            push_opening(&mut buf, "request_allowed");
            push_closing(&mut buf, "2025-01-01T00:00:00Z", seq, &prev).unwrap();
            let expected = format!(
                "{{\"kind\":\"request_allowed\",\"ts\":\"2025-01-01T00:00:00Z\",\"seq\":{seq},\"prev\":\"{}\"}}",
                hex::encode(prev)
            );
            assert_eq!(String::from_utf8(buf).unwrap(), expected);
            let head = parse_head(expected.as_bytes()).unwrap();
            assert_eq!(
                (head.seq, head.prev, head.kind),
                (seq, prev, "request_allowed")
            );
        }
    }

    #[test]
    fn heads_reject_noncanonical_lines() {
        let hex = "ab".repeat(32);
        let line = |kind: &str, seq: &str| {
            format!("{{\"kind\":\"{kind}\",\"ts\":\"t\",\"seq\":{seq},\"prev\":\"{hex}\"}}")
        };
        assert!(parse_head(line("request_allowed", "1").as_bytes()).is_ok());
        for bad in [
            line("request_allowed", "01"),
            line("request_allowed", "1 "),
            line("request_allowed", ""),
            line("request_allowed", "99999999999999999999"),
            line("request_alowed", "1"),
            line("Request_allowed", "1"),
            line("request_allowed", "1").replace("\"}", "\" }"),
            line("request_allowed", "1").replace(&hex, &hex.to_uppercase()),
            line("request_allowed", "1").replace(",\"seq\"", ",\"sequence\""),
            format!("{{\"seq\":1,\"prev\":\"{hex}\",\"kind\":\"request_allowed\"}}"),
            String::new(),
        ] {
            assert!(parse_head(bad.as_bytes()).is_err(), "{bad}");
        }
        let old = format!("{{\"seq\":1,\"prev\":\"{hex}\",\"kind\":\"request_allowed\"}}");
        assert!(
            parse_head(old.as_bytes())
                .unwrap_err()
                .contains("earlier enforcer versions")
        );
    }

    #[test]
    fn checkpoints_round_trip_and_every_byte_matters() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let mut f = Frontier::new();
        for i in 0..5u8 {
            f.push(leaf_hash(&[i]));
        }
        let cp = Checkpoint::sign(&f, [3; 32], "2025-01-01T00:00:00.5Z".into(), &key);
        let line = cp.to_line();
        let back = Checkpoint::parse(&line).unwrap();
        assert_eq!(back, cp);
        back.verify_signature(Some(&key.verifying_key())).unwrap();
        assert_eq!(back.frontier().unwrap().root(), f.root());
        for i in 0..line.len() {
            let mut bad = line.clone();
            bad[i] ^= 0x01;
            let ok = Checkpoint::parse(&bad).and_then(|c| {
                c.verify_signature(None)
                    .and_then(|_| c.frontier())
                    .map(|_| c)
            });
            assert!(ok.is_err(), "flip at {i} went unnoticed");
        }
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(cp.verify_signature(Some(&other.verifying_key())).is_err());
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn parse_hash_takes_lower_case_hex_only() {
        let hash: Hash = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let mut text = Vec::new();
        push_hex(&mut text, &hash);
        assert_eq!(parse_hash(&text), Some(hash));
        for bad in [b'A', b'g', b'/', b':', b' ', 0xff] {
            for i in [0, 1, 31, 63] {
                let mut t = text.clone();
                t[i] = bad;
                assert_eq!(parse_hash(&t), None);
            }
        }
        assert_eq!(parse_hash(&text[..63]), None);
    }

    #[test]
    fn an_escape_is_found_at_every_place_in_strings_of_every_short_length() {
        for len in 0..=24 {
            for place in 0..len {
                for (byte, escaped) in [
                    (0x00, true),
                    (0x1f, true),
                    (b'"', true),
                    (b'\\', true),
                    (b' ', false),
                    (0x7f, false),
                    (0x80, false),
                    (0xff, false),
                ] {
                    let mut s = vec![b'a'; len];
                    s[place] = byte;
                    assert_eq!(needs_escape(&s), escaped, "{byte:#x} at {place} of {len}");
                }
            }
            assert!(!needs_escape(&vec![b'a'; len]));
        }
    }

    proptest::proptest! {
        #[test]
        fn hex_is_written_as_the_hex_crate_writes_it(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        ) {
            let mut text = b"x".to_vec();
            push_hex(&mut text, &bytes);
            let expected = hex::encode(&bytes);
            proptest::prop_assert_eq!(&text[1..], expected.as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in "(\\PC|[\u{0}-\u{1f}\"\\\\\u{7f}\u{80}-\u{ff}]){0,40}") {
            let mut fast = Vec::new();
            push_json_str(&mut fast, &s).unwrap();
            proptest::prop_assert_eq!(fast, serde_json::to_vec(&s).unwrap());
            proptest::prop_assert_eq!(
                needs_escape(s.as_bytes()),
                s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
            );
        }
    }

    fn detail_strategy() -> impl proptest::strategy::Strategy<Value = crate::audit::Detail<'static>>
    {
        use crate::audit::Detail;
        use proptest::prelude::*;
        // Strings leak to get the `'static` borrows a view holds; a test's worth is small.
        let text = "(\\PC|[\u{0}-\u{1f}\"\\\\]| ?[Bb]earer x| ?[Bb]asic y){0,12}"
            .prop_map(|s: String| Detail::Str(Box::leak(s.into_boxed_str())));
        prop_oneof![
            text,
            any::<u64>().prop_map(Detail::U64),
            any::<f64>().prop_map(Detail::F64),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(3.0)]
                .prop_map(Detail::F64),
            Just(Detail::Null),
        ]
    }

    proptest::proptest! {
        #[test]
        fn a_view_renders_as_the_event_it_stands_for(
            kind in proptest::sample::select(crate::audit::EventKind::ALL),
            names in proptest::collection::btree_map(
                "(token|api_key|access-token|x|host|path|[a-z_]{1,10})",
                detail_strategy(),
                0..14,
            ),
            envelope in proptest::option::of("[a-z\"]{0,6}"),
            agent in proptest::option::of(" ?[Bb]earer [a-z]{0,3}"),
            rule in proptest::option::of("\\PC{0,8}"),
        ) {
            let details: Vec<(&str, crate::audit::Detail<'_>)> =
                names.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let view = crate::audit::EventView {
                kind,
                envelope: envelope.as_deref(),
                agent: agent.as_deref(),
                rule: rule.as_deref(),
                details: &details,
            };
            let (mut fast, mut owned) = (Vec::new(), Vec::new());
            render_view_opening(&mut fast, &view).unwrap();
            render_opening(&mut owned, &view.to_event()).unwrap();
            proptest::prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(owned).unwrap());
        }
    }

    #[test]
    fn fast_json_matches_serde_json() {
        let v = serde_json::json!({
            "plain": "abc",
            "quote": "a\"b",
            "backslash": "a\\b",
            "control": "a\nb\u{1}\u{7f}",
            "unicode": "h\u{e9}llo \u{2028} \u{1f600}",
            "n": [0, 1, -2, 3.5, 1e300, -0.0, u64::MAX, i64::MIN, i64::MAX, null, true, false],
            "nested": {"k\"ey": ["x", {"y": "z\t"}], "empty": {}, "none": []},
        });
        let mut fast = Vec::new();
        push_json_value(&mut fast, &v).unwrap();
        assert_eq!(fast, serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn details_are_written_as_redaction_leaves_them() {
        let v = serde_json::json!({
            "Authorization": "Bearer abc",
            "headers": {"X-Api-Key": "k", "accept": "json", "cookie": {"a": 1}},
            "input_tokens": 12,
            "list": [{"client_secret": ["s"]}, "Basic Zm9v", " bearer x", "bear"],
            "access_token": null,
        });
        let mut redacted = v.clone();
        crate::audit::event::redact(&mut redacted);
        let mut fast = Vec::new();
        push_json_value(&mut fast, &v).unwrap();
        assert_eq!(fast, serde_json::to_vec(&redacted).unwrap());
        assert!(!String::from_utf8(fast).unwrap().contains("abc"));
    }
}
