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
        server::{Gateway, GatewaySetup, Limits, TracingSink},
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

fn serve_http(stream: TcpStream, requests: &AtomicUsize, seen: &Mutex<Vec<String>>) {
    let mut writer = stream.try_clone().unwrap();
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
        reader.read_exact(&mut body).unwrap();
        requests.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(head.clone());
        let reply = format!("{{\"echo\":{:?}}}", head);
        let _ = write!(
            writer,
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

fn start(upstream: SocketAddr, extra: &str, state: Option<tempfile::TempDir>) -> Setup {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut keyring = Keyring::new();
    keyring.add(key.verifying_key());
    let env = from_toml(&envelope_toml(upstream, extra)).expect("test envelope is valid");
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
        upstream_tls: upstream_client_config(&[], true).unwrap_or_else(|_| {
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
        }),
        limits: Limits {
            request_timeout: Duration::from_secs(5),
            ..Limits::default()
        },
        sink: Arc::new(TracingSink),
        trip_hook: Arc::new(LogOnly),
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
    let (status, body) = curl(
        s.proxy,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            "{\"quantity\": 5}",
            &format!("http://127.0.0.1:{port}/api/v3/order"),
        ],
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
    let gateway = s.gateway.clone();
    let approver = std::thread::spawn(move || {
        for _ in 0..200 {
            if let Some(held) = gateway.approvals().list().first() {
                assert_eq!(held.method, "POST");
                return gateway.approvals().decide(held.id, true);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    });
    let (status, body) = curl(s.proxy, &["-X", "POST", &url]);
    assert!(approver.join().unwrap());
    assert_eq!(status, 200, "{body}");
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
