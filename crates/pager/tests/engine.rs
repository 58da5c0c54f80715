//! The pager on real userfaultfds over shared memfd mappings (as guest RAM is), with host
//! threads as touchers. Skips loudly where no userfaultfd can be had.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use pager::*;

const PAGE: usize = 4096;

/// A memfd mapped MAP_SHARED, like a guest RAM region.
struct Shm {
    _file: std::fs::File,
    addr: u64,
    len: usize,
}

impl Shm {
    fn new(pages: usize) -> Shm {
        let fd = rustix::fs::memfd_create("pager-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len((pages * PAGE) as u64).unwrap();
        let len = pages * PAGE;
        // SAFETY: a fresh shared mapping of the memfd; checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Shm {
            _file: file,
            addr: addr as u64,
            len,
        }
    }
    fn page(&self, index: usize) -> u64 {
        self.addr + (index * PAGE) as u64
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The pager's defaults without prediction: these tests count installs and faults exactly,
/// which pages installed ahead of a toucher would change (prediction has its own test).
fn unpredicted() -> PagerConfig {
    PagerConfig {
        predict: false,
        ..PagerConfig::default()
    }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: test addresses are inside live `Shm` mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, value: u64) {
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(addr as *mut u64, value) }
}

/// Source contents: every word of page `p` holds `p * 0x1_0001 + 7`.
fn pattern(pages: usize) -> Vec<u8> {
    (0..pages)
        .flat_map(|p| ((p as u64) * 0x1_0001 + 7).to_le_bytes().repeat(PAGE / 8))
        .collect()
}

/// A pager builder, or `None` (said loudly) where no userfaultfd can be opened at all and
/// FAULTLINE_REQUIRE_UFFD is unset. A kernel whose userfaultfd lacks a feature the pager needs
/// (POISON, say) fails the test: that is a kernel faultline cannot page on.
fn builder(config: PagerConfig) -> Option<PagerBuilder> {
    match PagerBuilder::new(config) {
        Ok(builder) => Some(builder),
        Err(PagerError::Uffd(e @ uffd::UffdError::Open { .. }))
            if std::env::var_os("FAULTLINE_REQUIRE_UFFD").is_none() =>
        {
            eprintln!("SKIPPED: the pager cannot open a userfaultfd here: {e}");
            None
        }
        Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
    }
}

/// Waits (bounded, so a bug fails instead of hanging) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A kernel-mode read of 8 bytes at `addr` (write(2) to a pipe): returns the errno on failure.
fn kernel_read(addr: u64) -> Result<u64, i32> {
    let (read_end, write_end) = rustix::pipe::pipe().unwrap();
    // SAFETY: the kernel validates the user pointer; it is inside a live mapping.
    let n = unsafe { libc::write(write_end.as_raw_fd(), addr as *const libc::c_void, 8) };
    if n != 8 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    let mut buf = [0u8; 8];
    rustix::io::read(&read_end, &mut buf).unwrap();
    Ok(u64::from_le_bytes(buf))
}

/// Registers all of `shm` with `builder`, served from `source`.
fn serve(builder: &mut PagerBuilder, shm: &Shm, source: Arc<dyn PageSource>) {
    // SAFETY: the test's own shared mapping: raw memory no Rust reference points into, mapped
    // until `shm` drops, after the pager.
    unsafe { builder.region(shm.addr, shm.len as u64, source) }.unwrap();
}

/// A started pager serving `pages` pages of a fresh shared mapping from [`pattern`].
fn pattern_pager(pages: usize, config: PagerConfig) -> Option<(Pager, Shm)> {
    let mut builder = builder(config)?;
    let shm = Shm::new(pages);
    serve(
        &mut builder,
        &shm,
        Arc::new(MemorySource::new(pattern(pages))),
    );
    Some((builder.start().unwrap(), shm))
}

#[test]
fn concurrent_random_faults_get_every_page_right_once() {
    const PAGES: usize = 2048;
    let Some((pager, shm)) = pattern_pager(PAGES, unpredicted()) else {
        return;
    };
    let base = shm.addr;
    let touchers: Vec<_> = (0..2u64)
        .map(|seed| {
            std::thread::spawn(move || {
                // Each thread visits every page in its own pseudo-random order.
                let mut order: Vec<usize> = (0..PAGES).collect();
                let mut state = seed * 0x9e37_79b9 + 1;
                for i in (1..PAGES).rev() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    order.swap(i, (state % (i as u64 + 1)) as usize);
                }
                for page in order {
                    let offset = (page * PAGE + (state as usize % (PAGE / 8)) * 8) as u64;
                    assert_eq!(
                        read_u64(base + offset),
                        page as u64 * 0x1_0001 + 7,
                        "page {page}"
                    );
                }
            })
        })
        .collect();
    for t in touchers {
        t.join().unwrap();
    }
    let stats = pager.shutdown();
    assert_eq!(
        stats.pages_installed_urgent, PAGES as u64,
        "each page installed exactly once"
    );
    assert_eq!(stats.regions[0].pages_present, PAGES as u64);
    assert_eq!(stats.source_errors, 0);
    assert!(stats.faults_other >= PAGES as u64 - stats.faults_joined);
}

/// A source that blocks fetches of some pages until released, and counts fetches per page.
struct GatedSource {
    inner: MemorySource,
    gated: Vec<usize>,
    gate: Arc<Barrier>,
    fetches: Mutex<Vec<usize>>,
}

impl PageSource for GatedSource {
    fn describe(&self) -> String {
        "gated".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let first = offset as usize / PAGE;
        self.fetches
            .lock()
            .unwrap()
            .extend(first..first + buf.len() / PAGE);
        if (first..first + buf.len() / PAGE).any(|page| self.gated.contains(&page)) {
            self.gate.wait();
        }
        self.inner.fetch(offset, buf)
    }
}

/// A pager started from `builder` over `pages` pages of [`pattern`], from a [`GatedSource`]
/// that holds the fetches of the `gated` pages.
fn gated_pager(
    mut builder: PagerBuilder,
    pages: usize,
    gated: Vec<usize>,
) -> (Pager, Shm, Arc<GatedSource>) {
    let shm = Shm::new(pages);
    let source = Arc::new(GatedSource {
        inner: MemorySource::new(pattern(pages)),
        gated,
        gate: Arc::new(Barrier::new(2)),
        fetches: Mutex::new(Vec::new()),
    });
    serve(
        &mut builder,
        &shm,
        Arc::clone(&source) as Arc<dyn PageSource>,
    );
    (builder.start().unwrap(), shm, source)
}

/// A started pager over `pages` pages of [`pattern`] whose background worker has fetched
/// `gated_page` (prefetched) and is held in its source until the source's gate is passed.
fn held_background_fetch(
    pages: usize,
    gated_page: usize,
) -> Option<(Pager, Shm, Arc<GatedSource>)> {
    let builder = builder(PagerConfig {
        background_batch_pages: 1,
        ..Default::default()
    })?;
    let (pager, shm, source) = gated_pager(builder, pages, vec![gated_page]);
    pager.prefetch(0, gated_page, 1).unwrap();
    wait_until("the background fetch of the gated page", || {
        source.fetches.lock().unwrap().contains(&gated_page)
    });
    Some((pager, shm, source))
}

#[test]
fn a_fault_on_a_page_in_flight_joins_it() {
    // The background worker claims page 5 and blocks in the source.
    let Some((pager, shm, source)) = held_background_fetch(16, 5) else {
        return;
    };
    let gate = Arc::clone(&source.gate);
    // Now a thread touches page 5: the fault must join the fetch in flight.
    let target = shm.page(5);
    let toucher = std::thread::spawn(move || read_u64(target));
    let handle = pager.handle();
    wait_until("the fault to be seen", || handle.stats().faults_joined == 1);
    gate.wait(); // release the source
    assert_eq!(toucher.join().unwrap(), 5 * 0x1_0001 + 7);
    let stats = pager.shutdown();
    assert_eq!(
        source
            .fetches
            .lock()
            .unwrap()
            .iter()
            .filter(|p| **p == 5)
            .count(),
        1,
        "fetched once"
    );
    assert_eq!(stats.pages_installed_background, 1);
    assert_eq!(stats.pages_installed_urgent, 0);
}

