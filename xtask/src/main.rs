//! Project tasks: `setup`, `build-ebpf`, `test`, `demo`.
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
    /// Setup, build, then run every test: unit, privileged end-to-end, the demo and a short
    /// fuzz run. `test adversarial`: only the privileged suites that attack the enforcement
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
        /// Only this part of the report: `capture` (connect, programs, identity) or `http`.
        #[arg(long)]
        only: Option<String>,
    },
    /// Setup, build, then run the demo.
    Demo,
}

const APT_PACKAGES: [&str; 5] = [
    "llvm-22-dev",
    "libclang-22-dev",
    "curl",
    "python3",
    "iproute2",
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
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
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

fn is_root() -> bool {
    output_ok(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// The privileged test files that attack the enforcement, item by item of THREATS.md.
const ADVERSARIAL: [&str; 6] = [
    "adversarial",
    "capture",
    "kernel_refusals",
    "lifecycle",
    "faults",
    "http",
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

fn bench(only: Option<&str>) -> Result<()> {
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
        let installed = run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "nginx-light",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if !existed {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    build_ebpf()?;
    run(cargo().args([
        "build",
        "--locked",
        "--release",
        "-p",
        "gateway-user",
        "-p",
        "tollgate-tests",
        "--bins",
    ]))?;
    if !is_root() {
        bail!("the benchmark needs root (it loads BPF programs and makes cgroups)");
    }
    sweep_test_cgroups()?;
    let release = root().join("target/release");
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(release.join("tg-bench"))
        .arg(root().join("target/bench"))
        .args(only)
        .current_dir(root())
        .env("TOLLGATE_BIN", release.join("tollgate"))
        .env("TG_PROBE_BIN", release.join("tg-probe")))
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
        Task::Bench { only } => bench(only.as_deref()),
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
