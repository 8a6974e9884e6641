//! The transport the gateway is built on, with nothing else: an HTTP/1.1 forward proxy
//! from hyper and tokio, set up the way the gateway sets them up (same runtime, allocator,
//! server builder, pooled upstream connections, whole responses), that checks nothing,
//! injects nothing and records nothing.
//!
//! `cargo xtask bench gateway` runs it beside nginx and the gateway. Its figures are the
//! most any gateway on this stack can reach on the machine; the gateway's figures against
//! them are the cost of the policy, the ledger and the audit log.
//!
//! It forwards only to the one upstream it is started with and listens only on loopback,
//! so it cannot be used as an open relay.
//!
//! Usage: `passthrough_proxy LISTEN UPSTREAM`, both `IP:PORT`.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;

/// The gateway's defaults for a request head and for a request's whole exchange.
const HEAD_LIMIT: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Proxy {
    upstream: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

fn refusal(status: StatusCode, why: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
    *response.status_mut() = status;
    response
}

impl Proxy {
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, Response<Full<Bytes>>> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        if let Some(sender) = idle.filter(|s| !s.is_closed()) {
            return Ok(sender);
        }
        let unreachable = |_| refusal(StatusCode::BAD_GATEWAY, "upstream unreachable\n");
        let tcp = tokio::net::TcpStream::connect(self.upstream)
            .await
            .map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|_| refusal(StatusCode::BAD_GATEWAY, "upstream handshake failed\n"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let authority_fits = req
            .uri()
            .authority()
            .is_some_and(|a| a.as_str().as_bytes() == self.host.as_bytes());
        if !authority_fits {
            return refusal(StatusCode::FORBIDDEN, "only the configured upstream\n");
        }
        let origin_form = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let (mut parts, body) = req.into_parts();
        let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
            return refusal(StatusCode::BAD_REQUEST, "unreadable body\n");
        };
        let Ok(uri) = origin_form.parse() else {
            return refusal(StatusCode::BAD_REQUEST, "bad target\n");
        };
        parts.uri = uri;
        parts.headers.insert(header::HOST, self.host.clone());
        let request = Request::from_parts(parts, Full::new(body));
        let mut sender = match self.connection().await {
            Ok(sender) => sender,
            Err(refused) => return refused,
        };
        if sender.ready().await.is_err() {
            return refusal(StatusCode::BAD_GATEWAY, "upstream closed\n");
        }
        let Ok(response) = sender.send_request(request).await else {
            return refusal(StatusCode::BAD_GATEWAY, "upstream failed\n");
        };
        let (mut parts, incoming) = response.into_parts();
        let Ok(body) = incoming.collect().await.map(|c| c.to_bytes()) else {
            return refusal(StatusCode::BAD_GATEWAY, "upstream body failed\n");
        };
        if sender.ready().await.is_ok()
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(sender);
        }
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(parts, Full::new(body))
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: passthrough_proxy LISTEN UPSTREAM (both IP:PORT)");
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "{listen}: the pass-through proxy checks nothing; it listens on loopback only"
        );
    }
    let proxy = Arc::new(Proxy {
        upstream,
        host: HeaderValue::from_str(&upstream.to_string())?,
        idle: Mutex::new(Vec::new()),
    });
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move {
                        let answer = tokio::time::timeout(TIMEOUT, proxy.forward(req)).await;
                        Ok::<_, Infallible>(answer.unwrap_or_else(|_| {
                            refusal(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
                        }))
                    }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(hyper_util::rt::TokioTimer::new());
                builder
                    .max_buf_size(HEAD_LIMIT)
                    .header_read_timeout(TIMEOUT);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
