//! Who made a connection: the kernel-recorded origin, enriched from /proc only when the task
//! there is provably the same one (its start time matches what the kernel recorded).
use std::{
    collections::HashMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use gateway_common::SockState;
use sha2::{Digest, Sha256};

use crate::{audit::WorkloadRecord, cgroup::CgroupPath};

/// A workload identity: kernel facts first, /proc facts only if verified.
#[derive(Debug, Clone)]
pub struct WorkloadId {
    pub pid: u32,
    pub tgid: u32,
    pub start_boottime_ns: u64,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cgroup: Option<CgroupPath>,
    pub exe: Option<PathBuf>,
    pub exe_sha256: Option<String>,
    pub verified: bool,
}

impl WorkloadId {
    /// Whose share of the gateway's memory this workload's reads take: its container's, else
    /// its pod's, else its systemd unit's, else that of the cgroup directly below its enforced
    /// root (one of `roots`). Never a cgroup it made below its own, or a workload would take a
    /// share for each one it makes. Workloads whose cgroup path is not known (no origin, or a
    /// cgroup removed before the decision) share one. They are always refused, so this is
    /// the share of denial records they fold into: a workload that could delegate cgroups to
    /// itself would otherwise connect from a fresh cgroup, leave and remove it, and have a
    /// share of whole records for each.
    pub fn holder(&self, placement: &crate::container::Placement, roots: &[CgroupPath]) -> String {
        holder(
            placement.container.as_ref().map(|c| c.id.as_str()),
            placement.pod.as_ref().map(|p| p.uid.as_str()),
            self.cgroup.as_ref(),
            roots,
        )
    }

    pub fn record(&self) -> WorkloadRecord {
        WorkloadRecord {
            pid: self.pid,
            tgid: self.tgid,
            start_time_ns: self.start_boottime_ns,
            uid: self.uid,
            gid: self.gid,
            comm: self.comm.clone(),
            exe: self.exe.as_ref().map(|p| p.display().to_string()),
            exe_sha256: self.exe_sha256.clone(),
            verified: self.verified,
            ..WorkloadRecord::of_cgroup(self.cgroup_id, self.cgroup.as_ref())
        }
    }
}

/// The one holder of every workload whose cgroup path is not known.
pub const UNKNOWN_CGROUP: &str = "cgroup:unknown";

/// See [`WorkloadId::holder`]: from the container, pod and cgroup a workload's cgroup path shows.
pub fn holder(
    container: Option<&str>,
    pod_uid: Option<&str>,
    cgroup: Option<&CgroupPath>,
    roots: &[CgroupPath],
) -> String {
    if let Some(id) = container {
        return format!("container:{id}");
    }
    if let Some(uid) = pod_uid {
        return format!("pod:{uid}");
    }
    let Some(path) = cgroup else {
        return UNKNOWN_CGROUP.to_owned();
    };
    if let Some(unit) = path.systemd_unit() {
        return format!("unit:{unit}");
    }
    let workload = roots.iter().find_map(|root| path.below(root));
    format!("cgroup:{}", workload.unwrap_or(path.as_str()))
}

impl WorkloadRecord {
    /// Whose workload this record names, as [`WorkloadId::holder`] says it.
    pub fn holder(&self, roots: &[CgroupPath]) -> String {
        let path = self
            .cgroup
            .as_deref()
            .and_then(|p| CgroupPath::parse(p).ok());
        holder(
            self.container_id.as_deref(),
            self.pod.as_ref().map(|p| p.uid.as_str()),
            path.as_ref(),
            roots,
        )
    }
}

impl WorkloadId {
    /// The container and pod the cgroup path shows.
    pub fn placement(&self) -> crate::container::Placement {
        self.cgroup
            .as_ref()
            .map(|c| crate::container::placement(c.as_str()))
            .unwrap_or_default()
    }

    /// What the policy engine sees; `None` without a cgroup path (nothing can be selected).
    pub fn view<'a>(
        &'a self,
        placement: &'a crate::container::Placement,
    ) -> Option<crate::policy::WorkloadView<'a>> {
        Some(crate::policy::WorkloadView {
            cgroup: self.cgroup.as_ref()?,
            container_id: placement.container.as_ref().map(|c| c.id.as_str()),
            pod_uid: placement.pod.as_ref().map(|p| p.uid.as_str()),
            exe: self.exe.as_deref(),
            uid: self.uid,
        })
    }
}

