//! Live migration end to end: two faultline processes on loopback, real KVM, real TCP. The
//! `mix` guest (each pass depends on the memory the one before left) is moved mid-run and must
//! finish on the destination with exactly the uninterrupted result; a migration that fails
//! must leave the source VM running, unharmed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::message_gate::MessageGate;
use common::pki::make_pki;
use common::{
    api, faultline, json_report, set_hold, spawn, spawn_env, text, wait_until_held, TempDir,
};
use vmm::boot::layout::BOOT_AREA_END;

const PAGES: u64 = 128;
const PASSES: u64 = 3000;

/// The `mix` guest a test migrates: `pages` pages, `passes` passes, held at `hold` at the
/// latest (so that it is still there to migrate however fast the CPU is).
#[derive(Clone, Copy)]
struct Mix {
    /// "mix", or "counter" (QEMU's migration test guest, checked as it arrives).
    guest: &'static str,
    cpus: u8,
    pages: u64,
    passes: u64,
    hold: u64,
    /// More arguments for `faultline run`.
    run_args: &'static [&'static str],
    /// Its environment's additions.
    env: &'static [(&'static str, &'static str)],
}

impl Mix {
    /// The RAM its run has, in MiB: its range and 4 MiB more.
    fn ram_mib(&self) -> u64 {
        4 + self.pages * 4096 / (1 << 20)
    }
}

/// The small guest: every pass rewrites all its pages (in 1 ms or so).
const SMALL: Mix = Mix {
    guest: "mix",
    cpus: 1,
    pages: PAGES,
    passes: PASSES,
    hold: 2500,
    run_args: &[],
    env: &[],
};

/// The big guest: 64 MiB swept pass after pass, a pass (about 80 ms here) longer than a copy
/// round, so that it writes pages all the time the rounds run (it is held only after some
/// 4 s).
const BIG: Mix = Mix {
    guest: "mix",
    cpus: 1,
    pages: 16384,
    passes: 60,
    hold: 55,
    run_args: &[],
    env: &[],
};

/// A `mix` run serving the API on `sock`; waits until it runs.
fn spawn_source(sock: &Path, cpus: u8) -> Child {
    spawn_mix(sock, Mix { cpus, ..SMALL })
}

fn spawn_mix(sock: &Path, mix: Mix) -> Child {
    let mem = format!("{}M", mix.ram_mib());
    let (passes, hold, cpus, pages) = (
        mix.passes.to_string(),
        mix.hold.to_string(),
        mix.cpus.to_string(),
        mix.pages.to_string(),
    );
    let args = [
        "run",
        "--guest",
        mix.guest,
        "--mem",
        &mem,
        "--cpus",
        &cpus,
        "--range-pages",
        &pages,
        "--arg",
        &passes,
        "--hold-at",
        &hold,
        "--api-sock",
        sock.to_str().unwrap(),
        "--json",
    ];
    let args: Vec<&str> = args
        .into_iter()
        .chain(mix.run_args.iter().copied())
        .collect();
    let mut child = spawn_env(&args, mix.env);
    common::wait_state(sock, &mut child, "running");
    child
}

/// A peer on a free loopback port that serves one connection with `serve`: its address, and
/// its thread.
fn fake_peer<T: Send + 'static>(
    serve: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
) -> (String, std::thread::JoinHandle<T>) {
    fake_peer_with_listener(|stream, _| serve(stream))
}

/// Like [`fake_peer`], `serve` also getting the listener (to accept more).
fn fake_peer_with_listener<T: Send + 'static>(
    serve: impl FnOnce(std::net::TcpStream, &TcpListener) -> T + Send + 'static,
) -> (String, std::thread::JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let thread = std::thread::spawn(move || serve(listener.accept().unwrap().0, &listener));
    (addr, thread)
}

/// Answers the hello on `stream` with the source's own identity, as a destination that takes
/// anything would: the two halves of the connection.
fn greeted(stream: std::net::TcpStream) -> (BufReader<std::net::TcpStream>, std::net::TcpStream) {
    use migrate::{read_message, write_message, Message};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let Message::Hello(identity) = read_message(&mut reader).unwrap() else {
        panic!("no hello");
    };
    write_message(&mut writer, &Message::Hello(identity)).unwrap();
    (reader, writer)
}

/// Plays a post-copy destination up to the state: the hello, the switch-over, the page-request
/// connection, the state. The main connection's halves, and the page-request connection.
fn post_copy_state(
    stream: std::net::TcpStream,
    listener: &TcpListener,
) -> (
    BufReader<std::net::TcpStream>,
    std::net::TcpStream,
    (BufReader<std::net::TcpStream>, std::net::TcpStream),
) {
    use migrate::{read_message, Message};
    let (mut reader, writer) = greeted(stream);
    // The pages that will come again are none: nothing was sent before.
    let requests = switched_to_post_copy(&mut reader, listener);
    assert!(matches!(
        read_message(&mut reader).unwrap(),
        Message::State(_)
    ));
    (reader, writer, requests)
}

/// Takes the switch-over to post-copy and the first stale list on `reader`, and the
/// page-request connection on `listener`: that connection's halves.
fn switched_to_post_copy(
    reader: &mut BufReader<std::net::TcpStream>,
    listener: &TcpListener,
) -> (BufReader<std::net::TcpStream>, std::net::TcpStream) {
    use migrate::{read_message, Message};
    let Message::SwitchOver {
        post_copy: true,
        migration,
    } = read_message(reader).unwrap()
    else {
        panic!("no switch-over to post-copy");
    };
    assert!(matches!(
        read_message(reader).unwrap(),
        Message::Stale { .. }
    ));
    let (mut requests_reader, requests_writer) = greeted(listener.accept().unwrap().0);
    // The page-request connection names the migration its switch-over named.
    assert_eq!(
        read_message(&mut requests_reader).unwrap(),
        Message::Requests { migration }
    );
    (requests_reader, requests_writer)
}

/// A `migrate receive` on a free loopback port, and that port.
fn spawn_destination() -> (Child, String) {
    let destination = Destination::spawn(&["--json"]);
    (destination.child, destination.addr)
}

/// A `migrate receive` child on a free loopback port.
struct Destination {
    child: Child,
    /// Where it waits.
    addr: String,
    /// The line it says so in.
    line: String,
    /// The rest of its stderr, drained so that it never blocks on a full pipe.
    stderr: std::thread::JoinHandle<String>,
}

impl Destination {
    /// One serving the API on `sock` that holds the small guest at pass 2900 (before its end),
    /// so that it stays there until released.
    fn held(sock: &Path) -> Destination {
        let sock = sock.to_str().unwrap();
        Destination::spawn(&["--json", "--api-sock", sock, "--hold-at", "2900"])
    }

    fn spawn(extra: &[&str]) -> Destination {
        Destination::spawn_with(extra, &[])
    }

    /// One with `extra` arguments and `env` added to its environment.
    fn spawn_with(extra: &[&str], env: &[(&str, &str)]) -> Destination {
        let mut args = vec!["migrate", "receive", "--listen", "127.0.0.1:0"];
        args.extend(extra);
        let mut child = spawn_env(&args, env);
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        Destination {
            child,
            addr,
            line,
            stderr,
        }
    }
}

/// The guest's run report among the JSON documents a `migrate receive --json` printed.
fn run_report(stdout: &str) -> serde_json::Value {
    let start = stdout.find("{\n  \"guest\"").expect("a run report");
    serde_json::Deserializer::from_str(&stdout[start..])
        .into_iter::<serde_json::Value>()
        .next()
        .expect("a JSON document")
        .unwrap()
}

fn migrate_send_mode(sock: &Path, to: &str, mode: &str) -> std::process::Output {
    migrate_send_with(sock, to, &["--mode", mode])
}

fn migrate_send_with(sock: &Path, to: &str, extra: &[&str]) -> std::process::Output {
    let sock = sock.to_str().unwrap();
    let mut args = vec!["migrate", "send", "--api-sock", sock, "--to", to, "--json"];
    args.extend(extra);
    faultline(&args)
}

fn migrated_mid_run_finishes_with_the_uninterrupted_result(mix: Mix) {
    migrated_finishes_right(mix, "pre");
}

fn migrated_finishes_right(mix: Mix, mode: &str) -> serde_json::Value {
    migrated_with(mix, &["--mode", mode])
}

/// Moves the guest with `migrate send` and `extra`; checks that it finishes right at the
/// destination; returns the migration's report.
fn migrated_with(mix: Mix, extra: &[&str]) -> serde_json::Value {
    migrated_as(mix, extra, Rounds::Free)
}

/// How the guest runs while a test's migration runs. Except when free, the test holds the
/// source's messages on their way to the destination until the guest has done what it must
/// (it waits at a hold point otherwise), so the outcome does not depend on the speeds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rounds {
    /// As fast as it goes: how the rounds end depends on its speed against theirs.
    Free,
    /// Not at all: held after two passes (every page written) until it has moved.
    Held,
    /// Exactly one whole pass at the end of each round: every round leaves every page of its
    /// range, so the rounds neither converge nor shrink.
    OnePassEach,
    /// One whole pass at the end of the first pass (so that a hybrid's rounds do not shrink
    /// and post-copy takes over), then as fast as it goes, up to its hold point.
    OnePassThenFree,
    /// A hybrid told to go post-copy as its first pass begins (it cuts the pass after its
    /// first part, while the guest waits), then one whole pass as the switch-over goes out:
    /// the pages written after the first stale list are more than those on it.
    ToldThenOnePassAtTheSwitch,
}

/// A source started for a test's migration, and where to send it.
struct Source {
    child: Child,
    /// The destination, or a gate in front of it.
    to: String,
    gate: Option<MessageGate>,
}

impl Source {
    /// Fails the test with the gate's own failure, if its callback failed: that is what made
    /// the migration fail, so it is looked at first.
    fn check_gate(&self) {
        if let Some(gate) = &self.gate {
            gate.check();
        }
    }
}

/// Starts the `mix` guest for a migration to `destination` that goes as `rounds` says.
fn source_for(sock: &Path, mix: Mix, rounds: Rounds, destination: &str) -> Source {
    source_watched(sock, mix, rounds, destination, None)
}

/// Sees each of the source's messages on its way through a gate.
type Watch = Box<dyn FnMut(&migrate::Message) + Send>;

/// Like [`source_for`], `watch` (if any) seeing each of the source's messages on its main
/// connection before the guest acts on it.
fn source_watched(
    sock: &Path,
    mix: Mix,
    rounds: Rounds,
    destination: &str,
    mut watch: Option<Watch>,
) -> Source {
    let child = match rounds {
        Rounds::Free => spawn_mix(sock, mix),
        _ => spawn_mix_held(sock, mix),
    };
    if watch.is_none() && matches!(rounds, Rounds::Free | Rounds::Held) {
        return Source {
            child,
            to: destination.to_string(),
            gate: None,
        };
    }
    let sock = sock.to_path_buf();
    let (mut pass, mut syncs) = (2, 0);
    let gate = MessageGate::start(destination, move |message| {
        if let Some(watch) = &mut watch {
            watch(message);
        }
        let mut one_pass = || {
            pass += 1;
            set_hold(&sock, Some(pass));
            wait_until_held(&sock, pass, mix.cpus);
        };
        match (rounds, message) {
            (Rounds::OnePassEach, migrate::Message::Sync) => one_pass(),
            (Rounds::OnePassThenFree, migrate::Message::Sync) => {
                syncs += 1;
                if syncs == 1 {
                    one_pass();
                    set_hold(&sock, Some(mix.hold));
                }
            }
            // Before any page has left: the first look at the pass, after its first part,
            // sees it whatever the sockets buffer.
            (Rounds::ToldThenOnePassAtTheSwitch, migrate::Message::Hello(_)) => {
                let (status, _) = api(&sock, "PUT", "/migration/switchover", None);
                assert_eq!(status, 204);
            }
            (Rounds::ToldThenOnePassAtTheSwitch, migrate::Message::SwitchOver { .. }) => one_pass(),
            _ => {}
        }
    });
    Source {
        child,
        to: gate.addr.clone(),
        gate: Some(gate),
    }
}

