//! What gets recorded. An event names the envelope, the agent and the rule that decided,
//! plus free-form details; it has no field meant for a credential, and details whose key
//! names a credential (or whose value looks like one) are replaced by `"[redacted]"` before
//! anything is written, so a careless caller cannot leak a secret into the log.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The kinds of decision and lifecycle event the log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    EnvelopeActivated,
    EnvelopeRefused,
    RequestAllowed,
    RequestDenied,
    RequestHeld,
    RequestApproved,
    BudgetSettled,
    KernelDeny,
    BreakerTripped,
    OperatorReset,
    Revoked,
    Expired,
    DaemonStarted,
    DaemonStopped,
    /// Written by the log itself when it opens a log its last writer did not close: a
    /// torn last line cut away, or records that no checkpoint covered.
    LogRecovered,
    /// Anything that has no kind of its own yet; say what in `details`.
    Other,
}

impl EventKind {
    pub const ALL: &[EventKind] = &[
        Self::EnvelopeActivated,
        Self::EnvelopeRefused,
        Self::RequestAllowed,
        Self::RequestDenied,
        Self::RequestHeld,
        Self::RequestApproved,
        Self::BudgetSettled,
        Self::KernelDeny,
        Self::BreakerTripped,
        Self::OperatorReset,
        Self::Revoked,
        Self::Expired,
        Self::DaemonStarted,
        Self::DaemonStopped,
        Self::LogRecovered,
        Self::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnvelopeActivated => "envelope_activated",
            Self::EnvelopeRefused => "envelope_refused",
            Self::RequestAllowed => "request_allowed",
            Self::RequestDenied => "request_denied",
            Self::RequestHeld => "request_held",
            Self::RequestApproved => "request_approved",
            Self::BudgetSettled => "budget_settled",
            Self::KernelDeny => "kernel_deny",
            Self::BreakerTripped => "breaker_tripped",
            Self::OperatorReset => "operator_reset",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::DaemonStarted => "daemon_started",
            Self::DaemonStopped => "daemon_stopped",
            Self::LogRecovered => "log_recovered",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event kind {s:?}; known: {}", all.join(", "))
            })
    }
}

/// One decision or lifecycle event, before the log gives it a sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub envelope: Option<String>,
    pub agent: Option<String>,
    /// The rule that decided (capability, forbidden effect, budget, breaker…), by id.
    pub rule: Option<String>,
    pub details: Map<String, Value>,
}

impl Event {
    pub fn new(kind: EventKind) -> Self {
        Self {
            kind,
            envelope: None,
            agent: None,
            rule: None,
            details: Map::new(),
        }
    }

    pub fn envelope(mut self, id: impl Into<String>) -> Self {
        self.envelope = Some(id.into());
        self
    }

    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// Describes an HTTP request by method, host and path. The query string is left out:
    /// it is where APIs put keys (`?api_key=`), and the decision never needs it verbatim.
    pub fn request(self, method: &str, host: &str, path_and_query: &str) -> Self {
        let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
        self.detail("method", method)
            .detail("host", host)
            .detail("path", path)
    }
}

/// An event made of borrowed parts, for callers that record one per request: it renders
/// exactly as the [`Event`] with the same fields would, without building its map of
/// owned keys and values first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventView<'a> {
    pub kind: EventKind,
    pub envelope: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub rule: Option<&'a str>,
    /// In the order of their keys, as [`Event::details`] keeps them; each key once.
    pub details: &'a [(&'a str, Detail<'a>)],
}

/// A detail's value in an [`EventView`]: what `Value::from` makes of the same value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Detail<'a> {
    Str(&'a str),
    U64(u64),
    /// Not finite is written as `null`, as `Value::from(f64)` has it.
    F64(f64),
    Null,
}

impl Detail<'_> {
    pub fn to_value(self) -> Value {
        match self {
            Detail::Str(s) => Value::from(s),
            Detail::U64(n) => Value::from(n),
            Detail::F64(f) => Value::from(f),
            Detail::Null => Value::Null,
        }
    }
}

