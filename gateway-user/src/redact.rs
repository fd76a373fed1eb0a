//! A response body that never carries a secret: any occurrence of the secret's bytes is
//! masked in place, also when it spans frames. The mask has the length of what it covers, so
//! a response keeps its Content-Length. Only the longest suffix of a frame that could begin
//! the secret is held back, so streamed events (SSE) are not delayed.
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use secrecy::zeroize::Zeroize;

const MASK: &[u8] = b"[REDACTED]";

/// What replaces `len` bytes of a secret: `[REDACTED]` padded with `*` to that length, or
/// only `*` where the secret is shorter than the word.
fn push_mask(out: &mut Vec<u8>, len: usize) {
    let word = if len >= MASK.len() { MASK } else { &[] };
    out.extend_from_slice(word);
    out.resize(out.len() + len - word.len(), b'*');
}

/// The forms one secret can be echoed in (raw and its encodings), each non-empty and once;
/// zeroed when the last holder lets go.
pub struct Secrets(Vec<Vec<u8>>);

impl Secrets {
    pub fn new(forms: Vec<Vec<u8>>) -> Self {
        let mut forms: Vec<Vec<u8>> = forms.into_iter().filter(|s| !s.is_empty()).collect();
        forms.sort();
        forms.dedup_by(|later, earlier| {
            let same = later == earlier;
            if same {
                later.zeroize();
            }
            same
        });
        Self(forms)
    }

    pub fn forms(&self) -> &[Vec<u8>] {
        &self.0
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(Zeroize::zeroize);
    }
}

/// A response body with every form of a secret masked, in its data and in its trailers (an
/// upstream can echo a secret in a trailer as well as in a header; HTTP/2 workloads get
/// trailers). Trailers are scrubbed rather than dropped: a gRPC-style answer needs them.
pub struct Redact<B> {
    inner: B,
    secrets: Arc<Secrets>,
    carry: BytesMut,
    /// Trailers that came while bytes were held back: they go after those bytes.
    trailers: Option<Frame<Bytes>>,
    done: bool,
}

impl<B> Redact<B> {
    /// Redacts every form in `secrets` (the raw secret and its encodings).
    pub fn new(inner: B, secrets: Arc<Secrets>) -> Self {
        Self {
            inner,
            secrets,
            carry: BytesMut::new(),
            trailers: None,
            done: false,
        }
    }
}

/// The first occurrence of any of `secrets` in `data`, as (offset, length); at equal offsets
/// the earlier secret in the list.
fn first_hit(data: &[u8], secrets: &[Vec<u8>]) -> Option<(usize, usize)> {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| memchr::memmem::find(data, s).map(|at| (at, s.len())))
        .fold(None, |best, hit| match best {
            Some((at, _)) if at <= hit.0 => best,
            _ => Some(hit),
        })
}

/// Where the tail of `data` that could be the start of one of `secrets` begins, if it has one.
fn held_from(data: &[u8], secrets: &[Vec<u8>]) -> Option<usize> {
    let longest = secrets.iter().map(Vec::len).max().unwrap_or(0);
    (data.len().saturating_sub(longest.saturating_sub(1))..data.len()).find(|&at| {
        secrets
            .iter()
            .any(|s| s.len() > data.len() - at && s.starts_with(&data[at..]))
    })
}

/// Replaces every occurrence of any of `secrets` in `data`; returns the output and how many
/// bytes at the end were held back because they could start one of them (none if `last`).
pub fn scrub(data: &[u8], secrets: &[Vec<u8>], last: bool) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    loop {
        let hit = first_hit(rest, secrets);
        let held = if last { None } else { held_from(rest, secrets) };
        // A secret found before (or where) the held-back tail starts is replaced first.
        if let Some((at, len)) = hit.filter(|&(at, _)| held.is_none_or(|h| at <= h)) {
            out.extend_from_slice(&rest[..at]);
            push_mask(&mut out, len);
            rest = &rest[at + len..];
            continue;
        }
        let kept = held.unwrap_or(rest.len());
        out.extend_from_slice(&rest[..kept]);
        return (out, rest.len() - kept);
    }
}

/// Whether [`scrub`] would change or hold back anything of `data`.
pub fn is_clean(data: &[u8], secrets: &[Vec<u8>]) -> bool {
    first_hit(data, secrets).is_none() && held_from(data, secrets).is_none()
}

