//! Which guest pages were written: one interface over KVM's two dirty-page mechanisms.
//!
//! - **Bitmap**: `KVM_GET_DIRTY_LOG` per memslot, with `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, so
//!   that reading the log does not re-protect anything: `KVM_CLEAR_DIRTY_LOG` then clears (and
//!   write-protects again) exactly the pages that were read, range by range.
//! - **Ring**: `KVM_CAP_DIRTY_LOG_RING`: each vCPU pushes the pages it dirties into a ring
//!   shared with user space. Harvesting reads the entries in order, marks each one for reset,
//!   and `KVM_RESET_DIRTY_RINGS` re-protects their pages; a vCPU whose ring fills exits
//!   (`KVM_EXIT_DIRTY_RING_FULL`) and harvests before it runs on.
//!
//! Either way, pages come out as a [`DirtyPages`] over RAM as a memory image lays it out
//! (regions back to back). Pages known dirty outside KVM's log are kept as *pending* and
//! added to the next take: pages faultline wrote for the guest (tracked writes, which KVM never
//! sees), pages harvested early (a full ring, a memslot about to be deleted), and pages a
//! failed snapshot gave back. A page's content must be read after the take that reported it:
//! a write after that take is reported by the next one.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use crate::memslots::Memslots;
use crate::PAGE_SIZE;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// A ring entry KVM has filled.
const GFN_DIRTY: u32 = 1;
/// A ring entry user space has harvested (KVM resets it on `KVM_RESET_DIRTY_RINGS`).
const GFN_RESET: u32 = 2;
/// Bytes of one ring entry (`struct kvm_dirty_gfn`).
const RING_ENTRY_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;
/// The smallest ring KVM accepts is one page of entries.
pub const MIN_RING_ENTRIES: u32 = PAGE_SIZE as u32 / RING_ENTRY_BYTES;

/// How guest writes are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyMode {
    /// Not logged: diff snapshots and pre-copy are not possible.
    #[default]
    Off,
    /// The per-memslot bitmap, cleared range by range.
    Bitmap,
    /// A per-vCPU ring of this many entries (a power of two).
    Ring(u32),
}

/// Errors of dirty-page logging.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The ring size is not one KVM can use.
    #[error("--dirty-ring {entries}: a dirty ring holds a power of two of entries, from {min} to {max} on this host")]
    RingSize { entries: u32, min: u32, max: u32 },
    /// KVM refused a ring of this size.
    #[error("--dirty-ring {entries}: this host's KVM refused a ring that small (it reserves entries of its own, more with Intel PML); try 1024 or more")]
    RingRefused { entries: u32 },
    /// The host's KVM has no dirty ring.
    #[error("this host's KVM does not offer the dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    RingUnsupported,
    /// KVM keeps saying a ring is full, but it holds nothing to harvest: it overflowed.
    #[error("vCPU {vcpu}'s dirty ring overflowed: KVM reports it full but it holds no entry to harvest (the vCPU dirtied more pages than the ring holds before it exited, as an instruction-emulating host lets it); use a larger --dirty-ring, or the bitmap (--track-dirty)")]
    RingOverflow { vcpu: u8 },
    /// A KVM call failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] std::io::Error),
}

