//! The streaming part of the HTTP benchmark: a mock API answering every request with a
//! server-sent event stream in OpenAI's `chat.completion.chunk` shape, each event carrying the
//! CLOCK_MONOTONIC time it was written, and a client that notes when each event arrives. Both
//! run on the same machine, so arrival minus written is the event's delay through the path.
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use gateway_user::proxy::monotonic_ns;
use http_body_util::BodyExt;

/// One event: a chunk whose content is `t=<ns>`, the time it was written.
fn chunk(t: u64) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-sse\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t={t}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

/// Serves every request with `events` events `gap` apart (the first at once), then `data: [DONE]`, on a plain and
/// a TLS listener (the TLS one with `tls`), forever. Returns (plain, tls).
pub fn start_sse_upstream(
    rt: &tokio::runtime::Runtime,
    tls: std::sync::Arc<rustls::ServerConfig>,
    events: usize,
    gap: Duration,
) -> (SocketAddr, SocketAddr) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let bind = || {
        rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind")
    };
    let (plain, secure) = (bind(), bind());
    let addrs = (
        plain.local_addr().expect("addr"),
        secure.local_addr().expect("addr"),
    );
    let service = move || {
        hyper::service::service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let (tx, rx) = tokio::sync::mpsc::channel::<
                    Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
                >(4);
                tokio::spawn(async move {
                    for i in 0..events {
                        if i > 0 {
                            tokio::time::sleep(gap).await;
                        }
                        if tx
                            .send(Ok(hyper::body::Frame::data(chunk(monotonic_ns()))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = tx
                        .send(Ok(hyper::body::Frame::data(Bytes::from_static(
                            b"data: [DONE]\n\n",
                        ))))
                        .await;
                });
                let body = http_body_util::StreamBody::new(tokio_stream_of(rx));
                let mut resp = hyper::Response::new(body);
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/event-stream"),
                );
                resp.headers_mut().insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-cache"),
                );
                Ok::<_, std::convert::Infallible>(resp)
            },
        )
    };
    rt.spawn(async move {
        while let Ok((s, _)) = plain.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service()),
            );
        }
    });
    rt.spawn(async move {
        while let Ok((s, _)) = secure.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service())
                        .await;
                }
            });
        }
    });
    addrs
}

/// The receiving half of a channel as a stream of body frames.
fn tokio_stream_of<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct Rx<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for Rx<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    Rx(rx)
}

/// What one client saw: time to first event from the request's send, and each event's delay
/// from when the upstream wrote it, in µs (both sorted), and the streams that failed.
pub struct Seen {
    pub first_event: Vec<u64>,
    pub delay: Vec<u64>,
    pub failed: u64,
}

/// Opens `streams` event streams one after another on a kept-alive connection to `target`
/// (`Host: host`, the path and extra headers of `route`) and notes when each event arrives.
pub async fn sse_client(
    target: SocketAddr,
    host: &str,
    streams: usize,
    route: &crate::httpbench::Route,
) -> Seen {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let uri: hyper::Uri = format!("http://{target}{}", route.path)
        .parse()
        .expect("uri");
    let body = Bytes::from_static(
        br#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"stream"}]}"#,
    );
    let mut seen = Seen {
        first_event: Vec::new(),
        delay: Vec::new(),
        failed: 0,
    };
    for _ in 0..streams {
        let mut req = hyper::Request::post(uri.clone())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in &route.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(http_body_util::Full::new(body.clone()))
            .expect("request");
        let sent = monotonic_ns();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = client.request(req).await.ok()?;
            if resp.status() != hyper::StatusCode::OK {
                return None;
            }
            let mut body = resp.into_body();
            let (mut text, mut first, mut events) = (String::new(), None, Vec::new());
            while let Some(frame) = body.frame().await {
                let now = monotonic_ns();
                let Ok(data) = frame.ok()?.into_data() else {
                    continue;
                };
                text.push_str(&String::from_utf8_lossy(&data));
                while let Some(end) = text.find("\n\n") {
                    let event: String = text.drain(..end + 2).collect();
                    if let Some(t) = written_at(&event) {
                        first.get_or_insert(now.saturating_sub(sent) / 1000);
                        events.push(now.saturating_sub(t) / 1000);
                    }
                }
            }
            Some((first?, events))
        })
        .await;
        match got {
            Ok(Some((first, events))) => {
                seen.first_event.push(first);
                seen.delay.extend(events);
            }
            _ => seen.failed += 1,
        }
    }
    seen.first_event.sort_unstable();
    seen.delay.sort_unstable();
    seen
}

/// The `t=<ns>` an event carries in its content, wherever a proxy put the JSON fields.
fn written_at(event: &str) -> Option<u64> {
    let at = event.find("t=")? + 2;
    let digits: String = event[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_their_write_time() {
        let text = String::from_utf8(chunk(123_456_789).to_vec()).expect("utf8");
        assert!(text.starts_with("data: {") && text.ends_with("\n\n"));
        let json: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("data: ").trim()).expect("json");
        assert_eq!(json["choices"][0]["delta"]["content"], "t=123456789");
        assert_eq!(written_at(&text), Some(123_456_789));
        assert_eq!(written_at("data: [DONE]\n\n"), None);
    }

    #[test]
    fn a_stream_arrives_event_by_event() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        let (tls, _) = crate::tls_server(&["127.0.0.1"]);
        let (plain, _) = start_sse_upstream(&rt, tls, 5, Duration::from_millis(20));
        let seen = rt.block_on(sse_client(
            plain,
            "127.0.0.1",
            2,
            &crate::httpbench::Route::default(),
        ));
        assert_eq!(seen.failed, 0);
        assert_eq!(seen.first_event.len(), 2);
        assert_eq!(seen.delay.len(), 10, "every event of both streams");
        // The stream takes 80 ms; each event arrives long before that, as it is written.
        assert!(seen.delay.iter().all(|d| *d < 20_000), "{:?}", seen.delay);
    }
}
