//! The descriptor watcher: tracepoints at the exit of `recvmsg`, `recvmmsg` and
//! `pidfd_getfd`. A task already under an enforced root can be handed a connection made
//! outside every root: over SCM_RIGHTS, or taken from another process. No join happens, so the
//! join watcher says nothing, and a connected socket's plain sends meet no address hook. When
//! such a call returns a descriptor to a task under a root, this watcher marks the
//! connections among the descriptors received (`carried.rs`: their packets are dropped from
//! then on) and tells the daemon (a `hook::RECEIVED` event), which settles that process's
//! connections as it does after a join. `recvmmsg` is only reported.
//! The same goes for a process that a parent outside every root created directly in a cgroup
//! under one (`clone3` with `CLONE_INTO_CGROUP`): it inherits the parent's descriptors without
//! joining; the child's own return from `clone3` marks its connections and reports it.
//!
//! These are the syscalls' own tracepoints, so the programs run for those three calls only;
//! `recvmsg`'s entry notes the control buffer it was given (for tasks under a root) so that
//! its exit can read whether the kernel wrote SCM_RIGHTS into it.
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_loop},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use gateway_common::{hook, MAX_RIGHTS};

use crate::{
    carried,
    guard::task_enforced,
    join::{ask_settle, enforced, read},
    maps,
};

/// Offsets in the syscall tracepoints' records: the second argument at entry, the result at
/// exit.
const ENTER_ARG1: usize = 24;
const EXIT_RET: usize = 16;

/// Offsets in the user's `struct msghdr` (64-bit) and `struct cmsghdr`.
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const CMSG_HEADER: u64 = 16;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
/// Control messages looked at before SCM_RIGHTS (credentials may come first).
const MAX_CMSGS: u64 = 4;

/// `-EFAULT`: the kernel may have installed the descriptors and then failed to write the
/// message header back.
const EFAULT: i64 = 14;

/// `struct mmsghdr` (64-bit): a `msghdr` and the length received, padded.
const MMSG_SIZE: u64 = 64;
/// Messages of one `recvmmsg` looked at.
const MAX_MMSGS: u64 = 64;
/// Messages of one `recvmmsg` whose descriptors are marked (the first that carry some).
const MAX_MMSG_RIGHTS: usize = 8;
/// Marks a `TG_RECVMSG` note as a `recvmmsg` vector (user addresses never have the top bit).
const MMSG_TAG: u64 = 1 << 63;

