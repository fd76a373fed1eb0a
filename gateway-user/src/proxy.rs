//! The listener: takes a redirected connection, finds its kernel-recorded origin, decides,
//! and forwards the byte stream to the original destination (L4). Every connection gets
//! exactly one audit record.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use gateway_common::{origin_slot, OriginSlot, SockState, AF_INET};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    audit::{AuditLog, AuditRecord, DstRecord, Layer, Verdict, WorkloadRecord},
    config::Config,
    identity::{self, IdentityCache},
    netns::Netns,
    policy::Decision,
    sockdiag,
    upstream::Upstreams,
};

/// Shared state of the accept loops.
pub struct Gateway {
    pub config: Config,
    pub cgroup_mount: PathBuf,
    /// Origins recorded by connect4/6, in the slot of the client socket's cookie.
    pub origins: Array<MapData, OriginSlot>,
    /// The policies and the credentials they name.
    pub rules: crate::rules::Rules,
    pub upstreams: Upstreams,
    pub audit: AuditLog,
    pub identities: IdentityCache,
    /// What is left of each host rule's request budget, kept across policy reloads.
    pub budgets: Arc<crate::budget::Budgets>,
    /// Memory for request bodies read for their model and answers read for their token
    /// counts: a read that finds none left in all, or in its workload's share, is refused (or,
    /// for an answer, not read).
    pub model_reads: crate::usage::Rooms,
    /// Connections each workload holds open, capped by `max_connections_per_workload`.
    pub connections: Arc<crate::connections::Connections>,
}

/// How much memory, in KiB, bodies held for their model or their token counts may take, in
/// all and for one workload.
pub const MODEL_READS_KIB: usize = 64 * 1024;
pub const MODEL_READS_SHARE_KIB: usize = 16 * 1024;

/// Why a connection to the listener was refused before policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginError {
    /// No redirect recorded an origin for this client socket (a direct connect), or a later
    /// socket has taken its slot.
    Missing,
    /// The entry is older than the configured maximum age.
    Stale,
    /// The origin was recorded in another network namespace than the one the connection
    /// arrived in.
    OtherNamespace,
    /// The recorded original destination is the listener itself.
    IsListener,
}

