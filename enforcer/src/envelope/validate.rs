//! Parsing and validation. Every problem names the field (`capabilities[2].routes[0].path`),
//! its line and column when the input was TOML, and how to fix it.
use std::{collections::HashSet, fmt, ops::Range};

use serde::Deserialize;
use toml_edit::{ImDocument, Item, Table, Value as TomlValue};

use super::model::{
    Approval, Breakers, Budget, Capability, Constraint, Envelope, ForbiddenEffect, Method,
    ResourceLimits, SUPPORTED_VERSIONS, Scheme,
};
use super::pattern::check_host;

/// Largest Envelope source (TOML or signed JSON) accepted.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

pub const MAX_CAPABILITIES: usize = 256;
pub const MAX_ROUTES: usize = 64;
pub const MAX_CONSTRAINTS: usize = 64;
pub const MAX_EFFECTS: usize = 256;
pub const MAX_ONE_OF: usize = 256;
/// No Envelope may live longer than this, whatever the host allows.
pub const MAX_LIFETIME_SECS: i64 = 366 * 24 * 3600;
pub const MAX_REQUESTS: u64 = 1_000_000_000;
pub const MAX_BYTES: u64 = 1 << 40;
pub const MAX_MONEY: f64 = 1e12;
pub const MAX_WINDOW_SECS: u64 = 7 * 24 * 3600;
pub const MAX_APPROVAL_TIMEOUT_SECS: u64 = 24 * 3600;

