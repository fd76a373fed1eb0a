//! A socket prober for the privileged tests: each subcommand makes one real attempt with raw
//! syscalls and prints one JSON line: `{"ok":true,...}` or `{"ok":false,"errno":N,"error":"..."}`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use serde_json::{json, Value};

fn errno_json(e: &std::io::Error) -> Value {
    json!({ "ok": false, "errno": e.raw_os_error().unwrap_or(0), "error": e.to_string() })
}

use gateway_user::netns::socket_addr as sockaddr;

fn socket(domain: i32, ty: i32, proto: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn domain_of(addr: SocketAddr) -> i32 {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn check(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::from_ref(&one).cast(),
            4,
        )
    };
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of `len` bytes.
    check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&ss).cast(), len) }).map(|_| ())
}

/// Sends a request line, reads the reply to EOF, and reports both ends as the socket sees them.
fn exchange(stream: &mut TcpStream) -> Value {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(e) = stream.write_all(b"GET /probe HTTP/1.0\r\n\r\n") {
        return errno_json(&e);
    }
    let mut body = Vec::new();
    match stream.read_to_end(&mut body) {
        Ok(_) => {
            json!({ "ok": true, "peer": peer, "local": local, "reply": String::from_utf8_lossy(&body) })
        }
        Err(e) => {
            let mut v = errno_json(&e);
            v["peer"] = json!(peer);
            v["local"] = json!(local);
            v
        }
    }
}

/// Moves this process into the cgroup at `dir`; the error is the probe's answer.
fn join_cgroup(dir: &str) -> Result<(), Value> {
    std::fs::write(
        std::path::Path::new(dir).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .map_err(|e| json!({ "ok": false, "error": format!("join {dir}: {e}") }))
}

/// connect(2) on `fd`.
fn connect(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&ss).cast(), len) }).map(|_| ())
}

/// A TCP connect (and one exchange). With `join`, the socket is made first and the process
/// then moves into that cgroup before connecting.
fn tcp(
    addr: SocketAddr,
    bind_to: Option<SocketAddr>,
    mark: Option<u32>,
    join: Option<&str>,
) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    if let Some(dir) = join {
        if let Err(answer) = join_cgroup(dir) {
            return answer;
        }
    }
    if let Some(m) = mark {
        // SAFETY: valid option buffer.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                std::ptr::from_ref(&m).cast(),
                4,
            )
        };
        if r < 0 {
            return errno_json(&std::io::Error::last_os_error());
        }
    }
    if let Some(b) = bind_to {
        if let Err(e) = bind(&fd, b) {
            return errno_json(&e);
        }
    }
    if let Err(e) = connect(&fd, addr) {
        return errno_json(&e);
    }
    exchange(&mut TcpStream::from(fd))
}

/// Connects from `from` and resets at once (SO_LINGER 0): the connection is gone before
/// anyone could accept it, its source port free for the next socket.
fn tcp_reset(addr: SocketAddr, from: SocketAddr) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    if let Err(e) = bind(&fd, from).and_then(|()| connect(&fd, addr)) {
        return errno_json(&e);
    }
    let local = TcpStream::from(fd);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid option buffer of its size.
    let r = unsafe {
        libc::setsockopt(
            local.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return errno_json(&std::io::Error::last_os_error());
    }
    let peer = local.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    drop(local);
    json!({ "ok": true, "reset": true, "peer": peer })
}

fn tfo(addr: SocketAddr) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    let (ss, len) = sockaddr(addr);
    let msg = b"GET /tfo HTTP/1.0\r\n\r\n";
    // SAFETY: valid buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_FASTOPEN,
            std::ptr::from_ref(&ss).cast(),
            len,
        )
    };
    if r < 0 {
        return errno_json(&std::io::Error::last_os_error());
    }
    let mut stream = TcpStream::from(fd);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut body = Vec::new();
    match stream.read_to_end(&mut body) {
        Ok(_) => json!({ "ok": true, "peer": peer, "reply": String::from_utf8_lossy(&body) }),
        Err(e) => errno_json(&e),
    }
}

