//! What the gateway cannot see is refused in the kernel, with an audit record naming the
//! workload, and each refusal has a positive control (the same attempt outside the root
//! works).
use std::process::Command;

use tollgate_tests::{join_before_exec, probe_bin, wait_for, Cgroup, Pod, TestEnv};

const EPERM: i64 = 1;

fn errno(v: &serde_json::Value) -> i64 {
    v["errno"].as_i64().unwrap_or(0)
}

#[test]
fn udp_to_non_dns_is_eperm_on_every_path() {
    let mut env = TestEnv::new("udp");
    let app = env.workload("app.service");
    let _d = env.start();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp sink");
    let sink = udp.local_addr().expect("addr");
    let sink6 = std::net::UdpSocket::bind("[::1]:0")
        .expect("udp6 sink")
        .local_addr()
        .expect("addr");
    let mapped = format!("[::ffff:127.0.0.1]:{}", sink.port());
    let cases = [
        ("udp", sink.to_string()),
        ("udp-connect", sink.to_string()),
        ("udp6", sink6.to_string()),
        ("udp6", mapped.clone()),
        ("udp6-connect", mapped.clone()),
        // QUIC: UDP 443 is refused like any other port, so clients fall back to TCP.
        ("udp", "127.0.0.1:443".to_owned()),
    ];
    for (mode, target) in &cases {
        let control = env.probe(None, &[mode, target]);
        assert_eq!(control["ok"], true, "control {mode} {target}: {control}");
        let p = env.probe(Some(&app), &[mode, target]);
        assert_eq!(p["ok"], false, "{mode} {target} must be refused: {p}");
        assert_eq!(errno(&p), EPERM, "{mode} {target}: {p}");
    }
    let port = sink.port();
    let rec = env.wait_record("a kernel UDP refusal judged as IPv4", |r| {
        r["reason"] == "kernel_udp_not_dns"
            && r["dst"]["orig_ip"] == "127.0.0.1"
            && r["dst"]["orig_port"] == port
    });
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/app.service", env.root_rel())
    );
    assert_eq!(rec["workload"]["comm"], "tg-probe");
    assert_eq!(rec["layer"], "kernel");
    // Events are audited as the daemon drains the ring buffer: wait for all of them.
    let count = || {
        env.records()
            .iter()
            .filter(|r| r["reason"] == "kernel_udp_not_dns")
            .count()
    };
    let all = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while count() < cases.len() && std::time::Instant::now() < all {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let n = count();
    assert!(
        n >= cases.len(),
        "every refusal audited ({n} of {})",
        cases.len()
    );
}

#[test]
fn dns_to_the_allowed_resolver_is_allowed_and_counted() {
    let mut env = TestEnv::new("dns");
    let app = env.workload("app.service");
    let _d = env.start();
    let p = env.probe(Some(&app), &["udp", "127.0.0.53:53"]);
    assert_eq!(p["ok"], true, "{p}");
    let other = env.probe(Some(&app), &["udp", "127.0.0.53:54"]);
    assert_eq!(errno(&other), EPERM, "{other}");
    let rec = env.wait_record("the DNS count", |r| {
        r["reason"] == "dns_to_allowed_resolver"
    });
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/app.service", env.root_rel())
    );
    assert!(rec["count"].as_u64().unwrap_or(0) >= 1);
}

#[test]
fn ping_raw_and_sctp_sockets_are_refused_at_creation() {
    let mut env = TestEnv::new("sockets");
    let app = env.workload("app.service");
    let _d = env.start();
    // Ping sockets need net.ipv4.ping_group_range: open it in a private network namespace
    // made for this attempt, so the host's setting is never touched.
    let ping = |cgroup: Option<&std::path::Path>| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "sh", "-c"]).arg(format!(
            "sysctl -qw net.ipv4.ping_group_range='0 2147483647' && exec {} ping",
            probe_bin().display()
        ));
        if let Some(cg) = cgroup {
            join_before_exec(&mut cmd, cg);
        }
        let out = cmd.output().expect("unshare");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let control = ping(None);
    assert_eq!(
        control["ok"], true,
        "control: a ping socket outside the root: {control}"
    );
    let p = ping(Some(&app));
    assert_eq!(errno(&p), EPERM, "ping socket in the root: {p}");
    for kind in ["raw", "sctp", "mptcp"] {
        let control = env.probe(None, &[kind]);
        let p = env.probe(Some(&app), &[kind]);
        assert_eq!(p["ok"], false, "{kind} in the root: {p}");
        if control["ok"] == true {
            assert_eq!(errno(&p), EPERM, "{kind}: {p}");
        } else {
            // SCTP or MPTCP may be missing from this kernel; the attempt must fail all the same.
            assert_ne!(kind, "raw", "raw control must work: {control}");
        }
    }
    let rec = env.wait_record("the raw socket refusal", |r| {
        r["reason"] == "kernel_socket_type_refused" && r["dst"]["protocol"] == "raw"
    });
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/app.service", env.root_rel())
    );
    env.wait_record("the ping socket refusal", |r| {
        r["reason"] == "kernel_socket_type_refused" && r["dst"]["protocol"] == "icmp"
    });
}

