//! `tollgate run`: preflight checks, the gateway's own cgroup, the listener, the kernel side
//! (adopting pins from a previous run), then serving. Any failure before serving undoes what
//! this run created, so nothing is left half-attached.
use std::{
    collections::HashSet,
    fs,
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use gateway_common::{
    ip4_word, ip6_words, AcceptedKey, CarriedKey, CarriedMark, Config as KernelConfig, Resolver,
    AF_INET, AF_INET6,
};

use crate::{
    audit::{AuditLog, AuditRecord, Layer, Verdict, WorkloadRecord},
    cgroup,
    config::{Config, SocketGuard},
    credentials::Credentials,
    ebpf::{self, Kernel},
    events, hostns,
    namespaces::{Namespaces, SettleQueue},
    netns::Netns,
    policy::PolicySet,
    proxy::{self, Gateway},
    sockdiag,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("enforced root {path} does not exist: create it (or fix `roots` in the config)")]
    NoRoot { path: PathBuf },
    #[error("this kernel has no BPF syscall or we lack the privilege for it ({0}): run as root on a kernel with CONFIG_BPF_SYSCALL")]
    NoBpf(std::io::Error),
    #[error("no BTF at /sys/kernel/btf/vmlinux: the kernel needs CONFIG_DEBUG_INFO_BTF")]
    NoBtf,
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("tollgate runs in a pid namespace of its own ({0}): the kernel records the host's pids for every connection and this /proc cannot show them, so no workload's identity could be verified. Run it with the host's pids (for Kubernetes: hostPID: true)")]
    PidNamespace(String),
    #[error("tollgate lacks capabilities it needs: {0}. Run it as root with them (systemd: keep them in CapabilityBoundingSet=, as deploy/tollgate.service does; Kubernetes: privileged: true, as deploy/daemonset.yaml does)")]
    Capabilities(String),
    #[error("cannot drop the capabilities the daemon does not need: {0}")]
    KeepCapabilities(std::io::Error),
    #[error("socket guard: {0}")]
    SocketGuard(String),
    #[error("another tollgate is running with pin dir {pin_dir} (lock {lock}): stop it first")]
    AlreadyRunning { pin_dir: PathBuf, lock: PathBuf },
    #[error("cannot create {path}: {source} (the daemon keeps its lock and admin socket in /run/tollgate, which must be writable to it: the systemd unit's RuntimeDirectory=tollgate makes it so)")]
    Runtime {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway cgroup {path}: {message}")]
    GatewayCgroup { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {source} (is another process using the listener port?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the admin socket {path}: {source}")]
    Admin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("upstream TLS: {0}")]
    Tls(#[from] crate::upstream::TlsSetupError),
    #[error("policies: {0}")]
    Policy(String),
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything checked before the kernel is touched.
struct Preflight {
    cgroup_mount: PathBuf,
    policies: PolicySet,
    credentials: Credentials,
}

fn preflight(config: &Config) -> Result<Preflight, RunError> {
    check_host_pids()?;
    check_capabilities(config.listener_port)?;
    let policies = PolicySet::load_dir(&config.policies).map_err(|errs| {
        RunError::Policy(
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let credentials = match &config.credentials {
        Some(path) => Credentials::load(path).map_err(|e| RunError::Credentials(e.to_string()))?,
        None => Credentials::default(),
    };
    check_bindings(&policies, &credentials).map_err(RunError::Policy)?;
    let cgroup_mount = cgroup::cgroup2_mount()?;
    for root in &config.roots {
        let dir = root.dir(&cgroup_mount);
        if !dir.is_dir() {
            return Err(RunError::NoRoot { path: dir });
        }
    }
    // BPF: a harmless query on the cgroup root tells whether bpf(2) works for us.
    let root = fs::File::open(&cgroup_mount)?;
    crate::bpf_sys::query_cgroup(std::os::fd::AsFd::as_fd(&root), 2).map_err(RunError::NoBpf)?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(RunError::NoBtf);
    }
    Ok(Preflight {
        cgroup_mount,
        policies,
        credentials,
    })
}

/// Every credential a rule names must exist and be bound to that rule's host.
pub fn check_bindings(policies: &PolicySet, credentials: &Credentials) -> Result<(), String> {
    for (policy, rule, name) in policies.credential_names() {
        let Some(binding) = credentials.get(name) else {
            return Err(format!(
                "{}: rule {:?} uses credential {name:?}, which the credentials file does not define",
                policy.file.display(),
                rule.name
            ));
        };
        if let crate::policy::RuleKind::Host(h) = &rule.kind {
            // The caller's credential headers and the injected one are replaced after the
            // decision: a condition on them would judge a value that never goes upstream.
            let injected = match &binding.inject {
                crate::credentials::Inject::Header { name, .. } => Some(name),
                crate::credentials::Inject::Query { .. } => None,
            };
            if let Some(replaced) = h
                .required_headers()
                .find(|n| crate::http_proxy::is_replaced(n, injected))
            {
                return Err(format!(
                    "{}: rule {:?} requires header {replaced}, which the gateway replaces with \
                     credential {name:?}: the condition would judge the caller's value, which \
                     never goes upstream; remove it",
                    policy.file.display(),
                    rule.name
                ));
            }
            if !h.host.as_str().starts_with("*.") && !binding.allows_host(h.host.as_str()) {
                return Err(format!(
                    "{}: rule {:?} sends credential {name:?} to {}, which the binding does not list in `hosts`",
                    policy.file.display(),
                    rule.name,
                    h.host.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// Makes sure the pin directory is on a bpffs the host has (in its mount namespace, or mounted
/// into this one), mounting bpffs at /sys/fs/bpf if nothing is there, so pins outlive this
/// process.
fn ensure_bpffs(config: &Config) -> Result<(), RunError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let parent = config.pin_dir.parent().unwrap_or(Path::new("/"));
    let on_bpffs = |mi: &str| {
        parent
            .ancestors()
            .any(|a| cgroup::is_mounted_at(mi, "bpf", a))
    };
    if !on_bpffs(&mountinfo) {
        if parent != Path::new("/sys/fs/bpf") {
            return Err(RunError::Bpffs(format!(
                "{} is not on a bpffs: mount one there (mount -t bpf bpf {}) or use a pin_dir under /sys/fs/bpf",
                parent.display(),
                parent.display()
            )));
        }
        nix::mount::mount(Some("bpf"), "/sys/fs/bpf", Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| RunError::Bpffs(format!("cannot mount bpffs at /sys/fs/bpf: {e}: mount it (mount -t bpf bpf /sys/fs/bpf) and retry")))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    if !config.allow_private_bpffs && !pins_reach_host(&config.pin_dir) {
        return Err(RunError::Bpffs(format!(
            "tollgate runs in a private mount namespace and the bpffs at {} is not the one the host has at that path: pins would die with it and enforcement would stop. \
             Run it in the host's mount namespace, or mount the host's bpffs at the same path (for systemd: mount it on the host before the unit starts, as systemd itself does at boot, so the unit's namespace sees it; for Kubernetes: hostPID, and /sys/fs/bpf as a hostPath volume with Bidirectional propagation)",
            config.pin_dir.display()
        )));
    }
    Ok(())
}

/// Whether pins at `pin_dir` (on a bpffs) outlive this process: it shares the host's mount
/// namespace, or the filesystem at `pin_dir` is the very one a process of the host's namespace
/// has at that path (a pod's own mount namespace with the host's /sys/fs/bpf mounted in). A
/// bpffs mounted in a private namespace is a filesystem of its own, gone with the namespace.
/// [`check_host_pids`] has made sure /proc shows the host's processes. What cannot be read
/// counts as not the host's.
fn pins_reach_host(pin_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let host = hostns::HostProcess::find();
    if hostns::in_host_mount_ns(host.as_ref()).unwrap_or(false) {
        return true;
    }
    // The pin directory may not exist yet: its nearest ancestor that does is on the same
    // filesystem (ensure_bpffs found the bpffs mounted at or above it).
    let (Some(host), Some(existing)) = (host, pin_dir.ancestors().find(|a| a.exists())) else {
        return false;
    };
    let ours = fs::metadata(existing).map(|m| m.dev());
    let theirs = host.dev_at(existing);
    match (ours, theirs) {
        (Ok(ours), Ok(theirs)) => ours == theirs,
        (ours, theirs) => {
            tracing::warn!(path = %existing.display(), host_pid = host.pid, ours = ?ours.err(), host = ?theirs.err(), "cannot compare the pin directory's filesystem with the host's");
            false
        }
    }
}

/// Every capability the daemon will use is in its effective set (see [`crate::caps`]).
fn check_capabilities(port: u16) -> Result<(), RunError> {
    let missing = crate::caps::missing(crate::caps::effective()?, &crate::caps::needed(port));
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RunError::Capabilities(crate::caps::describe(&missing)))
    }
}

/// Refuses a pid namespace other than the host's: the kernel records the host's pids for every
/// connection, and a /proc of another namespace cannot show those processes, so no workload's
/// executable could be verified and `exe` selectors would never match.
fn check_host_pids() -> Result<(), RunError> {
    /// The initial pid namespace's fixed inode number (`PROC_PID_INIT_INO`).
    const INIT_PID_NS: &str = "pid:[4026531836]";
    let own = fs::read_link("/proc/self/ns/pid")?;
    if own.as_os_str() != INIT_PID_NS {
        return Err(RunError::PidNamespace(own.display().to_string()));
    }
    Ok(())
}

/// Where the kernel offers tracefs; the socket guard's syscall tracepoints are attached through it.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Mounts tracefs at /sys/kernel/tracing when the socket guard needs it and the host has not
/// (a minimal VM or a fresh node often has not), as it mounts bpffs. Nothing is mounted over a
/// place something else already occupies: attaching then fails with an error that says what
/// the guard needs.
fn ensure_tracefs(config: &Config) -> Result<(), RunError> {
    if config.socket_guard == SocketGuard::Off {
        return Ok(());
    }
    let populated = |place: &str| {
        fs::read_dir(place)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    };
    if TRACEFS.iter().any(|place| populated(place)) {
        return Ok(());
    }
    let place = Path::new(TRACEFS[0]);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let occupied = mountinfo
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(TRACEFS[0]));
    if occupied || !place.is_dir() {
        return Ok(());
    }
    nix::mount::mount(Some("tracefs"), place, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| RunError::SocketGuard(format!(
            "cannot mount tracefs at {}: {e}: mount it (mount -t tracefs tracefs {}), or set `socket_guard: off` \
             (a socket created outside every root and used inside one then goes around enforcement)",
            place.display(),
            place.display()
        )))?;
    tracing::info!("mounted tracefs at {}", place.display());
    Ok(())
}

/// Where an instance keeps its lock and admin socket.
pub const RUNTIME_DIR: &str = "/run/tollgate";

/// The name an instance's files under [`RUNTIME_DIR`] share: `path` with every character but
/// ASCII letters and digits as `_`.
pub fn runtime_stem(path: &Path) -> String {
    path.display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A per-instance file under /run/tollgate (lock, admin socket), named after the pin dir.
pub fn runtime_path(config: &Config, ext: &str) -> PathBuf {
    let name = runtime_stem(&config.pin_dir);
    Path::new(RUNTIME_DIR).join(format!("{name}.{ext}"))
}

/// Holds an exclusive lock for this pin directory while the daemon runs.
fn lock(config: &Config) -> Result<fs::File, RunError> {
    let path = runtime_path(config, "lock");
    let runtime_error = |source| RunError::Runtime {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(runtime_error)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(runtime_error)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(RunError::AlreadyRunning {
            pin_dir: config.pin_dir.clone(),
            lock: path,
        });
    }
    Ok(file)
}

/// Moves this process into its own leaf cgroup and checks nothing else lives there.
fn enter_gateway_cgroup(config: &Config, mount: &Path) -> Result<u64, RunError> {
    let dir = config.gateway_cgroup.dir(mount);
    let err = |message: String| RunError::GatewayCgroup {
        path: dir.clone(),
        message,
    };
    fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create it: {e}")))?;
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| err(format!("cannot move the daemon into it: {e}")))?;
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    let others: Vec<i32> = cgroup::procs(&dir)
        .into_iter()
        .filter(|p| *p != me)
        .collect();
    if !others.is_empty() {
        return Err(err(format!(
            "it also holds pids {others:?}: give the gateway a cgroup of its own"
        )));
    }
    cgroup::cgroup_id(&dir).map_err(|e| err(e.to_string()))
}

fn kernel_config(config: &Config, gateway_cgroup_id: u64) -> KernelConfig {
    let mut resolvers = [Resolver::default(); gateway_common::MAX_RESOLVERS];
    for (slot, r) in resolvers.iter_mut().zip(&config.dns_resolvers) {
        *slot = match r.ip() {
            IpAddr::V4(v4) => Resolver {
                addr: [ip4_word(v4.octets()), 0, 0, 0],
                port: r.port(),
                family: AF_INET,
                _pad: 0,
            },
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Resolver {
                    addr: [ip4_word(v4.octets()), 0, 0, 0],
                    port: r.port(),
                    family: AF_INET,
                    _pad: 0,
                },
                None => Resolver {
                    addr: ip6_words(v6.octets()),
                    port: r.port(),
                    family: AF_INET6,
                    _pad: 0,
                },
            },
        };
    }
    let task_start_offset = crate::btf::task_start_boottime_offset().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no task start time from BTF: pid-reuse checks will refuse enrichment");
        0
    });
    KernelConfig {
        listener_ip4: ip4_word(config.listener_v4.octets()),
        listener_port: config.listener_port,
        _pad0: 0,
        listener_ip6: ip6_words(config.listener_v6.octets()),
        gateway_cgroup_id,
        task_start_offset,
        resolver_count: u32::try_from(config.dns_resolvers.len()).unwrap_or(0),
        resolvers,
        offsets: crate::btf::join_offsets().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no cgroup offsets from BTF: connections a process holds when it joins a root are not destroyed");
            gateway_common::KernelOffsets::default()
        }),
    }
}

fn accepted_key(local: SocketAddr, remote: SocketAddr) -> AcceptedKey {
    let norm = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => (AF_INET, [ip4_word(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (AF_INET, [ip4_word(v4.octets()), 0, 0, 0]),
            None => (AF_INET6, ip6_words(v6.octets())),
        },
    };
    let (family, local_addr) = norm(local);
    let (_, remote_addr) = norm(remote);
    AcceptedKey {
        local_addr,
        remote_addr,
        local_port: local.port(),
        remote_port: remote.port(),
        family,
        _pad: 0,
    }
}

/// The socket inodes any process under the roots holds.
pub fn held_under_roots(config: &Config, mount: &Path) -> HashSet<u32> {
    let dirs: Vec<PathBuf> = config
        .roots
        .iter()
        .flat_map(|r| cgroup::walk(&r.dir(mount)))
        .collect();
    socket_inodes(&dirs)
}

/// Sockets of processes in `dirs` (by inode), for sockets created before they joined.
fn socket_inodes(dirs: &[PathBuf]) -> HashSet<u32> {
    let mut out = HashSet::new();
    for dir in dirs {
        for pid in cgroup::procs(dir) {
            out.extend(sockets_of(pid.unsigned_abs()));
        }
    }
    out
}

/// The socket inodes among the descriptors of process `pid`, in every thread's table: a
/// thread may hold its own (`unshare(CLONE_FILES)`), and a leader that exited while its
/// threads run lists none.
pub fn sockets_of(pid: u32) -> HashSet<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashSet::new();
    };
    let mut out = HashSet::new();
    // Threads that share a table (the usual case) are read once.
    let mut read: Vec<libc::pid_t> = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if read.iter().any(|&other| same_files(other, tid)) {
            continue;
        }
        let Ok(fds) = fs::read_dir(task.path().join("fd")) else {
            continue;
        };
        read.push(tid);
        out.extend(fds.flatten().filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u32>()
                .ok()
        }));
    }
    out
}

