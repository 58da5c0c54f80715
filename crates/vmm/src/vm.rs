//! A KVM virtual machine: guest RAM as memslots, the in-kernel irqchip and PIT, vCPUs on their
//! own threads, and the legacy devices.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::VcpuEntry;
use crate::control::{PauseError, RunControl, StopReason};
use crate::cpuid::{self, CpuidConfig};
use crate::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use crate::dirty::{DirtyError, DirtyMode, DirtyPages};
use crate::memmap::MemoryMap;
use crate::memory::GuestRam;
use crate::state::{self, DeviceState, VcpuState, VmState};
use crate::tracking::TrackError;
use crate::vcpu::{Vcpu, VcpuError, VcpuOutcome};

/// Where KVM puts the TSS and identity-map pages it needs (just below the 4 GiB BIOS area).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// How often a stopping VM re-kicks vCPUs that have not left KVM_RUN yet.
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How often the dirty rings are harvested while the vCPUs run.
const RING_HARVEST_INTERVAL: Duration = Duration::from_millis(1);
/// How often a running VM checks for a stop requested from outside the vCPU threads.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it? root or the kvm group is needed)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The vCPU count is out of range.
    #[error("{0} vCPUs requested: faultline supports 1 to {1}")]
    VcpuCount(u8, u8),
    /// Setting up a vCPU failed.
    #[error("cannot set up the vCPU")]
    Vcpu(#[from] VcpuError),
    /// A vCPU failed while the guest ran.
    #[error("the guest stopped with an error")]
    VcpuRun(#[source] VcpuError),
    /// The serial interrupt eventfd could not be created.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {0}")]
    Thread(u8, #[source] std::io::Error),
    /// The SIGBUS handler (memory errors on vCPU threads) could not be installed.
    #[error("cannot install the SIGBUS handler")]
    Sigbus(#[source] std::io::Error),
    /// The entry list does not match the vCPU count.
    #[error("{entries} vCPU entries for {vcpus} vCPUs")]
    EntryCount { entries: usize, vcpus: usize },
    /// Saved state does not fit this VM.
    #[error("the saved state does not fit this VM: {0}")]
    StateMismatch(String),
    /// Pausing or resuming failed.
    #[error("cannot pause or resume the VM")]
    Pause(#[from] PauseError),
    /// Dirty pages were asked for, but the VM does not track them.
    #[error("dirty page tracking is off (start the VM with dirty tracking)")]
    DirtyTrackingOff,
    /// The VM is running, so its vCPUs cannot be read from this thread.
    #[error("the VM is running: pause it first")]
    Running,
    /// Guest RAM could not be mapped into KVM (memslots, tracking, dirty logging).
    #[error("cannot map guest RAM into KVM")]
    Memory(#[from] TrackError),
    /// Reading or setting up the dirty log failed.
    #[error("dirty page logging failed")]
    Dirty(#[from] DirtyError),
}

/// Called on each vCPU thread as it starts, with the vCPU index and the thread's id (so that,
/// say, a pager can tell vCPU faults from others).
#[derive(Clone)]
pub struct VcpuThreadHook(pub Arc<dyn Fn(u8, u32) + Send + Sync>);

impl std::fmt::Debug for VcpuThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VcpuThreadHook")
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub cpuid: CpuidConfig,
    pub console: ConsoleSink,
    pub on_vcpu_thread: Option<VcpuThreadHook>,
    /// Log guest writes per page (KVM_MEM_LOG_DIRTY_PAGES), for diff snapshots.
    pub track_dirty: bool,
    /// Log them through a per-vCPU dirty ring of this many entries instead of the bitmap
    /// (implies `track_dirty`).
    pub dirty_ring: Option<u32>,
}

impl VmConfig {
    /// How guest writes are to be logged.
    pub fn dirty_mode(&self) -> DirtyMode {
        match (self.dirty_ring, self.track_dirty) {
            (Some(entries), _) => DirtyMode::Ring(entries),
            (None, true) => DirtyMode::Bitmap,
            (None, false) => DirtyMode::Off,
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            cpuid: CpuidConfig::default(),
            console: ConsoleSink::stdout(),
            on_vcpu_thread: None,
            track_dirty: false,
            dirty_ring: None,
        }
    }
}

/// Everything KVM holds for a VM, besides its memory.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceState,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Each vCPU's result, by index.
    pub vcpus: Vec<VcpuOutcome>,
    /// Why the VM stopped as a whole, if it did (micro-guests simply exit vCPU by vCPU).
    pub stop_reason: Option<StopReason>,
    /// When the first micro-guest instruction reported in (the STARTED port).
    pub first_instruction: Option<Instant>,
    /// When the last micro-guest vCPU exited through the test device.
    pub last_exit: Option<Instant>,
}

/// The largest vCPU count we accept.
pub const MAX_VCPUS: u8 = 32;

/// A VM with its RAM, devices and vCPUs.
pub struct Vm {
    _kvm: Kvm,
    vcpus: Vec<Vcpu>,
    /// By vCPU index: the restored state of a vCPU that had finished when it was saved. Such
    /// a vCPU is not run again; its recorded outcome stands.
    finished: Vec<Option<VcpuState>>,
    on_vcpu_thread: Option<VcpuThreadHook>,
    handle: VmHandle,
}

/// What another thread may do with a VM while it runs: pause, resume, stop, read VM-wide and
/// device state, dirty pages and memory. Cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    fd: Arc<VmFd>,
    memory: Arc<MemoryMap>,
    devices: Arc<LegacyDevices>,
    control: Arc<RunControl>,
    vcpu_count: u8,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// How long a pause waits for the vCPUs to park.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VmHandle {
    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        self.memory.ram()
    }
    /// Guest RAM as KVM maps it: page tracking and the dirty log.
    pub fn memory(&self) -> &Arc<MemoryMap> {
        &self.memory
    }
    /// The run control (stop, pause).
    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }
    /// Whether guest writes are logged.
    pub fn tracks_dirty(&self) -> bool {
        self.memory.dirty_mode() != DirtyMode::Off
    }

    /// Pauses the running VM; returns the vCPUs' saved states.
    pub fn pause(&self) -> Result<Vec<VcpuState>, VmError> {
        Ok(self.control.pause(PAUSE_TIMEOUT)?)
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.control.resume()?)
    }

    /// The whole machine state of a paused VM.
    pub fn paused_state(&self) -> Result<MachineState, VmError> {
        let vcpus = self.control.paused_states(PAUSE_TIMEOUT)?;
        Ok(MachineState {
            vcpus,
            vm: self.vm_state()?,
            devices: self.devices.state(),
        })
    }

    /// VM-wide KVM state (irqchips, PIT, clock).
    pub fn vm_state(&self) -> Result<VmState, VmError> {
        state::save_vm(&self.fd).map_err(|(what, e)| VmError::Kvm(what, e))
    }

    /// The pages guest writes dirtied since the previous call (or since tracking began), and
    /// starts a new interval. Read a page's content after this call, never before.
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, VmError> {
        self.memory
            .take_dirty_pages()?
            .ok_or(VmError::DirtyTrackingOff)
    }

    /// Puts pages taken by a snapshot that then failed back, so that the next
    /// [`take_dirty_pages`](Self::take_dirty_pages) reports them again: the dirty log ends as
    /// if the failed snapshot had not been taken.
    pub fn return_dirty_pages(&self, pages: DirtyPages) {
        self.memory.return_dirty_pages(&pages);
    }
}

