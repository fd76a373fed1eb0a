//! `cgroup/bind4|6`: an enforced workload may not bind the gateway listener's port, on any
//! address, so it can never receive connections redirected to the listener.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use gateway_common::{hook, reason, AF_INET, AF_INET6};

use crate::{
    maps,
    refuse::{report, Refusal},
    ALLOW, DENY,
};

#[cgroup_sock_addr(bind4)]
pub fn tg_bind4(ctx: SockAddrContext) -> i32 {
    check_bind(&ctx, AF_INET)
}

#[cgroup_sock_addr(bind6)]
pub fn tg_bind6(ctx: SockAddrContext) -> i32 {
    check_bind(&ctx, AF_INET6)
}

#[inline(always)]
fn check_bind(ctx: &SockAddrContext, family: u16) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` to this program type.
    let (user_port, ip4, ip6, sock_type, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_port,
            sa.user_ip4,
            sa.user_ip6,
            sa.type_,
            sa.protocol,
        )
    };
    let port = u16::from_be(user_port as u16);
    let cgroup_id = maps::current_cgroup();
    let Some(cfg) = maps::config() else {
        return ALLOW; // Nothing to protect until the listener exists; other hooks fail closed.
    };
    if cfg.gateway_cgroup_id == cgroup_id || port != cfg.listener_port {
        return ALLOW;
    }
    report(&Refusal {
        hook: hook::BIND,
        reason: reason::LISTENER_PORT,
        cgroup_id,
        family,
        addr: if family == AF_INET {
            [ip4, 0, 0, 0]
        } else {
            ip6
        },
        port,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        in_task: true,
    });
    DENY
}