/// Whether threads `a` and `b` share one descriptor table (`kcmp`, `KCMP_FILES`).
fn same_files(a: libc::pid_t, b: libc::pid_t) -> bool {
    const KCMP_FILES: libc::c_long = 2;
    // SAFETY: kcmp takes plain integers and reads nothing of ours.
    unsafe { libc::syscall(libc::SYS_kcmp, a, b, KCMP_FILES, 0, 0) == 0 }
}

/// Which connections a settling looks at.
pub enum Settle<'a> {
    /// Everything under the roots, when enforcement starts (or a namespace is first served).
    Roots,
    /// The sockets (by inode) a process held when it joined the cgroup `cgroup_id` under a
    /// root: they were made where no program of the root saw them.
    Joined {
        tgid: u32,
        cgroup_id: u64,
        inodes: &'a HashSet<u32>,
    },
    /// Connections the descriptor watcher marked when a process under a root received them
    /// (by their ends), with who received each.
    Carried {
        marks: &'a std::collections::HashMap<(SocketAddr, SocketAddr), CarriedMark>,
    },
}

/// The ends of a marked connection, as sock_diag reports them.
pub fn carried_ends(key: &CarriedKey) -> (SocketAddr, SocketAddr) {
    let addr = |words: &[u32; 4]| -> IpAddr {
        if key.family == AF_INET {
            IpAddr::from(words[0].to_ne_bytes())
        } else {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(b)
        }
    };
    (
        SocketAddr::new(addr(&key.local_addr), key.local_port),
        SocketAddr::new(addr(&key.remote_addr), key.remote_port),
    )
}

