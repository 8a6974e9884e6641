//! The Envelope as data: every field an issuer may write, nothing else (`deny_unknown_fields`
//! everywhere, so a typo is an error rather than a silently ignored restriction).
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use smallvec::SmallVec;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{
    pattern::{HostPattern, PathPattern, RegexRule},
    text::Text,
};

/// Envelope format versions this build understands. A payload naming any other version is
/// refused with `unsupported_version`, never interpreted by guesswork.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// The DSSE `payloadType` of a signed Envelope.
pub const PAYLOAD_TYPE: &str = "application/vnd.enforcer.envelope.v1+json";

/// An RFC 3339 instant. In TOML it may be written quoted or as a native offset date-time;
/// in the signed JSON it is always a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub OffsetDateTime);

impl Timestamp {
    pub fn to_rfc3339(&self) -> String {
        // Formatting a valid OffsetDateTime only fails for years outside 0..=9999, which
        // parsing already excludes; fall back to the Debug form rather than panic.
        self.0
            .format(&Rfc3339)
            .unwrap_or_else(|_| format!("{:?}", self.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.0.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 date-time with offset, e.g. \"2026-05-01T12:00:00Z\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                OffsetDateTime::parse(v, &Rfc3339).map(Timestamp).map_err(|e| {
                    E::custom(format_args!(
                        "`{v}` is not an RFC 3339 date-time with offset ({e}); write e.g. \"2026-05-01T12:00:00Z\""
                    ))
                })
            }
            // toml hands native date-times over as a one-entry map holding their text.
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Timestamp, A::Error> {
                let Some((_, text)) = map.next_entry::<String, String>()? else {
                    return Err(de::Error::custom("empty date-time"));
                };
                self.visit_str(&text)
            }
        }
        d.deserialize_any(V)
    }
}

/// A signed, expiring grant for one task. Anything it does not list is denied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub id: String,
    pub subject: String,
    pub task: String,
    pub issuer: String,
    pub issued_at: Timestamp,
    pub not_before: Timestamp,
    pub expires_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    pub capabilities: Vec<Capability>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden_effects: Vec<ForbiddenEffect>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breakers: Option<Breakers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceLimits>,
}

impl Envelope {
    pub fn capability(&self, name: &str) -> Option<&Capability> {
        self.capabilities.iter().find(|c| c.name == name)
    }

    /// `expires_at - not_before`.
    pub fn lifetime(&self) -> time::Duration {
        self.expires_at.0 - self.not_before.0
    }
}

/// One upstream the agent may reach and exactly how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    pub name: Text,
    pub upstream: Upstream,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Box<Budget>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub scheme: Scheme,
    /// Lowercase DNS name or IP literal (IPv6 without brackets). Exact, no wildcards.
    pub host: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or_else(|| self.scheme.default_port())
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.to_string()
        };
        write!(f, "{}://{}:{}", self.scheme.as_str(), host, self.port())
    }
}

/// Names a secret the daemon holds; the Envelope never carries the secret itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRef {
    pub secret: Text,
    pub header: Text,
    #[serde(default = "default_credential_format")]
    pub format: Text,
}

fn default_credential_format() -> Text {
    Text::new("{secret}")
}

impl CredentialRef {
    /// The header value for a given secret value.
    pub fn header_value(&self, secret: &str) -> String {
        self.format.replacen("{secret}", secret, 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    GET,
    HEAD,
    POST,
    PUT,
    PATCH,
    DELETE,
    OPTIONS,
}

impl Method {
    /// Exact, case-sensitive (RFC 9110 methods are case-sensitive): `get` is not `GET`.
    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            "OPTIONS" => Method::OPTIONS,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
        }
    }
}

/// A list of HTTP methods. Held inline: there are only seven, and a heap allocation per
/// route was a noticeable part of verifying an Envelope.
pub type Methods = SmallVec<[Method; 7]>;

/// Methods plus a path pattern (see [`PathPattern`] for the syntax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub methods: Methods,
    pub path: PathPattern,
}

impl Route {
    /// `method` is the request's method as sent; `path` must be normalized
    /// (see [`super::is_normalized_path`]).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        Method::parse(method).is_some_and(|m| self.methods.contains(&m)) && self.path.matches(path)
    }
}

/// A predicate on one query parameter or one JSON body field. All rules given must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// Name of a query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Text>,
    /// RFC 6901 JSON pointer into the request body, e.g. `/order/qty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Text>,
    /// If true, an absent field passes; a present one must satisfy the rules.
    #[serde(default, skip_serializing_if = "is_false")]
    pub optional: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<RegexRule>,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// Limits for the whole Envelope or one capability. Absent fields are unlimited at that level
/// (the Envelope-level budget and the host floor still apply).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<Spend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_clock_secs: Option<u64>,
}

/// Money. At the capability level `amount` (and optionally `multiplier`) say where a request
/// carries its cost; at the Envelope level only `currency` and `max` (the total) are allowed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spend {
    pub currency: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Text>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<Text>,
}

/// What no capability may ever do. Checked before capabilities; a match refuses the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForbiddenEffect {
    #[serde(default, skip_serializing_if = "SmallVec::is_empty")]
    pub methods: Methods,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPattern>,
    /// Conditions on query or body; all must hold (or be impossible to evaluate) to match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Constraint>,
    pub reason: String,
}

/// Requests that must wait for a human; denied when `timeout_secs` pass without an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    #[serde(default, skip_serializing_if = "SmallVec::is_empty")]
    pub methods: Methods,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Constraint>,
    pub timeout_secs: u64,
    pub reason: String,
}

/// What trips the circuit. A tripped circuit is reset only by an operator or a new Envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breakers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_velocity: Option<SpendVelocityBreaker>,
    /// Any attempt at a forbidden effect trips the circuit. On unless set to false.
    #[serde(default = "default_true")]
    pub on_forbidden: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_errors: Option<UpstreamErrorBreaker>,
}

impl Default for Breakers {
    fn default() -> Self {
        Breakers {
            denied: None,
            spend_velocity: None,
            on_forbidden: true,
            upstream_errors: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeniedBreaker {
    pub count: u32,
    pub window_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendVelocityBreaker {
    pub currency: String,
    pub max: f64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamErrorBreaker {
    /// Fraction of responses with status >= 500 (or no response) in the window, in (0, 1].
    pub rate: f64,
    /// Below this many requests in the window the rate is not judged.
    pub min_requests: u32,
    pub window_secs: u64,
}

/// cgroup limits for the agent.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Percent of one CPU (100 = one full core); becomes `cpu.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u64>,
}
