//! Pure matching helpers shared by validation and the gateway: path and host patterns,
//! anchored regexes, and constraint evaluation against a request.
//!
//! Every helper here fails closed: input it cannot judge (an unnormalized path, a body that
//! is not JSON, a field of the wrong type) never counts as "allowed", and counts as
//! "matching" when the question is whether a forbidden effect applies.
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, OnceLock},
};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::{
    model::{Approval, Capability, Constraint, ForbiddenEffect, Method, Spend},
    text::Text,
};

/// Longest regex source accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 512;
/// Compiled-program budget per regex; stops patterns like `(a{100}){100}` from costing
/// megabytes per Envelope.
const REGEX_SIZE_LIMIT: usize = 64 * 1024;
const MAX_PATTERN_LEN: usize = 1024;

/// True if `path` is in the normalized form the matchers expect: it starts with `/`, has
/// no query or fragment, no percent-escapes, backslashes, whitespace or control
/// characters, no `.`/`..` segments and no empty segments (a single trailing `/` is
/// allowed). The gateway decodes and normalizes before matching and refuses what it cannot
/// normalize; the matchers treat anything else as unmatchable.
pub fn is_normalized_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    // Every request runs this once per pattern: ASCII paths (nearly all) are judged byte
    // by byte, which for ASCII is exactly what the char tests below say.
    let refused = if path.is_ascii() {
        path.bytes().any(|b| {
            matches!(b, b'?' | b'#' | b'%' | b'\\')
                || b.is_ascii_whitespace()
                || b.is_ascii_control()
        })
    } else {
        path.chars()
            .any(|c| matches!(c, '?' | '#' | '%' | '\\') || c.is_whitespace() || c.is_control())
    };
    if refused {
        return false;
    }
    if rest.is_empty() {
        return true;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.as_bytes()
        .split(|&b| b == b'/')
        .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..")
}

/// One segment of a parsed path pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg<'a> {
    Literal(&'a str),
    /// `*`: exactly one non-empty segment.
    One,
    /// `**`: zero or more segments, only last.
    Rest,
}

/// True for the bytes a literal segment may always contain; anything else goes through
/// the character-by-character checks in [`PathPattern::parse_owned`].
fn is_plain_path_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'*' | b'%' | b'?' | b'#' | b'\\' | b'/')
}

/// A path pattern: `/`-separated segments, each a literal, `*` (exactly one non-empty
/// segment) or, as the last segment only, `**` (zero or more segments). Literals are
/// case-sensitive and may not contain `*`, `%`, `?`, `#`, `\`, whitespace, or be `.`/`..`.
/// A trailing `/` in a path is an empty segment that only `**` matches.
///
/// Only the source is kept: segments are read off it while matching, which costs no more
/// than walking a parsed list and saves an allocation per pattern in every Envelope.
#[derive(Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: Text,
}

impl PathPattern {
    pub fn parse(source: &str) -> Result<PathPattern, String> {
        Self::parse_owned(Text::new(source))
    }

