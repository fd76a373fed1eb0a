//! The daemon's configuration: read (strict YAML) → validated → logged at startup.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::cgroup::{CgroupError, CgroupPath};

/// The configuration the demo runs on, embedded in the binary.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// A YAML file that does not parse into its strict model: where, and what.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct YamlError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses strict YAML (`deny_unknown_fields` models), naming file, line and column on error.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, YamlError> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        YamlError {
            file: file.to_owned(),
            line,
            column,
            message: strip_location(&e.to_string()),
        }
    })
}

/// Parses like [`parse_yaml`], but the message never quotes a value from the text, for a file a
/// secret may be typed into by mistake (the credentials file): serde quotes the scalar it met
/// (`invalid type: string "sk-…"`), and the message goes on to stderr, the log and the audit
/// record of a failed reload. The position, the field path and what was expected stay.
pub fn parse_yaml_without_values<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, YamlError> {
    parse_yaml(text, file).map_err(|mut e| {
        e.message = without_values(&e.message);
        e
    })
}

/// A serde message with the value it quotes from the input left out, the kind kept:
/// `invalid type: string "x", expected a sequence` → `invalid type: string, expected a
/// sequence`; `unknown field `x`, expected …` → `unknown field, expected …`. A message of
/// another form that quotes anything is replaced whole.
fn without_values(msg: &str) -> String {
    const QUOTING: [&str; 4] = [
        "invalid type: ",
        "invalid value: ",
        "unknown field ",
        "unknown variant ",
    ];
    // What follows the value is serde's and the model's, never the input's: the last match
    // is it even when the value holds the same words.
    const AFTER: [&str; 3] = [
        ", expected ",
        ", there are no fields",
        ", there are no variants",
    ];
    for head in QUOTING {
        let Some(start) = msg.find(head).map(|i| i + head.len()) else {
            continue;
        };
        let Some(end) = AFTER.iter().filter_map(|a| msg[start..].rfind(a)).max() else {
            break;
        };
        // The kind is the words before the quoted value (`string`, `integer`, `map`).
        let kind = msg[start..start + end]
            .split(['"', '`'])
            .next()
            .unwrap_or_default()
            .trim_end();
        let before = if kind.is_empty() {
            msg[..start].trim_end()
        } else {
            &msg[..start]
        };
        return format!("{before}{kind}{}", &msg[start + end..]);
    }
    let ours = ["missing field `", "duplicate field `", "invalid length "];
    if msg.contains(['"', '`']) && !ours.iter().any(|o| msg.contains(o)) {
        return "the text does not have the expected form (the message is left out: it \
                would quote the text)"
            .into();
    }
    msg.to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Syntax(#[from] YamlError),
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Cgroup { file: String, source: CgroupError },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Enforced roots: cgroup paths relative to the cgroup2 mount.
    roots: Vec<String>,
    /// The daemon's own leaf cgroup, outside every root.
    gateway_cgroup: String,
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    dns_resolvers: Vec<SocketAddr>,
    policies: PathBuf,
    audit_log: PathBuf,
    #[serde(default = "default_pin_dir")]
    pin_dir: PathBuf,
    #[serde(default)]
    upstream_bind: Option<std::net::IpAddr>,
    #[serde(default)]
    allow_private_bpffs: bool,
    #[serde(default = "default_origin_max_age_ms")]
    origin_max_age_ms: u64,
    #[serde(default = "default_client_header_timeout_ms")]
    client_header_timeout_ms: u64,
    #[serde(default = "default_upstream_header_timeout_ms")]
    upstream_header_timeout_ms: u64,
    #[serde(default = "default_max_connections_per_workload")]
    max_connections_per_workload: usize,
    #[serde(default)]
    relay_idle_timeout_ms: u64,
    #[serde(default = "default_audit_denials_per_second")]
    audit_denials_per_second: u32,
    #[serde(default)]
    test_resolver: BTreeMap<String, SocketAddr>,
    #[serde(default)]
    credentials: Option<PathBuf>,
    #[serde(default)]
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    audit_failure: AuditFailure,
    #[serde(default)]
    socket_guard: SocketGuard,
}

/// What happens to decisions that would allow while the audit sink cannot be written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditFailure {
    /// Refuse (fail closed): nothing goes out that cannot be audited.
    #[default]
    Deny,
    /// Keep allowing; the failure is logged.
    Allow,
}

