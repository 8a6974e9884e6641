//! The gateway against real servers and real clients on loopback: an upstream HTTP(S)
//! server that records what reached it, and `curl` using the gateway as its proxy.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ed25519_dalek::SigningKey;
use enforcer::{
    envelope::{Keyring, UsedIds, Verifier, from_toml, sign_envelope},
    gateway::{
        breaker::LogOnly,
        secrets::SecretStore,
        server::{DecisionSink, Gateway, GatewaySetup, Limits, TracingSink},
        tls::upstream_client_config,
    },
};

const SECRET: &str = "sk-live-4f1d2e9c";

/// An upstream that answers every request with 200 and a JSON echo of what it saw
/// (including the credential, so the test can prove the gateway scrubs echoes).
struct Upstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, s) = (requests.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, s) = (r.clone(), s.clone());
                std::thread::spawn(move || serve_http(stream, &r, &s));
            }
        });
        Upstream {
            addr,
            requests,
            seen,
        }
    }
}

fn serve_http<S: Read + Write>(stream: S, requests: &AtomicUsize, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(head.clone());
        let reply = format!("{{\"echo\":{:?}}}", head);
        let _ = write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{reply}",
            reply.len()
        );
    }
}

struct Setup {
    gateway: Arc<Gateway>,
    proxy: SocketAddr,
    _runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

fn envelope_toml(upstream: SocketAddr, extra: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    format!(
        r#"
version = 1
id = "env-test-{nonce}"
subject = "agent:test"
task = "gateway end-to-end"
issuer = "tests"
issued_at = "{now}"
not_before = "{now}"
expires_at = "{later}"

[budget]
requests = 100

[[capabilities]]
name = "orders"
upstream = {{ scheme = "http", host = "127.0.0.1", port = {port} }}
credential = {{ secret = "exchange-key", header = "X-Api-Key", format = "{{secret}}" }}
[[capabilities.routes]]
methods = ["GET", "POST"]
path = "/api/v3/**"
[[capabilities.constraints]]
body = "/quantity"
max = 2
optional = true

[[forbidden_effects]]
path = "/api/v3/withdraw/**"
reason = "withdrawals are irreversible"

[[approvals]]
methods = ["POST"]
path = "/api/v3/big"
timeout_secs = 1
reason = "big orders need a human"

[breakers]
on_forbidden = true
{extra}
"#,
        nonce = rand_suffix(),
        now = fmt(now - time::Duration::seconds(5)),
        later = fmt(now + time::Duration::hours(1)),
        port = upstream.port(),
    )
}

fn rand_suffix() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// What a test may change about the gateway it starts.
struct Options {
    limits: Limits,
    sink: Arc<dyn DecisionSink>,
    /// Extra PEM roots trusted for upstream TLS (instead of the system store).
    upstream_roots: Vec<std::path::PathBuf>,
    /// Rewrites the test Envelope's TOML before it is signed.
    edit: fn(String) -> String,
    allow_internal_upstreams: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits {
                request_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            sink: Arc::new(TracingSink),
            upstream_roots: Vec::new(),
            edit: |toml| toml,
            allow_internal_upstreams: false,
        }
    }
}

fn start(upstream: SocketAddr, extra: &str, state: Option<tempfile::TempDir>) -> Setup {
    start_with(upstream, extra, state, Options::default())
}

fn start_with(
    upstream: SocketAddr,
    extra: &str,
    state: Option<tempfile::TempDir>,
    options: Options,
) -> Setup {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut keyring = Keyring::new();
    keyring.add(key.verifying_key());
    let env =
        from_toml(&(options.edit)(envelope_toml(upstream, extra))).expect("test envelope is valid");
    let signed = sign_envelope(&env, &key).expect("sign");
    let verified = Verifier::new(keyring)
        .verify(signed.to_json().as_bytes(), &UsedIds::in_memory())
        .expect("verify");
    let dir = state.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gateway = Gateway::new(GatewaySetup {
        agent: "test".into(),
        envelope: verified,
        secrets: SecretStore::from_pairs([("exchange-key".to_owned(), SECRET.to_owned())]),
        state_dir: Some(dir.path().join("state")),
        upstream_tls: if !options.upstream_roots.is_empty() {
            let roots: Vec<&std::path::Path> =
                options.upstream_roots.iter().map(|p| p.as_path()).collect();
            upstream_client_config(&roots, false).unwrap()
        } else {
            upstream_client_config(&[], true).unwrap_or_else(|_| {
                let ca = dir.path().join("none.pem");
                std::fs::write(
                    &ca,
                    enforcer::gateway::tls::AgentCa::generate(
                        "x",
                        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                    )
                    .unwrap()
                    .cert_pem(),
                )
                .unwrap();
                upstream_client_config(&[ca.as_path()], false).unwrap()
            })
        },
        limits: options.limits,
        sink: options.sink,
        trip_hook: Arc::new(LogOnly),
        agent_cgroup: None,
        allow_internal_upstreams: options.allow_internal_upstreams,
    })
    .expect("gateway");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let proxy = listener.local_addr().unwrap();
    let g = gateway.clone();
    runtime.spawn(async move { g.serve(listener, std::future::pending()).await });
    Setup {
        gateway,
        proxy,
        _runtime: runtime,
        dir,
    }
}