fn uring(addr: SocketAddr) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    let (ss, len) = sockaddr(addr);
    let mut ring = match io_uring::IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return errno_json(&e),
    };
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(fd.as_raw_fd()),
        std::ptr::from_ref(&ss).cast(),
        len,
    )
    .build();
    // SAFETY: the sockaddr outlives the submission (we wait for completion below).
    if unsafe { ring.submission().push(&op) }.is_err() {
        return json!({ "ok": false, "error": "submission queue full" });
    }
    if let Err(e) = ring.submit_and_wait(1) {
        return errno_json(&e);
    }
    let res = ring.completion().next().map_or(-1, |c| c.result());
    if res < 0 {
        return errno_json(&std::io::Error::from_raw_os_error(-res));
    }
    let mut v = exchange(&mut TcpStream::from(fd));
    v["via"] = json!("io_uring");
    v
}

/// One datagram, by sendto or by connect and send. With `join`, as in [`tcp`].
fn udp(addr: SocketAddr, v6_socket: bool, connected: bool, join: Option<&str>) -> Value {
    let domain = if v6_socket {
        libc::AF_INET6
    } else {
        domain_of(addr)
    };
    let fd = match socket(domain, libc::SOCK_DGRAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    if let Some(dir) = join {
        if let Err(answer) = join_cgroup(dir) {
            return answer;
        }
    }
    if !connected {
        return send_to(&fd, b"datagram", Some(addr));
    }
    if let Err(e) = connect(&fd, addr) {
        return errno_json(&e);
    }
    send_to(&fd, b"datagram", None)
}

/// One send(2), or sendto(2) when `to` is given; the probe's answer.
fn send_to(fd: &OwnedFd, buf: &[u8], to: Option<SocketAddr>) -> Value {
    let r = match to {
        Some(to) => {
            let (ss, len) = sockaddr(to);
            // SAFETY: valid buffer and sockaddr.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_ref(&ss).cast(),
                    len,
                )
            }
        }
        // SAFETY: valid buffer.
        None => unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) },
    };
    if r < 0 {
        errno_json(&std::io::Error::last_os_error())
    } else {
        json!({ "ok": true, "sent": r })
    }
}

/// Sends `n` datagrams as fast as possible; counts how many the kernel refused.
fn udp_flood(addr: SocketAddr, n: u32) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_DGRAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    let (ss, len) = sockaddr(addr);
    let (mut refused, mut sent) = (0u32, 0u32);
    for _ in 0..n {
        // SAFETY: valid buffer and sockaddr.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                b"x".as_ptr().cast(),
                1,
                0,
                std::ptr::from_ref(&ss).cast(),
                len,
            )
        };
        if r < 0 {
            refused += 1;
        } else {
            sent += 1;
        }
    }
    json!({ "ok": true, "refused": refused, "sent": sent })
}

fn make_socket(domain: i32, ty: i32, proto: i32) -> Value {
    match socket(domain, ty, proto) {
        Ok(_) => json!({ "ok": true }),
        Err(e) => errno_json(&e),
    }
}

fn bind_port(addr: SocketAddr) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    match bind(&fd, addr) {
        Ok(()) => json!({ "ok": true }),
        Err(e) => errno_json(&e),
    }
}

/// Connects, reports, waits until `wait_file` exists, then tries to use the connection.
fn hold(addr: SocketAddr, wait_file: &str) -> Value {
    let mut stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return errno_json(&e),
    };
    println!(
        "{}",
        json!({ "connected": true, "local": stream.local_addr().map(|a| a.to_string()).unwrap_or_default() })
    );
    let _ = std::io::stdout().flush();
    while !std::path::Path::new(wait_file).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    exchange(&mut stream)
}

/// `wait-tcp ADDR FILE`: a TCP socket made now (printed), connected once FILE exists: a
/// socket made while the daemon was down and used after it is back.
fn wait_tcp(addr: SocketAddr, wait_file: &str) -> Value {
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    println!("{}", json!({ "made": true }));
    let _ = std::io::stdout().flush();
    while !std::path::Path::new(wait_file).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = connect(&fd, addr) {
        return errno_json(&e);
    }
    exchange(&mut TcpStream::from(fd))
}

