//! A TCP proxy on loopback that lets a test act between a migration's messages: on the
//! migration's main connection it forwards the source's messages one by one, each after a
//! callback has seen it. The source waits for the destination at set points (a round's
//! `Sync` is answered before it takes the next round's dirty pages; the page-request
//! connection is answered only once the destination has read the switch-over), so what the
//! guest does in the callback lands where the test wants it, whatever the speeds: a test
//! can make the guest run exactly one pass per round (it waits at a hold point otherwise).

use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};

use migrate::{read_message, write_message, Message};

use super::proxy::forward;

/// A running gate.
pub struct MessageGate {
    /// Where it listens.
    pub addr: String,
}

impl MessageGate {
    /// Forwards every connection to `target`; on the first, calls `before` with each message
    /// from the source before it forwards it.
    pub fn start(target: &str, before: impl FnMut(&Message) + Send + 'static) -> MessageGate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target = target.to_string();
        let mut before = Some(before);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let back = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || forward(back.0, back.1));
                match before.take() {
                    Some(before) => std::thread::spawn(move || gate(client, server, before)),
                    None => std::thread::spawn(move || forward(client, server)),
                };
            }
        });
        MessageGate { addr }
    }
}

/// Forwards the source's messages from `from` to `to`, each after `before` has seen it.
fn gate(from: TcpStream, mut to: TcpStream, mut before: impl FnMut(&Message)) {
    let mut reader = BufReader::new(from);
    while let Ok(message) = read_message(&mut reader) {
        before(&message);
        if write_message(&mut to, &message).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
