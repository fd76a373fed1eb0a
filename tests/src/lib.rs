//! Helpers for the privileged end-to-end tests. Every helper undoes what it made on `Drop`,
//! also when the test fails: cgroups (their processes killed first), bpffs mounts (taking
//! every pin and attachment with them), daemons, temporary directories.
//!
//! The suite must run as root in a private mount namespace (`cargo xtask test` does both).
pub mod chart;
pub mod httpbench;
pub mod peers;
pub mod ssebench;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount, from mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(pre.split_whitespace().nth(4)?))
        })
        .expect("a cgroup2 mount (kernel feature missing: cgroup v2)")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tollgate_bin() -> PathBuf {
    std::env::var_os("TOLLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tollgate"))
}

/// The capabilities the systemd unit leaves the daemon (`CapabilityBoundingSet=` of
/// deploy/tollgate.service), as `setpriv --bounding-set` takes them, less those in `drop`
/// (names such as `CAP_SYS_PTRACE`).
pub fn unit_bounding_set(drop: &[&str]) -> String {
    let unit = include_str!("../../deploy/tollgate.service");
    let kept: Vec<String> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .flat_map(str::split_whitespace)
        .filter(|name| !drop.contains(name))
        .map(|name| format!("+{}", name.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(!kept.is_empty(), "the unit names no CapabilityBoundingSet=");
    format!("-all,{}", kept.join(","))
}

/// Shell commands that confine the file system as deploy/tollgate.service does, run in a mount
/// namespace of the daemon's own: `ProtectSystem=strict` (every mount read-only but /dev,
/// /proc and /sys), `ProtectHome=yes`, `PrivateTmp=yes`, `UMask=0027`, and writable only the
/// unit's `RuntimeDirectory=` (/run/tollgate) and, standing in for its `LogsDirectory=`, the
/// test's directory `dir`, in which all but the audit log, the ready file and the bpffs
/// mounts is read-only (the config and policies, read-only in /etc/tollgate under the unit).
/// The test's directory and the binary's, which the unit's installed daemon would not be
/// in, are carried over where the fresh /tmp or the hidden home directories cover them.
pub fn as_the_unit_confines_it(dir: &Path) -> String {
    let unit = include_str!("../../deploy/tollgate.service");
    for line in [
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RuntimeDirectory=tollgate",
        "LogsDirectory=tollgate",
        "UMask=0027",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "the unit says {line}, which this confinement stands for"
        );
    }
    let covered = ["/tmp", "/home", "/root", "/run/user"];
    let bin_dir = tollgate_bin()
        .parent()
        .expect("the binary's directory")
        .to_owned();
    let mut carried: Vec<PathBuf> = Vec::new();
    for p in [dir.to_owned(), bin_dir] {
        if covered.iter().any(|c| p.starts_with(c)) && !carried.iter().any(|c| p.starts_with(c)) {
            carried.retain(|c| !c.starts_with(&p));
            carried.push(p);
        }
    }
    let hold: String = carried
        .iter()
        .enumerate()
        .map(|(i, p)| format!("mkdir /mnt/{i}; mount --rbind {} /mnt/{i}; ", p.display()))
        .collect();
    let place: String = carried
        .iter()
        .enumerate()
        .map(|(i, p)| format!("mkdir -p {0}; mount --move /mnt/{i} {0}; ", p.display()))
        .collect();
    let read_only: String = std::fs::read_dir(dir)
        .expect("the test's directory")
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name != "audit.jsonl" && name != "ready" && !name.contains("bpffs")
        })
        .map(|e| {
            format!(
                "mount --bind {0} {0}; mount -o remount,bind,ro {0}; ",
                e.path().display()
            )
        })
        .collect();
    let dir = dir.display();
    format!(
        "{{ set -e; umask 027; mkdir -p /run/tollgate; mount --rbind /run/tollgate /run/tollgate; \
         mount --rbind {dir} {dir}; mount -t tmpfs tmpfs /mnt; {hold}\
         mount -t tmpfs tmpfs /tmp; \
         for h in /home /root /run/user; do if [ -d $h ]; then mount -t tmpfs tmpfs $h; fi; done; \
         {place}for h in /home /root /run/user; do if [ -d $h ]; then mount -o remount,ro $h; fi; done; \
         {read_only}for m in $(awk '{{print $5}}' /proc/self/mountinfo | sort -u); do case $m in \
         /dev|/dev/*|/proc|/proc/*|/sys|/sys/*|/tmp|/tmp/*|/home|/home/*|/root|/root/*|/run/user|/run/user/*|\
         /run/tollgate|/run/tollgate/*|{dir}|{dir}/*|/mnt) ;; \
         *) mount -o remount,bind,ro $m ;; esac; done; }}"
    )
}

