//! Reads member offsets from the kernel's BTF, so the kernel programs follow the running
//! kernel's layout, not the build machine's: where `start_boottime` sits in `task_struct` (the
//! pid-reuse check), and the members the join watcher follows (a cgroup's id and parent, a
//! task's tgid).

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF is malformed at byte {0}")]
    Malformed(usize),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// For structs and unions: (name_off, type id, bit offset).
    members: Vec<(u32, u32, u32)>,
}

/// The byte offset of `member` in `struct name`, looking through anonymous struct members.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    Ok(member_offsets(btf, &[(strukt, member)])?[0])
}

/// The byte offset of each `(struct, member)` in `wanted`, parsing the blob once.
pub fn member_offsets(btf: &[u8], wanted: &[(&str, &str)]) -> Result<Vec<u32>, BtfError> {
    let (types, strings) = parse(btf)?;
    let name_of = |off: u32| -> &[u8] {
        let s = strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())]
    };
    wanted
        .iter()
        .map(|(strukt, member)| {
            let missing = || BtfError::Missing(format!("struct {strukt} member {member}"));
            let root = types
                .iter()
                .position(|t| t.kind == KIND_STRUCT && name_of(t.name_off) == strukt.as_bytes())
                .ok_or_else(missing)?;
            find(&types, root, member.as_bytes(), &name_of, 0).ok_or_else(missing)
        })
        .collect()
}

fn find<'s>(
    types: &[Type],
    idx: usize,
    member: &[u8],
    name_of: &dyn Fn(u32) -> &'s [u8],
    base_bits: u32,
) -> Option<u32> {
    let t = types.get(idx)?;
    for &(name_off, type_id, off) in &t.members {
        let bits = base_bits + if t.kind_flag { off & 0x00ff_ffff } else { off };
        if name_of(name_off) == member {
            return Some(bits / 8);
        }
        if name_off == 0 {
            // Anonymous struct or union member: type ids are 1-based.
            let inner = (type_id as usize).checked_sub(1)?;
            if matches!(
                types.get(inner).map(|t| t.kind),
                Some(KIND_STRUCT | KIND_UNION)
            ) {
                if let Some(found) = find(types, inner, member, name_of, bits) {
                    return Some(found);
                }
            }
        }
    }
    None
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed(at))
}

fn parse(b: &[u8]) -> Result<(Vec<Type>, &[u8]), BtfError> {
    if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != BTF_MAGIC {
        return Err(BtfError::Malformed(0));
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let type_off = hdr_len + u32_at(b, 8)? as usize;
    let type_len = u32_at(b, 12)? as usize;
    let str_off = hdr_len + u32_at(b, 16)? as usize;
    let str_len = u32_at(b, 20)? as usize;
    let strings = b
        .get(str_off..str_off + str_len)
        .ok_or(BtfError::Malformed(str_off))?;
    let end = type_off + type_len;
    let mut at = type_off;
    let mut types = Vec::new();
    while at < end {
        let name_off = u32_at(b, at)?;
        let info = u32_at(b, at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let mut members = Vec::new();
        let extra = match kind {
            1 | 14 | 17 => 4, // int, var, decl_tag
            3 => 12,          // array
            4 | 5 => {
                for i in 0..vlen {
                    let m = at + i * 12;
                    members.push((u32_at(b, m)?, u32_at(b, m + 4)?, u32_at(b, m + 8)?));
                }
                vlen * 12
            }
            6 | 13 => vlen * 8,   // enum, func_proto
            15 | 19 => vlen * 12, // datasec, enum64
            2 | 7..=12 | 16 | 18 => 0,
            _ => return Err(BtfError::Malformed(at)),
        };
        at += extra;
        types.push(Type {
            name_off,
            kind,
            kind_flag,
            members,
        });
    }
    Ok((types, strings))
}

/// The offset of `task_struct.start_boottime` in the running kernel.
pub fn task_start_boottime_offset() -> Result<u32, BtfError> {
    member_offset(&kernel_btf()?, "task_struct", "start_boottime")
}

fn kernel_btf() -> Result<Vec<u8>, BtfError> {
    std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|_| BtfError::Missing("/sys/kernel/btf/vmlinux".into()))
}

/// The offsets the join and descriptor watchers follow, from the running kernel. Without
/// the descriptor walk's (`fds` all zero, logged) receipts are still reported.
pub fn join_offsets() -> Result<gateway_common::KernelOffsets, BtfError> {
    let btf = kernel_btf()?;
    let o = member_offsets(
        &btf,
        &[
            ("cgroup", "kn"),
            ("kernfs_node", "id"),
            ("cgroup", "self"),
            ("cgroup_subsys_state", "parent"),
            ("task_struct", "tgid"),
            ("css_set", "dfl_cgrp"),
            ("task_struct", "real_parent"),
            ("task_struct", "cgroups"),
        ],
    )?;
    if o[2] != 0 {
        // The parent link points at the parent's `self`: the parent cgroup only if `self`
        // opens `struct cgroup`.
        return Err(BtfError::Missing(
            "struct cgroup opening with `self`".into(),
        ));
    }
    let narrow = |v: u32| u16::try_from(v).map_err(|_| BtfError::Malformed(v as usize));
    Ok(gateway_common::KernelOffsets {
        cgroup_kn: narrow(o[0])?,
        kn_id: narrow(o[1])?,
        cgroup_parent: narrow(o[3])?,
        css_set_dfl_cgrp: narrow(o[5])?,
        task_tgid: o[4],
        task_real_parent: narrow(o[6])?,
        task_cgroups: narrow(o[7])?,
        fds: fd_offsets(&btf).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no socket offsets from BTF: a connection handed to a process under a root works until the daemon destroys it");
            gateway_common::FdOffsets::default()
        }),
    })
}

