//! Loading the kernel programs, pinning them in bpffs, attaching them at the enforced roots
//! (or adopting what a previous run pinned), and removing everything for uninstall.
//!
//! Pin layout under the pin directory:
//! `maps/<MAP>` for every map, `links/<root>/<program>` for every attachment, where `<root>`
//! is the root's cgroup path escaped for bpffs (see [`links_dir`]), and `links/guard/<program>`
//! for the socket guard's programs, which attach once, at the cgroup2 root.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapInfo, MapType, PerCpuHashMap, RingBuf},
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use gateway_common::{
    map_names, AcceptedKey, CarriedKey, CarriedMark, Config as KernelConfig, Counters, OriginSlot,
    SockState,
};

use crate::{bpf_sys, cgroup::CgroupPath};

/// The kernel object built by `cargo xtask build-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this tollgate was built with a stub kernel object (TOLLGATE_EBPF_STUB=1): run `cargo xtask build-ebpf` and rebuild")]
    Stub,
    #[error("cannot load the kernel programs: {0} (is this a kernel with BPF, BTF and cgroup BPF, and are we root?)")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "cannot attach {name} to the tracepoint {tracepoint}: {source}: {}",
        watcher_hint(.tracepoint)
    )]
    Watcher {
        name: &'static str,
        tracepoint: String,
        source: aya::programs::ProgramError,
    },
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} has a different layout ({found}) than this build expects ({expected}): \
         run `tollgate uninstall` with the old version's config, then start again"
    )]
    MapLayout {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpf query: {0}")]
    Query(#[source] std::io::Error),
}

/// What a watcher that cannot attach at `tracepoint` needs from the kernel.
fn watcher_hint(tracepoint: &str) -> &'static str {
    if tracepoint.starts_with("raw ") {
        "the join watcher needs raw tracepoint programs (kernel 4.17 or later) and the \
         cgroup_attach_task tracepoint"
    } else {
        "the descriptor watcher needs syscall tracepoints (CONFIG_FTRACE_SYSCALLS) and tracefs \
         (mounted at /sys/kernel/tracing or /sys/kernel/debug/tracing)"
    }
}

/// The socket guard's programs (attached at the cgroup2 root), with their attach types.
pub const GUARD_PROGRAMS: [(&str, u32); 5] = [
    ("tg_guard_connect4", 10),
    ("tg_guard_connect6", 11),
    ("tg_guard_sendmsg4", 14),
    ("tg_guard_sendmsg6", 15),
    ("tg_guard_egress", 1),
];