/// Guest pages written since the last look, one bit per page of RAM with the regions back to
/// back (the layout of a memory image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// No page of `pages` dirty.
    pub fn new(pages: u64) -> Self {
        DirtyPages {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }
    /// The set a bitmap of `words` describes (bit `p % 64` of word `p / 64` is page `p`), or
    /// `None` if it has not exactly the words `pages` pages need.
    pub fn from_words(pages: u64, mut words: Vec<u64>) -> Option<Self> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        // Bits past the last page (KVM's bitmaps may have them, a peer's could) are not pages.
        if let (Some(last), used @ 1..) = (words.last_mut(), pages % 64) {
            *last &= (1 << used) - 1;
        }
        Some(DirtyPages { words, pages })
    }
    /// Every page of `pages` dirty.
    pub fn all(pages: u64) -> Self {
        let mut all = DirtyPages::new(pages);
        all.mark_range(0, pages);
        all
    }
    /// Whether page `page` was written.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    /// How many pages were written.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Pages of RAM covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// The bitmap: bit `p % 64` of word `p / 64` is page `p`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    /// The dirty pages, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.pages;
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    (bits != 0).then(|| {
                        let bit = u64::from(bits.trailing_zeros());
                        bits &= bits - 1;
                        w as u64 * 64 + bit
                    })
                })
            })
            // Bits past the last page (a bitmap from KVM rounds up to whole words) are not pages.
            .filter(move |&page| page < pages)
    }
    /// Marks page `page` dirty (pages beyond RAM are ignored).
    pub fn mark(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }
    /// Marks `count` pages from `first` dirty.
    pub fn mark_range(&mut self, first: u64, count: u64) {
        self.set_range(first, count, true);
    }
    /// Takes `count` pages from `first` out of the set (pages beyond RAM are ignored).
    pub fn unmark_range(&mut self, first: u64, count: u64) {
        self.set_range(first, count, false);
    }
    fn set_range(&mut self, first: u64, count: u64, dirty: bool) {
        let end = first.saturating_add(count).min(self.pages);
        let bit = |words: &mut [u64], page: u64| {
            let (word, mask) = (&mut words[(page / 64) as usize], 1u64 << (page % 64));
            *word = if dirty { *word | mask } else { *word & !mask };
        };
        let mut page = first;
        // Bit by bit up to a word boundary, whole words, then bit by bit again: marking all of
        // RAM (an overflowed ring, a first pass) costs a word per 64 pages.
        while page < end && !page.is_multiple_of(64) {
            bit(&mut self.words, page);
            page += 1;
        }
        while page + 64 <= end {
            self.words[(page / 64) as usize] = if dirty { u64::MAX } else { 0 };
            page += 64;
        }
        while page < end {
            bit(&mut self.words, page);
            page += 1;
        }
    }
    /// The first page of the set at or after `from`, a word of 64 pages at a time.
    pub fn first_from(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut word = self.words[index] & (u64::MAX << (from % 64));
        while word == 0 {
            index += 1;
            word = *self.words.get(index)?;
        }
        let page = index as u64 * 64 + u64::from(word.trailing_zeros());
        // Bits past the last page are not pages.
        (page < self.pages).then_some(page)
    }
    /// Whether any page of `[first, end)` is in the set, looking only at the words that hold
    /// those pages (not on to the next page in the set, as [`first_from`](Self::first_from)
    /// does, which can be all the way to the end).
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        let end = end.min(self.pages);
        if first >= end {
            return false;
        }
        let (first_word, last_word) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        (first_word..=last_word).any(|index| {
            let mut word = self.words[index];
            if index == first_word {
                word &= u64::MAX << (first % 64);
            }
            let after_last = end - index as u64 * 64;
            if index == last_word && after_last < 64 {
                word &= (1u64 << after_last) - 1;
            }
            word != 0
        })
    }
    /// How many pages from `from` on, up to `end`, are all in the set: the length of the run
    /// that starts there, a word of 64 pages at a time.
    pub fn run_length(&self, from: u64, end: u64) -> u64 {
        let end = end.min(self.pages);
        if from >= end {
            return 0;
        }
        let mut page = from;
        while page < end {
            let bit = page % 64;
            // The shifted word has zeros above its 64 - bit pages: the count stops there.
            let ones = u64::from((self.words[(page / 64) as usize] >> bit).trailing_ones());
            page += ones;
            if ones < 64 - bit {
                break;
            }
        }
        page.min(end) - from
    }
    /// Takes the pages of `other`, which must cover the same RAM, out of this set (false, and
    /// nothing taken, if it does not).
    pub fn remove(&mut self, other: &DirtyPages) -> bool {
        if other.pages != self.pages {
            return false;
        }
        for (word, gone) in self.words.iter_mut().zip(&other.words) {
            *word &= !gone;
        }
        true
    }
    /// How many pages of this set `other` (over the same RAM) does not have.
    pub fn count_outside(&self, other: &DirtyPages) -> u64 {
        self.words
            .iter()
            .zip(other.words.iter().chain(std::iter::repeat(&0)))
            .map(|(mine, theirs)| u64::from((mine & !theirs).count_ones()))
            .sum()
    }
    /// The pages of this set within `range` (by page index), over the same RAM.
    pub fn within(&self, range: std::ops::Range<u64>) -> DirtyPages {
        let (start, end) = (range.start.min(self.pages), range.end.min(self.pages));
        let mut out = DirtyPages::new(self.pages);
        if start >= end {
            return out;
        }
        let (first, last) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        out.words[first..=last].copy_from_slice(&self.words[first..=last]);
        // Clear the bits of the end words that lie outside the range.
        out.words[first] &= u64::MAX << (start % 64);
        if !end.is_multiple_of(64) {
            out.words[last] &= u64::MAX >> (64 - end % 64);
        }
        out
    }
    /// Adds the pages of `other`, which must cover the same RAM (false, and nothing added,
    /// if it does not).
    pub fn merge(&mut self, other: &DirtyPages) -> bool {
        if other.pages != self.pages {
            return false;
        }
        for (word, more) in self.words.iter_mut().zip(&other.words) {
            *word |= more;
        }
        true
    }
}

