//! The few bpf(2) commands aya 0.14 does not expose: a link's target cgroup, and the programs
//! attached to a cgroup (the kernel's query interface).
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialized `union bpf_attr` large enough for these commands.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// What the kernel says about a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `struct bpf_link_info` of a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let mut info = [0u8; 64];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&u32::try_from(link.as_raw_fd()).unwrap_or(0).to_ne_bytes());
    attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // type u32 @0, id u32 @4, prog_id u32 @8, union (8-aligned) @16: cgroup_id u64, attach_type u32.
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap_or([0; 4]));
    Ok(CgroupLinkInfo {
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(info[16..24].try_into().unwrap_or([0; 8])),
        attach_type: u32_at(24),
    })
}

/// The ids of the programs attached directly to a cgroup for one attach type.
pub fn query_cgroup(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&u32::try_from(cgroup.as_raw_fd()).unwrap_or(0).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&64u32.to_ne_bytes());
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = u32::from_ne_bytes(attr[24..28].try_into().unwrap_or([0; 4])) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// Opens a pinned object (BPF_OBJ_GET).
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) })
}