/// When enforcement starts: destroys outbound TCP connections that already existed under the
/// roots, and records connections a server there had accepted, so the backstop lets them be.
pub fn settle_existing(
    config: &Config,
    mount: &Path,
    ns: &Netns,
    accepted: &Mutex<AcceptedMap>,
    audit: &AuditLog,
    scope: &Settle<'_>,
) -> Result<Settled, RunError> {
    let mut settled = Settled::default();
    let dirs: Vec<PathBuf> = config
        .roots
        .iter()
        .flat_map(|r| cgroup::walk(&r.dir(mount)))
        .collect();
    // The cgroups under the roots: their sockets meet the roots' programs.
    let ids: HashSet<u64> = dirs
        .iter()
        .filter_map(|d| cgroup::cgroup_id(d).ok())
        .collect();
    let (inodes, prefix) = match scope {
        Settle::Roots => (socket_inodes(&dirs), "preexisting"),
        Settle::Joined { inodes, .. } => ((*inodes).clone(), "carried"),
        // Only what a process under a root still holds: a child that inherited its parent's
        // connections and closed them at once (as runtimes do) takes nothing from the parent.
        Settle::Carried { .. } => (socket_inodes(&dirs), "carried"),
    };
    let is_mark = |s: &sockdiag::TcpSock| match scope {
        Settle::Carried { marks } => marks.contains_key(&(s.local, s.remote)),
        _ => false,
    };
    let marked = |s: &sockdiag::TcpSock| is_mark(s) && inodes.contains(&s.inode);
    // Roots and joins act only on sockets a process holds; a carried mark is looked for in
    // every state, so one whose connection closed since (TIME_WAIT) counts as present.
    let states = match scope {
        Settle::Carried { .. } => sockdiag::States::ALL,
        Settle::Roots | Settle::Joined { .. } => sockdiag::States::HELD,
    };
    let mut socks = sockdiag::dump_tcp(ns, states)?;
    if !matches!(scope, Settle::Roots) {
        // A connected UDP socket sends without naming an address, so no address program sees
        // its datagrams; one carried in is cut like a TCP connection.
        socks.extend(sockdiag::dump_udp(ns)?.into_iter().filter(|s| {
            s.state == sockdiag::TCP_ESTABLISHED
                && match scope {
                    Settle::Carried { .. } => is_mark(s),
                    _ => inodes.contains(&s.inode),
                }
        }));
    }
    let listening: Vec<SocketAddr> = socks
        .iter()
        .filter(|s| s.state == sockdiag::TCP_LISTEN)
        .map(|s| s.local)
        .collect();
    let is_served = |local: SocketAddr| {
        listening
            .iter()
            .any(|l| l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip()))
    };
    let listener = |a: SocketAddr| {
        let ip = match a.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        a.port() == config.listener_port
            && (ip == IpAddr::V4(config.listener_v4) || ip == IpAddr::V6(config.listener_v6))
    };
    for s in &socks {
        if is_mark(s) {
            settled.present.insert((s.local, s.remote));
        }
        let under_root = s.cgroup_id.is_some_and(|id| ids.contains(&id));
        let enforced = match scope {
            Settle::Roots => under_root || inodes.contains(&s.inode),
            // Only what was made outside the roots: a socket the process made after joining
            // met the roots' programs.
            Settle::Joined { .. } => !under_root && inodes.contains(&s.inode),
            Settle::Carried { .. } => !under_root && marked(s),
        };
        let udp = s.protocol == sockdiag::UDP;
        if !enforced
            || matches!(s.state, sockdiag::TCP_LISTEN | 6 | 7)
            || listener(s.remote)
            || (udp && config.dns_resolvers.contains(&s.remote))
        {
            continue;
        }
        let mut r = AuditRecord::new(Verdict::Deny, Layer::Lifecycle, "");
        let (owner, tgid) = match scope {
            Settle::Joined {
                cgroup_id, tgid, ..
            } => (Some(*cgroup_id), Some(*tgid)),
            Settle::Carried { marks } => {
                let m = marks.get(&(s.local, s.remote));
                (m.map(|m| m.cgroup_id), m.map(|m| m.tgid))
            }
            Settle::Roots => (s.cgroup_id, None),
        };
        let cg = owner.and_then(|id| cgroup::path_of_id(mount, id));
        let mut workload = WorkloadRecord::of_cgroup(owner.unwrap_or(0), cg.as_ref());
        if let Some(tgid) = tgid {
            workload.pid = tgid;
            workload.tgid = tgid;
        }
        r.workload = workload.into();
        r.dst.orig_ip = Some(s.remote.ip().to_string().into());
        r.dst.orig_port = Some(s.remote.port());
        r.dst.protocol = Some(if udp { "udp" } else { "tcp" });
        if !udp && is_served(s.local) {
            accepted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(accepted_key(s.local, s.remote), 1, 0)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            r.decision = Verdict::Allow;
            r.reason = format!("{prefix}_accepted_connection_kept").into();
        } else {
            match sockdiag::destroy(ns, s) {
                Ok(()) => r.reason = format!("{prefix}_outbound_connection_destroyed").into(),
                Err(e) => {
                    r.decision = Verdict::Error;
                    r.reason = format!("{prefix}_outbound_connection_not_destroyed: {e}").into();
                }
            }
        }
        audit.emit(r);
        settled.acted.insert((s.local, s.remote));
    }
    Ok(settled)
}

