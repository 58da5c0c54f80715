//! A small, strict subset of HTTP/1.1 for the JSON control API on a Unix socket: the server
//! side (read one request, write one response, then close) and a client for the same subset.
//!
//! Only what the API needs is supported: bodies are sized by `Content-Length` (no chunked
//! transfer coding), every connection carries one request and is closed after the response, and
//! the header block and the body have fixed size limits enforced while reading.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest accepted header block (start line plus header lines), in bytes.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

/// Largest accepted message body, in bytes.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Errors of the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Reading from or writing to the socket failed (this includes timeouts).
    #[error("I/O error on the API socket")]
    Io(#[from] io::Error),
    /// The peer closed the connection before a full message arrived.
    #[error("the peer closed the connection before sending a complete HTTP message")]
    Closed,
    /// The request line is not `METHOD /path HTTP/1.x`.
    #[error("malformed HTTP request line {0:?}")]
    BadRequestLine(String),
    /// A header line is not `name: value`.
    #[error("malformed HTTP header line {0:?}")]
    BadHeader(String),
    /// The response's status line is not `HTTP/1.x CODE reason`.
    #[error("malformed HTTP status line {0:?}")]
    BadStatusLine(String),
    /// The header block or the body is over its limit.
    #[error("the HTTP {what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Which part of the message is too large ("header block" or "body").
        what: &'static str,
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The message uses `Transfer-Encoding` (such as chunked), which is not supported.
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length")]
    UnsupportedTransferEncoding,
    /// The `Content-Length` header is not a single decimal number.
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    /// The body is not valid JSON, or not JSON of the expected shape.
    #[error("the message body is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    /// The client could not connect to the API socket.
    #[error(
        "cannot connect to the API socket {} (is faultline running with --api-sock?)",
        .path.display()
    )]
    Connect {
        /// The socket the client tried.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
}

/// One HTTP request as the API server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive: "GET", "PUT", ...).
    pub method: String,
    /// The path of the request target, without any query string.
    pub path: String,
    /// The body (empty when the request had none).
    pub body: Vec<u8>,
}

impl Request {
    /// Deserializes the JSON body. An empty (or all-whitespace) body reads as `{}`, so requests
    /// whose fields all have defaults can be sent without a body.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(HttpError::Json)
    }
}

/// One HTTP response of the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The status code (three digits, 100 to 599).
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<serde_json::Value>,
}

impl Response {
    /// A 200 OK response carrying `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// A 204 No Content response.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// An error response with the body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self {
            status,
            body: Some(serde_json::json!({ "error": message })),
        }
    }
}

/// Reads one request: request line, headers and a body of `Content-Length` bytes. Empty lines
/// before the request line are skipped, as RFC 9112 recommends. Fails with
/// [`HttpError::Closed`] if the peer closes the connection before a full request.
pub fn read_request<R: BufRead>(reader: &mut R) -> Result<Request, HttpError> {
    let (start, headers) = read_head(reader, true)?;
    let (method, path) = parse_request_line(&start)?;
    let body = match body_length(&headers)? {
        Some(length) => read_body(reader, length)?,
        None => Vec::new(),
    };
    Ok(Request { method, path, body })
}

/// Writes `response` with `Connection: close` and flushes it. A 204 response never carries a
/// body (nor a `Content-Length`, as RFC 9110 requires), so its `body` is ignored.
pub fn write_response<W: Write>(writer: &mut W, response: &Response) -> io::Result<()> {
    let status = response.status;
    if !(100..=599).contains(&status) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{status} is not an HTTP status code"),
        ));
    }
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
    let body = match &response.body {
        Some(value) if status != 204 => {
            let mut body = serde_json::to_vec(value).map_err(io::Error::other)?;
            body.push(b'\n');
            Some(body)
        }
        _ => None,
    };
    match &body {
        Some(body) => out.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        ),
        None if status != 204 => out.extend_from_slice(b"Content-Length: 0\r\n"),
        None => {}
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if let Some(body) = body {
        out.extend_from_slice(&body);
    }
    writer.write_all(&out)?;
    writer.flush()
}

