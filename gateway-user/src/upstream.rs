//! Upstream connections for HTTP rules: the gateway resolves the *policy* host itself (never
//! the address the workload chose), refuses internal addresses unless a rule names them,
//! dials from the workload's network namespace, and speaks TLS verified for the policy host.
//! Connections are pooled per namespace and authority.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{config::Config, http_proxy::Body, netns::Netns, relay::Relay};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Inside the dial error when a name resolves only to internal addresses the rule does not
/// allow.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to internal addresses; a rule must allow_private")]
pub struct InternalOnly(pub String);

/// Whether `ip` is loopback, private, link-local (cloud metadata included), shared, multicast or
/// unspecified: never dialed for a name unless a rule says so.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    (u32::from(hi) << 16) | u32::from(lo),
                ))
            };
            // NAT64 (64:ff9b::/96), IPv4-compatible (::a.b.c.d), IPv4-translated
            // (::ffff:0:a.b.c.d), 6to4 (2002::/16): judge the IPv4 inside.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                || (seg[..6] == [0; 6] && (seg[6] != 0 || seg[7] > 1))
                || seg[..6] == [0, 0, 0, 0, 0xffff, 0]
            {
                return is_internal(embedded(seg[6], seg[7]));
            }
            if seg[0] == 0x2002 {
                return is_internal(embedded(seg[1], seg[2]));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                // Site-local (deprecated, still routed inside some networks).
                || (seg[0] & 0xffc0) == 0xfec0
                // Local-use NAT64 (64:ff9b:1::/48), where an operator's translator may lead.
                || seg[..3] == [0x64, 0xff9b, 1]
                // Teredo (2001::/32): a tunnel to an address its server and client encode.
                || seg[..2] == [0x2001, 0]
        }
    }
}

/// Whether `ip` is link-local (cloud metadata services live there: 169.254.169.254, fe80::)
/// or AWS's IPv6 metadata address, in any of the forms [`is_internal`] reads.
pub fn is_link_local_or_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = std::net::Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
            (seg[0] & 0xffc0) == 0xfe80
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || ((seg[..6] == [0, 0, 0, 0, 0, 0xffff]
                    || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                    || seg[..6] == [0; 6]
                    || seg[..6] == [0, 0, 0, 0, 0xffff, 0])
                    && embedded.is_link_local())
                || (seg[0] == 0x2002
                    && std::net::Ipv4Addr::from((u32::from(seg[1]) << 16) | u32::from(seg[2]))
                        .is_link_local())
        }
    }
}

/// An upstream connection's transport: plain or TLS.
pub enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the connector needs to know beyond the URI.
pub struct DialPolicy {
    pub config: Config,
}

/// Makes upstream connections in one network namespace.
pub struct Connector {
    ns: Arc<Netns>,
    /// The matched rule says the name may resolve to internal addresses.
    allow_private: bool,
    tls: Arc<rustls::ClientConfig>,
    dial: Arc<DialPolicy>,
}

impl Connector {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.dial.config.test_override(host, port) {
            return Ok(vec![addr]);
        }
        let addrs: Vec<SocketAddr> =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("resolving {host} timed out"),
                    )
                })??
                .collect();
        let allowed = self.allow_private;
        let usable: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| allowed || !is_internal(a.ip()))
            .collect();
        if usable.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                InternalOnly(host.to_owned()),
            ));
        }
        Ok(usable)
    }

    /// A TCP connection to `host:port`, resolved by the gateway, made in the workload's
    /// namespace.
    /// Resolving and connecting share one [`CONNECT_TIMEOUT`]: a name with many slow
    /// addresses does not multiply it.
    async fn tcp(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut last = io::Error::other("no address");
        for addr in self.resolve(host, port).await? {
            let domain = if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            let fd = self
                .ns
                .socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0)?;
            let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            if let Some(src) = self.dial.config.upstream_bind {
                if src.is_ipv4() == addr.is_ipv4() {
                    socket.bind(SocketAddr::new(src, 0))?;
                }
            }
            match tokio::time::timeout_at(deadline, socket.connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect to {addr} timed out"),
                    );
                }
            }
        }
        Err(last)
    }

    async fn connect(&self, target: &Target) -> io::Result<Stream> {
        let tcp = self.tcp(&target.host, target.port).await?;
        if !target.https {
            return Ok(Stream::Plain(TokioIo::new(tcp)));
        }
        let name = rustls::pki_types::ServerName::try_from(target.host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let handshake = TlsConnector::from(Arc::clone(&self.tls)).connect(name, tcp);
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with {} timed out", target.host),
                )
            })??;
        Ok(Stream::Tls(Box::new(TokioIo::new(tls))))
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;
type Driver = Pin<Box<hyper::client::conn::http1::Connection<Stream, Body>>>;