/// The kernel function thread `tid` of this process sleeps in.
fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// Whether this kernel names where a thread sleeps (`wchan` is "0" without symbols).
fn wchan_names_functions() -> bool {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let sleeper = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().unwrap();
    let mut named = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !named && Instant::now() < deadline {
        let sleeps_in = wchan(tid);
        named = !sleeps_in.is_empty() && sleeps_in != "0";
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(done_tx);
    sleeper.join().unwrap();
    named
}

/// Reads 8 bytes at `addr` on a new thread; returns it once the thread sleeps in its missing
/// fault (its event is queued on the userfaultfd).
fn toucher_in_fault(addr: u64) -> std::thread::JoinHandle<u64> {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let toucher = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        read_u64(addr)
    });
    let tid = tid_rx.recv().unwrap();
    wait_until("the toucher to sleep in its fault", || {
        wchan(tid).contains("userfault")
    });
    toucher
}

#[test]
fn a_fault_read_before_another_thread_installed_its_page_is_only_woken() {
    const PAGES: usize = 16;
    let (g, a, x) = (1, 3, 9);
    if !wchan_names_functions() {
        eprintln!("SKIPPED: /proc/PID/task/TID/wchan does not say where a thread sleeps here");
        return;
    }
    let Some(builder) = builder(unpredicted()) else {
        return;
    };
    let (pager, shm, source) = gated_pager(builder, PAGES, vec![g, a]);
    let fetched = |page| source.fetches.lock().unwrap().contains(&page);
    // The one fault thread is held in page g's fetch while pages a and x are faulted: it
    // then reads both events in one batch, and is held again in page a's fetch.
    let toucher_g = std::thread::spawn({
        let addr = shm.page(g);
        move || read_u64(addr)
    });
    wait_until("page g's fetch", || fetched(g));
    let toucher_a = toucher_in_fault(shm.page(a));
    let toucher_x = toucher_in_fault(shm.page(x));
    source.gate.wait();
    wait_until("page a's fetch", || fetched(a));
    // Meanwhile page x is installed by another thread (as a migration stream does), which
    // wakes its toucher; x's event, read already, is still to be served.
    let bytes = pattern(PAGES)[x * PAGE..(x + 1) * PAGE].to_vec();
    assert_eq!(pager.install_pages(0, x, &bytes).unwrap(), 1);
    assert_eq!(toucher_x.join().unwrap(), x as u64 * 0x1_0001 + 7);
    source.gate.wait();
    assert_eq!(toucher_a.join().unwrap(), a as u64 * 0x1_0001 + 7);
    assert_eq!(toucher_g.join().unwrap(), g as u64 * 0x1_0001 + 7);
    let handle = pager.handle();
    wait_until("page x's event to be served", || {
        handle.stats().faults_joined == 1 || fetched(x)
    });
    assert!(
        !fetched(x),
        "a page the kernel has is fetched again for a fault that is over"
    );
    pager.shutdown();
}

/// A source that holds the fetches of the pages in `held` until they are let go, each on its
/// own, and notes every page fetched.
struct HoldingSource {
    inner: MemorySource,
    held: Mutex<Vec<usize>>,
    let_go: std::sync::Condvar,
    /// Each page fetched, with the thread that fetched it.
    fetches: Mutex<Vec<(usize, i32)>>,
}

impl HoldingSource {
    fn new(pages: usize, held: Vec<usize>) -> HoldingSource {
        HoldingSource {
            inner: MemorySource::new(pattern(pages)),
            held: Mutex::new(held),
            let_go: std::sync::Condvar::new(),
            fetches: Mutex::new(Vec::new()),
        }
    }

    fn let_go(&self, page: usize) {
        self.held.lock().unwrap().retain(|&p| p != page);
        self.let_go.notify_all();
    }

    /// The thread that fetched `page` first, if one did.
    fn fetcher(&self, page: usize) -> Option<i32> {
        let fetches = self.fetches.lock().unwrap();
        fetches
            .iter()
            .find(|(p, _)| *p == page)
            .map(|&(_, tid)| tid)
    }

    fn fetched(&self, page: usize) -> bool {
        self.fetcher(page).is_some()
    }
}

impl PageSource for HoldingSource {
    fn describe(&self) -> String {
        "holding".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let pages = offset as usize / PAGE..(offset as usize + buf.len()) / PAGE;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.fetches
            .lock()
            .unwrap()
            .extend(pages.clone().map(|page| (page, tid)));
        let mut held = self.held.lock().unwrap();
        while held.iter().any(|page| pages.contains(page)) {
            held = self.let_go.wait(held).unwrap();
        }
        drop(held);
        self.inner.fetch(offset, buf)
    }
}

#[test]
fn read_one_event_at_a_time_a_slow_page_never_holds_up_another_fault() {
    const PAGES: usize = 16;
    let (c, d, a, b) = (1, 3, 5, 9);
    if !wchan_names_functions() {
        eprintln!("SKIPPED: /proc/PID/task/TID/wchan does not say where a thread sleeps here");
        return;
    }
    // As a post-copy destination's pager: a fault thread per toucher, one event per read.
    let Some(mut builder) = builder(PagerConfig {
        fault_threads: 2,
        events_per_read: 1,
        ..unpredicted()
    }) else {
        return;
    };
    let shm = Shm::new(PAGES);
    let source = Arc::new(HoldingSource::new(PAGES, vec![c, d, a]));
    serve(
        &mut builder,
        &shm,
        Arc::clone(&source) as Arc<dyn PageSource>,
    );
    let pager = builder.start().unwrap();
    let value = |page: usize| page as u64 * 0x1_0001 + 7;
    // Both fault threads are held, in the fetches of pages c and d, while pages a and b are
    // faulted: both events wait to be read at once.
    let toucher = |page: usize| {
        let addr = shm.page(page);
        std::thread::spawn(move || read_u64(addr))
    };
    let toucher_c = toucher(c);
    wait_until("page c's fetch", || source.fetched(c));
    let toucher_d = toucher(d);
    wait_until("page d's fetch", || source.fetched(d));
    let toucher_a = toucher_in_fault(shm.page(a));
    let toucher_b = toucher_in_fault(shm.page(b));
    source.let_go(c);
    source.let_go(d);
    // One thread takes a's fault and is held in its fetch; the other serves b meanwhile (read
    // in one batch with a's, b's fault would wait behind it).
    wait_until("page a's fetch", || source.fetched(a));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !toucher_b.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let served_meanwhile = toucher_b.is_finished() && !toucher_a.is_finished();
    // Let go before asserting, so that a failure ends the test rather than hangs it.
    source.let_go(a);
    for (toucher, page) in [
        (toucher_a, a),
        (toucher_b, b),
        (toucher_c, c),
        (toucher_d, d),
    ] {
        assert_eq!(toucher.join().unwrap(), value(page));
    }
    pager.shutdown();
    assert!(
        served_meanwhile,
        "page b's fault waited for page a's fetch to end"
    );
}