/// Where a watcher attaches.
#[derive(Clone, Copy, Debug)]
pub enum Watch {
    /// A raw tracepoint.
    Raw(&'static str),
    /// A raw tracepoint of a subsystem the kernel may lack (io_uring): without it, nothing
    /// there to watch.
    RawIfPresent(&'static str),
    /// A system call's tracepoint (category `syscalls`).
    Syscall(&'static str),
}

/// The watchers, attached with the guard: the join watcher (`join.rs` in gateway-ebpf) and the
/// descriptor watcher (`received.rs`).
pub const WATCHERS: [(&str, Watch); 8] = [
    ("tg_join", Watch::Raw("cgroup_attach_task")),
    (
        "tg_uring_complete",
        Watch::RawIfPresent("io_uring_complete"),
    ),
    ("tg_recvmsg_enter", Watch::Syscall("sys_enter_recvmsg")),
    ("tg_recvmsg_exit", Watch::Syscall("sys_exit_recvmsg")),
    ("tg_recvmmsg_enter", Watch::Syscall("sys_enter_recvmmsg")),
    ("tg_recvmmsg_exit", Watch::Syscall("sys_exit_recvmmsg")),
    (
        "tg_pidfd_getfd_exit",
        Watch::Syscall("sys_exit_pidfd_getfd"),
    ),
    ("tg_clone3_exit", Watch::Syscall("sys_exit_clone3")),
];

/// How a program attaches.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SockCreate,
    Addr,
    Egress,
}

/// Every program, with its kernel attach type (for queries).
pub const PROGRAMS: [(&str, u32); 10] = [
    ("tg_sock_create", 2),
    ("tg_bind4", 8),
    ("tg_bind6", 9),
    ("tg_connect4", 10),
    ("tg_connect6", 11),
    ("tg_sendmsg4", 14),
    ("tg_sendmsg6", 15),
    ("tg_getpeername4", 29),
    ("tg_getpeername6", 30),
    ("tg_egress", 1),
];

fn hook_of(name: &str) -> Hook {
    match name {
        "tg_sock_create" => Hook::SockCreate,
        "tg_egress" | "tg_guard_egress" => Hook::Egress,
        _ => Hook::Addr,
    }
}

/// (type, key size, value size, max entries, flags) each pinned map must have.
fn expected_layout(name: &str) -> Option<(MapType, u32, u32, u32, u32)> {
    use core::mem::size_of;
    use gateway_common::map_flags;
    let s = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(match name {
        map_names::CONFIG => (MapType::Array, 4, s(size_of::<KernelConfig>()), 1, 0),
        map_names::SOCKETS => (
            MapType::SkStorage,
            4,
            s(size_of::<SockState>()),
            0,
            map_flags::SOCKETS,
        ),
        map_names::ORIGINS => (
            MapType::Array,
            4,
            s(size_of::<OriginSlot>()),
            gateway_common::ORIGIN_SLOTS,
            0,
        ),
        map_names::EVENTS => (MapType::RingBuf, 0, 0, gateway_common::EVENTS_BYTES, 0),
        map_names::COUNTERS => (
            MapType::LruPerCpuHash,
            8,
            s(size_of::<Counters>()),
            gateway_common::COUNTERS_MAX_ENTRIES,
            0,
        ),
        map_names::ACCEPTED => (
            MapType::Hash,
            s(size_of::<AcceptedKey>()),
            1,
            gateway_common::ACCEPTED_MAX_ENTRIES,
            0,
        ),
        map_names::ROOTS => (MapType::Hash, 8, 1, gateway_common::ROOTS_MAX_ENTRIES, 0),
        map_names::REFUSED => (MapType::PerCpuArray, 4, 8, 1, 0),
        map_names::RECVMSG => (
            MapType::LruHash,
            8,
            16,
            gateway_common::RECVMSG_MAX_ENTRIES,
            0,
        ),
        map_names::CARRIED => (
            MapType::Hash,
            s(size_of::<CarriedKey>()),
            s(size_of::<CarriedMark>()),
            gateway_common::CARRIED_MAX_ENTRIES,
            0,
        ),
        map_names::CARRIED_LIVE => (MapType::Array, 4, 8, 1, map_flags::MMAPABLE),
        _ => return None,
    })
}

/// What happened to one program at one root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached,
    Adopted,
    Replaced,
}

/// The loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

/// The maps the daemon uses at run time.
pub struct RuntimeMaps {
    pub origins: Array<MapData, OriginSlot>,
    pub events: RingBuf<MapData>,
    pub counters: PerCpuHashMap<MapData, u64, Counters>,
    pub accepted: HashMap<MapData, AcceptedKey, u8>,
    pub carried: HashMap<MapData, CarriedKey, CarriedMark>,
    pub carried_live: LiveFlag,
}

/// `TG_CARRIED_LIVE`'s one value, mapped into this process: the guard's egress program reads
/// it on every packet, the watchers set it after each mark.
pub struct LiveFlag {
    value: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    _map: MapData,
}

// SAFETY: the mapping is shared memory made for atomic access and lives as long as the map.
unsafe impl Send for LiveFlag {}
// SAFETY: as above; every access is atomic.
unsafe impl Sync for LiveFlag {}

impl LiveFlag {
    fn map(map: MapData) -> std::io::Result<Self> {
        use std::os::fd::{AsFd, AsRawFd};
        // SAFETY: maps the first page of an mmapable array map (its one 8-byte value) shared;
        // the result is checked.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let value = std::ptr::NonNull::new(at.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { value, _map: map })
    }

    fn value(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: a live, aligned mapping of the value for as long as `self`.
        unsafe { self.value.as_ref() }
    }

    /// Clears the flag when no mark is there: while `any_mark` says one is, the flag is left
    /// set; otherwise it stores 0, then (after a full fence) asks again and stores 1 if a mark
    /// came meanwhile. A watcher stores 1 after inserting its mark, so either the second
    /// look sees the mark or the watcher's store lands after ours. The flag is 0 only while
    /// the map is empty, but for that moment.
    pub fn clear_unless(&self, any_mark: impl Fn() -> bool) {
        use std::sync::atomic::Ordering::SeqCst;
        if any_mark() {
            return;
        }
        self.value().store(0, SeqCst);
        std::sync::atomic::fence(SeqCst);
        if any_mark() {
            self.value().store(1, SeqCst);
        }
    }
}

impl Drop for LiveFlag {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.value.as_ptr().cast(), 4096) };
    }
}

pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// bpffs refuses names with dots, so a root's path is escaped: `_` → `__`, `/` → `_s`,
/// `.` → `_d` (reversible, so two roots never share a directory).
pub fn links_dir(pin_dir: &Path, root: &CgroupPath) -> PathBuf {
    let mut name = String::new();
    for c in root.as_str().chars() {
        match c {
            '_' => name.push_str("__"),
            '/' => name.push_str("_s"),
            '.' => name.push_str("_d"),
            c => name.push(c),
        }
    }
    pin_dir.join("links").join(name)
}

impl Kernel {
    /// Loads the object, reusing pinned maps (after checking their layout) or pinning new ones,
    /// and loads every program into the kernel (nothing is attached yet).
    pub fn load(pin_dir: &Path) -> Result<Self, EbpfError> {
        if cfg!(ebpf_stub) || OBJECT.is_empty() {
            return Err(EbpfError::Stub);
        }
        let maps = maps_dir(pin_dir);
        std::fs::create_dir_all(&maps).map_err(|source| EbpfError::Pin {
            path: maps.clone(),
            source,
        })?;
        for name in map_names::ALL {
            check_pinned_layout(&maps.join(name), name)?;
        }
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> =
            map_names::ALL.iter().map(|n| (*n, maps.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        for (name, _) in PROGRAMS.iter().chain(&GUARD_PROGRAMS) {
            let name = *name;
            let program = ebpf.program_mut(name).ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            let result = match hook_of(name) {
                Hook::SockCreate => <&mut CgroupSock>::try_from(program).and_then(CgroupSock::load),
                Hook::Addr => {
                    <&mut CgroupSockAddr>::try_from(program).and_then(CgroupSockAddr::load)
                }
                Hook::Egress => <&mut CgroupSkb>::try_from(program).and_then(CgroupSkb::load),
            };
            result.map_err(|source| EbpfError::Program { name, source })?;
        }
        for (name, watch) in WATCHERS {
            let err = |source| EbpfError::Program { name, source };
            let program = ebpf.program_mut(name).ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            match watch {
                Watch::Raw(_) | Watch::RawIfPresent(_) => {
                    <&mut RawTracePoint>::try_from(program).and_then(RawTracePoint::load)
                }
                Watch::Syscall(_) => {
                    <&mut TracePoint>::try_from(program).and_then(TracePoint::load)
                }
            }
            .map_err(err)?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Writes the single config entry the programs read.
    pub fn write_config(&mut self, cfg: &KernelConfig) -> Result<(), EbpfError> {
        let map = self.ebpf.map_mut(map_names::CONFIG).ok_or(EbpfError::Map {
            name: map_names::CONFIG,
            source: aya::maps::MapError::InvalidName {
                name: map_names::CONFIG.into(),
            },
        })?;
        let mut array: Array<&mut MapData, KernelConfig> =
            Array::try_from(map).map_err(|source| EbpfError::Map {
                name: map_names::CONFIG,
                source,
            })?;
        array.set(0, cfg, 0).map_err(|source| EbpfError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// Replaces the enforced roots the socket guard knows with the cgroups of `roots`.
    pub fn set_roots(
        &mut self,
        cgroup_mount: &Path,
        roots: &[CgroupPath],
    ) -> Result<(), EbpfError> {
        let mut ids = Vec::new();
        for root in roots {
            let dir = root.dir(cgroup_mount);
            let id = crate::cgroup::cgroup_id(&dir).map_err(|e| EbpfError::Cgroup {
                path: dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            ids.push(id);
        }
        let name = map_names::ROOTS;
        let m = move |source| EbpfError::Map { name, source };
        let map = self.ebpf.map_mut(name).ok_or(EbpfError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let mut map: HashMap<&mut MapData, u64, u8> = HashMap::try_from(map).map_err(m)?;
        for id in &ids {
            map.insert(id, 1, 0).map_err(m)?;
        }
        // A pinned map may still hold the roots of an earlier configuration.
        let stale: Vec<u64> = map.keys().flatten().filter(|k| !ids.contains(k)).collect();
        for id in stale {
            map.remove(&id).map_err(m)?;
        }
        Ok(())
    }

    /// Makes sure the socket guard is attached exactly once at the cgroup2 root (adopting or
    /// replacing what an earlier run pinned, as [`Kernel::enforce`] does at a root).
    pub fn guard(
        &mut self,
        cgroup_mount: &Path,
    ) -> Result<BTreeMap<&'static str, AttachOutcome>, EbpfError> {
        let links = self.pin_dir.join("links").join("guard");
        let outcomes = self.attach_set(cgroup_mount, &links, &GUARD_PROGRAMS)?;
        // A watcher has no cgroup to compare a pin against: always a fresh link, pinned over
        // the old one (two watchers for a moment only report an event twice).
        for (name, watch) in WATCHERS {
            let err = |source| EbpfError::Program { name, source };
            let program = self.ebpf.program_mut(name).ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            let link = match watch {
                Watch::RawIfPresent(tracepoint) => {
                    let tp: &mut RawTracePoint = program.try_into().map_err(err)?;
                    match tp.attach(tracepoint) {
                        Ok(id) => FdLink::from(tp.take_link(id).map_err(err)?),
                        Err(e) => {
                            tracing::warn!(name, tracepoint, error = %e, "watcher not attached: the kernel lacks its tracepoint");
                            continue;
                        }
                    }
                }
                Watch::Raw(tracepoint) => {
                    let tp: &mut RawTracePoint = program.try_into().map_err(err)?;
                    let id = tp.attach(tracepoint).map_err(|source| EbpfError::Watcher {
                        name,
                        tracepoint: format!("raw {tracepoint}"),
                        source,
                    })?;
                    FdLink::from(tp.take_link(id).map_err(err)?)
                }
                Watch::Syscall(tracepoint) => {
                    let tp: &mut TracePoint = program.try_into().map_err(err)?;
                    let id =
                        tp.attach("syscalls", tracepoint)
                            .map_err(|source| EbpfError::Watcher {
                                name,
                                tracepoint: format!("syscalls/{tracepoint}"),
                                source,
                            })?;
                    FdLink::try_from(tp.take_link(id).map_err(err)?)
                        .map_err(|source| EbpfError::Link { name, source })?
                }
            };
            pin_replacing(link, &links.join(name))?;
        }
        Ok(outcomes)
    }

    /// Makes sure each program is attached exactly once at `root`: a pinned link of the same
    /// program (same tag) on the same cgroup is adopted; anything else is replaced, attaching
    /// the new link before the old pin goes (idempotent programs make the overlap safe).
    pub fn enforce(
        &mut self,
        cgroup_mount: &Path,
        root: &CgroupPath,
    ) -> Result<BTreeMap<&'static str, AttachOutcome>, EbpfError> {
        let links = links_dir(&self.pin_dir, root);
        self.attach_set(&root.dir(cgroup_mount), &links, &PROGRAMS)
    }

    /// Attaches each of `programs` once at the cgroup `dir`, pinning the links under `links`.
    fn attach_set(
        &mut self,
        dir: &Path,
        links: &Path,
        programs: &[(&'static str, u32)],
    ) -> Result<BTreeMap<&'static str, AttachOutcome>, EbpfError> {
        let dir = dir.to_owned();
        let cgroup = File::open(&dir).map_err(|source| EbpfError::Cgroup {
            path: dir.clone(),
            source,
        })?;
        let cgroup_id = crate::cgroup::cgroup_id(&dir).map_err(|e| EbpfError::Cgroup {
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::create_dir_all(links).map_err(|source| EbpfError::Pin {
            path: links.to_owned(),
            source,
        })?;
        let mut outcomes = BTreeMap::new();
        for &(name, _) in programs {
            let pin = links.join(name);
            let program = self.ebpf.program(name).ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            let tag = program
                .info()
                .map_err(|source| EbpfError::Program { name, source })?
                .tag();
            let existing = bpf_sys::obj_get(&pin).ok();
            if let Some(old) = &existing {
                if pinned_matches(old, tag, cgroup_id) {
                    outcomes.insert(name, AttachOutcome::Adopted);
                    continue;
                }
            }
            let link = self.attach(name, &cgroup)?;
            pin_replacing(link, &pin)?;
            // The rename replaced the old pin; its fd, dropped at the end of this iteration,
            // was the last reference, so the old program detaches.
            let outcome = if existing.is_some() {
                AttachOutcome::Replaced
            } else {
                AttachOutcome::Attached
            };
            outcomes.insert(name, outcome);
        }
        Ok(outcomes)
    }

    fn attach(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, EbpfError> {
        let err = |source| EbpfError::Program { name, source };
        let program = self.ebpf.program_mut(name).ok_or(EbpfError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        // Through bpf_link (kernel ≥ 5.7) the attachment is always multi-program and cannot be
        // overridden by a program attached later; link_create takes no mode flags.
        let mode = CgroupAttachMode::Single;
        let link_err = |source| EbpfError::Link { name, source };
        // Each program type has its own link type; all of them convert into an FdLink.
        macro_rules! attach {
            ($ty:ty, $($arg:expr),+) => {{
                let p: &mut $ty = program.try_into().map_err(err)?;
                let id = p.attach(cgroup.as_fd(), $($arg),+).map_err(err)?;
                FdLink::try_from(p.take_link(id).map_err(err)?).map_err(link_err)?
            }};
        }
        let link = match hook_of(name) {
            Hook::SockCreate => attach!(CgroupSock, mode),
            Hook::Addr => attach!(CgroupSockAddr, mode),
            Hook::Egress => attach!(CgroupSkb, CgroupSkbAttachType::Egress, mode),
        };
        Ok(link)
    }

    /// Takes the maps the daemon needs at run time.
    pub fn runtime_maps(&mut self) -> Result<RuntimeMaps, EbpfError> {
        let mut take = |name: &'static str| {
            self.ebpf.take_map(name).ok_or(EbpfError::Map {
                name,
                source: aya::maps::MapError::InvalidName { name: name.into() },
            })
        };
        let origins = take(map_names::ORIGINS)?;
        let events = take(map_names::EVENTS)?;
        let counters = take(map_names::COUNTERS)?;
        let accepted = take(map_names::ACCEPTED)?;
        let carried = take(map_names::CARRIED)?;
        let carried_live = take(map_names::CARRIED_LIVE)?;
        let m = |name: &'static str| move |source| EbpfError::Map { name, source };
        Ok(RuntimeMaps {
            origins: Array::try_from(origins).map_err(m(map_names::ORIGINS))?,
            events: RingBuf::try_from(events).map_err(m(map_names::EVENTS))?,
            counters: PerCpuHashMap::try_from(counters).map_err(m(map_names::COUNTERS))?,
            accepted: HashMap::try_from(accepted).map_err(m(map_names::ACCEPTED))?,
            carried: HashMap::try_from(carried).map_err(m(map_names::CARRIED))?,
            carried_live: LiveFlag::map(match carried_live {
                aya::maps::Map::Array(data) => data,
                _ => {
                    return Err(EbpfError::Map {
                        name: map_names::CARRIED_LIVE,
                        source: aya::maps::MapError::InvalidName {
                            name: map_names::CARRIED_LIVE.into(),
                        },
                    })
                }
            })
            .map_err(|source| EbpfError::Map {
                name: map_names::CARRIED_LIVE,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: source,
                }),
            })?,
        })
    }
}

/// Pins `link` at `pin`, replacing what was pinned there: the new pin is made beside it and
/// renamed over it, so one of the two is always pinned.
fn pin_replacing(link: FdLink, pin: &Path) -> Result<(), EbpfError> {
    // bpffs refuses dots in names.
    let mut name = pin.file_name().unwrap_or_default().to_owned();
    name.push("_new");
    let fresh = pin.with_file_name(name);
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| EbpfError::Pin {
        path: fresh.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&fresh, pin).map_err(|source| EbpfError::Pin {
        path: pin.to_owned(),
        source,
    })
}

/// Whether a pinned link runs the program with `tag` on the cgroup `cgroup_id`.
fn pinned_matches(link: &std::os::fd::OwnedFd, tag: u64, cgroup_id: u64) -> bool {
    let Ok(info) = bpf_sys::cgroup_link_info(link.as_fd()) else {
        return false;
    };
    if info.cgroup_id != cgroup_id {
        return false;
    }
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == info.prog_id)
        .is_some_and(|p| p.tag() == tag)
}

fn check_pinned_layout(path: &Path, name: &str) -> Result<(), EbpfError> {
    if !path.exists() {
        return Ok(());
    }
    let Some((kind, key, value, max, flags)) = expected_layout(name) else {
        return Ok(());
    };
    let info = MapInfo::from_pin(path).map_err(|e| EbpfError::MapLayout {
        path: path.to_owned(),
        found: format!("unreadable: {e}"),
        expected: format!("{kind:?}"),
    })?;
    let found_kind = info.map_type().ok();
    let found = (
        found_kind,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    );
    let ring_ok = kind == MapType::RingBuf
        && found_kind == Some(MapType::RingBuf)
        && info.max_entries() == max;
    if ring_ok || found == (Some(kind), key, value, max, flags) {
        Ok(())
    } else {
        Err(EbpfError::MapLayout {
            path: path.to_owned(),
            found: format!("{found:?}"),
            expected: format!("{:?}", (Some(kind), key, value, max, flags)),
        })
    }
}

/// Removes every pin under `pin_dir` (links first, so programs detach before maps go).
pub fn uninstall(pin_dir: &Path) -> Result<usize, EbpfError> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        if !dir.exists() {
            continue;
        }
        for path in crate::cgroup::walk(&dir).into_iter().rev() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| !t.is_dir()) {
                        std::fs::remove_file(e.path()).map_err(|source| EbpfError::Pin {
                            path: e.path(),
                            source,
                        })?;
                        removed += 1;
                    }
                }
            }
            std::fs::remove_dir(&path).map_err(|source| EbpfError::Pin {
                path: path.clone(),
                source,
            })?;
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).map_err(|source| EbpfError::Pin {
            path: pin_dir.to_owned(),
            source,
        })?;
    }
    Ok(removed)
}

/// The ids of our programs attached directly at `dir`, per program name, through the kernel's
/// query interface.
pub fn attachments(dir: &Path) -> Result<BTreeMap<&'static str, usize>, EbpfError> {
    let cgroup = File::open(dir).map_err(|source| EbpfError::Cgroup {
        path: dir.to_owned(),
        source,
    })?;
    let ours: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| p.name_as_str().map(|n| (p.id(), n.to_owned())))
        .collect();
    let mut out = BTreeMap::new();
    for (name, attach_type) in PROGRAMS {
        let ids = bpf_sys::query_cgroup(cgroup.as_fd(), attach_type).map_err(EbpfError::Query)?;
        // Kernel program names are truncated to 15 bytes.
        let short = &name[..name.len().min(15)];
        let n = ids
            .iter()
            .filter(|id| ours.get(id).is_some_and(|n| n == short))
            .count();
        out.insert(name, n);
    }
    Ok(out)
}

