//! Threads taking turns at a stream of pages, as a destination reads it: each reads a message
//! and installs the pages it read itself, so some install (a new page of guest RAM, a copy
//! into it) while one reads (a copy out of the socket, the checksum), and each run is copied
//! into guest RAM by the core that has just written it. (Handing runs to an installer thread
//! made that core fetch every byte from the other core's cache: on these hosts, in some
//! placements of their two vCPUs, that doubled a 1 GiB post-copy. A fresh page of guest RAM
//! can also cost a fault in the host, which the threads take side by side.)
//!
//! The turns end at the first message that is not pages, which is returned once every page
//! read before it is installed: the caller handles it, alone. Two installs in flight never
//! hold the same page as long as the source sends a page at most once before such a message.

use std::io::Read;
use std::sync::Mutex;

use migrate::{read_message_reusing, Message, ProtocolError};

use crate::locking::lock;

/// Why the turns stopped short.
pub(super) trait Failure: Sized + Send {
    /// Reading the stream failed.
    fn from_read(error: ProtocolError) -> Self;
    /// A thread panicked.
    fn panicked() -> Self;
    /// Whether `self`, coming after `kept`, is the failure to report instead (else the first
    /// one is).
    fn outranks(&self, _kept: &Self) -> bool {
        false
    }
}

impl Failure for anyhow::Error {
    fn from_read(error: ProtocolError) -> Self {
        anyhow::Error::from(error).context("the migration stream failed")
    }

    fn panicked() -> Self {
        anyhow::anyhow!("a migration stream reader panicked")
    }
}

/// The stream, read a message at a time by whichever thread holds it.
struct Turns<'a, R, E> {
    reader: &'a mut R,
    /// The pages are over (a message that is not pages was read) or a thread failed: the
    /// other stops too.
    over: bool,
    /// The message that ended the pages.
    ended_by: Option<Message>,
    failure: Option<E>,
}

/// How many threads take turns. An install takes about twice as long as a read, so with two
/// the stream waited for a reader about a third of the time; a third took a 1 GiB post-copy from a
/// median of 666 ms to 604 and a pre-copy from 575 to 519 (alternating five and four times,
/// on two cores that the source shares, in a quick hour; in a slow one it made no
/// difference); a fourth gained nothing more.
pub(crate) const THREADS: usize = 3;

/// Reads `reader` on this thread and [`THREADS`] - 1 more (named `name`), each installing the
/// pages of the `Pages` and `ZeroPages` messages it read with `install`, and returns the first
/// other message, with every page before it installed. A failure ends every thread's turns:
/// the first failure is returned, unless a later one outranks it. Without more threads to be
/// had, those there are read alone.
pub(super) fn take_pages_in_turns<R, I, E>(
    reader: &mut R,
    name: &str,
    install: &I,
) -> Result<Message, E>
where
    R: Read + Send,
    I: Fn(&Message) -> Result<(), E> + Sync,
    E: Failure,
{
    let turns = Mutex::new(Turns {
        reader,
        over: false,
        ended_by: None,
        failure: None,
    });
    std::thread::scope(|scope| {
        let take = || {
            // A panic ends the others' turns too, and counts as this thread's failure.
            let _guard = EndOnPanic(&turns);
            if let Err(failure) = take_turns(&turns, install) {
                end(&turns, failure);
            }
        };
        let others: Vec<_> = (1..THREADS)
            .map_while(|_| {
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn_scoped(scope, take)
                    .inspect_err(|e| tracing::warn!("no more threads for {name} ({e})"))
                    .ok()
            })
            .collect();
        // A panic on any thread was recorded by its guard.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(take));
        for other in others {
            let _ = other.join();
        }
    });
    // Every thread is done, and with it every install.
    let turns = turns.into_inner().unwrap_or_else(|e| e.into_inner());
    match (turns.failure, turns.ended_by) {
        (Some(failure), _) => Err(failure),
        (None, Some(message)) => Ok(message),
        (None, None) => unreachable!("the turns end with a message or a failure"),
    }
}

/// Ends every thread's turns because of `failure`, kept as the cause unless one is kept
/// already that it does not outrank.
fn end<R, E: Failure>(turns: &Mutex<Turns<'_, R, E>>, failure: E) {
    lock(turns).fail(failure);
}

impl<R, E: Failure> Turns<'_, R, E> {
    /// Ends every thread's turns because of `failure` (see [`end`]).
    fn fail(&mut self, failure: E) {
        self.over = true;
        if self
            .failure
            .as_ref()
            .is_none_or(|kept| failure.outranks(kept))
        {
            self.failure = Some(failure);
        }
    }
}

/// Ends the turns as a failure if its thread unwinds (a panic in an install).
struct EndOnPanic<'t, 'a, R, E: Failure>(&'t Mutex<Turns<'a, R, E>>);

impl<R, E: Failure> Drop for EndOnPanic<'_, '_, R, E> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            end(self.0, E::panicked());
        }
    }
}