#[test]
fn removed_pages_are_served_again_as_zero() {
    const PAGES: usize = 8;
    let Some((pager, shm)) = pattern_pager(PAGES, unpredicted()) else {
        return;
    };
    assert_eq!(read_u64(shm.page(3)), 3 * 0x1_0001 + 7);
    write_u64(shm.page(3), 0xdead);
    // A balloon-style discard: MADV_REMOVE frees the shmem page (the pager is told first).
    // SAFETY: discarding one page of our own mapping; no references into it.
    let ret = unsafe { libc::madvise(shm.page(3) as *mut libc::c_void, PAGE, libc::MADV_REMOVE) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // madvise returns once the pager has read the event; it applies it just after.
    let handle = pager.handle();
    wait_until("the remove to be applied", || !handle.is_present(0, 3));
    // Touched again: served (no hang), with the page's true contents now: zero.
    assert_eq!(read_u64(shm.page(3)), 0);
    // The install wakes the toucher; the pager marks the page present right after.
    wait_until("page 3 to be marked present", || handle.is_present(0, 3));
    // Neighbours are untouched.
    assert_eq!(read_u64(shm.page(4)), 4 * 0x1_0001 + 7);
    let stats = pager.shutdown();
    assert_eq!(stats.pages_removed, 1);
    assert_eq!(stats.zero_pages, 1);
}

/// Fails every fetch that includes page `bad`.
struct FailingSource {
    inner: MemorySource,
    bad: usize,
}

impl PageSource for FailingSource {
    fn describe(&self) -> String {
        "failing".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        let first = offset as usize / PAGE;
        if (first..first + buf.len() / PAGE).contains(&self.bad) {
            return Err(SourceError::Unavailable {
                offset,
                reason: "test source refuses this page".into(),
            });
        }
        self.inner.fetch(offset, buf)
    }
}

/// What `on_fatal` reported, if anything.
type Reported = Arc<Mutex<Option<String>>>;

/// The message `on_fatal` reported, which must name the test source's refusal.
fn refusal_reported(reported: &Reported) -> String {
    let message = reported
        .lock()
        .unwrap()
        .clone()
        .expect("on_fatal was called");
    assert!(
        message.contains("test source refuses this page"),
        "{message}"
    );
    message
}

/// A started pager under `policy` serving `pages` pages of [`pattern`], of which page `bad`
/// cannot be had, and what it reports as fatal.
fn failing_pager(
    policy: FailurePolicy,
    pages: usize,
    bad: usize,
) -> Option<(Pager, Shm, Reported)> {
    failing_pager_with(
        PagerConfig {
            failure_policy: policy,
            ..Default::default()
        },
        pages,
        bad,
    )
}

/// [`failing_pager`] with `config`.
fn failing_pager_with(
    config: PagerConfig,
    pages: usize,
    bad: usize,
) -> Option<(Pager, Shm, Reported)> {
    let mut builder = builder(config)?;
    let shm = Shm::new(pages);
    let source = FailingSource {
        inner: MemorySource::new(pattern(pages)),
        bad,
    };
    serve(&mut builder, &shm, Arc::new(source));
    let reported = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&reported);
    builder.on_fatal(move |message| *sink.lock().unwrap() = Some(message.to_string()));
    Some((builder.start().unwrap(), shm, reported))
}

#[test]
fn a_failing_source_poisons_the_page_and_serves_the_rest() {
    let Some((pager, shm, reported)) = failing_pager(FailurePolicy::Poison, 8, 2) else {
        return;
    };
    assert_eq!(
        kernel_read(shm.page(2)),
        Err(libc::EFAULT),
        "an explicit error, not garbage"
    );
    assert_eq!(kernel_read(shm.page(3)), Ok(3 * 0x1_0001 + 7));
    assert!(
        reported.lock().unwrap().is_none(),
        "Poison does not stop anything"
    );
    let stats = pager.shutdown();
    assert_eq!((stats.source_errors, stats.pages_poisoned), (1, 1));
}

#[test]
fn a_failing_source_under_stop_reports_fatally() {
    let Some((pager, shm, reported)) = failing_pager(FailurePolicy::Stop, 8, 2) else {
        return;
    };
    assert_eq!(kernel_read(shm.page(2)), Err(libc::EFAULT));
    let message = refusal_reported(&reported);
    assert_eq!(pager.fatal_error(), Some(message));
}

#[test]
fn readahead_installs_a_run_in_one_ioctl() {
    const PAGES: usize = 32;
    let config = PagerConfig {
        readahead_pages: 8,
        ..Default::default()
    };
    let Some((pager, shm)) = pattern_pager(PAGES, config) else {
        return;
    };
    assert_eq!(read_u64(shm.page(4)), 4 * 0x1_0001 + 7);
    let handle = pager.handle();
    wait_until("the run to be marked present", || handle.is_present(0, 11));
    for page in 4..12 {
        assert!(
            pager.is_present(0, page),
            "page {page} came with the fault on page 4"
        );
    }
    assert!(!pager.is_present(0, 12));
    for page in 4..12 {
        assert_eq!(read_u64(shm.page(page)), page as u64 * 0x1_0001 + 7);
    }
    let stats = pager.shutdown();
    assert_eq!((stats.install_ioctls, stats.pages_installed_urgent), (1, 8));
}

#[test]
fn recorded_faults_keep_their_order() {
    const PAGES: usize = 32;
    // Prediction is on by default; recording turns it off.
    let config = PagerConfig {
        record_faults: true,
        ..Default::default()
    };
    let Some((pager, shm)) = pattern_pager(PAGES, config) else {
        return;
    };
    // Touch in a scrambled order, one page twice, then walk a line that prediction would
    // follow: every first touch must still fault, to be recorded.
    let order = [9usize, 3, 27, 3, 0, 14, 16, 18, 20, 22, 24, 26, 28];
    for &page in &order {
        assert_eq!(read_u64(shm.page(page)), page as u64 * 0x1_0001 + 7);
    }
    let expected: Vec<(usize, usize)> = [9, 3, 27, 0, 14, 16, 18, 20, 22, 24, 26, 28]
        .into_iter()
        .map(|page| (0, page))
        .collect();
    assert_eq!(
        pager.fault_log(),
        expected,
        "each page once, in first-touch order"
    );
    assert_eq!(pager.shutdown().pages_predicted, 0);
}

#[test]
fn zero_pages_are_installed_without_a_fetch_and_present_ones_are_left_alone() {
    const PAGES: usize = 16;
    let Some((pager, shm)) = pattern_pager(PAGES, unpredicted()) else {
        return;
    };
    assert_eq!(read_u64(shm.page(9)), 9 * 0x1_0001 + 7);
    write_u64(shm.page(9), 0xbeef);
    assert_eq!(pager.install_zero_pages(0, 8, 4).unwrap(), 3);
    assert_eq!(
        read_u64(shm.page(9)),
        0xbeef,
        "a present page is never overwritten"
    );
    for page in [8, 10, 11] {
        assert!(pager.is_present(0, page));
        // Zero, not the source's pattern: the source was not asked.
        assert_eq!(read_u64(shm.page(page)), 0);
    }
    assert!(pager.install_zero_pages(3, 0, 1).is_err(), "no region 3");
    let stats = pager.shutdown();
    assert_eq!(
        stats.faults_vcpu + stats.faults_other,
        1,
        "only page 9 was faulted"
    );
}

#[test]
fn given_pages_are_installed_and_present_ones_are_left_alone() {
    const PAGES: usize = 16;
    let Some((pager, shm)) = pattern_pager(PAGES, unpredicted()) else {
        return;
    };
    // Page 5 is faulted in (from the source) and then changed by its user.
    assert_eq!(read_u64(shm.page(5)), 5 * 0x1_0001 + 7);
    write_u64(shm.page(5), 0xdead);
    // Install pages 4..8 from a buffer of 0xab bytes: 4, 6 and 7 are new, 5 must not be
    // overwritten.
    let data = vec![0xabu8; 4 * 4096];
    assert_eq!(pager.install_pages(0, 4, &data).unwrap(), 3);
    assert_eq!(
        read_u64(shm.page(5)),
        0xdead,
        "a present page is never overwritten"
    );
    for page in [4, 6, 7] {
        assert!(pager.is_present(0, page));
        assert_eq!(read_u64(shm.page(page)), 0xabab_abab_abab_abab);
    }
    assert!(pager.install_pages(3, 0, &data).is_err(), "no region 3");
    let stats = pager.shutdown();
    assert_eq!(stats.pages_installed_background, 3);
    assert_eq!(
        stats.faults_vcpu + stats.faults_other,
        1,
        "only page 5 was faulted"
    );
}

