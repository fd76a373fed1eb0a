//! The audit log: one JSON Lines record per decision, its own sink with a versioned schema.
use std::{
    borrow::Cow,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError},
        Arc,
    },
};

use serde::Serialize;

use crate::fold::Folding;

pub const SCHEMA: &str = "tollgate.audit/v1";

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Monitor mode: would have been denied, was let through.
    WouldDeny,
    Error,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// Refused in the kernel (socket hooks or the egress backstop).
    Kernel,
    /// A redirected connection, decided by the gateway.
    Connect,
    /// One HTTP request on an inspected connection.
    Request,
    /// Daemon lifecycle: enforcement started, pre-existing connections destroyed.
    Lifecycle,
}

/// Who, as far as it is known; kernel-recorded fields are always present for connections.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadRecord {
    pub pid: u32,
    pub tgid: u32,
    /// Thread start time since boot, in ns, as the kernel recorded it.
    pub start_time_ns: u64,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container_id: Option<String>,
    /// The container runtime the cgroup name shows (`docker`, `containerd`, `cri-o`, `podman`).
    pub runtime: Option<&'static str>,
    pub pod: Option<crate::container::Pod>,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    /// Whether /proc still showed the same task (start time matched), so exe is trustworthy.
    pub verified: bool,
}

impl WorkloadRecord {
    /// A record naming only a cgroup (id and, if it still exists, its path and what the path
    /// says: systemd unit, container, pod).
    pub fn of_cgroup(cgroup_id: u64, path: Option<&crate::cgroup::CgroupPath>) -> Self {
        let mut w = Self {
            cgroup_id,
            ..Self::default()
        };
        w.set_cgroup(path);
        w
    }

    /// Fills the fields derived from the cgroup path.
    pub fn set_cgroup(&mut self, path: Option<&crate::cgroup::CgroupPath>) {
        let Some(path) = path else { return };
        self.cgroup = Some(path.to_string());
        self.unit = path.systemd_unit().map(str::to_owned);
        let placement = crate::container::placement(path.as_str());
        self.runtime = placement.container.as_ref().map(|c| c.runtime);
        self.container_id = placement.container.map(|c| c.id);
        self.pod = placement.pod;
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DstRecord {
    /// The host an HTTP request named (normalized).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Arc<str>>,
    pub orig_ip: Option<Arc<str>>,
    pub orig_port: Option<u16>,
    pub protocol: Option<&'static str>,
}

/// One HTTP request. The path is normalized and never carries the query (where an injected
/// credential may be).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpRecord {
    pub method: Cow<'static, str>,
    pub path: Option<Arc<str>>,
    pub status: u16,
}

/// What the request said about the model it calls, where a rule made the gateway read it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmRecord {
    /// The JSON body's top-level `model` (cut at 200 bytes); `None`: the body named none.
    pub model: Option<String>,
    /// Tokens the response's `usage` counted, where it gave them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
    /// What a tokens budget was charged where the answer gave no counts: a token per 4 bytes
    /// sent and received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_estimated: Option<u64>,
}

/// The workload of a record that names none, shared rather than made per record.
static NO_WORKLOAD: std::sync::LazyLock<Arc<WorkloadRecord>> =
    std::sync::LazyLock::new(Arc::default);

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub ts: Timestamp,
    pub schema: &'static str,
    pub decision: Verdict,
    pub layer: Layer,
    pub reason: Cow<'static, str>,
    pub policy: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
    /// Shared: every record of a connection names the same workload.
    pub workload: Arc<WorkloadRecord>,
    pub dst: DstRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmRecord>,
    /// The credential binding injected (its name, never its value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Time from accept to decision in the gateway (origin lookup and checks, identity,
    /// policy), in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_us: Option<u64>,
    /// For aggregated records (suppressed kernel refusals, DNS counts, denials folded past a
    /// workload's share): how many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For denials folded into this record (this record is the last of them): when the first
    /// was decided, and where they were for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded: Option<Box<crate::fold::Folded>>,
}

