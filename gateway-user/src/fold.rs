//! Folding a flood of denials: past a workload's share per second, its denials are counted
//! into one record per kind rather than written one by one.
//!
//! A workload refused in a loop (a kept-alive connection sending forbidden requests, a
//! connect loop to a refused address) writes a record per decision, a few hundred bytes each,
//! as fast as it can ask: enough to fill the audit volume, and with `audit_failure: deny` a
//! full volume stops every workload. So each workload (its container, pod, systemd unit or
//! cgroup below its root, as the connection cap counts it: cgroups it makes below its own
//! take from the same share) has `per_second` denial records written whole each second,
//! whatever their reasons. Past that, its denials are folded by kind (layer, reason, policy,
//! rule): one record stands for each kind's folded denials of a second, written when that
//! second ends, the last of them with `count` (how many) and `folded` (when the first was
//! decided, and the distinct destinations and executables among them, with how many each).
//! Every decision is still accounted for. Allowed requests, monitor mode's `would_deny`
//! (traffic that went through), errors and records that already aggregate are never folded.
//!
//! Seconds are the writer's, counted from when a record reaches it, not from the record's
//! timestamp (taken at the decision, which may be long before, and on a clock that can be set).
use std::{
    borrow::Cow,
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    audit::{AuditRecord, Layer, Timestamp, Verdict},
    cgroup::CgroupPath,
};

/// How long a share lasts.
const WINDOW: Duration = Duration::from_secs(1);

/// How many distinct destinations and executables a folded record lists.
const TARGETS: usize = 16;

/// What a record standing for folded denials covers.
#[derive(Debug, Clone, Serialize)]
pub struct Folded {
    /// When the first of them was decided (the record itself is the last of them).
    pub since: Timestamp,
    /// The distinct destinations and executables among them (the first [`TARGETS`]).
    pub targets: Vec<FoldedTarget>,
    /// How many of them went to a destination, or came from an executable, not listed.
    pub other_targets: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FoldedTarget {
    /// `METHOD host/path` for a request (the normalized path, never the query), else the
    /// address (and the host or SNI, if one was named).
    pub dst: String,
    /// The executable, or the task's name where the executable is not known.
    pub exe: String,
    pub count: u64,
}

/// What makes denials of one workload alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    workload: Arc<str>,
    layer: Layer,
    reason: Cow<'static, str>,
    policy: Option<Arc<str>>,
    rule: Option<Arc<str>>,
}

/// A workload's current second.
struct Share {
    start: Instant,
    written: u32,
}

/// One kind's folded denials of a second, from the first folded one on.
struct Held {
    start: Instant,
    last: Box<AuditRecord>,
    count: u64,
    folded: Folded,
}

pub(crate) struct Folding {
    per_second: u32,
    roots: Vec<CgroupPath>,
    shares: HashMap<Arc<str>, Share>,
    held: HashMap<Kind, Held>,
}

