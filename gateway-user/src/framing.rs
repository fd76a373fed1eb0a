//! The strict framing check on every request of a kept-alive HTTP/1.1 connection.
//!
//! hyper parses what the workload sends, but it resolves some ambiguities by itself (a
//! Content-Length next to Transfer-Encoding, bare LF line ends). The gateway refuses them
//! instead, on every request head, not only the first: [`Guarded`] sits between the client
//! socket and hyper and follows the message boundaries as the bytes go by (head, then a body of
//! Content-Length bytes or chunks), checking each head with [`head_framing`], the same check
//! the first head gets before hyper reads it. On a violation it stops the stream
//! with an error, hyper drops the connection, and the reason is kept for the audit record.
use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// How a request's body is delimited, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Checks a request head strictly and says how its body is delimited: no leading blank line,
/// CRLF line ends only, no whitespace in or before a header name, at most one Host (two would
/// leave which host the request is for to whoever reads it), one Content-Length (digits) or
/// `Transfer-Encoding: chunked`, never both.
pub fn head_framing(head: &[u8]) -> Result<Framing, &'static str> {
    if head.first().is_some_and(|b| *b == b'\r' || *b == b'\n') {
        return Err("leading_empty_line");
    }
    let Some(end) = memchr::memmem::find(head, b"\r\n\r\n") else {
        return Err("incomplete_head");
    };
    let head = &head[..end + 2];
    if head
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
    {
        return Err("bare_lf_in_head");
    }
    let (mut length, mut lengths, mut codings, mut hosts) = (None, 0, Vec::new(), 0);
    for line in head.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Err("malformed_header");
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(u8::is_ascii_whitespace) {
            return Err("whitespace_in_header_name");
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings.push(value);
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
    }
    if hosts > 1 {
        return Err("duplicate_host");
    }
    if lengths > 1 {
        return Err("duplicate_content_length");
    }
    if lengths == 1 && !codings.is_empty() {
        return Err("content_length_with_transfer_encoding");
    }
    if codings.len() > 1 || codings.first().is_some_and(|v| *v != b"chunked") {
        return Err("unsupported_transfer_encoding");
    }
    match (lengths, codings.is_empty()) {
        (1, _) => length.map(Framing::Length).ok_or("invalid_content_length"),
        (_, false) => Ok(Framing::Chunked),
        _ => Ok(Framing::None),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Inside a body of known length: bytes left.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data: bytes of it seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
}

/// Follows request boundaries in the byte stream from the workload.
#[derive(Debug)]
pub struct RequestFraming {
    state: State,
    line: Vec<u8>,
}

impl Default for RequestFraming {
    fn default() -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
        }
    }
}

impl RequestFraming {
    /// Whether the stream stands inside a request head: some of it read, not its end.
    pub fn mid_head(&self) -> bool {
        self.state == State::Head && !self.line.is_empty()
    }

