//! `cargo xtask bench`: measures what capture costs, against a baseline run in the same
//! process on the same machine, and writes a Markdown report.
//!
//! - connect(): the same client connecting to the same plain loopback listener, from outside
//!   the enforced root (baseline: no root programs, only the socket guard at the cgroup2 root;
//!   also measured before the daemon started, with no programs at all) and from inside it
//!   (programs attached: the origin is recorded and the connect redirected to the gateway's
//!   listener); interleaved rounds,
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
/// The event-stream mock: each stream has this many events, this far apart.
const SSE_EVENTS: usize = 20;
const SSE_GAP: Duration = Duration::from_millis(10);

/// Where the event-stream mock listens, and the port the workload asks for to reach it.
struct Sse {
    plain: SocketAddr,
    tls: SocketAddr,
    port: u16,
}

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

use tollgate_tests::peers::status_kib;

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
        let route = route_flags(&args[6..]);
        // A peer that falls behind holds many connections open at once.
        gateway_user::daemon::raise_fd_limit();
        let (lat, errors) = rt.block_on(tollgate_tests::httpbench::open_loop(
            target, &args[2], &route, rate, secs, keepalive,
        ));
        use tollgate_tests::httpbench::pct;
        println!(
            "{}",
            json!({ "n": lat.len(), "errors": errors, "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99), "p999": pct(&lat, 0.999) })
        );
        return;
    }
    if args.first().map(String::as_str) == Some("sse-client") {
        let target: SocketAddr = args[1].parse().expect("target");
        let streams: usize = args[2].parse().expect("streams");
        let route = route_flags(&args[3..]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        let seen = rt.block_on(tollgate_tests::ssebench::sse_client(
            target,
            "127.0.0.1",
            streams,
            &route,
        ));
        use tollgate_tests::httpbench::pct;
        let (f, d) = (&seen.first_event, &seen.delay);
        println!(
            "{}",
            json!({ "first_event": [pct(f, 0.5), pct(f, 0.99)], "delay": [pct(d, 0.5), pct(d, 0.99), pct(d, 0.999)], "events": d.len(), "failed": seen.failed })
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
    if only.is_some_and(|o| !["capture", "http", "goal", "goal-new", "train"].contains(&o)) {
        eprintln!(
            "tg-bench: unknown part {only:?}: use `capture`, `http`, `goal`, `goal-new` or `train`"
        );
        std::process::exit(2);
    }
    let goal_rate = match goal_rate(only, args.get(2).map(String::as_str)) {
        Ok(rate) => rate,
        Err(e) => {
            eprintln!("tg-bench: {e}");
            std::process::exit(2);
        }
    };
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
    let upstream = tollgate_tests::httpbench::start_counted_upstream(&rt, &["127.0.0.1"]);
    let (tls, ca) = (upstream.tls, upstream.ca_pem.clone());
    let api_port = tollgate_tests::free_port();
    let models_port = tollgate_tests::free_port();
    let ports = Ports {
        api: api_port,
        models: models_port,
    };
    // A second mock answering with event streams, behind its own port and rule.
    let (sse_tls_config, sse_ca) = tollgate_tests::tls_server(&["127.0.0.1"]);
    let (sse_plain, sse_tls) =
        tollgate_tests::ssebench::start_sse_upstream(&rt, sse_tls_config, SSE_EVENTS, SSE_GAP);
    let sse = Sse {
        plain: sse_plain,
        tls: sse_tls,
        port: tollgate_tests::free_port(),
    };
    std::fs::write(env.dir.join("ca.pem"), format!("{ca}{sse_ca}")).expect("ca");
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
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: bench }}\nspec:\n  workload: {{ cgroup: {}/bench.service }}\n  egress:\n    - name: sink\n      match: {{ cidr: 127.0.0.1/32, port: {} }}\n    - name: direct\n      match: {{ cidr: 127.0.0.1/32, port: {} }}\n    - name: api\n      match: {{ host: 127.0.0.1, port: {api_port} }}\n      upstream: {{ port: {} }}\n      tls: originate\n      allow_private: true\n      http:\n        - methods: [POST]\n          paths: [/v1/chat/completions]\n      credential: bench-key\n    - name: api-models\n      match: {{ host: 127.0.0.1, port: {models_port} }}\n      upstream: {{ port: {} }}\n      tls: originate\n      allow_private: true\n      http:\n        - methods: [POST]\n          paths: [/v1/chat/completions]\n          models: [bench]\n      credential: bench-key\n    - name: sse\n      match: {{ host: 127.0.0.1, port: {} }}\n      upstream: {{ port: {} }}\n      tls: originate\n      allow_private: true\n      http:\n        - methods: [POST]\n          paths: [/v1/chat/completions]\n      credential: bench-key\n",
            env.root_rel(),
            target.port(),
            upstream.plain.port(),
            tls.port(),
            tls.port(),
            sse.port,
            sse.tls.port()
        ),
    )
    .expect("policy");
    // The capture baseline's client runs in a sibling of the enforced root: same depth, no
    // root programs. Measured once before the daemon starts (no programs at all, not even the
    // socket guard at the cgroup2 root), then interleaved with the enforced rounds.
    let baseline = only
        .is_none_or(|o| o == "capture")
        .then(|| Baseline::measure(&env));
    let mut daemon = env.start();
    let mut md = String::new();
    if let Some(baseline) = &baseline {
        md.push_str(&capture_section(&env, &app, &daemon, target, baseline));
    }
    if only == Some("goal") {
        md.push_str(&goal_section(
            &env, &app, &daemon, &upstream, ports, true, goal_rate,
        ));
    } else if only == Some("goal-new") {
        md.push_str(&goal_section(
            &env, &app, &daemon, &upstream, ports, false, goal_rate,
        ));
    } else if only == Some("train") {
        md.push_str(&training(&app, &upstream, ports));
    } else if only != Some("capture") {
        md.push_str(&http_section(&env, &app, &daemon, &upstream, api_port));
        md.push_str(&streams_and_sweep(
            &out_dir, &env, &app, &upstream, api_port, &sse,
        ));
        md.push_str(&goal_section(
            &env, &app, &daemon, &upstream, ports, true, GOAL_RATE,
        ));
    }
    // A graceful stop, as an operator's: the daemon flushes its audit log and exits by itself
    // (a build made to record a profile writes it then).
    daemon.stop();
    let path = out_dir.join("report.md");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(md.as_bytes()))
        .expect("write report");
    print!("{md}");
    eprintln!("report: {}", path.display());
}