/// `raw-hold ADDR FILE`: a raw IPv4 socket (IPPROTO_UDP, the kernel adds the IP header)
/// sends one UDP datagram to ADDR at once, prints the result, waits for FILE to exist, then
/// sends another: a raw socket made before enforcement started.
fn raw_hold(addr: SocketAddr, wait_file: &str) -> Value {
    let SocketAddr::V4(v4) = addr else {
        return json!({ "ok": false, "error": "raw-hold takes an IPv4 address" });
    };
    let fd = match socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    let payload = b"raw datagram";
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&40_000u16.to_be_bytes());
    datagram.extend_from_slice(&v4.port().to_be_bytes());
    datagram.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap_or(0).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    datagram.extend_from_slice(payload);
    let send = || send_to(&fd, &datagram, Some(SocketAddr::new(addr.ip(), 0)));
    println!("{}", send());
    let _ = std::io::stdout().flush();
    while !std::path::Path::new(wait_file).exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    send()
}

/// What a workload able to load BPF would try: attach its own allow-everything connect4
/// program at `cgroup` with BPF_F_ALLOW_OVERRIDE (or, failing that, as one more program).
fn override_connect4(cgroup: &str) -> Value {
    fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
        // SAFETY: a zeroed bpf_attr of sufficient size.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    // r0 = 1; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&18u32.to_ne_bytes()); // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[68..72].copy_from_slice(&10u32.to_ne_bytes()); // BPF_CGROUP_INET4_CONNECT
    let prog = match bpf(5, &mut attr) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    let dir = match std::fs::File::open(cgroup) {
        Ok(f) => f,
        Err(e) => return errno_json(&e),
    };
    let mut results = Vec::new();
    for flags in [1u32, 0, 2] {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&u32::try_from(dir.as_raw_fd()).unwrap_or(0).to_ne_bytes());
        attr[4..8].copy_from_slice(&u32::try_from(prog).unwrap_or(0).to_ne_bytes());
        attr[8..12].copy_from_slice(&10u32.to_ne_bytes());
        attr[12..16].copy_from_slice(&flags.to_ne_bytes());
        let r = bpf(8, &mut attr); // BPF_PROG_ATTACH
        results.push(json!({ "flags": flags, "attached": r.is_ok(), "error": r.err().map(|e| e.to_string()) }));
        if results.last().is_some_and(|v| v["attached"] == true) {
            break;
        }
    }
    let attached = results.iter().any(|v| v["attached"] == true);
    json!({ "ok": attached, "attempts": results })
}

/// Execs `argv` with bpf(2) failing with EPERM (a seccomp filter): a kernel without BPF, as
/// far as the program can tell.
fn exec_without_bpf(argv: &[String]) -> Value {
    use std::os::unix::process::CommandExt;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let nr = u32::try_from(libc::SYS_bpf).unwrap_or(0);
    let filter = [
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        }, // ld [nr]
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: nr,
        }, // jeq SYS_bpf
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | 1,
        }, // ret EPERM
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: 4,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                std::ptr::from_ref(&prog),
            ) != 0
        {
            return errno_json(&std::io::Error::last_os_error());
        }
    }
    let Some((program, rest)) = argv.split_first() else {
        return json!({ "ok": false, "error": "no command" });
    };
    errno_json(&std::process::Command::new(program).args(rest).exec())
}

/// How long a child that joined waits for the daemon to cut its sentinel connection.
const JOIN_SETTLE_MS: u64 = 1500;

/// `passed-fd DIR ADDR`: a child process joins DIR; this process, outside it, makes a TCP
/// socket and hands it over SCM_RIGHTS; the child connects with it and reports the result.
fn passed_fd(dir: &str, addr: SocketAddr) -> Value {
    hand_over(dir, addr, false, Handover::Rights, |fd| {
        if let Err(e) = connect(&fd, addr) {
            return errno_json(&e);
        }
        exchange(&mut TcpStream::from(fd))
    })
}

/// `passed-connected DIR ADDR MILLIS`: a child process joins DIR (and is settled there); this
/// process, outside it, connects to ADDR and then hands the connection over SCM_RIGHTS; the
/// child sends a byte every millisecond on it until a send fails or MILLIS pass. Reports how
/// long the connection kept working in the child's hands.
fn passed_connected(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::Rights, |fd| {
        keep_sending(&fd, millis)
    })
}

