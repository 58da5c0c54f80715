//! The command line as a user meets it: exit codes and messages.

mod common;

use common::{faultline, text};

#[test]
fn run_hello_prints_its_report_and_succeeds() {
    require_kvm!();
    let out = faultline(&["run", "--guest", "hello"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{:#x}", guests::HELLO_REPORT)));
}

#[test]
fn run_touch_checks_memory() {
    require_kvm!();
    let out = faultline(&["run", "--guest", "touch", "--mem", "16M", "--cpus", "2"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("memory check ok"));
}

#[test]
fn json_report_is_machine_readable() {
    require_kvm!();
    let out = faultline(&[
        "run", "--guest", "dirty", "--mem", "8M", "--arg", "2", "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["guest"], "dirty");
    assert_eq!(report["vcpus"][0]["reports"][0], 2);
    assert_eq!(report["vcpus"][0]["exit_code"], 0);
}

#[test]
fn a_crashing_guest_fails_with_a_message() {
    require_kvm!();
    let out = faultline(&["run", "--guest", "fault"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("triple-faulted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_input_is_named() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--guest", "nope"], "no micro-guest named \"nope\""),
        (&["run", "--guest", "hello", "--mem", "12Q"], "unknown unit"),
        (
            &["run", "--guest", "hello", "--mem", "1000"],
            "must be a multiple of 4 KiB",
        ),
        (
            &["run", "--kernel", "/nonexistent/vmlinux"],
            "cannot read kernel /nonexistent/vmlinux",
        ),
        (
            &["run", "--guest", "hello", "--cpuid-mask", "warp"],
            "unknown CPU feature \"warp\"",
        ),
        (&["run"], "required"),
        // Options of one kind of guest are refused for the other, not ignored.
        (
            &["run", "--guest", "hello", "--timeout", "3"],
            "'--guest <NAME>' cannot be used with '--timeout <SECS>'",
        ),
        (
            &["run", "--guest", "hello", "--initrd", "/x"],
            "'--guest <NAME>' cannot be used with '--initrd <PATH>'",
        ),
        (
            &["run", "--guest", "hello", "--cpus", "33"],
            "33 is not in 1..=32",
        ),
        (
            &["run", "--guest", "hello", "--cpus", "0"],
            "0 is not in 1..=32",
        ),
        (
            &[
                "migrate",
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--hold-at",
                "2",
            ],
            "--api-sock",
        ),
        (
            &[
                "migrate",
                "send",
                "--api-sock",
                "/nonexistent.sock",
                "--to",
                "127.0.0.1:1",
                "--resume",
                "--mode",
                "post",
            ],
            "the argument '--resume' cannot be used with '--mode <MODE>'",
        ),
        (
            &[
                "run",
                "--guest",
                "touch",
                "--mem",
                "8M",
                "--lazy",
                "zero",
                "--background-fill",
                "--fill-rate",
                "0",
            ],
            "below one page (4K) a second",
        ),
    ];
    for (args, message) in cases {
        if args.len() > 1 && !args.contains(&"--mem") && !common::kvm_available() {
            continue;
        }
        let out = faultline(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr:?}"
        );
    }
}

#[test]
fn guests_lists_every_micro_guest() {
    let out = faultline(&["guests"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    for guest in guests::ALL {
        assert!(
            stdout.contains(guest.name),
            "{} missing from {stdout}",
            guest.name
        );
    }
}