/// The `comm` bytes as text.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Field 22 (starttime, clock ticks since boot) of a `/proc/.../stat` text. The command name
/// in field 2 may contain spaces and parentheses: parse after the last `)`.
pub fn stat_starttime(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 is the first; starttime is field 22 → index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks per second for /proc times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Whether the kernel-recorded start time (ns since boot) is the same task as /proc's ticks.
pub fn same_start(recorded_ns: u64, proc_ticks: u64, ticks_per_sec: u64) -> bool {
    recorded_ns != 0 && recorded_ns / (1_000_000_000 / ticks_per_sec) == proc_ticks
}

/// Cache of exe hashes, keyed by what changes when the file does (mtime can be reset).
/// What identifies an executable's content: device, inode, ctime (s, ns), size.
type FileKey = (u64, u64, i64, i64, u64);

pub struct ExeHashCache {
    entries: Mutex<HashMap<FileKey, String>>,
    /// Hashes read at once; more wait.
    reading: tokio::sync::Semaphore,
    /// How long a connection waits for its turn to read; then its record goes without the hash.
    wait: Duration,
    /// How long one read may take before it gives up its turn.
    most: Duration,
    /// The read each workload has under way (one at most), with where its result will show.
    under_way: Mutex<HashMap<String, (FileKey, Reading)>>,
    /// Files read so far.
    #[cfg(test)]
    reads: std::sync::atomic::AtomicUsize,
}

/// A read's result once it has one (`Some(None)`: the read failed).
type Reading = tokio::sync::watch::Receiver<Option<Option<String>>>;

/// How many executables are read for their hash at once.
const READING_AT_ONCE: usize = 2;

/// The longest one read may take (256 MiB from a page cache takes a fraction of a second).
const READING_MOST: Duration = Duration::from_secs(10);

/// The longest a connection waits for its turn to read its executable; then its record goes
/// without `exe_sha256` (policy never reads the hash).
const READING_WAIT: Duration = Duration::from_secs(1);

impl Default for ExeHashCache {
    fn default() -> Self {
        Self::with_bounds(READING_WAIT, READING_MOST)
    }
}

/// Executables larger than this are not hashed (`exe_sha256` is null): a workload could
/// otherwise make its executable a sparse file of any size and have the gateway read it all.
pub const MAX_HASHED: u64 = 256 << 20;

/// An executable opened for its hash, not yet read: the file the task executed, whatever its
/// path names now.
#[derive(Debug)]
pub struct ExeToRead {
    file: std::fs::File,
    key: FileKey,
}

/// What [`ExeHashCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// The hash, or `None` where there is none to have (no file, over [`MAX_HASHED`]).
    Known(Option<String>),
    /// Not cached: to be read.
    Read(ExeToRead),
}

impl Lookup {
    /// The hash known now, and what is left to read for it.
    fn split(self) -> (Option<String>, Option<ExeToRead>) {
        match self {
            Self::Known(h) => (h, None),
            Self::Read(exe) => (None, Some(exe)),
        }
    }
}

