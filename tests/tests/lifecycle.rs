//! Fail-closed lifecycle: pins outlive the daemon, a restart adopts them, connections that
//! predate enforcement are settled, servers under a root keep serving.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use tollgate_tests::{free_port, spawn_in, wait_for, HostBpffs, Mock, TestEnv};

const ECONNREFUSED: i64 = 111;

#[test]
fn sigkill_leaves_connects_refused_never_direct() {
    let mut env = TestEnv::new("sigkill");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let mut d = env.start();
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "enforced and allowed before the kill: {ok}");
    d.kill();
    let before = mock.peers().len();
    for mode in ["tcp", "tfo", "uring"] {
        let p = env.probe(Some(&app), &[mode, &mock.addr.to_string()]);
        assert_eq!(p["ok"], false, "{mode} after SIGKILL: {p}");
        assert_eq!(p["errno"], ECONNREFUSED, "{mode}: {p}");
    }
    assert_eq!(
        mock.peers().len(),
        before,
        "nothing reached the upstream directly"
    );
    // Positive control: outside the root the mock is reachable.
    let control = env.probe(None, &["tcp", &mock.addr.to_string()]);
    assert_eq!(control["ok"], true, "{control}");
    // Nobody in the root can take the listener's port while the daemon is down.
    let take = env.probe(Some(&app), &["bind", &env.listener().to_string()]);
    assert_eq!(take["errno"], 1, "{take}");
    // What the kernel refused while the daemon was down waits in the pinned event ring and is
    // audited, naming the workload, once it is back.
    let _back = env.start();
    let workload = format!("{}/app.service", env.root_rel());
    env.wait_record("the bind refused while the daemon was down", |r| {
        r["reason"] == "kernel_bind_listener_port" && r["workload"]["cgroup"] == workload.as_str()
    });
}

