//! `cgroup_skb/egress`: the backstop. Whatever slipped past the socket hooks (a socket created
//! before enforcement started, a raw socket made earlier) is dropped unless it goes to the
//! listener, is DNS to an allowed resolver, or belongs to a connection a server under the root
//! accepted (a listener is marked when it answers a SYN, and the mark is cloned to every socket
//! it accepts; connections accepted before enforcement started are recorded by the daemon).
use aya_ebpf::{
    bindings::{bpf_sock, BPF_TCP_LISTEN},
    helpers::generated::{bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use gateway_common::{
    hook, reason, sock_flags, AcceptedKey, SockState, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    maps::{self, TG_ACCEPTED, TG_SOCKETS},
    refuse::{report, Refusal},
    ALLOW, DENY,
};

const ETH_P_IP: u16 = 0x0800;
const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;
const ETH_P_IPV6: u16 = 0x86DD;

/// What the backstop needs from a packet's headers.
struct Packet {
    family: u16,
    protocol: u16,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
}

#[cgroup_skb(egress)]
pub fn tg_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the kernel hands a valid `__sk_buff`; read the fields before branching.
    let (ethertype, sk) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.protocol, skb.__bindgen_anon_2.sk)
    };
    // SAFETY: the helper takes this program's context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(cfg) = maps::config() else {
        return DENY;
    };
    if cfg.gateway_cgroup_id == cgroup_id {
        return ALLOW;
    }
    let Some(pkt) = parse(&ctx, u16::from_be(ethertype as u16)) else {
        return refuse(cgroup_id, None);
    };
    match pkt.protocol {
        IPPROTO_TCP => {
            if maps::is_listener(cfg, pkt.family, &pkt.dst, pkt.dport) || is_accepted(sk, &pkt) {
                return ALLOW;
            }
        }
        IPPROTO_UDP => {
            if maps::is_resolver(cfg, pkt.family, &pkt.dst, pkt.dport) {
                return ALLOW;
            }
        }
        _ => {}
    }
    refuse(cgroup_id, Some(&pkt))
}

#[inline(always)]
fn refuse(cgroup_id: u64, pkt: Option<&Packet>) -> i32 {
    let (family, addr, port, protocol) = pkt.map_or((0, [0; 4], 0, 0), |p| {
        (p.family, p.dst, p.dport, p.protocol)
    });
    report(&Refusal {
        hook: hook::EGRESS,
        reason: reason::EGRESS_BACKSTOP,
        cgroup_id,
        family,
        addr,
        port,
        sock_type: 0,
        protocol,
        in_task: false,
    });
    DENY
}

/// Whether a TCP packet belongs to a listener (SYN-ACK) or to a connection a server accepted.
#[inline(always)]
fn is_accepted(sk: *mut bpf_sock, pkt: &Packet) -> bool {
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the packet's socket as the kernel exposes it to this program type.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    // SAFETY: a full socket returned by the helper.
    let state = unsafe { (*full).state };
    if state == BPF_TCP_LISTEN {
        // A SYN-ACK. Mark the listener: the sockets it accepts inherit the mark (BPF_F_CLONE).
        // SAFETY: `full` is a full socket; the storage is created if missing.
        let st = unsafe {
            bpf_sk_storage_get(
                TG_SOCKETS.as_ptr(),
                full.cast(),
                core::ptr::null_mut(),
                BPF_SK_STORAGE_GET_F_CREATE,
            )
        }
        .cast::<SockState>();
        if !st.is_null() {
            // SAFETY: non-null storage returned by the kernel for this socket.
            unsafe { (*st).flags |= sock_flags::ACCEPTED };
        }
        return true;
    }
    // SAFETY: `full` is a full socket; no creation.
    let st =
        unsafe { bpf_sk_storage_get(TG_SOCKETS.as_ptr(), full.cast(), core::ptr::null_mut(), 0) }
            .cast::<SockState>();
    // SAFETY: non-null storage returned by the kernel.
    if !st.is_null() && unsafe { (*st).flags } & sock_flags::ACCEPTED != 0 {
        return true;
    }
    let key = AcceptedKey {
        local_addr: pkt.src,
        remote_addr: pkt.dst,
        local_port: pkt.sport,
        remote_port: pkt.dport,
        family: pkt.family,
        _pad: 0,
    };
    TG_ACCEPTED.get_ptr(key).is_some()
}

#[inline(always)]
fn parse(ctx: &SkBuffContext, ethertype: u16) -> Option<Packet> {
    if ethertype == ETH_P_IP {
        // One load for the fixed header, one for the ports: each load is a helper call.
        let hdr: [u32; 5] = ctx.load(0).ok()?;
        let [vihl, _, _, _] = hdr[0].to_ne_bytes();
        let [_, protocol, _, _] = hdr[2].to_ne_bytes();
        let l4 = usize::from(vihl & 0x0f) * 4;
        let (sport, dport) = ports(ctx, l4, protocol);
        Some(Packet {
            family: AF_INET,
            protocol: u16::from(protocol),
            src: [hdr[3], 0, 0, 0],
            dst: [hdr[4], 0, 0, 0],
            sport,
            dport,
        })
    } else if ethertype == ETH_P_IPV6 {
        let hdr: [u32; 10] = ctx.load(0).ok()?;
        let [_, _, protocol, _] = hdr[1].to_ne_bytes();
        let (sport, dport) = ports(ctx, 40, protocol);
        Some(Packet {
            family: AF_INET6,
            protocol: u16::from(protocol),
            src: [hdr[2], hdr[3], hdr[4], hdr[5]],
            dst: [hdr[6], hdr[7], hdr[8], hdr[9]],
            sport,
            dport,
        })
    } else {
        None
    }
}

#[inline(always)]
fn ports(ctx: &SkBuffContext, l4: usize, protocol: u8) -> (u16, u16) {
    if u16::from(protocol) != IPPROTO_TCP && u16::from(protocol) != IPPROTO_UDP {
        return (0, 0);
    }
    if l4 < 20 || l4 > 60 {
        return (0, 0);
    }
    let Ok(ports) = ctx.load::<[u16; 2]>(l4) else {
        return (0, 0);
    };
    (u16::from_be(ports[0]), u16::from_be(ports[1]))
}