/// Sends one request to the API server listening on `socket` and returns the status code and
/// the JSON body of its response (`None` when the body is empty). `timeout`, if given, bounds
/// each read and write on the socket.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Option<serde_json::Value>), HttpError> {
    // Refuse anything that would break the request line (or smuggle in a header).
    let method_ok = !method.is_empty() && method.bytes().all(is_tchar);
    let path_ok = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if !method_ok || !path_ok {
        return Err(HttpError::BadRequestLine(snippet(
            format!("{method} {path}").as_bytes(),
        )));
    }
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\n"
    )
    .into_bytes();
    match body {
        Some(value) => {
            let body = serde_json::to_vec(value).map_err(HttpError::Json)?;
            request.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(&body);
        }
        None => request.extend_from_slice(b"\r\n"),
    }

    let (status, headers, mut reader) = send(socket, &request, timeout)?;
    let body = match body_length(&headers)? {
        Some(length) => read_body(&mut reader, length)?,
        None if status == 204 || status == 304 => Vec::new(),
        None => {
            // No length: the body runs to the end of the connection.
            let mut body = Vec::new();
            reader
                .by_ref()
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut body)?;
            if body.len() > MAX_BODY_BYTES {
                return Err(HttpError::TooLarge {
                    what: "body",
                    limit: MAX_BODY_BYTES,
                });
            }
            body
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((status, None));
    }
    let value = serde_json::from_slice(&body).map_err(HttpError::Json)?;
    Ok((status, Some(value)))
}

/// Connects to `socket`, sends `request` and reads the head of the answer (interim responses
/// skipped): its status, its headers, and the connection positioned at its body.
fn send(
    socket: &Path,
    request: &[u8],
    timeout: Option<Duration>,
) -> Result<(u16, Headers, BufReader<UnixStream>), HttpError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| HttpError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    if timeout.is_some() {
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
    }
    // The server may answer (say, with 400) and close before reading the whole request: keep
    // going so its response is read rather than lost behind a broken pipe.
    stream.write_all(request).or_else(|err| match err.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => Ok(()),
        _ => Err(err),
    })?;
    let mut reader = BufReader::new(stream);
    loop {
        let (start, headers) = read_head(&mut reader, false)?;
        let status = parse_status_line(&start)?;
        // Interim responses (such as 100 Continue) precede the real one.
        if status >= 200 {
            return Ok((status, headers, reader));
        }
    }
}

/// An answer whose body is a stream of JSON lines.
pub enum Stream {
    /// 200: the lines follow on this connection until the server ends them.
    Lines(BufReader<UnixStream>),
    /// Any other status, with its JSON body (an error).
    Refused(u16, Option<serde_json::Value>),
}

/// Sends `GET path` to `socket` for a streamed answer (`GET /track/events`).
pub fn get_stream(socket: &Path, path: &str) -> Result<Stream, HttpError> {
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::BadRequestLine(snippet(path.as_bytes())));
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/x-ndjson\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, headers, mut reader) = send(socket, request.as_bytes(), None)?;
    if status == 200 {
        return Ok(Stream::Lines(reader));
    }
    let body = match body_length(&headers)? {
        Some(length) => read_body(&mut reader, length)?,
        None => Vec::new(),
    };
    let value = serde_json::from_slice(&body).ok();
    Ok(Stream::Refused(status, value))
}

/// Writes the head of a 200 answer whose body is JSON lines until the connection closes.
pub fn write_stream_head<W: Write>(writer: &mut W) -> io::Result<()> {
    writer.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
    )?;
    writer.flush()
}

/// Header fields in arrival order, names lower-cased.
type Headers = Vec<(String, String)>;

/// Reads the start line and the header lines up to the blank line, within [`MAX_HEAD_BYTES`].
fn read_head<R: BufRead>(
    reader: &mut R,
    skip_leading_empty_lines: bool,
) -> Result<(Vec<u8>, Headers), HttpError> {
    let mut budget = MAX_HEAD_BYTES;
    let mut start = read_line(reader, &mut budget)?;
    while skip_leading_empty_lines && start.is_empty() {
        start = read_line(reader, &mut budget)?;
    }
    let mut headers = Headers::new();
    loop {
        let line = read_line(reader, &mut budget)?;
        if line.is_empty() {
            return Ok((start, headers));
        }
        headers.push(parse_header(&line)?);
    }
}