#[test]
fn resident_pages_are_never_fetched() {
    const PAGES: usize = 8;
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    let shm = Shm::new(PAGES);
    write_u64(shm.page(1), 0x1111); // written before registration: resident
    let fetched = Arc::new(AtomicUsize::new(0));
    struct Counting(Arc<AtomicUsize>);
    impl PageSource for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        fn fetch(&self, _offset: u64, _buf: &mut [u8]) -> Result<Content, SourceError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Content::Zero)
        }
    }
    serve(&mut builder, &shm, Arc::new(Counting(Arc::clone(&fetched))));
    let pager = builder.start().unwrap();
    assert!(pager.is_present(0, 1));
    assert_eq!(read_u64(shm.page(1)), 0x1111);
    assert_eq!(fetched.load(Ordering::SeqCst), 0);
    assert_eq!(read_u64(shm.page(2)), 0);
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
    let handle = pager.handle();
    wait_until("page 2 to be marked present", || handle.is_present(0, 2));
    assert_eq!(pager.shutdown().regions[0].pages_present, 2);
}

/// Whether thread `tid` of this process is running or waiting to run (`R` in its stat).
fn runs(tid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // "tid (comm) state ...": the comm may hold spaces, never a ')' after its own.
    let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
    after_comm.trim_start().starts_with('R')
}

#[test]
fn background_fill_sleeps_while_a_fault_is_served_and_goes_on_after_it() {
    const PAGES: usize = 16;
    let (first, x) = (0, 9);
    // One page a batch, so that fill comes back to look at the faults after its first page.
    let Some(mut builder) = builder(PagerConfig {
        background_batch_pages: 1,
        ..unpredicted()
    }) else {
        return;
    };
    let shm = Shm::new(PAGES);
    let source = Arc::new(HoldingSource::new(PAGES, vec![first, x]));
    serve(
        &mut builder,
        &shm,
        Arc::clone(&source) as Arc<dyn PageSource>,
    );
    let pager = builder.start().unwrap();
    let handle = pager.handle();
    // Fill is held in its first page's fetch (which names its thread), and page x's fault in
    // its own: once fill has its first page, a fault is being served.
    pager.fill_all();
    wait_until("fill's first fetch", || source.fetched(first));
    let fill = source.fetcher(first).unwrap();
    let toucher = std::thread::spawn({
        let addr = shm.page(x);
        move || read_u64(addr)
    });
    wait_until("page x's fetch", || source.fetched(x));
    source.let_go(first);
    wait_until("fill's first page", || handle.is_present(0, first));
    // Fill now waits for the fault: asleep, not spinning on a core (a thread that yields in
    // a loop is seen running nearly every time). It may take a while to get there on a busy
    // host: looked at once it was seen asleep (5 s at most, not panicking: x is held).
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs(fill) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let running = (0..200)
        .filter(|_| {
            std::thread::sleep(Duration::from_millis(1));
            runs(fill)
        })
        .count();
    let fill_went_on = (0..PAGES).any(|page| page != first && handle.is_present(0, page));
    // Let go before asserting, so that a failure ends the test rather than hangs it.
    source.let_go(x);
    assert_eq!(toucher.join().unwrap(), x as u64 * 0x1_0001 + 7);
    assert!(
        running <= 20,
        "fill ran in {running} of 200 looks while a fault was served"
    );
    assert!(!fill_went_on, "fill went on while a fault was served");
    // The fault's end wakes fill, which installs the rest.
    wait_until("background fill", || {
        handle.stats().regions[0].pages_present == PAGES as u64
    });
    for page in 0..PAGES {
        assert_eq!(read_u64(shm.page(page) + 8), page as u64 * 0x1_0001 + 7);
    }
}

#[test]
fn background_fill_installs_everything_without_faults() {
    const PAGES: usize = 512;
    let Some((pager, shm)) = pattern_pager(PAGES, unpredicted()) else {
        return;
    };
    pager.fill_all();
    let handle = pager.handle();
    wait_until("background fill", || {
        handle.stats().regions[0].pages_present == PAGES as u64
    });
    for page in 0..PAGES {
        assert_eq!(read_u64(shm.page(page) + 8), page as u64 * 0x1_0001 + 7);
    }
    let stats = pager.shutdown();
    assert_eq!(stats.faults_other + stats.faults_vcpu, 0);
    assert_eq!(stats.pages_installed_background, PAGES as u64);
}

#[test]
fn zero_source_installs_zero_pages_without_copies() {
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    let shm = Shm::new(4);
    serve(&mut builder, &shm, Arc::new(ZeroSource));
    let pager = builder.start().unwrap();
    for page in 0..4 {
        assert_eq!(read_u64(shm.page(page)), 0);
    }
    let stats = pager.shutdown();
    assert_eq!((stats.zero_pages, stats.bytes_copied), (4, 0));
}

#[test]
fn bad_regions_are_rejected() {
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    let shm = Shm::new(4);
    assert!(matches!(
        /* SAFETY: the test's own shared mapping: raw memory no Rust reference points into. */
        unsafe { builder.region(shm.addr + 1, 4096, Arc::new(ZeroSource)) },
        Err(PagerError::Misaligned { .. })
    ));
    /* SAFETY: the test's own shared mapping: raw memory no Rust reference points into. */
    unsafe { builder.region(shm.addr, 8192, Arc::new(ZeroSource)) }.unwrap();
    assert!(matches!(
        /* SAFETY: the test's own shared mapping: raw memory no Rust reference points into. */
        unsafe { builder.region(shm.addr + 4096, 8192, Arc::new(ZeroSource)) },
        Err(PagerError::Overlap { .. })
    ));
}

#[test]
fn a_file_image_is_installed_with_its_contents() {
    const PAGES: usize = 64;
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    // Data on even pages (the pattern), holes on odd pages.
    let path = std::env::temp_dir().join(format!("pager-file-image-{}", std::process::id()));
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len((PAGES * PAGE) as u64).unwrap();
        let image = pattern(PAGES);
        for page in (0..PAGES).step_by(2) {
            file.write_all_at(&image[page * PAGE..(page + 1) * PAGE], (page * PAGE) as u64)
                .unwrap();
        }
    }
    let shm = Shm::new(PAGES);
    serve(
        &mut builder,
        &shm,
        Arc::new(FileSource::open(&path).unwrap()),
    );
    let pager = builder.start().unwrap();
    for page in 0..PAGES {
        let expected = if page % 2 == 0 {
            page as u64 * 0x1_0001 + 7
        } else {
            0
        };
        assert_eq!(read_u64(shm.page(page) + 64), expected, "page {page}");
    }
    let stats = pager.shutdown();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(stats.zero_pages, (PAGES / 2) as u64, "holes are zero pages");
    assert_eq!(
        stats.bytes_copied,
        (PAGES / 2 * PAGE) as u64,
        "data pages are copied"
    );
}

/// Blocks `mapped_addr` (the start of an install from a mapped source) until released, so
/// that other faults can join the install while it is in flight.
struct GatedMapping {
    inner: FileSource,
    gate: Arc<Barrier>,
    gated: std::sync::atomic::AtomicBool,
}

impl PageSource for GatedMapping {
    fn describe(&self) -> String {
        "gated mapping".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        self.inner.fetch(offset, buf)
    }
    fn mapped_addr(&self, offset: u64, len: u64) -> Option<u64> {
        if !self.gated.swap(true, Ordering::SeqCst) {
            self.gate.wait();
        }
        self.inner.mapped_addr(offset, len)
    }
}

