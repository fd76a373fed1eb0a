//! `tollgate demo`: the gateway on the embedded default config, its own enforced root, local
//! mock services, and unmodified clients (curl, python3) in a workload cgroup under the root.
//! Prints the audit lines, then removes everything it made.
use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{cgroup, config::DEMO_CONFIG};

const DEMO_POLICY: &str = include_str!("../../policies/demo-app.yaml");
const ALLOWED_PORT: u16 = 18080;
const DENIED_PORT: u16 = 18081;

/// Everything the demo made, undone on drop (also when a step fails).
struct Cleanup {
    dir: PathBuf,
    config: PathBuf,
    cgroups: Vec<PathBuf>,
    daemon: Option<Child>,
    /// The daemon mounts bpffs at /sys/fs/bpf when missing; the demo unmounts what it caused.
    unmount_bpffs: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(d.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && d.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Ok(exe) = std::env::current_exe() {
            let _ = Command::new(exe)
                .args(["uninstall", "--config"])
                .arg(&self.config)
                .stdout(Stdio::null())
                .status();
        }
        for cg in self.cgroups.iter().rev() {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(2);
            while std::fs::remove_dir(cg).is_err() && cg.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.unmount_bpffs {
            let _ = nix::mount::umount("/sys/fs/bpf");
        }
    }
}

/// A tiny HTTP service on loopback that answers every request with `body`.
fn mock(port: u16, body: &'static str) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("mock service port {port} is busy"))?;
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

fn in_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes())
        .unwrap_or_default();
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn client(label: &str, cgroup: &Path, program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    in_cgroup(&mut cmd, cgroup);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {program}: install it"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().replace('\n', " | ");
    println!(
        "  {label:<44} exit {:<3} {}{}",
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        if out.stderr.is_empty() {
            String::new()
        } else {
            format!(" [{}]", text(&out.stderr))
        }
    );
    Ok(())
}

pub fn run() -> Result<()> {
    let mount = cgroup::cgroup2_mount()?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies"))?;
    let config_path = dir.join("tollgate.yaml");
    let config = crate::config::Config::parse(DEMO_CONFIG, "embedded demo config", &dir)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let unmount_bpffs = !cgroup::is_mounted_at(&mountinfo, "bpf", Path::new("/sys/fs/bpf"));
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        config: config_path.clone(),
        cgroups: Vec::new(),
        daemon: None,
        unmount_bpffs,
    };
    std::fs::write(&config_path, DEMO_CONFIG)?;
    std::fs::write(dir.join("policies/demo-app.yaml"), DEMO_POLICY)?;

    let root = config.roots[0].dir(&mount);
    let app = root.join("app.service");
    for cg in [&root, &app] {
        std::fs::create_dir_all(cg)
            .with_context(|| format!("cannot create cgroup {}", cg.display()))?;
        cleanup.cgroups.push(cg.clone());
    }
    cleanup.cgroups.push(config.gateway_cgroup.dir(&mount));
    mock(ALLOWED_PORT, "inventory: 3 items\n")?;
    mock(DENIED_PORT, "admin console\n")?;

    println!(
        "== tollgate demo: root {}, workload {}/app.service",
        config.roots[0], config.roots[0]
    );
    let ready = dir.join("ready");
    let exe = std::env::current_exe()?;
    let daemon = Command::new(exe)
        .args(["run", "--config"])
        .arg(&config_path)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log"))?)
        .spawn()?;
    cleanup.daemon = Some(daemon);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        if let Some(d) = cleanup.daemon.as_mut() {
            if let Some(status) = d.try_wait()? {
                let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
                bail!("the daemon exited ({status}): {log}");
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon did not become ready in 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    println!("== clients in {}:", app.display());
    let allowed = format!("http://127.0.0.1:{ALLOWED_PORT}/items");
    let denied = format!("http://127.0.0.1:{DENIED_PORT}/admin");
    client(
        "curl (allowed by policy)",
        &app,
        "curl",
        &["-sS", "--max-time", "5", &allowed],
    )?;
    let py_get =
        format!("import urllib.request;print(urllib.request.urlopen('{allowed}').read().decode())");
    client(
        "python3 urllib (allowed by policy)",
        &app,
        "python3",
        &["-c", &py_get],
    )?;
    client(
        "curl (denied by policy)",
        &app,
        "curl",
        &["-sS", "--max-time", "5", &denied],
    )?;
    let py_udp = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ntry:\n  s.sendto(b'leak',('127.0.0.1',9999)); print('sent')\nexcept OSError as e:\n  print('refused:', e)";
    client(
        "python3 UDP to 127.0.0.1:9999 (kernel)",
        &app,
        "python3",
        &["-c", py_udp],
    )?;

    let audit_path = config.audit_log.clone();
    let wanted = [
        "\"rule_matched\"",
        "\"no_rule_matched\"",
        "\"kernel_udp_not_dns\"",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
        if wanted.iter().all(|w| text.contains(w)) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("== audit records ({}):", audit_path.display());
    for line in text
        .lines()
        .filter(|l| !l.contains("\"layer\":\"lifecycle\""))
    {
        println!("{line}");
    }
    let missing: Vec<_> = wanted.iter().filter(|w| !text.contains(*w)).collect();
    if !missing.is_empty() {
        bail!("expected audit records missing: {missing:?}");
    }
    println!(
        "== demo complete: one connection allowed, one denied by policy, one refused in the kernel"
    );
    drop(cleanup);
    Ok(())
}