/// Reads one line ending in LF (an optional CR before it is dropped too) and charges its length
/// to `budget`, so a peer cannot make us buffer an endless line.
fn read_line<R: BufRead>(reader: &mut R, budget: &mut usize) -> Result<Vec<u8>, HttpError> {
    let mut line = Vec::new();
    let read = reader
        .by_ref()
        .take(*budget as u64)
        .read_until(b'\n', &mut line)?;
    *budget -= read;
    if line.pop() != Some(b'\n') {
        return Err(if *budget == 0 {
            HttpError::TooLarge {
                what: "header block",
                limit: MAX_HEAD_BYTES,
            }
        } else {
            HttpError::Closed
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Splits `METHOD SP TARGET SP HTTP/1.x` into the method and the path (query string dropped).
fn parse_request_line(line: &[u8]) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadRequestLine(snippet(line));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let valid = !method.is_empty()
        && method.bytes().all(is_tchar)
        && target.starts_with('/')
        && target.bytes().all(|b| b.is_ascii_graphic())
        && matches!(version, "HTTP/1.0" | "HTTP/1.1");
    if !valid {
        return Err(bad());
    }
    let path = target.find(['?', '#']).map_or(target, |end| &target[..end]);
    Ok((method.to_owned(), path.to_owned()))
}

/// Parses `HTTP/1.x CODE [reason]` into the status code.
fn parse_status_line(line: &[u8]) -> Result<u16, HttpError> {
    let bad = || HttpError::BadStatusLine(snippet(line));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ' ');
    if !matches!(parts.next(), Some("HTTP/1.0" | "HTTP/1.1")) {
        return Err(bad());
    }
    let code = parts.next().ok_or_else(bad)?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let status: u16 = code.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&status) {
        return Err(bad());
    }
    Ok(status)
}

/// Parses `name: value`; the name is lower-cased, the value stripped of surrounding blanks.
fn parse_header(line: &[u8]) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadHeader(snippet(line));
    let colon = line.iter().position(|&b| b == b':').ok_or_else(bad)?;
    let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
    // Whitespace before the colon and obsolete line folding are both rejected (RFC 9112).
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad());
    }
    if value.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Err(bad());
    }
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// The body length announced by `Content-Length` (`None` without one), within
/// [`MAX_BODY_BYTES`]. Any `Transfer-Encoding` is refused rather than misread.
fn body_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    if headers.iter().any(|(name, _)| name == "transfer-encoding") {
        return Err(HttpError::UnsupportedTransferEncoding);
    }
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(name, _)| name == "content-length") {
        let bad = || HttpError::BadContentLength(value.clone());
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let parsed: u64 = value.parse().map_err(|_| bad())?;
        // Repeated headers must agree, or the message could be framed two ways.
        if length.is_some_and(|previous| previous != parsed) {
            return Err(bad());
        }
        length = Some(parsed);
    }
    match length {
        Some(length) if length > MAX_BODY_BYTES as u64 => Err(HttpError::TooLarge {
            what: "body",
            limit: MAX_BODY_BYTES,
        }),
        // Within MAX_BODY_BYTES, so it fits a usize.
        Some(length) => Ok(Some(length as usize)),
        None => Ok(None),
    }
}

/// Reads exactly `length` body bytes.
fn read_body<R: Read>(reader: &mut R, length: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|err| {
        if err.kind() == ErrorKind::UnexpectedEof {
            HttpError::Closed
        } else {
            HttpError::Io(err)
        }
    })?;
    Ok(body)
}