#[test]
fn restart_adopts_pins_and_leaves_one_attachment_each() {
    let mut env = TestEnv::new("restart");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let mut d = env.start();
    let first = env.attachments();
    d.stop();
    let during = env.attachments();
    assert_eq!(
        first, during,
        "the programs stay attached while the daemon is down"
    );
    // A socket made while the daemon is down, connected once it is back: captured like any.
    let go = env.dir.join("go-restart");
    let (waiter, waiter_out, line) = tollgate_tests::spawn_in(
        &app,
        &tollgate_tests::probe_bin(),
        &[
            "wait-tcp",
            &mock.addr.to_string(),
            go.to_str().expect("path"),
        ],
    );
    assert!(line.contains("made"), "{line}");
    let _d2 = env.start();
    let peers_before = mock.peers().len();
    let made_while_down = tollgate_tests::release(waiter, waiter_out, &go);
    assert_eq!(made_while_down["ok"], true, "{made_while_down}");
    let peers = mock.peers();
    assert_eq!(peers.len(), peers_before + 1, "{peers:?}");
    assert!(
        peers
            .last()
            .is_some_and(|p| p.ip() == std::net::IpAddr::from([127, 0, 0, 2])),
        "the socket made while the daemon was down went through the gateway: {peers:?}"
    );
    let after = env.attachments();
    let counts = after.as_object().expect("counts");
    assert_eq!(counts.len(), gateway_user::ebpf::PROGRAMS.len(), "{after}");
    for (program, n) in counts {
        assert_eq!(
            n, 1,
            "{program} attached exactly once after restart: {after}"
        );
    }
    // The socket guard at the cgroup2 root: adopted too, exactly one live link per program.
    let guard = env.guard();
    let guard = guard.as_object().expect("guard");
    assert_eq!(
        guard.len(),
        gateway_user::ebpf::GUARD_PROGRAMS.len() + gateway_user::ebpf::WATCHERS.len(),
        "{guard:?}"
    );
    assert!(
        guard.values().all(|n| n == 1),
        "the guard is live: {guard:?}"
    );
    let guard_started = env.wait_record("the guard's second start", |r| {
        r["reason"] == "socket_guard_started"
            && r["rule"].as_str().is_some_and(|s| s.contains("Adopted"))
    });
    assert!(
        !guard_started["rule"]
            .as_str()
            .unwrap_or("")
            .contains("Replaced"),
        "the guard was adopted, not attached twice: {guard_started}"
    );
    let adopted = env.wait_record("the second start's record", |r| {
        r["reason"] == "enforcement_started"
            && r["rule"].as_str().is_some_and(|s| s.contains("Adopted"))
    });
    assert!(
        !adopted["rule"].as_str().unwrap_or("").contains("Attached"),
        "nothing attached twice: {adopted}"
    );
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], true, "enforcement works after the restart: {p}");
    // Uninstall removes every attachment.
    drop(_d2);
    let out = env.tollgate(&["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = env.attachments();
    assert!(
        gone.as_object().expect("counts").values().all(|n| n == 0),
        "{gone}"
    );
    let guard_gone = env.guard();
    assert!(
        guard_gone
            .as_object()
            .expect("guard")
            .values()
            .all(|n| n == 0),
        "the guard went with the pins: {guard_gone}"
    );
    let free = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(
        free["ok"], true,
        "after uninstall the workload is no longer redirected: {free}"
    );
}

#[test]
fn connections_older_than_enforcement_are_destroyed_servers_survive() {
    let mut env = TestEnv::new("preexisting");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    let web = env.workload("web.service");
    let go = env.dir.join("go");
    // An outbound connection made before enforcement.
    let (holder, holder_out, line) = spawn_in(
        &app,
        &tollgate_tests::probe_bin(),
        &["hold", &mock.addr.to_string(), go.to_str().expect("path")],
    );
    assert!(line.contains("connected"), "{line}");
    // A server under the root, and a connection it accepted before enforcement.
    let port = free_port();
    let mut server = std::process::Command::new("python3");
    server
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&env.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    tollgate_tests::join_before_exec(&mut server, &web);
    let mut server = server.spawn().expect("http.server");
    let mut accepted = wait_for(10, "http.server to listen", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });

    let _d = env.start();
    let last = tollgate_tests::release(holder, holder_out, &go);
    assert_eq!(
        last["ok"], false,
        "the pre-existing outbound connection is dead: {last}"
    );
    env.wait_record("the destruction record", |r| {
        r["reason"] == "preexisting_outbound_connection_destroyed"
    });
    env.wait_record("the kept accepted connection", |r| {
        r["reason"] == "preexisting_accepted_connection_kept"
    });

    // The accepted connection and the listener both still serve.
    accepted
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("write");
    accepted
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = String::new();
    let _ = accepted.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.0 200"),
        "accepted connection survived: {reply:?}"
    );
    let fresh = env.probe(None, &["tcp", &format!("127.0.0.1:{port}")]);
    assert!(
        fresh["reply"]
            .as_str()
            .unwrap_or("")
            .starts_with("HTTP/1.0 404"),
        "listener keeps serving (it has no /probe): {fresh}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn server_under_root_answers_inbound_connections() {
    let mut env = TestEnv::new("server");
    let web = env.workload("web.service");
    let _d = env.start();
    let port = free_port();
    let mut server = std::process::Command::new("python3");
    server
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(&env.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    tollgate_tests::join_before_exec(&mut server, &web);
    let mut server = server.spawn().expect("http.server");
    wait_for(10, "http.server to listen", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    for _ in 0..3 {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .output()
            .expect("curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        env.records()
            .iter()
            .all(|r| r["reason"] != "kernel_egress_backstop"),
        "no reply was dropped"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_stale_origin_reused_by_another_process_is_refused() {
    let mut env = TestEnv::new("stale");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let mut d = env.start();
    d.kill();
    // With the daemon down, a redirected connect from a fixed source port leaves its origin
    // behind (the connect is refused; no accept ever reads it).
    let src = format!("127.0.0.1:{}", free_port());
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string(), &src]);
    assert_eq!(p["errno"], ECONNREFUSED, "{p}");
    let _d2 = env.start();
    // Another process, outside the root, takes the same source port and connects directly.
    let reuse = env.probe(None, &["tcp", &env.listener().to_string(), &src]);
    assert_eq!(
        reuse["ok"], false,
        "the reused entry grants nothing: {reuse}"
    );
    // The origin belongs to the dead socket's cookie, not to the socket connected now.
    let rec = env.wait_record("the refusal", |r| {
        r["reason"] == "no_origin_recorded" && r["workload"]["cgroup"].is_string()
    });
    assert_eq!(rec["decision"], "deny");
    nothing_forwarded_yet_served(&env, &app, &mock);
}

/// Nothing reached `mock`, and (positive control) a real redirected connection from `app`
/// is served.
fn nothing_forwarded_yet_served(env: &TestEnv, app: &std::path::Path, mock: &Mock) {
    assert!(
        mock.peers().is_empty(),
        "nothing was forwarded: {:?}",
        mock.peers()
    );
    let ok = env.probe(Some(app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "{ok}");
}

/// THREATS 14, the other way an origin goes stale: the workload's connection is reset before
/// the gateway accepts it (the gateway is paused, so the reset surely comes first). Another
/// process then binds the same source port and connects to the listener directly: the origin
/// belongs to the reset socket, and the newcomer is refused.
#[test]
fn an_origin_left_by_a_reset_before_accept_grants_nothing_to_the_next_socket() {
    let mut env = TestEnv::new("resetorigin");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let d = env.start();
    let pid = nix::unistd::Pid::from_raw(d.pid());
    let src = format!("127.0.0.1:{}", free_port());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let reset = env.probe(Some(&app), &["tcp-reset", &mock.addr.to_string(), &src]);
    let reuse = std::thread::scope(|scope| {
        // Outside the root, the same source port, straight to the listener: it waits in the
        // backlog until the gateway runs again.
        let reuse = scope.spawn(|| env.probe(None, &["tcp", &env.listener().to_string(), &src]));
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        reuse.join().expect("probe")
    });
    assert_eq!(
        reset["ok"], true,
        "the redirected connect completed: {reset}"
    );
    assert_eq!(
        reset["peer"],
        mock.addr.to_string(),
        "it was redirected (the socket saw its original peer): {reset}"
    );
    assert_eq!(
        reuse["ok"], false,
        "the stale origin grants nothing: {reuse}"
    );
    env.wait_record("the newcomer's refusal", |r| {
        r["reason"] == "no_origin_recorded" && r["decision"] == "deny"
    });
    nothing_forwarded_yet_served(&env, &app, &mock);
}

/// THREATS 11 and 9: a raw socket made before enforcement started never met the socket
/// programs; what it sends afterwards meets the egress backstop, which drops it and reports it.
#[test]
fn a_raw_socket_older_than_enforcement_meets_the_backstop() {
    let mut env = TestEnv::new("rawbackstop");
    let app = env.workload("app.service");
    let go = env.dir.join("go");
    let canary = std::net::UdpSocket::bind("127.0.0.1:0").expect("canary");
    canary
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let target = canary.local_addr().expect("addr").to_string();
    let (holder, holder_out, line) = spawn_in(
        &app,
        &tollgate_tests::probe_bin(),
        &["raw-hold", &target, go.to_str().expect("path")],
    );
    // Control: before enforcement the raw datagram reaches the canary.
    assert!(line.contains("\"ok\":true"), "{line}");
    let mut buf = [0u8; 64];
    let (n, _) = canary
        .recv_from(&mut buf)
        .expect("the control datagram arrives");
    assert_eq!(&buf[..n], b"raw datagram");

    let _d = env.start();
    let last = tollgate_tests::release(holder, holder_out, &go);
    assert_eq!(last["ok"], false, "the backstop refused the send: {last}");
    assert!(
        canary.recv_from(&mut buf).is_err(),
        "nothing reached the canary after enforcement started"
    );
    let workload = format!("{}/app.service", env.root_rel());
    env.wait_record("the backstop's record", |r| {
        r["reason"] == "kernel_egress_backstop" && r["workload"]["cgroup"] == workload.as_str()
    });
}

#[test]
fn a_host_without_tracefs_gets_it_mounted_for_the_guard() {
    let mut env = TestEnv::new("notracefs");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    // As a fresh VM boots: neither tracefs nor debugfs (which carries tracefs too) mounted.
    let mut d = env.start_after(
        "for m in /sys/kernel/debug/tracing /sys/kernel/debug /sys/kernel/tracing; do \
         umount -l $m 2>/dev/null; done; ! grep -qE ' - (tracefs|debugfs) ' /proc/self/mountinfo",
    );
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).expect("mountinfo");
    assert!(
        mountinfo.lines().any(
            |l| l.split(' ').nth(4) == Some("/sys/kernel/tracing") && l.contains(" - tracefs ")
        ),
        "tracefs mounted at /sys/kernel/tracing in the daemon's namespace:\n{mountinfo}"
    );
    let log = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        log.contains("mounted tracefs at /sys/kernel/tracing"),
        "{log}"
    );
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "enforcing, with the guard on: {ok}");
    d.stop();
}

/// A mock, the workload `app.service` allowed to it, and `other.service`, under no policy.
fn one_allowed_one_not(env: &mut TestEnv) -> (Mock, [std::path::PathBuf; 2]) {
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    let other = env.workload("other.service");
    env.allow("app", "app.service", &[mock.addr]);
    (mock, [app, other])
}

/// `app` reaches the mock through the gateway; `other` is denied, and audited.
fn assert_enforces(env: &TestEnv, mock: &Mock, app: &std::path::Path, other: &std::path::Path) {
    let ok = env.probe(Some(app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "allowed through the gateway: {ok}");
    let denied = env.probe(Some(other), &["tcp", &mock.addr.to_string()]);
    assert_eq!(denied["ok"], false, "no policy for it: {denied}");
    env.wait_record("the denial", |r| r["reason"] == "no_policy_for_workload");
}

/// Started by root with every capability (as a privileged pod or a shell starts it), the
/// daemon keeps only those it needs, in every thread, for good (the harness checks each
/// thread's sets), and enforces with them: one workload through, another denied and audited.
#[test]
fn a_daemon_started_with_every_capability_keeps_only_those_it_needs() {
    let mut env = TestEnv::new("rootcaps");
    let (mock, [app, other]) = one_allowed_one_not(&mut env);
    let mut d = env.start_as_root();
    assert_enforces(&env, &mock, &app, &other);
    let log = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        log.contains("every other capability dropped for good") && log.contains("CAP_SYS_PTRACE"),
        "{log}"
    );
    d.stop();
}

/// As the systemd unit runs it: in a mount namespace of its own made from the host's, with
/// the unit's file system confinement (see `as_the_unit_confines_it`) as well as its
/// capabilities (as every test's daemon), pinning on the host's bpffs. It starts, enforces,
/// audits, and stops; so the unit's confinement leaves it everything it writes.
#[test]
fn the_systemd_units_confinement_leaves_the_daemon_what_it_needs() {
    let mut env = TestEnv::new("unitfs");
    let (mock, [app, other]) = one_allowed_one_not(&mut env);
    let node = HostBpffs::mount(&env.dir.join("node-bpffs"));
    env.pin_on(&node);

    let mut d = env
        .start_as_pod(&tollgate_tests::as_the_unit_confines_it(&env.dir))
        .unwrap_or_else(|log| panic!("the confined daemon did not start: {log}"));
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).expect("mountinfo");
    let options = |point: &str| -> Vec<String> {
        mountinfo
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(point))
            .filter_map(|l| l.split(' ').nth(5).map(str::to_owned))
            .collect()
    };
    let config = env.config.display().to_string();
    let pins = node.path.display().to_string();
    for (point, mode) in [
        ("/", "ro"),
        ("/run/tollgate", "rw"),
        ("/tmp", "rw"),
        (config.as_str(), "ro"),
        (pins.as_str(), "rw"),
    ] {
        let found = options(point);
        assert!(
            found
                .last()
                .is_some_and(|o| o.split(',').next() == Some(mode)),
            "{point} is {mode} in the daemon's namespace: {found:?}\n{mountinfo}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).expect("status");
    assert!(status.contains("Umask:\t0027"), "{status}");

    assert_enforces(&env, &mock, &app, &other);
    assert!(
        !node.list("tollgate").is_empty(),
        "the pins are on the host's bpffs"
    );
    d.stop();
    let log = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        !log.contains("ERROR") && !log.contains("Read-only file system"),
        "{log}"
    );
}