/// Where in the TOML source a problem is (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// One thing wrong with an Envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Field path, e.g. `capabilities[2].routes[0].path`; empty for the whole document.
    pub path: String,
    pub message: String,
    pub fix: String,
    pub location: Option<Location>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = self.location {
            write!(f, "{loc}: ")?;
        }
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, " — fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Why an Envelope source was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is {size} bytes, more than the {limit} allowed")]
    TooLarge { size: usize, limit: usize },
    /// Not the right shape: syntax errors, unknown fields, wrong types.
    #[error("malformed envelope: {0}")]
    Malformed(Problem),
    #[error(
        "unsupported envelope version {found}; this build understands {SUPPORTED_VERSIONS:?} — \
         re-issue the envelope with a supported version or upgrade the enforcer"
    )]
    UnsupportedVersion { found: String },
    /// Well-formed but not acceptable.
    #[error("invalid envelope:\n{}", list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl EnvelopeError {
    /// Stable machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::UnsupportedVersion { .. } => "unsupported_version",
            EnvelopeError::Invalid(_) => "invalid",
        }
    }

    /// The problems found, whatever the kind.
    pub fn problems(&self) -> Vec<&Problem> {
        match self {
            EnvelopeError::Malformed(p) => vec![p],
            EnvelopeError::Invalid(ps) => ps.iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// Parses and validates an Envelope written in TOML.
pub fn from_toml(src: &str) -> Result<Envelope, EnvelopeError> {
    if src.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: src.len(),
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    let env: Envelope = match toml::from_str(src) {
        Ok(env) => env,
        Err(e) => {
            if let Some(err) = toml_version_refusal(src) {
                return Err(err);
            }
            let doc = ImDocument::parse(src).ok();
            let (path, location) = match e.span() {
                Some(span) => (
                    doc.as_ref()
                        .and_then(|d| path_at(d.as_table(), span.start))
                        .unwrap_or_default(),
                    Some(location_of(src, span.start)),
                ),
                None => (String::new(), None),
            };
            return Err(EnvelopeError::Malformed(Problem {
                path,
                message: e.message().trim().to_owned(),
                fix: "see docs/envelope.md for the fields and their types; `enforcer envelope new` prints a valid example".into(),
                location,
            }));
        }
    };
    match validate(&env) {
        Ok(()) => Ok(env),
        Err(EnvelopeError::Invalid(mut problems)) => {
            if let Ok(doc) = ImDocument::parse(src) {
                for p in &mut problems {
                    p.location =
                        span_of(doc.as_table(), &p.path).map(|s| location_of(src, s.start));
                }
            }
            Err(EnvelopeError::Invalid(problems))
        }
        Err(e) => Err(e),
    }
}

/// Parses and validates an Envelope from its canonical JSON (the signed payload).
pub fn from_json(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: bytes.len(),
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    // One UTF-8 check over the whole payload (an ASCII fast path) lets serde_json skip
    // validating each string again; invalid UTF-8 goes through the byte parser so the
    // error reads exactly as before.
    let parsed = match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    };
    let env: Envelope = match parsed {
        Ok(env) => env,
        Err(e) => {
            // Only on failure: a newer version may have fields this build does not know,
            // and "unsupported version" is the more useful answer.
            #[derive(Deserialize)]
            struct Probe {
                version: Option<serde_json::Value>,
            }
            if let Ok(Probe { version: Some(v) }) = serde_json::from_slice::<Probe>(bytes)
                && !v
                    .as_u64()
                    .is_some_and(|n| SUPPORTED_VERSIONS.iter().any(|&s| u64::from(s) == n))
            {
                return Err(EnvelopeError::UnsupportedVersion {
                    found: v.to_string(),
                });
            }
            return Err(EnvelopeError::Malformed(Problem {
                path: String::new(),
                message: e.to_string(),
                fix: "the payload must be an Envelope as `enforcer envelope sign` produces it"
                    .into(),
                location: None,
            }));
        }
    };
    validate(&env)?;
    Ok(env)
}

fn toml_version_refusal(src: &str) -> Option<EnvelopeError> {
    let table: toml::Table = src.parse().ok()?;
    let v = table.get("version")?;
    let supported = v
        .as_integer()
        .is_some_and(|n| SUPPORTED_VERSIONS.iter().any(|&s| i64::from(s) == n));
    (!supported).then(|| EnvelopeError::UnsupportedVersion {
        found: v.to_string(),
    })
}

/// Checks everything serde cannot: versions, ranges, consistency, duplicates.
pub fn validate(env: &Envelope) -> Result<(), EnvelopeError> {
    if !SUPPORTED_VERSIONS.contains(&env.version) {
        return Err(EnvelopeError::UnsupportedVersion {
            found: env.version.to_string(),
        });
    }
    let mut v = Checker::default();
    v.envelope(env);
    if v.problems.is_empty() {
        Ok(())
    } else {
        Err(EnvelopeError::Invalid(v.problems))
    }
}

/// A field path such as `capabilities[2].routes[0].path`, built on the stack and only
/// rendered as text when a problem is reported: verification validates every accepted
/// Envelope, and formatting hundreds of paths that are never shown dominated its cost.
#[derive(Clone, Copy)]
pub(crate) enum Fp<'a> {
    /// A top-level field (`budget`), or the whole document when empty.
    Root(&'a str),
    /// An element of a top-level array: `capabilities[2]`.
    TopIndex(&'a str, usize),
    /// `parent.name`; `name` may itself contain dots (`upstream.host`).
    Field(&'a Fp<'a>, &'a str),
    /// `parent.name[index]`.
    Index(&'a Fp<'a>, &'a str, usize),
}

impl<'a> Fp<'a> {
    pub(crate) fn at(&'a self, name: &'a str) -> Fp<'a> {
        Fp::Field(self, name)
    }

    pub(crate) fn idx(&'a self, name: &'a str, index: usize) -> Fp<'a> {
        Fp::Index(self, name, index)
    }

    fn is_empty(&self) -> bool {
        matches!(self, Fp::Root(""))
    }
}

impl fmt::Display for Fp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let child = |f: &mut fmt::Formatter<'_>, parent: &Fp<'_>, name: &str| {
            if parent.is_empty() {
                f.write_str(name)
            } else {
                write!(f, "{parent}.{name}")
            }
        };
        match self {
            Fp::Root(name) => f.write_str(name),
            Fp::TopIndex(name, i) => write!(f, "{name}[{i}]"),
            Fp::Field(parent, name) => child(f, parent, name),
            Fp::Index(parent, name, i) => {
                child(f, parent, name)?;
                write!(f, "[{i}]")
            }
        }
    }
}

/// For each of `items` in order, whether its key repeats an earlier one's. Lists in real
/// Envelopes are short, and scanning a short list beats hashing into a freshly allocated
/// table; long ones (their limits are reported, not enforced by stopping) still get a hash
/// set, so a hostile Envelope cannot make the check quadratic.
fn repeats<'a, T, K: Eq + std::hash::Hash>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> impl Iterator<Item = bool> {
    const SCAN: usize = 32;
    let mut set = (items.len() > SCAN).then(|| HashSet::with_capacity(items.len()));
    items.iter().enumerate().map(move |(i, item)| {
        let k = key(item);
        match &mut set {
            Some(set) => !set.insert(k),
            None => items
                .get(..i)
                .unwrap_or_default()
                .iter()
                .any(|e| key(e) == k),
        }
    })
}

