//! Bad input: a clear one-line error naming the thing, a non-zero exit, nothing half-attached.
use std::process::Command;

use tollgate_tests::{tollgate_bin, Mock, TestEnv};

fn run_once(env: &TestEnv) -> (bool, String) {
    let out = Command::new(tollgate_bin())
        .args(["run", "--config"])
        .arg(&env.config)
        .output()
        .expect("tollgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `tollgate run` on the env's config through `wrapper` (a command that runs the rest of
/// its arguments), expects it to fail, and returns its stderr.
fn fails_through(env: &TestEnv, wrapper: &mut Command) -> String {
    let out = wrapper
        .arg(tollgate_bin())
        .args(["run", "--config"])
        .arg(&env.config)
        .output()
        .expect("run tollgate");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the shell `script` in a private mount namespace, expects it to fail, and returns its
/// stderr.
fn fails_in_own_mounts(script: &str) -> String {
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("unshare");
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one error line (log lines, if any, come before it).
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rfind(|l| l.starts_with("tollgate: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"))
}

fn assert_nothing_attached(env: &TestEnv) {
    assert!(
        !env.dir.join("bpffs/tollgate").exists(),
        "no pins left behind"
    );
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 0),
        "nothing attached: {counts}"
    );
}

#[test]
fn a_policy_that_does_not_parse_stops_before_the_kernel() {
    let env = TestEnv::new("badpolicy");
    std::fs::write(env.policies.join("broken.yaml"), "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: x }\nspec:\n  workload: { cgroup: /a }\n  egres: []\n").expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    let line = error_line(&stderr);
    assert!(line.contains("broken.yaml:6:"), "{line}");
    assert!(line.contains("egres"), "{line}");
    assert_nothing_attached(&env);

    let check = Command::new(tollgate_bin())
        .args(["policy", "check"])
        .arg(&env.policies)
        .output()
        .expect("check");
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("broken.yaml:6:"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn a_missing_root_or_a_bad_config_is_named() {
    let env = TestEnv::new("noroot");
    let good = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(
        &env.config,
        good.replace(&env.root_rel(), "/tg-test-no-such-root.slice"),
    )
    .expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    let line = error_line(&stderr);
    assert!(
        line.contains("tg-test-no-such-root.slice") && line.contains("does not exist"),
        "{line}"
    );
    assert!(!env.dir.join("bpffs/tollgate").exists());

    std::fs::write(&env.config, format!("{good}listner: {{}}\n")).expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    let line = error_line(&stderr);
    assert!(
        line.contains("tollgate.yaml:10:") && line.contains("listner"),
        "{line}"
    );
    std::fs::write(&env.config, good).expect("restore");
    assert_nothing_attached(&env);
}

#[test]
fn a_pin_dir_off_bpffs_and_a_private_namespace_are_refused() {
    let env = TestEnv::new("bpffs");
    let good = std::fs::read_to_string(&env.config).expect("config");
    let plain = env.dir.join("plain/tollgate");
    std::fs::write(
        &env.config,
        good.replace(
            &env.dir.join("bpffs/tollgate").display().to_string(),
            &plain.display().to_string(),
        ),
    )
    .expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    assert!(
        error_line(&stderr).contains("is not on a bpffs"),
        "{stderr}"
    );
    assert!(!plain.exists());

    std::fs::write(
        &env.config,
        good.replace("allow_private_bpffs: true", "allow_private_bpffs: false"),
    )
    .expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    assert!(
        error_line(&stderr).contains("private mount namespace"),
        "{stderr}"
    );
    assert_nothing_attached(&env);
}

#[test]
fn a_pid_namespace_of_its_own_is_refused() {
    let env = TestEnv::new("pidns");
    let stderr = fails_through(
        &env,
        Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "--"]),
    );
    let line = error_line(&stderr);
    assert!(
        line.contains("runs in a pid namespace of its own") && line.contains("hostPID"),
        "{line}"
    );
    assert_nothing_attached(&env);
}

/// Without one capability it needs (here, what lets it read other users' processes in
/// /proc), the daemon names it and stops before attaching anything; with the unit's set it
/// starts (every other test's daemon runs with exactly that set).
#[test]
fn a_missing_capability_is_named_before_anything_is_attached() {
    let env = TestEnv::new("caps");
    let stderr = fails_through(
        &env,
        Command::new("setpriv").args([
            "--bounding-set",
            &tollgate_tests::unit_bounding_set(&["CAP_SYS_PTRACE"]),
            "--",
        ]),
    );
    let line = error_line(&stderr);
    assert!(
        line.contains("lacks capabilities it needs: CAP_SYS_PTRACE (reading a workload's")
            && line.contains("CapabilityBoundingSet="),
        "{line}"
    );
    assert_nothing_attached(&env);
}

#[test]
fn a_second_daemon_is_refused_and_the_first_keeps_working() {
    let mut env = TestEnv::new("second");
    let mock = Mock::start("127.0.0.1:0");
    let app = env.workload("app.service");
    env.allow("app", "app.service", &[mock.addr]);
    let _d = env.start();
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    assert!(
        error_line(&stderr).contains("another tollgate is running"),
        "{stderr}"
    );
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 1),
        "still exactly one of each: {counts}"
    );
    let p = env.probe(Some(&app), &["tcp", &mock.addr.to_string()]);
    assert_eq!(p["ok"], true, "{p}");
}

