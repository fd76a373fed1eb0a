//! Egress policy: raw YAML model → compiled form → a pure, synchronous `evaluate`.
//!
//! Selection: a policy names its workload by any of `cgroup` (that cgroup and everything below
//! it), `container_id` (full id, or a prefix of at least 12 digits), `pod_uid` and `unit`; all
//! that it names must match. `exe` and `uid` only narrow. Among the policies that apply, a
//! container selector beats a pod selector beats a unit selector beats a cgroup one, then the
//! deeper cgroup, then more narrowing fields; two policies that could tie are a compile error. Within the chosen policy,
//! rules are tried in file order and the first match decides. Nothing chosen, or no rule
//! matched: deny.
use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use crate::{cgroup::CgroupPath, config::parse_yaml};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Syntax(#[from] crate::config::YamlError),
    #[error("{file}{}: {message}", at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Invalid {
        file: String,
        /// Line and column (1-based) of what the message is about, when it can be found.
        at: Option<(usize, usize)>,
        message: String,
    },
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    api_version: String,
    kind: String,
    metadata: RawMetadata,
    spec: RawSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    workload: RawWorkload,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    egress: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    #[serde(default)]
    cgroup: Option<String>,
    #[serde(default)]
    container_id: Option<String>,
    #[serde(default)]
    pod_uid: Option<String>,
    /// A systemd unit (`billing.service`): the cgroup path's innermost unit.
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    exe: Option<PathBuf>,
    #[serde(default)]
    uid: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match")]
    matches: RawMatch,
    #[serde(default)]
    upstream: Option<RawUpstream>,
    #[serde(default)]
    tls: Option<TlsMode>,
    #[serde(default)]
    http: Vec<RawHttp>,
    #[serde(default)]
    credential: Option<String>,
    /// Lets the policy host resolve to loopback, private, link-local or metadata addresses.
    #[serde(default)]
    allow_private: bool,
    /// At most this many requests through the rule per period.
    #[serde(default)]
    budget: Option<RawBudget>,
    /// How long a relayed connection of the rule may move no byte (0: never); without it, the
    /// gateway's `relay_idle_timeout_ms`.
    #[serde(default)]
    idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    #[serde(default)]
    requests: Option<u32>,
    /// Input and output tokens, as the answers' `usage` counts them.
    #[serde(default)]
    tokens: Option<u64>,
    per: String,
    /// `rule` (one budget for every workload the policy selects) or `workload` (one each).
    #[serde(default)]
    scope: Option<String>,
    /// Output tokens a request that states no limit reserves (a tokens budget only).
    #[serde(default)]
    reserve_output: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    cidr: Option<String>,
    #[serde(default)]
    host: Option<String>,
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    /// Header name → the value it must have (`"*"`: only present).
    #[serde(default)]
    require_headers: std::collections::BTreeMap<String, String>,
    /// Headers that must be absent.
    #[serde(default)]
    forbid_headers: Vec<String>,
    /// Models the JSON body's `model` may name (`*` matches any run of characters).
    #[serde(default)]
    models: Vec<String>,
}

/// How a host rule handles TLS.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The workload speaks plain HTTP to the API's name; the gateway speaks TLS upstream,
    /// verifying the certificate for that name.
    Originate,
    /// Plain HTTP both ways (internal services; never with a credential).
    None,
    /// Allow or deny on the TLS SNI (identity + name) and splice the bytes; the gateway dials
    /// the SNI name it resolves itself. No injection is possible.
    Passthrough,
}

/// A host name pattern: exact, or `*.` and a suffix (one or more labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let (wild, rest) = match s.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let (name, port) =
            crate::normalize::host(rest).map_err(|e| format!("host {s:?}: {}", e.as_str()))?;
        if port.is_some() {
            return Err(format!("host {s:?}: put the port in `port`"));
        }
        Ok(Self(if wild { format!("*.{name}") } else { name }))
    }

    pub fn matches(&self, host: &str) -> bool {
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => self.0 == host,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A path pattern: exact (`/v1/models`), everything below (`/v1/files/*`), or with `*` standing
/// for one segment (`/v1/threads/*/runs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let normalized = crate::normalize::path(&s.replace('*', "x"))
            .map_err(|e| format!("path {s:?}: {}", e.as_str()))?;
        // A request's path is matched normalized, without a trailing slash: a pattern with
        // one would match nothing.
        if normalized.len() != s.len() && s != "/" {
            return Err(format!(
                "path {s:?}: write it normalized (no `..`, `//`, `%2e` or trailing slash)"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// Segment by segment, `*` standing for one non-empty segment; a trailing `/*` stands for
    /// everything below (`/v1/threads/*/runs/*` matches `/v1/threads/t1/runs/r1/steps`).
    pub fn matches(&self, path: &str) -> bool {
        let (pattern, below) = match self.0.strip_suffix("/*") {
            Some(prefix) => (prefix, true),
            None => (self.0.as_str(), false),
        };
        let mut got = path.split('/');
        for p in pattern.split('/') {
            match got.next() {
                Some(g) if p == g || p == "*" && !g.is_empty() => {}
                _ => return false,
            }
        }
        match got.next() {
            None => !below,
            Some(_) => below,
        }
    }
}

/// A model name pattern: exact, with `*` standing for any run of characters (`o3-*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPattern(String);

impl ModelPattern {
    /// The longest model name a pattern may spell out.
    const MAX: usize = 200;

    fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > Self::MAX || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "model {s:?}: use 1 to {} printable characters without spaces",
                Self::MAX
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn matches(&self, model: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = model.strip_prefix(first) else {
            return false;
        };
        let mut parts = parts.peekable();
        if parts.peek().is_none() {
            return rest.is_empty();
        }
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                return rest.len() >= part.len() && rest.ends_with(part);
            }
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// What is known of the request body's model when a request is decided.
#[derive(Debug, Clone, Copy)]
pub enum Model<'a> {
    /// The body has not been read: a rule that limits models answers
    /// [`RequestDecision::NeedsModel`].
    Unread,
    /// The body was read: its top-level `"model"` string, if it had one.
    Read(Option<&'a str>),
}

/// Which requests a host rule lets through.
#[derive(Debug, Clone)]
pub struct HttpMatch {
    /// Upper-case; empty: any method.
    methods: Vec<String>,
    /// Empty: any path.
    paths: Vec<PathPattern>,
    /// Headers that must be present, with the exact value when one is given.
    require: Vec<(http::HeaderName, Option<String>)>,
    /// Headers that must be absent.
    forbid: Vec<http::HeaderName>,
    /// Empty: any body. Else the JSON body's `model` must match one.
    models: Vec<ModelPattern>,
}

impl HttpMatch {
    fn allows_line(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }

    /// Every required header goes upstream with exactly one value (equal to the one asked for,
    /// if any): of two, the upstream might read the other. No forbidden header was sent, whether
    /// it goes upstream (`forwarded`) or the gateway took it out (`removed`).
    fn allows_headers(&self, forwarded: &http::HeaderMap, removed: &http::HeaderMap) -> bool {
        self.require.iter().all(|(name, want)| {
            let mut values = forwarded.get_all(name).iter();
            match (values.next(), values.next()) {
                (Some(value), None) => want
                    .as_ref()
                    .is_none_or(|want| value.as_bytes().trim_ascii() == want.as_bytes()),
                _ => false,
            }
        }) && self
            .forbid
            .iter()
            .all(|name| !forwarded.contains_key(name) && !removed.contains_key(name))
    }

    /// Whether the model allows this entry; `None` while the body is unread and it matters.
    fn allows_model(&self, model: Model<'_>) -> Option<bool> {
        if self.models.is_empty() {
            return Some(true);
        }
        match model {
            Model::Unread => None,
            Model::Read(m) => Some(m.is_some_and(|m| self.models.iter().any(|p| p.matches(m)))),
        }
    }
}

/// A rule on a destination name, decided per request.
#[derive(Debug, Clone)]
pub struct HostRule {
    pub host: HostPattern,
    pub port: u16,
    pub upstream_port: u16,
    pub tls: TlsMode,
    http: Vec<HttpMatch>,
    pub credential: Option<String>,
    pub allow_private: bool,
    pub budget: Option<crate::budget::Budget>,
    /// A passthrough rule's: how long its relayed connections may stay quiet.
    pub idle: IdleTimeout,
}

/// How long a relayed connection (an L4 or passthrough rule's) may move no byte either way
/// before the gateway cuts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdleTimeout {
    /// The gateway's `relay_idle_timeout_ms`.
    #[default]
    Gateway,
    Never,
    After(std::time::Duration),
}

impl IdleTimeout {
    /// The limit that applies, where the gateway's own is `gateway` (`None`: never).
    pub fn or_gateway(self, gateway: Option<std::time::Duration>) -> Option<std::time::Duration> {
        match self {
            Self::Gateway => gateway,
            Self::Never => None,
            Self::After(d) => Some(d),
        }
    }

    /// From a rule's `idle_timeout_ms`.
    fn parse(ms: Option<u64>) -> Result<Self, String> {
        match ms {
            None => Ok(Self::Gateway),
            Some(0) => Ok(Self::Never),
            Some(ms @ 1_000..=604_800_000) => Ok(Self::After(std::time::Duration::from_millis(ms))),
            Some(ms) => Err(format!(
                "idle_timeout_ms is {ms}: use 0 (never) or 1000 to 604800000 (ms)"
            )),
        }
    }
}

impl HostRule {
    /// Every header an `http` entry of this rule requires.
    pub fn required_headers(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.http
            .iter()
            .flat_map(|m| m.require.iter().map(|(name, _)| name))
    }
}

/// `enforce` denies; `monitor` decides and audits "would deny" but lets the connection through.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        // An IPv4-mapped range is judged as the IPv4 range it maps, so its prefix counts the
        // IPv4 bits only; a prefix shorter than the mapping's 96 bits is not such a range.
        let prefix = match (addr, canonical(addr)) {
            (IpAddr::V6(_), IpAddr::V4(_)) => prefix.checked_sub(96).ok_or_else(|| {
                format!("{s:?} covers more than IPv4-mapped addresses: write the IPv4 range")
            })?,
            _ => prefix,
        };
        Ok(Self {
            addr: canonical(addr),
            prefix,
        })
    }
}

/// IPv4-mapped IPv6 addresses are judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                // A prefix longer than the address matches nothing (never the whole space).
                let Some(bits) = 32u32.checked_sub(u32::from(self.prefix)) else {
                    return false;
                };
                // `/0`: every address.
                let mask = u32::MAX.checked_shl(bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                // A prefix longer than the address matches nothing (never the whole space).
                let Some(bits) = 128u32.checked_sub(u32::from(self.prefix)) else {
                    return false;
                };
                // `/0`: every address.
                let mask = u128::MAX.checked_shl(bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub kind: RuleKind,
}

#[derive(Debug, Clone)]
pub enum RuleKind {
    /// Addresses and a port, decided per connection.
    L4 {
        cidr: Cidr,
        port: u16,
        idle: IdleTimeout,
    },
    /// A host name and a port, decided per HTTP request (shared: a decision hands it on).
    Host(Arc<HostRule>),
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: Arc<str>,
    pub file: PathBuf,
    pub cgroup: Option<CgroupPath>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub unit: Option<String>,
    pub exe: Option<PathBuf>,
    pub uid: Option<u32>,
    pub mode: Mode,
    pub rules: Vec<Rule>,
    /// Where its `workload` is written (line, column), for errors found across policies.
    pub at: Option<(usize, usize)>,
}

impl Policy {
    fn narrowers(&self) -> usize {
        usize::from(self.exe.is_some()) + usize::from(self.uid.is_some())
    }

    /// How specific the selector is: container, pod, cgroup depth, narrowers.
    fn rank(&self) -> (bool, bool, bool, usize, usize) {
        (
            self.container_id.is_some(),
            self.pod_uid.is_some(),
            self.unit.is_some(),
            self.cgroup.as_ref().map_or(0, CgroupPath::depth),
            self.narrowers(),
        )
    }

    /// Whether some workload could match both selectors: no field that both name tells them
    /// apart. With equal ranks the cgroups are equally deep, so they overlap only if equal.
    fn may_share_a_workload_with(&self, other: &Self) -> bool {
        fn compatible<T: PartialEq + ?Sized>(a: Option<&T>, b: Option<&T>) -> bool {
            a.zip(b).is_none_or(|(a, b)| a == b)
        }
        compatible(self.cgroup.as_ref(), other.cgroup.as_ref())
            && self
                .container_id
                .as_deref()
                .zip(other.container_id.as_deref())
                .is_none_or(|(a, b)| a.starts_with(b) || b.starts_with(a))
            && compatible(self.pod_uid.as_deref(), other.pod_uid.as_deref())
            && compatible(self.unit.as_deref(), other.unit.as_deref())
            && compatible(self.exe.as_deref(), other.exe.as_deref())
            && compatible(self.uid.as_ref(), other.uid.as_ref())
    }

    fn applies_to(&self, w: &WorkloadView<'_>) -> bool {
        self.cgroup.as_ref().is_none_or(|c| w.cgroup.is_within(c))
            && self
                .container_id
                .as_deref()
                .is_none_or(|id| w.container_id.is_some_and(|w| w.starts_with(id)))
            && self
                .pod_uid
                .as_deref()
                .is_none_or(|uid| w.pod_uid == Some(uid))
            && self
                .unit
                .as_deref()
                .is_none_or(|u| w.cgroup.systemd_unit() == Some(u))
            && self.exe.as_deref().is_none_or(|e| w.exe == Some(e))
            && self.uid.is_none_or(|u| u == w.uid)
    }
}

/// What the policy engine sees of a workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadView<'a> {
    pub cgroup: &'a CgroupPath,
    pub container_id: Option<&'a str>,
    pub pod_uid: Option<&'a str>,
    /// `None` when the exe could not be verified (a pid whose start time did not match).
    pub exe: Option<&'a Path>,
    pub uid: u32,
}

/// The outcome of an evaluation. A denial is a value, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        policy: Arc<str>,
        rule: Arc<str>,
        /// How long the relay may stay quiet.
        idle: IdleTimeout,
    },
    Deny {
        policy: Option<Arc<str>>,
        reason: DenyReason,
    },
    /// A host rule covers the port: HTTP requests are decided one by one.
    Inspect { policy: Arc<str> },
    /// Monitor mode: the policy would deny; the connection goes through.
    WouldDeny {
        policy: Arc<str>,
        reason: DenyReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    NoPolicy,
    NoRuleMatched,
}