impl Folding {
    /// `per_second`: how many of a workload's denials are written whole each second (0: all of
    /// them); `roots`: the enforced roots, below which a workload's cgroup is found.
    pub(crate) fn new(per_second: u32, roots: Vec<CgroupPath>) -> Self {
        Self {
            per_second,
            roots,
            shares: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Takes one record that reached the writer `now`: hands it to `write`, or holds it back.
    pub(crate) fn take(
        &mut self,
        record: Box<AuditRecord>,
        now: Instant,
        mut write: impl FnMut(&AuditRecord),
    ) {
        if self.per_second == 0
            || record.decision != Verdict::Deny
            || record.layer == Layer::Lifecycle
            || record.count.is_some()
        {
            return write(&record);
        }
        let workload: Arc<str> = record.workload.holder(&self.roots).into();
        let share = self.shares.entry(Arc::clone(&workload)).or_insert(Share {
            start: now,
            written: 0,
        });
        if now.saturating_duration_since(share.start) >= WINDOW {
            *share = Share {
                start: now,
                written: 0,
            };
        }
        if share.written < self.per_second {
            share.written += 1;
            return write(&record);
        }
        let kind = Kind {
            workload,
            layer: record.layer,
            reason: record.reason.clone(),
            policy: record.policy.clone(),
            rule: record.rule.clone(),
        };
        // A kind whose second ended (and was not written yet) is written before a new one
        // begins.
        if let Some(held) = self.held.get(&kind) {
            if now.saturating_duration_since(held.start) >= WINDOW {
                if let Some(held) = self.held.remove(&kind) {
                    write(&held.into_record());
                }
            }
        }
        match self.held.get_mut(&kind) {
            Some(held) => held.add(record),
            None => {
                self.held.insert(kind, Held::new(record, now));
            }
        }
    }

    /// Writes the records standing for seconds that ended by `now`, and forgets the workloads
    /// whose second ended.
    pub(crate) fn due(&mut self, now: Instant, mut write: impl FnMut(&AuditRecord)) {
        let ended = |start: Instant| now.saturating_duration_since(start) >= WINDOW;
        let kinds: Vec<Kind> = self
            .held
            .iter()
            .filter(|(_, h)| ended(h.start))
            .map(|(k, _)| k.clone())
            .collect();
        for kind in kinds {
            if let Some(held) = self.held.remove(&kind) {
                write(&held.into_record());
            }
        }
        self.shares.retain(|_, s| !ended(s.start));
    }

    /// Writes every record held back now (the log is being flushed). The workloads keep their
    /// spent shares.
    pub(crate) fn release(&mut self, mut write: impl FnMut(&AuditRecord)) {
        for (_, held) in self.held.drain() {
            write(&held.into_record());
        }
    }

    /// When the next second with denials held back ends, if one is.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.held.values().map(|h| h.start + WINDOW).min()
    }
}

impl Held {
    fn new(record: Box<AuditRecord>, now: Instant) -> Self {
        let mut held = Self {
            start: now,
            folded: Folded {
                since: record.ts,
                targets: Vec::new(),
                other_targets: 0,
            },
            last: record,
            count: 0,
        };
        held.note();
        held
    }

    fn add(&mut self, record: Box<AuditRecord>) {
        if record.ts.time() < self.folded.since.time() {
            self.folded.since = record.ts;
        }
        self.last = record;
        self.note();
    }

    /// Counts the last record in, with its destination and executable.
    fn note(&mut self) {
        self.count += 1;
        let (dst, exe) = (target(&self.last), executable(&self.last));
        let targets = &mut self.folded.targets;
        if let Some(t) = targets.iter_mut().find(|t| t.dst == dst && t.exe == exe) {
            t.count += 1;
        } else if targets.len() < TARGETS {
            targets.push(FoldedTarget { dst, exe, count: 1 });
        } else {
            self.folded.other_targets += 1;
        }
    }

