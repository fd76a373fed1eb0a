//! `cgroup/getpeername4|6`: a redirected socket reports its original destination, not the
//! listener, so applications that log or check their peer keep working.
use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use gateway_common::AF_INET;

use crate::{maps, ALLOW};

#[cgroup_sock_addr(getpeername4)]
pub fn tg_getpeername4(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tg_getpeername6(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, true)
}

#[inline(always)]
fn rewrite_peer(ctx: &SockAddrContext, v6_socket: bool) -> i32 {
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = maps::origin_of(cookie) else {
        return ALLOW;
    };
    let port = u32::from(state.dst_port.to_be());
    // SAFETY: writing the user address fields is what these hooks are for.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        if !v6_socket {
            sa.user_ip4 = state.dst_addr[0];
        } else if state.dst_family == AF_INET {
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            sa.user_ip6[3] = state.dst_addr[0];
        } else {
            sa.user_ip6[0] = state.dst_addr[0];
            sa.user_ip6[1] = state.dst_addr[1];
            sa.user_ip6[2] = state.dst_addr[2];
            sa.user_ip6[3] = state.dst_addr[3];
        }
        sa.user_port = port;
    }
    ALLOW
}