impl DenyReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoPolicy => "no_policy_for_workload",
            Self::NoRuleMatched => "no_rule_matched",
        }
    }
}

/// Every policy, compiled. Built whole; replaced whole.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    index: SelectorIndex,
}

/// Which policies could select a workload, found without looking at every policy: each policy
/// is filed under its most specific selector (container id, then pod, then cgroup, then
/// unit); one with none of them is always a candidate.
#[derive(Debug, Clone, Default)]
struct SelectorIndex {
    /// Keyed by the first [`ID_KEY`] characters of the container id selector (a prefix).
    containers: HashMap<String, Vec<usize>>,
    pods: HashMap<String, Vec<usize>>,
    cgroups: HashMap<String, Vec<usize>>,
    units: HashMap<String, Vec<usize>>,
    always: Vec<usize>,
}

/// Container id selectors are prefixes: they are filed under at most this many characters.
const ID_KEY: usize = 12;

impl SelectorIndex {
    fn new(policies: &[Policy]) -> Self {
        let mut index = Self::default();
        for (i, p) in policies.iter().enumerate() {
            let (map, key) = if let Some(id) = &p.container_id {
                (&mut index.containers, id.chars().take(ID_KEY).collect())
            } else if let Some(uid) = &p.pod_uid {
                (&mut index.pods, uid.clone())
            } else if let Some(c) = &p.cgroup {
                (&mut index.cgroups, c.as_str().to_owned())
            } else if let Some(u) = &p.unit {
                (&mut index.units, u.clone())
            } else {
                index.always.push(i);
                continue;
            };
            map.entry(key).or_default().push(i);
        }
        index
    }

    /// Every policy that could apply to `w` (a superset: each still has to match whole), in
    /// no particular order and possibly more than once.
    fn candidates<'a>(&'a self, w: &'a WorkloadView<'_>) -> impl Iterator<Item = usize> + 'a {
        fn under<'a>(map: &'a HashMap<String, Vec<usize>>, key: &str) -> &'a [usize] {
            map.get(key).map_or(&[], Vec::as_slice)
        }
        // A selector that is a prefix of the id is filed under one of its first prefixes.
        let containers = w.container_id.into_iter().flat_map(move |id| {
            let ends = id.char_indices().map(|(i, _)| i).chain([id.len()]);
            ends.take(ID_KEY + 1)
                .flat_map(move |end| under(&self.containers, &id[..end]))
        });
        let pods = w.pod_uid.into_iter().flat_map(|uid| under(&self.pods, uid));
        let cgroups = w
            .cgroup
            .ancestors()
            .flat_map(|ancestor| under(&self.cgroups, ancestor));
        let units = w
            .cgroup
            .systemd_unit()
            .into_iter()
            .flat_map(|unit| under(&self.units, unit));
        self.always
            .iter()
            .chain(containers)
            .chain(pods)
            .chain(cgroups)
            .chain(units)
            .copied()
    }
}

impl PolicySet {
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Reads every `*.yaml`/`*.yml` file in `dir`. All errors are collected.
    pub fn load_dir(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let entries = std::fs::read_dir(dir).map_err(|source| {
            vec![PolicyError::Read {
                path: dir.to_owned(),
                source,
            }]
        })?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        let mut errors = Vec::new();
        let mut policies = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => match parse_policy(&text, &file) {
                    Ok(p) => policies.push(p),
                    Err(e) => errors.push(e),
                },
                Err(source) => errors.push(PolicyError::Read { path: file, source }),
            }
        }
        if errors.is_empty() {
            Self::from_policies(policies).map_err(|e| vec![e])
        } else {
            Err(errors)
        }
    }

    pub fn from_policies(policies: Vec<Policy>) -> Result<Self, PolicyError> {
        for (i, a) in policies.iter().enumerate() {
            for b in &policies[i + 1..] {
                if a.rank() == b.rank() && a.may_share_a_workload_with(b) {
                    return Err(PolicyError::Invalid {
                        file: b.file.display().to_string(),
                        at: b.at,
                        message: format!(
                            "policy {:?} and {:?} in {} can select the same workload and are \
                             equally specific, so neither would be chosen by rule: merge them, \
                             or make one more specific (a deeper cgroup, a container, exe or uid)",
                            b.name,
                            a.name,
                            a.file.display()
                        ),
                    });
                }
            }
        }
        let index = SelectorIndex::new(&policies);
        Ok(Self { policies, index })
    }

    /// The policy that governs `w`, if any.
    pub fn select(&self, w: &WorkloadView<'_>) -> Option<&Policy> {
        // Two policies that could both apply with the same rank do not compile, so the
        // highest rank names one policy.
        self.index
            .candidates(w)
            .map(|i| (i, &self.policies[i]))
            .filter(|(_, p)| p.applies_to(w))
            .max_by_key(|(i, p)| (p.rank(), *i))
            .map(|(_, p)| p)
    }

    /// The decision for a connection of `w` to `dst`.
    pub fn evaluate(&self, w: &WorkloadView<'_>, dst: std::net::SocketAddr) -> Decision {
        let Some(policy) = self.select(w) else {
            return Decision::Deny {
                policy: None,
                reason: DenyReason::NoPolicy,
            };
        };
        for rule in &policy.rules {
            match &rule.kind {
                RuleKind::L4 { cidr, port, idle }
                    if *port == dst.port() && cidr.contains(dst.ip()) =>
                {
                    return Decision::Allow {
                        policy: policy.name.clone(),
                        rule: rule.name.clone(),
                        idle: *idle,
                    };
                }
                // The workload asked for a port a host rule covers: decide on each request.
                RuleKind::Host(h) if h.port == dst.port() => {
                    return Decision::Inspect {
                        policy: policy.name.clone(),
                    };
                }
                _ => {}
            }
        }
        match policy.mode {
            Mode::Enforce => Decision::Deny {
                policy: Some(policy.name.clone()),
                reason: DenyReason::NoRuleMatched,
            },
            Mode::Monitor => Decision::WouldDeny {
                policy: policy.name.clone(),
                reason: DenyReason::NoRuleMatched,
            },
        }
    }
}

