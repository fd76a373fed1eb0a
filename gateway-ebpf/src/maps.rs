//! The maps shared with the daemon. Layouts live in `gateway_common`.
use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_spin_lock},
    btf_maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    helpers::generated::{bpf_spin_lock, bpf_spin_unlock},
    macros::btf_map,
};
use gateway_common::{
    map_flags, origin_slot, AcceptedKey, CarriedKey, CarriedMark, Config, Counters, OriginSlot,
    RefusalEvent, SockState, ACCEPTED_MAX_ENTRIES, CARRIED_MAX_ENTRIES, COUNTERS_MAX_ENTRIES,
    EVENTS_BYTES, ORIGIN_SLOTS, RECVMSG_MAX_ENTRIES, ROOTS_MAX_ENTRIES,
};

/// Listener address, gateway cgroup, resolvers. Written by the daemon before attaching.
#[btf_map]
pub(crate) static TG_CONFIG: Array<Config, 1> = Array::new();

/// Socket-local flags (listeners and what they accept), freed with the socket and cloned to
/// accepted sockets. Only the passive side allocates it: the connect path never does.
#[btf_map]
pub(crate) static TG_SOCKETS: ClonedSkStorage<SockState> = ClonedSkStorage::new();

/// Origins of redirected connections, in the slot of the client socket's cookie (cookies are
/// unique for the kernel's lifetime, across namespaces, and handed out in sequence, so a slot is
/// reused only after that many newer sockets). An array: recording an origin allocates and
/// evicts nothing. Each slot has a spin lock; the daemon reads under it.
#[btf_map]
pub(crate) static TG_ORIGINS: Array<OriginSlot, { ORIGIN_SLOTS as usize }> = Array::new();

/// Kernel refusals for the daemon's audit log.
#[btf_map]
pub(crate) static TG_EVENTS: RingBuf<RefusalEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Per-cgroup refusal and DNS counters, so a flood is audited as a count.
#[btf_map]
pub(crate) static TG_COUNTERS: LruPerCpuHashMap<u64, Counters, { COUNTERS_MAX_ENTRIES as usize }> =
    LruPerCpuHashMap::new();

/// Connections a server had accepted before enforcement started (filled by the daemon).
#[btf_map]
pub(crate) static TG_ACCEPTED: HashMap<AcceptedKey, u8, { ACCEPTED_MAX_ENTRIES as usize }> =
    HashMap::new();

/// The enforced roots' cgroup ids (value unused): the socket guard judges the calling task
/// by them, since it runs for every task on the host.
#[btf_map]
pub(crate) static TG_ROOTS: HashMap<u64, u8, { ROOTS_MAX_ENTRIES as usize }> = HashMap::new();

/// The control buffer (address, length) of a `recvmsg` in progress by a thread under a root,
/// by thread: the descriptor watcher reads it at the call's exit. LRU: a thread that dies
/// inside the call leaves an entry that ages out.
#[btf_map]
pub(crate) static TG_RECVMSG: LruHashMap<u64, [u64; 2], { RECVMSG_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Connections made outside every root and handed to a task under one, marked by the
/// descriptor watcher at the receipt; the guard's egress program drops their packets until the
/// daemon has settled them and removed the mark. Not LRU: a mark is never evicted; when the
/// map is full the receipt is only reported.
#[btf_map]
pub(crate) static TG_CARRIED: HashMap<CarriedKey, CarriedMark, { CARRIED_MAX_ENTRIES as usize }> =
    HashMap::new();

/// Nonzero while `TG_CARRIED` may hold a mark: set by the watchers after each mark, cleared by
/// the daemon only when it finds the map empty after clearing (it stores 0, then looks at the
/// map, and stores 1 again if a mark is there). Lets the guard's egress program skip the
/// lookup on the host's every packet while nothing is marked.
#[btf_map]
pub(crate) static TG_CARRIED_LIVE: Array<u64, 1, { map_flags::MMAPABLE as usize }> = Array::new();

/// The cookie of the last socket a root's address program refused on this CPU. The guard at
/// the cgroup2 root runs after it in the same call and so does not report it twice.
#[btf_map]
pub(crate) static TG_REFUSED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// A socket-storage map definition with `BPF_F_CLONE` (aya-ebpf's `SkStorage` fixes its flags
/// to `BPF_F_NO_PREALLOC`). Same BTF shape as every map definition: the loader reads the type,
/// key, value, capacity and flags from the pointee types.
#[repr(C)]
pub(crate) struct ClonedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; map_flags::SOCKETS as usize],
}

