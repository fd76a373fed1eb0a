//! Kernel refusals: the ring buffer becomes audit records; per-cgroup counters turn what the
//! ring buffer could not carry (a flood) into "N refusals suppressed" records, and count DNS.
use std::{collections::HashMap as StdHashMap, path::PathBuf, sync::Arc};

use aya::maps::{MapData, PerCpuHashMap, RingBuf};
use gateway_common::{hook, reason, Counters, RefusalEvent, AF_INET};
use tokio::io::unix::AsyncFd;

use crate::{
    audit::{AuditLog, AuditRecord, DstRecord, Layer, Verdict, WorkloadRecord},
    cgroup::path_of_id,
    identity::comm_str,
    namespaces::SettleQueue,
};

/// The audit reason for a kernel refusal.
pub fn reason_str(hook_id: u32, reason_id: u32) -> &'static str {
    match (hook_id, reason_id) {
        (_, reason::SOCKET_TYPE) if hook_id == hook::SOCK_CREATE => "kernel_socket_type_refused",
        (_, reason::SOCKET_TYPE) => "kernel_protocol_refused",
        (_, reason::LISTENER_PORT) => "kernel_bind_listener_port",
        (_, reason::UDP_NOT_DNS) => "kernel_udp_not_dns",
        (_, reason::DIRECT_TO_LISTENER) => "kernel_direct_to_listener",
        (_, reason::EGRESS_BACKSTOP) => "kernel_egress_backstop",
        (_, reason::NO_CONFIG) => "kernel_no_config",
        (_, reason::NO_STORAGE) => "kernel_no_socket_storage",
        (_, reason::FOREIGN_SOCKET) => "kernel_socket_from_outside_root",
        _ => "kernel_refused",
    }
}

fn protocol_str(p: u16) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
        1 => Some("icmp"),
        58 => Some("icmpv6"),
        255 => Some("raw"),
        _ => None,
    }
}

/// Turns one kernel event into its audit record.
pub fn record_of(ev: &RefusalEvent, cgroup_mount: &std::path::Path) -> AuditRecord {
    let mut r = AuditRecord::new(Verdict::Deny, Layer::Kernel, reason_str(ev.hook, ev.reason));
    let cgroup = path_of_id(cgroup_mount, ev.cgroup_id);
    r.workload = WorkloadRecord {
        pid: ev.pid,
        tgid: ev.tgid,
        uid: ev.uid,
        gid: ev.gid,
        comm: comm_str(&ev.comm),
        ..WorkloadRecord::of_cgroup(ev.cgroup_id, cgroup.as_ref())
    }
    .into();
    let ip: Option<std::net::IpAddr> = match ev.family {
        0 => None,
        AF_INET => Some(ev.addr[0].to_ne_bytes().into()),
        _ => {
            let mut o = [0u8; 16];
            for (i, w) in ev.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(o.into())
        }
    };
    r.dst = DstRecord {
        host: None,
        orig_ip: ip.map(|i| i.to_string().into()),
        orig_port: (ev.port != 0).then_some(ev.port),
        protocol: protocol_str(ev.protocol),
    };
    r
}

/// Reads the ring buffer forever.
/// Drains the kernel's event ring: refusals become audit records; joins go to `joins`.
pub async fn drain_events(
    ring: RingBuf<MapData>,
    audit: AuditLog,
    cgroup_mount: PathBuf,
    joins: SettleQueue,
) {
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns the map.
    let mut fd = match unsafe { AsyncFd::register(ring) }.map_err(|e| e.to_string()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the kernel event ring; refusals are counted only");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<RefusalEvent>() {
                // SAFETY: the kernel wrote a `RefusalEvent` (checked length; read unaligned).
                let ev: RefusalEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if ev.hook == hook::JOIN || ev.hook == hook::RECEIVED {
                    if !joins.push(ev.tgid, ev.cgroup_id) {
                        tracing::warn!(tgid = ev.tgid, "settle queue and its overflow full: the connections this process holds are not settled (its marked ones still are)");
                    }
                    continue;
                }
                let record = record_of(&ev, &cgroup_mount);
                tracing::debug!(reason = %record.reason, cgroup = ?record.workload.cgroup, "kernel refusal");
                audit.emit(record);
            }
        }
        guard.clear_ready();
    }
}