/// The outcome for one HTTP request.
#[derive(Debug, Clone)]
pub enum RequestDecision {
    Allow {
        policy: Arc<str>,
        rule: Arc<str>,
        route: Arc<HostRule>,
    },
    Deny {
        policy: Option<Arc<str>>,
        rule: Option<Arc<str>>,
        reason: &'static str,
    },
    /// Monitor mode: would be denied; forwarded without a credential... or with the route, if one matched by host.
    WouldDeny {
        policy: Arc<str>,
        rule: Option<Arc<str>>,
        reason: &'static str,
        route: Option<Arc<HostRule>>,
    },
    /// Only entries of this rule that limit models could allow the request: decide again with
    /// the body's model ([`Model::Read`]).
    NeedsModel { policy: Arc<str>, rule: Arc<str> },
}

impl PolicySet {
    /// The decision for a request to `host` on the port the workload connected to. First host
    /// rule (in file order) whose host and port match decides; one of its `http` entries must
    /// allow the method and normalized path, then that entry's header conditions must hold,
    /// then its models, if it lists any, must allow the body's model. With the model unread,
    /// an entry that would allow but for its models makes the answer
    /// [`RequestDecision::NeedsModel`] (unless another allows anyway).
    ///
    /// `headers` are the request's headers as they go upstream, after
    /// [`crate::http_proxy::strip_request`]; `removed` what that took out. A required header is
    /// judged on what goes upstream only; a forbidden one on both.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_request(
        &self,
        w: &WorkloadView<'_>,
        port: u16,
        host: &str,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
        removed: &http::HeaderMap,
        model: Model<'_>,
    ) -> RequestDecision {
        let Some(policy) = self.select(w) else {
            return RequestDecision::Deny {
                policy: None,
                rule: None,
                reason: "no_policy_for_workload",
            };
        };
        let deny =
            |rule: Option<&Rule>, reason: &'static str, route: Option<&Arc<HostRule>>| match policy
                .mode
            {
                Mode::Enforce => RequestDecision::Deny {
                    policy: Some(policy.name.clone()),
                    rule: rule.map(|r| r.name.clone()),
                    reason,
                },
                Mode::Monitor => RequestDecision::WouldDeny {
                    policy: policy.name.clone(),
                    rule: rule.map(|r| r.name.clone()),
                    reason,
                    route: route.cloned(),
                },
            };
        for rule in &policy.rules {
            let RuleKind::Host(h) = &rule.kind else {
                continue;
            };
            if h.port != port || !h.host.matches(host) {
                continue;
            }
            let allow = || RequestDecision::Allow {
                policy: policy.name.clone(),
                rule: rule.name.clone(),
                route: h.clone(),
            };
            if h.http.is_empty() {
                return allow();
            }
            // How far the best entry got: 0 nothing, 1 the line, 2 the headers too, 3 all
            // but an unread model.
            let mut reached = 0;
            for m in h.http.iter().filter(|m| m.allows_line(method, path)) {
                reached = reached.max(1);
                if !m.allows_headers(headers, removed) {
                    continue;
                }
                reached = reached.max(2);
                match m.allows_model(model) {
                    Some(true) => return allow(),
                    Some(false) => {}
                    None => reached = 3,
                }
            }
            let reason = match (reached, model) {
                (3, _) => {
                    return RequestDecision::NeedsModel {
                        policy: policy.name.clone(),
                        rule: rule.name.clone(),
                    }
                }
                (0, _) => "method_or_path_not_allowed",
                (1, _) => "headers_not_allowed",
                (_, Model::Read(None)) => "model_missing",
                _ => "model_not_allowed",
            };
            return deny(Some(rule), reason, Some(h));
        }
        deny(None, "host_not_allowed", None)
    }

    /// The decision for a TLS connection naming `sni` on `port`: the first host rule whose host
    /// and port match decides; it must be a passthrough rule.
    pub fn evaluate_sni(&self, w: &WorkloadView<'_>, port: u16, sni: &str) -> RequestDecision {
        const REFUSAL: &str = "tls_on_an_originate_rule";
        let none = http::HeaderMap::new();
        let decision =
            match self.evaluate_request(w, port, sni, "", "", &none, &none, Model::Unread) {
                // A rule with `http` entries (the only kind that reads models) is never passthrough.
                RequestDecision::Deny {
                    policy,
                    rule,
                    reason: "method_or_path_not_allowed",
                } => RequestDecision::Deny {
                    policy,
                    rule,
                    reason: REFUSAL,
                },
                RequestDecision::NeedsModel { policy, rule } => RequestDecision::Deny {
                    policy: Some(policy),
                    rule: Some(rule),
                    reason: REFUSAL,
                },
                other => other,
            };
        carried(decision, |tls| tls == TlsMode::Passthrough, REFUSAL)
    }

    /// The decision for a plain-text HTTP request as the gateway carries it out: what
    /// [`Self::evaluate_request`] decides, except that a passthrough rule cannot carry plain
    /// HTTP, and a monitor-mode request to a host no rule names has nowhere to go: both are
    /// denied. `tollgate policy explain` and the gateway both decide through this.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_http(
        &self,
        w: &WorkloadView<'_>,
        port: u16,
        host: &str,
        method: &str,
        path: &str,
        headers: &http::HeaderMap,
        removed: &http::HeaderMap,
        model: Model<'_>,
    ) -> RequestDecision {
        carried(
            self.evaluate_request(w, port, host, method, path, headers, removed, model),
            |tls| tls != TlsMode::Passthrough,
            "plain_http_on_a_passthrough_rule",
        )
    }

    /// Every credential binding a rule names.
    pub fn credential_names(&self) -> impl Iterator<Item = (&Policy, &Rule, &str)> {
        self.policies.iter().flat_map(|p| {
            p.rules.iter().filter_map(move |r| match &r.kind {
                RuleKind::Host(h) => h.credential.as_deref().map(|c| (p, r, c)),
                RuleKind::L4 { .. } => None,
            })
        })
    }
}

/// `decision` as the gateway can carry it out on a connection whose rule must be of a TLS mode
/// `can_carry` accepts: an allowing or monitored rule of another mode is refused (`refusal`),
/// and monitor mode lets nothing through that no rule names (there is nowhere to send it).
fn carried(
    decision: RequestDecision,
    can_carry: impl Fn(TlsMode) -> bool,
    refusal: &'static str,
) -> RequestDecision {
    match decision {
        RequestDecision::Allow {
            policy,
            rule,
            route,
        } if !can_carry(route.tls) => RequestDecision::Deny {
            policy: Some(policy),
            rule: Some(rule),
            reason: refusal,
        },
        RequestDecision::WouldDeny {
            policy,
            rule,
            route: Some(route),
            ..
        } if !can_carry(route.tls) => RequestDecision::Deny {
            policy: Some(policy),
            rule,
            reason: refusal,
        },
        RequestDecision::WouldDeny {
            policy,
            rule,
            reason,
            route: None,
        } => RequestDecision::Deny {
            policy: Some(policy),
            rule,
            reason,
        },
        other => other,
    }
}

