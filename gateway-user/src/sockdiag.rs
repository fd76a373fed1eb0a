//! TCP (and UDP) sockets through NETLINK_SOCK_DIAG (inet_diag): listing them with their cgroup,
//! looking one up by its exact 4-tuple (for its cookie), and destroying one (SOCK_DESTROY).
use crate::netns::Netns;
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const INET_DIAG_CGROUP_ID: u16 = 21;
const HDR: usize = 16;
const REQ: usize = 56;
const MSG: usize = 72;

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u8 = 6;

/// Which states a dump lists: a bit per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct States(u32);

impl States {
    /// Every state.
    pub const ALL: Self = Self(u32::MAX);
    /// The states a socket can be in while a process holds it: all but TIME_WAIT, which no
    /// process owns (no inode, no cgroup) and of which a busy host keeps tens of thousands; the
    /// kernel skips them before it builds a message. (Half-open requests come with SYN_RECV,
    /// the state of a Fast Open connection a server may already hold, so they stay listed.)
    pub const HELD: Self = Self(!(1 << TCP_TIME_WAIT));
}

/// One socket as inet_diag reports it (UDP sockets use the TCP state numbers: a connected one
/// is `TCP_ESTABLISHED`).
#[derive(Debug, Clone)]
pub struct TcpSock {
    pub state: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cookie: u64,
    pub inode: u32,
    pub cgroup_id: Option<u64>,
    family: u8,
    raw_id: [u8; 48],
}

fn socket(ns: &Netns) -> io::Result<OwnedFd> {
    ns.socket(libc::AF_NETLINK, libc::SOCK_DGRAM, NETLINK_SOCK_DIAG)
}

fn send(fd: &OwnedFd, msg_type: u16, flags: u16, req: &[u8; REQ]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HDR + REQ);
    buf.extend_from_slice(&u32::try_from(HDR + REQ).unwrap_or(0).to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(req);
    // SAFETY: `buf` is a valid buffer of the given length.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receives messages until DONE/ERROR (or one reply for non-dump requests), calling `each`
/// with every inet_diag message body. Returns the errno of an NLMSG_ERROR (0 for an ack).
fn recv_all(fd: &OwnedFd, dump: bool, each: impl FnMut(&[u8])) -> io::Result<i32> {
    if dump {
        recv_into(fd, true, &mut vec![0u8; 64 * 1024], each)
    } else {
        // One reply: an inet_diag message with a few attributes, or an error.
        recv_into(fd, false, &mut [0u8; 4096], each)
    }
}

fn recv_into(
    fd: &OwnedFd,
    dump: bool,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> io::Result<i32> {
    loop {
        // SAFETY: `buf` is a valid writable buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let data = &buf[..usize::try_from(n).unwrap_or(0)];
        let mut at = 0;
        while at + HDR <= data.len() {
            let len = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
            let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
            if len < HDR || at + len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            let body = &data[at + HDR..at + len];
            match kind {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let err = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])));
                    return Ok(-err);
                }
                _ => each(body),
            }
            at += (len + 3) & !3;
        }
        if !dump {
            return Ok(0);
        }
    }
}

fn addr_from(family: u8, words: &[u8]) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(words[0], words[1], words[2], words[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&words[..16]);
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

fn parse_msg(body: &[u8], protocol: u8) -> Option<TcpSock> {
    if body.len() < MSG {
        return None;
    }
    let family = body[0];
    let state = body[1];
    let id = &body[4..52];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let local = SocketAddr::new(addr_from(family, &id[4..20]), sport);
    let remote = SocketAddr::new(addr_from(family, &id[20..36]), dport);
    let cookie = u64::from(u32::from_ne_bytes(id[40..44].try_into().ok()?))
        | (u64::from(u32::from_ne_bytes(id[44..48].try_into().ok()?)) << 32);
    let inode = u32::from_ne_bytes(body[68..72].try_into().ok()?);
    let mut cgroup_id = None;
    let mut at = MSG;
    while at + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[at], body[at + 1]]));
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]);
        if len < 4 || at + len > body.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup_id = Some(u64::from_ne_bytes(body[at + 4..at + 12].try_into().ok()?));
        }
        at += (len + 3) & !3;
    }
    let mut raw_id = [0u8; 48];
    raw_id.copy_from_slice(id);
    Some(TcpSock {
        state,
        protocol,
        local,
        remote,
        cookie,
        inode,
        cgroup_id,
        family,
        raw_id,
    })
}