/// As a DaemonSet pod runs it: in a mount namespace of its own made from the host's, with its
/// pins on a bpffs the host has (the node's /sys/fs/bpf, mounted in as a hostPath volume). It
/// starts, enforces, and its pins are the host's, so once the pod is gone the workload's
/// connects are still refused, never direct. A pod whose bpffs is its own is refused before
/// anything is attached: its pins would die with it.
#[test]
fn a_daemon_in_a_pods_mount_namespace_pins_on_the_hosts_bpffs() {
    let mut env = TestEnv::new("podmnt");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let node = HostBpffs::mount(&env.dir.join("node-bpffs"));
    env.pin_on(&node);

    let own = format!("mount -t bpf bpf {}", node.path.display());
    let log = env
        .start_as_pod(&own)
        .err()
        .expect("a pod with a bpffs of its own is refused");
    assert!(
        log.contains("private mount namespace") && log.contains("is not the one the host has"),
        "{log}"
    );
    let counts = env.attachments();
    let each = counts.as_object().expect("counts");
    assert!(
        !each.is_empty() && each.values().all(|n| n == 0),
        "nothing attached: {counts}"
    );

    let mut d = env
        .start_as_pod("true")
        .unwrap_or_else(|log| panic!("the pod did not start: {log}"));
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "allowed through the gateway: {ok}");
    let counts = env.attachments();
    let each = counts.as_object().expect("counts");
    assert!(
        !each.is_empty() && each.values().all(|n| n == 1),
        "one of each attached: {counts}"
    );
    assert!(
        !node.list("tollgate").is_empty(),
        "the pins are on the host's bpffs"
    );
    d.stop();
    let before = mock.peers().len();
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["errno"], ECONNREFUSED, "after the pod is gone: {p}");
    assert_eq!(
        mock.peers().len(),
        before,
        "nothing reached the mock directly"
    );
}
