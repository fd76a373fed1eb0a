//! The workload network namespaces the gateway serves. Each gets a listener inside it (on the
//! same addresses and port as the host's) before its workloads connect: a runtime registers a
//! new namespace through the admin socket (`tollgate netns add`, as a CNI plugin would, before
//! the containers start), and namespaces of processes found under the roots are adopted too.
//! Until a namespace is served, its redirected connects are refused (closed, never open).
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway_common::CarriedMark;
use tokio::{io::AsyncWriteExt, net::UnixListener, task::JoinHandle};

use crate::{
    audit::{AuditRecord, Layer, Verdict},
    cgroup,
    daemon::{
        carried_ends, settle_existing, sockets_of, AcceptedMap, CarriedMap, RunError, Settle,
        Settled,
    },
    netns::{Netns, Workload},
    proxy::{self, Gateway},
};

struct Entry {
    ns: Arc<Netns>,
    tasks: Vec<JoinHandle<()>>,
    /// The path a runtime registered (e.g. /run/netns/<pod>), if any.
    path: Option<PathBuf>,
    /// When a namespace was first registered at a path this daemon's mounts do not show (its
    /// descriptor was passed): it is served for [`AWAIT_USE`] from then, used or not, and
    /// after that while a process under the roots uses it.
    awaiting_use: Option<std::time::Instant>,
}

/// How long a namespace registered at a path the daemon cannot see is served before any
/// process under the roots uses it (a pod's containers start after its network is set up,
/// possibly after pulling their images).
const AWAIT_USE: Duration = Duration::from_secs(600);

/// When `path` is given but does not show the namespace `inode` to this daemon, now.
fn unseen(path: Option<&PathBuf>, inode: u64) -> Option<std::time::Instant> {
    path.filter(|p| inode_of(p) != Some(inode))
        .map(|_| std::time::Instant::now())
}

/// Every workload namespace being served, by namespace inode.
pub struct Namespaces {
    gateway: Arc<Gateway>,
    accepted: Arc<Mutex<AcceptedMap>>,
    carried: Mutex<CarriedMap>,
    carried_live: crate::ebpf::LiveFlag,
    /// Held for a whole `settle_carried`: the sweep and the reports run it, never at once.
    settling: Mutex<()>,
    host_inode: u64,
    entries: Mutex<HashMap<u64, Entry>>,
}