/// `tollgate policy explain`: the decision for `request` by the workload `w`, as one line.
/// `request` is `tcp IP:PORT`, `tls HOST:PORT`, or `METHOD http://HOST[:PORT]/PATH`.
pub fn explain(
    set: &PolicySet,
    w: &WorkloadView<'_>,
    request: &str,
    headers: &http::HeaderMap,
    model: Option<&str>,
) -> Result<String, String> {
    let (kind, target) = request
        .trim()
        .split_once(' ')
        .ok_or("give `tcp IP:PORT`, `tls HOST:PORT` or `METHOD http://HOST/PATH`")?;
    let selected = set.select(w).map_or_else(
        || "no policy".to_owned(),
        |p| format!("policy {:?} ({})", p.name, p.file.display()),
    );
    let show = |d: &RequestDecision| match d {
        RequestDecision::Allow { rule, route, .. } => {
            format!(
                "allow by rule {rule:?}: upstream {}:{} tls {:?}{}",
                route.host.as_str(),
                route.upstream_port,
                route.tls,
                route
                    .credential
                    .as_ref()
                    .map(|c| format!(", credential {c}"))
                    .unwrap_or_default()
            ) + &route
                .budget
                .as_ref()
                .map(|b| {
                    let what: Vec<String> = [
                        b.requests.map(|n| format!("{n} requests")),
                        b.tokens.map(|n| format!("{n} tokens")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    format!(
                        ", budget {} per {} s{} (not spent here)",
                        what.join(" and "),
                        b.per.as_secs(),
                        if b.workloads_below.is_some() {
                            " for each workload"
                        } else {
                            ""
                        }
                    )
                })
                .unwrap_or_default()
        }
        RequestDecision::Deny { rule, reason, .. } => format!(
            "deny ({reason}){}",
            rule.as_ref()
                .map(|r| format!(" by rule {r:?}"))
                .unwrap_or_default()
        ),
        RequestDecision::WouldDeny { rule, reason, .. } => format!(
            "would deny, monitor mode ({reason}){}",
            rule.as_ref()
                .map(|r| format!(" by rule {r:?}"))
                .unwrap_or_default()
        ),
        RequestDecision::NeedsModel { .. } => {
            "depends on the body's model: give --model NAME (or --model '' for none)".into()
        }
    };
    let line = match kind {
        "tcp" => {
            let dst: std::net::SocketAddr = target
                .parse()
                .map_err(|_| format!("{target:?} is not IP:PORT"))?;
            match set.evaluate(w, dst) {
                Decision::Allow { rule, .. } => format!("allow by rule {rule:?}"),
                Decision::Inspect { .. } => "inspect: a host rule covers this port; each HTTP request (or the TLS SNI) decides".into(),
                Decision::Deny { reason, .. } => format!("deny ({})", reason.as_str()),
                Decision::WouldDeny { reason, .. } => format!("would deny, monitor mode ({})", reason.as_str()),
            }
        }
        "tls" => {
            let (host, port) = crate::normalize::host(target).map_err(|e| e.as_str().to_owned())?;
            show(&set.evaluate_sni(w, port.unwrap_or(443), &host))
        }
        method => {
            let uri: http::Uri = target
                .parse()
                .map_err(|_| format!("{target:?} is not a URL"))?;
            let authority = uri.authority().ok_or("the URL needs a host")?;
            let (host, port) =
                crate::normalize::host(authority.as_str()).map_err(|e| e.as_str().to_owned())?;
            let path = crate::normalize::path(uri.path())
                .map_err(|e| format!("path refused: {}", e.as_str()))?;
            // Judged as the gateway judges them: on what would go upstream.
            let mut forwarded = headers.clone();
            let removed = crate::http_proxy::strip_request(&mut forwarded);
            // Methods are case-sensitive (RFC 9110): `get` is not `GET`, here as in the gateway.
            show(&set.evaluate_http(
                w,
                port.unwrap_or(80),
                &host,
                method,
                &path,
                &forwarded,
                &removed,
                model.map_or(Model::Unread, |m| {
                    Model::Read(Some(m).filter(|m| !m.is_empty()))
                }),
            ))
        }
    };
    Ok(format!("{selected}: {line}"))
}

/// Parses one policy file's text.
pub fn parse_policy(text: &str, file: &Path) -> Result<Policy, PolicyError> {
    let file_s = file.display().to_string();
    let raw: RawPolicy = parse_yaml(text, &file_s)?;
    let invalid_at = |key: &str, message: String| PolicyError::Invalid {
        file: file_s.clone(),
        at: key_at(text, 0, key, None),
        message,
    };
    let invalid = |message: String| invalid_at("workload", message);
    if raw.api_version != "tollgate/v1" {
        return Err(invalid_at(
            "apiVersion",
            format!(
                "apiVersion {:?} is not supported; use tollgate/v1",
                raw.api_version
            ),
        ));
    }
    if raw.kind != "EgressPolicy" {
        return Err(invalid_at(
            "kind",
            format!("kind {:?} is not supported; use EgressPolicy", raw.kind),
        ));
    }
    let w = &raw.spec.workload;
    if w.cgroup.is_none() && w.container_id.is_none() && w.pod_uid.is_none() && w.unit.is_none() {
        return Err(invalid(
            "spec.workload must name a cgroup, a unit, a container_id or a pod_uid (exe and uid only narrow)".into(),
        ));
    }
    let cgroup = w
        .cgroup
        .as_deref()
        .map(CgroupPath::parse)
        .transpose()
        .map_err(|e| invalid_at("cgroup", e.to_string()))?;
    if let Some(id) = &w.container_id {
        if id.len() < 12
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid_at(
                "container_id",
                format!("container_id {id:?}: use 12 to 64 lowercase hex digits"),
            ));
        }
    }
    if let Some(uid) = &w.pod_uid {
        if uid.len() != 36 || uid.matches('-').count() != 4 {
            return Err(invalid_at(
                "pod_uid",
                format!("pod_uid {uid:?}: use the pod's UID as the API server shows it"),
            ));
        }
    }
    let mut rules = Vec::new();
    let mut names = std::collections::HashSet::new();
    let egress_at = text.find("egress:").unwrap_or(0);
    let mut named_before = HashMap::<String, usize>::new();
    for r in raw.spec.egress {
        // This rule's own `name:` (a second rule of one name is the second one written).
        let earlier = named_before.entry(r.name.clone()).or_default();
        let mut from = Some(egress_at);
        for _ in 0..*earlier {
            from = from.and_then(|f| key_offset(text, f, "name", Some(&r.name)).map(|i| i + 1));
        }
        *earlier += 1;
        let at = from.and_then(|f| key_offset(text, f, "name", Some(&r.name)));
        let rule_err = |m: String| PolicyError::Invalid {
            file: file_s.clone(),
            at: at.map(|i| line_column(text, i)),
            message: format!("rule {:?}: {m}", r.name),
        };
        if !names.insert(r.name.clone()) {
            return Err(rule_err(
                "a second rule of that name: names tell rules apart in audit records and budgets"
                    .into(),
            ));
        }
        if r.matches.port == 0 {
            return Err(rule_err("port 0 matches nothing".into()));
        }
        let idle = IdleTimeout::parse(r.idle_timeout_ms).map_err(&rule_err)?;
        let kind = match (&r.matches.cidr, &r.matches.host) {
            (Some(cidr), None) => {
                if r.upstream.is_some()
                    || r.tls.is_some()
                    || !r.http.is_empty()
                    || r.credential.is_some()
                    || r.allow_private
                    || r.budget.is_some()
                {
                    return Err(rule_err("a `cidr` rule is L4: upstream, tls, http, credential, allow_private and budget need a `host` rule".into()));
                }
                RuleKind::L4 {
                    cidr: cidr.parse::<Cidr>().map_err(&rule_err)?,
                    port: r.matches.port,
                    idle,
                }
            }
            (None, Some(host)) => {
                let tls = r.tls.ok_or_else(|| {
                    rule_err("a `host` rule needs `tls: originate | none`".into())
                })?;
                if tls != TlsMode::Passthrough && idle != IdleTimeout::Gateway {
                    return Err(rule_err(
                        "`idle_timeout_ms` applies to relayed connections (a `cidr` rule or `tls: passthrough`); an idle HTTP connection is closed after the gateway's `client_header_timeout_ms`".into(),
                    ));
                }
                if tls == TlsMode::Passthrough
                    && (!r.http.is_empty() || r.credential.is_some() || r.budget.is_some())
                {
                    return Err(rule_err(
                        "`tls: passthrough` splices bytes it cannot read: no `http` rules, credential or budget".into(),
                    ));
                }
                let budget = match &r.budget {
                    None => None,
                    Some(b) if b.requests.is_none() && b.tokens.is_none() => {
                        return Err(rule_err("a budget needs `requests`, `tokens` or both".into()))
                    }
                    Some(b) if b.requests == Some(0) || b.tokens == Some(0) => {
                        return Err(rule_err(
                            "a budget of 0: remove the rule to allow none".into(),
                        ))
                    }
                    Some(b)
                        if b.tokens.is_some()
                            && (r.http.is_empty() || r.http.iter().any(|m| m.models.is_empty())) =>
                    {
                        return Err(rule_err(
                            "a `tokens` budget counts what answers report, read where the model is: give every `http` entry of the rule `models` (`[\"*\"]` for any)".into(),
                        ))
                    }
                    Some(b) => Some(crate::budget::Budget {
                        requests: b.requests,
                        tokens: b.tokens,
                        per: crate::budget::Budget::parse_per(&b.per).map_err(&rule_err)?,
                        reserve_output: match (b.reserve_output, b.tokens) {
                            (Some(_), None) => return Err(rule_err(
                                "`reserve_output` reserves tokens: give the budget `tokens`".into(),
                            )),
                            (Some(n), Some(tokens)) if n > tokens => return Err(rule_err(format!(
                                "`reserve_output` {n} is more than the budget's {tokens} tokens: no request would fit"
                            ))),
                            (n, _) => n.unwrap_or(0),
                        },
                        workloads_below: match b.scope.as_deref() {
                            None | Some("rule") => None,
                            Some("workload") => cgroup.clone(),
                            Some(other) => return Err(rule_err(format!(
                                "budget scope {other:?}: use `rule` (one budget shared by every workload the policy selects) or `workload` (one for each)"
                            ))),
                        },
                        // A reload keeps what was spent while the rule is the same rule: same
                        // file, name, host and port.
                        // (Monitor mode's spending is its own: switching to enforce starts
                        // afresh.)
                        key: format!(
                            "{file_s}#{}#{host}:{}{}",
                            r.name,
                            r.matches.port,
                            if raw.spec.mode == Mode::Monitor { "#monitor" } else { "" }
                        ),
                        monitor: raw.spec.mode == Mode::Monitor,
                    }),
                };
                if tls == TlsMode::None && r.credential.is_some() {
                    return Err(rule_err(
                        "a credential is only ever sent over verified TLS: use `tls: originate`"
                            .into(),
                    ));
                }
                let mut http = Vec::new();
                for m in &r.http {
                    let paths = m
                        .paths
                        .iter()
                        .map(|p| PathPattern::parse(p))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(&rule_err)?;
                    let methods = m.methods.iter().map(|x| x.to_ascii_uppercase()).collect();
                    let header = |name: &str| {
                        http::HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| rule_err(format!("{name:?} is not a header name")))
                    };
                    let require = m
                        .require_headers
                        .iter()
                        .map(|(name, value)| {
                            Ok((
                                header(name)?,
                                (value != "*").then(|| value.trim().to_owned()),
                            ))
                        })
                        .collect::<Result<Vec<_>, PolicyError>>()?;
                    let forbid = m
                        .forbid_headers
                        .iter()
                        .map(|name| header(name))
                        .collect::<Result<Vec<_>, PolicyError>>()?;
                    if let Some((name, _)) = require.iter().find(|(n, _)| forbid.contains(n)) {
                        return Err(rule_err(format!("{name} is both required and forbidden")));
                    }
                    let models = m
                        .models
                        .iter()
                        .map(|p| ModelPattern::parse(p))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(&rule_err)?;
                    http.push(HttpMatch {
                        methods,
                        paths,
                        require,
                        forbid,
                        models,
                    });
                }
                let upstream_port = r.upstream.as_ref().map_or(r.matches.port, |u| u.port);
                if upstream_port == 0 {
                    return Err(rule_err("upstream port 0".into()));
                }
                RuleKind::Host(Arc::new(HostRule {
                    host: HostPattern::parse(host).map_err(&rule_err)?,
                    port: r.matches.port,
                    upstream_port,
                    tls,
                    http,
                    credential: r.credential.clone(),
                    allow_private: r.allow_private,
                    budget,
                    idle,
                }))
            }
            _ => {
                return Err(rule_err(
                    "`match` needs exactly one of `cidr` or `host`".into(),
                ))
            }
        };
        rules.push(Rule {
            name: r.name.into(),
            kind,
        });
    }
    Ok(Policy {
        name: raw.metadata.name.into(),
        file: file.to_owned(),
        cgroup,
        container_id: raw.spec.workload.container_id,
        pod_uid: raw.spec.workload.pod_uid,
        unit: raw.spec.workload.unit,
        exe: raw.spec.workload.exe,
        uid: raw.spec.workload.uid,
        mode: raw.spec.mode,
        rules,
        at: key_at(text, 0, "workload", None),
    })
}

/// Where `key:` first appears in `text` from byte `from` on (followed by `value`, when given),
/// as a 1-based line and column: a position for the errors found after the YAML parser, which
/// gives positions only for its own. `None` when the text spells it otherwise (escapes, an
/// alias): the error then names the file alone.
fn key_at(text: &str, from: usize, key: &str, value: Option<&str>) -> Option<(usize, usize)> {
    key_offset(text, from, key, value).map(|i| line_column(text, i))
}

