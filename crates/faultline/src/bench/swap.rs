//! `faultline bench swap`: host swap of a guest whose every page holds data, and a lazy
//! restore's faults in the same run as the baseline for the swap-in faults.
//!
//! The `counter` guest (all of RAM, one word per page rewritten every pass) runs in a child
//! faultline with a swap file, held between passes:
//! 1. after pass 1: swap everything out (every page written to the swap file);
//! 2. pass 2: every page faults back in from the swap file (fault service p50/p99);
//! 3. swap everything out again (pass 2 changed every page: all written again), then swap in
//!    in the background (throughput);
//! 4. swap out once more with nothing changed: no page is written again;
//! 5. the baseline: a regular snapshot of the VM, restored lazily (prediction off, as for the
//!    swap run) and run one pass: every page faults in from the snapshot.
//!
//! The guest's result is checked at the end of each faultline run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};

use super::{ratio, wait_for, Process, TempDir};

const STEP_LIMIT: Duration = Duration::from_secs(600);
/// The target (issue 11): at most 64 KiB of swap metadata per GiB of guest.
const TARGET_METADATA_PER_GIB: u64 = 64 << 10;

/// The whole benchmark.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mem_bytes: u64,
    /// Swap-out of every page, all written.
    pub swap_out_ms: f64,
    pub swap_out_mib_s: f64,
    pub swap_out_bytes_written: u64,
    /// Swap-out of every page again, none changed since it came back: nothing written.
    pub swap_out_unchanged_ms: f64,
    pub swap_out_unchanged_pages: u64,
    pub swap_out_unchanged_bytes_written: u64,
    /// Background swap-in of every page.
    pub swap_in_ms: f64,
    pub swap_in_mib_s: f64,
    /// Faults served from the swap file (pass 2), µs.
    pub swap_in_faults: u64,
    pub swap_in_fault_p50_us: u64,
    pub swap_in_fault_p99_us: u64,
    /// The baseline: faults of a lazy restore of the same guest, µs.
    pub lazy_restore_faults: u64,
    pub lazy_restore_fault_p50_us: u64,
    pub lazy_restore_fault_p99_us: u64,
    /// Swap-in fault p50 ÷ lazy-restore fault p50.
    pub fault_p50_ratio: f64,
    pub metadata_bytes: u64,
    pub metadata_bytes_per_gib: u64,
    pub metadata_target_bytes_per_gib: u64,
    pub metadata_target_met: bool,
}

fn api(sock: &Path, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    super::api(sock, method, path, body, STEP_LIMIT)
}

/// Moves the hold point to `pass` and waits until the guest is there.
fn hold(sock: &Path, pass: u64) -> anyhow::Result<()> {
    api(sock, "PUT", "/vm/hold", Some(json!({ "at": pass })))?;
    super::wait_held(sock, "the guest's pass", STEP_LIMIT)
}

fn mib_s(bytes: u64, ms: f64) -> f64 {
    (bytes as f64 / (1 << 20) as f64) / (ms / 1e3)
}