#[test]
fn an_install_that_fails_part_way_poisons_exactly_the_rest_and_wakes_every_waiter() {
    const PAGES: usize = 16;
    let Some(mut builder) = builder(PagerConfig {
        readahead_pages: 8,
        fault_threads: 2,
        ..Default::default()
    }) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("pager-partial-{}", std::process::id()));
    std::fs::write(&path, pattern(PAGES)).unwrap();
    let source = Arc::new(GatedMapping {
        inner: FileSource::open(&path).unwrap(),
        gate: Arc::new(Barrier::new(2)),
        gated: std::sync::atomic::AtomicBool::new(false),
    });
    // The image shrinks to 5 pages under the open source: installing pages 2..10 from its
    // mapping copies pages 2-4, then fails at page 5.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5 * PAGE as u64)
        .unwrap();
    let shm = Shm::new(PAGES);
    serve(
        &mut builder,
        &shm,
        Arc::clone(&source) as Arc<dyn PageSource>,
    );
    let pager = builder.start().unwrap();
    // Page 2's fault claims pages 2..10 and stops at the gate; faults on 6, 7 and 9 join it.
    // Each toucher reports through a channel, so that one left hanging fails the test
    // instead of hanging it.
    let touch = |page: usize| {
        let addr = shm.page(page);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(kernel_read(addr)));
        rx
    };
    let returned = |rx: std::sync::mpsc::Receiver<Result<u64, i32>>| {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("every toucher returns")
    };
    let first = touch(2);
    wait_until("the install of page 2 to reach the gate", || {
        source.gated.load(Ordering::SeqCst)
    });
    let joiners: Vec<_> = [6, 7, 9].into_iter().map(touch).collect();
    let handle = pager.handle();
    wait_until("three faults to join the install in flight", || {
        handle.stats().faults_joined == 3
    });
    source.gate.wait();
    assert_eq!(returned(first), Ok(2 * 0x1_0001 + 7));
    for joiner in joiners {
        assert_eq!(
            returned(joiner),
            Err(libc::EFAULT),
            "a page past the end is an error"
        );
    }
    for page in [3, 4] {
        assert_eq!(kernel_read(shm.page(page)), Ok(page as u64 * 0x1_0001 + 7));
    }
    let stats = pager.shutdown();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(stats.pages_installed_urgent, 3, "pages 2-4");
    assert_eq!(stats.pages_poisoned, 5, "exactly pages 5-9");
}

#[test]
fn a_fault_thread_that_cannot_read_its_userfaultfd_is_fatal_under_either_policy() {
    let Some((pager, shm)) = pattern_pager(8, unpredicted()) else {
        return;
    };
    // Put a directory where the userfaultfd was: the fault thread's next read fails with
    // EISDIR, a real error from the kernel.
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    // SAFETY: replaces the pager's descriptor number with another open file (the test's
    // fault injection); the pager only ever uses it through system calls.
    let ret = unsafe { libc::dup2(dir.as_raw_fd(), pager.userfaultfd_raw_fd()) };
    assert!(ret >= 0, "{}", std::io::Error::last_os_error());
    // A touch wakes the fault thread (its poll still watches the old userfaultfd), whose read
    // then fails. The toucher must not stay blocked: the pager releases the memory.
    let target = shm.page(3);
    let toucher = std::thread::spawn(move || kernel_read(target));
    let handle = pager.handle();
    wait_until("the fatal error", || handle.fatal_error().is_some());
    let message = handle.fatal_error().unwrap();
    assert!(message.contains("cannot read its userfaultfd"), "{message}");
    toucher.join().unwrap().expect("the toucher returns");
    drop(pager);
}

#[test]
fn a_zero_fill_rate_is_refused_and_a_slow_one_does_not_hold_up_shutdown() {
    let Some(builder) = builder(PagerConfig {
        background_rate: Some(0),
        ..Default::default()
    }) else {
        return;
    };
    assert!(matches!(builder.start(), Err(PagerError::Config(_))));
    // One byte a second: after the first batch the worker waits for days.
    let Some((pager, _shm)) = pattern_pager(
        256,
        PagerConfig {
            background_rate: Some(1),
            ..Default::default()
        },
    ) else {
        return;
    };
    pager.fill_all();
    let handle = pager.handle();
    wait_until("the first batch", || {
        handle.stats().pages_installed_background > 0
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stats = pager.shutdown();
        let _ = done_tx.send(stats);
    });
    let stats = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("shutdown waits for nothing but the batch in flight");
    assert!(stats.pages_installed_background < 256);
}

#[test]
fn an_install_in_flight_when_its_page_is_removed_lands_as_zero() {
    // The background worker fetches page 3's old contents and stops at the gate.
    let Some((pager, shm, source)) = held_background_fetch(8, 3) else {
        return;
    };
    let gate = Arc::clone(&source.gate);
    // The page is removed meanwhile (a balloon): madvise returns once the pager has read the
    // event, and the kernel has dropped whatever was there.
    // SAFETY: discarding one page of our own mapping; no references into it.
    let ret = unsafe { libc::madvise(shm.page(3) as *mut libc::c_void, PAGE, libc::MADV_REMOVE) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // Now the install that was in flight goes on: it must not put the old contents back.
    gate.wait();
    let handle = pager.handle();
    wait_until("the install to complete", || {
        handle.stats().pages_installed_background == 1
    });
    assert_eq!(
        kernel_read(shm.page(3)),
        Ok(0),
        "a removed page reads as zero, not as what was fetched before the remove"
    );
    assert_eq!(kernel_read(shm.page(4)), Ok(4 * 0x1_0001 + 7));
    let stats = pager.shutdown();
    assert_eq!(stats.pages_removed, 1);
}

#[test]
fn a_strided_walk_is_installed_ahead_of_the_toucher() {
    const PAGES: usize = 6000;
    const STRIDE: usize = 3;
    let Some((pager, shm)) = pattern_pager(PAGES, PagerConfig::default()) else {
        return;
    };
    let touch = |page: usize| {
        assert_eq!(
            read_u64(shm.page(page) + 8),
            page as u64 * 0x1_0001 + 7,
            "page {page}"
        );
    };
    // Waits (boundedly) until the pages are installed: the toucher waits for the pager, so
    // that the test does not depend on which of them is faster.
    let wait_present = |pages: &[usize]| {
        wait_until("the pages installed ahead", || {
            pages.iter().all(|&p| pager.is_present(0, p))
        });
    };
    let line = |from: usize, count: usize| -> Vec<usize> {
        (0..count).map(|i| (from + i) * STRIDE).collect()
    };
    // Three faults in a line start a stream: the next 16 pages on the line are installed.
    for page in line(0, 3) {
        touch(page);
    }
    let first_window = line(3, 16);
    wait_present(&first_window);
    for &page in &first_window {
        touch(page);
    }
    assert_eq!(
        pager.stats().faults_other,
        3,
        "the window was there before the toucher"
    );
    // One past the window: a fault on the line, and a window twice as deep.
    touch(19 * STRIDE);
    let second_window = line(20, 32);
    wait_present(&second_window);
    for &page in &second_window {
        touch(page);
    }
    let stats = pager.shutdown();
    assert_eq!(stats.faults_other, 4);
    assert_eq!(stats.pages_predicted, 16 + 32);
    // Only pages on the line were installed, each once.
    assert_eq!(
        stats.pages_installed_urgent + stats.pages_installed_background,
        52
    );
    assert_eq!(stats.regions[0].pages_present, 52);
}

#[test]
fn a_predicted_page_that_fails_is_left_to_its_own_fault() {
    const PAGES: usize = 64;
    const BAD: usize = 10;
    let Some((pager, shm, reported)) = failing_pager(FailurePolicy::Stop, PAGES, BAD) else {
        return;
    };

    // A walk of stride 2: pages 6..=36 are predicted, the bad page 10 among them.
    for page in [0, 2, 4] {
        assert_eq!(read_u64(shm.page(page) + 8), page as u64 * 0x1_0001 + 7);
    }
    // The good pages arrive (so the window was queued); then the queue drains (so the bad
    // page was tried).
    let good: Vec<usize> = (6..=36).step_by(2).filter(|&p| p != BAD).collect();
    wait_until("the predicted pages", || {
        good.iter().all(|&p| pager.is_present(0, p)) && pager.stats().background_pending_pages == 0
    });
    assert!(!pager.is_present(0, BAD), "the bad page is left alone");
    assert!(
        reported.lock().unwrap().is_none(),
        "nobody touched it: no error yet"
    );
    assert_eq!(pager.stats().pages_poisoned, 0);

    // Touched, it fails the way the policy says.
    assert_eq!(kernel_read(shm.page(BAD)), Err(libc::EFAULT));
    refusal_reported(&reported);
    assert_eq!(pager.shutdown().pages_poisoned, 1);
}

/// Records the length of each read that reaches another source.
struct CountedReads {
    inner: MemorySource,
    reads: Arc<Mutex<Vec<usize>>>,
}

impl PageSource for CountedReads {
    fn describe(&self) -> String {
        "counted".into()
    }
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<Content, SourceError> {
        self.reads.lock().unwrap().push(buf.len());
        self.inner.fetch(offset, buf)
    }
}

#[test]
fn predicted_pages_from_a_slow_source_come_in_one_span_read() {
    const PAGES: usize = 600;
    const STRIDE: usize = 3;
    let Some(mut builder) = builder(PagerConfig::default()) else {
        return;
    };
    let shm = Shm::new(PAGES);
    let reads = Arc::new(Mutex::new(Vec::new()));
    // A read takes at least 1 ms: slow, whatever the machine.
    let source = SlowSource {
        inner: Arc::new(CountedReads {
            inner: MemorySource::new(pattern(PAGES)),
            reads: Arc::clone(&reads),
        }),
        delay: std::time::Duration::from_millis(1),
    };
    serve(&mut builder, &shm, Arc::new(source));
    let pager = builder.start().unwrap();
    let touch = |page: usize| {
        assert_eq!(
            read_u64(shm.page(page) + 16),
            page as u64 * 0x1_0001 + 7,
            "page {page}"
        );
    };
    // Three faults, three reads of a page: a line, from a slow source.
    for page in [0, STRIDE, 2 * STRIDE] {
        touch(page);
    }
    // The window (16 pages on the line) comes in one read of the span that holds it.
    let window: Vec<usize> = (3..19).map(|i| i * STRIDE).collect();
    wait_until("the window", || {
        window.iter().all(|&p| pager.is_present(0, p))
    });
    let span = (window[15] - window[0] + 1) * PAGE;
    assert_eq!(
        *reads.lock().unwrap(),
        [PAGE, PAGE, PAGE, span],
        "a read a fault, then one for the window"
    );
    for &page in &window {
        touch(page);
    }
    let stats = pager.shutdown();
    assert_eq!(stats.faults_other, 3);
    assert_eq!(stats.pages_poisoned, 0);
    // Only the window's pages were installed from the span, not the pages between them.
    assert_eq!(stats.regions[0].pages_present, 3 + 16);
}

/// A guard that records, per page written while protected, what the page held when the
/// write fault arrived (the bytes a live snapshot must save).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(usize, usize, u64)>>,
    base: Mutex<Vec<u64>>,
}