fn inode_of(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

impl Namespaces {
    pub fn new(
        gateway: Arc<Gateway>,
        accepted: Arc<Mutex<AcceptedMap>>,
        carried: CarriedMap,
        carried_live: crate::ebpf::LiveFlag,
    ) -> io::Result<Self> {
        let host_inode = inode_of(std::path::Path::new("/proc/self/ns/net"))
            .ok_or_else(|| io::Error::other("cannot read /proc/self/ns/net"))?;
        Ok(Self {
            gateway,
            accepted,
            carried: Mutex::new(carried),
            carried_live,
            settling: Mutex::new(()),
            host_inode,
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Serves the namespace behind `file` (idempotent). Returns its netns cookie. Blocking:
    /// call from a blocking context.
    pub fn add(&self, file: File, path: Option<PathBuf>, how: &str) -> io::Result<u64> {
        let inode = file.metadata()?.ino();
        if inode == self.host_inode {
            return Netns::Host.cookie();
        }
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = entries.get_mut(&inode) {
            // The newest path that names it to this daemon is kept; a path it cannot see
            // replaces only one that no longer names it either, and keeps the first such
            // registration's time.
            let visible =
                |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| inode_of(p) == Some(inode));
            if visible(&path) {
                e.awaiting_use = None;
                e.path = path;
            } else if path.is_some() && !visible(&e.path) {
                if e.awaiting_use.is_none() {
                    e.awaiting_use = unseen(path.as_ref(), inode);
                }
                e.path = path;
            }
            return e.ns.cookie();
        }
        let ns = Arc::new(Netns::Workload(Workload::enter(file)?));
        let config = &self.gateway.config;
        let mut tasks = Vec::new();
        for (ip, required) in [
            (IpAddr::V4(config.listener_v4), true),
            (IpAddr::V6(config.listener_v6), false),
        ] {
            let addr = SocketAddr::new(ip, config.listener_port);
            match ns.listen(addr).and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => tasks.push(tokio::spawn(proxy::serve(
                    Arc::clone(&self.gateway),
                    l,
                    Arc::clone(&ns),
                ))),
                Err(e) if required => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("listener {addr} in the namespace: {e}"),
                    ))
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "no IPv6 listener in a workload namespace");
                }
            }
        }
        if let Err(e) = self.settle_in(&ns, &Settle::Roots) {
            tracing::warn!(error = %e, "could not settle connections that predate the namespace's enforcement");
        }
        let cookie = ns.cookie()?;
        let mut r = AuditRecord::new(Verdict::Allow, Layer::Lifecycle, "netns_enforced");
        r.rule = Some(
            format!(
                "{how}: inode {inode}, cookie {cookie}{}",
                path.as_ref()
                    .map(|p| format!(", {}", p.display()))
                    .unwrap_or_default()
            )
            .into(),
        );
        self.gateway.audit.emit(r);
        tracing::info!(inode, cookie, how, "serving a workload network namespace");
        let awaiting_use = unseen(path.as_ref(), inode);
        entries.insert(
            inode,
            Entry {
                ns,
                tasks,
                path,
                awaiting_use,
            },
        );
        Ok(cookie)
    }

    /// Settles `scope` in the namespace `ns`. Blocking.
    fn settle_in(&self, ns: &Netns, scope: &Settle<'_>) -> Result<Settled, RunError> {
        settle_existing(
            &self.gateway.config,
            &self.gateway.cgroup_mount,
            ns,
            &self.accepted,
            &self.gateway.audit,
            scope,
        )
    }

    /// Namespace inodes of the processes under the enforced roots, with a pid in each.
    fn in_use(&self) -> HashMap<u64, i32> {
        let mount = &self.gateway.cgroup_mount;
        let mut out = HashMap::new();
        for root in &self.gateway.config.roots {
            for dir in cgroup::walk(&root.dir(mount)) {
                for pid in cgroup::procs(&dir) {
                    if let Some(ino) =
                        inode_of(std::path::Path::new(&format!("/proc/{pid}/ns/net")))
                    {
                        out.entry(ino).or_insert(pid);
                    }
                }
            }
        }
        out
    }

    /// Adopts namespaces of processes under the roots that no runtime registered, and stops
    /// serving namespaces nobody uses any more.
    pub fn sweep(&self) {
        // Marks left by a settle that failed, a lost report, or a daemon that stopped.
        self.settle_carried();
        let used = self.in_use();
        let known: HashSet<u64> = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        for (ino, pid) in &used {
            if *ino == self.host_inode || known.contains(ino) {
                continue;
            }
            match File::open(format!("/proc/{pid}/ns/net")) {
                Ok(f) => {
                    if let Err(e) = self.add(f, None, "discovered") {
                        tracing::warn!(pid, error = %e, "cannot serve a workload's network namespace");
                    }
                }
                Err(e) => {
                    tracing::debug!(pid, error = %e, "process gone before its namespace was read");
                }
            }
        }
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.retain(|ino, e| {
            let in_use = used.contains_key(ino);
            let registered = e.path.as_ref().is_some_and(|p| inode_of(p) == Some(*ino));
            let awaited = e
                .awaiting_use
                .is_some_and(|since| since.elapsed() < AWAIT_USE);
            let keep = registered || in_use || awaited;
            if !keep {
                for t in &e.tasks {
                    t.abort();
                }
                // Idle upstream connections made in the namespace go with it.
                if let Ok(cookie) = e.ns.cookie() {
                    self.gateway.upstreams.forget(cookie);
                }
                tracing::info!(inode = ino, "workload network namespace released");
            }
            keep
        });
    }

    /// Serves the admin socket: `netns-add <path>` (with the namespace's descriptor, or
    /// without) → `ok <cookie>` or `error <message>`.
    pub async fn serve_admin(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let Ok((line, passed)) = read_request(&stream).await else {
                    return;
                };
                let mut write = stream;
                let reply = match line.trim().split_once(' ') {
                    None if line.trim() == "budgets" => {
                        let left = me.gateway.budgets.left(std::time::Instant::now());
                        format!("ok {}\n", serde_json::Value::Array(left))
                    }
                    None if line.trim() == "connections" => {
                        let held = me.gateway.connections.report();
                        format!("ok {}\n", serde_json::Value::Array(held))
                    }
                    Some(("netns-add", path)) => {
                        let path = PathBuf::from(path);
                        // The namespace `tollgate netns add` opened and passed; a path alone
                        // (an older or hand-written client) is opened here.
                        let passed = passed.into_iter().next().map(File::from);
                        let result = tokio::task::spawn_blocking(move || {
                            passed
                                .map_or_else(|| File::open(&path), Ok)
                                .map_err(|e| {
                                    io::Error::new(
                                        e.kind(),
                                        format!(
                                            "cannot open {} in the daemon's mount namespace: {e} \
                                             (a systemd unit with PrivateTmp= or ProtectHome= sees \
                                             no /tmp or /home of the host's: pass the namespace's \
                                             descriptor, as `tollgate netns add` does)",
                                            path.display()
                                        ),
                                    )
                                })
                                .and_then(|f| me.add(f, Some(path), "registered"))
                        })
                        .await
                        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
                        match result {
                            Ok(cookie) => format!("ok {cookie}\n"),
                            Err(e) => format!("error {e}\n"),
                        }
                    }
                    _ => "error unknown request; expected `netns-add <path>`, `budgets` or `connections`\n"
                        .to_owned(),
                };
                let _ = write.write_all(reply.as_bytes()).await;
            });
        }
    }

    /// Destroys the outbound connections process `tgid` held when it joined `cgroup_id` under
    /// a root (the join watcher reported it). Blocking.
    pub fn settle_joined(&self, tgid: u32, cgroup_id: u64) {
        let inodes = sockets_of(tgid);
        if inodes.is_empty() {
            return;
        }
        let Some(ino) = inode_of(std::path::Path::new(&format!("/proc/{tgid}/ns/net"))) else {
            return;
        };
        let ns = if ino == self.host_inode {
            Arc::new(Netns::Host)
        } else {
            let known = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&ino)
                .map(|e| Arc::clone(&e.ns));
            match known {
                Some(ns) => ns,
                None => {
                    // A namespace not served yet: serving it settles everything in it.
                    if let Ok(f) = File::open(format!("/proc/{tgid}/ns/net")) {
                        if let Err(e) = self.add(f, None, "joined") {
                            tracing::warn!(tgid, error = %e, "cannot serve a joining process's network namespace");
                        }
                    }
                    return;
                }
            }
        };
        let scope = Settle::Joined {
            tgid,
            cgroup_id,
            inodes: &inodes,
        };
        if let Err(e) = self.settle_in(&ns, &scope) {
            tracing::warn!(tgid, error = %e, "could not settle the connections of a joining process");
        }
    }

    /// Settles the connections the descriptor watcher marked (their packets are dropped
    /// meanwhile): an outbound one is destroyed, one a server accepted is kept, and the mark
    /// goes once its socket has been looked at. A mark whose socket lives in a namespace not
    /// served stays (its packets stay dropped) and is logged. Blocking.
    pub fn settle_carried(&self) {
        let _one_at_a_time = self
            .settling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let marks: Vec<_> = {
            let map = self
                .carried
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.iter().flatten().collect()
        };
        if marks.is_empty() {
            self.clear_live();
            return;
        }
        let mut by_ns: HashMap<u32, Vec<_>> = HashMap::new();
        for (key, mark) in marks {
            by_ns.entry(mark.netns_inum).or_default().push((key, mark));
        }
        for (inum, marks) in by_ns {
            let ns = if u64::from(inum) == self.host_inode {
                Some(Arc::new(Netns::Host))
            } else {
                self.entries
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&u64::from(inum))
                    .map(|e| Arc::clone(&e.ns))
            };
            let Some(ns) = ns else {
                // No sock_diag there: a mark goes once no process under a root holds its
                // socket (its packets are dropped until then, never destroyed).
                let held = crate::daemon::held_under_roots(
                    &self.gateway.config,
                    &self.gateway.cgroup_mount,
                );
                let mut map = self
                    .carried
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut kept = 0;
                for (key, mark) in &marks {
                    let inode = u32::try_from(mark.inode).unwrap_or(0);
                    if inode != 0 && held.contains(&inode) {
                        kept += 1;
                    } else if map
                        .get(key, 0)
                        .is_ok_and(|now| now.marked_ns == mark.marked_ns)
                    {
                        let _ = map.remove(key);
                        self.audit_unheld(carried_ends(key), mark, true);
                    }
                }
                if kept > 0 {
                    tracing::warn!(netns_inode = inum, kept, "connections carried into a root from a namespace that is not served stay cut while held inside");
                }
                continue;
            };
            let ends: HashMap<_, _> = marks
                .iter()
                .map(|(key, mark)| (carried_ends(key), *mark))
                .collect();
            let scope = Settle::Carried { marks: &ends };
            let settled = match self.settle_in(&ns, &scope) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "could not settle carried connections; their packets stay dropped");
                    continue;
                }
            };
            for (ends, mark) in &ends {
                if !settled.acted.contains(ends) {
                    self.audit_unheld(*ends, mark, settled.present.contains(ends));
                }
            }
            let mut map = self
                .carried
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (key, mark) in &marks {
                // Only the mark looked at: the same connection carried in again since is
                // marked anew (a later receipt) and waits for the next settle.
                if map
                    .get(key, 0)
                    .is_ok_and(|now| now.marked_ns == mark.marked_ns)
                {
                    let _ = map.remove(key);
                }
            }
        }
        self.clear_live();
    }

    /// Lets the guard's egress program skip its lookup again once no mark is left.
    fn clear_live(&self) {
        self.carried_live.clear_unless(|| {
            self.carried
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .next()
                .is_some()
        });
    }

    /// The record of a marked connection the settle found no process under a root holding:
    /// closed before the settle (its packets were dropped until then), or still open outside
    /// only (released: a child that inherited it and closed its copy).
    fn audit_unheld(&self, (_, remote): (SocketAddr, SocketAddr), mark: &CarriedMark, open: bool) {
        let (decision, reason) = if open {
            (Verdict::Allow, "carried_connection_released")
        } else {
            (Verdict::Deny, "carried_connection_dropped_until_closed")
        };
        let mut r = AuditRecord::new(decision, Layer::Lifecycle, reason);
        let cg = cgroup::path_of_id(&self.gateway.cgroup_mount, mark.cgroup_id);
        let mut workload = crate::audit::WorkloadRecord::of_cgroup(mark.cgroup_id, cg.as_ref());
        workload.pid = mark.tgid;
        workload.tgid = mark.tgid;
        r.workload = workload.into();
        r.dst.orig_ip = Some(remote.ip().to_string().into());
        r.dst.orig_port = Some(remote.port());
        self.gateway.audit.emit(r);
    }

    /// Settles each process the join and descriptor watchers report: first the connections
    /// marked at a receipt, then whatever else the process holds that was made outside.
    pub async fn settle_joins(self: Arc<Self>, mut joins: Reported) {
        while let Some((tgid, cgroup_id)) = joins.next().await {
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                me.settle_carried();
                me.settle_joined(tgid, cgroup_id);
            })
            .await;
        }
    }

    /// Sweeps periodically.
    pub async fn sweep_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            self.gateway.upstreams.prune();
            self.gateway.budgets.prune(std::time::Instant::now());
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || me.sweep()).await;
        }
    }
}

