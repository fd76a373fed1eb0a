//! Folding a flood of denials: past a share per second, denials alike are counted into one
//! record rather than written one by one.
//!
//! A workload refused in a loop (a kept-alive connection sending forbidden requests, a
//! connect loop to a refused address) writes a record per decision, a few hundred bytes each,
//! as fast as it can ask: enough to fill the audit volume, and with `audit_failure: deny` a
//! full volume stops every workload. So for each workload (cgroup), layer, reason, policy and
//! rule, the first `per_second` denials of each second are written whole; the rest of that
//! second are counted, and when the second ends one record stands for them: the last of them,
//! with `count` (how many) and `folded_since` (when the first was decided). Every decision is
//! still accounted for. Allowed requests, monitor mode's `would_deny` (traffic that went
//! through), errors and records that already aggregate are never folded.
use std::{
    borrow::Cow,
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::audit::{AuditRecord, Layer, Verdict};

/// How long a share lasts.
const WINDOW: Duration = Duration::from_secs(1);

/// What makes denials alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    cgroup_id: u64,
    layer: Layer,
    reason: Cow<'static, str>,
    policy: Option<Arc<str>>,
    rule: Option<Arc<str>>,
}

/// One key's current second.
struct Window {
    start: SystemTime,
    written: u32,
    /// The last denial held back, its `count` and `folded_since` set.
    folded: Option<Box<AuditRecord>>,
}

pub(crate) struct Folding {
    per_second: u32,
    windows: HashMap<Key, Window>,
}

impl Folding {
    /// `per_second`: how many denials alike are written whole each second; 0: all of them.
    pub(crate) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            windows: HashMap::new(),
        }
    }

    /// Takes one record: hands it to `write` (with, first, the record standing for its key's
    /// last second, if that second ended with denials held back), or holds it back.
    pub(crate) fn take(&mut self, record: Box<AuditRecord>, mut write: impl FnMut(&AuditRecord)) {
        if self.per_second == 0
            || record.decision != Verdict::Deny
            || record.layer == Layer::Lifecycle
            || record.count.is_some()
        {
            return write(&record);
        }
        let key = Key {
            cgroup_id: record.workload.cgroup_id,
            layer: record.layer,
            reason: record.reason.clone(),
            policy: record.policy.clone(),
            rule: record.rule.clone(),
        };
        let at = record.ts.time();
        let window = self.windows.entry(key).or_insert(Window {
            start: at,
            written: 0,
            folded: None,
        });
        // A second that ended, or a clock set back: a new second begins with this record.
        if !within(window.start, at) {
            if let Some(folded) = window.folded.take() {
                write(&folded);
            }
            window.start = at;
            window.written = 0;
        }
        if window.written < self.per_second {
            window.written += 1;
            return write(&record);
        }
        let (count, since) = window.folded.as_ref().map_or((0, record.ts), |f| {
            (f.count.unwrap_or(0), f.folded_since.unwrap_or(f.ts))
        });
        let mut record = record;
        record.count = Some(count + 1);
        record.folded_since = Some(since);
        window.folded = Some(record);
    }

    /// Writes the records standing for seconds that ended by `now`, and forgets those keys.
    pub(crate) fn due(&mut self, now: SystemTime, mut write: impl FnMut(&AuditRecord)) {
        self.windows.retain(|_, w| {
            if within(w.start, now) {
                return true;
            }
            if let Some(folded) = w.folded.take() {
                write(&folded);
            }
            false
        });
    }

    /// Writes every record held back now (the log is being flushed), keeping each key's share.
    pub(crate) fn release(&mut self, mut write: impl FnMut(&AuditRecord)) {
        for w in self.windows.values_mut() {
            if let Some(folded) = w.folded.take() {
                write(&folded);
            }
        }
    }

    /// When the next second with denials held back ends, if any is.
    pub(crate) fn next_due(&self) -> Option<SystemTime> {
        self.windows
            .values()
            .filter(|w| w.folded.is_some())
            .map(|w| w.start + WINDOW)
            .min()
    }
}

