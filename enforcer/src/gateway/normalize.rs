//! Step 1 of every decision: parse the request strictly and reduce it to one unambiguous
//! form. Policy is matched against this form and exactly this form is forwarded, so the
//! upstream can never see a request other than the one that was checked.
use std::{borrow::Cow, fmt};

use http::{HeaderMap, Method, header};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Characters re-encoded in a forwarded path segment: everything but unreserved and the
/// sub-delimiters RFC 3986 allows in a segment, less `;`. Servers in the Servlet tradition
/// cut `;params` off a segment before routing, so `/withdraw;x=1/all` would reach their
/// `/withdraw/all` while the rules here judged a segment named `withdraw;x=1`. Encoded,
/// the upstream sees the one segment the rules saw.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b';')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Characters re-encoded in a forwarded query key or value.
const QUERY: &AsciiSet = &SEGMENT.add(b'&').add(b'=').add(b'+');

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused before any policy was consulted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error(
        "the method {0:?} is not an upper-case token; methods are case-sensitive and only upper-case ones are accepted"
    )]
    Method(String),
    #[error("the request target must be an absolute http:// URI (use the gateway as HTTP_PROXY)")]
    NotAbsolute,
    #[error("the request target has user information, which is never accepted")]
    UserInfo,
    #[error("the request target has no host")]
    NoHost,
    #[error("the host {0:?} is not a valid host name or address")]
    BadHost(String),
    #[error("the path must start with '/'")]
    BadPath,
    #[error("the path has an invalid percent-encoding")]
    BadPercent,
    #[error(
        "the path encodes a separator, a backslash or a NUL byte, which could be read two ways"
    )]
    EncodedSeparator,
    #[error("the path or query is not valid UTF-8 after decoding")]
    NotUtf8,
    #[error("the query has the parameter {0:?} more than once, which upstreams read differently")]
    DuplicateParameter(String),
    #[error("the request has {0} Host headers")]
    DuplicateHost(usize),
    #[error("the Host header {header:?} does not name the target {target:?}")]
    HostMismatch { header: String, target: String },
    #[error("the request has both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    #[error("the request has a header value with control characters")]
    BadHeaderValue,
    #[error(
        "the request asks to be run as another method ({0}), which many servers honor; the \
         method the rules judge must be the one that runs, so send it as that method"
    )]
    MethodOverride(String),
}

/// Headers and a query parameter frameworks read to run a request as another method
/// (Rails, Laravel, Express, Google APIs, …): a POST the rules allowed would run as the
/// DELETE they forbid.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];
const METHOD_OVERRIDE_PARAMETER: &str = "_method";

/// A request reduced to what policy matches on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    /// Lower case, without a trailing dot; IPv6 addresses without brackets.
    pub host: String,
    pub port: u16,
    /// Percent-decoded, dot segments resolved, empty segments removed.
    pub path: String,
    /// Decoded query parameters, in order; each key at most once.
    pub query: Vec<(String, String)>,
}

impl Target {
    /// The path and query as they are forwarded: re-encoded from the normalized form.
    pub fn origin_form(&self) -> String {
        let mut out = String::with_capacity(self.path.len() + 16);
        let trailing = self.path.len() > 1 && self.path.ends_with('/');
        for segment in self.path.split('/').filter(|s| !s.is_empty()) {
            out.push('/');
            out.extend(utf8_percent_encode(segment, SEGMENT));
        }
        if out.is_empty() || trailing {
            out.push('/');
        }
        for (i, (key, value)) in self.query.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.extend(utf8_percent_encode(key, QUERY));
            out.push('=');
            out.extend(utf8_percent_encode(value, QUERY));
        }
        out
    }

    /// `host:port` as it goes into a Host header (brackets around IPv6, port only when not
    /// the scheme's default).
    pub fn authority(&self) -> String {
        let mut out = String::with_capacity(self.host.len() + 8);
        self.push_authority(&mut out);
        out
    }

    /// Appends [`authority`](Self::authority) to `out`.
    pub fn push_authority(&self, out: &mut String) {
        let bracketed = self.host.contains(':');
        if bracketed {
            out.push('[');
        }
        out.push_str(&self.host);
        if bracketed {
            out.push(']');
        }
        if self.port != self.scheme.default_port() {
            out.push(':');
            out.push_str(itoa::Buffer::new().format(self.port));
        }
    }

    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Checks the method: upper-case token characters only.
