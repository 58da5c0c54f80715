//! The migration channel on real loopback TCP (TLS, and the bounded reads of plain TCP), byte
//! for byte, with the timing pinned down that end-to-end migrations only hit now and then.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::pki::make_pki;
use common::TempDir;
use faultline::migration::channel::{self, Tls};

/// A client TLS session on `tcp` driven by hand through its handshake (its last flight may
/// still be queued).
fn client_handshake(
    tcp: &mut TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> rustls::ClientConnection {
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
    conn
}

/// In `tmp`, a CA and a certificate for each side: the source's client settings, the
/// destination's server ones, and a listener on a free loopback port.
fn client_and_server(tmp: &TempDir) -> (Arc<rustls::ClientConfig>, Tls, TcpListener) {
    make_pki(tmp.path(), "ca", &["source", "destination"]);
    let Tls::Client(client) = Tls::client(&tmp.join("source")).unwrap() else {
        unreachable!()
    };
    let server = Tls::server(&tmp.join("destination")).unwrap();
    (client, server, TcpListener::bind("127.0.0.1:0").unwrap())
}

/// Drives a client handshake by hand so that its last handshake flight and `data` leave in
/// one write: the server reads them together, as a busy host may.
fn handshake_and_send_at_once(tcp: &mut TcpStream, config: Arc<rustls::ClientConfig>, data: &[u8]) {
    let mut conn = client_handshake(tcp, config);
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
    let (client, server, listener) = client_and_server(&tmp);
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

/// A connected pair of channels over loopback: (client, server), TLS with `tls` (the
/// source's and destination's directories).
fn channel_pair(
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> (channel::Channel, channel::Channel) {
    channel_pair_via(tls, |addr| addr.to_string())
}

/// [`channel_pair`], the client connecting to where `route` says (given the server's
/// address: a proxy in front of it, say).
fn channel_pair_via(
    tls: Option<(&std::path::Path, &std::path::Path)>,
    route: impl FnOnce(std::net::SocketAddr) -> String,
) -> (channel::Channel, channel::Channel) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = tls.map(|(_, server)| Tls::server(server).unwrap());
    let accepting = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        channel::open(tcp, server_tls.as_ref(), "").unwrap()
    });
    let client_tls = tls.map(|(client, _)| Tls::client(client).unwrap());
    let client = channel::open(
        TcpStream::connect(route(addr)).unwrap(),
        client_tls.as_ref(),
        "127.0.0.1",
    )
    .unwrap();
    (client, accepting.join().unwrap())
}

#[test]
fn a_tls_peer_that_sends_faster_than_it_is_read_is_held_by_flow_control() {
    let tmp = TempDir::new("tls-backlog");
    make_pki(tmp.path(), "ca", &["source", "destination"]);
    let (mut reader, mut writer) =
        channel_pair(Some((&tmp.join("source"), &tmp.join("destination"))));
    // Far more than every buffer on the way holds (the sockets', whatever this host lets
    // them grow to, and the TLS thread's).
    let most = |path: &str| -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.split_whitespace().last()?.parse().ok())
            .unwrap_or(64 << 20)
    };
    let buffers = most("/proc/sys/net/ipv4/tcp_rmem") + most("/proc/sys/net/ipv4/tcp_wmem");
    let sent: usize = (2 * buffers).max(64 << 20).next_multiple_of(1 << 20);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let sending = std::thread::spawn(move || {
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..sent / block.len() {
            writer.write_all(&block).unwrap();
        }
        done_tx.send(()).unwrap();
        writer
    });
    // Nothing is read yet: the sender must still be held. (A receiving side that took all it
    // was sent into its memory let it finish in well under this.)
    assert!(
        done_rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "{sent} bytes went into a channel nobody read: the receiving side buffered them"
    );
    // Then everything comes, in order.
    let mut got = vec![0u8; 1 << 20];
    for block in 0..sent / got.len() {
        reader.read_exact(&mut got).unwrap();
        assert!(
            got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
            "block {block} differs"
        );
    }
    drop(sending.join().unwrap());
}

#[test]
fn a_reply_that_trickles_in_is_as_late_as_one_that_never_comes() {
    let (client, mut server) = channel_pair(None);
    let frame = migrate::frame(&migrate::Message::Done).unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    // A byte every 50 ms: each read finds something well within its timeout, and the whole
    // frame takes 750 ms, longer than the reply may.
    let trickling = std::thread::spawn(move || {
        for byte in frame {
            if stop_rx.try_recv().is_ok() {
                return;
            }
            let _ = server.write_all(&[byte]);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut reader = std::io::BufReader::new(client);
    let result = channel::read_within(&mut reader, Duration::from_millis(200));
    let _ = stop_tx.send(());
    trickling.join().unwrap();
    assert!(
        result.as_ref().is_err_and(|e| e.is_timeout()),
        "a reply that took 750 ms came within 200: {result:?}"
    );
}

#[test]
fn a_tls_session_that_fails_after_the_handshake_tells_its_reader_why() {
    let tmp = TempDir::new("tls-damaged");
    make_pki(tmp.path(), "ca", &["source", "destination"]);
    // A byte damaged well past the handshake (a few KiB): in the data, which the session's
    // integrity check then refuses.
    let mut proxy = None;
    let (mut client, mut server) = channel_pair_via(
        Some((&tmp.join("source"), &tmp.join("destination"))),
        |addr| {
            let damaging =
                common::proxy::CuttingProxy::start_damaging(&addr.to_string(), 256 << 10);
            let to = damaging.addr.clone();
            proxy = Some(damaging);
            to
        },
    );
    let proxy = proxy.expect("routed through the proxy");
    let writing = std::thread::spawn(move || {
        let _ = client.write_all(&vec![7u8; 1 << 20]);
    });
    let mut got = Vec::new();
    let error = server
        .read_to_end(&mut got)
        .expect_err("a damaged session read as a clean end");
    assert!(proxy.has_cut());
    assert!(got.len() < 1 << 20, "{} bytes", got.len());
    let why = server.failure().expect("the session's failure recorded");
    assert!(why.starts_with("the TLS session failed: "), "{why}");
    assert!(error.to_string() == why, "{error}");
    // The network goes down: the writer, held or not, ends.
    drop(proxy);
    writing.join().unwrap();
}

#[test]
fn a_tls_peer_that_keeps_the_connection_open_and_silent_does_not_hold_it_for_good() {
    let tmp = TempDir::new("tls-silent-peer");
    let (client, server, listener) = client_and_server(&tmp);
    let addr = listener.local_addr().unwrap();
    // The peer: a handshake, then nothing, and its side of TCP open, until this side's TLS
    // thread gives up and closes the connection.
    let peer = std::thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let mut conn = client_handshake(&mut tcp, client);
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        // Everything the other side sends (its close_notify) is read, and the end waited for.
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut sink = [0u8; 4096];
        loop {
            match tcp.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    });
    let (tcp, _) = listener.accept().unwrap();
    let channel = channel::open(tcp, Some(&server), "").unwrap();
    // This side is done with the connection (a failed migration, say).
    drop(channel);
    peer.join()
        .unwrap()
        .expect("the connection was still open a minute after this side was gone");
}
