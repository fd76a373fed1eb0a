//! The host's mount namespace, as the daemon checks against it. A DaemonSet pod runs the
//! daemon in a mount namespace of its own; what decides whether its pins outlive it is whether
//! the bpffs they go to is one the host has, seen from a process of the host's namespace.
use std::{
    ffi::OsString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use nix::{
    fcntl::{OFlag, OpenHow, ResolveFlag},
    sys::stat::Mode,
};

/// The initial mount namespace's fixed inode number (kernels 6.18 and later; earlier ones
/// number it like any other).
pub const INIT_MNT_NS: &str = "mnt:[4026531832]";

/// A process of the host's mount namespace, its /proc directory held open: a pid reused
/// meanwhile cannot stand in for it, since lookups through a dead process's directory fail.
pub struct HostProcess {
    pub pid: u32,
    dir: File,
    /// Its mount namespace, as `/proc/PID/ns/mnt` names it.
    pub ns: OsString,
}

impl HostProcess {
    /// pid 1, or, where pid 1 cannot be read (a sandbox without ptrace access to it), the first
    /// process found in the mount namespace with the initial one's fixed inode number.
    pub fn find() -> Option<Self> {
        if let Some(init) = Self::open(1) {
            return Some(init);
        }
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter_map(Self::open)
            .find(|p| p.ns == INIT_MNT_NS)
    }

    fn open(pid: u32) -> Option<Self> {
        let dir = File::open(format!("/proc/{pid}")).ok()?;
        let ns = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), "ns/mnt").ok()?;
        Some(Self { pid, dir, ns })
    }

    /// The device number of the filesystem at `path` as this process sees it: resolved inside
    /// its root, so neither a symlink nor `..` on the way leads back into ours.
    pub fn dev_at(&self, path: &Path) -> io::Result<u64> {
        let raw = nix::fcntl::openat(
            Some(self.dir.as_raw_fd()),
            "root",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: openat returned a new descriptor, owned from here on.
        let root = unsafe { OwnedFd::from_raw_fd(raw) };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let raw = nix::fcntl::openat2(root.as_raw_fd(), path, how)?;
        // SAFETY: as above.
        let found = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(nix::sys::stat::fstat(found.as_raw_fd())?.st_dev)
    }
}

/// Whether this process shares the mount namespace of `host` (the initial one, where no
/// process of the host's could be read).
pub fn in_host_mount_ns(host: Option<&HostProcess>) -> io::Result<bool> {
    let own = std::fs::read_link("/proc/self/ns/mnt")?;
    Ok(own.as_os_str() == host.map_or(INIT_MNT_NS.as_ref(), |h| h.ns.as_os_str()))
}