    /// True if `source` is a valid pattern made of plain ASCII, decided in one pass over
    /// its bytes. False says nothing: the full checks decide, and word the error.
    fn plainly_valid(source: &str) -> bool {
        let Some(rest) = source.as_bytes().strip_prefix(b"/") else {
            return false;
        };
        if rest.is_empty() {
            return true;
        }
        let mut parts = rest.split(|&b| b == b'/').peekable();
        while let Some(part) = parts.next() {
            let ok = match part {
                b"*" => true,
                b"**" => parts.peek().is_none(),
                b"" | b"." | b".." => false,
                lit => lit.iter().all(|&b| is_plain_path_byte(b)),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    fn parse_owned(source: Text) -> Result<PathPattern, String> {
        if source.len() > MAX_PATTERN_LEN {
            return Err(format!("path pattern longer than {MAX_PATTERN_LEN} bytes"));
        }
        if !Self::plainly_valid(&source) {
            Self::check(&source)?;
        }
        Ok(PathPattern { source })
    }

    /// Every rule a pattern must follow, with the first one broken as the error.
    fn check(source: &str) -> Result<(), String> {
        let Some(rest) = source.strip_prefix('/') else {
            return Err(format!("path pattern `{source}` must start with `/`"));
        };
        if !rest.is_empty() {
            let last = rest.bytes().filter(|&b| b == b'/').count();
            for (i, part) in rest.split('/').enumerate() {
                match part {
                    "" => {
                        return Err(format!(
                            "path pattern `{source}` has an empty segment (`//` or a trailing `/`); remove it or use `/**`"
                        ));
                    }
                    "." | ".." => {
                        return Err(format!(
                            "path pattern `{source}` has a `{part}` segment; patterns match normalized paths, write the resolved path"
                        ));
                    }
                    "*" => {}
                    "**" if i == last => {}
                    "**" => {
                        return Err(format!(
                            "path pattern `{source}`: `**` is only allowed as the last segment"
                        ));
                    }
                    lit => {
                        if let Some(bad) = lit.chars().find(|&c| {
                            matches!(c, '*' | '%' | '?' | '#' | '\\')
                                || c.is_whitespace()
                                || c.is_control()
                        }) {
                            return Err(format!(
                                "path pattern `{source}`: segment `{lit}` contains `{}`; segments are literal text, `*` or a final `**` (no partial wildcards, no percent-escapes)",
                                bad.escape_default()
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The segments of a pattern that parsed; `/` alone has none.
    fn segs(&self) -> impl Iterator<Item = Seg<'_>> {
        let rest = self.source.get(1..).unwrap_or_default();
        let parts = (!rest.is_empty()).then(|| rest.split('/'));
        parts.into_iter().flatten().map(|part| match part {
            "*" => Seg::One,
            // Parsing only lets `**` through as the last segment.
            "**" => Seg::Rest,
            lit => Seg::Literal(lit),
        })
    }

    /// Whether a normalized path matches. Unnormalized paths never match.
    pub fn matches(&self, path: &str) -> bool {
        is_normalized_path(path) && self.matches_normalized(path)
    }

    /// [`matches`](Self::matches) for a path already known to be normalized.
    fn matches_normalized(&self, path: &str) -> bool {
        self.matches_segments(path, <[u8]>::eq)
    }

    /// Like [`matches_normalized`](Self::matches_normalized), but loosened the ways servers
    /// loosen routing: literal segments match without regard to ASCII case (`/API/Withdraw`
    /// is routed as `/api/withdraw` by some), and a trailing `/` is ignored (`/withdraw/` is
    /// routed as `/withdraw` by many). For rules that refuse or hold, which must not be
    /// dodged by spelling; patterns themselves never end in `/`.
    fn matches_normalized_loosely(&self, path: &str) -> bool {
        let path = match path.strip_suffix('/') {
            Some(trimmed) if !trimmed.is_empty() => trimmed,
            _ => path,
        };
        self.matches_segments(path, <[u8]>::eq_ignore_ascii_case)
    }

    fn matches_segments(&self, path: &str, same: fn(&[u8], &[u8]) -> bool) -> bool {
        let rest = path.as_bytes().get(1..).unwrap_or_default();
        // A trailing slash leaves an empty last segment, so `/a` and `/a/` differ. Split
        // on the byte: `/` never occurs inside a multi-byte UTF-8 sequence.
        let mut parts = (!rest.is_empty()).then(|| rest.split(|&b| b == b'/'));
        let mut next = || parts.as_mut().and_then(Iterator::next);
        for seg in self.segs() {
            match seg {
                Seg::Rest => return true,
                Seg::One => match next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Literal(lit) => {
                    if !next().is_some_and(|p| same(p, lit.as_bytes())) {
                        return false;
                    }
                }
            }
        }
        next().is_none()
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PathPattern({:?})", self.source)
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for PathPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for PathPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Text::deserialize(d)?;
        PathPattern::parse_owned(s).map_err(serde::de::Error::custom)
    }
}

/// True for a lowercase DNS name as [`check_host`] accepts it, checked byte by byte.
fn is_dns_name(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.as_bytes().split(|&c| c == b'.').all(|b| {
            (1..=63).contains(&b.len())
                && b.iter()
                    .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && b.first() != Some(&b'-')
                && b.last() != Some(&b'-')
        })
}

/// Checks an exact host: a lowercase DNS name or an IP literal (IPv6 without brackets).
///
/// Hosts are compared as text, so each address has one spelling only: resolvers read
/// `2852039166`, `0251.0376.0251.0376` and `0xa9.0xfe.0xa9.0xfe` as 169.254.169.254, and
/// `::ffff:169.254.169.254` reaches it too, each of which would slip past a floor rule
/// naming it. Such names are refused (top-level domains never start with a digit), and
/// IPv6 literals must be in canonical form and not carry an IPv4 address.
pub fn check_host(host: &str) -> Result<(), String> {
    // Names are the common case and far cheaper to check than parsing an address.
    if is_dns_name(host) {
        // Dotted-decimal IPv4 passes the name rules too; nothing else numeric may.
        return check_not_numeric(host)
            .or_else(|e| host.parse::<std::net::Ipv4Addr>().map(drop).map_err(|_| e));
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => Ok(()),
        Ok(std::net::IpAddr::V6(v6)) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Err(format!(
                    "host `{host}` is an IPv4 address in IPv6 form; write `{v4}`"
                ));
            }
            let canonical = v6.to_string();
            if canonical != host {
                return Err(format!(
                    "host `{host}` is not written the one way IPv6 addresses are compared; write `{canonical}`"
                ));
            }
            Ok(())
        }
        Err(_) => check_dns_name(host).and_then(|()| check_not_numeric(host)),
    }
}

fn check_not_numeric(host: &str) -> Result<(), String> {
    let last = host.rsplit('.').next().unwrap_or(host);
    if last.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return Err(format!(
            "host `{host}` reads as a numeric address to resolvers; write an IPv4 address in dotted decimal (like `192.0.2.7`) or a DNS name"
        ));
    }
    Ok(())
}

/// The DNS name rules of [`check_host`], with the first one broken as the error.
fn check_dns_name(host: &str) -> Result<(), String> {
    if host.is_empty() || host.len() > 253 {
        return Err(format!(
            "host `{host}` must be 1 to 253 characters (a DNS name or IP address, no scheme, port or path)"
        ));
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "host `{host}` has an empty or over-long label; write a DNS name like `api.example.com` (no trailing dot)"
            ));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!(
                "host `{host}` is not a lowercase DNS name; use only a-z, 0-9 and inner `-` (no scheme, port, path or uppercase)"
            ));
        }
    }
    Ok(())
}

/// A host pattern: an exact host, or `*.example.com` for any name strictly below
/// `example.com` (not the apex itself). Compared case-insensitively, ignoring one trailing
/// dot on the request's host.
#[derive(Clone, PartialEq, Eq)]
pub struct HostPattern {
    source: Text,
}

impl HostPattern {
    pub fn parse(source: &str) -> Result<HostPattern, String> {
        let exact = source.strip_prefix("*.").unwrap_or(source);
        check_host(exact)?;
        Ok(HostPattern {
            source: Text::new(source),
        })
    }
    pub fn as_str(&self) -> &str {
        &self.source
    }
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        match self.source.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => host == self.source,
        }
    }
}

impl fmt::Debug for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPattern({:?})", self.source)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Text::deserialize(d)?;
        HostPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A regex that must match the *whole* value (it is compiled as `^(?:…)$`, so an
/// unanchored pattern cannot accidentally accept a value that merely contains a match).
/// Compiled when parsed, with a bounded program size.
#[derive(Clone)]
pub struct RegexRule {
    source: Text,
    /// Shared with the cache: cloning a `Regex` builds a fresh matching-state pool, which
    /// cost more than the lookup it follows.
    regex: Arc<Regex>,
}

impl RegexRule {
    pub fn parse(source: &str) -> Result<RegexRule, String> {
        Self::parse_owned(Text::new(source))
    }

    fn parse_owned(source: Text) -> Result<RegexRule, String> {
        if source.len() > MAX_REGEX_LEN {
            return Err(format!(
                "regex longer than {MAX_REGEX_LEN} bytes; simplify it or use one_of"
            ));
        }
        // Issuers reuse the same few patterns across envelopes and renewals; compiling is
        // by far the most expensive step of verification, so compiled programs are shared
        // process-wide (bounded). Failures are never cached.
        static CACHE: OnceLock<Mutex<HashMap<String, Arc<Regex>>>> = OnceLock::new();
        const CACHE_ENTRIES: usize = 4096;
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(regex) = cache
            .lock()
            .ok()
            .and_then(|c| c.get(source.as_str()).cloned())
        {
            return Ok(RegexRule { source, regex });
        }
        let regex = RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                format!("invalid regex `{source}`: {e}; fix the syntax or reduce repetition counts")
            })?;
        let regex = Arc::new(regex);
        if let Ok(mut c) = cache.lock() {
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(source.to_string(), regex.clone());
        }
        Ok(RegexRule { source, regex })
    }
    pub fn as_str(&self) -> &str {
        &self.source
    }
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl PartialEq for RegexRule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for RegexRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegexRule({:?})", self.source)
    }
}

