//! KVM memslots over guest RAM. Each RAM region is cut into stretches of one kind, each its
//! own memslot: plain RAM, read-only RAM (KVM_MEM_READONLY: the guest's writes exit to user
//! space as MMIO, with their data) and holes (no memslot: every access exits). Page tracking
//! chooses the kinds; this module only turns a wanted layout into memslot changes.
//!
//! Slot ids are handed out in turn and not reused until they wrap, so a dirty-ring entry
//! harvested late never names a slot that has since moved elsewhere.

use std::collections::BTreeSet;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use crate::memory::GuestRam;
use crate::PAGE_SIZE;

/// What backs a stretch of guest RAM in KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// An ordinary memslot.
    Plain,
    /// A read-only memslot: writes exit with their data.
    ReadOnly,
    /// No memslot: reads and writes exit.
    Hole,
}

/// One stretch of the wanted layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stretch {
    pub gpa: u64,
    pub size: u64,
    pub backing: Backing,
}

/// A memslot KVM holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub readonly: bool,
}

/// Errors changing memslots.
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// The layout needs more memslots than KVM allows.
    #[error("the tracked ranges need {needed} memslots; KVM allows {max} (track fewer, or adjacent, ranges)")]
    TooMany { needed: usize, max: usize },
    /// KVM refused a memslot change.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot} at {gpa:#x} ({size} bytes)")]
    Kvm {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A guest RAM region as memslots see it.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    host: u64,
    /// Index of its first page in the memory-image layout (regions back to back).
    first_page: u64,
}

/// The memslots of a VM.
#[derive(Debug)]
pub(crate) struct Memslots {
    regions: Vec<Region>,
    /// Live slots, lowest address first.
    slots: Vec<Slot>,
    next_id: u32,
    max: usize,
    log_dirty: bool,
}

impl Memslots {
    /// No slots yet: [`apply`](Self::apply) the plain layout to create them.
    pub fn new(ram: &GuestRam, max: usize, log_dirty: bool) -> Self {
        let mut first_page = 0;
        let regions = ram
            .regions()
            .iter()
            .map(|r| {
                let region = Region {
                    gpa: r.gpa(),
                    size: r.size(),
                    host: r.host_addr() as u64,
                    first_page,
                };
                first_page += r.size() / PAGE_SIZE;
                region
            })
            .collect();
        Memslots {
            regions,
            slots: Vec::new(),
            next_id: 0,
            max,
            log_dirty,
        }
    }

    /// Lowers the most memslots used (tests: the host allows thousands).
    #[cfg(test)]
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// How many slots KVM holds.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// Whether slots log dirty pages.
    pub fn log_dirty(&self) -> bool {
        self.log_dirty
    }

    /// The live slot with id `id`.
    pub fn slot(&self, id: u32) -> Option<Slot> {
        self.slots.iter().find(|s| s.id == id).copied()
    }

