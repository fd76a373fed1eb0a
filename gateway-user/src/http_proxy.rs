//! HTTP/1.1 on a redirected connection whose port a host rule covers: every request is
//! decided on its own (host, method, normalized path), forwarded with the bound credential
//! injected, and audited once.
use std::{
    borrow::Cow,
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::{
    audit::{AuditRecord, HttpRecord, Layer, LlmRecord, Verdict, WorkloadRecord},
    audited::{Audited, Counted},
    container::Placement,
    credentials::Inject,
    framing::{Guarded, Seen},
    identity::WorkloadId,
    netns::Netns,
    normalize,
    policy::{Model, RequestDecision, TlsMode},
    proxy::Gateway,
    redact::{scrub_headers, Redact},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Caller-supplied credentials removed before a bound credential is injected.
const CALLER_CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// Removes the caller's own credentials: [`CALLER_CREDENTIALS`] and the `injected` header,
/// each also spelled with `_` for `-` (servers behind WSGI or CGI read `x_api_key` as
/// `x-api-key`).
fn remove_caller_credentials(headers: &mut HeaderMap, injected: Option<&HeaderName>) {
    let callers: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_replaced(k, injected))
        .cloned()
        .collect();
    for name in callers {
        headers.remove(name);
    }
}

/// Whether `name` is one of [`CALLER_CREDENTIALS`] or the `injected` header, also spelled
/// with `_` for `-`: a header the gateway takes out of every request it injects a credential
/// into.
pub fn is_replaced(name: &HeaderName, injected: Option<&HeaderName>) -> bool {
    let dashed = |b: u8| if b == b'_' { b'-' } else { b };
    let same = |a: &str, b: &str| {
        a.len() == b.len()
            && a.bytes()
                .zip(b.bytes())
                .all(|(x, y)| dashed(x) == dashed(y))
    };
    CALLER_CREDENTIALS
        .iter()
        .chain(injected)
        .any(|c| same(name.as_str(), c.as_str()))
}

/// The connection's context: who, in which namespace, to which port.
pub struct Conn {
    pub gateway: Arc<Gateway>,
    pub ns: Arc<Netns>,
    pub netns_cookie: u64,
    pub workload: WorkloadId,
    pub orig: SocketAddr,
    /// What every record of this connection says of the workload, where its cgroup path
    /// places it, and whose share of the gateway it takes ([`WorkloadId::holder`]): derived
    /// once, not per request.
    record: Arc<WorkloadRecord>,
    placement: Placement,
    holder: Arc<str>,
    orig_ip: Arc<str>,
    /// The last `Host` header written upstream, by host and port: a kept-alive connection
    /// usually names the same one on every request.
    upstream_host: std::sync::Mutex<Option<UpstreamHost>>,
}

/// A `Host` header written upstream, and what it was written for.
struct UpstreamHost {
    host: Arc<str>,
    port: u16,
    https: bool,
    value: HeaderValue,
}

impl Conn {
    /// `record`: what the connection's records say of `workload` (the one its connect record
    /// carries, shared rather than built again).
    pub fn new(
        gateway: Arc<Gateway>,
        ns: Arc<Netns>,
        netns_cookie: u64,
        workload: WorkloadId,
        record: Arc<WorkloadRecord>,
        orig: SocketAddr,
    ) -> Self {
        let placement = workload.placement();
        Self {
            record,
            holder: workload.holder(&placement, &gateway.config.roots).into(),
            placement,
            orig_ip: orig.ip().to_string().into(),
            upstream_host: std::sync::Mutex::new(None),
            gateway,
            ns,
            netns_cookie,
            workload,
            orig,
        }
    }

    /// The `Host` header for `host` on `port` upstream, without the port where it is the
    /// scheme's default; `None` where no header value can carry it.
    fn upstream_host(&self, host: &Arc<str>, port: u16, https: bool) -> Option<HeaderValue> {
        let mut last = self
            .upstream_host
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(last) = &*last {
            if last.port == port && last.https == https && last.host == *host {
                return Some(last.value.clone());
            }
        }
        let value = if port == if https { 443 } else { 80 } {
            HeaderValue::from_str(host)
        } else {
            HeaderValue::from_str(&format!("{host}:{port}"))
        }
        .ok()?;
        *last = Some(UpstreamHost {
            host: Arc::clone(host),
            port,
            https,
            value: value.clone(),
        });
        Some(value)
    }

    /// A request record of this connection, before anything is decided.
    fn request_record(&self, reason: &'static str) -> AuditRecord {
        let mut record = AuditRecord::new(Verdict::Deny, Layer::Request, reason);
        record.workload = Arc::clone(&self.record);
        record.dst.orig_ip = Some(Arc::clone(&self.orig_ip));
        record.dst.orig_port = Some(self.orig.port());
        record.dst.protocol = Some("http");
        record
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A method's name for the audit record, without allocating for the standard ones.
fn method_name(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD.iter().find(|(m, _)| m == method).map_or_else(
        || Cow::Owned(method.as_str().to_owned()),
        |(_, name)| Cow::Borrowed(*name),
    )
}

/// Strict framing, before anything reaches hyper's client: no Content-Length together with
/// Transfer-Encoding, one Content-Length, and `chunked` as the only transfer coding.
pub fn framing_error(headers: &HeaderMap) -> Option<&'static str> {
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if cl > 1 {
        return Some("duplicate_content_length");
    }
    if cl == 1 && !te.is_empty() {
        return Some("content_length_with_transfer_encoding");
    }
    if te.len() > 1 || te.first().is_some_and(|v| v.as_bytes() != b"chunked") {
        return Some("unsupported_transfer_encoding");
    }
    None
}

/// The same strict check on the raw request head, before hyper parses it (hyper resolves a
/// Content-Length/Transfer-Encoding conflict by itself; we refuse it). Also refuses bare-LF
/// line endings, whitespace before a header's colon and a Content-Length that is not a number.
pub fn raw_head_error(head: &[u8]) -> Option<&'static str> {
    crate::framing::head_framing(head).err()
}

/// Removes hop-by-hop headers and every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    take_hop_by_hop(headers, None);
}

/// Removes from a request's headers what never goes upstream, whatever the rule: hop-by-hop
/// headers, those the Connection header names, and `x-tollgate-*`. Done before the request
/// is decided, so a required header is one that goes upstream; returns what it removed, where
/// a forbidden header still refuses the request.
pub fn strip_request(headers: &mut HeaderMap) -> HeaderMap {
    let mut removed = HeaderMap::new();
    take_hop_by_hop(headers, Some(&mut removed));
    let prefix: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-tollgate-"))
        .cloned()
        .collect();
    for k in prefix {
        take(headers, k, Some(&mut removed));
    }
    removed
}

/// [`strip_hop_by_hop`], keeping what it removes in `removed` if given.
fn take_hop_by_hop(headers: &mut HeaderMap, mut removed: Option<&mut HeaderMap>) {
    // Most messages carry none of them: one pass over the names tells.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.into_iter().chain(HOP_BY_HOP.iter().cloned()) {
        take(headers, n, removed.as_deref_mut());
    }
}

/// Removes every value of `name`, appending them to `removed` if given.
fn take(headers: &mut HeaderMap, name: HeaderName, removed: Option<&mut HeaderMap>) {
    let header::Entry::Occupied(entry) = headers.entry(name) else {
        return;
    };
    let (name, values) = entry.remove_entry_mult();
    if let Some(removed) = removed {
        for v in values {
            removed.append(name.clone(), v);
        }
    }
}