/// How long an unused upstream connection stays pooled.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per pool key; more are closed when they come back.
const MAX_IDLE: usize = 128;

/// Where a forwarded request goes: the policy's host, never the workload's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub https: bool,
    pub host: Arc<str>,
    pub port: u16,
}

/// Connections are pooled per namespace, per whether internal addresses were allowed when
/// dialing, and per target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    cookie: u64,
    allow_private: bool,
    target: Target,
}

/// An HTTP/1.1 upstream connection. It has no task of its own: whoever holds it drives it
/// (the request's task while the response head is awaited, the response body while it
/// streams), so a proxied exchange is served by one task with no hand-off between tasks.
pub struct Lease {
    sender: Sender,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
    key: PoolKey,
    idle: Arc<Mutex<Idle>>,
    /// The connection talks to the request and the response body through channels whose
    /// wake-ups land in the task that polls them: relayed, not rescheduled.
    relay: Arc<Relay>,
}

impl Lease {
    /// Polls `f` (the connection and what waits on it) through the lease's relay.
    fn poll_relayed<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let relay = Arc::clone(&self.relay);
        relay.poll(cx, |cx| f(self, cx))
    }

    /// Runs the connection's I/O in the caller's task.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                self.driver = None;
            }
        }
    }

    /// Whether the connection is open and waiting for a request; drives it once to find out.
    fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(std::task::Waker::noop()));
        self.driver.is_some() && self.sender.is_ready()
    }

    /// Back to the pool if the exchange completed and the connection can take another.
    fn release(mut self) {
        if !self.usable() {
            return;
        }
        let idle = Arc::clone(&self.idle);
        idle.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(self);
    }
}

/// The pooled connections nobody is using, most recently used last.
#[derive(Default)]
struct Idle(HashMap<PoolKey, Vec<(Lease, Instant)>>);

impl Idle {
    fn put(&mut self, lease: Lease) {
        let list = self.0.entry(lease.key.clone()).or_default();
        list.retain(|(_, since)| since.elapsed() < IDLE_TIMEOUT);
        if list.len() < MAX_IDLE {
            list.push((lease, Instant::now()));
        }
    }

    fn take(&mut self, key: &PoolKey) -> Option<Lease> {
        let list = self.0.get_mut(key)?;
        let found = loop {
            let Some((lease, since)) = list.pop() else {
                break None;
            };
            if since.elapsed() < IDLE_TIMEOUT {
                break Some(lease);
            }
        };
        if list.is_empty() {
            self.0.remove(key);
        }
        found
    }

