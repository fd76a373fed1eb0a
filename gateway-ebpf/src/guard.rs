//! The socket guard: `cgroup/connect4|6` and `cgroup/sendmsg4|6` attached at the cgroup2 root,
//! so they run for every socket on the host. The programs at an enforced root act on the
//! cgroup a socket was *created* in: a socket made outside every root and then used by a task
//! inside one (made before the task joined, or passed over SCM_RIGHTS) meets none of them.
//! The guard judges the *calling task* instead: a task under an enforced root may connect, or
//! send to an address, only where the root's programs would have sent it — the gateway
//! listener or an allowed DNS resolver. Cgroup programs run the socket's own cgroup's first and
//! the root's last, so a socket the root's programs redirected arrives here already aimed at
//! the listener.
//!
//! For every task outside the roots the guard allows at once: one helper call per level of the
//! task's cgroup path and a hash lookup each.
use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use gateway_common::{hook, reason, MAX_CGROUP_DEPTH};

use crate::{
    connect::Dest,
    maps::{self, TG_ROOTS},
    refuse::report,
    ALLOW, DENY,
};

#[cgroup_sock_addr(connect4)]
pub fn tg_guard_connect4(ctx: SockAddrContext) -> i32 {
    guard(&ctx, &Dest::v4(&ctx), hook::GUARD_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn tg_guard_connect6(ctx: SockAddrContext) -> i32 {
    guard(&ctx, &Dest::v6(&ctx), hook::GUARD_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tg_guard_sendmsg4(ctx: SockAddrContext) -> i32 {
    guard(&ctx, &Dest::v4(&ctx), hook::GUARD_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tg_guard_sendmsg6(ctx: SockAddrContext) -> i32 {
    guard(&ctx, &Dest::v6(&ctx), hook::GUARD_SENDMSG)
}

#[inline(always)]
fn guard(ctx: &SockAddrContext, dest: &Dest, hook_id: u32) -> i32 {
    // The guard runs for the whole host: without a config it knows no roots and lets be
    // (the root's own programs fail closed for the sockets they see).
    let Some(cfg) = maps::config() else {
        return ALLOW;
    };
    if !task_enforced() {
        return ALLOW;
    }
    let cgroup_id = maps::current_cgroup();
    if cgroup_id == cfg.gateway_cgroup_id
        || maps::is_listener(cfg, dest.family, &dest.addr, dest.port)
        || maps::is_resolver(cfg, dest.family, &dest.addr, dest.port)
    {
        return ALLOW;
    }
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if maps::refused_here(cookie) {
        // A root's program already refused this call and reported it.
        return DENY;
    }
    report(&dest.refusal(hook_id, reason::FOREIGN_SOCKET, cgroup_id));
    DENY
}

/// Whether the current task sits under an enforced root (its own cgroup or an ancestor).
#[inline(always)]
pub(crate) fn task_enforced() -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: the helper takes any level and returns 0 past the task's own.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        if TG_ROOTS.get_ptr(&id).is_some() {
            return true;
        }
        level += 1;
    }
    false
}