impl EventView<'_> {
    /// The owned event with the same fields; it renders to the same bytes.
    pub fn to_event(&self) -> Event {
        Event {
            kind: self.kind,
            envelope: self.envelope.map(str::to_owned),
            agent: self.agent.map(str::to_owned),
            rule: self.rule.map(str::to_owned),
            details: self
                .details
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_value()))
                .collect(),
        }
    }
}

/// What the log can record: an [`Event`], or an [`EventView`] of one.
pub trait Recordable {
    /// Appends the part of the line before its closing (see `record::render_opening`).
    fn render_opening(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error>;
}

impl Recordable for Event {
    fn render_opening(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        super::record::render_opening(buf, self)
    }
}

impl Recordable for EventView<'_> {
    fn render_opening(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        super::record::render_view_opening(buf, self)
    }
}

impl<T: Recordable + ?Sized> Recordable for &T {
    fn render_opening(&self, buf: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        (**self).render_opening(buf)
    }
}

pub const REDACTED: &str = "[redacted]";

/// Key names (lower case, `-` read as `_`) that carry credentials, matched exactly or as a
/// `_`-separated suffix, so `input_tokens` stays but `access_token` goes. [`is_secret_key`]
/// matches them without walking the list; the tests hold it to the list.
#[cfg(test)]
const SECRET_KEYS: &[&str] = &[
    "authorization",
    "proxy_authorization",
    "cookie",
    "set_cookie",
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "credentials",
    "api_key",
    "apikey",
    "private_key",
    "signature",
];

/// Whether a detail's key names a credential, i.e. (compared as lower case, `-` read as
/// `_`) equals one of `authorization`, `proxy_authorization`, `cookie`, `set_cookie`,
/// `token`, `secret`, `password`, `passwd`, `credential`, `credentials`, `api_key`,
/// `apikey`, `private_key`, `signature`, or ends with `_` and one of them. This runs for every
/// detail of every record, so instead of trying each entry it looks at the key's last
/// `_`-separated word, which decides: only `api_key` and `private_key` span two words, and
/// the other two-word entries end with a one-word entry (`authorization`, `cookie`).
pub(crate) fn is_secret_key(key: &str) -> bool {
    let k = key.as_bytes();
    let split = k.iter().rposition(|b| matches!(b, b'_' | b'-'));
    let last = split.map_or(k, |i| &k[i + 1..]);
    let is = |word: &[u8], name: &str| word.eq_ignore_ascii_case(name.as_bytes());
    match last.len() {
        3 if is(last, "key") => {
            let rest = split.map_or(&k[..0], |i| &k[..i]);
            let before = rest
                .iter()
                .rposition(|b| matches!(b, b'_' | b'-'))
                .map_or(rest, |i| &rest[i + 1..]);
            // `key` alone, `_key` or `a-b_key` name no credential; `api_key` and
            // `private_key` do, as whole words.
            split.is_some() && (is(before, "api") || is(before, "private"))
        }
        5 => is(last, "token"),
        6 => ["cookie", "secret", "passwd", "apikey"]
            .iter()
            .any(|n| is(last, n)),
        8 => is(last, "password"),
        9 => is(last, "signature"),
        10 => is(last, "credential"),
        11 => is(last, "credentials"),
        13 => is(last, "authorization"),
        _ => false,
    }
}

pub(crate) fn looks_like_secret_value(v: &str) -> bool {
    // Every string of every record comes here, and nearly all are decided by their first
    // byte: neither whitespace (as `trim_start` sees it) nor the `b` of bearer and basic.
    match v.as_bytes().first() {
        None => return false,
        Some(b) if b.is_ascii() && !matches!(b, b'\t'..=b'\r' | b' ' | b'b' | b'B') => {
            return false;
        }
        Some(_) => {}
    }
    let v = v.trim_start().as_bytes();
    let starts = |p: &[u8]| v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p);
    starts(b"bearer ") || starts(b"basic ")
}

/// Replaces credential-looking values, at any depth. The log redacts while rendering
/// instead (`record::render_body`); this is what that must match.
#[cfg(test)]
pub(crate) fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => redact_map(map),
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::String(s) if looks_like_secret_value(s) => *s = REDACTED.to_owned(),
        _ => {}
    }
}