const TCP: u8 = 6;
pub const UDP: u8 = 17;

fn request(family: u8, protocol: u8, states: u32, id: [u8; 48]) -> [u8; REQ] {
    let mut req = [0u8; REQ];
    req[0] = family;
    req[1] = protocol;
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    req[8..56].copy_from_slice(&id);
    req
}

/// The TCP sockets of the network namespace `ns` in `states`.
pub fn dump_tcp(ns: &Netns, states: States) -> io::Result<Vec<TcpSock>> {
    dump(ns, TCP, states)
}

/// Every UDP socket of the network namespace `ns`.
pub fn dump_udp(ns: &Netns) -> io::Result<Vec<TcpSock>> {
    dump(ns, UDP, States::ALL)
}

fn dump(ns: &Netns, protocol: u8, states: States) -> io::Result<Vec<TcpSock>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let fd = socket(ns)?;
        let family = u8::try_from(family).unwrap_or(0);
        send(
            &fd,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            &request(family, protocol, states.0, [0; 48]),
        )?;
        recv_all(&fd, true, |body| out.extend(parse_msg(body, protocol)))?;
    }
    Ok(out)
}

/// Destroys one socket (SOCK_DESTROY, needs CONFIG_INET_DIAG_DESTROY): its owner sees ECONNABORTED.
pub fn destroy(ns: &Netns, sock: &TcpSock) -> io::Result<()> {
    let fd = socket(ns)?;
    send(
        &fd,
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        &request(sock.family, sock.protocol, u32::MAX, sock.raw_id),
    )?;
    match recv_all(&fd, false, |_| {})? {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn id_for(local: SocketAddr, remote: SocketAddr) -> Option<(u8, [u8; 48])> {
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    let family = match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            id[4..8].copy_from_slice(&l.octets());
            id[20..24].copy_from_slice(&r.octets());
            libc::AF_INET
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            id[4..20].copy_from_slice(&l.octets());
            id[20..36].copy_from_slice(&r.octets());
            libc::AF_INET6
        }
        _ => return None,
    };
    // No cookie: match on the tuple.
    id[40..48].copy_from_slice(&[0xff; 8]);
    Some((u8::try_from(family).ok()?, id))
}

/// The same address and port (scope and flow label aside, and an IPv4-mapped IPv6 address as
/// the IPv4 one: a dual-stack socket's tuple is reported in its own family).
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    plain(a.ip()) == plain(b.ip()) && a.port() == b.port()
}

/// Sockets a namespace keeps for lookups; more in use at once are made and closed.
const POOLED: usize = 8;