/// One vCPU's dirty ring, mapped from its vCPU file.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// Index (not wrapped) of the next entry to harvest.
    next: u32,
}

// SAFETY: the ring is a shared mapping that stays valid until `Drop`; every access goes
// through the `Mutex` in `DirtyLog` (entries' flags are read and written atomically, since
// KVM writes them concurrently).
unsafe impl Send for Ring {}

impl Ring {
    fn bytes(&self) -> usize {
        (self.count * RING_ENTRY_BYTES) as usize
    }

    /// The flags word of entry `index` (not wrapped).
    fn flags(&self, index: u32) -> &AtomicU32 {
        // SAFETY: the index is masked into the ring (a power-of-two count) and the mapping
        // lives as long as `self`; `flags` is the entry's first u32, aligned. KVM writes it
        // concurrently, so it is only ever accessed atomically.
        unsafe {
            let entry = self.entries.add((index & (self.count - 1)) as usize);
            AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags))
        }
    }

    /// Moves the entries KVM has published since the last harvest into `out`, in order, and
    /// marks them for reset; returns how many, and whether the ring was full (so KVM may have
    /// written over entries before they were harvested).
    fn harvest(&mut self, memslots: &Memslots, out: &mut DirtyPages) -> (u32, bool) {
        let mut harvested = 0;
        while harvested < self.count
            && self.flags(self.next).load(Ordering::Acquire) & GFN_DIRTY != 0
        {
            // SAFETY: KVM wrote the entry before it set GFN_DIRTY (acquire above); the index is
            // masked into the ring. The fields are read volatile: a ring that overflows has
            // KVM writing over entries while they are read.
            let (slot, offset) = unsafe {
                let entry = self.entries.add((self.next & (self.count - 1)) as usize);
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).offset)),
                )
            };
            // The slot field is (address space << 16) | slot id; faultline uses space 0 only.
            if slot >> 16 == 0 {
                if let Some(page) = memslots.page_of_slot_offset(slot, offset) {
                    out.mark(page);
                }
            }
            self.flags(self.next).store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            harvested += 1;
        }
        (harvested, harvested == self.count)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `DirtyLog::map_ring` with this address and length,
        // and nothing refers to it once the ring is dropped.
        unsafe { libc::munmap(self.entries.cast(), self.bytes()) };
    }
}

/// The state of dirty logging for a VM. Reads of KVM's log go through `Memslots` (which
/// knows how slots map to pages); the caller holds the memslots lock.
pub(crate) struct DirtyLog {
    /// Entries per vCPU ring, when the ring is the mechanism (else the bitmap).
    ring: Option<u32>,
    /// Whether the bitmap is read with manual protection (then cleared range by range).
    manual: bool,
    state: Mutex<LogState>,
}

struct LogState {
    /// Whether the memslots log writes now (the mode can be switched off and on).
    enabled: bool,
    /// A dirty ring overflowed: KVM's ring can no longer be trusted, so every take reports
    /// every page.
    overflowed: bool,
    pending: DirtyPages,
    /// The pages written since the last `peek` (what eviction wants: recent writes), kept
    /// beside `pending` wherever a write is recorded.
    recent: DirtyPages,
    rings: Vec<Ring>,
}

impl LogState {
    /// Records `pages` as written: pending for the next take, recent for the next peek.
    fn record(&mut self, pages: &DirtyPages) {
        self.pending.merge(pages);
        self.recent.merge(pages);
    }
}

