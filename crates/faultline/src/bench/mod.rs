//! Benchmarks: each measures faultline and a baseline in the same run and prints JSON with the
//! ratio. Timings belong here, never in tests.

pub mod boot;
pub mod faults;
pub mod fc_file;
pub mod interrupt;
pub mod live;
pub mod migrate;
pub mod restore;
pub mod slowfs;
pub mod swap;
pub mod track;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::api::http;

/// A directory for one benchmark's files, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// `faultline-bench-NAME-PID` in the system's temporary directory.
    pub(crate) fn new(name: &str) -> anyhow::Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("faultline-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
pub(crate) struct Process(pub(crate) Child);

impl Process {
    /// The CPU time the process's threads have used so far, user and system, those that have
    /// ended included (from `/proc`); `None` once it has been waited for.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read(format!("/proc/{}/stat", self.0.id())).ok()?;
        // The command name, in parentheses, may hold spaces, parentheses and bytes that are
        // not UTF-8: the fields are counted from after its last ')', where the third (the
        // state) begins.
        let after_name =
            std::str::from_utf8(&stat[stat.iter().rposition(|&b| b == b')')? + 1..]).ok()?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        let ticks = field(14)? + field(15)?;
        // SAFETY: sysconf has no preconditions.
        let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
        (per_second > 0).then(|| Duration::from_millis(ticks * 1000 / per_second))
    }

    /// Whether the process has exited, found without waiting for it: until it is waited for,
    /// its `/proc` entry, and so its [`cpu_time`](Self::cpu_time), stays.
    pub(crate) fn has_exited(&self) -> std::io::Result<bool> {
        let pid = self.0.id();
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid and writable; WNOWAIT leaves the child to be waited for by
        // its `Child`, and WNOHANG makes this return at once.
        let ret = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` in; its pid is 0 where no child had exited.
        Ok(unsafe { info.si_pid() } != 0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ready` every 10 ms until it gives a value, for at most `limit`.
pub(crate) fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = ready()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts this binary's `run` of the `counter` guest over all of `mem` of RAM above the boot
/// area, with `args`, serving the API on `sock`, and waits (at most `limit`) until its first
/// pass is done (every page written) and it is held there.
pub(crate) fn counter_over_ram(
    mem: u64,
    args: &[&str],
    sock: &Path,
    limit: Duration,
) -> anyhow::Result<Process> {
    let exe = std::env::current_exe().context("cannot find the faultline executable")?;
    let range_pages = (mem - vmm::boot::layout::BOOT_AREA_END) / vmm::PAGE_SIZE;
    let vm = Process(
        std::process::Command::new(exe)
            .args(["run", "--guest", "counter", "--mem", &mem.to_string()])
            .args(["--range-pages", &range_pages.to_string()])
            .args(args)
            .args(["--hold-at", "1", "--api-sock"])
            .arg(sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start the guest")?,
    );
    wait_held(sock, "the guest's first pass", limit)?;
    Ok(vm)
}

/// Waits (at most `limit`) until the one vCPU of the micro-guest behind `sock` waits at its
/// hold point; `what` names the step in the error.
pub(crate) fn wait_held(sock: &Path, what: &str, limit: Duration) -> anyhow::Result<()> {
    wait_for(what, limit, || {
        Ok(
            http::call(sock, "GET", "/vm", None, Some(Duration::from_secs(5)))
                .ok()
                .and_then(|(_, info)| info)
                .filter(|info| info["hold"]["held_vcpus"] == serde_json::json!([0]))
                .map(|_| ()),
        )
    })
}

/// One API call to a faultline process, answered within `limit`; a status other than 2xx is
/// an error naming it.
pub(crate) fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
    limit: Duration,
) -> anyhow::Result<Value> {
    let (status, answer) = http::call(sock, method, path, body.as_ref(), Some(limit))
        .with_context(|| format!("{method} {path}"))?;
    let answer = answer.unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        bail!("{method} {path}: HTTP {status}: {answer}");
    }
    Ok(answer)
}

/// Median of `samples` in milliseconds (the upper middle for an even count).
pub fn median_ms(samples: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `a / b`, rounded to three decimals.
pub fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(median_ms(&ms(&[5, 1, 3])), 3.0);
        assert_eq!(median_ms(&ms(&[4, 1, 3, 2])), 3.0);
        assert!(median_ms(&[]).is_nan());
        assert_eq!(ratio(3.0, 2.0), 1.5);
    }

    /// The time the only thread of `process` has run, from the scheduler: in nanoseconds,
    /// not ticks, and counted apart from `/proc/PID/stat`.
    fn run_time(process: &Process) -> Option<Duration> {
        let text = std::fs::read_to_string(format!("/proc/{}/schedstat", process.0.id())).ok()?;
        Some(Duration::from_nanos(
            text.split_whitespace().next()?.parse().ok()?,
        ))
    }

    #[test]
    fn the_cpu_time_of_processes_that_spun_is_what_the_scheduler_says() {
        let spawn = |command: &[&str]| {
            Process(
                std::process::Command::new(command[0])
                    .args(&command[1..])
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        };
        let sleeper = spawn(&["sleep", "60"]);
        // One spins in user space, one in the kernel (clearing the buffers it reads): user
        // and system time must both count.
        for command in [
            &["sh", "-c", "while :; do :; done"][..],
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=1M"],
        ] {
            let what = command.join(" ");
            let mut spinner = spawn(command);
            wait_for(&what, Duration::from_secs(60), || {
                Ok(run_time(&spinner).filter(|t| *t >= Duration::from_millis(300)))
            })
            .unwrap();
            assert!(!spinner.has_exited().unwrap(), "{what}");
            spinner.0.kill().unwrap();
            // Ended but not waited for: still there to be read, and no longer running.
            wait_for("the spinner's end", Duration::from_secs(60), || {
                Ok(spinner.has_exited()?.then_some(()))
            })
            .unwrap();
            let (counted, ran) = (spinner.cpu_time().unwrap(), run_time(&spinner).unwrap());
            let off = counted.abs_diff(ran);
            assert!(
                off <= (ran / 10).max(Duration::from_millis(50)),
                "{what}: {counted:?} counted, {ran:?} run"
            );
            spinner.0.wait().unwrap();
            assert_eq!(spinner.cpu_time(), None, "{what}");
        }
        let slept = sleeper.cpu_time().unwrap();
        assert!(slept < Duration::from_millis(100), "{slept:?}");
    }
}