/// What a settle found, by the connections' ends.
#[derive(Debug, Default)]
pub struct Settled {
    /// Destroyed or kept, each with its audit record.
    pub acted: HashSet<(SocketAddr, SocketAddr)>,
    /// Marked connections that still exist (acted on or not).
    pub present: HashSet<(SocketAddr, SocketAddr)>,
}

/// Every proxied connection holds two descriptors (client and upstream): the soft limit goes
/// up to the hard one, so the gateway is not the first to run out.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    tracing::info!(limit = lim.rlim_cur, "open file limit");
    if lim.rlim_cur < 65_536 {
        tracing::warn!(
            limit = lim.rlim_cur,
            "the open file limit is low for a gateway (each connection holds two): raise LimitNOFILE"
        );
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Pins stay: enforcement outlives the process.
pub fn run(config: &Config, ready_file: Option<&Path>) -> Result<(), RunError> {
    let pre = preflight(config)?;
    // Before any thread starts: each takes the capabilities of the thread that made it.
    let needed = crate::caps::needed(config.listener_port);
    crate::caps::keep_only(&needed).map_err(RunError::KeepCapabilities)?;
    tracing::info!(
        kept = ?crate::caps::names(crate::caps::effective()?),
        "every other capability dropped for good"
    );
    // Taken before anything on the host changes: a second instance stops here.
    let _lock = lock(config)?;
    ensure_bpffs(config)?;
    ensure_tracefs(config)?;
    let gateway_cgroup_id = enter_gateway_cgroup(config, &pre.cgroup_mount)?;
    let audit = AuditLog::open(
        &config.audit_log,
        config.audit_denials_per_second,
        config.roots.clone(),
    )?;
    let _written_before_exit = crate::audit::FlushOnDrop(audit.clone());
    raise_fd_limit();
    // One worker thread per CPU the daemon may run on (TOKIO_WORKER_THREADS overrides).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _enter = runtime.enter();
    let listeners = [
        SocketAddr::new(IpAddr::V4(config.listener_v4), config.listener_port),
        SocketAddr::new(IpAddr::V6(config.listener_v6), config.listener_port),
    ]
    .into_iter()
    .map(|addr| {
        Netns::Host
            .listen(addr)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| RunError::Listen { addr, source })
    })
    .collect::<Result<Vec<_>, _>>()?;
    let admin_path = runtime_path(config, "sock");
    let _ = fs::remove_file(&admin_path);
    let admin = tokio::net::UnixListener::bind(&admin_path).map_err(|source| RunError::Admin {
        path: admin_path.clone(),
        source,
    })?;
    fs::set_permissions(
        &admin_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;

    let upstreams = crate::upstream::Upstreams::new(crate::upstream::DialPolicy {
        config: config.clone(),
    })?;
    let fresh_install = !config.pin_dir.exists();
    let attached = attach_all(config, &pre.cgroup_mount, gateway_cgroup_id, &audit);
    let (_kernel, maps) = match attached {
        Ok(k) => k,
        Err(e) => {
            if fresh_install {
                let _ = ebpf::uninstall(&config.pin_dir);
            }
            return Err(e);
        }
    };
    let accepted = Arc::new(Mutex::new(maps.accepted));
    if let Err(e) = settle_existing(
        config,
        &pre.cgroup_mount,
        &Netns::Host,
        &accepted,
        &audit,
        &Settle::Roots,
    ) {
        tracing::error!(error = %e, "could not settle connections that predate enforcement");
    }
    let gateway = Arc::new(Gateway {
        config: config.clone(),
        cgroup_mount: pre.cgroup_mount.clone(),
        origins: maps.origins,
        rules: crate::rules::Rules::new(pre.policies, pre.credentials),
        upstreams,
        audit: audit.clone(),
        identities: crate::identity::IdentityCache::default(),
        budgets: Arc::default(),
        model_reads: crate::usage::Rooms::new(
            crate::proxy::MODEL_READS_KIB,
            crate::proxy::MODEL_READS_SHARE_KIB,
        ),
        connections: crate::connections::Connections::new(config.max_connections_per_workload),
    });
    let namespaces = Arc::new(Namespaces::new(
        Arc::clone(&gateway),
        accepted,
        maps.carried,
        maps.carried_live,
    )?);
    runtime.block_on(async {
        let host = Arc::new(Netns::Host);
        for l in listeners {
            tokio::spawn(proxy::serve(Arc::clone(&gateway), l, Arc::clone(&host)));
        }
        // Namespaces of workloads already running are served before we say we are ready.
        let initial = Arc::clone(&namespaces);
        let _ = tokio::task::spawn_blocking(move || initial.sweep()).await;
        tokio::spawn(Arc::clone(&namespaces).sweep_forever());
        tokio::spawn(Arc::clone(&namespaces).serve_admin(admin));
        let (joins, joined) = SettleQueue::new(4096);
        tokio::spawn(Arc::clone(&namespaces).settle_joins(joined));
        tokio::spawn(events::drain_events(maps.events, audit.clone(), pre.cgroup_mount.clone(), joins.clone()));
        tokio::spawn(events::watch_counters(Arc::new(maps.counters), audit.clone(), pre.cgroup_mount.clone(), joins));
        tokio::spawn(watch_policies(Arc::clone(&gateway)));
        tracing::info!(roots = ?config.roots.iter().map(ToString::to_string).collect::<Vec<_>>(), port = config.listener_port, "enforcing");
        if let Some(path) = ready_file {
            let _ = fs::File::create(path).and_then(|mut f| f.write_all(b"ready\n"));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("stopping; enforcement stays pinned (connects are refused until the next start)");
        let _ = fs::remove_file(&admin_path);
        Ok::<(), RunError>(())
    })?;
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}

type Attached = (Kernel, ebpf::RuntimeMaps);

/// The map of connections accepted before enforcement started.
pub type AcceptedMap = aya::maps::HashMap<aya::maps::MapData, AcceptedKey, u8>;

/// The marks of connections carried into a root (`TG_CARRIED`).
pub type CarriedMap = aya::maps::HashMap<aya::maps::MapData, CarriedKey, CarriedMark>;

fn attach_all(
    config: &Config,
    mount: &Path,
    gateway_cgroup_id: u64,
    audit: &AuditLog,
) -> Result<Attached, RunError> {
    let mut kernel = Kernel::load(&config.pin_dir)?;
    kernel.write_config(&kernel_config(config, gateway_cgroup_id))?;
    kernel.set_roots(mount, &config.roots)?;
    // The guard goes on before the roots, so no task under a root is ever without it.
    match config.socket_guard {
        SocketGuard::Required => {
            let outcomes = kernel.guard(mount).map_err(|e| {
                let off = "or set `socket_guard: off` (a socket created outside every root and \
                           used inside one then goes around enforcement)";
                RunError::SocketGuard(match e {
                    ebpf::EbpfError::Watcher { .. } => format!("{e}, {off}"),
                    e => format!(
                        "cannot attach at the cgroup2 root {}: {e}: run tollgate in the \
                         host's cgroup namespace, {off}",
                        mount.display()
                    ),
                })
            })?;
            let mut r = AuditRecord::new(Verdict::Allow, Layer::Lifecycle, "socket_guard_started");
            r.rule = Some(format!("{outcomes:?}").into());
            audit.emit(r);
            tracing::info!(?outcomes, "socket guard attached at the cgroup2 root");
        }
        SocketGuard::Off => tracing::warn!(
            "socket guard off: a socket created outside every root and used inside one is not enforced"
        ),
    }
    for root in &config.roots {
        let outcomes = kernel.enforce(mount, root)?;
        let mut r = AuditRecord::new(Verdict::Allow, Layer::Lifecycle, "enforcement_started");
        r.workload = WorkloadRecord {
            cgroup: Some(root.to_string()),
            ..WorkloadRecord::default()
        }
        .into();
        r.rule = Some(format!("{outcomes:?}").into());
        audit.emit(r);
        tracing::info!(root = %root, ?outcomes, "root enforced");
    }
    let maps = kernel.runtime_maps()?;
    Ok((kernel, maps))
}

/// A file's size and modification time (following symlinks, as a secret mount's are).
fn stat(path: &Path) -> (PathBuf, u64, Option<std::time::SystemTime>) {
    let meta = fs::metadata(path).ok();
    (
        path.to_owned(),
        meta.as_ref().map_or(0, fs::Metadata::len),
        meta.and_then(|m| m.modified().ok()),
    )
}

/// The policy directory's fingerprint: names, sizes and mtimes.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| stat(&e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// What the policy watch compares: the policy directory's fingerprint, and the credentials
/// file and the secret files the running bindings were read from (a binding added by an edit
/// is watched once the edit is loaded). Not the credentials' whole directory: an audit log or
/// anything else written beside them would reload them endlessly.
fn watched(gateway: &Gateway) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut f = fingerprint(&gateway.config.policies);
    if let Some(file) = &gateway.config.credentials {
        f.push(stat(file));
        let credentials = gateway.rules.credentials();
        f.extend(credentials.sources().iter().map(|s| stat(s)));
    }
    f
}

/// Reloads policies when their files change: compiled whole and swapped, or kept on error.
/// The fingerprint (a `stat` per file) and the compile run on the blocking pool: with a
/// thousand policies they take milliseconds and a hundred, which no runtime worker serving
/// requests should spend.
async fn watch_policies(gateway: Arc<Gateway>) {
    let Ok(mut last) = on_blocking_pool(&gateway, watched).await else {
        tracing::error!("cannot read the policy files' fingerprint; policies will not reload");
        return;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Ok(now) = on_blocking_pool(&gateway, watched).await else {
            continue;
        };
        if now == last {
            continue;
        }
        let (seen, g) = (now.clone(), Arc::clone(&gateway));
        let settled = tokio::task::spawn_blocking(move || {
            // The secret files of bindings the edit adds are not watched yet: they are held
            // to the same settle, from just after they were read.
            let stat_new = |loaded: &Result<(PolicySet, Credentials), String>| -> Vec<_> {
                loaded.as_ref().map_or_else(
                    |_| Vec::new(),
                    |(_, c)| c.sources().iter().map(|s| stat(s)).collect(),
                )
            };
            let read = || {
                let loaded = reload(&g.config);
                let new = stat_new(&loaded);
                (loaded, new)
            };
            load_if_settled(&seen, || watched(&g), read, SETTLE)
                .and_then(|(loaded, new)| (stat_new(&loaded) == new).then_some(loaded))
        })
        .await;
        let reloaded = match settled {
            Ok(Some(reloaded)) => reloaded,
            // Still being written: read again on the next tick.
            Ok(None) => continue,
            Err(e) => Err(format!("the reload stopped: {e}")),
        };
        last = now;
        match reloaded {
            Ok((set, creds)) => {
                let n = set.len();
                gateway.rules.replace(set, creds);
                tracing::info!(policies = n, "policies and credentials reloaded");
                gateway.audit.emit(AuditRecord::new(
                    Verdict::Allow,
                    Layer::Lifecycle,
                    "policies_reloaded",
                ));
            }
            Err(msg) => {
                tracing::error!(error = %msg, "reload failed; keeping the running policies and credentials");
                gateway.audit.emit(AuditRecord::new(
                    Verdict::Error,
                    Layer::Lifecycle,
                    format!("policy_reload_failed: {msg}"),
                ));
            }
        }
    }
}

/// How long the files must stay as they were when read for a reload to be applied. An edit
/// written in place (truncated, then written in parts) that was read half-way shows as a change
/// within this time; it is read again on the next tick rather than compiled from part of a
/// file, which can parse (a rule cut before its `http` entries allows every request to its host).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// `load()`'s result if `fingerprint()` is still `before` once `settle` has passed after it,
/// `None` if the files changed meanwhile.
fn load_if_settled<F: PartialEq, T>(
    before: &F,
    fingerprint: impl Fn() -> F,
    load: impl FnOnce() -> T,
    settle: std::time::Duration,
) -> Option<T> {
    let loaded = load();
    std::thread::sleep(settle);
    (fingerprint() == *before).then_some(loaded)
}

/// Runs `f` on the gateway on the blocking pool.
async fn on_blocking_pool<T: Send + 'static>(
    gateway: &Arc<Gateway>,
    f: fn(&Gateway) -> T,
) -> Result<T, tokio::task::JoinError> {
    let gateway = Arc::clone(gateway);
    tokio::task::spawn_blocking(move || f(&gateway)).await
}

