//! Shared by the end-to-end tests: the KVM check and quiet micro-guest runs.
#![allow(dead_code)]

pub mod message_gate;
pub mod pki;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use faultline::micro::{MicroOptions, MicroReport, MicroVm};
use vmm::devices::ConsoleSink;

/// Returns false (after saying so loudly) when /dev/kvm cannot be used, so the test can skip.
/// With FAULTLINE_REQUIRE_KVM=1 (as CI sets it) a missing /dev/kvm fails the test instead.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("FAULTLINE_REQUIRE_KVM").is_some_and(|v| v == "1") {
                panic!("/dev/kvm is required (FAULTLINE_REQUIRE_KVM=1) but cannot be opened: {e}");
            }
            eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}); this test needs KVM");
            false
        }
    }
}

/// Skips the calling test when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !common::kvm_available() {
            return;
        }
    };
}

/// Options for `name` with no console output.
pub fn options(name: &str) -> MicroOptions {
    let guest = guests::find(name).unwrap_or_else(|| panic!("no guest {name}"));
    MicroOptions {
        console: ConsoleSink::default(),
        ..MicroOptions::new(guest)
    }
}

/// Builds and runs, returning the VM for inspection and the report.
pub fn run(options: &MicroOptions) -> (MicroVm, MicroReport) {
    let mut vm = MicroVm::new(options).expect("VM builds");
    let report = vm.run().expect("VM runs");
    (vm, report)
}

/// A command that runs the faultline binary, and that dies with the test thread that starts
/// it: a test that fails (panics) leaves no VMM behind holding its guest, sockets or mounts.
pub fn command() -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_faultline"));
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl is a plain system call, and nothing is
    // allocated. PR_SET_PDEATHSIG kills the child when the thread that forked it ends.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command
}

/// Runs the faultline binary with `args` and waits for it.
pub fn faultline(args: &[&str]) -> std::process::Output {
    command().args(args).output().expect("the binary runs")
}

/// One API request to `sock`, bounded (a server that stops answering fails the test, never
/// hangs it): its status and JSON answer (null when empty).
pub fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let (status, answer) = faultline::api::http::call(
        sock,
        method,
        path,
        body.as_ref(),
        Some(std::time::Duration::from_secs(60)),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (status, answer.unwrap_or(serde_json::Value::Null))
}

/// `faultline restore --snapshot DIR --memory MODE --json EXTRA...`, run to its end.
pub fn restore(dir: &Path, mode: &str, extra: &[&str]) -> std::process::Output {
    faultline(&restore_args(dir, mode, extra))
}

/// [`restore`], started: its stdout and stderr piped.
pub fn spawn_restore(dir: &Path, mode: &str, extra: &[&str]) -> std::process::Child {
    spawn(&restore_args(dir, mode, extra))
}

fn restore_args<'a>(dir: &'a Path, mode: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "restore",
        "--snapshot",
        dir.to_str().unwrap(),
        "--memory",
        mode,
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts the faultline binary with `args`, its stdout and stderr piped.
pub fn spawn(args: &[&str]) -> std::process::Child {
    spawn_env::<_, &str>(args, &[])
}

/// Starts the faultline binary with `args` and `env` added to its environment, its stdout
/// and stderr piped.
pub fn spawn_env<S: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, V)],
) -> std::process::Child {
    command()
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("faultline starts")
}

/// Process output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `faultline-e2e-<name>-<pid>-<n>` (removing a leftover of an earlier run
    /// first). `n` counts in this process: tests running side by side may give one name
    /// (two migrations of the same mode and guest shape), and must never share a directory
    /// or an API socket.
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("faultline-e2e-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The JSON report that `run --json` / `restore --json` print on `stdout` (after any progress
/// lines).
pub fn json_report(stdout: &str) -> serde_json::Value {
    let start = stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {stdout}"));
    serde_json::from_str(&stdout[start..]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Starts `faultline ARGS` with the live-snapshot writer gated on `gate` (the writer waits for
/// that file before it copies a page: see `snapshot::live`), its output piped.
pub fn spawn_gated(args: &[String], gate: &Path) -> std::process::Child {
    spawn_env(args, &[("FAULTLINE_LIVE_WRITER_GATE", gate)])
}

/// Starts the micro-guest run `args` held at hold point `hold`, serving the API on `sock`,
/// with its live writer gated on `gate` (see [`spawn_gated`]), and waits for the socket.
pub fn spawn_held(
    mut args: Vec<String>,
    hold: u64,
    sock: &Path,
    gate: &Path,
) -> std::process::Child {
    args.extend([
        "--hold-at".to_string(),
        hold.to_string(),
        "--api-sock".to_string(),
        sock.display().to_string(),
    ]);
    let child = spawn_gated(&args, gate);
    wait_for_socket(sock);
    child
}

/// Waits for `child` to exit, calling `meanwhile` between looks (every `every`): its status.
/// Past `limit` the child is killed and the test fails saying `hung()` (a child that would
/// wait for ever fails the test rather than hangs it).
pub fn exit_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    every: std::time::Duration,
    mut meanwhile: impl FnMut(),
    hung: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}", hung());
        }
        meanwhile();
        std::thread::sleep(every);
    }
}

/// Waits (at most 30 s) until the VM behind `sock` reports `state`; a `child` that exits
/// first fails the test with what it said.
pub fn wait_state(sock: &Path, child: &mut std::process::Child, state: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            panic!("faultline exited early ({status}): {err}");
        }
        if sock.exists() {
            // A bounded call: an API that stops answering fails the test, never hangs it.
            let bounded = Some(std::time::Duration::from_secs(10));
            if let Ok((200, Some(info))) =
                faultline::api::http::call(sock, "GET", "/vm", None, bounded)
            {
                if info["state"] == state {
                    return;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM never reached {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits (at most 30 s) until a faultline answers on its API socket at `sock` (the socket
/// file appears at bind, a moment before the server listens).
pub fn wait_for_socket(sock: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let answered = sock.exists()
            && faultline::api::http::call(
                sock,
                "GET",
                "/vm",
                None,
                Some(std::time::Duration::from_secs(5)),
            )
            .is_ok();
        if answered {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no API answers on {}",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Moves the micro-guest hold point of the VM behind `sock` to `pass` (null: none).
pub fn set_hold(sock: &Path, pass: Option<u64>) {
    let (status, body) = api(
        sock,
        "PUT",
        "/vm/hold",
        Some(serde_json::json!({ "at": pass })),
    );
    assert_eq!(status, 204, "{body}");
}

/// Waits (at most 60 s) until all `cpus` vCPUs of the VM behind `sock` wait at hold point
/// `pass`.
pub fn wait_until_held(sock: &Path, pass: u64, cpus: u8) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, info) = api(sock, "GET", "/vm", None);
        if info["hold"]["at"] == pass
            && info["hold"]["held_vcpus"].as_array().map(Vec::len) == Some(usize::from(cpus))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never reached pass {pass}: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