impl ExeHashCache {
    fn with_bounds(wait: Duration, most: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            reading: tokio::sync::Semaphore::new(READING_AT_ONCE),
            wait,
            most,
            under_way: Mutex::default(),
            #[cfg(test)]
            reads: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Opens the file behind `/proc/<tgid>/exe` (through the link, so it is the executed file
    /// even if the path now names another one) and looks its hash up.
    pub fn lookup(&self, proc_exe: &Path) -> Lookup {
        let Ok(file) = std::fs::File::open(proc_exe) else {
            return Lookup::Known(None);
        };
        let Ok(m) = file.metadata() else {
            return Lookup::Known(None);
        };
        if m.size() > MAX_HASHED {
            return Lookup::Known(None);
        }
        let key = (m.dev(), m.ino(), m.ctime(), m.ctime_nsec(), m.size());
        match self.cached(&key) {
            Some(h) => Lookup::Known(Some(h)),
            None => Lookup::Read(ExeToRead { file, key }),
        }
    }

    /// Reads `exe`'s hash for the workload `holder`, on the runtime's blocking pool while the
    /// caller's task waits, so the workers go on serving every other connection.
    /// [`READING_AT_ONCE`] reads run at a time, and a workload has one under way at most:
    /// its other connections from the same executable wait for that read, and those from
    /// another executable go without the hash (`None`) rather than queue. So a workload that
    /// rewrites its executable for every connection (a `chmod` makes a new version) holds one
    /// place in the queue, not one per connection. `None` too if the turn does not come within
    /// [`READING_WAIT`].
    pub async fn read(&self, exe: ExeToRead, holder: &str) -> Option<String> {
        // Ok: this read leads, and says when it is done; Err: it follows the read under way.
        let role = {
            let mut under_way = self.lock_under_way();
            match under_way.get(holder) {
                Some((key, reading)) if *key == exe.key => Err(reading.clone()),
                Some(_) => {
                    tracing::debug!(%holder, "executable not hashed: the workload has another read under way");
                    return None;
                }
                None => {
                    let (done, reading) = tokio::sync::watch::channel(None);
                    under_way.insert(holder.to_owned(), (exe.key, reading));
                    Ok(done)
                }
            }
        };
        let done = match role {
            Ok(done) => done,
            Err(mut reading) => {
                let waited = tokio::time::timeout(self.wait * 2, reading.wait_for(Option::is_some));
                return match waited.await {
                    Ok(Ok(result)) => result.clone().flatten(),
                    _ => None,
                };
            }
        };
        // Whatever happens to this read, its place is given up when it ends.
        let leading = Leading {
            cache: self,
            holder,
            done,
        };
        let hex = self.read_now(exe).await;
        leading.done.send_replace(Some(hex.clone()));
        hex
    }

    async fn read_now(&self, exe: ExeToRead) -> Option<String> {
        let Ok(Ok(_turn)) = tokio::time::timeout(self.wait, self.reading.acquire()).await else {
            tracing::debug!("executable not hashed: too many reads waiting");
            return None;
        };
        // Another workload may have read the same file while this one waited.
        if let Some(h) = self.cached(&exe.key) {
            return Some(h);
        }
        let ExeToRead { file, key } = exe;
        #[cfg(test)]
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A read that stalls (a hung network file system) gives up its turn and its
        // connection after a while; its blocking thread is left to finish.
        let read = tokio::task::spawn_blocking(move || sha256_hex(file));
        let Ok(Ok(Some(hex))) = tokio::time::timeout(self.most, read).await else {
            tracing::debug!("executable not hashed: the read failed or took too long");
            return None;
        };
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() > 4096 {
            entries.clear();
        }
        entries.insert(key, hex.clone());
        Some(hex)
    }

    /// [`Self::lookup`], then [`Self::read`] if it must.
    pub async fn hash(&self, proc_exe: &Path, holder: &str) -> Option<String> {
        match self.lookup(proc_exe) {
            Lookup::Known(h) => h,
            Lookup::Read(exe) => self.read(exe, holder).await,
        }
    }

    fn cached(&self, key: &FileKey) -> Option<String> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn lock_under_way(&self) -> std::sync::MutexGuard<'_, HashMap<String, (FileKey, Reading)>> {
        self.under_way
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A workload's read under way; gives up its place when dropped (ended, or its connection
/// went away), and wakes those waiting on it.
struct Leading<'a> {
    cache: &'a ExeHashCache,
    holder: &'a str,
    done: tokio::sync::watch::Sender<Option<Option<String>>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.cache.lock_under_way().remove(self.holder);
        if self.done.borrow().is_none() {
            self.done.send_replace(Some(None));
        }
    }
}

/// The sha256 of what `file` holds, in lower-case hex.
fn sha256_hex(mut file: std::fs::File) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// What a connection's identity needs from outside the kernel's record, kept for a short
/// while so that a process opening many connections does not pay /proc and cgroup lookups for
/// each: the executable of a task (keyed by tgid, tid and the kernel-recorded start time, so a
/// reused pid never hits) and the path of a cgroup id (ids are never reused). Only what was
/// verified is kept. An exec within the time to live is attributed to the previous executable;
/// `exe` is a narrowing selector, and exec cannot widen what the cgroup's policy allows (see
/// ARCHITECTURE.md).
pub struct IdentityCache {
    ttl: Duration,
    pub exe_hashes: ExeHashCache,
    tasks: Timed<(u32, u32, u64), Executable>,
    cgroups: Timed<u64, CgroupPath>,
}

/// Values with the time they were learned.
type Timed<K, V> = Mutex<HashMap<K, (Instant, V)>>;

#[derive(Clone)]
struct Executable {
    path: Option<PathBuf>,
    sha256: Option<String>,
}

/// Entries beyond this are dropped, expired ones first.
const CACHE_ENTRIES: usize = 4096;

impl Default for IdentityCache {
    fn default() -> Self {
        Self::with_ttl(Duration::from_secs(1))
    }
}

impl IdentityCache {
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            exe_hashes: ExeHashCache::default(),
            tasks: Mutex::default(),
            cgroups: Mutex::default(),
        }
    }

    fn get<K: Eq + std::hash::Hash, V: Clone>(&self, map: &Timed<K, V>, key: &K) -> Option<V> {
        let map = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    fn put<K: Eq + std::hash::Hash, V>(&self, map: &Timed<K, V>, key: K, v: V) {
        let mut map = map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= CACHE_ENTRIES {
            map.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if map.len() >= CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), v));
    }

    fn cgroup_path(&self, mount: &Path, id: u64) -> Option<CgroupPath> {
        if let Some(path) = self.get(&self.cgroups, &id) {
            return Some(path);
        }
        let path = crate::cgroup::path_of_id(mount, id)?;
        self.put(&self.cgroups, id, path.clone());
        Some(path)
    }
}

