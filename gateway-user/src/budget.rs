//! Budgets: a host rule may allow at most `requests` requests, and at most `tokens` tokens,
//! per `per`, counted together for every workload its policy selects or, with `scope:
//! workload`, for each workload apart, each as a token bucket (a burst of the whole budget,
//! refilled evenly over the period). Only requests the policy allows are counted; tokens are
//! charged when the answer has said how many it used.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// A rule's budget, as compiled from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub requests: Option<u32>,
    pub tokens: Option<u64>,
    pub per: Duration,
    /// Which buckets: the policy file and the rule's place in it, so a reload that keeps the
    /// rule keeps what it has spent.
    pub key: String,
    /// The policy is in monitor mode: an exhausted budget is audited, not enforced.
    pub monitor: bool,
    /// With `scope: workload` in a policy that selects a `cgroup`, that cgroup: each cgroup
    /// directly below it (or each pod) has a budget of its own. Otherwise all share one (a
    /// policy without a `cgroup` selector names one workload).
    pub workloads_below: Option<crate::cgroup::CgroupPath>,
    /// The output tokens a request that states no limit reserves (`reserve_output`).
    pub reserve_output: u64,
}

impl Budget {
    /// The budget a request of a workload in `pod` and `cgroup` spends: the rule's or, with
    /// `scope: workload`, that workload's own. The workloads are the cgroups directly below the
    /// policy's `cgroup` selector (a workload can make cgroups inside its own, which then spend
    /// its budget, but not siblings of it), and pods where the selector is at or below the
    /// Kubernetes hierarchy (a pod cannot make pods; a `kubepods` cgroup made inside a
    /// workload's own names no pod here).
    pub fn of(
        &self,
        pod: Option<&crate::container::Pod>,
        cgroup: Option<&crate::cgroup::CgroupPath>,
    ) -> Budget {
        let mut budget = self.clone();
        let (Some(within), Some(cgroup)) = (&self.workloads_below, cgroup) else {
            return budget;
        };
        let holder = match pod {
            Some(pod) if pod.hierarchy_depth <= within.depth() => format!("pod:{}", pod.uid),
            _ => match cgroup.below(within) {
                Some(below) => format!("cgroup:{below}"),
                None => return budget,
            },
        };
        budget.key = format!("{}#{holder}", self.key);
        budget
    }

    /// A period: a number and a unit, `30s`, `1m`, `1h` or `1d` (1 s to 31 days).
    pub fn parse_per(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let unit_at = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("per {s:?}: give a number and a unit (s, m, h, d)"))?;
        let (n, unit) = s.split_at(unit_at);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("per {s:?}: give a number and a unit (s, m, h, d)"))?;
        let secs = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        }
        .ok_or_else(|| format!("per {s:?}: give a number and a unit (s, m, h, d)"))?;
        if !(1..=31 * 86_400).contains(&secs) {
            return Err(format!("per {s:?}: use 1s to 31d"));
        }
        Ok(Duration::from_secs(secs))
    }
}

/// What is left of each rule's budget.
#[derive(Debug, Default)]
pub struct Budgets {
    /// By the budget's key, and whether the bucket counts tokens (else requests).
    buckets: Mutex<HashMap<(String, bool), Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    /// What may still be spent; at most the budget, below zero after an answer that used more
    /// tokens than were left.
    level: f64,
    at: Instant,
    /// The budget and period it was last refilled for.
    capacity: f64,
    per: Duration,
}

impl Bucket {
    /// Refills for the time since the last look, up to `capacity` (a reload that lowers the
    /// budget caps what is left at the new size).
    fn refill(&mut self, capacity: f64, per: Duration, now: Instant) {
        // A caller that read the clock before another took the lock must not move time back
        // (and be credited the same interval twice).
        let now = now.max(self.at);
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * capacity / per.as_secs_f64()).min(capacity);
        self.at = now;
        self.capacity = capacity;
        self.per = per;
    }

    /// How long until `need` units are left.
    fn wait(&self, need: f64, capacity: f64, per: Duration) -> Duration {
        Duration::try_from_secs_f64((need - self.level) * per.as_secs_f64() / capacity)
            .unwrap_or(Duration::MAX)
    }
}

impl Budgets {
    /// Lets a request through `budget` at `now` (spending one request, if requests are
    /// counted), or says how long until one would be: while no token is left, none is.
    pub fn admit(&self, budget: &Budget, now: Instant) -> Result<(), Duration> {
        self.admit_reserving(budget, 0, now).map(|_| ())
    }