/// Whether the socket guard (address programs at the cgroup2 root, judging the calling task)
/// runs. Without it, a socket created outside every root and then used inside one (made before
/// its task joined, or passed over SCM_RIGHTS) meets none of the roots' programs.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketGuard {
    /// Attach it; refuse to start when that fails.
    #[default]
    Required,
    /// Run without it (for a daemon that cannot attach at the host's cgroup2 root); the gap
    /// above stays.
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_ipv4")]
    ipv4: Ipv4Addr,
    #[serde(default = "default_ipv6")]
    ipv6: Ipv6Addr,
}

impl Default for RawListener {
    fn default() -> Self {
        Self {
            port: default_port(),
            ipv4: default_ipv4(),
            ipv6: default_ipv6(),
        }
    }
}

/// Below 1024, so a process outside the enforced roots needs CAP_NET_BIND_SERVICE to take it
/// while the daemon is down (inside the roots, the bind hook refuses it to everyone).
pub const DEFAULT_LISTENER_PORT: u16 = 951;
const fn default_port() -> u16 {
    DEFAULT_LISTENER_PORT
}
const fn default_ipv4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}
const fn default_ipv6() -> Ipv6Addr {
    Ipv6Addr::LOCALHOST
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tollgate")
}
const fn default_origin_max_age_ms() -> u64 {
    5_000
}
const fn default_client_header_timeout_ms() -> u64 {
    10_000
}
const fn default_upstream_header_timeout_ms() -> u64 {
    300_000
}
const fn default_max_connections_per_workload() -> usize {
    1_024
}

const fn default_audit_denials_per_second() -> u32 {
    100
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub roots: Vec<CgroupPath>,
    pub gateway_cgroup: CgroupPath,
    pub listener_port: u16,
    pub listener_v4: Ipv4Addr,
    pub listener_v6: Ipv6Addr,
    pub dns_resolvers: Vec<SocketAddr>,
    pub policies: PathBuf,
    pub audit_log: PathBuf,
    pub pin_dir: PathBuf,
    pub upstream_bind: Option<std::net::IpAddr>,
    pub allow_private_bpffs: bool,
    /// How old an origin may be when the gateway takes it; an older one is refused as stale
    /// (a dead client's entry reused). 100 ms to 60 s: long enough for a busy accept queue
    /// and a few SYN retransmissions, short enough that an entry does not live on.
    pub origin_max_age_ms: u64,
    /// How long a workload has to send a request head (or a TLS ClientHello) on a connection,
    /// each time one is due. Separate from the upstream's time to first byte.
    pub client_header_timeout: std::time::Duration,
    /// How long the upstream has to answer a forwarded request with its response head (an
    /// LLM's time to first byte: long).
    pub upstream_header_timeout: std::time::Duration,
    /// How many connections one workload (its container, pod, systemd unit or cgroup below
    /// its root) may hold open through the gateway at once; more are refused. Each takes two
    /// of the daemon's descriptors and a task, so without a cap one workload could take them
    /// all from the others.
    pub max_connections_per_workload: usize,
    /// How long a relayed connection (an L4 or passthrough rule's) may move no byte either way
    /// before the gateway cuts it; `None`: never (a database or event stream may rightly be
    /// quiet for hours).
    pub relay_idle_timeout: Option<std::time::Duration>,
    /// Of the denials alike (one workload, layer, reason, policy and rule), how many are
    /// written whole each second; the rest of the second are counted into one record. A
    /// workload refused in a loop would otherwise fill the audit volume. 0: all whole.
    pub audit_denials_per_second: u32,
    /// Test-only: destinations mapped to local mocks. Always empty in release builds.
    pub test_resolver: BTreeMap<String, SocketAddr>,
    /// The credentials file (bindings of secrets to hosts), if any.
    pub credentials: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream TLS, besides the public roots.
    pub upstream_ca: Option<PathBuf>,
    pub audit_failure: AuditFailure,
    pub socket_guard: SocketGuard,
}