/// Serves HTTP/1.1 on a client connection, kept alive between requests. The first head is
/// checked before hyper reads anything (a violation gets a 400 with the reason); every head,
/// the first included, is checked again as hyper reads it ([`Guarded`]), and a violation in a
/// later request ends the connection. Each request is decided and audited on its own.
/// `head` (`MAX_HEAD` bytes long) holds what the protocol's detection peeked, `peeked` bytes.
pub async fn serve(conn: Conn, client: TcpStream, mut head: Vec<u8>, peeked: usize) {
    let header_timeout = conn.gateway.config.client_header_timeout;
    let deadline = tokio::time::Instant::now() + header_timeout;
    let mut pause = Duration::from_millis(1);
    let mut n = peeked;
    let problem = loop {
        if head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break raw_head_error(&head[..n]);
        }
        if n == head.len() {
            break Some("head_too_large");
        }
        if n == 0 {
            break Some("closed_before_request");
        }
        if tokio::time::Instant::now() >= deadline {
            break Some("no_request_in_time");
        }
        // The head is arriving in pieces: wait a little longer each time (a stalled client
        // costs a few peeks, not a busy loop).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
        n = match tokio::time::timeout_at(deadline, client.peek(&mut head)).await {
            Ok(Ok(n)) => n,
            _ => break Some("no_request_in_time"),
        };
    };
    // Only peeked: the head is still in the socket for hyper. Free the copy, or every idle
    // kept-alive connection would hold it.
    drop(head);
    if let Some(reason) = problem {
        early_record(&conn, reason, 400);
        if reason == "closed_before_request" || reason == "no_request_in_time" {
            return;
        }
        let body = serde_json::json!({ "error": "denied", "reason": reason }).to_string();
        let reply = format!("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let mut client = client;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut client, reply.as_bytes()).await;
        return;
    }
    let conn = Arc::new(conn);
    let handled = Arc::default();
    let service = request_service(Arc::clone(&conn), &handled);
    let seen = Arc::new(Seen::default());
    let connection = http1_connection(client, Arc::clone(&seen), service, header_timeout);
    // The client connection, the upstream one and the channels between them share this task.
    let result = crate::relay::Relayed::new(connection).await;
    if let Some(reason) = seen.refused.get() {
        tracing::info!(reason, "request framing refused; connection closed");
        early_record(&conn, reason, 400);
    } else {
        connection_ended(&conn, &result, &handled, seen.mid_head());
    }
}

/// `service` over HTTP/1.1 on `client`, kept alive, each head read within `header_timeout`
/// (also the limit on an idle kept-alive connection) and checked by [`Guarded`], which keeps
/// its refusal in `refused`.
fn http1_connection<S>(
    client: TcpStream,
    seen: Arc<Seen>,
    service: S,
    header_timeout: Duration,
) -> hyper::server::conn::http1::Connection<TokioIo<Guarded<TcpStream>>, S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(Guarded::new(client, seen)), service)
}

/// Serves HTTP/2 with prior knowledge on a client connection: each stream is one request,
/// decided and audited on its own. The client header timeout limits it as it limits HTTP/1.1
/// (see [`serve_h2_connection`]); a connection closed before any request came is audited.
pub async fn serve_h2(conn: Conn, client: TcpStream) {
    let conn = Arc::new(conn);
    let handled: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let service = stream_slots(
        &conn,
        &handled,
        request_service(Arc::clone(&conn), &handled),
    );
    let timeout = conn.gateway.config.client_header_timeout;
    // A request hyper refuses with a stream reset never reaches the handler: recorded here.
    let client = {
        let (conn, handled) = (Arc::clone(&conn), Arc::clone(&handled));
        crate::h2_resets::Watched::new(client, move |refusal: crate::h2_resets::Refusal| {
            handled.store(true, std::sync::atomic::Ordering::Relaxed);
            early_record(&conn, refusal.as_str(), 400);
        })
    };
    match serve_h2_connection(client, service, timeout).await {
        H2End::Ended(result) => connection_ended(&conn, &result, &handled, false),
        H2End::Idle => {
            if !handled.load(std::sync::atomic::Ordering::Relaxed) {
                early_record(&conn, "no_request_in_time", 400);
            }
        }
    }
}

/// Each HTTP/2 request in flight holds a slot of its workload's connection cap, as an HTTP/1.1
/// connection does, from its call until its answer's body ends: the upstream side is HTTP/1.1,
/// so every stream in flight holds an upstream connection of its own, and one client connection
/// with 64 streams would otherwise hold 65 descriptors on one slot. A stream without a slot
/// left is answered 503 `connection_limit` and audited, and nothing goes upstream.
fn stream_slots<S>(
    conn: &Arc<Conn>,
    handled: &Arc<std::sync::atomic::AtomicBool>,
    service: S,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (conn, handled) = (Arc::clone(conn), Arc::clone(handled));
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let slot = conn.gateway.connections.open(&conn.holder);
        let call = match slot {
            Some(_) => Ok(service.call(req)),
            None => {
                let mut record = conn.request_record("");
                record.http = Some(HttpRecord {
                    method: method_name(req.method()),
                    path: None,
                    status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                });
                let response = refuse(
                    &mut record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection_limit",
                    None,
                );
                conn.gateway.audit.emit(record);
                // A record was written for the connection: its end needs none of its own.
                handled.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(response)
            }
        };
        async move {
            match call {
                Ok(call) => {
                    let response = call.await?;
                    Ok(response.map(|body| Keeping { body, _room: slot }.boxed()))
                }
                Err(refused) => Ok(refused),
            }
        }
    })
}

/// How an HTTP/2 client connection ended.
#[derive(Debug)]
enum H2End {
    /// As hyper says: the client closed it, or an error.
    Ended(Result<(), hyper::Error>),
    /// Closed by the gateway: no request in flight for the timeout.
    Idle,
}

