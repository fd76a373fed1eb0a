//! Workloads in their own network namespaces ("pods"): captured, decided and forwarded inside
//! their namespace, under an enforced root named like Kubernetes'.
use std::process::Command;

use tollgate_tests::{tollgate_bin, wait_for, Mock, Pod, TestEnv};

const CONTAINER_A: &str = "4f6b1c0d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
const CONTAINER_B: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";

/// The cgroup containerd (systemd driver) makes for a burstable pod's container.
fn containerd_cgroup(pod_uid: &str, container: &str) -> String {
    let uid = pod_uid.replace('-', "_");
    format!("kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{container}.scope")
}

/// The cgroup of container A of the pod `uid` (relative to the root, and its path) and a
/// policy `name` allowing it to 127.0.0.1 on a free port.
fn pod_allowed_one_port(
    env: &mut TestEnv,
    uid: &str,
    name: &str,
) -> (String, std::path::PathBuf, u16) {
    let rel = containerd_cgroup(uid, CONTAINER_A);
    let cg = env.workload(&rel);
    let port = tollgate_tests::free_port();
    env.allow(
        name,
        &rel,
        &[format!("127.0.0.1:{port}").parse().expect("addr")],
    );
    (rel, cg, port)
}

fn register(env: &TestEnv, pod: &Pod) {
    let out = Command::new(tollgate_bin())
        .args(["netns", "add", "--config"])
        .arg(&env.config)
        .arg(&pod.netns)
        .output()
        .expect("tollgate netns add");
    assert!(
        out.status.success(),
        "register {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace at a path only the caller sees (a network plugin in a mount namespace of its
/// own; a daemon whose unit gives it a /tmp of its own) is registered all the same:
/// `tollgate netns add` opens it and passes the descriptor. It is served while no process
/// uses it yet, and the pod's first connection, a few sweeps later, is captured.
#[test]
fn a_namespace_at_a_path_only_the_caller_sees_is_registered() {
    let mut env = TestEnv::kube("podfd");
    let (_, cg, port) =
        pod_allowed_one_port(&mut env, "5d2c7a1e-3b4f-4e6a-8c9d-0e1f2a3b4c5d", "pod-f");
    let _d = env.start();
    let pod = Pod::new(&env, "f", cg);
    let allowed = Mock::start_in(&pod.netns, &format!("127.0.0.1:{port}"));
    let hidden = "/mnt/tollgate-test-pod-ns";
    assert!(
        !std::path::Path::new(hidden).exists(),
        "the daemon's mount namespace has no {hidden}"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs tmpfs /mnt && touch {hidden} && mount --bind \"$1\" {hidden} && \
             exec \"$0\" netns add --config \"$2\" {hidden}"
        ))
        .arg(tollgate_bin())
        .arg(&pod.netns)
        .arg(&env.config)
        .output()
        .expect("tollgate netns add");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("netns cookie"),
        "register through {hidden}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon sweeps every half second; a namespace nobody uses yet and whose path it
    // cannot see is still served after a few sweeps: registered once, never let go and
    // found again.
    std::thread::sleep(std::time::Duration::from_millis(1600));
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&pod.netns)
            .expect("the pod's netns")
            .ino()
    };
    let served: Vec<String> = env
        .records()
        .iter()
        .filter(|r| r["reason"] == "netns_enforced")
        .filter_map(|r| r["rule"].as_str().map(str::to_owned))
        .filter(|rule| rule.contains(&format!("inode {inode},")))
        .collect();
    assert!(
        served.len() == 1 && served[0].starts_with("registered:") && served[0].contains(hidden),
        "{served:?}"
    );
    let first = pod.probe(&["tcp", &allowed.addr.to_string()]);
    assert_eq!(
        first["ok"], true,
        "the pod's first connection is captured and allowed: {first}"
    );
    assert_eq!(allowed.peers().len(), 1);
}

