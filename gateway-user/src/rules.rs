//! The running policies and the credentials they name: read together and swapped together, so
//! that a request decided by one generation of policies is given that generation's credentials.
use std::sync::{Arc, PoisonError, RwLock};

use crate::{credentials::Credentials, policy::PolicySet};

/// The policies and credentials in force.
///
/// Each sits behind its own lock, so a connection's decision (policies alone) never waits on
/// the credentials. A reload takes the policies' lock for writing and swaps both while it holds
/// it; a reader that wants both reads the credentials while it holds the policies' lock for
/// reading, so it sees both before a reload or both after, never one of each.
pub struct Rules {
    policies: RwLock<Arc<PolicySet>>,
    credentials: RwLock<Arc<Credentials>>,
}

impl Rules {
    pub fn new(policies: PolicySet, credentials: Credentials) -> Self {
        Self {
            policies: RwLock::new(Arc::new(policies)),
            credentials: RwLock::new(Arc::new(credentials)),
        }
    }

    /// The policies alone.
    pub fn policies(&self) -> Arc<PolicySet> {
        Arc::clone(&self.policies.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The credentials alone.
    pub fn credentials(&self) -> Arc<Credentials> {
        Arc::clone(
            &self
                .credentials
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Both, of one generation.
    pub fn both(&self) -> (Arc<PolicySet>, Arc<Credentials>) {
        let policies = self.policies.read().unwrap_or_else(PoisonError::into_inner);
        (Arc::clone(&policies), self.credentials())
    }

    /// Puts a new generation in force.
    pub fn replace(&self, policies: PolicySet, credentials: Credentials) {
        let mut held = self
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *self
            .credentials
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(credentials);
        *held = Arc::new(policies);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Generation `n`: a policy whose rule names binding `b<n>`, and credentials defining only
    /// that binding.
    fn generation(n: usize) -> (PolicySet, Credentials) {
        let text = format!(
            "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: a }}\nspec:\n  workload: {{ cgroup: /a }}\n  egress:\n    - name: api\n      match: {{ host: api.example, port: 80 }}\n      upstream: {{ port: 443 }}\n      tls: originate\n      credential: b{n}\n"
        );
        let policy = crate::policy::parse_policy(&text, Path::new("a.yaml")).expect("policy");
        let credentials = Credentials::parse(
            &format!(
                "bindings:\n  - name: b{n}\n    hosts: [api.example]\n    inject: {{ header: Authorization, format: \"Bearer {{secret}}\" }}\n    source: {{ env: K }}\n"
            ),
            "c.yaml",
            Path::new("/"),
            &|_| Some("k".into()),
        )
        .expect("credentials");
        (
            PolicySet::from_policies(vec![policy]).expect("set"),
            credentials,
        )
    }

    /// While reloads swap generations as fast as they can, every reader finds each binding its
    /// policies name in the credentials it read with them.
    #[test]
    fn a_reader_never_sees_policies_of_one_generation_and_credentials_of_another() {
        let (policies, credentials) = generation(0);
        let rules = Arc::new(Rules::new(policies, credentials));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (rules, stop) = (Arc::clone(&rules), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut swaps = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (policies, credentials) = generation(1 - swaps % 2);
                    rules.replace(policies, credentials);
                    swaps += 1;
                }
                swaps
            })
        };
        let mut mixed = 0;
        for _ in 0..200_000 {
            let (policies, credentials) = rules.both();
            if crate::daemon::check_bindings(&policies, &credentials).is_err() {
                mixed += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let swaps = writer.join().expect("writer");
        assert!(
            swaps > 100,
            "the generations were swapped meanwhile: {swaps}"
        );
        assert_eq!(mixed, 0, "reads that mixed two generations");
    }
}