/// Replaces every form of the secret in header values: a response's (a redirect's Location
/// may carry a query parameter the gateway injected) and its trailers'.
pub fn scrub_headers(headers: &mut HeaderMap, forms: &[Vec<u8>]) {
    for value in headers.values_mut() {
        if is_clean(value.as_bytes(), forms) {
            continue;
        }
        let (clean, _) = scrub(value.as_bytes(), forms, true);
        if clean != value.as_bytes() {
            if let Ok(v) = HeaderValue::from_bytes(&clean) {
                *value = v;
            }
        }
    }
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
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let secrets = this.secrets.forms();
                    if this.carry.is_empty() && is_clean(&data, secrets) {
                        // Nothing to replace or hold back: the frame goes on as it is.
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    this.carry.extend_from_slice(&data);
                    let (out, held) = scrub(&this.carry, secrets, false);
                    let keep = this.carry.split_off(this.carry.len() - held);
                    this.carry = keep;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
                }
                Err(frame) => {
                    let frame = match frame.into_trailers() {
                        Ok(mut trailers) => {
                            scrub_headers(&mut trailers, this.secrets.forms());
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    };
                    if this.carry.is_empty() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // Nothing comes after trailers: the bytes held back go first.
                    let (out, _) = scrub(&this.carry, this.secrets.forms(), true);
                    this.carry.clear();
                    this.trailers = Some(frame);
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
                }
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                this.done = true;
                if this.carry.is_empty() {
                    return Poll::Ready(None);
                }
                let (out, _) = scrub(&this.carry, this.secrets.forms(), true);
                this.carry.clear();
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
        }
    }

    /// The inner body's: masking keeps the length.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }

    /// Ended when the inner body has and nothing is held back (a body-less answer such as a
    /// 304 with a Content-Length header is known to be empty, as without redaction).
    fn is_end_stream(&self) -> bool {
        self.trailers.is_none()
            && (self.done || (self.carry.is_empty() && self.inner.is_end_stream()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: at each offset, a secret that starts there is replaced; else, if the
    /// rest could start one, it is held back.
    fn reference(data: &[u8], secrets: &[Vec<u8>], last: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut i = 0;
        'outer: while i < data.len() {
            for secret in secrets.iter().filter(|s| !s.is_empty()) {
                if data[i..].starts_with(secret) {
                    push_mask(&mut out, secret.len());
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

    #[test]
    fn scrub_agrees_with_its_definition() {
        // Small alphabet, overlapping secrets: every kind of partial and nested match.
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d_u64);
        for _ in 0..20_000 {
            let mut word = |max: u64| -> Vec<u8> {
                (0..next(max)).map(|_| b"abc"[next(3) as usize]).collect()
            };
            let secrets = vec![word(5), word(5), word(3)];
            let data = word(24);
            for last in [false, true] {
                let (out, held) = scrub(&data, &secrets, last);
                assert_eq!(
                    (out.clone(), held),
                    reference(&data, &secrets, last),
                    "{:?} in {:?}",
                    secrets,
                    String::from_utf8_lossy(&data)
                );
                // What is passed on and what is held back add up to what came in.
                assert_eq!(out.len() + held, data.len());
            }
            assert_eq!(
                is_clean(&data, &secrets),
                reference(&data, &secrets, false) == (data.clone(), 0)
            );
        }
    }

    #[test]
    fn secrets_are_scrubbed_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "location",
            HeaderValue::from_static("/api/items/?key=sk-1%2B2"),
        );
        h.insert("x-ok", HeaderValue::from_static("fine"));
        scrub_headers(&mut h, &[b"sk-1+2".to_vec(), b"sk-1%2B2".to_vec()]);
        assert_eq!(
            h.get("location").and_then(|v| v.to_str().ok()),
            Some("/api/items/?key=********")
        );
        assert_eq!(h.get("x-ok").and_then(|v| v.to_str().ok()), Some("fine"));
    }

    /// A body's frames as they come: data, then trailers.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Trailers are scrubbed like headers, and come after every byte of data, also the bytes
    /// held back because they could begin the secret.
    #[test]
    fn trailers_are_scrubbed_and_come_last() {
        use http_body_util::BodyExt;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", HeaderValue::from_static("Bearer sk-live-XYZ"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Frames(
            [
                Frame::data(Bytes::from_static(b"data: sk-li")),
                Frame::trailers(trailers),
            ]
            .into(),
        );
        let secrets = Arc::new(Secrets::new(vec![b"sk-live-XYZ".to_vec()]));
        let frames: Vec<Frame<Bytes>> = block_on(async {
            let mut body = Redact::new(body, secrets);
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push(frame.expect("frame"));
            }
            frames
        });
        let data: Vec<u8> = frames
            .iter()
            .filter_map(Frame::data_ref)
            .flat_map(|d| d.to_vec())
            .collect();
        assert_eq!(data, b"data: sk-li");
        let last = frames
            .last()
            .and_then(Frame::trailers_ref)
            .expect("trailers last");
        assert_eq!(
            last.get("x-echo").and_then(|v| v.to_str().ok()),
            Some("Bearer [REDACTED]*")
        );
        assert_eq!(
            last.get("grpc-status").and_then(|v| v.to_str().ok()),
            Some("0")
        );
        assert_eq!(frames.iter().filter(|f| f.is_trailers()).count(), 1);
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn scrubs_whole_and_split_secrets() {
        let s = &[b"sk-live-XYZ".to_vec()];
        assert_eq!(
            scrub(b"key=sk-live-XYZ;", s, false),
            (b"key=[REDACTED]*;".to_vec(), 0)
        );
        let (out, held) = scrub(b"data: sk-li", s, false);
        assert_eq!((out.as_slice(), held), (&b"data: "[..], 5));
        let (out, held) = scrub(b"sk-live-XYZ\n\n", s, false);
        assert_eq!((out.as_slice(), held), (&b"[REDACTED]*\n\n"[..], 0));
        // An event ending in bytes that cannot start the secret is not held back.
        assert_eq!(scrub(b"data: {}\n\n", s, false).1, 0);
        assert_eq!(scrub(b"sk-li", s, true), (b"sk-li".to_vec(), 0));
        // A secret held back across a shorter one it contains; both at the end of the stream.
        let nested = &[b"abcdef".to_vec(), b"cd".to_vec()];
        assert_eq!(scrub(b"xabcd", nested, false), (b"x".to_vec(), 4));
        assert_eq!(scrub(b"xabcd", nested, true), (b"xab**".to_vec(), 0));
        assert_eq!(
            scrub(b"abcdef-cd-abcdef", nested, true).0,
            b"******-**-******".to_vec()
        );
        let both = &[b"k+y/=".to_vec(), b"k%2By%2F%3D".to_vec()];
        assert_eq!(
            scrub(b"a k%2By%2F%3D b k+y/= c", both, true).0,
            b"a [REDACTED]* b ***** c".to_vec()
        );
    }
}