impl WriteGuard for Recorder {
    fn before_write(&self, region: usize, page: usize) {
        let base = self.base.lock().unwrap()[region];
        // The page is still protected: reading it is fine, and shows the old contents.
        let value = read_u64(base + (page * PAGE) as u64);
        self.seen.lock().unwrap().push((region, page, value));
    }
}

#[test]
fn a_protected_page_is_shown_to_the_guard_before_the_write_lands() {
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    let shm = Shm::new(16);
    for p in 0..8 {
        write_u64(shm.page(p), 100 + p as u64);
    }
    // SAFETY: the test's own shared mapping, mapped until `shm` drops, after the pager.
    unsafe { builder.region_write_protect_only(shm.addr, shm.len as u64) }.unwrap();
    let pager = builder.start().unwrap();
    let guard = Arc::new(Recorder::default());
    guard.base.lock().unwrap().push(shm.addr);
    pager.begin_write_protect(guard.clone()).unwrap();
    assert!(matches!(
        pager.begin_write_protect(guard.clone()),
        Err(PagerError::ProtectionActive)
    ));
    pager.protect(0, 0, 16).unwrap();
    // Page 3 is saved by its owner and unprotected first: its write does not fault.
    pager.unprotect(0, 3, 1).unwrap();
    let writer = std::thread::spawn({
        let addrs: Vec<u64> = (0..16).map(|p| shm.page(p)).collect();
        move || {
            for (p, addr) in addrs.iter().enumerate() {
                write_u64(*addr, 1000 + p as u64);
                write_u64(*addr + 8, 1); // a second write to the same page does not fault
            }
        }
    });
    writer.join().unwrap();
    let mut seen = guard.seen.lock().unwrap().clone();
    seen.sort();
    // Pages 0-7 held data, 8-15 were holes (zero), and protection covers both (shared memory
    // keeps a marker where no page is); page 3 had been let go.
    let expected: Vec<(usize, usize, u64)> = (0..16)
        .filter(|&p| p != 3)
        .map(|p| (0, p, if p < 8 { 100 + p as u64 } else { 0 }))
        .collect();
    assert_eq!(seen, expected);
    for p in 0..16 {
        assert_eq!(read_u64(shm.page(p)), 1000 + p as u64, "page {p}");
    }
    // (A fault is counted just after its writer is woken.)
    wait_until("15 faults counted", || {
        pager.protect_stats().write_faults == 15
    });
    let (stats, result) = pager.end_write_protect();
    result.unwrap();
    assert_eq!(stats.write_faults, 15);
    assert!(stats.stall_max_us >= stats.stall_p50_us);
    // Nothing is protected after the end.
    pager.begin_write_protect(guard.clone()).unwrap();
    let (_, result) = pager.end_write_protect();
    result.unwrap();
    write_u64(shm.page(5), 7);
    assert_eq!(guard.seen.lock().unwrap().len(), 15);
    assert!(pager.fatal_error().is_none());
}

#[test]
fn a_lazy_region_takes_write_protection_and_goes_on_serving_missing_pages() {
    let Some((pager, shm)) = pattern_pager(8, unpredicted()) else {
        return;
    };
    let expected = pattern(8);
    let word = |p: usize| u64::from_le_bytes(expected[p * PAGE..p * PAGE + 8].try_into().unwrap());
    // Pages 0 and 1 are installed before the protection, the rest are still in the source.
    assert_eq!(read_u64(shm.page(0)), word(0));
    assert_eq!(read_u64(shm.page(1)), word(1));
    assert_eq!(pager.settled_page_state(0, 1).unwrap(), PageState::Present);
    assert_eq!(pager.settled_page_state(0, 2).unwrap(), PageState::InSource);
    let guard = Arc::new(Recorder::default());
    guard.base.lock().unwrap().push(shm.addr);
    pager.begin_write_protect(guard.clone()).unwrap();
    pager.protect(0, 0, 8).unwrap();
    write_u64(shm.page(1), 11);
    // A missing page is installed (writable: it held nothing to protect) and written.
    write_u64(shm.page(5), 55);
    assert_eq!(read_u64(shm.page(5)), 55);
    assert_eq!(read_u64(shm.page(5) + 8), word(5));
    wait_until("the fault counted", || {
        pager.protect_stats().write_faults == 1
    });
    let (stats, result) = pager.end_write_protect();
    result.unwrap();
    assert_eq!(*guard.seen.lock().unwrap(), [(0, 1, word(1))]);
    assert_eq!(stats.write_faults, 1);
    assert_eq!(read_u64(shm.page(1)), 11);
    write_u64(shm.page(0), 1);
    assert_eq!(guard.seen.lock().unwrap().len(), 1);
    assert!(pager.fatal_error().is_none());
}

/// Bytes of the memfd behind `shm` that hold pages (st_blocks).
fn allocated(shm: &Shm) -> u64 {
    let stat = rustix::fs::fstat(&shm._file).unwrap();
    stat.st_blocks as u64 * 512
}

/// A pager over a fresh `pages`-page mapping of a memfd (its backing), swapping to a file in
/// `dir`; the pages hold what the test writes (zero source: nothing else).
fn swapping_pager(pages: usize, dir: &Path, config: PagerConfig) -> Option<(Pager, Shm)> {
    let mut builder = builder(PagerConfig {
        swap_file: Some(dir.join("swap")),
        ..config
    })?;
    let shm = Shm::new(pages);
    serve(&mut builder, &shm, Arc::new(ZeroSource));
    builder
        .backing(0, Arc::new(shm._file.try_clone().unwrap()), 0)
        .unwrap();
    Some((builder.start().unwrap(), shm))
}