/// The processes to settle: each joined a root, or received descriptors in one. A process is
/// waiting at most once: a report that comes while it waits is covered by the settle to come
/// (that settle starts after the report), so a process that reports in a loop holds one
/// place. When the queue is full, a process waits in an overflow set instead, settled once
/// the queue has drained, and counted ([`SettleQueue::take_overflowed`]); only past
/// [`OVERFLOW_MAX`] of those is a report dropped (and counted too).
#[derive(Clone, Debug)]
pub struct SettleQueue {
    queue: tokio::sync::mpsc::Sender<u32>,
    shared: Arc<Waiting>,
}

/// The settling end of a [`SettleQueue`].
pub struct Reported {
    queue: tokio::sync::mpsc::Receiver<u32>,
    shared: Arc<Waiting>,
}

/// Processes waiting beyond the queue's room, at most.
pub const OVERFLOW_MAX: usize = 65_536;

#[derive(Debug, Default)]
struct Waiting {
    /// Each waiting process, with the cgroup of its latest report.
    latest: Mutex<HashMap<u32, u64>>,
    /// Waiting processes the queue had no room for, in no order.
    overflow: Mutex<Vec<u32>>,
    /// Processes put in the overflow set, and reports dropped past it, since the last look.
    overflowed: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl SettleQueue {
    /// A queue with room for `capacity` distinct processes (and [`OVERFLOW_MAX`] beyond).
    pub fn new(capacity: usize) -> (Self, Reported) {
        let (queue, rx) = tokio::sync::mpsc::channel(capacity);
        let shared = Arc::new(Waiting::default());
        let reported = Reported {
            queue: rx,
            shared: Arc::clone(&shared),
        };
        (Self { queue, shared }, reported)
    }

    /// Queues process `tgid` (reported from cgroup `cgroup_id`) unless it is waiting already;
    /// then its settle is for the latest cgroup reported (it may have moved on). False if the
    /// report was dropped (the queue and its overflow are full, or the settling end is gone).
    pub fn push(&self, tgid: u32, cgroup_id: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let mut latest = lock(&self.shared.latest);
        if let Some(cgroup) = latest.get_mut(&tgid) {
            *cgroup = cgroup_id;
            return true;
        }
        match self.queue.try_send(tgid) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                let mut overflow = lock(&self.shared.overflow);
                if overflow.len() >= OVERFLOW_MAX {
                    self.shared.dropped.fetch_add(1, Relaxed);
                    return false;
                }
                overflow.push(tgid);
                self.shared.overflowed.fetch_add(1, Relaxed);
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return false,
        }
        latest.insert(tgid, cgroup_id);
        true
    }