pub fn method(method: &Method) -> Result<(), Malformed> {
    let m = method.as_str();
    if !m.is_empty()
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(Malformed::Method(m.to_owned()))
    }
}

/// Checks the headers that could make the request mean two things.
pub fn headers(headers: &HeaderMap) -> Result<(), Malformed> {
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(Malformed::DuplicateHost(hosts));
    }
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(Malformed::LengthAndEncoding);
    }
    if let Some(name) = METHOD_OVERRIDE_HEADERS
        .iter()
        .find(|name| headers.contains_key(**name))
    {
        return Err(Malformed::MethodOverride(format!("header {name}")));
    }
    for value in headers.values() {
        if value
            .as_bytes()
            .iter()
            .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(Malformed::BadHeaderValue);
        }
    }
    Ok(())
}

/// Refuses an url-encoded form body that names another method in a `_method` field.
pub fn form_body(headers: &HeaderMap, body: &[u8]) -> Result<(), Malformed> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Ok(());
    }
    let overrides = body.split(|&b| b == b'&').any(|pair| {
        let key = pair.split(|&b| b == b'=').next().unwrap_or_default();
        let key = String::from_utf8_lossy(key).replace('+', " ");
        percent_decode_str(&key)
            .decode_utf8_lossy()
            .eq_ignore_ascii_case(METHOD_OVERRIDE_PARAMETER)
    });
    if overrides {
        return Err(Malformed::MethodOverride(format!(
            "form field {METHOD_OVERRIDE_PARAMETER}"
        )));
    }
    Ok(())
}

/// Parses an absolute-form target (`http://host[:port]/path?query`) as sent to a proxy.
pub fn absolute(uri: &http::Uri, host_header: Option<&str>) -> Result<Target, Malformed> {
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        _ => return Err(Malformed::NotAbsolute),
    };
    let authority = uri.authority().ok_or(Malformed::NoHost)?;
    if authority.as_str().contains('@') {
        return Err(Malformed::UserInfo);
    }
    let host = host_name(authority.host())?;
    let port = authority.port_u16().unwrap_or(scheme.default_port());
    let target = in_origin(
        scheme,
        host,
        port,
        uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
    )?;
    check_host_header(&target, host_header)?;
    Ok(target)
}

/// Parses an origin-form target (`/path?query`) received inside a tunnel to `host:port`.
pub fn in_tunnel(
    scheme: Scheme,
    host: &str,
    port: u16,
    uri: &http::Uri,
    host_header: Option<&str>,
) -> Result<Target, Malformed> {
    if uri.scheme().is_some() || uri.authority().is_some() {
        // An absolute-form target inside a tunnel must still name the tunnel's host.
        let target = absolute(uri, host_header)?;
        if target.host != host || target.port != port {
            return Err(Malformed::HostMismatch {
                header: target.authority(),
                target: format!("{host}:{port}"),
            });
        }
        return Ok(target);
    }
    let target = in_origin(
        scheme,
        host.to_owned(),
        port,
        uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
    )?;
    check_host_header(&target, host_header)?;
    Ok(target)
}

fn check_host_header(target: &Target, host_header: Option<&str>) -> Result<(), Malformed> {
    let Some(value) = host_header else {
        return Ok(());
    };
    let (h, p) = split_host_port(value).ok_or_else(|| Malformed::BadHost(value.to_owned()))?;
    let h = host_name(h)?;
    let p = match p {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| Malformed::BadHost(value.to_owned()))?,
        None => target.scheme.default_port(),
    };
    if h != target.host || p != target.port {
        return Err(Malformed::HostMismatch {
            header: value.to_owned(),
            target: target.authority(),
        });
    }
    Ok(())
}

fn split_host_port(value: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match value.split_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((value, None)),
    }
}

/// Lower-cases and validates a host: an IP address or an ASCII DNS name.
pub fn host_name(raw: &str) -> Result<String, Malformed> {
    let bare = raw.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(bare.to_ascii_lowercase());
    }
    let host = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(host)
    } else {
        Err(Malformed::BadHost(raw.to_owned()))
    }
}

