//! Redirection and identity: every connect under the root reaches the gateway, with the
//! kernel's view of who made it; nothing outside the root is touched.
use std::{io::Read, net::SocketAddr, process::Command};

use sha2::{Digest, Sha256};
use tollgate_tests::{join_before_exec, run_in, wait_for, Mock, TestEnv};

const GATEWAY_SRC: [u8; 4] = [127, 0, 0, 2];

fn from_gateway(peer: &SocketAddr) -> bool {
    peer.ip() == std::net::IpAddr::from(GATEWAY_SRC)
}

#[test]
fn redirect_reaches_upstream_through_gateway_with_identity() {
    let mut env = TestEnv::new("identity");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("billing.service");
    env.allow("billing", "billing.service", &[mock.addr]);
    let _d = env.start();

    // Positive control: the test process is outside the root; it reaches the mock directly.
    let direct = env.probe(None, &["tcp", &mock.addr.to_string()]);
    assert_eq!(direct["ok"], true, "{direct}");
    let peers = mock.peers();
    assert!(
        peers.iter().all(|p| !from_gateway(p)),
        "outside the root is untouched: {peers:?}"
    );
    assert!(
        env.records().iter().all(|r| r["layer"] != "connect"),
        "no decision for outside traffic"
    );

    // A python client in the workload cgroup, kept alive so /proc can be compared.
    let script = format!(
        "import urllib.request,sys\nprint(urllib.request.urlopen('http://{}/x').read().decode().strip(), flush=True)\nsys.stdin.read()",
        mock.addr
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    join_before_exec(&mut cmd, &app);
    let mut child = cmd.spawn().expect("python3");
    let pid = child.id();
    let mut first = [0u8; 64];
    let n = child
        .stdout
        .as_mut()
        .expect("stdout")
        .read(&mut first)
        .expect("read");
    assert!(
        String::from_utf8_lossy(&first[..n]).contains("mock"),
        "python got the upstream reply"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let ticks: u64 = stat[stat.rfind(')').expect(")") + 1..]
        .split_whitespace()
        .nth(19)
        .expect("field")
        .parse()
        .expect("ticks");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    let sha: String = Sha256::digest(std::fs::read(&exe).expect("read exe"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    assert!(
        mock.peers().iter().any(from_gateway),
        "the upstream saw the gateway's address: {:?}",
        mock.peers()
    );
    let rec = env.wait_record("python's allow record", |r| {
        r["layer"] == "connect" && r["workload"]["pid"] == pid
    });
    drop(child.stdin.take());
    let _ = child.wait();

    let w = &rec["workload"];
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["policy"], "billing");
    assert_eq!(rec["rule"], "rule-0");
    assert_eq!(w["tgid"], pid);
    assert_eq!(w["cgroup"], format!("{}/billing.service", env.root_rel()));
    assert_eq!(w["unit"], "billing.service");
    assert_eq!(w["comm"], "python3");
    assert_eq!(w["verified"], true);
    assert_eq!(w["exe"], exe.display().to_string());
    assert_eq!(w["exe_sha256"], sha);
    assert_eq!(
        w["start_time_ns"].as_u64().expect("start") / 10_000_000,
        ticks,
        "start time matches /proc"
    );
    assert_eq!(rec["dst"]["orig_ip"], mock.addr.ip().to_string());
    assert_eq!(rec["dst"]["orig_port"], mock.addr.port());
    assert!(rec["workload"]["cgroup_id"].as_u64().expect("id") > 0);
}

#[test]
fn curl_is_captured_and_sees_its_original_peer() {
    let mut env = TestEnv::new("curl");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let _d = env.start();
    let out = run_in(
        &app,
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\\n%{remote_ip}:%{remote_port}",
            &format!("http://{}/", mock.addr),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("mock"), "{text}");
    assert!(
        text.ends_with(&mock.addr.to_string()),
        "getpeername shows the original destination: {text}"
    );
    assert!(
        mock.peers().iter().all(from_gateway),
        "every upstream connection came from the gateway"
    );
    // getpeername from the probe as well.
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(p["peer"], mock.addr.to_string());
}

#[test]
fn nested_child_cgroup_inherits_and_gets_one_origin() {
    let mut env = TestEnv::new("nested");
    let mock = Mock::start("127.0.0.1:0");
    env.workload("team.slice");
    let inner = env.workload("team.slice/job.service/worker");
    env.allow("team", "team.slice", &[mock.addr]);
    let _d = env.start();
    let p = env.probe(Some(&inner), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], true, "{p}");
    assert!(mock.peers().iter().all(from_gateway));
    let local = p["local"].as_str().expect("local").to_owned();
    let rec = env.wait_record("the nested workload's record", |r| {
        r["layer"] == "connect" && r["workload"]["comm"] == "tg-probe"
    });
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/team.slice/job.service/worker", env.root_rel())
    );
    assert_eq!(rec["workload"]["unit"], "job.service");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let n = env
        .records()
        .iter()
        .filter(|r| r["layer"] == "connect" && r["workload"]["comm"] == "tg-probe")
        .count();
    assert_eq!(n, 1, "exactly one decision for one connection from {local}");
}

#[test]
fn recreated_workload_cgroup_is_still_enforced() {
    let env = TestEnv::new("recreate");
    let mock = Mock::start("127.0.0.1:0");
    // Not allowed: stands for "the outside".
    let canary = Mock::start("127.0.0.1:0");
    env.allow("svc", "svc.service", &[mock.addr]);
    let _d = env.start();
    let workload = format!("{}/svc.service", env.root_rel());
    let mut ids = Vec::new();
    for round in 0..2 {
        let svc = env.enforced.join("svc.service");
        let cg = tollgate_tests::Cgroup::create(svc.clone());
        let before = mock.peers().len();
        let p = env.probe(Some(&svc), &["tcp", &mock.addr.to_string()]);
        assert_eq!(p["ok"], true, "round {round}: {p}");
        let after = mock.peers();
        assert_eq!(after.len(), before + 1);
        assert!(
            from_gateway(after.last().expect("peer")),
            "round {round}: captured after recreation"
        );
        // And what its policy does not allow is refused and audited under the new cgroup.
        let denied = |r: &serde_json::Value| {
            r["decision"] == "deny"
                && r["workload"]["cgroup"] == workload.as_str()
                && r["dst"]["orig_port"] == canary.addr.port()
        };
        let seen = env.records().iter().filter(|r| denied(r)).count();
        let p = env.probe(Some(&svc), &["tcp", &canary.addr.to_string()]);
        assert_eq!(p["ok"], false, "round {round}: {p}");
        let rec = tollgate_tests::wait_for(10, "the denial's record", || {
            let matching: Vec<_> = env.records().into_iter().filter(|r| denied(r)).collect();
            (matching.len() > seen).then(|| matching.last().cloned().expect("record"))
        });
        ids.push(rec["workload"]["cgroup_id"].as_u64().unwrap_or(0));
        assert!(
            canary.peers().is_empty(),
            "round {round}: nothing reached the canary"
        );
        drop(cg);
        assert!(!svc.exists());
    }
    assert!(
        ids[0] != 0 && ids[0] != ids[1],
        "each round was a new cgroup, judged as itself: {ids:?}"
    );
}

#[test]
fn ipv6_mapped_tfo_and_io_uring_connects_are_captured() {
    let mut env = TestEnv::new("families");
    let v4 = Mock::start("127.0.0.1:0");
    let v6 = Mock::start("[::1]:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[v4.addr, v6.addr]);
    let _d = env.start();
    let mapped = format!("[::ffff:127.0.0.1]:{}", v4.addr.port());
    let cases: [(&str, String, &str); 4] = [
        ("tcp", v6.addr.to_string(), "::1"),
        ("tcp", mapped.clone(), "127.0.0.1"),
        ("tfo", v4.addr.to_string(), "127.0.0.1"),
        ("uring", v4.addr.to_string(), "127.0.0.1"),
    ];
    for (mode, target, judged_as) in cases {
        // Positive control: the same attempt from outside the root reaches the mock directly.
        let control = env.probe(None, &[mode, &target]);
        assert_eq!(control["ok"], true, "control {mode} {target}: {control}");
        let n = env
            .records()
            .iter()
            .filter(|r| r["layer"] == "connect")
            .count();
        let p = env.probe(Some(&app), &[mode, &target]);
        assert_eq!(p["ok"], true, "{mode} {target}: {p}");
        assert!(
            p["reply"].as_str().unwrap_or("").contains("mock"),
            "{mode} {target}: {p}"
        );
        let recs = wait_for(10, "a new decision", || {
            let r: Vec<_> = env
                .records()
                .into_iter()
                .filter(|r| r["layer"] == "connect")
                .collect();
            (r.len() > n).then_some(r)
        });
        let rec = recs.last().expect("record");
        assert_eq!(rec["decision"], "allow", "{mode} {target}: {rec}");
        assert_eq!(rec["dst"]["orig_ip"], judged_as, "{mode} {target}");
    }
    assert!(v4.peers().iter().any(from_gateway));
}

#[test]
fn nested_enforced_roots_record_one_origin() {
    let mut env = TestEnv::new("nestedroots");
    let mock = Mock::start("127.0.0.1:0");
    let inner = env.workload("tenant.slice");
    let app = env.workload("tenant.slice/app.service");
    let text = std::fs::read_to_string(&env.config).expect("config");
    let nested = format!("{}/tenant.slice", env.root_rel());
    std::fs::write(
        &env.config,
        text.replace(
            &format!("roots: [{}]", env.root_rel()),
            &format!("roots: [{}, {nested}]", env.root_rel()),
        ),
    )
    .expect("write");
    env.allow("app", "tenant.slice/app.service", &[mock.addr]);
    let _d = env.start();
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 1),
        "outer root: {counts}"
    );
    assert!(inner.exists());
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(
        p["ok"], true,
        "both roots' programs ran and the connection still got through: {p}"
    );
    assert_eq!(p["peer"], mock.addr.to_string());
    let rec = env.wait_record("the decision", |r| {
        r["layer"] == "connect" && r["workload"]["comm"] == "tg-probe"
    });
    assert_eq!(rec["dst"]["orig_ip"], "127.0.0.1");
    assert_eq!(
        rec["dst"]["orig_port"],
        mock.addr.port(),
        "the origin is the workload's, not the inner root's rewrite"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        env.records()
            .iter()
            .filter(|r| r["layer"] == "connect")
            .count(),
        1
    );
    assert!(mock.peers().iter().all(from_gateway));
}