/// Like [`migrated_with`], the guest running as `rounds` says.
fn migrated_as(mix: Mix, extra: &[&str], rounds: Rounds) -> serde_json::Value {
    let name = extra.concat().replace('-', "");
    let tmp = TempDir::new(&format!("migrate-{name}-{}-{}", mix.cpus, mix.pages));
    let sock = tmp.join("src.sock");
    let verify: &[&str] = if mix.guest == "counter" {
        &["--json", "--verify-arrival"]
    } else {
        &["--json"]
    };
    let destination = Destination::spawn(verify);
    let (destination, addr) = (destination.child, destination.addr);
    let source = source_for(&sock, mix, rounds, &addr);
    let out = migrate_send_with(&sock, &source.to, extra);
    source.check_gate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json_report(&text(&out.stdout));
    assert_eq!(report["status"], "completed", "{report}");
    assert!(report["normal_pages"].as_u64().unwrap() > 0);
    // The downtime until the state was sent (QEMU's count) is part of the whole downtime.
    let until_state_sent = report["downtime_until_state_sent_ms"].as_f64().unwrap();
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(
        0.0 < until_state_sent && until_state_sent < downtime,
        "{report}"
    );

    let source = source.child.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    assert!(text(&source.stderr).contains("migrated to another faultline"));

    check_arrived(destination, mix);
    report
}

/// Waits for the destination: it ran the guest to its end and checked its memory (it exits 1
/// if the guest's checksum and guest memory disagree), and the guest's results are those of an
/// uninterrupted run. Returns what it printed.
fn check_arrived(destination: Child, mix: Mix) -> String {
    let arrived = destination.wait_with_output().unwrap();
    assert!(arrived.status.success(), "{}", text(&arrived.stdout));
    if mix.guest == "counter" {
        // Its memory was checked as it arrived, before it ran on.
        let stdout = text(&arrived.stdout);
        let at = stdout.find("{\"arrival_check\"").expect("an arrival check");
        let check: serde_json::Value = serde_json::Deserializer::from_str(&stdout[at..])
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        let passes = check["arrival_check"]["passes"].as_array().unwrap();
        assert_eq!(passes.len(), usize::from(mix.cpus));
        assert!(
            passes.iter().all(|p| p.as_u64().unwrap() < mix.passes),
            "{check}"
        );
    }
    let run = run_report(&text(&arrived.stdout));
    let vcpus = run["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), usize::from(mix.cpus));
    let mut sum = 0u64;
    for vcpu in vcpus {
        assert_eq!(vcpu["exit_code"], 0);
        assert_eq!(vcpu["reports"][0], mix.passes, "every pass done");
        sum = sum.wrapping_add(vcpu["reports"][1].as_u64().unwrap());
    }
    let expected = match mix.guest {
        "mix" => guests::mix_checksum(BOOT_AREA_END, mix.pages, mix.passes),
        // Every page counted every pass.
        _ => mix.pages.wrapping_mul(mix.passes),
    };
    assert_eq!(sum, expected);
    text(&arrived.stdout)
}

#[test]
fn pre_copy_moves_a_running_guest_that_finishes_right_one_vcpu() {
    require_kvm!();
    migrated_mid_run_finishes_with_the_uninterrupted_result(SMALL);
}

#[test]
fn pre_copy_moves_a_running_guest_that_finishes_right_two_vcpus() {
    require_kvm!();
    migrated_mid_run_finishes_with_the_uninterrupted_result(Mix { cpus: 2, ..SMALL });
}

#[test]
fn pre_copy_of_a_vm_that_logged_dirty_pages_already_sends_every_page() {
    require_kvm!();
    // The dirty log was on before (for diff snapshots): the first pass must still be every
    // page, not only those written since the log's last take.
    migrated_with(
        Mix {
            run_args: &["--track-dirty"],
            ..SMALL
        },
        &["--mode", "pre"],
    );
}

/// QEMU's migration test guest: every page counted up pass after pass, its memory checked
/// on arrival (one count, or two at one edge), then run to the end.
const COUNTER: Mix = Mix {
    guest: "counter",
    ..SMALL
};

#[test]
fn the_counter_guest_arrives_consistent_and_finishes_right_pre_copy() {
    require_kvm!();
    migrated_finishes_right(COUNTER, "pre");
    migrated_finishes_right(Mix { cpus: 2, ..COUNTER }, "pre");
    // One still counting when it pauses (a pass outlasts a round, and a long downtime
    // allowed ends the rounds after the first): the pages it wrote since that round's take
    // must come with the switch-over.
    let big = Mix {
        guest: "counter",
        ..BIG
    };
    migrated_with(big, &["--mode", "pre", "--downtime-ms", "60000"]);
}

#[test]
fn the_counter_guest_arrives_consistent_and_finishes_right_post_copy() {
    require_kvm!();
    migrated_finishes_right(COUNTER, "post");
    migrated_finishes_right(Mix { cpus: 2, ..COUNTER }, "post");
}

#[test]
fn the_counter_guest_arrives_consistent_and_finishes_right_hybrid() {
    require_kvm!();
    // The big guest: counting still when post-copy takes over.
    let big = Mix {
        guest: "counter",
        ..BIG
    };
    for mix in [big, Mix { cpus: 2, ..big }] {
        // It rewrites every page during the first pass: the rounds do not shrink, so
        // post-copy takes over.
        let report = migrated_as(mix, &["--mode", "hybrid"], Rounds::OnePassThenFree);
        assert_eq!(report["mode"], "hybrid", "{report}");
        assert_eq!(report["ended_by"], "not shrinking", "{report}");
    }
}

#[test]
fn a_migration_cancelled_while_it_runs_gives_up_and_the_vm_runs_on() {
    require_kvm!();
    // 32 MiB at 1 MiB/s: it gives up at its next run of pages, long before the first pass
    // ends (no sync ever follows it).
    let syncs =
        cancelled_as_its_first_pages_go("migrate-cancel-running", MID, &["--max-bandwidth", "1M"]);
    assert_eq!(syncs, 0, "the first pass went on to its end");
    // 512 KiB: the whole first pass may be in the sockets' buffers when the cancel comes; it
    // gives up at the switch-over.
    cancelled_as_its_first_pages_go("migrate-cancel-small", SMALL, &[]);
}

/// A migration of the held `mix` run `mix` (with `extra` arguments) cancelled as its first
/// pages go: it fails saying so, the VM runs on and finishes right. The syncs it sent.
fn cancelled_as_its_first_pages_go(name: &str, mix: Mix, extra: &[&str]) -> u32 {
    let tmp = TempDir::new(name);
    let sock = tmp.join("src.sock");
    let (mut destination, addr) = spawn_destination();
    let syncs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let watch: Watch = {
        let (sock, syncs) = (sock.clone(), std::sync::Arc::clone(&syncs));
        let mut asked = false;
        Box::new(move |message| match message {
            migrate::Message::Pages { .. } if !asked => {
                asked = true;
                // Only a hybrid migration switches when told: this one says so.
                let (status, answer) = api(&sock, "PUT", "/migration/switchover", None);
                assert_eq!(status, 409, "{answer}");
                assert!(
                    answer["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("is a pre one: only a hybrid")),
                    "{answer}"
                );
                let (status, answer) = api(&sock, "PUT", "/migration/cancel", None);
                assert_eq!(status, 202, "{answer}");
                assert_eq!(answer["status"], "cancelling", "{answer}");
            }
            migrate::Message::Sync => {
                syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ => {}
        })
    };
    let source = source_watched(&sock, mix, Rounds::Held, &addr, Some(watch));
    let out = migrate_send_with(&sock, &source.to, extra);
    source.check_gate();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the migration was given up: cancelled by the operator")
            && err.contains("the VM runs on here"),
        "{err}"
    );
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "running", "{info}");
    let (_, migration) = api(&sock, "GET", "/migration", None);
    // Its outcome is the cancel, not a failure.
    assert_eq!(migration["status"], "cancelled", "{migration}");
    assert!(err.contains("the migration was cancelled"), "{err}");
    // Nothing runs or is paused any more: a second cancel has nothing to do.
    let (status, answer) = api(&sock, "PUT", "/migration/cancel", None);
    assert_eq!(status, 409);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("no migration runs or is paused")),
        "{answer}"
    );
    let _ = destination.kill();
    let _ = destination.wait();
    set_hold(&sock, None);
    finishes_right_as(source.child, mix);
    syncs.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_pre_copy_that_never_converges_ends_at_its_round_limit() {
    require_kvm!();
    // With no downtime allowed, what is left never fits (the guest rewrites every page in
    // each round): the round limit ends the rounds and the rest goes in the pause.
    let report = migrated_as(
        BIG,
        &[
            "--mode",
            "pre",
            "--downtime-ms",
            "0",
            "--max-rounds",
            "3",
            "--no-throttle",
        ],
        Rounds::OnePassEach,
    );
    assert_eq!(report["ended_by"], "round limit", "{report}");
    assert_eq!(report["dirty_rounds"], 3, "{report}");
    assert_eq!(report["throttle_percent"], 0, "{report}");
}

#[test]
fn a_pre_copy_that_does_not_converge_throttles_the_guest() {
    require_kvm!();
    // With no downtime allowed nothing fits while the guest writes: its vCPUs are
    // throttled, 10% more each round at least (more when a round leaves more than half of
    // what it sent), and it still finishes right at the destination.
    // The guest rewrites every page during the first pass, so the first round does not
    // shrink: it is throttled from then on.
    let report = migrated_as(
        BIG,
        &["--mode", "pre", "--downtime-ms", "0", "--max-rounds", "6"],
        Rounds::OnePassThenFree,
    );
    let throttled = report["throttle_percent"].as_u64().unwrap();
    assert!((60..=99).contains(&throttled), "{report}");
    // Throttled hard enough, the guest may write nothing in a round: then nothing is left.
    let ended_by = report["ended_by"].as_str().unwrap();
    assert!(["round limit", "converged"].contains(&ended_by), "{report}");
}

/// A hybrid migration whose rounds cannot converge (no downtime allowed, few rounds): with a
/// guest that keeps rewriting its pages, post-copy takes over.
const HYBRID_GOING_POST_COPY: &[&str] = &[
    "--mode",
    "hybrid",
    "--downtime-ms",
    "0",
    "--max-rounds",
    "3",
];

#[test]
fn a_hybrid_migration_whose_rounds_stop_shrinking_goes_post_copy() {
    require_kvm!();
    // The guest rewrites every page during the first pass: what is left is no smaller than
    // what it sent, so post-copy takes over (and brings the pages the rounds sent that
    // changed).
    let report = migrated_as(BIG, HYBRID_GOING_POST_COPY, Rounds::OnePassThenFree);
    assert_eq!(report["ended_by"], "not shrinking", "{report}");
    assert_eq!(report["mode"], "hybrid", "post-copy took over: {report}");
    // The rounds' figures stay in the report of the post-copy that ended the migration.
    assert!(
        report["dirty_rate_pages_per_s"].as_f64() > Some(0.0),
        "{report}"
    );
}

#[test]
fn a_hybrid_migration_of_a_guest_sweeping_its_memory_through_the_first_pass_arrives_right() {
    require_kvm!();
    // 192 MiB swept pass after pass by the counter guest while the first pass goes in parts of
    // 64 MiB. How the pre-copy part ends depends on how fast the guest runs against the pass,
    // which no test controls: new pages at more than half the pass's pace (post-copy takes
    // over before the pass ends), the same pages again and again (the first round does not
    // shrink), or a guest slow enough, or held soon enough, for the rounds to converge (or to
    // shrink until the round limit). (The
    // decisions are unit-tested.) Whichever it is, the guest's memory is checked as it
    // arrives, and it finishes with an uninterrupted run's result.
    let mix = Mix {
        guest: "counter",
        pages: 49152,
        passes: 40,
        hold: 35,
        ..BIG
    };
    let report = migrated_with(mix, &["--mode", "hybrid"]);
    let ended_by = report["ended_by"].as_str().unwrap();
    assert!(
        ["outpaced", "not shrinking", "converged", "round limit"].contains(&ended_by),
        "{report}"
    );
    // Converged, it finished in pre-copy; otherwise post-copy took over.
    let mode = if ended_by == "converged" {
        "pre"
    } else {
        "hybrid"
    };
    assert_eq!(report["mode"], mode, "{report}");
}

