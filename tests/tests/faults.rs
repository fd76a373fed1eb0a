//! Faults: the audit sink fails → the gateway fails closed, and recovers when it can write; the
//! daemon is killed and restarted under a prober connecting every millisecond → nothing gets
//! through in the gap, and exactly one attachment of each program remains; a flood of the
//! origin slots makes a paused gateway's lookup miss, and the miss is refused; a relay that
//! goes quiet is cut after the idle timeout; an audit log whose mode cannot be narrowed is
//! still written.
use std::{
    io::Write,
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tollgate_tests::{join_before_exec, probe_bin, Mock, TestEnv};

/// Runs a `tcp` probe from `cgroup` to `target` while the daemon is stopped (SIGSTOP), doing
/// `meanwhile` before the daemon continues; returns the probe's answer.
fn probe_across_a_pause(
    daemon: &tollgate_tests::Daemon,
    cgroup: &std::path::Path,
    target: std::net::SocketAddr,
    meanwhile: impl FnOnce(),
) -> serde_json::Value {
    let pid = nix::unistd::Pid::from_raw(daemon.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let mut cmd = Command::new(probe_bin());
    cmd.args(["tcp", &target.to_string()])
        .stdout(Stdio::piped());
    join_before_exec(&mut cmd, cgroup);
    let victim = cmd.spawn().expect("victim");
    // The victim's connect completes in the kernel (the listener's backlog) and its origin is
    // recorded; the gateway cannot read it yet.
    std::thread::sleep(Duration::from_millis(300));
    meanwhile();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let out = victim.wait_with_output().expect("victim output");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn an_origin_flood_makes_lookups_miss_and_misses_deny() {
    let mut env = TestEnv::new("flood");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    let attacker = env.workload("attacker.service");
    env.allow("app", "app.service", &[mock.addr]);
    let d = env.start();
    // Control: paused and resumed without a flood, the victim is served.
    let control = probe_across_a_pause(&d, &app, mock.addr, || {});
    assert_eq!(control["ok"], true, "served after the pause: {control}");
    let served = mock.peers().len();
    assert_eq!(served, 1, "the control reached the mock");
    // With the gateway paused, another workload floods the origin slots (every one of the
    // 65,536 is rewritten at least once) before the victim's origin is read.
    let victim = probe_across_a_pause(&d, &app, mock.addr, || {
        let flood = env.probe(Some(&attacker), &["flood", "127.0.0.1:9", "140000"]);
        assert!(
            flood["started"].as_u64().unwrap_or(0) >= 140_000,
            "flood: {flood}"
        );
    });
    assert_eq!(victim["ok"], false, "a missed origin is refused: {victim}");
    assert_eq!(
        mock.peers().len(),
        served,
        "nothing was forwarded for the victim"
    );
    let app_cgroup = format!("{}/app.service", env.root_rel());
    let rec = env.wait_record("the victim's refusal", |r| {
        r["reason"] == "no_origin_recorded" && r["workload"]["cgroup"] == app_cgroup
    });
    assert_eq!(rec["decision"], "deny");
    // Afterwards the workload is served again.
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "{ok}");
}

#[test]
fn a_kill_and_restart_under_a_1ms_prober_lets_nothing_through() {
    let mut env = TestEnv::new("restartprobe");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    // The canary stands for the outside: not in the policy.
    let canary = TcpListener::bind("127.0.0.1:0").expect("canary");
    let target = canary.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        for s in canary.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    // Control: the prober reaches the canary from outside the root.
    let control = env.probe(None, &["probe-loop", &target.to_string(), "50"]);
    assert!(control["connected"].as_u64().unwrap_or(0) > 0, "{control}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        seen.swap(0, Ordering::SeqCst) > 0,
        "the canary counts direct connections"
    );

    let mut d = env.start();
    let mut cmd = Command::new(probe_bin());
    cmd.args(["probe-loop", &target.to_string(), "4000"])
        .stdout(Stdio::piped());
    join_before_exec(&mut cmd, &app);
    let prober = cmd.spawn().expect("prober");
    std::thread::sleep(Duration::from_millis(700));
    d.kill();
    std::thread::sleep(Duration::from_millis(500));
    let _d2 = env.start();
    let out = prober.wait_with_output().expect("prober output");
    let counts: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let n = |k: &str| counts[k].as_u64().unwrap_or(0);
    assert!(
        n("attempts") > 1500,
        "about one connect per millisecond: {counts}"
    );
    assert!(
        n("refused") > 0,
        "the gap was probed: connects refused while down: {counts}"
    );
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "no connection reached the canary directly: {counts}"
    );
    let after = env.attachments();
    let programs = after.as_object().expect("counts");
    assert_eq!(
        programs.len(),
        gateway_user::ebpf::PROGRAMS.len(),
        "{after}"
    );
    for (program, count) in programs {
        assert_eq!(
            count, 1,
            "{program}: exactly one attachment after the restart: {after}"
        );
    }
    // And the restarted gateway decides again: the allowed mock is reachable.
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "{ok}");
}