/// The 1-based line and column of byte `i` of `text`.
fn line_column(text: &str, i: usize) -> (usize, usize) {
    let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
    (
        text[..i].matches('\n').count() + 1,
        text[line_start..i].chars().count() + 1,
    )
}

/// The byte offset of what [`key_at`] finds.
fn key_offset(text: &str, from: usize, key: &str, value: Option<&str>) -> Option<usize> {
    let mut start = from;
    loop {
        let i = start + text.get(start..)?.find(key)?;
        start = i + key.len();
        let starts_key = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-'));
        let Some(rest) = text[start..].strip_prefix(':') else {
            continue;
        };
        if !starts_key {
            continue;
        }
        if let Some(value) = value {
            let rest = rest.trim_start_matches([' ', '\t']);
            let rest = rest.strip_prefix(['"', '\'']).unwrap_or(rest);
            let ends = rest.strip_prefix(value).is_some_and(|after| {
                after
                    .chars()
                    .next()
                    .is_none_or(|c| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '}' | '#'))
            });
            if !ends {
                continue;
            }
        }
        return Some(i);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn policy(text: &str) -> Policy {
        parse_policy(text, Path::new("t.yaml")).expect("policy")
    }

    /// Selection through the index picks what a scan of every policy would pick.
    #[test]
    fn indexed_selection_equals_a_full_scan() {
        let cg = |p: &str| CgroupPath::parse(p).expect("path");
        let mut policies = Vec::new();
        let cgroups = [
            "/",
            "/a.slice",
            "/a.slice/x.service",
            "/a.slice/x.service/sub",
            "/b.slice",
        ];
        let ids = [
            None,
            Some("abc"),
            Some("abcdef012345"),
            Some("abcdef0123456789"),
        ];
        let pods = [None, Some("pod-1")];
        let units = [None, Some("x.service")];
        for (n, ((c, id), (pod, (unit, uid)))) in cgroups
            .iter()
            .flat_map(|c| ids.iter().map(move |i| (c, i)))
            .flat_map(|ci| {
                pods.iter()
                    .flat_map(|p| {
                        units
                            .iter()
                            .flat_map(move |u| [(u, None), (u, Some(7))])
                            .map(move |uu| (p, uu))
                    })
                    .map(move |x| (ci, x))
            })
            .enumerate()
        {
            policies.push(Policy {
                name: format!("p{n}").into(),
                file: PathBuf::from(format!("p{n}.yaml")),
                cgroup: (*c != "/" || n % 2 == 0).then(|| cg(c)),
                container_id: id.map(str::to_owned),
                pod_uid: pod.map(str::to_owned),
                unit: unit.map(str::to_owned),
                exe: None,
                uid,
                mode: Mode::Enforce,
                rules: Vec::new(),
                at: None,
            });
        }
        // Policies that tie with an earlier one are a compile error; keep the first of each.
        let mut kept: Vec<Policy> = Vec::new();
        for p in policies {
            if !kept
                .iter()
                .any(|k| k.rank() == p.rank() && k.may_share_a_workload_with(&p))
            {
                kept.push(p);
            }
        }
        let set = PolicySet::from_policies(kept).expect("set");
        let (mut checked, mut picked) = (0, std::collections::HashSet::new());
        for c in [
            "/",
            "/a.slice",
            "/a.slice/x.service",
            "/a.slice/x.service/sub/deeper",
            "/b.slice/y.scope",
            "/c",
        ] {
            let path = cg(c);
            for id in [
                None,
                Some("abc"),
                Some("ab"),
                Some("abcdef0123456789ff"),
                Some("abcdef012345"),
                Some("zzz"),
            ] {
                for pod in [None, Some("pod-1"), Some("pod-2")] {
                    for uid in [0, 7] {
                        let w = WorkloadView {
                            cgroup: &path,
                            container_id: id,
                            pod_uid: pod,
                            exe: None,
                            uid,
                        };
                        let scan = set
                            .policies
                            .iter()
                            .filter(|p| p.applies_to(&w))
                            .max_by_key(|p| p.rank());
                        assert_eq!(
                            set.select(&w).map(|p| &p.name),
                            scan.map(|p| &p.name),
                            "{c} {id:?} {pod:?} {uid}"
                        );
                        checked += 1;
                        picked.extend(scan.map(|p| p.name.clone()));
                    }
                }
            }
        }
        assert_eq!(checked, 6 * 6 * 3 * 2);
        assert!(
            picked.len() > 20,
            "many different policies were picked: {}",
            picked.len()
        );
    }

    fn set(texts: &[&str]) -> PolicySet {
        PolicySet::from_policies(texts.iter().map(|t| policy(t)).collect()).expect("set")
    }

    const APP: &str = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: app }\nspec:\n  workload: { cgroup: /tg/app }\n  egress:\n    - name: api\n      match: { cidr: 127.0.0.0/8, port: 8080 }\n";
    const APP_CURL: &str = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: app-curl }\nspec:\n  workload: { cgroup: /tg/app, exe: /usr/bin/curl }\n  egress:\n    - name: other\n      match: { cidr: 127.0.0.2, port: 9090 }\n";
    const MONITOR: &str = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: mon }\nspec:\n  workload: { cgroup: /tg/mon }\n  mode: monitor\n";

    fn view<'a>(cg: &'a CgroupPath, exe: Option<&'a Path>) -> WorkloadView<'a> {
        WorkloadView {
            cgroup: cg,
            container_id: None,
            pod_uid: None,
            exe,
            uid: 1000,
        }
    }

    #[test]
    fn table() {
        let s = set(&[APP, APP_CURL, MONITOR]);
        let app = CgroupPath::parse("/tg/app").expect("cg");
        let child = CgroupPath::parse("/tg/app/worker").expect("cg");
        let other = CgroupPath::parse("/tg/other").expect("cg");
        let mon = CgroupPath::parse("/tg/mon").expect("cg");
        let curl = Path::new("/usr/bin/curl");
        let py = Path::new("/usr/bin/python3");
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let allow = |p: &str, r: &str| Decision::Allow {
            policy: p.into(),
            rule: r.into(),
            idle: IdleTimeout::Gateway,
        };
        let cases: Vec<(WorkloadView<'_>, SocketAddr, Decision)> = vec![
            (
                view(&app, Some(py)),
                a("127.0.0.1:8080"),
                allow("app", "api"),
            ),
            (
                view(&child, Some(py)),
                a("127.0.0.1:8080"),
                allow("app", "api"),
            ),
            (
                view(&app, Some(py)),
                a("[::ffff:127.0.0.1]:8080"),
                allow("app", "api"),
            ),
            (
                view(&app, Some(py)),
                a("127.0.0.1:8081"),
                Decision::Deny {
                    policy: Some("app".into()),
                    reason: DenyReason::NoRuleMatched,
                },
            ),
            (
                view(&app, Some(py)),
                a("[::1]:8080"),
                Decision::Deny {
                    policy: Some("app".into()),
                    reason: DenyReason::NoRuleMatched,
                },
            ),
            // exe narrows: curl gets its own policy, and only that one.
            (
                view(&app, Some(curl)),
                a("127.0.0.2:9090"),
                allow("app-curl", "other"),
            ),
            (
                view(&app, Some(curl)),
                a("127.0.0.1:8080"),
                Decision::Deny {
                    policy: Some("app-curl".into()),
                    reason: DenyReason::NoRuleMatched,
                },
            ),
            // an unverified exe never matches an exe narrowing.
            (
                view(&app, None),
                a("127.0.0.2:9090"),
                Decision::Deny {
                    policy: Some("app".into()),
                    reason: DenyReason::NoRuleMatched,
                },
            ),
            (
                view(&other, Some(py)),
                a("127.0.0.1:8080"),
                Decision::Deny {
                    policy: None,
                    reason: DenyReason::NoPolicy,
                },
            ),
            (
                view(&mon, Some(py)),
                a("127.0.0.1:8080"),
                Decision::WouldDeny {
                    policy: "mon".into(),
                    reason: DenyReason::NoRuleMatched,
                },
            ),
        ];
        for (w, dst, want) in cases {
            assert_eq!(s.evaluate(&w, dst), want, "{w:?} → {dst}");
        }
    }

    #[test]
    fn exe_or_uid_never_select_alone() {
        // A policy must name a cgroup, container or pod: only an exe is refused.
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: x }\nspec:\n  workload: { exe: /usr/bin/curl }\n";
        assert!(parse_policy(text, Path::new("x.yaml")).is_err());
    }

    #[test]
    fn unknown_field_is_an_error_with_line() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: x }\nspec:\n  workload: { cgroup: /a }\n  egres: []\n";
        let err = parse_policy(text, Path::new("x.yaml"))
            .expect_err("unknown field")
            .to_string();
        assert!(err.starts_with("x.yaml:6:"), "{err}");
        assert!(err.contains("egres"), "{err}");
    }

    #[test]
    fn duplicate_selectors_are_refused() {
        let err = PolicySet::from_policies(vec![policy(APP), policy(APP)]).expect_err("dup");
        assert!(
            err.to_string().contains("can select the same workload"),
            "{err}"
        );
    }

    /// Two policies that could both apply to one workload with the same rank would be chosen
    /// between by file order: refused, whatever their names.
    #[test]
    fn policies_that_could_tie_are_refused() {
        let with = |name: &str, workload: &str| {
            policy(&format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: {name} }}\nspec:\n  workload: {workload}\n"))
        };
        const ID: &str = "4f6b1c0d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
        for (a, b) in [
            (
                "{ cgroup: /tg/app, uid: 1000 }",
                "{ cgroup: /tg/app, exe: /usr/bin/python3 }",
            ),
            (
                "{ container_id: 4f6b1c0d2e3a }",
                &*format!("{{ container_id: {ID} }}"),
            ),
            ("{ cgroup: /tg/app, uid: 1 }", "{ uid: 1, cgroup: /tg/app }"),
        ] {
            for order in [[a, b], [b, a]] {
                let err = PolicySet::from_policies(vec![with("a", order[0]), with("b", order[1])])
                    .expect_err("tie");
                assert!(err.to_string().contains("equally specific"), "{err}");
            }
        }
        // Told apart by a field both name, or ranked apart: accepted.
        for (a, b) in [
            ("{ cgroup: /tg/app, uid: 1 }", "{ cgroup: /tg/app, uid: 2 }"),
            (
                "{ cgroup: /tg/app, exe: /bin/a }",
                "{ cgroup: /tg/app, exe: /bin/b }",
            ),
            ("{ cgroup: /tg/app }", "{ cgroup: /tg/app, uid: 1 }"),
            ("{ cgroup: /tg/app }", "{ cgroup: /tg/other }"),
            (
                "{ container_id: 4f6b1c0d2e3a }",
                "{ container_id: 4f6b1c0d2e3b }",
            ),
        ] {
            PolicySet::from_policies(vec![with("a", a), with("b", b)])
                .unwrap_or_else(|e| panic!("{a} / {b}: {e}"));
        }
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        let c: Cidr = "10.1.0.0/16".parse().expect("cidr");
        assert!(c.contains("10.1.200.3".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("127.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn an_ipv4_mapped_range_is_the_ipv4_range_it_maps() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let mapped: Cidr = "::ffff:10.20.0.0/112".parse().expect("cidr");
        assert!(mapped.contains(ip("10.20.1.1")));
        assert!(mapped.contains(ip("::ffff:10.20.255.1")));
        for outside in ["10.21.0.1", "8.8.8.8", "169.254.169.254", "127.0.0.1"] {
            assert!(!mapped.contains(ip(outside)), "{outside}");
        }
        let one: Cidr = "::ffff:10.1.2.3".parse().expect("cidr");
        assert!(one.contains(ip("10.1.2.3")));
        assert!(!one.contains(ip("10.1.2.4")));
        let err = "::ffff:0.0.0.0/95"
            .parse::<Cidr>()
            .expect_err("wider than the mapping");
        assert!(err.contains("write the IPv4 range"), "{err}");
    }

    #[test]
    fn example_policies_in_repo_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(!set.is_empty());
    }
}

