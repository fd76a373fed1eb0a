//! Tollgate's daemon and CLI: the listener that redirected connections reach, identity,
//! policy, audit, and the kernel side's lifecycle.
pub mod audit;
pub mod audited;
pub mod bpf_sys;
pub mod btf;
pub mod budget;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod connections;
pub mod container;
pub mod credentials;
pub mod daemon;
pub mod demo;
pub mod ebpf;
pub mod events;
pub mod fold;
pub mod framing;
pub mod fuzzing;
pub mod h2_resets;
pub mod hostns;
pub mod http_proxy;
pub mod identity;
pub mod jsonkey;
pub mod namespaces;
pub mod netns;
pub mod normalize;
pub mod policy;
pub mod proxy;
pub mod redact;
pub mod relay;
pub mod rules;
pub mod sockdiag;
pub mod tickets;
pub mod tls;
pub mod upstream;
pub mod usage;

/// Deterministic pseudo-random numbers for the randomized unit tests (xorshift64): `next(n)`
/// is in `0..n`.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