/// Whether `at` falls in the second that began at `start` (not before it: a clock set back
/// begins a new one).
fn within(start: SystemTime, at: SystemTime) -> bool {
    at.duration_since(start).is_ok_and(|d| d < WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Timestamp, WorkloadRecord};

    fn denial(cgroup_id: u64, reason: &'static str, at: SystemTime) -> Box<AuditRecord> {
        let mut r = AuditRecord::new(Verdict::Deny, Layer::Request, reason);
        r.workload = Arc::new(WorkloadRecord {
            cgroup_id,
            ..WorkloadRecord::default()
        });
        r.rule = Some("openai".into());
        r.ts = Timestamp::at(at);
        Box::new(r)
    }

    /// What was written: (cgroup, reason, count).
    type Written = Vec<(u64, String, Option<u64>)>;

    fn note(out: &mut Written) -> impl FnMut(&AuditRecord) + '_ {
        |r| out.push((r.workload.cgroup_id, r.reason.to_string(), r.count))
    }

    #[test]
    fn denials_past_the_share_are_counted_into_one_record_per_second() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut f = Folding::new(3);
        let mut out = Written::new();
        // 10 denials alike in 0.9 s from cgroup 7, and one of another reason, and one of
        // another workload, past the share of neither.
        for i in 0..10 {
            f.take(denial(7, "path_not_allowed", ms(i * 90)), note(&mut out));
        }
        f.take(denial(7, "host_not_allowed", ms(500)), note(&mut out));
        f.take(denial(8, "path_not_allowed", ms(500)), note(&mut out));
        let mut allowed = denial(7, "path_not_allowed", ms(600));
        allowed.decision = Verdict::Allow;
        f.take(allowed, note(&mut out));
        assert_eq!(out.len(), 3 + 3, "{out:?}");
        assert!(out[..3].iter().all(|w| w.2.is_none()), "written whole");
        assert_eq!(f.next_due(), Some(ms(1000)));
        // Not yet ended: nothing more.
        f.due(ms(999), note(&mut out));
        assert_eq!(out.len(), 6);
        f.due(ms(1000), note(&mut out));
        assert_eq!(out.len(), 7, "{out:?}");
        assert_eq!(out[6], (7, "path_not_allowed".into(), Some(7)));
        // Nothing held; once every key's second ended, nothing remembered.
        assert_eq!(f.next_due(), None);
        assert_eq!(f.windows.len(), 2, "the other keys' seconds go on");
        f.due(ms(1500), note(&mut out));
        assert!(f.windows.is_empty());
        assert_eq!(out.len(), 7);
        // A new second: its share written whole again.
        for i in 0..4 {
            f.take(denial(7, "path_not_allowed", ms(1500 + i)), note(&mut out));
        }
        assert_eq!(out.len(), 10);
        // A denial in a later second writes the held one first, then itself.
        f.take(denial(7, "path_not_allowed", ms(2600)), note(&mut out));
        assert_eq!(out[10], (7, "path_not_allowed".into(), Some(1)));
        assert_eq!(out[11], (7, "path_not_allowed".into(), None));
        let total: u64 = out
            .iter()
            .filter(|w| w.0 == 7 && w.1 == "path_not_allowed")
            .map(|w| w.2.unwrap_or(1))
            .sum();
        assert_eq!(total, 10 + 4 + 1 + 1, "every decision counted once");
    }

    #[test]
    fn the_held_record_says_since_when_and_is_released_on_flush() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut f = Folding::new(1);
        let mut held = Vec::new();
        for i in 0..3 {
            f.take(
                denial(7, "no_rule_matched", t0 + Duration::from_millis(i * 10)),
                |r| held.push((r.ts.time(), r.folded_since.map(Timestamp::time), r.count)),
            );
        }
        f.release(|r| held.push((r.ts.time(), r.folded_since.map(Timestamp::time), r.count)));
        let at = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(
            held,
            [(at(0), None, None), (at(20), Some(at(10)), Some(2))],
            "the last denial held back, since the first"
        );
        // Released, the key keeps its spent share: the next is held again.
        let mut more = Written::new();
        f.take(denial(7, "no_rule_matched", at(30)), note(&mut more));
        assert!(more.is_empty());
        f.due(at(1000), note(&mut more));
        assert_eq!(more, [(7, "no_rule_matched".into(), Some(1))]);
    }

    #[test]
    fn nothing_folds_when_off_and_a_clock_set_back_begins_a_new_second() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut out = Written::new();
        let mut off = Folding::new(0);
        for _ in 0..50 {
            off.take(denial(7, "r", t0), note(&mut out));
        }
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|w| w.2.is_none()));
        let mut f = Folding::new(1);
        let mut out = Written::new();
        f.take(denial(7, "r", t0), note(&mut out));
        f.take(denial(7, "r", t0 - Duration::from_secs(5)), note(&mut out));
        assert_eq!(out, [(7, "r".into(), None), (7, "r".into(), None)]);
    }
}