#[cfg(test)]
mod container_selectors {
    use super::*;

    const ID: &str = "4f6b1c0d2e3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
    const UID: &str = "0b4f2a4e-6d1c-4c8e-9a57-3f2e1d0c9b8a";

    fn policy(name: &str, workload: &str) -> Policy {
        let text = format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: {name} }}\nspec:\n  workload: {workload}\n  egress:\n    - name: r\n      match: {{ cidr: 127.0.0.1, port: 1 }}\n");
        parse_policy(&text, Path::new("t.yaml")).expect("policy")
    }

    #[test]
    fn container_beats_pod_beats_cgroup() {
        let set = PolicySet::from_policies(vec![
            policy("by-cgroup", "{ cgroup: /kubepods.slice }"),
            policy("by-pod", &format!("{{ pod_uid: {UID} }}")),
            policy(
                "by-container",
                &format!("{{ container_id: {} }}", &ID[..12]),
            ),
        ])
        .expect("set");
        let cg = CgroupPath::parse("/kubepods.slice/x").expect("cg");
        let view = |container_id, pod_uid| WorkloadView {
            cgroup: &cg,
            container_id,
            pod_uid,
            exe: None,
            uid: 0,
        };
        let name = |w: WorkloadView<'_>| set.select(&w).map(|p| p.name.clone());
        assert_eq!(name(view(Some(ID), Some(UID))), Some("by-container".into()));
        assert_eq!(
            name(view(Some("ffffffffffffffff"), Some(UID))),
            Some("by-pod".into())
        );
        assert_eq!(name(view(None, None)), Some("by-cgroup".into()));
        let other = CgroupPath::parse("/system.slice").expect("cg");
        let w = WorkloadView {
            cgroup: &other,
            container_id: None,
            pod_uid: None,
            exe: None,
            uid: 0,
        };
        assert_eq!(set.select(&w).map(|p| p.name.clone()), None);
    }

    #[test]
    fn bad_container_and_pod_selectors_are_refused() {
        for workload in [
            "{ container_id: abc }",
            "{ container_id: XYZXYZXYZXYZ }",
            "{ pod_uid: nope }",
            "{ exe: /bin/sh }",
        ] {
            let text = format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: x }}\nspec:\n  workload: {workload}\n");
            assert!(
                parse_policy(&text, Path::new("t.yaml")).is_err(),
                "{workload}"
            );
        }
    }
}

#[cfg(test)]
mod host_rules {
    use super::*;

