//! Questions about a Unix stream socket that only `poll` answers.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Whether every other end of `stream` has been closed. (Only a hang-up or an error counts: a
/// peer that shut down only its writing side, or this side's own read shutdown, reads as
/// POLLRDHUP alone.)
pub(crate) fn peer_gone(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
}