    fn into_record(self) -> AuditRecord {
        let mut record = *self.last;
        record.count = Some(self.count);
        record.folded = Some(Box::new(self.folded));
        record
    }
}

/// The longest `dst` a folded target keeps (a request path may be long).
const TARGET_BYTES: usize = 512;

/// Where a denial was for: the request, else the address and the name it was for; cut at
/// [`TARGET_BYTES`].
fn target(r: &AuditRecord) -> String {
    let mut t = uncut_target(r);
    if t.len() > TARGET_BYTES {
        let mut end = TARGET_BYTES;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
    }
    t
}

fn uncut_target(r: &AuditRecord) -> String {
    let address = match (&r.dst.orig_ip, r.dst.orig_port) {
        (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        (Some(ip), None) => ip.to_string(),
        (None, _) => String::new(),
    };
    match (&r.http, &r.dst.host) {
        (Some(h), host) => format!(
            "{}{}{}{}",
            h.method,
            if h.method.is_empty() { "" } else { " " },
            host.as_deref().unwrap_or(&address),
            h.path.as_deref().unwrap_or("")
        ),
        (None, Some(host)) => format!("{host} ({address})"),
        (None, None) => address,
    }
}

fn executable(r: &AuditRecord) -> String {
    r.workload
        .exe
        .clone()
        .unwrap_or_else(|| r.workload.comm.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{HttpRecord, WorkloadRecord};
    use std::time::SystemTime;

    /// A denial of `reason` from the cgroup `path` (id `id`), for `path_asked`.
    fn denial(id: u64, path: &str, reason: &'static str, asked: &str) -> Box<AuditRecord> {
        let mut r = AuditRecord::new(Verdict::Deny, Layer::Request, reason);
        let cgroup = CgroupPath::parse(path).expect("cgroup");
        r.workload = Arc::new(WorkloadRecord {
            exe: Some("/usr/bin/curl".into()),
            ..WorkloadRecord::of_cgroup(id, Some(&cgroup))
        });
        r.rule = Some("openai".into());
        r.dst.host = Some("api.openai.com".into());
        r.http = Some(HttpRecord {
            method: "GET".into(),
            path: Some(asked.into()),
            status: 403,
        });
        Box::new(r)
    }

    /// What was written: (cgroup id, reason, count).
    type Written = Vec<(u64, String, Option<u64>)>;

    fn note(out: &mut Written) -> impl FnMut(&AuditRecord) + '_ {
        |r| out.push((r.workload.cgroup_id, r.reason.to_string(), r.count))
    }

    fn roots() -> Vec<CgroupPath> {
        vec![CgroupPath::parse("/tg").expect("root")]
    }

    #[test]
    fn past_its_share_a_workloads_denials_are_counted_into_one_record_per_kind_and_second() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut f = Folding::new(3, roots());
        let mut out = Written::new();
        // 10 denials alike from one workload in 0.9 s, then one of another reason: past the
        // share, both kinds fold. Another workload's denial and an allowed request are written.
        for i in 0..10 {
            f.take(
                denial(7, "/tg/a", "path_not_allowed", "/x"),
                ms(i * 90),
                note(&mut out),
            );
        }
        f.take(
            denial(7, "/tg/a", "host_not_allowed", "/x"),
            ms(500),
            note(&mut out),
        );
        f.take(
            denial(8, "/tg/b", "path_not_allowed", "/x"),
            ms(500),
            note(&mut out),
        );
        let mut allowed = denial(7, "/tg/a", "path_not_allowed", "/x");
        allowed.decision = Verdict::Allow;
        f.take(allowed, ms(600), note(&mut out));
        assert_eq!(out.len(), 3 + 2, "{out:?}");
        assert!(out.iter().all(|w| w.2.is_none()), "written whole");
        // The first folded denial came at 270 ms: its kind's second ends at 1,270.
        assert_eq!(f.next_due(), Some(ms(1270)));
        f.due(ms(1269), note(&mut out));
        assert_eq!(out.len(), 5);
        f.due(ms(1270), note(&mut out));
        assert_eq!(out[5], (7, "path_not_allowed".into(), Some(7)));
        f.due(ms(1500), note(&mut out));
        assert_eq!(out[6], (7, "host_not_allowed".into(), Some(1)));
        // Nothing held, no workload remembered.
        assert_eq!(f.next_due(), None);
        assert!(f.shares.is_empty() && f.held.is_empty());
        // A new second: the share written whole again, the rest held until it ends.
        for i in 0..4 {
            f.take(
                denial(7, "/tg/a", "path_not_allowed", "/x"),
                ms(1500 + i),
                note(&mut out),
            );
        }
        assert_eq!(out.len(), 10);
        f.take(
            denial(7, "/tg/a", "path_not_allowed", "/x"),
            ms(2600),
            note(&mut out),
        );
        assert_eq!(out[10], (7, "path_not_allowed".into(), None), "a new share");
        f.due(ms(2600), note(&mut out));
        assert_eq!(out[11], (7, "path_not_allowed".into(), Some(1)));
        let total: u64 = out
            .iter()
            .filter(|w| w.0 == 7 && w.1 == "path_not_allowed")
            .map(|w| w.2.unwrap_or(1))
            .sum();
        assert_eq!(
            total,
            10 + 4 + 1 + 1,
            "every decision counted once (and the allowed one)"
        );
    }

    /// Cgroups a workload makes below its own take from its one share.
    #[test]
    fn cgroups_made_below_a_workload_share_its_share() {
        let t0 = Instant::now();
        let mut f = Folding::new(2, roots());
        let mut out = Written::new();
        for (i, path) in ["/tg/a", "/tg/a/x", "/tg/a/y", "/tg/a/x/z"]
            .iter()
            .enumerate()
        {
            f.take(denial(10 + i as u64, path, "r", "/x"), t0, note(&mut out));
        }
        // The same under a systemd unit.
        for (i, path) in ["/tg/u.service", "/tg/u.service/x", "/tg/u.service/y"]
            .iter()
            .enumerate()
        {
            f.take(denial(20 + i as u64, path, "r", "/x"), t0, note(&mut out));
        }
        assert_eq!(
            out.iter().map(|w| w.0).collect::<Vec<_>>(),
            [10, 11, 20, 21]
        );
        f.release(note(&mut out));
        let mut counts: Vec<_> = out[4..].iter().map(|w| (w.0, w.2)).collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            [(13, Some(2)), (22, Some(1))],
            "the last of each, counted"
        );
    }

