//! Host and path normalization for HTTP policy: what is checked is exactly what is forwarded,
//! and anything ambiguous is refused rather than guessed.
use std::borrow::Cow;

/// Why a host or path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    EmptyHost,
    /// `user@host`: credentials or a second host hidden in the authority.
    Userinfo,
    BadHost,
    BadPort,
    /// Not origin-form (`/...`).
    NotAbsolutePath,
    /// `%2f`, `%5c`, `\`: a separator in disguise.
    EncodedSeparator,
    /// `;` path parameters, NUL and control characters.
    BadPathCharacter,
    /// `..` above the root.
    EscapesRoot,
    BadPercentEncoding,
}

impl Reject {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::EmptyHost => "empty_host",
            Self::Userinfo => "userinfo_in_host",
            Self::BadHost => "bad_host",
            Self::BadPort => "bad_port",
            Self::NotAbsolutePath => "path_not_absolute",
            Self::EncodedSeparator => "encoded_separator_in_path",
            Self::BadPathCharacter => "bad_character_in_path",
            Self::EscapesRoot => "path_escapes_root",
            Self::BadPercentEncoding => "bad_percent_encoding",
        }
    }
}

/// `Host` (or an authority) → lower-case name without trailing dot, and the port if given.
pub fn host(raw: &str) -> Result<(String, Option<u16>), Reject> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(Reject::EmptyHost);
    }
    if raw.contains('@') {
        return Err(Reject::Userinfo);
    }
    let (name, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(Reject::BadHost)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().map_err(|_| Reject::BadPort)?),
            None if after.is_empty() => None,
            None => return Err(Reject::BadHost),
        };
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| Reject::BadHost)?;
        (Cow::Owned(format!("[{v6}]")), port)
    } else {
        match raw.rsplit_once(':') {
            Some((n, p)) => (
                Cow::Borrowed(n),
                Some(p.parse::<u16>().map_err(|_| Reject::BadPort)?),
            ),
            None => (Cow::Borrowed(raw), None),
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err(Reject::EmptyHost);
    }
    if !name.starts_with('[')
        && !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(Reject::BadHost);
    }
    if name.contains("..") {
        return Err(Reject::BadHost);
    }
    Ok((name, port))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// An origin-form path (no query) → decoded where decoding is unambiguous (unreserved
/// characters, including `%2e`), dot segments resolved, empty segments (`//`) removed, no
/// trailing slash (except `/`). Encoded separators and `;` parameters are refused.
pub fn path(raw: &str) -> Result<String, Reject> {
    if !raw.starts_with('/') {
        return Err(Reject::NotAbsolutePath);
    }
    // Most paths have nothing to decode or refuse: their segments are read as they are.
    let plain = raw
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !matches!(b, b'%' | b'\\' | b';' | b'#'));
    let decoded = if plain {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(decode(raw)?)
    };
    let mut out = String::with_capacity(decoded.len());
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                let Some(parent) = out.rfind('/') else {
                    return Err(Reject::EscapesRoot);
                };
                out.truncate(parent);
            }
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Pushes `%XX` (upper-case hex) for `b`.
fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Percent-decoding of what is unambiguous, and the refusals, for [`path`].
fn decode(raw: &str) -> Result<String, Reject> {
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (h, l) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            );
            let (Some(h), Some(l)) = (h, l) else {
                return Err(Reject::BadPercentEncoding);
            };
            let c = h * 16 + l;
            if c == b'/' || c == b'\\' {
                return Err(Reject::EncodedSeparator);
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(char::from(c));
            } else if c < 0x20 || c == 0x7f || c == b';' {
                return Err(Reject::BadPathCharacter);
            } else {
                // Reserved or non-ASCII: keep encoded (upper-case hex), as sent.
                push_encoded(&mut decoded, c);
            }
            i += 3;
            continue;
        }
        if b == b'\\' {
            return Err(Reject::EncodedSeparator);
        }
        if b == b';' || b < 0x20 || b == 0x7f || b == b'#' {
            return Err(Reject::BadPathCharacter);
        }
        if b >= 0x80 {
            // Raw non-ASCII (UTF-8) bytes: forwarded percent-encoded, byte for byte.
            push_encoded(&mut decoded, b);
        } else {
            decoded.push(char::from(b));
        }
        i += 1;
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    type HostCase = (&'static str, Result<(&'static str, Option<u16>), Reject>);

    #[test]
    fn hosts() {
        let table: [HostCase; 12] = [
            ("[::ABCD]", Ok(("[::abcd]", None))),
            ("Api.Example.:8443", Ok(("api.example", Some(8443)))),
            ("api.openai.com", Ok(("api.openai.com", None))),
            ("API.OpenAI.com.", Ok(("api.openai.com", None))),
            ("api.openai.com:443", Ok(("api.openai.com", Some(443)))),
            ("api.openai.com@evil.example", Err(Reject::Userinfo)),
            ("user:pw@api.openai.com", Err(Reject::Userinfo)),
            ("", Err(Reject::EmptyHost)),
            ("api.openai.com:99999", Err(Reject::BadPort)),
            ("api openai.com", Err(Reject::BadHost)),
            ("[::1]:8080", Ok(("[::1]", Some(8080)))),
            ("a..b", Err(Reject::BadHost)),
        ];
        for (input, want) in table {
            let got = host(input);
            assert_eq!(
                got.as_ref().map(|(h, p)| (h.as_str(), *p)).map_err(|e| *e),
                want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn paths() {
        let table: [(&str, Result<&str, Reject>); 25] = [
            // Dot segments and empty ones, with nothing to decode and with something.
            ("/a/b/../../..", Err(Reject::EscapesRoot)),
            ("/a/..", Ok("/")),
            ("//", Ok("/")),
            ("/a/.", Ok("/a")),
            ("/a/%2e", Ok("/a")),
            ("/a/b/%2E%2E/c/", Ok("/a/c")),
            ("/a#b", Err(Reject::BadPathCharacter)),
            ("/a\u{1}b", Err(Reject::BadPathCharacter)),
            ("/caf\u{e9}", Ok("/caf%C3%A9")),
            ("/v1/chat/completions", Ok("/v1/chat/completions")),
            ("/v1//chat/completions", Ok("/v1/chat/completions")),
            ("/v1/chat/completions/", Ok("/v1/chat/completions")),
            ("/v1/./chat/completions", Ok("/v1/chat/completions")),
            ("/v1/models/../chat/completions", Ok("/v1/chat/completions")),
            ("/v1/%2e%2e/admin", Ok("/admin")),
            ("/v1/%2E%2E/%2e%2e/admin", Err(Reject::EscapesRoot)),
            ("/v1/chat%2fcompletions", Err(Reject::EncodedSeparator)),
            ("/v1/chat%5ccompletions", Err(Reject::EncodedSeparator)),
            ("/v1\\admin", Err(Reject::EncodedSeparator)),
            ("/v1/chat;x=1/completions", Err(Reject::BadPathCharacter)),
            ("/..", Err(Reject::EscapesRoot)),
            ("/a/%zz", Err(Reject::BadPercentEncoding)),
            ("v1/chat", Err(Reject::NotAbsolutePath)),
            ("/", Ok("/")),
            ("/v1/%7euser/%20x", Ok("/v1/~user/%20x")),
        ];
        for (input, want) in table {
            assert_eq!(path(input).as_deref().map_err(|e| *e), want, "{input:?}");
        }
    }
}