/// `setpriv` arguments that run what follows as the systemd unit does: with the unit's
/// capability bounding set (root's effective set shrinks to it at exec) and no new privileges.
fn as_the_unit_runs_it() -> [String; 4] {
    [
        "--bounding-set".into(),
        unit_bounding_set(&[]),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

pub fn probe_bin() -> PathBuf {
    std::env::var_os("TG_PROBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tg-probe"))
}

/// Makes `cmd` join `cgroup` in the child, before exec, so every socket it makes is the
/// cgroup's.
pub fn join_before_exec(cmd: &mut Command, cgroup: &Path) {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes())
        .expect("path");
    // SAFETY: only async-signal-safe syscalls in the child.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if r == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A cgroup made by a test, removed (processes killed first) on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self { path }
    }

    pub fn remove(path: &Path) {
        if !path.exists() {
            return;
        }
        let mut dirs = vec![path.to_owned()];
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
        let _ = std::fs::write(path.join("cgroup.kill"), "1");
        for d in dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.exists() && std::fs::remove_dir(d).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        Self::remove(&self.path);
    }
}

/// A bpffs mounted at a test's own directory; unmounting it drops every pin it holds.
struct Bpffs {
    path: PathBuf,
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A bpffs mounted in the host's mount namespace at a test's own directory, as a node's
/// /sys/fs/bpf is: a daemon in a mount namespace made from the host's, as a pod's is, finds it
/// there. Unmounted when dropped, which drops every pin on it (among them the socket guard's,
/// at the cgroup2 root); those a killed run left are unmounted by the next run's first test.
pub struct HostBpffs {
    pub path: PathBuf,
    /// The process of the host's mount namespace it was mounted through.
    host: u32,
}

/// A process of the host's mount namespace (the tests run in one of their own).
fn host_pid() -> u32 {
    gateway_user::hostns::HostProcess::find()
        .expect("a process of the host's mount namespace, for nsenter")
        .pid
}

/// `nsenter` into the mount namespace of `host`.
fn in_mounts_of(host: u32) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["--target", &host.to_string(), "--mount", "--"]);
    c
}

impl HostBpffs {
    pub fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).expect("host bpffs dir");
        let host = host_pid();
        let status = in_mounts_of(host)
            .args(["mount", "-t", "bpf", "bpf"])
            .arg(path)
            .status()
            .expect("run nsenter");
        assert!(
            status.success(),
            "mount a bpffs at {} in the host's mount namespace",
            path.display()
        );
        Self {
            path: path.to_owned(),
            host,
        }
    }

    /// The names under `dir` (relative to the mount) as the host sees them.
    pub fn list(&self, dir: &str) -> Vec<String> {
        let rel = self.path.strip_prefix("/").expect("absolute");
        let root = PathBuf::from(format!("/proc/{}/root", self.host));
        std::fs::read_dir(root.join(rel).join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Unmounts what a killed run's tests left in the host's mount namespace: mounts in a
    /// `tg-test-<pid>-…` directory whose test process is gone (a reused pid keeps one until
    /// the pid is free again).
    fn sweep() {
        let Some(host) = gateway_user::hostns::HostProcess::find().map(|h| h.pid) else {
            return;
        };
        let mountinfo = std::fs::read_to_string(format!("/proc/{host}/mountinfo"))
            .expect("the host's mountinfo");
        let prefix = std::env::temp_dir().join("tg-test-");
        let prefix = prefix.to_string_lossy();
        for point in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
            let Some(owner) = point
                .strip_prefix(&*prefix)
                .and_then(|rest| rest.split('-').next())
                .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if !Path::new("/proc").join(owner).exists() {
                eprintln!("unmounting {point}, left by a killed test run");
                let _ = in_mounts_of(host).args(["umount", "-l", point]).status();
            }
        }
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        let _ = in_mounts_of(self.host)
            .args(["umount", "-l"])
            .arg(&self.path)
            .status();
    }
}