impl Serialize for RegexRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for RegexRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Text::deserialize(d)?;
        RegexRule::parse_owned(s).map_err(serde::de::Error::custom)
    }
}

/// A request body as the gateway saw it.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// No body at all.
    Absent,
    /// A body that parsed as JSON.
    Json(&'a Value),
    /// A body that is not JSON, repeats a key in one of its objects (parsers disagree on
    /// which one counts), or is larger than the gateway inspects: it cannot be judged.
    Opaque,
}

/// The parts of a request the Envelope's rules look at. `path` must be normalized;
/// `query` holds decoded name/value pairs in order (repeated names stay repeated).
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub body: Body<'a>,
}

/// The result of evaluating one constraint.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Satisfied,
    /// The parameter or field is not there.
    Absent,
    /// It is there and breaks a rule.
    Violated(String),
    /// It cannot be judged (wrong type, repeated parameter, body not JSON).
    Indeterminate(String),
}

/// Parses a JSON number or a plain decimal string (`"0.25"`, `"-3"`, `"1e3"`) into a finite
/// f64. Stricter than `str::parse`: no `inf`, `NaN`, `+`, hex or whitespace.
pub fn numeric(v: &Value) -> Option<f64> {
    let n = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => parse_decimal(s)?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

fn parse_decimal(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse().ok().filter(|n: &f64| n.is_finite())
}

/// The exact value of an integer written without fraction or exponent.
fn exact_integer(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        _ => None,
    }
}