    /// The held record names the first decision's time, however the records arrived, and the
    /// distinct destinations and executables among them; a flush writes it, and the workload
    /// keeps its spent share.
    #[test]
    fn the_held_record_lists_its_targets_and_is_written_on_flush() {
        let t0 = Instant::now();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut f = Folding::new(1, roots());
        let mut held = Vec::new();
        let mut keep = |r: &AuditRecord| held.push(serde_json::to_value(r).expect("json"));
        for (i, asked, ts) in [(0, "/a", 50), (1, "/a", 40), (2, "/b", 10), (3, "/a", 30)] {
            let mut r = denial(7, "/tg/a", "no_rule_matched", asked);
            r.ts = Timestamp::at(at + Duration::from_millis(ts));
            f.take(r, t0 + Duration::from_millis(i), &mut keep);
        }
        f.release(&mut keep);
        assert_eq!(held.len(), 2, "{held:?}");
        let rec = &held[1];
        assert_eq!(rec["count"], 3);
        assert_eq!(rec["http"]["path"], "/a", "the last of them");
        assert_eq!(
            rec["folded"]["since"], "2027-01-15T08:00:00.010000Z",
            "the earliest decision's time"
        );
        assert_eq!(
            rec["folded"]["targets"],
            serde_json::json!([
                { "dst": "GET api.openai.com/a", "exe": "/usr/bin/curl", "count": 2 },
                { "dst": "GET api.openai.com/b", "exe": "/usr/bin/curl", "count": 1 },
            ])
        );
        assert_eq!(rec["folded"]["other_targets"], 0);
        let mut more = Written::new();
        f.take(
            denial(7, "/tg/a", "no_rule_matched", "/c"),
            t0,
            note(&mut more),
        );
        assert!(more.is_empty(), "the share stays spent");
        f.due(t0 + WINDOW, note(&mut more));
        assert_eq!(more, [(7, "no_rule_matched".into(), Some(1))]);
    }

    #[test]
    fn targets_past_the_list_are_counted_and_nothing_folds_when_off() {
        let t0 = Instant::now();
        let mut f = Folding::new(1, roots());
        let mut held = Vec::new();
        for i in 0..(TARGETS + 5) {
            f.take(denial(7, "/tg/a", "r", &format!("/p{i}")), t0, |r| {
                held.push(serde_json::to_value(r).expect("json"));
            });
        }
        f.release(|r| held.push(serde_json::to_value(r).expect("json")));
        let rec = &held[1];
        assert_eq!(rec["count"], TARGETS as u64 + 4);
        // A long path is cut; a request refused before its method was read has none.
        let mut long = denial(7, "/tg/a", "r", &format!("/{}", "é".repeat(400)));
        assert_eq!(target(&long).len(), TARGET_BYTES - 1, "cut on a character");
        long.http.as_mut().expect("http").method = "".into();
        assert!(target(&long).starts_with("api.openai.com/"));
        assert_eq!(
            rec["folded"]["targets"].as_array().map(Vec::len),
            Some(TARGETS)
        );
        assert_eq!(rec["folded"]["other_targets"], 4);
        let mut off = Folding::new(0, roots());
        let mut out = Written::new();
        for _ in 0..50 {
            off.take(denial(7, "/tg/a", "r", "/x"), t0, note(&mut out));
        }
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|w| w.2.is_none()));
    }
}