    const OPENAI: &str = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: agent }\nspec:\n  workload: { cgroup: /agents }\n  egress:\n    - name: openai\n      match: { host: api.openai.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      http:\n        - methods: [post]\n          paths: [/v1/chat/completions, /v1/threads/*/runs]\n        - methods: [GET]\n          paths: [/v1/models/*]\n      credential: openai-prod\n    - name: any-example\n      match: { host: \"*.example.com\", port: 80 }\n      tls: none\n";

    /// A workload in `cg`, named by nothing else.
    fn agent(cg: &CgroupPath) -> WorkloadView<'_> {
        WorkloadView {
            cgroup: cg,
            container_id: None,
            pod_uid: None,
            exe: None,
            uid: 0,
        }
    }

    #[test]
    fn header_conditions_decide_after_method_and_path() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: agent }\nspec:\n  workload: { cgroup: /agents }\n  egress:\n    - name: openai\n      match: { host: api.openai.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      http:\n        - methods: [POST]\n          paths: [/v1/assistants]\n          require_headers: { OpenAI-Beta: assistants=v2, content-type: \"*\" }\n          forbid_headers: [x-debug]\n        - methods: [GET]\n          paths: [/v1/models]\n";
        let set = PolicySet::from_policies(vec![
            parse_policy(text, Path::new("h.yaml")).expect("policy")
        ])
        .expect("set");
        let cg = CgroupPath::parse("/agents/a1").expect("cg");
        let w = agent(&cg);
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                    http::HeaderValue::from_str(v).expect("value"),
                );
            }
            h
        };
        // Decided as the gateway decides: on the headers left once those that never go
        // upstream are taken out.
        let decide = |method: &str, path: &str, h: &http::HeaderMap| {
            let mut forwarded = h.clone();
            let removed = crate::http_proxy::strip_request(&mut forwarded);
            match set.evaluate_request(
                &w,
                80,
                "api.openai.com",
                method,
                path,
                &forwarded,
                &removed,
                Model::Unread,
            ) {
                RequestDecision::Allow { .. } => Ok(()),
                RequestDecision::Deny { reason, .. }
                | RequestDecision::WouldDeny { reason, .. } => Err(reason),
                RequestDecision::NeedsModel { .. } => Err("needs_model"),
            }
        };
        let good = [
            ("openai-beta", "assistants=v2"),
            ("content-type", "application/json"),
        ];
        assert_eq!(decide("POST", "/v1/assistants", &headers(&good)), Ok(()));
        for (case, h) in [
            ("missing required", vec![("openai-beta", "assistants=v2")]),
            (
                "wrong value",
                vec![("openai-beta", "assistants=v1"), ("content-type", "a")],
            ),
            (
                "forbidden present",
                vec![
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                    ("X-Debug", "1"),
                ],
            ),
            // The gateway takes a header the Connection header names out: it is not sent.
            (
                "required but named in Connection",
                vec![
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                    ("connection", "openai-beta"),
                ],
            ),
            (
                "required but an x-tollgate- header",
                vec![("openai-beta", "assistants=v2"), ("x-tollgate-x", "a")],
            ),
            // Two values would both go upstream, whichever it reads.
            (
                "required twice",
                vec![
                    ("openai-beta", "assistants=v1"),
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                ],
            ),
            (
                "required twice, the same",
                vec![
                    ("openai-beta", "assistants=v2"),
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                ],
            ),
            (
                "present twice",
                vec![
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                    ("content-type", "b"),
                ],
            ),
            (
                "two values in one",
                vec![
                    ("openai-beta", "assistants=v1, assistants=v2"),
                    ("content-type", "a"),
                ],
            ),
            // Forbidden where it was sent, even though it would not go upstream.
            (
                "forbidden, named in Connection",
                vec![
                    ("openai-beta", "assistants=v2"),
                    ("content-type", "a"),
                    ("connection", "x-debug"),
                    ("x-debug", "1"),
                ],
            ),
        ] {
            assert_eq!(
                decide("POST", "/v1/assistants", &headers(&h)),
                Err("headers_not_allowed"),
                "{case}"
            );
        }
        // Another entry without header conditions still decides its own method and path.
        assert_eq!(
            decide("GET", "/v1/models", &headers(&[("x-debug", "1")])),
            Ok(())
        );
        assert_eq!(
            decide("GET", "/v1/assistants", &headers(&good)),
            Err("method_or_path_not_allowed")
        );
        let both = text.replace(
            "forbid_headers: [x-debug]",
            "forbid_headers: [content-type]",
        );
        let err = parse_policy(&both, Path::new("h.yaml")).expect_err("contradiction");
        assert!(
            err.to_string().contains("both required and forbidden"),
            "{err}"
        );
        let bad = text.replace(
            "forbid_headers: [x-debug]",
            "forbid_headers: [\"bad header\"]",
        );
        let err = parse_policy(&bad, Path::new("h.yaml")).expect_err("bad name");
        assert!(err.to_string().contains("is not a header name"), "{err}");
    }

    #[test]
    fn budgets_compile_per_rule_and_mistakes_are_errors() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: agent }\nspec:\n  workload: { cgroup: /agents }\n  egress:\n    - name: db\n      match: { cidr: 10.0.0.0/8, port: 5432 }\n    - name: openai\n      match: { host: api.openai.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      BUDGET\n";
        let p = parse_policy(
            &text.replace("BUDGET", "budget: { requests: 100, per: 1h }"),
            Path::new("/p/b.yaml"),
        )
        .expect("policy");
        let RuleKind::Host(h) = &p.rules[1].kind else {
            panic!("host rule")
        };
        let b = h.budget.as_ref().expect("budget");
        assert_eq!(
            (
                b.requests,
                b.tokens,
                b.per.as_secs(),
                b.monitor,
                b.workloads_below.is_some()
            ),
            (Some(100), None, 3600, false, false)
        );
        for (scope, each) in [("rule", false), ("workload", true)] {
            let p = parse_policy(
                &text.replace(
                    "BUDGET",
                    &format!("budget: {{ requests: 100, per: 1h, scope: {scope} }}"),
                ),
                Path::new("/p/b.yaml"),
            )
            .expect(scope);
            let RuleKind::Host(h) = &p.rules[1].kind else {
                panic!("host rule")
            };
            // The policy's cgroup is what the budget is split below.
            assert_eq!(
                h.budget
                    .as_ref()
                    .map(|b| b.workloads_below.as_ref().map(|c| c.as_str().to_owned())),
                Some(each.then(|| "/agents".to_owned())),
                "{scope}"
            );
        }
        assert_eq!(
            b.key, "/p/b.yaml#openai#api.openai.com:80",
            "file, name, host and port"
        );
        let twice = text
            .replace("BUDGET", "")
            .replace("name: db", "name: openai");
        let err = parse_policy(&twice, Path::new("b.yaml")).expect_err("two names");
        let second = twice
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                l.trim_start()
                    .trim_start_matches("- ")
                    .starts_with("name: openai")
            })
            .nth(1)
            .map(|(n, l)| (n + 1, l.find("name").expect("name") + 1))
            .expect("a second rule");
        assert!(
            err.to_string()
                .starts_with(&format!("b.yaml:{}:{}: ", second.0, second.1)),
            "{err}"
        );
        assert!(
            err.to_string().contains("a second rule of that name"),
            "{err}"
        );
        for (budget, want) in [
            ("budget: { requests: 0, per: 1h }", "a budget of 0"),
            ("budget: { per: 1h }", "needs `requests`, `tokens` or both"),
            ("budget: { tokens: 100, per: 1h }", "give every `http` entry of the rule `models`"),
            ("budget: { tokens: 100, per: 1h }\n      http:\n        - paths: [/a]\n          models: [\"*\"]\n        - paths: [/b]", "give every `http` entry of the rule `models`"),
            (
                "budget: { requests: 5, per: 1w }",
                "give a number and a unit",
            ),
            ("budget: { requests: 5, per: 0s }", "use 1s to 31d"),
            ("budget: { requests: 5 }", "missing field `per`"),
            (
                "budget: { requests: 5, per: 1h, reserve_output: 10 }",
                "`reserve_output` reserves tokens",
            ),
            (
                "budget: { tokens: 5, per: 1h, reserve_output: 10 }\n      http:\n        - models: [\"*\"]",
                "more than the budget's 5 tokens",
            ),
            (
                "budget: { requests: 5, per: 1h, scope: pod }",
                "budget scope \"pod\": use `rule`",
            ),
            (
                "budget: { requests: 5, per: 1h, burst: 2 }",
                "unknown field `burst`",
            ),
            (
                "tls: passthrough\n      budget: { requests: 5, per: 1h }",
                "no `http` rules, credential or budget",
            ),
        ] {
            let t = if budget.starts_with("tls") {
                text.replace("      tls: originate\n", "")
                    .replace("BUDGET", budget)
            } else {
                text.replace("BUDGET", budget)
            };
            let err = parse_policy(&t, Path::new("b.yaml")).expect_err(budget);
            assert!(err.to_string().contains(want), "{budget}: {err}");
        }
        let l4 = text.replace("BUDGET", "").replace(
            "port: 5432 }",
            "port: 5432 }\n      budget: { requests: 5, per: 1h }",
        );
        let err = parse_policy(&l4, Path::new("b.yaml")).expect_err("L4 budget");
        assert!(err.to_string().contains("need a `host` rule"), "{err}");
    }

    #[test]
    fn models_decide_last_and_only_once_the_body_is_read() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: agent }\nspec:\n  workload: { cgroup: /agents }\n  MODE\n  egress:\n    - name: openai\n      match: { host: api.openai.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      http:\n        - methods: [POST]\n          paths: [/v1/chat/completions]\n          require_headers: { content-type: \"*\" }\n          models: [gpt-4o-mini, \"o3-*\", \"*-audit-*-v2\"]\n        - methods: [POST]\n          paths: [/v1/embeddings]\n        - methods: [POST]\n          paths: [/v1/embeddings, /v1/responses]\n          models: [\"text-*\"]\n";
        let cg = CgroupPath::parse("/agents/a1").expect("cg");
        let w = agent(&cg);
        let json = {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            h
        };
        let none = http::HeaderMap::new();
        for (mode, deny) in [("mode: enforce", "deny"), ("mode: monitor", "would_deny")] {
            let set = PolicySet::from_policies(vec![parse_policy(
                &text.replace("MODE", mode),
                Path::new("m.yaml"),
            )
            .expect("policy")])
            .expect("set");
            let decide = |path: &str, h: &http::HeaderMap, model: Model<'_>| match set
                .evaluate_request(&w, 80, "api.openai.com", "POST", path, h, &none, model)
            {
                RequestDecision::Allow { .. } => "allow".to_owned(),
                RequestDecision::Deny { reason, .. } => format!("deny {reason}"),
                RequestDecision::WouldDeny { reason, .. } => format!("would_deny {reason}"),
                RequestDecision::NeedsModel { .. } => "needs_model".to_owned(),
            };
            let chat = "/v1/chat/completions";
            let table: &[(&str, &http::HeaderMap, Model<'_>, String)] = &[
                // Unread: only an entry that limits models asks for the body.
                (chat, &json, Model::Unread, "needs_model".into()),
                // Method, path and headers come first: no body is read for them.
                (
                    chat,
                    &none,
                    Model::Unread,
                    format!("{deny} headers_not_allowed"),
                ),
                (
                    "/v1/files",
                    &json,
                    Model::Unread,
                    format!("{deny} method_or_path_not_allowed"),
                ),
                // An entry without models allows before any body is read.
                ("/v1/embeddings", &none, Model::Unread, "allow".into()),
                ("/v1/responses", &none, Model::Unread, "needs_model".into()),
                (
                    chat,
                    &json,
                    Model::Read(Some("gpt-4o-mini")),
                    "allow".into(),
                ),
                (chat, &json, Model::Read(Some("o3-pro")), "allow".into()),
                (chat, &json, Model::Read(Some("o3-")), "allow".into()),
                (
                    chat,
                    &json,
                    Model::Read(Some("x-audit-y-v2")),
                    "allow".into(),
                ),
                (
                    chat,
                    &json,
                    Model::Read(None),
                    format!("{deny} model_missing"),
                ),
                (
                    "/v1/responses",
                    &none,
                    Model::Read(Some("text-embedding-3")),
                    "allow".into(),
                ),
                (
                    "/v1/responses",
                    &none,
                    Model::Read(Some("gpt-4o-mini")),
                    format!("{deny} model_not_allowed"),
                ),
            ];
            for (path, h, model, want) in table {
                assert_eq!(&decide(path, h, *model), want, "{mode} {path} {model:?}");
            }
            for other in [
                "gpt-4o",
                "gpt-4o-mini-2",
                "GPT-4o-mini",
                "xo3-pro",
                "x-audit-v2",
            ] {
                assert_eq!(
                    decide(chat, &json, Model::Read(Some(other))),
                    format!("{deny} model_not_allowed"),
                    "{mode} {other}"
                );
            }
        }
        for bad in ["\"\"", "\"a b\"", "\"é\""] {
            let t = text
                .replace("MODE", "mode: enforce")
                .replace("models: [\"text-*\"]", &format!("models: [{bad}]"));
            let err = parse_policy(&t, Path::new("m.yaml")).expect_err(bad);
            assert!(err.to_string().contains("printable characters"), "{err}");
        }
    }

    #[test]
    fn requests_are_decided_by_host_method_and_path() {
        let set = PolicySet::from_policies(vec![
            parse_policy(OPENAI, Path::new("a.yaml")).expect("policy")
        ])
        .expect("set");
        let cg = CgroupPath::parse("/agents/a1").expect("cg");
        let w = agent(&cg);
        assert_eq!(
            set.evaluate(&w, "127.0.0.9:80".parse().expect("addr")),
            Decision::Inspect {
                policy: "agent".into()
            }
        );
        let table = [
            (
                "api.openai.com",
                "POST",
                "/v1/chat/completions",
                Ok("openai"),
            ),
            (
                "api.openai.com",
                "POST",
                "/v1/threads/t_1/runs",
                Ok("openai"),
            ),
            (
                "api.openai.com",
                "POST",
                "/v1/threads/t_1/x/runs",
                Err("method_or_path_not_allowed"),
            ),
            ("api.openai.com", "GET", "/v1/models/gpt-x", Ok("openai")),
            (
                "api.openai.com",
                "GET",
                "/v1/models",
                Err("method_or_path_not_allowed"),
            ),
            (
                "api.openai.com",
                "GET",
                "/v1/chat/completions",
                Err("method_or_path_not_allowed"),
            ),
            (
                "api.openai.com",
                "DELETE",
                "/v1/models/gpt-x",
                Err("method_or_path_not_allowed"),
            ),
            ("a.example.com", "PUT", "/anything", Ok("any-example")),
            ("example.com", "GET", "/", Err("host_not_allowed")),
            (
                "evil.com",
                "POST",
                "/v1/chat/completions",
                Err("host_not_allowed"),
            ),
        ];
        for (host, method, path, want) in table {
            let got = match set.evaluate_request(
                &w,
                80,
                host,
                method,
                path,
                &http::HeaderMap::new(),
                &http::HeaderMap::new(),
                Model::Unread,
            ) {
                RequestDecision::Allow { rule, .. } => Ok(rule),
                RequestDecision::Deny { reason, .. } => Err(reason),
                RequestDecision::WouldDeny { reason, .. } => Err(reason),
                RequestDecision::NeedsModel { .. } => Err("needs_model"),
            };
            assert_eq!(
                got.as_ref().map(AsRef::as_ref).map_err(|e| *e),
                want,
                "{method} {host}{path}"
            );
        }
        match set.evaluate_request(
            &w,
            8080,
            "api.openai.com",
            "POST",
            "/v1/chat/completions",
            &http::HeaderMap::new(),
            &http::HeaderMap::new(),
            Model::Unread,
        ) {
            RequestDecision::Deny { reason, .. } => assert_eq!(reason, "host_not_allowed"),
            other => panic!("another port is another rule: {other:?}"),
        }
    }

    /// A rule's `idle_timeout_ms` is its relays' (0: never), else the gateway's; out of range,
    /// or on a rule whose connections are not relayed, it is refused.
    #[test]
    fn a_rule_names_how_long_its_relays_may_stay_quiet() {
        let policy = |rules: &str| {
            format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: db }}\nspec:\n  workload: {{ cgroup: /agents }}\n  egress:\n{rules}")
        };
        let text = policy("    - name: db\n      match: { cidr: 127.0.0.5/32, port: 5432 }\n      idle_timeout_ms: 0\n    - name: cache\n      match: { cidr: 127.0.0.6/32, port: 6379 }\n      idle_timeout_ms: 30000\n    - name: other\n      match: { cidr: 127.0.0.7/32, port: 80 }\n    - name: tls\n      match: { host: git.example, port: 443 }\n      tls: passthrough\n      idle_timeout_ms: 600000\n");
        let set = PolicySet::from_policies(vec![
            parse_policy(&text, Path::new("db.yaml")).expect("policy")
        ])
        .expect("set");
        let cg = CgroupPath::parse("/agents/a1").expect("cg");
        let w = agent(&cg);
        let idle = |dst: &str| match set.evaluate(&w, dst.parse().expect("addr")) {
            Decision::Allow { idle, .. } => idle,
            other => panic!("{dst}: {other:?}"),
        };
        let gateway = Some(std::time::Duration::from_secs(5));
        assert_eq!(idle("127.0.0.5:5432").or_gateway(gateway), None);
        assert_eq!(
            idle("127.0.0.6:6379").or_gateway(gateway),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(idle("127.0.0.7:80").or_gateway(gateway), gateway);
        match set.evaluate_sni(&w, 443, "git.example") {
            RequestDecision::Allow { route, .. } => assert_eq!(
                route.idle.or_gateway(gateway),
                Some(std::time::Duration::from_secs(600))
            ),
            other => panic!("{other:?}"),
        }
        for ms in ["999", "604800001", "-1"] {
            let text = policy(&format!(
                "    - name: db\n      match: {{ cidr: 127.0.0.5/32, port: 5432 }}\n      idle_timeout_ms: {ms}\n"
            ));
            let err = parse_policy(&text, Path::new("db.yaml"))
                .expect_err(ms)
                .to_string();
            assert!(err.contains("idle_timeout_ms"), "{ms}: {err}");
        }
    }

    #[test]
    fn host_rule_mistakes_are_errors() {
        let bad = [
            (
                OPENAI.replace("tls: originate", "tls: none"),
                "only ever sent over verified TLS",
            ),
            (OPENAI.replace("      tls: originate\n", ""), "needs `tls"),
            (
                OPENAI.replace("/v1/chat/completions", "/v1/../admin"),
                "normalized",
            ),
            (
                OPENAI.replace(
                    "host: api.openai.com, port: 80",
                    "host: api.openai.com, cidr: 10.0.0.0/8, port: 80",
                ),
                "exactly one of",
            ),
            (
                OPENAI.replace("tls: originate", "tls: passthrough"),
                "no `http` rules, credential or budget",
            ),
            (
                OPENAI.replace("/v1/chat/completions", "/v1/models/"),
                "trailing slash",
            ),
            (
                OPENAI.replace(
                    "      tls: originate\n",
                    "      tls: originate\n      idle_timeout_ms: 60000\n",
                ),
                "`idle_timeout_ms` applies to relayed connections",
            ),
        ];
        for (text, want) in bad {
            let err = parse_policy(&text, Path::new("a.yaml"))
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}

#[cfg(test)]
mod patterns_and_positions {
    use super::*;

    #[test]
    fn a_trailing_star_is_everything_below_after_any_segment_stars() {
        let pattern = |s: &str| PathPattern::parse(s).expect("pattern");
        let table = [
            ("/v1/models", "/v1/models", true),
            ("/v1/models", "/v1/models/x", false),
            ("/v1/models/*", "/v1/models/x", true),
            ("/v1/models/*", "/v1/models/x/y", true),
            ("/v1/models/*", "/v1/models", false),
            ("/v1/models/*", "/v1/modelsx/y", false),
            ("/v1/threads/*/runs", "/v1/threads/t1/runs", true),
            ("/v1/threads/*/runs", "/v1/threads/t1/runs/r1", false),
            ("/v1/threads/*/runs", "/v1/threads//runs", false),
            ("/v1/threads/*/runs/*", "/v1/threads/t1/runs/r1", true),
            ("/v1/threads/*/runs/*", "/v1/threads/t1/runs/r1/steps", true),
            ("/v1/threads/*/runs/*", "/v1/threads/t1/runs", false),
            ("/v1/threads/*/runs/*", "/v1/threads/t1/other/r1", false),
            ("/", "/", true),
            ("/", "/x", false),
            ("/*", "/x/y", true),
        ];
        for (p, path, want) in table {
            assert_eq!(pattern(p).matches(path), want, "{p} {path}");
        }
    }

    /// Errors found after the YAML parser still say where: the rule's name, the selector.
    #[test]
    fn errors_past_the_parser_name_line_and_column() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: p }\nspec:\n  workload: { cgroup: /a }\n  egress:\n    - name: name\n      match: { cidr: 10.0.0.0/8, port: 1 }\n    - name: \"api\"\n      match: { host: \"api..example\", port: 80 }\n      tls: none\n";
        let err = parse_policy(text, Path::new("p.yaml"))
            .expect_err("bad host")
            .to_string();
        assert!(err.starts_with("p.yaml:9:7: rule \"api\""), "{err}");
        let bad_id = text.replace("cgroup: /a", "container_id: xyz");
        let err = parse_policy(&bad_id, Path::new("p.yaml"))
            .expect_err("bad id")
            .to_string();
        assert!(err.starts_with("p.yaml:5:15: container_id"), "{err}");
        let a = parse_policy(
            &text.replace("\"api..example\"", "api.example"),
            Path::new("a.yaml"),
        )
        .expect("a");
        let b = parse_policy(
            &text.replace("\"api..example\"", "api.example"),
            Path::new("b.yaml"),
        )
        .expect("b");
        let err = PolicySet::from_policies(vec![a, b])
            .expect_err("tie")
            .to_string();
        assert!(err.starts_with("b.yaml:5:3: "), "{err}");
    }
}

