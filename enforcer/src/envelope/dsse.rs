//! The signed wrapper: DSSE v1 (`{payloadType, payload, signatures: [{keyid, sig}]}`), the
//! signature covering `PAE(payloadType, payload)` over the exact payload bytes.
use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

use super::{
    keys::key_id,
    model::{Envelope, PAYLOAD_TYPE},
    validate::{EnvelopeError, Problem, validate},
};

/// The JSON document `enforcer envelope sign` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEnvelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Standard base64 (with padding) of the payload bytes.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Hex SHA-256 of the signer's raw public key.
    pub keyid: String,
    /// Standard base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths as ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = pae_prefix(payload_type, payload.len(), payload.len());
    out.extend_from_slice(payload);
    out
}

/// Everything of `PAE(payload_type, body)` before the body, for a body of `body_len`
/// bytes, with room reserved for `reserve` more bytes.
pub(crate) fn pae_prefix(payload_type: &str, body_len: usize, reserve: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + reserve + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body_len.to_string().as_bytes());
    out.push(b' ');
    out
}

/// The canonical payload of an Envelope: its compact JSON in declaration order. Produced
/// once, at signing; verification parses exactly the bytes that were signed.
pub fn canonical_payload(env: &Envelope) -> Result<Vec<u8>, EnvelopeError> {
    serde_json::to_vec(env).map_err(|e| {
        EnvelopeError::Malformed(Problem {
            path: String::new(),
            message: format!("cannot serialize: {e}"),
            fix: String::new(),
            location: None,
        })
    })
}

/// Signs arbitrary payload bytes under a payload type.
pub fn sign_payload(payload_type: &str, payload: &[u8], key: &SigningKey) -> SignedEnvelope {
    let sig = key.sign(&pae(payload_type, payload));
    SignedEnvelope {
        payload_type: payload_type.to_owned(),
        payload: STANDARD.encode(payload),
        signatures: vec![Signature {
            keyid: key_id(&key.verifying_key()),
            sig: STANDARD.encode(sig.to_bytes()),
        }],
    }
}

/// Validates and signs an Envelope.
pub fn sign_envelope(env: &Envelope, key: &SigningKey) -> Result<SignedEnvelope, EnvelopeError> {
    validate(env)?;
    let payload = canonical_payload(env)?;
    Ok(sign_payload(PAYLOAD_TYPE, &payload, key))
}

impl SignedEnvelope {
    /// Pretty JSON with a trailing newline, as written to files.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and vectors cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}