/// Numeric equality that never lets two different integers meet as the same `f64` (ids
/// beyond 2^53 do): integers compare exactly; an integer too large for an `f64` against a
/// number with a fraction cannot be judged.
fn numbers_equal(expected: &Value, actual: &Value) -> Result<bool, String> {
    const EXACT_IN_F64: i128 = 1 << 53;
    let (e, a) = (exact_integer(expected), exact_integer(actual));
    if let (Some(e), Some(a)) = (e, a) {
        return Ok(e == a);
    }
    if [e, a].into_iter().flatten().any(|n| n.abs() > EXACT_IN_F64) {
        return Err("an integer beyond 2^53 cannot be compared exactly with a fraction".into());
    }
    match (numeric(expected), numeric(actual)) {
        (Some(e), Some(a)) => Ok(e == a),
        _ => Err("value is not a number".to_owned()),
    }
}

fn values_equal(expected: &Value, actual: &Value, from_query: bool) -> Result<bool, String> {
    match (expected, actual) {
        (Value::Number(_), _) if from_query => match numeric(actual) {
            Some(_) => numbers_equal(expected, actual),
            None => Err("query value is not a number".to_owned()),
        },
        (Value::String(e), Value::String(a)) => Ok(e == a),
        (Value::Number(_), Value::Number(_)) => numbers_equal(expected, actual),
        _ if from_query => {
            Err("query values are text; compare them with strings or numbers".into())
        }
        _ => Ok(expected == actual),
    }
}

/// [`Constraint::target`], formatted where it is used.
struct ConstraintTarget<'a>(&'a Constraint);

impl fmt::Display for ConstraintTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.0.query, &self.0.body) {
            (Some(q), _) => write!(f, "query parameter `{q}`"),
            (None, Some(p)) => write!(f, "body field `{p}`"),
            (None, None) => f.write_str("nothing"),
        }
    }
}

impl Constraint {
    /// Human-readable name of the thing constrained: `query parameter \`symbol\`` or
    /// `body field \`/qty\``.
    pub fn target(&self) -> String {
        ConstraintTarget(self).to_string()
    }