#[test]
fn pod_clients_reach_an_allowed_mock_through_the_gateway() {
    let mut env = TestEnv::kube("pod");
    // The pod's policy is declared before the pod exists.
    let (rel, cg, port) =
        pod_allowed_one_port(&mut env, "0b4f2a4e-6d1c-4c8e-9a57-3f2e1d0c9b8a", "pod-a");
    let _d = env.start();
    // A new pod, created while the daemon runs: namespace, registration (as the runtime's
    // network plugin would), then the workload's first connection.
    let pod = Pod::new(&env, "a", cg);
    let allowed = Mock::start_in(&pod.netns, &format!("127.0.0.1:{port}"));
    let denied = Mock::start_in(&pod.netns, "127.0.0.1:0");
    register(&env, &pod);

    let first = pod.probe(&["tcp", &allowed.addr.to_string()]);
    assert_eq!(
        first["ok"], true,
        "the pod's first connection is captured and allowed: {first}"
    );
    assert_eq!(
        first["peer"],
        allowed.addr.to_string(),
        "getpeername shows the original destination"
    );
    let url = format!("http://{}/", allowed.addr);
    let curl = pod.run("curl", &["-sS", "--max-time", "5", &url]);
    assert!(
        String::from_utf8_lossy(&curl.stdout).contains("mock"),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let py = pod.run(
        "python3",
        &[
            "-c",
            &format!(
                "import urllib.request;print(urllib.request.urlopen('{url}').read().decode())"
            ),
        ],
    );
    assert!(
        String::from_utf8_lossy(&py.stdout).contains("mock"),
        "python: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(allowed.peers().len(), 3);
    assert!(
        allowed
            .peers()
            .iter()
            .all(|p| p.ip().to_string() == "127.0.0.2"),
        "the upstream saw the gateway (dialing from inside the pod's namespace): {:?}",
        allowed.peers()
    );

    let refused = pod.probe(&["tcp", &denied.addr.to_string()]);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(denied.peers().is_empty());
    let rec = env.wait_record("the pod's denial", |r| r["reason"] == "no_rule_matched");
    assert_eq!(
        rec["workload"]["cgroup"],
        format!("{}/{rel}", env.root_rel())
    );
    // 10: the ways around the capture, tried from inside the pod's own namespace: each fails
    // (the gateway's reset after its decision, or EPERM in the kernel), nothing reaches the
    // pod's own listener, and each leaves a record naming the pod's cgroup.
    let pod_cgroup = format!("{}/{rel}", env.root_rel());
    let denials = || {
        env.records()
            .iter()
            .filter(|r| r["decision"] == "deny" && r["workload"]["cgroup"] == pod_cgroup.as_str())
            .count()
    };
    let before = denials();
    let target = denied.addr.to_string();
    let mapped = format!("[::ffff:127.0.0.1]:{}", denied.addr.port());
    let attempts: [(&str, &str, i32); 7] = [
        ("tcp", &mapped, libc::ECONNRESET),
        ("tfo", &target, libc::ECONNRESET),
        ("uring", &target, libc::ECONNRESET),
        ("tcp-mark", &target, libc::ECONNRESET),
        ("udp", &target, libc::EPERM),
        ("udp-connect", &target, libc::EPERM),
        ("raw", "", libc::EPERM),
    ];
    for (mode, target, errno) in attempts {
        let args: Vec<&str> = [mode, target]
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        let p = pod.probe(&args);
        assert_eq!(p["ok"], false, "{mode} in the pod: {p}");
        assert_eq!(p["errno"], errno, "{mode} in the pod: {p}");
    }
    assert!(
        denied.peers().is_empty(),
        "nothing reached the pod's listener"
    );
    tollgate_tests::wait_for(10, "a record per attempt in the pod", || {
        (denials() >= before + attempts.len()).then_some(())
    });
    let allow = env.wait_record("the pod's allow", |r| {
        r["decision"] == "allow" && r["layer"] == "connect"
    });
    assert_eq!(allow["dst"]["orig_ip"], "127.0.0.1");

    // Positive control: the same mock is not reachable from the host's namespace at all (the
    // pod's 127.0.0.1 is its own), so the gateway really dialed inside the pod.
    let host = env.probe(None, &["tcp", &allowed.addr.to_string()]);
    assert!(
        host["ok"] == false
            || !host["reply"]
                .as_str()
                .unwrap_or("")
                .contains(&allowed.addr.to_string()),
        "{host}"
    );
}

#[test]
fn two_pods_with_the_same_source_port_never_get_each_others_origin() {
    let mut env = TestEnv::kube("samesport");
    let rel_a = containerd_cgroup("11111111-2222-3333-4444-555555555555", CONTAINER_A);
    let rel_b = containerd_cgroup("66666666-7777-8888-9999-000000000000", CONTAINER_B);
    let cg_a = env.workload(&rel_a);
    let cg_b = env.workload(&rel_b);
    let port = tollgate_tests::free_port();
    env.allow(
        "pod-a",
        &rel_a,
        &[format!("127.0.0.1:{port}").parse().expect("addr")],
    );
    let _d = env.start();
    let pod_a = Pod::new(&env, "a", cg_a);
    let pod_b = Pod::new(&env, "b", cg_b);
    let mock_a = Mock::start_in(&pod_a.netns, &format!("127.0.0.1:{port}"));
    // Pod B's mock listens on the same port number in its own namespace.
    let mock_b = Mock::start_in(&pod_b.netns, &format!("127.0.0.1:{port}"));
    register(&env, &pod_a);
    register(&env, &pod_b);
    let src = format!("127.0.0.1:{}", tollgate_tests::free_port());
    let target = mock_a.addr.to_string();
    // Both at once, from the same source address and port, each in its own namespace.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| pod_a.probe(&["tcp", &target, &src]));
        let b = s.spawn(|| pod_b.probe(&["tcp", &target, &src]));
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert_eq!(a["ok"], true, "pod A is allowed: {a}");
    assert_eq!(a["local"], src);
    assert_eq!(b["ok"], false, "pod B has no policy: {b}");
    assert_eq!(mock_a.peers().len(), 1);
    assert!(
        mock_b.peers().is_empty(),
        "pod B's connection was never forwarded"
    );
    let recs = wait_for(10, "both decisions", || {
        let r: Vec<_> = env
            .records()
            .into_iter()
            .filter(|r| r["layer"] == "connect")
            .collect();
        (r.len() >= 2).then_some(r)
    });
    let of = |rel: &str| {
        recs.iter()
            .find(|r| r["workload"]["cgroup"] == format!("{}/{rel}", env.root_rel()))
            .cloned()
            .expect("record")
    };
    assert_eq!(of(&rel_a)["decision"], "allow");
    assert_eq!(of(&rel_b)["decision"], "deny");
    assert_eq!(of(&rel_b)["reason"], "no_policy_for_workload");
}

#[test]
fn an_unregistered_pod_is_discovered_and_host_workloads_keep_working() {
    let mut env = TestEnv::kube("discover");
    let rel = containerd_cgroup("abcdefab-1234-5678-9abc-def012345678", CONTAINER_A);
    let cg = env.workload(&rel);
    let host_cg = env.workload("host-agent.service");
    let host_mock = Mock::start("127.0.0.1:0");
    env.allow("host-agent", "host-agent.service", &[host_mock.addr]);
    // Selected by a short container id (12 digits), as `docker ps` shows it.
    let port = tollgate_tests::free_port();
    env.allow_by(
        "pod-c",
        &format!("{{ container_id: {} }}", &CONTAINER_A[..12]),
        &[format!("127.0.0.1:{port}").parse().expect("addr")],
    );
    let _d = env.start();
    let pod = Pod::new(&env, "c", cg.clone());
    let mock = Mock::start_in(&pod.netns, &format!("127.0.0.1:{port}"));
    // A long-running process of the pod, not registered by anyone: the daemon finds it.
    let mut sleeper = Command::new("nsenter");
    sleeper
        .arg(format!("--net={}", pod.netns.display()))
        .args(["--", "sleep", "30"]);
    tollgate_tests::join_before_exec(&mut sleeper, &cg);
    let mut sleeper = sleeper.spawn().expect("sleep");
    env.wait_record("the namespace's discovery", |r| {
        r["reason"] == "netns_enforced"
            && r["rule"].as_str().unwrap_or("").starts_with("discovered")
    });
    let p = pod.probe(&["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], true, "{p}");
    assert!(mock
        .peers()
        .iter()
        .all(|a| a.ip().to_string() == "127.0.0.2"));
    let h = env.probe(Some(&host_cg), &["tcp", &host_mock.addr.to_string()]);
    assert_eq!(
        h["ok"], true,
        "a host-namespace workload in the same root still works: {h}"
    );
    assert!(host_mock
        .peers()
        .iter()
        .all(|a| a.ip().to_string() == "127.0.0.2"));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Each of `ips` added to the loopback of `pod`'s own network namespace, with a mock listening
/// there on `port`: addresses that exist nowhere else, so a dial to one stays in the namespace
/// the test made, and its mock sees it.
fn loopback_mocks<'a>(
    pod: &Pod,
    ips: &[&'a str],
    port: u16,
) -> std::collections::BTreeMap<&'a str, Mock> {
    let mut mocks = std::collections::BTreeMap::new();
    for &ip in ips {
        let ok = Command::new("ip")
            .args([
                "-n",
                &pod.name,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "lo",
            ])
            .status()
            .expect("ip addr")
            .success();
        assert!(ok, "add {ip} to the pod's loopback");
        mocks.insert(ip, Mock::start_in(&pod.netns, &format!("{ip}:{port}")));
    }
    mocks
}

/// `/etc/hosts` replaced for this test's mount namespace (the suite runs in a private one),
/// put back when dropped.
struct HostsFile;

impl HostsFile {
    fn bind(env: &TestEnv, entries: &str) -> Self {
        let path = env.dir.join("hosts");
        std::fs::write(&path, format!("127.0.0.1 localhost\n{entries}")).expect("hosts");
        let ok = Command::new("mount")
            .args(["--bind"])
            .arg(&path)
            .arg("/etc/hosts")
            .status()
            .expect("mount")
            .success();
        assert!(ok, "bind-mount a test /etc/hosts");
        Self
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("/etc/hosts").status();
    }
}

/// THREATS 19 for private, link-local and metadata addresses: names that the system resolver
/// (a test `/etc/hosts`, not the test override) maps to 169.254.169.254, 10.254.1.1 and
/// 172.31.254.1 are refused at dial time (403 `upstream_internal_address`) unless the rule
/// says `allow_private`. The addresses exist only inside a pod's own network namespace, on its
/// loopback, each with a listener: were a dial made, it would stay inside the namespace the
/// test made, and the listener would see it.
#[test]
fn private_link_local_and_metadata_addresses_are_dialed_only_where_a_rule_allows_them() {
    let mut env = TestEnv::kube("podinternal");
    let uid = "5d1e7c3a-2b4f-4e6a-8c9d-0a1b2c3d4e5f";
    let rel = containerd_cgroup(uid, CONTAINER_A);
    let cg = env.workload(&rel);
    let pod = Pod::new(&env, "a", cg);
    let port = tollgate_tests::free_port();
    let names = [
        ("metadata.example", "169.254.169.254", false),
        ("private.example", "10.254.1.1", false),
        ("vpc.example", "172.31.254.1", false),
        ("allowed-private.example", "10.254.1.1", true),
    ];
    let mut ips: Vec<&str> = names.iter().map(|(_, ip, _)| *ip).collect();
    ips.sort_unstable();
    ips.dedup();
    let mocks = loopback_mocks(&pod, &ips, port);
    let _hosts = HostsFile::bind(
        &env,
        &names
            .iter()
            .map(|(name, ip, _)| format!("{ip} {name}\n"))
            .collect::<String>(),
    );
    let rules: String = names
        .iter()
        .map(|(name, _, allow)| {
            format!(
                "    - name: {}\n      match: {{ host: {name}, port: 80 }}\n      upstream: {{ port: {port} }}\n      tls: none\n      allow_private: {allow}\n",
                name.split('.').next().expect("label")
            )
        })
        .collect();
    std::fs::write(
        env.policies.join("pod.yaml"),
        format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: pod }}\nspec:\n  workload: {{ cgroup: {}/{rel} }}\n  egress:\n{rules}",
            env.root_rel()
        ),
    )
    .expect("policy");
    let _d = env.start();
    register(&env, &pod);
    let pod_cgroup = format!("{}/{rel}", env.root_rel());
    let get = |name: &str| {
        let out = pod.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "--resolve",
                &format!("{name}:80:127.0.0.9"),
                "-w",
                "\n%{http_code}",
                &format!("http://{name}/latest/meta-data/"),
            ],
        );
        env.keep_client_output(&out.stdout);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (name, ip, allow) in names.iter().filter(|(_, _, allow)| !allow) {
        let out = get(name);
        assert!(
            out.ends_with("403") && out.contains("upstream_internal_address"),
            "{name} ({ip}, allow_private {allow}): {out}"
        );
        env.wait_record(&format!("the refusal for {name}"), |r| {
            r["reason"] == "upstream_internal_address"
                && r["decision"] == "deny"
                && r["dst"]["host"] == *name
                && r["workload"]["cgroup"] == pod_cgroup.as_str()
        });
    }
    for (ip, mock) in &mocks {
        assert!(mock.peers().is_empty(), "nothing reached {ip}");
    }
    // Positive control: where the rule allows internal addresses, the same kind of name is
    // dialed, from the pod's namespace, and reaches the listener there.
    let out = get("allowed-private.example");
    assert!(out.ends_with("200") && out.contains("mock "), "{out}");
    assert_eq!(
        mocks["10.254.1.1"].peers().len(),
        1,
        "the allowed dial arrived"
    );
}

