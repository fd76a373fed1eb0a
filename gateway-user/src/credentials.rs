//! Credential bindings: which secret goes to which destination hosts, and how it is injected.
//! Secrets live in `SecretString` (zeroized on drop, redacted in `Debug`) and are exposed only
//! where the header value is built. The file itself holds no secrets, only where they come
//! from; it must not be readable by group or others all the same, nor owned by another user.
use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use secrecy::{zeroize::Zeroizing, ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::parse_yaml_without_values;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Syntax(#[from] crate::config::YamlError),
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}): chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path} is owned by uid {owner}, not by root or the daemon's uid {daemon}: that user can \
         read and rewrite it; chown it to root"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        daemon: u32,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    bindings: Vec<RawBinding>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    name: String,
    hosts: Vec<String>,
    inject: RawInject,
    source: RawSource,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    query: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    env: Option<String>,
}

/// How a secret is put on a request.
#[derive(Debug, Clone)]
pub enum Inject {
    /// A header whose value is `format` with `{secret}` replaced.
    Header {
        name: http::HeaderName,
        format: String,
    },
    /// A query parameter.
    Query { param: String },
}

/// One binding, with its secret loaded.
pub struct Binding {
    pub name: Arc<str>,
    /// Exact host names this secret may go to (lower-case).
    pub hosts: Vec<String>,
    pub inject: Inject,
    secret: SecretString,
    /// Derived once at load, not per request: the header to inject (zeroed when the last
    /// request that carried it is gone) and the forms an echo of the secret can take.
    header: Option<http::HeaderValue>,
    echoes: std::sync::Arc<crate::redact::Secrets>,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl Binding {
    fn new(
        name: String,
        hosts: Vec<String>,
        inject: Inject,
        secret: SecretString,
    ) -> Result<Self, String> {
        let header = match &inject {
            Inject::Header {
                name: header,
                format,
            } => {
                let value = Zeroizing::new(
                    format
                        .replace("{secret}", secret.expose_secret())
                        .into_bytes(),
                );
                let mut v = http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(value))
                    .map_err(|_| {
                    format!("binding {name:?}: the secret has bytes a {header} header cannot carry")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            Inject::Query { .. } => None,
        };
        let echoes = std::sync::Arc::new(crate::redact::Secrets::new(secret_forms(
            secret.expose_secret(),
        )));
        Ok(Self {
            name: name.into(),
            hosts,
            inject,
            secret,
            header,
            echoes,
        })
    }

    /// The header value to inject, marked sensitive (never logged by hyper/http).
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        self.header.clone()
    }

    /// The query parameter value, for `Inject::Query`.
    pub fn query_value(&self) -> Option<&str> {
        matches!(self.inject, Inject::Query { .. }).then(|| self.secret.expose_secret())
    }

    /// The forms an echo of the secret can take (raw, percent-encoded, JSON-escaped), only to
    /// redact them.
    pub fn echoes(&self) -> std::sync::Arc<crate::redact::Secrets> {
        std::sync::Arc::clone(&self.echoes)
    }

    /// Whether the secret may go to `host`.
    pub fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }
}

/// Every binding, by name.
#[derive(Debug, Default)]
pub struct Credentials {
    bindings: BTreeMap<String, Binding>,
    /// The secret files the bindings were read from.
    sources: Vec<PathBuf>,
}

impl Credentials {
    /// The secret files the bindings were read from (watched for changes).
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    pub fn get(&self, name: &str) -> Option<&Binding> {
        self.bindings.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.bindings.keys().map(String::as_str)
    }

    /// Loads the credentials file and every secret it names.
    pub fn load(path: &Path) -> Result<Self, CredentialError> {
        let text = read_private(path)?;
        let base = path.parent().unwrap_or(Path::new("/"));
        Self::parse(&text, &path.display().to_string(), base, &|var| {
            std::env::var(var).ok()
        })
    }

