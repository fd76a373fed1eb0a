//! A Rust HTTP client for the tests (hyper): `tg-http METHOD URL CONNECT_ADDR [BODY]` sends one
//! request for URL over a connection to CONNECT_ADDR (as `curl --resolve` would) and prints
//! the status line and body. With `TG_HTTP_H2=1` it speaks HTTP/2 with prior knowledge (the
//! URL's authority becomes `:authority`); `TG_HTTP_HOST` sends that Host header instead of the
//! URL's authority (for domain fronting: the two disagree).
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [method, url, addr, rest @ ..] = args.as_slice() else {
        eprintln!("usage: tg-http METHOD URL CONNECT_ADDR [BODY]");
        std::process::exit(2);
    };
    let body = rest.first().cloned().unwrap_or_default();
    let uri: hyper::Uri = url.parse().expect("url");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let result: Result<(u16, String), Box<dyn std::error::Error>> = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
        let io = hyper_util::rt::TokioIo::new(tcp);
        let h2 = std::env::var("TG_HTTP_H2").is_ok_and(|v| v == "1");
        let host = std::env::var("TG_HTTP_HOST")
            .unwrap_or_else(|_| uri.authority().map_or("", |a| a.as_str()).to_owned());
        let req = hyper::Request::builder()
            .method(method.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            tokio::spawn(conn);
            let req = req.uri(uri.clone()).body(Full::new(Bytes::from(body)))?;
            sender.send_request(req).await?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            let req = req
                .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                .body(Full::new(Bytes::from(body)))?;
            sender.send_request(req).await?
        };
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    });
    match result {
        Ok((status, text)) => println!("{status}\n{text}"),
        Err(e) => {
            eprintln!("tg-http: {e}");
            std::process::exit(1);
        }
    }
}
