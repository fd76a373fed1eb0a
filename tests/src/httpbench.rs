//! Pieces of the HTTP benchmark: a mock API upstream (plain and TLS), an open-loop load
//! generator that measures from each request's scheduled time (so a stall is not hidden by
//! sending fewer requests: no coordinated omission), and percentile math.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The mock API's answer to every request: a complete OpenAI `chat.completion`.
pub const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}"#;

/// The request body every benchmark request sends: an OpenAI chat request, 1 KiB in all.
pub fn chat_request_body() -> String {
    let (head, tail) = (
        r#"{"model":"bench","messages":[{"role":"user","content":""#,
        r#""}]}"#,
    );
    format!("{head}{}{tail}", "x".repeat(1024 - head.len() - tail.len()))
}

/// The running mock API: its plain and TLS addresses, the CA to trust for the TLS one, and
/// how many requests it has answered.
pub struct Upstream {
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    pub ca_pem: String,
    requests: Arc<AtomicU64>,
    handshakes: Arc<Handshakes>,
}

/// TLS handshakes the mock completed on its TLS port, and how many of them resumed a session.
#[derive(Debug, Default)]
struct Handshakes {
    done: AtomicU64,
    resumed: AtomicU64,
}

impl Upstream {
    /// Requests answered so far, on both ports.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed so far on the TLS port (each a new upstream connection), and
    /// how many of them resumed an earlier session.
    pub fn tls_handshakes(&self) -> (u64, u64) {
        (
            self.handshakes.done.load(Ordering::Relaxed),
            self.handshakes.resumed.load(Ordering::Relaxed),
        )
    }
}

/// Serves `POST` with [`COMPLETION`] on a plain and a TLS listener, forever, counting the
/// requests answered.
pub fn start_counted_upstream(rt: &tokio::runtime::Runtime, cert_names: &[&str]) -> Upstream {
    let (tls, ca_pem) = crate::tls_server(cert_names);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let plain = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let secure = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let (plain_addr, tls_addr) = (
        plain.local_addr().expect("addr"),
        secure.local_addr().expect("addr"),
    );
    let requests = Arc::new(AtomicU64::new(0));
    let handshakes = Arc::new(Handshakes::default());
    let counter = Arc::clone(&requests);
    let service = move || {
        let counter = Arc::clone(&counter);
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let counter = Arc::clone(&counter);
            async move {
                use http_body_util::BodyExt;
                let _ = req.into_body().collect().await;
                counter.fetch_add(1, Ordering::Relaxed);
                let mut resp = hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(COMPLETION.as_bytes()),
                ));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let plain_service = service.clone();
    rt.spawn(async move {
        let service = plain_service;
        loop {
            let Ok((s, _)) = plain.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service())
                    .await;
            });
        }
    });
    let counted = Arc::clone(&handshakes);
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = secure.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            let (service, counted) = (service.clone(), Arc::clone(&counted));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                counted.done.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    counted.resumed.fetch_add(1, Ordering::Relaxed);
                }
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service())
                    .await;
            });
        }
    });
    Upstream {
        plain: plain_addr,
        tls: tls_addr,
        ca_pem,
        requests,
        handshakes,
    }
}

/// The path each request goes to and the headers it carries besides `Host` and
/// `Content-Type` (what a proxy wants: a key of its own, a provider name).
#[derive(Clone, Debug)]
pub struct Route {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Default for Route {
    /// `POST /v1/chat/completions`, no other header.
    fn default() -> Self {
        Self {
            path: "/v1/chat/completions".to_owned(),
            headers: Vec::new(),
        }
    }
}

/// One open-loop run: `rate` requests per second for `secs` to `target` with `Host: host`, a
/// 1 KiB chat request ([`chat_request_body`]) to `route`. `keepalive`: requests share a pool
/// of kept-alive connections (a new one opens whenever all are busy, so the schedule never
/// waits); otherwise each request opens its own. Latencies in µs, from the scheduled send.
pub async fn open_loop(
    target: SocketAddr,
    host: &str,
    route: &Route,
    rate: u64,
    secs: u64,
    keepalive: bool,
) -> (Vec<u64>, u64) {
    let body = chat_request_body();
    let extra: String = route
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = Arc::new(format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        route.path,
        body.len()
    ));
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
    let uri: hyper::Uri = format!("http://{target}{}", route.path)
        .parse()
        .expect("uri");
    let headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)> = route
        .headers
        .iter()
        .map(|(k, v)| {
            (
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                hyper::header::HeaderValue::from_str(v).expect("header value"),
            )
        })
        .collect();
    let body = bytes::Bytes::from(body);
    let host = host.to_owned();
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let total = rate * secs;
    // The schedule is kept by a plain thread sleeping with a 1 ns timer slack (tokio's timers
    // have a 1 ms granularity, which would land in every measurement); it hands each
    // scheduled instant to the runtime, which sends at once.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        for i in 0..total {
            let scheduled = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send(scheduled).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while let Some(scheduled) = rx.recv().await {
        let ok = if keepalive {
            let mut req = hyper::Request::post(uri.clone())
                .header(hyper::header::HOST, host.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(body.clone()))
                .expect("request");
            for (k, v) in &headers {
                req.headers_mut().append(k.clone(), v.clone());
            }
            let client = client.clone();
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                let resp = client.request(req).await.ok()?;
                let status = resp.status();
                resp.into_body().collect().await.ok()?;
                Some(status == hyper::StatusCode::OK)
            })
        } else {
            let request = Arc::clone(&request);
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(target).await.ok()?;
                s.set_nodelay(true).ok()?;
                s.write_all(request.as_bytes()).await.ok()?;
                let mut buf = Vec::with_capacity(512);
                s.read_to_end(&mut buf).await.ok()?;
                Some(buf.starts_with(b"HTTP/1.1 200"))
            })
        };
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), ok).await {
                Ok(Ok(Some(true))) => {
                    Some(u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX))
                }
                _ => None,
            }
        }));
    }
    let _ = pacer.join();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(us)) => lat.push(us),
            _ => errors += 1,
        }
    }
    lat.sort_unstable();
    (lat, errors)
}

/// Sends one chat request to `target` on a connection of its own and returns the whole
/// answer (head and body), or why there is none within `timeout`.
pub fn exchange(
    target: SocketAddr,
    host: &str,
    route: &Route,
    timeout: Duration,
) -> Result<String, String> {
    use std::io::{Read, Write};
    let body = chat_request_body();
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        route.path,
        body.len()
    );
    for (k, v) in &route.headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let mut s = std::net::TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("connect {target}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .and_then(|()| s.write_all(request.as_bytes()))
        .map_err(|e| format!("send to {target}: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .map_err(|e| format!("no answer from {target} in {timeout:?}: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