/// Serves `service` over HTTP/2 on `client`. A connection with no request in flight for
/// `timeout` (none has come yet: the first request's headers, which a client may leave
/// unfinished; or none since the last answer ended) is sent a GOAWAY and closed, as hyper's
/// header read timeout closes an HTTP/1.1 connection, whose timer also runs while it is kept
/// alive idle. A client that does not answer the GOAWAY's ping is dropped after half the
/// timeout (at most a second: the workload is on this host). Keep-alive pings find a peer
/// that stopped answering while a request is in flight; they come later than the idle close
/// (`timeout` after the last frame read, then `timeout` for the answer), so a client that
/// only went quiet is closed as idle.
async fn serve_h2_connection<C, S>(client: C, service: S, timeout: Duration) -> H2End
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let (in_flight, mut changes) = tokio::sync::watch::channel(0usize);
    let in_flight = Arc::new(in_flight);
    let counted = {
        let in_flight = Arc::clone(&in_flight);
        hyper::service::service_fn(move |req| {
            let active = Active::new(&in_flight);
            let call = service.call(req);
            async move {
                let response = call.await?;
                // In flight until the answer's body has ended (or the stream was reset).
                Ok::<_, Infallible>(response.map(|body| {
                    Keeping {
                        body,
                        _room: active,
                    }
                    .boxed()
                }))
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(timeout)
        .keep_alive_timeout(timeout)
        .serve_connection(TokioIo::new(client), counted);
    let mut connection = std::pin::pin!(connection);
    let grace = (timeout / 2).min(Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                return if closing { H2End::Idle } else { H2End::Ended(result) };
            }
            () = idle(&mut changes, if closing { grace } else { timeout }) => {
                if closing {
                    return H2End::Idle;
                }
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// One request in flight on an HTTP/2 connection, counted while it lives.
struct Active(Arc<tokio::sync::watch::Sender<usize>>);

impl Active {
    fn new(in_flight: &Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        in_flight.send_modify(|n| *n += 1);
        Self(Arc::clone(in_flight))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Resolves once no request has been in flight for `limit`: any start or end of one starts
/// the wait again.
async fn idle(changes: &mut tokio::sync::watch::Receiver<usize>, limit: Duration) {
    loop {
        let busy = *changes.borrow_and_update() > 0;
        let changed = changes.changed();
        let changed = if busy {
            changed.await
        } else {
            match tokio::time::timeout(limit, changed).await {
                Err(_) => return,
                Ok(changed) => changed,
            }
        };
        if changed.is_err() {
            // Nothing counts requests any more: the connection is ending by itself.
            return std::future::pending().await;
        }
    }
}

/// Each request of a client connection, decided and audited on its own; `handled` is set once
/// any request got that far.
fn request_service(
    conn: Arc<Conn>,
    handled: &Arc<std::sync::atomic::AtomicBool>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    let seen = Arc::clone(handled);
    hyper::service::service_fn(move |req| {
        let conn = Arc::clone(&conn);
        seen.store(true, std::sync::atomic::Ordering::Relaxed);
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    })
}

/// A request hyper gave up on, which no request record covers, gets its audit record (see
/// [`unrecorded`]); `mid_head`: the client's stream stopped inside a request head.
fn connection_ended(
    conn: &Conn,
    result: &Result<(), hyper::Error>,
    handled: &std::sync::atomic::AtomicBool,
    mid_head: bool,
) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    let handled = handled.load(std::sync::atomic::Ordering::Relaxed);
    if let Some(reason) = unrecorded(result, handled, mid_head) {
        early_record(conn, reason, 400);
    }
}

/// Why a client connection's end needs an audit record of its own, if it does: a request head
/// hyper could not parse, on any request of the connection (hyper answers 400 and closes;
/// no request record was written for it); a later request whose head was begun and never
/// finished (the client closed or the header timeout fired inside it); before any request
/// was handled, any other end. A clean close, or an idle kept-alive connection's timeout,
/// between requests is no decision.
fn unrecorded(
    result: &Result<(), hyper::Error>,
    handled: bool,
    mid_head: bool,
) -> Option<&'static str> {
    match result {
        Err(e) if e.is_parse() => Some("request_unparsable"),
        _ if handled && !mid_head => None,
        Err(e) if e.is_timeout() => Some("no_request_in_time"),
        // Closed or reset inside a later head.
        _ if handled => Some("request_head_unfinished"),
        Ok(()) => Some("closed_before_request"),
        Err(_) => Some("request_unparsable"),
    }
}

/// The audit record of a connection that ended before a request could be decided.
fn early_record(conn: &Conn, reason: &'static str, status: u16) {
    let mut record = conn.request_record(reason);
    record.http = Some(HttpRecord {
        method: Cow::Borrowed(""),
        path: None,
        status,
    });
    conn.gateway.audit.emit(record);
}

async fn handle(conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let mut record = conn.request_record("");
    let mut http = HttpRecord {
        method: method_name(req.method()),
        path: None,
        status: 0,
    };
    let sent = Arc::new(AtomicU64::new(0));
    let mut charge = None;
    let (response, credential) =
        decide_and_forward(conn, req, &mut record, &mut http, &sent, &mut charge).await;
    http.status = response.status().as_u16();
    record.http = Some(http);
    record.credential = credential;
    if matches!(record.decision, Verdict::Allow | Verdict::WouldDeny) {
        // Forwarded: the record is written when the response ends.
        let (parts, body) = response.into_parts();
        // Token counts are read where the model was: a rule that limits models asked for them.
        let usage = record
            .llm
            .is_some()
            .then(|| {
                crate::usage::UsageReader::for_response(
                    &parts.headers,
                    &conn.gateway.model_reads.of(&conn.holder),
                )
            })
            .flatten();
        // A tokens budget is charged what the answer says it used, once it has ended.
        let charge = charge
            .take()
            .map(|owed| Box::new(move |used| owed.settle(used)) as crate::audited::Charge);
        let body = Audited::new(body, record, conn.gateway.audit.clone(), sent, started)
            .with_usage(usage, charge);
        return Response::from_parts(parts, body.boxed());
    }
    record.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    conn.gateway.audit.emit(record);
    response
}

fn refuse(
    record: &mut AuditRecord,
    status: StatusCode,
    reason: &'static str,
    rule: Option<&str>,
) -> Response<Body> {
    record.decision = Verdict::Deny;
    record.reason = reason.into();
    record.rule = rule.map(Arc::from);
    json_response(
        status,
        &serde_json::json!({ "error": "denied", "reason": reason, "rule": rule }),
    )
}

async fn decide_and_forward(
    conn: &Conn,
    req: Request<Incoming>,
    record: &mut AuditRecord,
    http: &mut HttpRecord,
    sent: &Arc<AtomicU64>,
    charge: &mut Option<crate::budget::TokenCharge>,
) -> (Response<Body>, Option<Arc<str>>) {
    if let Some(reason) = framing_error(req.headers()) {
        return (refuse(record, StatusCode::BAD_REQUEST, reason, None), None);
    }
    // The host the request names: the Host header, which an absolute-form target must agree with.
    let host_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let Some(raw_host) =
        host_header.or_else(|| req.uri().authority().map(http::uri::Authority::as_str))
    else {
        return (
            refuse(record, StatusCode::BAD_REQUEST, "missing_host", None),
            None,
        );
    };
    let host: Arc<str> = match normalize::host(raw_host) {
        Ok((h, _)) => h.into(),
        Err(e) => {
            return (
                refuse(record, StatusCode::BAD_REQUEST, e.as_str(), None),
                None,
            )
        }
    };
    if let Some(authority) = req.uri().authority() {
        if normalize::host(authority.as_str())
            .map(|(h, _)| h)
            .as_deref()
            != Ok(&*host)
        {
            return (
                // Domain fronting: the request names one host and is addressed to another.
                refuse(
                    record,
                    StatusCode::MISDIRECTED_REQUEST,
                    "absolute_target_host_mismatch",
                    None,
                ),
                None,
            );
        }
    }
    record.dst.host = Some(Arc::clone(&host));
    let path: Arc<str> = match normalize::path(req.uri().path()) {
        Ok(p) => p.into(),
        Err(e) => {
            return (
                refuse(record, StatusCode::BAD_REQUEST, e.as_str(), None),
                None,
            )
        }
    };
    http.path = Some(Arc::clone(&path));

    let (mut parts, body) = req.into_parts();
    let removed = strip_request(&mut parts.headers);
    let Some(view) = conn.workload.view(&conn.placement) else {
        return (
            refuse(
                record,
                StatusCode::FORBIDDEN,
                "no_policy_for_workload",
                None,
            ),
            None,
        );
    };
    // The credentials of the same generation as the policies that decide.
    let (policies, credentials) = conn.gateway.rules.both();
    let decide = |model| {
        policies.evaluate_http(
            &view,
            conn.orig.port(),
            &host,
            parts.method.as_str(),
            &path,
            &parts.headers,
            &removed,
            model,
        )
    };
    // The body is read only where a rule limits models and nothing else decided first.
    let (mut reserve, mut max_output) = (0, None);
    let (decision, body) = match decide(Model::Unread) {
        RequestDecision::NeedsModel { policy, rule } => {
            let timeout = conn.gateway.config.client_header_timeout;
            let room = &conn.gateway.model_reads.of(&conn.holder);
            let (body, model) = match read_model(body, &parts.headers, timeout, room).await {
                Ok(ModelRead::Read(bytes, asked, permit)) => {
                    // A tokens budget reserves what the request sends and may receive.
                    reserve = (bytes.len() as u64).div_ceil(4);
                    max_output = asked.max_output;
                    (RequestBody::Read(bytes, permit), asked.model)
                }
                Ok(ModelRead::Unreadable(body)) => (RequestBody::Streaming(body), None),
                Err((status, reason)) => {
                    record.policy = Some(policy);
                    return (refuse(record, status, reason, Some(&rule)), None);
                }
            };
            record.llm = Some(LlmRecord {
                model: model.as_deref().map(|m| cut(m, MODEL_AUDITED).to_owned()),
                ..LlmRecord::default()
            });
            (decide(Model::Read(model.as_deref())), body)
        }
        decision => (decision, RequestBody::Streaming(body)),
    };
    let (route, mut verdict) = match decision {
        RequestDecision::Deny {
            policy,
            rule,
            reason,
        } => {
            record.policy = policy;
            return (
                refuse(record, StatusCode::FORBIDDEN, reason, rule.as_deref()),
                None,
            );
        }
        RequestDecision::WouldDeny {
            policy,
            rule,
            reason,
            route,
        } => {
            record.policy = Some(policy);
            let Some(route) = route else {
                // Nothing says where this host's upstream is: refused even in monitor mode.
                return (
                    refuse(record, StatusCode::FORBIDDEN, reason, rule.as_deref()),
                    None,
                );
            };
            record.rule = rule;
            record.reason = format!("monitor:{reason}").into();
            (route, Verdict::WouldDeny)
        }
        RequestDecision::Allow {
            policy,
            rule,
            route,
        } => {
            record.policy = Some(policy);
            record.rule = Some(rule);
            record.reason = "rule_matched".into();
            (route, Verdict::Allow)
        }
        // Decided with the model read: never asks again.
        RequestDecision::NeedsModel { policy, rule } => {
            record.policy = Some(policy);
            return (
                refuse(record, StatusCode::FORBIDDEN, "model_missing", Some(&rule)),
                None,
            );
        }
    };

    if conn.gateway.audit_blocks() {
        tracing::error!(%host, "audit log not writable: refusing what would be allowed");
        return (
            refuse(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                record.rule.clone().as_deref(),
            ),
            None,
        );
    }
    // The credential, if the rule binds one, and only for a host the binding names.
    let binding = match &route.credential {
        Some(name) => match credentials.get(name) {
            Some(b) if b.allows_host(&host) => Some(b),
            Some(_) => {
                return (
                    refuse(
                        record,
                        StatusCode::FORBIDDEN,
                        "credential_not_bound_to_host",
                        record.rule.clone().as_deref(),
                    ),
                    None,
                )
            }
            None => {
                return (
                    refuse(
                        record,
                        StatusCode::FORBIDDEN,
                        "credential_missing",
                        record.rule.clone().as_deref(),
                    ),
                    None,
                )
            }
        },
        None => None,
    };
    let credential_name = binding.map(|b| Arc::clone(&b.name));
    // A placeholder (`tollgate:<binding>`) stands for a key the workload does not hold: it is
    // swapped only where this rule injects that very binding, and refused anywhere else.
    if let Some(name) = placeholder(&parts.headers) {
        if credential_name.as_deref() != Some(name.as_str()) {
            return (
                refuse(
                    record,
                    StatusCode::FORBIDDEN,
                    "placeholder_not_allowed",
                    record.rule.clone().as_deref(),
                ),
                None,
            );
        }
    }

    let mut query = parts.uri.query().map(str::to_owned);
    if binding.is_some() || record.llm.is_some() {
        // Redaction reads the response bytes: no compressed encodings where a secret went out;
        // nor where the answer's token counts are read.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    if let Some(b) = binding {
        let injected = match &b.inject {
            Inject::Header { name, .. } => Some(name),
            Inject::Query { .. } => None,
        };
        remove_caller_credentials(&mut parts.headers, injected);
        match &b.inject {
            Inject::Header { name, .. } => {
                if let Some(v) = b.header_value() {
                    parts.headers.insert(name.clone(), v);
                }
            }
            Inject::Query { param } => {
                match query_with(query.as_deref(), param, b.query_value().unwrap_or("")) {
                    Ok(q) => query = Some(q),
                    Err(reason) => {
                        return (
                            refuse(
                                record,
                                StatusCode::BAD_REQUEST,
                                reason,
                                record.rule.clone().as_deref(),
                            ),
                            credential_name,
                        )
                    }
                }
            }
        }
    }
    let https = route.tls == TlsMode::Originate;
    // The target as the workload sent it is kept where normalization and injection left it
    // as it was (origin-form, same path, same query); anything else is written anew.
    let unchanged = parts.uri.authority().is_none()
        && parts.uri.path() == &*path
        && parts.uri.query() == query.as_deref();
    if !unchanged {
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let Ok(uri) = target.parse::<Uri>() else {
            return (
                refuse(
                    record,
                    StatusCode::BAD_REQUEST,
                    "bad_target",
                    record.rule.clone().as_deref(),
                ),
                credential_name,
            );
        };
        parts.uri = uri;
    }
    parts.version = http::Version::HTTP_11;
    if let Some(v) = conn.upstream_host(&host, route.upstream_port, https) {
        parts.headers.insert(header::HOST, v);
    }
    let target = crate::upstream::Target {
        https,
        host: Arc::clone(&host),
        port: route.upstream_port,
    };
    // A tokens budget reserves what the request sends and the most output it asks for, or,
    // where it asks none, what the budget says for one.
    let reserve = match &route.budget {
        Some(b) if b.tokens.is_some() => {
            reserve.saturating_add(max_output.unwrap_or(b.reserve_output))
        }
        _ => 0,
    };
    let budget = route
        .budget
        .as_ref()
        .map(|b| b.of(conn.placement.pod.as_ref(), conn.workload.cgroup.as_ref()));
    // Counted last, so a request refused for another reason spends nothing (one refused at
    // dial time gets its request back below).
    let mut admitted = None;
    if let (Some(budget), Verdict::Allow) = (&budget, verdict) {
        match conn
            .gateway
            .budgets
            .admit_reserving(budget, reserve, Instant::now())
        {
            Ok(taken) => admitted = Some((budget, taken)),
            Err(_) if budget.monitor => {
                record.reason = "monitor:budget_exhausted".into();
                verdict = Verdict::WouldDeny;
            }
            Err(wait) => return (budget_exhausted(record, wait), credential_name),
        }
    }
    // From here the request's tokens are owed: settled by its answer, else (cancelled, failed)
    // by what it sent.
    *charge = budget.clone().filter(|b| b.tokens.is_some()).map(|budget| {
        crate::budget::TokenCharge::new(
            Arc::clone(&conn.gateway.budgets),
            budget,
            Arc::clone(sent),
            admitted.map_or(0, |(_, taken)| taken),
        )
    });
    let body = match body {
        RequestBody::Streaming(body) => Counted::new(body, Arc::clone(sent)).boxed(),
        RequestBody::Read(bytes, permit) => Counted::new(
            Keeping {
                body: Full::new(bytes),
                _room: permit,
            }
            .map_err(|never| match never {})
            .boxed(),
            Arc::clone(sent),
        )
        .boxed(),
    };
    let sent_request = conn.gateway.upstreams.request(
        &conn.ns,
        conn.netns_cookie,
        route.allow_private,
        target,
        Request::from_parts(parts, body),
    );
    match sent_request.await {
        Ok(resp) => {
            record.decision = verdict;
            match client_response(resp, binding.map(crate::credentials::Binding::echoes)) {
                Ok(response) => (response, credential_name),
                Err(Compressed) => {
                    record.decision = Verdict::Error;
                    record.reason = "upstream_compressed_response".into();
                    (
                        json_response(
                            StatusCode::BAD_GATEWAY,
                            &serde_json::json!({ "error": "upstream_compressed_response" }),
                        ),
                        credential_name,
                    )
                }
            }
        }
        Err(e) => {
            record.decision = Verdict::Error;
            let (status, reason) = if matches!(e, crate::upstream::UpstreamError::InternalOnly(_)) {
                if let Some((budget, _)) = admitted {
                    conn.gateway.budgets.refund(budget, Instant::now());
                }
                // The name resolved only to internal addresses and the rule does not allow
                // them: a policy refusal, not an upstream failure.
                record.decision = Verdict::Deny;
                (StatusCode::FORBIDDEN, "upstream_internal_address")
            } else if e.timed_out() {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            } else {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable")
            };
            record.reason = reason.into();
            tracing::info!(%host, error = %e, "upstream request failed");
            (
                json_response(status, &serde_json::json!({ "error": reason })),
                credential_name,
            )
        }
    }
}

/// An upstream response whose body could carry the secret compressed, past the scan.
#[derive(Debug, PartialEq, Eq)]
struct Compressed;

/// The workload's response from the upstream's: without hop-by-hop headers and without what
/// hyper's client attached to it (a reason phrase other than the standard one is kept there,
/// and hyper's HTTP/1.1 server writes it out as it is, unscanned: the workload gets the
/// standard one). Where a secret went out (`secrets`), every echo of it in the headers and
/// the body is masked; a compressed body cannot be scanned and is refused.
fn client_response<B>(
    response: Response<B>,
    secrets: Option<Arc<crate::redact::Secrets>>,
) -> Result<Response<Body>, Compressed>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
{
    let (mut parts, body) = response.into_parts();
    parts.extensions = http::Extensions::new();
    // Read before Transfer-Encoding goes with the other hop-by-hop headers.
    let compressed = encoded(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    let body = match secrets {
        Some(secrets) => {
            if compressed {
                return Err(Compressed);
            }
            scrub_headers(&mut parts.headers, secrets.forms());
            // The mask keeps the length: Content-Length stays as the upstream said.
            Redact::new(body, secrets).boxed()
        }
        None => body.boxed(),
    };
    Ok(Response::from_parts(parts, body))
}

/// 429 for a rule whose budget is spent, saying when the next request will be allowed.
fn budget_exhausted(record: &mut AuditRecord, wait: Duration) -> Response<Body> {
    let rule = record.rule.clone();
    let retry_after = (wait.as_secs_f64().ceil() as u64).max(1);
    let mut response = refuse(
        record,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exhausted",
        rule.as_deref(),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

/// A request body as it goes on: still on the client connection, or read whole for its model
/// (holding its room in the gateway's memory for such reads until it has gone).
enum RequestBody {
    Streaming(Incoming),
    Read(Bytes, Vec<crate::usage::Held>),
}

/// A body that keeps something (the room its bytes took) until it is dropped.
struct Keeping<B, T> {
    body: B,
    _room: T,
}

impl<B: hyper::body::Body + Unpin, T: Unpin> hyper::body::Body for Keeping<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The most of a body read to find its model: a larger one is refused (413) where a rule
/// limits models.
const MODEL_BODY_MAX: usize = 1 << 20;

/// How much of a model name an audit record keeps.
const MODEL_AUDITED: usize = 200;

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether `headers` say the body is encoded: any content coding but `identity`, or any
/// transfer coding but `chunked` (of `gzip, chunked`, hyper takes off the chunks, not the gzip).
pub fn encoded(headers: &HeaderMap) -> bool {
    let coded = |name: header::HeaderName, plain: &[u8]| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|c| !c.trim_ascii().eq_ignore_ascii_case(plain))
    };
    coded(header::CONTENT_ENCODING, b"identity") || coded(header::TRANSFER_ENCODING, b"chunked")
}

/// Whether `headers` say the body is JSON (`application/json` or `…+json`).
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(kind) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = kind.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.rsplit_once('+').is_some_and(|(ty, suffix)| {
            ty.starts_with("application/") && suffix.eq_ignore_ascii_case("json")
        })
}

/// What reading a body for its model found.
enum ModelRead {
    /// Not JSON, or encoded: no model, and the body left unread.
    Unreadable(Incoming),
    /// The body, read whole, what it asks, and the room it holds.
    Read(Bytes, Asked, Vec<crate::usage::Held>),
}

/// Reads the whole body (at most [`MODEL_BODY_MAX`], within `timeout`, its bytes counted
/// against `room`, the gateway's memory for such reads) and the top-level `"model"` string of
/// its JSON (see [`model_of`]). A body that is not declared JSON or is encoded is not read.
/// Refusals: no room (503), too large (413), not sent in time (408), broken off (400).
async fn read_model(
    mut body: Incoming,
    headers: &HeaderMap,
    timeout: Duration,
    room: &crate::usage::Room,
) -> Result<ModelRead, (StatusCode, &'static str)> {
    const TOO_LARGE: (StatusCode, &str) = (
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large_for_model_check",
    );
    if !is_json(headers) || encoded(headers) {
        return Ok(ModelRead::Unreadable(body));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MODEL_BODY_MAX as u64) {
        return Err(TOO_LARGE);
    }
    // Copied as it comes into one buffer (so many small frames cost their bytes, not a buffer
    // each), whose room is taken as it grows: a body not yet sent holds none.
    let most = declared.map_or(MODEL_BODY_MAX, |n| n as usize);
    let mut buf = crate::usage::RoomBuf::new(room, most);
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err((StatusCode::BAD_REQUEST, "body_read_failed"));
            };
            if let Ok(data) = frame.into_data() {
                buf.push(&data).map_err(|full| match full {
                    crate::usage::Full::TooLarge => TOO_LARGE,
                    crate::usage::Full::NoRoom => {
                        (StatusCode::SERVICE_UNAVAILABLE, "model_check_busy")
                    }
                })?;
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => return Err((StatusCode::REQUEST_TIMEOUT, "body_not_sent_in_time")),
        Ok(Err(refusal)) => return Err(refusal),
        Ok(Ok(())) => {}
    }
    let (bytes, permit) = buf.into_parts();
    let bytes = Bytes::from(bytes);
    let asked = asked_of(&bytes);
    Ok(ModelRead::Read(bytes, asked, permit))
}

/// The top-level `"model"` string of a JSON object body. There is none where readers could
/// disagree on it: a body that is not one JSON object (trailing bytes included), names
/// `model` twice or not as a string, or has another key that equals `model` but for case
/// (Go's and .NET's decoders match keys regardless of case, the last one winning).
pub fn model_of(body: &[u8]) -> Option<String> {
    asked_of(body).model
}

/// What a request body asks of a model: which one (see [`model_of`]), and the most output
/// tokens it may cost, if it said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Asked {
    pub model: Option<String>,
    pub max_output: Option<u64>,
}

/// The most output and the number of answers a JSON object asks for, each the largest of every
/// key that says it. Keys are compared as the APIs' decoders may read them: regardless of case
/// and of underscores (protobuf JSON takes both `maxOutputTokens` and `max_output_tokens`).
#[derive(Debug, Default)]
struct Limits {
    max_output: Option<u64>,
    answers: Option<u64>,
}

impl Limits {
    /// Reads `key`'s value from `map` if it is a limit; `false` if the key is none.
    fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<bool, A::Error> {
        // Folded on the stack: no name it could be is longer.
        let mut folded = [0u8; 24];
        let mut len = 0;
        for b in key.bytes().filter(|b| *b != b'_') {
            let Some(slot) = folded.get_mut(len) else {
                return Ok(false);
            };
            *slot = b.to_ascii_lowercase();
            len += 1;
        }
        let slot = match &folded[..len] {
            // OpenAI's chat completions and Anthropic; OpenAI's newer name; the Responses API
            // and Gemini.
            b"maxtokens" | b"maxcompletiontokens" | b"maxoutputtokens" => &mut self.max_output,
            // OpenAI's `n`, Gemini's `candidateCount`: each answer may use the most.
            b"n" | b"candidatecount" => &mut self.answers,
            b"generationconfig" => {
                let inner = map.next_value::<Nested>()?.0;
                self.max_output = self.max_output.max(inner.max_output);
                self.answers = self.answers.max(inner.answers);
                return Ok(true);
            }
            _ => return Ok(false),
        };
        let value = map.next_value::<serde_json::Value>()?;
        *slot = (*slot).max(limit(&value));
        Ok(true)
    }

    fn most(&self) -> Option<u64> {
        self.max_output
            .map(|m| m.saturating_mul(self.answers.unwrap_or(1).max(1)))
    }
}

/// A limit's value: a count, also written as an integral float or a numeric string (decoders
/// take those), rounded up; `null` says nothing; anything else states a limit that cannot be
/// read, taken as the most there is.
fn limit(value: &serde_json::Value) -> Option<u64> {
    let float = match value {
        serde_json::Value::Null => return None,
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as f64).or(n.as_f64()),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    Some(match float {
        Some(f) if f.is_finite() && f >= 0.0 => {
            if f >= u64::MAX as f64 {
                u64::MAX
            } else {
                f.ceil() as u64
            }
        }
        _ => u64::MAX,
    })
}

/// A nested configuration object's limits (anything other than an object has none).
struct Nested(Limits);

impl<'de> serde::Deserialize<'de> for Nested {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Nested;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Nested, A::Error> {
                let mut limits = Limits::default();
                while let Some(key) = map.next_key::<crate::jsonkey::Key<'de>>()? {
                    if !limits.read(&key, &mut map)? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Nested(limits))
            }
            // Skipped as the rest of a request body is: unchecked.
            crate::jsonkey::absent_unless_map!(Nested(Limits::default()), serde::de::IgnoredAny);
            crate::jsonkey::absent_numbers!(Nested(Limits::default()));
        }
        d.deserialize_any(V)
    }
}