#[test]
fn a_socket_mark_does_not_exempt_anyone() {
    let mut env = TestEnv::new("mark");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    let _d = env.start();
    let control = env.probe(None, &["tcp-mark", &mock.addr.to_string()]);
    assert_eq!(
        control["ok"], true,
        "control: SO_MARK works outside the root: {control}"
    );
    let p = env.probe(Some(&app), &["tcp-mark", &mock.addr.to_string()]);
    assert_eq!(p["ok"], false, "no policy allows it, mark or not: {p}");
    let rec = env.wait_record("the denial", |r| {
        r["layer"] == "connect" && r["workload"]["comm"] == "tg-probe"
    });
    assert_eq!(rec["reason"], "no_policy_for_workload");
    assert_eq!(
        mock.peers().len(),
        1,
        "only the control reached the upstream"
    );
}

#[test]
fn a_workload_program_cannot_override_ours() {
    let mut env = TestEnv::new("override");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    let _d = env.start();
    // The attacker attaches its own allow-everything connect4 at its cgroup (as a privileged
    // workload could); it succeeds, and it changes nothing: our programs still run.
    let attach = env.probe(None, &["override-connect4", app.to_str().expect("path")]);
    assert_eq!(
        attach["ok"], true,
        "the attacker's program is attached: {attach}"
    );
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], false, "still captured and denied (no policy): {p}");
    env.wait_record("the denial", |r| r["reason"] == "no_policy_for_workload");
    assert!(
        mock.peers().is_empty(),
        "nothing reached the upstream directly"
    );
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 1),
        "ours are intact: {counts}"
    );
}
