//! The TLS migration channel on real loopback TCP, byte for byte, with the timing pinned down
//! that end-to-end migrations only hit now and then.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::pki::make_pki;
use common::TempDir;
use faultline::migration::channel::{self, Tls};

/// Drives a client handshake by hand so that its last handshake flight and `data` leave in
/// one write: the server reads them together, as a busy host may.
fn handshake_and_send_at_once(tcp: &mut TcpStream, config: Arc<rustls::ClientConfig>, data: &[u8]) {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        if conn.wants_write() {
            conn.write_tls(tcp).unwrap();
        } else {
            conn.read_tls(tcp).unwrap();
            conn.process_new_packets().unwrap();
        }
    }
    // The client's Finished (and certificate) are still queued; the data joins them.
    conn.writer().write_all(data).unwrap();
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).unwrap();
    }
    tcp.write_all(&wire).unwrap();
    // The peer's answer, read through the session.
    let mut answer = [0u8; 5];
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0;
    while got < answer.len() {
        if conn.wants_read() {
            if conn.read_tls(tcp).unwrap() == 0 {
                panic!("the server ended the connection before answering");
            }
            conn.process_new_packets().unwrap();
        }
        match conn.reader().read(&mut answer[got..]) {
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&answer, b"later");
}

#[test]
fn data_that_came_with_the_handshake_is_delivered() {
    let tmp = TempDir::new("tls-channel");
    make_pki(tmp.path(), "ca", &["source", "destination"]);
    let Tls::Client(client) = Tls::client(&tmp.join("source")).unwrap() else {
        unreachable!()
    };
    let server = Tls::server(&tmp.join("destination")).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        handshake_and_send_at_once(&mut tcp, client, b"hello, straight after the handshake");
    });
    let (tcp, _) = listener.accept().unwrap();
    let mut channel = channel::open(tcp, Some(&server), "").unwrap();
    channel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; b"hello, straight after the handshake".len()];
    channel.read_exact(&mut got).unwrap_or_else(|e| {
        panic!("the data sent with the handshake's last flight never came out: {e}")
    });
    assert_eq!(got, b"hello, straight after the handshake");
    channel.write_all(b"later").unwrap();
    client.join().unwrap();
}
