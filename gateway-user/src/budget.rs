//! Request budgets: a host rule may allow at most `requests` per `per`, counted together for
//! every workload its policy selects, as a token bucket (a burst of `requests`, refilled at
//! `requests / per`). Only requests the policy allows are counted.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A rule's budget, as compiled from its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub requests: u32,
    pub per: Duration,
    /// Which bucket: the policy file and the rule's place in it, so a reload that keeps the
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
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    /// Requests that may still be made; at most the budget's `requests`.
    level: f64,
    at: Instant,
}

impl Budgets {
    /// Spends one request of `budget` at `now`, or says how long until one is left.
    pub fn take(&self, budget: &Budget, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(budget.requests);
        let rate = capacity / budget.per.as_secs_f64();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bucket = buckets.entry(budget.key.clone()).or_insert(Bucket {
            level: capacity,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        // A reload that lowers the budget caps what is left at the new size.
        bucket.level = (bucket.level + elapsed * rate).min(capacity);
        bucket.at = now;
        if bucket.level >= 1.0 {
            bucket.level -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.level) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(requests: u32, per: &str) -> Budget {
        Budget {
            requests,
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
            assert_eq!(budgets.take(&b, t0), Ok(()));
        }
        let wait = budgets.take(&b, t0).expect_err("exhausted");
        assert_eq!(wait.as_secs(), 20, "one request comes back every 20 s");
        assert!(budgets.take(&b, t0 + Duration::from_secs(19)).is_err());
        assert_eq!(budgets.take(&b, t0 + Duration::from_secs(21)), Ok(()));
        assert!(budgets.take(&b, t0 + Duration::from_secs(21)).is_err());
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(budgets.take(&b, later), Ok(()));
        }
        assert!(budgets.take(&b, later).is_err());
    }

    #[test]
    fn rules_spend_their_own_buckets_and_a_smaller_budget_caps_the_level() {
        let budgets = Budgets::default();
        let t0 = Instant::now();
        let a = budget(1, "1h");
        let b = budget(2, "1h");
        assert_eq!(budgets.take(&a, t0), Ok(()));
        assert!(budgets.take(&a, t0).is_err());
        assert_eq!(budgets.take(&b, t0), Ok(()));
        // The same rule reloaded with a budget of 1: what it had left (one) is still there,
        // and it refills to one at most.
        let mut lowered = b.clone();
        lowered.requests = 1;
        assert!(budgets.take(&lowered, t0).is_ok());
        assert!(budgets.take(&lowered, t0).is_err());
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