impl Config {
    /// Reads and validates a config file. Relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses config text; `file` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_yaml(text, file)?;
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_owned(),
            message,
        };
        let cg = |s: &str| {
            CgroupPath::parse(s).map_err(|source| ConfigError::Cgroup {
                file: file.to_owned(),
                source,
            })
        };
        if raw.roots.is_empty() {
            return Err(invalid(
                "`roots` is empty: name at least one cgroup to enforce".into(),
            ));
        }
        let roots = raw
            .roots
            .iter()
            .map(|r| cg(r))
            .collect::<Result<Vec<_>, _>>()?;
        let gateway_cgroup = cg(&raw.gateway_cgroup)?;
        if let Some(root) = roots.iter().find(|r| gateway_cgroup.is_within(r)) {
            return Err(invalid(format!(
                "gateway_cgroup {gateway_cgroup} is under the enforced root {root}: \
                 put the gateway in its own cgroup outside every root"
            )));
        }
        if !(100..=60_000).contains(&raw.origin_max_age_ms) {
            return Err(invalid(format!(
                "origin_max_age_ms is {}: use 100 to 60000 (ms)",
                raw.origin_max_age_ms
            )));
        }
        if !(100..=600_000).contains(&raw.client_header_timeout_ms) {
            return Err(invalid(format!(
                "client_header_timeout_ms is {}: use 100 to 600000 (ms)",
                raw.client_header_timeout_ms
            )));
        }
        if !(100..=3_600_000).contains(&raw.upstream_header_timeout_ms) {
            return Err(invalid(format!(
                "upstream_header_timeout_ms is {}: use 100 to 3600000 (ms)",
                raw.upstream_header_timeout_ms
            )));
        }
        if !(1..=1_000_000).contains(&raw.max_connections_per_workload) {
            return Err(invalid(format!(
                "max_connections_per_workload is {}: use 1 to 1000000",
                raw.max_connections_per_workload
            )));
        }
        if raw.relay_idle_timeout_ms != 0
            && !(1_000..=604_800_000).contains(&raw.relay_idle_timeout_ms)
        {
            return Err(invalid(format!(
                "relay_idle_timeout_ms is {}: use 0 (never) or 1000 to 604800000 (ms)",
                raw.relay_idle_timeout_ms
            )));
        }
        if raw.audit_denials_per_second > 1_000_000 {
            return Err(invalid(format!(
                "audit_denials_per_second is {}: use 0 (write every denial whole) or 1 to 1000000",
                raw.audit_denials_per_second
            )));
        }
        if raw.listener.port == 0 {
            return Err(invalid("listener.port must not be 0".into()));
        }
        // A resolver at port 0 would widen what the kernel lets through to its address: UDP to
        // port 0, and in the backstop any UDP packet whose ports it cannot read (seen as 0).
        if let Some(r) = raw.dns_resolvers.iter().find(|r| r.port() == 0) {
            return Err(invalid(format!(
                "dns_resolvers: {r} has port 0: give the resolver's port (53)"
            )));
        }
        if raw.dns_resolvers.len() > gateway_common::MAX_RESOLVERS {
            return Err(invalid(format!(
                "at most {} dns_resolvers are supported",
                gateway_common::MAX_RESOLVERS
            )));
        }
        if !cfg!(feature = "test-resolver") && !raw.test_resolver.is_empty() {
            return Err(invalid(
                "`test_resolver` exists only in test builds (feature test-resolver); remove it"
                    .into(),
            ));
        }
        let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Self {
            roots,
            gateway_cgroup,
            listener_port: raw.listener.port,
            listener_v4: raw.listener.ipv4,
            listener_v6: raw.listener.ipv6,
            dns_resolvers: raw.dns_resolvers,
            policies: anchor(raw.policies),
            audit_log: anchor(raw.audit_log),
            pin_dir: raw.pin_dir,
            upstream_bind: raw.upstream_bind,
            allow_private_bpffs: raw.allow_private_bpffs,
            origin_max_age_ms: raw.origin_max_age_ms,
            client_header_timeout: std::time::Duration::from_millis(raw.client_header_timeout_ms),
            upstream_header_timeout: std::time::Duration::from_millis(
                raw.upstream_header_timeout_ms,
            ),
            max_connections_per_workload: raw.max_connections_per_workload,
            relay_idle_timeout: (raw.relay_idle_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(raw.relay_idle_timeout_ms)),
            audit_denials_per_second: raw.audit_denials_per_second,
            test_resolver: raw.test_resolver,
            credentials: raw.credentials.map(&anchor),
            upstream_ca: raw.upstream_ca.map(&anchor),
            audit_failure: raw.audit_failure,
            socket_guard: raw.socket_guard,
        })
    }

    /// Where the gateway dials for an original destination.
    pub fn upstream_for(&self, orig: SocketAddr) -> SocketAddr {
        self.test_resolver
            .get(&orig.to_string())
            .copied()
            .unwrap_or(orig)
    }

    /// Test builds only: where `host:port` really is (a local mock). Counts as naming the
    /// address explicitly, so internal addresses are allowed for it.
    pub fn test_override(&self, host: &str, port: u16) -> Option<SocketAddr> {
        if cfg!(feature = "test-resolver") {
            self.test_resolver.get(&format!("{host}:{port}")).copied()
        } else {
            None
        }
    }
}

