//! `cgroup/sock_create`: only TCP and UDP sockets on IPv4/IPv6. Raw sockets, ICMP ping sockets,
//! SCTP, MPTCP, UDP-Lite and anything else the gateway cannot see are refused at creation.
use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use gateway_common::{hook, reason, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps,
    refuse::{report, Refusal},
    ALLOW, DENY,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[cgroup_sock(sock_create)]
pub fn tg_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock` to this program type. Read every field before
    // branching (see DESIGN.md: merged context loads).
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    let cgroup_id = maps::current_cgroup();
    if let Some(cfg) = maps::config() {
        if cfg.gateway_cgroup_id != 0 && cfg.gateway_cgroup_id == cgroup_id {
            return ALLOW;
        }
    }
    let inet = family == u32::from(AF_INET) || family == u32::from(AF_INET6);
    let allowed = inet
        && ((sock_type == SOCK_STREAM && protocol == u32::from(IPPROTO_TCP))
            || (sock_type == SOCK_DGRAM && protocol == u32::from(IPPROTO_UDP)));
    if allowed {
        return ALLOW;
    }
    report(&Refusal {
        hook: hook::SOCK_CREATE,
        reason: reason::SOCKET_TYPE,
        cgroup_id,
        family: family as u16,
        addr: [0; 4],
        port: 0,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        in_task: true,
    });
    DENY
}