    pub fn evaluate(&self, query: &[(String, String)], body: Body<'_>) -> Outcome {
        let text;
        let (value, from_query): (&Value, bool) = match (&self.query, &self.body) {
            (Some(name), _) => {
                let mut hits = query.iter().filter(|(k, _)| k == name);
                let Some((_, v)) = hits.next() else {
                    return Outcome::Absent;
                };
                if hits.next().is_some() {
                    return Outcome::Indeterminate(format!("query parameter `{name}` is repeated"));
                }
                text = Value::String(v.clone());
                (&text, true)
            }
            (None, Some(pointer)) => match body {
                Body::Absent => return Outcome::Absent,
                Body::Opaque => {
                    return Outcome::Indeterminate(
                        "the body is not JSON, repeats a key, or is too large to inspect"
                            .to_owned(),
                    );
                }
                Body::Json(doc) => match doc.pointer(pointer) {
                    Some(v) => (v, false),
                    None => return Outcome::Absent,
                },
            },
            (None, None) => return Outcome::Indeterminate("constraint has no target".into()),
        };
        // Written out only into a message: a request that passes pays for no text.
        let what = ConstraintTarget(self);
        if let Some(expected) = &self.equals {
            match values_equal(expected, value, from_query) {
                Ok(true) => {}
                Ok(false) => return Outcome::Violated(format!("{what} must equal {expected}")),
                Err(e) => return Outcome::Indeterminate(format!("{what}: {e}")),
            }
        }
        if let Some(options) = &self.one_of {
            let mut any = false;
            for o in options {
                match values_equal(o, value, from_query) {
                    Ok(true) => {
                        any = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => return Outcome::Indeterminate(format!("{what}: {e}")),
                }
            }
            if !any {
                return Outcome::Violated(format!("{what} is not one of the allowed values"));
            }
        }
        if self.min.is_some() || self.max.is_some() {
            let Some(n) = numeric(value) else {
                return Outcome::Indeterminate(format!("{what} is not a number"));
            };
            if let Some(min) = self.min
                && n < min
            {
                return Outcome::Violated(format!("{what} is {n}, below the minimum {min}"));
            }
            if let Some(max) = self.max
                && n > max
            {
                return Outcome::Violated(format!("{what} is {n}, above the maximum {max}"));
            }
        }
        if self.max_length.is_some() || self.regex.is_some() {
            let Value::String(s) = value else {
                return Outcome::Indeterminate(format!("{what} is not a string"));
            };
            if let Some(max) = self.max_length
                && s.chars().count() as u64 > max
            {
                return Outcome::Violated(format!("{what} is longer than {max} characters"));
            }
            if let Some(re) = &self.regex
                && !re.is_match(s)
            {
                return Outcome::Violated(format!("{what} does not match `{}`", re.as_str()));
            }
        }
        Outcome::Satisfied
    }

    /// For capabilities: passes only if the rules hold (or the field is absent and the
    /// constraint is `optional`). The error says why.
    pub fn check(&self, query: &[(String, String)], body: Body<'_>) -> Result<(), String> {
        match self.evaluate(query, body) {
            Outcome::Satisfied => Ok(()),
            Outcome::Absent if self.optional => Ok(()),
            Outcome::Absent => Err(format!("{} is missing", self.target())),
            Outcome::Violated(r) | Outcome::Indeterminate(r) => Err(r),
        }
    }

    /// For forbidden effects and approvals: the condition holds when the rules hold *or*
    /// cannot be judged; an absent field does not hold.
    pub fn holds_or_unknown(&self, query: &[(String, String)], body: Body<'_>) -> bool {
        matches!(
            self.evaluate(query, body),
            Outcome::Satisfied | Outcome::Indeterminate(_)
        )
    }
}

/// `path_normalized` is [`is_normalized_path`] of `req.path`, judged once by callers that
/// try many rules against one request.
fn pattern_matches(
    methods: &[Method],
    host: Option<&HostPattern>,
    path: Option<&PathPattern>,
    when: &[Constraint],
    req: &RequestView<'_>,
    path_normalized: bool,
) -> bool {
    if !methods.is_empty() && !Method::parse(req.method).is_some_and(|m| methods.contains(&m)) {
        return false;
    }
    if host.is_some_and(|h| !h.matches(req.host)) {
        return false;
    }
    if let Some(p) = path {
        // A path we cannot judge counts as matching, and neither case nor a trailing slash
        // counts: forbidden effects and approvals must not be dodged with an odd spelling.
        if path_normalized && !p.matches_normalized_loosely(req.path) {
            return false;
        }
    }
    when.iter().all(|c| c.holds_or_unknown(req.query, req.body))
}

impl ForbiddenEffect {
    /// True if the request is (or may be) this forbidden effect.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches_judged(req, is_normalized_path(req.path))
    }

