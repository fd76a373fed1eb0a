//! Policy decision time on a fleet-sized set: 1,000 policy files of 10 egress rules each,
//! written to a scratch directory and loaded with `PolicySet::load_dir`, so what is measured
//! is the compiled set the daemon holds.
//!
//! `cargo bench -p gateway-user --bench policy_decision`; `cargo xtask bench` puts the medians
//! in target/bench/report.md. The group and benchmark names are read back by xtask
//! (`POLICY_BENCHES` there): rename both together.
use std::{
    hint::black_box,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
use gateway_user::{
    cgroup::CgroupPath,
    policy::{Decision, Model, PolicySet, RequestDecision, WorkloadView},
};

const POLICIES: usize = 1_000;
/// The workload every decision is made for: its policy is file 993 of 1,000 (a cgroup selector
/// narrowed by uid, sharing its cgroup with the other uids of its team).
const LATE: usize = 992;

/// Deterministic, well-spread bits for ids (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn container_id(i: usize) -> String {
    (0..4u64)
        .map(|k| format!("{:016x}", mix(i as u64 * 4 + k)))
        .collect()
}

fn team(i: usize) -> usize {
    i / 40
}

/// Who policy `i` is for. Five kinds, in turn: a container (full id or a 12-digit prefix),
/// a systemd service, a shared runner cgroup narrowed by uid, a Kubernetes pod's cgroup, and a
/// service narrowed by exe.
fn workload(i: usize) -> String {
    match i % 5 {
        0 if i % 10 == 5 => format!("{{ container_id: {} }}", &container_id(i)[..12]),
        0 => format!("{{ container_id: {} }}", container_id(i)),
        1 => format!("{{ cgroup: /system.slice/svc-{i:04}.service }}"),
        2 => format!(
            "{{ cgroup: /tollgate.slice/team-{:02}.slice/runner.service, uid: {} }}",
            team(i),
            20_000 + i
        ),
        3 => format!(
            "{{ cgroup: /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{:08x}_{:04x}.slice }}",
            mix(i as u64) >> 32,
            i
        ),
        _ => format!(
            "{{ cgroup: /system.slice/worker-{i:04}.service, exe: /opt/worker-{i:04}/bin/worker }}"
        ),
    }
}

