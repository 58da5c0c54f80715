//! The `faultline` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use faultline::api::http;
use faultline::api::{ApiServer, BoundSocket, Controller};
use faultline::duration::parse_duration;
use faultline::lazy::LazySpec;
use faultline::micro::{MicroOptions, MicroReport, MicroVm};
use faultline::restore::{RestoreMode, RestoreOptions};
use faultline::size::{format_size, parse_size};
use faultline::{bench, host_checksum, linux};
use pager::{FailurePolicy, PagerConfig};
use vmm::boot::micro::WorkRange;
use vmm::cpuid::{CpuidConfig, FeatureMask};
use vmm::devices::ConsoleSink;

/// faultline: a demand-paged virtual machine monitor on KVM.
///
/// Runs built-in micro-guests (tiny 64-bit programs used to test and measure the VMM) or a
/// Linux kernel. Needs /dev/kvm (root or the kvm group). Set FAULTLINE_LOG=debug for logs.
#[derive(Parser)]
#[command(name = "faultline", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a micro-guest (--guest) or a Linux kernel (--kernel) and run it to the end.
    Run(Box<RunArgs>),
    /// Restore a snapshot into a new VM and run it to the end.
    Restore(Box<RestoreArgs>),
    /// Snapshots of a running faultline, through its API socket.
    Snapshot {
        #[command(subcommand)]
        snapshot: SnapshotCommand,
    },
    /// Control a running faultline through its API socket.
    Vm {
        #[command(subcommand)]
        action: VmCommand,
    },
    /// Guest page tracking of a running faultline, through its API socket: writes (and, in
    /// access mode, reads) of chosen guest pages are reported with their bytes.
    Track {
        #[command(subcommand)]
        action: TrackCommand,
    },
    /// Live migration between two faultline processes over TCP: pre-copy, post-copy, hybrid,
    /// recovery after a network cut, TLS.
    Migrate {
        #[command(subcommand)]
        action: MigrateCommand,
    },
    /// List the built-in micro-guests.
    Guests,
    /// Benchmarks that print JSON figures for faultline beside a baseline from the same run.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["guest", "kernel"])))]
struct RunArgs {
    /// Built-in micro-guest to run (see `faultline guests`).
    #[arg(long, value_name = "NAME")]
    guest: Option<String>,
    /// Linux kernel to boot: an uncompressed ELF vmlinux (PVH entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// initramfs for the kernel.
    #[arg(long, value_name = "PATH", conflicts_with = "guest")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, reboot through the i8042, no ACPI].
    #[arg(long, value_name = "STRING", conflicts_with = "guest")]
    cmdline: Option<String>,
    /// Guest RAM, e.g. 64M or 1G [default: 64M for micro-guests, 256M for Linux].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem: Option<u64>,
    /// Number of vCPUs, 1 to 32. A micro-guest's work range is split between them.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(vmm::vm::MAX_VCPUS)))]
    cpus: u8,
    /// The micro-guest's argument (a seed, a pass count...; see `faultline guests`).
    #[arg(long, value_name = "N", value_parser = parse_u64, conflicts_with = "kernel")]
    arg: Option<u64>,
    /// Do not offer KVM's asynchronous page faults (CPUID 0x40000001 bits 4, 10, 14).
    #[arg(long)]
    no_async_pf: bool,
    /// CPU features to hide, comma separated (e.g. cx16,xsave,avx), or "emulator" for what
    /// instruction-emulating KVM hosts cannot run.
    #[arg(long, value_name = "LIST")]
    cpuid_mask: Option<String>,
    /// Linux guests: stop the guest after this many seconds.
    #[arg(long, value_name = "SECS", conflicts_with = "guest")]
    timeout: Option<u64>,
    /// Serve guest RAM lazily through the pager (userfaultfd): "zero", or "file:PATH" for a raw
    /// image of guest RAM. What the loader wrote at start stays resident; the rest is fetched
    /// on first touch.
    #[arg(long, value_name = "SOURCE", conflicts_with = "kernel")]
    lazy: Option<LazySpec>,
    /// With --lazy: pages installed per fault, the faulting one first (1 = off).
    #[arg(long, value_name = "PAGES", default_value_t = 1, requires = "lazy")]
    readahead: usize,
    /// With --lazy: also install every remaining page in the background.
    #[arg(long, requires = "lazy")]
    background_fill: bool,
    /// With --background-fill: at most this many bytes per second (e.g. 256M; at least 4K);
    /// unlimited by default (the fill always yields to faults).
    #[arg(long, value_name = "SIZE", value_parser = parse_fill_rate, requires = "background_fill")]
    fill_rate: Option<u64>,
    /// With --lazy: what a page-source failure does: "poison" the page (the guest sees an
    /// error) or "stop" the VM.
    #[arg(long, value_name = "POLICY", default_value = "poison", value_parser = parse_policy, requires = "lazy")]
    on_source_error: FailurePolicy,
    /// With --lazy: add this delay (e.g. 100us, 1ms) to every read of the page source, as a
    /// stand-in for a snapshot store on the network (benchmarks, tests).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "lazy")]
    source_latency: Option<Duration>,
    /// With --lazy: do not install pages ahead of a vCPU whose faults walk memory with a
    /// constant stride (prediction is on by default).
    #[arg(long, requires = "lazy")]
    no_predict: bool,
    /// Print the micro-guest's report as JSON instead of text.
    #[arg(long, conflicts_with = "kernel")]
    json: bool,
    /// Serve the control API (HTTP/1.1 + JSON: pause, resume, snapshot, stats, shutdown) on
    /// this Unix socket while the micro-guest runs.
    #[arg(long, value_name = "PATH", conflicts_with = "kernel")]
    api_sock: Option<PathBuf>,
    /// Log guest writes (KVM dirty log), so that snapshots after the first can be diffs.
    #[arg(long, conflicts_with = "kernel")]
    track_dirty: bool,
    /// Log guest writes through KVM's per-vCPU dirty ring of ENTRIES entries (a power of two
    /// from 256, or 1024 on hosts with Intel PML, to 65536; e.g. 4096) instead of the dirty
    /// bitmap; implies --track-dirty.
    #[arg(long, value_name = "ENTRIES", conflicts_with = "kernel")]
    dirty_ring: Option<u32>,
    /// Limit the micro-guest's work range to its first N pages.
    #[arg(long, value_name = "N", conflicts_with = "kernel")]
    range_pages: Option<u64>,
    /// Start the VM paused, before its first instruction, so that anything can be set up
    /// through the API first; `faultline vm resume` starts it.
    #[arg(long, requires = "api_sock", conflicts_with = "kernel")]
    paused: bool,
    /// For tests: a micro-guest vCPU that reaches hold point N (for `mix`, the end of pass N)
    /// waits there until the VM is stopped, so that a snapshot catches the guest at an exact
    /// point of its run whatever the speed of the CPU.
    #[arg(long, value_name = "N", conflicts_with = "kernel")]
    hold_at: Option<u32>,
    #[command(flatten)]
    swap: SwapArgs,
}

