//! What a cgroup path says about containers and pods, for the layouts container runtimes and
//! the kubelet really produce (systemd and cgroupfs drivers). Pure: no file system access.
use serde::Serialize;

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
pub fn placement(path: &str) -> Placement {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut out = Placement::default();
    // The innermost container component wins (a container may make cgroups inside its own).
    let container_at = parts.iter().rposition(|c| container_of(c).is_some());
    if let Some(i) = container_at {
        out.container = container_of(parts[i]);
    }
    // cgroupfs driver: /kubepods[/<qos>]/pod<uid>/<id> — the container is a bare id.
    let kube_at = parts
        .iter()
        .position(|c| *c == "kubepods" || *c == "kubepods.slice");
    if let Some(k) = kube_at {
        let below = &parts[k + 1..];
        let pod_at = below.iter().position(|c| pod_uid_of(c).is_some());
        if let Some(p) = pod_at {
            let qos = below[..p]
                .iter()
                .find_map(|c| {
                    let c = c.strip_suffix(".slice").unwrap_or(c);
                    let c = c.strip_prefix("kubepods-").unwrap_or(c);
                    match c {
                        "burstable" => Some("burstable"),
                        "besteffort" => Some("besteffort"),
                        _ => None,
                    }
                })
                .unwrap_or("guaranteed");
            out.pod = pod_uid_of(below[p]).map(|uid| Pod {
                uid,
                qos,
                hierarchy_depth: k + 1,
            });
            if out.container.is_none() {
                // A bare id below the pod: containerd or cri-o with the cgroupfs driver. The
                // runtime is not in the name; "containerd" is the kubelet default.
                if let Some(id) = below.get(p + 1).filter(|c| is_id(c)) {
                    out.container = Some(Container {
                        runtime: "containerd",
                        id: (*id).to_owned(),
                    });
                }
            }
        }
    } else if out.container.is_none() {
        // docker (cgroupfs driver): /docker/<id>; podman (cgroupfs): /libpod_parent/libpod-<id>.
        if let Some(i) = parts.iter().position(|c| *c == "docker") {
            if let Some(id) = parts.get(i + 1).filter(|c| is_id(c)) {
                out.container = Some(Container {
                    runtime: "docker",
                    id: (*id).to_owned(),
                });
            }
        }
    }
    out
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
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
                Placement { container: c("podman"), pod: None },
            ),
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