/// A tiny tmpfs, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn an_unwritable_audit_log_refuses_what_would_be_allowed() {
    let mut env = TestEnv::new("auditfull");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let fs_dir = env.dir.join("auditfs");
    std::fs::create_dir_all(&fs_dir).expect("dir");
    nix::mount::mount(
        Some("tmpfs"),
        &fs_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=256k"),
    )
    .expect("tmpfs");
    let _fs = SmallFs(fs_dir.clone());
    let audit = fs_dir.join("audit.jsonl");
    let config = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(
        &env.config,
        config.replace(
            &env.audit.display().to_string(),
            &audit.display().to_string(),
        ),
    )
    .expect("config");
    let mut d = env.start();
    let target = mock.addr.to_string();
    let ok = env.probe(Some(&app), &["tcp", &target]);
    assert_eq!(ok["ok"], true, "{ok}");

    // Fill the file system the audit log lives on.
    let filler = fs_dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    drop(f);
    // And the slack in the audit file's last page (blank lines are harmless in JSON Lines).
    let mut a = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .expect("audit");
    while a.write_all(b"\n").is_ok() {}
    drop(a);

    // The record that fails to be written flips the gateway to refusing: the next connection's
    // record (written when it closes) is the one that fails; once the writer has said so, every
    // later connection is refused. (A connection decided between the failing write and that
    // moment may still pass: the decisions whose records were queued when it happened.)
    let first = env.probe(Some(&app), &["tcp", &target])["ok"] == true;
    tollgate_tests::wait_for(10, "the failed audit write", || {
        std::fs::read_to_string(&d.log)
            .ok()
            .filter(|l| l.contains("cannot write audit log"))
    });
    let results: Vec<bool> = std::iter::once(first)
        .chain((0..3).map(|_| env.probe(Some(&app), &["tcp", &target])["ok"] == true))
        .collect();
    let first_refused = results
        .iter()
        .position(|ok| !ok)
        .expect("a connection is refused once the audit log cannot be written");
    assert!(
        first_refused <= 1,
        "at most the connection whose record failed got through: {results:?}"
    );
    assert!(
        results[first_refused..].iter().all(|ok| !ok),
        "every later one is refused: {results:?}"
    );
    let peers = mock.peers().len();
    assert_eq!(
        peers,
        1 + first_refused,
        "nothing refused reached the upstream"
    );
    let log = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        log.contains("audit log not writable"),
        "the failure is logged"
    );

    // Room again: the next refusal's record is written, and allowing resumes.
    std::fs::remove_file(&filler).expect("free");
    let recovered = (0..4).any(|_| env.probe(Some(&app), &["tcp", &target])["ok"] == true);
    assert!(recovered, "allowing resumes once records can be written");
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(
        text.contains("\"audit_unavailable\""),
        "the refusals are audited once the sink is back"
    );
    d.stop();
}

/// Marks a file append-only (`chattr +a`) for as long as it is held: it opens for appending,
/// and refuses a change of mode even to root.
struct AppendOnly(std::fs::File);

/// `FS_APPEND_FL` of linux/fs.h.
const FS_APPEND_FL: libc::c_int = 0x20;

impl AppendOnly {
    fn set(path: &std::path::Path) -> Self {
        let file = std::fs::File::open(path).expect("open");
        Self::change(&file, |flags| flags | FS_APPEND_FL).expect("set the append-only flag");
        Self(file)
    }