    /// [`matches`](Self::matches), given [`is_normalized_path`] of `req.path`.
    pub fn matches_judged(&self, req: &RequestView<'_>, path_normalized: bool) -> bool {
        pattern_matches(
            &self.methods,
            self.host.as_ref(),
            self.path.as_ref(),
            &self.when,
            req,
            path_normalized,
        )
    }
}

impl Approval {
    /// True if the request must wait for a human.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches_judged(req, is_normalized_path(req.path))
    }

    /// [`matches`](Self::matches), given [`is_normalized_path`] of `req.path`.
    pub fn matches_judged(&self, req: &RequestView<'_>, path_normalized: bool) -> bool {
        pattern_matches(
            &self.methods,
            self.host.as_ref(),
            self.path.as_ref(),
            &self.when,
            req,
            path_normalized,
        )
    }
}

impl Capability {
    /// Whether this capability's upstream is `host:port` (host compared case-insensitively).
    pub fn serves(&self, host: &str, port: u16) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        host.eq_ignore_ascii_case(&self.upstream.host) && port == self.upstream.port()
    }

    /// Whether the request fits one of the routes and every constraint. Does not look at
    /// forbidden effects, approvals or budgets, which the gateway checks around it.
    pub fn check(&self, req: &RequestView<'_>) -> Result<(), String> {
        self.check_judged(req, is_normalized_path(req.path))
    }

    /// [`check`](Self::check), given [`is_normalized_path`] of `req.path`.
    pub fn check_judged(&self, req: &RequestView<'_>, path_normalized: bool) -> Result<(), String> {
        // The path's form and the method are judged once, not once per route.
        let fits = path_normalized
            && Method::parse(req.method).is_some_and(|m| {
                self.routes
                    .iter()
                    .any(|r| r.methods.contains(&m) && r.path.matches_normalized(req.path))
            });
        if !fits {
            return Err(format!(
                "{} {} is not a route of capability `{}`",
                req.method, req.path, self.name
            ));
        }
        for c in &self.constraints {
            c.check(req.query, req.body)
                .map_err(|r| format!("capability `{}`: {r}", self.name))?;
        }
        Ok(())
    }
}

