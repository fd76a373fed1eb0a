//! `cargo xtask bench`: measures what capture costs, against a baseline run in the same
//! process on the same machine, and writes a Markdown report.
//!
//! - connect(): the same client connecting to the same plain loopback listener, from outside
//!   the enforced root (baseline: no programs) and from inside it (programs attached: the origin
//!   is recorded and the connect redirected to the gateway's listener); interleaved rounds,
//!   percentiles of the connect() call itself, with a pause between connects so the gateway's
//!   work on the other CPU stays out of the timed calls.
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

use gateway_common::ORIGIN_SLOTS;
use serde_json::{json, Value};
use tollgate_tests::{join_before_exec, TestEnv};

const CONNECTS: usize = 4000;
const ROUNDS: usize = 7;
const GAP: Duration = Duration::from_micros(150);

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Child mode: `connect-loop ADDR N` — N connects, timing only the connect() call.
fn connect_loop(addr: SocketAddr, n: usize, reset: bool) -> Value {
    pin(0, CLIENT_CPU);
    let mut ns = Vec::with_capacity(n);
    let (ss, len) = gateway_user::netns::socket_addr(addr);
    let mut failures = 0;
    for _ in 0..n {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // Close with a reset: no TIME_WAIT left behind, so the kernel's source-port search
        // costs the same in every round.
        let linger = libc::linger {
            l_onoff: i32::from(reset),
            l_linger: 0,
        };
        // SAFETY: valid option buffer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
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
        // Let the gateway finish this connection on the other CPU before the next connect,
        // so its work does not land inside the next timed call (both loops wait the same).
        let pause = Instant::now();
        while pause.elapsed() < GAP {
            std::hint::spin_loop();
        }
    }
    ns.sort_unstable();
    json!({ "n": ns.len(), "failures": failures, "p50": percentile(&ns, 0.5), "p90": percentile(&ns, 0.9), "p99": percentile(&ns, 0.99) })
}

/// Runs this binary again in child mode `args`, in `cgroup` if given; its JSON answer.
fn child(cgroup: Option<&Path>, args: &[&str]) -> Value {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args(args);
    if let Some(cg) = cgroup {
        join_before_exec(&mut cmd, cg);
    }
    let out = cmd.output().expect("child");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn run_loop(cgroup: Option<&Path>, addr: SocketAddr, n: usize, reset: bool) -> Value {
    let (addr, n) = (addr.to_string(), n.to_string());
    let close = if reset { "reset" } else { "fin" };
    child(cgroup, &["connect-loop", &addr, &n, close])
}

/// Child mode: `idle-conns ADDR N` — opens N connections, sends one request on each (a cheap
/// 403 that keeps the connection alive), prints `ready` and holds them until stdin closes.
fn idle_conns(target: SocketAddr, n: usize) {
    use std::io::{Read, Write};
    gateway_user::daemon::raise_fd_limit();
    let mut held = Vec::with_capacity(n);
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        let Ok(mut s) = std::net::TcpStream::connect(target) else {
            break;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if s.write_all(b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
            || !matches!(s.read(&mut buf), Ok(k) if k > 0)
        {
            break;
        }
        held.push(s);
    }
    println!("ready {}", held.len());
    let _ = std::io::stdout().flush();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// A plain listener that accepts and closes.
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        pin(0, SERVER_CPU);
        for s in l.incoming() {
            drop(s);
        }
    });
    addr
}