    /// Processes that waited in the overflow set, and reports dropped, since the last call.
    pub fn take_overflowed(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.overflowed.swap(0, Relaxed),
            self.shared.dropped.swap(0, Relaxed),
        )
    }
}

impl Reported {
    /// The next process to settle: from the queue, or once it is empty from the overflow set.
    /// It stops waiting before its settle begins, so a report made from now on queues it
    /// again.
    pub async fn next(&mut self) -> Option<(u32, u64)> {
        loop {
            let tgid = match self.queue.try_recv() {
                Ok(tgid) => tgid,
                Err(_) => {
                    let spilled = lock(&self.shared.overflow).pop();
                    match spilled {
                        Some(tgid) => tgid,
                        // Nothing spills while the queue is empty: a push only overflows a
                        // full queue.
                        None => self.queue.recv().await?,
                    }
                }
            };
            // Always there: a process is queued once, and stops waiting only here.
            if let Some(cgroup_id) = lock(&self.shared.latest).remove(&tgid) {
                return Some((tgid, cgroup_id));
            }
        }
    }
}

/// Reads an admin request's line and the descriptors sent with it (SCM_RIGHTS).
async fn read_request(
    stream: &tokio::net::UnixStream,
) -> io::Result<(String, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    const MAX_LINE: usize = 64 * 1024;
    let (mut line, mut passed) = (Vec::new(), Vec::new());
    while !line.contains(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(io::Error::other("admin request line too long"));
        }
        stream.readable().await?;
        let mut buf = [0u8; 4096];
        let read = stream.try_io(tokio::io::Interest::READABLE, || {
            // As many descriptors as one message can carry (SCM_MAX_FD), so none is cut off.
            let mut space = nix::cmsg_space!([RawFd; 253]);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(io::Error::other("admin request's control data cut short"));
            }
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = cmsg {
                    fds.extend(received);
                }
            }
            Ok((msg.bytes, fds))
        });
        match read {
            Ok((n, fds)) => {
                // SAFETY: each descriptor was just received and is owned by no one else.
                passed.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
                if n == 0 {
                    // A client that shut its end after a last line without a newline.
                    if line.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    break;
                }
                line.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    // The first line only: what follows it is not part of this request.
    let end = line
        .iter()
        .position(|b| *b == b'\n')
        .map_or(line.len(), |i| i + 1);
    Ok((String::from_utf8_lossy(&line[..end]).into_owned(), passed))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_waits_once_however_often_it_is_reported() {
        let (queue, mut reported) = SettleQueue::new(2);
        for _ in 0..10_000 {
            assert!(queue.push(7, 70), "a repeat report is covered, not refused");
        }
        assert!(queue.push(8, 80));
        assert_eq!(queue.take_overflowed(), (0, 0));
        // A third distinct process does not fit the queue: it waits in the overflow set.
        assert!(queue.push(9, 90));
        assert!(
            queue.push(9, 91),
            "a repeat report of an overflowed process is covered"
        );
        assert_eq!(queue.take_overflowed(), (1, 0));
        assert_eq!(reported.next().await, Some((7, 70)));
        // A process reported again from another cgroup while waiting is settled for that one.
        assert!(queue.push(8, 81));
        // Its settle has begun: a new report must queue it again.
        assert!(queue.push(7, 71));
        assert_eq!(reported.next().await, Some((8, 81)));
        assert_eq!(reported.next().await, Some((7, 71)));
        // The queue has drained: the overflowed process comes next, for its latest cgroup.
        assert_eq!(reported.next().await, Some((9, 91)));
        assert!(queue.push(9, 92), "settled, so it queues again");
        assert_eq!(reported.next().await, Some((9, 92)));
    }
}
