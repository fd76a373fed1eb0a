//! `cgroup/sendmsg4|6`: a UDP send that names an address may only go to an allowed DNS
//! resolver. An AF_INET6 send to `::ffff:a.b.c.d` runs sendmsg4 in the kernel; sendmsg6
//! normalizes mapped addresses anyway, so every hook decides the same.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use gateway_common::{hook, reason};

use crate::{
    connect::{noted, udp_verdict, Dest},
    maps,
    refuse::report,
    ALLOW, DENY,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn tg_sendmsg4(ctx: SockAddrContext) -> i32 {
    noted(&ctx, on_send(&Dest::v4(&ctx)))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tg_sendmsg6(ctx: SockAddrContext) -> i32 {
    noted(&ctx, on_send(&Dest::v6(&ctx)))
}

#[inline(always)]
fn on_send(dest: &Dest) -> i32 {
    let cgroup_id = maps::current_cgroup();
    let Some(cfg) = maps::config() else {
        report(&dest.refusal(hook::SENDMSG, reason::NO_CONFIG, cgroup_id));
        return DENY;
    };
    if cfg.gateway_cgroup_id == cgroup_id {
        return ALLOW;
    }
    udp_verdict(cfg, dest, hook::SENDMSG, cgroup_id)
}