#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn tg_recvmsg_enter(ctx: TracePointContext) -> u32 {
    if maps::config().is_none() || !task_enforced() {
        return 0;
    }
    // SAFETY: the record has the syscall's arguments at fixed offsets (tracefs format).
    let Ok(msg) = (unsafe { ctx.read_at::<u64>(ENTER_ARG1) }) else {
        return 0;
    };
    // The control buffer as the kernel takes it now: another thread may repoint the user's
    // `msghdr` while the call blocks, so the exit does not read it from there.
    let control = user::<u64>(msg + MSG_CONTROL).unwrap_or(0);
    let len = user::<u64>(msg + MSG_CONTROLLEN).unwrap_or(0);
    if control == 0 || len < CMSG_HEADER {
        // No room for control data: descriptors sent are discarded by the kernel.
        return 0;
    }
    let _ = maps::TG_RECVMSG.insert(&bpf_get_current_pid_tgid(), &[control, len], 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_recvmsg")]
pub fn tg_recvmsg_exit(ctx: TracePointContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(entry) = maps::TG_RECVMSG.get_ptr(&thread) else {
        return 0;
    };
    // SAFETY: a value of this map, read before it is removed.
    let [control, len] = unsafe { *entry };
    let _ = maps::TG_RECVMSG.remove(&thread);
    let ret = returned(&ctx);
    if ret == -EFAULT || control & MMSG_TAG != 0 {
        report(thread);
    } else if ret >= 0 {
        if let Some((fds, count)) = rights(control, len) {
            mark_rights(thread, fds, count);
            report(thread);
        }
    }
    0
}

/// Notes the message vector of a `recvmmsg` by a thread under a root (tagged apart from a
/// `recvmsg`'s control buffer in the same map).
#[tracepoint(category = "syscalls", name = "sys_enter_recvmmsg")]
pub fn tg_recvmmsg_enter(ctx: TracePointContext) -> u32 {
    if maps::config().is_none() || !task_enforced() {
        return 0;
    }
    // SAFETY: the record has the syscall's arguments at fixed offsets (tracefs format).
    let Ok(vector) = (unsafe { ctx.read_at::<u64>(ENTER_ARG1) }) else {
        return 0;
    };
    let _ = maps::TG_RECVMSG.insert(&bpf_get_current_pid_tgid(), &[vector | MMSG_TAG, 0], 0);
    0
}

/// Looks at the first [`MAX_MMSGS`] messages received: each one's control data (the kernel
/// wrote back how much it used) is read for SCM_RIGHTS, and those descriptors are marked. The
/// process is reported when one carried descriptors, when more messages came than were
/// looked at, or when the call failed after receiving (EFAULT); a UDP server's plain batches
/// are not reported.
#[tracepoint(category = "syscalls", name = "sys_exit_recvmmsg")]
pub fn tg_recvmmsg_exit(ctx: TracePointContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(entry) = maps::TG_RECVMSG.get_ptr(&thread) else {
        return 0;
    };
    // SAFETY: a value of this map, read before it is removed.
    let [tagged, _] = unsafe { *entry };
    let _ = maps::TG_RECVMSG.remove(&thread);
    let ret = returned(&ctx);
    if ret == -EFAULT || tagged & MMSG_TAG == 0 {
        // Failed after receiving, or the note is not this call's: report without looking.
        report(thread);
        return 0;
    }
    if ret <= 0 {
        return 0;
    }
    let messages = (ret as u64).min(MAX_MMSGS);
    let mut walk = MmsgWalk {
        vector: tagged & !MMSG_TAG,
        rights: [[0; 2]; MAX_MMSG_RIGHTS],
        found: 0,
        carried: 0,
    };
    // First which messages carried descriptors (a UDP server's batch carries none and costs a
    // read per message), then their descriptors, each in its own callback.
    // SAFETY: the callback is a static function of this program with the helper's signature,
    // and its context is this stack value, alive for the call.
    unsafe {
        bpf_loop(
            messages as u32,
            mmsg_scan as *mut c_void,
            core::ptr::from_mut(&mut walk).cast(),
            0,
        );
    }
    if walk.carried == 0 && ret as u64 <= MAX_MMSGS {
        return 0;
    }
    let mut i = 0;
    while i < MAX_MMSG_RIGHTS {
        if i < walk.found as usize {
            let [fds, count] = walk.rights[i];
            mark_rights(thread, fds, count);
        }
        i += 1;
    }
    report(thread);
    0
}

/// The state of one `recvmmsg` exit's walk.
#[repr(C)]
struct MmsgWalk {
    vector: u64,
    /// (address, count) of the descriptors of the first messages that carried some.
    rights: [[u64; 2]; MAX_MMSG_RIGHTS],
    found: u32,
    /// Messages that carried SCM_RIGHTS.
    carried: u32,
}

/// Looks at message `i` of an [`MmsgWalk`] for SCM_RIGHTS (the kernel wrote back how much
/// control data it used). Returns 0 to go on.
#[inline(never)]
extern "C" fn mmsg_scan(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `MmsgWalk` that the exit handed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<MmsgWalk>() };
    let header = walk.vector + i * MMSG_SIZE;
    let control = user::<u64>(header + MSG_CONTROL).unwrap_or(0);
    if control == 0 {
        return 0;
    }
    let len = user::<u64>(header + MSG_CONTROLLEN).unwrap_or(0);
    if let Some((fds, count)) = rights(control, len) {
        walk.carried += 1;
        let at = walk.found as usize;
        if at < MAX_MMSG_RIGHTS {
            walk.rights[at] = [fds, count];
            walk.found += 1;
        }
    }
    0
}

/// `IORING_OP_RECVMSG`.
const IORING_OP_RECVMSG: u8 = 10;

/// Raw tracepoint `io_uring_complete`, before the completion is visible to the ring's user:
/// a `recvmsg` through io_uring on a unix socket, completed for a task under a root, may have
/// installed descriptors, so the task's table is walked and its connections made outside are
/// marked, as after a join (the message's control data is not at hand here).
#[raw_tracepoint(tracepoint = "io_uring_complete")]
pub fn tg_uring_complete(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct io_ring_ctx *ctx, void *req, struct io_uring_cqe *cqe)
    let Some(cfg) = maps::config() else {
        return 0;
    };
    let opcode_at = cfg.offsets.fds.kiocb_opcode;
    if opcode_at == 0 {
        return 0;
    }
    let req: u64 = ctx.arg(1);
    let cqe: u64 = ctx.arg(2);
    if read::<u8>(req + u64::from(opcode_at)).unwrap_or(0) != IORING_OP_RECVMSG
        || read::<i32>(cqe + 8).unwrap_or(-1) < 0
        || !task_enforced()
    {
        return 0;
    }
    // The request opens with its file: the socket it received on.
    if !carried::is_unix(cfg, read::<u64>(req).unwrap_or(0)) {
        return 0;
    }
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: the helper has no preconditions; the pointer is only read through the probe
    // helper. An io_uring worker shares its task's descriptor table.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    carried::mark_all(cfg, task, (thread >> 32) as u32, maps::current_cgroup());
    report(thread);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_pidfd_getfd")]