    /// Takes the next bytes of the stream; an error names the first violation.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), &'static str> {
        while !data.is_empty() {
            match self.state {
                State::Head => {
                    let (taken, end) = take_until(&self.line, data, b"\r\n\r\n");
                    let from = self.line.len();
                    self.line.extend_from_slice(&data[..taken]);
                    data = &data[taken..];
                    // A line end without CR is refused as it arrives: a head of bare LFs never
                    // shows the CRLF CRLF end, and hyper would accept it.
                    let bare_lf = (from..self.line.len())
                        .any(|i| self.line[i] == b'\n' && (i == 0 || self.line[i - 1] != b'\r'));
                    if bare_lf {
                        return Err("bare_lf_in_head");
                    }
                    if !end {
                        if self.line.len() > MAX_HEAD {
                            return Err("head_too_large");
                        }
                        // A head never starts with a line end (no blank line before a request).
                        if self
                            .line
                            .first()
                            .is_some_and(|b| *b == b'\r' || *b == b'\n')
                        {
                            return Err("leading_empty_line");
                        }
                        continue;
                    }
                    if self.line.len() > MAX_HEAD {
                        return Err("head_too_large");
                    }
                    self.state = match head_framing(&self.line)? {
                        Framing::None | Framing::Length(0) => State::Head,
                        Framing::Length(n) => State::Body(n),
                        Framing::Chunked => State::ChunkSize,
                    };
                    self.line.clear();
                }
                State::Body(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[usize::try_from(n).unwrap_or(data.len())..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let (taken, end) = take_until(&self.line, data, b"\n");
                    self.line.extend_from_slice(&data[..taken]);
                    data = &data[taken..];
                    if self.line.len() > MAX_LINE {
                        return Err("chunk_line_too_long");
                    }
                    if !end {
                        continue;
                    }
                    let Some(line) = self.line.strip_suffix(b"\r\n") else {
                        return Err("bare_lf_in_chunked_body");
                    };
                    if self.state == State::Trailers {
                        if line.is_empty() {
                            self.state = State::Head;
                        } else if line.contains(&b'\r') {
                            return Err("malformed_trailer");
                        }
                    } else {
                        let size = chunk_size(line)?;
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    self.line.clear();
                }
                State::ChunkData(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[usize::try_from(n).unwrap_or(data.len())..];
                    self.state = if n == left {
                        State::ChunkEnd(0)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[0] != want {
                        return Err("chunk_without_crlf");
                    }
                    data = &data[1..];
                    self.state = if seen == 0 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
            }
        }
        Ok(())
    }
}

/// How many bytes of `data` to take so that `line + taken` ends with `end` at the first place it
/// can, and whether it does.
fn take_until(line: &[u8], data: &[u8], end: &[u8]) -> (usize, bool) {
    // A terminator straddling what was collected and what just arrived starts in the kept
    // tail of `line` (which holds no whole terminator): look in that seam first, then in
    // `data` alone.
    debug_assert!((1..=8).contains(&end.len()), "terminators are short");
    let keep = line.len().min(end.len() - 1);
    let mut seam = [0u8; 16];
    let head = data.len().min(end.len() - 1);
    if keep > 0 {
        seam[..keep].copy_from_slice(&line[line.len() - keep..]);
        seam[keep..keep + head].copy_from_slice(&data[..head]);
        if let Some(at) = memchr::memmem::find(&seam[..keep + head], end) {
            return (at + end.len() - keep, true);
        }
    }
    match memchr::memmem::find(data, end) {
        Some(at) => (at + end.len(), true),
        None => (data.len(), false),
    }
}

/// A chunk-size line: hex digits, optionally `;` and extensions, nothing else.
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("invalid_chunk_size");
    }
    let text = std::str::from_utf8(digits).map_err(|_| "invalid_chunk_size")?;
    u64::from_str_radix(text, 16).map_err(|_| "invalid_chunk_size")
}

/// What [`Guarded`] saw of the workload's stream, for the connection's audit record.
#[derive(Debug, Default)]
pub struct Seen {
    /// The first violation, if any.
    pub refused: OnceLock<&'static str>,
    mid_head: AtomicBool,
}

impl Seen {
    /// Whether what was read so far ends inside a request head: a request begun and not
    /// finished, which no request record covers.
    pub fn mid_head(&self) -> bool {
        self.mid_head.load(Ordering::Relaxed)
    }
}

/// The client socket as hyper sees it: reads are checked by [`RequestFraming`]; writes pass.
pub struct Guarded<S> {
    inner: S,
    framing: RequestFraming,
    seen: Arc<Seen>,
}

impl<S> Guarded<S> {
    /// Wraps `inner`; what it sees is kept in `seen`.
    pub fn new(inner: S, seen: Arc<Seen>) -> Self {
        Self {
            inner,
            framing: RequestFraming::default(),
            seen,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.seen.refused.get().is_some() {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::InvalidData)));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(reason) = this.framing.feed(&buf.filled()[before..]) {
                    let _ = this.seen.refused.set(reason);
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
                this.seen
                    .mid_head
                    .store(this.framing.mid_head(), Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `take_until` against its definition (byte by byte), on random pieces of a small
    /// alphabet where terminators straddle pieces often.
    #[test]
    fn take_until_agrees_with_its_definition() {
        fn reference(line: &[u8], data: &[u8], end: &[u8]) -> (usize, bool) {
            let mut all = line.to_vec();
            for (i, b) in data.iter().enumerate() {
                all.push(*b);
                if all.ends_with(end) {
                    return (i + 1, true);
                }
            }
            (data.len(), false)
        }
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15_u64);
        for _ in 0..20_000 {
            let end: &[u8] = if next(2) == 0 { b"\r\n\r\n" } else { b"\n" };
            let mut word = |max: u64| -> Vec<u8> {
                (0..next(max)).map(|_| b"\r\nx"[next(3) as usize]).collect()
            };
            let mut line = word(6);
            // What was collected never holds a whole terminator.
            while let Some(at) = memchr::memmem::find(&line, end) {
                line.truncate(at);
            }
            let data = word(12);
            assert_eq!(
                take_until(&line, &data, end),
                reference(&line, &data, end),
                "{line:?} + {data:?} until {end:?}"
            );
        }
    }

    /// Feeds `stream` whole and one byte at a time; both must agree.
    fn check(stream: &[u8]) -> Result<(), &'static str> {
        let whole = RequestFraming::default().feed(stream);
        let mut bytewise = RequestFraming::default();
        let split = stream
            .iter()
            .try_for_each(|b| bytewise.feed(std::slice::from_ref(b)));
        assert_eq!(whole, split, "whole and byte-by-byte disagree");
        whole
    }

    #[test]
    fn follows_requests_across_a_kept_alive_connection() {
        let ok: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(check(ok), Ok(()));
    }

    #[test]
    fn refuses_ambiguous_framing_in_a_later_request() {
        let first = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for (second, reason) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "content_length_with_transfer_encoding",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                "duplicate_content_length",
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n",
                "duplicate_host",
            ),
            ("GET / HTTP/1.1\nHost: x\r\n\r\n", "bare_lf_in_head"),
            ("GET / HTTP/1.1\nHost: x\n\n", "bare_lf_in_head"),
            ("\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", "leading_empty_line"),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                "invalid_content_length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid_chunk_size",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",
                "chunk_without_crlf",
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n",
                "bare_lf_in_chunked_body",
            ),
        ] {
            let stream = format!("{first}{second}");
            assert_eq!(check(stream.as_bytes()), Err(reason), "{second:?}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_body() {
        // Smuggling attempt: the body of the first request holds a second head. With the
        // length honoured it is body, never a request.
        let inner = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
        let stream = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{inner}GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            inner.len()
        );
        assert_eq!(check(stream.as_bytes()), Ok(()));
    }

    #[test]
    fn oversized_heads_are_refused() {
        let stream = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(check(stream.as_bytes()), Err("head_too_large"));
    }
}
