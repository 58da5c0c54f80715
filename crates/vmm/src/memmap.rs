//! How guest RAM is mapped into KVM, and what follows from it: the memslots, page tracking
//! (tracked frames become read-only memslots or holes), the accesses that exit to user space
//! because of it, and the dirty log. Every memslot change the VMM makes goes through here, so
//! tracking and dirty logging survive each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::control::{PauseError, RunControl};
use crate::dirty::{DirtyError, DirtyLog, DirtyMode, DirtyPages};
use crate::memory::{read_host, write_host, GuestRam};
use crate::memslots::{MemslotError, Memslots};
use crate::tracking::{
    check_range, AccessBytes, NotifierId, Notifiers, TrackError, TrackEvent, TrackMode,
    TrackNotifier, TrackTable, TrackedRange,
};
use crate::PAGE_SIZE;

/// A guest access that exited to user space.
pub(crate) enum GuestAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Guest RAM as KVM sees it.
pub struct MemoryMap {
    fd: Arc<VmFd>,
    ram: GuestRam,
    control: Arc<RunControl>,
    /// Held for the whole of a tracking change (pause included), so changes never interleave.
    changing: Mutex<()>,
    /// The memslots; held briefly (a vCPU whose dirty ring is full takes it too).
    slots: Mutex<Memslots>,
    table: RwLock<TrackTable>,
    notifiers: Notifiers,
    dirty: DirtyLog,
    /// Whether `Vm::run` harvests the dirty rings while the vCPUs run (the default).
    background_harvest: AtomicBool,
}

