//! Ctrl-C for long benchmarks. SIGINT and SIGTERM are blocked in every thread and taken by a
//! thread of their own, which raises a flag that the benchmark checks between runs: it then
//! stops with an error and cleans up (its snapshot files, its FUSE mounts) instead of dying
//! half-way through. A second signal ends the process at once, after detaching the FUSE
//! mounts it serves (a mount whose server is gone would stay behind).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// SIGINT and SIGTERM.
fn signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this function.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it starts later,
/// and starts the thread that waits for them. Call it before any other thread exists.
pub fn install() -> std::io::Result<()> {
    let set = signals();
    // SAFETY: `set` is a valid, initialised signal set; blocking signals in this thread has no
    // other effect.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(ret));
    }
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` and `signal` are valid for the call; sigwait only reads the set.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            REQUESTED.store(true, Ordering::Release);
            eprintln!("faultline: interrupted: stopping after this run and cleaning up (again to quit now)");
            // SAFETY: as above.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                return;
            }
            super::slowfs::detach_all();
            eprintln!("faultline: interrupted again: quitting now");
            std::process::exit(128 + signal);
        })?;
    Ok(())
}

/// An error once an interruption was asked for: a benchmark calls it between runs.
pub fn check() -> anyhow::Result<()> {
    if REQUESTED.load(Ordering::Acquire) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
