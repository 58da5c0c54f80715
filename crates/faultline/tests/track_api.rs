//! Page tracking end to end through the binary: `faultline run --paused`, `faultline track
//! add|list|watch` and the `/track` API, with every reported write checked against what the
//! `stores` guest does.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{api, faultline, spawn, text, TempDir};
use faultline::api::http;
use serde_json::json;
use vmm::boot::layout::BOOT_AREA_END;

const PAGE: u64 = 4096;

/// A paused `run` of `guest` serving the API on `sock`.
fn spawn_paused(sock: &Path, guest: &str, pages: u64, arg: u64) -> Child {
    let child = spawn(&[
        "run",
        "--guest",
        guest,
        "--mem",
        "8M",
        "--range-pages",
        &pages.to_string(),
        "--arg",
        &arg.to_string(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--paused",
        "--json",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http::call(sock, "GET", "/vm", None, Some(Duration::from_secs(5))).is_err() {
        assert!(Instant::now() < deadline, "the API never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// `faultline track watch` on `sock`, returned once it is registered.
fn spawn_watch(sock: &Path) -> Child {
    let mut watch = spawn(&["track", "watch", "--api-sock", sock.to_str().unwrap()]);
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("watching"), "{line}");
    watch
}

fn finish(child: Child) -> std::process::Output {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

fn events(out: &[u8]) -> Vec<serde_json::Value> {
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn track_watch_reports_every_tracked_write_then_the_region_going() {
    require_kvm!();
    let tmp = TempDir::new("track-watch");
    let sock = tmp.join("api.sock");
    let run = spawn_paused(&sock, "stores", 8, 1);
    let first = BOOT_AREA_END + 2 * PAGE;
    let sock_arg = sock.to_str().unwrap();
    let gpa = format!("{first:#x}");
    let out = faultline(&[
        "track",
        "add",
        "--api-sock",
        sock_arg,
        "--gpa",
        &gpa,
        "--len",
        "8K",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = faultline(&["track", "list", "--api-sock", sock_arg]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list["ranges"],
        json!([{"gpa": first, "len": 2 * PAGE, "mode": "write", "count": 1}])
    );

    let watch = spawn_watch(&sock);
    let out = faultline(&["vm", "resume", "--api-sock", sock_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    finish(run);
    let got = events(&finish(watch).stdout);

    let mut expected: Vec<serde_json::Value> = (1..=2)
        .flat_map(|pass| guests::stores_pass(BOOT_AREA_END, 8, 1, pass))
        .filter(|s| (first..first + 2 * PAGE).contains(&s.gpa))
        .map(|s| {
            let data: String = s.bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({"event": "write", "vcpu": 0, "gpa": s.gpa, "len": s.bytes.len(), "data": data})
        })
        .collect();
    assert_eq!(expected.len(), 28);
    expected.push(json!({"event": "region_removed", "gpa": first, "len": 2 * PAGE}));
    assert_eq!(got, expected);
}

#[test]
fn bad_tracking_requests_are_refused_and_change_nothing() {
    require_kvm!();
    let tmp = TempDir::new("track-bad");
    let sock = tmp.join("api.sock");
    let run = spawn_paused(&sock, "stores", 8, 1);
    let start = BOOT_AREA_END;
    let (status, _) = api(
        &sock,
        "PUT",
        "/track",
        Some(json!({"gpa": start, "len": PAGE, "mode": "write"})),
    );
    assert_eq!(status, 204);
    let (_, before) = api(&sock, "GET", "/track", None);
    let cases = [
        (
            "PUT",
            json!({"gpa": start, "len": 0, "mode": "write"}),
            400,
            "len 0",
        ),
        (
            "PUT",
            json!({"gpa": start + 8, "len": PAGE, "mode": "write"}),
            400,
            "multiples of 4 KiB",
        ),
        (
            "PUT",
            json!({"gpa": 8u64 << 20, "len": PAGE, "mode": "write"}),
            400,
            "not guest RAM",
        ),
        (
            "PUT",
            json!({"gpa": 0xfee0_0000u64, "len": PAGE, "mode": "access"}),
            400,
            "not guest RAM",
        ),
        (
            "PUT",
            json!({"gpa": start, "len": PAGE, "mode": "execute"}),
            400,
            "unknown variant `execute`",
        ),
        (
            "PUT",
            json!({"gpa": start, "len": PAGE}),
            400,
            "missing field `mode`",
        ),
        (
            "DELETE",
            json!({"gpa": start + PAGE, "len": PAGE, "mode": "write"}),
            409,
            "not tracked",
        ),
        (
            "DELETE",
            json!({"gpa": start, "len": PAGE, "mode": "access"}),
            409,
            "not tracked in access mode",
        ),
    ];
    for (method, body, want, says) in cases {
        let (status, answer) = api(&sock, method, "/track", Some(body.clone()));
        let error = answer["error"].as_str().unwrap_or_default();
        assert_eq!(status, want, "{method} {body}: {answer}");
        assert!(
            error.contains(says),
            "{method} {body}: {error:?} should say {says:?}"
        );
    }
    assert_eq!(
        api(&sock, "GET", "/track", None).1,
        before,
        "nothing half-applied"
    );
    let out = faultline(&[
        "track",
        "add",
        "--api-sock",
        sock.to_str().unwrap(),
        "--gpa",
        "0x200100",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("HTTP 400"),
        "{}",
        text(&out.stderr)
    );
    api(&sock, "PUT", "/vm/shutdown", None);
    run.wait_with_output().unwrap();
}

#[test]
fn a_reader_that_does_not_read_never_stalls_the_guest_and_hears_what_it_lost() {
    require_kvm!();
    let tmp = TempDir::new("track-slow");
    let sock = tmp.join("api.sock");
    // 64 tracked pages rewritten 1200 times: 76,800 writes, more than the stream's queue and
    // the socket's buffer hold together.
    const PAGES: u64 = 64;
    const PASSES: u64 = 1200;
    let run = spawn_paused(&sock, "dirty", PAGES, PASSES);
    let (status, body) = api(
        &sock,
        "PUT",
        "/track",
        Some(json!({"gpa": BOOT_AREA_END, "len": PAGES * PAGE, "mode": "write"})),
    );
    assert_eq!(status, 204, "{body}");
    let stalled = match http::get_stream(&sock, "/track/events").unwrap() {
        http::Stream::Lines(reader) => reader,
        http::Stream::Refused(status, body) => panic!("{status}: {body:?}"),
    };
    // The server registers a stream before it answers: nothing the guest does is missed.
    api(&sock, "PUT", "/vm/resume", None);
    // The guest finishes while nobody reads: its report comes out.
    let mut run = run;
    let mut stdout = BufReader::new(run.stdout.take().unwrap());
    let mut report = String::new();
    while !report.ends_with("\n}\n") {
        assert!(
            stdout.read_line(&mut report).unwrap() > 0,
            "no report: {report}"
        );
    }
    assert!(report.contains("\"exit_code\": 0"), "{report}");
    // The server stops while the reader still reads nothing (it waits up to 5 s for a
    // stalled reader); then the stream is read.
    std::thread::sleep(Duration::from_secs(1));
    let mut rest = String::new();
    BufReader::new(stalled).read_to_string(&mut rest).unwrap();
    finish(run);
    let got = events(rest.as_bytes());
    let writes = got.iter().filter(|e| e["event"] == "write").count() as u64;
    let lost: u64 = got
        .iter()
        .filter(|e| e["event"] == "lost")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert!(lost > 0, "nothing was lost: {writes} writes");
    let removed = got
        .iter()
        .filter(|e| e["event"] == "region_removed")
        .count() as u64;
    assert_eq!(
        writes + removed + lost,
        PAGES * PASSES + 1,
        "every write, and the region going at the end, reported or counted as lost"
    );
}
