//! A TCP proxy on loopback that lets a test act between a migration's messages: on the
//! migration's main connection it forwards the source's messages one by one, each after a
//! callback has seen it. The source waits for the destination at set points (a round's
//! `Sync` is answered before it takes the next round's dirty pages; the page-request
//! connection is answered only once the destination has read the switch-over), so what the
//! guest does in the callback lands where the test wants it, whatever the speeds: a test
//! can make the guest run exactly one pass per round (it waits at a hold point otherwise).
//! Plain TCP only: it reads the messages, so it cannot stand in a TLS connection.

use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use migrate::{read_message, write_message, Message};

use super::proxy::forward;

/// A running gate.
pub struct MessageGate {
    /// Where it listens.
    pub addr: String,
    /// What the callback panicked with, if it did.
    panicked: Arc<Mutex<Option<String>>>,
}

impl MessageGate {
    /// Forwards every connection to `target`; on the first, calls `before` with each message
    /// from the source before it forwards it. A panic in `before` cuts that connection both
    /// ways (so the migration fails at once) and is kept for [`MessageGate::check`].
    pub fn start(target: &str, before: impl FnMut(&Message) + Send + 'static) -> MessageGate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target = target.to_string();
        let panicked = Arc::new(Mutex::new(None));
        let mut before = Some((before, Arc::clone(&panicked)));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || forward(back.0, back.1));
                match before.take() {
                    Some((before, panicked)) => {
                        std::thread::spawn(move || gate(client, server, before, &panicked))
                    }
                    None => std::thread::spawn(move || forward(client, server)),
                };
            }
        });
        MessageGate { addr, panicked }
    }

    /// Panics with the callback's panic, if it panicked.
    pub fn check(&self) {
        if let Some(message) = self.panicked.lock().unwrap().as_ref() {
            panic!("the message gate's callback failed: {message}");
        }
    }
}

/// Forwards the source's messages from `from` to `to`, each after `before` has seen it.
fn gate(
    from: TcpStream,
    mut to: TcpStream,
    mut before: impl FnMut(&Message),
    panicked: &Mutex<Option<String>>,
) {
    let mut reader = BufReader::new(from);
    while let Ok(message) = read_message(&mut reader) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| before(&message))) {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            *panicked.lock().unwrap() = Some(text);
            let _ = reader.get_ref().shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if write_message(&mut to, &message).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