/// Keeps the listeners' CPU out of idle (a halted virtual CPU is slow to wake, and how often
/// each listener finds its CPU halted would otherwise decide the comparison): a spinner that
/// yields to anything else, until dropped.
struct Spinner {
    spinning: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spinner {
    fn start() -> Self {
        let spinning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = spinning.clone();
        let thread = std::thread::spawn(move || {
            pin(0, SERVER_CPU);
            // SAFETY: plain sched_setscheduler(2) on the calling thread.
            unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
            while flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Self {
            spinning,
            thread: Some(thread),
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.spinning
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The connect() baseline: a cgroup outside the root, its own plain listener (the gateway's
/// upstream connections, and their TIME_WAITs, go elsewhere), and rounds measured before the
/// daemon started.
struct Baseline {
    cgroup: tollgate_tests::Cgroup,
    sink: SocketAddr,
    before: Vec<Value>,
    /// ns per system call before the daemon started (no watcher on `sys_exit`).
    syscall_before: f64,
}

/// ns per `getppid()`, the median of 7 rounds of 1,000,000 calls: what every system call of
/// the host pays for a program on `sys_exit` shows here.
fn syscall_ns() -> f64 {
    const CALLS: u32 = 1_000_000;
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let start = std::time::Instant::now();
            for _ in 0..CALLS {
                // SAFETY: getppid has no arguments and cannot fail.
                std::hint::black_box(unsafe { libc::getppid() });
            }
            start.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

impl Baseline {
    fn measure(env: &TestEnv) -> Self {
        let cgroup =
            tollgate_tests::Cgroup::create(env.mount.join(format!("{}-baseline.scope", env.name)));
        let sink = sink();
        let spinner = Spinner::start();
        let _ = run_loop(Some(&cgroup.path), sink, CONNECTS, true);
        let before = (0..ROUNDS)
            .map(|_| run_loop(Some(&cgroup.path), sink, CONNECTS, true))
            .collect();
        drop(spinner);
        Self {
            cgroup,
            sink,
            before,
            syscall_before: syscall_ns(),
        }
    }
}

/// connect() against the baseline, the programs' own run time, accept-to-decision, exe hash.
fn capture_section(
    env: &TestEnv,
    app: &Path,
    daemon: &tollgate_tests::Daemon,
    target: SocketAddr,
    baseline: &Baseline,
) -> String {
    pin_process(daemon.pid(), Some(SERVER_CPU));
    let syscall_after = syscall_ns();
    let spinner = Spinner::start();
    let outside = Some(baseline.cgroup.path.as_path());
    let plain = baseline.sink;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");

    // Warm up both paths (the enforced one until the origin map has reused every slot at
    // least once: the steady state of a busy host), then interleave rounds.
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
    drop(spinner);
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

    // Exe-hash cache: miss (a fresh cache each time, read on the blocking pool) and hit.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exe = Path::new("/proc/self/exe");
    let size = std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    for _ in 0..20 {
        let cache = gateway_user::identity::ExeHashCache::default();
        assert!(rt.block_on(cache.hash(exe, "bench")).is_some());
    }
    let miss = t.elapsed() / 20;
    let cache = gateway_user::identity::ExeHashCache::default();
    let _ = rt.block_on(cache.hash(exe, "bench"));
    let t = Instant::now();
    for _ in 0..10_000 {
        assert!(rt.block_on(cache.hash(exe, "bench")).is_some());
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
            "before the daemon started: the same client outside the root (no programs at all; an earlier phase)",
            &baseline.before,
        ),
        (
            "baseline: to a plain listener, outside the root (no root programs; the socket guard at the cgroup2 root runs)",
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
    let guard_added = pick(&base, "p50") as i64 - pick(&baseline.before, "p50") as i64;
    md.push_str(&format!(
        "The socket guard on a connect outside every root (this phase's baseline against the phase before the daemon started): {guard_added:+} ns at p50; its own run time is in the table below.\n\n"
    ));
    md.push_str(&format!(
        "A system call (`getppid`, median of 7 rounds of 1,000,000) before the daemon started: {:.0} ns; with the watchers attached (system call tracepoints enabled for the descriptor watcher): {:.0} ns ({:+.0} ns).\n\n",
        baseline.syscall_before,
        syscall_after,
        syscall_after - baseline.syscall_before
    ));
    md.push_str("## The programs' own run time (BPF_ENABLE_STATS)\n\n| program | runs | ns per run |\n|---|---:|---:|\n");
    let mut total_ns = 0;
    for (name, runs, total) in &programs {
        // The guard runs for every connect on the host (the baseline's too), the watchers on
        // joins and system calls: not summed into the cost of an enforced connection.
        if !name.starts_with("tg_guard")
            && !gateway_user::ebpf::WATCHERS
                .iter()
                .any(|(w, _)| w.starts_with(name.as_str()))
        {
            total_ns += total;
        }
        md.push_str(&format!("| {name} | {runs} | {} |\n", total / runs.max(&1)));
    }
    let enforced_connects = programs
        .iter()
        .find(|(name, _, _)| name == "tg_connect4")
        .map_or(1, |(_, runs, _)| (*runs).max(1));
    md.push_str(&format!(
        "\nThe roots' programs together, per enforced connection (socket, connect, every egress packet until close; the guard's own run on it comes on top): {} ns.\n\n",
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
    http_load_route(
        cgroup,
        target,
        &tollgate_tests::httpbench::Route::default(),
        rate,
        secs,
        keepalive,
    )
}

/// [`http_load`] with the path and extra headers of `route` (what a peer proxy wants).
fn http_load_route(
    cgroup: Option<&Path>,
    target: SocketAddr,
    route: &tollgate_tests::httpbench::Route,
    rate: u64,
    secs: u64,
    keepalive: bool,
) -> Value {
    let (target, rate, secs) = (target.to_string(), rate.to_string(), secs.to_string());
    let mode = if keepalive { "keepalive" } else { "close" };
    let mut args: Vec<String> = ["http-load", &target, "127.0.0.1", &rate, &secs, mode]
        .map(str::to_owned)
        .to_vec();
    args.extend(["--path".to_owned(), route.path.clone()]);
    for (k, v) in &route.headers {
        args.extend(["--header".to_owned(), format!("{k}: {v}")]);
    }
    child(cgroup, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// nginx (Debian's) as a plain reverse proxy to the same TLS upstream, if installed.
/// Child-mode flags after the fixed arguments: `--path P` and `--header 'Name: value'`
/// (repeated), for proxies that want them.
fn route_flags(flags: &[String]) -> tollgate_tests::httpbench::Route {
    let mut route = tollgate_tests::httpbench::Route::default();
    let mut rest = flags.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().expect("a value after the flag");
        match flag.as_str() {
            "--path" => route.path.clone_from(value),
            "--header" => {
                let (k, v) = value.split_once(':').expect("header `Name: value`");
                route
                    .headers
                    .push((k.trim().to_owned(), v.trim().to_owned()));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    route
}

/// nginx (Debian's) as a plain reverse proxy to the TLS upstream `tls`, if installed; `name`
/// names its files. Streaming (`buffering: false`) passes each event on as it arrives, the
/// setting any deployment in front of an event stream uses. Kept-alive connections on both
/// sides carry any number of requests, as Tollgate's do: with nginx's default cap of 1,000 a
/// connection is renewed about once a second at the goal's rate (upstream, with a TLS
/// handshake), which lengthened nginx's tail and flattered Tollgate's.
fn start_nginx(
    dir: &Path,
    name: &str,
    port: u16,
    tls: SocketAddr,
    buffering: bool,
) -> Option<std::process::Child> {
    let conf = dir.join(format!("{name}.conf"));
    let buffering = if buffering { "on" } else { "off" };
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir};\n  upstream api {{ server {tls}; keepalive 64; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location / {{\n      proxy_pass https://api;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_ssl_session_reuse on;\n      proxy_buffering {buffering};\n    }}\n  }}\n}}\n",
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

/// The rate the latency goal is set at, in requests/s.
const GOAL_RATE: u64 = 1000;
/// The highest rate a goal run may be asked for: past it the load generator, the mock and the
/// proxies saturate the two CPUs and the rounds measure queueing.
const MAX_GOAL_RATE: u64 = 20_000;

/// The rate for `goal` and `goal-new`: the goal's own, or the one asked for after the part.
fn goal_rate(only: Option<&str>, asked: Option<&str>) -> Result<u64, String> {
    let Some(asked) = asked else {
        return Ok(GOAL_RATE);
    };
    if !matches!(only, Some("goal" | "goal-new")) {
        return Err(format!(
            "a rate ({asked}) applies to the `goal` and `goal-new` parts only"
        ));
    }
    match asked.parse::<u64>() {
        Ok(rate @ 1..=MAX_GOAL_RATE) => Ok(rate),
        _ => Err(format!(
            "rate {asked:?}: give requests per second, from 1 to {MAX_GOAL_RATE}"
        )),
    }
}

/// The load a build made to record a profile is run under (`cargo xtask build-release --pgo`):
/// what the goal measures, a few seconds each at the goal's rate: kept-alive requests on both
/// HTTP rules, a new connection per request, and the L4 relay; and 3 s of the API rule at
/// 4,000/s. A load that failed would train the build on its error paths: it stops the
/// training.
fn training(app: &Path, upstream: &tollgate_tests::httpbench::Upstream, ports: Ports) -> String {
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut md = String::from(
        "## Training load

| load | requests | errors |
|---|---:|---:|
",
    );
    // At the goal's rate and, for a burst of it, at 4,000/s: requests that overlap, a client
    // opening connections mid-run and upstream connections dialed while others are busy are
    // paths the slower load seldom takes.
    for (name, target, rate, secs, keepalive) in [
        ("kept-alive, API rule", local(ports.api), GOAL_RATE, 6, true),
        (
            "kept-alive, models rule",
            local(ports.models),
            GOAL_RATE,
            6,
            true,
        ),
        (
            "kept-alive, API rule, 4,000/s",
            local(ports.api),
            4000,
            3,
            true,
        ),
        (
            "new connections, API rule",
            local(ports.api),
            GOAL_RATE,
            3,
            false,
        ),
        (
            "new connections, models rule",
            local(ports.models),
            GOAL_RATE,
            2,
            false,
        ),
        ("kept-alive, L4 relay", upstream.plain, GOAL_RATE, 3, true),
    ] {
        let r = http_load(Some(app), target, rate, secs, keepalive);
        let (n, errors) = (
            r["n"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
        );
        assert!(n > 0 && errors == 0, "training load {name} failed: {r}");
        md.push_str(&format!("| {name} | {n} | {errors} |\n"));
    }
    md
}

/// The latency goal alone: kept-alive (or, with `keepalive` false, a new connection per
/// request) at `rate` requests/s (the goal's is 1,000) in interleaved rounds: direct, then Tollgate, Tollgate on a
/// rule that limits models (the body's model and the answer's usage read), and nginx, in each
/// of their six orders twice, so drift on a noisy machine falls on all alike and each runs
/// first, second and last as often, after each of the others. The median of the rounds' added
/// percentiles, and Tollgate against nginx round by round.
fn goal_section(
    env: &TestEnv,
    app: &Path,
    daemon: &tollgate_tests::Daemon,
    upstream: &tollgate_tests::httpbench::Upstream,
    ports: Ports,
    keepalive: bool,
    rate: u64,
) -> String {
    /// Every order of the three contenders; each is run in two rounds, six apart.
    const ORDERS: [[usize; 3]; 6] = [
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
        [0, 2, 1],
        [2, 1, 0],
        [1, 0, 2],
    ];
    const ROUNDS: usize = 2 * ORDERS.len();
    const SECS: u64 = 5;
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let nginx_port = tollgate_tests::free_port();
    let mut nginx = start_nginx(&env.dir, "nginx", nginx_port, upstream.tls, true);
    // Name, target, the client's cgroup, and the process whose CPU is counted.
    let contenders: [(&str, SocketAddr, Option<&Path>, Option<i32>); 3] = [
        ("Tollgate", local(ports.api), Some(app), Some(daemon.pid())),
        (
            "Tollgate, models rule",
            local(ports.models),
            Some(app),
            Some(daemon.pid()),
        ),
        (
            "nginx",
            local(nginx_port),
            None,
            nginx.as_ref().map(|n| n.id() as i32),
        ),
    ];
    let mut added: Vec<Vec<[i64; 3]>> = vec![Vec::new(); contenders.len()];
    // CPU per request (ns) of the daemon (every thread) and of nginx (master and workers),
    // over each of their rounds.
    let mut cpu: Vec<Vec<u64>> = vec![Vec::new(); contenders.len()];
    // New upstream connections (TLS handshakes at the mock, and how many resumed a session)
    // during each one's rounds: a request that finds no idle upstream connection waits for a
    // handshake.
    let mut dialed: Vec<(u64, u64)> = vec![(0, 0); contenders.len()];
    // What the hop itself costs: the direct request from the workload's cgroup, where an L4
    // rule has the gateway relay the bytes to the plain port (no HTTP, no TLS, no record per
    // request).
    let mut relayed: Vec<[i64; 3]> = Vec::new();
    let mut rows = String::new();
    let v = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0) as i64;
    // One second each, unmeasured: pooled upstream connections, the proxies' first
    // allocations and the client's own start-up are not in round 1.
    http_load(None, upstream.plain, rate, 1, keepalive);
    http_load(Some(app), upstream.plain, rate, 1, keepalive);
    for (_, target, cgroup, pid) in &contenders {
        if pid.is_some() {
            http_load(*cgroup, *target, rate, 1, keepalive);
        }
    }
    for round in 1..=ROUNDS {
        let direct = http_load(None, upstream.plain, rate, SECS, keepalive);
        let relay = http_load(Some(app), upstream.plain, rate, SECS, keepalive);
        let mut results: Vec<Option<Value>> = vec![None; contenders.len()];
        for i in ORDERS[(round - 1) % ORDERS.len()] {
            let (_, target, cgroup, pid) = contenders[i];
            let Some(pid) = pid else { continue };
            let before = tollgate_tests::peers::tree_cpu_ns(&[pid]);
            let shaken = upstream.tls_handshakes();
            let r = http_load(cgroup, target, rate, SECS, keepalive);
            let spent = tollgate_tests::peers::tree_cpu_ns(&[pid]).saturating_sub(before);
            let now = upstream.tls_handshakes();
            dialed[i].0 += now.0 - shaken.0;
            dialed[i].1 += now.1 - shaken.1;
            cpu[i].push(spent / r["n"].as_u64().unwrap_or(1).max(1));
            results[i] = Some(r);
        }
        let relay_added = ["p50", "p99", "p999"].map(|k| v(&relay, k) - v(&direct, k));
        relayed.push(relay_added);
        let mut cells = vec![
            format!(
                "{} / {} / {}",
                v(&direct, "p50"),
                v(&direct, "p99"),
                v(&direct, "p999")
            ),
            format!(
                "{:+} / {:+} / {:+} ({} errors)",
                relay_added[0],
                relay_added[1],
                relay_added[2],
                v(&relay, "errors")
            ),
        ];
        for (i, r) in results.iter().enumerate() {
            let Some(r) = r else {
                cells.push("not installed".into());
                continue;
            };
            let a = ["p50", "p99", "p999"].map(|k| v(r, k) - v(&direct, k));
            cells.push(format!(
                "{:+} / {:+} / {:+} ({} errors)",
                a[0],
                a[1],
                a[2],
                v(r, "errors")
            ));
            added[i].push(a);
        }
        rows.push_str(&format!("| {round} | {} |\n", cells.join(" | ")));
    }
    stop_nginx(nginx.as_mut());
    // Of an even number of rounds, the mean of the middle two.
    let middle = |mut v: Vec<f64>| -> Option<f64> {
        v.sort_unstable_by(f64::total_cmp);
        let n = v.len();
        (n > 0).then(|| (v[(n - 1) / 2] + v[n / 2]) / 2.0)
    };
    let median_of = |runs: &[[i64; 3]], k: usize| {
        middle(runs.iter().map(|a| a[k] as f64).collect()).map(|m| m.round() as i64)
    };
    let summary = |runs: &[[i64; 3]]| match median_of(runs, 0) {
        Some(p50) => format!(
            "{p50:+} / {:+} / {:+}",
            median_of(runs, 1).unwrap_or(0),
            median_of(runs, 2).unwrap_or(0)
        ),
        None => "not installed".into(),
    };
    let cpu_median = |runs: &[u64]| {
        middle(runs.iter().map(|&ns| ns as f64).collect())
            .map_or("not installed".into(), |ns| format!("{:.1}", ns / 1000.0))
    };
    let at_goal_rate = rate == GOAL_RATE;
    let (title, goal) = match (keepalive, at_goal_rate) {
        (true, true) => (
            "HTTP latency goal: kept-alive",
            " Goal: Tollgate's added p50 and p99 at or below nginx's, and p50 at most +100 µs.",
        ),
        (true, false) => (
            "HTTP latency: kept-alive",
            " Goal at this rate: Tollgate's added p50 and p99 at or below nginx's (the +100 µs limit on p50 is set at 1,000 requests/s).",
        ),
        (false, _) => ("HTTP latency: a new connection per request", ""),
    };
    let names: Vec<&str> = contenders.iter().map(|c| c.0).collect();
    let medians: Vec<String> = added.iter().map(|runs| summary(runs)).collect();
    // The goal as a paired comparison: Tollgate's added percentile minus nginx's, round by
    // round (both against the same direct run), so drift between rounds cancels.
    let paired = if added[2].len() == added[0].len() && !added[0].is_empty() {
        let side = |k: usize, label: &str| {
            let d: Vec<i64> = added[0]
                .iter()
                .zip(&added[2])
                .map(|(t, n)| t[k] - n[k])
                .collect();
            // Rounded, then `+ 0.0`: a median between -0.5 and 0 prints as +0, not -0.
            let mid = middle(d.iter().map(|&x| x as f64).collect())
                .unwrap_or(0.0)
                .round()
                + 0.0;
            format!(
                "{label} median {:+.0} µs (from {:+} to {:+}; at or below nginx in {} of {})",
                mid,
                d.iter().min().unwrap_or(&0),
                d.iter().max().unwrap_or(&0),
                d.iter().filter(|&&x| x <= 0).count(),
                d.len()
            )
        };
        let verdict = match [0, 1].map(|k| (median_of(&added[0], k), median_of(&added[2], k))) {
            [(Some(t50), Some(n50)), (Some(t99), Some(n99))] if keepalive => {
                goal_verdict([t50, t99], [n50, n99], at_goal_rate)
            }
            _ => String::new(),
        };
        format!(
            "Tollgate's added minus nginx's, round by round: {}; {}.\n\n{verdict}",
            side(0, "p50"),
            side(1, "p99")
        )
    } else {
        String::new()
    };
    let cpus: Vec<String> = contenders
        .iter()
        .zip(cpu.iter())
        .map(|(c, runs)| format!("{} {} µs", c.0, cpu_median(runs)))
        .collect();
    let handshakes: Vec<String> = contenders
        .iter()
        .zip(&dialed)
        .filter(|(c, _)| c.3.is_some())
        .map(|(c, (done, resumed))| format!("{} {done} ({resumed} resumed)", c.0))
        .collect();
    format!(
        "## {title}, {rate} requests/s\n\n{ROUNDS} interleaved rounds of {SECS} s each after a 1 s unmeasured warm-up of each, open loop, 1 KiB `POST /v1/chat/completions`, added µs against the same round's direct run. Each round runs direct first, then the same from the workload's cgroup, where an L4 rule has Tollgate relay the bytes to the plain port (what the hop costs without HTTP, TLS or a record per request), then the proxies, in each of their six orders twice. \"Tollgate, models rule\": the same request on a rule that lists models, so the gateway reads the body's model before it decides and the answer's usage as it passes.{goal}\n\n| round | direct p50 / p99 / p99.9 µs | Tollgate, L4 relay added | {} |\n|---:|---|---|{}\n{rows}| median | | {} | {} |\n\n{paired}CPU per request (user and system time of every thread of the daemon, and of nginx's master and workers, over their rounds; median of the rounds): {}.\n\nNew upstream connections (TLS handshakes at the mock) over all their rounds: {}.\n\n",
        names.iter().map(|n| format!("{n} added")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(names.len()),
        summary(&relayed),
        medians.join(" | "),
        cpus.join(", "),
        handshakes.join(", "),
    )
}

/// The goal read off the medians of the rounds: Tollgate's added p50 and p99 (`tollgate`)
/// at or below nginx's (`nginx`), and, at the goal's own rate (`p50_limit`), its p50 at most
/// +100 µs.
fn goal_verdict(tollgate: [i64; 2], nginx: [i64; 2], p50_limit: bool) -> String {
    let word = |met: bool| if met { "met" } else { "not met" };
    let against = |k: usize| {
        let (t, n) = (tollgate[k], nginx[k]);
        format!("{t:+} against nginx's {n:+}: {}", word(t <= n))
    };
    let limit = if p50_limit {
        format!("; p50 at most +100 µs: {}", word(tollgate[0] <= 100))
    } else {
        String::new()
    };
    format!(
        "Goal, on the medians: p50 {}; p99 {}{limit}.\n\n",
        against(0),
        against(1),
    )
}

/// The gateway's listening ports the bench's policy names.
#[derive(Clone, Copy)]
struct Ports {
    /// The API rule (method and path).
    api: u16,
    /// The same API on a rule that also lists models.
    models: u16,
}

fn http_section(
    env: &TestEnv,
    app: &Path,
    daemon: &tollgate_tests::Daemon,
    upstream: &tollgate_tests::httpbench::Upstream,
    api_port: u16,
) -> String {
    use tollgate_tests::peers::{Peer, PeerKind, Unavailable, SETTLE};
    const SECS: u64 = 5;
    let (plain, tls) = (upstream.plain, upstream.tls);
    let gateway_target: SocketAddr = format!("127.0.0.1:{api_port}").parse().expect("addr");
    let nginx_port = tollgate_tests::free_port();
    let nginx_target: SocketAddr = format!("127.0.0.1:{nginx_port}").parse().expect("addr");
    let mut nginx = start_nginx(&env.dir, "nginx", nginx_port, tls, true);
    // The LLM proxies, each in front of the same TLS port; one that is missing or does not
    // come up gets its reason in the report instead of numbers.
    let mut peers: Vec<(PeerKind, Result<Peer, Unavailable>)> = PeerKind::ALL
        .into_iter()
        .map(|kind| {
            eprintln!("tg-bench: starting {}", kind.name());
            let peer = Peer::start(kind, &env.dir, upstream, &env.dir.join("ca.pem"));
            if let Err(why) = &peer {
                eprintln!("tg-bench: {}: {why}", kind.name());
            }
            (kind, peer)
        })
        .collect();
    let peers_idle_rss: Vec<u64> = peers
        .iter()
        .map(|(_, p)| p.as_ref().map_or(0, Peer::rss_kib))
        .collect();
    let mut peers_peak_rss = vec![0; peers.len()];
    let idle_rss = status_kib(daemon.pid(), "VmRSS:");
    let mut rss_at_5k = None;
    let mut md = format!(
        "## HTTP: added latency per request\n\nOpen-loop load at fixed rates ({SECS} s each), latency measured from each request's scheduled send (no coordinated omission), `POST /v1/chat/completions` with a 1 KiB OpenAI chat request; the mock API answers each with a complete `chat.completion`. Direct: to the mock API's plain port. Tollgate: redirected from the workload's cgroup; policy, credential injection, TLS to the mock (pooled) and the audit record on. nginx (Debian): plain reverse proxy to the same TLS port, upstream keep-alive. LiteLLM and Portkey: the LLM proxies, configured as below, in front of the same TLS port. Added = the proxy's percentile minus direct's, from runs back to back; errors = requests without a 200 within 10 s, out of rate × {SECS}.\n"
    );
    let names: Vec<&str> = PeerKind::ALL.iter().map(|k| k.name()).collect();
    let mut notes = Vec::new();
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
        md.push_str(&format!(
            "\n### {what}\n\n| rate/s | direct p50/p99/p99.9 µs | Tollgate added p50/p99/p99.9 µs | nginx added p50/p99/p99.9 µs | {} | errors (direct/tollgate/nginx/{}) |\n|---:|---|---|---|{}---|\n",
            names
                .iter()
                .map(|n| format!("{n} added p50/p99/p99.9 µs"))
                .collect::<Vec<_>>()
                .join(" | "),
            names.join("/").to_lowercase(),
            "---|".repeat(names.len())
        ));
        for rate in rates {
            let direct = http_load(None, plain, rate, SECS, keepalive);
            // The gateway's memory while it serves 5,000 kept-alive requests/s.
            let sample = (keepalive && rate == 5000).then_some(daemon.pid());
            let (through, rss) = with_peak_rss(sample, || {
                http_load(Some(app), gateway_target, rate, SECS, keepalive)
            });
            if sample.is_some() {
                rss_at_5k = Some(rss);
            }
            let via_nginx = nginx
                .as_ref()
                .map(|_| http_load(None, nginx_target, rate, SECS, keepalive));
            let mut via_peers = Vec::new();
            for (i, (kind, peer)) in peers.iter_mut().enumerate() {
                if let Ok(p) = peer {
                    if let Some(exit) = p.exited() {
                        *peer = Err(Unavailable::Exited(format!(
                            "exited ({exit}) before the {rate}/s run; log {}",
                            p.log.display()
                        )));
                    }
                }
                let p = match peer {
                    Ok(p) => p,
                    Err(why) => {
                        via_peers.push(Err(why.short()));
                        continue;
                    }
                };
                let r = http_load_route(None, p.addr, &p.route, rate, SECS, keepalive);
                peers_peak_rss[i] = peers_peak_rss[i].max(p.rss_kib());
                via_peers.push(Ok(r));
                // A peer still working off a backlog would slow the next run: it starts
                // afresh instead.
                if !p.settle(SETTLE) {
                    notes.push(format!(
                        "{} was still busy {} s after its {rate}/s {} run and was restarted.",
                        kind.name(),
                        SETTLE.as_secs(),
                        if keepalive {
                            "kept-alive"
                        } else {
                            "new-connection"
                        }
                    ));
                    *peer = Err(Unavailable::Exited(String::new()));
                    *peer = Peer::start(*kind, &env.dir, upstream, &env.dir.join("ca.pem"))
                        .map_err(|why| {
                            Unavailable::Exited(format!(
                                "did not start again after its {rate}/s run: {why}"
                            ))
                        });
                }
            }
            let v = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
            let added = |r: &Value| {
                format!(
                    "{:+} / {:+} / {:+}",
                    v(r, "p50") as i64 - v(&direct, "p50") as i64,
                    v(r, "p99") as i64 - v(&direct, "p99") as i64,
                    v(r, "p999") as i64 - v(&direct, "p999") as i64
                )
            };
            let peer_cells: Vec<String> = via_peers
                .iter()
                .map(|r| r.as_ref().map_or_else(|why| (*why).to_owned(), added))
                .collect();
            let peer_errors: Vec<String> = via_peers
                .iter()
                .map(|r| {
                    r.as_ref()
                        .map_or("-".into(), |r| v(r, "errors").to_string())
                })
                .collect();
            md.push_str(&format!(
                "| {rate} | {} / {} / {} | {} | {} | {} | {} / {} / {} / {} |\n",
                v(&direct, "p50"),
                v(&direct, "p99"),
                v(&direct, "p999"),
                added(&through),
                via_nginx.as_ref().map_or("not installed".into(), added),
                peer_cells.join(" | "),
                v(&direct, "errors"),
                v(&through, "errors"),
                via_nginx
                    .as_ref()
                    .map_or("-".into(), |r| v(r, "errors").to_string()),
                peer_errors.join(" / "),
            ));
        }
    }
    // The peers' memory after the runs (every process of each), then they stop.
    let peers_rss: Vec<(u64, usize)> = peers
        .iter()
        .map(|(_, p)| p.as_ref().map_or((0, 0), |p| (p.rss_kib(), p.processes())))
        .collect();
    let mut peer_text = format!(
        "\nThe LLM proxies, each started on a loopback port before the runs, with no access beyond loopback (remote lookups served from the copies they ship, telemetry off). Before measuring, one request through each had to come back 200 with the mock's completion and be counted by the mock, then 20 more warmed it up. After each of its runs the bench waited up to {} s for it to go idle (a proxy that fell behind goes on working off the requests the client gave up on), else restarted it, so no backlog lands in the next run.\n\n",
        SETTLE.as_secs()
    );
    for (i, (kind, peer)) in peers.iter().enumerate() {
        let (after, procs) = peers_rss[i];
        let mib = |kib: u64| kib as f64 / 1024.0;
        match peer {
            Ok(p) => peer_text.push_str(&format!(
                "- {} {} ({}): {}. RSS ({procs} process{}): {:.1} MiB after start, {:.1} MiB at most right after a run, {:.1} MiB after the runs.\n",
                kind.name(),
                p.version,
                kind.package(),
                p.setup,
                if procs == 1 { "" } else { "es, together" },
                mib(peers_idle_rss[i]),
                mib(peers_peak_rss[i]),
                mib(after)
            )),
            Err(why) => peer_text.push_str(&format!(
                "- {} ({}): {why}.\n",
                kind.name(),
                kind.package()
            )),
        }
    }
    for note in &notes {
        peer_text.push_str(&format!("- {note}\n"));
    }
    drop(peers);
    let peak = status_kib(daemon.pid(), "VmHWM:");
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
        let rss = status_kib(daemon.pid(), "VmRSS:");
        drop(child.stdin.take());
        let _ = child.wait();
        (held, rss)
    };
    let nginx_rss: u64 = nginx.as_ref().map_or(0, |n| {
        let master = i32::try_from(n.id()).unwrap_or(0);
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        status_kib(master, "VmRSS:")
            + children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(|p| status_kib(p, "VmRSS:"))
                .sum::<u64>()
    });
    stop_nginx(nginx.as_mut());
    md.push_str(&peer_text);
    md.push_str(&format!(
        "\nGateway RSS: {:.1} MiB idle, {} while serving 5,000 kept-alive requests/s (highest sample, every 100 ms), {:.1} MiB peak under load (up to 5,000 requests/s), {:.1} MiB holding {} idle kept-alive client connections. nginx (master + workers) after the runs: {}.\n",
        idle_rss as f64 / 1024.0,
        rss_at_5k.map_or("not measured".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        peak as f64 / 1024.0,
        idle.1 as f64 / 1024.0,
        idle.0,
        if nginx_rss == 0 { "not measured".into() } else { format!("{:.1} MiB", nginx_rss as f64 / 1024.0) }
    ));
    md
}

/// The event-stream runs and the rate sweep, over direct, Tollgate, nginx and the LLM proxies
/// that start.
fn streams_and_sweep(
    out_dir: &Path,
    env: &TestEnv,
    app: &Path,
    upstream: &tollgate_tests::httpbench::Upstream,
    api_port: u16,
    sse: &Sse,
) -> String {
    use tollgate_tests::{
        httpbench::Route,
        peers::{Peer, PeerKind},
    };
    let local = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().expect("addr") };
    let target = |name: &str, addr, cgroup| Target {
        name: name.to_owned(),
        addr,
        cgroup,
        route: Route::default(),
    };
    let mut md = String::new();
    // Streams: nginx with buffering off in front of the event-stream mock.
    let sse_nginx_port = tollgate_tests::free_port();
    let mut sse_nginx = start_nginx(&env.dir, "nginx-sse", sse_nginx_port, sse.tls, false);
    let mut streams = vec![
        target("direct", sse.plain, None),
        target("Tollgate", local(sse.port), Some(app)),
    ];
    if sse_nginx.is_some() {
        streams.push(target("nginx", local(sse_nginx_port), None));
    }
    md.push_str(&sse_section(&streams));
    stop_nginx(sse_nginx.as_mut());

    // The sweep: the same targets as the fixed-rate runs, LLM proxies started afresh.
    let nginx_port = tollgate_tests::free_port();
    let mut nginx = start_nginx(&env.dir, "nginx-sweep", nginx_port, upstream.tls, true);
    let mut peers = Vec::new();
    let mut missing = Vec::new();
    for kind in PeerKind::ALL {
        match Peer::start(kind, &env.dir, upstream, &env.dir.join("ca.pem")) {
            Ok(p) => peers.push((kind, p)),
            Err(why) => missing.push(format!("{}: {}", kind.name(), why.short())),
        }
    }
    let mut targets = vec![
        target("direct", upstream.plain, None),
        target("Tollgate", local(api_port), Some(app)),
    ];
    if nginx.is_some() {
        targets.push(target("nginx", local(nginx_port), None));
    }
    for (kind, p) in &peers {
        targets.push(Target {
            name: kind.name().to_owned(),
            addr: p.addr,
            cgroup: None,
            route: p.route.clone(),
        });
    }
    md.push_str(&sweep_section(out_dir, &targets));
    if !missing.is_empty() {
        md.push_str(&format!(
            "
Not in the sweep: {}.\n",
            missing.join("; ")
        ));
    }
    stop_nginx(nginx.as_mut());
    md
}

/// Stops an nginx started by [`start_nginx`]: SIGQUIT, so the master stops its workers too.
fn stop_nginx(nginx: Option<&mut std::process::Child>) {
    if let Some(n) = nginx {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(n.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = n.wait();
    }
}

/// One thing the sweep and the streaming runs measure: a name, where to send, from which
/// cgroup (the workload's, for Tollgate), and the path and headers it wants.
struct Target<'a> {
    name: String,
    addr: SocketAddr,
    cgroup: Option<&'a Path>,
    route: tollgate_tests::httpbench::Route,
}

/// The rates the sweep offers, in order; it stops for a target after the first rate it does
/// not sustain.
const SWEEP_RATES: [u64; 11] = [50, 100, 250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000];
const SWEEP_SECS: u64 = 3;
/// Sustained: p99 under 10 ms and no request without a 200 within 10 s.
const SUSTAINED_P99_US: u64 = 10_000;

/// Latency percentiles against offered rate for every target, kept-alive and with a new
/// connection per request; the highest rate each sustains; and the chart of it all.
fn sweep_section(out_dir: &Path, targets: &[Target<'_>]) -> String {
    use tollgate_tests::chart::{latency_png, Point, Series};
    let mut md = format!(
        "\n## HTTP: latency against offered rate, and the highest rate sustained\n\nThe same open-loop load, {SWEEP_SECS} s per step, at {} requests/s in turn; a target's ladder stops after the first rate it does not sustain (p99 of 10 ms or more, or any request without a 200 within 10 s). \"Sustains\" is the highest rate of the ladder it met, so the true limit lies between that and the next step.\n",
        SWEEP_RATES.map(|r| r.to_string()).join(", ")
    );
    let mut panels: Vec<(&str, Vec<Series>)> = Vec::new();
    for (keepalive, mode) in [
        (true, "kept-alive connections"),
        (false, "a new connection per request"),
    ] {
        md.push_str(&format!(
            "\n### {mode}\n\n| target | sustains (requests/s) | p50 / p99 / p99.9 µs at each rate (errors) |\n|---|---:|---|\n"
        ));
        let mut series = Vec::new();
        for t in targets {
            let mut points = Vec::new();
            let mut cells = Vec::new();
            let mut sustained = None;
            for rate in SWEEP_RATES {
                let r = http_load_route(t.cgroup, t.addr, &t.route, rate, SWEEP_SECS, keepalive);
                let v = |k: &str| r[k].as_u64().unwrap_or(0);
                let ok = v("errors") == 0 && v("n") > 0 && v("p99") < SUSTAINED_P99_US;
                points.push(Point {
                    rate,
                    p50_us: v("p50"),
                    p99_us: v("p99"),
                    p999_us: v("p999"),
                });
                cells.push(format!(
                    "{rate}/s: {} / {} / {}{}",
                    v("p50"),
                    v("p99"),
                    v("p999"),
                    if v("errors") > 0 {
                        format!(" ({} errors)", v("errors"))
                    } else {
                        String::new()
                    }
                ));
                if !ok {
                    break;
                }
                sustained = Some(rate);
            }
            md.push_str(&format!(
                "| {} | {} | {} |\n",
                t.name,
                sustained.map_or(format!("below {}", SWEEP_RATES[0]), |r| r.to_string()),
                cells.join("; ")
            ));
            series.push(Series {
                name: t.name.clone(),
                points,
            });
        }
        panels.push((mode, series));
    }
    let chart = out_dir.join("http-latency.png");
    let panels: Vec<(&str, &[Series])> = panels.iter().map(|(m, s)| (*m, s.as_slice())).collect();
    match latency_png(
        &chart,
        "HTTP latency against offered rate (one run, one machine)",
        &panels,
    ) {
        Ok(()) => md.push_str("\n![HTTP latency against offered rate](http-latency.png)\n"),
        Err(e) => md.push_str(&format!("\nNo chart: {e}\n")),
    }
    md
}

/// Runs `f`; with a pid, samples that process's RSS every 100 ms meanwhile and returns the
/// highest sample (KiB) too.
fn with_peak_rss<T>(pid: Option<i32>, f: impl FnOnce() -> T) -> (T, u64) {
    let Some(pid) = pid else {
        return (f(), 0);
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(status_kib(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    let out = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, sampler.join().unwrap_or(0))
}

/// Streams of server-sent events through every target: time to the first event and each
/// event's delay from when the upstream wrote it, against direct.
fn sse_section(targets: &[Target<'_>]) -> String {
    const STREAMS: usize = 30;
    let mut md = format!(
        "\n## HTTP: server-sent events\n\n{STREAMS} streams one after another on a kept-alive connection, each of {SSE_EVENTS} OpenAI `chat.completion.chunk` events {} ms apart (the first at once). Each event carries the CLOCK_MONOTONIC time the mock wrote it; the client notes its arrival. Time to first event is from the request's send. Added = the target's percentile minus direct's.\n\n| target | first event p50 / p99 µs | added | per-event delay p50 / p99 / p99.9 µs | added | events (failed streams) |\n|---|---|---|---|---|---|\n",
        SSE_GAP.as_millis()
    );
    let mut direct: Option<Value> = None;
    for t in targets {
        let mut args = vec![
            "sse-client".to_owned(),
            t.addr.to_string(),
            STREAMS.to_string(),
            "--path".to_owned(),
            t.route.path.clone(),
        ];
        for (k, v) in &t.route.headers {
            args.extend(["--header".to_owned(), format!("{k}: {v}")]);
        }
        let r = child(
            t.cgroup,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let v = |r: &Value, k: &str, i: usize| r[k][i].as_u64().unwrap_or(0);
        let added = |k: &str, n: usize| {
            direct.as_ref().map_or("".to_owned(), |d| {
                (0..n)
                    .map(|i| format!("{:+}", v(&r, k, i) as i64 - v(d, k, i) as i64))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
        };
        md.push_str(&format!(
            "| {} | {} / {} | {} | {} / {} / {} | {} | {} ({}) |\n",
            t.name,
            v(&r, "first_event", 0),
            v(&r, "first_event", 1),
            added("first_event", 2),
            v(&r, "delay", 0),
            v(&r, "delay", 1),
            v(&r, "delay", 2),
            added("delay", 3),
            r["events"],
            r["failed"],
        ));
        if direct.is_none() {
            direct = Some(r);
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goal_run_takes_a_rate_for_its_own_parts_only() {
        assert_eq!(goal_rate(Some("goal"), None), Ok(GOAL_RATE));
        assert_eq!(goal_rate(None, None), Ok(GOAL_RATE));
        assert_eq!(goal_rate(Some("goal"), Some("4000")), Ok(4000));
        assert_eq!(goal_rate(Some("goal-new"), Some("1")), Ok(1));
        for bad in ["0", "-5", "4k", "", "20001"] {
            let err = goal_rate(Some("goal"), Some(bad)).expect_err(bad);
            assert!(err.contains("requests per second"), "{bad}: {err}");
        }
        let err = goal_rate(Some("http"), Some("4000")).expect_err("http");
        assert!(err.contains("`goal` and `goal-new` parts only"), "{err}");
    }

    #[test]
    fn the_verdict_names_the_p50_limit_at_the_goals_rate_only() {
        let at = goal_verdict([92, 317], [88, 839], true);
        assert_eq!(
            at,
            "Goal, on the medians: p50 +92 against nginx's +88: not met; p99 +317 against \
             nginx's +839: met; p50 at most +100 µs: met.\n\n"
        );
        let other = goal_verdict([80, 300], [80, 301], false);
        assert_eq!(
            other,
            "Goal, on the medians: p50 +80 against nginx's +80: met; p99 +300 against \
             nginx's +301: met.\n\n"
        );
        assert!(
            goal_verdict([101, 0], [200, 0], true).ends_with("p50 at most +100 µs: not met.\n\n")
        );
    }
}