#[test]
fn binding_the_listener_port_is_refused_in_the_root() {
    let mut env = TestEnv::new("bind");
    let app = env.workload("app.service");
    let _d = env.start();
    let other_ip = format!("127.0.0.3:{}", env.port);
    let control = env.probe(None, &["bind", &other_ip]);
    assert_eq!(
        control["ok"], true,
        "control: outside the root the port is free on 127.0.0.3: {control}"
    );
    let p = env.probe(Some(&app), &["bind", &other_ip]);
    assert_eq!(errno(&p), EPERM, "{p}");
    let p6 = env.probe(Some(&app), &["bind", &format!("[::]:{}", env.port)]);
    assert_eq!(errno(&p6), EPERM, "{p6}");
    let free = format!("127.0.0.3:{}", tollgate_tests::free_port());
    let ok = env.probe(Some(&app), &["bind", &free]);
    assert_eq!(
        ok["ok"], true,
        "other ports stay bindable in the root: {ok}"
    );
    env.wait_record("the bind refusal", |r| {
        r["reason"] == "kernel_bind_listener_port" && r["workload"]["comm"] == "tg-probe"
    });
}

#[test]
fn direct_connection_to_the_listener_is_refused() {
    let mut env = TestEnv::new("direct");
    let app = env.workload("app.service");
    let _d = env.start();
    let listener = env.listener().to_string();
    let p = env.probe(Some(&app), &["tcp", &listener]);
    assert_eq!(
        errno(&p),
        EPERM,
        "from the root the connect hook refuses it: {p}"
    );
    env.wait_record("the kernel refusal", |r| {
        r["reason"] == "kernel_direct_to_listener"
    });
    // From outside the root, no redirect recorded it: the gateway refuses and names the peer.
    let outside = env.probe(None, &["tcp", &listener]);
    assert_eq!(outside["ok"], false, "{outside}");
    let rec = env.wait_record("the gateway's refusal", |r| {
        r["reason"] == "no_origin_recorded"
    });
    assert_eq!(rec["decision"], "deny");
    assert!(
        rec["workload"]["cgroup_id"].as_u64().unwrap_or(0) > 0,
        "the refused peer's cgroup is named: {rec}"
    );
}

#[test]
fn a_refusal_flood_is_audited_as_events_plus_counts() {
    let mut env = TestEnv::new("flood");
    let app = env.workload("flood.service");
    let _d = env.start();
    const N: u64 = 20_000;
    let p = env.probe(Some(&app), &["udp-flood", "127.0.0.1:9", &N.to_string()]);
    assert_eq!(p["refused"], N, "{p}");
    let cgroup = format!("{}/flood.service", env.root_rel());
    // Every refusal is accounted for: one record each, or inside a "suppressed" count (what
    // the ring could not carry), or a folded one's count (past the audit's share a second).
    let total = wait_for(15, "all refusals to be audited", || {
        let recs = env.records();
        let events = recs
            .iter()
            .filter(|r| {
                r["reason"] == "kernel_udp_not_dns" && r["workload"]["cgroup"] == cgroup.as_str()
            })
            .map(|r| r["count"].as_u64().unwrap_or(1))
            .sum::<u64>();
        let suppressed: u64 = recs
            .iter()
            .filter(|r| {
                r["reason"] == "kernel_refusals_suppressed"
                    && r["workload"]["cgroup"] == cgroup.as_str()
            })
            .map(|r| r["count"].as_u64().unwrap_or(0))
            .sum();
        (events + suppressed >= N).then_some((events, suppressed))
    });
    assert_eq!(total.0 + total.1, N, "nothing counted twice: {total:?}");
    eprintln!(
        "flood of {N}: {} as events, {} as suppressed counts",
        total.0, total.1
    );
}

