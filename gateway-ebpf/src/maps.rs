//! The maps shared with the daemon. Layouts live in `gateway_common`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, RingBuf, SkStorage},
    macros::btf_map,
};
use gateway_common::{
    AcceptedKey, Config, Counters, PendingKey, RefusalEvent, SockState, ACCEPTED_MAX_ENTRIES,
    COUNTERS_MAX_ENTRIES, EVENTS_BYTES, PENDING_MAX_ENTRIES,
};

/// Listener address, gateway cgroup, resolvers. Written by the daemon before attaching.
#[btf_map]
pub(crate) static TG_CONFIG: Array<Config, 1> = Array::new();

/// Per-socket origin, freed with the socket.
#[btf_map]
pub(crate) static TG_SOCKETS: SkStorage<SockState> = SkStorage::new();

/// Origins waiting for the listener's accept, keyed by the client end of the connection.
#[btf_map]
pub(crate) static TG_PENDING: LruHashMap<PendingKey, SockState, { PENDING_MAX_ENTRIES as usize }> =
    LruHashMap::new();

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
