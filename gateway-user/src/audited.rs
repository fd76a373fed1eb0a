//! The bodies of a forwarded request: the request body counts what goes upstream, and the
//! response body writes the request's audit record when the exchange ends (the last byte
//! passed, the stream failed, or the client went away), with the bytes both ways and the
//! whole duration. The file write is not on the path of the response.
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};

use crate::{
    audit::{AuditLog, AuditRecord, Verdict},
    usage::UsageReader,
};

/// Counts the data bytes of `inner` into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count
                    .fetch_add(data.remaining() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes its request's record once, when the exchange ends.
pub struct Audited<B> {
    inner: B,
    received: u64,
    pending: Option<Pending>,
    /// Reads the token counts for the record's `llm`, where it has one.
    usage: Option<UsageReader>,
    /// Told the tokens the answer used (input and output), once it has ended.
    charge: Option<Charge>,
    /// The answer came to its end (not cut short, not failed).
    ended: bool,
}

/// What an ended answer's token count is charged to.
pub type Charge = Box<dyn FnOnce(u64) + Send + Sync>;

struct Pending {
    record: AuditRecord,
    audit: AuditLog,
    sent: Arc<AtomicU64>,
    started: Instant,
}

impl<B> Audited<B> {
    /// `sent`: the request body's counter; `started`: when the request arrived.
    pub fn new(
        inner: B,
        record: AuditRecord,
        audit: AuditLog,
        sent: Arc<AtomicU64>,
        started: Instant,
    ) -> Self {
        Self {
            inner,
            received: 0,
            pending: Some(Pending {
                record,
                audit,
                sent,
                started,
            }),
            usage: None,
            charge: None,
            ended: false,
        }
    }

    /// Also reads the response's token counts into the record's `llm` (JSON or an event
    /// stream, as `reader` was made for), and tells `charge` their sum.
    #[must_use]
    pub fn with_usage(mut self, reader: Option<UsageReader>, charge: Option<Charge>) -> Self {
        self.usage = reader;
        self.charge = charge;
        self
    }

    fn finish(&mut self, failed: bool) {
        let Some(Pending {
            mut record,
            audit,
            sent,
            started,
        }) = self.pending.take()
        else {
            return;
        };
        if failed {
            record.decision = Verdict::Error;
            record.reason = "upstream_stream_failed".into();
        }
        let sent = sent.load(Ordering::Relaxed);
        let tokens = self
            .usage
            .take()
            .map(UsageReader::finish)
            .unwrap_or_default();
        // A token for every 4 bytes each way: what is charged where the answer gave no count,
        // or gave one and was cut short (Anthropic says its output tokens only at the end).
        let estimate = sent.saturating_add(self.received).div_ceil(4);
        let said = (tokens.input.is_some() || tokens.output.is_some()).then(|| tokens.total());
        let used = match said {
            Some(said) if self.ended => said,
            Some(said) => said.max(estimate),
            None => estimate,
        };
        if let Some(llm) = record.llm.as_mut() {
            llm.tokens_in = tokens.input;
            llm.tokens_out = tokens.output;
            if self.charge.is_some() && Some(used) != said {
                llm.tokens_estimated = Some(used);
            }
        }
        if let Some(charge) = self.charge.take() {
            charge(used);
        }
        record.bytes_up = Some(sent);
        record.bytes_down = Some(self.received);
        record.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        audit.emit(record);
    }
}

impl<B> Drop for Audited<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<B> Body for Audited<B>
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.remaining() as u64;
                    if let Some(usage) = &mut this.usage {
                        usage.feed(data);
                    }
                }
                // A body of known length may not be polled once more for its end.
                this.ended |= this.inner.is_end_stream();
            }
            Poll::Ready(Some(Err(_))) => this.finish(true),
            Poll::Ready(None) => {
                this.ended = true;
                this.finish(false);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::audit::Layer;

    fn log() -> (AuditLog, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "tg-audited-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let path = dir.join("a.jsonl");
        (AuditLog::open(&path, 0, Vec::new()).expect("open"), dir)
    }

    fn records(audit: &AuditLog, dir: &std::path::Path) -> Vec<serde_json::Value> {
        assert!(audit.flush(std::time::Duration::from_secs(5)), "flushed");
        let text = std::fs::read_to_string(dir.join("a.jsonl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(dir);
        text.lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    #[tokio::test]
    async fn one_record_with_both_byte_counts_when_the_body_ends() {
        let (audit, dir) = log();
        let sent = Arc::new(AtomicU64::new(0));
        let up = Counted::new(Full::new(Bytes::from_static(b"hello")), Arc::clone(&sent));
        assert_eq!(up.size_hint().exact(), Some(5), "framing is kept");
        let _ = up.collect().await;
        let record = AuditRecord::new(Verdict::Allow, Layer::Request, "rule_matched");
        let body = Audited::new(
            Full::new(Bytes::from_static(b"0123456789")),
            record,
            audit.clone(),
            sent,
            Instant::now(),
        );
        let got = body.collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"0123456789");
        let recs = records(&audit, &dir);
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["bytes_up"], 5);
        assert_eq!(recs[0]["bytes_down"], 10);
        assert_eq!(recs[0]["decision"], "allow");
    }

    #[tokio::test]
    async fn a_dropped_or_failed_stream_still_writes_one_record() {
        let (audit, dir) = log();
        let record = AuditRecord::new(Verdict::Allow, Layer::Request, "rule_matched");
        // The client goes away after the first chunk of a stream.
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"data: 1\n\n"))),
            Err(std::io::Error::other("reset")),
        ];
        let mut body = Audited::new(
            StreamBody::new(futures_stream(chunks.into_iter().take(1).collect())),
            record.clone(),
            audit.clone(),
            Arc::default(),
            Instant::now(),
        );
        let first = body.frame().await.expect("a frame").expect("ok");
        assert!(first.is_data());
        drop(body);
        let failing = Audited::new(
            StreamBody::new(futures_stream(vec![
                Ok(Frame::data(Bytes::from_static(b"ab"))),
                Err(std::io::Error::other("reset")),
            ])),
            record,
            audit.clone(),
            Arc::default(),
            Instant::now(),
        );
        assert!(failing.collect().await.is_err());
        let recs = records(&audit, &dir);
        assert_eq!(recs.len(), 2, "{recs:?}");
        assert_eq!(recs[0]["bytes_down"], 9);
        assert_eq!(recs[0]["decision"], "allow");
        assert_eq!(recs[1]["bytes_down"], 2);
        assert_eq!(recs[1]["decision"], "error");
        assert_eq!(recs[1]["reason"], "upstream_stream_failed");
    }

    #[tokio::test]
    async fn tokens_are_read_into_the_record_and_charged_or_estimated() {
        let (audit, dir) = log();
        let rooms = crate::usage::Rooms::new(1024, 1024);
        let room = rooms.of("a");
        let mut json = http::HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let charged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut record = AuditRecord::new(Verdict::Allow, Layer::Request, "rule_matched");
        record.llm = Some(crate::audit::LlmRecord::default());
        for answer in [
            &br#"{"usage":{"prompt_tokens":5,"completion_tokens":6}}"#[..],
            // No usage: 100 bytes down and 20 up, a token per 4 bytes.
            &[b' '; 100][..],
        ] {
            let got = Arc::clone(&charged);
            let sent = Arc::new(AtomicU64::new(20));
            let body = Audited::new(
                Full::new(Bytes::copy_from_slice(answer)),
                record.clone(),
                audit.clone(),
                sent,
                Instant::now(),
            )
            .with_usage(
                UsageReader::for_response(&json, &room),
                Some(Box::new(move |used| got.lock().expect("lock").push(used))),
            );
            let _ = body.collect().await.expect("body");
        }
        // Cut short after an event that counted input only (as Anthropic's stream starts):
        // charged its bytes' estimate where that is more.
        let got = Arc::clone(&charged);
        let mut events = http::HeaderMap::new();
        events.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let first = Bytes::from(format!(
            "data: {{\"message\":{{\"usage\":{{\"input_tokens\":2,\"output_tokens\":1}}}}}}\n\n{}",
            " ".repeat(400)
        ));
        let mut cut = Audited::new(
            StreamBody::new(futures_stream(vec![
                Ok::<_, std::io::Error>(Frame::data(first.clone())),
                Ok(Frame::data(first)),
            ])),
            record.clone(),
            audit.clone(),
            Arc::new(AtomicU64::new(0)),
            Instant::now(),
        )
        .with_usage(
            UsageReader::for_response(&events, &room),
            Some(Box::new(move |used| got.lock().expect("lock").push(used))),
        );
        let _ = cut.frame().await.expect("a frame").expect("ok");
        drop(cut);
        let line = "data: {\"message\":{\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n";
        let estimate = ((line.len() + 400) as u64).div_ceil(4);
        assert_eq!(*charged.lock().expect("lock"), vec![11, 30, estimate]);
        let recs = records(&audit, &dir);
        assert_eq!(recs[0]["llm"]["tokens_in"], 5, "{}", recs[0]);
        assert_eq!(recs[0]["llm"]["tokens_out"], 6);
        assert!(recs[0]["llm"].get("tokens_estimated").is_none());
        assert_eq!(recs[1]["llm"]["tokens_estimated"], 30, "{}", recs[1]);
        assert_eq!(recs[2]["llm"]["tokens_in"], 2, "{}", recs[2]);
        assert_eq!(recs[2]["llm"]["tokens_estimated"], estimate, "{}", recs[2]);
        assert_eq!(rooms.available(), 1024, "the readers gave their room back");
    }

    /// A stream of ready items, without a dependency on a streams crate.
    fn futures_stream<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
        struct Ready<T>(std::collections::VecDeque<T>);
        impl<T: Unpin> futures_core::Stream for Ready<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<T>> {
                Poll::Ready(self.0.pop_front())
            }
        }
        Ready(items.into())
    }
}