#[derive(Default)]
pub(crate) struct Checker {
    pub(crate) problems: Vec<Problem>,
}

/// Whether `s` holds a control character. The ASCII ones are found by a byte test without
/// early exit, which the compiler vectorizes; only text with other characters, where C1
/// controls may hide, is decoded.
fn has_control(s: &str) -> bool {
    let ascii_control = s
        .bytes()
        .fold(false, |found, b| found | (b < 0x20) | (b == 0x7f));
    ascii_control || (!s.is_ascii() && s.chars().any(char::is_control))
}

fn is_text(s: &str, max: usize) -> bool {
    !s.trim().is_empty() && s.len() <= max && !has_control(s)
}

/// `extra` holds ASCII punctuation only, so the test can go byte by byte: a non-ASCII
/// byte is neither alphanumeric nor in `extra`, just as its character would not be.
pub(crate) fn is_word(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

pub(crate) fn is_json_pointer(p: &str) -> bool {
    if p.len() > 256 || !p.starts_with('/') || has_control(p) {
        return false;
    }
    let b = p.as_bytes();
    b.iter()
        .enumerate()
        .all(|(i, &c)| c != b'~' || matches!(b.get(i + 1), Some(b'0' | b'1')))
}

fn is_currency(c: &str) -> bool {
    (2..=10).contains(&c.len())
        && c.bytes()
            .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit())
}

/// Whether `format` holds `{secret}` exactly once. Occurrences cannot overlap (the
/// placeholder has one `{`), so counting the `{` that start one is counting them.
fn has_one_secret_slot(format: &str) -> bool {
    let b = format.as_bytes();
    let mut slots = b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'{' && b.get(i..).is_some_and(|t| t.starts_with(b"{secret}")));
    slots.next().is_some() && slots.next().is_none()
}

fn method_bit(m: Method) -> u8 {
    // Seven methods: one bit each.
    1 << (m as u8)
}

fn method_mask(methods: &[Method]) -> u8 {
    methods.iter().fold(0, |acc, m| acc | method_bit(*m))
}

/// Header names the credential may not be injected as: they steer framing or routing.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
];

impl Checker {
    pub(crate) fn err(&mut self, path: impl fmt::Display, message: impl Into<String>, fix: &str) {
        self.problems.push(Problem {
            path: path.to_string(),
            message: message.into(),
            fix: fix.to_owned(),
            location: None,
        });
    }