/// A verified task's executable whose hash was not cached: read with
/// [`IdentityCache::finish`] once the connection may go on.
#[derive(Debug)]
pub struct ExeToHash {
    exe: ExeToRead,
    task: (u32, u32, u64),
}

/// Builds the identity of a redirected connection from its kernel-recorded origin. The
/// executable's hash is filled in when it is cached; otherwise the executable is opened and
/// handed back, to be read once the connection has its place (a read can take a while).
pub fn resolve(
    origin: &SockState,
    cgroup_mount: &Path,
    cache: &IdentityCache,
) -> (WorkloadId, Option<ExeToHash>) {
    let mut id = WorkloadId {
        pid: origin.pid,
        tgid: origin.tgid,
        start_boottime_ns: origin.start_boottime_ns,
        uid: origin.uid,
        gid: origin.gid,
        comm: comm_str(&origin.comm),
        cgroup_id: origin.cgroup_id,
        cgroup: cache.cgroup_path(cgroup_mount, origin.cgroup_id),
        exe: None,
        exe_sha256: None,
        verified: false,
    };
    let task = (origin.tgid, origin.pid, origin.start_boottime_ns);
    let proc_exe = || PathBuf::from(format!("/proc/{}/exe", origin.tgid));
    if let Some(exe) = cache.get(&cache.tasks, &task) {
        id.exe = exe.path;
        id.exe_sha256 = exe.sha256;
        id.verified = true;
        // Cached before its hash was read (or while the read was skipped, or for a refusal,
        // which reads none): looked up again, so a task's later connections are not left
        // without it.
        if id.exe_sha256.is_some() {
            return (id, None);
        }
        let (sha256, to_read) = cache.exe_hashes.lookup(&proc_exe()).split();
        id.exe_sha256 = sha256;
        return (id, to_read.map(|exe| ExeToHash { exe, task }));
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/task/{}/stat", origin.tgid, origin.pid));
    let verified = stat
        .ok()
        .and_then(|s| stat_starttime(&s))
        .is_some_and(|ticks| same_start(origin.start_boottime_ns, ticks, clock_ticks()));
    if !verified {
        return (id, None);
    }
    let proc_exe = proc_exe();
    id.exe = std::fs::read_link(&proc_exe).ok();
    let (sha256, to_read) = cache.exe_hashes.lookup(&proc_exe).split();
    id.exe_sha256 = sha256;
    // Re-check after reading: if the task changed meanwhile, drop what /proc said.
    let still = std::fs::read_to_string(format!("/proc/{}/task/{}/stat", origin.tgid, origin.pid))
        .ok()
        .and_then(|s| stat_starttime(&s))
        .is_some_and(|ticks| same_start(origin.start_boottime_ns, ticks, clock_ticks()));
    if !still {
        id.exe = None;
        id.exe_sha256 = None;
        return (id, None);
    }
    id.verified = true;
    let exe = Executable {
        path: id.exe.clone(),
        sha256: id.exe_sha256.clone(),
    };
    // Kept from now: the time to live runs from what /proc said, not from when a hash is read.
    cache.put(&cache.tasks, task, exe);
    (id, to_read.map(|exe| ExeToHash { exe, task }))
}

impl IdentityCache {
    /// Reads the hash `pending` stands for (see [`ExeHashCache::read`]: `holder` is the
    /// workload whose read it is), puts it in `id`, and into the task's cached executable.
    pub async fn finish(&self, id: &mut WorkloadId, pending: ExeToHash, holder: &str) {
        let Some(hex) = self.exe_hashes.read(pending.exe, holder).await else {
            return;
        };
        id.exe_sha256 = Some(hex.clone());
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, exe)) = tasks.get_mut(&pending.task) {
            if exe.path == id.exe {
                exe.sha256 = Some(hex);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// An executable read for its hash does not hold up the runtime: on a runtime of one
    /// thread, a task ticking every millisecond goes on ticking while 32 MiB are hashed.
    #[test]
    fn hashing_an_executable_leaves_the_workers_serving() {
        let path = std::env::temp_dir().join(format!("tg-exe-big-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(32 << 20))
            .expect("sparse");
        let cache = ExeHashCache::default();
        let (hash, ticks) = block_on(async {
            let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = std::sync::Arc::clone(&ticks);
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            tokio::task::yield_now().await;
            let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
            let hash = cache.hash(&path, "unit:w.service").await;
            let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
            ticker.abort();
            (hash, during)
        });
        let _ = std::fs::remove_file(&path);
        assert_eq!(hash.map(|h| h.len()), Some(64), "hashed");
        assert!(
            ticks >= 5,
            "the runtime served other tasks meanwhile: {ticks} ticks"
        );
    }

    /// A workload has one read under way at most: while it waits, another connection of the
    /// same workload from the same executable waits for that read and gets its result, one
    /// from another executable goes without a hash at once, and another workload's read is
    /// its own.
    #[test]
    fn a_workload_has_one_read_under_way_and_others_share_it() {
        let dir = std::env::temp_dir().join(format!("tg-exe-one-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (one, two) = (dir.join("one"), dir.join("two"));
        std::fs::write(&one, b"abc").expect("one");
        std::fs::write(&two, b"another").expect("two");
        // A wait far longer than the test, so a slow machine cannot time the leader out.
        let cache = ExeHashCache::with_bounds(Duration::from_secs(60), READING_MOST);
        let read = |path: &Path| match cache.lookup(path) {
            Lookup::Read(exe) => exe,
            Lookup::Known(h) => panic!("not cached yet: {h:?}"),
        };
        let (leader, follower, other, elsewhere) = block_on(async {
            let turns = cache.reading.acquire_many(READING_AT_ONCE as u32).await;
            let mut leader = std::pin::pin!(cache.read(read(&one), "unit:a.service"));
            let mut follower = std::pin::pin!(cache.read(read(&one), "unit:a.service"));
            // Both wait for a turn.
            for _ in 0..2 {
                assert!(futures_poll(leader.as_mut()).is_none());
                assert!(futures_poll(follower.as_mut()).is_none());
            }
            // Another executable of the same workload: no hash, no wait.
            let other = cache.read(read(&two), "unit:a.service").await;
            // Another workload reads its own (once a turn is free).
            drop(turns);
            let elsewhere = cache.read(read(&two), "unit:b.service").await;
            let (leader, follower) = tokio::join!(leader, follower);
            (leader, follower, other, elsewhere)
        });
        let _ = std::fs::remove_dir_all(&dir);
        let abc =
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_owned());
        assert_eq!(leader, abc);
        assert_eq!(follower, abc, "the follower has the leader's result");
        assert_eq!(
            cache.reads.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "one read for the leader and its follower, one for the other workload"
        );
        assert_eq!(other, None);
        assert_eq!(elsewhere.map(|h| h.len()), Some(64));
        assert!(cache.lock_under_way().is_empty(), "every place given up");
    }

    /// Polls `f` once; its output if it was ready.
    fn futures_poll<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    /// While other reads hold every turn, a connection waits at most its wait, then goes on
    /// without the hash; once a turn is free, it is read.
    #[test]
    fn a_read_that_cannot_get_a_turn_in_time_goes_without_the_hash() {
        let cache = ExeHashCache::with_bounds(Duration::from_millis(50), READING_MOST);
        let exe = Path::new("/proc/self/exe");
        block_on(async {
            let held = cache.reading.acquire_many(READING_AT_ONCE as u32).await;
            let started = std::time::Instant::now();
            assert_eq!(cache.hash(exe, "unit:w.service").await, None);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "it did not wait for a turn"
            );
            drop(held);
            assert!(
                cache.hash(exe, "unit:w.service").await.is_some(),
                "hashed once a turn is free"
            );
        });
    }

    /// A read that stalls (a hung network file system; here a FIFO nobody writes to) gives up
    /// after its bound and hands its turn back: with every turn taken by stalled reads, another
    /// workload's executable is still hashed once the bound has passed.
    #[test]
    fn a_stalled_read_gives_up_its_turn_after_its_bound() {
        use std::os::{
            fd::AsRawFd,
            unix::fs::{MetadataExt, OpenOptionsExt},
        };
        let dir = std::env::temp_dir().join(format!("tg-stall-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // Opened for reading without waiting for a writer, then made blocking; the test holds
        // the writer, so each read blocks until the writer is dropped.
        let stalled = |name: &str| {
            let path = dir.join(name);
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .expect("open the FIFO");
            // SAFETY: fcntl on a descriptor this function owns.
            assert_eq!(
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) },
                0
            );
            let writer = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("the writer");
            let m = file.metadata().expect("metadata");
            let key = (m.dev(), m.ino(), m.ctime(), m.ctime_nsec(), m.size());
            (ExeToRead { file, key }, writer)
        };
        let cache = ExeHashCache::with_bounds(Duration::from_secs(60), Duration::from_millis(200));
        let ((one, w1), (two, w2)) = (stalled("one"), stalled("two"));
        let small = dir.join("small");
        std::fs::write(&small, b"abc").expect("small");
        let joined = block_on(async {
            // Without the bound the stalled reads would hold the turns for ever.
            let joined = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::join!(
                    cache.read(one, "unit:a.service"),
                    cache.read(two, "unit:b.service"),
                    async {
                        // Once both stalled reads hold the turns.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        cache.hash(&small, "unit:c.service").await
                    }
                )
            })
            .await;
            // Their blocking threads end (EOF) before the runtime does.
            drop((w1, w2));
            joined
        });
        let _ = std::fs::remove_dir_all(&dir);
        let (first, second, third) = joined.expect("done within 5 s");
        assert_eq!((first, second), (None, None), "the stalled reads gave up");
        assert_eq!(
            third.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            "hashed after a turn came free"
        );
        assert_eq!(cache.reads.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// An executable made huge (a sparse file costs its owner nothing) is not read whole: it
    /// is not hashed at all, at once. One of ordinary size is.
    #[test]
    fn a_huge_executable_is_not_hashed() {
        let dir = std::env::temp_dir().join(format!("tg-exe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (small, huge) = (dir.join("small"), dir.join("huge"));
        std::fs::write(&small, b"abc").expect("small");
        std::fs::File::create(&huge)
            .and_then(|f| f.set_len(64 << 30))
            .expect("sparse");
        let cache = ExeHashCache::default();
        let (small_hash, huge_hash) = block_on(async {
            (
                cache.hash(&small, "unit:w.service").await,
                cache.hash(&huge, "unit:w.service").await,
            )
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            small_hash.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(huge_hash, None);
    }

    /// Cgroups a workload makes inside its own take from its one share of the gateway's memory.
    #[test]
    fn a_workload_holds_one_share_whatever_cgroups_it_makes() {
        let of = |path: Option<&str>, cgroup_id: u64| {
            let id = WorkloadId {
                pid: 1,
                tgid: 1,
                start_boottime_ns: 0,
                uid: 0,
                gid: 0,
                comm: String::new(),
                cgroup_id,
                cgroup: path.map(|p| CgroupPath::parse(p).expect("path")),
                exe: None,
                exe_sha256: None,
                verified: false,
            };
            let roots = [CgroupPath::parse("/agents").expect("root")];
            id.holder(&id.placement(), &roots)
        };
        let holder = |path: &str| of(Some(path), 7);
        let app = holder("/system.slice/app.service");
        for inside in [
            "/system.slice/app.service/x",
            "/system.slice/app.service/x/y.service",
            "/system.slice/app.service/kubepods/pod0b4f2a4e-6d1c-4c8e-9a57-3f2e1d0c9b8a",
        ] {
            assert_eq!(holder(inside), app, "{inside}");
        }
        assert_ne!(holder("/system.slice/other.service"), app);
        // Without systemd's names: each cgroup directly below the root is one workload.
        let a = holder("/agents/a");
        assert_eq!(holder("/agents/a/x/y"), a);
        assert_ne!(holder("/agents/b"), a);
        let id = "4f6b1c0d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
        let container = holder(&format!("/system.slice/docker-{id}.scope"));
        assert_eq!(container, format!("container:{id}"));
        assert_eq!(
            holder(&format!("/system.slice/docker-{id}.scope/inner")),
            container
        );
        // Cgroups removed before their path was read (each its own id) share one holder, as
        // do connections with no origin.
        assert_eq!(of(None, 8), of(None, 9));
        assert_eq!(of(None, 8), of(None, 0));
        assert_ne!(of(None, 8), a);
    }

    #[test]
    fn starttime_after_tricky_comm() {
        let stat =
            "1234 (a) b) (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(stat_starttime(stat), Some(98_765));
        assert_eq!(stat_starttime("garbage"), None);
    }

    #[test]
    fn start_time_comparison() {
        assert!(same_start(987_650_000_000, 98_765, 100));
        assert!(same_start(987_659_999_999, 98_765, 100));
        assert!(!same_start(987_660_000_000, 98_765, 100));
        assert!(
            !same_start(0, 0, 100),
            "an unknown start time never verifies"
        );
    }

    #[test]
    fn own_process_verifies_and_hashes() {
        let me = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{me}/task/{me}/stat")).expect("stat");
        let ticks = stat_starttime(&stat).expect("starttime");
        assert!(ticks > 0);
        let cache = ExeHashCache::default();
        let exe = Path::new("/proc/self/exe");
        let (a, b) = block_on(async {
            (
                cache.hash(exe, "unit:w.service").await,
                cache.hash(exe, "unit:w.service").await,
            )
        });
        let (a, b) = (a.expect("hash"), b.expect("hash"));
        assert_eq!(a.len(), 64);
        assert_eq!(a, b);
    }

    /// This thread, as the kernel would record it at connect().
    fn own_origin() -> SockState {
        let me = std::process::id();
        // SAFETY: gettid has no preconditions.
        let tid = u32::try_from(unsafe { libc::gettid() }).expect("tid");
        let stat = std::fs::read_to_string(format!("/proc/{me}/task/{tid}/stat")).expect("stat");
        let ticks = stat_starttime(&stat).expect("starttime");
        SockState {
            pid: tid,
            tgid: me,
            start_boottime_ns: ticks * (1_000_000_000 / clock_ticks()),
            ..SockState::default()
        }
    }

    #[test]
    fn a_task_is_looked_up_once_per_time_to_live_and_a_reused_pid_never_hits() {
        let origin = own_origin();
        let mount = Path::new("/nonexistent");
        let cache = IdentityCache::with_ttl(Duration::from_secs(60));
        let (mut first, pending) = resolve(&origin, mount, &cache);
        assert!(first.verified && first.exe.is_some(), "own task resolves");
        assert_eq!(first.exe_sha256, None, "the hash is read later");
        assert!(pending.is_some(), "an executable to read");
        // Not read (a refusal reads none): the task's next connection is handed it again.
        let (_, pending) = resolve(&origin, mount, &cache);
        let pending = pending.expect("handed the executable again");
        block_on(cache.finish(&mut first, pending, "unit:w.service"));
        assert_eq!(first.exe_sha256.as_ref().map(String::len), Some(64), "read");
        assert_eq!(cache.tasks.lock().expect("lock").len(), 1);
        let (again, pending) = resolve(&origin, mount, &cache);
        assert!(pending.is_none(), "nothing left to read");
        assert_eq!((again.exe, again.exe_sha256), (first.exe, first.exe_sha256));
        // Another start time under the same ids (a reused pid) misses, and /proc does not
        // show that task: nothing is verified, nothing is cached.
        let reused = SockState {
            start_boottime_ns: origin.start_boottime_ns + 1_000_000_000,
            ..origin
        };
        let other = resolve(&reused, mount, &cache).0;
        assert!(!other.verified && other.exe.is_none());
        assert_eq!(cache.tasks.lock().expect("lock").len(), 1);
        // Expired entries are not used: with no time to live every lookup asks /proc.
        let fresh = IdentityCache::with_ttl(Duration::ZERO);
        resolve(&origin, mount, &fresh);
        assert!(fresh
            .get(
                &fresh.tasks,
                &(origin.tgid, origin.pid, origin.start_boottime_ns)
            )
            .is_none());
    }
}