impl AuditRecord {
    pub fn new(decision: Verdict, layer: Layer, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            ts: Timestamp::now(),
            schema: SCHEMA,
            decision,
            layer,
            reason: reason.into(),
            policy: None,
            rule: None,
            workload: Arc::clone(&NO_WORKLOAD),
            dst: DstRecord::default(),
            http: None,
            llm: None,
            credential: None,
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            decision_us: None,
            count: None,
            folded: None,
        }
    }

    /// How many decisions this record stands for: one, or its `count` for a folded or
    /// aggregate record of decisions; none for a lifecycle record or a count of lost reports
    /// (an `error` with a count), which count other things.
    pub fn decisions(&self) -> u64 {
        match (self.layer, self.decision, self.count) {
            (Layer::Lifecycle, _, _) | (_, Verdict::Error, Some(_)) => 0,
            (_, _, count) => count.unwrap_or(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write audit log: {0}")]
    Write(#[source] std::io::Error),
    #[error("audit log writer is {QUEUE} records behind")]
    Backlog,
}

/// The audit sink. The caller queues records; one writer thread serializes and writes them, in
/// order, each line whole: a record costs the request path a channel send, not a serialization
/// or a file write. The writer takes every record queued at the time into one `write`.
///
/// Whether the last write succeeded is kept: while it did not (or the queue is full), allowing
/// is refused (fail closed) unless the operator chose `audit_failure: allow`. [`AuditLog::flush`]
/// waits until everything queued before it is written; the daemon calls it before it exits.
#[derive(Clone, Debug)]
pub struct AuditLog {
    queue: SyncSender<Message>,
    healthy: Arc<AtomicBool>,
}

enum Message {
    /// Serialized by the writer, off the request path.
    Record(Box<AuditRecord>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Records waiting for the writer; beyond this the sink counts as failing.
const QUEUE: usize = 65_536;
/// How long the writer waits for more records after a write before it blocks again: under
/// load it wakes at most this often (each wake is a context switch on a CPU the requests
/// need), and a record reaches the file at most this late.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// At most this much is gathered into one write.
const BATCH: usize = 256 * 1024;
/// At most this many records are taken from the queue for one write.
const BATCH_MESSAGES: usize = 4096;

impl AuditLog {
    /// Opens the log at `path`; of each workload's denials (a workload found below one of
    /// `roots`, see [`crate::fold`]), `denials_per_second` are written whole each second and
    /// the rest counted (0: all written whole).
    pub fn open(
        path: &Path,
        denials_per_second: u32,
        roots: Vec<crate::cgroup::CgroupPath>,
    ) -> Result<Self, AuditError> {
        let file = open_log(path).map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
        let path = path.to_owned();
        let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE);
        let healthy = Arc::new(AtomicBool::new(true));
        let writer_health = Arc::clone(&healthy);
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn({
                let path = path.clone();
                move || {
                    as_batch_work();
                    let folding = Folding::new(denials_per_second, roots);
                    write_lines(&path, file, &lines, &writer_health, folding);
                }
            })
            .map_err(|source| AuditError::Open { path, source })?;
        Ok(Self { queue, healthy })
    }

    /// Whether the audit sink took the last record.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Queues one record for the writer.
    pub fn write(&self, record: AuditRecord) -> Result<(), AuditError> {
        match self.queue.try_send(Message::Record(Box::new(record))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.healthy.store(false, Ordering::Relaxed);
                Err(AuditError::Backlog)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.healthy.store(false, Ordering::Relaxed);
                Err(AuditError::Write(std::io::Error::other(
                    "the audit writer stopped",
                )))
            }
        }
    }

    /// Writes, logging (never panicking) if the sink fails.
    pub fn emit(&self, record: AuditRecord) {
        if let Err(e) = self.write(record) {
            tracing::error!(error = %e, "audit record lost");
        }
    }

    /// Waits (up to `timeout`) until every record queued before this call is written.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let (done, written) = std::sync::mpsc::channel();
        self.queue.send(Message::Flush(done)).is_ok() && written.recv_timeout(timeout).is_ok()
    }
}

/// Flushes the log when dropped, so records queued before a return or an error are written
/// before the process exits.
pub struct FlushOnDrop(pub AuditLog);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        if !self.0.flush(std::time::Duration::from_secs(5)) {
            tracing::error!("audit records may be lost: the writer did not finish in time");
        }
    }
}