#[test]
fn a_pre_copy_with_a_bandwidth_cap_keeps_under_it_and_finishes_right() {
    require_kvm!();
    // 64 MiB at 32 MiB/s: the cap holds the pages sent while the VM runs (a slower host
    // only sends slower); the guest is held, so the pause has nothing left to send uncapped.
    let cap = 32u64 << 20;
    let report = migrated_as(
        BIG,
        &["--mode", "pre", "--max-bandwidth", "32M"],
        Rounds::Held,
    );
    let rate = report["throughput_mbit_per_s"].as_f64().unwrap() * 1e6 / 8.0;
    assert!(
        rate <= cap as f64 * 1.05,
        "{rate} bytes/s over a cap of {cap}: {report}"
    );
}

#[test]
fn send_requests_that_cannot_be_right_are_refused_by_name_and_the_vm_runs_on() {
    require_kvm!();
    let tmp = TempDir::new("migrate-cap-zero");
    let sock = tmp.join("src.sock");
    let source = spawn_source(&sock, 1);
    for cap in ["0", "1048575"] {
        let out = migrate_send_with(&sock, "127.0.0.1:9", &["--max-bandwidth", cap]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("max_bandwidth must be at least 1 MiB (1048576 bytes) a second"),
            "{err}"
        );
    }
    // Settings the mode does not use are refused, not ignored.
    for (extra, says) in [
        (
            &["--mode", "post", "--downtime-ms", "5", "--max-rounds", "2"][..],
            "downtime_ms, max_rounds change nothing in a post migration",
        ),
        (
            &["--mode", "post", "--max-bandwidth", "8M"][..],
            "max_bandwidth changes nothing in a post migration",
        ),
        (
            &["--mode", "hybrid", "--no-throttle"][..],
            "throttle changes nothing in a hybrid migration",
        ),
    ] {
        let out = migrate_send_with(&sock, "127.0.0.1:9", extra);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(says) && err.contains("HTTP 400"), "{err}");
    }
    // Nor is an address that names no destination tried.
    for (to, says) in [
        ("127.0.0.1:0", "port 0 names no destination"),
        ("127.0.0.1", "is not a HOST:PORT that resolves"),
    ] {
        let out = migrate_send_with(&sock, to, &[]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(says) && err.contains("HTTP 400"), "{err}");
    }
    // A resume goes on as its migration began: a new one's settings are refused, not ignored.
    let (status, answer) = api(
        &sock,
        "PUT",
        "/migration/send",
        Some(
            serde_json::json!({ "to": "127.0.0.1:9", "resume": true, "mode": "pre", "max_rounds": 3 }),
        ),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("a resume goes on as its migration began: mode, max_rounds cannot be given"),
        "{answer}"
    );
    let (status, info) = api(&sock, "GET", "/vm", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("running")));
    set_hold(&sock, None);
    finishes_right(source);
}

#[test]
fn post_copy_moves_a_running_guest_that_finishes_right_one_vcpu() {
    require_kvm!();
    migrated_finishes_right(SMALL, "post");
}

#[test]
fn post_copy_moves_a_running_guest_that_finishes_right_two_vcpus() {
    require_kvm!();
    migrated_finishes_right(Mix { cpus: 2, ..SMALL }, "post");
}

#[test]
fn post_copy_of_a_guest_whose_pages_mostly_arrive_by_the_stream() {
    require_kvm!();
    // 64 MiB swept pass after pass, far slower than the stream: most pages are installed from
    // the stream before the guest comes back to them.
    migrated_finishes_right(BIG, "post");
}

#[test]
fn a_post_copy_destination_that_stays_paused_gets_every_page_from_the_stream() {
    require_kvm!();
    paused_destination_gets_every_page_from_the_stream(&["--mode", "post"], Rounds::Free);
}

#[test]
fn a_hybrid_destination_that_stays_paused_gets_every_page_from_the_stream() {
    require_kvm!();
    // Post-copy takes over part way through the first pass, and the guest then rewrites its
    // pages as it switches: the pages written after the first stale list (most of them not
    // on it), dropped at the destination before the pause, must come in the stream too: no
    // fault would ask for them.
    paused_destination_gets_every_page_from_the_stream(
        &["--mode", "hybrid"],
        Rounds::ToldThenOnePassAtTheSwitch,
    );
}

/// Migrates a guest that rewrites its memory, running as `rounds` says, with `extra` (a
/// post-copy, or a hybrid that goes post-copy) to a destination that does not run it until
/// every page is in.
fn paused_destination_gets_every_page_from_the_stream(extra: &[&str], rounds: Rounds) {
    // Nothing runs at the destination until the migration is over, so no fault asks for a
    // page: the stream alone must bring every one (a run it lost would never come).
    let tmp = TempDir::new(&format!(
        "migrate-paused{}",
        extra.concat().replace('-', "")
    ));
    let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    let destination =
        Destination::spawn(&["--json", "--paused", "--api-sock", dsock.to_str().unwrap()]);
    let source = source_for(&sock, BIG, rounds, &destination.addr);
    let out = migrate_send_with(&sock, &source.to, extra);
    source.check_gate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json_report(&text(&out.stdout));
    assert_ne!(report["mode"], "pre", "post-copy took over: {report}");
    if rounds == Rounds::ToldThenOnePassAtTheSwitch {
        assert_eq!(report["ended_by"], "told", "{report}");
    }
    let migration =
        wait_for_migration_in(&dsock, &["completed", "failed"], Duration::from_secs(120));
    assert_eq!(migration["status"], "completed", "{migration}");
    // Putting the state in may touch a page or two (a vCPU's kvmclock page), no more.
    assert!(
        migration["postcopy_requests"].as_u64().unwrap() <= 4,
        "{migration}"
    );
    if extra.contains(&"post") {
        let streamed =
            migration["normal_pages"].as_u64().unwrap() + migration["zero_pages"].as_u64().unwrap();
        assert!(streamed >= BIG.pages, "{migration}");
    }
    api(&dsock, "PUT", "/vm/resume", None);
    let source = source.child.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    let stdout = check_arrived(destination.child, BIG);
    // Its last words are the post-copy's figures, as GET /migration gave them.
    let role = stdout
        .rfind("\"role\": \"destination\"")
        .expect("the post-copy's figures");
    let at = stdout[..role].rfind('{').unwrap();
    let last: serde_json::Value = serde_json::Deserializer::from_str(&stdout[at..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["normal_pages"], migration["normal_pages"], "{last}");
}

#[test]
fn a_post_copy_arrival_dropped_while_paused_stops_its_page_stream() {
    require_kvm!();
    use faultline::migration::incoming::Phase;
    // In this process: the destination as a library user has it.
    let tmp = TempDir::new("migrate-arrival-dropped");
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, MID);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy =
        common::proxy::CuttingProxy::start(&listener.local_addr().unwrap().to_string(), 2 << 20);
    let send = {
        let (sock, to) = (sock.clone(), proxy.addr.clone());
        std::thread::spawn(move || migrate_send_with(&sock, &to, &["--mode", "post"]))
    };
    let arrived = faultline::migration::receive::receive(
        &listener,
        None,
        vmm::VmConfig::default(),
        u64::MAX,
        true,
    )
    .unwrap();
    // Cut in the page stream, the migration waits for a recovery nobody will ask for.
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived.incoming.phase() != Phase::PostcopyPaused {
        assert!(Instant::now() < deadline, "{}", arrived.incoming.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(proxy.has_cut());
    assert!(!send.join().unwrap().status.success());
    // Dropped on a thread of its own: a drop that waits for the stream without stopping it
    // fails the test rather than hangs it.
    let (dropped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(arrived);
        let _ = dropped.send(());
    });
    let ended = done.recv_timeout(Duration::from_secs(60)).is_ok();
    // A thread joined may be listed a moment longer (the kernel wakes its joiner first).
    let streams = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "postcopy-stream")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while streams() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut source = source;
    let _ = source.kill();
    let _ = source.wait();
    assert!(
        ended,
        "dropping the arrival waited for its page stream for a minute"
    );
    assert_eq!(streams(), 0, "the page stream runs on");
}

#[test]
fn a_post_copy_that_fails_after_the_state_left_keeps_the_source_paused() {
    require_kvm!();
    let tmp = TempDir::new("migrate-post-cut");
    let sock = tmp.join("src.sock");
    let source = spawn_source(&sock, 1);
    // Takes the page-request connection and the state, then goes away without a word: it may
    // be running the VM, so the source must not.
    let (addr, fake) = fake_peer_with_listener(|stream, listener| {
        let _connections = post_copy_state(stream, listener);
    });
    let out = migrate_send_mode(&sock, &addr, "post");
    fake.join().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("did not say whether it runs the VM") && err.contains("stays paused here"),
        "{err}"
    );
    // It may run at the destination now: it must not run here too.
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused", "{info}");
    // Nor may it go without a word: the destination may need pages only it has.
    let (status, refusal) = api(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(status, 409, "{refusal}");
    assert!(
        refusal["error"]
            .as_str()
            .is_some_and(|e| e.contains("a post-copy is paused here")),
        "{refusal}"
    );
    let out = faultline(&["vm", "shutdown", "--api-sock", sock.to_str().unwrap()]);
    assert!(!out.status.success());
    let out = faultline(&[
        "vm",
        "shutdown",
        "--force",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    source.wait_with_output().unwrap();
}

#[test]
fn a_lazily_restored_vm_moves_in_post_copy_and_finishes_right() {
    require_kvm!();
    let tmp = TempDir::new("migrate-lazy");
    let sock = tmp.join("src.sock");
    // A snapshot of the guest held at pass 100, taken through the API.
    let source = spawn_mix(&sock, Mix { hold: 100, ..SMALL });
    wait_until_held(&sock, 100, 1);
    let snap = tmp.join("snap");
    let out = faultline(&[
        "snapshot",
        "create",
        "--api-sock",
        sock.to_str().unwrap(),
        "--dir",
        snap.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    api(&sock, "PUT", "/vm/shutdown", None);
    source.wait_with_output().unwrap();

    // Restored lazily (its RAM behind the pager, still in the snapshot) and paused, then
    // moved: every page the source sends comes from the snapshot through its pager.
    let restored_sock = tmp.join("restored.sock");
    let restored = spawn(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--memory",
        "lazy",
        "--api-sock",
        restored_sock.to_str().unwrap(),
        "--paused",
        "--json",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while faultline::api::http::call(
        &restored_sock,
        "GET",
        "/vm",
        None,
        Some(Duration::from_secs(5)),
    )
    .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the restored VM's API never came up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (destination, addr) = spawn_destination();
    let out = migrate_send_mode(&restored_sock, &addr, "post");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restored = restored.wait_with_output().unwrap();
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    check_arrived(destination, SMALL);
}

#[test]
fn pre_copy_of_a_guest_whose_passes_outlast_the_rounds() {
    require_kvm!();
    // 64 MiB rewritten pass after pass, a pass taking longer than a copy round: the pages a
    // round leaves behind change while it runs, up to the very pause.
    migrated_mid_run_finishes_with_the_uninterrupted_result(BIG);
}

#[test]
fn a_destination_that_gives_up_after_the_switch_over_leaves_the_source_running() {
    require_kvm!();
    use migrate::{write_message, Message};
    // Speaks the protocol, takes everything, then refuses at the very end.
    let (addr, fake) = fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        assert!(take_until_done(&mut reader, &mut writer));
        write_message(&mut writer, &Message::Abort("the disk is full".into())).unwrap();
    });
    a_failed_migration_leaves_the_source_running(
        "migrate-gives-up",
        &addr,
        "the destination could not take the VM: the disk is full",
    );
    fake.join().unwrap();
}

#[test]
fn a_failed_migration_gives_the_dirty_log_back_so_the_next_diff_holds_every_page() {
    require_kvm!();
    use migrate::{write_message, Message};
    // A VM logging dirty pages for diff snapshots: a full snapshot, then every page of its
    // range written again, then a pre-copy that takes the dirty log (its first pass, its
    // rounds and its switch-over each do) and is refused at the very end, the VM paused and
    // its state sent. The next diff must still hold every page written since the full
    // snapshot: the migration gave back all it took.
    let mix = Mix {
        run_args: &["--track-dirty"],
        ..SMALL
    };
    let tmp = TempDir::new("migrate-failed-dirty-log");
    let sock = tmp.join("src.sock");
    // Held at pass 2, every page written.
    let source = spawn_mix_held(&sock, mix);
    let snapshot = |name: &str, kind: &str| {
        let (status, summary) = api(
            &sock,
            "PUT",
            "/snapshot/create",
            Some(serde_json::json!({ "dir": tmp.join(name), "type": kind })),
        );
        assert_eq!(status, 200, "{summary}");
        summary
    };
    snapshot("full", "full");
    // Passes 2 and 3 write every page again; the guest then waits.
    set_hold(&sock, Some(4));
    wait_until_held(&sock, 4, mix.cpus);
    let (addr, fake) = fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        assert!(take_until_done(&mut reader, &mut writer));
        write_message(&mut writer, &Message::Abort("the disk is full".into())).unwrap();
    });
    let out = migrate_send_with(&sock, &addr, &["--mode", "pre"]);
    fake.join().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the disk is full"), "{err}");
    // The guest still waits: nothing was written since the migration took the log.
    let diff = snapshot("diff", "diff");
    let included = diff["memory"]["pages_included"].as_u64().unwrap();
    assert!(
        included >= mix.pages,
        "the diff holds {included} pages, not the {} the guest wrote since the full one: {diff}",
        mix.pages
    );
    set_hold(&sock, None);
    finishes_right_as(source, mix);
}

/// Plays a pre-copy destination up to the source's done, answering its sync: whether a
/// switch-over came.
fn take_until_done(
    reader: &mut BufReader<std::net::TcpStream>,
    writer: &mut std::net::TcpStream,
) -> bool {
    use migrate::{read_message, write_message, Message};
    let mut switched = false;
    loop {
        match read_message(reader).unwrap() {
            Message::Sync => write_message(writer, &Message::Sync).unwrap(),
            Message::SwitchOver { .. } => switched = true,
            Message::Done => return switched,
            _ => {}
        }
    }
}

/// A fake destination that takes everything, says it built the VM, takes the go-ahead, and
/// vanishes without the last word.
fn vanishing_after_the_go_ahead() -> (String, std::thread::JoinHandle<()>) {
    use migrate::{read_message, write_message, Message};
    fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        take_until_done(&mut reader, &mut writer);
        write_message(&mut writer, &Message::Built).unwrap();
        assert_eq!(read_message(&mut reader).unwrap(), Message::Done);
    })
}

