//! Every operation on a real userfaultfd: a toucher thread faults, this thread answers.
//! Needs /dev/userfaultfd or the userfaultfd(2) syscall (root here); skips loudly without.

use std::os::fd::AsRawFd;
use std::thread;

use crate::*;

const PAGE: usize = PAGE_SIZE as usize;

/// An mmap'd test area, unmapped on drop.
struct Area {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the area is plain memory; tests hand its address between threads on purpose.
unsafe impl Send for Area {}
unsafe impl Sync for Area {}

impl Area {
    fn anonymous(pages: usize) -> Area {
        Self::map(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    fn shared(pages: usize, memfd: &std::fs::File) -> Area {
        Self::map(pages, libc::MAP_SHARED, memfd.as_raw_fd())
    }

    fn map(pages: usize, flags: i32, fd: i32) -> Area {
        let len = pages * PAGE;
        // SAFETY: a fresh mapping with no address hint; checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Area {
            addr: addr as *mut u8,
            len,
        }
    }

    fn page(&self, index: usize) -> u64 {
        self.addr as u64 + (index * PAGE) as u64
    }

    fn start(&self) -> u64 {
        self.addr as u64
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: test addresses point into live mappings made by `Area`.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, value: u64) {
    // SAFETY: as for read_u64.
    unsafe { std::ptr::write_volatile(addr as *mut u64, value) }
}

fn memfd(pages: usize) -> std::fs::File {
    let fd = rustix::fs::memfd_create("uffd-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let file = std::fs::File::from(fd);
    file.set_len((pages * PAGE) as u64).unwrap();
    file
}

/// Opens a userfaultfd, or says loudly that the test is skipped.
fn open(features: Features) -> Option<Uffd> {
    match Uffd::open(features) {
        Ok(uffd) => Some(uffd),
        Err(UffdError::Open { device, syscall })
            if std::env::var_os("FAULTLINE_REQUIRE_UFFD").is_none() =>
        {
            eprintln!("SKIPPED: no userfaultfd here (device: {device}; syscall: {syscall})");
            None
        }
        Err(e) => panic!("cannot open a userfaultfd: {e}"),
    }
}

/// Blocks until one event arrives and returns it.
fn next_event(uffd: &Uffd) -> Event {
    let mut events = Vec::new();
    while events.is_empty() {
        uffd.wait(5_000).unwrap();
        uffd.read_events(&mut events, 1).unwrap();
    }
    events.remove(0)
}

fn page_of(value: u64) -> Vec<u8> {
    value
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(PAGE)
        .collect()
}

#[test]
fn open_reports_how_and_what() {
    let Some(uffd) = open(Features::MISSING_SHMEM | Features::THREAD_ID) else {
        return;
    };
    assert!(uffd
        .features()
        .contains(Features::MISSING_SHMEM | Features::THREAD_ID));
    let offered = supported_features().unwrap();
    assert!(offered.contains(Features::MISSING_SHMEM));
    eprintln!(
        "userfaultfd via {:?}; kernel offers {offered}",
        uffd.opened_through()
    );
}

#[test]
fn missing_features_are_named() {
    if open(Features::NONE).is_none() {
        return;
    }
    let unknown = Features(1 << 40);
    match Uffd::open(Features::THREAD_ID | unknown) {
        Err(UffdError::MissingFeatures { missing, .. }) => assert_eq!(missing, unknown),
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
}

#[test]
fn copy_serves_a_missing_fault_and_never_overwrites() {
    let Some(uffd) = open(Features::THREAD_ID) else {
        return;
    };
    let area = Area::anonymous(4);
    let ioctls = /* SAFETY: the test's own raw mapping. */ unsafe { uffd
        .register(area.start(), area.len as u64, RegisterMode::MISSING) }
        .unwrap();
    assert!(ioctls.copy() && ioctls.zeropage());
    let target = area.page(2) + 8;
    let toucher = thread::spawn(move || {
        (
            read_u64(target),
            rustix::thread::gettid().as_raw_nonzero().get() as u32,
        )
    });
    match next_event(&uffd) {
        Event::PageFault {
            address,
            write,
            wp,
            minor,
            thread_id,
        } => {
            assert_eq!(address, area.page(2));
            assert!(!write && !wp && !minor);
            let (value, tid) = {
                assert_eq!(
                    /* SAFETY: the test's own raw mapping. */
                    unsafe { uffd.copy(address, &page_of(0xfeed), CopyMode::default()) }.unwrap(),
                    Outcome::Done
                );
                toucher.join().unwrap()
            };
            assert_eq!(value, 0xfeed);
            assert_eq!(thread_id, tid, "the event names the faulting thread");
        }
        other => panic!("unexpected {other:?}"),
    }
    // A second install of the same page is refused, and the first contents stay.
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(2), &page_of(0xbad), CopyMode::default()) }.unwrap(),
        Outcome::Exists { done: 0 }
    );
    assert_eq!(read_u64(area.page(2)), 0xfeed);
    // A two-page copy over [1, 2] stops at the present page 2 after installing page 1: the
    // kernel reports the partial copy as EAGAIN; retrying the rest gives EEXIST.
    let two: Vec<u8> = page_of(0x11).into_iter().chain(page_of(0x22)).collect();
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(1), &two, CopyMode::default()) }.unwrap(),
        Outcome::Again { done: PAGE_SIZE }
    );
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(2), &two[PAGE..], CopyMode::default()) }.unwrap(),
        Outcome::Exists { done: 0 }
    );
    assert_eq!(read_u64(area.page(1)), 0x11);
    assert_eq!(read_u64(area.page(2)), 0xfeed);
}