/// Compiles the policies and loads the credentials, whole, or says why not.
fn reload(config: &Config) -> Result<(PolicySet, Credentials), String> {
    let set = PolicySet::load_dir(&config.policies).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let creds = match &config.credentials {
        Some(path) => Credentials::load(path).map_err(|e| e.to_string())?,
        None => Credentials::default(),
    };
    check_bindings(&set, &creds)?;
    Ok((set, creds))
}

/// Attachment counts per program at each root, from the kernel's query interface.
pub fn status(config: &Config) -> Result<serde_json::Value, RunError> {
    let mount = cgroup::cgroup2_mount()?;
    let mut roots = serde_json::Map::new();
    for root in &config.roots {
        let counts = ebpf::attachments(&root.dir(&mount))?;
        roots.insert(
            root.to_string(),
            serde_json::to_value(counts).unwrap_or_default(),
        );
    }
    let guard = ebpf::guard_attachments(&config.pin_dir, &mount)?;
    Ok(serde_json::json!({ "pin_dir": config.pin_dir, "roots": roots, "guard": guard }))
}

/// Removes every pin (and so every attachment) this config's pin directory holds.
pub fn uninstall(config: &Config) -> Result<usize, RunError> {
    Ok(ebpf::uninstall(&config.pin_dir)?)
}