#[test]
fn a_kernel_without_bpf_or_cgroup2_is_named() {
    let env = TestEnv::new("nokernel");
    // bpf(2) refused (EPERM), as on a kernel without it or without the privilege.
    let stderr = fails_through(
        &env,
        Command::new(tollgate_tests::probe_bin()).arg("no-bpf"),
    );
    assert!(error_line(&stderr).contains("no BPF syscall"), "{stderr}");
    assert_nothing_attached(&env);

    // No cgroup2 mounted: the daemon runs in a mount namespace where it is unmounted.
    let script = format!(
        "umount -l {} && exec {} run --config {}",
        env.mount.display(),
        tollgate_bin().display(),
        env.config.display()
    );
    let stderr = fails_in_own_mounts(&script);
    assert!(
        error_line(&stderr).contains("no cgroup2 filesystem is mounted"),
        "{stderr}"
    );
    assert_nothing_attached(&env);

    // No tracefs (a kernel without syscall tracepoints looks the same to the daemon): the
    // daemon runs in a mount namespace where an empty tmpfs covers both places it can be.
    let script = format!(
        "mount -t tmpfs none /sys/kernel/tracing && mount -t tmpfs none /sys/kernel/debug && \
         exec {} run --config {}",
        tollgate_bin().display(),
        env.config.display()
    );
    let stderr = fails_in_own_mounts(&script);
    let line = error_line(&stderr);
    assert!(
        line.contains("to the tracepoint syscalls/sys_enter_recvmsg")
            && line.contains("tracefs")
            && line.contains("socket_guard: off"),
        "{stderr}"
    );
    assert_nothing_attached(&env);
}

#[test]
fn unreadable_policies_and_impossible_selectors_are_named() {
    let env = TestEnv::new("unreadable");
    // A policy "file" that cannot be read as one.
    std::fs::create_dir_all(env.policies.join("team.yaml")).expect("dir");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    let line = error_line(&stderr);
    assert!(
        line.contains("cannot read policy") && line.contains("team.yaml"),
        "{line}"
    );
    assert_nothing_attached(&env);
    std::fs::remove_dir(env.policies.join("team.yaml")).expect("rmdir");

    // A selector no runtime layout can produce.
    std::fs::write(
        env.policies.join("pod.yaml"),
        "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: pod }\nspec:\n  workload: { container_id: not-a-container }\n",
    )
    .expect("write");
    let (ok, stderr) = run_once(&env);
    assert!(!ok);
    let line = error_line(&stderr);
    assert!(
        line.contains("pod.yaml") && line.contains("container_id"),
        "{line}"
    );
    assert_nothing_attached(&env);
}