#[test]
fn dontwake_copy_then_wake() {
    let Some(uffd) = open(Features::NONE) else {
        return;
    };
    let area = Area::anonymous(1);
    /* SAFETY: the test's own raw mapping. */
    unsafe { uffd.register(area.start(), area.len as u64, RegisterMode::MISSING) }.unwrap();
    let target = area.page(0);
    let toucher = thread::spawn(move || read_u64(target));
    let Event::PageFault { address, .. } = next_event(&uffd) else {
        panic!("expected a fault")
    };
    let mode = CopyMode {
        dont_wake: true,
        ..Default::default()
    };
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(address, &page_of(7), mode) }.unwrap(),
        Outcome::Done
    );
    uffd.wake(address, PAGE_SIZE).unwrap();
    assert_eq!(toucher.join().unwrap(), 7);
}

#[test]
fn zeropage_on_anonymous_and_shmem() {
    let Some(uffd) = open(Features::MISSING_SHMEM) else {
        return;
    };
    let file = memfd(2);
    for area in [Area::anonymous(2), Area::shared(2, &file)] {
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.register(area.start(), area.len as u64, RegisterMode::MISSING) }.unwrap();
        let target = area.page(1);
        let toucher = thread::spawn(move || read_u64(target));
        let Event::PageFault { address, .. } = next_event(&uffd) else {
            panic!("expected a fault")
        };
        assert_eq!(
            /* SAFETY: the test's own raw mapping. */
            unsafe { uffd.zeropage(address, PAGE_SIZE, false) }.unwrap(),
            Outcome::Done
        );
        assert_eq!(toucher.join().unwrap(), 0);
        assert_eq!(
            /* SAFETY: the test's own raw mapping. */
            unsafe { uffd.zeropage(address, PAGE_SIZE, false) }.unwrap(),
            Outcome::Exists { done: 0 }
        );
    }
}

#[test]
fn continue_maps_a_page_cache_page_on_a_minor_fault() {
    let Some(uffd) = open(Features::MINOR_SHMEM) else {
        return;
    };
    let file = memfd(2);
    // Put the contents in the page cache through the file, not the mapping.
    std::os::unix::fs::FileExt::write_all_at(&file, &page_of(0xc0ffee), PAGE as u64).unwrap();
    let area = Area::shared(2, &file);
    let ioctls = /* SAFETY: the test's own raw mapping. */ unsafe { uffd
        .register(area.start(), area.len as u64, RegisterMode::MINOR) }
        .unwrap();
    assert!(ioctls.continue_());
    let target = area.page(1);
    let toucher = thread::spawn(move || read_u64(target));
    match next_event(&uffd) {
        Event::PageFault { address, minor, .. } => {
            assert!(minor);
            assert_eq!(
                /* SAFETY: the test's own raw mapping. */
                unsafe { uffd.continue_(address, PAGE_SIZE, false, false) }.unwrap(),
                Outcome::Done
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(toucher.join().unwrap(), 0xc0ffee);
}

#[test]
fn write_protect_faults_and_release() {
    let Some(uffd) = open(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let area = Area::anonymous(1);
    /* SAFETY: the test's own raw mapping. */
    unsafe {
        uffd.register(
            area.start(),
            area.len as u64,
            RegisterMode::MISSING | RegisterMode::WP,
        )
    }
    .unwrap();
    // Install write-protected, then a write must fault as a WP fault.
    let mode = CopyMode {
        write_protect: true,
        ..Default::default()
    };
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.start(), &page_of(1), mode) }.unwrap(),
        Outcome::Done
    );
    assert_eq!(read_u64(area.start()), 1, "reads are not blocked");
    let target = area.start();
    let writer = thread::spawn(move || write_u64(target, 99));
    match next_event(&uffd) {
        Event::PageFault {
            address, write, wp, ..
        } => {
            assert_eq!(address, area.start());
            assert!(write && wp);
            uffd.writeprotect(address, PAGE_SIZE, false, false).unwrap();
        }
        other => panic!("unexpected {other:?}"),
    }
    writer.join().unwrap();
    assert_eq!(read_u64(area.start()), 99);
}

#[test]
fn poison_answers_with_an_error() {
    let Some(uffd) = open(Features::POISON) else {
        return;
    };
    let area = Area::anonymous(1);
    let ioctls = /* SAFETY: the test's own raw mapping. */ unsafe { uffd
        .register(area.start(), area.len as u64, RegisterMode::MISSING) }
        .unwrap();
    assert!(ioctls.poison());
    let (read_end, write_end) = rustix::pipe::pipe().unwrap();
    let target = area.start();
    // A kernel-mode access (write(2) from the page) gets EFAULT instead of a SIGBUS.
    let writer = thread::spawn(move || {
        // SAFETY: the pointer is a live mapping; the kernel validates the access itself.
        let ret = unsafe { libc::write(write_end.as_raw_fd(), target as *const libc::c_void, 8) };
        (ret, std::io::Error::last_os_error().raw_os_error())
    });
    let Event::PageFault { address, .. } = next_event(&uffd) else {
        panic!("expected a fault")
    };
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.poison(address, PAGE_SIZE, false) }.unwrap(),
        Outcome::Done
    );
    assert_eq!(writer.join().unwrap(), (-1, Some(libc::EFAULT)));
    drop(read_end);
}

