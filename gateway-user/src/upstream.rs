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
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{client::TlsStream, TlsConnector};

use crate::{config::Config, netns::Netns, policy::PolicySet};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// In the dial error when a name resolves only to internal addresses the rule does not allow.
pub const INTERNAL_ONLY: &str = "resolves only to internal addresses";

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
            // NAT64 (64:ff9b::/96), IPv4-compatible (::a.b.c.d), 6to4 (2002::/16): judge the IPv4 inside.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                || (seg[..6] == [0; 6] && (seg[6] != 0 || seg[7] > 1))
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
        }
    }
}

/// A pooled upstream connection: plain or TLS.
pub enum Stream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
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
    pub policies: Arc<std::sync::RwLock<Arc<PolicySet>>>,
}

/// Makes upstream connections in one network namespace.
#[derive(Clone)]
pub struct Connector {
    ns: Arc<Netns>,
    /// The matched rule says the name may resolve to internal addresses.
    allow_private: bool,
    tls: Arc<rustls::ClientConfig>,
    dial: Arc<DialPolicy>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move { me.connect(uri).await })
    }
}

impl Connector {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.dial.config.test_override(host, port) {
            return Ok(vec![addr]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        let allowed = self.allow_private;
        let usable: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| allowed || !is_internal(a.ip()))
            .collect();
        if usable.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{host} {INTERNAL_ONLY}; a rule must allow_private"),
            ));
        }
        Ok(usable)
    }

    /// A TCP connection to `host:port`, resolved by the gateway, made in the workload's
    /// namespace.
    async fn tcp(&self, host: &str, port: u16) -> io::Result<TcpStream> {
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
            match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
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

    async fn connect(self, uri: Uri) -> io::Result<Stream> {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::other("no host"))?
            .to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = self.tcp(&host, port).await?;
        if !https {
            return Ok(Stream::Plain(TokioIo::new(tcp)));
        }
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await?;
        Ok(Stream::Tls(Box::new(TokioIo::new(tls))))
    }
}

pub type HttpClient = Client<Connector, crate::http_proxy::Body>;

/// One pooled client per network namespace.
pub struct Upstreams {
    tls: Arc<rustls::ClientConfig>,
    dial: Arc<DialPolicy>,
    /// Pools by (namespace cookie, whether internal addresses are allowed).
    clients: Mutex<HashMap<(u64, bool), HttpClient>>,
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
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            dial: Arc::new(dial),
            clients: Mutex::new(HashMap::new()),
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

    /// Drops the pools of the namespace with `cookie` (its idle connections close; requests in
    /// flight keep their own handle until they end).
    pub fn forget(&self, cookie: u64) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(c, _), _| *c != cookie);
    }

    /// The number of namespaces with a pool.
    #[cfg(test)]
    fn pooled_namespaces(&self) -> usize {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .keys()
            .map(|(c, _)| *c)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// The pooled client dialing from `ns`.
    pub fn client(&self, ns: &Arc<Netns>, cookie: u64, allow_private: bool) -> HttpClient {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry((cookie, allow_private))
            .or_insert_with(|| {
                let connector = Connector {
                    ns: Arc::clone(ns),
                    allow_private,
                    tls: Arc::clone(&self.tls),
                    dial: Arc::clone(&self.dial),
                };
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(connector)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_namespace_takes_its_pools_along() {
        let mut config = crate::config::Config::parse(
            crate::config::DEMO_CONFIG,
            "demo",
            std::path::Path::new("/"),
        )
        .expect("config");
        config.upstream_ca = None;
        let up = Upstreams::new(DialPolicy {
            config,
            policies: Arc::default(),
        })
        .expect("upstreams");
        let ns = Arc::new(Netns::Host);
        let _a = up.client(&ns, 7, false);
        let _b = up.client(&ns, 7, true);
        let _c = up.client(&ns, 9, false);
        assert_eq!(up.pooled_namespaces(), 2);
        up.forget(7);
        assert_eq!(up.pooled_namespaces(), 1);
        up.forget(9);
        assert_eq!(up.pooled_namespaces(), 0);
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
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "2001:4860::8888", "::ffff:1.1.1.1"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }
}