/// curl through the gateway; returns (status, body).
fn curl(proxy: SocketAddr, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            "--proxy",
            &format!("http://{proxy}"),
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A JSON POST through the gateway; returns (status, body).
fn post_json(proxy: SocketAddr, url: &str, body: &str) -> (u16, String) {
    curl(
        proxy,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            url,
        ],
    )
}

#[test]
fn allowed_requests_get_the_credential_the_agent_never_sees() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let (status, body) = curl(
        s.proxy,
        &[
            "-H",
            "Authorization: Bearer agent-made-this",
            "-H",
            "Cookie: a=b",
            &url,
        ],
    );
    assert_eq!(status, 200, "{body}");
    let seen = up.seen.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(
        seen.contains(&format!("x-api-key: {SECRET}")),
        "credential injected: {seen}"
    );
    assert!(
        !seen.contains("agent-made-this") && !seen.contains("cookie"),
        "agent credentials stripped: {seen}"
    );
    assert!(
        !body.contains(SECRET),
        "the echoed secret reached the agent: {body}"
    );
    assert!(body.contains("[REDACTED]"), "{body}");
}

#[test]
fn a_rotated_credential_is_injected_from_the_next_request_and_both_values_stay_scrubbed() {
    const ROTATED: &str = "sk-rotated-5e6f7a8b";
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());

    let missing = s.gateway.prepare_credentials(&SecretStore::from_pairs([(
        "other-key".to_owned(),
        ROTATED.to_owned(),
    )]));
    assert!(
        missing.is_err_and(|e| e.to_string().contains("exchange-key")),
        "a store without the Envelope's secret was accepted"
    );
    let rotated = s
        .gateway
        .prepare_credentials(&SecretStore::from_pairs([(
            "exchange-key".to_owned(),
            ROTATED.to_owned(),
        )]))
        .expect("rotated credentials");
    s.gateway.install_credentials(rotated);

    // The old value comes back from the upstream too (the agent put it in the query, as
    // an upstream echoing an old key would): both are scrubbed.
    let (status, body) = curl(s.proxy, &[&format!("{url}?note={SECRET}")]);
    assert_eq!(status, 200, "{body}");
    let seen = up.seen.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(
        seen.contains(&format!("x-api-key: {ROTATED}")),
        "rotated credential injected: {seen}"
    );
    assert!(
        !body.contains(ROTATED) && !body.contains(SECRET),
        "a credential reached the agent: {body}"
    );
    assert_eq!(body.matches("[REDACTED]").count(), 2, "{body}");
}

#[test]
fn responses_come_in_the_clear_so_an_echoed_credential_is_always_scrubbed() {
    // The agent asks for gzip; the upstream is asked for none and echoes in the clear.
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let (status, body) = curl(s.proxy, &["-H", "Accept-Encoding: gzip", &url]);
    assert_eq!(status, 200, "{body}");
    let seen = up.seen.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(seen.contains("accept-encoding: identity"), "{seen}");
    assert!(!seen.contains("gzip"), "{seen}");
    assert!(
        !body.contains(SECRET) && body.contains("[REDACTED]"),
        "{body}"
    );

    // An upstream that compresses anyway is refused: its body cannot be scrubbed.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let _ = reader.get_mut().write_all(
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x8b\x08\x00",
            );
        }
    });
    let s = start(addr, "", None);
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{}/api/v3/ticker", addr.port())],
    );
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("encoded_response"), "{body}");
}

#[test]
fn a_credential_echoed_encoded_is_scrubbed_too() {
    use base64::{
        Engine as _,
        engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    };
    let encodings = |v: &str| {
        [
            STANDARD.encode(format!("user:{v}")),
            URL_SAFE_NO_PAD.encode(format!("{{\"key\":\"{v}\"}}")),
            hex::encode(v),
            hex::encode_upper(v),
            percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        ]
    };
    // An upstream that sends back the key it was given in five encodings, in its body and
    // in a header.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut key = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-api-key:") {
                    key = v.trim().to_owned();
                }
                line.clear();
            }
            let body = encodings(&key).join(" ");
            let header = STANDARD.encode(format!("k={key}"));
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 200 OK\r\nX-Echo: {header}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let s = start(addr, "", None);
    let (status, body) = curl(
        s.proxy,
        &[
            "-i",
            &format!("http://127.0.0.1:{}/api/v3/ticker", addr.port()),
        ],
    );
    assert_eq!(status, 200, "{body}");
    for encoded in encodings(SECRET) {
        assert!(
            !body.contains(&encoded),
            "{encoded} reached the agent: {body}"
        );
    }
    assert!(
        !body.contains(&STANDARD.encode(format!("k={SECRET}"))),
        "{body}"
    );
    assert_eq!(body.matches("[REDACTED]").count(), 6, "{body}");
}