/// Host swap of guest memory.
#[derive(Args)]
struct SwapArgs {
    /// Let guest memory be swapped out to this file (created new; removed at exit):
    /// `faultline vm swap out`, or --mem-limit. Pages come back when touched.
    #[arg(long, value_name = "PATH")]
    swap_file: Option<PathBuf>,
    /// Keep the guest's resident memory under SIZE (e.g. 64M) by swapping out the pages
    /// least recently faulted in or written, to --swap-file or a new file in the temporary
    /// directory. Turns the dirty log on (it tells which pages the guest writes).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem_limit: Option<u64>,
}

impl SwapArgs {
    /// The pager's swap file and resident limit: --swap-file, or with only --mem-limit a
    /// file of this process in the temporary directory.
    fn apply(&self, config: &mut PagerConfig) {
        config.resident_limit = self.mem_limit;
        config.swap_file = match (&self.swap_file, self.mem_limit) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(_)) => {
                let path =
                    std::env::temp_dir().join(format!("faultline-swap-{}", std::process::id()));
                // A leftover of an earlier process with this id: ours by its name.
                let _ = std::fs::remove_file(&path);
                Some(path)
            }
            (None, None) => None,
        };
    }
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot directory (a diff snapshot brings its parents along).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// How memory comes back: "eager" (read it all, then resume), "lazy" (resume at once,
    /// fetch pages on first touch) or "prefetch" (install the recorded working set first, the
    /// rest lazily).
    #[arg(long, value_name = "MODE", default_value_t = RestoreMode::default())]
    memory: RestoreMode,
    /// With --memory lazy: record the order in which the guest faults pages in and write it,
    /// with the pages, as the snapshot's working set (for --memory prefetch).
    #[arg(long)]
    record_ws: bool,
    /// Serve the control API on this Unix socket while the restored VM runs.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Log guest writes, so that a snapshot of the restored VM can be a diff on this one.
    #[arg(long)]
    track_dirty: bool,
    /// Log guest writes through KVM's per-vCPU dirty ring of ENTRIES entries (a power of two
    /// from 256, or 1024 on hosts with Intel PML, to 65536; e.g. 4096) instead of the dirty
    /// bitmap; implies --track-dirty.
    #[arg(long, value_name = "ENTRIES")]
    dirty_ring: Option<u32>,
    /// Track the pages the snapshot's VM tracked (`faultline track`), as many times each.
    #[arg(long)]
    keep_tracking: bool,
    /// With a lazy mode: pages installed per fault, the faulting one first (1 = off).
    #[arg(long, value_name = "PAGES", default_value_t = 1)]
    readahead: usize,
    /// With a lazy mode: what a page that cannot be read does: "poison" it or "stop" the VM.
    #[arg(long, value_name = "POLICY", default_value = "stop", value_parser = parse_policy)]
    on_source_error: FailurePolicy,
    /// With a lazy mode: add this delay (e.g. 100us, 1ms) to every read of the snapshot's
    /// memory, as a stand-in for a snapshot store on the network (benchmarks, tests).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    source_latency: Option<Duration>,
    /// With a lazy mode: do not install pages ahead of a vCPU whose faults walk memory with a
    /// constant stride (prediction is on by default).
    #[arg(long)]
    no_predict: bool,
    /// Start the restored VM paused, before its first instruction, so that anything can be
    /// set up through the API first; `faultline vm resume` starts it.
    #[arg(long, requires = "api_sock")]
    paused: bool,
    #[command(flatten)]
    swap: SwapArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot the VM served on --api-sock into a new directory (the VM is paused for the
    /// duration, then resumes; a paused VM stays paused). With --live the VM is paused only
    /// to record its state and write-protect its memory, and runs on while the pages are
    /// written.
    Create {
        /// The control API socket of the VM to snapshot (its --api-sock).
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The new snapshot's directory (must not exist).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Save only the pages written since this VM's previous snapshot (needs --track-dirty).
        #[arg(long)]
        diff: bool,
        /// Let the VM run while its memory is written: a page the guest is about to write is
        /// saved first (userfaultfd write protection). The snapshot holds memory as it was at
        /// the start, with the vCPU and device state of that instant.
        #[arg(long)]
        live: bool,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Stop the vCPUs where they are.
    Pause(ApiSock),
    /// Let a paused VM run again.
    Resume(ApiSock),
    /// Print the VM's state and counters (JSON).
    Stats(ApiSock),
    /// Print the VM's state (JSON).
    Info(ApiSock),
    /// Stop the VM; its faultline process exits. Refused while a migration paused here may
    /// still need this side (its destination may lack pages only this side has), unless
    /// --force.
    Shutdown(ShutdownArgs),
    /// Host swap: move guest memory out to the VM's swap file, or bring it back.
    Swap {
        #[command(subcommand)]
        action: SwapCommand,
    },
}

#[derive(Subcommand)]
enum SwapCommand {
    /// Swap guest memory out (zero pages are dropped, pages already in the swap file are not
    /// written again) and release it from RAM; pages come back when the guest touches them.
    Out {
        #[command(flatten)]
        api: ApiSock,
        /// Keep this much guest memory resident (the pages least recently faulted in or
        /// written go first).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
        keep: u64,
    },
    /// Bring every swapped-out page back, in the background (faults still come first).
    In(ApiSock),
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Move the VM served on --api-sock to a `faultline migrate receive` at --to: pages are
    /// copied while it runs, then it pauses for the last ones and its state, and runs on there.
    /// If anything fails before the destination runs it, it runs on here; a post-copy whose
    /// connection breaks after that pauses, and --resume completes it.
    Send {
        #[command(flatten)]
        api: ApiSock,
        /// The destination, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// "pre": copy pages while the VM runs, then pause briefly for the rest; "post": move
        /// the VM at once and fetch its pages as it touches them, the rest streamed behind.
        /// "hybrid": pre-copy rounds while each halves what is left, then post-copy (also at
        /// the round limit, or when told with `faultline migrate switchover`); it finishes in
        /// pre-copy only if the last pages go within 2 ms.
        #[arg(long, value_name = "MODE", default_value = "pre", value_parser = ["pre", "post", "hybrid"])]
        mode: String,
        /// Pre-copy and hybrid: the longest pause allowed: copy rounds go on until what is left
        /// fits in it [default: 300].
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Pre-copy and hybrid: copy rounds after the first pass at most, then switch over
        /// whatever is left [default: 30].
        #[arg(long, value_name = "N")]
        max_rounds: Option<u32>,
        /// Resume a post-copy paused by a broken connection: --to is where the destination's
        /// `faultline migrate recover` listens. The pages it lacks are sent, and it completes.
        /// It goes on as the migration began: the settings of a new one do not go with it.
        #[arg(long, conflicts_with_all = ["mode", "downtime_ms", "max_rounds", "no_throttle", "max_bandwidth"])]
        resume: bool,
        /// Pre-copy: never throttle the guest. By default, rounds that do not converge slow
        /// the guest's vCPUs (from the first round that does not halve what is left, after
        /// two rounds in any case: in proportion to what a round leaves, 20% of their time at
        /// least, 10 points more each round, up to 99%) until they do; without it the round
        /// limit ends them and the rest goes in a longer pause.
        #[arg(long)]
        no_throttle: bool,
        /// Pre-copy: send pages at most SIZE a second while the guest runs (such as 100M: 100
        /// MiB/s; 1M at least), to leave the link or the host's memory bandwidth to others,
        /// with bursts of 100 ms at most. What goes in the pause, and a post-copy's pages, are
        /// not held back. Default: no cap.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_bandwidth: Option<u64>,
        /// TLS with mutual authentication: DIR holds ca.pem (the CA both sides' certificates
        /// come from), cert.pem and key.pem (this side's). Without it the channel is plain TCP.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the hybrid migration of the VM served on --api-sock go post-copy after the round
    /// in progress.
    Switchover(ApiSock),
    /// Print the migration status of the VM served on --api-sock (JSON): a source's progress
    /// or report, a destination's phase (postcopy-active, postcopy-paused, completed, ...).
    Status(ApiSock),
    /// Give up the migration in progress before its switch-over (the VM stays here as it
    /// was: running, or paused if it was), or one
    /// whose connection broke before the destination confirmed it runs the VM, and run the
    /// VM here again: the latter only for a destination that surely does not run it (its
    /// process ended, say), as two copies of one VM running corrupt what it works on.
    Cancel(ApiSock),
    /// On the destination of a post-copy paused by a broken connection (its VM served on
    /// --api-sock): listen on --listen for the source's `faultline migrate send --resume`.
    Recover {
        #[command(flatten)]
        api: ApiSock,
        /// Where to listen, HOST:PORT (port 0: any free port, printed).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// TLS for the reconnection (by default, the TLS the migration came with; a migration
        /// that came over TLS recovers over TLS only).
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
    },
    /// Wait on --listen for one migration, then run the VM that arrives to the end, like
    /// `restore` (micro-guest reports and memory checks included).
    Receive {
        /// Where to listen, HOST:PORT (port 0: any free port, printed). Without --tls-dir the
        /// channel is neither authenticated nor encrypted: listen on loopback or a private
        /// network only. A source silent for 60 s (120 s at the switch-over) counts as
        /// stalled; FAULTLINE_PEER_TIMEOUT_S=N sets those bounds to N seconds.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// Serve the control API on this Unix socket once the VM runs.
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// TLS with mutual authentication: DIR holds ca.pem (the CA both sides' certificates
        /// come from), cert.pem and key.pem (this side's). Without it the channel is plain TCP.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Keep the VM that arrives paused, before it runs again, until `faultline vm
        /// resume` (needs --api-sock). Post-copy goes on meanwhile.
        #[arg(long, requires = "api_sock")]
        paused: bool,
        /// Micro-guests: vCPUs wait at hold point N (a pass count) until told otherwise
        /// through the API (`PUT /vm/hold`; needs --api-sock).
        #[arg(long, value_name = "N", requires = "api_sock")]
        hold_at: Option<u32>,
        /// Check the guest's memory as it arrives, before it runs: the `counter` micro-guest's
        /// pages must show one pass count, or two at one edge (a page that missed a write
        /// fails the migration, naming it).
        #[arg(long)]
        verify_arrival: bool,
        /// The most guest RAM to take: the source says how much its VM has, and one with more
        /// is refused before anything is allocated. Default: this host's memory.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_mem: Option<u64>,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrackCommand {
    /// Track a range of guest pages for one more user (the guest's accesses to them exit to
    /// faultline, which completes and reports them).
    Add(TrackRange),
    /// One user stops tracking a range (it stays tracked while others track it).
    Remove(TrackRange),
    /// Print the tracked ranges, with how many users track each (JSON).
    List(ApiSock),
    /// Print tracking events as JSON lines as the guest makes them, until the VM ends,
    /// Ctrl-C, or --count events.
    Watch {
        #[command(flatten)]
        api: ApiSock,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

#[derive(Args)]
struct TrackRange {
    #[command(flatten)]
    api: ApiSock,
    /// Guest-physical address of the first page (page aligned; decimal or 0x hex).
    #[arg(long, value_name = "ADDR", value_parser = parse_u64)]
    gpa: u64,
    /// Length (a multiple of 4 KiB: 4096, 0x1000, 64K, ...).
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_len)]
    len: u64,
    /// "write": the guest's writes are reported with their bytes; "access": its reads too.
    #[arg(long, value_name = "MODE", default_value = "write", value_parser = ["write", "access"])]
    mode: String,
}

#[derive(Args)]
struct ShutdownArgs {
    #[command(flatten)]
    api: ApiSock,
    /// Shut down even a source that a paused migration may still need (its VM may then be
    /// lost: pages only this side has are gone).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ApiSock {
    /// The API socket of the running faultline.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Fault service: the pager against a minimal userfaultfd handler, host threads and vCPUs
    /// as touchers, zero and file sources.
    Faults {
        /// Pages each host-thread case touches.
        #[arg(long, default_value_t = 16384)]
        pages: usize,
        /// Guest RAM of the vCPU cases (its work range, all RAM above 2 MiB, is touched).
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
        vcpu_mem: u64,
        /// Runs per side per case; samples are pooled.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The pager's read-ahead in pages (1 = off).
        #[arg(long, default_value_t = 1)]
        readahead: usize,
        /// Pin everything to CPU 0, so touchers and handlers share one CPU (cross-CPU wakeups
        /// dominate otherwise on nested hosts).
        #[arg(long)]
        pin: bool,
        /// Print JSON (the output is always JSON; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Snapshot restore per mode (eager, lazy, prefetch): time to the first guest instruction
    /// per RAM size, and time to finish a scattered workload against RAM already in place.
    Restore {
        /// Guest RAM sizes, comma separated.
        #[arg(long, value_name = "LIST", default_value = "64M,256M,1G", value_delimiter = ',', value_parser = parse_size)]
        mem: Vec<u64>,
        /// The RAM size whose workload is measured (one of --mem).
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
        workload_mem: u64,
        /// Bytes the workload reads, one word per page, spread over the guest's RAM.
        #[arg(long, value_name = "SIZE", default_value = "24M", value_parser = parse_size)]
        working_set: u64,
        /// Runs per mode and size; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Slow sources to run the workload over, comma separated: a delay added to every
        /// read of the snapshot's memory (faultline) or of its memory file (the peer, through a
        /// FUSE file system); "none" for none.
        #[arg(long, value_name = "LIST", default_value = "100us,1ms", value_parser = parse_latencies)]
        source_latency: Latencies,
        /// Directory for the benchmark's snapshots (removed afterwards) [default: a new one
        /// under the system's temporary directory].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Print JSON (the output is always JSON; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Live migration on loopback against QEMU (qemu-system-x86_64, its guest in
    /// bench/peers/) in the same run: a guest whose pages all hold data and one mostly zero
    /// (pre- and post-copy), a guest that never stops writing (pre-copy, hybrid, post-copy),
    /// post-copy page request latency, and the floor under a post-copy: RAM installed by
    /// UFFDIO_COPY alone. Some minutes for 1 GiB per run.
    Migrate {
        /// Guest RAM on both sides.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
        mem: u64,
        /// Runs of each case on each side, taken in turns; the figures are their medians.
        #[arg(long, value_name = "N", default_value_t = 3)]
        runs: u32,
        /// Only these cases (comma-separated). Default: all.
        #[arg(long, value_name = "LIST", value_delimiter = ',',
              value_parser = clap::builder::PossibleValuesParser::new(bench::migrate::case_names()))]
        cases: Vec<String>,
        /// Before each migration (and each install floor), on both sides alike, use and free
        /// twice the guest RAM of fresh memory, so that the destination's new pages are ones
        /// this machine's own host still backs (a machine that is itself a guest and gives
        /// freed memory back to its host pays a host fault for each such page it uses again).
        #[arg(long)]
        warm_host: bool,
        /// Print JSON (the output is always JSON; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Host swap of a guest whose every page holds data: swap-out and background swap-in
    /// throughput, swap-in faults against a lazy restore's faults (same guest, same run),
    /// swap metadata per GiB.
    Swap {
        /// Guest RAM.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
        mem: u64,
        /// Print JSON (the output is always JSON; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// A live snapshot against a regular one of the same guest (all of RAM written, idle and
    /// under a dirtier): the guest's pause, its write-fault stalls (p50/p99/max) and the total
    /// time; each snapshot is verified.
    LiveSnapshot {
        /// Guest RAM.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
        mem: u64,
        /// Print JSON (the output is always JSON; accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Page tracking and the dirty log: a tracked write against an untracked one, adding and
    /// removing tracking, and taking 1k/16k/256k dirty pages from the dirty ring against the
    /// bitmap (about a minute).
    Track {
        /// Runs per case; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print JSON (the default is also JSON; the flag is accepted for scripts).
        #[arg(long)]
        json: bool,
    },
    /// VM creation to first guest instruction and to completion, against bare KVM.
    Boot {
        /// Runs per size; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guest RAM sizes, comma separated.
        #[arg(long, value_name = "LIST", default_value = "64M,1G", value_delimiter = ',', value_parser = parse_size)]
        mem: Vec<u64>,
        /// Print JSON (the default is also JSON; the flag is accepted for scripts).
        #[arg(long)]
        json: bool,
    },
}

fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a number (decimal or 0x-prefixed hex)"))
}

/// A length: 0x-prefixed hex, or a size such as 4096 or 64K.
fn parse_len(text: &str) -> Result<u64, String> {
    if text.starts_with("0x") {
        parse_u64(text)
    } else {
        parse_size(text)
    }
}

/// A list of delays (`--source-latency` of `bench restore`).
#[derive(Clone, Debug)]
struct Latencies(Vec<Duration>);

fn parse_latencies(text: &str) -> Result<Latencies, String> {
    if text == "none" {
        return Ok(Latencies(Vec::new()));
    }
    let delays = text
        .split(',')
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if delays.iter().any(Duration::is_zero) {
        return Err("a source latency must be above zero (use \"none\" for no slow source)".into());
    }
    Ok(Latencies(delays))
}

fn parse_fill_rate(text: &str) -> Result<u64, String> {
    let rate = parse_size(text)?;
    if rate < vmm::PAGE_SIZE {
        return Err(format!(
            "{text:?} is below one page (4K) a second: the fill would never finish"
        ));
    }
    Ok(rate)
}

fn parse_policy(text: &str) -> Result<FailurePolicy, String> {
    match text {
        "poison" => Ok(FailurePolicy::Poison),
        "stop" => Ok(FailurePolicy::Stop),
        _ => Err(format!(
            "{text:?} is not a policy: use \"poison\" or \"stop\""
        )),
    }
}

fn cpuid_config(args: &RunArgs) -> anyhow::Result<CpuidConfig> {
    let mask = match &args.cpuid_mask {
        Some(list) => FeatureMask::parse(list)?,
        None => FeatureMask::default(),
    };
    Ok(CpuidConfig {
        async_pf: !args.no_async_pf,
        mask,
    })
}

fn run_micro(args: &RunArgs, name: &str) -> anyhow::Result<()> {
    let Some(guest) = guests::find(name) else {
        let names: Vec<_> = guests::ALL.iter().map(|g| g.name).collect();
        bail!(
            "no micro-guest named {name:?}; built-in guests: {}",
            names.join(", ")
        );
    };
    // Checked first: a socket path that cannot be used is refused before RAM is allocated.
    // (Bound only once the VM is built: a client that connects meanwhile is refused, not
    // left waiting for a VM that may take minutes.)
    if let Some(path) = &args.api_sock {
        BoundSocket::check(path)?;
    }
    let mem = args.mem.unwrap_or(64 << 20);
    let range = match args.range_pages {
        None => None,
        Some(pages) => {
            let ram = vmm::GuestRam::new(mem).context("cannot size guest RAM")?;
            let full = vmm::boot::micro::default_work_range(&ram);
            if pages == 0 || pages > full.pages {
                bail!(
                    "--range-pages must be 1 to {} with {} of RAM",
                    full.pages,
                    format_size(mem)
                );
            }
            Some(WorkRange {
                start: full.start,
                pages,
            })
        }
    };
    let options = MicroOptions {
        mem,
        range,
        track_dirty: args.track_dirty,
        dirty_ring: args.dirty_ring,
        vcpus: args.cpus,
        arg: args.arg,
        cpuid: cpuid_config(args)?,
        console: ConsoleSink::stdout(),
        lazy: args.lazy.clone(),
        source_latency: args.source_latency.unwrap_or_default(),
        hold_at: args.hold_at,
        pager: PagerConfig {
            readahead_pages: args.readahead,
            // Swap without --lazy: a page the swap file cannot give back stops the VM, with
            // the cause.
            failure_policy: if args.lazy.is_none() {
                FailurePolicy::Stop
            } else {
                args.on_source_error
            },
            background_rate: args.fill_rate,
            predict: !args.no_predict,
            ..PagerConfig::default()
        },
        ..MicroOptions::new(guest)
    };
    let mut options = options;
    args.swap.apply(&mut options.pager);
    if args.readahead == 0 {
        bail!("--readahead must be at least 1 (1 turns read-ahead off)");
    }
    let mut vm = MicroVm::new(&options)?;
    if args.background_fill {
        if let Some(pager) = &vm.pager {
            pager.fill_all();
        }
    }
    if !args.json {
        println!(
            "faultline: guest {} | RAM {} | {} vCPU(s) | work range {:#x} + {} pages | arg {:#x}",
            guest.name,
            format_size(options.mem),
            options.vcpus,
            vm.range.start,
            vm.range.pages,
            vm.arg
        );
    }
    let api = match &args.api_sock {
        Some(path) => {
            let controller = Controller::new(
                vm.vm.handle(),
                vm.pager.as_ref().map(|p| p.handle()),
                Some(vm.guest_info()),
            );
            // Before the API serves: a resume that comes at once is never refused.
            if args.paused {
                start_paused(&vm.vm.control(), path, args.json);
            }
            Some(start_api(path, controller, args.json)?)
        }
        None => None,
    };
    let report = vm.run();
    // The guest's memory goes with this process: tracking ends, and event streams hear of it
    // before the API stops.
    vm.vm.handle().memory().end_tracking();
    let report = report?;
    print_micro_report(&report, args.json)?;
    if shut_down_by_api(api.as_ref()) {
        return Ok(());
    }
    check_micro_report(&report, guest, vm.vm.ram(), vm.range, args.json)
}

/// Serves the control API on `path` for the VM behind `controller`.
fn start_api(
    path: &std::path::Path,
    controller: Controller,
    json: bool,
) -> anyhow::Result<(ApiServer, std::sync::Arc<Controller>)> {
    let controller = std::sync::Arc::new(controller);
    let server = ApiServer::start(path, std::sync::Arc::clone(&controller))?;
    if !json {
        println!("faultline: API on {}", path.display());
    }
    Ok((server, controller))
}

/// Makes the run about to start begin paused (`--paused`, which needs the API on
/// `api_sock`), and says how to resume it.
fn start_paused(control: &vmm::control::RunControl, api_sock: &std::path::Path, json: bool) {
    control.set_start_paused(true);
    if !json {
        println!(
            "faultline: the VM is paused before its first instruction: `faultline vm resume --api-sock {}` starts it",
            api_sock.display()
        );
    }
}

/// Whether the run ended because an API client asked for a shutdown (then an unfinished
/// guest is what was asked for, not a failure).
fn shut_down_by_api(api: Option<&(ApiServer, std::sync::Arc<Controller>)>) -> bool {
    let Some((_, controller)) = api else {
        return false;
    };
    if controller.migrated() {
        eprintln!("faultline: the VM migrated to another faultline, and runs on there");
        return true;
    }
    let asked = controller.shutdown_requested();
    if asked {
        eprintln!("faultline: the VM was shut down through the API");
    }
    asked
}

fn print_micro_report(report: &MicroReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for v in &report.vcpus {
            let values: Vec<String> = v.reports.iter().map(|r| format!("{r:#x}")).collect();
            let exit = v.exit_code.map_or("none".to_string(), |c| c.to_string());
            println!(
                "vcpu {}: reports [{}], exit {exit}",
                v.vcpu,
                values.join(", ")
            );
        }
        if let Some(done) = report.to_completion {
            println!(
                "faultline: finished {:.1} ms after the VM's creation or restore began",
                done.as_secs_f64() * 1e3
            );
        }
        if let Some(stats) = &report.pager {
            println!(
                "pager: {} vCPU faults, {} other, {} joined; {} pages installed on fault, {} in background ({} zero pages, {} KiB copied); install p50 {} us, p99 {} us",
                stats.faults_vcpu,
                stats.faults_other,
                stats.faults_joined,
                stats.pages_installed_urgent,
                stats.pages_installed_background,
                stats.zero_pages,
                stats.bytes_copied / 1024,
                stats.install_latency_us.p50,
                stats.install_latency_us.p99
            );
        }
    }
    Ok(())
}

/// The guest must have exited 0, and a guest that sums page contents must agree with what the
/// host reads from guest memory.
fn check_micro_report(
    report: &MicroReport,
    guest: &guests::MicroGuest,
    ram: &vmm::GuestRam,
    range: WorkRange,
    json: bool,
) -> anyhow::Result<()> {
    report.check()?;
    if let Some(index) = guest.checksum_report {
        let guest_sum = report
            .summed_report(index)
            .context("the guest reported no checksum")?;
        let host_sum = host_checksum(ram, range)?;
        if guest_sum != host_sum {
            bail!(
                "memory check failed: guest checksum {guest_sum:#x} != host checksum {host_sum:#x}"
            );
        }
        if !json {
            println!("faultline: memory check ok (guest and host checksums are {host_sum:#x})");
        }
    }
    Ok(())
}

fn run_restore(args: &RestoreArgs) -> anyhow::Result<()> {
    if args.record_ws && args.memory != RestoreMode::Lazy {
        bail!("--record-ws records what a lazy restore faults in: use it with --memory lazy");
    }
    if args.readahead == 0 {
        bail!("--readahead must be at least 1 (1 turns read-ahead off)");
    }
    // Checked first: a socket path that cannot be used is refused before the snapshot is read
    // (and bound once the VM is built, as for `run`).
    if let Some(path) = &args.api_sock {
        BoundSocket::check(path)?;
    }
    let mut options = RestoreOptions {
        dir: args.snapshot.clone(),
        mode: args.memory,
        console: ConsoleSink::stdout(),
        pager: PagerConfig {
            readahead_pages: args.readahead,
            failure_policy: args.on_source_error,
            record_faults: args.record_ws,
            predict: !args.no_predict,
            ..PagerConfig::default()
        },
        track_dirty: args.track_dirty,
        dirty_ring: args.dirty_ring,
        keep_tracking: args.keep_tracking,
        source_latency: args.source_latency.unwrap_or_default(),
    };
    args.swap.apply(&mut options.pager);
    let mut restored = faultline::restore::restore(&options)?;
    if !args.json {
        println!(
            "faultline: restored {} ({} layer(s), {} vCPU(s), {}) with --memory {:?}: ready after {:.2} ms ({} pages loaded up front)",
            args.snapshot.display(),
            restored.chain.len(),
            restored.state.machine.vcpus.len(),
            format_size(restored.state.ram_size()),
            args.memory,
            restored.timings.ready_ms,
            restored.timings.pages_loaded
        );
    }
    let api = match &args.api_sock {
        Some(path) => {
            let controller = Controller::new(
                restored.vm.handle(),
                restored.pager.as_ref().map(|p| p.handle()),
                restored.state.guest.clone(),
            );
            // Before the API serves: a resume that comes at once is never refused.
            if args.paused {
                start_paused(&restored.vm.control(), path, args.json);
            }
            Some(start_api(path, controller, args.json)?)
        }
        None => None,
    };
    let result = match restored.guest_run() {
        Some(run) => {
            let report = run.run(&mut restored.vm, restored.pager.as_ref());
            restored.vm.handle().memory().end_tracking();
            let report = report?;
            print_micro_report(&report, args.json)?;
            if shut_down_by_api(api.as_ref()) {
                Ok(())
            } else {
                check_micro_report(&report, run.guest, restored.vm.ram(), run.range, args.json)
            }
        }
        None => {
            let outcome = restored.vm.run().context("the restored VM failed")?;
            println!("faultline: the VM stopped: {:?}", outcome.stop_reason);
            Ok(())
        }
    };
    if args.record_ws {
        let pages = restored.write_working_set(&args.snapshot)?;
        if !args.json {
            println!(
                "faultline: recorded a working set of {pages} pages in {}",
                args.snapshot.join(snapshot::WORKING_SET_FILE).display()
            );
        }
    }
    result
}

/// Sends one API request and returns the JSON answer; a refusal becomes an error with the
/// server's message.
fn api_call(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<Option<serde_json::Value>> {
    // A snapshot, a swap-out or a migration takes as long as its guest's memory does (a
    // migration capped at 1 MiB/s, hours): it is waited for to its end, which the VMM always
    // answers (its own waits on a peer are bounded). Everything else answers at once.
    const ANSWER_WITHIN: Duration = Duration::from_secs(30);
    let timeout =
        if path.starts_with("/snapshot") || path == "/migration/send" || path == "/vm/swap/out" {
            None
        } else {
            Some(ANSWER_WITHIN)
        };
    let (status, answer) =
        http::call(socket, method, path, body, timeout).map_err(|e| match &e {
            http::HttpError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::Error::new(e).context(format!(
                    "the VMM did not answer {method} {path} within {} s (it may still be doing it)",
                    ANSWER_WITHIN.as_secs()
                ))
            }
            _ => e.into(),
        })?;
    if !(200..300).contains(&status) {
        return Err(refusal(method, path, status, answer.as_ref()));
    }
    Ok(answer)
}

/// The error for an API request the VMM refused, with the reason it gave.
fn refusal(
    method: &str,
    path: &str,
    status: u16,
    answer: Option<&serde_json::Value>,
) -> anyhow::Error {
    let message = answer
        .and_then(|a| a.get("error"))
        .and_then(|e| e.as_str())
        .unwrap_or("no reason given");
    anyhow::anyhow!("the VMM refused {method} {path} (HTTP {status}): {message}")
}

/// `faultline migrate ...`.
fn migrate_command(action: MigrateCommand) -> anyhow::Result<()> {
    match action {
        MigrateCommand::Send {
            api,
            to,
            mode,
            downtime_ms,
            max_rounds,
            tls_dir,
            resume,
            no_throttle,
            max_bandwidth,
            json,
        } => {
            let tls_dir = tls_dir
                .map(|dir| std::path::absolute(&dir))
                .transpose()
                .context("cannot resolve --tls-dir")?;
            // A resume goes on as its migration began: the API refuses a new one's settings.
            let body = if resume {
                serde_json::json!({ "to": to, "tls_dir": tls_dir, "resume": true })
            } else {
                // Only what was given: the API refuses a setting the mode does not use.
                serde_json::json!({
                    "to": to, "mode": mode, "downtime_ms": downtime_ms, "max_rounds": max_rounds,
                    "tls_dir": tls_dir, "throttle": no_throttle.then_some(false),
                    "max_bandwidth": max_bandwidth,
                })
            };
            let channel = if tls_dir.is_some() {
                "TLS, mutually authenticated"
            } else {
                "plain TCP: not authenticated, not encrypted"
            };
            if resume {
                eprintln!("faultline: resuming the paused post-copy to {to} ({channel}) ...");
            } else {
                eprintln!("faultline: migrating the VM to {to} ({mode}, {channel}) ...");
            }
            let shown = show_progress(&api.api_sock);
            let answer = api_call(&api.api_sock, "PUT", "/migration/send", Some(&body));
            shown.finish();
            let report = answer?.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for line in faultline::migration::send::report_text(&report).lines() {
                    println!("faultline: {line}");
                }
            }
            Ok(())
        }
        MigrateCommand::Recover {
            api,
            listen,
            tls_dir,
        } => {
            let tls_dir = tls_dir
                .map(|dir| std::path::absolute(&dir))
                .transpose()
                .context("cannot resolve --tls-dir")?;
            let body = serde_json::json!({ "listen": listen, "tls_dir": tls_dir });
            let answer = api_call(&api.api_sock, "PUT", "/migration/recover", Some(&body))?
                .unwrap_or_default();
            let at = answer["listening"].as_str().unwrap_or("?");
            let port = at.rsplit_once(':').map_or(at, |(_, port)| port);
            eprintln!(
                "faultline: waiting on {at} for the source to resume (faultline migrate send \
                 --resume --to THIS-HOST:{port})"
            );
            println!("{}", answer["listening"].as_str().unwrap_or_default());
            Ok(())
        }
        MigrateCommand::Status(api) => {
            let status = api_call(&api.api_sock, "GET", "/migration", None)?.unwrap_or_default();
            print_answer(&status)
        }
        MigrateCommand::Cancel(api) => {
            match api_call(&api.api_sock, "PUT", "/migration/cancel", None)? {
                // A migration in progress: it gives up before its next pages.
                Some(answer) if answer["status"] == "cancelling" => eprintln!(
                    "faultline: the migration in progress gives up before its next pages; the \
                     VM stays here as it was (running, or paused if it was before)"
                ),
                Some(answer) if answer["vm"] == "paused" => eprintln!(
                    "faultline: the migration is cancelled; the VM stays paused here, as it was \
                     before it"
                ),
                _ => eprintln!("faultline: the migration is cancelled; the VM runs here again"),
            }
            Ok(())
        }
        MigrateCommand::Switchover(api) => {
            api_call(&api.api_sock, "PUT", "/migration/switchover", None)?;
            eprintln!("faultline: the migration goes post-copy after the round in progress");
            Ok(())
        }
        MigrateCommand::Receive {
            listen,
            api_sock,
            tls_dir,
            hold_at,
            paused,
            verify_arrival,
            max_mem,
            json,
        } => receive_migration(
            &listen,
            api_sock.as_deref(),
            tls_dir.as_deref(),
            Arrival {
                hold_at,
                paused,
                verify: verify_arrival,
                max_ram: match max_mem {
                    Some(size) => size,
                    None => host_memory()?,
                },
            },
            json,
        ),
    }
}

/// `faultline vm swap out|in`.
fn swap_command(action: &SwapCommand) -> anyhow::Result<()> {
    match action {
        SwapCommand::Out { api, keep } => {
            eprintln!("faultline: swapping guest memory out ...");
            let body = serde_json::json!({ "keep": keep });
            let answer = api_call(&api.api_sock, "PUT", "/vm/swap/out", Some(&body))?;
            print_answer(&answer.unwrap_or_default())
        }
        SwapCommand::In(api) => {
            api_call(&api.api_sock, "PUT", "/vm/swap/in", None)?;
            println!("faultline: swap-in started (in the background)");
            Ok(())
        }
    }
}

/// Prints an API answer as JSON on stdout. A reader that went away (`| head`) is not an
/// error: there is nothing more to tell it.
fn print_answer(answer: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(answer)?;
    match writeln!(std::io::stdout(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// What `migrate receive` does with the VM as it arrives.
struct Arrival {
    /// The hold point its vCPUs wait at.
    hold_at: Option<u32>,
    /// It waits paused until resumed through the API.
    paused: bool,
    /// Check the `counter` guest's memory before it runs.
    verify: bool,
    /// The most guest RAM it may have.
    max_ram: u64,
}

/// A progress line on stderr (a terminal only) while a migration runs.
struct ProgressLine {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressLine {
    /// Stops the line and clears it.
    fn finish(mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Shows the progress of the migration of the VM behind `socket` (from `GET /migration`)
/// on stderr, if it is a terminal, until finished.
fn show_progress(socket: &std::path::Path) -> ProgressLine {
    use std::io::IsTerminal;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !std::io::stderr().is_terminal() {
        return ProgressLine { done, thread: None };
    }
    let (socket, stop) = (socket.to_path_buf(), std::sync::Arc::clone(&done));
    let thread = std::thread::spawn(move || {
        let mut shown = false;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let Ok((_, Some(status))) = http::call(
                &socket,
                "GET",
                "/migration",
                None,
                Some(std::time::Duration::from_secs(2)),
            ) else {
                continue;
            };
            let p = &status["progress"];
            if p.is_null() {
                continue;
            }
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            let throttle = match p["throttle_percent"].as_u64() {
                Some(t) if t > 0 => format!(", guest throttled {t}%"),
                _ => String::new(),
            };
            let phase = match p["phase"].as_str() {
                Some("pre-copy") => format!("pre-copy round {}", p["round"]),
                Some(other) => other.to_string(),
                None => "?".into(),
            };
            eprint!(
                "\r\x1b[Kfaultline: {phase}: {} sent, {} pages left{throttle}",
                format_size(p["bytes"].as_u64().unwrap_or(0)),
                p["remaining_pages"],
            );
            shown = true;
        }
        if shown {
            eprint!("\r\x1b[K");
        }
    });
    ProgressLine {
        done,
        thread: Some(thread),
    }
}

/// This host's memory (`MemTotal`, in whole MiB), the most guest RAM `migrate receive` takes
/// by default.
fn host_memory() -> anyhow::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| {
            let kib = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
            Some((kib.trim().parse::<u64>().ok()? >> 10) << 20)
        })
        .context("/proc/meminfo says no MemTotal: give migrate receive --max-mem")
}

/// `faultline migrate receive`: one VM in, run to the end.
fn receive_migration(
    listen: &str,
    api_sock: Option<&std::path::Path>,
    tls_dir: Option<&std::path::Path>,
    arrival: Arrival,
    json: bool,
) -> anyhow::Result<()> {
    let tls = tls_dir
        .map(faultline::migration::channel::Tls::server)
        .transpose()?;
    // The API socket is bound first: once the VM has arrived the source has let it go, and a
    // socket path that cannot be used must not lose it then.
    let api_socket = api_sock.map(BoundSocket::bind).transpose()?;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "faultline: waiting for a migration on {} ({})",
        listener.local_addr()?,
        if tls.is_some() {
            "TLS, mutually authenticated"
        } else {
            "plain TCP: not authenticated, not encrypted"
        }
    );
    let config = vmm::VmConfig {
        console: ConsoleSink::stdout(),
        ..vmm::VmConfig::default()
    };
    let mut arrived = faultline::migration::receive::receive(
        &listener,
        tls.as_ref(),
        config,
        arrival.max_ram,
        api_sock.is_some(),
    )?;
    drop(listener);
    if json {
        println!("{}", serde_json::to_string_pretty(&arrived.report)?);
    } else {
        println!(
            "faultline: a VM arrived from {}: {} pages, {} zero pages, {} dirty rounds; built {:.1} ms after the switch-over",
            arrived.report.peer,
            arrived.report.normal_pages,
            arrived.report.zero_pages,
            arrived.report.dirty_rounds,
            arrived.report.switch_over_ms
        );
    }
    let guest = arrived.state.guest.clone();
    arrived.vm.handle().control().set_hold_at(arrival.hold_at);
    if arrival.verify {
        let info = guest
            .as_ref()
            .context("--verify-arrival: the VM that arrived runs no micro-guest")?;
        let in_pass: Vec<u64> = arrived
            .state
            .machine
            .vcpus
            .iter()
            .map(|vcpu| guests::counter_pass(vcpu.regs.r13))
            .collect();
        let passes = faultline::micro::check_counter_memory(arrived.vm.ram(), info, &in_pass)
            .context("the guest's memory is wrong as it arrived")?;
        if json {
            println!(
                "{}",
                serde_json::json!({ "arrival_check": { "passes": passes } })
            );
        } else {
            println!("faultline: the guest's memory checks out on arrival (passes {passes:?})");
        }
    }
    let api = match (api_socket, api_sock) {
        (Some(bound), Some(path)) => {
            let controller = std::sync::Arc::new(
                Controller::new(arrived.vm.handle(), None, guest.clone())
                    .arrived(std::sync::Arc::clone(&arrived.incoming)),
            );
            // Before the API serves: a resume that comes at once is never refused.
            if arrival.paused {
                start_paused(&arrived.vm.control(), path, json);
            }
            let server = ApiServer::serve(bound, std::sync::Arc::clone(&controller))?;
            if !json {
                println!("faultline: API on {}", path.display());
            }
            Some((server, controller))
        }
        _ => None,
    };
    let run = guest
        .as_ref()
        .and_then(|info| faultline::micro::GuestRun::from_info(info, std::time::Instant::now()));
    let ran = match &run {
        Some(run) => run.run(&mut arrived.vm, arrived.pager.as_ref()).map(Some),
        None => arrived
            .vm
            .run()
            .context("the arrived VM failed")
            .map(|outcome| {
                println!("faultline: the VM stopped: {:?}", outcome.stop_reason);
                None
            }),
    };
    arrived.vm.handle().memory().end_tracking();
    // Post-copy: the rest of memory must be in before the source may go, however the run
    // ended.
    let finished = arrived.finish().context("the migration did not complete");
    let report = ran?;
    // Post-copy: what came after the switch-over (the first report was printed before).
    let post_copy = finished?;
    if let Some(report) = &report {
        print_micro_report(report, json)?;
    }
    if let Some(figures) = post_copy {
        if json {
            println!("{}", serde_json::to_string_pretty(&figures)?);
        } else {
            let number = |key: &str| figures[key].as_u64().unwrap_or(0);
            let answered = match (
                figures["urgent_page_p50_us"].as_u64(),
                figures["urgent_page_p99_us"].as_u64(),
            ) {
                (Some(p50), Some(p99)) => format!(", answered in {p50} µs (p50), {p99} µs (p99)"),
                _ => String::new(),
            };
            println!(
                "faultline: post-copy {}: {} pages and {} zero pages streamed ({}); {} page \
                 requests to the source{answered}",
                figures["status"].as_str().unwrap_or("?"),
                number("normal_pages"),
                number("zero_pages"),
                format_size(number("bytes")),
                number("postcopy_requests"),
            );
        }
    }
    match (run, report) {
        (Some(run), Some(report)) if !shut_down_by_api(api.as_ref()) => {
            check_micro_report(&report, run.guest, arrived.vm.ram(), run.range, json)
        }
        _ => Ok(()),
    }
}

/// `faultline track ...`.
fn track_command(action: TrackCommand) -> anyhow::Result<()> {
    let (range, method) = match action {
        TrackCommand::Add(range) => (range, "PUT"),
        TrackCommand::Remove(range) => (range, "DELETE"),
        TrackCommand::List(api) => {
            let answer = api_call(&api.api_sock, "GET", "/track", None)?;
            return print_answer(&answer.unwrap_or_default());
        }
        TrackCommand::Watch { api, count } => return watch_tracking(&api.api_sock, count),
    };
    let body = serde_json::json!({ "gpa": range.gpa, "len": range.len, "mode": range.mode });
    api_call(&range.api.api_sock, method, "/track", Some(&body))?;
    eprintln!(
        "faultline: {} [{:#x}, {:#x}) in {} mode",
        if method == "PUT" {
            "tracking"
        } else {
            "one user less for"
        },
        range.gpa,
        range.gpa + range.len,
        range.mode
    );
    Ok(())
}

/// Prints the tracking events of the VM behind `socket`, one JSON line each.
fn watch_tracking(socket: &std::path::Path, count: Option<u64>) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let reader = match http::get_stream(socket, "/track/events")? {
        http::Stream::Lines(reader) => reader,
        http::Stream::Refused(status, body) => {
            return Err(refusal("GET", "/track/events", status, body.as_ref()))
        }
    };
    eprintln!("faultline: watching tracking events (one JSON line each)");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let limit = count.unwrap_or(u64::MAX);
    for line in reader
        .lines()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
    {
        let line = line.context("the event stream broke")?;
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

fn run_kernel(args: &RunArgs, kernel: PathBuf) -> anyhow::Result<()> {
    let options = linux::LinuxOptions {
        kernel,
        initrd: args.initrd.clone(),
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_string()),
        mem: args.mem.unwrap_or(256 << 20),
        vcpus: args.cpus,
        cpuid: cpuid_config(args)?,
        console: ConsoleSink::stdout(),
        timeout: args.timeout.map(Duration::from_secs),
        forward_stdin: true,
    };
    let report = linux::run(&options)?;
    eprintln!(
        "faultline: Linux ({:?} boot) stopped after {:.1} s: {}",
        report.protocol,
        report.elapsed.as_secs_f64(),
        if report.timed_out {
            "timeout".to_string()
        } else {
            format!("{:?}", report.stop_reason)
        }
    );
    if report.timed_out {
        bail!("the guest did not finish within the timeout");
    }
    Ok(())
}

fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Guests => {
            for guest in guests::ALL {
                println!("{:<10} {}", guest.name, guest.summary);
            }
            Ok(())
        }
        Command::Restore(args) => run_restore(&args),
        Command::Snapshot {
            snapshot:
                SnapshotCommand::Create {
                    api_sock,
                    dir,
                    diff,
                    live,
                },
        } => {
            let body = serde_json::json!({
                "dir": std::path::absolute(&dir).context("cannot resolve the snapshot directory")?,
                "type": if diff { "diff" } else { "full" },
                "live": live,
            });
            eprintln!(
                "faultline: taking a {}snapshot into {} ...",
                if live { "live " } else { "" },
                dir.display()
            );
            let answer = api_call(&api_sock, "PUT", "/snapshot/create", Some(&body))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&answer.unwrap_or_default())?
            );
            Ok(())
        }
        Command::Vm { action } => {
            if let VmCommand::Swap { action } = &action {
                return swap_command(action);
            }
            let (method, path, socket, body) = match &action {
                VmCommand::Swap { .. } => unreachable!("handled above"),
                VmCommand::Pause(s) => ("PUT", "/vm/pause", &s.api_sock, None),
                VmCommand::Resume(s) => ("PUT", "/vm/resume", &s.api_sock, None),
                VmCommand::Shutdown(s) => (
                    "PUT",
                    "/vm/shutdown",
                    &s.api.api_sock,
                    s.force.then(|| serde_json::json!({ "force": true })),
                ),
                VmCommand::Stats(s) => ("GET", "/vm/stats", &s.api_sock, None),
                VmCommand::Info(s) => ("GET", "/vm", &s.api_sock, None),
            };
            match api_call(socket, method, path, body.as_ref())? {
                Some(answer) => print_answer(&answer)?,
                None => println!("faultline: {} done", &path[4..]),
            }
            Ok(())
        }
        Command::Track { action } => track_command(action),
        Command::Migrate { action } => migrate_command(action),
        Command::Run(args) => match (&args.guest, &args.kernel) {
            (Some(name), _) => run_micro(&args, name),
            (None, Some(_)) if args.swap.swap_file.is_some() || args.swap.mem_limit.is_some() => {
                bail!("--swap-file and --mem-limit are for micro-guests and restores, not --kernel")
            }
            (None, Some(kernel)) => run_kernel(&args, kernel.clone()),
            (None, None) => unreachable!("clap requires --guest or --kernel"),
        },
        Command::Bench {
            bench:
                BenchCommand::Faults {
                    pages,
                    vcpu_mem,
                    runs,
                    readahead,
                    pin,
                    json: _,
                },
        } => {
            if runs == 0 || readahead == 0 || pages < 2 {
                bail!("--runs and --readahead must be at least 1, --pages at least 2");
            }
            let options = bench::faults::FaultsOptions {
                thread_pages: pages,
                vcpu_mem,
                runs,
                readahead,
                pin_one_cpu: pin,
            };
            let result = bench::faults::run(&options, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Restore {
                    mem,
                    workload_mem,
                    working_set,
                    runs,
                    dir,
                    source_latency,
                    json: _,
                },
        } => {
            if runs == 0 || working_set < vmm::PAGE_SIZE {
                bail!("--runs must be at least 1 and --working-set at least one page");
            }
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("faultline-bench-restore-{}", std::process::id()))
            });
            bench::interrupt::install().context("cannot take over Ctrl-C for the benchmark")?;
            let options = bench::restore::RestoreBenchOptions {
                mems: mem,
                workload_mem,
                working_set,
                runs,
                dir,
                latencies: source_latency.0,
            };
            let result = bench::restore::run(&options, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench:
                BenchCommand::Migrate {
                    mem,
                    runs,
                    cases,
                    warm_host,
                    json: _,
                },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let options = bench::migrate::Options {
                mem,
                runs,
                cases,
                warm_host,
            };
            let result = bench::migrate::run(&options, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench: BenchCommand::Track { runs, json: _ },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let result = bench::track::run(runs, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench: BenchCommand::Swap { mem, json: _ },
        } => {
            let result = bench::swap::run(mem, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench: BenchCommand::LiveSnapshot { mem, json: _ },
        } => {
            let result = bench::live::run(mem, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Command::Bench {
            bench: BenchCommand::Boot { runs, mem, json: _ },
        } => {
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let result = bench::boot::run(&mem, runs, |step| eprintln!("faultline bench {step}"))?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAULTLINE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match main_inner(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