impl Vm {
    /// Creates a VM over `ram`: memslots, irqchip, PIT, devices and `config.vcpus` vCPUs.
    pub fn new(config: &VmConfig, ram: GuestRam) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus, MAX_VCPUS));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        let fd = Arc::new(fd);
        let control = Arc::new(RunControl::default());
        let memory = Arc::new(MemoryMap::new(
            &kvm,
            Arc::clone(&fd),
            ram,
            Arc::clone(&control),
            config.dirty_mode(),
        )?);

        // The irqchip comes after the memslots: on the hosts we measured, adding a memslot to a VM
        // that already has an in-kernel irqchip costs 5-7 ms instead of 0.1-0.3 ms.
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        fd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
        let devices = Arc::new(
            LegacyDevices::new(serial_irq, config.console.clone(), Arc::clone(&control))
                .map_err(VmError::EventFd)?,
        );
        let msr_list: Arc<[u32]> = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .into();

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(index))
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            let mut cpuid = supported.clone();
            cpuid::customize(&mut cpuid, &config.cpuid, index, config.vcpus);
            vcpu_fd
                .set_cpuid2(&cpuid)
                .map_err(|source| VcpuError::Kvm {
                    vcpu: index,
                    what: "KVM_SET_CPUID2",
                    source,
                })?;
            memory.map_ring(&vcpu_fd)?;
            vcpus.push(Vcpu::new(
                index,
                vcpu_fd,
                Arc::clone(&msr_list),
                Arc::clone(&memory),
            ));
        }

        // The handlers are process-wide; installing them again is harmless.
        register_signal_handler(kick_signal(), kick_handler).map_err(VmError::Signal)?;
        crate::sigbus::install().map_err(VmError::Sigbus)?;
        Ok(Vm {
            _kvm: kvm,
            finished: vec![None; vcpus.len()],
            vcpus,
            on_vcpu_thread: config.on_vcpu_thread.clone(),
            handle: VmHandle {
                fd,
                memory,
                devices,
                control,
                vcpu_count: config.vcpus,
            },
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        self.handle.ram()
    }

    /// The KVM VM, for VM-wide state queries.
    pub fn fd(&self) -> &VmFd {
        &self.handle.fd
    }

    /// A handle for other threads (API server, snapshots).
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Saves the whole machine state of a VM that is not running (created and not started,
    /// or after its run ended).
    pub fn save_state(&mut self) -> Result<MachineState, VmError> {
        if self.vcpus.len() != usize::from(self.handle.vcpu_count) {
            return Err(VmError::Running);
        }
        let vcpus = self
            .vcpus
            .iter_mut()
            .map(Vcpu::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            vcpus,
            vm: self.handle.vm_state()?,
            devices: self.handle.devices.state(),
        })
    }

    /// Puts a saved machine state into this VM, which must not have run. vCPUs that had
    /// finished when it was saved stay finished: [`run`](Self::run) reports their outcome.
    pub fn restore_state(&mut self, state: &MachineState) -> Result<(), VmError> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(VmError::StateMismatch(format!(
                "{} saved vCPUs, {} in this VM",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        state::restore_vm(&self.handle.fd, &state.vm).map_err(|(what, e)| VmError::Kvm(what, e))?;
        for (vcpu, saved) in self.vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(saved)?;
        }
        self.finished = state
            .vcpus
            .iter()
            .map(|saved| saved.finished.is_some().then(|| saved.clone()))
            .collect();
        self.handle
            .devices
            .restore(&state.devices)
            .map_err(|e| VmError::StateMismatch(e.to_string()))
    }

    /// The vCPUs, by index.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// The legacy devices (to feed serial input).
    pub fn devices(&self) -> Arc<LegacyDevices> {
        Arc::clone(&self.handle.devices)
    }

    /// Stops a running VM from another thread.
    pub fn control(&self) -> Arc<RunControl> {
        Arc::clone(&self.handle.control)
    }

    /// Sets every vCPU's entry state; `entries[i]` is for vCPU `i`.
    pub fn set_entries(&self, entries: &[VcpuEntry]) -> Result<(), VmError> {
        if entries.len() != self.vcpus.len() {
            return Err(VmError::EntryCount {
                entries: entries.len(),
                vcpus: self.vcpus.len(),
            });
        }
        for (vcpu, entry) in self.vcpus.iter().zip(entries) {
            vcpu.configure(entry)?;
        }
        Ok(())
    }

    /// Runs every vCPU on its own thread until all have exited or the VM is stopped. If a vCPU
    /// fails (or its thread panics), the others are stopped and the first error is returned.
    /// If a thread cannot be started, those already started are stopped and joined first.
    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        let control = Arc::clone(&self.handle.control);
        control.begin_run(self.handle.vcpu_count);
        let (done_tx, done_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        let mut outcomes = Vec::new();
        let mut idle = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            // A vCPU restored after it had finished keeps its outcome and does not run.
            if let Some(state) = self.finished[usize::from(vcpu.index())].as_ref() {
                let outcome = state
                    .finished
                    .clone()
                    .expect("only finished states are kept");
                control.leave(vcpu.index(), Ok(state.clone()));
                outcomes.push(outcome);
                idle.push(vcpu);
                continue;
            }
            if spawn_error.is_some() {
                idle.push(vcpu);
                continue;
            }
            let devices = Arc::clone(&self.handle.devices);
            let thread_control = Arc::clone(&control);
            let done = done_tx.clone();
            let hook = self.on_vcpu_thread.clone();
            let index = vcpu.index();
            let spawned = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Says the thread is done however it ends (stopping the VM if it ends by
                    // a panic outside the vCPU loop), so `run` never waits for a lost thread.
                    let _departure = Departure {
                        control: &thread_control,
                        index,
                        done,
                    };
                    let mut vcpu = vcpu;
                    let result = run_vcpu_thread(&mut vcpu, hook, &devices, &thread_control);
                    (vcpu, result)
                });
            match spawned {
                Ok(handle) => handles.push((index, handle)),
                Err(e) => {
                    // The vCPU went with the closure: this VM cannot run again.
                    control.request_stop(StopReason::VcpuError { vcpu: index });
                    spawn_error = Some(VmError::Thread(index, e));
                }
            }
        }
        drop(done_tx);

        // Wait for the vCPU threads; once a stop is requested, kick those still in KVM_RUN
        // (again every KICK_INTERVAL, in case a kick landed just before they entered it).
        // With a dirty ring, this thread also harvests the rings while the vCPUs run, so that
        // they rarely fill (a vCPU that fills its ring faster than it exits overflows it).
        let mut running = handles.len();
        while running > 0 {
            let harvest = self.handle.memory.background_harvest();
            let wait = if control.should_stop() {
                KICK_INTERVAL
            } else if harvest {
                RING_HARVEST_INTERVAL
            } else {
                STOP_POLL_INTERVAL
            };
            if harvest {
                if let Err(e) = self.handle.memory.harvest_rings() {
                    tracing::warn!("cannot harvest the dirty rings: {e}");
                }
            }
            match done_rx.recv_timeout(wait) {
                Ok(()) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if control.should_stop() {
                control.kick_all();
            }
        }

        self.vcpus = idle;
        let mut first_error = None;
        for (index, handle) in handles {
            // The thread catches panics of the vCPU loop, so a join error would be a panic in
            // the few lines around it: report it like a vCPU panic.
            let Ok((vcpu, result)) = handle.join() else {
                first_error.get_or_insert(VcpuError::Panicked {
                    vcpu: index,
                    message: "the thread ended abnormally".into(),
                });
                continue;
            };
            self.vcpus.push(vcpu);
            match result {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.vcpus.sort_by_key(Vcpu::index);
        outcomes.sort_by_key(|o| o.vcpu);
        if let Some(e) = spawn_error {
            return Err(e);
        }
        if let Some(e) = first_error {
            return Err(VmError::VcpuRun(e));
        }
        Ok(RunOutcome {
            vcpus: outcomes,
            stop_reason: control.reason(),
            first_instruction: control.started_at(),
            last_exit: control.last_exit(),
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The VM's memory goes with it: tracking ends, and its notifiers are told.
        self.handle.memory.end_tracking();
    }
}

/// Dropped as a vCPU thread ends: tells `Vm::run` the thread is done and, if it ends by a
/// panic that escaped the vCPU loop's own catch, marks the vCPU finished and stops the VM.
struct Departure<'a> {
    control: &'a RunControl,
    index: u8,
    done: mpsc::Sender<()>,
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control
                .leave(self.index, Err("the vCPU thread panicked".into()));
            self.control
                .request_stop(StopReason::VcpuError { vcpu: self.index });
        }
        let _ = self.done.send(());
    }
}

/// The body of a vCPU thread: the thread hook, the run loop, and leaving the run with the
/// state the vCPU ended in. A panic anywhere in it stops the VM with an error naming the vCPU
/// instead of leaving `Vm::run` waiting for a thread that is gone.
fn run_vcpu_thread(
    vcpu: &mut Vcpu,
    hook: Option<VcpuThreadHook>,
    devices: &LegacyDevices,
    control: &RunControl,
) -> Result<VcpuOutcome, VcpuError> {
    let index = vcpu.index();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(VcpuThreadHook(hook)) = &hook {
            hook(
                index,
                rustix::thread::gettid().as_raw_nonzero().get() as u32,
            );
        }
        control.enter(index);
        vcpu.run(devices, control)
    }));
    let result = result.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(VcpuError::Panicked {
            vcpu: index,
            message,
        })
    });
    let final_state = match &result {
        Ok(outcome) => vcpu
            .save_state()
            .map(|mut state| {
                state.finished = Some(outcome.clone());
                state
            })
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    // Whether or not it entered its loop (the hook may have panicked first), the vCPU
    // leaves the run with its final state.
    control.leave(index, final_state);
    if result.is_err() {
        control.request_stop(StopReason::VcpuError { vcpu: index });
    }
    result
}
