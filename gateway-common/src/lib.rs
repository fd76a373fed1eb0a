//! Types shared by the kernel programs (`gateway-ebpf`) and the daemon (`gateway-user`).
//!
//! Every type is `#[repr(C)]`, built from fixed-width integers with explicit padding and no
//! `bool` or enum fields, and carries a compile-time size assertion: the kernel and user space
//! must agree on the bytes. Pinned maps are adopted only when their type, key size, value size
//! and capacity match these types.
//!
//! Address conventions (the same on both sides):
//! - IPv4 addresses are stored as the `u32` whose in-memory bytes are the address in network
//!   order (what `bpf_sock_addr.user_ip4` holds); see [`ip4_word`].
//! - IPv6 addresses are four such words. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
//!   always normalized to IPv4 before it is stored or used as a key.
//! - Ports are stored in host byte order.
#![no_std]

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

/// Map names, as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const CONFIG: &str = "TG_CONFIG";
    pub const SOCKETS: &str = "TG_SOCKETS";
    pub const ORIGINS: &str = "TG_ORIGINS";
    pub const EVENTS: &str = "TG_EVENTS";
    pub const COUNTERS: &str = "TG_COUNTERS";
    pub const ACCEPTED: &str = "TG_ACCEPTED";
    pub const ROOTS: &str = "TG_ROOTS";
    pub const REFUSED: &str = "TG_REFUSED";
    pub const RECVMSG: &str = "TG_RECVMSG";
    pub const CARRIED: &str = "TG_CARRIED";
    pub const CARRIED_LIVE: &str = "TG_CARRIED_LIVE";
    pub const ALL: [&str; 11] = [
        CONFIG,
        SOCKETS,
        ORIGINS,
        EVENTS,
        COUNTERS,
        ACCEPTED,
        ROOTS,
        REFUSED,
        RECVMSG,
        CARRIED,
        CARRIED_LIVE,
    ];
}

/// Capacities of the bounded maps.
/// Slots of `TG_ORIGINS` (a power of two): a socket's origin lives in slot `cookie % ORIGIN_SLOTS`
/// until a socket with a cookie that many later takes the slot.
pub const ORIGIN_SLOTS: u32 = 65_536;
pub const COUNTERS_MAX_ENTRIES: u32 = 16_384;
pub const ACCEPTED_MAX_ENTRIES: u32 = 16_384;
/// Threads under a root inside `recvmsg` at once.
pub const RECVMSG_MAX_ENTRIES: u32 = 16_384;
/// Connections carried into a root and not settled yet (`TG_CARRIED`).
pub const CARRIED_MAX_ENTRIES: u32 = 4_096;
/// Descriptors of one SCM_RIGHTS message the descriptor watcher looks at: all the kernel
/// passes in one (`SCM_MAX_FD`).
pub const MAX_RIGHTS: u32 = 253;
pub const EVENTS_BYTES: u32 = 256 * 1024;
pub const MAX_RESOLVERS: usize = 4;
/// Enforced roots one daemon may have (`TG_ROOTS`).
pub const ROOTS_MAX_ENTRIES: u32 = 64;
/// How deep the socket guard looks for an enforced root above a cgroup.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Map flags the kernel programs declare, checked when pinned maps are adopted.
pub mod map_flags {
    /// `BPF_F_NO_PREALLOC`.
    pub const NO_PREALLOC: u32 = 1;
    /// `BPF_F_CLONE`: socket storage is copied to the sockets a listener accepts.
    pub const CLONE: u32 = 1 << 9;
    /// `TG_SOCKETS`.
    pub const SOCKETS: u32 = NO_PREALLOC | CLONE;
    /// `BPF_F_MMAPABLE`: the daemon maps `TG_CARRIED_LIVE` into its memory.
    pub const MMAPABLE: u32 = 1 << 10;
}

/// `SockState::flags` bits.
pub mod sock_flags {
    /// A listener under an enforced root, or a connection it accepted (the storage is cloned
    /// to accepted sockets): the passive side, whose replies the egress backstop lets out.
    pub const ACCEPTED: u32 = 2;
}

/// Which hook refused, in [`RefusalEvent::hook`].
pub mod hook {
    pub const SOCK_CREATE: u32 = 1;
    pub const BIND: u32 = 2;
    pub const CONNECT: u32 = 3;
    pub const SENDMSG: u32 = 4;
    pub const EGRESS: u32 = 5;
    /// The socket guard at the cgroup2 root (`connect4|6`).
    pub const GUARD_CONNECT: u32 = 6;
    /// The socket guard at the cgroup2 root (`sendmsg4|6`).
    pub const GUARD_SENDMSG: u32 = 7;
    /// Not a refusal: a task joined a cgroup under an enforced root (raw tracepoint
    /// `cgroup_attach_task`); the daemon then destroys the outbound connections it carried in.
    pub const JOIN: u32 = 8;
    /// Not a refusal: a task under an enforced root was handed a descriptor (SCM_RIGHTS,
    /// `pidfd_getfd`; the syscalls' tracepoints); the daemon settles it as after a join.
    pub const RECEIVED: u32 = 9;
}

