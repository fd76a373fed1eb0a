//! Entry points for the fuzz targets (`fuzz/`) and for replaying their corpora as regression
//! tests. Each one must never panic, and checks a property where there is one.

/// Policy text: parse and compile; evaluating a compiled policy must not panic either.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = crate::policy::parse_policy(text, std::path::Path::new("fuzz.yaml")) {
        if let Ok(set) = crate::policy::PolicySet::from_policies(vec![p]) {
            let cg =
                crate::cgroup::CgroupPath::parse("/fuzz/app").unwrap_or_else(|_| unreachable!());
            let w = crate::policy::WorkloadView {
                cgroup: &cg,
                container_id: None,
                pod_uid: None,
                exe: None,
                uid: 0,
            };
            let _ = set.evaluate(&w, std::net::SocketAddr::from(([127, 0, 0, 1], 80)));
            let _ = set.evaluate_request(
                &w,
                80,
                "api.example.com",
                "POST",
                "/v1/x",
                &http::HeaderMap::new(),
                &http::HeaderMap::new(),
                crate::policy::Model::Unread,
            );
        }
    }
}

/// A TLS ClientHello, in whole and cut at every length: a prefix is never judged complete
/// differently from the whole (Incomplete, or the same answer).
pub fn client_hello(data: &[u8]) {
    let whole = crate::tls::parse(data);
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let part = crate::tls::parse(&data[..cut]);
        assert!(
            part == crate::tls::Hello::Incomplete
                || part == crate::tls::Hello::Invalid
                || part == whole,
            "prefix judged {part:?}, whole {whole:?}"
        );
    }
}

/// Host and path normalization are idempotent: what is checked is what is forwarded.
pub fn normalize(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = crate::normalize::path(text) {
        assert_eq!(
            crate::normalize::path(&p).as_deref(),
            Ok(p.as_str()),
            "path not idempotent: {text:?}"
        );
        assert!(
            !p.contains("/../") && !p.ends_with("/..") && !p.contains("//"),
            "{p:?}"
        );
    }
    if let Ok((h, _)) = crate::normalize::host(text) {
        assert_eq!(
            crate::normalize::host(&h).map(|(x, _)| x).as_deref(),
            Ok(h.as_str()),
            "host not idempotent: {text:?}"
        );
        assert!(!h.contains('@'));
    }
}

/// The raw HTTP head check, and the request framing of a kept-alive stream: the verdict on
/// a stream never depends on how it was cut into reads.
pub fn raw_head(data: &[u8]) {
    let _ = crate::http_proxy::raw_head_error(data);
    let _ = crate::http_proxy::placeholder(&http::HeaderMap::new());
    let whole = crate::framing::RequestFraming::default().feed(data);
    for cut in [1, data.len() / 3, data.len() / 2] {
        let cut = cut.min(data.len());
        let mut split = crate::framing::RequestFraming::default();
        let verdict = split
            .feed(&data[..cut])
            .and_then(|()| split.feed(&data[cut..]));
        // The reason may differ (which problem is met first), never whether it is refused.
        assert_eq!(
            whole.is_ok(),
            verdict.is_ok(),
            "cut at {cut}: {whole:?} / {verdict:?}"
        );
    }
}
