//! Request framing, checked on the raw bytes before hyper sees them.
//!
//! hyper drops `Content-Length` when `Transfer-Encoding` is also present (RFC 9112 §6.1 lets
//! a server do that) and merges duplicate headers into a `HeaderMap`, so by the time a
//! request reaches the service nothing says the agent sent an ambiguous message — yet
//! exactly those messages are how requests get smuggled past an intermediary that frames
//! them differently from the upstream. [`Inspect`] wraps the agent's stream, parses every
//! request head with `httparse` (the parser hyper itself uses, with the same defaults)
//! and follows the message framing (`Content-Length` bodies, chunked bodies and trailers)
//! to find the next head. Each head gets a [`HeadVerdict`], queued in order; the service
//! takes one per request and refuses and closes the connection on anything but `Ok`.
//!
//! After a refused head the stream is no longer followed: the service closes the
//! connection, and any request hyper still parses finds no verdict and is refused too.
use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the framing check found in one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`.
    ContentLengthAndTransferEncoding,
    /// More than one `Content-Length` header (whatever the values).
    DuplicateContentLength,
    /// A `Content-Length` that is not a plain decimal number.
    BadContentLength,
    /// More than one `Transfer-Encoding`, or one that is not exactly `chunked`.
    UnsupportedTransferEncoding,
    /// The head does not parse (obs-fold, whitespace before a colon, bad characters, too
    /// many headers, too large); hyper refuses these too.
    Unparsable,
    /// A chunked body that does not follow the chunk grammar.
    BadChunk,
}

impl HeadVerdict {
    pub fn reason(self) -> &'static str {
        match self {
            HeadVerdict::Ok => "ok",
            HeadVerdict::ContentLengthAndTransferEncoding => {
                "both Content-Length and Transfer-Encoding are present"
            }
            HeadVerdict::DuplicateContentLength => "Content-Length is present more than once",
            HeadVerdict::BadContentLength => "Content-Length is not a decimal number",
            HeadVerdict::UnsupportedTransferEncoding => {
                "Transfer-Encoding other than a single `chunked`"
            }
            HeadVerdict::Unparsable => "the request head does not parse",
            HeadVerdict::BadChunk => "the chunked body is malformed",
        }
    }
}

/// The verdicts of the heads read so far, oldest first, shared with the service.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<HeadVerdict>>>);

impl Verdicts {
    /// The verdict for the next request; `None` when framing was not followed up to it
    /// (the caller refuses).
    pub fn next(&self) -> Option<HeadVerdict> {
        self.0.lock().ok()?.pop_front()
    }

    fn push(&self, v: HeadVerdict) {
        if let Ok(mut q) = self.0.lock() {
            q.push_back(v);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Head,
    /// Bytes of a `Content-Length` body still to come.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data; how many of its bytes were seen.
    ChunkEnd(u8),
    Trailers,
    /// Not following any more: a tunnel (CONNECT) or a refused head.
    Stopped,
}

/// The framing state machine, fed with every byte the agent sends, in order.
pub struct Framing {
    state: State,
    /// A head, chunk-size line or trailer section split across reads.
    pending: Vec<u8>,
    max_head: usize,
    verdicts: Verdicts,
}

const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;

impl Framing {
    pub fn new(max_head: usize, verdicts: Verdicts) -> Self {
        Framing {
            state: State::Head,
            pending: Vec::new(),
            max_head,
            verdicts,
        }
    }

    fn refuse(&mut self, v: HeadVerdict) {
        self.verdicts.push(v);
        self.state = State::Stopped;
        self.pending = Vec::new();
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Body(n) => {
                    let take = n.min(input.len() as u64);
                    input = &input[take as usize..];
                    self.state = if n == take {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkData(n) => {
                    let take = n.min(input.len() as u64);
                    input = &input[take as usize..];
                    self.state = if n == take {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if input[0] != want {
                        return self.refuse(HeadVerdict::BadChunk);
                    }
                    input = &input[1..];
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    // Parse straight from the input when nothing is pending (the common
                    // case: a whole head in one read); otherwise from the joined bytes.
                    if self.pending.is_empty() {
                        match self.element(input) {
                            Some(used) => input = &input[used..],
                            None => {
                                self.keep(input);
                                return;
                            }
                        }
                    } else {
                        self.pending.extend_from_slice(input);
                        let joined = std::mem::take(&mut self.pending);
                        match self.element(&joined) {
                            Some(used) => {
                                // Whatever followed the element is fed again.
                                return self.feed(&joined[used..]);
                            }
                            None => {
                                if self.state != State::Stopped {
                                    self.pending = joined;
                                    self.check_pending_size();
                                }
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    fn keep(&mut self, input: &[u8]) {
        if self.state != State::Stopped {
            self.pending.extend_from_slice(input);
            self.check_pending_size();
        }
    }

    fn check_pending_size(&mut self) {
        let limit = match self.state {
            State::ChunkSize => MAX_CHUNK_LINE,
            _ => self.max_head,
        };
        if self.pending.len() > limit {
            let v = if self.state == State::Head {
                HeadVerdict::Unparsable
            } else {
                HeadVerdict::BadChunk
            };
            self.refuse(v);
        }
    }

    /// Parses one head, chunk-size line or trailer section at the start of `buf`; returns
    /// how many bytes it took, or `None` if it is incomplete (or refused). An element over
    /// its limit is refused here as it is while it is pending, so the verdict does not
    /// depend on whether it came in one read or several.
    fn element(&mut self, buf: &[u8]) -> Option<usize> {
        match self.state {
            State::Head => self.head(buf),
            State::ChunkSize => match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((used, _))) if used > MAX_CHUNK_LINE => {
                    self.refuse(HeadVerdict::BadChunk);
                    None
                }
                Ok(httparse::Status::Complete((used, 0))) => {
                    self.state = State::Trailers;
                    Some(used)
                }
                Ok(httparse::Status::Complete((used, size))) => {
                    self.state = State::ChunkData(size);
                    Some(used)
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => {
                    self.refuse(HeadVerdict::BadChunk);
                    None
                }
            },
            State::Trailers => {
                if buf.starts_with(b"\r\n") {
                    self.state = State::Head;
                    return Some(2);
                }
                if buf.len() < 2 {
                    return None;
                }
                let end = memchr::memmem::find(buf, b"\r\n\r\n")?;
                if end + 4 > self.max_head {
                    self.refuse(HeadVerdict::BadChunk);
                    return None;
                }
                self.state = State::Head;
                Some(end + 4)
            }
            _ => Some(0),
        }
    }

    fn head(&mut self, buf: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(buf) {
            Ok(httparse::Status::Complete(used)) if used > self.max_head => {
                self.refuse(HeadVerdict::Unparsable);
                return None;
            }
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.refuse(HeadVerdict::Unparsable);
                return None;
            }
        };
        let mut content_length: Option<u64> = None;
        let mut lengths = 0;
        let mut encodings = 0;
        let mut chunked = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                let digits = h.value.trim_ascii();
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    self.refuse(HeadVerdict::BadContentLength);
                    return None;
                }
                content_length = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok());
                if content_length.is_none() {
                    self.refuse(HeadVerdict::BadContentLength);
                    return None;
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                encodings += 1;
                chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        }
        let verdict = if lengths > 0 && encodings > 0 {
            HeadVerdict::ContentLengthAndTransferEncoding
        } else if lengths > 1 {
            HeadVerdict::DuplicateContentLength
        } else if encodings > 1 || (encodings == 1 && !chunked) {
            HeadVerdict::UnsupportedTransferEncoding
        } else {
            HeadVerdict::Ok
        };
        if verdict != HeadVerdict::Ok {
            self.refuse(verdict);
            return None;
        }
        self.verdicts.push(HeadVerdict::Ok);
        self.state = if req.method == Some("CONNECT") {
            // What follows is the tunnel, inspected by its own connection if intercepted.
            State::Stopped
        } else if chunked {
            State::ChunkSize
        } else {
            match content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
        Some(used)
    }
}

/// The agent's stream with every byte read passed through [`Framing`] first.
pub struct Inspect<I> {
    inner: I,
    framing: Framing,
}

impl<I> Inspect<I> {
    /// Wraps `inner`; heads larger than `max_head` bytes are refused.
    pub fn new(inner: I, max_head: usize) -> (Self, Verdicts) {
        let verdicts = Verdicts::default();
        (
            Inspect {
                inner,
                framing: Framing::new(max_head, verdicts.clone()),
            },
            verdicts,
        )
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Inspect<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            // The verdicts are queued before hyper can see the bytes of the head.
            this.framing.feed(&buf.filled()[before..]);
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Inspect<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` split at every `step` bytes and returns the verdicts in order.
    fn verdicts(stream: &[u8], step: usize) -> Vec<HeadVerdict> {
        let v = Verdicts::default();
        let mut f = Framing::new(8192, v.clone());
        for chunk in stream.chunks(step) {
            f.feed(chunk);
        }
        std::iter::from_fn(|| v.next()).collect()
    }

    fn every_split(stream: &[u8]) -> Vec<HeadVerdict> {
        let whole = verdicts(stream, stream.len().max(1));
        for step in 1..stream.len() {
            assert_eq!(verdicts(stream, step), whole, "split every {step} bytes");
        }
        whole
    }

    use HeadVerdict::*;

    #[test]
    fn pipelined_requests_with_bodies_are_followed() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nTrailer-A: 1\r\n\r\n\
            POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            GET /e HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(every_split(stream), vec![Ok; 5]);
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_not_a_head() {
        // The body carries a smuggled CL+TE head; it is body, not a request.
        let inner = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            inner.len()
        )
        .into_bytes();
        stream.extend_from_slice(inner);
        stream.extend_from_slice(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(every_split(&stream), vec![Ok, Ok]);
    }

    #[test]
    fn ambiguous_framing_is_flagged_and_nothing_after_it_is_trusted() {
        let cl_te = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(every_split(cl_te), vec![ContentLengthAndTransferEncoding]);
        let te_cl = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(every_split(te_cl), vec![ContentLengthAndTransferEncoding]);
        let same = b"POST /a HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd";
        assert_eq!(every_split(same), vec![DuplicateContentLength]);
        let differ = b"POST /a HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd";
        assert_eq!(every_split(differ), vec![DuplicateContentLength]);
        let signed = b"POST /a HTTP/1.1\r\nContent-Length: +4\r\n\r\nabcd";
        assert_eq!(every_split(signed), vec![BadContentLength]);
        let gzip = b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(every_split(gzip), vec![UnsupportedTransferEncoding]);
        let twice =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(every_split(twice), vec![UnsupportedTransferEncoding]);
    }

    #[test]
    fn heads_hyper_would_refuse_are_flagged_too() {
        let fold = b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n";
        assert_eq!(every_split(fold), vec![Unparsable]);
        let space = b"POST /a HTTP/1.1\r\nContent-Length : 4\r\n\r\nabcd";
        assert_eq!(every_split(space), vec![Unparsable]);
        let v = Verdicts::default();
        let mut f = Framing::new(64, v.clone());
        f.feed(b"GET /a HTTP/1.1\r\n");
        f.feed(&[b'a'; 100]);
        assert_eq!(v.next(), Some(Unparsable), "head over the limit");
    }

    #[test]
    fn bad_chunks_are_flagged() {
        let no_crlf = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n";
        assert_eq!(every_split(no_crlf), vec![Ok, BadChunk]);
        let not_hex = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(every_split(not_hex), vec![Ok, BadChunk]);
    }

    #[test]
    fn connect_stops_following() {
        let stream = b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n\x16\x03\x01garbage";
        assert_eq!(every_split(stream), vec![Ok]);
    }

    /// One piece of an agent's stream: a request (head and body, well or badly framed) or
    /// bytes that are none.
    fn piece() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let body = proptest::collection::vec(any::<u8>(), 0..40);
        let chunks = proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 1..20), ";e=1|"),
            0..4,
        );
        let trailers = proptest::collection::vec("[A-Za-z-]{1,8}: [a-z0-9 ]{0,8}", 0..3);
        let headers = proptest::collection::vec(
            "(Host: x|X-Long: [a-z]{0,300}|Content-Length: ?[0-9]{1,2}|Content-Length: 1x|Transfer-Encoding: (chunked|gzip|Chunked)|Bad Header: 1)",
            0..4,
        );
        prop_oneof![
            8 => ("(GET|POST|PUT|CONNECT) /[a-z]{0,8} HTTP/1[.]1", headers, body, chunks, trailers).prop_map(
                |(line, headers, body, chunks, trailers)| {
                    let mut out = format!("{line}\r\n").into_bytes();
                    let mut chunked = false;
                    let mut length = None;
                    for h in &headers {
                        out.extend_from_slice(h.as_bytes());
                        out.extend_from_slice(b"\r\n");
                        chunked |= h.ends_with("chunked");
                        if let Some(n) = h.strip_prefix("Content-Length:") {
                            length = n.trim().parse::<usize>().ok();
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                    if chunked {
                        for (data, ext) in chunks {
                            out.extend_from_slice(format!("{:x}{ext}\r\n", data.len()).as_bytes());
                            out.extend_from_slice(&data);
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"0\r\n");
                        for t in trailers {
                            out.extend_from_slice(t.as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"\r\n");
                    } else if let Some(n) = length {
                        out.extend(body.iter().copied().cycle().take(n));
                    }
                    out
                }
            ),
            1 => proptest::collection::vec(any::<u8>(), 1..30),
        ]
    }

    proptest::proptest! {
        /// The verdicts depend on the bytes the agent sent, never on how the network cut
        /// them into reads: a request that is refused whole is refused in pieces, and the
        /// reverse.
        #[test]
        fn verdicts_do_not_depend_on_how_the_stream_is_split(
            pieces in proptest::collection::vec(piece(), 1..5),
            cuts in proptest::collection::vec(1usize..64, 0..40),
            max_head in proptest::sample::select(vec![64usize, 256, 8192]),
        ) {
            let stream = pieces.concat();
            let run = |reads: &mut dyn Iterator<Item = &[u8]>| {
                let v = Verdicts::default();
                let mut f = Framing::new(max_head, v.clone());
                for read in reads {
                    f.feed(read);
                }
                std::iter::from_fn(|| v.next()).collect::<Vec<_>>()
            };
            let whole = run(&mut std::iter::once(&stream[..]));
            let mut rest = &stream[..];
            let mut reads = Vec::new();
            for cut in cuts {
                let (read, after) = rest.split_at(cut.min(rest.len()));
                reads.push(read);
                rest = after;
            }
            reads.push(rest);
            let split = run(&mut reads.into_iter());
            proptest::prop_assert_eq!(&split, &whole, "{:?}", String::from_utf8_lossy(&stream));
        }
    }

    #[test]
    fn a_head_over_the_limit_is_refused_whole_as_in_pieces() {
        let stream = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(100));
        let fed = |step: usize| {
            let v = Verdicts::default();
            let mut f = Framing::new(64, v.clone());
            for read in stream.as_bytes().chunks(step) {
                f.feed(read);
            }
            std::iter::from_fn(|| v.next()).collect::<Vec<_>>()
        };
        assert_eq!(fed(stream.len()), vec![Unparsable]);
        assert_eq!(fed(40), vec![Unparsable]);
    }

    #[tokio::test]
    async fn the_adapter_queues_verdicts_before_the_bytes_are_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut agent, gateway_side) = tokio::io::duplex(4096);
        let (mut inspect, verdicts) = Inspect::new(gateway_side, 8192);
        agent
            .write_all(b"GET / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        drop(agent);
        let mut all = Vec::new();
        inspect.read_to_end(&mut all).await.unwrap();
        assert_eq!(verdicts.next(), Some(ContentLengthAndTransferEncoding));
        assert_eq!(verdicts.next(), None);
    }
}
