//! Network namespaces of workloads. 127.0.0.1 inside a container's namespace is not the
//! host's, so the gateway keeps, for each workload namespace, a dedicated thread that lives in
//! it (setns once, never a tokio worker) and makes sockets there on request: the listener the
//! redirected connections reach, the gateway's upstream sockets (so the original destination
//! means what it meant to the workload, and the pod's own egress rules apply), and the
//! inet_diag sockets that look at that namespace's connections.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{mpsc, Mutex},
};

/// A socket request and where to send the answer.
type Request = ((i32, i32, i32), mpsc::Sender<io::Result<OwnedFd>>);

/// Where sockets are made: the daemon's own namespace, or a workload's.
pub enum Netns {
    Host,
    Workload(Workload),
}

/// A workload namespace, served by its own thread.
pub struct Workload {
    requests: Mutex<mpsc::Sender<Request>>,
    /// sock_diag sockets kept for reuse (they keep the namespace alive while held).
    diag: Mutex<Vec<OwnedFd>>,
    /// `SO_NETNS_COOKIE` of the namespace.
    pub cookie: u64,
    /// The namespace file's inode (as in `/proc/<pid>/ns/net`).
    pub inode: u64,
}

fn raw_socket(domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_NETNS_COOKIE` of a socket.
pub fn cookie_of(fd: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut v: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: valid output buffer and length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// Brings `lo` up in the current thread's namespace (a fresh namespace has it down).
fn loopback_up() -> io::Result<()> {
    let sock = raw_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS with a valid ifreq.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = ifr.ifr_ifru.ifru_flags;
        if flags & libc::IFF_UP as libc::c_short == 0 {
            ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

impl Netns {
    /// A socket in this namespace.
    pub fn socket(&self, domain: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
        match self {
            Self::Host => raw_socket(domain, ty, proto),
            Self::Workload(w) => {
                let (tx, rx) = mpsc::channel();
                w.requests
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(((domain, ty, proto), tx))
                    .map_err(|_| io::Error::other("the namespace's thread is gone"))?;
                rx.recv()
                    .map_err(|_| io::Error::other("the namespace's thread is gone"))?
            }
        }
    }

    /// Where this namespace keeps sock_diag sockets between uses.
    pub fn diag_pool(&self) -> &Mutex<Vec<OwnedFd>> {
        static HOST: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());
        match self {
            Self::Host => &HOST,
            Self::Workload(w) => &w.diag,
        }
    }

    /// The cookie the kernel programs record for sockets of this namespace.
    pub fn cookie(&self) -> io::Result<u64> {
        match self {
            Self::Host => cookie_of(&raw_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?),
            Self::Workload(w) => Ok(w.cookie),
        }
    }

    /// A listening TCP socket bound to `addr` in this namespace.
    pub fn listen(&self, addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = self.socket(domain, libc::SOCK_STREAM, 0)?;
        let sock = socket_addr(addr);
        let one: libc::c_int = 1;
        // SAFETY: valid option buffers and sockaddr.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                std::ptr::from_ref(&one).cast(),
                4,
            );
            if domain == libc::AF_INET6 {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    std::ptr::from_ref(&one).cast(),
                    4,
                );
            }
            if libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&sock.0).cast(), sock.1) < 0
                || libc::listen(fd.as_raw_fd(), 1024) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(listener)
    }
}

/// A `sockaddr_storage` for `addr`.
pub fn socket_addr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *std::ptr::from_mut(&mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10);
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, libc::socklen_t::try_from(len).unwrap_or(0))
}

impl Workload {
    /// Enters the namespace behind `ns_file` on a new dedicated thread, brings its loopback
    /// up, and returns once that thread serves socket requests.
    pub fn enter(ns_file: File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let inode = ns_file.metadata()?.ino();
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<u64>>();
        std::thread::Builder::new()
            .name("tollgate-netns".into())
            .spawn(move || {
                // SAFETY: setns on this thread only, with a namespace fd we own.
                let entered = if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) }
                    == 0
                {
                    drop(ns_file);
                    loopback_up()
                        .and_then(|()| cookie_of(&raw_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?))
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                while let Ok(((domain, ty, proto), reply)) = req_rx.recv() {
                    let _ = reply.send(raw_socket(domain, ty, proto));
                }
            })?;
        let cookie = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread died"))??;
        Ok(Self {
            requests: Mutex::new(req_tx),
            diag: Mutex::new(Vec::new()),
            cookie,
            inode,
        })
    }
}