#[cfg(test)]
pub(crate) fn redact_map(map: &mut Map<String, Value>) {
    for (k, v) in map.iter_mut() {
        if is_secret_key(k) {
            *v = Value::String(REDACTED.to_owned());
        } else {
            redact(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(*k));
            assert_eq!(serde_json::to_value(k).unwrap(), json!(k.as_str()));
        }
        assert!("nope".parse::<EventKind>().is_err());
    }

    #[test]
    fn credentials_are_redacted_at_any_depth() {
        let mut v = json!({
            "Authorization": "Bearer abc",
            "headers": {"X-Api-Key": "k", "accept": "json", "cookie": "c"},
            "input_tokens": 12,
            "list": [{"client_secret": "s"}, "Basic Zm9v"],
            "access_token": "t",
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "Authorization": REDACTED,
                "headers": {"X-Api-Key": REDACTED, "accept": "json", "cookie": REDACTED},
                "input_tokens": 12,
                "list": [{"client_secret": REDACTED}, REDACTED],
                "access_token": REDACTED,
            })
        );
    }

    #[test]
    fn secret_keys_match_case_and_dash_insensitively() {
        for k in [
            "Authorization",
            "PROXY-AUTHORIZATION",
            "x-api-key",
            "client_secret",
            "Client-Secret",
            "access_token",
            "token",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "input_tokens",
            "tokenizer",
            "mysecret",
            "key",
            "authorizations",
            "_",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
        assert!(looks_like_secret_value("  BEARER abc"));
        assert!(!looks_like_secret_value("bear"));
    }

    /// The obvious reading of [`SECRET_KEYS`], to check the fast matcher against.
    fn is_secret_key_reference(key: &str) -> bool {
        let k: Vec<u8> = key
            .bytes()
            .map(|b| {
                if b == b'-' {
                    b'_'
                } else {
                    b.to_ascii_lowercase()
                }
            })
            .collect();
        SECRET_KEYS.iter().any(|s| {
            let s = s.as_bytes();
            k == s || (k.len() > s.len() && k.ends_with(s) && k[k.len() - s.len() - 1] == b'_')
        })
    }

    proptest::proptest! {
        #[test]
        fn the_secret_value_matcher_agrees_with_trimming(
            v in "[ \t\n\u{b}\u{c}\r\u{85}\u{a0}\u{2003}\u{1c}x]{0,3}(bearer|Basic|BEARER|bear|b|B|a|\\PC)[ x]?.{0,4}",
        ) {
            let t = v.trim_start().to_ascii_lowercase();
            let reference = t.starts_with("bearer ") || t.starts_with("basic ");
            proptest::prop_assert_eq!(looks_like_secret_value(&v), reference, "{:?}", v);
        }

        #[test]
        fn the_secret_key_matcher_agrees_with_the_list(
            key in concat!(
                "(([a-zA-Z]{0,4}|api|API|private|Private|proxy|set|x|key)[_-]?){0,3}",
                "(authorization|Cookie|token|SECRET|password|passwd|credential|credentials|",
                "api_key|Api-Key|apikey|private_key|signature|key|tokens|_|-|[a-z]{0,6})",
            ),
        ) {
            proptest::prop_assert_eq!(is_secret_key(&key), is_secret_key_reference(&key), "{}", key);
        }
    }

    #[test]
    fn every_listed_key_is_matched() {
        for name in SECRET_KEYS {
            for key in [
                name.to_string(),
                format!("x_{name}"),
                format!("X-{}", name.to_uppercase()),
            ] {
                assert!(is_secret_key(&key), "{key}");
                assert!(is_secret_key_reference(&key), "{key}");
            }
        }
        for key in [
            "key",
            "_key",
            "x_key",
            "apikey_x",
            "api",
            "api_",
            "my_api_keys",
            "rapi_key",
        ] {
            assert_eq!(is_secret_key(key), is_secret_key_reference(key), "{key}");
        }
    }

    #[test]
    fn request_details_leave_the_query_out() {
        let e =
            Event::new(EventKind::RequestAllowed).request("GET", "api.example", "/v1/x?api_key=s");
        assert_eq!(e.details["path"], json!("/v1/x"));
        assert!(!serde_json::to_string(&e).unwrap().contains("api_key=s"));
    }
}
