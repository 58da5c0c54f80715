//! Page tracking over the API: the request body of `PUT`/`DELETE /track`, and the stream of
//! `GET /track/events`: one JSON line per event, from a bounded queue so that a slow reader
//! never stalls the guest (events it had no room for are counted and reported as lost).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use vmm::{TrackEvent, TrackMode, TrackNotifier};

use crate::locking::lock;

/// Events a stream holds for its reader before it starts dropping them.
pub const EVENT_QUEUE_CAPACITY: usize = 65536;

/// How often an idle stream looks for its reader having gone, or the server stopping.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// `PUT /track` and `DELETE /track`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackRequest {
    pub gpa: u64,
    pub len: u64,
    pub mode: TrackMode,
}

/// A stream's queue: the notifier side never blocks.
#[derive(Default)]
pub struct EventQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<TrackEvent>,
    /// Events dropped since the reader was last told.
    lost: u64,
}

impl TrackNotifier for EventQueue {
    fn notify(&self, event: &TrackEvent) {
        let mut state = lock(&self.state);
        if state.events.len() >= EVENT_QUEUE_CAPACITY {
            state.lost += 1;
        } else {
            state.events.push_back(*event);
            self.ready.notify_one();
        }
    }
}

impl EventQueue {
    /// What is queued (and how many were lost since the last call), waiting up to `wait`
    /// for something.
    fn drain(&self, wait: Duration) -> (Vec<TrackEvent>, u64) {
        let state = lock(&self.state);
        let (mut state, _) = self
            .ready
            .wait_timeout_while(state, wait, |s| s.events.is_empty() && s.lost == 0)
            .unwrap_or_else(|e| e.into_inner());
        let lost = std::mem::take(&mut state.lost);
        (state.events.drain(..).collect(), lost)
    }
}

/// One event as a JSON line's value.
pub fn event_json(event: &TrackEvent) -> serde_json::Value {
    match *event {
        TrackEvent::Write { vcpu, gpa, data } => json!({
            "event": "write",
            "vcpu": vcpu,
            "gpa": gpa,
            "len": data.as_slice().len(),
            "data": hex(data.as_slice()),
        }),
        TrackEvent::Read { vcpu, gpa, len } => json!({
            "event": "read",
            "vcpu": vcpu,
            "gpa": gpa,
            "len": len,
        }),
        TrackEvent::RegionRemoved { gpa, len } => json!({
            "event": "region_removed",
            "gpa": gpa,
            "len": len,
        }),
    }
}

/// Bytes in memory order, two hex digits each.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `queue`'s events to `stream` as JSON lines until the reader goes or `stopping` says
/// the server is stopping: what is queued then is still written, to a reader that keeps
/// reading. A reader that stops reading only holds up this thread, never the guest; once the
/// server stops, it is given [`CLOSE_PATIENCE`] to take what is left.
pub fn stream_events(
    stream: &UnixStream,
    queue: &EventQueue,
    stopping: impl Fn() -> bool,
) -> io::Result<()> {
    stream.set_write_timeout(Some(IDLE_CHECK))?;
    let mut lines = Vec::new();
    loop {
        let stop = stopping();
        let (events, lost) = queue.drain(if stop { Duration::ZERO } else { IDLE_CHECK });
        lines.clear();
        if lost > 0 {
            writeln!(lines, "{}", json!({ "event": "lost", "count": lost }))?;
        }
        for event in &events {
            writeln!(lines, "{}", event_json(event))?;
        }
        write_patiently(stream, &lines, &stopping)?;
        if stop || crate::unix_socket::peer_gone(stream) {
            return Ok(());
        }
    }
}

/// How long a stopping server waits for a stalled reader to take the rest of its events.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

/// Writes all of `bytes` to `stream` (whose writes time out every [`IDLE_CHECK`]), waiting as
/// long as the reader lives while the server runs, and at most [`CLOSE_PATIENCE`] without
/// progress once it stops.
fn write_patiently(
    mut stream: &UnixStream,
    mut bytes: &[u8],
    stopping: &impl Fn() -> bool,
) -> io::Result<()> {
    let mut stalled_since = None;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                stalled_since = None;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if crate::unix_socket::peer_gone(stream) {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if stopping() {
                    let since = *stalled_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= CLOSE_PATIENCE {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the reader took nothing while the server stopped",
                        ));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::tracking::AccessBytes;

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let queue = EventQueue::default();
        let event = TrackEvent::Read {
            vcpu: 0,
            gpa: 0x1000,
            len: 8,
        };
        for _ in 0..EVENT_QUEUE_CAPACITY + 5 {
            queue.notify(&event);
        }
        let (events, lost) = queue.drain(Duration::ZERO);
        assert_eq!((events.len(), lost), (EVENT_QUEUE_CAPACITY, 5));
        assert_eq!(queue.drain(Duration::ZERO), (Vec::new(), 0));
    }

    #[test]
    fn events_as_json() {
        let write = TrackEvent::Write {
            vcpu: 1,
            gpa: 0x2008,
            data: AccessBytes::new(&[0x34, 0x12]),
        };
        assert_eq!(
            event_json(&write),
            json!({"event": "write", "vcpu": 1, "gpa": 0x2008, "len": 2, "data": "3412"})
        );
        assert_eq!(
            event_json(&TrackEvent::RegionRemoved {
                gpa: 0x1000,
                len: 0x2000
            })["event"],
            "region_removed"
        );
    }
}