/// `struct io_kiocb.opcode`, if the kernel has io_uring and a request opens with its file.
fn kiocb_opcode(btf: &[u8]) -> u16 {
    match member_offsets(btf, &[("io_kiocb", "file"), ("io_kiocb", "opcode")]) {
        Ok(o) if o[0] == 0 => u16::try_from(o[1]).unwrap_or(0),
        _ => {
            tracing::warn!("no io_uring request layout in BTF: a descriptor received through io_uring is not seen");
            0
        }
    }
}

/// From a task's descriptor table to a socket's ends and namespace.
fn fd_offsets(btf: &[u8]) -> Result<gateway_common::FdOffsets, BtfError> {
    let o = member_offsets(
        btf,
        &[
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "max_fds"),
            ("fdtable", "fd"),
            ("file", "f_inode"),
            ("inode", "i_mode"),
            ("file", "private_data"),
            ("socket", "sk"),
            ("sock", "sk_cgrp_data"),
            ("sock_cgroup_data", "cgroup"),
            ("sock", "__sk_common"),
            ("sock_common", "skc_family"),
            ("sock_common", "skc_daddr"),
            ("sock_common", "skc_rcv_saddr"),
            ("sock_common", "skc_dport"),
            ("sock_common", "skc_num"),
            ("sock_common", "skc_v6_daddr"),
            ("sock_common", "skc_v6_rcv_saddr"),
            ("sock_common", "skc_net"),
            ("net", "ns"),
            ("ns_common", "inum"),
            ("inode", "i_ino"),
        ],
    )?;
    if o[10] != 0 {
        return Err(BtfError::Missing(
            "struct sock opening with `__sk_common`".into(),
        ));
    }
    let narrow = |v: u32| u16::try_from(v).map_err(|_| BtfError::Malformed(v as usize));
    Ok(gateway_common::FdOffsets {
        task_files: narrow(o[0])?,
        files_fdt: narrow(o[1])?,
        fdt_max_fds: narrow(o[2])?,
        fdt_fd: narrow(o[3])?,
        file_inode: narrow(o[4])?,
        inode_mode: narrow(o[5])?,
        file_private_data: narrow(o[6])?,
        socket_sk: narrow(o[7])?,
        sk_cgroup: narrow(o[8] + o[9])?,
        skc_family: narrow(o[11])?,
        skc_daddr: narrow(o[12])?,
        skc_rcv_saddr: narrow(o[13])?,
        skc_dport: narrow(o[14])?,
        skc_num: narrow(o[15])?,
        skc_v6_daddr: narrow(o[16])?,
        skc_v6_rcv_saddr: narrow(o[17])?,
        skc_net: narrow(o[18])?,
        net_inum: narrow(o[19] + o[20])?,
        inode_ino: narrow(o[21])?,
        kiocb_opcode: kiocb_opcode(btf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_gives_the_socket_offsets() {
        let btf = kernel_btf().expect("the kernel's BTF (/sys/kernel/btf/vmlinux)");
        let o = fd_offsets(&btf).expect("socket offsets");
        println!("{o:?}");
        assert!(o.task_files > 0 && o.fdt_fd > 0 && o.socket_sk > 0, "{o:?}");
        assert_ne!(o.skc_daddr, o.skc_rcv_saddr, "{o:?}");
        assert_ne!(o.skc_dport, o.skc_num, "{o:?}");
        assert!(o.kiocb_opcode > 0, "this kernel has io_uring: {o:?}");
    }

    /// A hand-built BTF blob: `struct task_struct { int a; struct { long start_boottime; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0task_struct\0a\0start_boottime\0int\0".to_vec();
        let (task, a, sb, int) = (1u32, 13u32, 15u32, 30u32);
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            words
                .iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()));
        };
        push(&[int, 1 << 24, 8, 64]); // 1: int, 8 bytes
        push(&[task, (4 << 24) | 2, 16, a, 1, 0, 0, 3, 64]); // 2: task_struct { a @0; anon @64 bits }
        push(&[0, (4 << 24) | 1, 8, sb, 1, 0]); // 3: anon { start_boottime @0 }
        let mut b = Vec::new();
        for w in [
            u32::from(BTF_MAGIC) | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_member_through_anonymous_struct() {
        assert_eq!(
            member_offset(&blob(), "task_struct", "start_boottime").expect("offset"),
            8
        );
        assert!(member_offset(&blob(), "task_struct", "nope").is_err());
        assert!(member_offset(b"garbage-garbage-garbage-", "task_struct", "a").is_err());
    }
}