    fn envelope(&mut self, env: &Envelope) {
        if !is_word(&env.id, 128, b"._-:") {
            self.err(
                "id",
                format!("`{}` is not a valid envelope id", env.id.escape_default()),
                "use 1 to 128 characters from A-Z a-z 0-9 . _ - : (a UUID works)",
            );
        }
        for (name, val, max) in [
            ("subject", &env.subject, 256),
            ("issuer", &env.issuer, 256),
            ("task", &env.task, 4096),
        ] {
            if !is_text(val, max) {
                self.err(
                    name,
                    format!(
                        "must be non-empty text of at most {max} bytes without control characters"
                    ),
                    "describe it in one line",
                );
            }
        }
        if env.not_before >= env.expires_at {
            self.err(
                "expires_at",
                format!(
                    "expires_at ({}) is not after not_before ({})",
                    env.expires_at, env.not_before
                ),
                "set expires_at later than not_before",
            );
        } else if env.lifetime().whole_seconds() > MAX_LIFETIME_SECS {
            self.err(
                "expires_at",
                format!(
                    "the envelope would live {} days; at most {} days are allowed",
                    env.lifetime().whole_days(),
                    MAX_LIFETIME_SECS / 86400
                ),
                "envelopes are for one task: issue a short-lived one",
            );
        }
        if env.issued_at > env.expires_at {
            self.err(
                "issued_at",
                "issued_at is after expires_at",
                "set issued_at to when you sign",
            );
        }
        let total_currency = env
            .budget
            .as_ref()
            .and_then(|b| b.spend.as_ref())
            .map(|s| s.currency.clone());
        if let Some(b) = &env.budget {
            self.budget(b, &Fp::Root("budget"), None, None);
        }
        if env.capabilities.is_empty() {
            self.err(
                "capabilities",
                "no capabilities: the agent could reach nothing",
                "add at least one [[capabilities]] table",
            );
        }
        if env.capabilities.len() > MAX_CAPABILITIES {
            self.err(
                "capabilities",
                format!("more than {MAX_CAPABILITIES} capabilities"),
                "split the task",
            );
        }
        let dup_names = repeats(&env.capabilities, |c| c.name.as_str());
        for ((i, cap), dup) in env.capabilities.iter().enumerate().zip(dup_names) {
            let p = Fp::TopIndex("capabilities", i);
            if dup {
                self.err(
                    p.at("name"),
                    format!("duplicate capability name `{}`", cap.name),
                    "give every capability a unique name",
                );
            }
            self.capability(cap, &p, env.budget.as_ref(), total_currency.as_deref());
        }
        if env.forbidden_effects.len() > MAX_EFFECTS {
            self.err(
                "forbidden_effects",
                format!("more than {MAX_EFFECTS} entries"),
                "use wider patterns",
            );
        }
        for (i, f) in env.forbidden_effects.iter().enumerate() {
            self.forbidden(f, &Fp::TopIndex("forbidden_effects", i));
        }
        if env.approvals.len() > MAX_EFFECTS {
            self.err(
                "approvals",
                format!("more than {MAX_EFFECTS} entries"),
                "use wider patterns",
            );
        }
        for (i, a) in env.approvals.iter().enumerate() {
            self.approval(a, &Fp::TopIndex("approvals", i));
        }
        if let Some(b) = &env.breakers {
            self.breakers(b, total_currency.as_deref());
        }
        if let Some(r) = &env.resources {
            self.resources(r, &Fp::Root("resources"));
        }
    }

