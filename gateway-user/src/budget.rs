//! Budgets: a host rule may allow at most `requests` requests, and at most `tokens` tokens,
//! per `per`, counted together for every workload its policy selects, each as a token bucket
//! (a burst of the whole budget, refilled evenly over the period). Only requests the policy
//! allows are counted; tokens are charged when the answer has said how many it used.
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
}

impl Budget {
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
    }

    /// How long until one unit is left.
    fn wait(&self, capacity: f64, per: Duration) -> Duration {
        Duration::try_from_secs_f64((1.0 - self.level) * per.as_secs_f64() / capacity)
            .unwrap_or(Duration::MAX)
    }
}

impl Budgets {
    /// Lets a request through `budget` at `now` (spending one request, if requests are
    /// counted), or says how long until one would be: while no token is left, none is.
    pub fn admit(&self, budget: &Budget, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        if let Some(tokens) = budget.tokens {
            let capacity = tokens as f64;
            let b = bucket(&mut buckets, budget, true, capacity, now);
            if b.level < 1.0 {
                return Err(b.wait(capacity, budget.per));
            }
        }
        if let Some(requests) = budget.requests {
            let capacity = f64::from(requests);
            let b = bucket(&mut buckets, budget, false, capacity, now);
            if b.level < 1.0 {
                return Err(b.wait(capacity, budget.per));
            }
            b.level -= 1.0;
        }
        Ok(())
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
        if let Some(tokens) = budget.tokens {
            let capacity = tokens as f64;
            let mut buckets = self.lock();
            let b = bucket(&mut buckets, budget, true, capacity, now);
            b.level = (b.level - used as f64).max(-1000.0 * capacity);
        }
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
    owed: bool,
}

impl TokenCharge {
    pub fn new(budgets: Arc<Budgets>, budget: Budget, sent: Arc<AtomicU64>) -> Self {
        Self {
            budgets,
            budget,
            sent,
            owed: true,
        }
    }

    /// Charges what the answer used.
    pub fn settle(mut self, used: u64) {
        self.owed = false;
        self.budgets.charge(&self.budget, used, Instant::now());
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        if self.owed {
            let estimate = self.sent.load(Ordering::Relaxed).div_ceil(4);
            self.budgets.charge(&self.budget, estimate, Instant::now());
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
    fn tokens_are_charged_after_and_admit_while_any_is_left() {
        let budgets = Budgets::default();
        let t0 = Instant::now();
        let b = Budget {
            requests: Some(10),
            tokens: Some(1000),
            per: Duration::from_secs(100),
            key: "p.yaml#0".into(),
            monitor: false,
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
        let b = Budget {
            requests: None,
            tokens: Some(100),
            per: Duration::from_secs(86_400),
            key: "p.yaml#t".into(),
            monitor: false,
        };
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
        TokenCharge::new(Arc::clone(&budgets), settled.clone(), sent).settle(99);
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