fn in_origin(
    scheme: Scheme,
    host: String,
    port: u16,
    path_and_query: &str,
) -> Result<Target, Malformed> {
    let (raw_path, raw_query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    Ok(Target {
        scheme,
        host,
        port,
        path: normalize_path(raw_path)?,
        query: parse_query(raw_query.unwrap_or(""))?,
    })
}

/// Decodes each segment, refuses encoded separators, removes `.`/`..`/empty segments.
pub fn normalize_path(raw: &str) -> Result<String, Malformed> {
    if !raw.starts_with('/') {
        return Err(Malformed::BadPath);
    }
    let mut segments: Vec<Cow<'_, str>> = Vec::new();
    let raw_segments: Vec<&str> = raw.split('/').skip(1).collect();
    let mut trailing_slash = false;
    for (i, raw_segment) in raw_segments.iter().enumerate() {
        let segment = decode(raw_segment)?;
        if segment.contains(['/', '\\', '\0']) {
            return Err(Malformed::EncodedSeparator);
        }
        let last = i + 1 == raw_segments.len();
        match &*segment {
            "" => trailing_slash = last && !segments.is_empty(),
            "." => trailing_slash = last && !segments.is_empty(),
            ".." => {
                segments.pop();
                trailing_slash = last && !segments.is_empty();
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(raw.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

fn decode(raw: &str) -> Result<Cow<'_, str>, Malformed> {
    // Nothing to decode in most segments and parameters: no copy for them.
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let ok = bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                return Err(Malformed::BadPercent);
            }
        }
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Malformed::NotUtf8)
}

/// A query key or value: `+` is a space, then percent-decoding.
fn decode_form(raw: &str) -> Result<String, Malformed> {
    if raw.contains('+') {
        decode(&raw.replace('+', " ")).map(Cow::into_owned)
    } else {
        decode(raw).map(Cow::into_owned)
    }
}

fn parse_query(raw: &str) -> Result<Vec<(String, String)>, Malformed> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_form(k)?;
        let value = decode_form(v)?;
        if key.contains('\0') || value.contains('\0') {
            return Err(Malformed::EncodedSeparator);
        }
        if out.iter().any(|(existing, _)| *existing == key) {
            return Err(Malformed::DuplicateParameter(key));
        }
        if key.eq_ignore_ascii_case(METHOD_OVERRIDE_PARAMETER) {
            return Err(Malformed::MethodOverride(format!("query parameter {key}")));
        }
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<Target, Malformed> {
        absolute(&uri.parse().unwrap(), None)
    }

    #[test]
    fn dot_segments_and_encodings_are_resolved_before_matching() {
        assert_eq!(normalize_path("/a/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(normalize_path("//orders///1").unwrap(), "/orders/1");
        assert_eq!(normalize_path("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize_path("/orders/").unwrap(), "/orders/");
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize_path("/%41pi").unwrap(), "/Api");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(normalize_path("/a%2fb"), Err(Malformed::EncodedSeparator));
        assert_eq!(normalize_path("/a%5cb"), Err(Malformed::EncodedSeparator));
        assert_eq!(normalize_path("/a%00"), Err(Malformed::EncodedSeparator));
        assert_eq!(normalize_path("/a%zz"), Err(Malformed::BadPercent));
        assert_eq!(normalize_path("/a%4"), Err(Malformed::BadPercent));
        assert_eq!(normalize_path("/%ff"), Err(Malformed::NotUtf8));
        assert_eq!(normalize_path("a"), Err(Malformed::BadPath));
    }

    #[test]
    fn absolute_targets_are_parsed_strictly() {
        let t = target("http://API.Example.test.:8080/v1/./orders?symbol=BTC&qty=2").unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port, t.path.as_str()),
            (Scheme::Http, "api.example.test", 8080, "/v1/orders")
        );
        assert_eq!(t.query_param("qty"), Some("2"));
        assert_eq!(t.origin_form(), "/v1/orders?symbol=BTC&qty=2");
        assert_eq!(
            target("http://user:pw@h/").unwrap_err(),
            Malformed::UserInfo
        );
        assert_eq!(
            target("http://h/?a=1&a=2").unwrap_err(),
            Malformed::DuplicateParameter("a".into())
        );
        assert_eq!(target("http://[::1]:81/x").unwrap().host, "::1");
        assert_eq!(target("http://[::1]:81/x").unwrap().authority(), "[::1]:81");
        assert!(absolute(&"/relative".parse().unwrap(), None).is_err());
    }

    #[test]
    fn host_header_must_agree_with_the_target() {
        let uri: http::Uri = "http://a.test/x".parse().unwrap();
        assert!(absolute(&uri, Some("a.test")).is_ok());
        assert!(absolute(&uri, Some("A.TEST:80")).is_ok());
        assert!(matches!(
            absolute(&uri, Some("b.test")),
            Err(Malformed::HostMismatch { .. })
        ));
        assert!(matches!(
            absolute(&uri, Some("a.test:81")),
            Err(Malformed::HostMismatch { .. })
        ));
    }

    #[test]
    fn forwarded_form_round_trips_through_normalization() {
        let t = target("http://h/a%20b/c%3Fd?k%26=v%3D1+2").unwrap();
        assert_eq!(t.path, "/a b/c?d");
        assert_eq!(t.query, vec![("k&".to_owned(), "v=1 2".to_owned())]);
        let again = target(&format!("http://h{}", t.origin_form())).unwrap();
        assert_eq!(again, t);
    }

    #[test]
    fn semicolons_are_forwarded_encoded_so_no_upstream_reads_path_parameters() {
        let t = target("http://h/api/withdraw;jsessionid=1/all?a=1;b=2").unwrap();
        assert_eq!(t.path, "/api/withdraw;jsessionid=1/all");
        assert_eq!(t.query, vec![("a".to_owned(), "1;b=2".to_owned())]);
        assert_eq!(
            t.origin_form(),
            "/api/withdraw%3Bjsessionid=1/all?a=1%3Bb%3D2"
        );
        let again = target(&format!("http://h{}", t.origin_form())).unwrap();
        assert_eq!(again, t);
    }

    #[test]
    fn requests_that_ask_to_run_as_another_method_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("X-HTTP-Method-Override", "DELETE".parse().unwrap());
        assert!(matches!(headers(&h), Err(Malformed::MethodOverride(_))));
        assert!(matches!(
            target("http://h/repo?_method=delete"),
            Err(Malformed::MethodOverride(_))
        ));
        assert!(matches!(
            target("http://h/repo?_METHOD=delete"),
            Err(Malformed::MethodOverride(_))
        ));
        assert!(target("http://h/repo?method=x").is_ok());
        let mut form = HeaderMap::new();
        form.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .unwrap(),
        );
        assert!(matches!(
            form_body(&form, b"a=1&%5Fmethod=delete"),
            Err(Malformed::MethodOverride(_))
        ));
        assert!(form_body(&form, b"a=1&method=delete").is_ok());
        assert!(form_body(&HeaderMap::new(), b"_method=delete").is_ok());
    }

    #[test]
    fn methods_must_be_upper_case_tokens() {
        assert!(method(&Method::GET).is_ok());
        assert!(method(&Method::from_bytes(b"gEt").unwrap()).is_err());
        assert!(method(&Method::from_bytes(b"delete").unwrap()).is_err());
    }

    #[test]
    fn conflicting_framing_and_duplicate_hosts_are_refused() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, "a".parse().unwrap());
        assert!(headers(&h).is_ok());
        h.append(header::HOST, "b".parse().unwrap());
        assert_eq!(headers(&h), Err(Malformed::DuplicateHost(2)));
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "3".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert_eq!(headers(&h), Err(Malformed::LengthAndEncoding));
    }

    proptest::proptest! {
        #[test]
        fn normalization_never_panics_and_is_idempotent(raw in "/[a-zA-Z0-9%./_-]{0,40}") {
            if let Ok(path) = normalize_path(&raw) {
                let t = Target { scheme: Scheme::Http, host: "h".into(), port: 80, path: path.clone(), query: vec![] };
                let forwarded = t.origin_form();
                proptest::prop_assert_eq!(normalize_path(&forwarded).ok(), Some(path));
            }
        }
    }
}