impl MemoryMap {
    /// Creates the memslots for `ram` (before the irqchip: see `Vm::new`) and prepares dirty
    /// logging in `mode` (before any vCPU exists).
    pub(crate) fn new(
        kvm: &Kvm,
        fd: Arc<VmFd>,
        ram: GuestRam,
        control: Arc<RunControl>,
        mode: DirtyMode,
    ) -> Result<Self, TrackError> {
        let dirty = DirtyLog::new(kvm, &fd, mode, ram.size() / PAGE_SIZE)?;
        let mut slots = Memslots::new(&ram, kvm.get_nr_memslots(), mode != DirtyMode::Off);
        let layout = slots.layout([]);
        slots.apply(&fd, &layout)?;
        Ok(MemoryMap {
            fd,
            ram,
            control,
            changing: Mutex::new(()),
            slots: Mutex::new(slots),
            table: RwLock::new(TrackTable::default()),
            notifiers: Notifiers::default(),
            dirty,
            background_harvest: AtomicBool::new(true),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Memslots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn table(&self) -> RwLockReadGuard<'_, TrackTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Starts tracking `[gpa, gpa + len)` in `mode` for one more user.
    pub fn track(&self, gpa: u64, len: u64, mode: TrackMode) -> Result<(), TrackError> {
        self.track_users(gpa, len, mode, 1)
    }

    /// Starts tracking `[gpa, gpa + len)` in `mode` for `users` more users (a restore puts a
    /// snapshot's table back this way).
    pub fn track_users(
        &self,
        gpa: u64,
        len: u64,
        mode: TrackMode,
        users: u32,
    ) -> Result<(), TrackError> {
        check_range(&self.ram, gpa, len)?;
        self.change(|table| {
            table.add(gpa, len, mode, users);
            Ok(())
        })
    }

    /// One user stops tracking `[gpa, gpa + len)` in `mode`.
    pub fn untrack(&self, gpa: u64, len: u64, mode: TrackMode) -> Result<(), TrackError> {
        check_range(&self.ram, gpa, len)?;
        self.change(|table| table.remove(gpa, len, mode))
    }

    /// The mode the frame holding `gpa` is tracked in, if any.
    pub fn tracked_mode(&self, gpa: u64) -> Option<TrackMode> {
        self.table().mode_of(gpa)
    }

    /// The tracked frames, as runs.
    pub fn tracked(&self) -> Vec<TrackedRange> {
        self.table().ranges()
    }

    /// How many memslots guest RAM takes now.
    pub fn memslot_count(&self) -> usize {
        self.slots().count()
    }

    /// Registers a notifier for every tracking event from now on.
    pub fn register(&self, notifier: Arc<dyn TrackNotifier>) -> NotifierId {
        self.notifiers.register(notifier)
    }

    /// Unregisters a notifier; false if it was not registered.
    pub fn unregister(&self, id: NotifierId) -> bool {
        self.notifiers.unregister(id)
    }

    /// Applies `edit` to a copy of the tracking table and makes the memslots match it; the
    /// table and the memslots change together or not at all.
    fn change(
        &self,
        edit: impl FnOnce(&mut TrackTable) -> Result<(), TrackError>,
    ) -> Result<(), TrackError> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut after = self.table().clone();
        edit(&mut after)?;
        let (layout, doomed) = {
            let slots = self.slots();
            let layout = slots.layout(after.backings());
            // Refused before any vCPU is paused for it.
            slots.check_fits(&layout)?;
            let doomed = slots.doomed(&layout);
            (layout, doomed)
        };
        // Running vCPUs wait out a change that deletes slots: between a slot's deletion and
        // its replacement, an instruction fetch or a page-table walk there would find no
        // memslot (only data accesses exit to user space), and with dirty logging on, a write
        // between reading the doomed slot's log and deleting the slot would be lost. (They are
        // paused before the memslots are locked: a vCPU with a full dirty ring needs that lock
        // to park.)
        let _paused = (!doomed.is_empty())
            .then(|| PausedFor::change(&self.control))
            .transpose()?;
        let mut slots = self.slots();
        self.dirty.save_before_delete(&self.fd, &slots, &doomed)?;
        // The table first: an access in the instant a slot is being replaced exits to user
        // space, which then reports it by the new table (and always completes it).
        let before = std::mem::replace(
            &mut *self.table.write().unwrap_or_else(|e| e.into_inner()),
            after,
        );
        if let Err(e) = slots.apply(&self.fd, &layout) {
            *self.table.write().unwrap_or_else(|e| e.into_inner()) = before;
            return Err(e.into());
        }
        Ok(())
    }

    /// Completes a guest access that exited to user space at `gpa` inside RAM: a tracked
    /// frame (reported to the notifiers) or a frame whose memslot is being replaced. Returns
    /// false if the memory cannot be read or written (a page that could not be provided).
    pub(crate) fn complete_access(&self, vcpu: u8, gpa: u64, access: GuestAccess<'_>) -> bool {
        let len = match &access {
            GuestAccess::Read(buf) => buf.len(),
            GuestAccess::Write(data) => data.len(),
        } as u64;
        let Some(host) = self.ram.host_range(gpa, len) else {
            return false;
        };
        let event = match access {
            GuestAccess::Read(buf) => {
                if read_host(host as u64, buf).is_err() {
                    return false;
                }
                (self.table().mode_of(gpa) == Some(TrackMode::Access)).then_some(TrackEvent::Read {
                    vcpu,
                    gpa,
                    len: len as u8,
                })
            }
            GuestAccess::Write(data) => {
                if write_host(host as u64, data).is_err() {
                    return false;
                }
                for page in [gpa, gpa + len - 1] {
                    if let Some(index) = self.ram.page_index(page) {
                        self.dirty.mark_written(index);
                    }
                }
                self.table().mode_of(gpa).map(|_| TrackEvent::Write {
                    vcpu,
                    gpa,
                    data: AccessBytes::new(data),
                })
            }
        };
        if let Some(event) = event {
            self.notifiers.notify(&event);
        }
        true
    }

    /// Ends all tracking because the VM's memory is going away (its run is over, or the VM is
    /// dropped): each run of tracked frames is reported as removed.
    pub fn end_tracking(&self) {
        let table = std::mem::take(&mut *self.table.write().unwrap_or_else(|e| e.into_inner()));
        for (gpa, len) in table.extents() {
            self.notifiers
                .notify(&TrackEvent::RegionRemoved { gpa, len });
        }
    }

    /// How guest writes are logged now.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.dirty.mode()
    }

    /// Maps a new vCPU's dirty ring (ring mode).
    pub(crate) fn map_ring(&self, vcpu: &VcpuFd) -> Result<(), DirtyError> {
        self.dirty.map_ring(vcpu)
    }

    /// Whether the dirty rings are harvested in the background while the vCPUs run (on by
    /// default). Off, they are harvested only on ring-full exits and takes: benchmarks measure
    /// a take that way, and tests make rings fill.
    pub fn set_background_harvest(&self, on: bool) {
        self.background_harvest.store(on, Ordering::Relaxed);
    }

    /// Whether the dirty rings are to be harvested in the background now.
    pub(crate) fn background_harvest(&self) -> bool {
        matches!(self.dirty.mode(), DirtyMode::Ring(_))
            && self.background_harvest.load(Ordering::Relaxed)
    }

    /// Harvests the dirty rings into the pages the next take reports (so that a vCPU whose
    /// ring is full can run on); returns how many entries there were.
    pub(crate) fn harvest_rings(&self) -> Result<u32, DirtyError> {
        let slots = self.slots();
        self.dirty.harvest_rings(&self.fd, &slots)
    }

    /// The pages written since the previous take; `None` when dirty logging is off.
    pub fn take_dirty_pages(&self) -> Result<Option<DirtyPages>, DirtyError> {
        let slots = self.slots();
        self.dirty.take(&self.fd, &slots)
    }

    /// The pages written since the last peek (the next take still reports them).
    pub fn peek_dirty_pages(&self) -> Result<Option<DirtyPages>, DirtyError> {
        let slots = self.slots();
        self.dirty.peek(&self.fd, &slots)
    }

    /// Gives back pages a failed snapshot took, so that the next take reports them again.
    pub fn return_dirty_pages(&self, pages: &DirtyPages) {
        self.dirty.give_back(pages);
    }

    /// Switches dirty logging on or off for every memslot (tracked frames stay tracked).
    /// Switching it on marks every page dirty: writes while it was off are unknown.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), MemslotError> {
        let _changing = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots = self.slots();
        if slots.log_dirty() == on {
            return Ok(());
        }
        slots.set_log_dirty(&self.fd, on)?;
        self.dirty.set_enabled(on);
        Ok(())
    }
}

