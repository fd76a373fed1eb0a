//! The container image the DaemonSet runs: an OCI image archive holding the daemon and the
//! shared libraries it loads (what `ldd` names), and nothing else: no shell, no package
//! manager, nothing a compromised daemon could use that it does not already have.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::{output_ok, run};

/// What the image runs: the daemon, on the config the DaemonSet mounts (its `args` replace
/// the command, not the entrypoint).
const ENTRYPOINT: &str = "/usr/local/bin/tollgate";
const CMD: [&str; 3] = ["run", "--config", "/etc/tollgate/tollgate.yaml"];
/// The name the image loads as (`tollgate:latest`, as the DaemonSet names it).
const NAME: &str = "docker.io/library/tollgate:latest";
const TAG: &str = "latest";

/// Where `cargo xtask image` writes the archive.
pub fn archive_path(root: &Path) -> PathBuf {
    root.join("target/image/tollgate-oci.tar")
}

/// Writes the OCI image archive for `binary` to `out`: one layer, made reproducibly (sorted,
/// owned by root, dated 1970), so the same binary gives the same image digest.
pub fn build(binary: &Path, out: &Path) -> Result<()> {
    let work = out.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    place(binary, &rootfs.join(ENTRYPOINT.trim_start_matches('/')))?;
    for lib in libraries(binary)? {
        place(&lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
    }
    // Mount points the DaemonSet fills (config, audit log, admin socket, bpffs), and the
    // runtime's own.
    for dir in [
        "etc/tollgate",
        "var/log/tollgate",
        "run/tollgate",
        "sys",
        "proc",
        "dev",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    let layer = work.join("layer.tar");
    run(&mut reproducible_tar(&layer, &rootfs))?;
    let diff_id = sha256_file(&layer)?;
    run(Command::new("gzip").args(["-n", "-9", "-f"]).arg(&layer))?;
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let gz = layer.with_extension("tar.gz");
    let layer_digest = sha256_file(&gz)?;
    let layer_size = std::fs::metadata(&gz)?.len();
    std::fs::rename(&gz, blobs.join(&layer_digest))?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": CMD,
            "Labels": { "org.opencontainers.image.title": "tollgate" },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created_by": "cargo xtask image" }],
    });
    let (config_digest, config_size) = blob(&blobs, &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = blob(&blobs, &manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "annotations": {
                "org.opencontainers.image.ref.name": TAG,
                "io.containerd.image.name": NAME,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    run(&mut reproducible_tar(out, &layout))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Checks the archive at `archive` as a runtime takes it: umoci verifies every digest while
/// it unpacks the image into a bundle, the bundle runs what the DaemonSet expects, it holds
/// nothing but the daemon and its libraries, and the daemon runs in it with nothing else
/// (`policy check` of `policies`, chrooted into the image's root).
pub fn check(archive: &Path, policies: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tg-image-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let checked = check_in(&dir, archive, policies);
    let _ = std::fs::remove_dir_all(&dir);
    checked
}

fn check_in(dir: &Path, archive: &Path, policies: &Path) -> Result<()> {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&layout))?;
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{TAG}", layout.display()))
        .arg(&bundle))?;
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let args: Vec<&str> = spec["process"]["args"]
        .as_array()
        .context("the bundle's config.json has no process.args")?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let expected: Vec<&str> = std::iter::once(ENTRYPOINT).chain(CMD).collect();
    if args != expected {
        bail!("the image runs {args:?}, not {expected:?}");
    }
    let rootfs = bundle.join("rootfs");
    let files = output_ok(Command::new("find").arg(&rootfs).args(["-type", "f"]))
        .context("list the image's files")?;
    let mut names: Vec<&str> = files
        .lines()
        .filter_map(|f| f.strip_prefix(rootfs.to_str()?))
        .collect();
    names.sort_unstable();
    let daemon_and_libraries =
        names.contains(&ENTRYPOINT) && names.iter().all(|f| *f == ENTRYPOINT || f.contains(".so"));
    if !daemon_and_libraries {
        bail!("the image should hold the daemon and its libraries only, not {names:?}");
    }
    run(Command::new("cp")
        .arg("-r")
        .arg(policies)
        .arg(rootfs.join("etc/tollgate/policies")))?;
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args([ENTRYPOINT, "policy", "check", "/etc/tollgate/policies"])
        .output()
        .context("chroot into the image")?;
    if !out.status.success() {
        bail!(
            "the daemon does not run in its image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask: image {} unpacks (digests verified), runs {ENTRYPOINT} {}, holds {} files, and the daemon runs in it: {}",
        archive.display(),
        CMD.join(" "),
        names.len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

/// The shared libraries `binary` loads, and its interpreter, as `ldd` finds them here.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, to)) => to.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `from` (following links: the image has no other copy to point to) to `to`.
fn place(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copy {} into the image", from.display()))?;
    Ok(())
}

/// `tar` of `dir`'s contents into `out`, the same bytes for the same files.
fn reproducible_tar(out: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("tar");
    cmd.arg("--create")
        .arg("--file")
        .arg(out)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "--format=gnu",
        ])
        .arg("-C")
        .arg(dir)
        .arg(".");
    cmd
}

/// Writes `value` as a blob, returning its digest (hex) and size.
fn blob(blobs: &Path, value: &serde_json::Value) -> Result<(String, usize)> {
    let bytes = serde_json::to_vec(value)?;
    let digest = hex(&Sha256::digest(&bytes));
    std::fs::write(blobs.join(&digest), &bytes)?;
    Ok((digest, bytes.len()))
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