impl Spend {
    /// The cost of a request: `amount × multiplier` read from the body. Anything that is
    /// not a finite non-negative number is an error (the gateway refuses the request).
    pub fn cost(&self, body: Body<'_>) -> Result<f64, String> {
        let Some(amount) = &self.amount else {
            return Err("this spend has no amount pointer".into());
        };
        let Body::Json(doc) = body else {
            return Err("the body is needed to compute spend but is absent or not JSON".into());
        };
        let read = |ptr: &str| -> Result<f64, String> {
            let v = doc
                .pointer(ptr)
                .ok_or_else(|| format!("spend field `{ptr}` is missing"))?;
            let n = numeric(v).ok_or_else(|| format!("spend field `{ptr}` is not a number"))?;
            if n < 0.0 {
                return Err(format!("spend field `{ptr}` is negative"));
            }
            Ok(n)
        };
        let mut total = read(amount)?;
        if let Some(m) = &self.multiplier {
            total *= read(m)?;
        }
        if !total.is_finite() {
            return Err("spend is not a finite number".into());
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Matching as it was done over a parsed segment list, kept as the reference.
    fn reference_matches(pattern: &str, path: &str) -> bool {
        if !is_normalized_path(path) {
            return false;
        }
        let split = |s: &str| -> Vec<String> {
            if s.is_empty() {
                Vec::new()
            } else {
                s.split('/').map(str::to_owned).collect()
            }
        };
        let segs = split(&pattern[1..]);
        let parts = split(&path[1..]);
        let mut i = 0;
        for seg in &segs {
            match seg.as_str() {
                "**" => return true,
                "*" => match parts.get(i) {
                    Some(p) if !p.is_empty() => i += 1,
                    _ => return false,
                },
                lit => match parts.get(i) {
                    Some(p) if p == lit => i += 1,
                    _ => return false,
                },
            }
        }
        i == parts.len()
    }

    #[test]
    fn each_address_has_one_spelling() {
        for ok in [
            "api.example.com",
            "192.0.2.7",
            "169.254.169.254",
            "2001:db8::1",
            "::1",
            "x1.example",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "2852039166",
            "0251.0376.0251.0376",
            "0xa9.0xfe.0xa9.0xfe",
            "169.254.43518",
            "example.123",
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "2001:0db8::1",
            "2001:db8:0:0::1",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn large_integers_are_compared_exactly_never_as_the_same_f64() {
        use serde_json::json;
        let id = json!(9_007_199_254_740_993_u64);
        // Both round to 9007199254740992.0.
        assert_eq!(
            values_equal(&id, &json!(9_007_199_254_740_992_u64), false),
            Ok(false)
        );
        assert_eq!(
            values_equal(&id, &json!(9_007_199_254_740_993_u64), false),
            Ok(true)
        );
        assert_eq!(
            values_equal(&id, &json!("9007199254740992"), true),
            Ok(false)
        );
        assert_eq!(
            values_equal(&id, &json!("9007199254740993"), true),
            Ok(true)
        );
        // A fraction next to an integer an f64 cannot hold is not judged either way.
        assert!(values_equal(&id, &json!(9_007_199_254_740_992.0_f64), false).is_err());
        assert!(values_equal(&id, &json!("9007199254740993.0"), true).is_err());
        // Small numbers still compare by value, whatever their spelling.
        assert_eq!(values_equal(&json!(2), &json!(2.0), false), Ok(true));
        assert_eq!(values_equal(&json!(2), &json!("2.00"), true), Ok(true));
        assert_eq!(values_equal(&json!(-3), &json!("-3"), true), Ok(true));
        assert_eq!(values_equal(&json!(0.5), &json!("0.50"), true), Ok(true));
        assert_eq!(values_equal(&json!(2), &json!(3), false), Ok(false));
    }

    proptest! {
        #[test]
        fn plain_patterns_pass_the_full_checks(s in "/?([a-c.*%? ~\\\\\t\u{e9}\u{85}]{0,3}/?){0,4}") {
            if PathPattern::plainly_valid(&s) {
                prop_assert!(PathPattern::check(&s).is_ok(), "{s:?}");
            }
        }

        #[test]
        fn dns_names_agree_with_the_full_checks(s in "[a-cA.\\-0-9\u{e9}:]{0,12}") {
            prop_assert_eq!(is_dns_name(&s), check_dns_name(&s).is_ok(), "{:?}", s);
        }

        #[test]
        fn matching_agrees_with_the_reference(
            pattern in "(/(a|b|\\*|\\*\\*)){0,4}",
            path in "/((a|b|c|)(/|)){0,5}",
        ) {
            let pattern = if pattern.is_empty() { "/".to_owned() } else { pattern };
            if let Ok(p) = PathPattern::parse(&pattern) {
                prop_assert_eq!(p.matches(&path), reference_matches(&pattern, &path), "{} {}", pattern, path);
            }
        }
    }
}

#[cfg(test)]
mod ascii_fast_path {
    use super::is_normalized_path;

    /// The byte-wise test for ASCII paths must say what the char-wise test says.
    #[test]
    fn agrees_with_the_char_tests_for_every_ascii_byte() {
        for b in 0u8..128 {
            let c = char::from(b);
            let path = format!("/a{c}b");
            let by_chars =
                !(matches!(c, '?' | '#' | '%' | '\\') || c.is_whitespace() || c.is_control())
                    && c != '/';
            // A `/` makes two segments, which is normalized too.
            let expected = by_chars || c == '/';
            assert_eq!(is_normalized_path(&path), expected, "byte {b:#04x}");
        }
    }
}
