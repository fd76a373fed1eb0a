//! Reporting a refusal: a per-cgroup counter always, a ring-buffer event when there is room.
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use gateway_common::{Counters, RefusalEvent};

use crate::maps::{TG_COUNTERS, TG_EVENTS};

/// What a refusal is about: filled by each hook from its own context.
pub(crate) struct Refusal {
    pub hook: u32,
    pub reason: u32,
    pub cgroup_id: u64,
    pub family: u16,
    pub addr: [u32; 4],
    pub port: u16,
    pub sock_type: u16,
    pub protocol: u16,
    /// Whether the hook runs in the caller's task (so pid, uid and comm are the caller's).
    pub in_task: bool,
}

/// Adds one to the counter `field` selects for `cgroup_id`, creating the entry. The map is
/// per-CPU, so no update is lost; the daemon sums the CPUs.
#[inline(always)]
pub(crate) fn bump(cgroup_id: u64, field: impl Fn(&mut Counters) -> &mut u64) {
    let ptr = match TG_COUNTERS.get_ptr_mut(cgroup_id) {
        Some(p) => p,
        None => {
            let _ = TG_COUNTERS.insert(cgroup_id, Counters::default(), 1 /* BPF_NOEXIST */);
            match TG_COUNTERS.get_ptr_mut(cgroup_id) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: `ptr` points at this CPU's copy of a live map value for the program's duration.
    let counter = field(unsafe { &mut *ptr });
    *counter = counter.wrapping_add(1);
}

/// Counts the refusal and, if the ring buffer has room, sends it; otherwise counts it as lost.
#[inline(always)]
pub(crate) fn report(r: &Refusal) {
    bump(r.cgroup_id, |c| &mut c.refused);
    let Some(mut entry) = TG_EVENTS.reserve(0) else {
        bump(r.cgroup_id, |c| &mut c.events_lost);
        return;
    };
    let (pid, tgid, uid, gid, comm) = if r.in_task {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        (
            pid_tgid as u32,
            (pid_tgid >> 32) as u32,
            uid_gid as u32,
            (uid_gid >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    } else {
        (0, 0, 0, 0, [0; 16])
    };
    entry.write(RefusalEvent {
        hook: r.hook,
        reason: r.reason,
        pid,
        tgid,
        uid,
        gid,
        cgroup_id: r.cgroup_id,
        addr: r.addr,
        port: r.port,
        family: r.family,
        sock_type: r.sock_type,
        protocol: r.protocol,
        // SAFETY: the helper has no preconditions.
        ktime_ns: unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_ns() },
        comm,
    });
    entry.submit(0);
}