    /// Closes what has been idle too long.
    fn prune(&mut self) {
        self.0.retain(|_, list| {
            list.retain(|(_, since)| since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }
}

/// A response whose body drives the upstream connection it arrives on, and gives the
/// connection back to the pool once it has been read to the end.
pub struct Driven {
    body: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for Driven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driven")
            .field("pooled", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

impl hyper::body::Body for Driven {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let body = &mut this.body;
        let frame = match &mut this.lease {
            Some(lease) => lease.poll_relayed(cx, |lease, cx| {
                lease.drive(cx);
                Pin::new(&mut *body).poll_frame(cx)
            }),
            None => Pin::new(body).poll_frame(cx),
        };
        if let Poll::Ready(None) = frame {
            if let Some(lease) = this.lease.take() {
                lease.release();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // Read to the end but not polled past it (a sized body): still reusable. Dropped
        // before its end (the client left): the connection closes with it.
        if let Some(lease) = self.lease.take() {
            if hyper::body::Body::is_end_stream(&self.body) {
                lease.release();
            }
        }
    }
}

/// Why a request got no response from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The name resolved only to internal addresses and the rule does not allow them.
    #[error("{0}")]
    InternalOnly(String),
    #[error("no response head within {0:?}")]
    HeaderTimeout(Duration),
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    fn connect(e: io::Error) -> Self {
        if matches!(e.get_ref(), Some(inner) if inner.is::<InternalOnly>()) {
            Self::InternalOnly(e.to_string())
        } else {
            Self::Connect(e)
        }
    }

    pub fn timed_out(&self) -> bool {
        match self {
            Self::HeaderTimeout(_) => true,
            Self::Connect(e) => e.kind() == io::ErrorKind::TimedOut,
            _ => false,
        }
    }
}

/// Upstream connections for every namespace.
pub struct Upstreams {
    tls: Arc<rustls::ClientConfig>,
    dial: Arc<DialPolicy>,
    idle: Arc<Mutex<Idle>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read upstream_ca {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("upstream_ca {path}: no usable certificate in it")]
    Empty { path: std::path::PathBuf },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

impl Upstreams {
    pub fn new(dial: DialPolicy) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &dial.config.upstream_ca {
            let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
                path: path.clone(),
                source,
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                if roots.add(cert).is_ok() {
                    added += 1;
                }
            }
            if added == 0 {
                return Err(TlsSetupError::Empty { path: path.clone() });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.resumption =
            rustls::client::Resumption::store(Arc::new(crate::tickets::Tickets::new()));
        Ok(Self {
            tls: Arc::new(tls),
            dial: Arc::new(dial),
            idle: Arc::default(),
        })
    }

    /// A plain TCP connection to `host:port` from `ns` (TLS passthrough).
    pub async fn dial_tcp(
        &self,
        ns: &Arc<Netns>,
        host: &str,
        port: u16,
        allow_private: bool,
    ) -> io::Result<TcpStream> {
        let connector = Connector {
            allow_private,
            ns: Arc::clone(ns),
            tls: Arc::clone(&self.tls),
            dial: Arc::clone(&self.dial),
        };
        connector.tcp(host, port).await
    }

    /// Closes the idle connections of the namespace with `cookie` (requests in flight keep
    /// theirs until they end).
    pub fn forget(&self, cookie: u64) {
        self.lock_idle().0.retain(|key, _| key.cookie != cookie);
    }

    /// Closes connections idle for longer than the idle timeout.
    pub fn prune(&self) {
        self.lock_idle().prune();
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Idle connections by namespace cookie.
    #[cfg(test)]
    fn idle_by_namespace(&self) -> std::collections::BTreeMap<u64, usize> {
        let mut by = std::collections::BTreeMap::new();
        for (key, list) in &self.lock_idle().0 {
            *by.entry(key.cookie).or_default() += list.len();
        }
        by
    }

    /// A pooled connection that is still open and idle, or a new one dialed from `ns`.
    async fn lease(&self, ns: &Arc<Netns>, key: PoolKey) -> Result<(Lease, bool), UpstreamError> {
        while let Some(mut lease) = self.lock_idle().take(&key) {
            if lease.usable() {
                return Ok((lease, true));
            }
        }
        let connector = Connector {
            ns: Arc::clone(ns),
            allow_private: key.allow_private,
            tls: Arc::clone(&self.tls),
            dial: Arc::clone(&self.dial),
        };
        let stream = connector
            .connect(&key.target)
            .await
            .map_err(UpstreamError::connect)?;
        let (sender, driver) = hyper::client::conn::http1::Builder::new()
            .handshake(stream)
            .await?;
        Ok((
            Lease {
                sender,
                driver: Some(Box::pin(driver)),
                key,
                idle: Arc::clone(&self.idle),
                relay: Arc::default(),
            },
            false,
        ))
    }

    /// Sends `req` (origin-form URI, Host set) to `target` from `ns` and waits for the
    /// response head, at most the configured upstream header timeout. A pooled connection
    /// found closed before the request went out is replaced by a new one, once.
    pub async fn request(
        &self,
        ns: &Arc<Netns>,
        cookie: u64,
        allow_private: bool,
        target: Target,
        mut req: Request<Body>,
    ) -> Result<Response<Driven>, UpstreamError> {
        let key = PoolKey {
            cookie,
            allow_private,
            target,
        };
        let limit = self.dial.config.upstream_header_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (mut lease, pooled) = self.lease(ns, key.clone()).await?;
            let mut sent = std::pin::pin!(lease.sender.try_send_request(req));
            let head = std::future::poll_fn(|cx| {
                lease.poll_relayed(cx, |lease, cx| {
                    lease.drive(cx);
                    sent.as_mut().poll(cx)
                })
            });
            match tokio::time::timeout_at(deadline, head).await {
                Err(_) => return Err(UpstreamError::HeaderTimeout(limit)),
                Ok(Ok(response)) => {
                    return Ok(response.map(|body| Driven {
                        body,
                        lease: Some(lease),
                    }))
                }
                Ok(Err(mut e)) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(header_timeout: Duration) -> Upstreams {
        let mut config = crate::config::Config::parse(
            crate::config::DEMO_CONFIG,
            "demo",
            std::path::Path::new("/"),
        )
        .expect("config");
        config.upstream_ca = None;
        config.upstream_header_timeout = header_timeout;
        Upstreams::new(DialPolicy { config }).expect("upstreams")
    }

    /// A plain HTTP/1.1 mock on loopback: answers `/sized` with a Content-Length body,
    /// `/chunked` with a chunked one, `/stall` never; closes each connection `linger` after
    /// its last response. Returns its port and how many connections it accepted.
    async fn mock(linger: Duration) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let read = tokio::time::timeout(linger, sock.read(&mut buf)).await;
                        let Ok(Ok(n @ 1..)) = read else { return };
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let reply: &[u8] = if head.starts_with("GET /sized") {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsized"
                        } else if head.starts_with("GET /chunked") {
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nchunked\r\n0\r\n\r\n"
                        } else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        if sock.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    fn get(path: &str) -> Request<Body> {
        use http_body_util::BodyExt;
        Request::get(path)
            .header("host", "127.0.0.1")
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("request")
    }

    fn target(port: u16) -> Target {
        Target {
            https: false,
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_connection_read_to_the_end_is_pooled_and_reused() {
        use http_body_util::BodyExt;
        runtime().block_on(async {
            let (port, accepted) = mock(Duration::from_secs(30)).await;
            let up = upstreams(Duration::from_secs(5));
            let ns = Arc::new(Netns::Host);
            for path in ["/sized", "/chunked", "/sized", "/chunked"] {
                let response = up
                    .request(&ns, 7, true, target(port), get(path))
                    .await
                    .expect("response");
                let body = response.into_body().collect().await.expect("body");
                assert_eq!(body.to_bytes(), &path.as_bytes()[1..]);
                assert_eq!(up.idle_by_namespace().get(&7), Some(&1), "{path}");
            }
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn a_response_dropped_before_its_end_closes_the_connection() {
        use http_body_util::BodyExt;
        runtime().block_on(async {
            let (port, accepted) = mock(Duration::from_secs(30)).await;
            let up = upstreams(Duration::from_secs(5));
            let ns = Arc::new(Netns::Host);
            let mut body = up
                .request(&ns, 7, true, target(port), get("/chunked"))
                .await
                .expect("response")
                .into_body();
            let first = body.frame().await.expect("a frame").expect("data");
            assert_eq!(first.into_data().expect("data"), "chunked");
            drop(body);
            assert!(up.idle_by_namespace().is_empty());
            let response = up
                .request(&ns, 7, true, target(port), get("/sized"))
                .await
                .expect("response");
            assert_eq!(
                response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes(),
                "sized"
            );
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        });
    }

    #[test]
    fn a_pooled_connection_the_upstream_closed_is_not_used() {
        use http_body_util::BodyExt;
        runtime().block_on(async {
            let (port, accepted) = mock(Duration::from_millis(50)).await;
            let up = upstreams(Duration::from_secs(5));
            let ns = Arc::new(Netns::Host);
            for _ in 0..3 {
                let response = up
                    .request(&ns, 7, true, target(port), get("/sized"))
                    .await
                    .expect("response");
                response.into_body().collect().await.expect("body");
                // The mock closes the idle connection meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        });
    }

    #[test]
    fn no_response_head_in_time_is_a_timeout() {
        runtime().block_on(async {
            let (port, _) = mock(Duration::from_secs(30)).await;
            let up = upstreams(Duration::from_millis(200));
            let started = Instant::now();
            let error = up
                .request(&Arc::new(Netns::Host), 7, true, target(port), get("/stall"))
                .await
                .expect_err("no response");
            assert!(error.timed_out(), "{error}");
            assert!(started.elapsed() >= Duration::from_millis(200));
            assert!(up.idle_by_namespace().is_empty());
        });
    }

    #[test]
    fn internal_only_names_are_refused_unless_allowed() {
        runtime().block_on(async {
            let up = upstreams(Duration::from_secs(5));
            let error = up
                .request(&Arc::new(Netns::Host), 7, false, target(1), get("/sized"))
                .await
                .expect_err("refused");
            assert!(matches!(error, UpstreamError::InternalOnly(_)), "{error}");
        });
    }

    #[test]
    fn a_released_namespace_takes_its_idle_connections_along() {
        use http_body_util::BodyExt;
        runtime().block_on(async {
            let (port, _) = mock(Duration::from_secs(30)).await;
            let up = upstreams(Duration::from_secs(5));
            let ns = Arc::new(Netns::Host);
            for cookie in [7, 7, 9] {
                // Two responses held at once: two connections for namespace 7.
                let a = up
                    .request(&ns, cookie, true, target(port), get("/sized"))
                    .await;
                let b = up
                    .request(&ns, cookie, true, target(port), get("/sized"))
                    .await;
                for r in [a, b] {
                    r.expect("response")
                        .into_body()
                        .collect()
                        .await
                        .expect("body");
                }
            }
            assert_eq!(up.idle_by_namespace(), [(7, 2), (9, 2)].into());
            up.forget(7);
            assert_eq!(up.idle_by_namespace(), [(9, 2)].into());
            up.forget(9);
            assert!(up.idle_by_namespace().is_empty());
        });
    }

    /// A TLS mock for 127.0.0.1 on loopback, its certificate from a throwaway CA written to
    /// `ca` (PEM). It answers every request head with a short body and counts its handshakes
    /// and how many of them resumed a session.
    async fn tls_mock(ca: &std::path::Path) -> (u16, Arc<[std::sync::atomic::AtomicUsize; 2]>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (config, ca_pem) =
            crate::demo::throwaway_tls(&["127.0.0.1"], "tollgate test CA").expect("TLS mock");
        std::fs::write(ca, ca_pem).expect("write the CA");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let counts: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::default();
        let counted = Arc::clone(&counts);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let resumed =
                        tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    counted[usize::from(resumed)].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut buf = vec![0u8; 4096];
                    while let Ok(1..) = tls.read(&mut buf).await {
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if tls.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, counts)
    }

    /// Ten requests at once to one TLS upstream, twice: the second ten dial again (the first
    /// ten's connections were closed) and each resumes a session from the tickets the first
    /// ten received, so a burst of dials costs no full handshakes.
    #[test]
    fn a_burst_of_new_connections_resumes_sessions() {
        use http_body_util::BodyExt;
        const BURST: usize = 10;
        /// The CA file, removed however the test ends.
        struct CaFile(std::path::PathBuf);
        impl Drop for CaFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let ca =
            CaFile(std::env::temp_dir().join(format!("tg-ticket-ca-{}.pem", std::process::id())));
        runtime().block_on(async {
            let (port, counts) = tls_mock(&ca.0).await;
            let mut config = upstreams(Duration::from_secs(5)).dial.config.clone();
            config.upstream_ca = Some(ca.0.clone());
            let up = Arc::new(Upstreams::new(DialPolicy { config }).expect("upstreams"));
            let ns = Arc::new(Netns::Host);
            let target = Target {
                https: true,
                host: "127.0.0.1".into(),
                port,
            };
            for _ in 0..2 {
                let mut burst = tokio::task::JoinSet::new();
                for _ in 0..BURST {
                    let (up, ns, target) = (Arc::clone(&up), Arc::clone(&ns), target.clone());
                    burst.spawn(async move {
                        let response = up.request(&ns, 7, true, target, get("/")).await;
                        response.expect("response").into_body().collect().await
                    });
                }
                while let Some(body) = burst.join_next().await {
                    assert_eq!(body.expect("task").expect("body").to_bytes(), "ok");
                }
                up.forget(7);
            }
            let count = |i: usize| counts[i].load(std::sync::atomic::Ordering::SeqCst);
            // Full handshakes, then resumed ones.
            assert_eq!((count(0), count(1)), (BURST, BURST));
        });
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
            "::ffff:0:a9fe:a9fe",
            "fec0::1",
            "64:ff9b:1::a00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(is_link_local_or_metadata(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["10.0.0.1", "127.0.0.1", "::1", "fd00::1", "8.8.8.8"] {
            assert!(!is_link_local_or_metadata(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:4860::8888", "::ffff:1.1.1.1"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }
}