#[test]
fn forbidden_effects_win_and_trip_the_breaker_for_good() {
    let up = Upstream::start();
    let state = tempfile::tempdir().unwrap();
    let s = start(up.addr, "", Some(state));
    let port = up.addr.port();
    // The capability route /api/v3/** matches too; the forbidden effect still wins, also
    // when spelled with encoded dot segments.
    let (status, body) = curl(
        s.proxy,
        &[
            "--path-as-is",
            &format!("http://127.0.0.1:{port}/api/v3/x/%2e%2e/withdraw/all"),
        ],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("forbidden_effect"), "{body}");
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(
        status, 403,
        "an allowed request after a forbidden attempt: {body}"
    );
    assert!(body.contains("circuit_open"), "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);

    // A restarted gateway with the same state stays tripped.
    let Setup {
        dir,
        gateway,
        _runtime,
        ..
    } = s;
    drop(gateway);
    drop(_runtime);
    let again = start(up.addr, "", Some(dir));
    let (status, body) = curl(
        again.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("circuit_open"), "{body}");
}

#[test]
fn a_body_that_repeats_a_key_is_not_judged_by_either_copy() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/order", up.addr.port());
    let post = |body: &str| post_json(s.proxy, &url, body);
    assert_eq!(post(r#"{"quantity": 1}"#).0, 200);
    // An upstream that keeps the first key would order 500 while the last one passed the
    // constraint here.
    let (status, body) = post(r#"{"quantity": 500, "quantity": 1}"#);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("repeats a key"), "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn a_restart_gives_no_wall_clock_time_back() {
    let up = Upstream::start();
    let options = || Options {
        edit: |toml| {
            toml.replace(
                "[budget]\nrequests = 100\n",
                "[budget]\nrequests = 100\nwall_clock_secs = 2\n",
            )
        },
        ..Options::default()
    };
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let s = start_with(up.addr, "", None, options());
    assert_eq!(curl(s.proxy, &[&url]).0, 200);
    let Setup {
        dir,
        gateway,
        _runtime,
        ..
    } = s;
    drop(gateway);
    drop(_runtime);
    std::thread::sleep(Duration::from_millis(2500));
    // A new process on the same state: the grant is older than its 2 s.
    let again = start_with(up.addr, "", Some(dir), options());
    let (status, body) = curl(again.proxy, &[&url]);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("wall-clock"), "{body}");
}

#[test]
fn requests_outside_every_capability_and_ambiguous_ones_are_refused() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let port = up.addr.port();
    let (status, body) = curl(s.proxy, &["http://127.0.0.1:1/api/v3/ticker"]);
    assert_eq!(
        (status, body.contains("no_capability")),
        (403, true),
        "{body}"
    );
    let (status, body) = curl(s.proxy, &[&format!("http://127.0.0.1:{port}/admin")]);
    assert_eq!((status, body.contains("no_route")), (403, true), "{body}");
    let (status, body) = curl(
        s.proxy,
        &[
            "-X",
            "gEt",
            &format!("http://127.0.0.1:{port}/api/v3/ticker"),
        ],
    );
    assert_eq!((status, body.contains("malformed")), (400, true), "{body}");
    let (status, body) = curl(
        s.proxy,
        &[
            "--path-as-is",
            &format!("http://127.0.0.1:{port}/api/v3/a%2fb"),
        ],
    );
    assert_eq!((status, body.contains("malformed")), (400, true), "{body}");
    let (status, body) = post_json(
        s.proxy,
        &format!("http://127.0.0.1:{port}/api/v3/order"),
        "{\"quantity\": 5}",
    );
    assert_eq!(
        (status, body.contains("scope_violation")),
        (403, true),
        "{body}"
    );
    let (status, body) = curl(
        s.proxy,
        &[
            "-d",
            "not json",
            &format!("http://127.0.0.1:{port}/api/v3/order"),
        ],
    );
    assert_eq!(
        status, 403,
        "a body a constraint needs but cannot read: {body}"
    );
    // A POST the routes allow, asking to run as the DELETE nothing allows.
    for (header, url) in [
        (
            "X-HTTP-Method-Override: DELETE",
            format!("http://127.0.0.1:{port}/api/v3/order"),
        ),
        (
            "X-Nothing: 1",
            format!("http://127.0.0.1:{port}/api/v3/order?_method=DELETE"),
        ),
    ] {
        let (status, body) = curl(s.proxy, &["-X", "POST", "-H", header, &url]);
        assert_eq!(status, 400, "{header} {url}: {body}");
        assert!(body.contains("another method"), "{body}");
    }
    // curl sends -d as an url-encoded form.
    let (status, body) = curl(
        s.proxy,
        &[
            "-d",
            "_method=DELETE",
            &format!("http://127.0.0.1:{port}/api/v3/order"),
        ],
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("form field"), "{body}");
    // CONNECT to something no https capability reaches.
    let (status, _) = curl(
        s.proxy,
        &["-p", &format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_ne!(status, 200);
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        0,
        "nothing refused reached the upstream"
    );
}

#[test]
fn spend_counts_against_the_capability_and_the_envelope_total() {
    let up = Upstream::start();
    let options = Options {
        edit: |toml| {
            toml.replace(
                "[budget]\nrequests = 100\n",
                "[budget]\nrequests = 100\nspend = { currency = \"USD\", max = 100 }\n",
            )
            .replace(
                "[[forbidden_effects]]",
                "[capabilities.budget]\n\
                 spend = { currency = \"USD\", max = 100, amount = \"/amount\" }\n\n\
                 [[forbidden_effects]]",
            )
        },
        ..Options::default()
    };
    let payments = format!(
        "[[capabilities]]\nname = \"payments\"\n\
         upstream = {{ scheme = \"http\", host = \"127.0.0.1\", port = {} }}\n\
         [[capabilities.routes]]\nmethods = [\"POST\"]\npath = \"/api/v2/**\"\n\
         [capabilities.budget]\nspend = {{ currency = \"USD\", max = 100, amount = \"/amount\" }}\n",
        up.addr.port()
    );
    let s = start_with(up.addr, &payments, None, options);
    let post = |path: &str, amount: u32| {
        post_json(
            s.proxy,
            &format!("http://127.0.0.1:{}{path}", up.addr.port()),
            &format!("{{\"amount\":{amount}}}"),
        )
    };
    assert_eq!(post("/api/v3/order", 60).0, 200);
    // Within the payments capability's own 100, but the Envelope's total is 100 too.
    let (status, body) = post("/api/v2/pay", 60);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("envelope"), "{body}");
    assert_eq!(post("/api/v2/pay", 40).0, 200);
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

#[test]
fn five_hundred_concurrent_requests_against_a_budget_of_one_hundred() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let proxy = s.proxy;
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (url, ok, limited) = (url.clone(), ok.clone(), limited.clone());
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let mut stream = TcpStream::connect(proxy).unwrap();
                    write!(stream, "GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
                    let mut reply = String::new();
                    let _ = stream.read_to_string(&mut reply);
                    if reply.starts_with("HTTP/1.1 200") {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else if reply.starts_with("HTTP/1.1 429") {
                        limited.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(ok.load(Ordering::SeqCst), 100);
    assert_eq!(limited.load(Ordering::SeqCst), 400);
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        100,
        "exactly the budget reached the upstream"
    );
}

/// A thread that waits for the gateway to hold a request, runs `before` on it, then
/// approves it; joins to whether it found one to approve.
fn approve_when_held(
    gateway: &Arc<Gateway>,
    before: impl FnOnce(&enforcer::gateway::approval::Held, &Gateway) + Send + 'static,
) -> std::thread::JoinHandle<bool> {
    let gateway = gateway.clone();
    std::thread::spawn(move || {
        for _ in 0..200 {
            if let Some(held) = gateway.approvals().list().first() {
                before(held, &gateway);
                return gateway.approvals().decide(held.id, true);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    })
}

#[test]
fn approvals_hold_until_an_operator_decides_or_time_runs_out() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/big", up.addr.port());
    // No decision: denied when the timeout passes.
    let (status, body) = curl(s.proxy, &["-X", "POST", &url]);
    assert_eq!(
        (status, body.contains("approval_timeout")),
        (403, true),
        "{body}"
    );
    // An operator approves.
    let approver = approve_when_held(&s.gateway, |held, _| assert_eq!(held.method, "POST"));
    let (status, body) = curl(s.proxy, &["-X", "POST", &url]);
    assert!(approver.join().unwrap());
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    // The circuit trips while a request is held: approving it afterwards sends nothing.
    let late = approve_when_held(&s.gateway, |_, gateway| {
        gateway.breaker().trip("tripped during the hold".into())
    });
    let (status, body) = curl(s.proxy, &["-X", "POST", &url]);
    assert!(late.join().unwrap());
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("circuit_open"), "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn python_urllib_uses_the_gateway_as_its_proxy() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let script = "import os, sys, urllib.request\n\
                  r = urllib.request.urlopen(sys.argv[1], timeout=10)\n\
                  print(r.status, 'REDACTED' in r.read().decode())";
    let out = Command::new("python3")
        .args(["-c", script, &url])
        .env("HTTP_PROXY", format!("http://{}", s.proxy))
        .env("http_proxy", format!("http://{}", s.proxy))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 True",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = s.dir.path();
}

/// A TLS upstream on loopback with a certificate for 127.0.0.1 from a CA made here; the
/// CA certificate is written to `dir/upstream-ca.pem`.
fn start_tls_upstream(dir: &std::path::Path) -> (Upstream, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "upstream test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let ca_path = dir.join("upstream-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (r, s) = (requests.clone(), seen.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (r, s, config) = (r.clone(), s.clone(), config.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                serve_http(rustls::StreamOwned::new(conn, stream), &r, &s);
            });
        }
    });
    (
        Upstream {
            addr,
            requests,
            seen,
        },
        ca_path,
    )
}

fn https_capability(port: u16) -> String {
    format!(
        r#"
[[capabilities]]
name = "secure"
upstream = {{ scheme = "https", host = "127.0.0.1", port = {port} }}
credential = {{ secret = "exchange-key", header = "X-Api-Key", format = "{{secret}}" }}
[[capabilities.routes]]
methods = ["GET"]
path = "/api/v3/**"
"#
    )
}

#[test]
fn https_through_connect_gets_the_same_checks_and_the_credential() {
    let plain = Upstream::start();
    let certs = tempfile::tempdir().unwrap();
    let (up, upstream_ca) = start_tls_upstream(certs.path());
    let s = start_with(
        plain.addr,
        &https_capability(up.addr.port()),
        None,
        Options {
            upstream_roots: vec![upstream_ca.clone()],
            ..Options::default()
        },
    );
    let agent_ca = s.dir.path().join("agent-ca.pem");
    std::fs::write(&agent_ca, s.gateway.ca_pem()).unwrap();
    // (status, body), or (the proxy's CONNECT status, "") when the tunnel was refused.
    let https_curl = |url: &str| -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-w",
                "\n%{http_code}/%{http_connect}",
                "--cacert",
            ])
            .arg(&agent_ca)
            .arg(url)
            .env("HTTPS_PROXY", format!("http://{}", s.proxy))
            .env("https_proxy", format!("http://{}", s.proxy))
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .expect("curl is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, codes) = text.rsplit_once('\n').unwrap_or(("", "0/0"));
        let (code, connect) = codes.trim().split_once('/').unwrap_or(("0", "0"));
        match code.parse().unwrap_or(0) {
            0 => (connect.parse().unwrap_or(0), String::new()),
            code => (code, body.to_owned()),
        }
    };
    let port = up.addr.port();

    // Allowed: the agent trusts only its own CA, the gateway verifies the upstream's.
    let (status, body) = https_curl(&format!("https://127.0.0.1:{port}/api/v3/ticker"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("[REDACTED]") && !body.contains(SECRET),
        "{body}"
    );
    let seen = up.seen.lock().unwrap().join("\n").to_ascii_lowercase();
    assert!(seen.contains(&format!("x-api-key: {SECRET}")), "{seen}");

    // A route the https capability does not have, inside the tunnel.
    let (status, body) = https_curl(&format!("https://127.0.0.1:{port}/admin"));
    assert_eq!((status, body.contains("no_route")), (403, true), "{body}");

    // CONNECT to a host:port no https capability reaches (the plain one is http).
    let (status, _) = https_curl(&format!(
        "https://127.0.0.1:{}/api/v3/ticker",
        plain.addr.port()
    ));
    assert_eq!(status, 403, "curl reports the proxy's CONNECT refusal");

    // Absolute-form http:// to the https capability: the upstream leg uses TLS.
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(SECRET), "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);

    // Forbidden inside the tunnel (the route would allow it); trips the breaker.
    let (status, body) = https_curl(&format!("https://127.0.0.1:{port}/api/v3/withdraw/all"));
    assert_eq!(
        (status, body.contains("forbidden_effect")),
        (403, true),
        "{body}"
    );
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        2,
        "nothing refused was forwarded"
    );
    assert_eq!(plain.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn upstream_tls_is_verified() {
    // The gateway trusts another CA than the one that issued the upstream's certificate.
    let certs = tempfile::tempdir().unwrap();
    let (up, _) = start_tls_upstream(certs.path());
    let other = tempfile::tempdir().unwrap();
    let (_other_up, other_ca) = start_tls_upstream(other.path());
    let port = up.addr.port();
    let s = start_with(
        "127.0.0.1:1".parse().unwrap(),
        &https_capability(port),
        None,
        Options {
            upstream_roots: vec![other_ca],
            ..Options::default()
        },
    );
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(
        (status, body.contains("upstream_unreachable")),
        (502, true),
        "{body}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

/// Sends raw bytes to the gateway and returns everything it answers until it closes.
fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let authority = format!("127.0.0.1:{}", up.addr.port());
    let url = format!("http://{authority}/api/v3/order");

    // CL+TE, with a second request hidden where the two framings disagree.
    let smuggle = format!(
        "POST {url} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 40\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {url} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    );
    let reply = raw(s.proxy, smuggle.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("ambiguous_framing"), "{reply}");
    assert_eq!(
        reply.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then close: {reply}"
    );

    for head in [
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
    ] {
        let request =
            format!("POST {url} HTTP/1.1\r\nHost: {authority}\r\n{head}\r\n0\r\n\r\nhello");
        let reply = raw(s.proxy, request.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 400"), "{head}: {reply}");
        assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{head}: {reply}");
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        0,
        "nothing reached the upstream"
    );

    // Well-framed pipelined requests (a chunked one included) still all get through.
    let body = "{\"quantity\": 1}";
    let pipelined = format!(
        "POST {url} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n\
         POST {url} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}\
         GET {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n",
        body.len(),
        body.len()
    );
    let reply = raw(s.proxy, pipelined.as_bytes());
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 3, "{reply}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
}

#[test]
fn size_limits_refuse_before_anything_is_forwarded() {
    let up = Upstream::start();
    let s = start_with(
        up.addr,
        "",
        None,
        Options {
            limits: Limits {
                max_header_bytes: 16 * 1024,
                max_body_bytes: 1024,
                request_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            ..Options::default()
        },
    );
    let authority = format!("127.0.0.1:{}", up.addr.port());
    let url = format!("http://{authority}/api/v3/order");
    let big = "a".repeat(40 * 1024);
    let reply = raw(
        s.proxy,
        format!("GET {url} HTTP/1.1\r\nHost: {authority}\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    assert!(
        reply.starts_with("HTTP/1.1 431") || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );

    let body = "x".repeat(2000);
    let (status, reply) = curl(s.proxy, &["-d", &body, &url]);
    assert_eq!(
        (status, reply.contains("body_too_large")),
        (413, true),
        "{reply}"
    );
    // Exactly at the limit is inspected (and refused by the JSON constraint, not size).
    let (status, reply) = curl(s.proxy, &["-d", &"y".repeat(1024), &url]);
    assert_eq!(status, 403, "{reply}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn a_silent_upstream_times_out_with_504() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let s = start_with(
        addr,
        "",
        None,
        Options {
            limits: Limits {
                request_timeout: Duration::from_secs(1),
                ..Limits::default()
            },
            ..Options::default()
        },
    );
    let started = std::time::Instant::now();
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{}/api/v3/ticker", addr.port())],
    );
    assert_eq!(
        (status, body.contains("upstream_timeout")),
        (504, true),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn connections_per_agent_are_limited() {
    let up = Upstream::start();
    let s = start_with(
        up.addr,
        "",
        None,
        Options {
            limits: Limits {
                max_connections: 2,
                request_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            ..Options::default()
        },
    );
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let a = TcpStream::connect(s.proxy).unwrap();
    let b = TcpStream::connect(s.proxy).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The third is accepted by the kernel and closed by the gateway without an answer.
    let reply = raw(
        s.proxy,
        format!("GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(reply, "", "over the limit: {reply}");
    drop((a, b));
    std::thread::sleep(Duration::from_millis(200));
    let reply = raw(
        s.proxy,
        format!("GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn decisions_go_to_the_audit_log_and_a_dead_log_refuses() {
    use enforcer::{
        audit::{AuditConfig, AuditLog, VerifyOptions, verify},
        gateway::audit_sink::AuditSink,
    };
    let up = Upstream::start();
    let audit_dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let (log, _) = AuditLog::open(AuditConfig::new(audit_dir.path()), key.clone()).unwrap();
    let s = start_with(
        up.addr,
        "",
        None,
        Options {
            sink: Arc::new(AuditSink::new(log.clone())),
            ..Options::default()
        },
    );
    let port = up.addr.port();
    let (status, body) = curl(
        s.proxy,
        &[&format!(
            "http://127.0.0.1:{port}/api/v3/ticker?api_key=q-secret"
        )],
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = curl(s.proxy, &[&format!("http://127.0.0.1:{port}/admin")]);
    assert_eq!(status, 403);

    log.close_blocking().unwrap();
    let report = verify(
        audit_dir.path(),
        &VerifyOptions {
            trusted_key: Some(key.verifying_key()),
            ..VerifyOptions::default()
        },
    )
    .unwrap();
    assert!(report.ok(), "{:?}", report.failure);
    let mut text = String::new();
    for entry in std::fs::read_dir(audit_dir.path()).unwrap() {
        text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert_eq!(text.matches("\"request_allowed\"").count(), 2, "{text}");
    assert!(text.contains("\"upstream_status\":200"), "{text}");
    assert!(
        text.contains("\"request_denied\"") && text.contains("no_route"),
        "{text}"
    );
    assert!(
        !text.contains(SECRET) && !text.contains("q-secret"),
        "{text}"
    );

    // The log is closed now: nothing is forwarded without a record.
    let before = up.requests.load(Ordering::SeqCst);
    let (status, body) = curl(
        s.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(
        (status, body.contains("audit_unavailable")),
        (503, true),
        "{body}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), before);
    // Nor is a request held for an operator when its hold cannot be recorded.
    let (status, body) = curl(
        s.proxy,
        &["-X", "POST", &format!("http://127.0.0.1:{port}/api/v3/big")],
    );
    assert_eq!(
        (status, body.contains("audit_unavailable")),
        (503, true),
        "{body}"
    );
    assert!(s.gateway.approvals().list().is_empty());
    assert_eq!(up.requests.load(Ordering::SeqCst), before);
}

#[test]
fn a_retired_gateway_refuses_on_connections_already_open() {
    let up = Upstream::start();
    let s = start(up.addr, "", None);
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let mut stream = TcpStream::connect(s.proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |stream: &mut TcpStream| -> String {
        write!(stream, "GET {url} HTTP/1.1\r\n\r\n").unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        format!("{}{}", status.trim(), String::from_utf8_lossy(&body))
    };
    assert!(ask(&mut stream).starts_with("HTTP/1.1 200"));
    // A newer Envelope took over: the same keep-alive connection gets no more service.
    s.gateway.retire();
    let second = ask(&mut stream);
    assert!(
        second.starts_with("HTTP/1.1 403") && second.contains("envelope_replaced"),
        "{second}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
}

/// Sends `head`, runs `meanwhile` while the gateway waits for the body, sends `body`, and
/// returns everything the gateway answers until it closes.
fn head_then_body(proxy: SocketAddr, head: &str, body: &str, meanwhile: impl FnOnce()) -> String {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    // Long enough for the gateway to have judged the head and be reading the body.
    std::thread::sleep(Duration::from_millis(300));
    meanwhile();
    let _ = stream.write_all(body.as_bytes());
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn a_grant_that_ends_while_the_body_is_held_back_forwards_nothing() {
    let up = Upstream::start();
    let authority = format!("127.0.0.1:{}", up.addr.port());
    let body = "{\"quantity\": 1}";
    let head = format!(
        "POST http://{authority}/api/v3/order HTTP/1.1\r\nHost: {authority}\r\n\
         Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let s = start(up.addr, "", None);
    let reply = head_then_body(s.proxy, &head, body, || {});
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);

    // The circuit trips while the body is on its way.
    let reply = head_then_body(s.proxy, &head, body, || {
        s.gateway
            .breaker()
            .trip("tripped while a body was held".into())
    });
    assert!(
        reply.starts_with("HTTP/1.1 403") && reply.contains("circuit_open"),
        "{reply}"
    );

    // A newer Envelope takes over while the body is on its way.
    let s = start(up.addr, "", None);
    let reply = head_then_body(s.proxy, &head, body, || s.gateway.retire());
    assert!(
        reply.starts_with("HTTP/1.1 403") && reply.contains("envelope_replaced"),
        "{reply}"
    );
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        1,
        "nothing was forwarded after the grant ended"
    );
}

#[test]
fn a_body_held_back_past_the_request_timeout_is_refused() {
    let up = Upstream::start();
    let s = start_with(
        up.addr,
        "",
        None,
        Options {
            limits: Limits {
                request_timeout: Duration::from_secs(1),
                ..Limits::default()
            },
            ..Options::default()
        },
    );
    let authority = format!("127.0.0.1:{}", up.addr.port());
    let started = std::time::Instant::now();
    // Ten bytes announced, three sent, and then nothing.
    let reply = raw(
        s.proxy,
        format!(
            "POST http://{authority}/api/v3/order HTTP/1.1\r\nHost: {authority}\r\n\
             Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{{\"q"
        )
        .as_bytes(),
    );
    assert!(
        reply.starts_with("HTTP/1.1 408") && reply.contains("body_timeout"),
        "{reply}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the gateway closed the connection: {:?}",
        started.elapsed()
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn concurrent_spend_never_takes_the_velocity_window_over_its_max() {
    let up = Upstream::start();
    let options = Options {
        edit: |toml| {
            toml.replace(
                "[budget]\nrequests = 100\n",
                "[budget]\nrequests = 100\nspend = { currency = \"USD\", max = 10000 }\n",
            )
            .replace(
                "[[forbidden_effects]]",
                "[capabilities.budget]\n\
                 spend = { currency = \"USD\", amount = \"/amount\" }\n\n\
                 [[forbidden_effects]]",
            )
        },
        ..Options::default()
    };
    let s = start_with(
        up.addr,
        "spend_velocity = { currency = \"USD\", max = 100, window_secs = 60 }",
        None,
        options,
    );
    let url = format!("http://127.0.0.1:{}/api/v3/order", up.addr.port());
    let proxy = s.proxy;
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || post_json(proxy, &url, "{\"amount\": 90}").0)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let forwarded = up.requests.load(Ordering::SeqCst);
    assert!(
        forwarded * 90 <= 100,
        "{forwarded} requests of 90 went out under a velocity limit of 100: {statuses:?}"
    );
    assert_eq!(forwarded, 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 1);
    assert!(
        s.gateway
            .breaker()
            .open_reason()
            .is_some_and(|r| r.contains("would exceed")),
        "the request that did not fit opened the circuit"
    );
}

/// Opens a CONNECT tunnel through the gateway and returns it once the gateway said 200,
/// before any TLS byte is sent.
fn open_tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "{head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

#[test]
fn tunnels_count_against_the_connection_limit_and_a_silent_handshake_times_out() {
    let up = Upstream::start();
    let s = start_with(
        up.addr,
        &https_capability(4443),
        None,
        Options {
            limits: Limits {
                max_connections: 2,
                request_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            ..Options::default()
        },
    );
    let url = format!("http://127.0.0.1:{}/api/v3/ticker", up.addr.port());
    let get = format!("GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n");
    let started = std::time::Instant::now();
    // Two tunnels that never send a ClientHello take both places.
    let mut tunnels = [
        open_tunnel(s.proxy, "127.0.0.1:4443"),
        open_tunnel(s.proxy, "127.0.0.1:4443"),
    ];
    std::thread::sleep(Duration::from_millis(200));
    let reply = raw(s.proxy, get.as_bytes());
    assert_eq!(reply, "", "a third connection is over the limit: {reply}");
    // Each is closed once its handshake has not come within the request timeout.
    for tunnel in &mut tunnels {
        let mut rest = Vec::new();
        let read = tunnel.read_to_end(&mut rest);
        assert!(
            matches!(read, Ok(0)),
            "the gateway closed the tunnel: {read:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed after the timeout: {:?}",
        started.elapsed()
    );
    // Their places are free again.
    std::thread::sleep(Duration::from_millis(200));
    let reply = raw(s.proxy, get.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_secret_in_the_upstreams_reason_phrase_does_not_reach_the_agent() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                reader.get_mut(),
                "HTTP/1.1 400 Bad key {SECRET}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    let s = start(addr, "", None);
    let reply = raw(
        s.proxy,
        format!(
            "GET http://127.0.0.1:{}/api/v3/ticker HTTP/1.1\r\nConnection: close\r\n\r\n",
            addr.port()
        )
        .as_bytes(),
    );
    let status_line = reply.lines().next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(!reply.contains(SECRET), "{reply}");
}

/// Keeps every decision's outcome and code.
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, &'static str)>>);

impl DecisionSink for Recorder {
    fn record(&self, d: &enforcer::gateway::server::Decision) -> Result<(), String> {
        self.0.lock().unwrap().push((d.outcome, d.code));
        Ok(())
    }
}

#[test]
fn a_held_request_whose_agent_goes_away_is_no_longer_pending() {
    let up = Upstream::start();
    let recorder = Arc::new(Recorder::default());
    let s = start_with(
        up.addr,
        "",
        None,
        Options {
            sink: recorder.clone(),
            edit: |toml| toml.replace("timeout_secs = 1\n", "timeout_secs = 600\n"),
            ..Options::default()
        },
    );
    let authority = format!("127.0.0.1:{}", up.addr.port());
    let mut stream = TcpStream::connect(s.proxy).unwrap();
    write!(
        stream,
        "POST http://{authority}/api/v3/big HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let held = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        !s.gateway.approvals().list().is_empty()
    });
    assert!(held, "the request was held");
    drop(stream);
    let gone = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        s.gateway.approvals().list().is_empty()
    });
    assert!(
        gone,
        "still pending after its agent went away: {:?}",
        s.gateway.approvals().list()
    );
    let recorded = recorder.0.lock().unwrap().clone();
    assert_eq!(
        recorded,
        [("held", ""), ("denied", "approval_abandoned")],
        "the hold and its end are on record"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

/// The name the tests' own `/etc/hosts` gives 127.0.0.1: neither `localhost` nor an IP
/// literal, so what the issuer wrote is a name and the address comes from resolving it.
const INTERNAL_NAME: &str = "exchange.internal.test";

fn loopback_by_name(port: u16) -> String {
    format!(
        "[[capabilities]]\nname = \"by-name\"\n\
         upstream = {{ scheme = \"http\", host = \"{INTERNAL_NAME}\", port = {port} }}\n\
         [[capabilities.routes]]\nmethods = [\"GET\"]\npath = \"/api/v3/**\"\n"
    )
}

/// `enforcer gateway` (standalone) in a mount namespace of its own whose `/etc/hosts`
/// names 127.0.0.1 [`INTERNAL_NAME`]: the real resolver, reading a file only it sees.
struct NamedGateway {
    child: std::process::Child,
    proxy: SocketAddr,
    _dir: tempfile::TempDir,
}

impl NamedGateway {
    fn start(upstream: SocketAddr, extra_args: &[&str]) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let hosts = path("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n127.0.0.1 {INTERNAL_NAME}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (trust, secrets) = (path("trust"), path("secrets"));
        std::fs::create_dir(&trust).unwrap();
        std::fs::create_dir(&secrets).unwrap();
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(secrets.join("exchange-key"), SECRET).unwrap();
        std::fs::set_permissions(
            secrets.join("exchange-key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        enforcer::envelope::generate_keypair(&trust.join("issuer")).unwrap();
        let key = enforcer::envelope::load_signing_key(&trust.join("issuer.key")).unwrap();
        std::fs::remove_file(trust.join("issuer.key")).unwrap();
        let env = from_toml(&envelope_toml(upstream, &loopback_by_name(upstream.port())))
            .expect("test envelope is valid");
        let signed = path("envelope.json");
        std::fs::write(&signed, sign_envelope(&env, &key).unwrap().to_json()).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
            .arg(&hosts)
            .arg(env!("CARGO_BIN_EXE_enforcer"))
            .arg("gateway")
            .arg("--envelope")
            .arg(&signed)
            .arg("--trust")
            .arg(&trust)
            .arg("--secrets")
            .arg(&secrets)
            .arg("--listen")
            .arg(proxy.to_string())
            .args(extra_args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("unshare");
        let gateway = NamedGateway {
            child,
            proxy,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(proxy).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gateway
    }
}

impl Drop for NamedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_host_name_that_resolves_to_an_internal_address_is_not_dialled() {
    // A mount namespace and a bind mount need root.
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root (a mount namespace of its own) and CI is set"
        );
        eprintln!("skipped: needs root for a mount namespace with its own /etc/hosts");
        return;
    }
    let up = Upstream::start();
    let port = up.addr.port();
    let get = format!(
        "GET http://{INTERNAL_NAME}:{port}/api/v3/ticker HTTP/1.1\r\nHost: {INTERNAL_NAME}:{port}\r\n\
         Connection: close\r\n\r\n"
    );
    let g = NamedGateway::start(up.addr, &[]);
    let reply = raw(g.proxy, get.as_bytes());
    assert!(
        reply.starts_with("HTTP/1.1 502") && reply.contains("upstream_address_refused"),
        "{reply}"
    );
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    // The same upstream named by its IP literal is what the issuer wrote: dialled.
    let (status, body) = curl(
        g.proxy,
        &[&format!("http://127.0.0.1:{port}/api/v3/ticker")],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    drop(g);

    // An operator who allows internal upstreams gets the name dialled.
    let g = NamedGateway::start(up.addr, &["--allow-internal-upstreams"]);
    let reply = raw(g.proxy, get.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}
