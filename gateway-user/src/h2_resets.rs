//! The stream resets the gateway sends an HTTP/2 client, watched as they are written.
//!
//! hyper refuses some HTTP/2 requests before they reach the gateway's handler: a malformed
//! header block (an upper-case or connection-specific header name, a missing or repeated
//! pseudo-header), or a stream past the concurrent-stream limit. The client gets a
//! `RST_STREAM` and hyper says nothing, so such a request would leave no audit record. The
//! client connection's write side is parsed frame by frame (a server's bytes are frames from
//! the first one on), and each `RST_STREAM` with a code that means "your request was refused"
//! is reported.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const FRAME_HEADER: usize = 9;
const RST_STREAM: u8 = 0x3;

/// Why the gateway reset a client's stream, for the codes that refuse a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `PROTOCOL_ERROR`: the request (or its body's framing) broke HTTP/2's rules.
    Malformed,
    /// `REFUSED_STREAM`: more streams at once than the connection allows.
    TooManyStreams,
}

impl Refusal {
    fn of_code(code: u32) -> Option<Self> {
        match code {
            0x1 => Some(Self::Malformed),
            0x7 => Some(Self::TooManyStreams),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "h2_stream_reset_protocol_error",
            Self::TooManyStreams => "h2_stream_refused",
        }
    }
}

/// Where the parse of the written bytes stands.
#[derive(Debug, Default)]
struct Frames {
    /// The header of the frame being read, and how much of it has been seen.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// A `RST_STREAM`'s error code as it arrives.
    code: [u8; 4],
    code_have: usize,
    is_reset: bool,
}

impl Frames {
    /// Feeds written bytes; calls `refused` for each complete `RST_STREAM` that refuses.
    fn feed(&mut self, mut bytes: &[u8], refused: &mut impl FnMut(Refusal)) {
        while !bytes.is_empty() {
            if self.payload_left == 0 && self.have < FRAME_HEADER {
                let take = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have == FRAME_HEADER {
                    let h = self.header;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    self.is_reset = h[3] == RST_STREAM;
                    self.code_have = 0;
                    if self.payload_left == 0 {
                        self.have = 0;
                    }
                }
                continue;
            }
            let take = self.payload_left.min(bytes.len());
            if self.is_reset && self.code_have < 4 {
                let n = (4 - self.code_have).min(take);
                self.code[self.code_have..self.code_have + n].copy_from_slice(&bytes[..n]);
                self.code_have += n;
                if self.code_have == 4 {
                    if let Some(r) = Refusal::of_code(u32::from_be_bytes(self.code)) {
                        refused(r);
                    }
                }
            }
            self.payload_left -= take;
            bytes = &bytes[take..];
            if self.payload_left == 0 {
                self.have = 0;
            }
        }
    }
}

/// A client connection whose written frames are watched for refusing resets.
pub struct Watched<S, F> {
    inner: S,
    frames: Frames,
    refused: F,
}

impl<S, F: FnMut(Refusal)> Watched<S, F> {
    pub fn new(inner: S, refused: F) -> Self {
        Self {
            inner,
            frames: Frames::default(),
            refused,
        }
    }
}

impl<S: AsyncRead + Unpin, F: Unpin> AsyncRead for Watched<S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, F: FnMut(Refusal) + Unpin> AsyncWrite for Watched<S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.frames.feed(&buf[..n], &mut this.refused);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = written {
            for buf in bufs {
                let seen = n.min(buf.len());
                this.frames.feed(&buf[..seen], &mut this.refused);
                n -= seen;
                if n == 0 {
                    break;
                }
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("len").to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A server's bytes: SETTINGS, a DATA frame whose payload looks like a reset, resets with
    /// PROTOCOL_ERROR, CANCEL and REFUSED_STREAM, an empty frame. Fed whole and split at every
    /// byte, the same two refusals are found, and nothing in DATA is taken for a frame.
    #[test]
    fn refusing_resets_are_found_wherever_the_writes_split_the_frames() {
        let fake = frame(RST_STREAM, 1, &1u32.to_be_bytes());
        let stream: Vec<u8> = [
            frame(0x4, 0, &[0, 3, 0, 0, 0, 64]),
            frame(0x0, 1, &fake),
            frame(RST_STREAM, 1, &1u32.to_be_bytes()),
            frame(RST_STREAM, 3, &8u32.to_be_bytes()),
            frame(0x4, 0, &[]),
            frame(RST_STREAM, 5, &7u32.to_be_bytes()),
        ]
        .concat();
        let want = [Refusal::Malformed, Refusal::TooManyStreams];
        let mut found = Vec::new();
        Frames::default().feed(&stream, &mut |r| found.push(r));
        assert_eq!(found, want);
        for split in 1..stream.len() {
            let mut found = Vec::new();
            let mut frames = Frames::default();
            frames.feed(&stream[..split], &mut |r| found.push(r));
            frames.feed(&stream[split..], &mut |r| found.push(r));
            assert_eq!(found, want, "split at {split}");
        }
        let mut found = Vec::new();
        let mut frames = Frames::default();
        for b in &stream {
            frames.feed(std::slice::from_ref(b), &mut |r| found.push(r));
        }
        assert_eq!(found, want, "a byte at a time");
    }
}