/// The small `mix` run `source` ends well, with the result of an uninterrupted run.
fn finishes_right(source: Child) {
    finishes_right_as(source, SMALL);
}

/// The one-vCPU `mix` run `source` of `mix` ends well, with the result of an uninterrupted
/// run.
fn finishes_right_as(source: Child, mix: Mix) {
    let source = source.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    let report = json_report(&text(&source.stdout));
    assert_eq!(report["vcpus"][0]["reports"][0], mix.passes);
    assert_eq!(
        report["vcpus"][0]["reports"][1],
        guests::mix_checksum(BOOT_AREA_END, mix.pages, mix.passes)
    );
}

/// A migration to `to` fails with a message saying `says`, and the source VM runs on and
/// finishes with the right result.
fn a_failed_migration_leaves_the_source_running(name: &str, to: &str, says: &str) {
    a_failed_migration_leaves_the_source_running_with(name, to, &[], says);
}

fn a_failed_migration_leaves_the_source_running_with(
    name: &str,
    to: &str,
    extra: &[&str],
    says: &str,
) {
    let tmp = TempDir::new(name);
    let sock = tmp.join("src.sock");
    // Every page written: the first pass is 128 pages of data, whatever the timing.
    let source = spawn_mix_written(&sock, SMALL);
    a_failed_migration_of_leaves_it_running(&sock, source, to, extra, says);
}

/// A migration of the small `mix` run `source` (serving the API on `sock`) to `to` fails
/// with a message saying `says`, and the VM runs on and finishes with the right result.
fn a_failed_migration_of_leaves_it_running(
    sock: &Path,
    source: Child,
    to: &str,
    extra: &[&str],
    says: &str,
) {
    a_failed_migration_of_leaves_it_running_as(sock, (source, SMALL), to, extra, says);
}

/// [`a_failed_migration_of_leaves_it_running`] for a run of `mix`.
fn a_failed_migration_of_leaves_it_running_as(
    sock: &Path,
    (source, mix): (Child, Mix),
    to: &str,
    extra: &[&str],
    says: &str,
) {
    let out = migrate_send_with(sock, to, extra);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(says) && err.contains("the VM runs on here"),
        "{err}"
    );
    let (status, info) = api(sock, "GET", "/vm", None);
    assert_eq!((status, info["state"].as_str()), (200, Some("running")));
    let (_, migration) = api(sock, "GET", "/migration", None);
    assert_eq!(migration["status"], "failed");
    // Let it finish: release the hold point.
    set_hold(sock, None);
    finishes_right_as(source, mix);
}

