//! Read-ahead that follows the access pattern: a toucher whose faults walk a region with a
//! constant stride (a sequential scan is stride 1; a walk over one field of large records is
//! a stride of many pages) gets the pages further along its line installed before it reaches
//! them, so that it stops faulting. Three faults in a line start a stream; each later fault
//! on the line (the toucher caught up with what was queued) queues a window twice as deep as
//! the last, up to [`MAX_WINDOW`] pages. A fault off the line starts over, so a toucher with
//! no pattern costs nothing but this bookkeeping.
//!
//! Touchers are told apart by thread id (each vCPU walks its own line), and only forward
//! strides are followed.

/// The first window queued once a line is confirmed, in pages.
const FIRST_WINDOW: usize = 16;
/// The deepest window: what a stream that ends costs at most in pages installed for nothing.
pub(crate) const MAX_WINDOW: usize = 1024;
/// Strides longer than this (in pages; 64 MiB of 4 KiB pages) are not followed: faults so far
/// apart are too few for read-ahead to pay.
const MAX_STRIDE: usize = 16384;
/// Touchers followed at once; the one followed least recently makes room.
const STREAMS: usize = 8;

/// Pages to install ahead of a toucher: `count` pages from `first`, `stride` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ahead {
    pub first: usize,
    pub count: usize,
    pub stride: usize,
}

/// One toucher's line through one region.
#[derive(Debug, Clone, Copy)]
struct Stream {
    thread_id: u32,
    region: usize,
    last: usize,
    stride: usize,
    /// The last page queued (`None`: nothing queued on this line yet).
    queued_to: Option<usize>,
    window: usize,
    /// When the stream was last used, for replacement.
    used: u64,
}

/// The streams of one pager.
#[derive(Debug, Default)]
pub(crate) struct Predictor {
    streams: Vec<Stream>,
    clock: u64,
}

