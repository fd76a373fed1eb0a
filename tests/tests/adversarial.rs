//! THREATS.md, "getting around the capture": every way a process in an enforced cgroup might
//! reach a destination directly, tried for real. The destination is a canary — loopback
//! listeners standing for "the outside", which the workload's policy does not allow. For each
//! attempt: the same attempt from outside the root reaches the canary (so the canary would see a
//! bypass), the attempt from inside does not, and it leaves an audit record naming the workload.
//!
//! Item 12's carried sockets (made before the process joined, or passed over SCM_RIGHTS) are
//! here too: the socket guard at the cgroup2 root refuses new connects and addressed sends on
//! them, and a connection carried in by joining is cut by the join watcher.
//!
//! The rest of THREATS.md is covered where its machinery lives: ping sockets (they need a
//! private ping_group_range, kernel_refusals.rs), listener impostors, child
//! cgroups, sockets and raw sockets older than enforcement, recreated cgroups, stale origins
//! (lifecycle.rs), workload namespaces (pods.rs), the proxy abuses 17–25 (http.rs: the main
//! flow, the raw smuggling/path/host table, internal addresses, slowloris, endless streams),
//! the daemon's faults 26–29 (faults.rs, lifecycle.rs) and secrets in output (every HTTP
//! test). `cargo xtask test adversarial` runs all of those.
use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tollgate_tests::{Cgroup, Mock, TestEnv};

/// Loopback listeners the workload must never reach: TCP on 127.0.0.1 and ::1 (each accepted
/// connection is counted and closed at once), UDP on 127.0.0.1 (each datagram counted).
struct Canary {
    tcp4: SocketAddr,
    tcp6: SocketAddr,
    udp: SocketAddr,
    /// UDP on 127.0.0.1:443, where QUIC would go.
    quic: SocketAddr,
    seen: Arc<AtomicUsize>,
    /// Bytes received over the TCP listeners' connections.
    bytes: Arc<AtomicUsize>,
}