/// The socket whose local end is `local` and remote end `remote`, if one exists. Runs once per
/// accepted connection, so its netlink socket comes from the namespace's pool and goes back
/// after a clean exchange (an answer about exactly this tuple, or "none"); after anything
/// else it is closed, so no late reply can answer a later lookup.
pub fn lookup(ns: &Netns, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<TcpSock>> {
    let Some((family, id)) = id_for(local, remote) else {
        return Ok(None);
    };
    let pool = ns.diag_pool();
    let pooled = pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop();
    let fd = match pooled {
        Some(fd) => fd,
        None => socket(ns)?,
    };
    send(
        &fd,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        &request(family, TCP, u32::MAX, id),
    )?;
    let mut found = None;
    let errno = recv_all(&fd, false, |body| found = parse_msg(body, TCP))?;
    let answer = match errno {
        0 => match found {
            Some(sock) if same(sock.local, local) && same(sock.remote, remote) => Ok(Some(sock)),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected sock_diag reply",
                ))
            }
        },
        e if e == libc::ENOENT => Ok(None),
        e => return Err(io::Error::from_raw_os_error(e)),
    };
    let mut kept = pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if kept.len() < POOLED {
        kept.push(fd);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_dual_stack_connection_by_its_ipv4_tuple() {
        // An AF_INET6 client reaching an IPv4 listener through ::ffff:127.0.0.1: the gateway
        // knows its tuple as IPv4, the kernel reports it as IPv6.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect(("::ffff:127.0.0.1", port)).expect("connect");
        let (server, peer) = listener.accept().expect("accept");
        let local = server.local_addr().expect("local");
        assert!(peer.is_ipv4() && client.local_addr().expect("client").is_ipv6());
        let found = lookup(&Netns::Host, peer, local)
            .expect("diag")
            .expect("found");
        assert_eq!(i32::from(found.family), libc::AF_INET6);
        assert_eq!(found.local.port(), peer.port());
    }

    #[test]
    fn a_dump_of_held_states_leaves_out_time_wait() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("addr");
        // One connection the server closes first (so the server's end waits in TIME_WAIT),
        // and one left open.
        let mut closed = std::net::TcpStream::connect(at).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let open = std::net::TcpStream::connect(at).expect("connect");
        let (_kept, _) = listener.accept().expect("accept");
        let (closed_ends, open_ends) = (
            (at, closed.local_addr().expect("addr")),
            (open.local_addr().expect("addr"), at),
        );
        drop(server);
        let mut rest = Vec::new();
        closed.read_to_end(&mut rest).expect("eof");
        drop(closed);
        let listed = |states, (local, remote): (SocketAddr, SocketAddr)| {
            dump_tcp(&Netns::Host, states)
                .expect("dump")
                .into_iter()
                .find(|s| s.local == local && s.remote == remote)
                .map(|s| s.state)
        };
        let mut waited = 0;
        while listed(States::ALL, closed_ends) != Some(TCP_TIME_WAIT) {
            waited += 1;
            assert!(waited < 200, "the server's end never reached TIME_WAIT");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(listed(States::HELD, closed_ends), None);
        assert_eq!(listed(States::HELD, open_ends), Some(TCP_ESTABLISHED));
        assert_eq!(
            listed(States::HELD, (at, "0.0.0.0:0".parse().expect("any"))),
            Some(TCP_LISTEN)
        );
    }

    #[test]
    fn finds_own_connection_by_tuple() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let local = client.local_addr().expect("local");
        let remote = client.peer_addr().expect("peer");
        let cookie = lookup(&Netns::Host, local, remote)
            .expect("diag")
            .expect("found")
            .cookie;
        assert_ne!(cookie, 0);
        // Later lookups reuse the pooled netlink socket: the same answer, and a tuple with no
        // socket is "none", not an error, nor a stale reply.
        let again = lookup(&Netns::Host, local, remote)
            .expect("diag")
            .expect("found");
        assert_eq!(again.cookie, cookie);
        let gone = SocketAddr::new(local.ip(), 1);
        assert!(lookup(&Netns::Host, gone, remote).expect("diag").is_none());
        let third = lookup(&Netns::Host, local, remote)
            .expect("diag")
            .expect("found");
        assert_eq!(third.cookie, cookie);
        let all = dump_tcp(&Netns::Host, States::ALL).expect("dump");
        let me = all
            .iter()
            .find(|s| s.local == local && s.remote == remote)
            .expect("listed");
        assert_eq!(me.cookie, cookie);
        assert_eq!(me.state, TCP_ESTABLISHED);
        assert!(all
            .iter()
            .any(|s| s.state == TCP_LISTEN && s.local == listener.local_addr().expect("addr")));
        assert!(
            lookup(&Netns::Host, local, "127.0.0.1:1".parse().expect("addr"))
                .expect("diag")
                .is_none()
        );
    }
}