/// The VM paused for a memslot change, resumed when dropped (if this change paused it). A VM
/// already paused stays paused: whoever paused it must not resume it during a tracking change
/// (the API runs tracking changes, pauses and resumes one at a time).
struct PausedFor<'a> {
    control: Option<&'a RunControl>,
}

impl<'a> PausedFor<'a> {
    fn change(control: &'a RunControl) -> Result<Self, PauseError> {
        match control.pause(crate::vm::PAUSE_TIMEOUT) {
            Ok(_) => Ok(PausedFor {
                control: Some(control),
            }),
            // Not running or paused already: no vCPU can write during the change.
            Err(PauseError::NotRunning | PauseError::AlreadyPaused) => {
                Ok(PausedFor { control: None })
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for PausedFor<'_> {
    fn drop(&mut self) {
        if let Some(control) = self.control {
            if let Err(e) = control.resume() {
                tracing::error!("cannot resume the VM after a memslot change: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map over 8 MiB of RAM in a VM without vCPUs, or `None` without KVM.
    fn map(mode: DirtyMode) -> Option<MemoryMap> {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm");
            return None;
        };
        let fd = Arc::new(kvm.create_vm().unwrap());
        let ram = GuestRam::new(8 << 20).unwrap();
        let control = Arc::new(RunControl::default());
        Some(MemoryMap::new(&kvm, fd, ram, control, mode).unwrap())
    }

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl TrackNotifier for Count {
        fn notify(&self, _: &TrackEvent) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn an_access_that_exits_while_its_memslot_is_replaced_completes_unreported() {
        let Some(map) = map(DirtyMode::Bitmap) else {
            return;
        };
        let count = Arc::new(Count::default());
        map.register(count.clone());
        map.track(0x2000, PAGE_SIZE, TrackMode::Write).unwrap();
        map.take_dirty_pages().unwrap();
        // An untracked frame: the access is completed, not reported, and its page is dirty.
        assert!(map.complete_access(0, 0x5008, GuestAccess::Write(&[1, 2, 3, 4])));
        let mut back = [0u8; 4];
        assert!(map.complete_access(0, 0x5008, GuestAccess::Read(&mut back)));
        assert_eq!(back, [1, 2, 3, 4]);
        assert_eq!(map.ram().read_u64(0x5008), Some(0x0403_0201));
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        assert!(map.take_dirty_pages().unwrap().unwrap().contains(5));
        // A tracked one is reported; memory that is not RAM is not completed.
        assert!(map.complete_access(0, 0x2010, GuestAccess::Write(&[9])));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(!map.complete_access(0, 8 << 20, GuestAccess::Write(&[9])));
    }

    #[test]
    fn more_ranges_than_memslots_allow_are_refused_whole() {
        let Some(map) = map(DirtyMode::Off) else {
            return;
        };
        map.slots().set_max(4);
        // Plain, read-only, plain: 3 slots.
        map.track(0x1000, PAGE_SIZE, TrackMode::Write).unwrap();
        let table = map.tracked();
        // Two more would be needed.
        let error = map.track(0x3000, PAGE_SIZE, TrackMode::Write).unwrap_err();
        assert!(
            error.to_string().contains("need 5 memslots; KVM allows 4"),
            "{error}"
        );
        assert_eq!(map.tracked(), table);
        assert_eq!(map.memslot_count(), 3);
        // An adjacent frame shares the read-only slot, and a hole takes none.
        map.track(0x2000, PAGE_SIZE, TrackMode::Write).unwrap();
        map.track(0x5000, PAGE_SIZE, TrackMode::Access).unwrap();
        assert_eq!(map.memslot_count(), 4);
    }
}
