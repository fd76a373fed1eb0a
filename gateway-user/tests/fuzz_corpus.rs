//! The fuzz targets' corpora, replayed on every test run: each input once found or seeded must
//! still pass its target's checks.
use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let data = std::fs::read(entry.path()).expect("read");
        run(&data);
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
    n
}

#[test]
fn corpora_replay() {
    replay("policy", gateway_user::fuzzing::policy);
    replay("client_hello", gateway_user::fuzzing::client_hello);
    replay("normalize", gateway_user::fuzzing::normalize);
    replay("raw_head", gateway_user::fuzzing::raw_head);
}

#[test]
fn real_client_hellos_name_their_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/client_hello");
    let hello = std::fs::read(dir.join("curl-sni")).expect("seed");
    assert_eq!(
        gateway_user::tls::parse(&hello),
        gateway_user::tls::Hello::Sni("api.openai.com".into())
    );
    let hello = std::fs::read(dir.join("curl-sni-2")).expect("seed");
    assert_eq!(
        gateway_user::tls::parse(&hello),
        gateway_user::tls::Hello::Sni("maps.example".into())
    );
}
