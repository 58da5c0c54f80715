//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-sock`), served by one
//! thread while the VM runs, the way Firecracker and Cloud Hypervisor users expect.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /vm | | state, vCPUs, RAM, guest |
//! | GET | /vm/stats | | the above, pager counters, dirty tracking, last snapshot |
//! | PUT | /vm/pause | | 204; 409 if not running or already paused |
//! | PUT | /vm/resume | | 204; 409 if not paused |
//! | PUT | /vm/shutdown | | 204; the VMM stops the VM and exits |
//! | PUT | /snapshot/create | `{"dir": PATH, "type": "full"\|"diff"}` | what was written |

pub mod http;
mod server;

pub use server::{ApiError, ApiServer, Controller};