/// Sends one request line to the running daemon's admin socket and returns what follows `ok`
/// in its reply.
fn ask_daemon(config: &Config, request: &str) -> Result<String, String> {
    ask_daemon_passing(config, request, None)
}

/// [`ask_daemon`], with the descriptor `passed` sent along (SCM_RIGHTS).
fn ask_daemon_passing(
    config: &Config,
    request: &str,
    passed: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<String, String> {
    use std::io::{BufRead, BufReader};
    let admin = runtime_path(config, "sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&admin).map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e} (is `tollgate run` running with this config?)",
            admin.display()
        )
    })?;
    let line = format!("{request}\n");
    let sent = match passed {
        None => 0,
        Some(fd) => nix::sys::socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(line.as_bytes())],
            &[nix::sys::socket::ControlMessage::ScmRights(&[
                fd.as_raw_fd()
            ])],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("cannot send to the daemon: {e}"))?,
    };
    stream
        .write_all(&line.as_bytes()[sent..])
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    match line.trim_end().split_once(' ') {
        Some(("ok", rest)) => Ok(rest.to_owned()),
        Some(("error", msg)) => Err(msg.to_owned()),
        _ => Err(format!("bad reply {line:?}")),
    }
}

/// What is left of each budget the running daemon keeps, as JSON.
pub fn budgets(config: &Config) -> Result<serde_json::Value, String> {
    let reply = ask_daemon(config, "budgets")?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))
}