/// Whether `b` may appear in a method or header name (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The reason phrase sent after a status code.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The start of a malformed line, for error messages (lines may be up to 16 KiB).
fn snippet(line: &[u8]) -> String {
    const MAX_CHARS: usize = 80;
    let text = String::from_utf8_lossy(line);
    let mut short: String = text.chars().take(MAX_CHARS).collect();
    if text.chars().count() > MAX_CHARS {
        short.push_str("...");
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;

    fn parse(input: &[u8]) -> Result<Request, HttpError> {
        let mut reader = input;
        read_request(&mut reader)
    }

    #[test]
    fn every_status_the_server_answers_has_its_reason_phrase() {
        // Each status the API answers with (a failed migration is 502).
        for status in [200, 202, 204, 400, 404, 405, 408, 409, 500, 502, 503] {
            assert_ne!(reason(status), "Status", "{status}");
        }
    }

    #[test]
    fn parses_request_with_json_body() {
        let request = parse(
            b"PUT /vm/config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 13\r\n\r\n{\"vcpus\": 2}\n",
        )
        .unwrap();
        assert_eq!(request.method, "PUT");
        assert_eq!(request.path, "/vm/config");
        let value: serde_json::Value = request.json().unwrap();
        assert_eq!(value, json!({ "vcpus": 2 }));
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let request = parse(b"POST /x HTTP/1.1\ncONTENT-lENGTH:  3 \n\nabcdef").unwrap();
        assert_eq!(request.body, b"abc");
    }

    #[test]
    fn query_string_is_stripped() {
        let request = parse(b"GET /vm/info?pretty=1&x HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/vm/info");
    }

    #[test]
    fn no_content_length_means_empty_body() {
        let request = parse(b"PUT /vm/pause HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        assert!(request.body.is_empty());
        let value: serde_json::Value = request.json().unwrap();
        assert_eq!(value, json!({}));
    }

    #[test]
    fn oversize_header_is_refused() {
        let mut input = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        input.extend_from_slice(b"\r\n\r\n");
        let err = parse(&input).unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::TooLarge {
                    what: "header block",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn oversize_body_is_refused() {
        let err = parse(b"PUT / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n").unwrap_err();
        assert!(
            matches!(err, HttpError::TooLarge { what: "body", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn chunked_is_unsupported() {
        let err =
            parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                .unwrap_err();
        assert!(
            matches!(err, HttpError::UnsupportedTransferEncoding),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_request_line_is_refused() {
        for input in [
            &b"hello\r\n\r\n"[..],
            b"GET /x\r\n\r\n",
            b"GET /x HTTP/2.0\r\n\r\n",
            b"GET  /x HTTP/1.1\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
        ] {
            let err = parse(input).unwrap_err();
            assert!(matches!(err, HttpError::BadRequestLine(_)), "{err:?}");
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let err = parse(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n").unwrap_err();
        assert!(matches!(err, HttpError::BadHeader(_)), "{err:?}");
        let err = parse(b"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n").unwrap_err();
        assert!(matches!(err, HttpError::BadContentLength(_)), "{err:?}");
        let err =
            parse(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").unwrap_err();
        assert!(matches!(err, HttpError::BadContentLength(_)), "{err:?}");
    }

    #[test]
    fn truncated_messages_are_closed() {
        let err = parse(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").unwrap_err();
        assert!(matches!(err, HttpError::Closed), "{err:?}");
        let err = parse(b"PUT / HTTP/1.1\r\nHost: loc").unwrap_err();
        assert!(matches!(err, HttpError::Closed), "{err:?}");
        let err = parse(b"").unwrap_err();
        assert!(matches!(err, HttpError::Closed), "{err:?}");
    }

    #[test]
    fn writes_no_content_exactly() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::no_content()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn writes_error_exactly() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::error(404, "no such route")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 26\r\n\
             Connection: close\r\n\r\n{\"error\":\"no such route\"}\n"
        );
    }

    #[test]
    fn refusals_carry_their_reason_phrases() {
        for (status, phrase) in [
            (408, "Request Timeout"),
            (409, "Conflict"),
            (503, "Service Unavailable"),
        ] {
            let mut out = Vec::new();
            write_response(&mut out, &Response::error(status, "x")).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn call_round_trip() {
        let socket = std::env::temp_dir().join(format!(
            "faultline-{}-call_round_trip.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..3 {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let request = read_request(&mut reader).unwrap();
                let response = match (request.method.as_str(), request.path.as_str()) {
                    ("PUT", "/vm/pause") => Response::no_content(),
                    ("PUT", "/echo") => {
                        let body: serde_json::Value = request.json().unwrap();
                        Response::ok(json!({ "echo": body }))
                    }
                    _ => Response::error(404, format!("no route {}", request.path)),
                };
                let mut writer = stream;
                write_response(&mut writer, &response).unwrap();
            }
        });

        let timeout = Some(Duration::from_secs(10));
        let paused = call(&socket, "PUT", "/vm/pause", None, timeout);
        let echoed = call(
            &socket,
            "PUT",
            "/echo?x=1",
            Some(&json!({ "a": [1, 2] })),
            timeout,
        );
        let missing = call(&socket, "GET", "/nothing", None, timeout);
        server.join().unwrap();
        std::fs::remove_file(socket).unwrap();

        assert_eq!(paused.unwrap(), (204, None));
        assert_eq!(
            echoed.unwrap(),
            (200, Some(json!({ "echo": { "a": [1, 2] } })))
        );
        assert_eq!(
            missing.unwrap(),
            (404, Some(json!({ "error": "no route /nothing" })))
        );
    }

    #[test]
    fn call_names_the_missing_socket() {
        let socket = std::env::temp_dir().join(format!(
            "faultline-{}-call_names_the_missing_socket.sock",
            std::process::id()
        ));
        let err = call(&socket, "GET", "/vm/info", None, None).unwrap_err();
        assert!(matches!(err, HttpError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&socket.display().to_string()));
    }
}