/// Sends SIGSTOP to `pid` now, and SIGCONT when dropped: a stopped daemon is never left
/// behind by a failing test.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Self {
        // SAFETY: plain kill(2) on the test's own daemon.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_join_the_ring_could_not_report_settles_the_whole_cgroup() {
    let mut env = TestEnv::new("lostjoin");
    let app = env.workload("lost.service");
    let daemon = env.start();
    let cgroup = format!("{}/lost.service", env.root_rel());
    let outside = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let target = outside.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for mut c in outside.incoming().flatten() {
            std::thread::spawn(move || std::io::copy(&mut c, &mut std::io::sink()));
        }
    });
    // With the daemon stopped nothing drains the ring: a flood of refusals fills it, and the
    // join that follows cannot be reported.
    let stopped = Stopped::new(daemon.pid());
    let flood = env.probe(Some(&app), &["udp-flood", "127.0.0.1:9", "10000"]);
    assert_eq!(flood["refused"], 10000, "{flood}");
    let app_dir = app.display().to_string();
    // The connection sits above the descriptors the join's kernel walk marks: only the
    // fallback's settle of every process of the cgroup can find it.
    let probe = Command::new(probe_bin())
        .args(["carry-tcp-high", &app_dir, &target, "4000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("probe");
    let pid = probe.id().to_string();
    let procs = app.join("cgroup.procs");
    wait_for(10, "the probe's join", || {
        std::fs::read_to_string(&procs)
            .ok()
            .filter(|p| p.lines().any(|l| l == pid))
    });
    let stopped_ms = 100;
    std::thread::sleep(std::time::Duration::from_millis(stopped_ms));
    drop(stopped);
    let out = probe.wait_with_output().expect("probe");
    let carried: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe output");
    // The join was reported only as a count, and left no mark: the daemon settled every
    // process of the cgroup.
    assert_eq!(
        carried["ok"], false,
        "the carried connection is cut: {carried}"
    );
    eprintln!(
        "lost join report: connection open {} ms after the join (over {stopped_ms} of them with \
         the daemon stopped)",
        carried["open_ms"]
    );
    let (lost, destroyed) = wait_for(10, "the lost report's records", || {
        let recs = env.records();
        let of = |reason: &str| {
            recs.iter()
                .filter(|r| r["reason"] == reason && r["workload"]["cgroup"] == cgroup.as_str())
                .cloned()
                .collect::<Vec<_>>()
        };
        let lost = of("kernel_reports_lost");
        let destroyed = of("carried_outbound_connection_destroyed");
        (!lost.is_empty() && !destroyed.is_empty()).then_some((lost, destroyed))
    });
    assert_eq!(lost[0]["decision"], "error", "{}", lost[0]);
    assert!(lost[0]["count"].as_u64().unwrap_or(0) >= 1, "{}", lost[0]);
    let queued = lost
        .iter()
        .filter_map(|r| {
            r["rule"]
                .as_str()?
                .strip_prefix("settling ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>();
    assert!(queued >= 1, "the fallback queued the probe: {lost:?}");
    assert!(
        destroyed[0]["workload"]["pid"].as_u64().unwrap_or(0) > 0,
        "{}",
        destroyed[0]
    );
    // The flood itself filled the ring: its refusals are counted, not lost.
    assert!(env
        .records()
        .iter()
        .any(|r| r["reason"] == "kernel_refusals_suppressed"
            && r["workload"]["cgroup"] == cgroup.as_str()));
}

/// A connection made in a network namespace the daemon does not serve (a helper's own, with no
/// process under a root in it) and handed to a process in the root: there is no sock_diag
/// there to destroy it, so its mark stays and its packets stay dropped while the process
/// holds it; once nothing inside holds it, the mark goes and the record says so.
#[test]
fn a_connection_from_a_namespace_not_served_stays_cut_while_held_inside() {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut env = TestEnv::new("foreignns");
    let app = env.workload("app.service");
    let _daemon = env.start();
    let outside = Cgroup::create(env.mount.join(format!("{}-outside.scope", env.name)));
    let pod = Pod::new(&env, "helper", outside.path.clone());
    // A listener in the helper's namespace that counts the bytes it receives.
    let bytes = std::sync::Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (netns, counted) = (pod.netns.clone(), std::sync::Arc::clone(&bytes));
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).expect("netns file");
        // SAFETY: setns on this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener in the pod");
        tx.send(l.local_addr().expect("addr")).expect("send addr");
        for mut c in l.incoming().flatten() {
            let counted = std::sync::Arc::clone(&counted);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    counted.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    let target = rx.recv().expect("listener address").to_string();
    let app_dir = app.display().to_string();
    let outside_dir = outside.path.display().to_string();
    // Control: the same hand-over to a child outside every root delivers its bytes.
    let home = format!("/proc/{}/ns/net", std::process::id());
    let control = pod.probe(&["passed-home", &outside_dir, &target, "300", &home]);
    assert_eq!(control["ok"], true, "{control}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        bytes.swap(0, Ordering::SeqCst) > 0,
        "the control's bytes arrive"
    );
    let attempt = pod.probe(&["passed-home", &app_dir, &target, "1000", &home]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    eprintln!("from a namespace not served: {attempt}");
    assert_eq!(
        bytes.load(Ordering::SeqCst),
        0,
        "nothing sent inside the root reaches the helper's namespace: {attempt}"
    );
    let cgroup = format!("{}/app.service", env.root_rel());
    let released = wait_for(10, "the mark's record once nothing inside holds it", || {
        env.records().into_iter().find(|r| {
            r["reason"] == "carried_connection_released"
                && r["workload"]["cgroup"] == cgroup.as_str()
                && r["dst"]["orig_port"].as_u64()
                    == target.rsplit(':').next().and_then(|p| p.parse().ok())
        })
    });
    assert_eq!(released["decision"], "allow", "{released}");
}