#[test]
fn swap_over_a_write_protect_only_region_is_refused() {
    // Such a region gets no missing faults: a page swapped out of it would come back as a
    // zero page, its data lost.
    let dir = temp_dir("swap-wp-only");
    let Some(mut builder) = builder(PagerConfig {
        swap_file: Some(dir.join("swap")),
        ..unpredicted()
    }) else {
        return;
    };
    let shm = Shm::new(8);
    // SAFETY: the test's own shared mapping, mapped until `shm` drops.
    unsafe { builder.region_write_protect_only(shm.addr, shm.len as u64) }.unwrap();
    builder
        .backing(0, Arc::new(shm._file.try_clone().unwrap()), 0)
        .unwrap();
    match builder.start() {
        Err(PagerError::Config(why)) => assert!(why.contains("write-protect-only"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a swapping pager over a write-protect-only region started"),
    }
    assert!(!dir.join("swap").exists(), "the swap file was made");
    let _ = std::fs::remove_dir_all(&dir);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pager-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn page_ranges_that_run_past_the_end_of_the_address_space_are_cut_or_refused() {
    // `first + count` past usize::MAX: nothing wraps round to a small range (in a build
    // without overflow checks, the wrapped end passed the bounds checks).
    let dir = temp_dir("swap-overflow");
    let Some((pager, _shm)) = swapping_pager(8, &dir, unpredicted()) else {
        return;
    };
    let handle = pager.handle();
    let far = usize::MAX - 1;
    handle.mark_zero(0, far, 4).unwrap();
    assert_eq!(handle.install_zero_pages(0, far, 4).unwrap(), 0);
    let report = handle.swap_out(0, far, 4).unwrap();
    assert_eq!(report.swapped, 0, "{report:?}");
    assert!(matches!(
        handle.unprotect(0, far, 4),
        Err(PagerError::WriteProtect(why)) if why.contains("outside region 0")
    ));
    pager.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_released_page_comes_back_from_the_source_not_from_the_swap_file() {
    let dir = temp_dir("swap-release");
    let Some((pager, shm)) = swapping_pager(8, &dir, unpredicted()) else {
        return;
    };
    let handle = pager.handle();
    write_u64(shm.page(3), 42);
    wait_until("page 3 present", || handle.resident_pages() >= 1);
    assert_eq!(handle.swap_out(0, 3, 1).unwrap().swapped, 1);
    // Released, it is the source's again (a zero source here), not what was swapped out.
    handle.release(0, 3, 1).unwrap();
    assert_eq!(read_u64(shm.page(3)), 0);
    pager.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swapped_out_pages_leave_ram_and_come_back_on_touch() {
    let dir = temp_dir("swap");
    let Some((pager, shm)) = swapping_pager(64, &dir, unpredicted()) else {
        return;
    };
    // Pages 0-47 hold data, 48-63 are touched zero pages.
    for p in 0..64 {
        write_u64(shm.page(p), if p < 48 { 1000 + p as u64 } else { 0 });
    }
    // (A fault's page is marked present just after its toucher was woken.)
    wait_until("every page present", || pager.resident_pages() == 64);
    let before = allocated(&shm);
    let report = pager.swap_out(0, 0, 64).unwrap();
    assert_eq!(
        report,
        SwapOutReport {
            swapped: 48,
            unchanged: 0,
            zero: 16,
            bytes_written: 48 * PAGE as u64
        }
    );
    assert_eq!(pager.resident_pages(), 0);
    assert_eq!(
        allocated(&shm),
        before - 64 * PAGE as u64,
        "released from the memfd"
    );
    assert_eq!(pager.settled_page_state(0, 3).unwrap(), PageState::Swapped);
    assert_eq!(
        pager.settled_page_state(0, 50).unwrap(),
        PageState::Discarded
    );
    // Touches bring them back: data from the swap file, zero pages as zero.
    for p in 0..64 {
        assert_eq!(
            read_u64(shm.page(p)),
            if p < 48 { 1000 + p as u64 } else { 0 }
        );
    }
    // (A fault is counted just after its toucher is woken.)
    wait_until("48 swap-ins counted", || {
        let stats = pager.swap_stats();
        stats.pages_swapped_in == 48 && stats.swap_in_faults == 48
    });
    let stats = pager.swap_stats();
    assert_eq!(stats.pages_swapped_in, 48);
    assert_eq!(stats.swap_in_faults, 48);
    assert_eq!(stats.swapped_bytes, 0);
    assert_eq!(stats.metadata_bytes, 8, "one bit per page");
    // Out again: unchanged pages are not written again; a changed one is.
    write_u64(shm.page(5), 5555);
    wait_until("every page present", || pager.resident_pages() == 64);
    let report = pager.swap_out(0, 0, 64).unwrap();
    assert_eq!(
        (report.swapped, report.unchanged, report.zero),
        (48, 47, 16)
    );
    assert_eq!(report.bytes_written, PAGE as u64);
    assert_eq!(read_u64(shm.page(5)), 5555);
    assert_eq!(read_u64(shm.page(6)), 1006);
    // Swap-in in the background brings the rest back.
    pager.swap_in_all();
    wait_until("swap-in", || pager.swap_stats().swapped_bytes == 0);
    assert_eq!(read_u64(shm.page(47)), 1047);
    assert!(pager.fatal_error().is_none());
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writes_racing_a_swap_out_are_never_lost() {
    let dir = temp_dir("swap-race");
    let Some((pager, shm)) = swapping_pager(256, &dir, unpredicted()) else {
        return;
    };
    for p in 0..256 {
        write_u64(shm.page(p), 1);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let addrs: Vec<u64> = (0..256).map(|p| shm.page(p)).collect();
        let stop = Arc::clone(&stop);
        move || {
            // Each page's word counts the writes to it; reads and writes go through the
            // pager whatever state the page is in.
            let mut counts = vec![0u64; addrs.len()];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = (i * 7) % addrs.len();
                let value = read_u64(addrs[p]) + 1;
                write_u64(addrs[p], value);
                counts[p] += 1;
                i += 1;
            }
            counts
        }
    });
    let mut swapped = 0;
    for _ in 0..40 {
        swapped += pager.swap_out(0, 0, 256).unwrap().swapped;
    }
    stop.store(true, Ordering::Relaxed);
    let counts = writer.join().unwrap();
    assert!(swapped > 0);
    for (p, count) in counts.iter().enumerate() {
        assert_eq!(read_u64(shm.page(p)), 1 + count, "page {p}");
    }
    assert!(pager.fatal_error().is_none());
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_swap_file_fails_the_page_never_serves_wrong_bytes() {
    let dir = temp_dir("swap-damaged");
    let config = PagerConfig {
        failure_policy: FailurePolicy::Stop,
        ..unpredicted()
    };
    let Some((pager, shm)) = swapping_pager(4, &dir, config) else {
        return;
    };
    for p in 0..4 {
        write_u64(shm.page(p), 77 + p as u64);
    }
    pager.swap_out(0, 0, 4).unwrap();
    // One byte of page 2's slot flipped under the pager.
    let swap = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("swap"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&swap, &[0xff], 2 * PAGE as u64 + 100).unwrap();
    assert_eq!(kernel_read(shm.page(1)), Ok(78));
    assert_eq!(kernel_read(shm.page(2)), Err(libc::EFAULT));
    let fatal = pager.fatal_error().expect("the damage is reported");
    assert!(fatal.contains("does not match its checksum"), "{fatal}");
    assert!(fatal.contains("swap"), "{fatal}");
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_ahead_run_never_mixes_swapped_pages_with_others() {
    let dir = temp_dir("swap-readahead");
    let config = PagerConfig {
        readahead_pages: 4,
        ..unpredicted()
    };
    let Some((pager, shm)) = swapping_pager(8, &dir, config) else {
        return;
    };
    // Pages 0-3 hold data and are swapped out; 4-7 were never touched (in the source).
    for p in 0..4 {
        write_u64(shm.page(p), 40 + p as u64);
    }
    wait_until("pages present", || pager.resident_pages() == 4);
    assert_eq!(pager.swap_out(0, 0, 8).unwrap().swapped, 4);
    // A fault on page 2 claims up to 4 pages: 2 and 3 (swapped), not 4 and 5.
    for p in [2, 0, 1, 3, 4, 5, 6, 7] {
        assert_eq!(read_u64(shm.page(p)), if p < 4 { 40 + p as u64 } else { 0 });
    }
    assert!(pager.fatal_error().is_none());
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resident_limit_holds_while_a_toucher_cycles_over_four_times_as_much() {
    let dir = temp_dir("swap-limit");
    let config = PagerConfig {
        resident_limit: Some(64 * PAGE as u64),
        ..unpredicted()
    };
    let Some((pager, shm)) = swapping_pager(256, &dir, config) else {
        return;
    };
    let mut most = 0;
    for pass in 1..=4u64 {
        for p in 0..256 {
            let addr = shm.page(p);
            let before = read_u64(addr);
            assert_eq!(before, pass - 1, "page {p} in pass {pass}");
            write_u64(addr, pass);
            most = most.max(allocated(&shm));
        }
    }
    let stats = pager.swap_stats();
    assert_eq!(stats.limit_overruns, 0, "{stats:?}");
    assert!(stats.pages_evicted >= 256 * 3, "{stats:?}");
    assert!(
        most <= 64 * PAGE as u64,
        "{most} bytes resident, over the limit"
    );
    assert!(pager.fatal_error().is_none());
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_page_noted_written_stays_resident_under_a_limit() {
    let dir = temp_dir("swap-hot");
    let config = PagerConfig {
        resident_limit: Some(64 * PAGE as u64),
        ..unpredicted()
    };
    let Some((pager, shm)) = swapping_pager(256, &dir, config) else {
        return;
    };
    write_u64(shm.page(0), 1);
    let mut evicted_hot = 0;
    for pass in 0..3 {
        for p in 1..256 {
            write_u64(shm.page(p), pass);
            // Page 0 is written all the time, as a VMM's dirty log would say.
            // (Counted from the second pass: at the first eviction every page was just
            // faulted in, so CLOCK starts as first in, first out.)
            let state = pager.settled_page_state(0, 0).unwrap();
            if pass > 0 && state != PageState::Present {
                evicted_hot += 1;
            }
            write_u64(shm.page(0), p as u64);
            pager.note_written(0, 0);
        }
    }
    let stats = pager.swap_stats();
    assert!(stats.pages_evicted > 500, "{stats:?}");
    // Every eviction since passed page 0 by.
    assert_eq!(evicted_hot, 0);
    drop(pager);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pages_marked_zero_are_given_as_zero_without_the_source() {
    // Page 3 of the source cannot be read: marked zero, it never has to be.
    let config = PagerConfig {
        failure_policy: FailurePolicy::Stop,
        ..unpredicted()
    };
    let Some((pager, shm, reported)) = failing_pager_with(config, 8, 3) else {
        return;
    };
    let expected = pattern(8);
    assert_eq!(
        read_u64(shm.page(2)),
        u64::from_le_bytes(expected[2 * PAGE..2 * PAGE + 8].try_into().unwrap())
    );
    wait_until("page 2 present", || pager.is_present(0, 2));
    pager.mark_zero(0, 2, 3).unwrap();
    assert!(pager.holds(0, 3) && pager.holds(0, 4) && !pager.holds(0, 5));
    let before = pager.stats();
    assert_eq!(read_u64(shm.page(3)), 0);
    assert_eq!(read_u64(shm.page(4)), 0);
    // A present page marked zero keeps its contents.
    assert_eq!(
        read_u64(shm.page(2)),
        u64::from_le_bytes(expected[2 * PAGE..2 * PAGE + 8].try_into().unwrap())
    );
    // (Counted just after the toucher is woken.)
    wait_until("two zero pages counted", || {
        pager.stats().zero_pages == before.zero_pages + 2
    });
    assert!(
        reported.lock().unwrap().is_none(),
        "the source was never asked for page 3"
    );
    assert!(pager.fatal_error().is_none());
    // A page marked zero and never touched reads zero after the pager is gone: its regions
    // are unregistered at shutdown, so the touch does not wait for a pager that left.
    assert_eq!(pager.settled_page_state(0, 6).unwrap(), PageState::InSource);
    pager.mark_zero(0, 6, 1).unwrap();
    // A handle outlives the pager (as the VM's vCPU-thread hook keeps one): the userfaultfd
    // stays open.
    let _handle = pager.handle();
    pager.shutdown();
    let addr = shm.page(6);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(read_u64(addr)).unwrap());
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
}

/// A source whose fetches wait until it is stopped (a network peer that never answers).
#[derive(Default)]
struct Unanswered {
    stopped: Mutex<bool>,
    cv: std::sync::Condvar,
    waiting: AtomicUsize,
}

impl PageSource for Unanswered {
    fn describe(&self) -> String {
        "unanswered".into()
    }
    fn fetch(&self, offset: u64, _buf: &mut [u8]) -> Result<Content, SourceError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut stopped = self.stopped.lock().unwrap();
        while !*stopped {
            stopped = self.cv.wait(stopped).unwrap();
        }
        Err(SourceError::Unavailable {
            offset,
            reason: "stopped".into(),
        })
    }
    fn stop(&self) {
        *self.stopped.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[test]
fn a_shutdown_stops_a_fetch_that_waits_on_a_silent_source() {
    // Under the policy that stops the VM on a page that cannot be had: the fetch the shutdown
    // ends is no such page, and nothing fatal is reported.
    let Some(mut builder) = builder(PagerConfig {
        failure_policy: FailurePolicy::Stop,
        ..unpredicted()
    }) else {
        return;
    };
    let reported = Arc::new(Mutex::new(None::<String>));
    let sink = Arc::clone(&reported);
    builder.on_fatal(move |message| *sink.lock().unwrap() = Some(message.to_string()));
    let shm = Shm::new(4);
    let source = Arc::new(Unanswered::default());
    // Behind an offset, as guest RAM's regions are: the stop must reach the inner source.
    let offset: Arc<dyn PageSource> = Arc::new(OffsetSource {
        inner: source.clone(),
        base: 0,
    });
    serve(&mut builder, &shm, offset);
    let pager = builder.start().unwrap();
    // A kernel-mode read faults and waits on the source (it gets EFAULT once it gives up).
    let addr = shm.page(1);
    let toucher = std::thread::spawn(move || kernel_read(addr));
    wait_until("a fetch waiting", || {
        source.waiting.load(Ordering::SeqCst) > 0
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(pager.shutdown()).unwrap());
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the pager's shutdown waited on the silent source"
    );
    assert_eq!(toucher.join().unwrap(), Err(libc::EFAULT));
    assert_eq!(
        *reported.lock().unwrap(),
        None,
        "a shutdown is not a memory failure"
    );
}

#[test]
fn a_released_page_comes_from_its_source_again_even_once_marked_zero() {
    // Page 1 was marked zero (a migration's zero range), then the guest wrote it; released
    // (it will come again from the source), its next touch must fetch it, not give zero.
    let Some(mut builder) = builder(unpredicted()) else {
        return;
    };
    let shm = Shm::new(4);
    serve(&mut builder, &shm, Arc::new(MemorySource::new(pattern(4))));
    builder
        .backing(0, Arc::new(shm._file.try_clone().unwrap()), 0)
        .unwrap();
    let pager = builder.start().unwrap();
    pager.mark_zero(0, 1, 1).unwrap();
    write_u64(shm.page(1), 77);
    wait_until("page 1 present", || pager.is_present(0, 1));
    pager.handle().release(0, 1, 1).unwrap();
    assert_eq!(pager.settled_page_state(0, 1).unwrap(), PageState::InSource);
    let expected = pattern(4);
    assert_eq!(
        read_u64(shm.page(1)),
        u64::from_le_bytes(expected[PAGE..PAGE + 8].try_into().unwrap())
    );
}