#[test]
fn a_peer_that_is_not_faultline_is_refused_and_the_vm_runs_on() {
    require_kvm!();
    let (addr, impostor) = fake_peer(|mut stream| {
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot a VMM at all");
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    a_failed_migration_leaves_the_source_running(
        "migrate-impostor",
        &addr,
        "not a faultline migration stream",
    );
    impostor.join().unwrap();
}

#[test]
fn a_destination_sent_something_else_than_a_hello_names_it_and_ends() {
    require_kvm!();
    let destination = Destination::spawn(&[]);
    let mut peer = std::net::TcpStream::connect(&destination.addr).unwrap();
    peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (status, err) = ended_within_a_minute(destination, "its refusal", || {});
    assert!(!status.success());
    assert!(
        err.contains("the source's hello was refused")
            && err.contains("not a faultline migration stream"),
        "{err}"
    );
}

#[test]
fn a_destination_that_is_not_there_is_an_error_and_the_vm_runs_on() {
    require_kvm!();
    // A port that was just free: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    a_failed_migration_leaves_the_source_running(
        "migrate-nobody",
        &addr,
        "cannot connect to the destination",
    );
}

#[test]
fn tls_with_mutual_authentication_moves_the_guest_and_refuses_strangers() {
    require_kvm!();
    let tmp = TempDir::new("migrate-tls");
    make_pki(tmp.path(), "ca", &["source", "destination"]);
    make_pki(tmp.path(), "other-ca", &["stranger"]);
    // The stranger trusts the right CA but holds a certificate from the other: only the peer's
    // check of its certificate can refuse it, on either side.
    std::fs::copy(tmp.join("ca.pem"), tmp.join("stranger").join("ca.pem")).unwrap();
    let tls = |side: &str| tmp.join(side).to_str().unwrap().to_string();

    // Both from the CA: the guest moves and finishes right.
    let sock = tmp.join("src.sock");
    let destination = Destination::spawn(&["--tls-dir", &tls("destination"), "--json"]);
    assert!(
        destination.line.contains("TLS, mutually authenticated"),
        "{}",
        destination.line
    );
    let source = spawn_mix(&sock, SMALL);
    let out = migrate_send_with(&sock, &destination.addr, &["--tls-dir", &tls("source")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(source.wait_with_output().unwrap().status.success());
    check_arrived(destination.child, SMALL);

    // Post-copy too: two TLS connections, page requests and answers both ways at once.
    let sock = tmp.join("src-post.sock");
    let destination = Destination::spawn(&["--tls-dir", &tls("destination"), "--json"]);
    let source = spawn_mix(&sock, SMALL);
    let out = migrate_send_with(
        &sock,
        &destination.addr,
        &["--tls-dir", &tls("source"), "--mode", "post"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(source.wait_with_output().unwrap().status.success());
    check_arrived(destination.child, SMALL);

    // A source whose certificate comes from another CA: the destination refuses it, and the
    // source VM runs on.
    let destination = Destination::spawn(&["--tls-dir", &tls("destination")]);
    let stranger = tls("stranger");
    a_failed_migration_leaves_the_source_running_with(
        "migrate-tls-bad-source",
        &destination.addr,
        &["--tls-dir", &stranger],
        "TLS handshake failed",
    );
    let (refused, said) = ended_within_a_minute(destination, "its refusal", || {});
    assert!(!refused.success());
    assert!(said.contains("TLS handshake failed"), "{said}");

    // A destination whose certificate comes from another CA: the source refuses it.
    let mut destination = Destination::spawn(&["--tls-dir", &stranger]);
    let source_tls = tls("source");
    a_failed_migration_leaves_the_source_running_with(
        "migrate-tls-bad-destination",
        &destination.addr,
        &["--tls-dir", &source_tls],
        "TLS handshake failed",
    );
    let _ = destination.child.kill();
    let _ = destination.child.wait();

    // A source without TLS to a destination with it: told so, and the VM runs on.
    let mut destination = Destination::spawn(&["--tls-dir", &tls("destination")]);
    a_failed_migration_leaves_the_source_running(
        "migrate-tls-plain-source",
        &destination.addr,
        "the destination speaks TLS: give this side --tls-dir too",
    );
    let _ = destination.child.kill();
    let _ = destination.child.wait();
}

#[test]
fn a_tls_alert_whose_first_byte_comes_alone_is_still_told_for_what_it_is() {
    require_kvm!();
    // A destination that speaks TLS, as a plain source sees it: its alert record (7 bytes)
    // comes in two parts, the first byte alone.
    let (addr, fake) = fake_peer(|mut stream| {
        stream.set_nodelay(true).unwrap();
        let mut hello = BufReader::new(stream.try_clone().unwrap());
        let _ = migrate::read_message(&mut hello);
        stream.write_all(&[0x15]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let _ = stream.write_all(&[0x03, 0x03, 0x00, 0x02, 0x02, 0x46]);
    });
    a_failed_migration_leaves_the_source_running(
        "migrate-tls-alert-split",
        &addr,
        "the destination speaks TLS: give this side --tls-dir too",
    );
    fake.join().unwrap();
}

#[test]
fn a_tls_handshake_that_trickles_in_is_given_up_on() {
    require_kvm!();
    let tmp = TempDir::new("migrate-tls-trickle");
    make_pki(tmp.path(), "ca", &["destination"]);
    let tls_dir = tmp.join("destination");
    let destination =
        Destination::spawn_with(&["--tls-dir", tls_dir.to_str().unwrap()], PEER_TIMEOUT_2S);
    // A handshake record's header, then its body a byte every 100 ms (for a minute at most):
    // every read finds something, and the handshake never ends.
    let mut client = std::net::TcpStream::connect(&destination.addr).unwrap();
    let _ = client.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
    let (status, err) = ended_within_a_minute(destination, "a handshake trickling in", || {
        let _ = client.write_all(&[0x01]);
    });
    assert!(!status.success());
    assert!(
        err.contains("the TLS handshake did not finish within 2 s"),
        "{err}"
    );
}

#[test]
fn a_post_copy_destination_that_cannot_build_the_vm_leaves_the_source_running() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // Takes everything up to the state and the stale list, then says it cannot build the VM:
    // nothing runs it there, so the source must run it on.
    let (addr, fake) = fake_peer_with_listener(|stream, listener| {
        let (mut reader, mut writer, _requests) = post_copy_state(stream, listener);
        assert!(matches!(
            read_message(&mut reader).unwrap(),
            Message::Stale { .. }
        ));
        write_message(&mut writer, &Message::Abort("no memory for the VM".into())).unwrap();
    });
    a_failed_migration_leaves_the_source_running_with(
        "migrate-post-unbuilt",
        &addr,
        &["--mode", "post"],
        "the destination could not take the VM: no memory for the VM",
    );
    fake.join().unwrap();
}

#[test]
fn a_hybrid_destination_that_refuses_the_pages_written_since_the_switch_leaves_the_source_running()
{
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    let tmp = TempDir::new("migrate-hybrid-refused");
    let sock = tmp.join("src.sock");
    // Held after two passes: every page written, and nothing more until it is let go.
    let source = spawn_mix_held(&sock, SMALL);
    // Takes the first pass; before it answers the sync after it, lets the guest rewrite its
    // pages (so that the rounds cannot converge) and tells the source to go post-copy; takes
    // the switch-over, the first stale list and the page-request connection; then gives up
    // at the second stale list (the pages written since the first), which comes while the
    // VM still runs at the source.
    let told = sock.clone();
    let (addr, fake) = fake_peer_with_listener(move |stream, listener| {
        let (mut reader, mut writer) = greeted(stream);
        loop {
            match read_message(&mut reader).unwrap() {
                Message::Pages { .. } | Message::ZeroPages { .. } => {}
                Message::Sync => break,
                other => panic!("{} in the first pass", other.name()),
            }
        }
        set_hold(&told, Some(3));
        wait_until_held(&told, 3, 1);
        let (status, _) = api(&told, "PUT", "/migration/switchover", None);
        assert_eq!(status, 204);
        write_message(&mut writer, &Message::Sync).unwrap();
        let _requests = switched_to_post_copy(&mut reader, listener);
        assert!(matches!(
            read_message(&mut reader).unwrap(),
            Message::Stale { .. }
        ));
        write_message(
            &mut writer,
            &Message::Abort("cannot drop those pages".into()),
        )
        .unwrap();
        // Held open until the source has read it.
        let _ = reader.read(&mut [0u8; 1]);
    });
    a_failed_migration_of_leaves_it_running(
        &sock,
        source,
        &addr,
        &["--mode", "hybrid", "--downtime-ms", "0"],
        "the destination gave up the migration: cannot drop those pages",
    );
    fake.join().unwrap();
}

#[test]
fn a_post_copy_destination_gets_pages_it_asks_for_before_it_says_built() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // Putting the state into the VM may touch guest pages (KVM maps a vCPU's kvmclock page
    // when its MSR is set): a request made before `Built` must be answered, or both sides
    // wait on each other. This destination asks for the first page of the guest's range
    // before it says anything, gets it, then gives up (so the source runs the VM on).
    let (addr, fake) = fake_peer_with_listener(|stream, listener| {
        let (mut reader, mut writer, (mut requests_reader, mut requests_writer)) =
            post_copy_state(stream, listener);
        assert!(matches!(
            read_message(&mut reader).unwrap(),
            Message::Stale { .. }
        ));
        let gpa = BOOT_AREA_END;
        // Bounded: a source that does not answer fails the test instead of hanging it.
        requests_reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write_message(
            &mut requests_writer,
            &Message::PageRequest { gpa, count: 1 },
        )
        .unwrap();
        match read_message(&mut requests_reader).unwrap() {
            Message::Pages { gpa: got, data } => {
                assert_eq!((got, data.len()), (gpa, 4096));
                // The mix guest's first pass has written the page: it is not zero.
                assert!(data.iter().any(|&b| b != 0), "the page's contents");
            }
            other => panic!("the request was answered with {}", other.name()),
        }
        write_message(&mut writer, &Message::Abort("changed its mind".into())).unwrap();
    });
    a_failed_migration_leaves_the_source_running_with(
        "migrate-post-early-request",
        &addr,
        &["--mode", "post"],
        "the destination could not take the VM: changed its mind",
    );
    fake.join().unwrap();
}

#[test]
fn a_pre_copy_source_pauses_only_once_the_destination_has_taken_the_rounds() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // Megabytes of a round may still wait in the sockets' buffers when the source has sent
    // it: each round ends with a sync, and the source goes on (and pauses) only once the
    // destination has taken it, so that they are not taken in the downtime.
    let (addr, fake) = fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        loop {
            match read_message(&mut reader).unwrap() {
                Message::Pages { .. } | Message::ZeroPages { .. } | Message::Round { .. } => {}
                Message::Sync => break,
                other => panic!("{} came before the sync", other.name()),
            }
        }
        // Until the sync is answered the source sends nothing more: it has not paused.
        assert!(reader.buffer().is_empty(), "more came right after the sync");
        let quiet = Duration::from_millis(500);
        reader.get_ref().set_read_timeout(Some(quiet)).unwrap();
        match reader.read(&mut [0u8; 1]) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("the source went on before its sync was answered: {other:?}"),
        }
        reader.get_ref().set_read_timeout(None).unwrap();
        write_message(&mut writer, &Message::Sync).unwrap();
        // Perhaps more rounds (this side was slow to answer), each ending with a sync; then
        // the switch-over: the last pages, the state, done.
        loop {
            match read_message(&mut reader).unwrap() {
                Message::Pages { .. } | Message::ZeroPages { .. } | Message::Round { .. } => {}
                Message::Sync => write_message(&mut writer, &Message::Sync).unwrap(),
                Message::SwitchOver {
                    post_copy: false, ..
                } => break,
                other => panic!("{} before the switch-over", other.name()),
            }
        }
        loop {
            match read_message(&mut reader).unwrap() {
                Message::Pages { .. } | Message::ZeroPages { .. } | Message::State(_) => {}
                Message::Done => break,
                other => panic!("{} in the switch-over", other.name()),
            }
        }
        write_message(&mut writer, &Message::Abort("changed its mind".into())).unwrap();
    });
    a_failed_migration_leaves_the_source_running_with(
        "migrate-pre-sync",
        &addr,
        &["--mode", "pre"],
        "the destination could not take the VM: changed its mind",
    );
    fake.join().unwrap();
}

#[test]
fn a_post_copy_destination_that_drops_its_request_connection_then_gives_up_is_heard() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // The page-request connection goes first; the source stops answering on it and stops
    // its own writing on the main one, but it must still read the destination's refusal
    // there (and run the VM on), not take the closed request connection for a destination
    // that may run the VM.
    let (addr, fake) = fake_peer_with_listener(|stream, listener| {
        let (mut reader, mut writer, requests) = post_copy_state(stream, listener);
        assert!(matches!(
            read_message(&mut reader).unwrap(),
            Message::Stale { .. }
        ));
        drop(requests);
        // The source, its request connection gone, stops writing on the main one too: the
        // refusal goes after that (bounded: a source that never stops fails the test).
        reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after the state", rest.len());
        write_message(&mut writer, &Message::Abort("changed its mind".into())).unwrap();
        // Held open until the source has read it.
        let _ = reader.read(&mut [0u8; 1]);
    });
    a_failed_migration_leaves_the_source_running_with(
        "migrate-post-requests-gone",
        &addr,
        &["--mode", "post"],
        "the destination could not take the VM: changed its mind",
    );
    fake.join().unwrap();
}

