//! End to end: the control API serves many clients at once. Idle and stalled clients never
//! delay another, connections beyond the limit are refused clearly, a request that does not
//! arrive in time is answered 408, and a file in the way of the socket is never removed.

mod common;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use faultline::api::{http, MAX_CONNECTIONS, MAX_EVENT_STREAMS};

/// The longest any wait in these tests may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// A faultline child, killed if the test ends (or fails) before it exits. Its output goes
/// to files, so that it never blocks on a full pipe.
struct Faultline {
    child: Child,
    stderr: PathBuf,
}

impl Faultline {
    fn spawn(args: &[&str], tmp: &TempDir) -> Faultline {
        let stderr = tmp.join("stderr");
        let child = common::command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(tmp.join("stdout")).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("faultline starts");
        Faultline { child, stderr }
    }

    /// [`run_forever`](Self::run_forever) in a new temporary directory `name`, once its VM
    /// runs: the directory, the API socket and the process.
    fn running(name: &str) -> (TempDir, PathBuf, Faultline) {
        let tmp = TempDir::new(name);
        let sock = tmp.join("api.sock");
        let mut faultline = Faultline::run_forever(&sock, &tmp);
        faultline.wait_running(&sock);
        (tmp, sock, faultline)
    }

    /// A VM that runs until asked to stop, serving the API on `sock`.
    fn run_forever(sock: &Path, tmp: &TempDir) -> Faultline {
        let sock = sock.to_str().unwrap();
        Faultline::spawn(
            &[
                "run",
                "--guest",
                "mix",
                "--mem",
                "8M",
                "--range-pages",
                "128",
                "--arg",
                "0",
                "--api-sock",
                sock,
                "--json",
            ],
            tmp,
        )
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (within [`DEADLINE`]) for the child to exit.
    fn wait(&mut self) -> ExitStatus {
        let stderr = self.stderr.clone();
        common::exit_within(
            &mut self.child,
            DEADLINE,
            Duration::from_millis(10),
            || {},
            || {
                let said = std::fs::read_to_string(&stderr).unwrap_or_default();
                format!("faultline did not exit within {DEADLINE:?}: {said}")
            },
        )
    }

    /// Waits until the VM behind `sock` reports `running`.
    fn wait_running(&mut self, sock: &Path) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("faultline exited early ({status}): {}", self.stderr());
            }
            if sock.exists() {
                let answer = http::call(sock, "GET", "/vm", None, Some(Duration::from_secs(1)));
                if let Ok((200, Some(info))) = answer {
                    if info["state"] == "running" {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "the VM never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Faultline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One API call that gives up after `seconds`.
fn call(sock: &Path, method: &str, path: &str, seconds: u64) -> (u16, serde_json::Value) {
    let (status, body) = http::call(sock, method, path, None, Some(Duration::from_secs(seconds)))
        .unwrap_or_else(|e| panic!("{method} {path} within {seconds} s: {e}"));
    (status, body.unwrap_or(serde_json::Value::Null))
}

/// `count` connections that send nothing (held open by the caller).
fn idle_connections(sock: &Path, count: usize) -> Vec<UnixStream> {
    (0..count)
        .map(|i| UnixStream::connect(sock).unwrap_or_else(|e| panic!("idle connection {i}: {e}")))
        .collect()
}

/// Whether the server has answered on `stream` already (refused it), looked at without
/// waiting.
fn answered(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte receive into a byte this function owns, on a socket it borrows;
    // MSG_PEEK leaves what is there in place, MSG_DONTWAIT returns at once.
    let got = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    !(got < 0 && std::io::Error::last_os_error().kind() == ErrorKind::WouldBlock)
}

/// Shuts the VM down through the API and checks that faultline exits cleanly.
fn shut_down(sock: &Path, mut faultline: Faultline) {
    let (status, body) = call(sock, "PUT", "/vm/shutdown", 3);
    assert_eq!(status, 204, "{body}");
    let exit = faultline.wait();
    assert!(
        exit.success(),
        "faultline after an API shutdown: {exit}: {}",
        faultline.stderr()
    );
    assert!(!sock.exists(), "the API socket is removed on exit");
}

#[test]
fn idle_and_stalled_clients_do_not_delay_others() {
    require_kvm!();
    let (_tmp, sock, faultline) = Faultline::running("idle");
    // Only this user may connect, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let idle = idle_connections(&sock, 200);
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"PUT /vm/pau").unwrap();

    // One connection served at a time with a 10 s read timeout would keep this waiting for
    // 10 s per client ahead of it.
    let (status, info) = call(&sock, "GET", "/vm", 10);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["state"], "running");
    // Shutting down with all of them still open: the server ends their connections.
    shut_down(&sock, faultline);
    drop((idle, stalled));
}

#[test]
fn over_the_limit_is_refused_clearly() {
    require_kvm!();
    let (_tmp, sock, faultline) = Faultline::running("limit");
    let deadline = Instant::now() + DEADLINE;
    let mut idle = idle_connections(&sock, MAX_CONNECTIONS);
    let body = loop {
        // Answered only once every connection made before it was taken or refused.
        let (status, body) = call(&sock, "GET", "/vm", 10);
        let before = idle.len();
        idle.retain(|stream| !answered(stream));
        // Only a place or two still held by threads ending (not a limit lower than said).
        assert!(
            before - idle.len() <= 2,
            "{} idle connections refused below the limit",
            before - idle.len()
        );
        if status == 503 && idle.len() == MAX_CONNECTIONS {
            break body;
        }
        assert!(
            idle.len() < MAX_CONNECTIONS,
            "a GET got in with {MAX_CONNECTIONS} idle connections open: {body}"
        );
        // The thread that answered a GET before counts until it has ended (just after
        // answering), so an idle connection was refused meanwhile: replaced, and again.
        assert!(Instant::now() < deadline, "the connections never filled up");
        idle.extend(idle_connections(&sock, MAX_CONNECTIONS - idle.len()));
    };
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("too many API connections"), "{body}");

    // Closing idle connections frees their places as soon as their threads see the end.
    idle.truncate(MAX_CONNECTIONS - 8);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = call(&sock, "GET", "/vm", 10);
        if status == 200 {
            assert_eq!(body["state"], "running");
            // The room came from the connections closed, not from the others timing out.
            assert!(
                idle.iter().all(|stream| !answered(stream)),
                "idle connections timed out before a closed one made room"
            );
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "closed connections never made room"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    shut_down(&sock, faultline);
    drop(idle);
}

#[test]
fn a_stalled_request_gets_408() {
    require_kvm!();
    let (_tmp, sock, faultline) = Faultline::running("stalled");

    let mut stream = UnixStream::connect(&sock).unwrap();
    stream
        .write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // Read up to the end of the connection (the server closes after answering).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !answer.is_empty() => break,
            Err(e) => panic!(
                "no answer to a stalled request ({e}); got {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("within 5 s"),
        "the error names the deadline: {answer}"
    );

    // The server carries on.
    let (status, _) = call(&sock, "GET", "/vm", 3);
    assert_eq!(status, 200);
    shut_down(&sock, faultline);
}

#[test]
fn a_regular_file_at_the_socket_path_is_left_alone() {
    require_kvm!();
    let tmp = TempDir::new("file");
    let path = tmp.join("precious.txt");
    let contents = b"not a socket: keep me\n";
    std::fs::write(&path, contents).unwrap();

    let mut faultline = Faultline::spawn(
        &[
            "run",
            "--guest",
            "hello",
            "--api-sock",
            path.to_str().unwrap(),
        ],
        &tmp,
    );
    let exit = faultline.wait();
    let stderr = faultline.stderr();
    assert!(!exit.success(), "faultline ran with a file as its socket");
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "the error names the path: {stderr}"
    );
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read(&path).expect("the file is still there"),
        contents,
        "the file is untouched"
    );
    // Refused before anything was built: no VM was announced.
    let stdout = std::fs::read_to_string(tmp.join("stdout")).unwrap();
    assert!(!stdout.contains("faultline: guest"), "{stdout}");
}

