//! `sock_ops`: at `TCP_CONNECT_CB` (caller's context, source port chosen, before the SYN) the
//! origin of a redirected socket is written under the connection's client end, where the
//! listener finds it at accept. At `PASSIVE_ESTABLISHED_CB` a connection a server under an
//! enforced root accepted is marked, so the egress backstop lets its replies out.
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_storage_get,
    },
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use gateway_common::{sock_flags, PendingKey, SockState, AF_INET};

use crate::maps::{TG_PENDING, TG_SOCKETS};

const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

#[sock_ops]
pub fn tg_sock_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the kernel hands a valid `bpf_sock_ops`; read every field before branching.
    let (op, family, local_ip4, local_ip6, local_port, sk) = unsafe {
        let ops = &*ctx.ops;
        (
            ops.op,
            ops.family,
            ops.local_ip4,
            ops.local_ip6,
            ops.local_port,
            ops.__bindgen_anon_2.sk,
        )
    };
    if sk.is_null() {
        return 1;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: `sk` is the non-null full socket of this callback.
        let state = unsafe { bpf_sk_storage_get(storage(), sk.cast(), core::ptr::null_mut(), 0) }
            .cast::<SockState>();
        if state.is_null() {
            return 1;
        }
        // SAFETY: non-null storage returned by the kernel for this socket.
        let state = unsafe { &*state };
        if state.flags & sock_flags::REDIRECTED == 0 {
            return 1;
        }
        // SAFETY: both helpers take this program's context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let port = local_port as u16;
        let key = if family == u32::from(AF_INET) {
            PendingKey::v4(netns, local_ip4, port)
        } else {
            PendingKey::v6(netns, local_ip6, port)
        };
        let mut value = *state;
        // SAFETY: helpers without preconditions beyond a valid context.
        value.recorded_ns = unsafe { bpf_ktime_get_ns() };
        // SAFETY: as above.
        value.socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = TG_PENDING.insert(key, value, 0);
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: `sk` is the non-null full socket of this callback.
        let state = unsafe {
            bpf_sk_storage_get(
                storage(),
                sk.cast(),
                core::ptr::null_mut(),
                BPF_SK_STORAGE_GET_F_CREATE,
            )
        }
        .cast::<SockState>();
        if !state.is_null() {
            // SAFETY: non-null storage returned by the kernel for this socket.
            unsafe { (*state).flags |= sock_flags::ACCEPTED };
        }
    }
    1
}

/// The socket-storage map as the helpers want it.
#[inline(always)]
pub(crate) fn storage() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&TG_SOCKETS).cast_mut().cast()
}