/// The audit file, and whether a failed write may have left it inside a line.
struct Sink<W> {
    file: W,
    /// What reached the file last does not end a line (a write failed partway, the disk
    /// full): the next batch starts on a new line, so only the torn record is lost and every
    /// other line stays one whole record. The file is not cut back to its last whole line: a
    /// rotation by copytruncate would make a remembered length wrong.
    torn: bool,
}

impl<W: Write> Sink<W> {
    fn new(file: W) -> Self {
        Self { file, torn: false }
    }

    /// Writes a batch of whole lines.
    fn write_batch(&mut self, batch: &[u8]) -> std::io::Result<()> {
        if self.torn {
            self.write_tracked(b"\n")?;
        }
        self.write_tracked(batch)
    }

    /// `write_all`, noting whether what reached the file ends a line.
    fn write_tracked(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match self.file.write(bytes) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let (written, rest) = bytes.split_at(n.min(bytes.len()));
                    self.torn = written.last() != Some(&b'\n');
                    bytes = rest;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The audit file at `path` (and its directory), opened for appending; readable by its owner
/// and group only (records name every workload's executables and destinations): made so, or,
/// if it was there already with access for others, made so now.
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    if mode & 0o027 != 0 {
        // Written by its owner alone, read by its group: nobody else can forge or read a record.
        let narrowed = mode & 0o740;
        match file.set_permissions(std::fs::Permissions::from_mode(narrowed)) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "the audit log was open to others: now mode {narrowed:o}");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the audit log is open to others (mode {mode:o}) and cannot be narrowed");
            }
        }
    }
    Ok(file)
}

/// Whether `path` names another file than `file`, or none: a rotation renamed it away (and
/// may have made a new one), or it was removed.
fn moved_away(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => (named.dev(), named.ino()) != (open.dev(), open.ino()),
        (Err(_), _) => true,
        (Ok(_), Err(_)) => false,
    }
}

/// Marks the calling thread as batch work (`SCHED_BATCH`): it keeps a normal thread's fair
/// share of the CPU, so it is no likelier to fall behind than the threads that make the
/// records, but waking (a record after a quiet spell, the end of a linger) it does not take a
/// CPU from a thread that is serving a request.
fn as_batch_work() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "the audit writer stays a normal thread");
    }
}

/// The writer thread: blocks for a record (or until a folded second ends), takes whatever
/// else is queued, writes it in one go.
fn write_lines(
    path: &Path,
    file: File,
    queue: &Receiver<Message>,
    healthy: &AtomicBool,
    mut folding: Folding,
) {
    let mut writer = Writer {
        path,
        sink: Sink::new(file),
        reopen_failed: false,
        healthy,
    };
    let mut batch = Batch::default();
    let mut waiting = Vec::new();
    let mut first = wait(queue, &folding);
    while let Some(message) = first {
        let mut next = message;
        let mut lines = 0usize;
        while let Some(message) = next.take() {
            match message {
                Message::Record(record) => {
                    let now = std::time::Instant::now();
                    folding.take(record, now, |r| batch.push(r));
                    lines += 1;
                }
                Message::Flush(done) => {
                    folding.release(|r| batch.push(r));
                    waiting.push(done);
                }
            }
            // A flood the folding holds back adds nothing to the batch: the count of
            // messages ends a batch too, so held seconds and flushes are not kept waiting.
            if batch.bytes.len() < BATCH && lines < BATCH_MESSAGES {
                next = queue.try_recv().ok();
            }
        }
        folding.due(std::time::Instant::now(), |r| batch.push(r));
        writer.write(&batch);
        batch.clear();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        // While records keep coming (more than one since the last write), gather them for a
        // moment rather than be woken for each (a wake is a syscall on the request path). A
        // lone record is not followed by a pause: the next is written, and a failing sink
        // seen, as soon as it comes.
        if lines > 1 {
            std::thread::sleep(LINGER);
        }
        first = match queue.try_recv() {
            Ok(message) => Some(Some(message)),
            Err(TryRecvError::Empty) => wait(queue, &folding),
            Err(TryRecvError::Disconnected) => None,
        };
    }
    folding.release(|r| batch.push(r));
    writer.write(&batch);
}