pub fn asked_of(body: &[u8]) -> Asked {
    struct Request;
    impl<'de> serde::de::Visitor<'de> for Request {
        type Value = Asked;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Asked, A::Error> {
            let mut model = None;
            let mut ambiguous = false;
            let mut limits = Limits::default();
            while let Some(key) = map.next_key::<crate::jsonkey::Key<'de>>()? {
                if &*key == "model" {
                    ambiguous |= model.is_some();
                    model = Some(map.next_value::<String>()?);
                } else if !limits.read(&key, &mut map)? {
                    ambiguous |= key.eq_ignore_ascii_case("model");
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Asked {
                model: model.filter(|_| !ambiguous),
                max_output: limits.most(),
            })
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let Ok(asked) = serde::Deserializer::deserialize_map(&mut de, Request) else {
        return Asked::default();
    };
    if de.end().is_err() {
        return Asked::default();
    }
    asked
}

/// The binding a `tollgate:<name>` placeholder in a credential header names, if any.
pub fn placeholder(headers: &HeaderMap) -> Option<String> {
    const MARK: &[u8] = b"tollgate:";
    headers.values().find_map(|v| {
        let at = memchr::memmem::find(v.as_bytes(), MARK)?;
        let name: String = v.as_bytes()[at + MARK.len()..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'-' || **c == b'_')
            .map(|&c| char::from(c))
            .collect();
        (!name.is_empty()).then_some(name)
    })
}

/// The query with the credential injected as `param`: the caller's own `param` removed in
/// whatever encoding it is spelled (`k%65y` is `key` to the upstream). One hidden behind a `;`,
/// a separator to some readers, is refused: removing it would change the parameter it is in.
fn query_with(query: Option<&str>, param: &str, value: &str) -> Result<String, &'static str> {
    let names = |kv: &str| {
        let name = kv.split('=').next().unwrap_or("");
        percent_decoded(name) == param.as_bytes()
    };
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && !names(kv))
        .collect();
    if kept.iter().any(|kv| kv.split(';').any(names)) {
        return Err("credential_parameter_in_query");
    }
    let mut q = kept.join("&");
    if !q.is_empty() {
        q.push('&');
    }
    q.push_str(param);
    q.push('=');
    q.push_str(&percent_encode(value));
    Ok(q)
}