/// Why, in [`RefusalEvent::reason`].
pub mod reason {
    /// A socket family/type/protocol other than TCP or UDP on IPv4/IPv6 (raw, ping, SCTP...).
    pub const SOCKET_TYPE: u32 = 1;
    /// Binding the gateway listener's port.
    pub const LISTENER_PORT: u32 = 2;
    /// UDP to anything but an allowed DNS resolver.
    pub const UDP_NOT_DNS: u32 = 3;
    /// A connect straight to the listener that no redirect recorded.
    pub const DIRECT_TO_LISTENER: u32 = 4;
    /// Backstop: a packet neither to the listener, nor allowed DNS, nor a reply on an accepted
    /// connection.
    pub const EGRESS_BACKSTOP: u32 = 5;
    /// The config map is empty: the programs fail closed.
    pub const NO_CONFIG: u32 = 6;
    /// Socket-local storage could not be allocated, so the origin could not be recorded.
    pub const NO_STORAGE: u32 = 7;
    /// A task under an enforced root used a socket created outside every enforced root (made
    /// before the task joined, or handed over by another process).
    pub const FOREIGN_SOCKET: u32 = 8;
}

/// One allowed DNS resolver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolver {
    pub addr: [u32; 4],
    pub port: u16,
    /// `AF_INET`, `AF_INET6`, or 0 for an unused slot.
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Resolver>() == 24);

/// The single entry of the `TG_CONFIG` array: written by the daemon before any program is
/// attached. An all-zero entry (no listener port) makes every program fail closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub listener_ip4: u32,
    pub listener_port: u16,
    pub _pad0: u16,
    pub listener_ip6: [u32; 4],
    /// cgroup id of the gateway's own leaf cgroup: its sockets are never enforced.
    pub gateway_cgroup_id: u64,
    /// Byte offset of `start_boottime` in the kernel's `task_struct`, read from the kernel's
    /// BTF by the daemon; 0 when unknown (then no start time is recorded).
    pub task_start_offset: u32,
    pub resolver_count: u32,
    pub resolvers: [Resolver; MAX_RESOLVERS],
    /// Where the join watcher finds a cgroup's id, its parent and a task's tgid; all zero
    /// when the kernel's BTF did not give them (then no join is reported).
    pub offsets: KernelOffsets,
}
const _: () = assert!(core::mem::size_of::<Config>() == 40 + 24 * MAX_RESOLVERS + 56);

/// Byte offsets of kernel struct members, read from the running kernel's BTF by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct cgroup.kn`.
    pub cgroup_kn: u16,
    /// `struct kernfs_node.id`.
    pub kn_id: u16,
    /// `struct cgroup.self.parent` (`self` opens `struct cgroup`, so the parent's `self` is
    /// the parent cgroup).
    pub cgroup_parent: u16,
    /// `struct css_set.dfl_cgrp` (a task's cgroup on the unified hierarchy).
    pub css_set_dfl_cgrp: u16,
    /// `struct task_struct.tgid`.
    pub task_tgid: u32,
    /// `struct task_struct.real_parent`.
    pub task_real_parent: u16,
    /// `struct task_struct.cgroups` (its `css_set`).
    pub task_cgroups: u16,
    /// Where the descriptor watcher finds a received descriptor's socket; all zero when the
    /// kernel's BTF did not give them (then receipts are reported, not marked).
    pub fds: FdOffsets,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 56);

/// From a task to the socket behind one of its descriptors, and that socket's ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdOffsets {
    /// `struct task_struct.files`.
    pub task_files: u16,
    /// `struct files_struct.fdt`.
    pub files_fdt: u16,
    /// `struct fdtable.max_fds`.
    pub fdt_max_fds: u16,
    /// `struct fdtable.fd`.
    pub fdt_fd: u16,
    /// `struct file.f_inode`.
    pub file_inode: u16,
    /// `struct inode.i_mode`.
    pub inode_mode: u16,
    /// `struct file.private_data` (a socket file's `struct socket`).
    pub file_private_data: u16,
    /// `struct socket.sk`.
    pub socket_sk: u16,
    /// `struct sock.sk_cgrp_data` plus `struct sock_cgroup_data.cgroup`: the cgroup the
    /// socket was created in.
    pub sk_cgroup: u16,
    /// `struct sock_common` members (`struct sock` opens with one).
    pub skc_family: u16,
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    /// `struct sock_common.skc_net` (a `struct net *`).
    pub skc_net: u16,
    /// `struct net.ns` plus `struct ns_common.inum`: the namespace's inode number.
    pub net_inum: u16,
    /// `struct inode.i_ino` (a socket's inode number, as in `socket:[N]`).
    pub inode_ino: u16,
    /// `struct io_kiocb.opcode`, where `struct io_kiocb` opens with its file; 0 when the
    /// kernel has no io_uring (then io_uring receipts are not seen).
    pub kiocb_opcode: u16,
}
const _: () = assert!(core::mem::size_of::<FdOffsets>() == 40);

