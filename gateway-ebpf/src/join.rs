//! The join watcher: raw tracepoint `cgroup_attach_task`. When a task moves into a cgroup
//! under an enforced root, the connections it already holds were made where no program of the
//! root saw them. The watcher marks them (`carried.rs`: their packets are dropped from then
//! on) and tells the daemon (an event on the refusal ring), which destroys the outbound ones,
//! as it does for connections older than enforcement. New connects on
//! carried sockets meet the socket guard instead (`guard.rs`).
use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::raw_tracepoint, programs::RawTracePointContext,
};
use gateway_common::{hook, Config, RefusalEvent, MAX_CGROUP_DEPTH};

use crate::maps::{self, TG_EVENTS, TG_ROOTS};

#[raw_tracepoint(tracepoint = "cgroup_attach_task")]
pub fn tg_join(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct cgroup *dst_cgrp, const char *path, struct task_struct *task,
    //          bool threadgroup)
    let cgroup: u64 = ctx.arg(0);
    let task: u64 = ctx.arg(2);
    let Some(cfg) = maps::config() else {
        return 0;
    };
    if cfg.offsets.task_tgid == 0 || cgroup == 0 || task == 0 {
        return 0;
    }
    let cgroup_id = cgroup_id(cfg, cgroup);
    if !enforced(cfg, cgroup) {
        return 0;
    }
    let tgid = read::<u32>(task + u64::from(cfg.offsets.task_tgid)).unwrap_or(0);
    if tgid == 0 {
        return 0;
    }
    // Its connections made outside are dropped from here on, before it runs again under
    // the root; the daemon's settle then cuts or keeps each.
    crate::carried::mark_all(cfg, task, tgid, cgroup_id);
    ask_settle(hook::JOIN, tgid, cgroup_id);
    0
}

/// Asks the daemon to settle process `tgid`, now in cgroup `cgroup_id` (an event of kind
/// `hook` on the refusal ring). A report the ring cannot take is counted as lost for the
/// cgroup, and the daemon then settles every process in it.
#[inline(always)]
pub(crate) fn ask_settle(hook: u32, tgid: u32, cgroup_id: u64) {
    let Some(mut entry) = TG_EVENTS.reserve(0) else {
        crate::refuse::bump(cgroup_id, |c| &mut c.reports_lost);
        return;
    };
    entry.write(RefusalEvent {
        hook,
        tgid,
        pid: tgid,
        cgroup_id,
        ..RefusalEvent::default()
    });
    entry.submit(0);
}

/// Whether the cgroup at `cgroup` (a kernel `struct cgroup *`) or one above it is a root.
#[inline(always)]
pub(crate) fn enforced(cfg: &Config, mut cgroup: u64) -> bool {
    let mut depth = 0;
    while depth < MAX_CGROUP_DEPTH && cgroup != 0 {
        let id = cgroup_id(cfg, cgroup);
        if id != 0 && TG_ROOTS.get_ptr(&id).is_some() {
            return true;
        }
        cgroup = read::<u64>(cgroup + u64::from(cfg.offsets.cgroup_parent)).unwrap_or(0);
        depth += 1;
    }
    false
}

/// The id of the cgroup at `cgroup` (its kernfs node's id), 0 if unreadable.
#[inline(always)]
pub(crate) fn cgroup_id(cfg: &Config, cgroup: u64) -> u64 {
    let kn = read::<u64>(cgroup + u64::from(cfg.offsets.cgroup_kn)).unwrap_or(0);
    if kn == 0 {
        return 0;
    }
    read::<u64>(kn + u64::from(cfg.offsets.kn_id)).unwrap_or(0)
}

/// Reads a `T` from kernel memory through the probe helper, which fails safely.
#[inline(always)]
pub(crate) fn read<T>(at: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel(at as *const T).ok() }
}