    /// Parses credentials text; `env` reads the daemon's environment (tests pass their own).
    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, CredentialError> {
        // A secret typed into the file by mistake must not reach an error: no message quotes
        // a value from it, only binding names (which policies and audit records carry anyway).
        let raw: RawFile = parse_yaml_without_values(text, file)?;
        let invalid = |message: String| CredentialError::Invalid {
            file: file.to_owned(),
            message,
        };
        let mut bindings = BTreeMap::new();
        let mut sources = Vec::new();
        for b in raw.bindings {
            if b.hosts.is_empty() {
                return Err(invalid(format!(
                    "binding {:?}: name at least one host",
                    b.name
                )));
            }
            let hosts = b
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    crate::normalize::host(h).map(|(n, _)| n).map_err(|e| {
                        invalid(format!("binding {:?}: hosts[{i}]: {}", b.name, e.as_str()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let inject = match (b.inject.header, b.inject.format, b.inject.query) {
                (Some(h), format, None) => Inject::Header {
                    name: http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                        invalid(format!(
                            "binding {:?}: inject.header is not a valid header name",
                            b.name
                        ))
                    })?,
                    format: format.unwrap_or_else(|| "{secret}".into()),
                },
                (None, None, Some(q)) => Inject::Query { param: q },
                _ => {
                    return Err(invalid(format!(
                        "binding {:?}: inject needs `header` (with optional `format`) or `query`",
                        b.name
                    )))
                }
            };
            if let Inject::Header { format, .. } = &inject {
                if !format.contains("{secret}") {
                    return Err(invalid(format!(
                        "binding {:?}: format must contain {{secret}}",
                        b.name
                    )));
                }
            }
            let secret = match (b.source.file, b.source.env) {
                (Some(f), None) => {
                    let f = if f.is_absolute() { f } else { base.join(f) };
                    // A file that is not there is not named: what was typed may be the
                    // secret itself. A file that is there has a name, not a secret, for one.
                    let s = read_private(&f).map_err(|e| match e {
                        CredentialError::Read { source, .. }
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            invalid(format!(
                                "binding {:?}: the file source.file names does not exist \
                                 (a relative path is read from the credentials file's directory)",
                                b.name
                            ))
                        }
                        other => other,
                    })?;
                    sources.push(f);
                    SecretString::from(s.trim_end_matches(['\n', '\r']).to_owned())
                }
                (None, Some(var)) => SecretString::from(env(&var).ok_or_else(|| {
                    invalid(format!(
                        "binding {:?}: the variable source.env names is not set in the \
                         daemon's environment",
                        b.name
                    ))
                })?),
                _ => {
                    return Err(invalid(format!(
                        "binding {:?}: source needs exactly one of `file` or `env`",
                        b.name
                    )))
                }
            };
            if secret.expose_secret().is_empty() {
                return Err(invalid(format!(
                    "binding {:?}: the secret is empty",
                    b.name
                )));
            }
            if bindings.contains_key(&b.name) {
                return Err(invalid(format!("binding {:?} is defined twice", b.name)));
            }
            bindings.insert(
                b.name.clone(),
                Binding::new(b.name, hosts, inject, secret).map_err(invalid)?,
            );
        }
        Ok(Self { bindings, sources })
    }
}

/// The forms an echo of `raw` can take: raw, percent-encoded (either case), JSON-escaped.
fn secret_forms(raw: &str) -> Vec<Vec<u8>> {
    let quoted = Zeroizing::new(serde_json::to_string(raw).unwrap_or_default());
    let json = quoted.trim_matches('"').replace('/', "\\/");
    vec![
        raw.as_bytes().to_vec(),
        percent_encoded(raw, true),
        percent_encoded(raw, false),
        json.into_bytes(),
    ]
}

/// `raw` percent-encoded, every byte but the unreserved ones, with upper- or lower-case hex.
fn percent_encoded(raw: &str, upper: bool) -> Vec<u8> {
    let hex: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(raw.len() * 3);
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}

/// Reads a credentials or secret file that only root or the daemon's own user can read or
/// write: a file another user owns can be read and rewritten by that user (a workload's uid,
/// say) whatever its mode. Symlinks are followed; the file checked is the one opened, so the
/// text read is the text checked.
fn read_private(path: &Path) -> Result<String, CredentialError> {
    let read = |source| CredentialError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let daemon = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != daemon {
        return Err(CredentialError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            daemon,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "bindings:\n  - name: openai-prod\n    hosts: [API.openai.com]\n    inject: { header: Authorization, format: \"Bearer {secret}\" }\n    source: { env: TG_TEST_KEY }\n  - name: maps\n    hosts: [maps.example]\n    inject: { query: key }\n    source: { env: TG_MAPS }\n";

    fn env(var: &str) -> Option<String> {
        match var {
            "TG_TEST_KEY" => Some("sk-test-123".into()),
            "TG_MAPS" => Some("m-456".into()),
            _ => None,
        }
    }

    #[test]
    fn parses_and_injects() {
        let c = Credentials::parse(TEXT, "c.yaml", Path::new("/"), &env).expect("creds");
        let b = c.get("openai-prod").expect("binding");
        assert!(b.allows_host("api.openai.com"));
        assert!(!b.allows_host("evil.example"));
        let v = b.header_value().expect("header");
        assert_eq!(v.to_str().expect("ascii"), "Bearer sk-test-123");
        assert!(v.is_sensitive());
        assert_eq!(c.get("maps").and_then(Binding::query_value), Some("m-456"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = Credentials::parse(TEXT, "c.yaml", Path::new("/"), &env).expect("creds");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sk-test-123") && !shown.contains("m-456"),
            "{shown}"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let missing = TEXT.replace("TG_MAPS", "TG_NOPE");
        let err = Credentials::parse(&missing, "c.yaml", Path::new("/"), &env)
            .expect_err("missing env")
            .to_string();
        assert!(
            err.contains("\"maps\"") && err.contains("source.env") && err.contains("not set"),
            "{err}"
        );
        let unknown = TEXT.replace(
            "    source: { env: TG_TEST_KEY }",
            "    source: { env: TG_TEST_KEY }\n    sorce: x",
        );
        assert!(Credentials::parse(&unknown, "c.yaml", Path::new("/"), &env)
            .expect_err("unknown")
            .to_string()
            .starts_with("c.yaml:6:"));
        let no_placeholder = TEXT.replace("Bearer {secret}", "Bearer");
        assert!(Credentials::parse(&no_placeholder, "c.yaml", Path::new("/"), &env).is_err());
        // A secret a header cannot carry is refused at load, not left out of requests.
        let control = |var: &str| {
            (var == "TG_TEST_KEY")
                .then(|| "sk-\u{1}-1".to_owned())
                .or_else(|| env(var))
        };
        let err = Credentials::parse(TEXT, "c.yaml", Path::new("/"), &control)
            .expect_err("control byte")
            .to_string();
        assert!(
            err.contains("openai-prod") && err.contains("authorization header"),
            "{err}"
        );
        assert!(!err.contains("sk-"), "{err}");
    }

    #[test]
    fn errors_never_quote_a_value_from_the_file() {
        const SECRET: &str = "TOPSECRET";
        let source = "    source: { env: TG_TEST_KEY }";
        let cases = [
            // Parse errors: serde's messages quote the scalar they met.
            (
                source,
                "    source: sk-live-TOPSECRET",
                "c.yaml:5:13: bindings[0].source: invalid type: string, expected struct",
            ),
            (
                "    hosts: [API.openai.com]",
                "    hosts: 987654321987",
                "c.yaml:3:12: bindings[0].hosts: invalid type: integer, expected a sequence",
            ),
            (
                source,
                "    source: { env: TG_TEST_KEY }\n    key: sk-live-TOPSECRET",
                "c.yaml:6:5: bindings[0]: unknown field, expected one of `name`",
            ),
            (
                source,
                "    source: { env: TG_TEST_KEY, sk-live-TOPSECRET: x }",
                "c.yaml:5:33: bindings[0].source: unknown field, expected `file` or `env`",
            ),
            (
                "    hosts: [API.openai.com]",
                "    hosts: !sk-live-TOPSECRET x",
                "c.yaml:3:12: bindings[0].hosts: ",
            ),
            // Checks after parsing: a value in a field of the wrong meaning.
            (
                source,
                "    source: { env: sk-live-TOPSECRET }",
                "binding \"openai-prod\": the variable source.env names is not set",
            ),
            (
                "header: Authorization",
                "header: \"Bearer sk-live-TOPSECRET\"",
                "binding \"openai-prod\": inject.header is not a valid header name",
            ),
            (
                "[API.openai.com]",
                "[\"sk-live-TOPSECRET/v1\"]",
                "binding \"openai-prod\": hosts[0]: ",
            ),
            (
                source,
                "    source: { file: sk-live-TOPSECRET }",
                "binding \"openai-prod\": the file source.file names does not exist",
            ),
        ];
        for (from, to, expected) in cases {
            let text = TEXT.replace(from, to);
            assert_ne!(text, TEXT, "{to}");
            let err = Credentials::parse(&text, "c.yaml", Path::new("/"), &env)
                .expect_err(to)
                .to_string();
            assert!(err.contains(expected), "{to}: {err}");
            assert!(!err.contains(SECRET), "{to}: {err}");
        }
    }

    #[test]
    fn group_readable_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("tg-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("creds.yaml");
        std::fs::write(&f, TEXT).expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = Credentials::load(&f).expect_err("group readable");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn files_owned_by_another_user_are_refused() {
        use std::os::unix::fs::{chown, symlink};
        const CREDS: &str = "bindings:\n  - name: k\n    hosts: [k.example]\n    \
                             inject: { header: x-key }\n    source: { file: link }\n";
        let dir = std::env::temp_dir().join(format!("tg-cred-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (creds, key, link) = (dir.join("creds.yaml"), dir.join("k"), dir.join("link"));
        for (path, text) in [(&creds, CREDS), (&key, "sk-owner-1\n")] {
            std::fs::write(path, text).expect("write");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        // The secret is read through a symlink: the file it leads to is the one checked.
        symlink(&key, &link).expect("symlink");
        // Owned by the daemon's user (root in CI): accepted.
        let accepted = Credentials::load(&creds).map(|c| c.names().count());
        // (the file given away, the path the error must name)
        let refusals = if nix::unistd::geteuid().is_root() {
            [(&creds, &creds), (&key, &link)]
                .map(|(file, named)| {
                    chown(file, Some(65_534), None).expect("chown");
                    let refused = Credentials::load(&creds);
                    chown(file, Some(0), None).expect("chown back");
                    (named, refused.expect_err("another user's file").to_string())
                })
                .to_vec()
        } else {
            eprintln!("the refusal is not checked: giving a file to another uid needs root");
            Vec::new()
        };
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(accepted.expect("files of the daemon's user"), 1);
        for (named, err) in refusals {
            assert!(
                err.starts_with(&format!("{} is owned by uid 65534", named.display())),
                "{err}"
            );
            assert!(err.contains("chown it to root"), "{err}");
        }
    }
}
