//! `cargo xtask bench`: measures what capture costs, against a baseline run in the same
//! process on the same machine, and writes a Markdown report.
//!
//! - connect(): the same client reaching the same listener (the gateway's), from outside the
//!   enforced root by connecting to it directly (baseline: no programs), and from inside it by
//!   connecting to an upstream address (programs attached: recorded and redirected there);
//!   interleaved rounds, percentiles of the connect() call itself.
//! - the programs' own run time per invocation (BPF_ENABLE_STATS while the bench runs).
//! - accept-to-decision latency in the gateway (`decision_us` of the audit records).
//! - the exe-hash cache: hashing an executable (miss) against a cache hit.
use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tollgate_tests::{join_before_exec, TestEnv};

const CONNECTS: usize = 4000;
const ROUNDS: usize = 3;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Child mode: `connect-loop ADDR N` — N connects, timing only the connect() call.
fn connect_loop(addr: SocketAddr, n: usize) -> Value {
    let mut ns = Vec::with_capacity(n);
    let (ss, len) = gateway_user::netns::socket_addr(addr);
    let mut failures = 0;
    for _ in 0..n {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let t = Instant::now();
        // SAFETY: valid sockaddr.
        let r = unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) };
        let dt = t.elapsed();
        if r == 0 {
            ns.push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX));
        } else {
            failures += 1;
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
    }
    ns.sort_unstable();
    json!({ "n": ns.len(), "failures": failures, "p50": percentile(&ns, 0.5), "p90": percentile(&ns, 0.9), "p99": percentile(&ns, 0.99) })
}

fn run_loop(cgroup: Option<&Path>, addr: SocketAddr) -> Value {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args(["connect-loop", &addr.to_string(), &CONNECTS.to_string()]);
    if let Some(cg) = cgroup {
        join_before_exec(&mut cmd, cg);
    }
    let out = cmd.output().expect("child");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// A plain listener that accepts and closes.
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    addr
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("connect-loop") {
        let addr = args[1].parse().expect("addr");
        let n = args[2].parse().expect("n");
        println!("{}", connect_loop(addr, n));
        return;
    }
    let out_dir = Path::new(args.first().map_or("target/bench", String::as_str)).to_owned();
    std::fs::create_dir_all(&out_dir).expect("report dir");

    let mut env = TestEnv::new("bench");
    let app = env.workload("bench.service");
    let target = sink();
    env.allow("bench", "bench.service", &[target]);
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let _daemon = env.start();

    // Warm up both paths, then interleave rounds.
    let _ = run_loop(None, env.listener());
    let _ = run_loop(Some(&app), target);
    let (mut base, mut enforced) = (Vec::new(), Vec::new());
    let listener = env.listener();
    for _ in 0..ROUNDS {
        base.push(run_loop(None, listener));
        enforced.push(run_loop(Some(&app), target));
    }
    let pick =
        |v: &[Value], k: &str| median(v.iter().map(|r| r[k].as_u64().unwrap_or(0)).collect());
    let failures: u64 = enforced
        .iter()
        .chain(&base)
        .map(|r| r["failures"].as_u64().unwrap_or(0))
        .sum();

    // The programs' own run time per invocation.
    let mut programs: Vec<(String, u64, u64)> = aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| {
            let name = p.name_as_str()?.to_owned();
            (name.starts_with("tg_") && p.run_count() > 0).then(|| {
                (
                    name,
                    p.run_count(),
                    u64::try_from(p.run_time().as_nanos()).unwrap_or(0),
                )
            })
        })
        .collect();
    programs.sort();
    drop(stats);

    // Accept-to-decision in the gateway.
    std::thread::sleep(Duration::from_millis(500));
    let mut decisions: Vec<u64> = env
        .records()
        .iter()
        .filter(|r| r["layer"] == "connect" && r["decision"] == "allow")
        .filter_map(|r| r["decision_us"].as_u64())
        .collect();
    decisions.sort_unstable();

    // Exe-hash cache: miss (a fresh cache each time) and hit.
    let exe = Path::new("/proc/self/exe");
    let size = std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    for _ in 0..20 {
        let cache = gateway_user::identity::ExeHashCache::default();
        assert!(cache.hash(exe).is_some());
    }
    let miss = t.elapsed() / 20;
    let cache = gateway_user::identity::ExeHashCache::default();
    let _ = cache.hash(exe);
    let t = Instant::now();
    for _ in 0..10_000 {
        assert!(cache.hash(exe).is_some());
    }
    let hit = t.elapsed() / 10_000;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut md = String::new();
    md.push_str(&format!(
        "# Tollgate capture benchmark\n\nKernel {}, {cpus} CPUs. {ROUNDS} interleaved rounds of {CONNECTS} connects each; medians of the rounds' percentiles. Failures: {failures}.\n\n",
        kernel.trim()
    ));
    md.push_str(
        "## connect() on loopback\n\n| | p50 µs | p90 µs | p99 µs |\n|---|---:|---:|---:|\n",
    );
    for (label, v) in [
        (
            "baseline: straight to the gateway's listener, no programs",
            &base,
        ),
        (
            "enforced: to an upstream, programs attached, redirected to the same listener",
            &enforced,
        ),
    ] {
        md.push_str(&format!(
            "| {label} | {} | {} | {} |\n",
            us(pick(v, "p50")),
            us(pick(v, "p90")),
            us(pick(v, "p99"))
        ));
    }
    let d50 = pick(&enforced, "p50").saturating_sub(pick(&base, "p50"));
    let ratio = pick(&enforced, "p50") as f64 / pick(&base, "p50").max(1) as f64;
    md.push_str(&format!(
        "\nAdded at p50: {} µs (×{ratio:.2} the baseline). Goal: at most 2 µs.\n\n",
        us(d50)
    ));
    md.push_str("## The programs' own run time (BPF_ENABLE_STATS)\n\n| program | runs | ns per run |\n|---|---:|---:|\n");
    let mut total_ns = 0;
    for (name, runs, total) in &programs {
        total_ns += total;
        md.push_str(&format!("| {name} | {runs} | {} |\n", total / runs.max(&1)));
    }
    let enforced_connects = u64::try_from((ROUNDS + 1) * CONNECTS).unwrap_or(1);
    md.push_str(&format!(
        "\nAll programs together, per enforced connection (socket, connect, every sock_ops callback and every egress packet until close): {} ns.\n\n",
        total_ns / enforced_connects
    ));
    md.push_str(&format!(
        "## Gateway: accept to decision\n\n{} connections: p50 {} µs, p90 {} µs, p99 {} µs (origin lookup and cookie check, identity from /proc with exe hash, policy).\n\n",
        decisions.len(),
        percentile(&decisions, 0.5),
        percentile(&decisions, 0.9),
        percentile(&decisions, 0.99)
    ));
    md.push_str(&format!(
        "## Exe-hash cache\n\nHashing a {:.1} MiB executable (miss): {:.2} ms; cache hit (stat + lookup): {:.2} µs.\n",
        size as f64 / 1_048_576.0,
        miss.as_secs_f64() * 1000.0,
        hit.as_secs_f64() * 1e6
    ));
    let path = out_dir.join("report.md");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(md.as_bytes()))
        .expect("write report");
    print!("{md}");
    eprintln!("report: {}", path.display());
}
