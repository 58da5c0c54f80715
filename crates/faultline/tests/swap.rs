//! Host swap end to end: a running `mix` guest with most of its memory swapped out mid-run
//! finishes with the uninterrupted result, its resident size (the memfd's allocated blocks)
//! dropping as it should; a swap file damaged under the VM ends the run with an error naming
//! it; a memory limit holds while the guest cycles over twice as much memory.

mod common;

use std::path::Path;
use std::process::{Child, Output};

use common::{api, faultline, set_hold, spawn_held, text, wait_until_held, TempDir};

const MEM: &str = "16M";
/// 8 MiB of data, half of RAM.
const RANGE_PAGES: u64 = 2048;
const PAGE: u64 = 4096;

fn mix_args(passes: u64) -> Vec<String> {
    [
        "run",
        "--guest",
        "mix",
        "--mem",
        MEM,
        "--range-pages",
        &RANGE_PAGES.to_string(),
        "--arg",
        &passes.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The reports of an uninterrupted run.
fn uninterrupted(passes: u64) -> serde_json::Value {
    let args = mix_args(passes);
    let out = faultline(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    common::json_report(&text(&out.stdout))["vcpus"][0]["reports"].clone()
}

/// A `mix` run of `passes` passes serving the API on `sock`, held after pass `hold` (its
/// live writer gated on `sock` with the extension `gate`).
fn spawn_mix(sock: &Path, passes: u64, hold: u64, extra: &[&str]) -> Child {
    let mut args = mix_args(passes);
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = spawn_held(args, hold, sock, &sock.with_extension("gate"));
    wait_until_held(sock, hold, 1);
    child
}

fn stats(sock: &Path) -> serde_json::Value {
    let (status, stats) = api(sock, "GET", "/vm/stats", None);
    assert_eq!(status, 200, "{stats}");
    stats
}

fn finish(sock: &Path, child: Child) -> Output {
    set_hold(sock, None);
    child.wait_with_output().unwrap()
}

#[test]
fn most_of_a_guest_swapped_out_mid_run_comes_back_and_it_finishes_right() {
    require_kvm!();
    let expected = uninterrupted(8);
    let tmp = TempDir::new("swap-out");
    let sock = tmp.join("api.sock");
    let swap_file = tmp.join("swap");
    let child = spawn_mix(&sock, 8, 4, &["--swap-file", swap_file.to_str().unwrap()]);
    let before = stats(&sock)["ram_resident_bytes"].as_u64().unwrap();
    assert!(before >= RANGE_PAGES * PAGE, "{before}");
    // Keep a tenth: 90% goes.
    let keep = before / 10;
    let out = faultline(&[
        "vm",
        "swap",
        "out",
        "--api-sock",
        sock.to_str().unwrap(),
        "--keep",
        &keep.to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        answer["swapped_pages"].as_u64().unwrap() >= RANGE_PAGES * 8 / 10,
        "{answer}"
    );
    let after = stats(&sock);
    let resident = after["ram_resident_bytes"].as_u64().unwrap();
    assert!(
        resident <= keep + 64 * PAGE,
        "{resident} of {before} bytes resident: {after}"
    );
    assert!(after["swap"]["swapped_bytes"].as_u64().unwrap() >= RANGE_PAGES * PAGE * 8 / 10);
    assert!(swap_file.exists());
    // A live snapshot of swapped memory: its writer is held back while the guest makes two
    // passes, faulting every page back in and writing it; the snapshot still holds the pages
    // as they were at its start, read from their slots in the swap file.
    let snap = tmp.join("live");
    let gate = sock.with_extension("gate");
    let waiting = sock.with_extension("gate.waiting");
    let create = common::command()
        .args(["snapshot", "create", "--live", "--api-sock"])
        .arg(&sock)
        .arg("--dir")
        .arg(&snap)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !waiting.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the live writer never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    set_hold(&sock, Some(6));
    wait_until_held(&sock, 6, 1);
    std::fs::write(&gate, b"").unwrap();
    let out = create.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["live"]["pages_from_source"].as_u64().unwrap() >= RANGE_PAGES * 8 / 10,
        "{summary}"
    );

    // Everything back in the background, then the rest of the run.
    let faulted = stats(&sock);
    assert!(
        faulted["swap"]["pages_swapped_in"].as_u64().unwrap() > 0,
        "{faulted}"
    );
    let out = faultline(&["vm", "swap", "in", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finish(&sock, child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = common::json_report(&text(&out.stdout));
    assert_eq!(report["vcpus"][0]["reports"], expected);
    assert!(!swap_file.exists(), "the swap file goes with the VM");
    let out = faultline(&["restore", "--snapshot", snap.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        common::json_report(&text(&out.stdout))["vcpus"][0]["reports"],
        expected,
        "the live snapshot of swapped memory"
    );
}

#[test]
fn a_swap_file_damaged_under_the_vm_ends_the_run_with_an_error_naming_it() {
    require_kvm!();
    let tmp = TempDir::new("swap-damaged");
    let sock = tmp.join("api.sock");
    let swap_file = tmp.join("swap");
    let child = spawn_mix(&sock, 8, 4, &["--swap-file", swap_file.to_str().unwrap()]);
    let (status, answer) = api(
        &sock,
        "PUT",
        "/vm/swap/out",
        Some(serde_json::json!({ "keep": 0 })),
    );
    assert_eq!(status, 200, "{answer}");
    // A byte of the slot of the range's page 10 (RAM page 512 + 10), flipped.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&swap_file)
        .unwrap();
    let at = (512 + 10) * PAGE + 64;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x5a], at).unwrap();
    let out = finish(&sock, child);
    assert!(!out.status.success(), "a damaged swap file cannot end well");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("does not match its checksum"), "{stderr}");
    assert!(stderr.contains(swap_file.to_str().unwrap()), "{stderr}");
}

#[test]
fn a_memory_limit_holds_while_the_guest_cycles_over_twice_as_much() {
    require_kvm!();
    let passes = 6;
    let expected = uninterrupted(passes);
    let tmp = TempDir::new("swap-limit");
    let sock = tmp.join("api.sock");
    let limit = 4u64 << 20;
    let child = spawn_mix(&sock, passes, 1, &["--mem-limit", "4M"]);
    let mut most = 0;
    for hold in 2..=passes {
        set_hold(&sock, Some(hold));
        wait_until_held(&sock, hold, 1);
        let now = stats(&sock);
        most = most.max(now["ram_resident_bytes"].as_u64().unwrap());
        assert_eq!(now["swap"]["limit_overruns"], 0, "{now}");
        assert!(now["swap"]["pages_evicted"].as_u64().unwrap() > 0, "{now}");
    }
    assert!(
        most <= limit,
        "{most} bytes resident under a {limit}-byte limit"
    );
    let out = finish(&sock, child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = common::json_report(&text(&out.stdout));
    assert_eq!(report["vcpus"][0]["reports"], expected);
}
