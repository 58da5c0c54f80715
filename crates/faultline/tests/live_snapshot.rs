//! Live snapshots end to end: a `mix` guest snapshotted while it runs (the writer held back
//! until the guest has written, so that every write lands on a protected page), the live VM
//! and the restored snapshot both finishing with the uninterrupted result; a live snapshot of
//! a lazily restored VM and a live diff chain; failures that leave the VM running with no
//! page protected.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    api, faultline, set_hold, spawn_gated, spawn_held, text, wait_state, wait_until_held, TempDir,
};
use snapshot::state;

const PASSES: u64 = 400;
const RANGE_PAGES: u64 = 128;

/// The reports of each vCPU of an uninterrupted `mix` run.
fn uninterrupted(cpus: u8) -> serde_json::Value {
    let args = mix_args(cpus);
    let out = faultline(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    reports(&out)
}

/// `run` of the `mix` guest with `cpus` vCPUs, [`PASSES`] passes, a JSON report.
fn mix_args(cpus: u8) -> Vec<String> {
    [
        "run",
        "--guest",
        "mix",
        "--mem",
        "8M",
        "--cpus",
        &cpus.to_string(),
        "--range-pages",
        &RANGE_PAGES.to_string(),
        "--arg",
        &PASSES.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn reports(out: &Output) -> serde_json::Value {
    let report = common::json_report(&text(&out.stdout));
    serde_json::Value::Array(
        report["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                assert_eq!(v["exit_code"], 0, "{report}");
                v["reports"].clone()
            })
            .collect(),
    )
}

/// A `mix` run of `cpus` vCPUs serving the API on `sock`, held at the end of pass `hold`.
fn spawn_mix(sock: &Path, cpus: u8, hold: u64, gate: &Path, extra: &[&str]) -> Child {
    let mut args = mix_args(cpus);
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_held(args, hold, sock, gate)
}

/// Takes a live snapshot of the VM behind `sock` (held at pass `held`, `cpus` vCPUs) into
/// `dir` while the guest runs on to pass `to`: the writer is held back until the guest is
/// there, so its writes of passes `held + 1..=to` all land on protected pages. Returns the
/// snapshot's summary.
fn live_snapshot_while_running(
    sock: &Path,
    dir: &Path,
    diff: bool,
    cpus: u8,
    to: u64,
    gate: &Path,
) -> serde_json::Value {
    let _ = std::fs::remove_file(gate);
    let mut waiting = gate.as_os_str().to_owned();
    waiting.push(".waiting");
    let waiting = PathBuf::from(waiting);
    let _ = std::fs::remove_file(&waiting);
    let mut args = vec![
        "snapshot".to_string(),
        "create".into(),
        "--live".into(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    if diff {
        args.push("--diff".into());
    }
    let create = common::command()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VM runs again once the writer waits at the gate.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !waiting.exists() {
        assert!(Instant::now() < deadline, "the live writer never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    set_hold(sock, Some(to));
    wait_until_held(sock, to, cpus);
    std::fs::write(gate, b"").unwrap();
    let out = create.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "snapshot create --live: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("snapshot create prints JSON")
}

/// Lets the guest behind `sock` run to the end; returns the reports of its vCPUs.
fn finish(sock: &Path, child: Child) -> serde_json::Value {
    let (_, stats) = api(sock, "GET", "/vm/stats", None);
    assert_eq!(stats["write_protected_pages"], 0, "{stats}");
    set_hold(sock, None);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    reports(&out)
}

fn restore(dir: &Path, mode: &str) -> serde_json::Value {
    let out = common::restore(dir, mode, &[]);
    assert!(
        out.status.success(),
        "restore {mode}: {}",
        text(&out.stderr)
    );
    reports(&out)
}

fn live_snapshot_mid_run(cpus: u8) {
    let expected = uninterrupted(cpus);
    let tmp = TempDir::new(&format!("live-{cpus}"));
    let sock = tmp.join("api.sock");
    let gate = tmp.join("gate");
    let snap = tmp.join("snap");
    let child = spawn_mix(&sock, cpus, 100, &gate, &[]);
    wait_until_held(&sock, 100, cpus);
    let summary = live_snapshot_while_running(&sock, &snap, false, cpus, 140, &gate);
    let live = &summary["live"];
    // Every page of the range was written while protected, and saved first.
    assert!(
        live["write_faults"].as_u64().unwrap() >= RANGE_PAGES,
        "{summary}"
    );
    assert!(
        live["pages_saved_by_faults"].as_u64().unwrap() >= RANGE_PAGES,
        "{summary}"
    );
    assert_eq!(summary["type"], "full");
    // The live VM was not changed by the protection: it finishes right.
    assert_eq!(finish(&sock, child), expected, "the live VM");
    // The snapshot is the VM at pass 100, not 140.
    let saved = state::read(&snap).unwrap();
    for vcpu in &saved.machine.vcpus {
        assert_eq!(vcpu.regs.r13, 100, "passes done at the snapshot");
    }
    for mode in ["eager", "lazy"] {
        assert_eq!(restore(&snap, mode), expected, "restore {mode}");
    }
}

#[test]
fn a_live_snapshot_mid_run_changes_nothing_and_restores_to_the_same_result() {
    require_kvm!();
    live_snapshot_mid_run(1);
}

#[test]
fn a_live_snapshot_of_two_vcpus_mid_run_restores_to_the_same_result() {
    require_kvm!();
    live_snapshot_mid_run(2);
}

/// A `mix` run held at pass `hold`, snapshotted (regular, the VM held) into `dir`, then shut
/// down: the start of a lazily restored VM.
fn regular_snapshot_at(tmp: &TempDir, hold: u64, dir: &Path) {
    let sock = tmp.join("first.sock");
    let gate = tmp.join("unused-gate");
    let child = spawn_mix(&sock, 1, hold, &gate, &["--track-dirty"]);
    wait_until_held(&sock, hold, 1);
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({ "dir": dir })),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = api(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(status, 204);
    child.wait_with_output().unwrap();
}

/// `faultline restore --memory lazy` of `snap`, serving the API on `sock`, started paused and
/// let go to pass `hold`.
fn restore_lazily_to(snap: &Path, sock: &Path, hold: u64, gate: &Path) -> Child {
    let args: Vec<String> = [
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--memory",
        "lazy",
        "--track-dirty",
        "--paused",
        "--api-sock",
        sock.to_str().unwrap(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = spawn_gated(&args, gate);
    // Paused (the API answers a moment before the VM is).
    wait_state(sock, &mut child, "paused");
    set_hold(sock, Some(hold));
    let (status, body) = api(sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 204, "{body}");
    wait_until_held(sock, hold, 1);
    child
}

#[test]
fn a_lazily_restored_vm_snapshots_live_and_a_live_diff_chain_restores() {
    require_kvm!();
    let expected = uninterrupted(1);
    let tmp = TempDir::new("live-lazy");
    let first = tmp.join("first");
    regular_snapshot_at(&tmp, 50, &first);

    let sock = tmp.join("api.sock");
    let gate = tmp.join("gate");
    let child = restore_lazily_to(&first, &sock, 100, &gate);
    let full = tmp.join("live-full");
    let summary = live_snapshot_while_running(&sock, &full, false, 1, 140, &gate);
    // The pages the restored guest never touched came from its snapshot, not through faults.
    assert!(
        summary["live"]["pages_from_source"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(summary["live"]["write_faults"].as_u64().unwrap() >= RANGE_PAGES);
    let (_, stats) = api(&sock, "GET", "/vm/stats", None);
    assert_eq!(stats["write_protected_pages"], 0, "{stats}");
    let diff = tmp.join("live-diff");
    let summary = live_snapshot_while_running(&sock, &diff, true, 1, 180, &gate);
    assert_eq!(summary["type"], "diff", "{summary}");
    assert!(summary["live"]["write_faults"].as_u64().unwrap() >= RANGE_PAGES);
    assert_eq!(finish(&sock, child), expected, "the live VM");

    assert_eq!(
        state::read(&full).unwrap().machine.vcpus[0].regs.r13,
        140 - 40
    );
    assert_eq!(state::read(&diff).unwrap().machine.vcpus[0].regs.r13, 140);
    for (snap, mode) in [(&full, "lazy"), (&diff, "eager"), (&diff, "lazy")] {
        assert_eq!(
            restore(snap, mode),
            expected,
            "restore {} {mode}",
            snap.display()
        );
    }
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    /// `None` (said loudly) where mounting is not allowed (not root).
    fn mount(dir: PathBuf, options: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        if !status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs at {} (needs root)",
                dir.display()
            );
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_live_snapshot_that_fails_leaves_the_vm_running_with_no_page_protected() {
    require_kvm!();
    let expected = uninterrupted(1);
    let tmp = TempDir::new("live-fail");
    let first = tmp.join("first");
    regular_snapshot_at(&tmp, 50, &first);
    // 64 KiB cannot hold the guest's 512 KiB range.
    let Some(full) = SmallFs::mount(tmp.join("full"), "size=64k") else {
        return;
    };
    let Some(read_only) = SmallFs::mount(tmp.join("ro"), "ro,size=64k") else {
        return;
    };

    let sock = tmp.join("api.sock");
    let gate = tmp.join("gate");
    std::fs::write(&gate, b"").unwrap(); // the writer is not held back
    let child = restore_lazily_to(&first, &sock, 100, &gate);
    for (dir, cause) in [
        (full.0.join("snap"), "No space left on device"),
        (read_only.0.join("snap"), "Read-only file system"),
    ] {
        let out = faultline(&[
            "snapshot",
            "create",
            "--live",
            "--api-sock",
            sock.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "a snapshot into {}", dir.display());
        assert!(text(&out.stderr).contains(cause), "{}", text(&out.stderr));
        assert_eq!(
            std::fs::read_dir(dir.parent().unwrap()).unwrap().count(),
            0,
            "nothing is left in {}",
            dir.parent().unwrap().display()
        );
        let (_, stats) = api(&sock, "GET", "/vm/stats", None);
        assert_eq!(stats["write_protected_pages"], 0, "{stats}");
        assert_eq!(stats["state"], "running", "{stats}");
    }
    // The VM ran on: it finishes right, and a live snapshot now succeeds.
    let snap = tmp.join("after");
    let summary = live_snapshot_while_running(&sock, &snap, false, 1, 150, &gate);
    assert_eq!(summary["type"], "full");
    assert_eq!(finish(&sock, child), expected, "the live VM");
    assert_eq!(restore(&snap, "eager"), expected);
}

/// Does nothing: the pages are only protected and counted.
struct NoGuard;

impl pager::WriteGuard for NoGuard {
    fn before_write(&self, _region: usize, _page: usize) {}
}

#[test]
fn protected_pages_are_counted_from_the_pagemap() {
    let ram = vmm::GuestRam::new(vmm::memory::MIN_RAM).unwrap();
    let region = &ram.regions()[0];
    // Page 0 holds data; pages 1 and 2 are holes of the memfd (protected all the same).
    vmm::memory::write_host(region.host_addr() as u64, &[1u8; 8]).unwrap();
    let Ok(mut builder) = pager::PagerBuilder::new(pager::PagerConfig::default()) else {
        eprintln!("SKIPPED: no userfaultfd here");
        return;
    };
    // SAFETY: fresh guest RAM, raw memory no Rust object owns, mapped until `ram` drops
    // (after the pager).
    unsafe { builder.region_write_protect_only(region.host_addr() as u64, region.size()) }.unwrap();
    let pager = builder.start().unwrap();
    assert_eq!(ram.write_protected_pages().unwrap(), 0);
    pager
        .begin_write_protect(std::sync::Arc::new(NoGuard))
        .unwrap();
    pager.protect(0, 0, 3).unwrap();
    assert_eq!(ram.write_protected_pages().unwrap(), 3);
    pager.unprotect(0, 1, 1).unwrap();
    assert_eq!(ram.write_protected_pages().unwrap(), 2);
    let (_, result) = pager.end_write_protect();
    result.unwrap();
    assert_eq!(ram.write_protected_pages().unwrap(), 0);
    pager.shutdown();
}