pub fn tg_pidfd_getfd_exit(ctx: TracePointContext) -> u32 {
    let fd = returned(&ctx);
    let Some(cfg) = maps::config() else {
        return 0;
    };
    if fd >= 0 && task_enforced() {
        let thread = bpf_get_current_pid_tgid();
        carried::mark(cfg, fd, (thread >> 32) as u32, maps::current_cgroup());
        report(thread);
    }
    0
}

/// In the new process, on its return from `clone3` (0): reported when it is under a root and
/// its parent is not, which only `CLONE_INTO_CGROUP` (or a parent moving at that moment) makes.
/// New threads are not processes and are skipped.
#[tracepoint(category = "syscalls", name = "sys_exit_clone3")]
pub fn tg_clone3_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if returned(&ctx) != 0 || (pid_tgid as u32) != (pid_tgid >> 32) as u32 {
        return 0;
    }
    let Some(cfg) = maps::config() else {
        return 0;
    };
    let o = cfg.offsets;
    if o.task_real_parent == 0 || o.task_cgroups == 0 || !task_enforced() {
        return 0;
    }
    // SAFETY: the helper has no preconditions; the pointer is only read through the probe
    // helper.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let parent = read::<u64>(task + u64::from(o.task_real_parent)).unwrap_or(0);
    let css_set = read::<u64>(parent + u64::from(o.task_cgroups)).unwrap_or(0);
    let cgroup = read::<u64>(css_set + u64::from(o.css_set_dfl_cgrp)).unwrap_or(0);
    if parent == 0 || css_set == 0 || cgroup == 0 || enforced(cfg, cgroup) {
        return 0;
    }
    carried::mark_all(cfg, task, (pid_tgid >> 32) as u32, maps::current_cgroup());
    report(pid_tgid);
    0
}

#[inline(always)]
fn returned(ctx: &TracePointContext) -> i64 {
    // SAFETY: the exit record has the result at a fixed offset (tracefs format).
    unsafe { ctx.read_at::<i64>(EXIT_RET) }.unwrap_or(-1)
}

#[inline(always)]
fn report(pid_tgid: u64) {
    ask_settle(
        hook::RECEIVED,
        (pid_tgid >> 32) as u32,
        maps::current_cgroup(),
    );
}

/// Marks the connections among the `count` descriptors (a user array of `int` at `fds`) a
/// `recvmsg` just installed, so that their packets are dropped before the call returns.
#[inline(always)]
fn mark_rights(thread: u64, fds: u64, count: u64) {
    let mut walk = RightsWalk {
        fds,
        tgid: (thread >> 32) as u32,
        cgroup: maps::current_cgroup(),
    };
    // One descriptor per callback: the verifier checks the cgroup walk once.
    // SAFETY: the callback is a static function of this program with the helper's signature,
    // and its context is this stack value, alive for the call.
    unsafe {
        bpf_loop(
            count.min(u64::from(MAX_RIGHTS)) as u32,
            right_one as *mut c_void,
            core::ptr::from_mut(&mut walk).cast(),
            0,
        );
    }
}

/// The state of one [`mark_rights`].
#[repr(C)]
struct RightsWalk {
    fds: u64,
    tgid: u32,
    cgroup: u64,
}

/// Marks descriptor `i` of a [`RightsWalk`]. Returns 0 to go on.
#[inline(never)]
extern "C" fn right_one(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `RightsWalk` that `mark_rights` handed to bpf_loop.
    let walk = unsafe { &*ctx.cast::<RightsWalk>() };
    let Some(cfg) = maps::config() else {
        return 1;
    };
    if let Some(fd) = user::<i32>(walk.fds + i * 4) {
        carried::mark(cfg, i64::from(fd), walk.tgid, walk.cgroup);
    }
    0
}

/// Where the control buffer a `recvmsg` was given (at entry: `control`, `len` bytes) holds
/// SCM_RIGHTS among its first control messages (the kernel writes them from its start): the
/// address of its descriptors and how many there are.
#[inline(always)]
fn rights(control: u64, len: u64) -> Option<(u64, u64)> {
    if control == 0 {
        return None;
    }
    let mut at = 0u64;
    let mut i = 0;
    while i < MAX_CMSGS {
        if at + CMSG_HEADER > len {
            return None;
        }
        let cmsg_len = user::<u64>(control + at)?;
        let level = user::<i32>(control + at + 8).unwrap_or(0);
        let kind = user::<i32>(control + at + 12).unwrap_or(0);
        if level == SOL_SOCKET && kind == SCM_RIGHTS {
            return Some((control + at + CMSG_HEADER, cmsg_len.saturating_sub(CMSG_HEADER) / 4));
        }
        if cmsg_len < CMSG_HEADER {
            return None;
        }
        // The next header starts at the length rounded up to 8 bytes.
        at += (cmsg_len + 7) & !7;
        i += 1;
    }
    None
}

#[inline(always)]
fn user<T>(at: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user validates the address.
    unsafe { bpf_probe_read_user(at as *const T).ok() }
}
