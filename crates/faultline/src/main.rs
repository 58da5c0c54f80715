//! The `faultline` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use faultline::lazy::LazySpec;
use faultline::micro::{MicroOptions, MicroVm};
use faultline::size::{format_size, parse_size};
use faultline::{bench, host_checksum, linux};
use pager::{FailurePolicy, PagerConfig};
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
    Run(RunArgs),
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
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, reboot through the i8042, no ACPI].
    #[arg(long, value_name = "STRING", requires = "kernel")]
    cmdline: Option<String>,
    /// Guest RAM, e.g. 64M or 1G [default: 64M for micro-guests, 256M for Linux].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    mem: Option<u64>,
    /// Number of vCPUs. A micro-guest's work range is split between them.
    #[arg(long, value_name = "N", default_value_t = 1)]
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
    /// Stop the guest after this many seconds.
    #[arg(long, value_name = "SECS")]
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
    /// With --background-fill: at most this many bytes per second (e.g. 256M); unlimited by
    /// default (the fill always yields to faults).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "background_fill")]
    fill_rate: Option<u64>,
    /// With --lazy: what a page-source failure does: "poison" the page (the guest sees an
    /// error) or "stop" the VM.
    #[arg(long, value_name = "POLICY", default_value = "poison", value_parser = parse_policy, requires = "lazy")]
    on_source_error: FailurePolicy,
    /// Print the micro-guest's report as JSON instead of text.
    #[arg(long, conflicts_with = "kernel")]
    json: bool,
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
    let options = MicroOptions {
        mem: args.mem.unwrap_or(64 << 20),
        vcpus: args.cpus,
        arg: args.arg,
        cpuid: cpuid_config(args)?,
        console: ConsoleSink::stdout(),
        lazy: args.lazy.clone(),
        pager: PagerConfig {
            readahead_pages: args.readahead,
            failure_policy: args.on_source_error,
            background_rate: args.fill_rate,
            ..PagerConfig::default()
        },
        ..MicroOptions::new(guest)
    };
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
    let report = vm.run()?;
    if args.json {
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
                "faultline: finished {:.1} ms after VM creation began",
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
    report.check()?;
    // Guests that sum page contents must agree with what the host reads from guest memory.
    if let Some(index) = guest.checksum_report {
        let guest_sum = report
            .summed_report(index)
            .context("the guest reported no checksum")?;
        let host_sum = host_checksum(vm.vm.ram(), vm.range);
        if guest_sum != host_sum {
            bail!(
                "memory check failed: guest checksum {guest_sum:#x} != host checksum {host_sum:#x}"
            );
        }
        if !args.json {
            println!("faultline: memory check ok (guest and host checksums are {host_sum:#x})");
        }
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
        Command::Run(args) => match (&args.guest, &args.kernel) {
            (Some(name), _) => run_micro(&args, name),
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