/// `taken-connected DIR ADDR MILLIS`: as `passed-connected`, but the child takes the
/// connection from this process with `pidfd_getfd` instead of receiving it.
fn taken_connected(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::Take, |fd| {
        keep_sending(&fd, millis)
    })
}

/// `passed-mmsg DIR ADDR MILLIS`: as `passed-connected`, but the child receives it with
/// `recvmmsg`.
fn passed_mmsg(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::Mmsg, |fd| {
        keep_sending(&fd, millis)
    })
}

/// `passed-own-table DIR ADDR MILLIS`: as `passed-mmsg`, but a second thread of the child,
/// with a descriptor table of its own, receives and uses the connection.
fn passed_own_table(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::OwnTable, |fd| {
        keep_sending(&fd, millis)
    })
}

/// `passed-home DIR ADDR MILLIS NETNS`: run in a network namespace of its own; as
/// `passed-connected`, but the child enters the namespace at path NETNS (the host's) before
/// it joins DIR.
fn passed_home(dir: &str, addr: SocketAddr, millis: u64, home: &'static str) -> Value {
    hand_over(dir, addr, true, Handover::Home(home), |fd| {
        keep_sending(&fd, millis)
    })
}

/// `passed-uring DIR ADDR MILLIS`: as `passed-connected`, but the child receives it through
/// io_uring (`IORING_OP_RECVMSG`).
fn passed_uring(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::Uring, |fd| {
        keep_sending(&fd, millis)
    })
}

