//! Project tasks: `setup`, `build-ebpf`, `build-release`, `image`, `test`, `fuzz`, `bench`,
//! `demo`.
mod image;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the kernel-side build needs (idempotent): LLVM 22, bpf-linker, nightly rust-src.
    Setup,
    /// Build the eBPF programs (nightly, bpf-linker).
    BuildEbpf,
    /// Setup, then build the daemon as it ships (release, LTO) and print where it is.
    BuildRelease {
        /// Profile-guided: build it instrumented, run it (as root, in cgroups of its own)
        /// under the benchmark's goal load for about half a minute, and build it again from
        /// that profile.
        #[arg(long)]
        pgo: bool,
    },
    /// Build the daemon as it ships (as `build-release`) and the container image the
    /// DaemonSet runs, an OCI archive (target/image/tollgate-oci.tar, named tollgate:latest):
    /// the daemon and the libraries it loads, nothing else.
    Image {
        /// From the profile-guided build (`build-release --pgo`).
        #[arg(long)]
        pgo: bool,
    },
    /// Setup, build, then run every test: unit, privileged end-to-end, the demo, the image
    /// and a short fuzz run. `test adversarial`: only the privileged suites that attack the enforcement
    /// (THREATS.md), without unit tests, demo or fuzzing.
    Test {
        /// `adversarial`, or nothing for everything.
        suite: Option<String>,
        /// Only run privileged tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Run each fuzz target for a while (cargo-fuzz, nightly); new inputs go to a scratch
    /// corpus, crashes fail the command.
    Fuzz {
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Setup, build (release), then measure capture costs; writes target/bench/report.md.
    Bench {
        /// Only this part of the report: `capture` (connect, programs, identity), `http`
        /// (which ends with the goal part), `goal` (the latency goal alone: direct, then
        /// Tollgate, Tollgate on a rule that lists models, and nginx in each of their orders,
        /// at 1,000 kept-alive requests/s in twelve interleaved rounds), `goal-new` (the
        /// same rounds with a new connection per request), or `policy`
        /// (policy decision time, criterion; needs neither root nor the kernel side).
        #[arg(long)]
        only: Option<String>,
        /// With `--only goal` or `--only goal-new`: the rounds' rate in requests/s instead of
        /// the goal's 1,000 (the +100 µs limit on p50 is judged at 1,000 only).
        #[arg(long)]
        rate: Option<u64>,
        /// Measure the profile-guided build (`build-release --pgo`) instead of the plain one.
        #[arg(long)]
        pgo: bool,
    },
    /// Setup, build, then run the demo.
    Demo,
}

const APT_PACKAGES: [&str; 7] = [
    "llvm-22-dev",
    "libclang-22-dev",
    "curl",
    "python3",
    "iproute2",
    // Unpacks the container image in its test, verifying every digest as a runtime would.
    "umoci",
    // The font the benchmark's latency chart is drawn with (tests/src/chart.rs, and its test).
    "fonts-dejavu-core",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command with the environment a parent cargo set for itself removed, so the toolchain
/// we name is the one that runs.
fn clean(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for key in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// `apt-get install` of `packages`, non-interactive, without recommends.
fn apt_install(packages: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(&mut apt_install(&missing))?;
    }
    let nightly = output_ok(clean("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !nightly.lines().any(|l| l.starts_with("nightly")) {
        bail!("no nightly Rust toolchain: the kernel programs need one (rustup toolchain install nightly)");
    }
    let components = output_ok(clean("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(clean("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // The tests' Python clients: urllib (stdlib) and requests, from PyPI.
    if output_ok(Command::new("python3").args(["-c", "import requests"])).is_none() {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "requests",
        ]))?;
    }
    let linker = output_ok(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        run(clean("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    let dir = root().join("gateway-ebpf");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    run(clean("rustup")
        .current_dir(&dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--locked",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ])
        .env("CARGO_ENCODED_RUSTFLAGS", flags))?;
    let object = dir.join("target/bpfel-unknown-none/release/gateway");
    if !object.exists() {
        bail!("the build did not produce {}", object.display());
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a cargo build and returns the executables it produced, by target name. (The copies
/// under target/debug are not refreshed when a build with other features is already fresh,
/// so tests use the paths cargo reports.)
fn build_bins(args: &[&str]) -> Result<std::collections::HashMap<String, PathBuf>> {
    let mut cmd = cargo();
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().context("cargo build")?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    let mut bins = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            let is_bin = msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"));
            // `--all-targets` also builds each binary as a test harness: skip those.
            if is_bin && msg["profile"]["test"] == false {
                bins.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    Ok(bins)
}

/// Builds the image of `binary` at `archive` and checks it as a runtime would take it.
fn image_checked(binary: &Path, archive: &Path) -> Result<()> {
    image::build(binary, archive)?;
    image::check(archive, &root().join("policies"))
}

fn is_root() -> bool {
    output_ok(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// The privileged test files that attack the enforcement, item by item of THREATS.md.
const ADVERSARIAL: [&str; 7] = [
    "adversarial",
    "capture",
    "kernel_refusals",
    "lifecycle",
    "faults",
    "http",
    "pods",
];

fn test(suite: Option<&str>, filter: Option<&str>) -> Result<()> {
    let adversarial = match suite {
        None => false,
        Some("adversarial") => true,
        Some(other) => {
            bail!("unknown test suite {other:?}: use `adversarial`, or nothing for every test")
        }
    };
    setup()?;
    build_ebpf()?;
    // Unit tests as released (no test hooks), then the binaries the privileged suite drives,
    // built with the test-only resolver override (mapping API names to local mocks).
    if !adversarial {
        run(cargo().args([
            "test",
            "--locked",
            "-p",
            "gateway-common",
            "-p",
            "gateway-user",
            "-p",
            "xtask",
        ]))?;
    }
    let bins = build_bins(&[
        "build",
        "--locked",
        "--workspace",
        "--all-targets",
        "--features",
        "gateway-user/test-resolver",
    ])?;
    if !is_root() {
        bail!("the privileged tests need root (they load BPF programs and make cgroups)");
    }
    sweep_test_cgroups()?;
    let bin = bins
        .get("tollgate")
        .cloned()
        .context("the build made no tollgate binary")?;
    let probe = bins
        .get("tg-probe")
        .cloned()
        .context("the build made no tg-probe binary")?;
    // Each test's directory (daemon logs, audit log, client output) is kept, and every test
    // secret recorded, for the scan that ends the run.
    let artifacts = std::env::temp_dir().join("tg-test-artifacts");
    let secrets = std::env::temp_dir().join("tg-test-secrets");
    let _ = std::fs::remove_dir_all(&artifacts);
    let _ = std::fs::remove_file(&secrets);
    std::fs::create_dir_all(&artifacts)?;
    // The privileged suite runs in its own mount namespace: its bpffs mounts (and with them
    // every pin and attachment) die with it, even if a test process is killed.
    let mut suite = Command::new("unshare");
    suite
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--locked",
            "-p",
            "tollgate-tests",
            "--features",
            "gateway-user/test-resolver",
        ])
        .args(
            ADVERSARIAL
                .iter()
                .filter(|_| adversarial)
                .flat_map(|t| ["--test", t]),
        )
        .args(["--", "--test-threads=1"])
        .current_dir(root())
        .env("TOLLGATE_BIN", &bin)
        .env("TG_PROBE_BIN", &probe)
        .env("TG_ARTIFACTS", &artifacts)
        .env("TG_SECRETS_FILE", &secrets);
    if let Some(f) = filter {
        suite.arg(f);
    }
    run(&mut suite)?;
    if filter.is_none() && !adversarial {
        run(Command::new(&bin).arg("demo"))?;
        // The image as it ships, from the release build, in a place of its own (an image
        // `cargo xtask image --pgo` made stays).
        let release = build_release(false)?;
        image_checked(&release, &root().join("target/image/test/tollgate-oci.tar"))?;
        fuzz(15)?;
    }
    // Last: no test secret in anything the suite wrote.
    secret_scan(&artifacts, &secrets)
}

/// Fails if any file the privileged suite wrote (logs, audit records, client output) holds
/// the bytes of a test secret. The secrets' own source files (`*.key`) are the exception.
/// Passing removes the artifacts and the list of secrets.
fn secret_scan(artifacts: &Path, secrets_file: &Path) -> Result<()> {
    let secrets: Vec<Vec<u8>> = std::fs::read_to_string(secrets_file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    let mut files = 0;
    let mut found = Vec::new();
    let mut stack = vec![artifacts.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() || path.extension().is_some_and(|e| e == "key") {
                continue;
            }
            let bytes = std::fs::read(&path)?;
            files += 1;
            if secrets
                .iter()
                .any(|s| bytes.windows(s.len()).any(|w| w == s.as_slice()))
            {
                found.push(path.display().to_string());
            }
        }
    }
    if !found.is_empty() {
        bail!(
            "a test secret appears in {} file(s) the suite wrote: {}",
            found.len(),
            found.join(", ")
        );
    }
    println!(
        "secret scan: {} secret(s), {files} file(s) the suite wrote, none contains one",
        secrets.len()
    );
    let _ = std::fs::remove_dir_all(artifacts);
    let _ = std::fs::remove_file(secrets_file);
    Ok(())
}

/// Removes cgroups a killed test run left behind (their processes first). Test cgroups are
/// named `tg-test-*` directly under the cgroup2 mount.
fn sweep_test_cgroups() -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let Some(mount) = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    }) else {
        bail!("no cgroup2 mount: the privileged tests need cgroup v2");
    };
    for entry in std::fs::read_dir(&mount)?.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("tg-test-") {
            continue;
        }
        let top = entry.path();
        eprintln!("xtask: removing leftover test cgroup {}", top.display());
        let _ = std::fs::write(top.join("cgroup.kill"), "1");
        let mut dirs = vec![top];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for d in dirs.iter().rev() {
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

const FUZZ_TARGETS: [&str; 4] = ["policy", "client_hello", "normalize", "raw_head"];

fn fuzz(seconds: u64) -> Result<()> {
    setup()?;
    build_ebpf()?;
    if output_ok(clean("cargo").args(["fuzz", "--version"])).is_none() {
        run(clean("cargo").args(["+stable", "install", "cargo-fuzz", "--locked"]))?;
    }
    let scratch = root().join("fuzz/target/scratch-corpus");
    for target in FUZZ_TARGETS {
        let dir = scratch.join(target);
        std::fs::create_dir_all(&dir)?;
        // The scratch corpus comes first: libFuzzer writes new inputs there, not to the seeds.
        run(clean("cargo")
            .current_dir(root())
            .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", target])
            .arg(&dir)
            .arg(root().join("fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}")))?;
    }
    Ok(())
}

/// The LLM proxies `bench` measures beside Tollgate and nginx, pinned.
const LITELLM_VERSION: &str = "1.108.5";
const PORTKEY_VERSION: &str = "1.15.2";

fn bench_peers_dir() -> PathBuf {
    root().join("target/bench-peers")
}

/// Installs the LLM proxies `bench` compares against, from PyPI and npm only, under
/// target/bench-peers (idempotent: a peer already at its pinned version is left alone).
/// A peer that cannot be installed is reported and its reason left in `<peer>.failed` for
/// the report; the benchmark goes on without it.
fn install_peers() {
    let dir = bench_peers_dir();
    for (name, installed) in [
        ("litellm", install_litellm(&dir)),
        ("portkey", install_portkey(&dir)),
    ] {
        let failed = dir.join(format!("{name}.failed"));
        match installed {
            Ok(()) => {
                let _ = std::fs::remove_file(&failed);
            }
            Err(e) => {
                eprintln!("xtask: {name} not installed, the benchmark goes on without it: {e:#}");
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(&failed, format!("{e:#}"));
            }
        }
    }
}

/// Runs `cmd` with its output captured; a failure carries the last line it wrote to stderr.
fn run_captured(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        bail!(
            "{} failed ({}): {}",
            Path::new(cmd.get_program())
                .file_name()
                .unwrap_or_default()
                .to_string_lossy(),
            out.status,
            last.unwrap_or("no message").trim()
        );
    }
    Ok(())
}

/// LiteLLM's proxy in a virtualenv: target/bench-peers/litellm.
fn install_litellm(dir: &Path) -> Result<()> {
    let venv = dir.join("litellm");
    let python = venv.join("bin/python");
    // Package metadata only: importing litellm would fetch its model cost map.
    let have = output_ok(Command::new(&python).args([
        "-c",
        "import importlib.metadata as m; m.version('uvicorn'); m.version('fastapi'); print(m.version('litellm'))",
    ]));
    if have.as_deref().map(str::trim) == Some(LITELLM_VERSION) && venv.join("bin/litellm").exists()
    {
        return Ok(());
    }
    if !python.exists() {
        std::fs::create_dir_all(dir)?;
        if run_captured(Command::new("python3").arg("-m").arg("venv").arg(&venv)).is_err() {
            // Debian keeps venv (ensurepip) in a package of its own.
            let _ = std::fs::remove_dir_all(&venv);
            run_captured(&mut apt_install(&["python3-venv"]))?;
            run_captured(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        }
    }
    run_captured(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("litellm[proxy]=={LITELLM_VERSION}"),
    ]))
}

/// The Portkey gateway from npm: target/bench-peers/portkey/node_modules.
fn install_portkey(dir: &Path) -> Result<()> {
    let prefix = dir.join("portkey");
    let package = prefix.join("node_modules/@portkey-ai/gateway/package.json");
    let have = std::fs::read_to_string(&package)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    if have.as_deref() == Some(PORTKEY_VERSION) {
        return Ok(());
    }
    if output_ok(Command::new("npm").arg("--version")).is_none() {
        run_captured(&mut apt_install(&["nodejs", "npm"])).context("no npm")?;
    }
    std::fs::create_dir_all(&prefix)?;
    // No install scripts: the package's own only applies patches it does not ship.
    run_captured(
        Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .args([
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--save-exact",
                "--loglevel=error",
                &format!("@portkey-ai/gateway@{PORTKEY_VERSION}"),
            ]),
    )
}

fn bench(only: Option<&str>, rate: Option<u64>, pgo: bool) -> Result<()> {
    if rate.is_some() && !matches!(only, Some("goal" | "goal-new")) {
        bail!("--rate applies to `--only goal` and `--only goal-new`; add one of them, or leave --rate out");
    }
    let report = root().join("target/bench/report.md");
    if only == Some("policy") {
        let section = policy_bench(&root().join("target/criterion"))?;
        return append_section(&report, &section);
    }
    setup()?;
    // The peer measured in the same run: Debian's nginx as a plain reverse proxy.
    // The package must not start a system nginx on port 80: policy-rc.d forbids service
    // starts while it installs.
    if Command::new("nginx").arg("-v").output().is_err() {
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let existed = policy.exists();
        if !existed {
            std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
            std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let installed = run(&mut apt_install(&["nginx-light"]));
        if !existed {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    // The LLM proxies measured in the HTTP part; one that fails to install is reported.
    if only.is_none_or(|o| o == "http") {
        install_peers();
    }
    if !is_root() {
        bail!("the benchmark needs root (it loads BPF programs and makes cgroups)");
    }
    build_ebpf()?;
    // The gateway as it ships (release, LTO); the benchmark's own tools without LTO.
    let tollgate = build_release(pgo)?;
    build_bench_tools()?;
    sweep_test_cgroups()?;
    run(tg_bench(&tollgate, &root().join("target/bench"))
        .args(only)
        .args(rate.map(|r| r.to_string())))?;
    // tg-bench wrote report.md afresh; the policy section goes after its parts.
    if only.is_none() {
        let section = policy_bench(&root().join("target/criterion"))?;
        append_section(&report, &section)?;
    }
    Ok(())
}

/// The benchmark's own tools (tg-bench, tg-probe), without LTO.
fn build_bench_tools() -> Result<()> {
    run(cargo().args([
        "build",
        "--locked",
        "--profile",
        "bench-tools",
        "-p",
        "tollgate-tests",
        "--bins",
    ]))
}

/// `tg-bench` writing to `out`, against the daemon `tollgate`, in a mount namespace of its own.
fn tg_bench(tollgate: &Path, out: &Path) -> Command {
    let tools = root().join("target/bench-tools");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(tools.join("tg-bench"))
        .arg(out)
        .current_dir(root())
        .env("TOLLGATE_BIN", tollgate)
        .env("TG_PROBE_BIN", tools.join("tg-probe"))
        .env("TG_BENCH_PEERS", bench_peers_dir());
    cmd
}

/// Builds the daemon in release (the kernel object built already) and returns its path. With
/// `pgo`: builds it instrumented, runs that build under the benchmark's training load (root,
/// cgroups of its own), merges the profile it wrote on exit with the `llvm-profdata` of
/// rustc's own LLVM (rustup's `llvm-tools`, added if missing: another LLVM's may not read the
/// profile format), and builds it again from the profile. The builds name their target, so
/// the flags reach the daemon's code and not build scripts, in target dirs of their own, so
/// the plain build stays as it is.
fn build_release(pgo: bool) -> Result<PathBuf> {
    let release = [
        "build",
        "--locked",
        "--release",
        "-p",
        "gateway-user",
        "--bins",
    ];
    if !pgo {
        run(cargo().args(release))?;
        return Ok(root().join("target/release/tollgate"));
    }
    if !is_root() {
        bail!("a profile-guided build runs the daemon under load to train it, which needs root (it loads BPF programs and makes cgroups)");
    }
    let (host, profdata) = llvm_profdata()?;
    let dir = root().join("target/pgo");
    let raw = dir.join("raw");
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw).with_context(|| format!("cannot make {}", raw.display()))?;
    let built = |target_dir: &str, flag: String| -> Result<PathBuf> {
        // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS: set it, so no flag from outside
        // replaces the profile's.
        run(cargo()
            .args(release)
            .args(["--target", &host, "--target-dir", target_dir])
            .env_remove("RUSTFLAGS")
            .env("CARGO_ENCODED_RUSTFLAGS", flag))?;
        Ok(root().join(format!("{target_dir}/{host}/release/tollgate")))
    };
    let instrumented = built(
        "target/pgo-generate",
        format!("-Cprofile-generate={}", raw.display()),
    )?;
    build_bench_tools()?;
    sweep_test_cgroups()?;
    run(tg_bench(&instrumented, &dir).arg("train"))?;
    let profiles: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if profiles.is_empty() {
        bail!(
            "the instrumented daemon wrote no profile into {}: it writes one when it exits by itself (on SIGTERM), and only if it was built with -Cprofile-generate",
            raw.display()
        );
    }
    let merged = dir.join("merged.profdata");
    run(Command::new(&profdata)
        .arg("merge")
        .arg("-o")
        .arg(&merged)
        .args(&profiles))?;
    built(
        "target/pgo-use",
        format!("-Cprofile-use={}", merged.display()),
    )
}

/// The host's target triple and the `llvm-profdata` of the toolchain that builds, from
/// rustup's `llvm-tools` component (added if it is missing).
fn llvm_profdata() -> Result<(String, PathBuf)> {
    // The rustc cargo builds with.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version =
        output_ok(Command::new(&rustc).arg("-vV").current_dir(root())).context("rustc -vV")?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host")?
        .to_owned();
    let sysroot = output_ok(
        Command::new(&rustc)
            .args(["--print", "sysroot"])
            .current_dir(root()),
    )
    .context("rustc --print sysroot")?;
    let profdata = Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !profdata.exists() {
        run(Command::new("rustup").args(["component", "add", "llvm-tools"]))
            .context("a profile-guided build needs the llvm-profdata of rustc's own LLVM: install rustup's `llvm-tools` component (or, without rustup, put llvm-profdata of the same LLVM version there)")?;
    }
    if !profdata.exists() {
        bail!(
            "{} is missing after `rustup component add llvm-tools`: the profile cannot be merged",
            profdata.display()
        );
    }
    Ok((host, profdata))
}

/// The criterion benchmarks of gateway-user/benches/policy_decision.rs, as `group/name` and
/// what each one decides, in report order.
const POLICY_BENCHES: [(&str, &str); 7] = [
    (
        "evaluate_request/allow_last_rule",
        "HTTP request allowed by the last of 10 rules",
    ),
    (
        "evaluate_request/deny_no_rule",
        "HTTP request denied after all 10 rules",
    ),
    ("evaluate/ip_allow", "connection to an IP (L4 rule 9 of 10)"),
    (
        "evaluate_sni/passthrough_allow",
        "TLS SNI (passthrough rule 8 of 10)",
    ),
    ("select/late_policy", "choosing the workload's policy alone"),
    (
        "evaluate_request/allow_last_rule_1_policy",
        "the first row with only that policy loaded",
    ),
    ("compile/load_dir_1000", "load and compile all 1,000 files"),
];

/// Runs the policy decision benchmark (criterion, output under `criterion`) and returns its
/// report section.
fn policy_bench(criterion: &Path) -> Result<String> {
    run(cargo()
        .args([
            "bench",
            "--locked",
            "-p",
            "gateway-user",
            "--bench",
            "policy_decision",
        ])
        .env("CRITERION_HOME", criterion))?;
    policy_section(criterion)
}

/// criterion's estimates for the policy benchmarks as a Markdown section.
fn policy_section(criterion: &Path) -> Result<String> {
    let mut md = String::from(
        "## Policy decision (criterion)\n\n\
         1,000 generated policy files (one workload each: container ids, systemd services, \
         shared cgroups narrowed by uid, pod cgroups, services narrowed by exe) of 10 egress \
         rules each (IPv4/IPv6 CIDRs, exact and `*.` hosts, exact, prefix and one-segment path \
         patterns, header conditions), written to a scratch directory and loaded with \
         `PolicySet::load_dir`. Decisions are for the workload of file 993. \
         Reproduce: `cargo bench -p gateway-user --bench policy_decision`.\n\n\
         | benchmark | what | median | 95% CI | mean |\n|---|---|---:|---:|---:|\n",
    );
    for (id, what) in POLICY_BENCHES {
        let file = criterion.join(id).join("new/estimates.json");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let est: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let ns = |stat: &str, field: &str| -> Result<f64> {
            est[stat]
                .pointer(field)
                .and_then(serde_json::Value::as_f64)
                .with_context(|| format!("{}: no {stat}{field}", file.display()))
        };
        md.push_str(&format!(
            "| `{id}` | {what} | {} | {} – {} | {} |\n",
            duration(ns("median", "/point_estimate")?),
            duration(ns("median", "/confidence_interval/lower_bound")?),
            duration(ns("median", "/confidence_interval/upper_bound")?),
            duration(ns("mean", "/point_estimate")?),
        ));
    }
    md.push('\n');
    Ok(md)
}

/// Nanoseconds, in the unit that reads best.
fn duration(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.1} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Adds `section` to the report, in place of a section with the same heading left by an
/// earlier run.
fn append_section(report: &Path, section: &str) -> Result<()> {
    let heading = section.lines().next().unwrap_or_default();
    let mut md = std::fs::read_to_string(report).unwrap_or_default();
    if let Some(start) = md.find(&format!("{heading}\n")) {
        let rest = &md[start + heading.len()..];
        let end = rest
            .find("\n## ")
            .map_or(md.len(), |i| start + heading.len() + i + 1);
        md.replace_range(start..end, "");
    }
    if !md.is_empty() && !md.ends_with("\n\n") {
        md.push_str(if md.ends_with('\n') { "\n" } else { "\n\n" });
    }
    md.push_str(section);
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(report, &md).with_context(|| format!("cannot write {}", report.display()))?;
    print!("{section}");
    Ok(())
}

fn demo() -> Result<()> {
    setup()?;
    build_ebpf()?;
    run(cargo().args(["build", "--locked", "-p", "gateway-user"]))?;
    run(Command::new(root().join("target/debug/tollgate")).arg("demo"))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Test { suite, filter } => test(suite.as_deref(), filter.as_deref()),
        Task::BuildRelease { pgo } => {
            setup()?;
            build_ebpf()?;
            let bin = build_release(pgo)?;
            println!("{}", bin.display());
            Ok(())
        }
        Task::Image { pgo } => {
            setup()?;
            build_ebpf()?;
            let bin = build_release(pgo)?;
            let archive = image::archive_path(&root());
            if is_root() {
                image_checked(&bin, &archive)?;
            } else {
                image::build(&bin, &archive)?;
                eprintln!("xtask: the image is not checked: unpacking it and running the daemon in its root needs root");
            }
            println!("{}", archive.display());
            eprintln!("xtask: load it with `podman load -i {0}`, `ctr -n k8s.io images import {0}` or `skopeo copy oci-archive:{0} docker://REGISTRY/tollgate:latest`", archive.display());
            Ok(())
        }
        Task::Bench { only, rate, pgo } => bench(only.as_deref(), rate, pgo),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Demo => demo(),
    }
}

#[cfg(test)]
mod tests {
    use super::secret_scan;

    #[test]
    fn the_secret_scan_finds_a_leak_and_spares_key_files() {
        let base = std::env::temp_dir().join(format!("xtask-leakcheck-{}", std::process::id()));
        let artifacts = base.join("artifacts");
        let secrets = base.join("secrets");
        std::fs::create_dir_all(artifacts.join("tg-test-1-x")).expect("dirs");
        std::fs::write(&secrets, "sk-scan-0123456789\n").expect("secrets");
        std::fs::write(
            artifacts.join("tg-test-1-x/openai.key"),
            "sk-scan-0123456789",
        )
        .expect("key");
        std::fs::write(
            artifacts.join("tg-test-1-x/audit.jsonl"),
            "{\"credential\":\"x\"}\n",
        )
        .expect("audit");
        assert!(
            secret_scan(&artifacts, &secrets).is_ok(),
            "clean files pass"
        );
        assert!(
            !secrets.exists() && !artifacts.exists(),
            "a pass removes what it scanned"
        );
        std::fs::create_dir_all(artifacts.join("tg-test-1-x")).expect("dirs");
        std::fs::write(&secrets, "sk-scan-0123456789\n").expect("secrets");
        std::fs::write(
            artifacts.join("tg-test-1-x/daemon-1.log"),
            "Authorization: Bearer sk-scan-0123456789",
        )
        .expect("log");
        let err = secret_scan(&artifacts, &secrets).expect_err("a leak fails");
        assert!(err.to_string().contains("daemon-1.log"), "{err}");
        assert!(
            !err.to_string().contains("sk-scan"),
            "the error never shows the secret"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}

#[cfg(test)]
mod policy_report_tests {
    use super::{append_section, policy_section, POLICY_BENCHES};

    /// An estimates.json as criterion 0.8 writes it (trimmed to the fields read).
    fn estimates(median: f64) -> String {
        format!(
            r#"{{"mean":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":45277.8,"upper_bound":45344.9}},"point_estimate":45309.7,"standard_error":17.1}},"median":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":{},"upper_bound":{}}},"point_estimate":{median},"standard_error":24.1}},"median_abs_dev":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":70.5,"upper_bound":136.4}},"point_estimate":106.9,"standard_error":17.0}},"slope":null,"std_dev":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":84.3,"upper_bound":162.0}},"point_estimate":123.0,"standard_error":20.7}}}}"#,
            median - 26.0,
            median + 64.0
        )
    }

    #[test]
    fn the_policy_section_reads_criterion_estimates() {
        let base = std::env::temp_dir().join(format!("xtask-criterion-{}", std::process::id()));
        for (id, _) in POLICY_BENCHES {
            let dir = base.join(id).join("new");
            std::fs::create_dir_all(&dir).expect("dirs");
            let median = if id.starts_with("compile/") {
                96_557_000.0
            } else {
                45_286.0
            };
            std::fs::write(dir.join("estimates.json"), estimates(median)).expect("estimates");
        }
        let md = policy_section(&base).expect("section");
        assert!(md.starts_with("## Policy decision (criterion)\n"), "{md}");
        assert!(
            md.contains("| `evaluate_request/allow_last_rule` | HTTP request allowed by the last of 10 rules | 45.29 µs | 45.26 µs – 45.35 µs | 45.31 µs |"),
            "{md}"
        );
        assert!(
            md.contains("| `compile/load_dir_1000` | load and compile all 1,000 files | 96.6 ms |"),
            "{md}"
        );
        assert!(md.contains("cargo bench -p gateway-user --bench policy_decision"));

        // Appended after what tg-bench wrote; a second run replaces its own section only.
        let report = base.join("report.md");
        std::fs::write(&report, "## Capture\n\nrows\n").expect("report");
        append_section(&report, &md).expect("append");
        append_section(&report, &md).expect("append again");
        let text = std::fs::read_to_string(&report).expect("report");
        assert_eq!(text, format!("## Capture\n\nrows\n\n{md}"));
        std::fs::write(&report, format!("## Capture\n\n{md}## HTTP\n\nrows\n")).expect("report");
        append_section(&report, &md).expect("append in the middle");
        let text = std::fs::read_to_string(&report).expect("report");
        assert_eq!(text, format!("## Capture\n\n## HTTP\n\nrows\n\n{md}"));

        std::fs::remove_file(base.join("evaluate/ip_allow/new/estimates.json")).expect("rm");
        let err = policy_section(&base).expect_err("a missing benchmark fails");
        assert!(err.to_string().contains("evaluate/ip_allow"), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
