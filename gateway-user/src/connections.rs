//! How many connections each workload holds open through the gateway, capped, so that one
//! workload cannot take every descriptor and task the gateway has from the others.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// Open connections per workload (by [`WorkloadId::holder`]).
///
/// [`WorkloadId::holder`]: crate::identity::WorkloadId::holder
#[derive(Debug)]
pub struct Connections {
    max: usize,
    open: Mutex<HashMap<Arc<str>, usize>>,
}

/// One open connection of a workload, counted until dropped.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Connections>,
    holder: Arc<str>,
}

impl Connections {
    /// At most `max` open connections for each workload.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// A slot for one more connection of `holder`, or `None` if it holds its most already.
    pub fn open(self: &Arc<Self>, holder: &str) -> Option<Slot> {
        let mut open = self.lock();
        let holder: Arc<str> = match open.get_key_value(holder) {
            Some((_, &n)) if n >= self.max => return None,
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(holder),
        };
        *open.entry(Arc::clone(&holder)).or_default() += 1;
        Some(Slot {
            counts: Arc::clone(self),
            holder,
        })
    }

    /// How many connections `holder` holds open.
    pub fn held_by(&self, holder: &str) -> usize {
        self.lock().get(holder).copied().unwrap_or(0)
    }

    /// Every workload holding a connection open, with how many, most first: one JSON object
    /// each, `{"workload", "open", "of"}`.
    pub fn report(&self) -> Vec<serde_json::Value> {
        let mut held: Vec<(Arc<str>, usize)> = self
            .lock()
            .iter()
            .map(|(holder, n)| (Arc::clone(holder), *n))
            .collect();
        held.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        held.into_iter()
            .map(|(holder, n)| serde_json::json!({ "workload": &*holder, "open": n, "of": self.max }))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Slot {
    /// Whose slot it is.
    pub fn holder(&self) -> &Arc<str> {
        &self.holder
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.counts.lock();
        if let Some(n) = open.get_mut(&*self.holder) {
            *n -= 1;
            // A workload with nothing open takes no memory here.
            if *n == 0 {
                open.remove(&*self.holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_is_refused_past_its_most_and_others_are_not() {
        let counts = Connections::new(2);
        let a1 = counts.open("unit:a.service").expect("first");
        let a2 = counts.open("unit:a.service").expect("second");
        assert!(counts.open("unit:a.service").is_none(), "third refused");
        let b = counts.open("unit:b.service").expect("another workload");
        assert_eq!(counts.held_by("unit:a.service"), 2);
        assert_eq!(
            counts.report(),
            [
                serde_json::json!({ "workload": "unit:a.service", "open": 2, "of": 2 }),
                serde_json::json!({ "workload": "unit:b.service", "open": 1, "of": 2 }),
            ]
        );
        drop(a1);
        assert_eq!(counts.held_by("unit:a.service"), 1);
        let a3 = counts
            .open("unit:a.service")
            .expect("a closed one frees its slot");
        drop((a2, a3, b));
        assert_eq!(counts.held_by("unit:a.service"), 0);
        assert!(
            counts.lock().is_empty(),
            "nothing kept for workloads with nothing open"
        );
    }
}
