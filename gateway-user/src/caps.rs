//! The capabilities `tollgate run` needs, checked before anything is attached, so a daemon
//! started with too few fails at once and names what is missing, instead of attaching its
//! programs and then denying workloads it could not identify.
//!
//! The systemd unit (`deploy/tollgate.service`) grants exactly these and no more; a unit test
//! keeps the two lists equal, and the privileged tests run every daemon with the unit's set.
//! CAP_BPF and CAP_PERFMON are not listed: the kernel accepts CAP_SYS_ADMIN for what they
//! allow, and CAP_SYS_ADMIN is needed anyway.

/// One capability and what the daemon uses it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    /// The name systemd and `capsh` use.
    pub name: &'static str,
    /// Its number (`linux/capability.h`).
    pub bit: u32,
    pub why: &'static str,
}

/// Always needed.
pub const ALWAYS: [Needed; 5] = [
    Needed {
        name: "CAP_SYS_ADMIN",
        bit: 21,
        why: "loading and attaching the programs, finding attached ones by id, mounting bpffs \
              and tracefs where they are missing, entering pod network namespaces",
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bit: 12,
        why: "closing the connections that predate enforcement (SOCK_DESTROY)",
    },
    Needed {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        why: "reading a workload's executable and namespaces under /proc when it runs as \
              another user or with capabilities the daemon lacks",
    },
    Needed {
        name: "CAP_DAC_OVERRIDE",
        bit: 1,
        why: "creating the gateway cgroup in the cgroup2 root, which is read-only to everyone",
    },
    Needed {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        why: "finding the path of the cgroup the kernel recorded for a connection \
              (open_by_handle_at)",
    },
];

/// Needed when the listener port is below 1024, as the default
/// ([`crate::config::DEFAULT_LISTENER_PORT`]) is.
pub const LOW_PORT: Needed = Needed {
    name: "CAP_NET_BIND_SERVICE",
    bit: 10,
    why: "listening on a port below 1024",
};

/// What a daemon listening on `port` needs.
pub fn needed(port: u16) -> Vec<Needed> {
    let mut all = ALWAYS.to_vec();
    if port < 1024 {
        all.push(LOW_PORT);
    }
    all
}

/// Those of `needed` missing from the effective set `effective` (a `CapEff` mask).
pub fn missing(effective: u64, needed: &[Needed]) -> Vec<Needed> {
    needed
        .iter()
        .filter(|n| effective & (1 << n.bit) == 0)
        .copied()
        .collect()
}

/// The calling thread's effective set, from the `CapEff:` line of its status.
pub fn effective() -> std::io::Result<u64> {
    parse_effective(&std::fs::read_to_string("/proc/thread-self/status")?).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no CapEff line in /proc/thread-self/status",
        )
    })
}

fn parse_effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// One line per missing capability: its name and what it is for.
pub fn describe(missing: &[Needed]) -> String {
    missing
        .iter()
        .map(|n| format!("{} ({})", n.name, n.why))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_is_read_from_the_status_file() {
        let status = "Name:\ttollgate\nCapInh:\t0000000000000000\nCapPrm:\t00000000002c1406\n\
                      CapEff:\t00000000002c1406\nCapBnd:\t00000000002c1406\n";
        assert_eq!(parse_effective(status), Some(0x2c_1406));
        assert_eq!(parse_effective("Name:\tx\n"), None);
        assert_eq!(parse_effective("CapEff:\tzz\n"), None);
    }

    #[test]
    fn what_is_missing_is_named_and_the_low_port_adds_one() {
        let all: u64 = needed(951).iter().map(|n| 1 << n.bit).sum();
        assert!(missing(all, &needed(951)).is_empty());
        assert!(missing(u64::MAX, &needed(951)).is_empty());
        assert_eq!(needed(15_001).len(), ALWAYS.len());
        assert_eq!(needed(951).len(), ALWAYS.len() + 1);
        let without_ptrace = all & !(1 << 19);
        let gone = missing(without_ptrace, &needed(951));
        assert_eq!(
            gone.iter().map(|n| n.name).collect::<Vec<_>>(),
            ["CAP_SYS_PTRACE"]
        );
        assert!(describe(&gone).starts_with("CAP_SYS_PTRACE (reading a workload's executable"));
        assert_eq!(missing(0, &needed(951)).len(), 6);
        assert_eq!(missing(0, &needed(8080)).len(), 5);
    }

    /// The unit grants what the daemon needs with its default port, and nothing else.
    #[test]
    fn the_systemd_unit_grants_exactly_what_the_daemon_needs() {
        let unit = include_str!("../../deploy/tollgate.service");
        let granted = unit_bounding_set(unit);
        let mut needed: Vec<&str> = needed(crate::config::DEFAULT_LISTENER_PORT)
            .iter()
            .map(|n| n.name)
            .collect();
        needed.sort_unstable();
        assert_eq!(granted, needed);
        assert!(
            unit.lines().any(|l| l.trim() == "NoNewPrivileges=yes"),
            "the unit sets NoNewPrivileges=yes"
        );
    }

    /// The names in the unit's `CapabilityBoundingSet=` lines, sorted.
    fn unit_bounding_set(unit: &str) -> Vec<&str> {
        let mut names: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
            .flat_map(str::split_whitespace)
            .collect();
        names.sort_unstable();
        names
    }
}