#[test]
fn move_takes_the_source_pages() {
    let Some(uffd) = open(Features::MOVE) else {
        return;
    };
    let dst = Area::anonymous(1);
    let src = Area::anonymous(1);
    write_u64(src.start(), 0x5151);
    let ioctls = /* SAFETY: the test's own raw mapping. */ unsafe { uffd
        .register(dst.start(), dst.len as u64, RegisterMode::MISSING) }
        .unwrap();
    assert!(ioctls.move_());
    // SAFETY: nothing refers to `src` but raw addresses in this test.
    let outcome =
        unsafe { uffd.move_pages(dst.start(), src.start(), PAGE_SIZE, false, false) }.unwrap();
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(read_u64(dst.start()), 0x5151);
    assert_eq!(read_u64(src.start()), 0, "the page left the source");
}

#[test]
fn remove_event_then_again_until_read() {
    let Some(uffd) = open(Features::EVENT_REMOVE) else {
        return;
    };
    let area = Area::anonymous(2);
    /* SAFETY: the test's own raw mapping. */
    unsafe { uffd.register(area.start(), area.len as u64, RegisterMode::MISSING) }.unwrap();
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(0), &page_of(3), CopyMode::default()) }.unwrap(),
        Outcome::Done
    );
    let (start, len) = (area.start(), area.len);
    // madvise blocks until the handler reads the remove event.
    let advisor = thread::spawn(move || {
        // SAFETY: dropping pages of a live mapping; nothing holds references into it.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) }
    });
    assert!(uffd.wait(5_000).unwrap(), "the remove event arrives");
    // While the event is unread the address space is changing: installs get EAGAIN.
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(1), &page_of(4), CopyMode::default()) }.unwrap(),
        Outcome::Again { done: 0 }
    );
    match next_event(&uffd) {
        Event::Remove { start, end } => {
            assert_eq!((start, end), (area.start(), area.start() + area.len as u64))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(advisor.join().unwrap(), 0);
    // After the remove, page 0 is missing again and can be installed anew.
    assert_eq!(
        /* SAFETY: the test's own raw mapping. */
        unsafe { uffd.copy(area.page(0), &page_of(5), CopyMode::default()) }.unwrap(),
        Outcome::Done
    );
    assert_eq!(read_u64(area.page(0)), 5);
}

#[test]
fn unregistered_memory_faults_normally() {
    let Some(uffd) = open(Features::NONE) else {
        return;
    };
    let area = Area::anonymous(1);
    /* SAFETY: the test's own raw mapping. */
    unsafe { uffd.register(area.start(), area.len as u64, RegisterMode::MISSING) }.unwrap();
    uffd.unregister(area.start(), area.len as u64).unwrap();
    write_u64(area.start(), 9);
    assert_eq!(read_u64(area.start()), 9);
    let mut events = Vec::new();
    assert_eq!(uffd.read_events(&mut events, 4).unwrap(), 0);
}

#[test]
fn bad_ranges_are_errors_naming_the_operation() {
    let Some(uffd) = open(Features::NONE) else {
        return;
    };
    let err = /* SAFETY: the test's own raw mapping. */ unsafe { uffd
        .register(0x1234, 100, RegisterMode::MISSING) }
        .unwrap_err();
    assert!(err.to_string().contains("UFFDIO_REGISTER"), "{err}");
}
