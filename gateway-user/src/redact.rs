//! A response body that never carries a secret: any occurrence of the secret's bytes is
//! replaced, also when it spans frames. Only the longest suffix of a frame that could begin
//! the secret is held back, so streamed events (SSE) are not delayed.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

const MASK: &[u8] = b"[REDACTED]";

pub struct Redact<B> {
    inner: B,
    secrets: Vec<Vec<u8>>,
    carry: BytesMut,
    done: bool,
}

impl<B> Redact<B> {
    /// Redacts every form in `secrets` (the raw secret and its encodings).
    pub fn new(inner: B, secrets: Vec<Vec<u8>>) -> Self {
        Self {
            inner,
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            carry: BytesMut::new(),
            done: false,
        }
    }
}

impl<B> Drop for Redact<B> {
    fn drop(&mut self) {
        // Best effort: do not leave the secret in freed memory.
        self.secrets
            .iter_mut()
            .for_each(|s| s.iter_mut().for_each(|b| *b = 0));
    }
}

/// Replaces every occurrence of any of `secrets` in `data`; returns the output and how many
/// bytes at the end were held back because they could start one of them.
pub fn scrub(data: &[u8], secrets: &[Vec<u8>], last: bool) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    'outer: while i < data.len() {
        for secret in secrets {
            if !secret.is_empty() && data[i..].starts_with(secret) {
                out.extend_from_slice(MASK);
                i += secret.len();
                continue 'outer;
            }
        }
        if !last
            && secrets
                .iter()
                .any(|s| !s.is_empty() && s.starts_with(&data[i..]))
        {
            return (out, data.len() - i);
        }
        out.push(data[i]);
        i += 1;
    }
    (out, 0)
}

impl<B> Body for Redact<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    this.carry.extend_from_slice(&data);
                    let (out, held) = scrub(&this.carry, &this.secrets, false);
                    let keep = this.carry.split_off(this.carry.len() - held);
                    this.carry = keep;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                this.done = true;
                if this.carry.is_empty() {
                    return Poll::Ready(None);
                }
                let (out, _) = scrub(&this.carry, &this.secrets, true);
                this.carry.clear();
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_whole_and_split_secrets() {
        let s = &[b"sk-live-XYZ".to_vec()];
        assert_eq!(
            scrub(b"key=sk-live-XYZ;", s, false),
            (b"key=[REDACTED];".to_vec(), 0)
        );
        let (out, held) = scrub(b"data: sk-li", s, false);
        assert_eq!((out.as_slice(), held), (&b"data: "[..], 5));
        let (out, held) = scrub(b"sk-live-XYZ\n\n", s, false);
        assert_eq!((out.as_slice(), held), (&b"[REDACTED]\n\n"[..], 0));
        // An event ending in bytes that cannot start the secret is not held back.
        assert_eq!(scrub(b"data: {}\n\n", s, false).1, 0);
        assert_eq!(scrub(b"sk-li", s, true), (b"sk-li".to_vec(), 0));
        let both = &[b"k+y/=".to_vec(), b"k%2By%2F%3D".to_vec()];
        assert_eq!(
            scrub(b"a k%2By%2F%3D b k+y/= c", both, true).0,
            b"a [REDACTED] b [REDACTED] c".to_vec()
        );
    }
}