/// In the child: one message received through io_uring, and the descriptor it carried.
fn receive_with_uring(from: std::os::fd::RawFd) -> Result<OwnedFd, Value> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; its pointers are set just below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    let mut ring = io_uring::IoUring::new(4).map_err(|e| errno_json(&e))?;
    let op = io_uring::opcode::RecvMsg::new(io_uring::types::Fd(from), &mut header).build();
    // SAFETY: the header and its buffers outlive the submission (we wait for it below).
    if unsafe { ring.submission().push(&op) }.is_err() {
        return Err(json!({ "ok": false, "error": "submission queue full" }));
    }
    ring.submit_and_wait(1).map_err(|e| errno_json(&e))?;
    let res = ring.completion().next().map_or(-1, |c| c.result());
    if res < 0 {
        return Err(errno_json(&std::io::Error::from_raw_os_error(-res)));
    }
    // SAFETY: the kernel wrote the control data at the start of the buffer.
    unsafe {
        let cmsg = control.as_ptr().cast::<libc::cmsghdr>();
        if (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(json!({ "ok": false, "error": "no descriptor received" }));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// In the child: one message received with `recvmmsg`, and the descriptor it carried.
fn receive_with_recvmmsg(from: std::os::fd::RawFd) -> Result<OwnedFd, Value> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one SCM_RIGHTS header and descriptor, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero mmsghdr is valid; its pointers are set just below.
    let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
    header.msg_hdr.msg_iov = &mut iov;
    header.msg_hdr.msg_iovlen = 1;
    header.msg_hdr.msg_control = control.as_mut_ptr().cast();
    header.msg_hdr.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: one valid header whose buffers outlive the call.
    let n = unsafe { libc::recvmmsg(from, &mut header, 1, 0, std::ptr::null_mut()) };
    if n < 1 {
        return Err(errno_json(&std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the control buffer and its length; the macros stay in it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(json!({ "ok": false, "error": "no descriptor received" }));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// `passed-many DIR ADDR MILLIS`: as `passed-connected`, but the connection is the last of
/// [`MANY_FDS`] descriptors in one SCM_RIGHTS message (the others are /dev/null).
fn passed_many(dir: &str, addr: SocketAddr, millis: u64) -> Value {
    hand_over(dir, addr, true, Handover::RightsMany, |fd| {
        keep_sending(&fd, millis)
    })
}

/// Descriptors in the message of `passed-many`.
const MANY_FDS: usize = 40;

/// How the connection reaches the child.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Sent over SCM_RIGHTS.
    Rights,
    /// Sent over SCM_RIGHTS after [`MANY_FDS`] - 1 others in the same message.
    RightsMany,
    /// Sent over SCM_RIGHTS, received with `recvmmsg`.
    Mmsg,
    /// Received (`recvmsg`) by a child that went to another network namespace (the host's,
    /// given by path) before joining: the connection lives in this process's namespace.
    Home(&'static str),
    /// Received through io_uring (`IORING_OP_RECVMSG`).
    Uring,
    /// Received (`recvmmsg`) by a second thread with its own descriptor table
    /// (`unshare(CLONE_FILES)`), so the process's leader never holds it.
    OwnTable,
    /// Its descriptor number is sent; the child takes it with `pidfd_getfd`.
    Take,
}

/// In the child: the parent's descriptor `fd`, taken with `pidfd_open` and `pidfd_getfd`.
fn take_from_parent(fd: i32) -> Result<OwnedFd, Value> {
    let parent = nix::unistd::getppid().as_raw();
    // SAFETY: plain system calls with integer arguments; each result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) };
    if pidfd < 0 {
        return Err(errno_json(&std::io::Error::last_os_error()));
    }
    // SAFETY: as above; the pidfd is closed right after.
    let taken = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the pidfd is ours and not used again.
    unsafe { libc::close(pidfd as i32) };
    if taken < 0 {
        return Err(errno_json(&err));
    }
    // SAFETY: a new descriptor that is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(taken as i32) })
}

/// Forks a child that joins `dir`, says so, and receives one descriptor over SCM_RIGHTS;
/// `use_it` runs in the child on it and its answer comes back, with `join_settled`. Before it
/// joins, the child connects to a sentinel listener of this process; after, it waits until
/// that connection is cut (the daemon has settled the join, so what follows is the receipt's
/// doing alone) or [`JOIN_SETTLE_MS`] pass (outside every root nothing cuts it). Then this
/// process makes a TCP socket for `addr`, connects it first if `connected`, and sends it.
fn hand_over(
    dir: &str,
    addr: SocketAddr,
    connected: bool,
    how: Handover,
    use_it: impl FnOnce(OwnedFd) -> Value + Send,
) -> Value {
    use nix::sys::socket::{
        recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
        SockFlag, SockType,
    };
    let (ours, theirs) = match socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(p) => p,
        Err(e) => return errno_json(&e.into()),
    };
    let sentinel = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| {
        let at = l.local_addr()?;
        Ok((l, at))
    }) {
        Ok(s) => s,
        Err(e) => return errno_json(&e),
    };
    // SAFETY: this process has one thread; the child only makes syscalls and exits.
    match unsafe { nix::unistd::fork() } {
        Err(e) => errno_json(&e.into()),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(ours);
            let mut join_settled = false;
            let mut result = (|| -> Value {
                let carried = match TcpStream::connect(sentinel.1) {
                    Ok(c) => OwnedFd::from(c),
                    Err(e) => return errno_json(&e),
                };
                if let Handover::Home(home) = how {
                    let host = match std::fs::File::open(home) {
                        Ok(f) => f,
                        Err(e) => return errno_json(&e),
                    };
                    // SAFETY: setns on this single-threaded child, with a namespace fd.
                    if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return errno_json(&std::io::Error::last_os_error());
                    }
                }
                if let Err(answer) = join_cgroup(dir) {
                    return answer;
                }
                join_settled = keep_sending(&carried, JOIN_SETTLE_MS)["ok"] == false;
                if let Err(e) = nix::unistd::write(&theirs, b"j") {
                    return errno_json(&e.into());
                }
                if how == Handover::Take {
                    let mut number = [0u8; 16];
                    let n = match nix::unistd::read(theirs.as_raw_fd(), &mut number) {
                        Ok(n) => n,
                        Err(e) => return errno_json(&e.into()),
                    };
                    let Some(fd) = std::str::from_utf8(&number[..n])
                        .ok()
                        .and_then(|t| t.trim().parse::<i32>().ok())
                    else {
                        return json!({ "ok": false, "error": "no descriptor number" });
                    };
                    return match take_from_parent(fd) {
                        Ok(fd) => use_it(fd),
                        Err(answer) => answer,
                    };
                }
                if how == Handover::OwnTable {
                    let from = theirs.as_raw_fd();
                    return std::thread::scope(|scope| {
                        scope
                            .spawn(move || {
                                // SAFETY: gives this thread a copy of the descriptor table;
                                // what it receives from now on is in its table only.
                                if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
                                    return errno_json(&std::io::Error::last_os_error());
                                }
                                match receive_with_recvmmsg(from) {
                                    Ok(fd) => use_it(fd),
                                    Err(answer) => answer,
                                }
                            })
                            .join()
                            .unwrap_or_else(|_| json!({ "ok": false, "error": "thread died" }))
                    });
                }
                if how == Handover::Uring {
                    return match receive_with_uring(theirs.as_raw_fd()) {
                        Ok(fd) => use_it(fd),
                        Err(answer) => answer,
                    };
                }
                if how == Handover::Mmsg {
                    return match receive_with_recvmmsg(theirs.as_raw_fd()) {
                        Ok(fd) => use_it(fd),
                        Err(answer) => answer,
                    };
                }
                let mut byte = [0u8; 1];
                let mut iov = [std::io::IoSliceMut::new(&mut byte)];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; MANY_FDS]);
                let msg = match recvmsg::<()>(
                    theirs.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::empty(),
                ) {
                    Ok(m) => m,
                    Err(e) => return errno_json(&e.into()),
                };
                let Some(raw) = msg
                    .cmsgs()
                    .ok()
                    .into_iter()
                    .flatten()
                    .find_map(|c| match c {
                        // The connection comes last; the rest are closed with the child.
                        ControlMessageOwned::ScmRights(fds) => fds.last().copied(),
                        _ => None,
                    })
                else {
                    return json!({ "ok": false, "error": "no descriptor received" });
                };
                // SAFETY: the descriptor just arrived and is ours alone.
                use_it(unsafe { OwnedFd::from_raw_fd(raw) })
            })();
            result["join_settled"] = join_settled.into();
            result["netns"] = std::fs::read_link("/proc/self/ns/net")
                .map(|p| p.display().to_string())
                .unwrap_or_default()
                .into();
            let text = result.to_string();
            let _ = nix::unistd::write(&theirs, text.as_bytes());
            // SAFETY: leave the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(theirs);
            let _sentinel = sentinel;
            let mut ours = std::fs::File::from(ours);
            let mut joined = [0u8; 1];
            if ours.read_exact(&mut joined).is_err() || joined != *b"j" {
                let mut text = String::new();
                let _ = ours.read_to_string(&mut text);
                let _ = nix::sys::wait::waitpid(child, None);
                return serde_json::from_str(&format!("{}{text}", char::from(joined[0])))
                    .unwrap_or_else(|_| json!({ "ok": false, "error": "the child did not join" }));
            }
            let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
                Ok(fd) => fd,
                Err(e) => return errno_json(&e),
            };
            if connected {
                if let Err(e) = connect(&fd, addr) {
                    return errno_json(&e);
                }
            }
            let fillers: Vec<std::fs::File> = if how == Handover::RightsMany {
                match (1..MANY_FDS)
                    .map(|_| std::fs::File::open("/dev/null"))
                    .collect::<Result<_, _>>()
                {
                    Ok(f) => f,
                    Err(e) => return errno_json(&e),
                }
            } else {
                Vec::new()
            };
            let fds: Vec<i32> = fillers
                .iter()
                .map(AsRawFd::as_raw_fd)
                .chain([fd.as_raw_fd()])
                .collect();
            if how == Handover::Take {
                if let Err(e) = ours.write_all(fd.as_raw_fd().to_string().as_bytes()) {
                    return errno_json(&e);
                }
            } else {
                let iov = [std::io::IoSlice::new(b"s")];
                if let Err(e) = sendmsg::<()>(
                    ours.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                ) {
                    return errno_json(&e.into());
                }
            }
            let mut text = String::new();
            let _ = ours.read_to_string(&mut text);
            // Held until the child is done: it may take it from here.
            drop(fd);
            let _ = nix::sys::wait::waitpid(child, None);
            serde_json::from_str(&text)
                .unwrap_or_else(|_| json!({ "ok": false, "error": format!("child said {text:?}") }))
        }
    }
}