impl Canary {
    fn new() -> Self {
        let seen = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let mut tcp = Vec::new();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let l = TcpListener::bind(bind).expect("canary tcp");
            tcp.push(l.local_addr().expect("addr"));
            let seen = Arc::clone(&seen);
            let bytes = Arc::clone(&bytes);
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    seen.fetch_add(1, Ordering::SeqCst);
                    // Answer with an end of stream and count what the client sent, so the
                    // control sees a clean close rather than a reset.
                    let bytes = Arc::clone(&bytes);
                    std::thread::spawn(move || {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = std::io::Read::read(&mut s, &mut buf) {
                            bytes.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        let mut udp = Vec::new();
        for bind in ["127.0.0.1:0", "127.0.0.1:443"] {
            let sock = UdpSocket::bind(bind).expect("canary udp");
            udp.push(sock.local_addr().expect("addr"));
            let counter = Arc::clone(&seen);
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while sock.recv_from(&mut buf).is_ok() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self {
            tcp4: tcp[0],
            tcp6: tcp[1],
            udp: udp[0],
            quic: udp[1],
            seen,
            bytes,
        }
    }

    /// Bytes received over TCP since the last call, once 200 ms pass with none arriving.
    fn take_bytes(&self) -> usize {
        let mut total = 0;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            match self.bytes.swap(0, Ordering::SeqCst) {
                0 => return total,
                n => total += n,
            }
        }
    }

    /// Connections and datagrams that arrived since the last call.
    fn take(&self) -> usize {
        self.seen.swap(0, Ordering::SeqCst)
    }

    /// Whether something arrives (within 5 s) since the last look; resets the count.
    fn saw_one(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.take() > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Waits until more records than `before` satisfy `pred`; returns the newest.
fn new_record(env: &TestEnv, before: usize, what: &str, pred: &dyn Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let matching: Vec<Value> = env.records().into_iter().filter(|r| pred(r)).collect();
        if matching.len() > before {
            return matching.last().cloned().expect("record");
        }
        assert!(Instant::now() < deadline, "no audit record for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(env: &TestEnv, pred: &dyn Fn(&Value) -> bool) -> usize {
    env.records().iter().filter(|r| pred(r)).count()
}

/// The record is about `workload` and, when `port` is given, about that destination port.
fn names(r: &Value, workload: &str, port: Option<u16>) -> bool {
    r["workload"]["cgroup"] == workload
        && r["decision"] == "deny"
        && port.is_none_or(|p| r["dst"]["orig_port"] == p)
}

#[test]
fn every_way_around_the_capture_is_closed_and_audited() {
    let mut env = TestEnv::new("adversarial");
    let app = env.workload("agent.service");
    let canary = Canary::new();
    // The workload may reach something (so it has a policy), just not the canary.
    let allowed = Mock::start("127.0.0.1:0");
    env.allow("agent", "agent.service", &[allowed.addr]);
    let _d = env.start();
    let workload = format!("{}/agent.service", env.root_rel());
    let (t4, t6, u) = (canary.tcp4, canary.tcp6, canary.udp);
    let mapped_tcp = format!("[::ffff:127.0.0.1]:{}", t4.port());
    let mapped_udp = format!("[::ffff:127.0.0.1]:{}", u.port());

    // (THREATS item, probe mode, target, whether a control from outside reaches the canary,
    //  the destination port the record names).
    let attempts: Vec<(&str, &str, String, bool, Option<u16>)> = vec![
        (
            "plain TCP connect",
            "tcp",
            t4.to_string(),
            true,
            Some(t4.port()),
        ),
        (
            "1: IPv4-mapped IPv6",
            "tcp",
            mapped_tcp,
            true,
            Some(t4.port()),
        ),
        (
            "2: native IPv6 to ::1",
            "tcp",
            t6.to_string(),
            true,
            Some(t6.port()),
        ),
        (
            "3: unconnected UDP sendto",
            "udp",
            u.to_string(),
            true,
            Some(u.port()),
        ),
        (
            "3: QUIC (UDP to port 443)",
            "udp",
            canary.quic.to_string(),
            true,
            Some(443),
        ),
        (
            "3: connected UDP",
            "udp-connect",
            u.to_string(),
            true,
            Some(u.port()),
        ),
        (
            "4: TCP Fast Open without connect",
            "tfo",
            t4.to_string(),
            true,
            Some(t4.port()),
        ),
        (
            "5: io_uring connect",
            "uring",
            t4.to_string(),
            true,
            Some(t4.port()),
        ),
        (
            "7: SO_MARK set by the workload",
            "tcp-mark",
            t4.to_string(),
            true,
            Some(t4.port()),
        ),
        (
            "16: UDP to a v4-mapped address",
            "udp6",
            mapped_udp,
            true,
            Some(u.port()),
        ),
        ("11: raw socket", "raw", String::new(), false, None),
    ];
    for (item, mode, target, reaches, port) in &attempts {
        let args: Vec<&str> = [*mode, target.as_str()]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        // Control: outside the root the same attempt works (and reaches the canary).
        let control = env.probe(None, &args);
        assert_eq!(control["ok"], true, "{item}: control {control}");
        if *reaches {
            assert!(canary.saw_one(), "{item}: the canary sees a direct attempt");
        }
        let pred = |r: &Value| names(r, &workload, *port);
        let before = count(&env, &pred);
        let attempt = env.probe(Some(&app), &args);
        let rec = new_record(&env, before, item, &pred);
        // The attempt itself failed the way its layer fails it: EPERM from the kernel, or a
        // reset from the gateway after its decision; the record says which, about the
        // destination as the kernel judged it (a v4-mapped address as IPv4).
        let (errno, reason) = match *mode {
            "udp" | "udp-connect" | "udp6" => (libc::EPERM, "kernel_udp_not_dns"),
            "raw" => (libc::EPERM, "kernel_socket_type_refused"),
            _ => (libc::ECONNRESET, "no_rule_matched"),
        };
        assert_eq!(attempt["ok"], false, "{item}: {attempt}");
        assert_eq!(attempt["errno"], errno, "{item}: {attempt}");
        assert_eq!(rec["reason"], reason, "{item}: {rec}");
        if let Ok(addr) = target.parse::<SocketAddr>() {
            let judged = match addr.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(v6.to_string(), |v4| v4.to_string()),
                v4 => v4.to_string(),
            };
            assert_eq!(rec["dst"]["orig_ip"], judged, "{item}: {rec}");
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            canary.take(),
            0,
            "{item}: nothing reached the canary ({attempt})"
        );
        assert!(
            rec["workload"]["pid"].as_u64().unwrap_or(0) > 0
                || rec["layer"] == "kernel"
                || rec["workload"]["cgroup_id"].as_u64().unwrap_or(0) > 0,
            "{item}: the record identifies the workload: {rec}"
        );
    }

    // 12: a socket made outside every root and used by a task inside one: made before the
    // process joined, or handed over SCM_RIGHTS by a process outside. The socket guard (BPF
    // LSM) refuses the connect or addressed send with EPERM. The control joins a cgroup
    // outside the root, where the same steps reach the canary.
    let outside = Cgroup::create(env.mount.join(format!("{}-outside.scope", env.name)));
    let (outside_dir, app_dir) = (
        outside.path.display().to_string(),
        app.display().to_string(),
    );
    let carried: [(&str, &str, SocketAddr); 4] = [
        ("12: TCP socket made before joining", "join-tcp", t4),
        ("12: UDP socket made before joining, sendto", "join-udp", u),
        (
            "12: UDP socket made before joining, connect",
            "join-udp-connect",
            u,
        ),
        ("12: TCP socket passed over SCM_RIGHTS", "passed-fd", t4),
    ];
    for (item, mode, target) in carried {
        let target = target.to_string();
        let control = env.probe(None, &[mode, &outside_dir, &target]);
        assert_eq!(control["ok"], true, "{item}: control {control}");
        assert!(canary.saw_one(), "{item}: the canary sees the control");
        let port = target.rsplit(':').next().and_then(|p| p.parse().ok());
        let pred = |r: &Value| {
            names(r, &workload, port) && r["reason"] == "kernel_socket_from_outside_root"
        };
        let before = count(&env, &pred);
        let attempt = env.probe(None, &[mode, &app_dir, &target]);
        assert_eq!(attempt["ok"], false, "{item}: refused ({attempt})");
        if mode == "passed-fd" {
            // The join was settled before the hand-over: the refusal is the guard's doing.
            assert_eq!(attempt["join_settled"], true, "{item}: {attempt}");
            assert_eq!(control["join_settled"], false, "{item}: {control}");
        }
        assert_eq!(
            attempt["errno"],
            libc::EPERM,
            "{item}: refused with EPERM ({attempt})"
        );
        let rec = new_record(&env, before, item, &pred);
        assert!(
            rec["workload"]["pid"].as_u64().unwrap_or(0) > 0,
            "{item}: {rec}"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(canary.take(), 0, "{item}: nothing reached the canary");
    }

    // 12: a connection made before the process joined (TCP, and connected UDP, whose sends
    // name no address). The join watcher marks its connections in the joining write itself,
    // so their packets are dropped from then on, and reports the join; the daemon destroys the
    // connection (a server's accepted ones would stay). Nothing sent after the join reaches
    // the destination.
    for (mode, target) in [("carry-tcp", t4), ("carry-udp", u)] {
        // A connected UDP socket's send fails at once (the drop is EPERM for a datagram), so
        // the probe may have closed it before the settle: then the mark's own record.
        let pred = |r: &Value| {
            r["workload"]["cgroup"] == workload.as_str()
                && (r["reason"] == "carried_outbound_connection_destroyed"
                    || r["reason"] == "carried_connection_dropped_until_closed")
                && r["dst"]["orig_port"] == target.port()
        };
        let before = count(&env, &pred);
        // What earlier cases sent has arrived and is not counted here.
        canary.take_bytes();
        canary.take();
        let carried = env.probe(None, &[mode, &app_dir, &target.to_string(), "3000"]);
        assert_eq!(
            carried["ok"], false,
            "{mode}: the carried connection was cut: {carried}"
        );
        let open_ms = carried["open_ms"].as_f64().unwrap_or(f64::MAX);
        // TCP bytes, or UDP datagrams (the TCP connection itself was made outside, before).
        let bytes = canary.take_bytes();
        let arrived = canary.take();
        let leaked = if mode == "carry-udp" { arrived } else { bytes };
        println!(
            "12: {mode}: open {open_ms:.1} ms after the join, {} sends accepted, {leaked} \
             bytes or datagrams reached the destination",
            carried["sent"]
        );
        assert_eq!(
            leaked, 0,
            "{mode}: nothing sent after the join reaches the destination ({carried})"
        );
        assert!(
            open_ms < 250.0,
            "{mode}: cut within 250 ms of the join: {carried}"
        );
        let rec = new_record(&env, before, mode, &pred);
        assert!(rec["workload"]["pid"].as_u64().unwrap_or(0) > 0, "{rec}");
    }

    // 12: a connection made outside every root that reaches a process inside one without a
    // join: handed over SCM_RIGHTS to a process already inside (received with recvmsg or
    // recvmmsg), taken with pidfd_getfd, or
    // inherited by a child made directly in the root (clone3 with CLONE_INTO_CGROUP). The
    // descriptor watcher reports the receipt, or the child's return from clone3, and the
    // daemon destroys the connection as after a join. A connection received or taken is also
    // marked in the receiving call itself, so not one byte sent on it after it arrived
    // leaves: the destination counts what it got. The control: the same outside the roots
    // keeps working, and its bytes arrive.
    let target = t4.to_string();
    let pred = |r: &Value| {
        r["workload"]["cgroup"] == workload.as_str()
            && r["reason"] == "carried_outbound_connection_destroyed"
            && r["dst"]["orig_port"] == t4.port()
    };
    for (mode, what) in [
        ("passed-connected", "handed over SCM_RIGHTS"),
        (
            "passed-many",
            "handed over SCM_RIGHTS last of 40 descriptors",
        ),
        (
            "passed-mmsg",
            "handed over SCM_RIGHTS and received with recvmmsg",
        ),
        (
            "passed-own-table",
            "received by a thread with its own descriptor table",
        ),
        ("passed-uring", "received through io_uring"),
        ("taken-connected", "taken with pidfd_getfd"),
        ("clone-into", "inherited by a child made in the root"),
    ] {
        canary.take_bytes();
        let control = env.probe(None, &[mode, &outside_dir, &target, "300"]);
        assert_eq!(
            control["ok"], true,
            "12: {mode}: outside the roots it keeps working: {control}"
        );
        assert!(canary.saw_one(), "12: {mode}: the canary sees the control");
        canary.take();
        let control_bytes = canary.take_bytes();
        assert!(
            control_bytes > 0,
            "12: {mode}: the control's bytes arrive ({control})"
        );
        let before = count(&env, &pred);
        let attempt = env.probe(None, &[mode, &app_dir, &target, "3000"]);
        assert_eq!(
            attempt["ok"], false,
            "12: a connection {what} is cut: {attempt}"
        );
        let leaked = canary.take_bytes();
        assert_eq!(
            leaked, 0,
            "12: {mode}: nothing sent on a connection {what} reaches its destination \
             ({attempt})"
        );
        if mode != "clone-into" {
            // The child's join was settled before the hand-over, so the cut is the receipt's.
            assert_eq!(attempt["join_settled"], true, "12: {mode}: {attempt}");
            assert_eq!(control["join_settled"], false, "12: {mode}: {control}");
        }
        let open_ms = attempt["open_ms"].as_f64().unwrap_or(f64::MAX);
        println!(
            "12: {mode}: open {open_ms:.1} ms in the root, {} sends accepted, {leaked} bytes \
             reached the destination",
            attempt["sent"]
        );
        assert!(open_ms < 250.0, "12: {mode}: cut within 250 ms: {attempt}");
        let rec = new_record(&env, before, what, &pred);
        assert!(rec["workload"]["pid"].as_u64().unwrap_or(0) > 0, "{rec}");
        canary.take();
    }

    // 12, what must not break: a child made in the root inherits its parent's connection and
    // closes it at once (as a runtime's child does). The connection is marked at the child's
    // return from clone3, but no process inside holds it when the daemon settles, so the mark
    // goes and the parent, outside, keeps using it.
    let released = |r: &Value| {
        r["workload"]["cgroup"] == workload.as_str()
            && r["reason"] == "carried_connection_released"
            && r["dst"]["orig_port"] == t4.port()
    };
    let before = count(&env, &pred);
    let released_before = count(&env, &released);
    canary.take_bytes();
    let kept = env.probe(None, &["clone-into-closes", &app_dir, &target, "300"]);
    assert_eq!(
        kept["ok"], true,
        "12: the parent's connection outlives a child that closed it: {kept}"
    );
    assert!(canary.saw_one(), "12: the parent's connection was made");
    assert!(
        canary.take_bytes() > 0,
        "12: the parent's bytes arrive after the child closed its copy ({kept})"
    );
    assert_eq!(
        count(&env, &pred),
        before,
        "12: nothing was destroyed for a child that closed its copy"
    );
    let rec = new_record(
        &env,
        released_before,
        "a connection released by a child",
        &released,
    );
    assert_eq!(rec["decision"], "allow", "{rec}");

    // 6: straight to the gateway's listener, with no redirect behind it: refused at connect.
    let listener = env.listener().to_string();
    let pred = |r: &Value| names(r, &workload, None) && r["reason"] == "kernel_direct_to_listener";
    let before = count(&env, &pred);
    let direct = env.probe(Some(&app), &["tcp", &listener]);
    assert_eq!(direct["ok"], false, "direct to the listener: {direct}");
    new_record(&env, before, "a direct connection to the listener", &pred);

    // Positive control for the workload itself: what its policy allows still works.
    let ok = env.probe(Some(&app), &["tcp", &allowed.addr.to_string()]);
    assert_eq!(ok["ok"], true, "the allowed destination is reachable: {ok}");
    assert_eq!(canary.take(), 0);

    // 8: a child cgroup the workload makes while enforcement runs inherits it.
    let child = env.workload("agent.service/late.scope");
    let child_name = format!("{workload}/late.scope");
    let pred = |r: &Value| names(r, &child_name, Some(t4.port()));
    let before = count(&env, &pred);
    let late = env.probe(Some(&child), &["tcp", &t4.to_string()]);
    assert_eq!(late["ok"], false, "a new child cgroup is enforced: {late}");
    new_record(&env, before, "a child cgroup made at run time", &pred);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        canary.take(),
        0,
        "nothing from the child reached the canary"
    );
    // Its policy is the parent's: the allowed destination works from the child too.
    let ok = env.probe(Some(&child), &["tcp", &allowed.addr.to_string()]);
    assert_eq!(ok["ok"], true, "the child inherits the policy: {ok}");
}