impl OriginError {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "no_origin_recorded",
            Self::Stale => "stale_origin",
            Self::OtherNamespace => "origin_other_namespace",
            Self::IsListener => "origin_is_listener",
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The original destination recorded in an origin.
pub fn orig_dst(origin: &SockState) -> SocketAddr {
    let ip = if origin.dst_family == AF_INET {
        IpAddr::from(origin.dst_addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in origin.dst_addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    };
    SocketAddr::new(ip, origin.dst_port)
}

impl Gateway {
    /// Whether allowing must stop because the audit sink fails (and the operator did not choose
    /// `audit_failure: allow`).
    pub fn audit_blocks(&self) -> bool {
        self.config.audit_failure == crate::config::AuditFailure::Deny && !self.audit.is_healthy()
    }

    /// Takes the origin of the connection `peer` → `local`, and checks it.
    fn take_origin(
        &self,
        ns: &Netns,
        netns: u64,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<SockState, OriginError> {
        // The client socket at this exact 4-tuple, in the listener's namespace: its cookie is
        // the key under which connect4/6 recorded the origin.
        let cookie = match sockdiag::lookup(ns, peer, local) {
            Ok(Some(sock)) => sock.cookie,
            _ => return Err(OriginError::Missing),
        };
        // Read under the slot's lock, so never half-written.
        const BPF_F_LOCK: u64 = 4;
        let slot = self
            .origins
            .get(&origin_slot(cookie), BPF_F_LOCK)
            .map_err(|_| OriginError::Missing)?;
        let origin = slot.origin;
        if origin.socket_cookie != cookie {
            // Never recorded, or a later socket took the slot.
            return Err(OriginError::Missing);
        }
        if origin.netns_cookie != netns {
            return Err(OriginError::OtherNamespace);
        }
        let age_ns = monotonic_ns().saturating_sub(origin.recorded_ns);
        let max_age_ns = self.config.origin_max_age_ms.saturating_mul(1_000_000);
        if origin.recorded_ns == 0 || age_ns > max_age_ns {
            return Err(OriginError::Stale);
        }
        let dst = orig_dst(&origin);
        if dst.port() == self.config.listener_port
            && (dst.ip() == IpAddr::V4(self.config.listener_v4)
                || dst.ip() == IpAddr::V6(self.config.listener_v6))
        {
            return Err(OriginError::IsListener);
        }
        Ok(origin)
    }

    /// Handles one accepted connection (to `local`) to its end.
    pub async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        local: SocketAddr,
        ns: Arc<Netns>,
        netns: u64,
    ) {
        let started = Instant::now();
        // A client that reset its socket while it waited in the accept queue has no peer any
        // more (ENOTCONN): nothing to decide, and its tuple may already name a newer socket.
        let Ok(peer) = client.peer_addr() else {
            return;
        };
        let peer = canonical(peer);
        let origin = match self.take_origin(&ns, netns, peer, local) {
            Ok(o) => o,
            Err(e) => {
                let mut r = AuditRecord::new(Verdict::Deny, Layer::Connect, e.as_str());
                r.workload = self.peer_workload(&ns, peer, local).into();
                self.audit.emit(r);
                tracing::debug!(%peer, reason = e.as_str(), "connection refused before policy");
                reset(&client);
                return;
            }
        };
        let (mut id, exe_to_hash) =
            identity::resolve(&origin, &self.cgroup_mount, &self.identities);
        let dst = orig_dst(&origin);
        let mut record = AuditRecord::new(Verdict::Deny, Layer::Connect, "");
        record.workload = id.record().into();
        record.dst = DstRecord {
            host: None,
            orig_ip: Some(dst.ip().to_string().into()),
            orig_port: Some(dst.port()),
            protocol: Some("tcp"),
        };
        let placement = id.placement();
        let decision = match id.view(&placement) {
            Some(view) => self.rules.policies().evaluate(&view, dst),
            None => Decision::Deny {
                policy: None,
                reason: crate::policy::DenyReason::NoPolicy,
            },
        };
        let decision = match decision {
            Decision::Allow { policy, .. } | Decision::WouldDeny { policy, .. }
                if self.audit_blocks() =>
            {
                record.reason = "audit_unavailable".into();
                record.policy = Some(policy);
                self.audit.emit(record);
                tracing::error!(workload = ?id.cgroup, "audit log not writable: refusing what would be allowed");
                reset(&client);
                return;
            }
            d => d,
        };
        // Monitor mode lets a connection through, dialed by the gateway, as root, from its own
        // cgroup: what a host firewall keyed on the workload's uid or cgroup kept from it.
        // Link-local and metadata addresses (instance credentials) are not dialed so.
        let monitor_link_local = matches!(decision, Decision::WouldDeny { .. })
            && crate::upstream::is_link_local_or_metadata(self.config.upstream_for(dst).ip());
        // A connection that goes on holds one of its workload's slots until it ends.
        let slot = match &decision {
            Decision::Deny { .. } => None,
            Decision::WouldDeny { .. } if monitor_link_local => None,
            Decision::Allow { policy, .. }
            | Decision::WouldDeny { policy, .. }
            | Decision::Inspect { policy } => {
                let holder = id.holder(&placement, &self.config.roots);
                let Some(slot) = self.connections.open(&holder) else {
                    record.policy = Some(Arc::clone(policy));
                    record.reason = "connection_limit".into();
                    self.audit.emit(record);
                    tracing::debug!(
                        %holder,
                        max = self.config.max_connections_per_workload,
                        "connection refused: the workload holds its most open connections"
                    );
                    reset(&client);
                    return;
                };
                Some(slot)
            }
        };
        record.decision_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        // With its place taken, a connection that goes on waits for its executable's hash, if
        // it was not cached; a refusal is recorded at once, with what is known.
        if let (Some(slot), Some(pending)) = (&slot, exe_to_hash) {
            self.identities
                .finish(&mut id, pending, slot.holder())
                .await;
            record.workload = id.record().into();
        }
        match decision {
            Decision::Inspect { policy } => {
                record.policy = Some(policy);
                self.inspect(client, ns, netns, id, dst, record).await;
            }
            Decision::Deny { policy, reason } => {
                record.policy = policy;
                record.reason = reason.as_str().into();
                self.audit.emit(record);
                tracing::debug!(workload = ?id.cgroup, %dst, reason = reason.as_str(), "connection denied");
                reset(&client);
            }
            Decision::Allow { policy, rule, idle } => {
                record.decision = Verdict::Allow;
                record.policy = Some(policy);
                record.rule = Some(rule);
                record.reason = "rule_matched".into();
                let idle = idle.or_gateway(self.config.relay_idle_timeout);
                self.forward(&ns, client, dst, record, started, idle).await;
            }
            Decision::WouldDeny { policy, .. } if monitor_link_local => {
                record.policy = Some(policy);
                record.reason = "monitor_link_local_refused".into();
                self.audit.emit(record);
                reset(&client);
            }
            Decision::WouldDeny { policy, reason } => {
                record.decision = Verdict::WouldDeny;
                record.policy = Some(policy);
                record.reason = format!("monitor:{}", reason.as_str()).into();
                let idle = self.config.relay_idle_timeout;
                self.forward(&ns, client, dst, record, started, idle).await;
            }
        }
    }

    /// L4: dials the original destination (the rule named its address, so internal addresses
    /// are allowed) and splices.
    async fn forward(
        &self,
        ns: &Arc<Netns>,
        client: TcpStream,
        dst: SocketAddr,
        record: AuditRecord,
        started: Instant,
        idle: Option<Duration>,
    ) {
        let target = self.config.upstream_for(dst);
        let upstream = self
            .upstreams
            .dial_tcp(ns, &target.ip().to_string(), target.port(), true)
            .await;
        self.splice(client, upstream, record, started, idle).await;
    }

    /// Copies both ways until either side closes, or neither moved a byte for `idle`, then
    /// writes the connection's one record.
    async fn splice(
        &self,
        mut client: TcpStream,
        upstream: std::io::Result<TcpStream>,
        mut record: AuditRecord,
        started: Instant,
        idle: Option<Duration>,
    ) {
        match upstream {
            Ok(mut upstream) => {
                let (up, down, idled) = copy_counted(&mut client, &mut upstream, idle).await;
                record.bytes_up = Some(up);
                record.bytes_down = Some(down);
                if idled {
                    // Cut by the gateway, not ended by either side: said in the record (a
                    // monitor-mode relay's keeps its would-deny reason, which matters more).
                    if record.decision == Verdict::Allow {
                        record.reason = "relay_idle_timeout".into();
                    }
                    reset(&client);
                }
            }
            Err(e) => {
                record.decision = Verdict::Error;
                record.reason = format!("upstream_unreachable: {}", e.kind()).into();
                reset(&client);
            }
        }
        record.duration_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        self.audit.emit(record);
    }

    /// A host rule covers the port: detect the protocol, then decide request by request.
    async fn inspect(
        self: Arc<Self>,
        client: TcpStream,
        ns: Arc<Netns>,
        netns: u64,
        id: identity::WorkloadId,
        dst: SocketAddr,
        mut record: AuditRecord,
    ) {
        // One peek serves both the protocol's detection and, for HTTP/1.1, the head's first
        // look: a head that came in one piece is not peeked again.
        let Some((first, n)) = self.first_bytes(&client).await else {
            record.reason = "no_request_in_time".into();
            self.audit.emit(record);
            return;
        };
        if n > 0 && first[0] == 0x16 {
            // The ClientHello is read again in its own buffer; this one is not held for the
            // life of the spliced connection.
            drop(first);
            self.passthrough(client, ns, id, dst, record).await;
            return;
        }
        let who = Arc::clone(&record.workload);
        let conn = crate::http_proxy::Conn::new(Arc::clone(&self), ns, netns, id, who, dst);
        if first[..n].starts_with(b"PRI") {
            drop(first);
            // HTTP/2 with prior knowledge: binary framing leaves no Content-Length /
            // Transfer-Encoding ambiguity; every stream is decided like an HTTP/1.1 request.
            crate::http_proxy::serve_h2(conn, client).await;
        } else {
            crate::http_proxy::serve(conn, client, first, n).await;
        }
    }

    /// What the client has sent so far, in a buffer as long as the longest head, with how
    /// many bytes that is (0: it closed); `None` if nothing came within the client header
    /// timeout. Bytes that are already there (the usual case: a client sends as soon as it has
    /// connected) cost one system call. A client that has sent nothing yet is waited for with
    /// a one-byte buffer, so a connection that says nothing holds no head's worth of memory.
    async fn first_bytes(&self, client: &TcpStream) -> Option<(Vec<u8>, usize)> {
        let mut buf = vec![0u8; crate::framing::MAX_HEAD];
        if let Some(n) = peek_now(client, &mut buf) {
            return Some((buf, n));
        }
        drop(buf);
        let mut probe = [0u8; 1];
        let waited =
            tokio::time::timeout(self.config.client_header_timeout, client.peek(&mut probe)).await;
        let Ok(Ok(_)) = waited else {
            return None;
        };
        let mut buf = vec![0u8; crate::framing::MAX_HEAD];
        let n = client.peek(&mut buf).await.ok()?;
        Some((buf, n))
    }

    /// TLS on a port a host rule covers: decide on the SNI, then splice to the SNI name the
    /// gateway resolves itself (never the address the workload chose).
    async fn passthrough(
        self: Arc<Self>,
        client: TcpStream,
        ns: Arc<Netns>,
        id: identity::WorkloadId,
        dst: SocketAddr,
        mut record: AuditRecord,
    ) {
        use crate::tls::{Hello, MAX_HELLO};
        let started = Instant::now();
        record.dst.protocol = Some("tls");
        let mut buf = vec![0u8; MAX_HELLO + 2048];
        let deadline = tokio::time::Instant::now() + self.config.client_header_timeout;
        let hello = read_hello(&client, &mut buf, deadline).await;
        // The bytes stay in the socket for the splice; the copy is not needed any more.
        drop(buf);
        let sni = match &hello {
            Hello::Sni(name) => crate::normalize::host(name).ok().map(|(h, _)| h),
            _ => None,
        };
        let Some(sni) = sni else {
            record.reason = match hello {
                Hello::Ech => "encrypted_client_hello_refused",
                Hello::NoSni => "tls_without_sni",
                Hello::Incomplete => "no_client_hello_in_time",
                _ => "not_a_tls_client_hello",
            }
            .into();
            self.audit.emit(record);
            reset(&client);
            return;
        };
        record.dst.host = Some(sni.as_str().into());
        let placement = id.placement();
        let decision = match id.view(&placement) {
            Some(view) => self.rules.policies().evaluate_sni(&view, dst.port(), &sni),
            None => crate::policy::RequestDecision::Deny {
                policy: None,
                rule: None,
                reason: "no_policy_for_workload",
            },
        };
        use crate::policy::{RequestDecision, TlsMode};
        let denied = match decision {
            RequestDecision::Allow {
                policy,
                rule,
                route,
            } => {
                record.policy = Some(policy);
                record.rule = Some(rule);
                record.reason = "sni_allowed".into();
                record.decision = Verdict::Allow;
                Ok(route)
            }
            RequestDecision::WouldDeny {
                policy,
                rule,
                reason,
                route: Some(route),
            } if route.tls == TlsMode::Passthrough => {
                record.policy = Some(policy);
                record.rule = rule;
                record.reason = format!("monitor:{reason}").into();
                record.decision = Verdict::WouldDeny;
                Ok(route)
            }
            RequestDecision::Deny {
                policy,
                rule,
                reason,
            } => Err((policy, rule, reason)),
            RequestDecision::WouldDeny {
                policy,
                rule,
                reason,
                ..
            } => Err((Some(policy), rule, reason)),
            // `evaluate_sni` answers this itself; a TLS connection has no body to read.
            RequestDecision::NeedsModel { policy, rule } => {
                Err((Some(policy), Some(rule), "tls_on_an_originate_rule"))
            }
        };
        let route = match denied {
            Ok(route) => route,
            Err((policy, rule, reason)) => {
                record.policy = policy;
                record.rule = rule;
                record.reason = reason.into();
                self.audit.emit(record);
                reset(&client);
                return;
            }
        };
        if self.audit_blocks() {
            record.decision = Verdict::Deny;
            record.reason = "audit_unavailable".into();
            self.audit.emit(record);
            reset(&client);
            return;
        }
        let upstream = self
            .upstreams
            .dial_tcp(&ns, &sni, route.upstream_port, route.allow_private)
            .await;
        let idle = route.idle.or_gateway(self.config.relay_idle_timeout);
        self.splice(client, upstream, record, started, idle).await;
    }

    /// What the kernel says about the client socket of a connection that had no valid origin:
    /// its cgroup, so the audit record names the workload.
    fn peer_workload(&self, ns: &Netns, peer: SocketAddr, local: SocketAddr) -> WorkloadRecord {
        let mut w = WorkloadRecord::default();
        if let Ok(Some(sock)) = sockdiag::lookup(ns, peer, local) {
            if let Some(id) = sock.cgroup_id {
                w = WorkloadRecord::of_cgroup(
                    id,
                    crate::cgroup::path_of_id(&self.cgroup_mount, id).as_ref(),
                );
            }
        }
        w
    }
}

/// A v4-mapped peer address as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// Makes the close send RST, so the client sees the refusal at once (SO_LINGER 0 never
/// blocks: the socket is dropped without waiting for unsent data).
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = set_option(stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
}

/// Sets the socket option `level`/`name` of `socket` to `value`.
fn set_option<T>(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `value` points to an initialized `T` of `len` bytes, which the kernel only reads.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Peeks `client` until `buf` holds a whole ClientHello (or something that is not one), or
/// `deadline` passes (`Incomplete`). The bytes stay in the socket. While nothing more comes,
/// the wait between peeks doubles (2 ms to 256 ms): a hello that stalls until the deadline
/// costs about fifty peeks, not one every 2 ms.
async fn read_hello(
    client: &TcpStream,
    buf: &mut [u8],
    deadline: tokio::time::Instant,
) -> crate::tls::Hello {
    use crate::tls::{parse, Hello};
    let (mut had, mut wait) = (0, HELLO_PEEK_FIRST);
    loop {
        let Ok(Ok(n)) = tokio::time::timeout_at(deadline, client.peek(buf)).await else {
            return Hello::Incomplete;
        };
        if n == had && n > 0 && n < buf.len() {
            wait = (wait * 2).min(HELLO_PEEK_MAX);
        } else {
            match parse(&buf[..n]) {
                Hello::Incomplete if n < buf.len() && n > 0 => wait = HELLO_PEEK_FIRST,
                other => return other,
            }
        }
        had = n;
        if tokio::time::Instant::now() + wait > deadline {
            return Hello::Incomplete;
        }
        tokio::time::sleep(wait).await;
    }
}

/// The first wait before a partial ClientHello is peeked again, and the longest.
const HELLO_PEEK_FIRST: std::time::Duration = std::time::Duration::from_millis(2);
const HELLO_PEEK_MAX: std::time::Duration = std::time::Duration::from_millis(256);

/// Peeks what `client` has sent so far without waiting: `None` if nothing has come yet (or
/// the socket failed; the awaited peek that follows sees that).
fn peek_now(client: &TcpStream, buf: &mut [u8]) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).ok()
}

/// Sets TCP_NODELAY on a listener, for every socket it accepts.
fn nodelay(listener: &TcpListener) -> std::io::Result<()> {
    set_option(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        &libc::c_int::from(1u8),
    )
}

/// Accepts forever on `listener`, a listener in the namespace `ns`.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener, ns: Arc<Netns>) {
    let netns = match crate::netns::cookie_of(&listener) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the listener's netns cookie; refusing all connections");
            0
        }
    };
    // Accepted sockets inherit TCP_NODELAY from their listener (Linux copies the option at
    // accept): set once here, not with a system call per connection.
    if let Err(e) = nodelay(&listener) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on the listener; small writes may wait for ACKs");
    }
    // Listeners are bound to one address, which is then every accepted socket's local end:
    // known here, not asked for each connection.
    let bound = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(local) = bound.or_else(|| stream.local_addr().ok()) else {
                    continue;
                };
                tokio::spawn(Arc::clone(&gateway).handle(stream, local, Arc::clone(&ns), netns));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Copies both ways until either side closes or fails, and returns the bytes that reached `b`
