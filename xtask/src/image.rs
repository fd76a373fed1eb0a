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
/// owned by root, dated 1970, modes fixed), so the same binary built on the same host (whose
/// libraries go in too) gives the same image digest. Nothing is left at `out` if it fails.
pub fn build(binary: &Path, out: &Path) -> Result<()> {
    in_scratch(&out.with_extension("work"), |work| {
        build_in(work, binary, out)
    })
}

/// Runs `f` on the directory `dir`, made empty first and removed after, however `f` ends.
fn in_scratch(dir: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let done = f(dir);
    let _ = std::fs::remove_dir_all(dir);
    done
}

fn build_in(work: &Path, binary: &Path, out: &Path) -> Result<()> {
    let rootfs = work.join("rootfs");
    place(binary, &rootfs.join(ENTRYPOINT.trim_start_matches('/')))?;
    for (at, file) in libraries(binary)? {
        place(&file, &rootfs.join(at.strip_prefix("/").unwrap_or(&at)))?;
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
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    // Host names from the files the runtime mounts (/etc/hosts), then DNS, whatever glibc's
    // default without this file.
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
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
    let architecture = oci_architecture()?;
    let config = serde_json::json!({
        "architecture": architecture,
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
            "platform": { "architecture": architecture, "os": "linux" },
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
    let partial = work.join("image.tar");
    run(&mut reproducible_tar(&partial, &layout))?;
    std::fs::rename(&partial, out).with_context(|| format!("write {}", out.display()))?;
    Ok(())
}

/// The build host's architecture as OCI names it: the image holds this host's binary.
fn oci_architecture() -> Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "riscv64" => "riscv64",
        other => bail!("no OCI name known for the architecture {other}"),
    })
}

/// Checks the archive at `archive` as a runtime takes it: umoci verifies every digest while
/// it unpacks the image into a bundle, the bundle runs what the DaemonSet expects, it holds
/// nothing but the daemon and its libraries, and the daemon runs in it with nothing else
/// (`policy check` of `policies`, chrooted into the image's root).
pub fn check(archive: &Path, policies: &Path) -> Result<()> {
    in_scratch(&archive.with_extension("check"), |dir| {
        check_in(dir, archive, policies)
    })
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
    let daemon_and_libraries = names.contains(&ENTRYPOINT)
        && names
            .iter()
            .all(|f| *f == ENTRYPOINT || *f == "/etc/nsswitch.conf" || f.contains(".so"));
    if !daemon_and_libraries {
        bail!("the image should hold the daemon and its libraries only, not {names:?}");
    }
    run(Command::new("cp")
        .arg("-r")
        .arg(policies)
        .arg(rootfs.join("etc/tollgate/policies")))?;
    // As a runtime starts it: nothing from this environment (no LD_LIBRARY_PATH of cargo's),
    // a PATH only to find chroot.
    let out = Command::new("chroot")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
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

/// The shared libraries `binary` loads and its interpreter, as `ldd` finds them here: where
/// each goes in the image, and the file to put there (an interpreter `ldd` prints as
/// `PATH => FILE` goes at the path the binary names).
fn libraries(binary: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = Command::new("ldd")
        .env_remove("LD_LIBRARY_PATH")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("not a dynamic executable") {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_ldd(&text).with_context(|| format!("the libraries of {}", binary.display()))
}

/// `ldd`'s lines as (where in the image, which file).
fn parse_ldd(text: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        let (at, file) = match line.split_once("=>") {
            Some((name, to)) => {
                let file = to.trim().split(' ').next().unwrap_or("");
                if file == "not" {
                    bail!("{} is needed and not on this host", name.trim());
                }
                let name = name.trim();
                (if name.starts_with('/') { name } else { file }, file)
            }
            None => {
                let path = line.split(' ').next().unwrap_or("");
                (path, path)
            }
        };
        if at.starts_with('/') && file.starts_with('/') {
            found.push((PathBuf::from(at), PathBuf::from(file)));
        }
    }
    Ok(found)
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
            "--mode=go-w,a+rX",
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::parse_ldd;

    #[test]
    fn ldd_lines_place_libraries_where_found_and_the_interpreter_where_named() {
        let debian = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let other = "\t/lib64/ld-linux-x86-64.so.2 => /usr/lib/ld-linux-x86-64.so.2 (0x00007f)\n";
        let pair = |at: &str, file: &str| (PathBuf::from(at), PathBuf::from(file));
        assert_eq!(
            parse_ldd(debian).expect("parsed"),
            [
                pair(
                    "/lib/x86_64-linux-gnu/libc.so.6",
                    "/lib/x86_64-linux-gnu/libc.so.6"
                ),
                pair("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert_eq!(
            parse_ldd(other).expect("parsed"),
            [pair(
                "/lib64/ld-linux-x86-64.so.2",
                "/usr/lib/ld-linux-x86-64.so.2"
            )]
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").expect_err("missing");
        assert!(missing.to_string().contains("libfoo.so.1"), "{missing}");
    }
}