/// Polls the per-cgroup counters and audits what the event stream could not show.
pub async fn watch_counters(
    counters: Arc<PerCpuHashMap<MapData, u64, Counters>>,
    audit: AuditLog,
    cgroup_mount: PathBuf,
    joins: SettleQueue,
) {
    let mut seen: StdHashMap<u64, Counters> = StdHashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let (overflowed, dropped) = joins.take_overflowed();
        for (count, reason) in [
            (overflowed, "settle_queue_overflow"),
            (dropped, "settle_reports_dropped"),
        ] {
            if count > 0 {
                tracing::warn!(
                    count,
                    reason,
                    "more processes to settle than the queue holds"
                );
                let mut r = AuditRecord::new(Verdict::Error, Layer::Lifecycle, reason);
                r.count = Some(count);
                audit.emit(r);
            }
        }
        let mut whole = true;
        let now: Vec<(u64, Counters)> = counters
            .iter()
            .filter_map(|entry| entry.map_err(|_| whole = false).ok())
            .map(|(cgroup_id, per_cpu)| {
                let mut sum = Counters::default();
                for c in per_cpu.iter() {
                    sum.refused += c.refused;
                    sum.events_lost += c.events_lost;
                    sum.dns_allowed += c.dns_allowed;
                    sum.reports_lost += c.reports_lost;
                }
                (cgroup_id, sum)
            })
            .collect();
        for (cgroup_id, new) in growth(&mut seen, now.into_iter(), whole) {
            // Only a cgroup with something to report has its path looked up.
            let workload = Arc::new(WorkloadRecord::of_cgroup(
                cgroup_id,
                path_of_id(&cgroup_mount, cgroup_id).as_ref(),
            ));
            let lost = new.events_lost;
            if lost > 0 {
                let mut r =
                    AuditRecord::new(Verdict::Deny, Layer::Kernel, "kernel_refusals_suppressed");
                r.workload = Arc::clone(&workload);
                r.count = Some(lost);
                audit.emit(r);
            }
            let reports_lost = new.reports_lost;
            if reports_lost > 0 {
                // Which process joined, or received descriptors, is not known: every process
                // of the cgroup is settled as if it had reported.
                let mut settled = 0u64;
                if let Some(path) = workload_path(&cgroup_mount, cgroup_id) {
                    for pid in crate::cgroup::procs(&path) {
                        if joins.push(pid as u32, cgroup_id) {
                            settled += 1;
                        } else {
                            tracing::warn!(
                                pid,
                                "settle queue and its overflow full: a process whose report was lost is not settled"
                            );
                        }
                    }
                }
                tracing::warn!(cgroup_id, reports_lost, settled, "kernel reports of joins or received descriptors lost: settling every process of the cgroup");
                let mut r = AuditRecord::new(Verdict::Error, Layer::Kernel, "kernel_reports_lost");
                r.workload = Arc::clone(&workload);
                r.count = Some(reports_lost);
                // What the fallback did: how many processes of the cgroup it queued.
                r.rule = Some(format!("settling {settled} processes of the cgroup").into());
                audit.emit(r);
            }
            let dns = new.dns_allowed;
            if dns > 0 {
                let mut r =
                    AuditRecord::new(Verdict::Allow, Layer::Kernel, "dns_to_allowed_resolver");
                r.workload = workload;
                r.dst.protocol = Some("udp");
                r.count = Some(dns);
                audit.emit(r);
            }
        }
    }
}

/// What each cgroup's counters gained since the last poll (`seen`, updated to `now`), for the
/// cgroups whose counters audits report (`events_lost`, `reports_lost`, `dns_allowed`) grew.
/// A cgroup the map no longer holds (evicted, or gone) is forgotten, so `seen` never holds more
/// than the map; but only after a `whole` walk of it (one that met an error may have missed
/// some, which would then be counted again from zero). A cgroup the walk met twice (the
/// kernel starts a hash map's walk over when the key it stood on was deleted) counts once.
fn growth(
    seen: &mut StdHashMap<u64, Counters>,
    now: impl Iterator<Item = (u64, Counters)>,
    whole: bool,
) -> Vec<(u64, Counters)> {
    let mut grew = Vec::new();
    let mut present = StdHashMap::with_capacity(seen.len());
    for (cgroup_id, sum) in now {
        if present.contains_key(&cgroup_id) {
            continue;
        }
        let last = seen.get(&cgroup_id).copied().unwrap_or_default();
        let new = Counters {
            refused: grown(sum.refused, last.refused),
            events_lost: grown(sum.events_lost, last.events_lost),
            dns_allowed: grown(sum.dns_allowed, last.dns_allowed),
            reports_lost: grown(sum.reports_lost, last.reports_lost),
        };
        if new.events_lost > 0 || new.reports_lost > 0 || new.dns_allowed > 0 {
            grew.push((cgroup_id, new));
        }
        present.insert(cgroup_id, sum);
    }
    if whole {
        *seen = present;
    } else {
        seen.extend(present);
    }
    grew
}

