//! A TCP proxy on loopback that plays a network failing: it forwards every connection it
//! accepts to a target, and once a chosen number of bytes went one way on the first of them,
//! it cuts every connection, both ways, at that byte (and drops new ones: the network is
//! down), or damages that byte (a bit flipped that TCP's own checksum missed) and goes on.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running proxy.
pub struct CuttingProxy {
    /// Where it listens.
    pub addr: String,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bytes on the first connection (from the client, or back to it) after which everything
    /// is cut (or the byte after which is damaged).
    cut_after: u64,
    /// Damage the byte instead of cutting.
    damage: bool,
    forwarded: AtomicU64,
    cut: AtomicBool,
    /// Every socket of every connection, to shut down at the cut.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn cut_everything(&self) {
        self.cut.store(true, Ordering::Release);
        for socket in self.sockets.lock().unwrap().iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl CuttingProxy {
    /// Forwards to `target`, cutting after `cut_after` bytes from the first client.
    pub fn start(target: &str, cut_after: u64) -> CuttingProxy {
        CuttingProxy::start_with(target, cut_after, false, false)
    }

    /// Forwards to `target`, cutting after `cut_after` bytes back to the first client.
    pub fn start_back(target: &str, cut_after: u64) -> CuttingProxy {
        CuttingProxy::start_with(target, cut_after, true, false)
    }

    fn start_with(target: &str, cut_after: u64, back: bool, damage: bool) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            cut_after,
            damage,
            forwarded: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let target = target.to_string();
        let accepting = Arc::clone(&shared);
        std::thread::spawn(move || {
            for (index, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                if accepting.cut.load(Ordering::Acquire) {
                    // The network is down: nothing gets through any more.
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut sockets = accepting.sockets.lock().unwrap();
                    sockets.push(client.try_clone().unwrap());
                    sockets.push(server.try_clone().unwrap());
                }
                let first = index == 0;
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (shared_up, shared_down) = (Arc::clone(&accepting), Arc::clone(&accepting));
                std::thread::spawn(move || {
                    pump(up.0, up.1, (first && !back).then_some(&*shared_up))
                });
                std::thread::spawn(move || {
                    pump(server, client, (first && back).then_some(&*shared_down))
                });
            }
        });
        CuttingProxy { addr, shared }
    }

    /// Forwards to `target`, damaging the byte after `at` bytes from the first client (and
    /// dropping new connections from then on).
    pub fn start_damaging(target: &str, at: u64) -> CuttingProxy {
        CuttingProxy::start_with(target, at, false, true)
    }

    /// Whether the cut (or the damage) happened.
    pub fn has_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Acquire)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.shared.cut_everything();
    }
}

/// Copies `from` to `to` until either ends.
pub fn forward(from: TcpStream, to: TcpStream) {
    pump(from, to, None);
}

/// Copies `from` to `to` until either ends; counting against the cut when `counted`.
fn pump(mut from: TcpStream, mut to: TcpStream, counted: Option<&Shared>) {
    let mut buf = vec![0u8; 64 << 10];
    let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(shared) = counted {
            let before = shared.forwarded.fetch_add(n as u64, Ordering::AcqRel);
            // The first `cut_after` bytes go through; the cut (or the damage) comes with the
            // next one.
            if shared.damage {
                if (before..before + n as u64).contains(&shared.cut_after) {
                    buf[(shared.cut_after - before) as usize] ^= 0x55;
                    shared.cut.store(true, Ordering::Release);
                }
            } else if before + n as u64 > shared.cut_after {
                let keep = shared.cut_after.saturating_sub(before) as usize;
                let _ = to.write_all(&buf[..keep.min(n)]);
                shared.cut_everything();
                return;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