/// How many runs a cut test makes: 8, or FAULTLINE_CUT_RUNS (more, to soak).
fn cut_runs() -> usize {
    std::env::var("FAULTLINE_CUT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// `runs` cut points (bytes) in `[low, high)`, from FAULTLINE_CUT_SEED or the clock; the seed
/// is printed, so that a failing run can be replayed.
fn cut_points(runs: usize, low: u64, high: u64) -> Vec<u64> {
    let seed = std::env::var("FAULTLINE_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("cut points from seed {seed} (FAULTLINE_CUT_SEED={seed} replays them)");
    let mut state = seed | 1;
    (0..runs)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            low + state % (high - low)
        })
        .collect()
}

/// Polls `GET /migration` on `sock` until its status is `status`; the answer.
fn wait_for_migration_status(sock: &Path, status: &str) -> serde_json::Value {
    wait_for_migration_in(sock, &[status], Duration::from_secs(60))
}

/// Polls `GET /migration` on `sock` until its status is one of `statuses`, for at most
/// `limit`; the answer.
fn wait_for_migration_in(sock: &Path, statuses: &[&str], limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        // The API may not serve yet (a destination starts it once the VM is built).
        let answer = faultline::api::http::call(
            sock,
            "GET",
            "/migration",
            None,
            Some(Duration::from_secs(5)),
        )
        .ok()
        .and_then(|(_, answer)| answer)
        .unwrap_or_default();
        if statuses.iter().any(|status| answer["status"] == *status) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never became {statuses:?}: {answer}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (30 s at most) until `GET /migration` on `sock` gives `field` as `value`: its status.
fn wait_for_migration_field(sock: &Path, field: &str, value: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = api(sock, "GET", "/migration", None);
        if status[field] == value {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{field} is not {value}: {status}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `faultline migrate recover` on the destination's API: where it listens.
fn recover(destination_sock: &Path) -> String {
    recover_on(destination_sock, "127.0.0.1:0")
}

/// `faultline migrate recover --listen listen` on the destination's API: where it listens.
fn recover_on(destination_sock: &Path, listen: &str) -> String {
    let out = faultline(&[
        "migrate",
        "recover",
        "--api-sock",
        destination_sock.to_str().unwrap(),
        "--listen",
        listen,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Sends in post-copy through a proxy that cuts the network at `cut` bytes: the source says
/// the migration is paused, keeps the VM paused (and refuses to run it), and the destination
/// pauses too.
fn post_copy_cut(source_sock: &Path, destination_sock: &Path, to: &str, extra: &[&str], cut: u64) {
    let proxy = common::proxy::CuttingProxy::start(to, cut);
    let out = migrate_send_with(source_sock, &proxy.addr, extra);
    assert!(
        proxy.has_cut(),
        "the migration ended before the cut at {cut} bytes: {}{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    assert!(!out.status.success(), "a cut migration succeeded");
    let err = text(&out.stderr);
    assert!(
        err.contains("post-copy is paused") && err.contains("runs on the destination"),
        "{err}"
    );
    assert!(
        err.contains("the connection to the destination was lost"),
        "the cause is not named: {err}"
    );
    let (_, info) = api(source_sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused", "{info}");
    let (status, refusal) = api(source_sock, "PUT", "/vm/resume", None);
    assert_eq!(
        status, 409,
        "the source must not run a VM its destination runs: {refusal}"
    );
    // Nor snapshot it: restored, the snapshot would be a second copy of the VM.
    snapshot_refused(source_sock, "stale-snapshot", false);
    let out = faultline(&[
        "migrate",
        "status",
        "--api-sock",
        source_sock.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let migration: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(migration["status"], "postcopy-paused", "{migration}");
    let paused = wait_for_migration_status(destination_sock, "postcopy-paused");
    assert!(paused["breaks"].as_u64().unwrap() >= 1, "{paused}");
    // Pages still on the source are not in its memory: no snapshot of it, regular or live.
    for live in [false, true] {
        let refusal = snapshot_refused(destination_sock, "early-snapshot", live);
        assert!(refusal.contains("postcopy-paused"), "{refusal}");
    }
}

/// A snapshot (`live` or not) into `name`, beside `sock`, of the VM behind `sock`: refused
/// with 409, nothing written. Returns the refusal's reason.
fn snapshot_refused(sock: &Path, name: &str, live: bool) -> String {
    let dir = sock.with_file_name(name);
    let (status, refusal) = api(
        sock,
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({"dir": dir, "live": live})),
    );
    assert_eq!(status, 409, "live {live}: {refusal}");
    assert!(!dir.exists());
    refusal["error"].as_str().unwrap().to_string()
}

/// A `mix` run held after two passes: every page of its range written, and nothing more
/// until the hold point moves.
fn spawn_mix_held(sock: &Path, mix: Mix) -> Child {
    let child = spawn_mix(sock, Mix { hold: 2, ..mix });
    wait_until_held(sock, 2, mix.cpus);
    child
}

/// A `mix` run that has written every page of its range (it was held at pass 2, then let go
/// on to `mix.hold`): its memory is all data, whenever the test moves it.
fn spawn_mix_written(sock: &Path, mix: Mix) -> Child {
    let child = spawn_mix_held(sock, mix);
    set_hold(sock, Some(mix.hold));
    child
}

/// 32 MiB of pages that every pass rewrites: a post-copy stream long enough to cut.
const MID: Mix = Mix {
    guest: "mix",
    cpus: 1,
    pages: 8192,
    passes: 40,
    hold: 35,
    run_args: &[],
    env: &[],
};

#[test]
fn a_post_copy_cut_by_the_network_is_recovered_and_finishes_right() {
    require_kvm!();
    // The first cut of each run comes after the state (a few KiB): in the page stream.
    let cuts = cut_points(cut_runs(), 1 << 20, 8 << 20);
    for (run, &cut) in cuts.iter().enumerate() {
        let tmp = TempDir::new(&format!("migrate-recover-{run}"));
        let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
        let destination = Destination::spawn(&["--json", "--api-sock", dsock.to_str().unwrap()]);
        let source = spawn_mix_written(&sock, MID);
        post_copy_cut(&sock, &dsock, &destination.addr, &["--mode", "post"], cut);
        if run == 0 {
            // An address that is none is refused, naming it, and the migration waits on.
            let (status, refusal) = api(
                &dsock,
                "PUT",
                "/migration/recover",
                Some(serde_json::json!({"listen": "no-port-here"})),
            );
            assert_eq!(status, 400, "{refusal}");
            let error = refusal["error"].as_str().unwrap_or_default();
            assert!(error.contains("cannot listen on no-port-here"), "{refusal}");
            let (_, paused) = api(&dsock, "GET", "/migration", None);
            assert_eq!(paused["status"], "postcopy-paused", "{paused}");
            assert_eq!(paused["listening"], serde_json::Value::Null, "{paused}");
        }

        let mut at = recover(&dsock);
        if run == 1 {
            // Asked again (say, the first address was wrong) once the destination waits on the
            // first listener: the newer listener replaces it.
            let first = at;
            wait_for_migration_field(&dsock, "awaiting_source_on", &first);
            at = recover(&dsock);
            assert_ne!(first, at);
            // The attempt on the first listener gives up, saying why, and waits on the new.
            let status = wait_for_migration_field(&dsock, "awaiting_source_on", &at);
            let why = status["why"].as_str().unwrap_or_default();
            assert!(
                why.contains("a later `migrate recover` replaced this listener"),
                "{status}"
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(&first).is_ok() {
                assert!(Instant::now() < deadline, "the first listener stays open");
                std::thread::sleep(Duration::from_millis(10));
            }
            // A resume sent there finds nobody: it fails, and is not counted a recovery.
            let out = migrate_send_with(&sock, &first, &["--resume"]);
            assert!(!out.status.success());
            // Asked again where it listens now: it goes on listening there.
            assert_eq!(recover_on(&dsock, &at), at);
        }
        if run == 0 {
            // The recovery is cut too, early in what it resends: recovered again.
            let again = cut_points(1, 1 << 10, 1 << 20)[0];
            post_copy_cut(&sock, &dsock, &at, &["--resume"], again);
            at = recover(&dsock);
        }
        let out = migrate_send_with(&sock, &at, &["--resume"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let report = json_report(&text(&out.stdout));
        assert_eq!(report["status"], "completed", "{report}");
        assert_eq!(report["postcopy_recoveries"], if run == 0 { 2 } else { 1 });
        let source = source.wait_with_output().unwrap();
        assert!(source.status.success(), "{}", text(&source.stderr));
        assert!(text(&source.stderr).contains("migrated to another faultline"));
        check_arrived(destination.child, MID);
    }
}

#[test]
fn a_recovery_whose_page_request_connection_names_another_migration_is_refused() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    let tmp = TempDir::new("migrate-recover-requests");
    let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    let destination = Destination::spawn(&["--json", "--api-sock", dsock.to_str().unwrap()]);
    let source = spawn_mix_written(&sock, MID);
    // The migration's name, read on its way, and a cut in the page stream.
    let named = std::sync::Arc::new(std::sync::Mutex::new(None));
    let gate = MessageGate::start(&destination.addr, {
        let named = std::sync::Arc::clone(&named);
        move |message: &Message| {
            if let Message::SwitchOver { migration, .. } = message {
                *named.lock().unwrap() = Some(*migration);
            }
        }
    });
    post_copy_cut(&sock, &dsock, &gate.addr, &["--mode", "post"], 4 << 20);
    let migration = named.lock().unwrap().expect("no switch-over went by");

    // A peer that knows the name resumes, but its page-request connection names another
    // migration: refused, saying why, and the attempt fails.
    let at = recover(&dsock);
    let mem = MID.ram_mib() << 20;
    let (mut reader, mut writer) = greeting_vm(&at, mem);
    write_message(&mut writer, &Message::Resume { migration }).unwrap();
    assert!(matches!(
        read_message(&mut reader),
        Ok(Message::Received { .. })
    ));
    let other = migration ^ 1;
    assert_eq!(
        page_requests_refused(&at, mem, other),
        format!(
            "the page-request connection names migration {other:016x}; the one here is \
             {migration:016x}"
        )
    );
    drop((reader, writer));
    let failed = wait_for_migration_in(&dsock, &["postcopy-paused"], Duration::from_secs(30));
    // The source itself then resumes on the same listener, and the migration completes.
    let out = migrate_send_with(&sock, &at, &["--resume"]);
    assert!(out.status.success(), "{failed}: {}", text(&out.stderr));
    let report = json_report(&text(&out.stdout));
    assert_eq!(report["status"], "completed", "{report}");
    let source = source.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    check_arrived(destination.child, MID);
}

#[test]
fn a_post_copy_stream_damaged_on_the_way_pauses_and_is_recovered() {
    // Nothing damaged went in: the destination waits for the source, as after a cut.
    damaged_post_copy_is_recovered("migrate-damaged", false, |why| {
        why.contains("damaged") || why.contains("magic") || why.contains("message")
    });
}

#[test]
fn a_post_copy_over_tls_damaged_on_the_way_pauses_says_why_and_is_recovered() {
    // The session's integrity check refuses the damaged record, and the destination says
    // so: the TLS session, not a peer that closed.
    damaged_post_copy_is_recovered("migrate-tls-damaged", true, |why| {
        why.contains("the TLS session failed")
    });
}

/// A post-copy (over TLS with `tls`) whose page stream has a byte damaged on the way: the
/// source pauses, the destination pauses saying why (`why_says` holds of it), and the
/// migration is recovered and finishes right.
fn damaged_post_copy_is_recovered(name: &str, tls: bool, why_says: impl Fn(&str) -> bool) {
    require_kvm!();
    let tmp = TempDir::new(name);
    let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    if tls {
        make_pki(tmp.path(), "ca", &["source", "destination"]);
    }
    let dir = |side: &str| tmp.join(side).to_str().unwrap().to_string();
    let (source_dir, destination_dir) = (dir("source"), dir("destination"));
    fn tls_of(tls: bool, dir: &str) -> Vec<&str> {
        if tls {
            vec!["--tls-dir", dir]
        } else {
            Vec::new()
        }
    }
    let (source_tls, destination_tls) = (tls_of(tls, &source_dir), tls_of(tls, &destination_dir));
    let destination = Destination::spawn(
        &[
            &["--json", "--api-sock", dsock.to_str().unwrap()][..],
            &destination_tls,
        ]
        .concat(),
    );
    let source = spawn_mix_written(&sock, MID);
    // A byte in the page stream (after the state's few KiB), nearly always in a page.
    let at = cut_points(1, 1 << 20, 8 << 20)[0];
    let proxy = common::proxy::CuttingProxy::start_damaging(&destination.addr, at);
    let out = migrate_send_with(
        &sock,
        &proxy.addr,
        &[&["--mode", "post"][..], &source_tls].concat(),
    );
    assert!(proxy.has_cut(), "the migration ended before byte {at}");
    assert!(!out.status.success(), "a damaged migration succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("post-copy is paused"), "{err}");
    let paused = wait_for_migration_status(&dsock, "postcopy-paused");
    assert!(paused["why"].as_str().is_some_and(&why_says), "{paused}");
    let at = recover(&dsock);
    let out = migrate_send_with(&sock, &at, &[&["--resume"][..], &source_tls].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let source = source.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    check_arrived(destination.child, MID);
}

#[test]
fn a_pre_copy_cut_by_the_network_leaves_the_source_running_right() {
    require_kvm!();
    // Within the first pass (the small guest's is some 512 KiB).
    for (run, cut) in cut_points(cut_runs(), 4 << 10, 400 << 10)
        .into_iter()
        .enumerate()
    {
        let destination = Destination::spawn(&["--json"]);
        let proxy = common::proxy::CuttingProxy::start(&destination.addr, cut);
        a_failed_migration_leaves_the_source_running_with(
            &format!("migrate-pre-cut-{run}"),
            &proxy.addr,
            &[],
            "the connection to the destination was lost",
        );
        assert!(proxy.has_cut());
        let refused = destination.child.wait_with_output().unwrap();
        assert!(
            !refused.status.success(),
            "the destination of a cut migration succeeded"
        );
    }
}

/// Waits until `destination` ends, doing `meanwhile` every 100 ms: its exit status and what it
/// said. After a minute it is killed and the test fails (a destination that waits for ever
/// fails the test rather than hangs it).
fn ended_within_a_minute(
    mut destination: Destination,
    waiting_for: &str,
    meanwhile: impl FnMut(),
) -> (std::process::ExitStatus, String) {
    let status = common::exit_within(
        &mut destination.child,
        Duration::from_secs(60),
        Duration::from_millis(100),
        meanwhile,
        || format!("the destination still waits for {waiting_for} after a minute"),
    );
    (status, destination.stderr.join().unwrap())
}

/// Opens a page-request connection to `at` that names `migration`, playing a source of a
/// one-vCPU VM with `mem` bytes of RAM: the reason the destination refuses it with (one it
/// takes fails the test, after 20 s at most, instead of hanging it).
fn page_requests_refused(at: &str, mem: u64, migration: u64) -> String {
    use migrate::{read_message, write_message, Message};
    let (mut reader, mut writer) = greeting_vm(at, mem);
    write_message(&mut writer, &Message::Requests { migration }).unwrap();
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    match read_message(&mut reader) {
        Ok(Message::Abort(reason)) => reason,
        other => panic!("the page-request connection was answered with {other:?}, not refused"),
    }
}

/// Plays a source of an 8 MiB, one-vCPU VM to `destination` up to the hellos: the
/// connection's halves.
fn greeting(destination: &str) -> (BufReader<std::net::TcpStream>, std::net::TcpStream) {
    greeting_vm(destination, 8 << 20)
}

/// Plays a source of a one-vCPU VM with `mem` bytes of RAM to `destination` up to the hellos.
fn greeting_vm(
    destination: &str,
    mem: u64,
) -> (BufReader<std::net::TcpStream>, std::net::TcpStream) {
    use migrate::{read_message, write_message, Message};
    let ram = vmm::GuestRam::new(mem).unwrap();
    let identity = faultline::migration::identity(&ram, 1).unwrap();
    let stream = std::net::TcpStream::connect(destination).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    write_message(&mut writer, &Message::Hello(identity)).unwrap();
    assert!(matches!(read_message(&mut reader), Ok(Message::Hello(_))));
    (reader, writer)
}

#[test]
fn a_source_that_stops_sending_mid_stream_is_given_up_on() {
    require_kvm!();
    use migrate::{write_message, Message};
    let destination = Destination::spawn_with(&["--json"], PEER_TIMEOUT_2S);
    let (_reader, mut writer) = greeting(&destination.addr);
    // Some of the first pass, then nothing, the connection open.
    write_message(&mut writer, &Message::ZeroPages { gpa: 0, count: 5 }).unwrap();
    let (status, err) = ended_within_a_minute(destination, "a source silent", || {});
    assert!(!status.success());
    assert!(
        err.contains("the migration stream failed")
            && err.contains("said nothing in the time allowed"),
        "{err}"
    );
    drop(writer);
}

#[test]
fn a_pre_copy_source_that_leaves_a_page_out_is_refused_by_name() {
    require_kvm!();
    use migrate::{write_message, Message};
    let destination = Destination::spawn(&["--json"]);
    let (_reader, mut writer) = greeting(&destination.addr);
    // Every page but one (0x5000), then the end of a pre-copy.
    let pages = (8 << 20) / 4096;
    for (gpa, count) in [(0, 5), (0x6000, pages - 6)] {
        write_message(&mut writer, &Message::ZeroPages { gpa, count }).unwrap();
    }
    let switch_over = Message::SwitchOver {
        post_copy: false,
        migration: 1,
    };
    for message in [switch_over, Message::Done] {
        write_message(&mut writer, &message).unwrap();
    }
    let (status, err) = ended_within_a_minute(destination, "its refusal", || {});
    assert!(!status.success());
    assert!(
        err.contains("the source finished without sending every page of RAM: 1 never came, the first at 0x5000"),
        "{err}"
    );
}

#[test]
fn a_destination_that_gives_up_mid_pass_is_heard_at_once() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // A destination that fails part way through the first pass says why, then takes what
    // is still on the way without a look (closing with bytes unread would reset the
    // connection, which can throw its reason away). The source must stop at its next run of
    // pages and say why, not send the rest of the pass (64 MiB of data) to no one first.
    let (addr, fake) = fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        while !matches!(read_message(&mut reader).unwrap(), Message::Pages { .. }) {}
        write_message(
            &mut writer,
            &Message::Abort("no room for the VM's memory here".into()),
        )
        .unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        // Bounded: a source that never stops fails the test instead of hanging it.
        reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut after = Vec::new();
        reader.read_to_end(&mut after).unwrap();
        after.len()
    });
    let tmp = TempDir::new("migrate-pre-gives-up-mid-pass");
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, BIG);
    a_failed_migration_of_leaves_it_running_as(
        &sock,
        (source, BIG),
        &addr,
        &["--mode", "pre"],
        "the destination gave up the migration: no room for the VM's memory here",
    );
    let after = fake.join().unwrap();
    // What the sockets held when the abort came, and a run: a few MiB, not the pass.
    assert!(
        after < 16 << 20,
        "{after} bytes came after the abort, of a 64 MiB pass"
    );
}

#[test]
fn a_destination_that_refuses_a_source_mid_stream_takes_what_is_on_the_way_and_is_heard() {
    require_kvm!();
    use migrate::{read_message, write_message, Message};
    // A destination that gives up says why, then takes what the source still sends until it
    // closes: a destination that closed with bytes unread would reset the connection, failing
    // the source's writes and throwing away the reason before the source reads it.
    let destination = Destination::spawn(&["--json"]);
    let (mut reader, mut writer) = greeting(&destination.addr);
    let outside = Message::Pages {
        gpa: 1 << 40,
        data: vec![1; 4096],
    };
    write_message(&mut writer, &outside).unwrap();
    // A source that has not looked yet goes on sending (64 MiB, more than the sockets hold).
    let run = Message::Pages {
        gpa: 0x10_0000,
        data: vec![7; 1 << 20],
    };
    for sent in 0..64 {
        if let Err(e) = write_message(&mut writer, &run) {
            panic!("the destination reset the connection after {sent} MiB: {e}");
        }
    }
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let said = match read_message(&mut reader) {
        Ok(Message::Abort(reason)) => reason,
        other => panic!("the destination's reason was lost: {other:?}"),
    };
    let why = "a pages message names memory outside the VM: 1 pages at 0x10000000000";
    assert!(said.contains(why), "{said}");
    drop((reader, writer));
    let (status, err) = ended_within_a_minute(destination, "the source to close", || {});
    assert!(!status.success());
    assert!(err.contains(why), "{err}");
}

#[test]
fn a_vm_with_more_ram_than_the_destination_takes_is_refused_and_runs_on() {
    require_kvm!();
    // The source says how much RAM its VM has: a destination takes at most --max-mem (by
    // default its host's memory), refusing more before it allocates anything.
    let destination = Destination::spawn(&["--json", "--max-mem", "3M"]);
    let why = "the source's VM has 4 MiB of RAM, more than the 3 MiB this destination takes \
               (--max-mem)";
    a_failed_migration_leaves_the_source_running(
        "migrate-max-mem",
        &destination.addr,
        &format!("the destination refused the migration: {why}"),
    );
    let (status, err) = ended_within_a_minute(destination, "its refusal", || {});
    assert!(!status.success());
    assert!(err.contains(why), "{err}");
}

#[test]
fn a_page_request_connection_that_names_another_migration_is_refused() {
    require_kvm!();
    use migrate::{write_message, Message};
    // Only the source that began a post-copy may answer its page faults: a connection that
    // passes the hello but names another migration is told why and refused, and the
    // migration ends before the VM is built (its source runs on).
    let destination = Destination::spawn(&["--json"]);
    let (_reader, mut writer) = greeting(&destination.addr);
    let pages = (8 << 20) / 4096;
    let switch_over = Message::SwitchOver {
        post_copy: true,
        migration: 0x1111,
    };
    let none_stale = Message::Stale {
        pages,
        bitmap: vec![0; pages as usize / 64],
    };
    for message in [switch_over, none_stale] {
        write_message(&mut writer, &message).unwrap();
    }
    let said = page_requests_refused(&destination.addr, 8 << 20, 0x2222);
    let why = "the page-request connection names migration 0000000000002222; \
               the one here is 0000000000001111";
    assert_eq!(said, why);
    drop((_reader, writer));
    let (status, err) = ended_within_a_minute(destination, "its refusal", || {});
    assert!(!status.success());
    assert!(err.contains(why), "{err}");
}

/// A peer waited for 2 s where it owes a message, not a minute or two.
const PEER_TIMEOUT_2S: &[(&str, &str)] = &[("FAULTLINE_PEER_TIMEOUT_S", "2")];

/// The small guest, whose source waits 2 s for a silent destination where it owes an answer.
const IMPATIENT: Mix = Mix {
    env: PEER_TIMEOUT_2S,
    ..SMALL
};

/// Reads `reader` to its end, saying nothing, for a minute at most.
fn silent_until_closed(mut reader: BufReader<std::net::TcpStream>) {
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = reader.read_to_end(&mut Vec::new());
}

#[test]
fn a_destination_that_never_answers_a_round_leaves_the_source_running() {
    require_kvm!();
    use migrate::{read_message, Message};
    // Takes the first pass, then says nothing at its sync (the connection open): the source
    // waits as long as for `Built` (what the buffers hold comes first), a bound
    // FAULTLINE_PEER_TIMEOUT_S sets for a slow link, then gives up and runs the VM on.
    an_impatient_source_gives_up_on(
        "migrate-no-sync",
        |stream| {
            let (mut reader, _writer) = greeted(stream);
            while read_message(&mut reader).unwrap() != Message::Sync {}
            silent_until_closed(reader);
        },
        "the destination did not take the pre-copy rounds within 2 s",
    );
}

/// Migrates the small guest, whose source waits 2 s where it owes an answer, to a fake
/// destination that `plays` its part: the migration fails saying `says`, and the VM runs on.
fn an_impatient_source_gives_up_on(
    name: &str,
    plays: impl FnOnce(std::net::TcpStream) + Send + 'static,
    says: &str,
) {
    let (addr, fake) = fake_peer(plays);
    let tmp = TempDir::new(name);
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, IMPATIENT);
    a_failed_migration_of_leaves_it_running(&sock, source, &addr, &[], says);
    fake.join().unwrap();
}

#[test]
fn a_destination_that_says_nothing_after_the_switch_over_leaves_the_source_running() {
    require_kvm!();
    // Takes everything, then says nothing (the connection open) until the source gives up on
    // it: it never got the go-ahead, so the VM runs on here. (It gives up itself after a
    // minute, so that a source that waits for ever fails this test rather than hangs it.)
    an_impatient_source_gives_up_on(
        "migrate-silent",
        |stream| {
            let (mut reader, mut writer) = greeted(stream);
            assert!(take_until_done(&mut reader, &mut writer));
            silent_until_closed(reader);
        },
        "the destination did not say it built the VM within 2 s",
    );
}

#[test]
fn a_destination_that_stops_taking_pages_is_given_up_on_and_the_vm_runs_on() {
    require_kvm!();
    // Greets, then reads nothing more (its kernel still answers TCP's probes), until the
    // test is done with it (a minute at most, so that a source writing into it for ever
    // fails the test rather than hangs it).
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let (addr, fake) = fake_peer(move |stream| {
        let _halves = greeted(stream);
        let _ = finished.recv_timeout(Duration::from_secs(60));
    });
    let tmp = TempDir::new("migrate-stops-taking");
    let sock = tmp.join("src.sock");
    // 32 MiB of first pass: far more than the sockets' buffers hold.
    let impatient = Mix {
        env: PEER_TIMEOUT_2S,
        ..MID
    };
    let source = spawn_mix_written(&sock, impatient);
    let out = migrate_send_with(&sock, &addr, &[]);
    let _ = done.send(());
    fake.join().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the peer took nothing in the time allowed")
            && err.contains("the VM runs on here"),
        "{err}"
    );
    set_hold(&sock, None);
    finishes_right_as(source, MID);
}

#[test]
fn a_post_copy_destination_that_says_nothing_after_the_state_leaves_it_paused_until_cancelled() {
    require_kvm!();
    // It may be building the VM: the source must not run it, and must not wait for ever.
    let tmp = TempDir::new("migrate-silent-post");
    let sock = tmp.join("src.sock");
    let (addr, fake) = {
        let sock = sock.clone();
        fake_peer_with_listener(move |stream, listener| {
            let (reader, _writer, _requests) = post_copy_state(stream, listener);
            // The source waits for the destination's word, in its switch-over (unless, on a
            // slow host, its 2 s wait is over and it is paused).
            let (_, migration) = api(&sock, "GET", "/migration", None);
            assert!(
                migration["progress"]["phase"] == "switch-over"
                    || migration["status"] == "postcopy-paused",
                "{migration}"
            );
            // Past its switch-over, the source may hold what the VM needs: it is not shut
            // down without a word. (On a slow host its 2 s wait may be over by now: then it
            // is paused, and says so.)
            let (status, refusal) = api(&sock, "PUT", "/vm/shutdown", None);
            assert_eq!(status, 409, "{refusal}");
            assert!(
                refusal["error"].as_str().is_some_and(|e| {
                    e.contains("past its switch-over is in progress")
                        || e.contains("a post-copy is paused here")
                }),
                "{refusal}"
            );
            silent_until_closed(reader);
        })
    };
    let source = spawn_mix_written(&sock, IMPATIENT);
    let out = migrate_send_mode(&sock, &addr, "post");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the destination did not say whether it runs the VM")
            && err.contains("said nothing in the time allowed"),
        "{err}"
    );
    fake.join().unwrap();
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused", "{info}");
    let out = faultline(&["migrate", "cancel", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "running", "{info}");
    set_hold(&sock, None);
    finishes_right(source);
}

#[test]
fn a_pre_copy_unconfirmed_after_the_go_ahead_stays_paused_until_cancelled() {
    require_kvm!();
    // It may be running the VM, so the source must not, until told it does not.
    let (addr, fake) = vanishing_after_the_go_ahead();
    let tmp = TempDir::new("migrate-unconfirmed");
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, SMALL);
    let out = migrate_send_mode(&sock, &addr, "pre");
    fake.join().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the switch-over is unconfirmed") && err.contains("stays paused here"),
        "{err}"
    );
    let (_, migration) = api(&sock, "GET", "/migration", None);
    assert_eq!(migration["status"], "switchover-unconfirmed", "{migration}");
    let (status, refusal) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 409, "{refusal}");
    assert!(refusal["error"]
        .as_str()
        .unwrap()
        .contains("must not run here too"));

    // The operator knows the destination does not run it: cancelled, it runs on here and
    // finishes right.
    let out = faultline(&["migrate", "cancel", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "running", "{info}");
    let (_, migration) = api(&sock, "GET", "/migration", None);
    assert_eq!(migration["status"], "cancelled", "{migration}");
    set_hold(&sock, None);
    finishes_right(source);
}

/// A fake destination that takes everything, says it built the VM, and resets the
/// connection at once (closed with a zero linger).
fn resetting_after_built() -> (String, std::thread::JoinHandle<()>) {
    use migrate::{write_message, Message};
    fake_peer(|stream| {
        let (mut reader, mut writer) = greeted(stream);
        take_until_done(&mut reader, &mut writer);
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on an open socket, with a linger struct of its own size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&writer),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        write_message(&mut writer, &Message::Built).unwrap();
        drop((reader, writer));
    })
}

#[test]
fn a_pre_copy_whose_go_ahead_cannot_be_sent_runs_on_here() {
    require_kvm!();
    let tmp = TempDir::new("migrate-go-ahead-lost");
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, SMALL);
    // Whether the reset reaches the source before it writes the go-ahead is a race: a reset
    // that comes after leaves the switch-over unconfirmed (the destination may have had the
    // go-ahead), which a cancel settles, and the migration is tried again.
    for attempt in 1.. {
        let (addr, fake) = resetting_after_built();
        let out = migrate_send_mode(&sock, &addr, "pre");
        fake.join().unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        if err.contains("the go-ahead could not be sent to the destination") {
            // A write that fails sent none of the go-ahead: the VM runs on here.
            assert!(err.contains("the VM runs on here"), "{err}");
            let (_, info) = api(&sock, "GET", "/vm", None);
            assert_eq!(info["state"], "running", "{info}");
            break;
        }
        assert!(err.contains("the switch-over is unconfirmed"), "{err}");
        assert!(attempt < 20, "the reset never came before the go-ahead");
        let out = faultline(&["migrate", "cancel", "--api-sock", sock.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    set_hold(&sock, None);
    finishes_right(source);
}

/// A hello of the small guest's VM, as a destination answers it: its length is what the
/// proxy lets back before the next message.
fn small_hello() -> migrate::Message {
    migrate::Message::Hello(migrate::VmIdentity {
        vcpus: 1,
        layout: migrate::Layout::new(vec![(0, 4 << 20)]),
        cpuid_digest: 0,
    })
}

/// The bytes a frame of `message` takes on the wire.
fn frame_len(message: &migrate::Message) -> u64 {
    migrate::frame(message).unwrap().len() as u64
}

#[test]
fn a_post_copy_whose_built_is_lost_is_resumed_and_its_downtime_lasts_until_the_resume() {
    require_kvm!();
    let tmp = TempDir::new("migrate-built-lost");
    let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    let destination = Destination::spawn(&["--json", "--api-sock", dsock.to_str().unwrap()]);
    // Back to the source goes the destination's hello; the cut comes with its `Built`: it
    // runs the VM, and the source cannot know.
    let hello = small_hello();
    let proxy = common::proxy::CuttingProxy::start_back(&destination.addr, frame_len(&hello));
    let source = spawn_mix_written(&sock, SMALL);
    let out = migrate_send_mode(&sock, &proxy.addr, "post");
    assert!(proxy.has_cut());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("did not say whether it runs the VM"), "{err}");
    wait_for_migration_status(&dsock, "postcopy-paused");
    let at = recover(&dsock);
    let out = migrate_send_with(&sock, &at, &["--resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json_report(&text(&out.stdout));
    assert_eq!(report["status"], "completed", "{report}");
    // The destination said it runs the VM only at the resume: the downtime lasts until then,
    // and holds its part until the state was sent.
    let whole = report["downtime_ms"].as_f64().unwrap();
    let part = report["downtime_until_state_sent_ms"].as_f64().unwrap();
    assert!(0.0 < part && part < whole, "{report}");
    let source = source.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    check_arrived(destination.child, SMALL);
}

#[test]
fn a_pre_copy_whose_last_word_is_lost_completes_by_resuming() {
    require_kvm!();
    let tmp = TempDir::new("migrate-last-word");
    let (sock, dsock) = (tmp.join("src.sock"), tmp.join("dst.sock"));
    // The destination holds the guest before its end, so that it is still there to ask.
    let destination = Destination::held(&dsock);
    // Back to the source go the destination's hello, its answer to the sync and its
    // "built"; the cut comes with the next byte: the last word, sent once the destination
    // runs the VM.
    let hello = small_hello();
    let before_the_last_word = frame_len(&hello)
        + frame_len(&migrate::Message::Sync)
        + frame_len(&migrate::Message::Built);
    let proxy = common::proxy::CuttingProxy::start_back(&destination.addr, before_the_last_word);
    // Held, it writes nothing while the first pass goes: the rounds end after it, with one
    // sync, whatever the speeds.
    let source = spawn_mix_held(&sock, SMALL);
    let out = migrate_send_mode(&sock, &proxy.addr, "pre");
    assert!(proxy.has_cut());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the switch-over is unconfirmed"), "{err}");
    let (status, _) = api(&sock, "PUT", "/vm/resume", None);
    assert_eq!(
        status, 409,
        "the source must not run what the destination may run"
    );

    // The destination runs it; resuming, the source learns so, and is done. The first resume
    // is cut too, once the destination has said it holds every page: a second `recover` is
    // answered as well.
    wait_for_migration_status(&dsock, "completed");
    let at = recover(&dsock);
    // A resume of another migration (of a VM of the same shape) is refused, naming both.
    {
        use migrate::{read_message, write_message, Message};
        let (mut reader, mut writer) = greeting_vm(&at, 4 << 20);
        write_message(&mut writer, &Message::Resume { migration: 42 }).unwrap();
        match read_message(&mut reader) {
            Ok(Message::Abort(why)) => assert!(
                why.contains("the resume names migration 000000000000002a; the one here is"),
                "{why}"
            ),
            other => panic!("a resume of another migration was answered {other:?}"),
        }
    }
    let held = migrate::Message::Received {
        pages: 1024,
        bitmap: vec![u64::MAX; 16],
    };
    let proxy = common::proxy::CuttingProxy::start_back(&at, frame_len(&hello) + frame_len(&held));
    let out = migrate_send_with(&sock, &proxy.addr, &["--resume"]);
    assert!(proxy.has_cut());
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let at = recover(&dsock);
    let out = migrate_send_with(&sock, &at, &["--resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = json_report(&text(&out.stdout));
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["mode"], "pre", "{report}");
    let source = source.wait_with_output().unwrap();
    assert!(source.status.success(), "{}", text(&source.stderr));
    assert!(text(&source.stderr).contains("migrated to another faultline"));

    set_hold(&dsock, None);
    check_arrived(destination.child, SMALL);
}

#[test]
fn get_migration_shows_the_rounds_as_they_go() {
    require_kvm!();
    let tmp = TempDir::new("migrate-progress");
    let sock = tmp.join("src.sock");
    let (destination, addr) = spawn_destination();
    // What GET /migration says at the end of each round, while the source waits for the
    // destination (it never waits for the migration). The guest rewrites every page during
    // the first pass, so the first round does not shrink and the guest is throttled.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watch = {
        let (sock, seen) = (sock.clone(), std::sync::Arc::clone(&seen));
        move |message: &migrate::Message| {
            if *message == migrate::Message::Sync {
                let (_, status) = api(&sock, "GET", "/migration", None);
                assert_eq!(status["status"], "active", "{status}");
                seen.lock().unwrap().push(status["progress"].clone());
            }
        }
    };
    let source = source_watched(
        &sock,
        BIG,
        Rounds::OnePassThenFree,
        &addr,
        Some(Box::new(watch)),
    );
    let out = migrate_send_with(
        &sock,
        &source.to,
        &["--mode", "pre", "--downtime-ms", "0", "--max-rounds", "4"],
    );
    source.check_gate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = seen.lock().unwrap().clone();
    // The first pass, and at least the round after it (the first did not shrink).
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|p| p["phase"] == "pre-copy"), "{seen:?}");
    // The rounds and the bytes only grow, and the rounds after the first throttle the guest.
    let rounds: Vec<u64> = seen.iter().map(|p| p["round"].as_u64().unwrap()).collect();
    let bytes: Vec<u64> = seen.iter().map(|p| p["bytes"].as_u64().unwrap()).collect();
    assert!(rounds.windows(2).all(|w| w[0] < w[1]), "{rounds:?}");
    assert!(bytes.windows(2).all(|w| w[0] < w[1]), "{bytes:?}");
    assert!(bytes[0] >= BIG.pages * 4096, "{bytes:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|p| p["throttle_percent"].as_u64() > Some(0)),
        "{seen:?}"
    );
    source.child.wait_with_output().unwrap();
    check_arrived(destination, BIG);
}

#[test]
fn a_vm_paused_before_an_unconfirmed_migration_stays_paused_when_cancelled() {
    require_kvm!();
    let (addr, fake) = vanishing_after_the_go_ahead();
    let tmp = TempDir::new("migrate-paused-cancel");
    let sock = tmp.join("src.sock");
    let source = spawn_mix_written(&sock, SMALL);
    assert_eq!(api(&sock, "PUT", "/vm/pause", None).0, 204);
    let out = migrate_send_mode(&sock, &addr, "pre");
    fake.join().unwrap();
    assert!(!out.status.success());
    let out = faultline(&["migrate", "cancel", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the VM stays paused here"),
        "{}",
        text(&out.stderr)
    );
    // Cancelled, it is as it was before the migration: paused, until resumed.
    let (_, info) = api(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused", "{info}");
    assert_eq!(api(&sock, "PUT", "/vm/resume", None).0, 204);
    set_hold(&sock, None);
    finishes_right(source);
}

#[test]
fn a_destination_whose_api_socket_cannot_be_used_refuses_before_it_listens() {
    let tmp = TempDir::new("migrate-bad-api-sock");
    let taken = tmp.join("not-a-socket");
    std::fs::write(&taken, b"a file").unwrap();
    // Were it found only once a VM had arrived, the source would have let the VM go.
    let mut child = spawn(&[
        "migrate",
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--api-sock",
        taken.to_str().unwrap(),
    ]);
    common::exit_within(
        &mut child,
        Duration::from_secs(30),
        Duration::from_millis(10),
        || {},
        || "it waited for a migration it could not serve".into(),
    );
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert!(!err.contains("waiting for a migration"), "{err}");
}

#[test]
fn a_vm_that_arrived_by_migration_moves_on_again() {
    require_kvm!();
    let tmp = TempDir::new("migrate-chain");
    let (sock, bsock) = (tmp.join("a.sock"), tmp.join("b.sock"));
    // B takes it in post-copy and holds it near its end, so that it is there to move on.
    let b = Destination::held(&bsock);
    let source = spawn_mix_written(&sock, SMALL);
    let out = migrate_send_mode(&sock, &b.addr, "post");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(source.wait_with_output().unwrap().status.success());
    wait_for_migration_status(&bsock, "completed");
    // B to C, pre-copy: C runs it to its end, right.
    let (c, caddr) = spawn_destination();
    let out = migrate_send_mode(&bsock, &caddr, "pre");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let moved_on = b.child.wait_with_output().unwrap();
    assert!(moved_on.status.success(), "{}", text(&moved_on.stdout));
    check_arrived(c, SMALL);
}