/// and `a`. Counted as they are written, so a copy that ends in an error (a reset) still
/// reports what it moved: a workload must not make its traffic vanish from the audit record by
/// resetting its connection.
///
/// With `idle` set, a relay that moves no byte either way for that long is cut: the third value
/// says so.
async fn copy_counted<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> (u64, u64, bool)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = tokio::time::Instant::now();
    let moved = std::sync::atomic::AtomicU64::new(0);
    // When bytes last moved is noted only if it is watched (a clock read per write).
    let noted = idle.map(|_| &moved);
    let (mut a, mut b) = (
        Counted::new(a, started, noted),
        Counted::new(b, started, noted),
    );
    let idled = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        match idle {
            None => {
                let _ended = copy.await;
                false
            }
            Some(limit) => tokio::select! {
                _ended = copy => false,
                () = quiet_for(started, &moved, limit) => true,
            },
        }
    };
    (b.written, a.written, idled)
}

/// Resolves once nothing has moved for `limit` (`moved`: when something last did, in ms after
/// `started`).
async fn quiet_for(
    started: tokio::time::Instant,
    moved: &std::sync::atomic::AtomicU64,
    limit: Duration,
) {
    loop {
        let last =
            started + Duration::from_millis(moved.load(std::sync::atomic::Ordering::Relaxed));
        if last.elapsed() >= limit {
            return;
        }
        tokio::time::sleep_until(last + limit).await;
    }
}