    /// Ids of the slots whose dirty log can hold pages (the writable ones).
    pub fn logged_slots(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|s| !s.readonly)
            .map(|s| s.id)
            .collect()
    }

    /// Index in the memory-image layout of the page at `gpa`, which must be RAM.
    pub fn page_index(&self, gpa: u64) -> u64 {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .map_or(u64::MAX, |r| r.first_page + (gpa - r.gpa) / PAGE_SIZE)
    }

    /// The page a dirty-ring entry (slot id, page offset in the slot) names, if that slot is
    /// still there.
    pub fn page_of_slot_offset(&self, slot: u32, offset: u64) -> Option<u64> {
        let slot = self.slot(slot)?;
        (offset < slot.size / PAGE_SIZE).then(|| self.page_index(slot.gpa + offset * PAGE_SIZE))
    }

    /// The layout for RAM whose pages `special` (sorted `(page gpa, backing)`, never Plain)
    /// are read-only or holes: adjacent pages of one backing share a stretch.
    pub fn layout(&self, special: impl IntoIterator<Item = (u64, Backing)>) -> Vec<Stretch> {
        let mut special = special.into_iter().peekable();
        let mut out: Vec<Stretch> = Vec::new();
        let push = |out: &mut Vec<Stretch>, gpa: u64, size: u64, backing: Backing| {
            if size == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.backing == backing && last.gpa + last.size == gpa => {
                    last.size += size
                }
                _ => out.push(Stretch { gpa, size, backing }),
            }
        };
        for region in &self.regions {
            let end = region.gpa + region.size;
            let mut at = region.gpa;
            // Regions never touch (the MMIO gap lies between them), so a stretch never spans two.
            while let Some(&(page, backing)) = special.peek() {
                if page >= end {
                    break;
                }
                special.next();
                if page < at {
                    continue;
                }
                push(&mut out, at, page - at, Backing::Plain);
                push(&mut out, page, PAGE_SIZE, backing);
                at = page + PAGE_SIZE;
            }
            push(&mut out, at, end - at, Backing::Plain);
        }
        out
    }

    /// Refuses a layout that needs more memslots than KVM allows.
    pub fn check_fits(&self, layout: &[Stretch]) -> Result<(), MemslotError> {
        let needed = Self::slots_needed(layout);
        if needed > self.max {
            return Err(MemslotError::TooMany {
                needed,
                max: self.max,
            });
        }
        Ok(())
    }

    /// How many memslots `layout` takes.
    pub fn slots_needed(layout: &[Stretch]) -> usize {
        layout.iter().filter(|s| s.backing != Backing::Hole).count()
    }

    fn host_of(&self, gpa: u64) -> u64 {
        let region = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            .expect("layouts only cover RAM");
        region.host + (gpa - region.gpa)
    }

    fn flags(&self, readonly: bool) -> u32 {
        let mut flags = 0;
        if readonly {
            flags |= KVM_MEM_READONLY;
        }
        if self.log_dirty {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        flags
    }

    fn set(&self, vm: &VmFd, slot: &Slot, size: u64) -> Result<(), MemslotError> {
        let region = kvm_userspace_memory_region {
            slot: slot.id,
            flags: self.flags(slot.readonly),
            guest_phys_addr: slot.gpa,
            memory_size: size,
            userspace_addr: self.host_of(slot.gpa),
        };
        // SAFETY: the host range is part of a guest RAM mapping that lives as long as the VM
        // (the VM owns the RAM); a size of 0 deletes the slot.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemslotError::Kvm {
            slot: slot.id,
            gpa: slot.gpa,
            size: slot.size,
            source,
        })
    }

    fn allocate_id(&mut self) -> u32 {
        let used: BTreeSet<u32> = self.slots.iter().map(|s| s.id).collect();
        loop {
            let id = self.next_id;
            self.next_id = (self.next_id + 1) % self.max as u32;
            if !used.contains(&id) {
                return id;
            }
        }
    }

    /// Which live slots `layout` would delete (those it does not keep as they are).
    pub fn doomed(&self, layout: &[Stretch]) -> Vec<u32> {
        self.slots
            .iter()
            .filter(|slot| !layout.iter().any(|s| same(s, slot)))
            .map(|s| s.id)
            .collect()
    }

    /// Makes KVM's memslots match `layout`: slots it keeps are untouched, others are deleted,
    /// then the new ones created. Refused whole if it needs too many slots; if KVM refuses a
    /// change part-way, the old slots are put back.
    pub fn apply(&mut self, vm: &VmFd, layout: &[Stretch]) -> Result<(), MemslotError> {
        self.check_fits(layout)?;
        let (kept, doomed): (Vec<Slot>, Vec<Slot>) = self
            .slots
            .iter()
            .partition(|slot| layout.iter().any(|s| same(s, slot)));
        for slot in &doomed {
            if let Err(e) = self.set(vm, slot, 0) {
                self.restore(vm, &kept, &doomed);
                return Err(e);
            }
        }
        self.slots = kept.clone();
        for stretch in layout {
            if stretch.backing == Backing::Hole || kept.iter().any(|slot| same(stretch, slot)) {
                continue;
            }
            let slot = Slot {
                id: self.allocate_id(),
                gpa: stretch.gpa,
                size: stretch.size,
                readonly: stretch.backing == Backing::ReadOnly,
            };
            if let Err(e) = self.set(vm, &slot, slot.size) {
                self.restore(vm, &kept, &doomed);
                return Err(e);
            }
            self.slots.push(slot);
        }
        self.slots.sort_by_key(|s| s.gpa);
        Ok(())
    }

    /// Puts back the slots of the layout before a failed [`apply`](Self::apply).
    fn restore(&mut self, vm: &VmFd, kept: &[Slot], doomed: &[Slot]) {
        for slot in std::mem::take(&mut self.slots) {
            if !kept.contains(&slot) {
                let _ = self.set(vm, &slot, 0);
            }
        }
        self.slots = kept.to_vec();
        for slot in doomed {
            match self.set(vm, slot, slot.size) {
                Ok(()) => self.slots.push(*slot),
                Err(e) => tracing::error!("cannot put memslot {} back: {e}", slot.id),
            }
        }
        self.slots.sort_by_key(|s| s.gpa);
    }

    /// Switches dirty logging on or off on every slot, in place.
    pub fn set_log_dirty(&mut self, vm: &VmFd, on: bool) -> Result<(), MemslotError> {
        let before = self.log_dirty;
        self.log_dirty = on;
        for slot in self.slots.clone() {
            if let Err(e) = self.set(vm, &slot, slot.size) {
                self.log_dirty = before;
                for slot in self.slots.clone() {
                    let _ = self.set(vm, &slot, slot.size);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

fn same(stretch: &Stretch, slot: &Slot) -> bool {
    stretch.backing != Backing::Hole
        && stretch.gpa == slot.gpa
        && stretch.size == slot.size
        && (stretch.backing == Backing::ReadOnly) == slot.readonly
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Memslots {
        Memslots {
            regions: vec![Region {
                gpa: 0,
                size: 16 * PAGE_SIZE,
                host: 0x7000_0000,
                first_page: 0,
            }],
            slots: Vec::new(),
            next_id: 0,
            max: 8,
            log_dirty: false,
        }
    }

    #[test]
    fn plain_ram_is_one_stretch() {
        assert_eq!(
            slots().layout([]),
            [Stretch {
                gpa: 0,
                size: 16 * PAGE_SIZE,
                backing: Backing::Plain
            }]
        );
    }

    #[test]
    fn tracked_pages_split_and_adjacent_ones_merge() {
        let p = PAGE_SIZE;
        let layout = slots().layout([
            (2 * p, Backing::ReadOnly),
            (3 * p, Backing::ReadOnly),
            (4 * p, Backing::Hole),
            (15 * p, Backing::ReadOnly),
        ]);
        let got: Vec<_> = layout
            .iter()
            .map(|s| (s.gpa / p, s.size / p, s.backing))
            .collect();
        assert_eq!(
            got,
            [
                (0, 2, Backing::Plain),
                (2, 2, Backing::ReadOnly),
                (4, 1, Backing::Hole),
                (5, 10, Backing::Plain),
                (15, 1, Backing::ReadOnly),
            ]
        );
        assert_eq!(Memslots::slots_needed(&layout), 4);
    }

    #[test]
    fn slot_ids_are_not_reused_until_they_wrap() {
        let mut m = slots();
        let a = m.allocate_id();
        let b = m.allocate_id();
        assert_eq!((a, b), (0, 1));
        m.slots.push(Slot {
            id: 2,
            gpa: 0,
            size: PAGE_SIZE,
            readonly: false,
        });
        assert_eq!(m.allocate_id(), 3, "a live id is skipped");
    }
}
