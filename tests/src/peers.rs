//! The other LLM proxies `cargo xtask bench` measures beside Tollgate and nginx: the LiteLLM
//! proxy (PyPI) and the Portkey gateway (npm). `cargo xtask bench` installs each, pinned, under
//! `target/bench-peers`; here each one is started on a loopback port in front of the bench's
//! mock API (over TLS, trusting the mock's CA), checked to answer through the mock, and
//! stopped with its whole process group on drop. A peer that is missing or does not come up
//! is a value for the report ([`Unavailable`]), never a failed bench.
//!
//! Nothing here reaches beyond loopback: each peer is told to use the copies of its remote
//! lookups that it ships (LiteLLM's model cost map and the like), telemetry off, proxies from
//! the environment removed.
use std::{
    fmt,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::httpbench::{exchange, Route, Upstream};

/// One of the measured proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    LiteLlm,
    Portkey,
}

impl PeerKind {
    pub const ALL: [Self; 2] = [Self::LiteLlm, Self::Portkey];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::LiteLlm => "LiteLLM",
            Self::Portkey => "Portkey",
        }
    }

    /// The package it comes from.
    pub fn package(self) -> &'static str {
        match self {
            Self::LiteLlm => "PyPI `litellm[proxy]`",
            Self::Portkey => "npm `@portkey-ai/gateway`",
        }
    }

    /// Its directory under the peers' root, where `cargo xtask bench` installs it; an install
    /// that failed leaves its reason in `<dir_name>.failed` beside it.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::LiteLlm => "litellm",
            Self::Portkey => "portkey",
        }
    }

    /// How long it may take from spawn to its first answer through the mock.
    fn start_timeout(self) -> Duration {
        match self {
            // Each worker imports the whole of litellm (seconds of CPU on a small machine).
            Self::LiteLlm => Duration::from_secs(180),
            Self::Portkey => Duration::from_secs(60),
        }
    }
}

/// Why a peer has no numbers in the report.
#[derive(Clone, Debug)]
pub enum Unavailable {
    NotInstalled(String),
    DidNotStart(String),
    /// It started, then exited while the bench ran.
    Exited(String),
}

impl Unavailable {
    /// What the report's table cell says.
    pub fn short(&self) -> &'static str {
        match self {
            Self::NotInstalled(_) => "not installed",
            Self::DidNotStart(_) => "did not start",
            Self::Exited(_) => "exited",
        }
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInstalled(why) | Self::DidNotStart(why) => {
                write!(f, "{}: {why}", self.short())
            }
            Self::Exited(why) => f.write_str(why),
        }
    }
}

/// Where `cargo xtask bench` installs the peers: `TG_BENCH_PEERS`, or `target/bench-peers`.
pub fn peers_root() -> PathBuf {
    std::env::var_os("TG_BENCH_PEERS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-peers"),
        PathBuf::from,
    )
}

/// Requests sent through a peer after its first answer and before it is measured, so that
/// what a runtime does on first use (imports, JIT) stays out of the numbers.
const WARMUP: usize = 20;

/// How long a peer may take to go idle: after it starts, and after each run (an overloaded
/// peer goes on working off the requests queued in it after the client gave up on them).
pub const SETTLE: Duration = Duration::from_secs(20);

/// A running peer, its process group killed on drop.
pub struct Peer {
    pub kind: PeerKind,
    /// The version installed.
    pub version: String,
    /// Its listener, on loopback.
    pub addr: SocketAddr,
    /// What each request carries for it.
    pub route: Route,
    /// How it is set up, a sentence for the report.
    pub setup: String,
    child: Child,
    pub log: PathBuf,
}