pub fn run(mem: u64, step: impl Fn(&str)) -> anyhow::Result<Report> {
    if !(16 << 20..=3 << 30).contains(&mem) {
        anyhow::bail!("--mem must be between 16M and 3G");
    }
    let tmp = TempDir::new("swap")?;
    let exe = std::env::current_exe().context("cannot find the faultline executable")?;
    let sock = tmp.path().join("api.sock");
    step("swap: the guest writes every page once");
    let swap_file = tmp.path().join("swap");
    let args = [
        "--arg",
        "3",
        "--lazy",
        "zero",
        "--no-predict",
        "--swap-file",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.push(
        swap_file
            .to_str()
            .context("a temporary path that is not UTF-8")?,
    );
    let vm = super::counter_over_ram(mem, &args, &sock, STEP_LIMIT)?;

    step("swap: swap-out of every page");
    let out = api(&sock, "PUT", "/vm/swap/out", Some(json!({ "keep": 0 })))?;
    let swap_out_ms = out["ms"].as_f64().unwrap_or(f64::NAN);
    let swap_out_bytes_written = out["bytes_written"].as_u64().unwrap_or(0);

    step("swap: a pass over swapped memory (every page faults in)");
    hold(&sock, 2)?;
    let faulted = api(&sock, "GET", "/vm/stats", None)?;
    let swap = &faulted["swap"];

    step("swap: swap-out again, then background swap-in");
    api(&sock, "PUT", "/vm/swap/out", Some(json!({ "keep": 0 })))?;
    let swapped = api(&sock, "GET", "/vm/stats", None)?["swap"]["swapped_bytes"]
        .as_u64()
        .unwrap_or(0);
    let started = Instant::now();
    api(&sock, "PUT", "/vm/swap/in", None)?;
    wait_for("the swap-in", STEP_LIMIT, || {
        let stats = api(&sock, "GET", "/vm/stats", None)?;
        Ok((stats["swap"]["swapped_bytes"] == 0).then_some(()))
    })?;
    let swap_in_ms = started.elapsed().as_secs_f64() * 1e3;

    step("swap: swap-out with nothing changed");
    let unchanged = api(&sock, "PUT", "/vm/swap/out", Some(json!({ "keep": 0 })))?;
    let stats = api(&sock, "GET", "/vm/stats", None)?;
    let metadata_bytes = stats["swap"]["metadata_bytes"].as_u64().unwrap_or(0);

    step("swap: the baseline, a lazy restore's faults");
    let snap = tmp.path().join("snap");
    api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(json!({ "dir": snap })),
    )?;
    api(&sock, "PUT", "/vm/shutdown", None)?;
    drop(vm);
    let lazy = lazy_restore_faults(&exe, &snap, tmp.path())?;

    let metadata_per_gib = metadata_bytes * (1 << 30) / mem;
    let get = |v: &Value| v.as_u64().unwrap_or(0);
    let p50 = get(&swap["swap_in_p50_us"]);
    Ok(Report {
        mem_bytes: mem,
        swap_out_ms,
        swap_out_mib_s: mib_s(swap_out_bytes_written, swap_out_ms),
        swap_out_bytes_written,
        swap_out_unchanged_ms: unchanged["ms"].as_f64().unwrap_or(f64::NAN),
        swap_out_unchanged_pages: get(&unchanged["unchanged_pages"]),
        swap_out_unchanged_bytes_written: get(&unchanged["bytes_written"]),
        swap_in_ms,
        swap_in_mib_s: mib_s(swapped, swap_in_ms),
        swap_in_faults: get(&swap["swap_in_faults"]),
        swap_in_fault_p50_us: p50,
        swap_in_fault_p99_us: get(&swap["swap_in_p99_us"]),
        lazy_restore_faults: get(&lazy["faults_vcpu"]),
        lazy_restore_fault_p50_us: get(&lazy["install_latency_us"]["p50"]),
        lazy_restore_fault_p99_us: get(&lazy["install_latency_us"]["p99"]),
        fault_p50_ratio: ratio(p50 as f64, get(&lazy["install_latency_us"]["p50"]) as f64),
        metadata_bytes,
        metadata_bytes_per_gib: metadata_per_gib,
        metadata_target_bytes_per_gib: TARGET_METADATA_PER_GIB,
        metadata_target_met: metadata_per_gib <= TARGET_METADATA_PER_GIB,
    })
}

/// Restores `snap` lazily (no prediction), lets the guest run one pass and returns the
/// pager's counters.
fn lazy_restore_faults(exe: &Path, snap: &Path, dir: &Path) -> anyhow::Result<Value> {
    let sock = dir.join("restored.sock");
    let _restored = Process(
        Command::new(exe)
            .arg("restore")
            .arg("--snapshot")
            .arg(snap)
            .args(["--memory", "lazy", "--no-predict", "--paused", "--api-sock"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the restore")?,
    );
    wait_for("the restored VM", STEP_LIMIT, || {
        Ok(
            crate::api::http::call(&sock, "GET", "/vm", None, Some(Duration::from_secs(5)))
                .ok()
                .map(|_| ()),
        )
    })?;
    api(&sock, "PUT", "/vm/hold", Some(json!({ "at": 3 })))?;
    api(&sock, "PUT", "/vm/resume", None)?;
    hold(&sock, 3)?;
    let stats = api(&sock, "GET", "/vm/stats", None)?;
    let _ = api(&sock, "PUT", "/vm/shutdown", None);
    Ok(stats["pager"].clone())
}