/// `carry-tcp|carry-udp DIR ADDR MILLIS`: connects to ADDR from here, joins DIR, then sends a
/// byte every millisecond until a send fails or MILLIS pass. Reports how long sends kept
/// working after the join (the connection was made where no program of DIR's root saw it).
///
/// With `high` (`carry-tcp-high`), the connection is moved to descriptor [`HIGH_FD`] before
/// the join, past the descriptors the kernel's join walk looks at: only a settle of the
/// process can find it.
fn carry(dir: &str, addr: SocketAddr, millis: u64, udp: bool, high: bool) -> Value {
    let ty = if udp {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    let fd = match socket(domain_of(addr), ty, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    if let Err(e) = connect(&fd, addr) {
        return errno_json(&e);
    }
    let fd = if high {
        match move_high(fd) {
            Ok(fd) => fd,
            Err(e) => return errno_json(&e),
        }
    } else {
        fd
    };
    if let Err(answer) = join_cgroup(dir) {
        return answer;
    }
    keep_sending(&fd, millis)
}

/// Where `carry-tcp-high` puts its connection: above the first 4,096 descriptors.
const HIGH_FD: i32 = 5000;

/// Moves `fd` to [`HIGH_FD`], raising the soft descriptor limit to reach it.
fn move_high(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let want = HIGH_FD as libc::rlim_t + 1;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill and then to set.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: as above.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    // SAFETY: dup2 onto a descriptor this process does not use; the new one is owned here.
    let high = check(unsafe { libc::dup2(fd.as_raw_fd(), HIGH_FD) })?;
    // Moved: the low descriptor closes.
    drop(fd);
    // SAFETY: `high` was just made by dup2 and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// Sends a byte every millisecond on `fd` until a send fails or `millis` pass: how long the
/// connection kept working (`open_ms`) and how many sends went through (`sent`).
fn keep_sending(fd: &OwnedFd, millis: u64) -> Value {
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_millis(millis) {
        // SAFETY: a one-byte buffer; MSG_NOSIGNAL turns a broken pipe into an error.
        let r = unsafe { libc::send(fd.as_raw_fd(), b"x".as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return json!({
                "ok": false,
                "errno": e.raw_os_error().unwrap_or(0),
                "error": e.to_string(),
                "sent": sent,
                "open_ms": start.elapsed().as_secs_f64() * 1000.0,
            });
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    json!({ "ok": true, "sent": sent, "open_ms": millis })
}

/// `clone-into DIR ADDR MILLIS`: connects to ADDR from here, outside, then makes a child
/// directly in DIR (`clone3` with `CLONE_INTO_CGROUP`: no join), which inherits the connection
/// and sends a byte every millisecond on it until a send fails or MILLIS pass.
///
/// With `child_closes` (`clone-into-closes`), the child closes the inherited connection at
/// once and exits, as a runtime's child does; then this process, outside, sends on it.
fn clone_into(dir: &str, addr: SocketAddr, millis: u64, child_closes: bool) -> Value {
    /// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let fd = match socket(domain_of(addr), libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return errno_json(&e),
    };
    if let Err(e) = connect(&fd, addr) {
        return errno_json(&e);
    }
    let cgroup = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) => return json!({ "ok": false, "error": format!("open {dir}: {e}") }),
    };
    let (read_end, write_end) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return errno_json(&e.into()),
    };
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without a new stack forks this single-threaded process; the child only
    // makes syscalls, writes its answer and exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_ref(&args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return errno_json(&std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(read_end);
        let text = if child_closes {
            drop(fd);
            json!({ "ok": true }).to_string()
        } else {
            keep_sending(&fd, millis).to_string()
        };
        let _ = nix::unistd::write(&write_end, text.as_bytes());
        // SAFETY: leave the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) }
    }
    drop(write_end);
    let mut text = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut text);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    let child: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| json!({ "ok": false, "error": format!("child said {text:?}") }));
    if !child_closes || child["ok"] != true {
        return child;
    }
    // The child is gone and held the connection for an instant only: it is still ours.
    std::thread::sleep(Duration::from_millis(100));
    keep_sending(&fd, millis)
}