/// A stream that counts the bytes written to it, and notes in `moved` (if given) when it last
/// took some, in ms after `started`.
struct Counted<'a, S> {
    inner: S,
    written: u64,
    started: tokio::time::Instant,
    moved: Option<&'a std::sync::atomic::AtomicU64>,
}

impl<'a, S> Counted<'a, S> {
    fn new(
        inner: S,
        started: tokio::time::Instant,
        moved: Option<&'a std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            inner,
            written: 0,
            started,
            moved,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
            if let (Some(moved), 1..) = (self.moved, n) {
                let at = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                moved.store(at, std::sync::atomic::Ordering::Relaxed);
            }
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use gateway_common::{ip4_word, ip6_words};

    use super::*;

    /// A ClientHello sent in two segments is read whole; one that stalls ends at the deadline.
    #[test]
    fn a_hello_in_two_segments_is_read_and_a_stalled_one_times_out() {
        use crate::tls::{
            tests::{hello, records, sni_ext},
            Hello, MAX_HELLO,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let bytes = records(&hello(&[sni_ext("api.example.com")]), 4096);
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let at = listener.local_addr().expect("addr");
            let in_ = |ms| tokio::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut buf = vec![0u8; MAX_HELLO + 2048];

            let mut c = TcpStream::connect(at).await.expect("connect");
            let (s, _) = listener.accept().await.expect("accept");
            c.write_all(&bytes[..20]).await.expect("send");
            let rest = bytes[20..].to_vec();
            let writer = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                c.write_all(&rest).await.expect("send");
                c
            });
            let got = read_hello(&s, &mut buf, in_(5_000)).await;
            assert_eq!(got, Hello::Sni("api.example.com".into()));
            drop(writer.await);

            let mut c = TcpStream::connect(at).await.expect("connect");
            let (s, _) = listener.accept().await.expect("accept");
            c.write_all(&bytes[..20]).await.expect("send");
            assert_eq!(read_hello(&s, &mut buf, in_(600)).await, Hello::Incomplete);
        });
    }

    /// What a relay test saw: the relay's counts (bytes up, bytes down, cut for its silence),
    /// how long it ran, and what the server returned.
    type Relayed<T> = ((u64, u64, bool), Duration, T);

    /// Relays, on a one-thread runtime over loopback, between `client` (given its connection
    /// to the relay) and `server` (given the relay's connection to it), with `idle` as the idle
    /// timeout. Once the relay ends its two sockets close; then both sides are awaited.
    fn relay_test<C, S, T>(
        idle: Option<Duration>,
        client: impl FnOnce(TcpStream) -> C,
        server: impl FnOnce(TcpStream) -> S,
    ) -> Relayed<T>
    where
        C: std::future::Future<Output = ()> + Send + 'static,
        S: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let back = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let front_at = front.local_addr().expect("addr");
            let client = tokio::spawn(client(TcpStream::connect(front_at).await.expect("connect")));
            let (mut from_client, _) = front.accept().await.expect("accept");
            let mut to_server = TcpStream::connect(back.local_addr().expect("addr"))
                .await
                .expect("connect");
            let server = tokio::spawn(server(back.accept().await.expect("accept").0));
            let started = std::time::Instant::now();
            let counts = copy_counted(&mut from_client, &mut to_server, idle).await;
            let took = started.elapsed();
            drop((from_client, to_server));
            client.await.expect("client");
            (counts, took, server.await.expect("server"))
        })
    }

    /// With an idle timeout, a relay that keeps moving bytes is left alone however long it
    /// lasts, and one that goes quiet is cut once the timeout has passed since its last byte.
    #[test]
    fn a_quiet_relay_is_cut_after_its_idle_timeout_and_a_busy_one_is_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ((up, down, idled), took, received) = relay_test(
            Some(Duration::from_millis(400)),
            // A byte every 100 ms for 1 s, then silence, the connection held open.
            |mut c| async move {
                for _ in 0..10 {
                    c.write_all(b"x").await.expect("send");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = c.read(&mut [0; 1]).await;
            },
            |mut server| async move {
                let mut got = [0; 16];
                let mut n = 0;
                while let Ok(read @ 1..) = server.read(&mut got).await {
                    n += read;
                }
                n
            },
        );
        assert_eq!(received, 10);
        assert!(idled, "cut for its silence");
        assert_eq!((up, down), (10, 0));
        // The last byte went at about 0.9 s: cut about 0.4 s later, not during the traffic.
        assert!(
            took >= Duration::from_millis(1_250) && took < Duration::from_secs(5),
            "cut after {took:?}"
        );
    }

    /// A relayed connection the client resets still reports the bytes it moved (the copy
    /// ends in an error; the counts must not fall to zero with it).
    #[test]
    fn a_reset_relay_still_counts_its_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ((up, down, _), _, ()) = relay_test(
            None,
            |mut c| async move {
                c.write_all(&[7; 10_000]).await.expect("send");
                let mut answer = [0; 300];
                c.read_exact(&mut answer).await.expect("answer");
                // Then a reset, as a workload hiding what it sent would.
                reset(&c);
            },
            |mut server| async move {
                let mut got = vec![0; 10_000];
                server.read_exact(&mut got).await.expect("request");
                server.write_all(&[9; 300]).await.expect("answer");
                // Held open until the relay ends.
                let _ = server.read(&mut [0; 1]).await;
            },
        );
        assert_eq!((up, down), (10_000, 300));
    }

    #[test]
    fn orig_dst_round_trips() {
        let mut s = SockState {
            dst_family: AF_INET,
            dst_port: 443,
            ..SockState::default()
        };
        s.dst_addr[0] = ip4_word([10, 1, 2, 3]);
        assert_eq!(orig_dst(&s), "10.1.2.3:443".parse().expect("addr"));
        let mut s6 = SockState {
            dst_family: gateway_common::AF_INET6,
            dst_port: 8443,
            ..SockState::default()
        };
        s6.dst_addr = ip6_words("::1".parse::<std::net::Ipv6Addr>().expect("v6").octets());
        assert_eq!(orig_dst(&s6), "[::1]:8443".parse().expect("addr"));
    }

    /// A refused connection is closed with a reset: the client's read fails at once rather
    /// than seeing an orderly end.
    #[test]
    fn a_reset_connection_is_refused_with_rst() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut client = TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            reset(&server);
            drop(server);
            let mut buf = [0u8; 1];
            let read = client.read(&mut buf).await;
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset)
            );
        });
    }

    /// The accept loop sets TCP_NODELAY on the listener only: each accepted socket must carry
    /// it, or every response would wait on the client's delayed ACK.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for addr in ["127.0.0.1:0", "[::1]:0"] {
                let listener = TcpListener::bind(addr).await.expect("bind");
                let plain = listener.local_addr().expect("addr");
                let _client = TcpStream::connect(plain).await.expect("connect");
                let (before, _) = listener.accept().await.expect("accept");
                assert!(!before.nodelay().expect("nodelay"), "{addr}: on by default");
                nodelay(&listener).expect("set");
                let _client = TcpStream::connect(plain).await.expect("connect");
                let (after, _) = listener.accept().await.expect("accept");
                assert!(after.nodelay().expect("nodelay"), "{addr}: not inherited");
            }
        });
    }
}
