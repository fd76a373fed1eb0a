/// The gateway allocates and frees small buffers on every request; mimalloc's per-thread
/// free lists cost less per request than glibc's malloc here (see `cargo xtask bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gateway_user::cli::main()
}