    /// As [`Budgets::admit`], and takes `reserve` tokens ahead of the answer (what the request
    /// sends and the most it asked to receive), so that requests in flight together cannot all
    /// be let in on what is left for one: it is let in only while that many are left (or the
    /// whole budget, for a request larger than it, which then takes the whole budget and no
    /// more), and its charge later gives back what the answer did not use. Returns the tokens
    /// taken.
    pub fn admit_reserving(
        &self,
        budget: &Budget,
        reserve: u64,
        now: Instant,
    ) -> Result<u64, Duration> {
        let mut buckets = self.lock();
        let mut taken = 0;
        if let Some(requests) = budget.requests {
            let capacity = f64::from(requests);
            let b = bucket(&mut buckets, budget, false, capacity, now);
            if b.level < 1.0 {
                return Err(b.wait(1.0, capacity, budget.per));
            }
        }
        if let Some(tokens) = budget.tokens {
            let capacity = tokens as f64;
            let b = bucket(&mut buckets, budget, true, capacity, now);
            let need = (reserve as f64).clamp(1.0, capacity);
            if b.level < need {
                return Err(b.wait(need, capacity, budget.per));
            }
            taken = reserve.min(tokens);
            b.level -= taken as f64;
        }
        if budget.requests.is_some() {
            if let Some(b) = buckets.get_mut(&(budget.key.clone(), false)) {
                b.level -= 1.0;
            }
        }
        Ok(taken)
    }

    /// Gives back the request [`Budgets::admit`] spent, for one that never went out.
    pub fn refund(&self, budget: &Budget, now: Instant) {
        if let Some(requests) = budget.requests {
            let capacity = f64::from(requests);
            let mut buckets = self.lock();
            let b = bucket(&mut buckets, budget, false, capacity, now);
            b.level = (b.level + 1.0).min(capacity);
        }
    }

    /// Charges the tokens an answer through `budget` used. The debt stops at a thousand
    /// budgets (a count no answer reaches, so that no arithmetic overflows on an absurd one).
    pub fn charge(&self, budget: &Budget, used: u64, now: Instant) {
        self.settle(budget, used, 0, now);
    }

    /// Charges `used` tokens against the `reserved` ones taken at admission: gives back what
    /// was not used, or takes what was used beyond.
    pub fn settle(&self, budget: &Budget, used: u64, reserved: u64, now: Instant) {
        if let Some(tokens) = budget.tokens {
            let capacity = tokens as f64;
            let mut buckets = self.lock();
            let b = bucket(&mut buckets, budget, true, capacity, now);
            b.level = (b.level + reserved as f64 - used as f64).clamp(-1000.0 * capacity, capacity);
        }
    }

    /// Forgets the buckets that have refilled to their budget by `now`: a full bucket is what
    /// a new one would be, so nothing is lost, and buckets of workloads that have gone (one
    /// for each, with `scope: workload`) do not pile up.
    pub fn prune(&self, now: Instant) {
        self.lock().retain(|_, b| {
            let (capacity, per) = (b.capacity, b.per);
            b.refill(capacity, per, now);
            b.level < b.capacity
        });
    }