/// A YAML error message without the trailing "at line L column C" (the location is printed
/// first, as file:line:column).
pub fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(" column ") => msg[..i].to_owned(),
        _ => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "roots: [/tg]\ngateway_cgroup: /tg-gw\npolicies: p\naudit_log: /tmp/a\n";

    #[test]
    fn parses_minimal_config_with_defaults() {
        let c = Config::parse(GOOD, "c.yaml", Path::new("/etc/tollgate")).expect("config");
        assert_eq!(c.listener_port, 951);
        assert_eq!(c.policies, PathBuf::from("/etc/tollgate/p"));
        assert_eq!(c.roots[0].as_str(), "/tg");
    }

    #[test]
    fn socket_guard_is_on_unless_turned_off() {
        let on = Config::parse(GOOD, "c.yaml", Path::new("/")).expect("config");
        assert_eq!(on.socket_guard, SocketGuard::Required);
        let text = format!("{GOOD}socket_guard: off\n");
        let off = Config::parse(&text, "c.yaml", Path::new("/")).expect("off");
        assert_eq!(off.socket_guard, SocketGuard::Off);
        let text = format!("{GOOD}socket_guard: maybe\n");
        let err = Config::parse(&text, "c.yaml", Path::new("/")).expect_err("bad value");
        assert!(err.to_string().contains("c.yaml:"), "{err}");
        assert!(err.to_string().contains("socket_guard"), "{err}");
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let text = format!("{GOOD}listner: {{}}\n");
        let err = Config::parse(&text, "c.yaml", Path::new("/")).expect_err("unknown field");
        let msg = err.to_string();
        assert!(msg.starts_with("c.yaml:5:"), "{msg}");
        assert!(msg.contains("listner"), "{msg}");
    }

    #[test]
    fn gateway_inside_root_is_refused() {
        let text = "roots: [/tg]\ngateway_cgroup: /tg/gw\npolicies: p\naudit_log: a\n";
        let err = Config::parse(text, "c.yaml", Path::new("/")).expect_err("inside root");
        assert!(err.to_string().contains("outside every root"), "{err}");
    }

    #[test]
    fn test_resolver_exists_only_in_test_builds() {
        let text =
            format!("{GOOD}test_resolver: {{ \"api.openai.com:443\": \"127.0.0.1:8443\" }}\n");
        let parsed = Config::parse(&text, "c.yaml", Path::new("/"));
        if cfg!(feature = "test-resolver") {
            let c = parsed.expect("test build");
            assert_eq!(
                c.test_override("api.openai.com", 443),
                Some("127.0.0.1:8443".parse().expect("addr"))
            );
            assert_eq!(c.test_override("api.openai.com", 80), None);
        } else {
            assert!(parsed
                .expect_err("release build")
                .to_string()
                .contains("only in test builds"));
        }
    }

    #[test]
    fn origin_max_age_is_bounded() {
        for (ms, ok) in [
            (0, false),
            (99, false),
            (100, true),
            (60_000, true),
            (60_001, false),
            (86_400_000, false),
            (u64::MAX, false),
        ] {
            let text = format!("{GOOD}origin_max_age_ms: {ms}\n");
            match Config::parse(&text, "c.yaml", Path::new("/")) {
                Ok(c) => {
                    assert!(ok, "{ms} accepted");
                    assert_eq!(c.origin_max_age_ms, ms);
                }
                Err(e) => {
                    assert!(!ok, "{ms} refused: {e}");
                    let msg = e.to_string();
                    assert!(
                        msg.contains("origin_max_age_ms") && msg.contains("100 to 60000"),
                        "{msg}"
                    );
                }
            }
        }
    }

    #[test]
    fn numeric_settings_out_of_range_are_refused() {
        for (setting, refusal) in [
            ("client_header_timeout_ms: 0", "use 100 to 600000"),
            ("client_header_timeout_ms: 600001", "use 100 to 600000"),
            ("upstream_header_timeout_ms: 0", "use 100 to 3600000"),
            ("upstream_header_timeout_ms: 3600001", "use 100 to 3600000"),
            ("max_connections_per_workload: 0", "use 1 to 1000000"),
            (
                "relay_idle_timeout_ms: 999",
                "use 0 (never) or 1000 to 604800000",
            ),
            (
                "relay_idle_timeout_ms: 604800001",
                "use 0 (never) or 1000 to 604800000",
            ),
            ("max_connections_per_workload: 1000001", "use 1 to 1000000"),
            (
                "audit_denials_per_second: 1000001",
                "use 0 (write every denial whole) or 1 to 1000000",
            ),
            ("audit_denials_per_second: -1", "audit_denials_per_second"),
            (
                "max_connections_per_workload: -1",
                "max_connections_per_workload",
            ),
            ("listener: { port: 0 }", "listener.port must not be 0"),
            ("listener: { port: 65536 }", "listener.port"),
            (
                "dns_resolvers: [\"127.0.0.53:0\"]",
                "127.0.0.53:0 has port 0",
            ),
            ("dns_resolvers: [\"[::1]:0\"]", "[::1]:0 has port 0"),
            (
                "dns_resolvers: [\"127.0.0.1:53\", \"127.0.0.2:53\", \"127.0.0.3:53\", \
                 \"127.0.0.4:53\", \"127.0.0.5:53\"]",
                "at most 4 dns_resolvers",
            ),
        ] {
            let text = format!("{GOOD}{setting}\n");
            let err = Config::parse(&text, "c.yaml", Path::new("/")).expect_err(setting);
            assert!(err.to_string().contains(refusal), "{setting}: {err}");
        }
        let text = format!("{GOOD}dns_resolvers: [\"127.0.0.53:53\", \"[::1]:53\"]\n");
        Config::parse(&text, "c.yaml", Path::new("/")).expect("resolvers on port 53");
        let text = format!("{GOOD}max_connections_per_workload: 1\n");
        let c = Config::parse(&text, "c.yaml", Path::new("/")).expect("a cap of 1");
        assert_eq!(c.max_connections_per_workload, 1);
        let c = Config::parse(GOOD, "c.yaml", Path::new("/")).expect("default");
        assert_eq!(c.max_connections_per_workload, 1_024);
        assert_eq!(c.relay_idle_timeout, None, "never, unless set");
        assert_eq!(c.audit_denials_per_second, 100);
        let text = format!("{GOOD}relay_idle_timeout_ms: 3600000\n");
        let c = Config::parse(&text, "c.yaml", Path::new("/")).expect("an hour");
        assert_eq!(
            c.relay_idle_timeout,
            Some(std::time::Duration::from_secs(3600))
        );
    }

    #[test]
    fn demo_config_is_valid() {
        Config::parse(DEMO_CONFIG, "demo", Path::new("/")).expect("demo config");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../../deploy/tollgate.example.yaml");
        let c = Config::parse(text, "tollgate.example.yaml", Path::new("/etc/tollgate"))
            .expect("example config");
        assert_eq!(c.max_connections_per_workload, 1_024);
        assert_eq!(c.relay_idle_timeout, None);
        assert_eq!(c.audit_denials_per_second, 100);
    }
}
