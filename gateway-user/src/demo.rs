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
/// Where the app thinks the LLM API is (its base URL), and where the mock API really listens.
const LLM_PORT: u16 = 18090;
const LLM_TLS_PORT: u16 = 18443;
const DENIED_PORT: u16 = 18081;

/// Everything the demo made, undone on drop (also when a step fails).
struct Cleanup {
    dir: PathBuf,
    config: PathBuf,
    cgroups: Vec<PathBuf>,
    daemon: Option<Child>,
    /// The daemon mounts bpffs at /sys/fs/bpf, and tracefs at /sys/kernel/tracing, when
    /// missing; the demo unmounts what it caused.
    unmount_bpffs: bool,
    unmount_tracefs: bool,
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
        if self.unmount_tracefs {
            let _ = nix::mount::umount("/sys/kernel/tracing");
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

/// A TLS server configuration with a certificate for `names` from a throwaway CA named
/// `ca_name`, and the CA certificate (PEM): for mocks of APIs, in the demo and in tests.
pub fn throwaway_tls(
    names: &[&str],
    ca_name: &str,
) -> Result<(std::sync::Arc<rustls::ServerConfig>, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let leaf = rcgen::CertificateParams::new(names)?.signed_by(&leaf_key, &ca, &ca_key)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
    Ok((std::sync::Arc::new(tls), ca.pem()))
}

/// A mock of an LLM API on loopback, over TLS with a certificate for 127.0.0.1 from a
/// throwaway CA. It answers chat completions and says whether it received the demo key (it
/// never echoes the key). Returns the CA certificate (PEM).
fn mock_llm(key: String) -> Result<String> {
    let (tls, ca_pem) = throwaway_tls(&["127.0.0.1"], "tollgate demo CA")?;
    let listener = TcpListener::bind(("127.0.0.1", LLM_TLS_PORT))
        .with_context(|| format!("mock LLM port {LLM_TLS_PORT} is busy"))?;
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let Ok(conn) = rustls::ServerConnection::new(std::sync::Arc::clone(&tls)) else {
                continue;
            };
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.trim().to_owned())
                })
            };
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len.min(1 << 20)];
            let _ = s.read_exact(&mut body);
            let key_ok =
                header("authorization").as_deref() == Some(format!("Bearer {key}").as_str());
            let reply = format!(
                "{{\"id\":\"chatcmpl-demo\",\"choices\":[{{\"message\":{{\"role\":\"assistant\",\"content\":\"Hello from the mock LLM\"}}}}],\"mock_received_the_demo_key\":{key_ok},\"usage\":{{\"prompt_tokens\":{len},\"completion_tokens\":6}}}}"
            );
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    Ok(ca_pem)
}