/// A connection made outside every root and handed to a task under one (`TG_CARRIED`), as its
/// socket holds it: the cgroup the socket was created in, and its ends (addresses as the
/// kernel stores them, ports in host order). The root's egress program drops its packets
/// until the daemon has settled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CarriedKey {
    pub cgroup_id: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<CarriedKey>() == 48);

/// Who received a carried connection, and where its socket lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CarriedMark {
    pub tgid: u32,
    /// Inode number of the socket's network namespace.
    pub netns_inum: u32,
    /// The receiver's cgroup.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` at the receipt.
    pub marked_ns: u64,
    /// The socket's inode number: who holds it is read from the descriptor tables.
    pub inode: u64,
}
const _: () = assert!(core::mem::size_of::<CarriedMark>() == 32);

/// The origin of a redirected socket (`TG_ORIGINS`, in the slot of its cookie): the
/// original destination and who made the connect, as the kernel saw it in the caller's
/// context. In socket-local storage (`TG_SOCKETS`) only `flags` is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub dst_addr: [u32; 4],
    pub dst_port: u16,
    /// Family of the original destination after normalization (mapped IPv6 → `AF_INET`).
    pub dst_family: u16,
    pub flags: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// The connecting thread's `start_boottime` in ns (0 if unknown).
    pub start_boottime_ns: u64,
    /// `bpf_ktime_get_ns()` when the origin was recorded (CLOCK_MONOTONIC).
    pub recorded_ns: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockState>() == 96);

/// The kernel's `struct bpf_spin_lock`. The verifier recognizes it by this name in the map
/// value's BTF, so the type must keep it.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// A slot of `TG_ORIGINS`. connect4/6 write `origin` under `lock`; the daemon reads it with
/// `BPF_F_LOCK`, so it never sees a half-written origin, and accepts it only when
/// `origin.socket_cookie` is the cookie of the client socket it is serving.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginSlot {
    pub lock: bpf_spin_lock,
    pub _pad: u32,
    pub origin: SockState,
}
const _: () = assert!(core::mem::size_of::<OriginSlot>() == 104);

/// The slot of a socket cookie in `TG_ORIGINS`.
#[must_use]
pub const fn origin_slot(socket_cookie: u64) -> u32 {
    (socket_cookie as u32) & (ORIGIN_SLOTS - 1)
}
const _: () = assert!(ORIGIN_SLOTS.is_power_of_two());

/// Key of `TG_ACCEPTED`: connections a server under an enforced root had already accepted
/// when enforcement started, so the egress backstop lets their replies out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcceptedKey {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AcceptedKey>() == 40);

/// Per-cgroup counters in `TG_COUNTERS`, keyed by cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Kernel refusals of this cgroup's sockets.
    pub refused: u64,
    /// Refusals whose event could not be put on the ring buffer (full).
    pub events_lost: u64,
    /// UDP datagrams or connects allowed to a DNS resolver (a known exfiltration channel).
    pub dns_allowed: u64,
    /// Joins and receipts of descriptors (`hook::JOIN`, `hook::RECEIVED`) by processes of
    /// this cgroup whose report could not be put on the ring buffer (full).
    pub reports_lost: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 32);

/// One kernel refusal (or, with `hook::JOIN`, a join), sent through the `TG_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    pub hook: u32,
    pub reason: u32,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    /// Socket type (`SOCK_STREAM`...) where known.
    pub sock_type: u16,
    pub protocol: u16,
    pub ktime_ns: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<RefusalEvent>() == 80);

/// The word an IPv4 address is stored as: its network-order bytes, read natively.
#[must_use]
pub const fn ip4_word(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The four words an IPv6 address is stored as.
#[must_use]
pub const fn ip6_words(octets: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([octets[0], octets[1], octets[2], octets[3]]),
        u32::from_ne_bytes([octets[4], octets[5], octets[6], octets[7]]),
        u32::from_ne_bytes([octets[8], octets[9], octets[10], octets[11]]),
        u32::from_ne_bytes([octets[12], octets[13], octets[14], octets[15]]),
    ]
}

/// Whether the IPv6 words hold `::ffff:a.b.c.d`.
#[must_use]
pub const fn is_v4_mapped(addr: [u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod user {
    use super::{
        AcceptedKey, CarriedKey, CarriedMark, Config, Counters, OriginSlot, RefusalEvent, SockState,
    };

    // SAFETY: each type is `#[repr(C)]`, made only of integers and arrays of integers, with
    // every padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockState {}
    // SAFETY: as above (the lock word is an integer).
    unsafe impl aya::Pod for OriginSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AcceptedKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RefusalEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CarriedKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CarriedMark {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_is_recognized() {
        let mapped = ip6_words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert!(is_v4_mapped(mapped));
        assert_eq!(mapped[3], ip4_word([127, 0, 0, 1]));
        let lo = ip6_words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(!is_v4_mapped(lo));
    }

    #[test]
    fn ip4_word_is_network_order_in_memory() {
        assert_eq!(ip4_word([127, 0, 0, 1]).to_ne_bytes(), [127, 0, 0, 1]);
    }
}
