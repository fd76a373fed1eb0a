//! cgroup v2: finding the mount, resolving cgroup ids to paths, and what a path says about the
//! workload (its systemd unit).
use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (checked {mountinfo}): mount cgroup2 or boot with the unified hierarchy")]
    NotMounted { mountinfo: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "cgroup path {0:?} must be absolute (relative to the cgroup2 mount), e.g. /system.slice"
    )]
    NotAbsolute(String),
    #[error("cgroup path {0:?} contains `..` or empty components")]
    BadComponent(String),
}

/// The cgroup2 mount point, from a mountinfo text (pure: tests feed their own).
pub fn cgroup2_mount_from(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Whether a mountinfo text lists a mount of `fstype` at `path`.
pub fn is_mounted_at(mountinfo: &str, fstype: &str, path: &Path) -> bool {
    mountinfo.lines().any(|line| {
        let Some((pre, post)) = line.split_once(" - ") else {
            return false;
        };
        post.split_whitespace().next() == Some(fstype)
            && pre
                .split_whitespace()
                .nth(4)
                .map(unescape_mountinfo)
                .as_deref()
                == Some(&*path.to_string_lossy())
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup2 mount point of this host, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = "/proc/self/mountinfo";
    let text = fs::read_to_string(mountinfo).map_err(|source| CgroupError::Io {
        path: mountinfo.into(),
        source,
    })?;
    cgroup2_mount_from(&text).ok_or(CgroupError::NotMounted {
        mountinfo: mountinfo.into(),
    })
}

/// A cgroup path as policies and the config name it: absolute, relative to the cgroup2 mount,
/// without `..`, normalized without a trailing slash (the root is `/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    pub fn parse(s: &str) -> Result<Self, CgroupError> {
        if !s.starts_with('/') {
            return Err(CgroupError::NotAbsolute(s.to_owned()));
        }
        let parts: Vec<&str> = s.split('/').skip(1).filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == ".." || *p == ".") || s.contains("//") {
            return Err(CgroupError::BadComponent(s.to_owned()));
        }
        Ok(Self(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` is `other` or a descendant of it.
    pub fn is_within(&self, other: &CgroupPath) -> bool {
        other.0 == "/"
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// This path and every cgroup above it, the root (`/`) first.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        std::iter::once("/").chain(
            self.0
                .match_indices('/')
                .skip(1)
                .map(|(i, _)| &self.0[..i])
                .chain((self.0 != "/").then_some(self.0.as_str())),
        )
    }

    /// The cgroup one level below `within` on the way to this one (this one if it is `within`
    /// itself); `None` if this one is not within it.
    pub fn below(&self, within: &CgroupPath) -> Option<&str> {
        if !self.is_within(within) {
            return None;
        }
        Some(
            self.ancestors()
                .nth(within.depth() + 1)
                .unwrap_or(self.as_str()),
        )
    }

    /// Number of components (the root has none).
    pub fn depth(&self) -> usize {
        self.0.split('/').filter(|p| !p.is_empty()).count()
    }

    /// The directory of this cgroup under the mount.
    pub fn dir(&self, mount: &Path) -> PathBuf {
        mount.join(self.0.trim_start_matches('/'))
    }

    /// The systemd unit this cgroup belongs to, read as systemd reads it: the first component
    /// below the slices (`.slice`s group units; a process is never in one), if it names a
    /// `.service`, `.scope`, `.socket`, `.mount` or `.swap`. Below its unit, a service with a
    /// delegated subtree names cgroups as it likes: an inner `billing.service` is its own
    /// choice, not billing's identity, and is not read.
    pub fn systemd_unit(&self) -> Option<&str> {
        const KINDS: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
        let unit = self
            .0
            .split('/')
            .filter(|c| !c.is_empty())
            .find(|c| !is_slice(c))?;
        KINDS
            .iter()
            .any(|k| unit.len() > k.len() && unit.ends_with(k))
            .then_some(unit)
    }
}

/// A systemd slice: a cgroup that groups units and holds no process of its own.
pub fn is_slice(component: &str) -> bool {
    component.len() > ".slice".len() && component.ends_with(".slice")
}

impl std::fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The cgroup id of a cgroup directory: on cgroup2 it is the directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, CgroupError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// The path of the cgroup with kernel id `id`, asked of the kernel through a file handle
/// (kernfs handles carry the id), so it is the cgroup the kernel recorded, never a guess.
pub fn path_of_id(mount: &Path, id: u64) -> Option<CgroupPath> {
    const FILEID_KERNFS: i32 = 0xfe;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    let mount_c = CString::new(mount.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path; the returned fd is owned below.
    let mount_fd = unsafe {
        libc::open(
            mount_c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if mount_fd < 0 {
        return None;
    }
    let mut handle = Handle {
        bytes: 8,
        kind: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` has the `struct file_handle` layout with 8 bytes of handle data.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd,
            std::ptr::from_mut(&mut handle),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    } as i32;
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(mount_fd) };
    if fd < 0 {
        return None;
    }
    let link = fs::read_link(format!("/proc/self/fd/{fd}"));
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    let full = link.ok()?;
    let rel = full.strip_prefix(mount).ok()?;
    CgroupPath::parse(&format!("/{}", rel.display())).ok()
}

/// Every cgroup at or under `dir` (depth-first), as directories.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The pids in a cgroup (not its descendants).
pub fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_root_first_and_containment_by_whole_components() {
        let p = CgroupPath::parse("/a.slice/b.service/c").expect("path");
        assert_eq!(
            p.ancestors().collect::<Vec<_>>(),
            [
                "/",
                "/a.slice",
                "/a.slice/b.service",
                "/a.slice/b.service/c"
            ]
        );
        let root = CgroupPath::parse("/").expect("root");
        assert_eq!(root.ancestors().collect::<Vec<_>>(), ["/"]);
        let a = CgroupPath::parse("/a.slice").expect("a");
        let ab = CgroupPath::parse("/a.slicex").expect("ax");
        assert!(p.is_within(&a) && p.is_within(&root) && p.is_within(&p));
        assert!(
            !ab.is_within(&a),
            "a sibling sharing a prefix is not within"
        );
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 35 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_from(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let none = "30 23 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount_from(none), None);
        let spaced = "30 23 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_from(spaced),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn parses_and_normalizes_paths() {
        let table = [
            (
                "/system.slice/billing.service",
                Some("/system.slice/billing.service"),
            ),
            ("/system.slice/", Some("/system.slice")),
            ("/", Some("/")),
            ("system.slice", None),
            ("/a/../b", None),
            ("/a//b", None),
            ("/a/./b", None),
        ];
        for (input, want) in table {
            assert_eq!(
                CgroupPath::parse(input)
                    .ok()
                    .as_ref()
                    .map(CgroupPath::as_str),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn within_is_component_wise() {
        let root = CgroupPath::parse("/tollgate").expect("path");
        assert!(CgroupPath::parse("/tollgate/app")
            .expect("path")
            .is_within(&root));
        assert!(CgroupPath::parse("/tollgate")
            .expect("path")
            .is_within(&root));
        assert!(!CgroupPath::parse("/tollgate-other")
            .expect("path")
            .is_within(&root));
        assert!(CgroupPath::parse("/x")
            .expect("path")
            .is_within(&CgroupPath::parse("/").expect("root")));
    }

    #[test]
    fn systemd_units() {
        let table = [
            ("/system.slice/billing.service", Some("billing.service")),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            (
                "/system.slice/docker-abc.scope/inner",
                Some("docker-abc.scope"),
            ),
            ("/system.slice", None),
            ("/tollgate/app", None),
            ("/.service", None),
            // Names a service chose below its own unit do not count.
            (
                "/system.slice/app.service/sub/billing.service",
                Some("app.service"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/billing.service",
                Some("user@1000.service"),
            ),
            ("/tollgate/billing.service", None),
        ];
        for (input, want) in table {
            assert_eq!(
                CgroupPath::parse(input).expect("path").systemd_unit(),
                want,
                "{input}"
            );
        }
    }
}