/// Policy `i`: three L4 rules (IPv4 and IPv6 CIDRs) and seven host rules mixing exact names,
/// `*.` wildcards, passthrough, exact, prefix (`/*`) and one-segment (`/*/`) paths, required
/// and forbidden headers. The last rule is the one a partner API request matches.
fn policy_yaml(i: usize) -> String {
    let (a, b) = (i / 250, i % 250);
    let t = team(i);
    format!(
        r#"# Generated for the policy decision benchmark.
apiVersion: tollgate/v1
kind: EgressPolicy
metadata: {{ name: wl-{i:04} }}
spec:
  workload: {workload}
  mode: {mode}
  egress:
    - name: postgres
      match: {{ cidr: 10.{a}.{b}.0/24, port: 5432 }}
    - name: openai
      match: {{ host: api.openai.com, port: 443 }}
      upstream: {{ port: 443 }}
      tls: originate
      http:
        - methods: [POST]
          paths: [/v1/chat/completions, /v1/responses, /v1/embeddings]
        - methods: [GET]
          paths: [/v1/models, /v1/models/*]
      credential: openai-team-{t:02}
    - name: anthropic
      match: {{ host: api.anthropic.com, port: 443 }}
      tls: originate
      http:
        - methods: [POST]
          paths: [/v1/messages, /v1/messages/count_tokens]
          require_headers: {{ anthropic-version: "*" }}
      credential: anthropic-team-{t:02}
    - name: inventory
      match: {{ host: inventory-{i:04}.apps.svc.cluster.local, port: 8080 }}
      tls: none
      allow_private: true
      http:
        - methods: [GET, HEAD]
          paths: [/v1/items, /v1/items/*, /v1/items/*/history]
        - methods: [PUT]
          paths: [/v1/items/*]
          forbid_headers: [x-debug-impersonate]
    - name: redis
      match: {{ cidr: "fd00:{i:x}::/64", port: 6379 }}
    - name: objects
      match: {{ host: "*.s3.eu-west-1.amazonaws.com", port: 443 }}
      tls: originate
      http:
        - methods: [GET, PUT, HEAD]
          paths: [/tenant-{i:04}/*]
      credential: s3-team-{t:02}
    - name: github
      match: {{ host: api.github.com, port: 443 }}
      tls: originate
      http:
        - methods: [GET]
          paths: [/repos/org-{t:02}/*]
        - methods: [POST]
          paths: [/repos/org-{t:02}/*/issues, /repos/org-{t:02}/*/pulls]
      credential: github-team-{t:02}
    - name: blobs
      match: {{ host: "*.blob.core.windows.net", port: 443 }}
      tls: passthrough
    - name: kafka
      match: {{ cidr: 10.{k}.{b}.0/28, port: 9092 }}
    - name: partner
      match: {{ host: "*.partner-{i:04}.example", port: 443 }}
      upstream: {{ port: 8443 }}
      tls: originate
      http:
        - methods: [GET]
          paths: [/v2/reports, /v2/reports/*/rows, /v2/reports/*/rows/*]
        - methods: [POST]
          paths: [/v2/jobs, /v2/jobs/*/cancel]
          require_headers: {{ x-tenant: t-{i:04} }}
          forbid_headers: [x-partner-admin]
        - methods: [GET]
          paths: [/v2/files/*]
      credential: partner-{i:04}
"#,
        workload = workload(i),
        mode = if i % 50 == 49 { "monitor" } else { "enforce" },
        k = 100 + a,
    )
}

/// A scratch directory holding the generated files, removed on drop.
struct PolicyDir(PathBuf);

impl PolicyDir {
    fn write() -> Self {
        let dir =
            std::env::temp_dir().join(format!("tollgate-policy-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("policy dir");
        for i in 0..POLICIES {
            std::fs::write(dir.join(format!("{i:04}-wl.yaml")), policy_yaml(i)).expect("policy");
        }
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(dir: &Path) -> PolicySet {
    PolicySet::load_dir(dir).unwrap_or_else(|e| panic!("the generated policies compile: {e:?}"))
}

/// The late workload's cgroup; it runs as the uid its policy narrows to.
fn late_cgroup() -> CgroupPath {
    CgroupPath::parse(&format!(
        "/tollgate.slice/team-{:02}.slice/runner.service",
        team(LATE)
    ))
    .expect("cgroup")
}

fn late_view(cgroup: &CgroupPath) -> WorkloadView<'_> {
    WorkloadView {
        cgroup,
        container_id: None,
        pod_uid: None,
        exe: Some(Path::new("/usr/bin/python3")),
        uid: u32::try_from(20_000 + LATE).expect("uid"),
    }
}

/// What an SDK sends along with a call.
fn request_headers() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (name, value) in [
        ("host", format!("eu.partner-{LATE:04}.example")),
        ("accept-encoding", "gzip, deflate".to_owned()),
        ("accept", "application/json".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("content-length", "412".to_owned()),
        (
            "x-request-id",
            "0d9c7d0e-2a51-4c57-9b1e-5f0b3f3c2a11".to_owned(),
        ),
        ("x-tenant", format!("t-{LATE:04}")),
    ] {
        h.insert(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_str(&value).expect("header value"),
        );
    }
    h
}

fn decisions(c: &mut Criterion) {
    let dir = PolicyDir::write();
    let set = load(dir.path());
    assert_eq!(set.len(), POLICIES);
    let cgroup = late_cgroup();
    let w = late_view(&cgroup);
    let selected = set.select(&w).expect("the late workload has a policy");
    assert_eq!(&*selected.name, format!("wl-{LATE:04}"));
    assert_eq!(selected.rules.len(), 10);
    // The same policy alone: what the rules cost without choosing among 1,000.
    let alone = PolicySet::from_policies(vec![selected.clone()]).expect("one policy");
    let headers = request_headers();
    let none = http::HeaderMap::new();
    let partner = format!("eu.partner-{LATE:04}.example");
    let path = gateway_user::normalize::path("/v2/jobs/7f3a9c/cancel").expect("path");

    // Each case is checked once, so a change to the engine cannot make the benchmark measure
    // an early exit instead.
    match set.evaluate_request(
        &w,
        443,
        &partner,
        "POST",
        &path,
        &headers,
        &none,
        Model::Unread,
    ) {
        RequestDecision::Allow { rule, .. } => assert_eq!(&*rule, "partner"),
        other => panic!("the partner request is allowed by the last rule: {other:?}"),
    }
    match set.evaluate_request(
        &w,
        443,
        "uploads.filedrop.example",
        "POST",
        "/upload",
        &headers,
        &none,
        Model::Unread,
    ) {
        RequestDecision::Deny {
            rule: None, reason, ..
        } => assert_eq!(reason, "host_not_allowed"),
        other => panic!("an unlisted host is denied after every rule: {other:?}"),
    }
    let kafka: SocketAddr = format!("10.{}.{}.5:9092", 100 + LATE / 250, LATE % 250)
        .parse()
        .expect("addr");
    assert_eq!(
        set.evaluate(&w, kafka),
        Decision::Allow {
            policy: format!("wl-{LATE:04}").into(),
            rule: "kafka".into(),
            idle: gateway_user::policy::IdleTimeout::Gateway,
        }
    );
    let sni = format!("tenant{LATE}.blob.core.windows.net");
    match set.evaluate_sni(&w, 443, &sni) {
        RequestDecision::Allow { rule, .. } => assert_eq!(&*rule, "blobs"),
        other => panic!("the blob SNI is allowed by the passthrough rule: {other:?}"),
    }

    let mut g = c.benchmark_group("select");
    g.bench_function("late_policy", |b| {
        b.iter(|| set.select(black_box(&w)).is_some());
    });
    g.finish();

    let mut g = c.benchmark_group("evaluate_request");
    g.bench_function("allow_last_rule", |b| {
        b.iter(|| {
            set.evaluate_request(
                black_box(&w),
                443,
                black_box(&partner),
                "POST",
                black_box(&path),
                black_box(&headers),
                black_box(&none),
                Model::Unread,
            )
        });
    });
    g.bench_function("deny_no_rule", |b| {
        b.iter(|| {
            set.evaluate_request(
                black_box(&w),
                443,
                black_box("uploads.filedrop.example"),
                "POST",
                black_box("/upload"),
                black_box(&headers),
                black_box(&none),
                Model::Unread,
            )
        });
    });
    g.bench_function("allow_last_rule_1_policy", |b| {
        b.iter(|| {
            alone.evaluate_request(
                black_box(&w),
                443,
                black_box(&partner),
                "POST",
                black_box(&path),
                black_box(&headers),
                black_box(&none),
                Model::Unread,
            )
        });
    });
    g.finish();

    let mut g = c.benchmark_group("evaluate");
    g.bench_function("ip_allow", |b| {
        b.iter(|| set.evaluate(black_box(&w), black_box(kafka)));
    });
    g.finish();

    let mut g = c.benchmark_group("evaluate_sni");
    g.bench_function("passthrough_allow", |b| {
        b.iter(|| set.evaluate_sni(black_box(&w), 443, black_box(&sni)));
    });
    g.finish();
}

fn compile(c: &mut Criterion) {
    let dir = PolicyDir::write();
    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.bench_function("load_dir_1000", |b| b.iter(|| load(black_box(dir.path()))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = decisions, compile
}
criterion_main!(benches);
