//! The descriptor watcher: raw tracepoint `sys_exit`. A task already under an enforced root
//! can be handed a connection made outside every root: over SCM_RIGHTS (`recvmsg`,
//! `recvmmsg`) or taken from another process (`pidfd_getfd`). No join happens, so the join
//! watcher says nothing, and a connected socket's plain sends meet no address hook. When such
//! a call returns a descriptor to a task under a root, this watcher tells the daemon (a
//! `hook::RECEIVED` event), which settles that process's connections as it does after a join.
//!
//! It runs at the exit of every system call on the host: the syscall number is compared
//! first, and everything else only for the three calls above.
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use gateway_common::{hook, RefusalEvent};

use crate::{guard::task_enforced, maps};

/// x86_64 system call numbers.
const SYS_RECVMSG: u64 = 47;
const SYS_RECVMMSG: u64 = 299;
const SYS_PIDFD_GETFD: u64 = 438;

/// Offsets in x86_64 `struct pt_regs`: the syscall number and the second argument.
const REGS_ORIG_AX: u64 = 120;
const REGS_SI: u64 = 104;

/// Offsets in the user's `struct msghdr` (64-bit) and `struct cmsghdr`.
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const CMSG_HEADER: u64 = 16;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
/// Control messages looked at before SCM_RIGHTS (credentials may come first).
const MAX_CMSGS: u64 = 4;

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn tg_received(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    if ret < 0 || regs == 0 {
        return 0;
    }
    let Some(nr) = kernel::<u64>(regs + REGS_ORIG_AX) else {
        return 0;
    };
    let handed_over = match nr {
        SYS_RECVMSG => {
            let msg = kernel::<u64>(regs + REGS_SI).unwrap_or(0);
            msg != 0 && carries_rights(msg)
        }
        SYS_RECVMMSG => ret > 0,
        SYS_PIDFD_GETFD => true,
        _ => return 0,
    };
    if !handed_over || maps::config().is_none() || !task_enforced() {
        return 0;
    }
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(mut entry) = maps::TG_EVENTS.reserve(0) {
        entry.write(RefusalEvent {
            hook: hook::RECEIVED,
            tgid,
            pid: tgid,
            cgroup_id: maps::current_cgroup(),
            ..RefusalEvent::default()
        });
        entry.submit(0);
    }
    0
}

/// Whether the control data a `recvmsg` returned (the kernel wrote back its length) holds
/// SCM_RIGHTS among its first control messages.
#[inline(always)]
fn carries_rights(msg: u64) -> bool {
    let control = user::<u64>(msg + MSG_CONTROL).unwrap_or(0);
    let len = user::<u64>(msg + MSG_CONTROLLEN).unwrap_or(0);
    if control == 0 {
        return false;
    }
    let mut at = 0u64;
    let mut i = 0;
    while i < MAX_CMSGS {
        if at + CMSG_HEADER > len {
            return false;
        }
        let Some(cmsg_len) = user::<u64>(control + at) else {
            return false;
        };
        let level = user::<i32>(control + at + 8).unwrap_or(0);
        let kind = user::<i32>(control + at + 12).unwrap_or(0);
        if level == SOL_SOCKET && kind == SCM_RIGHTS {
            return true;
        }
        if cmsg_len < CMSG_HEADER {
            return false;
        }
        // The next header starts at the length rounded up to 8 bytes.
        at += (cmsg_len + 7) & !7;
        i += 1;
    }
    false
}

#[inline(always)]
fn kernel<T>(at: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel(at as *const T).ok() }
}

#[inline(always)]
fn user<T>(at: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user validates the address.
    unsafe { bpf_probe_read_user(at as *const T).ok() }
}
