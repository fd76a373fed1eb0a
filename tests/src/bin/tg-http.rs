//! A Rust HTTP client for the tests (hyper): `tg-http METHOD URL CONNECT_ADDR [BODY]` sends one
//! request for URL over a connection to CONNECT_ADDR (as `curl --resolve` would) and prints
//! the status line and body.
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
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method.as_str())
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                hyper::header::HOST,
                uri.authority().map_or("", |a| a.as_str()),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
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
