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
        why: "closing the connections that predate enforcement (SOCK_DESTROY), bringing up \
              loopback in a pod's network namespace",
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

/// CAP_SETPCAP, which dropping from the bounding set takes.
const SETPCAP: u32 = 8;

/// Keeps only `needed` for good: every other capability leaves the bounding set (when this
/// process may change it, i.e. holds CAP_SETPCAP; a unit that confined it already has no
/// others there) and the permitted, effective, inheritable and ambient sets, and no exec can
/// gain any back (`no_new_privs`). Capabilities are per thread and a new thread takes its
/// creator's, so this runs before the daemon starts any; it refuses to run in a process that
/// has more than one thread.
pub fn keep_only(needed: &[Needed]) -> std::io::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(std::io::Error::other(format!(
            "capabilities can only be dropped before any thread starts ({threads} running)"
        )));
    }
    let keep: u64 = needed.iter().map(|n| 1u64 << n.bit).fold(0, |a, b| a | b);
    let effective = effective()?;
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable /proc/sys/kernel/cap_last_cap"))?;
    let prctl = |option: libc::c_int, arg: libc::c_ulong| {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(option, arg, 0, 0, 0) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if effective & (1 << SETPCAP) != 0 {
        for cap in (0..=last.min(63)).filter(|c| keep & (1 << c) == 0) {
            prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap))?;
        }
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )?;
    let kept = keep & effective;
    set_own(kept)?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
}

/// capset(2) on the calling thread: `set` permitted and effective, nothing inheritable.
fn set_own(set: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| {
        let bits = u32::try_from((set >> shift) & 0xffff_ffff).unwrap_or(0);
        Data {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        }
    };
    let data = [half(0), half(32)];
    // SAFETY: capset with a version 3 header and the two data blocks that version reads.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The names of the capabilities in the mask `set` that the daemon knows.
pub fn names(set: u64) -> Vec<&'static str> {
    ALWAYS
        .iter()
        .chain([&LOW_PORT])
        .filter(|n| set & (1 << n.bit) != 0)
        .map(|n| n.name)
        .collect()
}

/// Each missing capability's name and what it is for, joined by "; ".
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

    /// With a second thread running, dropping would leave it with everything: refused, and
    /// nothing changes.
    #[test]
    fn a_process_with_threads_is_refused() {
        let (stop, parked) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || parked.recv());
        let before = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        let err = keep_only(&needed(951)).expect_err("threads are running");
        drop(stop);
        let _ = other.join();
        assert!(
            err.to_string().contains("before any thread starts"),
            "{err}"
        );
        let after = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        let caps = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(caps(&before), caps(&after));
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
