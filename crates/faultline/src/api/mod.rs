//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-sock`), served while the
//! VM runs, the way Firecracker and Cloud Hypervisor users expect. Each connection carries one
//! request and has a thread of its own, so a slow or idle client never delays another.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /vm | | state, vCPUs, RAM, guest, hold point and held vCPUs |
//! | GET | /vm/stats | | the above, pager counters, dirty tracking, last snapshot |
//! | PUT | /vm/pause | | 204; 409 if not running or already paused |
//! | PUT | /vm/resume | | 204; 409 if not paused |
//! | PUT | /vm/shutdown | `{"force": BOOL}` (optional) | 204; the VMM stops the VM and exits. 409 while an outgoing migration past its switch-over runs or is paused here (its destination may need this side), unless `force` |
//! | PUT | /vm/hold | `{"at": N\|null}` | 204; micro-guest vCPUs wait at hold point N (tests) |
//! | PUT | /snapshot/create | `{"dir": PATH, "type": "full"\|"diff", "live": BOOL}` | what was written; 409 on a post-copy destination until its migration completes, and on a source whose VM may run on its destination |
//! | PUT | /vm/swap/out | `{"keep": BYTES}` | what was moved to the swap file; 409 without one |
//! | PUT | /vm/swap/in | | 204: every swapped page comes back; 409 without a swap file |
//! | PUT | /track | `{"gpa": N, "len": N, "mode": "write"\|"access"}` | 204; one more user tracks those frames |
//! | DELETE | /track | the same | 204; one user fewer; 409 if a frame is not tracked so |
//! | GET | /track | | the tracked ranges (with user counts) and how the dirty log is kept |
//! | GET | /track/events | | 200, then one JSON line per event until the client or VM goes |
//! | PUT | /migration/send | `{"to": "HOST:PORT", "mode": "pre"\|"post"\|"hybrid", "downtime_ms": N, "max_rounds": N, "throttle": BOOL, "max_bandwidth": BYTES_PER_S, "tls_dir": DIR, "resume": BOOL}` | the migration's report once done; 502 if it failed or was cancelled (saying whether the VM runs on here or is paused, waiting for a resume); 400 for a setting its mode does not use (post-copy: `downtime_ms`, `max_rounds`, `throttle`, `max_bandwidth`; hybrid: `throttle`); `"resume": true` resumes a paused one, and refuses the settings of a new one (400: it goes on as it began) |
//! | GET | /migration | | the migration's status: a source's report, or its progress while it runs; a destination's phase, pages and answer times |
//! | PUT | /migration/switchover | | 204: a hybrid migration goes post-copy after this round; 409 (saying why) if none runs, it is not hybrid, or its rounds are over |
//! | PUT | /migration/recover | `{"listen": "HOST:PORT", "tls_dir": DIR}` | a destination whose migration paused (or completed): `{"listening": ADDR}`, where the source may resume it; 409 otherwise |
//! | PUT | /migration/cancel | | 202 `{"status": "cancelling"}`: the migration in progress gives up before its next pages (or at its switch-over), the VM staying here as it was, and its send ends with status `cancelled`; 200 `{"status": "cancelled", "vm": "running"\|"paused"}`: a migration paused before the destination confirmed it runs the VM is given up, and the VM runs here again (or stays paused, if it was before the migration); 409 if none runs or is paused, the migration in progress is past its switch-over, or the destination confirmed; 500 if it is cancelled but the VM could not run again |
//!
//! Tracking requests are refused whole (400) for ranges that are empty, not page aligned, not
//! guest RAM, or would need more memslots than KVM allows. The event stream is fed from a
//! bounded queue of 65536 events: a slow reader never stalls the guest; what it had no room
//! for is reported as `{"event": "lost", "count": N}`.
//!
//! Pause, resume, snapshot, swap, tracking changes and a migration's send (and the cancel of a
//! paused one) change the VM and run one at a time: while one runs, another is answered 409
//! ("another operation is in progress"), not queued. `GET /vm`,
//! `GET /vm/stats` and `PUT /vm/shutdown` never wait for them. Any request is answered 400 if
//! it is malformed, 408 if it has not arrived in full (head and body) within
//! [`REQUEST_DEADLINE`] (5 s) of connecting, and 503 when [`MAX_CONNECTIONS`] (256)
//! connections are open already, or, for `GET /track/events`, when [`MAX_EVENT_STREAMS`] (64)
//! streams are: the rest always serve other requests. Errors carry `{"error": MESSAGE}`.

pub mod http;
mod migration;
mod server;
pub mod track;

pub use server::{
    ApiError, ApiServer, BoundSocket, Controller, MAX_CONNECTIONS, MAX_EVENT_STREAMS,
    REQUEST_DEADLINE,
};
