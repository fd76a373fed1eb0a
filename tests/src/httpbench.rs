//! Pieces of the HTTP benchmark: a mock API upstream (plain and TLS), an open-loop load
//! generator that measures from each request's scheduled time (so a stall is not hidden by
//! sending fewer requests: no coordinated omission), and percentile math.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `POST` with a small JSON answer, on plain `plain` and TLS `tls` listeners, forever.
pub fn start_upstream(
    rt: &tokio::runtime::Runtime,
    cert_names: &[&str],
) -> (SocketAddr, SocketAddr, String) {
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
    let service = || {
        hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                br#"{"id":"chatcmpl-bench","choices":[{"message":{"role":"assistant","content":"ok"}}]}"#,
            ))))
        })
    };
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = plain.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service())
                    .await;
            });
        }
    });
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = secure.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service())
                    .await;
            });
        }
    });
    (plain_addr, tls_addr, ca_pem)
}

/// One open-loop run: `rate` requests per second for `secs` to `target` with `Host: host`, a
/// 1 KiB JSON body. `keepalive`: requests share a pool of kept-alive connections (a new one
/// opens whenever all are busy, so the schedule never waits); otherwise each request opens
/// its own. Latencies in µs, from the scheduled send.
pub async fn open_loop(
    target: SocketAddr,
    host: &str,
    rate: u64,
    secs: u64,
    keepalive: bool,
) -> (Vec<u64>, u64) {
    let body = format!(
        "{{\"model\":\"bench\",\"input\":\"{}\"}}",
        "x".repeat(1024 - 28)
    );
    let request = Arc::new(format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
    let uri: hyper::Uri = format!("http://{target}/v1/chat/completions")
        .parse()
        .expect("uri");
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
            let req = hyper::Request::post(uri.clone())
                .header(hyper::header::HOST, host.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(body.clone()))
                .expect("request");
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

pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