impl DirtyLog {
    /// Prepares logging in `mode` on a VM that has no vCPU yet (the ring must be enabled before
    /// any vCPU exists); `pages` is the number of pages of RAM. With `Off`, the bitmap is made
    /// ready so that logging can be switched on later.
    pub fn new(kvm: &Kvm, vm: &VmFd, mode: DirtyMode, pages: u64) -> Result<Self, DirtyError> {
        let mut manual = false;
        let ring = match mode {
            DirtyMode::Off | DirtyMode::Bitmap => {
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                    ..Default::default()
                };
                // Without it (older kernels), reading the bitmap also clears it.
                manual = vm.enable_cap(&cap).is_ok();
                None
            }
            DirtyMode::Ring(entries) => {
                let (cap, max_bytes) = ring_capability(kvm)?;
                let max = max_bytes / RING_ENTRY_BYTES;
                if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES || entries > max {
                    return Err(DirtyError::RingSize {
                        entries,
                        min: MIN_RING_ENTRIES,
                        max,
                    });
                }
                let cap = kvm_enable_cap {
                    cap,
                    args: [u64::from(entries * RING_ENTRY_BYTES), 0, 0, 0],
                    ..Default::default()
                };
                vm.enable_cap(&cap).map_err(|e| match e.errno() {
                    // KVM reserves entries (more with Intel's PML) and refuses a ring that
                    // does not hold them.
                    libc::EINVAL => DirtyError::RingRefused { entries },
                    _ => DirtyError::Kvm("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e.into()),
                })?;
                Some(entries)
            }
        };
        Ok(DirtyLog {
            ring,
            manual,
            state: Mutex::new(LogState {
                enabled: mode != DirtyMode::Off,
                overflowed: false,
                pending: DirtyPages::new(pages),
                recent: DirtyPages::new(pages),
                rings: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How writes are logged now.
    pub fn mode(&self) -> DirtyMode {
        match (self.enabled(), self.ring) {
            (false, _) => DirtyMode::Off,
            (true, None) => DirtyMode::Bitmap,
            (true, Some(entries)) => DirtyMode::Ring(entries),
        }
    }

    /// Whether memslots log writes now.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Maps the dirty ring of a new vCPU (ring mode only).
    pub fn map_ring(&self, vcpu: &VcpuFd) -> Result<(), DirtyError> {
        let Some(count) = self.ring else {
            return Ok(());
        };
        let bytes = (count * RING_ENTRY_BYTES) as usize;
        // SAFETY: a fresh shared mapping of the vCPU file at KVM's documented ring offset, of
        // the size the ring was enabled with; the kernel checks both.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(DirtyError::Kvm(
                "mmap of the vCPU dirty ring",
                std::io::Error::last_os_error(),
            ));
        }
        self.lock().rings.push(Ring {
            entries: address.cast(),
            count,
            next: 0,
        });
        Ok(())
    }

    /// Switches logging off or on (the memslot flags are the caller's). Pages written while it
    /// was off are unknown, so switching it on marks every page dirty.
    pub fn set_enabled(&self, on: bool) {
        let mut state = self.lock();
        if on && !state.enabled {
            state.pending = DirtyPages::all(state.pending.pages());
        }
        if !on {
            state.pending = DirtyPages::new(state.pending.pages());
        }
        state.enabled = on;
    }

    /// Records that faultline wrote page `page` for the guest (KVM's log never sees it).
    pub fn mark_written(&self, page: u64) {
        let mut state = self.lock();
        if state.enabled {
            state.pending.mark(page);
            state.recent.mark(page);
        }
    }

    /// The pages written since the last peek (a reader that only wants to know, such as
    /// eviction); the next take still reports them. What KVM logged is harvested under the
    /// same lock as a take, so no page escapes either.
    pub fn peek(&self, vm: &VmFd, memslots: &Memslots) -> Result<Option<DirtyPages>, DirtyError> {
        let mut state = self.lock();
        if !state.enabled {
            return Ok(None);
        }
        self.harvest(vm, memslots, &mut state)?;
        let pages = state.recent.pages();
        Ok(Some(std::mem::replace(
            &mut state.recent,
            DirtyPages::new(pages),
        )))
    }

    /// Moves what KVM logged (every ring, or every logged slot's bitmap) into the pending
    /// pages.
    fn harvest(
        &self,
        vm: &VmFd,
        memslots: &Memslots,
        state: &mut LogState,
    ) -> Result<(), DirtyError> {
        if self.ring.is_some() {
            harvest_rings(vm, memslots, state)?;
        } else {
            let mut read = DirtyPages::new(state.pending.pages());
            let result = memslots
                .logged_slots()
                .into_iter()
                .try_for_each(|slot| read_slot_bitmap(vm, memslots, slot, &mut read, self.manual));
            // What was read before an error stays recorded.
            state.record(&read);
            result?;
        }
        Ok(())
    }

    /// Gives back pages a failed snapshot took, so that the next take reports them again.
    pub fn give_back(&self, pages: &DirtyPages) {
        let mut state = self.lock();
        if state.enabled {
            state.pending.merge(pages);
        }
    }

    /// Moves what KVM logged for `slots` (about to be deleted) into the pending pages: in ring
    /// mode every ring is harvested, in bitmap mode those slots' bitmaps are read.
    pub fn save_before_delete(
        &self,
        vm: &VmFd,
        memslots: &Memslots,
        slots: &[u32],
    ) -> Result<(), DirtyError> {
        let mut state = self.lock();
        if !state.enabled {
            return Ok(());
        }
        if self.ring.is_some() {
            harvest_rings(vm, memslots, &mut state)?;
            return Ok(());
        }
        let mut read = DirtyPages::new(state.pending.pages());
        let result = slots
            .iter()
            .try_for_each(|&slot| read_slot_bitmap(vm, memslots, slot, &mut read, false));
        state.record(&read);
        result
    }

    /// Harvests a full ring (or all rings) into the pending pages, so a vCPU can run on;
    /// returns how many entries there were.
    pub fn harvest_rings(&self, vm: &VmFd, memslots: &Memslots) -> Result<u32, DirtyError> {
        harvest_rings(vm, memslots, &mut self.lock())
    }

    /// The pages written since the previous take, and starts a new interval. `None` when
    /// logging is off. On an error, what was read so far stays pending.
    pub fn take(&self, vm: &VmFd, memslots: &Memslots) -> Result<Option<DirtyPages>, DirtyError> {
        let mut state = self.lock();
        if !state.enabled {
            return Ok(None);
        }
        self.harvest(vm, memslots, &mut state)?;
        let pages = state.pending.pages();
        Ok(Some(std::mem::replace(
            &mut state.pending,
            DirtyPages::new(pages),
        )))
    }
}

/// The ring capability this host offers (acquire/release preferred) and its largest size.
fn ring_capability(kvm: &Kvm) -> Result<(u32, u32), DirtyError> {
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = kvm.check_extension_raw(u64::from(cap));
        if max > 0 {
            return Ok((cap, max as u32));
        }
    }
    Err(DirtyError::RingUnsupported)
}

/// Harvests every ring into the pending pages and resets what was harvested; returns how many
/// entries there were.
///
/// KVM asks a vCPU to exit when its ring is nearly full, but a vCPU that dirties pages faster
/// than it exits (an instruction-emulating host lets it) makes KVM write over entries that were
/// not harvested, and its ring indices then stay wrong. The pages of such entries are unknown:
/// from then on every page is reported dirty, never fewer pages than were written. An overflow
/// shows as a ring found full, or as KVM resetting fewer entries than were harvested (it stops
/// at an entry it wrote over).
fn harvest_rings(vm: &VmFd, memslots: &Memslots, state: &mut LogState) -> Result<u32, DirtyError> {
    let mut harvested = 0;
    let mut read = DirtyPages::new(state.pending.pages());
    for ring in state.rings.iter_mut() {
        let (count, overflowed) = ring.harvest(memslots, &mut read);
        if overflowed && !state.overflowed {
            tracing::warn!(
                "a dirty ring of {} entries overflowed: every page is reported dirty from now \
                 on (use a larger --dirty-ring, or the bitmap)",
                ring.count
            );
            state.overflowed = true;
        }
        harvested += count;
    }
    state.record(&read);
    if harvested > 0 {
        let reset = reset_rings(vm)?;
        if reset.is_some_and(|reset| reset < harvested) && !state.overflowed {
            tracing::warn!(
                "KVM reset fewer dirty-ring entries than the {harvested} harvested: a ring \
                 overflowed; every page is reported dirty from now on"
            );
            state.overflowed = true;
        }
    }
    if state.overflowed {
        let pages = state.pending.pages();
        state.pending.mark_range(0, pages);
        state.recent.mark_range(0, pages);
    }
    Ok(harvested)
}

/// `KVM_RESET_DIRTY_RINGS`, again while a signal interrupts it (a vCPU kick can land on a
/// harvesting vCPU thread). Returns how many entries the last call reset, or `None` if a call
/// was interrupted (what it reset before the signal is not told).
fn reset_rings(vm: &VmFd) -> Result<Option<u32>, DirtyError> {
    let mut interrupted = false;
    loop {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the VM's rings.
        let reset = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if reset >= 0 {
            return Ok((!interrupted).then_some(reset as u32));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(DirtyError::Kvm("KVM_RESET_DIRTY_RINGS", error));
        }
        interrupted = true;
    }
}

/// Reads slot `slot`'s dirty bitmap into `out`; with `clear` (manual protection), clears
/// (re-protects) exactly the pages it reported. Without manual protection the read clears.
fn read_slot_bitmap(
    vm: &VmFd,
    memslots: &Memslots,
    slot: u32,
    out: &mut DirtyPages,
    clear: bool,
) -> Result<(), DirtyError> {
    let Some(info) = memslots.slot(slot) else {
        return Ok(());
    };
    let bitmap = vm
        .get_dirty_log(slot, info.size as usize)
        .map_err(|e| DirtyError::Kvm("KVM_GET_DIRTY_LOG", e.into()))?;
    let first = memslots.page_index(info.gpa);
    let slot_pages = info.size / PAGE_SIZE;
    let dirty = DirtyPages::from_words(slot_pages, bitmap).ok_or_else(|| {
        DirtyError::Kvm(
            "KVM_GET_DIRTY_LOG",
            std::io::Error::other("a bitmap of the wrong size"),
        )
    })?;
    for page in dirty.iter() {
        out.mark(first + page);
    }
    if clear && dirty.count() > 0 {
        let mut request = kvm_clear_dirty_log {
            slot,
            num_pages: slot_pages as u32,
            first_page: 0,
            ..Default::default()
        };
        // KVM only reads the bitmap.
        request.__bindgen_anon_1.dirty_bitmap = dirty.words().as_ptr().cast_mut().cast();
        // SAFETY: the bitmap holds a bit for each of the slot's `num_pages` pages and outlives
        // the call; KVM only reads it.
        let cleared =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &request) };
        if cleared < 0 {
            return Err(DirtyError::Kvm(
                "KVM_CLEAR_DIRTY_LOG",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_mark_merge_and_iterate() {
        let mut a = DirtyPages::new(130);
        a.mark(0);
        a.mark(64);
        a.mark(129);
        a.mark(130); // beyond RAM: ignored
        assert_eq!(a.iter().collect::<Vec<_>>(), [0, 64, 129]);
        let mut b = DirtyPages::new(130);
        b.mark_range(63, 2);
        assert!(a.merge(&b));
        assert_eq!(a.iter().collect::<Vec<_>>(), [0, 63, 64, 129]);
        assert!(!a.merge(&DirtyPages::new(10)));
        assert_eq!(DirtyPages::all(70).count(), 70);
    }

    #[test]
    fn within_keeps_exactly_the_pages_of_its_range() {
        let all = DirtyPages::all(300);
        for (start, end) in [
            (0, 300),
            (5, 200),
            (64, 128),
            (63, 65),
            (250, 400),
            (7, 7),
            (299, 300),
        ] {
            let kept: Vec<u64> = all.within(start..end).iter().collect();
            let wanted: Vec<u64> = (start..end.min(300)).collect();
            assert_eq!(kept, wanted, "{start}..{end}");
        }
        let mut some = DirtyPages::new(300);
        some.mark(3);
        some.mark(100);
        some.mark(200);
        assert_eq!(some.within(4..201).iter().collect::<Vec<_>>(), [100, 200]);
        assert_eq!(some.within(4..201).pages(), 300);
        let mut other = DirtyPages::new(300);
        other.mark(100);
        other.mark(150);
        assert_eq!(some.count_outside(&other), 2);
        assert_eq!(other.count_outside(&some), 1);
        assert_eq!(some.count_outside(&some), 0);
    }

    #[test]
    fn any_in_looks_at_exactly_the_pages_of_its_range() {
        for marked in [
            &[][..],
            &[0],
            &[63],
            &[64],
            &[127, 128],
            &[299],
            &[5, 190, 250],
        ] {
            let mut set = DirtyPages::new(300);
            for &page in marked {
                set.mark(page);
            }
            for first in 0..=301 {
                for end in first..=310 {
                    let wanted = (first..end).any(|page| marked.contains(&page));
                    assert_eq!(
                        set.any_in(first, end),
                        wanted,
                        "{marked:?} in {first}..{end}"
                    );
                }
            }
        }
    }

    #[test]
    fn unmarking_a_range_takes_exactly_its_pages_and_first_from_finds_the_rest() {
        for (first, count) in [(0, 300), (5, 200), (64, 64), (63, 2), (250, 400), (7, 0)] {
            let mut left = DirtyPages::all(300);
            left.unmark_range(first, count);
            let wanted: Vec<u64> = (0..300)
                .filter(|&p| !(first..first + count).contains(&p))
                .collect();
            assert_eq!(left.iter().collect::<Vec<_>>(), wanted, "{first}+{count}");
            // first_from walks the same pages, from anywhere.
            let mut walked = Vec::new();
            let mut from = 0;
            while let Some(page) = left.first_from(from) {
                walked.push(page);
                from = page + 1;
            }
            assert_eq!(walked, wanted, "walked after {first}+{count}");
        }
        let mut one = DirtyPages::new(300);
        one.mark(299);
        assert_eq!(one.first_from(0), Some(299));
        assert_eq!(one.first_from(299), Some(299));
        assert_eq!(one.first_from(300), None);
        // A bitmap from KVM may have bits past the last page: they are not pages.
        let past = DirtyPages::from_words(3, vec![0b1000]).unwrap();
        assert_eq!(past.first_from(0), None);
    }

    #[test]
    fn runs_are_measured_across_words_and_removed_pages_are_gone() {
        let mut set = DirtyPages::new(300);
        set.mark_range(10, 5);
        set.mark_range(60, 140); // across words 0 to 3
        set.mark(299);
        assert_eq!(set.run_length(10, 300), 5);
        assert_eq!(set.run_length(12, 300), 3);
        assert_eq!(set.run_length(15, 300), 0);
        assert_eq!(set.run_length(60, 300), 140);
        assert_eq!(set.run_length(60, 100), 40, "stops at the end asked");
        assert_eq!(set.run_length(127, 300), 73);
        assert_eq!(set.run_length(299, 400), 1, "stops at the end of RAM");
        assert_eq!(set.run_length(300, 400), 0);
        // Bits past the last page are not pages.
        let past = DirtyPages::from_words(3, vec![0b1111]).unwrap();
        assert_eq!(past.run_length(0, 64), 3);
        assert_eq!(past.count(), 3, "nor are they counted");
        let full = DirtyPages::from_words(128, vec![u64::MAX, u64::MAX]).unwrap();
        assert_eq!(full.count(), 128);
        let all = DirtyPages::all(256);
        assert_eq!(all.run_length(0, 256), 256);

        let mut other = DirtyPages::new(300);
        other.mark_range(100, 50);
        other.mark(11);
        assert!(set.remove(&other));
        let left: Vec<u64> = set.iter().collect();
        let wanted: Vec<u64> = [10]
            .into_iter()
            .chain(12..15)
            .chain(60..100)
            .chain(150..200)
            .chain([299])
            .collect();
        assert_eq!(left, wanted);
        assert!(!set.remove(&DirtyPages::new(10)), "other RAM");
    }

    #[test]
    fn a_range_marks_exactly_its_pages() {
        for (pages, first, count) in [
            (300, 0, 300),
            (300, 5, 200),
            (300, 64, 128),
            (300, 250, 99),
            (128, 60, 4),
            (200, 10, 0),
        ] {
            let mut ranged = DirtyPages::new(pages);
            ranged.mark_range(first, count);
            let expected: Vec<u64> = (first..(first + count).min(pages)).collect();
            assert_eq!(
                ranged.iter().collect::<Vec<_>>(),
                expected,
                "{first}+{count} of {pages}"
            );
        }
    }
}