/// `flood ADDR N`: N non-blocking connects, each closed at once; every connect records an
/// origin (a flood of the origin slots).
fn flood(addr: SocketAddr, n: u64) -> Value {
    let (ss, len) = sockaddr(addr);
    let mut started = 0u64;
    for _ in 0..n {
        let fd = match socket(domain_of(addr), libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) {
            Ok(fd) => fd,
            Err(e) => return errno_json(&e),
        };
        // SAFETY: valid sockaddr.
        let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&ss).cast(), len) };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS) {
            started += 1;
        }
    }
    json!({ "ok": true, "started": started })
}

/// `probe-loop ADDR MILLIS`: a connect every millisecond for MILLIS ms; counts what happened.
fn probe_loop(addr: SocketAddr, millis: u64) -> Value {
    let start = std::time::Instant::now();
    let (mut attempts, mut connected, mut refused, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut next = start;
    while start.elapsed() < Duration::from_millis(millis) {
        attempts += 1;
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => connected += 1,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => refused += 1,
            Err(_) => other += 1,
        }
        next += Duration::from_millis(1);
        if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    json!({ "ok": true, "attempts": attempts, "connected": connected, "refused": refused, "other": other })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("argument {i} must be ip:port"))
    };
    let result = match args.first().map(String::as_str) {
        Some("tcp") => tcp(
            addr(1),
            args.get(2).and_then(|a| a.parse().ok()),
            None,
            None,
        ),
        Some("tcp-reset") => tcp_reset(addr(1), addr(2)),
        Some("tcp-mark") => tcp(addr(1), None, Some(0x7011), None),
        Some("join-tcp") => tcp(addr(2), None, None, Some(&args[1])),
        Some("join-udp") => udp(addr(2), false, false, Some(&args[1])),
        Some("join-udp-connect") => udp(addr(2), false, true, Some(&args[1])),
        Some("passed-fd") => passed_fd(&args[1], addr(2)),
        Some(mode @ ("clone-into" | "clone-into-closes")) => clone_into(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
            mode == "clone-into-closes",
        ),
        Some("passed-many") => passed_many(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some("passed-home") => passed_home(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
            args.get(4)
                .map_or("/proc/self/ns/net", |p| String::leak(p.clone())),
        ),
        Some("passed-uring") => passed_uring(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some("passed-own-table") => passed_own_table(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some("passed-mmsg") => passed_mmsg(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some("taken-connected") => taken_connected(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some("passed-connected") => passed_connected(
            &args[1],
            addr(2),
            args.get(3).and_then(|m| m.parse().ok()).unwrap_or(3000),
        ),
        Some(mode @ ("carry-tcp" | "carry-udp" | "carry-tcp-high")) => carry(
            &args[1],
            addr(2),
            args.get(3).and_then(|n| n.parse().ok()).unwrap_or(2000),
            mode == "carry-udp",
            mode == "carry-tcp-high",
        ),
        Some("udp-flood") => udp_flood(
            addr(1),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        Some("tfo") => tfo(addr(1)),
        Some("uring") => uring(addr(1)),
        Some("udp") => udp(addr(1), false, false, None),
        Some("udp6") => udp(addr(1), true, false, None),
        Some("udp-connect") => udp(addr(1), false, true, None),
        Some("udp6-connect") => udp(addr(1), true, true, None),
        Some("ping") => make_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        Some("raw") => make_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW),
        Some("sctp") => make_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        Some("mptcp") => make_socket(libc::AF_INET, libc::SOCK_STREAM, 262),
        Some("bind") => bind_port(addr(1)),
        Some("override-connect4") => override_connect4(args.get(1).map_or("", String::as_str)),
        Some("no-bpf") => exec_without_bpf(&args[1..]),
        Some("hold") => hold(addr(1), args.get(2).map_or("/nonexistent", String::as_str)),
        Some("wait-tcp") => wait_tcp(addr(1), args.get(2).map_or("/nonexistent", String::as_str)),
        Some("raw-hold") => raw_hold(addr(1), args.get(2).map_or("/nonexistent", String::as_str)),
        Some("flood") => flood(
            addr(1),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        Some("probe-loop") => probe_loop(
            addr(1),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        _ => {
            eprintln!("usage: tg-probe tcp|tfo|uring|udp|udp6|udp-connect|udp6-connect ADDR | ping | raw | sctp | bind ADDR | hold ADDR FILE");
            std::process::exit(2);
        }
    };
    println!("{result}");
}