/// Takes turns with the other threads at reading a message, and installs the pages it read,
/// until the pages are over, the stream fails (which ends the turns), or an install fails
/// (which the caller gives to [`end`]).
fn take_turns<R, I, E>(turns: &Mutex<Turns<'_, R, E>>, install: &I) -> Result<(), E>
where
    R: Read,
    I: Fn(&Message) -> Result<(), E>,
    E: Failure,
{
    // This thread's last run's buffer, read into again.
    let mut spare = None;
    loop {
        let message = {
            let mut turn = lock(turns);
            if turn.over {
                return Ok(());
            }
            match read_message_reusing(turn.reader, &mut spare) {
                Ok(pages @ (Message::Pages { .. } | Message::ZeroPages { .. })) => pages,
                Ok(other) => {
                    turn.over = true;
                    turn.ended_by = Some(other);
                    return Ok(());
                }
                // The stream is unusable from here: the others must not read on, so
                // the turns end before the lock is let go.
                Err(e) => {
                    turn.fail(E::from_read(e));
                    return Ok(());
                }
            }
        };
        install(&message)?;
        if let Message::Pages { data, .. } = message {
            spare = Some(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn frame(message: &Message) -> Vec<u8> {
        migrate::frame(message).unwrap()
    }

    fn pages(runs: u64) -> Vec<u8> {
        (0..runs)
            .flat_map(|run| {
                frame(&Message::Pages {
                    gpa: run * 3 * 4096,
                    data: vec![run as u8; 4096 * (1 + run as usize % 3)],
                })
            })
            .collect()
    }

    /// A failure that knows its rank, as post-copy's do.
    #[derive(Debug, PartialEq)]
    enum Ranked {
        Minor(&'static str),
        Major(&'static str),
    }

    impl Failure for Ranked {
        fn from_read(_: ProtocolError) -> Self {
            Ranked::Minor("read")
        }

        fn panicked() -> Self {
            Ranked::Major("panicked")
        }

        fn outranks(&self, kept: &Self) -> bool {
            matches!((kept, self), (Ranked::Minor(_), Ranked::Major(_)))
        }
    }

    #[test]
    fn every_page_is_in_when_the_message_after_them_is_returned() {
        let mut stream = pages(200);
        stream.extend(frame(&Message::ZeroPages {
            gpa: 1 << 30,
            count: 7,
        }));
        stream.extend(frame(&Message::Sync));
        stream.extend(pages(3));
        let installed = Mutex::new(HashMap::new());
        let threads = Mutex::new(std::collections::HashSet::new());
        // Installs wait (10 s at most in all) until a second thread has taken a turn, so
        // that a loaded host that is slow to schedule one cannot fail the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let install = |message: &Message| -> anyhow::Result<()> {
            lock(&threads).insert(std::thread::current().id());
            while lock(&threads).len() < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            // Installs take a while, so that some are still going on when the message
            // after the pages is read.
            std::thread::sleep(std::time::Duration::from_micros(100));
            match message {
                Message::Pages { gpa, data } => lock(&installed).insert(*gpa, data.clone()),
                Message::ZeroPages { gpa, count } => {
                    lock(&installed).insert(*gpa, vec![0; *count as usize])
                }
                _ => unreachable!(),
            };
            Ok(())
        };
        let mut reader = stream.as_slice();
        let ended_by = take_pages_in_turns(&mut reader, "test", &install).unwrap();
        assert_eq!(ended_by, Message::Sync);
        let installed = installed.into_inner().unwrap();
        assert_eq!(installed.len(), 201, "every run and the zero range");
        for run in 0..200u64 {
            let data = &installed[&(run * 3 * 4096)];
            assert_eq!(data.len(), 4096 * (1 + run as usize % 3));
            assert!(data.iter().all(|&b| b == run as u8), "run {run}");
        }
        assert_eq!(installed[&(1 << 30)].len(), 7);
        // The threads took turns: at least two installed.
        assert!(
            threads.into_inner().unwrap().len() >= 2,
            "the threads took turns"
        );
        // Nothing after the message was read.
        assert_eq!(reader, &pages(3)[..]);
    }

    #[test]
    fn a_failed_install_ends_every_thread_s_turns_with_its_failure() {
        let mut stream = pages(100);
        stream.extend(frame(&Message::Done));
        const FAILING: u64 = 30 * 3 * 4096;
        let install = |message: &Message| match message {
            Message::Pages { gpa, .. } if *gpa == FAILING => Err(Ranked::Minor("install")),
            Message::Pages { gpa, .. } => {
                // Installs take a while, as real ones do, and those after the failing one
                // longer: the others read a run or two more each while the failure is
                // recorded, unless its thread is held off the CPU for half a second.
                let ms = if *gpa > FAILING { 20 } else { 1 };
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(())
            }
            _ => Ok(()),
        };
        let mut rest = stream.as_slice();
        let result = take_pages_in_turns(&mut rest, "test", &install);
        assert_eq!(result, Err(Ranked::Minor("install")));
        // The other threads stopped too, well before the end of the stream.
        assert!(
            rest.len() >= stream.len() - pages(60).len(),
            "{} of {} bytes left",
            rest.len(),
            stream.len()
        );
    }

    #[test]
    fn a_stream_cut_short_is_the_failure_and_every_page_before_the_cut_is_in() {
        let mut stream = pages(20);
        stream.truncate(stream.len() - 10);
        let installed = Mutex::new(0u32);
        let install = |_: &Message| {
            *installed.lock().unwrap() += 1;
            Ok(())
        };
        let result = take_pages_in_turns(&mut stream.as_slice(), "test", &install);
        assert_eq!(result, Err(Ranked::Minor("read")));
        assert_eq!(*installed.lock().unwrap(), 19, "the runs before the cut");
    }

    #[test]
    fn a_failure_that_outranks_the_first_is_kept_and_a_panic_is_one() {
        // A cut stream is a minor failure; a panic in another thread's install, before or
        // after it, is kept.
        let cut = || {
            let mut stream = pages(2);
            stream.truncate(stream.len() - 10);
            stream
        };
        let slow_panic = |message: &Message| match message {
            Message::Pages { gpa: 0, .. } => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                panic!("an install went wrong")
            }
            _ => Ok(()),
        };
        let result = take_pages_in_turns(&mut cut().as_slice(), "test", &slow_panic);
        assert_eq!(result, Err(Ranked::Major("panicked")));
    }
}