/// The connect() measurement puts the client on one CPU and every listener (the plain one and
/// all the gateway's threads) on the other, so each connect wakes its listener the same way.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// Pins task `tid` (0: the calling thread) to `cpu` (`None`: every CPU), if the machine has it.
fn pin(tid: i32, cpu: impl Into<Option<usize>>) {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let cpu = cpu.into();
    if cpus <= cpu.unwrap_or(0) {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in (0..cpus).filter(|c| cpu.is_none_or(|only| only == *c)) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins every thread of process `pid` to `cpu` (`None`: every CPU).
fn pin_process(pid: i32, cpu: Option<usize>) {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) {
                pin(tid, cpu);
            }
        }
    }
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
    if args.first().map(String::as_str) == Some("http-load") {
        let target: SocketAddr = args[1].parse().expect("target");
        let rate: u64 = args[3].parse().expect("rate");
        let secs: u64 = args[4].parse().expect("secs");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        let keepalive = args.get(5).map(String::as_str) == Some("keepalive");
        let (lat, errors) = rt.block_on(tollgate_tests::httpbench::open_loop(
            target, &args[2], rate, secs, keepalive,
        ));
        use tollgate_tests::httpbench::pct;
        println!(
            "{}",
            json!({ "n": lat.len(), "errors": errors, "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99), "p999": pct(&lat, 0.999) })
        );
        return;
    }
    if args.first().map(String::as_str) == Some("idle-conns") {
        let target: SocketAddr = args[1].parse().expect("target");
        let n: usize = args[2].parse().expect("n");
        idle_conns(target, n);
        return;
    }
    if args.first().map(String::as_str) == Some("connect-loop") {
        let addr = args[1].parse().expect("addr");
        let n = args[2].parse().expect("n");
        println!(
            "{}",
            connect_loop(addr, n, args.get(3).map(String::as_str) == Some("reset"))
        );
        return;
    }
    let out_dir = Path::new(args.first().map_or("target/bench", String::as_str)).to_owned();
    let only = args.get(1).map(String::as_str);
    if only.is_some_and(|o| o != "capture" && o != "http") {
        eprintln!("tg-bench: unknown part {only:?}: use `capture` or `http`");
        std::process::exit(2);
    }
    std::fs::create_dir_all(&out_dir).expect("report dir");

    let mut env = TestEnv::new("bench");
    let app = env.workload("bench.service");
    let target = sink();
    // The HTTP part: a mock API (plain for the direct baseline, TLS behind the gateway and
    // nginx), a credential, and a host rule on an address-literal host (release builds have no
    // resolver override).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    let (plain, tls, ca) = tollgate_tests::httpbench::start_upstream(&rt, &["127.0.0.1"]);
    let api_port = tollgate_tests::free_port();
    std::fs::write(env.dir.join("ca.pem"), ca).expect("ca");
    for (name, text) in [
        ("bench.key", "sk-bench-0123456789abcdef".to_owned()),
        (
            "credentials.yaml",
            "bindings:\n  - name: bench-key\n    hosts: [127.0.0.1]\n    inject: { header: Authorization, format: \"Bearer {secret}\" }\n    source: { file: bench.key }\n".to_owned(),
        ),
    ] {
        std::fs::write(env.dir.join(name), text).expect("write");
        std::fs::set_permissions(env.dir.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    }
    env.write_config(&format!(
        "credentials: {}\nupstream_ca: {}\n",
        env.dir.join("credentials.yaml").display(),
        env.dir.join("ca.pem").display()
    ));
    std::fs::write(
        env.policies.join("bench.yaml"),
        format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: bench }}\nspec:\n  workload: {{ cgroup: {}/bench.service }}\n  egress:\n    - name: sink\n      match: {{ cidr: 127.0.0.1/32, port: {} }}\n    - name: api\n      match: {{ host: 127.0.0.1, port: {api_port} }}\n      upstream: {{ port: {} }}\n      tls: originate\n      allow_private: true\n      http:\n        - methods: [POST]\n          paths: [/v1/chat/completions]\n      credential: bench-key\n",
            env.root_rel(),
            target.port(),
            tls.port()
        ),
    )
    .expect("policy");
    let daemon = env.start();
    let mut md = String::new();
    if only != Some("http") {
        md.push_str(&capture_section(&env, &app, &daemon, target));
    }
    if only != Some("capture") {
        md.push_str(&http_section(&env, &app, &daemon, plain, tls, api_port));
    }
    let path = out_dir.join("report.md");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(md.as_bytes()))
        .expect("write report");
    print!("{md}");
    eprintln!("report: {}", path.display());
}