    fn capability(
        &mut self,
        cap: &Capability,
        p: &Fp<'_>,
        total: Option<&Budget>,
        total_currency: Option<&str>,
    ) {
        if !is_word(&cap.name, 64, b"_-") || cap.name.bytes().any(|c| c.is_ascii_uppercase()) {
            self.err(
                p.at("name"),
                format!(
                    "`{}` is not a valid capability name",
                    cap.name.escape_default()
                ),
                "use 1 to 64 characters from a-z 0-9 _ -",
            );
        }
        if let Err(e) = check_host(&cap.upstream.host) {
            self.err(
                p.at("upstream.host"),
                e,
                "write the bare host, e.g. `api.exchange.example`",
            );
        }
        if cap.upstream.port == Some(0) {
            self.err(
                p.at("upstream.port"),
                "port 0 cannot be dialled",
                "give the real port, or omit it for the scheme's default",
            );
        }
        if let Some(c) = &cap.credential {
            let cp = p.at("credential");
            if !is_word(&c.secret, 128, b"_-.") {
                self.err(
                    cp.at("secret"),
                    "not a valid secret name",
                    "name the secret as the daemon's secret store knows it (A-Z a-z 0-9 _ - .); never put the secret itself here",
                );
            }
            if !is_word(&c.header, 64, b"-_")
                || RESERVED_HEADERS
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(&c.header))
            {
                self.err(
                    cp.at("header"),
                    format!("`{}` cannot carry a credential", c.header.escape_default()),
                    "use a header such as Authorization or X-Api-Key",
                );
            }
            if !has_one_secret_slot(&c.format) || c.format.len() > 256 || has_control(&c.format) {
                self.err(
                    cp.at("format"),
                    "must contain `{secret}` exactly once and no control characters",
                    "e.g. \"Bearer {secret}\"",
                );
            }
            let host = &cap.upstream.host;
            // Every address literal has a `:` or starts with a digit; names skip the parse.
            let loopback = host == "localhost"
                || ((host.contains(':') || host.starts_with(|c: char| c.is_ascii_digit()))
                    && host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback()));
            if cap.upstream.scheme == Scheme::Http && !loopback {
                self.err(
                    p.at("upstream.scheme"),
                    "a credential would be sent in clear text over http",
                    "use https (plain http with credentials is only allowed to loopback)",
                );
            }
        }
        if cap.routes.is_empty() {
            self.err(
                p.at("routes"),
                "no routes: the capability would allow nothing",
                "add at least one [[capabilities.routes]] with methods and path",
            );
        }
        if cap.routes.len() > MAX_ROUTES {
            self.err(
                p.at("routes"),
                format!("more than {MAX_ROUTES} routes"),
                "use `*` and `**` patterns",
            );
        }
        // The set of methods as a bit mask: order-insensitive like sorting, without
        // copying the list.
        let dup_routes = repeats(&cap.routes, |r| (method_mask(&r.methods), r.path.as_str()));
        for ((j, r), dup) in cap.routes.iter().enumerate().zip(dup_routes) {
            let rp = p.idx("routes", j);
            self.methods(&r.methods, &rp.at("methods"), false);
            if dup {
                self.err(
                    rp,
                    "duplicate route",
                    "remove the repeated [[capabilities.routes]] entry",
                );
            }
        }
        if cap.constraints.len() > MAX_CONSTRAINTS {
            self.err(
                p.at("constraints"),
                format!("more than {MAX_CONSTRAINTS} constraints"),
                "combine rules on the same field",
            );
        }
        for (j, c) in cap.constraints.iter().enumerate() {
            self.constraint(c, &p.idx("constraints", j));
        }
        if let Some(b) = &cap.budget {
            self.budget(b, &p.at("budget"), Some(total), total_currency);
        }
    }

    fn methods(&mut self, methods: &[Method], path: &Fp<'_>, may_be_empty: bool) {
        if methods.is_empty() && !may_be_empty {
            self.err(path, "no methods", "list the HTTP methods, e.g. [\"GET\"]");
        }
        let mut seen = 0u8;
        for m in methods {
            let bit = method_bit(*m);
            if seen & bit != 0 {
                self.err(
                    path,
                    format!("{} is listed twice", m.as_str()),
                    "list each method once",
                );
            }
            seen |= bit;
        }
    }

    pub(crate) fn constraint(&mut self, c: &Constraint, p: &Fp<'_>) {
        match (&c.query, &c.body) {
            (Some(q), None) => {
                if !is_text(q, 128) {
                    self.err(
                        p.at("query"),
                        "not a valid query parameter name",
                        "give the decoded parameter name",
                    );
                }
            }
            (None, Some(b)) => {
                if !is_json_pointer(b) {
                    self.err(
                        p.at("body"),
                        format!("`{}` is not a JSON pointer", b.escape_default()),
                        "write an RFC 6901 pointer such as \"/order/quantity\" (escape ~ as ~0 and / as ~1)",
                    );
                }
            }
            _ => self.err(
                p,
                "a constraint needs exactly one of `query` or `body`",
                "set `query = \"name\"` or `body = \"/json/pointer\"`",
            ),
        }
        if c.equals.is_none()
            && c.one_of.is_none()
            && c.min.is_none()
            && c.max.is_none()
            && c.max_length.is_none()
            && c.regex.is_none()
        {
            self.err(
                p,
                "the constraint has no rule",
                "add equals, one_of, min, max, max_length or regex",
            );
        }
        for (name, val) in [("min", c.min), ("max", c.max)] {
            if val.is_some_and(|v| !v.is_finite()) {
                self.err(
                    p.at(name),
                    "must be a finite number",
                    "write a plain number",
                );
            }
        }
        if let (Some(min), Some(max)) = (c.min, c.max)
            && min > max
        {
            self.err(
                p.at("min"),
                format!("min ({min}) is greater than max ({max})"),
                "swap them or fix one",
            );
        }
        if c.max_length.is_some_and(|m| m > 1 << 20) {
            self.err(p.at("max_length"), "absurdly large", "use at most 1048576");
        }
        let scalar_ok = |v: &serde_json::Value| {
            c.query.is_none()
                || matches!(
                    v,
                    serde_json::Value::String(_) | serde_json::Value::Number(_)
                )
        };
        if let Some(e) = &c.equals
            && !scalar_ok(e)
        {
            self.err(
                p.at("equals"),
                "a query parameter can only equal a string or a number",
                "write a string or number",
            );
        }
        if let Some(opts) = &c.one_of {
            if opts.is_empty() || opts.len() > MAX_ONE_OF {
                self.err(
                    p.at("one_of"),
                    format!("must list 1 to {MAX_ONE_OF} values"),
                    "list the allowed values",
                );
            }
            if !opts.iter().all(scalar_ok) {
                self.err(
                    p.at("one_of"),
                    "a query parameter can only equal strings or numbers",
                    "write strings or numbers",
                );
            }
            if let Some(e) = &c.equals
                && !opts.contains(e)
            {
                self.err(
                    p.at("equals"),
                    "equals is not among one_of: nothing could pass",
                    "drop one of the two rules",
                );
            }
        }
    }

    pub(crate) fn budget(
        &mut self,
        b: &Budget,
        p: &Fp<'_>,
        total: Option<Option<&Budget>>,
        total_currency: Option<&str>,
    ) {
        let capability_level = total.is_some();
        let limits = [
            ("requests", b.requests, MAX_REQUESTS),
            ("bytes_up", b.bytes_up, MAX_BYTES),
            ("bytes_down", b.bytes_down, MAX_BYTES),
            (
                "wall_clock_secs",
                b.wall_clock_secs,
                MAX_LIFETIME_SECS as u64,
            ),
        ];
        for (name, val, max) in limits {
            match val {
                Some(0) => self.err(
                    p.at(name),
                    "a limit of 0 allows nothing",
                    "remove what it limits instead, or give a positive limit",
                ),
                Some(v) if v > max => self.err(
                    p.at(name),
                    format!("{v} is absurdly large (at most {max})"),
                    "give a limit that fits the task",
                ),
                _ => {}
            }
        }
        if let Some(Some(t)) = total {
            let pairs = [
                ("requests", b.requests, t.requests),
                ("bytes_up", b.bytes_up, t.bytes_up),
                ("bytes_down", b.bytes_down, t.bytes_down),
                ("wall_clock_secs", b.wall_clock_secs, t.wall_clock_secs),
            ];
            for (name, mine, all) in pairs {
                if let (Some(m), Some(a)) = (mine, all)
                    && m > a
                {
                    self.err(
                        p.at(name),
                        format!("{m} exceeds the envelope's total budget.{name} ({a})"),
                        "lower it to at most the envelope total",
                    );
                }
            }
        }
        if let Some(s) = &b.spend {
            let sp = p.at("spend");
            if !is_currency(&s.currency) {
                self.err(
                    sp.at("currency"),
                    format!("`{}` is not a currency code", s.currency.escape_default()),
                    "use an uppercase code such as USD or USDT",
                );
            }
            match s.max {
                Some(m) if !m.is_finite() || m <= 0.0 || m > MAX_MONEY => self.err(
                    sp.at("max"),
                    format!("{m} is not a positive amount of at most {MAX_MONEY}"),
                    "give the most that may be spent",
                ),
                None if !capability_level => self.err(
                    sp.at("max"),
                    "the envelope's spend needs a max",
                    "give the total that may be spent",
                ),
                _ => {}
            }
            if capability_level {
                match &s.amount {
                    None => self.err(
                        sp.at("amount"),
                        "a capability's spend needs the amount's JSON pointer",
                        "e.g. amount = \"/quantity\", multiplier = \"/price\"",
                    ),
                    Some(a) if !is_json_pointer(a) => self.err(
                        sp.at("amount"),
                        "not a JSON pointer",
                        "write an RFC 6901 pointer such as \"/quantity\"",
                    ),
                    _ => {}
                }
                if s.multiplier.as_deref().is_some_and(|m| !is_json_pointer(m)) {
                    self.err(
                        sp.at("multiplier"),
                        "not a JSON pointer",
                        "write an RFC 6901 pointer such as \"/price\"",
                    );
                }
                if let Some(tc) = total_currency
                    && tc != s.currency
                {
                    self.err(
                        sp.at("currency"),
                        format!(
                            "spend in {} cannot count against the envelope's total in {tc}",
                            s.currency
                        ),
                        "use the envelope's currency",
                    );
                }
                if let (Some(m), Some(Some(t))) = (s.max, total)
                    && let Some(tm) = t.spend.as_ref().and_then(|ts| ts.max)
                    && m > tm
                {
                    self.err(
                        sp.at("max"),
                        format!("{m} exceeds the envelope's total spend ({tm})"),
                        "lower it to at most the envelope total",
                    );
                }
            } else if s.amount.is_some() || s.multiplier.is_some() {
                self.err(
                    sp,
                    "amount and multiplier belong on capability budgets; the envelope's spend is the total across them",
                    "move amount/multiplier to [capabilities.budget.spend]",
                );
            }
        }
    }

    fn pattern_common(
        &mut self,
        p: &Fp<'_>,
        methods: &[Method],
        has_other: bool,
        when: &[Constraint],
        reason: &str,
    ) {
        self.methods(methods, &p.at("methods"), true);
        if methods.is_empty() && !has_other && when.is_empty() {
            self.err(
                p,
                "matches every request",
                "narrow it with methods, host, path or when",
            );
        }
        if when.len() > MAX_CONSTRAINTS {
            self.err(
                p.at("when"),
                format!("more than {MAX_CONSTRAINTS} conditions"),
                "combine them",
            );
        }
        for (k, c) in when.iter().enumerate() {
            self.constraint(c, &p.idx("when", k));
        }
        if !is_text(reason, 512) {
            self.err(
                p.at("reason"),
                "needs a reason (1 to 512 bytes, one line)",
                "say why, for the audit log and the operator",
            );
        }
    }

    pub(crate) fn forbidden(&mut self, f: &ForbiddenEffect, p: &Fp<'_>) {
        self.pattern_common(
            p,
            &f.methods,
            f.host.is_some() || f.path.is_some(),
            &f.when,
            &f.reason,
        );
    }

    fn approval(&mut self, a: &Approval, p: &Fp<'_>) {
        self.pattern_common(
            p,
            &a.methods,
            a.host.is_some() || a.path.is_some(),
            &a.when,
            &a.reason,
        );
        if a.timeout_secs == 0 || a.timeout_secs > MAX_APPROVAL_TIMEOUT_SECS {
            self.err(
                p.at("timeout_secs"),
                format!("must be 1 to {MAX_APPROVAL_TIMEOUT_SECS} seconds"),
                "give how long a human has to answer before the request is denied",
            );
        }
    }

    fn window(&mut self, p: &str, w: u64) {
        if w == 0 || w > MAX_WINDOW_SECS {
            self.err(
                p,
                format!("must be 1 to {MAX_WINDOW_SECS} seconds"),
                "give the breaker's sliding window",
            );
        }
    }

    fn breakers(&mut self, b: &Breakers, total_currency: Option<&str>) {
        if let Some(d) = &b.denied {
            if d.count == 0 || d.count > 1_000_000 {
                self.err(
                    "breakers.denied.count",
                    "must be 1 to 1000000",
                    "give how many denials trip the circuit",
                );
            }
            self.window("breakers.denied.window_secs", d.window_secs);
        }
        if let Some(s) = &b.spend_velocity {
            if !is_currency(&s.currency) {
                self.err(
                    "breakers.spend_velocity.currency",
                    "not a currency code",
                    "use an uppercase code such as USD",
                );
            } else if total_currency.is_some_and(|t| t != s.currency) {
                self.err(
                    "breakers.spend_velocity.currency",
                    "differs from the envelope's spend currency",
                    "use the same currency as budget.spend",
                );
            }
            if !s.max.is_finite() || s.max <= 0.0 || s.max > MAX_MONEY {
                self.err(
                    "breakers.spend_velocity.max",
                    "must be a positive finite amount",
                    "give the most that may be spent per window",
                );
            }
            self.window("breakers.spend_velocity.window_secs", s.window_secs);
        }
        if let Some(u) = &b.upstream_errors {
            if !(u.rate > 0.0 && u.rate <= 1.0) {
                self.err(
                    "breakers.upstream_errors.rate",
                    format!("{} is not a fraction in (0, 1]", u.rate),
                    "e.g. 0.5 for half of the requests",
                );
            }
            if u.min_requests == 0 {
                self.err(
                    "breakers.upstream_errors.min_requests",
                    "must be at least 1",
                    "e.g. 10",
                );
            }
            self.window("breakers.upstream_errors.window_secs", u.window_secs);
        }
    }

    pub(crate) fn resources(&mut self, r: &ResourceLimits, p: &Fp<'_>) {
        let checks = [
            ("pids", r.pids, 1, 4_194_304),
            ("memory_bytes", r.memory_bytes, 1 << 20, MAX_BYTES),
            ("cpu_percent", r.cpu_percent, 1, 100_000),
        ];
        for (name, val, lo, hi) in checks {
            if let Some(v) = val
                && !(lo..=hi).contains(&v)
            {
                self.err(
                    p.at(name),
                    format!("{v} is outside {lo}..={hi}"),
                    "give a value in range",
                );
            }
        }
    }
}