/// The next message, or `Some(None)` when a folded second ends first; `None`: every sender
/// is gone.
fn wait(queue: &Receiver<Message>, folding: &Folding) -> Option<Option<Message>> {
    let Some(due) = folding.next_due() else {
        return queue.recv().ok().map(Some);
    };
    let left = due.saturating_duration_since(std::time::Instant::now());
    match queue.recv_timeout(left) {
        Ok(message) => Some(Some(message)),
        Err(RecvTimeoutError::Timeout) => Some(None),
        Err(RecvTimeoutError::Disconnected) => None,
    }
}

/// Lines gathered for one write, with the records they are and the decisions those stand for
/// ([`AuditRecord::decisions`]).
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: usize,
    decisions: u64,
}

impl Batch {
    /// Appends `record` as one line; a record that cannot be serialized leaves nothing of it.
    fn push(&mut self, record: &AuditRecord) {
        let before = self.bytes.len();
        match serde_json::to_writer(&mut self.bytes, record) {
            Ok(()) => {
                self.bytes.push(b'\n');
                self.records += 1;
                self.decisions += record.decisions();
            }
            Err(e) => {
                self.bytes.truncate(before);
                tracing::error!(error = %e, "audit record lost: not serializable");
            }
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.records = 0;
        self.decisions = 0;
    }
}

/// Writes batches to the file at `path`. Before each write it checks that `path` still names
/// the file it writes: after a rotation that renames the log (logrotate's default), the
/// records go to a file at `path` again. Rotation by copy and truncate needs nothing: the file
/// is appended to.
struct Writer<'a> {
    path: &'a Path,
    sink: Sink<File>,
    reopen_failed: bool,
    healthy: &'a AtomicBool,
}

impl Writer<'_> {
    /// Writes `batch`, noting whether it could.
    fn write(&mut self, batch: &Batch) {
        if batch.bytes.is_empty() {
            return;
        }
        let path = self.path;
        if moved_away(path, &self.sink.file) {
            match open_log(path) {
                Ok(file) => {
                    tracing::info!(path = %path.display(), "audit log moved away: writing to a new file at its path");
                    self.sink = Sink::new(file);
                    self.reopen_failed = false;
                }
                Err(e) => {
                    if !self.reopen_failed {
                        tracing::error!(path = %path.display(), error = %e, "audit log moved away and cannot be made again: writing to the moved file, and counting the log as failing");
                    }
                    self.reopen_failed = true;
                }
            }
        }
        match self.sink.write_batch(&batch.bytes) {
            // Records that reach a file no longer at the log's path (a rotation's, soon
            // compressed or removed) are not an audit log anyone reads: failing.
            Ok(()) => self.healthy.store(!self.reopen_failed, Ordering::Relaxed),
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(
                    error = %e,
                    records = batch.records,
                    decisions = batch.decisions,
                    "audit records lost: cannot write audit log"
                );
            }
        }
    }
}

/// When a record was made; written as UTC RFC 3339 with microseconds (formatted by the
/// writer, not on the request path).
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(std::time::SystemTime);

impl Timestamp {
    pub fn now() -> Self {
        Self(std::time::SystemTime::now())
    }

    pub fn time(self) -> std::time::SystemTime {
        self.0
    }

    #[cfg(test)]
    pub fn at(t: std::time::SystemTime) -> Self {
        Self(t)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&rfc3339(self.0))
    }
}

