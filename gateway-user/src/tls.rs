//! Reading a TLS ClientHello without terminating TLS: enough to decide on the SNI. The hello
//! may span several records; it is read by peeking, so the bytes are still there to be
//! spliced to the upstream unchanged.

/// What the ClientHello says, or why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// A complete hello naming a server.
    Sni(String),
    /// A complete hello without a server name.
    NoSni,
    /// Encrypted ClientHello: the real server name is hidden; refused.
    Ech,
    /// Not a TLS handshake, or malformed.
    Invalid,
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ECH: u16 = 0xfe0d;
/// The encrypted SNI extension of drafts before ECH.
const EXT_ESNI: u16 = 0xffce;
/// Larger hellos are refused (post-quantum key shares fit well below this).
pub const MAX_HELLO: usize = 16 * 1024;

/// Parses the ClientHello at the start of `data` (TLS records as received).
pub fn parse(data: &[u8]) -> Hello {
    // Reassemble the handshake bytes carried by the leading handshake records.
    let mut hs = Vec::new();
    let mut at = 0;
    loop {
        if data.len() < at + 5 {
            return if at == 0 && !data.is_empty() && data[0] != HANDSHAKE {
                Hello::Invalid
            } else {
                Hello::Incomplete
            };
        }
        if data[at] != HANDSHAKE || data[at + 1] != 3 {
            return Hello::Invalid;
        }
        let len = usize::from(u16::from_be_bytes([data[at + 3], data[at + 4]]));
        if len == 0 || len > 16 * 1024 + 256 {
            return Hello::Invalid;
        }
        let Some(fragment) = data.get(at + 5..at + 5 + len) else {
            return Hello::Incomplete;
        };
        hs.extend_from_slice(fragment);
        at += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != CLIENT_HELLO {
                return Hello::Invalid;
            }
            let body_len = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
            if body_len > MAX_HELLO {
                return Hello::Invalid;
            }
            if hs.len() >= 4 + body_len {
                return client_hello(&hs[4..4 + body_len]);
            }
        }
    }
}

fn client_hello(b: &[u8]) -> Hello {
    let mut r = Reader(b);
    let parsed = (|| {
        r.skip(2 + 32)?; // version, random
        let sid = usize::from(r.u8()?);
        r.skip(sid)?;
        let suites = usize::from(r.u16()?);
        r.skip(suites)?;
        let comp = usize::from(r.u8()?);
        r.skip(comp)?;
        if r.0.is_empty() {
            return Some(Hello::NoSni);
        }
        let ext_len = usize::from(r.u16()?);
        let mut exts = Reader(r.take(ext_len)?);
        let mut sni = None;
        let mut seen = Vec::new();
        while !exts.0.is_empty() {
            let kind = exts.u16()?;
            let len = usize::from(exts.u16()?);
            let data = exts.take(len)?;
            // An extension twice is a malformed hello (RFC 8446, 4.2); a server might read
            // the other one than we did.
            if seen.contains(&kind) {
                return None;
            }
            seen.push(kind);
            match kind {
                // ECH, its drafts' codepoints and the older ESNI: the name that counts is
                // encrypted, so the one in the clear decides nothing.
                EXT_ECH | 0xfe08..=0xfe0c | EXT_ESNI => return Some(Hello::Ech),
                EXT_SERVER_NAME => {
                    let mut d = Reader(data);
                    let list = usize::from(d.u16()?);
                    let mut names = Reader(d.take(list)?);
                    while !names.0.is_empty() {
                        let name_type = names.u8()?;
                        let n = usize::from(names.u16()?);
                        let name = names.take(n)?;
                        if name_type == 0 {
                            // One host name only (RFC 6066, 3): of two, a server might take
                            // the other.
                            if sni.is_some() {
                                return None;
                            }
                            sni = Some(String::from_utf8(name.to_vec()).ok()?);
                        }
                    }
                }
                _ => {}
            }
        }
        Some(sni.map_or(Hello::NoSni, Hello::Sni))
    })();
    parsed.unwrap_or(Hello::Invalid)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello with the given extensions, as one handshake message.
    pub(crate) fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (kind, data) in exts {
            e.extend(kind.to_be_bytes());
            e.extend(u16::try_from(data.len()).expect("len").to_be_bytes());
            e.extend(data);
        }
        body.extend(u16::try_from(e.len()).expect("len").to_be_bytes());
        body.extend(e);
        let len = body.len();
        let mut hs = vec![CLIENT_HELLO, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        hs.extend(body);
        hs
    }

    pub(crate) fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut d = Vec::new();
        d.extend(u16::try_from(name.len() + 3).expect("len").to_be_bytes());
        d.push(0);
        d.extend(u16::try_from(name.len()).expect("len").to_be_bytes());
        d.extend(name.as_bytes());
        (EXT_SERVER_NAME, d)
    }

    pub(crate) fn records(hs: &[u8], split: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(split) {
            out.extend([HANDSHAKE, 3, 1]);
            out.extend(u16::try_from(chunk.len()).expect("len").to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn sni_in_one_record_and_across_records() {
        let hs = hello(&[(10, vec![0, 2, 0, 29]), sni_ext("api.openai.com")]);
        assert_eq!(
            parse(&records(&hs, 4096)),
            Hello::Sni("api.openai.com".into())
        );
        let split = records(&hs, 7);
        assert_eq!(parse(&split), Hello::Sni("api.openai.com".into()));
        for cut in [1, 5, 12, split.len() - 1] {
            assert_eq!(parse(&split[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn ech_no_sni_and_garbage() {
        assert_eq!(
            parse(&records(
                &hello(&[sni_ext("a.example"), (EXT_ECH, vec![1, 2, 3])]),
                4096
            )),
            Hello::Ech
        );
        assert_eq!(parse(&records(&hello(&[]), 4096)), Hello::NoSni);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::Invalid);
        assert_eq!(
            parse(&[HANDSHAKE, 3, 1, 0, 4, 2, 0, 0, 0]),
            Hello::Invalid,
            "not a ClientHello"
        );
    }

    /// A hello a server could read otherwise than we do is refused: two names, two server_name
    /// extensions, any extension twice; so is one whose real name is encrypted by a draft.
    #[test]
    fn hellos_read_two_ways_are_refused() {
        let two_names = {
            let (kind, mut d) = sni_ext("a.example");
            let (_, other) = sni_ext("b.example");
            d.extend(&other[2..]);
            let list = u16::try_from(d.len() - 2).expect("len").to_be_bytes();
            d[..2].copy_from_slice(&list);
            (kind, d)
        };
        for exts in [
            vec![two_names],
            vec![sni_ext("a.example"), sni_ext("b.example")],
            vec![
                sni_ext("a.example"),
                (10, vec![0, 2, 0, 29]),
                (10, vec![0, 2, 0, 29]),
            ],
        ] {
            assert_eq!(parse(&records(&hello(&exts), 4096)), Hello::Invalid);
        }
        for draft in [EXT_ESNI, 0xfe08, 0xfe0c] {
            let exts = [sni_ext("a.example"), (draft, vec![1, 2, 3])];
            assert_eq!(
                parse(&records(&hello(&exts), 4096)),
                Hello::Ech,
                "{draft:#x}"
            );
        }
    }
}