impl Predictor {
    /// Notes a fault by `thread_id` on `page` of `region` (which has `pages` pages). Returns the
    /// pages to install ahead of it, if its line is confirmed and needs more queued.
    pub fn on_fault(
        &mut self,
        thread_id: u32,
        region: usize,
        page: usize,
        pages: usize,
    ) -> Option<Ahead> {
        self.clock += 1;
        let clock = self.clock;
        let stream = match self
            .streams
            .iter_mut()
            .position(|s| s.thread_id == thread_id && s.region == region)
        {
            Some(i) => &mut self.streams[i],
            None => {
                let fresh = Stream {
                    thread_id,
                    region,
                    last: page,
                    stride: 0,
                    queued_to: None,
                    window: FIRST_WINDOW,
                    used: clock,
                };
                if self.streams.len() < STREAMS {
                    self.streams.push(fresh);
                } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|s| s.used) {
                    *oldest = fresh;
                }
                return None;
            }
        };
        stream.used = clock;
        // The same page again (a toucher woken to fault again): nothing new about its line.
        if page == stream.last {
            return None;
        }
        // On the line: a whole number of strides on from the last fault, and no further than
        // one past what was queued (the pages between were installed ahead, so they did not
        // fault).
        let reach = stream.queued_to.unwrap_or(stream.last) + stream.stride;
        let on_line = stream.stride > 0
            && page > stream.last
            && (page - stream.last).is_multiple_of(stream.stride)
            && page <= reach;
        let step = page
            .checked_sub(stream.last)
            .filter(|&d| d > 0 && d <= MAX_STRIDE);
        stream.last = page;
        match step {
            _ if on_line => {}
            Some(d) => {
                *stream = Stream {
                    stride: d,
                    queued_to: None,
                    window: FIRST_WINDOW,
                    ..*stream
                };
                return None;
            }
            None => {
                *stream = Stream {
                    stride: 0,
                    queued_to: None,
                    window: FIRST_WINDOW,
                    ..*stream
                };
                return None;
            }
        }
        // A fault short of what was queued: the installs are still on their way.
        if stream.queued_to.is_some_and(|to| page < to) {
            return None;
        }
        let stride = stream.stride;
        let first = page + stride;
        if first >= pages {
            return None;
        }
        if stream.queued_to.is_some() {
            stream.window = (stream.window * 2).min(MAX_WINDOW);
        }
        let count = stream.window.min((pages - 1 - first) / stride + 1);
        stream.queued_to = Some(first + (count - 1) * stride);
        Some(Ahead {
            first,
            count,
            stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: usize = 1 << 20;

    #[test]
    fn three_faults_in_a_line_start_a_stream_that_deepens() {
        let mut p = Predictor::default();
        assert_eq!(p.on_fault(7, 0, 100, PAGES), None);
        assert_eq!(
            p.on_fault(7, 0, 143, PAGES),
            None,
            "two faults are not a line"
        );
        let first = p.on_fault(7, 0, 186, PAGES).unwrap();
        assert_eq!(
            first,
            Ahead {
                first: 229,
                count: FIRST_WINDOW,
                stride: 43
            }
        );
        // Faults inside what was queued: the installs are on their way.
        assert_eq!(p.on_fault(7, 0, 229, PAGES), None);
        // The toucher reached the end of the window: the next one is twice as deep.
        let end = first.first + (first.count - 1) * 43;
        let second = p.on_fault(7, 0, end, PAGES).unwrap();
        assert_eq!(second.first, end + 43);
        assert_eq!(second.count, 2 * FIRST_WINDOW);
        let mut at = second.first + (second.count - 1) * 43;
        let mut window = second.count;
        for _ in 0..10 {
            let next = p.on_fault(7, 0, at, PAGES).unwrap();
            assert!(next.count >= window && next.count <= MAX_WINDOW);
            window = next.count;
            at = next.first + (next.count - 1) * 43;
        }
        assert_eq!(window, MAX_WINDOW);
    }

    #[test]
    fn a_repeated_fault_keeps_the_line() {
        let mut p = Predictor::default();
        for page in [0, 5, 10] {
            p.on_fault(1, 0, page, PAGES);
        }
        // The toucher faults on page 10 again (woken after a predicted page failed, say).
        assert_eq!(p.on_fault(1, 0, 10, PAGES), None);
        // The line goes on: one past the window (15..=90) queues the next, twice as deep.
        let next = p.on_fault(1, 0, 95, PAGES).unwrap();
        assert_eq!(
            (next.first, next.count, next.stride),
            (100, 2 * FIRST_WINDOW, 5)
        );
    }

    #[test]
    fn a_fault_off_the_line_starts_over() {
        let mut p = Predictor::default();
        for page in [10, 11, 12] {
            p.on_fault(1, 0, page, PAGES);
        }
        assert_eq!(p.on_fault(1, 0, 5000, PAGES), None, "off the line");
        assert_eq!(p.on_fault(1, 0, 5002, PAGES), None, "a new stride, once");
        assert!(p.on_fault(1, 0, 5004, PAGES).is_some(), "seen twice");
        // Backwards and too-long strides are not followed.
        let mut q = Predictor::default();
        for page in [300, 200, 100] {
            assert_eq!(q.on_fault(1, 0, page, PAGES), None);
        }
        for page in [0, MAX_STRIDE + 1, 2 * (MAX_STRIDE + 1)] {
            assert_eq!(q.on_fault(2, 0, page, PAGES), None);
        }
    }

    #[test]
    fn touchers_and_regions_have_their_own_lines() {
        let mut p = Predictor::default();
        // Two vCPUs interleave their faults; each walks its own line.
        for i in 0..2 {
            assert_eq!(p.on_fault(1, 0, 10 * i, PAGES), None);
            assert_eq!(p.on_fault(2, 0, 5000 + 3 * i, PAGES), None);
        }
        assert_eq!(p.on_fault(1, 0, 20, PAGES).unwrap().stride, 10);
        assert_eq!(p.on_fault(2, 0, 5006, PAGES).unwrap().stride, 3);
        // The same thread in another region is another line.
        assert_eq!(p.on_fault(1, 1, 30, PAGES), None);
    }

    #[test]
    fn windows_stop_at_the_end_of_the_region() {
        // Pages 30 and 40 are left after 20.
        let mut q = Predictor::default();
        for page in [0, 10] {
            q.on_fault(1, 0, page, 45);
        }
        assert_eq!(
            q.on_fault(1, 0, 20, 45),
            Some(Ahead {
                first: 30,
                count: 2,
                stride: 10
            })
        );
        let mut r = Predictor::default();
        for page in [20, 30] {
            r.on_fault(1, 0, page, 45);
        }
        assert_eq!(
            r.on_fault(1, 0, 40, 45),
            None,
            "nothing after the last page"
        );
    }
}