/// The open connections of each workload holding any, from the running daemon.
pub fn connections(config: &Config) -> Result<serde_json::Value, String> {
    let reply = ask_daemon(config, "connections")?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))
}

/// Asks the running daemon to serve the network namespace at `path` (what a CNI plugin does
/// before a pod's containers start). Returns the namespace's cookie once its listener is up.
/// The namespace is opened here and its descriptor passed, so the daemon need not see `path`
/// in its own mount namespace (a systemd unit's /tmp and /home are not the host's).
pub fn register_netns(config: &Config, path: &Path) -> Result<u64, String> {
    let ns = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // The daemon's working directory is not the caller's: a relative path is made absolute.
    let path = &fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let cookie = ask_daemon_passing(
        config,
        &format!("netns-add {}", path.display()),
        Some(std::os::fd::AsFd::as_fd(&ns)),
    )
    .map_err(|msg| format!("{}: {msg}", path.display()))?;
    cookie.parse().map_err(|_| format!("bad reply {cookie:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule may not require a header its credential replaces: the condition would judge the
    /// caller's value, which never goes upstream.
    #[test]
    fn a_condition_on_a_header_the_credential_replaces_is_refused() {
        let policy = |require: &str| {
            let text = format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: a }}\nspec:\n  workload: {{ cgroup: /a }}\n  egress:\n    - name: openai\n      match: {{ host: api.openai.com, port: 80 }}\n      upstream: {{ port: 443 }}\n      tls: originate\n      http:\n        - methods: [POST]\n          require_headers: {{ {require}: \"*\" }}\n      credential: openai-prod\n");
            PolicySet::from_policies(vec![crate::policy::parse_policy(
                &text,
                Path::new("a.yaml"),
            )
            .expect("policy")])
            .expect("set")
        };
        let creds = Credentials::parse(
            "bindings:\n  - name: openai-prod\n    hosts: [api.openai.com]\n    inject: { header: x-goog-api-key, format: \"{secret}\" }\n    source: { env: K }\n",
            "c.yaml",
            Path::new("/"),
            &|_| Some("k".into()),
        )
        .expect("credentials");
        for replaced in ["authorization", "x_api_key", "x-goog-api-key"] {
            let err = check_bindings(&policy(replaced), &creds).expect_err(replaced);
            assert!(
                err.contains("replaces with credential"),
                "{replaced}: {err}"
            );
        }
        check_bindings(&policy("openai-project"), &creds).expect("another header");
    }

    /// A file that changes while it is read, or just after, is not applied: it is read again.
    #[test]
    fn a_reload_is_applied_only_once_the_files_have_settled() {
        let dir = std::env::temp_dir().join(format!("tg-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("p.yaml");
        std::fs::write(&file, "first half").expect("write");
        let before = fingerprint(&dir);
        let settle = std::time::Duration::from_millis(20);
        // The writer finishes its edit after the read.
        let torn = load_if_settled(
            &before,
            || fingerprint(&dir),
            || {
                let read = std::fs::read_to_string(&file).expect("read");
                std::fs::write(&file, "first half, second half").expect("write");
                read
            },
            settle,
        );
        assert_eq!(torn, None);
        // Read again with nothing changing: applied.
        let before = fingerprint(&dir);
        let whole = load_if_settled(
            &before,
            || fingerprint(&dir),
            || std::fs::read_to_string(&file).expect("read"),
            settle,
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(whole.as_deref(), Some("first half, second half"));
    }
}