/// 1-based line and column of a byte offset.
pub(crate) fn location_of(src: &str, offset: usize) -> Location {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    Location { line, column }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a TomlValue),
}

fn child_key<'a>(node: &Node<'a>, key: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
    let table = match *node {
        Node::Table(t) => t,
        Node::Item(Item::Table(t)) => t,
        Node::Item(Item::Value(TomlValue::InlineTable(t)))
        | Node::Value(TomlValue::InlineTable(t)) => {
            let (k, item) = t.get_key_value(key)?;
            return Some((k.span().or_else(|| item.span()), Node::Item(item)));
        }
        _ => return None,
    };
    let (k, item) = table.get_key_value(key)?;
    Some((k.span().or_else(|| item.span()), Node::Item(item)))
}

fn child_index<'a>(node: &Node<'a>, i: usize) -> Option<(Option<Range<usize>>, Node<'a>)> {
    match *node {
        Node::Item(Item::ArrayOfTables(a)) => {
            let t = a.get(i)?;
            Some((t.span(), Node::Table(t)))
        }
        Node::Item(Item::Value(TomlValue::Array(a))) | Node::Value(TomlValue::Array(a)) => {
            let v = a.get(i)?;
            Some((v.span(), Node::Value(v)))
        }
        _ => None,
    }
}