/// `t` as UTC RFC 3339 with microseconds, without a date-time dependency.
fn rfc3339(t: std::time::SystemTime) -> String {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation: renamed away (logrotate's default), the log is made again at its path and the
    /// next records go there; copied and truncated, it is appended to from its new start.
    /// Either way each file holds whole records only, and a new log is not readable by others.
    #[test]
    fn a_rotated_log_is_written_at_its_path_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tg-audit-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        // A log there already, open to others: closed to them.
        std::fs::write(&path, "").expect("old log");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).expect("chmod");
        let log = AuditLog::open(&path, 0, Vec::new()).expect("open");
        let old_mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        let write = |reason: &'static str| {
            log.emit(AuditRecord::new(Verdict::Allow, Layer::Lifecycle, reason));
            assert!(log.flush(std::time::Duration::from_secs(5)), "flushed");
        };
        let reasons = |p: &Path| -> Vec<String> {
            std::fs::read_to_string(p)
                .expect("read")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("a whole record");
                    v["reason"].as_str().expect("reason").to_owned()
                })
                .collect()
        };
        write("first");
        std::fs::rename(&path, dir.join("audit.jsonl.1")).expect("rename");
        write("second");
        std::fs::copy(&path, dir.join("audit.jsonl.2")).expect("copy");
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("truncate");
        write("third");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        // Moved away, and nothing can be made at its path (a directory stands there): the
        // records go to the moved file, and the log counts as failing until it can be made.
        std::fs::rename(&path, dir.join("audit.jsonl.3")).expect("rename");
        std::fs::create_dir(&path).expect("a directory in the way");
        write("fourth");
        let failing = !log.is_healthy();
        std::fs::remove_dir(&path).expect("rmdir");
        write("fifth");
        let (stranded, healthy_again) = (reasons(&dir.join("audit.jsonl.3")), log.is_healthy());
        let fifth = reasons(&path);
        let (rotated, copied) = (
            reasons(&dir.join("audit.jsonl.1")),
            reasons(&dir.join("audit.jsonl.2")),
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(rotated, ["first"]);
        assert_eq!(copied, ["second"]);
        assert_eq!(mode & 0o007, 0, "not readable by others: {mode:o}");
        assert_eq!(
            old_mode & 0o777,
            0o640,
            "an old log closed to others: {old_mode:o}"
        );
        // "third" went to the truncated log, which was then moved away with "fourth".
        assert_eq!(stranded, ["third", "fourth"]);
        assert!(failing, "a log that cannot be made again counts as failing");
        assert!(healthy_again);
        assert_eq!(fifth, ["fifth"]);
    }

    /// Past its share, a flood of denials is written as one counted record when its second
    /// ends, with no further record or flush to wake the writer; allowed records are never
    /// held back.
    #[test]
    fn a_denial_flood_is_counted_when_its_second_ends() {
        let dir = std::env::temp_dir().join(format!("tg-audit-fold-{}", std::process::id()));
        let path = dir.join("a.jsonl");
        let log = AuditLog::open(&path, 2, Vec::new()).expect("open");
        for _ in 0..10 {
            log.emit(AuditRecord::new(Verdict::Deny, Layer::Request, "flood"));
            log.emit(AuditRecord::new(Verdict::Allow, Layer::Request, "served"));
        }
        let started = std::time::Instant::now();
        let records = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a whole record"))
                .collect();
            if records.iter().any(|r| r["count"].is_u64())
                || started.elapsed() > std::time::Duration::from_secs(5)
            {
                break records;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let waited = started.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        let of = |reason: &str| -> Vec<&serde_json::Value> {
            records.iter().filter(|r| r["reason"] == reason).collect()
        };
        assert_eq!(of("served").len(), 10, "allowed: all whole");
        let flood = of("flood");
        assert_eq!(flood.len(), 3, "two whole, one counted: {flood:?}");
        assert!(flood[..2].iter().all(|r| r.get("count").is_none()));
        assert_eq!(flood[2]["count"], 8);
        assert_eq!(flood[2]["folded"]["targets"][0]["count"], 8, "{}", flood[2]);
        assert!(
            flood[2]["folded"]["since"].as_str().expect("since")
                <= flood[2]["ts"].as_str().expect("ts")
        );
        assert!(waited < std::time::Duration::from_secs(3), "{waited:?}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
    }

    #[test]
    fn record_is_one_json_line_with_schema() {
        let dir = std::env::temp_dir().join(format!("tg-audit-{}", std::process::id()));
        let path = dir.join("a.jsonl");
        let log = AuditLog::open(&path, 0, Vec::new()).expect("open");
        let mut r = AuditRecord::new(Verdict::Deny, Layer::Connect, "no_rule_matched");
        r.policy = Some("p".into());
        log.write(r).expect("write");
        assert!(log.flush(std::time::Duration::from_secs(5)), "flushed");
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["layer"], "connect");
        let ts = v["ts"].as_str().expect("ts");
        assert!(
            ts.len() == 27
                && ts.starts_with("20")
                && ts.ends_with('Z')
                && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }

    /// Takes `room` bytes, then fails as a full disk does (after a partial write), until
    /// given more room.
    struct FullDisk {
        written: Vec<u8>,
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_torn_line_costs_only_its_own_record() {
        let line = |reason: &'static str| {
            let mut l =
                serde_json::to_vec(&AuditRecord::new(Verdict::Deny, Layer::Connect, reason))
                    .expect("json");
            l.push(b'\n');
            l
        };
        let (first, torn, next) = (line("first"), line("torn"), line("next"));
        let mut sink = Sink::new(FullDisk {
            written: Vec::new(),
            room: first.len() + 10,
        });
        sink.write_batch(&[first.clone(), torn].concat())
            .expect_err("the disk is full");
        sink.file.room = usize::MAX;
        sink.write_batch(&next).expect("room again");
        let text = String::from_utf8(sink.file.written).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0].as_bytes(), &first[..first.len() - 1]);
        assert_eq!(lines[1].len(), 10, "the torn record, alone: {text}");
        let v: serde_json::Value = serde_json::from_str(lines[2]).expect("a whole record");
        assert_eq!(v["reason"], "next");
    }

    /// The writer runs as batch work: waking, it does not take a CPU from a request's thread,
    /// and it keeps its fair share.
    #[test]
    fn the_writer_runs_as_batch_work() {
        let dir = std::env::temp_dir().join(format!("tg-audit-batch-{}", std::process::id()));
        let log = AuditLog::open(&dir.join("a.jsonl"), 0, Vec::new()).expect("open");
        assert!(
            log.flush(std::time::Duration::from_secs(5)),
            "the writer runs"
        );
        let policies: Vec<libc::c_int> = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "tollgate-audit")
            })
            .filter_map(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
            // SAFETY: sched_getscheduler reads a thread's policy; a thread gone meanwhile is -1.
            .map(|tid| unsafe { libc::sched_getscheduler(tid) })
            .filter(|&policy| policy >= 0)
            .collect();
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
        // Other tests' writers may be found between their start and their switch; this one,
        // having written, has switched.
        assert!(
            policies.contains(&libc::SCHED_BATCH),
            "the writer is SCHED_BATCH: {policies:?}"
        );
    }

    /// A batch knows the decisions its lines stand for, so a failed write can say how many
    /// were lost: a counted record stands for its count.
    #[test]
    fn a_batch_counts_the_decisions_its_records_stand_for() {
        let mut batch = Batch::default();
        batch.push(&AuditRecord::new(Verdict::Deny, Layer::Request, "one"));
        let mut folded = AuditRecord::new(Verdict::Deny, Layer::Request, "folded");
        folded.count = Some(41);
        batch.push(&folded);
        // Records that count other things: processes, lost reports; a lifecycle event.
        let mut lost = AuditRecord::new(Verdict::Error, Layer::Kernel, "kernel_reports_lost");
        lost.count = Some(7);
        batch.push(&lost);
        batch.push(&AuditRecord::new(
            Verdict::Allow,
            Layer::Lifecycle,
            "started",
        ));
        assert_eq!((batch.records, batch.decisions), (4, 42));
        let text = std::str::from_utf8(&batch.bytes).expect("utf-8");
        assert_eq!(text.lines().count(), 4, "{text}");
        batch.clear();
        assert_eq!(
            (batch.records, batch.decisions, batch.bytes.len()),
            (0, 0, 0)
        );
    }
}