/// Creates an array map with the given shape and pins it at `path` (raw bpf(2): the test makes
/// what an older or foreign build could have left behind).
fn pin_array(path: &std::path::Path, value_size: u32, max_entries: u32, flags: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries, flags]);
    // SAFETY: bpf(2) with a zeroed, large enough attribute block.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    std::fs::create_dir_all(path.parent().expect("parent")).expect("maps dir");
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut pin = [0u64; 4];
    pin[0] = name.as_ptr() as u64;
    pin[1] = u64::try_from(fd).expect("fd");
    // SAFETY: bpf(2) with a pathname that outlives the call and the map's fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            pin.as_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(r, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: our own fd; the pin keeps the map.
    unsafe { libc::close(i32::try_from(fd).expect("fd")) };
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_not_adopted() {
    let env = TestEnv::new("maplayout");
    let origins = env.dir.join("bpffs/tollgate/maps/TG_ORIGINS");
    // Type, key, value size and capacity all as this build expects; only the flags differ
    // (BPF_F_MMAPABLE), so every part of the check must hold for the refusal.
    pin_array(&origins, 104, 65_536, 1 << 10);
    let (ok, stderr) = run_once(&env);
    assert!(!ok, "started on a foreign map: {stderr}");
    let line = error_line(&stderr);
    assert!(
        line.contains("TG_ORIGINS") && line.contains("different layout"),
        "{line}"
    );
    assert!(origins.exists(), "someone else's pin is left alone");
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 0),
        "nothing attached: {counts}"
    );
    assert!(
        !env.dir.join("bpffs/tollgate/links").exists(),
        "no links pinned"
    );
    // Control: without the foreign map the same environment starts and enforces.
    std::fs::remove_file(&origins).expect("unpin");
    let _d = env.start();
    let counts = env.attachments();
    assert!(
        counts.as_object().expect("counts").values().all(|n| n == 1),
        "attached once each: {counts}"
    );
}

/// `policy check --credentials FILE` refuses what the daemon would refuse at start: a rule
/// naming a credential the file does not define. Without the flag the policies alone pass.
#[test]
fn policy_check_with_credentials_names_a_binding_the_file_lacks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tg-check-credentials-{}", std::process::id()));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("dir");
    let private = |path: &std::path::Path, text: &str| {
        std::fs::write(path, text).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    std::fs::write(
        policies.join("agent.yaml"),
        "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: agent }\nspec:\n  workload: { cgroup: /agents }\n  egress:\n    - name: openai\n      match: { host: api.openai.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      credential: openai-prod\n",
    )
    .expect("policy");
    private(&dir.join("other.key"), "not-a-real-key");
    private(
        &dir.join("credentials.yaml"),
        "bindings:\n  - name: other\n    hosts: [api.openai.com]\n    inject: { header: Authorization, format: \"Bearer {secret}\" }\n    source: { file: other.key }\n",
    );
    let check = |extra: &[&std::path::Path]| {
        Command::new(tollgate_bin())
            .args(["policy", "check"])
            .arg(&policies)
            .args(
                extra
                    .iter()
                    .flat_map(|p| [std::path::Path::new("--credentials"), p]),
            )
            .output()
            .expect("check")
    };
    let alone = check(&[]);
    let with = check(&[&dir.join("credentials.yaml")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(alone.status.success(), "{alone:?}");
    assert!(!with.status.success(), "{with:?}");
    let stderr = String::from_utf8_lossy(&with.stderr);
    assert!(
        stderr.contains("agent.yaml")
            && stderr.contains("\"openai-prod\"")
            && stderr.contains("does not define"),
        "{stderr}"
    );
}