/// connect() against the baseline, the programs' own run time, accept-to-decision, exe hash.
fn capture_section(
    env: &TestEnv,
    app: &Path,
    daemon: &tollgate_tests::Daemon,
    target: SocketAddr,
) -> String {
    pin_process(daemon.pid(), Some(SERVER_CPU));
    // Keep the listeners' CPU out of idle (a halted virtual CPU is slow to wake, and how often
    // each listener finds its CPU halted would otherwise decide the comparison): a spinner
    // that yields to anything else.
    let spinning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let spinner = {
        let spinning = spinning.clone();
        std::thread::spawn(move || {
            pin(0, SERVER_CPU);
            // SAFETY: plain sched_setscheduler(2) on the calling thread.
            unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
            while spinning.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    // The baseline client runs in a sibling of the enforced root: same depth, no programs.
    let outside =
        tollgate_tests::Cgroup::create(env.mount.join(format!("{}-baseline.scope", env.name)));
    let outside = Some(outside.path.as_path());
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");

    // Warm up both paths (the enforced one until the origin map has reused every slot at
    // least once: the steady state of a busy host), then interleave rounds.
    // Its own plain listener: the gateway's upstream connections (and their TIME_WAITs) go to
    // `target`, never to this one.
    let plain = sink();
    let _ = run_loop(outside, plain, CONNECTS, true);
    let _ = run_loop(Some(app), target, ORIGIN_SLOTS as usize + CONNECTS, true);
    let (mut base, mut enforced) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(run_loop(outside, plain, CONNECTS, true));
        enforced.push(run_loop(Some(app), target, CONNECTS, true));
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
    spinning.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = spinner.join();
    pin_process(daemon.pid(), None);

    // Accept-to-decision in the gateway, on connections closed normally (a reset can reach the
    // gateway before it looked the client socket up, which it then refuses).
    let _ = run_loop(Some(app), target, CONNECTS, false);
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

    let mut md = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    md.push_str(&format!(
        "# Tollgate capture benchmark\n\nKernel {}, {cpus} CPUs. {ROUNDS} interleaved rounds of {CONNECTS} connects each; medians of the rounds' percentiles. Failures: {failures}.\n\n",
        kernel.trim()
    ));
    md.push_str(
        "## connect() on loopback\n\n| | p50 µs | p90 µs | p99 µs |\n|---|---:|---:|---:|\n",
    );
    for (label, v) in [
        (
            "baseline: to a plain listener, outside the root (no programs)",
            &base,
        ),
        (
            "enforced: the same connect inside the root (programs attached, redirected to the gateway)",
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
    let enforced_connects = programs
        .iter()
        .find(|(name, _, _)| name == "tg_connect4")
        .map_or(1, |(_, runs, _)| (*runs).max(1));
    md.push_str(&format!(
        "\nAll programs together, per enforced connection (socket, connect, every egress packet until close): {} ns.\n\n",
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
    md
}

fn http_load(
    cgroup: Option<&Path>,
    target: SocketAddr,
    rate: u64,
    secs: u64,
    keepalive: bool,
) -> Value {
    let (target, rate, secs) = (target.to_string(), rate.to_string(), secs.to_string());
    let mode = if keepalive { "keepalive" } else { "close" };
    child(
        cgroup,
        &["http-load", &target, "127.0.0.1", &rate, &secs, mode],
    )
}

fn rss_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// nginx (Debian's) as a plain reverse proxy to the same TLS upstream, if installed.
fn start_nginx(dir: &Path, port: u16, tls: SocketAddr) -> Option<std::process::Child> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir};\n  upstream api {{ server {tls}; keepalive 64; }}\n  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass https://api;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )
    .ok()?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .spawn()
        .ok()?;
    tollgate_tests::wait_for(10, "nginx to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Some(child)
}

fn http_section(
    env: &TestEnv,
    app: &Path,
    daemon: &tollgate_tests::Daemon,
    plain: SocketAddr,
    tls: SocketAddr,
    api_port: u16,
) -> String {
    const SECS: u64 = 5;
    let gateway_target: SocketAddr = format!("127.0.0.1:{api_port}").parse().expect("addr");
    let nginx_port = tollgate_tests::free_port();
    let nginx_target: SocketAddr = format!("127.0.0.1:{nginx_port}").parse().expect("addr");
    let mut nginx = start_nginx(&env.dir, nginx_port, tls);
    let idle_rss = rss_kib(daemon.pid(), "VmRSS:");
    let mut md = format!(
        "## HTTP: added latency per request\n\nOpen-loop load at fixed rates ({SECS} s each), latency measured from each request's scheduled send (no coordinated omission), `POST /v1/chat/completions` with a 1 KiB JSON body. Direct: to the mock API's plain port. Tollgate: redirected from the workload's cgroup; policy, credential injection, TLS to the mock (pooled) and the audit record on. nginx (Debian): plain reverse proxy to the same TLS port, upstream keep-alive. Added = the proxy's percentile minus direct's, from runs back to back.\n"
    );
    for (keepalive, rates, what) in [
        (
            true,
            [1000, 2000, 5000],
            "kept-alive client connections (a new one opens only when all are busy)",
        ),
        (
            false,
            [500, 1000, 2000],
            "a new client connection per request",
        ),
    ] {
        md.push_str(&format!("\n### {what}\n\n| rate/s | direct p50/p99/p99.9 µs | Tollgate added p50/p99/p99.9 µs | nginx added p50/p99/p99.9 µs | errors (direct/tollgate/nginx) |\n|---:|---|---|---|---|\n"));
        for rate in rates {
            let direct = http_load(None, plain, rate, SECS, keepalive);
            let through = http_load(Some(app), gateway_target, rate, SECS, keepalive);
            let via_nginx = nginx
                .as_ref()
                .map(|_| http_load(None, nginx_target, rate, SECS, keepalive));
            let v = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
            let added = |r: &Value| {
                format!(
                    "{:+} / {:+} / {:+}",
                    v(r, "p50") as i64 - v(&direct, "p50") as i64,
                    v(r, "p99") as i64 - v(&direct, "p99") as i64,
                    v(r, "p999") as i64 - v(&direct, "p999") as i64
                )
            };
            md.push_str(&format!(
                "| {rate} | {} / {} / {} | {} | {} | {} / {} / {} |\n",
                v(&direct, "p50"),
                v(&direct, "p99"),
                v(&direct, "p999"),
                added(&through),
                via_nginx.as_ref().map_or("not installed".into(), added),
                v(&direct, "errors"),
                v(&through, "errors"),
                via_nginx
                    .as_ref()
                    .map_or("-".into(), |r| v(r, "errors").to_string()),
            ));
        }
    }
    let peak = rss_kib(daemon.pid(), "VmHWM:");
    // 10,000 idle kept-alive client connections.
    let idle = {
        use std::io::BufRead;
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.args(["idle-conns", &gateway_target.to_string(), "10000"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        join_before_exec(&mut cmd, app);
        let mut child = cmd.spawn().expect("idle-conns");
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
        let held: u64 = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_kib(daemon.pid(), "VmRSS:");
        drop(child.stdin.take());
        let _ = child.wait();
        (held, rss)
    };
    let nginx_rss: u64 = nginx.as_ref().map_or(0, |n| {
        let master = i32::try_from(n.id()).unwrap_or(0);
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        rss_kib(master, "VmRSS:")
            + children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(|p| rss_kib(p, "VmRSS:"))
                .sum::<u64>()
    });
    if let Some(n) = nginx.as_mut() {
        // SIGQUIT: the master stops its workers too (SIGKILL would orphan them).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(n.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = n.wait();
    }
    md.push_str(&format!(
        "\nGateway RSS: {:.1} MiB idle, {:.1} MiB peak under load (up to 5,000 requests/s), {:.1} MiB holding {} idle kept-alive client connections. nginx (master + workers) after the runs: {}.\n",
        idle_rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        idle.1 as f64 / 1024.0,
        idle.0,
        if nginx_rss == 0 { "not measured".into() } else { format!("{:.1} MiB", nginx_rss as f64 / 1024.0) }
    ));
    md
}