/// The source span of a field path such as `capabilities[2].routes[0].path`, or of its
/// nearest existing ancestor.
pub(crate) fn span_of(root: &Table, path: &str) -> Option<Range<usize>> {
    let mut node = Node::Table(root);
    let mut best = None;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        let Some((span, next)) = child_key(&node, key) else {
            break;
        };
        best = span.or(best);
        node = next;
        for idx in indices
            .split(']')
            .filter_map(|s| s.strip_prefix('['))
            .filter_map(|s| s.parse::<usize>().ok())
        {
            let Some((span, next)) = child_index(&node, idx) else {
                return best;
            };
            best = span.or(best);
            node = next;
        }
    }
    best
}

/// The deepest field path whose key or value contains `offset`.
pub(crate) fn path_at(root: &Table, offset: usize) -> Option<String> {
    fn contains(span: Option<Range<usize>>, offset: usize) -> bool {
        span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
    }
    fn walk(node: &Node<'_>, offset: usize, prefix: &str, best: &mut Option<String>) {
        let join = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            }
        };
        let entries: Vec<(String, Option<Range<usize>>, Node<'_>)> = match *node {
            Node::Table(t) | Node::Item(Item::Table(t)) => t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    let span = key.span().zip(item.span()).map(|(a, b)| a.start..b.end);
                    Some((join(k), span.or(key.span()), Node::Item(item)))
                })
                .collect(),
            Node::Item(Item::Value(TomlValue::InlineTable(t)))
            | Node::Value(TomlValue::InlineTable(t)) => t
                .iter()
                .filter_map(|(k, _)| {
                    let (key, item) = t.get_key_value(k)?;
                    let span = key.span().zip(item.span()).map(|(a, b)| a.start..b.end);
                    Some((join(k), span.or(key.span()), Node::Item(item)))
                })
                .collect(),
            Node::Item(Item::ArrayOfTables(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("{prefix}[{i}]"), t.span(), Node::Table(t)))
                .collect(),
            Node::Item(Item::Value(TomlValue::Array(a))) | Node::Value(TomlValue::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{prefix}[{i}]"), v.span(), Node::Value(v)))
                .collect(),
            _ => Vec::new(),
        };
        for (path, span, child) in entries {
            if contains(span, offset) && best.as_ref().is_none_or(|b| path.len() >= b.len()) {
                *best = Some(path.clone());
            }
            walk(&child, offset, &path, best);
        }
    }
    let mut best = None;
    walk(&Node::Table(root), offset, "", &mut best);
    best
}