#[cfg(test)]
mod explain_and_units {
    use super::*;

    #[test]
    fn unit_selector_and_explain() {
        let text = "apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: { name: billing }\nspec:\n  workload: { unit: billing.service }\n  egress:\n    - name: db\n      match: { cidr: 10.20.0.0/16, port: 5432 }\n    - name: api\n      match: { host: api.example.com, port: 80 }\n      upstream: { port: 443 }\n      tls: originate\n      http:\n        - methods: [GET]\n          paths: [/v1/*]\n";
        let set = PolicySet::from_policies(vec![
            parse_policy(text, Path::new("b.yaml")).expect("policy")
        ])
        .expect("set");
        let cg = CgroupPath::parse("/system.slice/billing.service").expect("cg");
        let other = CgroupPath::parse("/system.slice/web.service").expect("cg");
        let w = WorkloadView {
            cgroup: &cg,
            container_id: None,
            pod_uid: None,
            exe: None,
            uid: 0,
        };
        let o = WorkloadView {
            cgroup: &other,
            ..w
        };
        let table = [
            (&w, "tcp 10.20.1.5:5432", "allow by rule \"db\""),
            (&w, "tcp 10.30.1.5:5432", "deny (no_rule_matched)"),
            (
                &w,
                "GET http://api.example.com/v1/models",
                "upstream api.example.com:443",
            ),
            (
                &w,
                "POST http://api.example.com/v1/models",
                "deny (method_or_path_not_allowed)",
            ),
            (
                &w,
                "GET http://api.example.com/v1/../admin",
                "deny (method_or_path_not_allowed)",
            ),
            (
                &w,
                "tls api.example.com:80",
                "deny (tls_on_an_originate_rule)",
            ),
            (
                &o,
                "tcp 10.20.1.5:5432",
                "no policy: deny (no_policy_for_workload)",
            ),
        ];
        for (who, request, want) in table {
            let got = explain(&set, who, request, &http::HeaderMap::new(), None).expect("explain");
            assert!(got.contains(want), "{request}: {got}");
        }
        assert!(explain(&set, &w, "nonsense", &http::HeaderMap::new(), None).is_err());
    }

    /// `explain` answers what the gateway does, where that differs from the bare rule match:
    /// a lower-case method, plain HTTP on a passthrough rule, TLS on an originating rule in
    /// monitor mode, and a monitored host no rule names.
    #[test]
    fn explain_says_what_the_gateway_does() {
        let text = |mode: &str| {
            format!("apiVersion: tollgate/v1\nkind: EgressPolicy\nmetadata: {{ name: p }}\nspec:\n  workload: {{ cgroup: /a }}\n  mode: {mode}\n  egress:\n    - name: api\n      match: {{ host: api.example.com, port: 80 }}\n      upstream: {{ port: 443 }}\n      tls: originate\n      http:\n        - methods: [GET]\n          paths: [/v1/*]\n    - name: pass\n      match: {{ host: pass.example.com, port: 443 }}\n      tls: passthrough\n")
        };
        let cg = CgroupPath::parse("/a/w").expect("cg");
        let w = WorkloadView {
            cgroup: &cg,
            container_id: None,
            pod_uid: None,
            exe: None,
            uid: 0,
        };
        for (mode, request, want) in [
            (
                "enforce",
                "GET http://api.example.com/v1/x",
                "allow by rule \"api\"",
            ),
            (
                "enforce",
                "get http://api.example.com/v1/x",
                "deny (method_or_path_not_allowed)",
            ),
            (
                "enforce",
                "GET http://pass.example.com:443/",
                "deny (plain_http_on_a_passthrough_rule)",
            ),
            (
                "monitor",
                "GET http://pass.example.com:443/",
                "deny (plain_http_on_a_passthrough_rule)",
            ),
            (
                "monitor",
                "tls api.example.com:80",
                "deny (tls_on_an_originate_rule)",
            ),
            (
                "monitor",
                "tls pass.example.com:443",
                "allow by rule \"pass\"",
            ),
            (
                "monitor",
                "tls other.example.com:443",
                "deny (host_not_allowed)",
            ),
            (
                "monitor",
                "GET http://other.example.com/",
                "deny (host_not_allowed)",
            ),
            (
                "monitor",
                "POST http://api.example.com/v1/x",
                "would deny, monitor mode (method_or_path_not_allowed)",
            ),
        ] {
            let set =
                PolicySet::from_policies(vec![
                    parse_policy(&text(mode), Path::new("p.yaml")).expect("policy")
                ])
                .expect("set");
            let got = explain(&set, &w, request, &http::HeaderMap::new(), None).expect("explain");
            assert!(got.contains(want), "{mode} {request}: {got}");
        }
    }
}
