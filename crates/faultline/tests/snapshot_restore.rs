//! End to end: a running micro-guest snapshotted through the API socket, restored in new
//! processes in every memory mode, finishing with the result of an uninterrupted run; diff
//! snapshots; and snapshots that are damaged being refused.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use snapshot::state;
use snapshot::{MemorySpanMut, SnapshotMemory};

/// Passes the mix guest makes, and the pass at whose end the snapshotted run is held (the
/// guest waits there for the host: the snapshot lands mid-run whatever the CPU's speed).
const PASSES: u64 = 2000;
const HOLD_AT: u64 = 700;
const RANGE_PAGES: u64 = 128;

use common::{api, faultline, restore, set_hold, text, wait_state, wait_until_held, TempDir};

/// A `faultline run` child serving the API on `sock`.
fn spawn_run(sock: &Path, extra: &[&str]) -> Child {
    let mut args = vec![
        "run".to_string(),
        "--guest".into(),
        "mix".into(),
        "--mem".into(),
        "8M".into(),
        "--range-pages".into(),
        RANGE_PAGES.to_string(),
        "--api-sock".into(),
        sock.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    common::command()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("faultline starts")
}

/// Waits until the VM behind `sock` reports `running`.
fn wait_running(sock: &Path, child: &mut Child) {
    wait_state(sock, child, "running");
}

/// Waits until the guest behind `sock` is held at the end of pass `pass`.
fn wait_held(sock: &Path, pass: u64) {
    wait_until_held(sock, pass, 1);
}

/// Moves the hold point to the end of pass `pass` and waits until the guest is held there.
fn hold_at(sock: &Path, pass: u64) {
    set_hold(sock, Some(pass));
    wait_held(sock, pass);
}

fn snapshot_via_cli(sock: &Path, dir: &Path, diff: bool) -> serde_json::Value {
    let mut args = vec![
        "snapshot",
        "create",
        "--api-sock",
        sock.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
    ];
    if diff {
        args.push("--diff");
    }
    let out = faultline(&args);
    assert!(
        out.status.success(),
        "snapshot create: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("snapshot create prints JSON")
}

fn shutdown(sock: &Path, mut child: Child) {
    let out = faultline(&["vm", "shutdown", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "vm shutdown: {}", text(&out.stderr));
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "faultline run after an API shutdown: {status}"
    );
    assert!(!sock.exists(), "the API socket is removed on exit");
}

/// The JSON report printed by `run --json` / `restore --json` (after any progress lines).
fn report(out: &Output) -> serde_json::Value {
    common::json_report(&text(&out.stdout))
}

/// A prefetch restore of `snap` (with `extra`) that starts paused, serving the API on `sock`,
/// and runs once its background thread has installed pages: the guest cannot fault its
/// working set in first, however slowly that thread is scheduled. What it printed.
fn restore_prefetched_before_it_runs(snap: &Path, extra: &[&str], sock: &Path) -> Output {
    let mut args = vec![
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--memory",
        "prefetch",
        "--json",
        "--paused",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut child = common::spawn(&args);
    wait_state(sock, &mut child, "paused");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, info) = api(sock, "GET", "/vm/stats", None);
        if info["pager"]["pages_installed_background"].as_u64() > Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing prefetched: {info}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(api(sock, "PUT", "/vm/resume", None).0, 204);
    child.wait_with_output().unwrap()
}

#[test]
fn a_snapshot_taken_mid_run_finishes_like_an_uninterrupted_run_in_every_mode() {
    require_kvm!();
    let tmp = TempDir::new("midrun");
    let sock = tmp.join("api.sock");
    let snap = tmp.join("snap");

    // The uninterrupted run, for the expected result.
    let out = faultline(&[
        "run",
        "--guest",
        "mix",
        "--mem",
        "8M",
        "--range-pages",
        &RANGE_PAGES.to_string(),
        "--arg",
        &PASSES.to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let uninterrupted = report(&out)["vcpus"][0]["reports"].clone();
    let start = report(&out)["range_start"].as_u64().unwrap();
    assert_eq!(
        uninterrupted,
        serde_json::json!([PASSES, guests::mix_checksum(start, RANGE_PAGES, PASSES)])
    );

    let mut child = spawn_run(
        &sock,
        &[
            "--arg",
            &PASSES.to_string(),
            "--hold-at",
            &HOLD_AT.to_string(),
        ],
    );
    wait_running(&sock, &mut child);
    wait_held(&sock, HOLD_AT);
    let summary = snapshot_via_cli(&sock, &snap, false);
    assert_eq!(summary["type"], "full");
    shutdown(&sock, child);

    // Mid-run: exactly where the guest was held.
    let saved = state::read(&snap).unwrap();
    assert_eq!(saved.machine.vcpus[0].regs.r13, HOLD_AT, "passes done");
    assert_eq!(saved.guest.as_ref().unwrap().name, "mix");

    for (mode, extra) in [
        ("eager", &[][..]),
        ("lazy", &["--record-ws"][..]),
        ("prefetch", &[][..]),
        ("lazy", &["--source-latency", "200us"][..]),
        ("lazy", &["--no-predict"][..]),
        ("prefetch", &["--source-latency", "200us"][..]),
    ] {
        // One prefetch restore runs only once pages are in (so that they are, however slowly
        // its thread runs); the other races the guest's faults from its first instruction.
        let prefetched_first = mode == "prefetch" && extra.is_empty();
        let out = if prefetched_first {
            restore_prefetched_before_it_runs(&snap, extra, &tmp.join("prefetch.sock"))
        } else {
            restore(&snap, mode, extra)
        };
        assert!(
            out.status.success(),
            "restore {mode}: {}",
            text(&out.stderr)
        );
        let restored = report(&out);
        assert_eq!(
            restored["vcpus"][0]["reports"], uninterrupted,
            "restore {mode}"
        );
        assert_eq!(restored["vcpus"][0]["exit_code"], 0);
        let pager = &restored["pager"];
        match mode {
            "lazy" => assert!(
                pager["faults_vcpu"].as_u64().unwrap() > 0,
                "a lazy restore faults pages in: {pager}"
            ),
            "prefetch" if prefetched_first => assert!(
                pager["pages_installed_background"].as_u64().unwrap() > 0,
                "a prefetch restore installs the working set: {pager}"
            ),
            "prefetch" => assert!(pager.is_object(), "a prefetch restore has a pager"),
            _ => assert!(pager.is_null(), "an eager restore has no pager"),
        }
        if mode == "lazy" {
            assert!(
                snap.join(snapshot::WORKING_SET_FILE).exists(),
                "--record-ws wrote the set"
            );
        }
        if extra.contains(&"--no-predict") {
            assert_eq!(pager["pages_predicted"], 0, "{pager}");
        }
    }
    // A delay per read models a pager's reads: an eager restore has none.
    let out = restore(&snap, "eager", &["--source-latency", "1ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("use it with --memory lazy or prefetch"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_vm_started_paused_runs_nothing_until_resumed() {
    require_kvm!();
    let tmp = TempDir::new("paused");
    let sock = tmp.join("api.sock");
    let snap = tmp.join("snap");
    let mut child = spawn_run(&sock, &["--arg", &PASSES.to_string(), "--paused"]);
    wait_state(&sock, &mut child, "paused");
    // A snapshot now holds the guest before its first instruction: no pass done.
    snapshot_via_cli(&sock, &snap, false);
    let saved = state::read(&snap).unwrap();
    assert_eq!(saved.machine.vcpus[0].regs.r13, 0, "passes done");
    let (status, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("paused")),
        "{info}"
    );
    let (status, body) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 204, "{body}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = serde_json::json!([
        PASSES,
        guests::mix_checksum(
            report(&out)["range_start"].as_u64().unwrap(),
            RANGE_PAGES,
            PASSES
        )
    ]);
    assert_eq!(report(&out)["vcpus"][0]["reports"], expected);
    // The snapshot, restored (paused again, then resumed), runs the whole guest.
    let restored_sock = tmp.join("restored.sock");
    let mut restored = common::command()
        .args([
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--json",
            "--paused",
        ])
        .arg("--api-sock")
        .arg(&restored_sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_state(&restored_sock, &mut restored, "paused");
    let (status, body) = api(&restored_sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 204, "{body}");
    let out = restored.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(report(&out)["vcpus"][0]["reports"], expected);
}

#[test]
fn a_diff_chain_restores_the_same_memory_as_a_full_snapshot() {
    require_kvm!();
    diff_chain_matches_a_full_snapshot("diff", "--track-dirty", None, false);
}

#[test]
fn a_diff_chain_holds_the_writes_to_tracked_pages_and_tracking_survives_it() {
    require_kvm!();
    // Writes to tracked pages are applied by faultline, not the guest: KVM's log never sees
    // them, so the diff has them only if faultline marks them dirty.
    diff_chain_matches_a_full_snapshot("diff-tracked", "--track-dirty", None, true);
}

#[test]
fn a_diff_chain_logged_by_the_dirty_ring_restores_the_same_memory() {
    require_kvm!();
    diff_chain_matches_a_full_snapshot("diff-ring", "--dirty-ring", Some("4096"), false);
}

/// A full snapshot at pass 1, a diff on it at pass 3 and a full one at pass 3 (dirty pages
/// logged as `log` says; with `track`, a third of the pages tracked in write mode) hold the
/// same memory, and the chain restores.
fn diff_chain_matches_a_full_snapshot(name: &str, log: &str, log_value: Option<&str>, track: bool) {
    let tmp = TempDir::new(name);
    let sock = tmp.join("api.sock");
    let mut args = vec!["--arg", "0", log];
    args.extend(log_value);
    args.extend(["--hold-at", "1"]);
    let mut child = spawn_run(&sock, &args);
    wait_running(&sock, &mut child);
    wait_held(&sock, 1);
    let tracked = serde_json::json!({
        "gpa": vmm::boot::layout::BOOT_AREA_END,
        "len": RANGE_PAGES / 3 * 4096,
        "mode": "write",
    });
    if track {
        let (status, body) = api(&sock, "PUT", "/track", Some(tracked.clone()));
        assert_eq!(status, 204, "{body}");
    }

    let base = snapshot_via_cli(&sock, &tmp.join("base"), false);
    assert_eq!(base["type"], "full");
    // Let the guest write two more passes, then stop it there.
    hold_at(&sock, 3);
    let (status, _) = api(&sock, "PUT", "/vm/pause", None);
    assert_eq!(status, 204);
    let diff = snapshot_via_cli(&sock, &tmp.join("diff"), true);
    let full = snapshot_via_cli(&sock, &tmp.join("full"), false);
    if track {
        let (_, table) = api(&sock, "GET", "/track", None);
        let mut expected = tracked.clone();
        expected["count"] = 1.into();
        assert_eq!(table["ranges"], serde_json::json!([expected]));
    }
    let (status, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(
        (status, info["state"].as_str()),
        (200, Some("paused")),
        "snapshots keep a paused VM paused"
    );
    shutdown(&sock, child);

    assert_eq!(diff["type"], "diff");
    let diff_pages = diff["memory"]["pages_included"].as_u64().unwrap();
    let full_pages = full["memory"]["pages_included"].as_u64().unwrap();
    assert!(
        diff_pages > 0,
        "the guest wrote pages between the snapshots"
    );
    assert!(
        diff_pages <= RANGE_PAGES + 16,
        "a diff holds only what was written: {diff_pages}"
    );
    assert!(full_pages > diff_pages);

    let diff_dir = tmp.join("diff");
    let chain = state::chain(&diff_dir, &state::read(&diff_dir).unwrap()).unwrap();
    assert_eq!(chain.len(), 2);
    let layered = SnapshotMemory::open(&chain).unwrap();
    let single = SnapshotMemory::open(&[tmp.join("full")]).unwrap();
    assert!(
        load(&layered) == load(&single),
        "chain and full snapshot hold the same memory"
    );
    let diff_state = state::read(&tmp.join("diff")).unwrap();
    let full_state = state::read(&tmp.join("full")).unwrap();
    assert_eq!(
        serde_json::to_value(&diff_state.machine.vcpus).unwrap(),
        serde_json::to_value(&full_state.machine.vcpus).unwrap(),
        "both were taken in the same pause"
    );
    assert_eq!(diff_state.machine.vcpus[0].regs.r13, 3, "held after pass 3");

    // The chain moved elsewhere as a whole still restores: parents are relative.
    let moved = tmp.join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    for name in ["base", "diff"] {
        std::fs::rename(tmp.join(name), moved.join(name)).unwrap();
    }
    let moved_diff = moved.join("diff");
    let chain = state::chain(&moved_diff, &state::read(&moved_diff).unwrap()).unwrap();
    assert!(load(&SnapshotMemory::open(&chain).unwrap()) == load(&single));

    // A parent replaced by another snapshot is refused, naming it.
    std::fs::rename(moved.join("base"), moved.join("base.old")).unwrap();
    std::fs::rename(tmp.join("full"), moved.join("base")).unwrap();
    let out = restore(&moved_diff, "eager", &[]);
    assert!(
        !out.status.success(),
        "a diff over the wrong parent restored"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(moved.join("base").to_str().unwrap()) && err.contains("not the snapshot"),
        "{err}"
    );
}

#[test]
fn a_failed_snapshot_leaves_the_dirty_log_for_the_next_diff() {
    require_kvm!();
    let tmp = TempDir::new("failed");
    let sock = tmp.join("api.sock");
    // A 256 KiB file system, mounted in a mount namespace of the VMM's own: a snapshot of 8 MiB
    // of RAM into it fails part-way, with ENOSPC, after the dirty log was taken.
    let full_fs = tmp.join("full-fs");
    std::fs::create_dir_all(&full_fs).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=256k faultline-test {} && exec \"$0\" \"$@\"",
        full_fs.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(env!("CARGO_BIN_EXE_faultline"))
        .args(["run", "--guest", "mix", "--mem", "8M", "--range-pages"])
        .arg(RANGE_PAGES.to_string())
        .args(["--arg", "0", "--track-dirty", "--hold-at", "1", "--json"])
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare starts (util-linux; root is needed for the mount namespace)");
    wait_running(&sock, &mut child);
    wait_held(&sock, 1);
    snapshot_via_cli(&sock, &tmp.join("base"), false);
    // Pass 2 rewrites every page; then the snapshot into the small file system fails.
    hold_at(&sock, 2);
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": full_fs.join("snap"), "type": "full"})),
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("No space left"),
        "{body}"
    );
    let (status, info) = api(&sock, "GET", "/vm", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("running")));
    // The diff taken next holds what pass 2 wrote, which the failed snapshot had read from
    // the dirty log: the chain equals a full snapshot of the same moment.
    let (status, _) = api(&sock, "PUT", "/vm/pause", None);
    assert_eq!(status, 204);
    let diff = snapshot_via_cli(&sock, &tmp.join("diff"), true);
    snapshot_via_cli(&sock, &tmp.join("full"), false);
    shutdown(&sock, child);
    assert!(
        diff["memory"]["pages_included"].as_u64().unwrap() >= RANGE_PAGES,
        "{diff}"
    );
    let diff_dir = tmp.join("diff");
    let chain = state::chain(&diff_dir, &state::read(&diff_dir).unwrap()).unwrap();
    let layered = SnapshotMemory::open(&chain).unwrap();
    let single = SnapshotMemory::open(&[tmp.join("full")]).unwrap();
    assert!(
        load(&layered) == load(&single),
        "the chain over the failed snapshot holds the same memory as a full snapshot"
    );
}

/// A snapshot's whole memory, loaded into a buffer.
#[test]
fn a_diff_is_never_layered_on_a_snapshot_put_in_place_of_the_one_taken() {
    require_kvm!();
    let tmp = TempDir::new("replaced");
    let sock = tmp.join("api.sock");
    let mut child = spawn_run(&sock, &["--arg", "0", "--track-dirty", "--hold-at", "1"]);
    wait_running(&sock, &mut child);
    wait_held(&sock, 1);
    snapshot_via_cli(&sock, &tmp.join("first"), false);
    hold_at(&sock, 2);
    snapshot_via_cli(&sock, &tmp.join("second"), false);
    // The snapshot the next diff would be taken on is replaced by a valid one of another
    // moment: a diff layered on it would restore pass 2's writes over pass 1's memory.
    std::fs::remove_dir_all(tmp.join("second")).unwrap();
    std::fs::rename(tmp.join("first"), tmp.join("second")).unwrap();
    let (status, _) = api(&sock, "PUT", "/vm/pause", None);
    assert_eq!(status, 204);
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": tmp.join("diff"), "type": "diff"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("is no longer the snapshot this VM took there"),
        "{body}"
    );
    assert!(!tmp.join("diff").exists(), "nothing half-written");
    // A full snapshot starts a chain again, and a diff on it restores like a full snapshot.
    snapshot_via_cli(&sock, &tmp.join("again"), false);
    let (status, _) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 204);
    hold_at(&sock, 3);
    let (status, _) = api(&sock, "PUT", "/vm/pause", None);
    assert_eq!(status, 204);
    snapshot_via_cli(&sock, &tmp.join("diff"), true);
    snapshot_via_cli(&sock, &tmp.join("full"), false);
    shutdown(&sock, child);
    let diff_dir = tmp.join("diff");
    let chain = state::chain(&diff_dir, &state::read(&diff_dir).unwrap()).unwrap();
    assert_eq!(
        chain,
        [
            diff_dir.canonicalize().unwrap(),
            tmp.join("again").canonicalize().unwrap()
        ]
    );
    let layered = SnapshotMemory::open(&chain).unwrap();
    let single = SnapshotMemory::open(&[tmp.join("full")]).unwrap();
    assert!(load(&layered) == load(&single));
}

fn load(memory: &SnapshotMemory) -> Vec<u8> {
    let mut bytes = vec![0u8; memory.size() as usize];
    // SAFETY: `bytes` is a live, writable buffer of exactly this length.
    let span = unsafe { MemorySpanMut::new(bytes.as_mut_ptr(), bytes.len() as u64) };
    memory.load_into(&[span], &mut |_, _| {}).unwrap();
    bytes
}

/// A small finished-guest snapshot written in-process, for the corruption tests.
fn small_snapshot(dir: &Path) {
    let mut options = common::options("touch");
    options.mem = 4 << 20;
    let mut vm = faultline::micro::MicroVm::new(&options).unwrap();
    vm.write_snapshot(dir).unwrap();
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(bytes).unwrap();
}

#[test]
fn damaged_snapshots_are_refused_with_distinct_errors() {
    require_kvm!();
    let tmp = TempDir::new("damaged");
    let good = tmp.join("good");
    small_snapshot(&good);
    let out = restore(&good, "eager", &[]);
    assert!(
        out.status.success(),
        "the intact snapshot restores: {}",
        text(&out.stderr)
    );

    let copy = |name: &str| {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["state", "memory.img", "memory.sums"] {
            std::fs::copy(good.join(file), dir.join(file)).unwrap();
        }
        dir
    };
    let state_len = std::fs::metadata(good.join("state")).unwrap().len();

    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("state"))
        .unwrap()
        .set_len(state_len / 2)
        .unwrap();
    let bad_magic = copy("magic");
    patch(&bad_magic.join("state"), 0, b"NOTFAULT");
    let bad_version = copy("version");
    patch(&bad_version.join("state"), 8, &99u32.to_le_bytes());
    let corrupt = copy("corrupt");
    patch(&corrupt.join("state"), state_len / 2, b"\xff\xfe");
    let bad_memory = copy("memory");
    // The loader's code page is data in the image; damage the guest's first instruction.
    patch(&bad_memory.join("memory.img"), guests::CODE_BASE, &[0x5a]);

    for (dir, expected) in [
        (&truncated, "truncated"),
        (&bad_magic, "is not a faultline snapshot state file"),
        (&bad_version, "format version 99"),
        (&corrupt, "corrupt"),
    ] {
        for mode in ["eager", "lazy"] {
            let out = restore(dir, mode, &[]);
            let err = text(&out.stderr);
            assert!(
                !out.status.success(),
                "{} restored in {mode}",
                dir.display()
            );
            assert!(
                err.contains(expected),
                "{}: wanted {expected:?} in: {err}",
                dir.display()
            );
            assert!(!text(&out.stdout).contains("reports"), "nothing ran");
        }
    }
    // Damaged memory: an eager restore refuses before the guest runs; a lazy one stops the
    // VM at the first touch of the damaged chunk instead of running on wrong bytes.
    let out = restore(&bad_memory, "eager", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not match its checksum"),
        "{}",
        text(&out.stderr)
    );
    let out = restore(&bad_memory, "lazy", &[]);
    assert!(
        !out.status.success(),
        "a lazy restore must not finish on damaged memory"
    );
    assert!(
        text(&out.stderr).contains("does not match its checksum"),
        "{}",
        text(&out.stderr)
    );

    // A missing snapshot and a prefetch without a working set name the problem.
    let out = restore(&tmp.join("nope"), "lazy", &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nope"));
    let out = restore(&good, "prefetch", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("working set"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_snapshot_that_reads_damaged_memory_behind_the_pager_is_not_taken() {
    require_kvm!();
    // A lazily restored VM, paused: its RAM is still in the snapshot it came from, where a
    // page nothing has touched yet is damaged. A snapshot of it reads every page through
    // the pager, which meets the damage: no snapshot may come of that.
    let tmp = TempDir::new("snapshot-damaged-lazy");
    let good = tmp.join("good");
    small_snapshot(&good);
    let size = std::fs::metadata(good.join("memory.img")).unwrap().len();
    patch(&good.join("memory.img"), size - 100, b"damage");
    let sock = tmp.join("api.sock");
    let mut child = common::spawn_restore(
        &good,
        "lazy",
        &["--paused", "--api-sock", sock.to_str().unwrap()],
    );
    wait_state(&sock, &mut child, "paused");
    let taken = tmp.join("taken");
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({ "dir": taken })),
    );
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(status, 500, "{body} {}", text(&out.stderr));
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot be trusted"), "{body}");
    assert!(error.contains("does not match its checksum"), "{body}");
    assert!(!taken.exists(), "a snapshot of damaged memory was left");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().contains("taken"))
        .collect();
    assert!(leftovers.is_empty(), "its staging was left: {leftovers:?}");
}

#[test]
fn api_errors_are_clear() {
    require_kvm!();
    let tmp = TempDir::new("apierr");
    let sock = tmp.join("api.sock");
    let mut child = spawn_run(&sock, &["--arg", "0"]);
    wait_running(&sock, &mut child);
    let (status, body) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not paused"));
    let (status, _) = api(&sock, "GET", "/nope", None);
    assert_eq!(status, 404);
    let (status, _) = api(&sock, "DELETE", "/vm/pause", None);
    assert_eq!(status, 405);
    let (status, _) = api(&sock, "GET", "/vm/swap/out", None);
    assert_eq!(status, 405);
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": tmp.join("d"), "type": "diff"})),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"path": "x"})),
    );
    assert_eq!(status, 400, "{body}");
    // Without --track-dirty a diff is refused even after a full snapshot.
    snapshot_via_cli(&sock, &tmp.join("full"), false);
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": tmp.join("d2"), "type": "diff"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("dirty tracking"),
        "{body}"
    );
    assert!(!tmp.join("d2").exists(), "nothing half-written");
    // The directory of an existing snapshot is never overwritten.
    let (status, body) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": tmp.join("full")})),
    );
    assert_eq!(status, 400, "{body}");
    let (status, stats) = api(&sock, "GET", "/vm/stats", None);
    assert_eq!(status, 200);
    assert_eq!(
        stats["state"], "running",
        "a failed snapshot leaves the VM running"
    );
    shutdown(&sock, child);
    // A client pointed at a dead socket says so.
    let out = faultline(&["vm", "stats", "--api-sock", sock.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}