/// A fresh random demo key.
fn demo_key() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!(
        "sk-demo-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn private_file(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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

/// Runs a client in `cgroup`, prints what it got, and returns it (stdout, then stderr).
fn client<S: AsRef<std::ffi::OsStr>>(
    label: &str,
    cgroup: &Path,
    program: &str,
    args: &[S],
) -> Result<Vec<u8>> {
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
    Ok([out.stdout, out.stderr].concat())
}

pub fn run() -> Result<()> {
    let mount = cgroup::cgroup2_mount()?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies"))?;
    let config_path = dir.join("tollgate.yaml");
    let config = crate::config::Config::parse(DEMO_CONFIG, "embedded demo config", &dir)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let unmount_bpffs = !cgroup::is_mounted_at(&mountinfo, "bpf", Path::new("/sys/fs/bpf"));
    let unmount_tracefs =
        !cgroup::is_mounted_at(&mountinfo, "tracefs", Path::new("/sys/kernel/tracing"));
    // Everything the clients received, checked for the key at the end.
    let mut seen = Vec::new();
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        config: config_path.clone(),
        cgroups: Vec::new(),
        daemon: None,
        unmount_bpffs,
        unmount_tracefs,
    };
    std::fs::write(&config_path, DEMO_CONFIG)?;
    std::fs::write(dir.join("policies/demo-app.yaml"), DEMO_POLICY)?;
    let key = demo_key()?;
    private_file(&dir.join("llm.key"), &key)?;
    private_file(
        &dir.join("credentials.yaml"),
        "bindings:\n  - name: demo-llm\n    hosts: [127.0.0.1]\n    inject: { header: Authorization, format: \"Bearer {secret}\" }\n    source: { file: llm.key }\n",
    )?;
    std::fs::write(dir.join("ca.pem"), mock_llm(key.clone())?)?;

    let root = config.roots[0].dir(&mount);
    let app = root.join("app.service");
    let other = root.join("other.service");
    for cg in [&root, &app, &other] {
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
    seen.extend(client(
        "curl (allowed by policy)",
        &app,
        "curl",
        &["-sS", "--max-time", "5", &allowed],
    )?);
    let py_get =
        format!("import urllib.request;print(urllib.request.urlopen('{allowed}').read().decode())");
    seen.extend(client(
        "python3 urllib (allowed by policy)",
        &app,
        "python3",
        &["-c", &py_get],
    )?);
    seen.extend(client(
        "curl (denied by policy)",
        &app,
        "curl",
        &["-sS", "--max-time", "5", &denied],
    )?);
    let py_udp = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ntry:\n  s.sendto(b'leak',('127.0.0.1',9999)); print('sent')\nexcept OSError as e:\n  print('refused:', e)";
    seen.extend(client(
        "python3 UDP to 127.0.0.1:9999 (kernel)",
        &app,
        "python3",
        &["-c", py_udp],
    )?);

    println!("== an LLM API through the gateway (the clients hold no key):");
    let chat = format!("http://127.0.0.1:{LLM_PORT}/v1/chat/completions");
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}]}"#;
    let curl_post = |body: &'static str| {
        [
            "-sS",
            "--max-time",
            "10",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            chat.as_str(),
        ]
    };
    let curl_chat = curl_post(body);
    seen.extend(client(
        "curl POST /v1/chat/completions",
        &app,
        "curl",
        &curl_chat,
    )?);
    let py_chat = format!(
        "import urllib.request\nr=urllib.request.Request('{chat}', data=b'{body}', headers={{'content-type':'application/json'}})\nprint(urllib.request.urlopen(r).read().decode())"
    );
    seen.extend(client(
        "python3 urllib POST /v1/chat/completions",
        &app,
        "python3",
        &["-c", &py_chat],
    )?);
    let other_model = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    seen.extend(client(
        "curl POST, a model not allowed",
        &app,
        "curl",
        &curl_post(other_model),
    )?);
    let files = format!("http://127.0.0.1:{LLM_PORT}/v1/files");
    seen.extend(client(
        "curl POST /v1/files (forbidden path)",
        &app,
        "curl",
        &["-sS", "--max-time", "10", "-d", "{}", &files],
    )?);
    seen.extend(client(
        "curl from other.service (no policy)",
        &other,
        "curl",
        &curl_chat,
    )?);

    let audit_path = config.audit_log.clone();
    let wanted = [
        "\"rule_matched\"",
        "\"no_rule_matched\"",
        "\"kernel_udp_not_dns\"",
        "\"credential\":\"demo-llm\"",
        "\"method_or_path_not_allowed\"",
        "\"model_not_allowed\"",
        "\"tokens_out\":6",
        "\"no_policy_for_workload\"",
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
    let daemon_log = std::fs::read(dir.join("daemon.log")).unwrap_or_default();
    for (what, bytes) in [
        ("the audit log", text.as_bytes()),
        ("the daemon's log", &daemon_log),
        ("what the clients received", &seen),
    ] {
        if memchr::memmem::find(bytes, key.as_bytes()).is_some() {
            bail!("the demo key appeared in {what}");
        }
    }
    println!(
        "== demo complete: connections allowed and denied by policy, one refused in the kernel, LLM calls with an injected key the clients never held, a model not allowed, a forbidden path and an unknown workload denied"
    );
    drop(cleanup);
    Ok(())
}