impl Peer {
    /// Starts `kind` with its config and log in `dir`, in front of `upstream`'s TLS port
    /// (`ca_file` holds the CA that signed it), and waits until a request through it reaches
    /// the mock and comes back with the mock's answer.
    pub fn start(
        kind: PeerKind,
        dir: &Path,
        upstream: &Upstream,
        ca_file: &Path,
    ) -> Result<Self, Unavailable> {
        let root = peers_root();
        let version = installed_version(kind, &root)?;
        let port = crate::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join(format!("{}.log", kind.dir_name()));
        // Appended to: a peer restarted during the bench keeps one log.
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| Unavailable::DidNotStart(format!("create {}: {e}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| Unavailable::DidNotStart(format!("log: {e}")))?;
        let (mut cmd, route, setup) = match kind {
            PeerKind::LiteLlm => litellm(&root, dir, port, upstream, ca_file)?,
            PeerKind::Portkey => portkey(&root, dir, port, upstream, ca_file)?,
        };
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NO_PROXY", "*")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // Its own process group: every worker it forks goes with it on drop.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| Unavailable::DidNotStart(format!("spawn {:?}: {e}", cmd.get_program())))?;
        let mut peer = Self {
            kind,
            version,
            addr,
            route,
            setup,
            child,
            log,
        };
        peer.wait_ready(upstream)?;
        Ok(peer)
    }

    /// Polls until one request through the peer comes back with the mock's answer and the mock
    /// counted it, then sends the warm-up and waits for the peer to go idle.
    fn wait_ready(&mut self, upstream: &Upstream) -> Result<(), Unavailable> {
        let deadline = Instant::now() + self.kind.start_timeout();
        loop {
            if let Some(exit) = self.exited() {
                return Err(Unavailable::DidNotStart(format!(
                    "exited ({exit}): {}",
                    self.log_tail()
                )));
            }
            let last = match self.through(upstream) {
                Ok(()) => break,
                Err(why) => why,
            };
            if Instant::now() > deadline {
                return Err(Unavailable::DidNotStart(format!(
                    "no answer through it within {:?} ({last}); log: {}",
                    self.kind.start_timeout(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for _ in 0..WARMUP {
            self.through(upstream)
                .map_err(|why| Unavailable::DidNotStart(format!("warm-up request: {why}")))?;
        }
        // Workers that were still starting when the first answer came finish here.
        self.settle(SETTLE);
        Ok(())
    }

    /// One request through the peer: a 200 with the mock's completion, counted by the mock.
    fn through(&self, upstream: &Upstream) -> Result<(), String> {
        let before = upstream.requests();
        let answer = exchange(self.addr, "127.0.0.1", &self.route, Duration::from_secs(10))?;
        let status = answer.lines().next().unwrap_or("").trim().to_owned();
        if !status.starts_with("HTTP/1.1 200") {
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
            return Err(format!("{status}: {}", clip(body, 200)));
        }
        if !answer.contains("\"chatcmpl-bench\"") {
            return Err(format!(
                "a 200 without the mock's completion: {}",
                clip(&answer, 200)
            ));
        }
        if upstream.requests() == before {
            return Err("a 200 the mock never saw (answered by the peer itself)".into());
        }
        Ok(())
    }

    /// The peer's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait: {e}")),
        }
    }

    /// Resident memory of the whole process group, in KiB.
    pub fn rss_kib(&self) -> u64 {
        group(self.pgid())
            .iter()
            .map(|p| status_kib(*p, "VmRSS:"))
            .sum()
    }

    /// How many processes the group holds.
    pub fn processes(&self) -> usize {
        group(self.pgid()).len()
    }

    /// Waits until the process group uses (almost) no CPU for half a second, at most `max`:
    /// an overloaded peer may still be working off queued requests after its run, which would
    /// otherwise land in the next measurement. Returns whether it went idle.
    pub fn settle(&self, max: Duration) -> bool {
        let deadline = Instant::now() + max;
        let mut last = cpu_ticks(self.pgid());
        let mut quiet = 0;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            let now = cpu_ticks(self.pgid());
            // One clock tick (10 ms) in 250 ms: under 5 % of a CPU.
            if now.saturating_sub(last) <= 1 {
                quiet += 1;
                if quiet >= 2 {
                    return true;
                }
            } else {
                quiet = 0;
            }
            last = now;
        }
        false
    }

    fn pgid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// The last non-empty line of the peer's log, clipped.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let line = text
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("(empty log)");
        clip(line, 300)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.pgid());
        if pgid.as_raw() <= 0 {
            return;
        }
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            if group(pgid.as_raw()).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The installed version of `kind` under `root`, or why it is not there. The reason a failed
/// install left counts even when an older version is still in place: that one is not the pin.
fn installed_version(kind: PeerKind, root: &Path) -> Result<String, Unavailable> {
    let failed = root.join(format!("{}.failed", kind.dir_name()));
    if let Ok(why) = std::fs::read_to_string(&failed) {
        return Err(Unavailable::NotInstalled(clip(why.trim(), 300)));
    }
    let found = match kind {
        PeerKind::LiteLlm => {
            let venv = root.join("litellm");
            venv.join("bin/litellm")
                .exists()
                .then(|| {
                    Command::new(venv.join("bin/python"))
                        .args([
                            "-c",
                            "import importlib.metadata as m; print(m.version('litellm'))",
                        ])
                        .output()
                        .ok()
                        .filter(|o| o.status.success())
                        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                })
                .flatten()
        }
        PeerKind::Portkey => {
            let node = Command::new("node")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !node {
                return Err(Unavailable::NotInstalled("no `node` on PATH".into()));
            }
            std::fs::read_to_string(portkey_package(root).join("package.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["version"].as_str().map(str::to_owned))
        }
    };
    found.filter(|v| !v.is_empty()).ok_or_else(|| {
        Unavailable::NotInstalled(format!(
            "nothing under {} (`cargo xtask bench` installs it)",
            root.join(kind.dir_name()).display()
        ))
    })
}

fn portkey_package(root: &Path) -> PathBuf {
    root.join("portkey/node_modules/@portkey-ai/gateway")
}

/// The key a caller presents to LiteLLM (its master key; there is no database for virtual
/// keys), and the key LiteLLM sends on to the mock in its place.
const LITELLM_MASTER_KEY: &str = "sk-bench-litellm-master";
const UPSTREAM_KEY: &str = "sk-bench-upstream";

/// The LiteLLM proxy (`litellm` CLI, uvicorn): one worker process per CPU, as its docs advise
/// when several workers share a machine; a config file naming the mock as an OpenAI-compatible
/// model; no database, no callbacks, no per-request logging.
fn litellm(
    root: &Path,
    dir: &Path,
    port: u16,
    upstream: &Upstream,
    ca_file: &Path,
) -> Result<(Command, Route, String), Unavailable> {
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: https://{tls}/v1\n      api_key: {UPSTREAM_KEY}\n\
             general_settings:\n  master_key: {LITELLM_MASTER_KEY}\n  disable_spend_logs: true\n  disable_error_logs: true\n\
             litellm_settings:\n  set_verbose: false\n  request_timeout: 30\n",
            tls = upstream.tls
        ),
    )
    .map_err(|e| Unavailable::DidNotStart(format!("write {}: {e}", config.display())))?;
    let mut cmd = Command::new(root.join("litellm/bin/litellm"));
    cmd.arg("--config")
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--num_workers",
            &workers.to_string(),
            "--telemetry",
            "False",
        ])
        .current_dir(dir)
        // The copies it ships of what it would otherwise fetch at startup.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")
        .env("LITELLM_LOCAL_AUTOROUTER_PRESETS", "True")
        .env("LITELLM_LOCAL_BLOG_POSTS", "True")
        .env("LITELLM_LOCAL_POLICY_TEMPLATES", "True")
        .env("LITELLM_DONT_SHOW_FEEDBACK_BOX", "True")
        // Errors only (no access log), and no `.env` loading.
        .env("LITELLM_LOG", "ERROR")
        .env("LITELLM_MODE", "PRODUCTION")
        .env("SSL_CERT_FILE", ca_file);
    let route = Route {
        headers: vec![(
            "Authorization".into(),
            format!("Bearer {LITELLM_MASTER_KEY}"),
        )],
        ..Route::default()
    };
    let setup = format!(
        "`litellm --num_workers {workers}` (uvicorn, one worker per CPU), the mock as model `openai/bench` at its TLS port (CA through `SSL_CERT_FILE`), a master key checked on each request and the upstream key put in its place, no database, no callbacks, `LITELLM_LOG=ERROR`, local cost map"
    );
    Ok((cmd, route, setup))
}

/// The Portkey gateway's own Node server (one process), headless (no log console), each
/// request naming the provider and the mock as its custom host.
fn portkey(
    root: &Path,
    dir: &Path,
    port: u16,
    upstream: &Upstream,
    ca_file: &Path,
) -> Result<(Command, Route, String), Unavailable> {
    // The server takes a port but no address: bind it to loopback.
    let loopback = dir.join("portkey-loopback.cjs");
    std::fs::write(
        &loopback,
        "const net = require('net');\nconst listen = net.Server.prototype.listen;\n\
         net.Server.prototype.listen = function (port, host, ...rest) {\n  \
         if (typeof port === 'number' && (host === undefined || host === '0.0.0.0' || host === '::')) host = '127.0.0.1';\n  \
         return listen.call(this, port, host, ...rest);\n};\n",
    )
    .map_err(|e| Unavailable::DidNotStart(format!("write {}: {e}", loopback.display())))?;
    let mut cmd = Command::new("node");
    cmd.arg("--require")
        .arg(&loopback)
        .arg(portkey_package(root).join("build/start-server.js"))
        .arg(format!("--port={port}"))
        .arg("--headless")
        .current_dir(root.join("portkey"))
        .env("NODE_ENV", "production")
        .env("NODE_EXTRA_CA_CERTS", ca_file);
    let route = Route {
        headers: vec![
            ("x-portkey-provider".into(), "openai".into()),
            (
                "x-portkey-custom-host".into(),
                format!("https://{}/v1", upstream.tls),
            ),
            ("Authorization".into(), format!("Bearer {UPSTREAM_KEY}")),
        ],
        ..Route::default()
    };
    let setup = "its Node server (`start-server.js --headless`, one process, `NODE_ENV=production`), each request naming provider `openai` and the mock's TLS port as custom host (CA through `NODE_EXTRA_CA_CERTS`), the caller's key passed on".to_owned();
    Ok((cmd, route, setup))
}

/// The processes in group `pgid`.
fn group(pgid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat_fields(*pid).is_some_and(|f| f.get(2) == Some(&pgid.to_string())))
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp, …
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of group `pgid`, in clock ticks.
fn cpu_ticks(pgid: i32) -> u64 {
    group(pgid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            tick(11) + tick(12)
        })
        .sum()
}

/// CPU time (user and system) of processes `pids` and their direct children, every thread,
/// in ns (`/proc/<pid>/task/<tid>/schedstat`): a daemon with its worker processes.
pub fn tree_cpu_ns(pids: &[i32]) -> u64 {
    let children: Vec<i32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    stat_fields(*p).is_some_and(|f| {
                        f.get(1)
                            .and_then(|v| v.parse::<i32>().ok())
                            .is_some_and(|ppid| pids.contains(&ppid))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pids.iter()
        .chain(&children)
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|task| {
            let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: i32, field: &str) -> u64 {
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

/// `text` cut to at most `max` characters, on one line.
fn clip(text: &str, max: usize) -> String {
    let one: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cut: String = one.chars().take(max).collect();
    if cut.len() < one.len() {
        format!("{cut}…")
    } else {
        cut
    }
}