/// For each guard program: whether this pin directory's link of it is live at the cgroup2
/// root (the root holds other daemons' guards too, so they are not counted by name).
pub fn guard_attachments(
    pin_dir: &Path,
    cgroup_mount: &Path,
) -> Result<BTreeMap<&'static str, usize>, EbpfError> {
    let root = File::open(cgroup_mount).map_err(|source| EbpfError::Cgroup {
        path: cgroup_mount.to_owned(),
        source,
    })?;
    let root_id = crate::cgroup::cgroup_id(cgroup_mount).map_err(|e| EbpfError::Cgroup {
        path: cgroup_mount.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut out = BTreeMap::new();
    for (name, attach_type) in GUARD_PROGRAMS {
        let attached =
            bpf_sys::query_cgroup(root.as_fd(), attach_type).map_err(EbpfError::Query)?;
        let live = bpf_sys::obj_get(&pin_dir.join("links").join("guard").join(name))
            .ok()
            .and_then(|link| bpf_sys::cgroup_link_info(link.as_fd()).ok())
            .is_some_and(|info| info.cgroup_id == root_id && attached.contains(&info.prog_id));
        out.insert(name, usize::from(live));
    }
    for (name, _) in WATCHERS {
        let pin = pin_dir.join("links").join("guard").join(name);
        out.insert(name, usize::from(bpf_sys::obj_get(&pin).is_ok()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_dirs_are_bpffs_safe_and_distinct() {
        let dir = |p: &str| links_dir(Path::new("/p"), &CgroupPath::parse(p).expect("path"));
        let a = dir("/kubepods.slice");
        assert!(!a.file_name().expect("name").to_string_lossy().contains('.'));
        assert_ne!(dir("/a_b"), dir("/a/b"));
        assert_ne!(dir("/a.b"), dir("/a_db"));
    }
}
