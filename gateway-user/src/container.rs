//! What a cgroup path says about containers and pods, for the layouts container runtimes and
//! the kubelet really produce (systemd and cgroupfs drivers). Pure: no file system access.
use serde::Serialize;

use crate::cgroup::is_slice;

/// A container, as its runtime named its cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o` or `podman`.
    pub runtime: &'static str,
    /// The full (64 hex digit) container id.
    pub id: String,
}

/// A Kubernetes pod, from the kubelet's cgroup names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// The pod UID with dashes (as the API server shows it).
    pub uid: String,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos: &'static str,
    /// How deep the `kubepods` cgroup it lies under is (1: directly below the cgroup2 root).
    #[serde(skip)]
    pub hierarchy_depth: usize,
}

/// Container and pod found in a cgroup path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub container: Option<Container>,
    pub pod: Option<Pod>,
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `(runtime, id)` from one path component, for each runtime's naming.
fn container_of(component: &str) -> Option<Container> {
    const SCOPES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in SCOPES {
        if let Some(id) = stem.strip_prefix(prefix) {
            // `crio-conmon-<id>` is the monitor process, not the container.
            if is_id(id) {
                return Some(Container {
                    runtime,
                    id: id.to_owned(),
                });
            }
        }
    }
    None
}

/// A pod UID from `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice`.
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = if let Some(slice) = component.strip_suffix(".slice") {
        slice.rsplit_once("-pod").map(|(_, uid)| uid)?
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

/// Reads a cgroup path (relative to the cgroup2 mount).
///
/// Only what lies above the workload's own cgroup is read: the slices systemd makes, the
/// parents a runtime makes at the top (`/docker`, `/libpod_parent`, `/kubepods[/<qos>]/pod<uid>`)
/// and the first cgroup below them, the one systemd or the runtime made for the workload (its
/// unit, its container). Below that, a workload with a delegated subtree (a `Delegate=yes`
/// service, a user's own manager, a container with a writable cgroupfs) names cgroups as it
/// likes: a `docker-<id>.scope` or `kubepods-pod<uid>.slice` there would claim another
/// workload's identity, and is not read. A container inside a container is the outer one.
pub fn placement(path: &str) -> Placement {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut out = Placement::default();
    let slices = parts.iter().take_while(|c| is_slice(c)).count();
    // systemd driver: /kubepods.slice[/kubepods-<qos>.slice]/kubepods-[<qos>-]pod<uid>.slice,
    // possibly below other slices (an operator's, or a test's).
    if let Some(k) = parts[..slices].iter().position(|c| *c == "kubepods.slice") {
        let below = &parts[k + 1..slices];
        if let Some(p) = below.iter().position(|c| pod_uid_of(c).is_some()) {
            out.pod = pod_uid_of(below[p]).map(|uid| Pod {
                uid,
                qos: qos_of(&below[..p]),
                hierarchy_depth: k + 1,
            });
        }
    }
    let Some(&owner) = parts.get(slices) else {
        return out;
    };
    if let Some(container) = container_of(owner) {
        out.container = Some(container);
        return out;
    }
    // cgroupfs layouts, only at the top (below slices): the runtime's parent, then the
    // workload's own cgroup.
    let rest = &parts[slices..];
    match owner {
        "kubepods" if out.pod.is_none() => {
            let qos_len = usize::from(rest.get(1).is_some_and(|c| qos_of(&[c]) != "guaranteed"));
            let Some(uid) = rest.get(1 + qos_len).and_then(|c| pod_uid_of(c)) else {
                return out;
            };
            out.pod = Some(Pod {
                uid,
                qos: qos_of(&rest[1..1 + qos_len]),
                hierarchy_depth: slices + 1,
            });
            // containerd or cri-o name the container's cgroup by its bare id; the runtime is
            // not in the name, and "containerd" is the kubelet's default.
            out.container = rest.get(2 + qos_len).and_then(|c| {
                container_of(c).or_else(|| {
                    is_id(c).then(|| Container {
                        runtime: "containerd",
                        id: (*c).to_owned(),
                    })
                })
            });
        }
        "docker" => {
            out.container = rest.get(1).filter(|c| is_id(c)).map(|id| Container {
                runtime: "docker",
                id: (*id).to_owned(),
            });
        }
        "libpod_parent" => out.container = rest.get(1).and_then(|c| container_of(c)),
        _ => {}
    }
    out
}

/// The QoS class the slices or directories above a pod name (`guaranteed` when none does).
fn qos_of(above_pod: &[&str]) -> &'static str {
    above_pod
        .iter()
        .find_map(|c| {
            let c = c.strip_suffix(".slice").unwrap_or(c);
            match c.strip_prefix("kubepods-").unwrap_or(c) {
                "burstable" => Some("burstable"),
                "besteffort" => Some("besteffort"),
                _ => None,
            }
        })
        .unwrap_or("guaranteed")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f6b1c0d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
    const UID: &str = "0b4f2a4e-6d1c-4c8e-9a57-3f2e1d0c9b8a";
    const UID_: &str = "0b4f2a4e_6d1c_4c8e_9a57_3f2e1d0c9b8a";

    fn c(runtime: &'static str) -> Option<Container> {
        Some(Container {
            runtime,
            id: ID.into(),
        })
    }

    fn p(qos: &'static str) -> Option<Pod> {
        Some(Pod {
            uid: UID.into(),
            qos,
            hierarchy_depth: 1,
        })
    }

    #[test]
    fn runtime_layouts() {
        let table: Vec<(String, Placement)> = vec![
            // docker, systemd driver and cgroupfs driver
            (format!("/system.slice/docker-{ID}.scope"), Placement { container: c("docker"), pod: None }),
            (format!("/docker/{ID}"), Placement { container: c("docker"), pod: None }),
            // podman: rootful, rootless, cgroupfs, and its split "container" child
            (format!("/machine.slice/libpod-{ID}.scope"), Placement { container: c("podman"), pod: None }),
            (format!("/libpod_parent/libpod-{ID}"), Placement { container: c("podman"), pod: None }),
            (format!("/machine.slice/libpod-{ID}.scope/container"), Placement { container: c("podman"), pod: None }),
            // Kubernetes, systemd driver: containerd and cri-o, each QoS class
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Placement { container: c("containerd"), pod: p("burstable") },
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"),
                Placement { container: c("cri-o"), pod: p("besteffort") },
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Placement { container: c("containerd"), pod: p("guaranteed") },
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{ID}.scope"),
                Placement { container: c("docker"), pod: p("burstable") },
            ),
            // Kubernetes, cgroupfs driver
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Placement { container: c("containerd"), pod: p("burstable") }),
            (format!("/kubepods/pod{UID}/{ID}"), Placement { container: c("containerd"), pod: p("guaranteed") }),
            // the pod's own cgroup (no container yet), and cri-o's monitor
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"), Placement { container: None, pod: p("burstable") }),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"),
                Placement { container: None, pod: p("burstable") },
            ),
            // not containers
            // Rootless: below the user's own manager, where that user names cgroups as it likes.
            (format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"), Placement::default()),
            ("/system.slice/sshd.service".into(), Placement::default()),
            ("/system.slice/docker.service".into(), Placement::default()),
            ("/docker/not-an-id".into(), Placement::default()),
            (format!("/system.slice/docker-{}.scope", &ID[..12]), Placement::default()),
        ];
        for (path, want) in table {
            assert_eq!(placement(&path), want, "{path}");
        }
    }

    #[test]
    fn names_below_the_workloads_own_cgroup_claim_nothing() {
        // A service with a delegated subtree, or a container, making cgroups named like
        // another workload's: they keep their own identity (or none), never the named one.
        const OUTER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let outer = || {
            Some(Container {
                runtime: "docker",
                id: OUTER.into(),
            })
        };
        let table: Vec<(String, Placement)> = vec![
            (format!("/system.slice/app.service/docker-{ID}.scope"), Placement::default()),
            (format!("/system.slice/app.service/docker/{ID}"), Placement::default()),
            (format!("/system.slice/app.service/kubepods/pod{UID}/{ID}"), Placement::default()),
            (
                format!("/system.slice/app.service/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Placement::default(),
            ),
            (format!("/tollgate/kubepods/pod{UID}/{ID}"), Placement::default()),
            (format!("/system.slice/docker-{OUTER}.scope/docker-{ID}.scope"), Placement { container: outer(), pod: None }),
            (format!("/docker/{OUTER}/docker/{ID}"), Placement { container: outer(), pod: None }),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{OUTER}.scope/kubepods.slice/kubepods-pod0000.slice/docker-{ID}.scope"),
                Placement { container: outer(), pod: p("guaranteed") },
            ),
        ];
        for (path, want) in table {
            assert_eq!(placement(&path), want, "{path}");
        }
    }

    #[test]
    fn under_an_outer_test_root() {
        // Layouts keep their meaning below any prefix (a nested kubepods.slice).
        let path = format!("/tg-test.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            placement(&path),
            Placement {
                container: c("containerd"),
                pod: p("burstable").map(|p| Pod {
                    hierarchy_depth: 2,
                    ..p
                })
            }
        );
    }
}