/// How the daemon is started.
#[derive(Clone, Copy)]
enum Launch<'a> {
    /// In the test's mount namespace.
    Direct,
    /// In the test's mount namespace, with every capability root has.
    AsRoot,
    /// In a mount namespace of its own (a copy of the test's) where the shell commands ran
    /// first.
    After(&'a str),
    /// As a DaemonSet pod: in a mount namespace of its own made from the host's, where the
    /// shell commands ran first.
    Pod(&'a str),
}

/// One test's world: an enforced root, a gateway cgroup, its own bpffs, a listener port.
pub struct TestEnv {
    pub name: String,
    pub mount: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub root: Cgroup,
    /// The enforced root: `root` itself, or a cgroup below it (see [`TestEnv::kube`]).
    pub enforced: PathBuf,
    pub gateway_cgroup: PathBuf,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub policies: PathBuf,
    children: Vec<Cgroup>,
    _bpffs: Bpffs,
}

impl TestEnv {
    /// Makes the environment. Panics (never skips) when a needed kernel feature is missing.
    pub fn new(test: &str) -> Self {
        let own = std::fs::read_link("/proc/self/ns/mnt").expect("own mount ns");
        assert!(
            own.as_os_str() != gateway_user::hostns::INIT_MNT_NS,
            "the privileged tests must run in a private mount namespace: use `cargo xtask test`"
        );
        let mount = cgroup2_mount();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(HostBpffs::sweep);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("tg-test-{}-{n}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(dir.join("policies")).expect("test dir");
        let bpffs_path = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs_path).expect("bpffs dir");
        nix::mount::mount(
            Some("bpf"),
            &bpffs_path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs (kernel feature missing: CONFIG_BPF_SYSCALL)");
        let bpffs = Bpffs {
            path: bpffs_path.clone(),
        };
        let root = Cgroup::create(mount.join(format!("{name}.slice")));
        let gateway_cgroup = mount.join(format!("{name}-gw.scope"));
        let port = free_port();
        let config = dir.join("tollgate.yaml");
        let audit = dir.join("audit.jsonl");
        let env = Self {
            name: name.clone(),
            mount,
            dir: dir.clone(),
            port,
            enforced: root.path.clone(),
            root,
            gateway_cgroup,
            config,
            audit,
            policies: dir.join("policies"),
            children: Vec::new(),
            _bpffs: bpffs,
        };
        env.write_config("");
        env
    }

    /// The root's path relative to the cgroup2 mount.
    pub fn root_rel(&self) -> String {
        format!(
            "/{}",
            self.enforced
                .strip_prefix(&self.mount)
                .expect("under the mount")
                .display()
        )
    }

    /// An environment whose enforced root is named like Kubernetes' (`…/kubepods.slice`).
    pub fn kube(test: &str) -> Self {
        let mut env = Self::new(test);
        let kubepods = env.root.path.join("kubepods.slice");
        std::fs::create_dir_all(&kubepods).expect("kubepods.slice");
        env.enforced = kubepods;
        env.write_config("");
        env
    }

    /// Writes the daemon config, with `extra` YAML lines appended.
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "roots: [{root}]\ngateway_cgroup: /{name}-gw.scope\nlistener: {{ port: {port} }}\n\
             dns_resolvers: [\"127.0.0.53:53\"]\npolicies: {policies}\naudit_log: {audit}\n\
             pin_dir: {pins}\nallow_private_bpffs: true\nupstream_bind: 127.0.0.2\n{extra}",
            root = self.root_rel(),
            name = self.name,
            port = self.port,
            policies = self.policies.display(),
            audit = self.audit.display(),
            pins = self.dir.join("bpffs/tollgate").display(),
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Allows the workload `cgroup` (relative to the root) to reach each `addr`.
    pub fn allow(&self, policy: &str, cgroup: &str, addrs: &[SocketAddr]) {
        self.allow_by(
            policy,
            &format!("{{ cgroup: {}/{cgroup} }}", self.root_rel()),
            addrs,
        );
    }

    /// Allows the workload `selector` (a YAML mapping, e.g. `{ pod_uid: ... }`) to reach each `addr`.
    pub fn allow_by(&self, policy: &str, selector: &str, addrs: &[SocketAddr]) {
        let mut text = format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: {policy} }}\nspec:\n  workload: {selector}\n  egress:\n"
        );
        for (i, a) in addrs.iter().enumerate() {
            text.push_str(&format!(
                "    - name: rule-{i}\n      match: {{ cidr: \"{}\", port: {} }}\n",
                a.ip(),
                a.port()
            ));
        }
        std::fs::write(self.policies.join(format!("{policy}.yaml")), text).expect("write policy");
    }

    /// A workload cgroup under the root (nested paths allowed), removed with the env.
    pub fn workload(&mut self, rel: &str) -> PathBuf {
        let path = self.enforced.join(rel);
        self.children.push(Cgroup::create(path.clone()));
        path
    }

    pub fn listener(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the daemon and waits until it enforces.
    pub fn start(&self) -> Daemon {
        Daemon::start(self, Launch::Direct)
            .unwrap_or_else(|log| panic!("daemon did not start: {log}"))
    }

    /// Starts the daemon as root with every capability, not as the systemd unit confines it,
    /// and waits until it enforces.
    pub fn start_as_root(&self) -> Daemon {
        Daemon::start(self, Launch::AsRoot)
            .unwrap_or_else(|log| panic!("daemon did not start: {log}"))
    }

    /// Starts the daemon in a mount namespace of its own, after the shell commands `prelude`
    /// (which must succeed), and waits until it enforces.
    pub fn start_after(&self, prelude: &str) -> Daemon {
        Daemon::start(self, Launch::After(prelude))
            .unwrap_or_else(|log| panic!("daemon did not start after {prelude:?}: {log}"))
    }

    /// Starts the daemon as a DaemonSet pod runs it (a mount namespace of its own made from
    /// the host's), after the shell commands `prelude`, and waits until it enforces; or the
    /// log of a daemon that exited.
    pub fn start_as_pod(&self, prelude: &str) -> Result<Daemon, String> {
        Daemon::start(self, Launch::Pod(prelude))
    }

    /// Has the daemon pin under `bpffs` (the host's) and refuse a bpffs the host does not
    /// have, as in production.
    pub fn pin_on(&self, bpffs: &HostBpffs) {
        let config = std::fs::read_to_string(&self.config).expect("config");
        let config = config
            .replace(
                &self.dir.join("bpffs/tollgate").display().to_string(),
                &bpffs.path.join("tollgate").display().to_string(),
            )
            .replace("allow_private_bpffs: true", "allow_private_bpffs: false");
        let pins = format!("pin_dir: {}", bpffs.path.join("tollgate").display());
        assert!(
            config.contains(&pins) && config.contains("allow_private_bpffs: false"),
            "{pins}, and no private bpffs, in:\n{config}"
        );
        std::fs::write(&self.config, config).expect("write config");
    }

    /// Runs `tollgate` with `args` (after `--config` when `with_config`), returning its output.
    pub fn tollgate(&self, args: &[&str]) -> Output {
        Command::new(tollgate_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run tollgate")
    }

    /// Keeps what a client received in the test directory (`client-output.txt`), for the
    /// secret scan at the end of the suite.
    pub fn keep_client_output(&self, bytes: &[u8]) {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("client-output.txt"))
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.write_all(b"\n")))
            .expect("keep client output");
    }

    /// All audit records so far.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an audit record matching `pred`.
    pub fn wait_record(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(10, what, || self.records().into_iter().find(|r| pred(r)))
    }

    /// Runs the probe with `args` in `cgroup` (or in the test's own cgroup when `None`).
    pub fn probe(&self, cgroup: Option<&Path>, args: &[&str]) -> Value {
        let mut cmd = Command::new(probe_bin());
        cmd.args(args);
        if let Some(cg) = cgroup {
            join_before_exec(&mut cmd, cg);
        }
        let out = cmd.output().expect("run tg-probe");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
    }

    /// Attachment counts per program at the root, from `tollgate status`.
    pub fn attachments(&self) -> Value {
        self.status()["roots"][self.root_rel()].clone()
    }

    /// Per guard program, 1 when this daemon's socket guard is live at the cgroup2 root.
    pub fn guard(&self) -> Value {
        self.status()["guard"].clone()
    }

    fn status(&self) -> Value {
        let out = self.tollgate(&["status"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

impl TestEnv {
    /// The lock and admin socket its daemons left in the host's /run/tollgate: named after
    /// their pin directories, all of which are under the test's directory.
    fn remove_runtime_files(&self) {
        let prefix = format!("{}_", gateway_user::daemon::runtime_stem(&self.dir));
        let Ok(entries) = std::fs::read_dir(gateway_user::daemon::RUNTIME_DIR) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        while let Some(c) = self.children.pop() {
            drop(c);
        }
        Cgroup::remove(&self.root.path);
        Cgroup::remove(&self.gateway_cgroup);
        self.remove_runtime_files();
        // `_bpffs` unmounts after this body; the directory goes once it is unmounted.
        let dir = self.dir.clone();
        let bpffs = dir.join("bpffs");
        let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        // Under `cargo xtask test` the directory (logs, audit, client output) is kept for the
        // secret scan that ends the run.
        if let Some(keep) = std::env::var_os("TG_ARTIFACTS") {
            let _ = std::fs::remove_dir(&bpffs);
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            if std::fs::rename(&dir, keep.join(&self.name)).is_ok() {
                return;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Records a test secret for the scan that ends `cargo xtask test`: no file the suite wrote
/// (other than the secret's own `*.key` source) may contain it.
pub fn register_secret(secret: &str) {
    if let Some(path) = std::env::var_os("TG_SECRETS_FILE") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("secrets file");
        std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).expect("record secret");
    }
}

/// A port nothing uses on 127.0.0.1 or ::1 right now, below the range the kernel picks
/// connections' source ports from (`ip_local_port_range`), so no connection made before it is
/// bound can take it; each call tries the next one.
pub fn free_port() -> u16 {
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let above: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = above.saturating_sub(LOWEST).max(1);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(LOWEST + start.wrapping_add(i) % span).expect("a port");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1 and ::1 from {LOWEST} to {above}");
}

/// A running `tollgate run`, killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon as `launch` says: through `setpriv` as the systemd unit confines its
    /// capabilities (but `Launch::AsRoot`), and checks it kept only those it needs. `setpriv`
    /// and the shell of a prelude `exec` it, so the daemon is the process started.
    fn start(env: &TestEnv, launch: Launch) -> Result<Self, String> {
        let ready = env.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let log = env
            .dir
            .join(format!("daemon-{}.log", SEQ.fetch_add(1, Ordering::SeqCst)));
        // Every daemon runs with the unit's capabilities only, so every test shows they are
        // enough.
        let confined = as_the_unit_runs_it();
        let in_own_mount_ns = |c: &mut Command, prelude: &str| {
            c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(format!("{prelude} && exec setpriv \"$@\""))
                .arg("sh")
                .args(&confined)
                .arg(tollgate_bin());
        };
        let mut command = match launch {
            Launch::AsRoot => Command::new(tollgate_bin()),
            Launch::Direct => {
                let mut c = Command::new("setpriv");
                c.args(&confined).arg(tollgate_bin());
                c
            }
            Launch::After(prelude) => {
                let mut c = Command::new("unshare");
                in_own_mount_ns(&mut c, prelude);
                c
            }
            Launch::Pod(prelude) => {
                let mut c = in_mounts_of(host_pid());
                c.arg("unshare");
                in_own_mount_ns(&mut c, prelude);
                c
            }
        };
        let child = command
            .args(["run", "--config"])
            .arg(&env.config)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn tollgate");
        let mut d = Self {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!(
                        "exited {status}: {}",
                        std::fs::read_to_string(&d.log).unwrap_or_default()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err("not ready in 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d.assert_keeps_only_what_it_needs(env.port, matches!(launch, Launch::AsRoot));
        Ok(d)
    }

    /// Every thread of the daemon holds exactly the capabilities it needs with `port` (none
    /// inheritable or ambient) and can gain no more; its bounding set is the unit's when
    /// `setpriv` gave it that, or what it needs when it started with every capability.
    fn assert_keeps_only_what_it_needs(&self, port: u16, unconfined: bool) {
        let caps = gateway_user::caps::ALWAYS
            .iter()
            .chain([&gateway_user::caps::LOW_PORT]);
        let mask = |names: &[String]| -> u64 {
            names
                .iter()
                .map(|name| {
                    let known = caps
                        .clone()
                        .find(|c| c.name == name)
                        .unwrap_or_else(|| panic!("{name} is not one the daemon uses"));
                    1 << known.bit
                })
                .fold(0, |a, b| a | b)
        };
        let needed = mask(
            &gateway_user::caps::needed(port)
                .iter()
                .map(|c| c.name.to_owned())
                .collect::<Vec<_>>(),
        );
        let unit: Vec<String> = unit_bounding_set(&[])
            .split(',')
            .filter_map(|n| n.strip_prefix('+'))
            .map(|n| format!("CAP_{}", n.to_ascii_uppercase()))
            .collect();
        let bounding = if unconfined { needed } else { mask(&unit) };
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("tasks");
        let mut threads = 0;
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            let set = |name: &str| u64::from_str_radix(&field(name), 16).expect(name);
            let tid = task.file_name();
            assert_eq!(set("CapEff:"), needed, "thread {tid:?}: CapEff");
            assert_eq!(set("CapPrm:"), needed, "thread {tid:?}: CapPrm");
            assert_eq!(set("CapInh:"), 0, "thread {tid:?}: CapInh");
            assert_eq!(set("CapAmb:"), 0, "thread {tid:?}: CapAmb");
            assert_eq!(set("CapBnd:"), bounding, "thread {tid:?}: CapBnd");
            assert_eq!(field("NoNewPrivs:"), "1", "thread {tid:?}");
            threads += 1;
        }
        assert!(threads > 1, "the daemon's threads were read ({threads})");
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map_or(0, |c| i32::try_from(c.id()).unwrap_or(0))
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait, at most 30 s; then SIGKILL (a daemon that does not stop is never
    /// waited for without end).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(c.try_wait(), Ok(None)) {
                eprintln!("the daemon did not stop within 30 s of SIGTERM: killed");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback HTTP-ish upstream that records who connected.
pub struct Mock {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Mock {
    pub fn start(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("mock bind {bind}: {e}"));
        let addr = listener.local_addr().expect("addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&peers);
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                if let Ok(p) = s.peer_addr() {
                    seen.lock().expect("peers").push(p);
                }
                std::thread::spawn(move || {
                    let mut s = s;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf);
                    let body = format!("mock {addr}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        Self { addr, peers }
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// Spawns a long-running command in `cgroup`; returns it, its stdout, and its first line.
pub fn spawn_in(
    cgroup: &Path,
    program: &Path,
    args: &[&str],
) -> (Child, BufReader<std::process::ChildStdout>, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    join_before_exec(&mut cmd, cgroup);
    let mut child = cmd.spawn().expect("spawn");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("first line");
    (child, reader, line)
}

/// Lets a probe started with [`spawn_in`] go on (it waits for `go` to exist) and returns the
/// JSON line it ends with.
pub fn release(
    mut child: Child,
    mut out: BufReader<std::process::ChildStdout>,
    go: &Path,
) -> Value {
    std::fs::write(go, "").expect("go");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).expect("probe output");
    let _ = child.wait();
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
}

/// Runs `program args` in `cgroup`, returning its output.
pub fn run_in(cgroup: &Path, program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    join_before_exec(&mut cmd, cgroup);
    cmd.output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// A "pod": a network namespace of its own (loopback up), named like a runtime's sandbox.
pub struct Pod {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

impl Pod {
    /// Makes the namespace; `cgroup` is the workload cgroup its containers run in.
    pub fn new(env: &TestEnv, label: &str, cgroup: PathBuf) -> Self {
        let name = format!("{}-{label}", env.name);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add")
            .success();
        assert!(
            ok,
            "ip netns add {name} (kernel feature missing: network namespaces)"
        );
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .expect("ip link")
            .success();
        assert!(ok, "bring lo up in {name}");
        Self {
            netns: PathBuf::from("/run/netns").join(&name),
            name,
            cgroup,
        }
    }

    /// Runs `program args` in the pod: its cgroup (joined before exec) and its namespace.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(program)
            .args(args);
        join_before_exec(&mut cmd, &self.cgroup);
        cmd.output()
            .unwrap_or_else(|e| panic!("nsenter {program}: {e}"))
    }

    /// Runs the probe in the pod and parses its JSON line.
    pub fn probe(&self, args: &[&str]) -> Value {
        let probe = probe_bin();
        let out = self.run(probe.to_str().expect("path"), args);
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Mock {
    /// A mock listening inside the network namespace at `netns`.
    pub fn start_in(netns: &Path, bind: &str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.to_owned();
        let bind = bind.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&netns).expect("netns file");
            // SAFETY: setns on this thread only.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            tx.send(Mock::start(&bind)).expect("send mock");
        });
        rx.recv().expect("mock in netns")
    }
}

/// A TLS server configuration with a certificate for `names` (DNS names or IP addresses)
/// from a throwaway CA; returns it and the CA certificate (PEM) to trust.
pub fn tls_server(names: &[&str]) -> (Arc<rustls::ServerConfig>, String) {
    gateway_user::demo::throwaway_tls(names, "tollgate test CA").expect("test TLS server")
}

/// A TLS "API" upstream with a certificate for `name` from a throwaway CA. It answers:
/// `/…/echo` with every request header in the body (an upstream that echoes credentials);
/// `/…/events` with a server-sent event stream whose second event waits for `go` to exist;
/// `/…/redirect` with a 302 to another host; `/…/slow-MS` like anything else, MS ms late;
/// anything else with JSON naming the path, host and the sha256 of the Authorization header
/// (never the header itself).
pub struct TlsApi {
    pub addr: SocketAddr,
    pub ca_pem: String,
    requests: Arc<Mutex<Vec<String>>>,
    /// Bytes written so far on `/endless` streams.
    endless: Arc<std::sync::atomic::AtomicU64>,
}

impl TlsApi {
    pub fn start(names: &[&str], go: PathBuf) -> Self {
        use sha2::{Digest, Sha256};
        let (config, ca_pem) = tls_server(names);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let endless = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let endless_written = Arc::clone(&endless);
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                let seen = Arc::clone(&seen);
                let go = go.clone();
                let endless_written = Arc::clone(&endless_written);
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = tls.read_exact(&mut body);
                    seen.lock().expect("requests").push(head.clone());
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let header = |n: &str| {
                        head.lines().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(n).then(|| v.trim().to_owned())
                        })
                    };
                    if path.ends_with("/events") {
                        let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                        let chunk = |t: &mut rustls::StreamOwned<
                            rustls::ServerConnection,
                            std::net::TcpStream,
                        >,
                                     s: &str| {
                            let _ = write!(t, "{:x}\r\n{s}\r\n", s.len());
                            let _ = t.flush();
                        };
                        chunk(&mut tls, "data: first\n\n");
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while !go.exists() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        chunk(&mut tls, "data: second\n\n");
                        let _ = tls.write_all(b"0\r\n\r\n");
                        let _ = tls.flush();
                        return;
                    }
                    if path.ends_with("/endless") {
                        // An event stream that never ends: events as fast as the reader
                        // takes them, until a write fails.
                        let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                        let event = format!("data: {}\n\n", "x".repeat(16 * 1024));
                        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                        while tls.write_all(chunk.as_bytes()).is_ok() && tls.flush().is_ok() {
                            endless_written.fetch_add(
                                chunk.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                        return;
                    }
                    // `/…/slow-MS`: the answer comes MS milliseconds late (a slow first byte).
                    if let Some(ms) = path
                        .rsplit('/')
                        .next()
                        .and_then(|last| last.strip_prefix("slow-"))
                        .and_then(|ms| ms.parse().ok())
                    {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    if path.ends_with("/redirect") {
                        let _ = tls.write_all(b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/steal\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        let _ = tls.flush();
                        return;
                    }
                    let reply = if path.ends_with("/echo") {
                        head.clone()
                    } else {
                        let auth = header("authorization").map(|a| {
                            Sha256::digest(a.as_bytes())
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<String>()
                        });
                        let mut answer = serde_json::json!({ "path": path, "host": header("host"), "auth_sha256": auth, "body_len": len });
                        // As an LLM API counts tokens: here, the request's bytes in and 7 out.
                        if path.ends_with("/responses") {
                            answer["usage"] =
                                serde_json::json!({ "input_tokens": len, "output_tokens": 7 });
                        }
                        answer.to_string()
                    };
                    let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        Self {
            addr,
            ca_pem,
            requests,
            endless,
        }
    }

    /// Bytes written so far on `/endless` streams.
    pub fn endless_bytes(&self) -> u64 {
        self.endless.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The request heads the upstream received.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}