/// Opens a `GET /track/events` stream on `sock`: its lines, or the refusal's status and body.
fn event_stream(sock: &Path) -> Result<BufReader<UnixStream>, (u16, serde_json::Value)> {
    match http::get_stream(sock, "/track/events").unwrap() {
        http::Stream::Lines(lines) => Ok(lines),
        http::Stream::Refused(status, body) => Err((status, body.unwrap_or_default())),
    }
}

#[test]
fn event_streams_beyond_their_limit_are_refused_and_leave_room_for_requests() {
    require_kvm!();
    let (_tmp, sock, faultline) = Faultline::running("streams");
    // Streams hold their connections for as long as their clients read: without a limit of
    // their own, enough of them would take every connection, shutdown's and recovery's too.
    let mut streams: Vec<_> = (0..MAX_EVENT_STREAMS)
        .map(|i| event_stream(&sock).unwrap_or_else(|e| panic!("stream {i} refused: {e:?}")))
        .collect();
    let (status, body) = event_stream(&sock)
        .map(|_| ())
        .expect_err("a stream over the limit");
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("too many tracking event streams"), "{body}");
    let (status, info) = call(&sock, "GET", "/vm", 10);
    assert_eq!(status, 200, "{info}");

    // A stream that ends gives its place back (once the server sees its client gone).
    drop(streams.pop());
    let deadline = Instant::now() + DEADLINE;
    let again = loop {
        match event_stream(&sock) {
            Ok(stream) => break stream,
            Err((503, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("a stream after one ended: {e:?}"),
        }
    };
    streams.push(again);
    // Shutting down ends them all.
    shut_down(&sock, faultline);
    for mut stream in streams {
        stream.read_to_end(&mut Vec::new()).unwrap();
    }
}
