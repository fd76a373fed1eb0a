//! Embeds the kernel object built by `cargo xtask build-ebpf`. Without it the build stops with
//! a message saying so, unless TOLLGATE_EBPF_STUB=1 asks for a stub (for `cargo check` and
//! unprivileged unit tests on machines without the kernel toolchain); a stub binary refuses
//! to run the daemon.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let object = manifest.join("../gateway-ebpf/target/bpfel-unknown-none/release/gateway");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("gateway.o");
    println!("cargo::rerun-if-changed={}", object.display());
    println!("cargo::rerun-if-env-changed=TOLLGATE_EBPF_STUB");
    println!("cargo::rustc-check-cfg=cfg(ebpf_stub)");
    if object.exists() {
        fs::copy(&object, &out).expect("copy kernel object");
    } else if env::var("TOLLGATE_EBPF_STUB").as_deref() == Ok("1") {
        println!(
            "cargo::warning=building with a STUB kernel object: the daemon will refuse to run"
        );
        println!("cargo::rustc-cfg=ebpf_stub");
        fs::write(&out, b"").expect("write stub");
    } else {
        panic!(
            "the kernel programs are not built ({} is missing): run `cargo xtask build-ebpf` \
             (or set TOLLGATE_EBPF_STUB=1 for a check-only build)",
            object.display()
        );
    }
}