// SAFETY: the fields are placeholders for the loader and never dereferenced.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    pub(crate) const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The map as the storage helpers want it.
    #[inline(always)]
    pub(crate) fn as_ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// Records `origin` in the slot of its socket cookie. False if the slot is unavailable.
#[inline(always)]
pub(crate) fn record_origin(origin: &SockState) -> bool {
    let Some(slot) = TG_ORIGINS.get_ptr_mut(origin_slot(origin.socket_cookie)) else {
        return false;
    };
    // SAFETY: `slot` points into the map's value for this program's lifetime. The origin is
    // copied under the slot's lock (plain stores only while it is held).
    unsafe {
        let lock = core::ptr::addr_of_mut!((*slot).lock).cast::<bpf_spin_lock>();
        bpf_spin_lock(lock);
        (*slot).origin = *origin;
        bpf_spin_unlock(lock);
    }
    true
}

/// The origin recorded for the socket with `cookie`, if its slot still holds it.
#[inline(always)]
pub(crate) fn origin_of(cookie: u64) -> Option<SockState> {
    let slot = TG_ORIGINS.get_ptr_mut(origin_slot(cookie))?;
    // SAFETY: as in `record_origin`; the copy is taken under the lock.
    let origin = unsafe {
        let lock = core::ptr::addr_of_mut!((*slot).lock).cast::<bpf_spin_lock>();
        bpf_spin_lock(lock);
        let origin = (*slot).origin;
        bpf_spin_unlock(lock);
        origin
    };
    (cookie != 0 && origin.socket_cookie == cookie).then_some(origin)
}

/// Notes that a root's program refused the call on the socket with `cookie`.
#[inline(always)]
pub(crate) fn note_refused(cookie: u64) {
    if let Some(slot) = TG_REFUSED.get_ptr_mut(0) {
        // SAFETY: this CPU's copy of a live map value.
        unsafe { *slot = cookie };
    }
}

/// Whether the last refusal on this CPU was for the socket with `cookie`.
#[inline(always)]
pub(crate) fn refused_here(cookie: u64) -> bool {
    TG_REFUSED
        .get(0)
        .is_some_and(|c| *c == cookie && cookie != 0)
}

/// The configuration, or `None` when the daemon has not written it (callers fail closed).
#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    let cfg = TG_CONFIG.get(0)?;
    if cfg.listener_port == 0 {
        None
    } else {
        Some(cfg)
    }
}

/// Whether `addr:port` of `family` is an allowed DNS resolver.
#[inline(always)]
pub(crate) fn is_resolver(cfg: &Config, family: u16, addr: &[u32; 4], port: u16) -> bool {
    let mut i = 0;
    while i < gateway_common::MAX_RESOLVERS {
        let r = &cfg.resolvers[i];
        if r.family == family && r.port == port {
            let same = if family == gateway_common::AF_INET {
                r.addr[0] == addr[0]
            } else {
                r.addr[0] == addr[0]
                    && r.addr[1] == addr[1]
                    && r.addr[2] == addr[2]
                    && r.addr[3] == addr[3]
            };
            if same {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether `addr:port` is the gateway listener.
#[inline(always)]
pub(crate) fn is_listener(cfg: &Config, family: u16, addr: &[u32; 4], port: u16) -> bool {
    if port != cfg.listener_port {
        return false;
    }
    if family == gateway_common::AF_INET {
        addr[0] == cfg.listener_ip4
    } else {
        addr[0] == cfg.listener_ip6[0]
            && addr[1] == cfg.listener_ip6[1]
            && addr[2] == cfg.listener_ip6[2]
            && addr[3] == cfg.listener_ip6[3]
    }
}

/// Counts one allowed DNS datagram or connect of the current cgroup.
#[inline(always)]
pub(crate) fn count_dns(cgroup_id: u64) {
    crate::refuse::bump(cgroup_id, |c| &mut c.dns_allowed);
}

/// The cgroup of the current task.
#[inline(always)]
pub(crate) fn current_cgroup() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() }
}
