//! `cgroup/connect4|6`, in the caller's context: record who connects where under the socket's
//! cookie, then redirect TCP to the gateway listener. UDP may only reach an allowed DNS
//! resolver. An IPv4-mapped IPv6 destination is judged as the IPv4 address it maps.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        },
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use gateway_common::{
    hook, is_v4_mapped, reason, Config, SockState, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    maps,
    refuse::{report, Refusal},
    ALLOW, DENY,
};

/// The destination a connect or send asked for, normalized.
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    pub family: u16,
    pub addr: [u32; 4],
    pub port: u16,
    /// The caller used an AF_INET6 socket with a v4-mapped address.
    pub mapped: bool,
    pub sock_type: u16,
    pub protocol: u16,
}

impl Dest {
    /// Reads the destination from an IPv4 hook's context.
    #[inline(always)]
    pub(crate) fn v4(ctx: &SockAddrContext) -> Self {
        // SAFETY: the kernel hands a valid `bpf_sock_addr` to this program type. Every field is
        // read before any branch (merged context loads are rejected by the verifier).
        let (ip, port, sock_type, protocol) = unsafe {
            let sa = &*ctx.sock_addr;
            (sa.user_ip4, sa.user_port, sa.type_, sa.protocol)
        };
        Self {
            family: AF_INET,
            addr: [ip, 0, 0, 0],
            port: u16::from_be(port as u16),
            mapped: false,
            sock_type: sock_type as u16,
            protocol: protocol as u16,
        }
    }

    /// Reads the destination from an IPv6 hook's context, normalizing v4-mapped addresses.
    #[inline(always)]
    pub(crate) fn v6(ctx: &SockAddrContext) -> Self {
        // SAFETY: as in `v4`.
        let (ip, port, sock_type, protocol) = unsafe {
            let sa = &*ctx.sock_addr;
            (sa.user_ip6, sa.user_port, sa.type_, sa.protocol)
        };
        let mapped = is_v4_mapped(ip);
        Self {
            family: if mapped { AF_INET } else { AF_INET6 },
            addr: if mapped { [ip[3], 0, 0, 0] } else { ip },
            port: u16::from_be(port as u16),
            mapped,
            sock_type: sock_type as u16,
            protocol: protocol as u16,
        }
    }

    #[inline(always)]
    pub(crate) fn refusal(&self, hook: u32, reason: u32, cgroup_id: u64) -> Refusal {
        Refusal {
            hook,
            reason,
            cgroup_id,
            family: self.family,
            addr: self.addr,
            port: self.port,
            sock_type: self.sock_type,
            protocol: self.protocol,
            in_task: true,
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn tg_connect4(ctx: SockAddrContext) -> i32 {
    let dest = Dest::v4(&ctx);
    noted(&ctx, on_connect(&ctx, &dest, false))
}

#[cgroup_sock_addr(connect6)]
pub fn tg_connect6(ctx: SockAddrContext) -> i32 {
    let dest = Dest::v6(&ctx);
    noted(&ctx, on_connect(&ctx, &dest, true))
}

/// Passes `verdict` through, noting a refusal for the socket guard (see `guard.rs`).
#[inline(always)]
pub(crate) fn noted(ctx: &SockAddrContext, verdict: i32) -> i32 {
    if verdict == DENY {
        // SAFETY: the helper takes this program's context.
        maps::note_refused(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
    }
    verdict
}

/// The decision for UDP (connect or send with an address): DNS to a resolver, or nothing.
#[inline(always)]
pub(crate) fn udp_verdict(cfg: &Config, dest: &Dest, hook: u32, cgroup_id: u64) -> i32 {
    if maps::is_resolver(cfg, dest.family, &dest.addr, dest.port) {
        maps::count_dns(cgroup_id);
        return ALLOW;
    }
    report(&dest.refusal(hook, reason::UDP_NOT_DNS, cgroup_id));
    DENY
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, dest: &Dest, v6_socket: bool) -> i32 {
    let cgroup_id = maps::current_cgroup();
    let Some(cfg) = maps::config() else {
        report(&dest.refusal(hook::CONNECT, reason::NO_CONFIG, cgroup_id));
        return DENY;
    };
    if cfg.gateway_cgroup_id == cgroup_id {
        return ALLOW;
    }
    if dest.protocol == IPPROTO_UDP {
        return udp_verdict(cfg, dest, hook::CONNECT, cgroup_id);
    }
    if dest.protocol != IPPROTO_TCP {
        report(&dest.refusal(hook::CONNECT, reason::SOCKET_TYPE, cgroup_id));
        return DENY;
    }
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if maps::is_listener(cfg, dest.family, &dest.addr, dest.port) {
        // A nested root already redirected this connect: its origin stands. Anything else
        // aimed at the listener is direct.
        if maps::origin_of(cookie).is_some() {
            return ALLOW;
        }
        report(&dest.refusal(hook::CONNECT, reason::DIRECT_TO_LISTENER, cgroup_id));
        return DENY;
    }
    let origin = origin(ctx, cfg, dest, cgroup_id, cookie);
    if !maps::record_origin(&origin) {
        report(&dest.refusal(hook::CONNECT, reason::NO_STORAGE, cgroup_id));
        return DENY;
    }
    redirect(ctx, cfg, dest, v6_socket);
    ALLOW
}

/// Who connects where, as the kernel sees it in the caller's context.
#[inline(always)]
fn origin(
    ctx: &SockAddrContext,
    cfg: &Config,
    dest: &Dest,
    cgroup_id: u64,
    socket_cookie: u64,
) -> SockState {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    SockState {
        dst_addr: dest.addr,
        dst_port: dest.port,
        dst_family: dest.family,
        flags: 0,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id,
        // SAFETY: the helper takes this program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        socket_cookie,
        start_boottime_ns: task_start_boottime(cfg),
        // SAFETY: no preconditions.
        recorded_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// The current thread's `start_boottime`, through the offset the daemon read from BTF.
#[inline(always)]
fn task_start_boottime(cfg: &Config) -> u64 {
    let offset = cfg.task_start_offset;
    if offset == 0 || offset > 16384 {
        return 0;
    }
    // SAFETY: reading kernel memory through the probe helper, which fails safely.
    unsafe {
        let task = bpf_get_current_task();
        if task == 0 {
            return 0;
        }
        bpf_probe_read_kernel((task + u64::from(offset)) as *const u64).unwrap_or(0)
    }
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, cfg: &Config, dest: &Dest, v6_socket: bool) {
    let port = u32::from(cfg.listener_port.to_be());
    // SAFETY: writing the user address fields is what these hooks are for.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        if !v6_socket {
            sa.user_ip4 = cfg.listener_ip4;
        } else if dest.mapped {
            sa.user_ip6[0] = 0;
            sa.user_ip6[1] = 0;
            sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            sa.user_ip6[3] = cfg.listener_ip4;
        } else {
            sa.user_ip6[0] = cfg.listener_ip6[0];
            sa.user_ip6[1] = cfg.listener_ip6[1];
            sa.user_ip6[2] = cfg.listener_ip6[2];
            sa.user_ip6[3] = cfg.listener_ip6[3];
        }
        sa.user_port = port;
    }
}
