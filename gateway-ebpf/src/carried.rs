//! Carried connections: a connection made outside every root and handed to a task under one
//! (SCM_RIGHTS, `pidfd_getfd`) met none of the root's programs, and its packets are accounted
//! to the cgroup its socket was created in, so the roots' egress backstop never sees them.
//! The descriptor watcher marks such a socket in the receiving task's own system call, before
//! the call returns (`mark`), and the socket guard's egress program at the cgroup2 root drops
//! every packet of a marked socket (`tg_guard_egress`) until the daemon has settled it
//! (destroyed an outbound connection, kept one a server accepted) and removed the mark.
use aya_ebpf::{
    bindings::bpf_sock,
    cty::c_void,
    helpers::generated::{
        bpf_get_current_task, bpf_ktime_get_ns, bpf_loop, bpf_sk_fullsock, bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use gateway_common::{
    is_v4_mapped, AcceptedKey, CarriedKey, CarriedMark, Config, AF_INET, AF_INET6,
};

use crate::{
    join::{enforced, read},
    maps::{self, TG_ACCEPTED, TG_CARRIED, TG_CARRIED_LIVE},
    ALLOW, DENY,
};

const S_IFMT: u16 = 0o170_000;
const S_IFSOCK: u16 = 0o140_000;
/// Descriptors of a joining process or a child made in a root that are looked at; a
/// connection behind a higher one is only reported (cut by the daemon's settle, not dropped
/// before).
pub(crate) const MAX_WALKED_FDS: u64 = 4096;

/// Marks the socket behind descriptor `fd` of the current task, if it is a connected inet
/// socket created outside every root. True if a mark was made.
#[inline(always)]
pub(crate) fn mark(cfg: &Config, fd: i64, tgid: u32, receiver_cgroup: u64) -> bool {
    if cfg.offsets.fds.task_files == 0 || fd < 0 {
        return false;
    }
    // SAFETY: the helper has no preconditions; the pointer is only read through the probe
    // helper.
    let task = unsafe { bpf_get_current_task() };
    let Some((table, max)) = fd_table(cfg, task) else {
        return false;
    };
    if fd as u64 >= max {
        return false;
    }
    match read::<u64>(table + fd as u64 * 8) {
        Some(file) => mark_file(cfg, file, tgid, receiver_cgroup),
        None => false,
    }
}

/// Marks every connected inet socket created outside every root among the first
/// [`MAX_WALKED_FDS`] descriptors of `task` (a kernel `struct task_struct *`): a process that
/// joined a root, or was made in one by a parent outside. Returns how many were marked.
#[inline(always)]
pub(crate) fn mark_all(cfg: &Config, task: u64, tgid: u32, receiver_cgroup: u64) -> u32 {
    if cfg.offsets.fds.task_files == 0 {
        return 0;
    }
    let Some((table, max)) = fd_table(cfg, task) else {
        return 0;
    };
    let mut walk = Walk {
        table,
        tgid,
        marked: 0,
        receiver_cgroup,
    };
    // One descriptor per call of `walk_one`: the verifier checks the callback once, where an
    // inline loop around the cgroup walk would be too many paths for it.
    // SAFETY: the callback is a static function of this program with the helper's signature,
    // and its context is this stack value, alive for the call.
    unsafe {
        bpf_loop(
            max.min(MAX_WALKED_FDS) as u32,
            walk_one as *mut c_void,
            core::ptr::from_mut(&mut walk).cast(),
            0,
        );
    }
    walk.marked
}

/// The state of one [`mark_all`].
#[repr(C)]
struct Walk {
    table: u64,
    tgid: u32,
    marked: u32,
    receiver_cgroup: u64,
}

/// Looks at descriptor `fd` of a [`Walk`]. Returns 0 to go on.
#[inline(never)]
extern "C" fn walk_one(fd: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `mark_all` handed to bpf_loop.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    let Some(cfg) = maps::config() else {
        return 1;
    };
    let file = read::<u64>(walk.table + fd * 8).unwrap_or(0);
    if file != 0 && mark_file(cfg, file, walk.tgid, walk.receiver_cgroup) {
        walk.marked += 1;
    }
    0
}

/// The descriptor array of `task` and its length.
#[inline(always)]
fn fd_table(cfg: &Config, task: u64) -> Option<(u64, u64)> {
    let o = &cfg.offsets.fds;
    let files = read::<u64>(task + u64::from(o.task_files))?;
    let fdt = read::<u64>(files + u64::from(o.files_fdt))?;
    let max = read::<u32>(fdt + u64::from(o.fdt_max_fds))?;
    let table = read::<u64>(fdt + u64::from(o.fdt_fd))?;
    (table != 0).then_some((table, u64::from(max)))
}

/// Marks the socket of `file` (a kernel `struct file *`), if it is one to mark.
#[inline(always)]
fn mark_file(cfg: &Config, file: u64, tgid: u32, receiver_cgroup: u64) -> bool {
    let o = &cfg.offsets.fds;
    let Some((sk, inode)) = socket_of(cfg, file) else {
        return false;
    };
    let family = read::<u16>(sk + u64::from(o.skc_family)).unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    let cgroup = read::<u64>(sk + u64::from(o.sk_cgroup)).unwrap_or(0);
    // A socket created under a root met its programs; an unreadable one is left to the
    // daemon's settle, which the receipt also asks for.
    if cgroup == 0 || enforced(cfg, cgroup) {
        return false;
    }
    let remote_port = u16::from_be(read::<u16>(sk + u64::from(o.skc_dport)).unwrap_or(0));
    if remote_port == 0 {
        // Not connected: its sends name an address, which the guard judges.
        return false;
    }
    let mut key = CarriedKey {
        cgroup_id: crate::join::cgroup_id(cfg, cgroup),
        local_port: read::<u16>(sk + u64::from(o.skc_num)).unwrap_or(0),
        remote_port,
        family,
        ..CarriedKey::default()
    };
    if family == AF_INET {
        key.local_addr[0] = read::<u32>(sk + u64::from(o.skc_rcv_saddr)).unwrap_or(0);
        key.remote_addr[0] = read::<u32>(sk + u64::from(o.skc_daddr)).unwrap_or(0);
    } else {
        key.local_addr = read::<[u32; 4]>(sk + u64::from(o.skc_v6_rcv_saddr)).unwrap_or([0; 4]);
        key.remote_addr = read::<[u32; 4]>(sk + u64::from(o.skc_v6_daddr)).unwrap_or([0; 4]);
    }
    // Judged as IPv4 when a dual-stack socket holds an IPv4-mapped address, as the daemon
    // and the address programs do.
    let (v4, local, remote) = if family == AF_INET6 && is_v4_mapped(key.remote_addr) {
        (
            true,
            [key.local_addr[3], 0, 0, 0],
            [key.remote_addr[3], 0, 0, 0],
        )
    } else {
        (family == AF_INET, key.local_addr, key.remote_addr)
    };
    let plain = if v4 { AF_INET } else { AF_INET6 };
    if maps::is_listener(cfg, plain, &remote, remote_port)
        || maps::is_resolver(cfg, plain, &remote, remote_port)
    {
        return false;
    }
    // A connection the daemon already settled as accepted by a server under a root (its
    // replies pass the backstop): carrying it on is no escape.
    let accepted = AcceptedKey {
        local_addr: local,
        remote_addr: remote,
        local_port: key.local_port,
        remote_port,
        family: plain,
        _pad: 0,
    };
    if TG_ACCEPTED.get_ptr(&accepted).is_some() {
        return false;
    }
    let net = read::<u64>(sk + u64::from(o.skc_net)).unwrap_or(0);
    let value = CarriedMark {
        tgid,
        netns_inum: if net == 0 {
            0
        } else {
            read::<u32>(net + u64::from(o.net_inum)).unwrap_or(0)
        },
        cgroup_id: receiver_cgroup,
        // SAFETY: the helper has no preconditions.
        marked_ns: unsafe { bpf_ktime_get_ns() },
        inode: read::<u64>(inode + u64::from(o.inode_ino)).unwrap_or(0),
    };
    if TG_CARRIED.insert(&key, &value, 0).is_err() {
        return false;
    }
    // After the insert: the daemon stores 0 before it looks at the map, so either it sees
    // this mark or this store comes after its own.
    if let Some(live) = TG_CARRIED_LIVE.get_ptr_mut(0) {
        // SAFETY: the map's one value, written with a single aligned store. It lands after
        // the insert on x86 (stores are not reordered with stores); a weakly ordered
        // architecture needs an atomic exchange here, which this target's `core` lacks.
        unsafe { core::ptr::write_volatile(live, 1) };
    }
    true
}

/// Whether `file` (a kernel `struct file *`) is a unix socket: the only kind that carries
/// descriptors.
#[inline(always)]
pub(crate) fn is_unix(cfg: &Config, file: u64) -> bool {
    const AF_UNIX: u16 = 1;
    match socket_of(cfg, file) {
        Some((sk, _)) => {
            read::<u16>(sk + u64::from(cfg.offsets.fds.skc_family)).unwrap_or(0) == AF_UNIX
        }
        None => false,
    }
}

/// The `struct sock` behind `file`, and its inode, if it is a socket.
#[inline(always)]
fn socket_of(cfg: &Config, file: u64) -> Option<(u64, u64)> {
    let o = &cfg.offsets.fds;
    if file == 0 {
        return None;
    }
    let inode = read::<u64>(file + u64::from(o.file_inode))?;
    let mode = read::<u16>(inode + u64::from(o.inode_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket = read::<u64>(file + u64::from(o.file_private_data))?;
    let sk = read::<u64>(socket + u64::from(o.socket_sk))?;
    (sk != 0).then_some((sk, inode))
}

/// `cgroup_skb/egress` at the cgroup2 root, so it runs for every socket of the host: drops the
/// packets of a marked socket. Everything else passes (the roots' own backstop judges their
/// sockets).
#[cgroup_skb(egress)]
pub fn tg_guard_egress(ctx: SkBuffContext) -> i32 {
    // Nothing marked: the usual case, one array read per packet.
    match TG_CARRIED_LIVE.get_ptr(0) {
        // SAFETY: the map's one value; the daemon writes it from another CPU.
        Some(live) if unsafe { core::ptr::read_volatile(live) } != 0 => {}
        _ => return ALLOW,
    }
    // SAFETY: the kernel hands a valid `__sk_buff`.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: `sk` is the packet's socket as the kernel exposes it to this program type.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return ALLOW;
    }
    // SAFETY: a full socket returned by the helper.
    let s = unsafe { &*full };
    let family = s.family as u16;
    let mut key = CarriedKey {
        // SAFETY: the helper takes this program's context.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        local_port: s.src_port as u16,
        remote_port: u16::from_be(s.dst_port),
        family,
        ..CarriedKey::default()
    };
    if family == AF_INET {
        key.local_addr[0] = s.src_ip4;
        key.remote_addr[0] = s.dst_ip4;
    } else if family == AF_INET6 {
        // One load per word: the verifier refuses arithmetic on a socket pointer, which a
        // copy of the arrays would make.
        let mut i = 0;
        while i < 4 {
            // SAFETY: in-bounds fields of the full socket.
            unsafe {
                key.local_addr[i] = core::ptr::read_volatile(&s.src_ip6[i]);
                key.remote_addr[i] = core::ptr::read_volatile(&s.dst_ip6[i]);
            }
            i += 1;
        }
    } else {
        return ALLOW;
    }
    if TG_CARRIED.get_ptr(&key).is_some() {
        return DENY;
    }
    ALLOW
}