    /// Reads the file's flags and writes `f` of them.
    fn change(
        file: &std::fs::File,
        f: impl FnOnce(libc::c_int) -> libc::c_int,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let mut flags: libc::c_int = 0;
        // SAFETY: FS_IOC_GETFLAGS writes an int through the pointer, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = f(flags);
        // SAFETY: FS_IOC_SETFLAGS reads an int through the pointer, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AppendOnly {
    /// Clears the flag without panicking: a panic here while a failed test unwinds would
    /// abort the whole suite and leave the file append-only.
    fn drop(&mut self) {
        if let Err(e) = Self::change(&self.0, |flags| flags & !FS_APPEND_FL) {
            eprintln!("cannot clear the append-only flag: {e}");
        }
    }
}

/// An audit log open to others whose mode cannot be narrowed (append-only, as an operator's
/// `chattr +a` leaves it) is still written, and the daemon's log says it is open to others:
/// refusing every workload for a mode the operator chose would be worse than the warning.
#[test]
fn an_audit_log_whose_mode_cannot_be_narrowed_is_still_written() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = TestEnv::new("auditmode");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    std::fs::write(&env.audit, "").expect("audit");
    std::fs::set_permissions(&env.audit, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    let _append_only = AppendOnly::set(&env.audit);
    let mut d = env.start();
    let ok = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(ok["ok"], true, "{ok}");
    let rec = env.wait_record("the connection's record", |r| r["layer"] == "connect");
    assert_eq!(rec["decision"], "allow", "{rec}");
    let mode = std::fs::metadata(&env.audit)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o664, "the mode was left as it was");
    let log = std::fs::read_to_string(&d.log).expect("log");
    assert!(
        log.contains("the audit log is open to others (mode 664) and cannot be narrowed"),
        "the daemon says so: {log}"
    );
    d.stop();
}

/// Sends one byte to the address in argv, then waits for the relay to end; prints how long
/// that took and how it ended.
const QUIET_CLIENT: &str = r#"
import json, socket, sys, time
host, port = sys.argv[1].rsplit(':', 1)
s = socket.create_connection((host, int(port)), timeout=20)
s.sendall(b'x')
start = time.monotonic()
try:
    end = 'closed' if s.recv(1) == b'' else 'data'
except ConnectionResetError:
    end = 'reset'
except socket.timeout:
    end = 'timeout'
print(json.dumps({'after': time.monotonic() - start, 'end': end}))
"#;

/// `relay_idle_timeout_ms`: an L4 relay that moves nothing for the timeout is cut, both
/// sides closed, and its record says so (with the byte it moved); a rule's own
/// `idle_timeout_ms` (3 s here) is its relays' instead.
#[test]
fn a_quiet_relay_is_cut_after_the_idle_timeout() {
    let mut env = TestEnv::new("relayidle");
    let app = env.workload("app.service");
    env.write_config("relay_idle_timeout_ms: 1000\n");
    // Upstreams that take the byte and then say nothing, holding the connection open.
    let held = |upstream: TcpListener| {
        std::thread::spawn(move || {
            use std::io::Read as _;
            let (mut s, _) = upstream.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            // Until the gateway closes its side (or 20 s pass).
            while let Ok(n @ 1..) = s.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got
        })
    };
    let (gateways, rules) = (
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
    );
    let (addr, own) = (
        gateways.local_addr().expect("addr"),
        rules.local_addr().expect("addr"),
    );
    std::fs::write(
        env.policies.join("app.yaml"),
        format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: app }}\nspec:\n  workload: {{ cgroup: {}/app.service }}\n  egress:\n    - name: gateways\n      match: {{ cidr: 127.0.0.1/32, port: {} }}\n    - name: own\n      match: {{ cidr: 127.0.0.1/32, port: {} }}\n      idle_timeout_ms: 3000\n",
            env.root_rel(),
            addr.port(),
            own.port()
        ),
    )
    .expect("policy");
    let (held_gateways, held_own) = (held(gateways), held(rules));
    let _d = env.start();
    let quiet = |to: std::net::SocketAddr| {
        let out = tollgate_tests::run_in(&app, "python3", &["-c", QUIET_CLIENT, &to.to_string()]);
        env.keep_client_output(&out.stdout);
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let after = got["after"].as_f64().unwrap_or(-1.0);
        assert!(
            got["end"] != "data" && got["end"] != "timeout",
            "the client's side cut: {got}"
        );
        after
    };
    let after = quiet(addr);
    assert!(
        (0.9..8.0).contains(&after),
        "cut about a second after the last byte: {after}"
    );
    assert_eq!(
        held_gateways.join().expect("upstream"),
        b"x",
        "the upstream's side closed too"
    );
    let rec = env.wait_record("the idle relay's record", |r| {
        r["reason"] == "relay_idle_timeout" && r["rule"] == "gateways"
    });
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["bytes_up"], 1, "{rec}");
    let after = quiet(own);
    assert!(
        (2.9..10.0).contains(&after),
        "the rule's own timeout, not the gateway's: {after}"
    );
    assert_eq!(held_own.join().expect("upstream"), b"x");
    env.wait_record("the rule's idle relay's record", |r| {
        r["reason"] == "relay_idle_timeout" && r["rule"] == "own"
    });
}