/// Monitor mode lets a connection its policy would deny through, dialed by the gateway: but
/// never to a link-local or metadata address, where instance credentials live. From a pod in
/// monitor mode, a connection to 169.254.169.254 is refused (`monitor_link_local_refused`)
/// and nothing reaches the listener there, while one to 10.254.1.1, which the policy also
/// does not name, goes through as `would_deny`. Both addresses exist only on the loopback of
/// the pod's own network namespace.
#[test]
fn monitor_mode_never_dials_link_local_or_metadata_addresses() {
    let mut env = TestEnv::kube("podmonitor");
    let uid = "7a2c9e41-3b5d-4f6e-8a1b-2c3d4e5f6a7b";
    let rel = containerd_cgroup(uid, CONTAINER_A);
    let cg = env.workload(&rel);
    let pod = Pod::new(&env, "m", cg);
    let port = tollgate_tests::free_port();
    let mocks = loopback_mocks(&pod, &["169.254.169.254", "10.254.1.1"], port);
    std::fs::write(
        env.policies.join("pod.yaml"),
        format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: watched }}\nspec:\n  workload: {{ cgroup: {}/{rel} }}\n  mode: monitor\n  egress:\n    - name: elsewhere\n      match: {{ cidr: 127.0.0.77/32, port: {port} }}\n",
            env.root_rel()
        ),
    )
    .expect("policy");
    let _d = env.start();
    register(&env, &pod);
    let pod_cgroup = format!("{}/{rel}", env.root_rel());
    let get = |ip: &str| {
        let out = pod.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://{ip}:{port}/latest/meta-data/"),
            ],
        );
        env.keep_client_output(&out.stdout);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metadata = get("169.254.169.254");
    assert!(!metadata.contains("mock "), "{metadata}");
    env.wait_record("the metadata connection refused", |r| {
        r["reason"] == "monitor_link_local_refused"
            && r["decision"] == "deny"
            && r["policy"] == "watched"
            && r["dst"]["orig_ip"] == "169.254.169.254"
            && r["workload"]["cgroup"] == pod_cgroup.as_str()
    });
    assert!(
        mocks["169.254.169.254"].peers().is_empty(),
        "nothing reached the metadata address"
    );
    // Positive control: monitor mode lets the private address through, audited would_deny.
    let private = get("10.254.1.1");
    assert!(
        private.ends_with("200") && private.contains("mock "),
        "{private}"
    );
    assert_eq!(
        mocks["10.254.1.1"].peers().len(),
        1,
        "the monitored dial arrived"
    );
    env.wait_record("the private connection let through", |r| {
        r["decision"] == "would_deny"
            && r["dst"]["orig_ip"] == "10.254.1.1"
            && r["workload"]["cgroup"] == pod_cgroup.as_str()
    });
}
