//! Tollgate's kernel programs. Every cgroup program runs for sockets of cgroups under an
//! enforced root and must be idempotent: nested roots run the same program twice (the child's
//! first). The socket guard (address hooks at the cgroup2 root) runs for every task and acts
//! only on tasks under a root; the join watcher (raw tracepoint) and the descriptor watcher
//! (system call tracepoints) mark and report a task's connections made outside every root
//! when it comes to hold them, and the guard's egress program drops the marked ones' packets.
#![no_std]
#![no_main]

mod bind;
mod carried;
mod connect;
mod egress;
mod getpeername;
mod guard;
mod join;
mod maps;
mod received;
mod refuse;
mod sendmsg;
mod sock_create;

/// Verdicts of cgroup socket programs.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