    /// What is left of each bucket kept (those not kept are full), refilled to `now`, sorted:
    /// `budget` (the key), `counts` (`requests` or `tokens`), `left` (below zero in debt),
    /// `of`, `per_s`, and `full_in_s`.
    pub fn left(&self, now: Instant) -> Vec<serde_json::Value> {
        let mut buckets = self.lock();
        let mut out: Vec<_> = buckets
            .iter_mut()
            .map(|((key, tokens), b)| {
                let (capacity, per) = (b.capacity, b.per);
                b.refill(capacity, per, now);
                let full_in = b.wait(capacity, capacity, per);
                (
                    (key.clone(), *tokens),
                    serde_json::json!({
                        "budget": key,
                        "counts": if *tokens { "tokens" } else { "requests" },
                        "left": (b.level * 10.0).floor() / 10.0,
                        "of": capacity,
                        "per_s": per.as_secs(),
                        "full_in_s": full_in.as_secs_f64().ceil(),
                    }),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, bool), Bucket>> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A request's tokens, owed to its rule's budget until its answer says how many: charged that
/// count, or, if it never does (the request cancelled or failed before an answer), a token
/// for every 4 bytes it sent.
pub struct TokenCharge {
    budgets: Arc<Budgets>,
    budget: Budget,
    sent: Arc<AtomicU64>,
    /// Taken at admission, ahead of the answer.
    reserved: u64,
    owed: bool,
}

impl TokenCharge {
    pub fn new(budgets: Arc<Budgets>, budget: Budget, sent: Arc<AtomicU64>, reserved: u64) -> Self {
        Self {
            budgets,
            budget,
            sent,
            reserved,
            owed: true,
        }
    }

    /// Charges what the answer used.
    pub fn settle(mut self, used: u64) {
        self.owed = false;
        self.budgets
            .settle(&self.budget, used, self.reserved, Instant::now());
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        if self.owed {
            let estimate = self.sent.load(Ordering::Relaxed).div_ceil(4);
            self.budgets
                .settle(&self.budget, estimate, self.reserved, Instant::now());
        }
    }
}

/// `budget`'s bucket of tokens (else of requests), refilled up to `now`.
fn bucket<'a>(
    buckets: &'a mut HashMap<(String, bool), Bucket>,
    budget: &Budget,
    tokens: bool,
    capacity: f64,
    now: Instant,
) -> &'a mut Bucket {
    let b = buckets
        .entry((budget.key.clone(), tokens))
        .or_insert(Bucket {
            level: capacity,
            at: now,
            capacity,
            per: budget.per,
        });
    b.refill(capacity, budget.per, now);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(requests: u32, per: &str) -> Budget {
        Budget {
            requests: Some(requests),
            tokens: None,
            per: Budget::parse_per(per).expect("per"),
            key: format!("p.yaml#{requests}{per}"),
            monitor: false,
            workloads_below: None,
            reserve_output: 0,
        }
    }

    /// `tokens` per `per_secs`, no requests budget.
    fn tokens_budget(tokens: u64, per_secs: u64, key: &str) -> Budget {
        Budget {
            requests: None,
            tokens: Some(tokens),
            per: Duration::from_secs(per_secs),
            key: key.into(),
            ..budget(1, "1s")
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let b = budget(3, "1m");
        let budgets = Budgets::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(budgets.admit(&b, t0), Ok(()));
        }
        let wait = budgets.admit(&b, t0).expect_err("exhausted");
        assert_eq!(wait.as_secs(), 20, "one request comes back every 20 s");
        assert!(budgets.admit(&b, t0 + Duration::from_secs(19)).is_err());
        assert_eq!(budgets.admit(&b, t0 + Duration::from_secs(21)), Ok(()));
        assert!(budgets.admit(&b, t0 + Duration::from_secs(21)).is_err());
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(budgets.admit(&b, later), Ok(()));
        }
        assert!(budgets.admit(&b, later).is_err());
    }

    #[test]
    fn each_workload_spends_its_own_share_and_full_buckets_are_forgotten() {
        let path = |s: &str| crate::cgroup::CgroupPath::parse(s).expect("path");
        // The budget spent from the cgroup `at`, with the pod its path places it in.
        let of = |budget: &Budget, at: &str| {
            budget
                .of(
                    crate::container::placement(at).pod.as_ref(),
                    Some(&path(at)),
                )
                .key
        };
        let rule = Budget {
            workloads_below: Some(path("/agents")),
            ..budget(2, "1m")
        };
        let budgets = Budgets::default();
        let t0 = Instant::now();
        let (a, b) = (
            rule.of(None, Some(&path("/agents/a.service"))),
            rule.of(None, Some(&path("/agents/b.service"))),
        );
        assert_ne!(a.key, b.key);
        // Cgroups a workload makes inside its own spend its budget; a pod's containers, the pod's.
        for inside in ["/agents/a.service/x", "/agents/a.service/x/y.scope"] {
            assert_eq!(of(&rule, inside), a.key, "{inside}");
        }
        // A `kubepods` cgroup made inside a workload's own names no pod: still a's budget.
        let pod = "0f3c2d4e-1111-2222-3333-444455556666";
        let fake = format!("/agents/a.service/kubepods/pod{pod}");
        assert_eq!(crate::container::placement(&fake).pod, None);
        assert_eq!(of(&rule, &fake), a.key);
        // Nor would a pod read that deep change whose budget it is.
        let deep = crate::container::Pod {
            uid: pod.into(),
            qos: "guaranteed",
            hierarchy_depth: 4,
        };
        assert_eq!(rule.of(Some(&deep), Some(&path(&fake))).key, a.key);
        // Selected at or below the Kubernetes hierarchy, each pod is a workload.
        let kube = Budget {
            workloads_below: Some(path("/kubepods.slice")),
            ..rule.clone()
        };
        let in_pod = |uid: &str, ctr: &str| {
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/{ctr}",
                uid.replace('-', "_")
            )
        };
        let other = "0f3c2d4e-1111-2222-3333-777777777777";
        assert_eq!(
            of(&kube, &in_pod(pod, "cri-containerd-a.scope")),
            of(&kube, &in_pod(pod, "cri-containerd-b.scope")),
        );
        assert_ne!(
            of(&kube, &in_pod(pod, "c.scope")),
            of(&kube, &in_pod(other, "c.scope")),
        );
        assert!(of(&kube, &in_pod(pod, "c.scope")).ends_with(&format!("#pod:{pod}")));
        // A policy without a cgroup selector names one workload: the rule's budget.
        let by_unit = Budget {
            workloads_below: None,
            ..rule.clone()
        };
        assert_eq!(of(&by_unit, &fake), by_unit.key);
        for _ in 0..2 {
            assert_eq!(budgets.admit(&a, t0), Ok(()));
        }
        assert!(budgets.admit(&a, t0).is_err(), "a has spent its two");
        assert_eq!(budgets.admit(&b, t0), Ok(()), "b still has its own");
        // Without the scope, both spend the rule's one bucket.
        let shared = budget(2, "1m");
        assert_eq!(of(&shared, "/agents/a.service"), shared.key);
        // Pruning keeps what is partly spent and forgets what has refilled.
        budgets.prune(t0 + Duration::from_secs(1));
        assert_eq!(budgets.lock().len(), 2);
        // b's one request is back after 30 s, a's two after 60 s.
        budgets.prune(t0 + Duration::from_secs(31));
        assert_eq!(
            budgets.lock().len(),
            1,
            "b's bucket is full again: forgotten"
        );
        assert!(
            budgets.admit(&a, t0 + Duration::from_secs(31)).is_ok(),
            "a kept its refill"
        );
        let left = budgets.left(t0 + Duration::from_secs(31));
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0]["budget"], a.key.as_str());
        assert_eq!(left[0]["counts"], "requests");
        assert_eq!(left[0]["left"], 0.0, "one back at 30 s, spent at 31 s");
        assert_eq!(
            (left[0]["of"].as_f64(), left[0]["full_in_s"].as_f64()),
            (Some(2.0), Some(59.0))
        );
        budgets.prune(t0 + Duration::from_secs(120));
        assert_eq!(budgets.lock().len(), 0);
        // A forgotten bucket starts full, as it would have been.
        for _ in 0..2 {
            assert_eq!(budgets.admit(&b, t0 + Duration::from_secs(120)), Ok(()));
        }
        assert!(budgets.admit(&b, t0 + Duration::from_secs(120)).is_err());
    }

    #[test]
    fn rules_spend_their_own_buckets_and_a_smaller_budget_caps_the_level() {
        let budgets = Budgets::default();
        let t0 = Instant::now();
        let a = budget(1, "1h");
        let b = budget(2, "1h");
        assert_eq!(budgets.admit(&a, t0), Ok(()));
        assert!(budgets.admit(&a, t0).is_err());
        budgets.refund(&a, t0);
        assert_eq!(
            budgets.admit(&a, t0),
            Ok(()),
            "a refund gives the request back"
        );
        budgets.refund(&a, t0);
        budgets.refund(&a, t0);
        assert_eq!(budgets.admit(&a, t0), Ok(()));
        assert!(budgets.admit(&a, t0).is_err(), "never beyond the budget");
        // A clock read before another caller's is not credited twice.
        assert!(budgets.admit(&a, t0 - Duration::from_millis(1)).is_err());
        assert_eq!(budgets.admit(&b, t0), Ok(()));
        // The same rule reloaded with a budget of 1: what it had left (one) is still there,
        // and it refills to one at most.
        let mut lowered = b.clone();
        lowered.requests = Some(1);
        assert!(budgets.admit(&lowered, t0).is_ok());
        assert!(budgets.admit(&lowered, t0).is_err());
    }

    #[test]
    fn requests_in_flight_together_reserve_what_they_may_use() {
        let budgets = Arc::new(Budgets::default());
        let t0 = Instant::now();
        let b = tokens_budget(1000, 1000, "p.yaml#r");
        let sent = Arc::new(AtomicU64::new(0));
        // Three requests of up to 400 each: two fit, the third waits for the 200 more it needs
        // (200 s at a token a second), and is not let in on the 200 left.
        let charges: Vec<TokenCharge> = (0..2)
            .map(|_| {
                assert_eq!(budgets.admit_reserving(&b, 400, t0), Ok(400));
                TokenCharge::new(Arc::clone(&budgets), b.clone(), Arc::clone(&sent), 400)
            })
            .collect();
        let wait = budgets.admit_reserving(&b, 400, t0).expect_err("200 left");
        assert_eq!(wait.as_secs(), 200);
        // The answers used 100 each: what they did not use comes back.
        for c in charges {
            c.settle(100);
        }
        assert_eq!(budgets.admit_reserving(&b, 400, t0), Ok(400));
        // A request larger than the whole budget is let in on a full bucket and takes the whole
        // budget, no more: a wait for the rest is never longer than the period, and what it
        // gives back leaves the bucket as it should.
        let fresh = Budget {
            key: "p.yaml#big".into(),
            ..b.clone()
        };
        assert_eq!(budgets.admit_reserving(&fresh, u64::MAX, t0), Ok(1000));
        let wait = budgets
            .admit_reserving(&fresh, 1, t0)
            .expect_err("all taken");
        assert_eq!(wait.as_secs(), 1);
        budgets.settle(&fresh, 500, 1000, t0);
        assert_eq!(
            budgets.lock()[&("p.yaml#big".to_owned(), true)].level,
            500.0
        );
        // A request refused for its requests budget takes no tokens.
        let both = Budget {
            requests: Some(1),
            key: "p.yaml#both".into(),
            ..b.clone()
        };
        assert_eq!(budgets.admit_reserving(&both, 10, t0), Ok(10));
        assert!(budgets.admit_reserving(&both, 10, t0).is_err());
        let tokens_left = budgets.lock()[&("p.yaml#both".to_owned(), true)].level;
        assert_eq!(tokens_left, 990.0);
    }

    #[test]
    fn tokens_are_charged_after_and_admit_while_any_is_left() {
        let budgets = Budgets::default();
        let t0 = Instant::now();
        let b = Budget {
            requests: Some(10),
            ..tokens_budget(1000, 100, "p.yaml#0")
        };
        assert_eq!(budgets.admit(&b, t0), Ok(()));
        // One answer used more than was left: in debt, nothing is admitted until it refills.
        budgets.charge(&b, 1500, t0);
        let wait = budgets.admit(&b, t0).expect_err("no token left");
        assert_eq!(wait.as_secs(), 50, "501 tokens at 10 a second");
        assert!(budgets.admit(&b, t0 + Duration::from_secs(49)).is_err());
        assert_eq!(budgets.admit(&b, t0 + Duration::from_secs(51)), Ok(()));
        // In debt again: refused, however many requests are left.
        let later = t0 + Duration::from_secs(51);
        budgets.charge(&b, 1000, later);
        for _ in 0..3 {
            assert!(budgets.admit(&b, later).is_err());
        }
        let full = later + Duration::from_secs(1000);
        budgets.charge(&b, 0, full);
        for _ in 0..10 {
            assert_eq!(budgets.admit(&b, full), Ok(()));
        }
        assert!(
            budgets.admit(&b, full).is_err(),
            "then the requests run out"
        );
    }

    #[test]
    fn absurd_charges_neither_panic_nor_overflow_and_an_unsettled_request_pays_its_bytes() {
        let budgets = Arc::new(Budgets::default());
        let t0 = Instant::now();
        let b = tokens_budget(100, 86_400, "p.yaml#t");
        budgets.charge(&b, u64::MAX, t0);
        let wait = budgets.admit(&b, t0).expect_err("deep in debt");
        assert!(wait > Duration::from_secs(86_400 * 999), "{wait:?}");
        let fresh = Budget {
            key: "p.yaml#u".into(),
            ..b
        };
        let sent = Arc::new(AtomicU64::new(398));
        drop(TokenCharge::new(
            Arc::clone(&budgets),
            fresh.clone(),
            Arc::clone(&sent),
            0,
        ));
        // 100 - ceil(398 / 4) = 0.5 left: below one token.
        assert!(
            budgets.admit(&fresh, t0).is_err(),
            "the cancelled request paid 100"
        );
        let settled = Budget {
            key: "p.yaml#v".into(),
            ..fresh
        };
        TokenCharge::new(Arc::clone(&budgets), settled.clone(), sent, 0).settle(99);
        assert_eq!(
            budgets.admit(&settled, t0),
            Ok(()),
            "settled for 99: one left"
        );
    }

    #[test]
    fn periods() {
        assert_eq!(Budget::parse_per("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(Budget::parse_per("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(Budget::parse_per("1d"), Ok(Duration::from_secs(86_400)));
        for bad in [
            "",
            "h",
            "1",
            "1w",
            "0s",
            "32d",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(Budget::parse_per(bad).is_err(), "{bad}");
        }
    }
}