/// How much a counter grew since it read `last`. The counters live in an LRU map: an entry
/// evicted and made again starts from zero, so a value below the last one is all new.
fn grown(now: u64, last: u64) -> u64 {
    if now < last {
        now
    } else {
        now - last
    }
}

/// The directory of cgroup `cgroup_id` under the cgroup2 mount.
fn workload_path(cgroup_mount: &std::path::Path, cgroup_id: u64) -> Option<PathBuf> {
    let path = path_of_id(cgroup_mount, cgroup_id)?;
    Some(cgroup_mount.join(path.as_str().trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(events_lost: u64, dns_allowed: u64) -> Counters {
        Counters {
            refused: events_lost,
            events_lost,
            dns_allowed,
            reports_lost: 0,
        }
    }

    fn growth_whole(
        seen: &mut StdHashMap<u64, Counters>,
        now: impl Iterator<Item = (u64, Counters)>,
    ) -> Vec<(u64, Counters)> {
        growth(seen, now, true)
    }

    /// A walk that meets a cgroup twice counts it once; one that met an error forgets nobody.
    #[test]
    fn a_cgroup_met_twice_counts_once_and_a_broken_walk_forgets_nobody() {
        let mut seen = StdHashMap::new();
        growth_whole(
            &mut seen,
            [(1, counters(0, 5)), (2, counters(0, 1))].into_iter(),
        );
        let twice = growth_whole(
            &mut seen,
            [
                (1, counters(0, 7)),
                (9, counters(0, 0)),
                (2, counters(0, 1)),
                (1, counters(0, 7)),
            ]
            .into_iter(),
        );
        assert_eq!(twice, vec![(1, counters(0, 2))]);
        // 2 was missed by a walk that met an error: kept, so its next reading is not all new.
        let broken = growth(&mut seen, [(1, counters(0, 7))].into_iter(), false);
        assert!(broken.is_empty());
        let after = growth_whole(&mut seen, [(2, counters(0, 1))].into_iter());
        assert!(after.is_empty(), "{after:?}");
    }

    #[test]
    fn only_what_grew_is_reported_and_gone_cgroups_are_forgotten() {
        let mut seen = StdHashMap::new();
        let first = growth_whole(
            &mut seen,
            [(1, counters(3, 0)), (2, counters(0, 0))].into_iter(),
        );
        assert_eq!(first, vec![(1, counters(3, 0))]);
        // Nothing new for 1, DNS for 2; 3 appears with nothing reported yet.
        let second = growth_whole(
            &mut seen,
            [
                (1, counters(3, 0)),
                (2, counters(0, 4)),
                (3, counters(0, 0)),
            ]
            .into_iter(),
        );
        assert_eq!(second, vec![(2, counters(0, 4))]);
        // 1 and 3 left the map: forgotten.
        let third = growth_whole(&mut seen, [(2, counters(0, 5))].into_iter());
        assert_eq!(third, vec![(2, counters(0, 1))]);
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![2]);
        // 1 comes back (made again in the map): counted from zero.
        let again = growth_whole(
            &mut seen,
            [(1, counters(2, 0)), (2, counters(0, 5))].into_iter(),
        );
        assert_eq!(again, vec![(1, counters(2, 0))]);
    }

    #[test]
    fn a_counter_made_again_counts_from_zero() {
        assert_eq!(grown(10, 7), 3);
        assert_eq!(grown(7, 7), 0);
        // Evicted at 7 and made again: the 2 counted since are new, not lost.
        assert_eq!(grown(2, 7), 2);
    }
}