/// `s` percent-decoded, `+` read as a space; a `%` not followed by two hex digits stays.
fn percent_decoded(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn framing() {
        assert_eq!(framing_error(&headers(&[("content-length", "5")])), None);
        assert_eq!(
            framing_error(&headers(&[("transfer-encoding", "chunked")])),
            None
        );
        assert_eq!(
            framing_error(&headers(&[
                ("content-length", "5"),
                ("content-length", "5")
            ])),
            Some("duplicate_content_length")
        );
        assert_eq!(
            framing_error(&headers(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ])),
            Some("content_length_with_transfer_encoding")
        );
        assert_eq!(
            framing_error(&headers(&[("transfer-encoding", "chunked, identity")])),
            Some("unsupported_transfer_encoding")
        );
        assert_eq!(
            framing_error(&headers(&[("transfer-encoding", " chunked")])),
            Some("unsupported_transfer_encoding")
        );
    }

    #[test]
    fn raw_heads() {
        let ok = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(raw_head_error(ok), None);
        let table: [(&[u8], &str); 7] = [
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "content_length_with_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "duplicate_content_length"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", "unsupported_transfer_encoding"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", "whitespace_in_header_name"),
            (b"POST / HTTP/1.1\nHost: a\r\n\r\n", "bare_lf_in_head"),
            (b"POST / HTTP/1.1\r\nHost: a\r\n", "incomplete_head"),
            (b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", "leading_empty_line"),
        ];
        for (head, want) in table {
            assert_eq!(
                raw_head_error(head),
                Some(want),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn method_names_are_the_methods_own() {
        for m in [
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
            "PROPFIND", "get",
        ] {
            let method = http::Method::from_bytes(m.as_bytes()).expect("method");
            let name = method_name(&method);
            assert_eq!(name, method.as_str());
            // Only an extension method takes a string of its own.
            assert_eq!(
                matches!(name, Cow::Owned(_)),
                ["PROPFIND", "get"].contains(&m),
                "{m}"
            );
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            placeholder(&headers(&[(
                "authorization",
                "Bearer tollgate:openai-prod"
            )])),
            Some("openai-prod".into())
        );
        assert_eq!(
            placeholder(&headers(&[("x-api-key", "tollgate:a_b")])),
            Some("a_b".into())
        );
        assert_eq!(
            placeholder(&headers(&[("authorization", "Bearer sk-123")])),
            None
        );
    }

    /// An upstream's reason phrase is its own text: one that echoes the secret never reaches
    /// an HTTP/1.1 workload, which gets the standard phrase instead.
    #[test]
    fn an_upstream_reason_phrase_never_reaches_the_workload() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SECRET: &[u8] = b"sk-live-XYZ";
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = upstream.local_addr().expect("addr").port();
            tokio::spawn(async move {
                let (mut sock, _) = upstream.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 401 key sk-live-XYZ rejected\r\nContent-Length: 2\r\n\r\nno",
                    )
                    .await;
                std::future::pending::<()>().await;
            });
            let mut config = crate::config::Config::parse(
                crate::config::DEMO_CONFIG,
                "demo",
                std::path::Path::new("/"),
            )
            .expect("config");
            config.upstream_ca = None;
            let upstreams = crate::upstream::Upstreams::new(crate::upstream::DialPolicy { config })
                .expect("upstreams");
            let request = Request::get("/v1/models")
                .header(header::HOST, "127.0.0.1")
                .body(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("request");
            let target = crate::upstream::Target {
                https: false,
                host: "127.0.0.1".into(),
                port,
            };
            let answer = upstreams
                .request(&Arc::new(Netns::Host), 7, true, target, request)
                .await
                .expect("answer");
            let secrets = Arc::new(crate::redact::Secrets::new(vec![SECRET.to_vec()]));
            let response = client_response(answer, Some(secrets)).expect("not compressed");
            let response = std::sync::Mutex::new(Some(response));

            // Written by hyper's HTTP/1.1 server, as the gateway's client connection writes it.
            let gateway = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = gateway.local_addr().expect("addr");
            tokio::spawn(async move {
                let (sock, _) = gateway.accept().await.expect("accept");
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    let response = response.lock().expect("lock").take().expect("one request");
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), service)
                    .await;
            });
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client
                .write_all(b"GET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\nno"), "{text}");
            assert!(memchr::memmem::find(&got, SECRET).is_none(), "{text}");
        });
    }

    /// An HTTP/2 service answering "ok", after twice `timeout` for `/slow`.
    fn h2_service(
        timeout: Duration,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone {
        hyper::service::service_fn(move |req: Request<Incoming>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(timeout * 2).await;
            }
            Ok::<_, Infallible>(Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|never| match never {})
                    .boxed(),
            ))
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    async fn accepted() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// A client that sends the preface and its SETTINGS and then nothing (or headers it never
    /// finishes) is closed once the timeout has passed, as HTTP/1.1's header timeout would.
    #[test]
    fn an_http2_connection_without_a_request_is_closed_in_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const TIMEOUT: Duration = Duration::from_millis(300);
        runtime().block_on(async {
            // HEADERS on stream 1 without END_HEADERS: the request never completes.
            let unfinished: &[u8] = &[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82];
            for rest in [&[][..], unfinished] {
                let (mut client, server) = accepted().await;
                let started = tokio::time::Instant::now();
                let served =
                    tokio::spawn(serve_h2_connection(server, h2_service(TIMEOUT), TIMEOUT));
                client
                    .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                    .await
                    .expect("preface");
                client.write_all(rest).await.expect("write");
                // Whatever the gateway sends (SETTINGS, GOAWAY, pings) is read, never answered.
                let mut buf = [0u8; 1024];
                let closed = tokio::time::timeout(Duration::from_secs(5), async {
                    while matches!(client.read(&mut buf).await, Ok(1..)) {}
                })
                .await;
                assert!(closed.is_ok(), "still open after 5 s");
                let after = started.elapsed();
                assert!(after >= TIMEOUT, "closed after {after:?}");
                assert!(after < TIMEOUT * 3, "closed after {after:?}");
                let end = served.await.expect("served");
                assert!(matches!(end, H2End::Idle), "{end:?}");
            }
        });
    }

    /// After its last answer, a connection is closed once it has been idle for the timeout;
    /// a request in flight longer than that keeps it open.
    #[test]
    fn an_idle_http2_connection_is_closed_after_the_timeout() {
        const TIMEOUT: Duration = Duration::from_millis(300);
        runtime().block_on(async {
            let (client, server) = accepted().await;
            let served = tokio::spawn(serve_h2_connection(server, h2_service(TIMEOUT), TIMEOUT));
            let (mut sender, driver) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(client),
            )
            .await
            .expect("handshake");
            let driver = tokio::spawn(driver);
            for path in ["/slow", "/"] {
                let request = Request::get(format!("http://api.example.com{path}"))
                    .body(http_body_util::Empty::<Bytes>::new())
                    .expect("request");
                let response = sender.send_request(request).await.expect(path);
                let body = response.into_body().collect().await.expect("body");
                assert_eq!(body.to_bytes(), "ok");
            }
            let idle_since = tokio::time::Instant::now();
            let closed = tokio::time::timeout(Duration::from_secs(5), driver).await;
            assert!(closed.is_ok(), "still open after 5 s");
            let after = idle_since.elapsed();
            assert!(after >= TIMEOUT, "closed after {after:?}");
            assert!(after < TIMEOUT * 3, "closed after {after:?}");
            let end = served.await.expect("served");
            assert!(matches!(end, H2End::Idle), "{end:?}");
        });
    }

    /// A request hyper cannot parse is audited also after earlier requests on the connection,
    /// and so is a later head the client began and never finished (closed or timed out inside
    /// it); a clean close or an idle timeout between requests is not.
    #[test]
    fn a_later_unparsable_request_is_audited_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const TIMEOUT: Duration = Duration::from_millis(300);
        const GOOD: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n";
        runtime().block_on(async {
            for (case, later, want) in [
                (
                    "bad header name",
                    &b"GET / HTTP/1.1\r\nHost: api.openai.com\r\nBad@Name: x\r\n\r\n"[..],
                    Some("request_unparsable"),
                ),
                (
                    "bad request line",
                    &b"GET /\x01 HTTP/1.1\r\n\r\n"[..],
                    Some("request_unparsable"),
                ),
                ("clean close", &b""[..], None),
                ("idle", &b""[..], None),
                (
                    "closed inside a head",
                    &b"GET /v1/models HTTP/1.1\r\nHost: api.open"[..],
                    Some("request_head_unfinished"),
                ),
                (
                    "timed out inside a head",
                    &b"POST /v1/chat/completions HTTP/1.1\r\n"[..],
                    Some("no_request_in_time"),
                ),
            ] {
                let (mut client, server) = accepted().await;
                let handled = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let seen = Arc::clone(&handled);
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    seen.store(true, std::sync::atomic::Ordering::Relaxed);
                    async {
                        Ok::<_, Infallible>(Response::new(
                            Full::new(Bytes::from_static(b"ok"))
                                .map_err(|never| match never {})
                                .boxed(),
                        ))
                    }
                });
                let seen = Arc::new(Seen::default());
                let served = tokio::spawn(http1_connection(
                    server,
                    Arc::clone(&seen),
                    service,
                    TIMEOUT,
                ));
                client.write_all(GOOD).await.expect("write");
                let mut buf = [0u8; 1024];
                let n = client.read(&mut buf).await.expect("read");
                assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"), "{case}");
                client.write_all(later).await.expect("write");
                if case.starts_with("closed") || case == "clean close" {
                    client.shutdown().await.expect("shutdown");
                }
                while matches!(client.read(&mut buf).await, Ok(1..)) {}
                let result = served.await.expect("served");
                assert!(seen.refused.get().is_none(), "{case}");
                let handled = handled.load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(
                    unrecorded(&result, handled, seen.mid_head()),
                    want,
                    "{case}: {result:?}"
                );
            }
            // Before any request was handled, an end is audited, whichever it was.
            assert_eq!(
                unrecorded(&Ok(()), false, false),
                Some("closed_before_request")
            );
        });
    }

    #[test]
    fn the_most_output_asked_is_read_where_each_api_puts_it() {
        const ALL: Option<u64> = Some(u64::MAX);
        for (body, want) in [
            (r#"{"model":"m","max_tokens":100}"#, Some(100)),
            (r#"{"model":"m","max_completion_tokens":50}"#, Some(50)),
            (r#"{"model":"m","max_output_tokens":70}"#, Some(70)),
            (
                r#"{"model":"m","generationConfig":{"maxOutputTokens":30}}"#,
                Some(30),
            ),
            (
                r#"{"model":"m","generation_config":{"max_output_tokens":"65536"}}"#,
                Some(65536),
            ),
            // Given twice, in two places or in another case, the largest.
            (r#"{"max_tokens":10,"max_tokens":90,"model":"m"}"#, Some(90)),
            (r#"{"max_tokens":10,"max_completion_tokens":20}"#, Some(20)),
            (
                r#"{"generationConfig":{"maxOutputTokens":9000,"maxOutputTokens":1}}"#,
                Some(9000),
            ),
            (r#"{"max_tokens":10,"MAX_TOKENS":500}"#, Some(500)),
            // Written as decoders also take them: rounded up.
            (r#"{"max_tokens":1e5}"#, Some(100_000)),
            (r#"{"max_tokens":100.5}"#, Some(101)),
            (r#"{"max_tokens":"100"}"#, Some(100)),
            // Several answers may each use the most.
            (r#"{"max_tokens":100,"n":3}"#, Some(300)),
            (
                r#"{"generationConfig":{"maxOutputTokens":10,"candidateCount":4}}"#,
                Some(40),
            ),
            // Stated but unreadable: the most there is.
            (r#"{"max_tokens":-1}"#, ALL),
            (r#"{"max_tokens":{"a":1}}"#, ALL),
            (r#"{"max_tokens":"lots"}"#, ALL),
            (r#"{"max_tokens":1e400}"#, None),
            // Not stated.
            (r#"{"model":"m","max_tokens":null}"#, None),
            (r#"{"model":"m","n":5}"#, None),
            (r#"{"model":"m","messages":[{"max_tokens":5}]}"#, None),
            (r#"{"model":"m","generationConfig":[1,2]}"#, None),
            (r#"{"model":"m","max_tokens":5} x"#, None),
        ] {
            assert_eq!(asked_of(body.as_bytes()).max_output, want, "{body}");
        }
        let asked = asked_of(br#"{"max_tokens":64,"model":"claude-x","generationConfig":7}"#);
        assert_eq!(asked.model.as_deref(), Some("claude-x"));
    }

    #[test]
    fn the_model_is_the_top_level_string_or_none() {
        for (body, want) in [
            (
                r#"{"model":"gpt-4o-mini","messages":[]}"#,
                Some("gpt-4o-mini"),
            ),
            (r#" {"messages":[{"model":"x"}],"model":"o3"} "#, Some("o3")),
            (r#"{"mod\u0065l":"escaped"}"#, Some("escaped")),
            // Two models: the upstream might take either, so there is none.
            (r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#, None),
            (r#"{"model":7}"#, None),
            (r#"{"model":null}"#, None),
            (r#"{"input":{"model":"x"}}"#, None),
            (r#"[{"model":"x"}]"#, None),
            (r#"{"model":"x"} trailing"#, None),
            // Readers that match keys regardless of case would take the other.
            (r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#, None),
            (r#"{"Model":"gpt-4o","model":"gpt-4o-mini"}"#, None),
            (r#"{"modelx":"a","model":"b"}"#, Some("b")),
            // Not an object: an array is a sequence, whatever serde could map it to.
            (r#"["gpt-4o-mini"]"#, None),
            (r#""gpt-4o-mini""#, None),
            ("model=x", None),
            ("", None),
        ] {
            assert_eq!(model_of(body.as_bytes()).as_deref(), want, "{body}");
        }
        assert_eq!(cut("ab\u{e9}c", 3), "ab");
        let with = |pairs: &[(&str, &str)]| headers(pairs);
        assert!(is_json(&with(&[(
            "content-type",
            "application/json; charset=utf-8"
        )])));
        assert!(is_json(&with(&[(
            "content-type",
            "application/vnd.api+JSON"
        )])));
        assert!(!is_json(&with(&[(
            "content-type",
            "application/x-www-form-urlencoded"
        )])));
        assert!(!is_json(&with(&[("content-type", "text/plain+json")])));
        assert!(!is_json(&with(&[])));
        assert!(!encoded(&with(&[("content-encoding", "identity")])));
        assert!(encoded(&with(&[
            ("content-encoding", "identity"),
            ("content-encoding", "gzip")
        ])));
        assert!(encoded(&with(&[("content-encoding", "br")])));
        assert_eq!(cut("abc", 200), "abc");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    /// The caller's credentials go also where `_` stands for `-` (WSGI and CGI read them
    /// alike), with the injected header's own name.
    #[test]
    fn caller_credentials_go_in_either_spelling() {
        let mut h = headers(&[
            ("authorization", "Bearer mine"),
            ("x-api-key", "mine"),
            ("x_api_key", "mine"),
            ("api_key", "mine"),
            ("x-goog_api_key", "mine"),
            ("x-goog-api-key", "mine"),
            ("x-api-keys", "kept"),
            ("x_api", "kept"),
            ("accept", "*/*"),
        ]);
        remove_caller_credentials(&mut h, Some(&HeaderName::from_static("x-goog-api-key")));
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-api-keys", "x_api"]);
    }

    /// A body compressed as a transfer coding cannot be scanned for the secret any more than
    /// one compressed as a content coding: both are refused where a secret went out.
    #[test]
    fn a_compressed_transfer_coding_is_refused_where_a_secret_went_out() {
        let answer = |pairs: &[(&str, &str)]| {
            let mut response = Response::new(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| -> hyper::Error { match never {} }),
            );
            *response.headers_mut() = headers(pairs);
            response
        };
        let secrets = || {
            Some(Arc::new(crate::redact::Secrets::new(
                vec![b"sk-1".to_vec()],
            )))
        };
        for (pairs, compressed) in [
            (&[("transfer-encoding", "chunked")][..], false),
            (&[("content-encoding", "identity")][..], false),
            (&[("transfer-encoding", "gzip, chunked")][..], true),
            (
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                ][..],
                true,
            ),
            (&[("content-encoding", "gzip")][..], true),
        ] {
            assert_eq!(encoded(&headers(pairs)), compressed, "{pairs:?}");
            let built = client_response(answer(pairs), secrets());
            assert_eq!(built.is_err(), compressed, "{pairs:?}");
            // Without a secret there is nothing to scan for: passed on.
            assert!(client_response(answer(pairs), None).is_ok(), "{pairs:?}");
        }
    }

    /// The caller's own credential parameter goes however it is spelled; one behind a `;` is
    /// refused.
    #[test]
    fn the_callers_credential_parameter_is_removed_in_any_encoding() {
        for (query, want) in [
            (None, Ok("key=s%2B1")),
            (Some(""), Ok("key=s%2B1")),
            (Some("key=mine"), Ok("key=s%2B1")),
            (Some("a=1&key=mine&b=2"), Ok("a=1&b=2&key=s%2B1")),
            (Some("k%65y=mine&b=2"), Ok("b=2&key=s%2B1")),
            (Some("%6B%65%79=mine"), Ok("key=s%2B1")),
            (Some("key"), Ok("key=s%2B1")),
            // Other names stay as they were sent.
            (
                Some("KEY=x&keys=y&k%2565y=z"),
                Ok("KEY=x&keys=y&k%2565y=z&key=s%2B1"),
            ),
            (Some("q=a;b"), Ok("q=a;b&key=s%2B1")),
            (Some("a=1;key=mine"), Err("credential_parameter_in_query")),
            (
                Some("a=1;k%65y=mine&b=2"),
                Err("credential_parameter_in_query"),
            ),
        ] {
            assert_eq!(
                query_with(query, "key", "s+1").as_deref().map_err(|e| *e),
                want,
                "{query:?}"
            );
        }
    }
}
