//! A minimal HTTP/1.1 client over one keep-alive TCP connection: `POST`/`GET` with a
//! `Content-Length` body, responses read by their status line, headers and `Content-Length`.
//! Enough for the edge's API and no more (no chunked bodies, no TLS, no redirects).

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Largest response body accepted.
const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Limit on one request, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A response: status, the `Retry-After` header if any, and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after_s: Option<u64>,
    pub body: Vec<u8>,
}

/// One connection to one server, reopened when the server closes it.
#[derive(Debug)]
pub struct HttpConnection {
    address: String,
    stream: Option<TcpStream>,
    read_buffer: BytesMut,
    request_buffer: Vec<u8>,
}

impl HttpConnection {
    /// A connection to `address` (`host:port`), opened now.
    pub async fn connect(address: &str) -> io::Result<HttpConnection> {
        let mut connection = HttpConnection {
            address: address.to_owned(),
            stream: None,
            read_buffer: BytesMut::with_capacity(16 * 1024),
            request_buffer: Vec::with_capacity(16 * 1024),
        };
        connection.stream = Some(connection.open().await?);
        Ok(connection)
    }

    async fn open(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(&self.address).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Sends one request and reads its response, within [`REQUEST_TIMEOUT`]. On any error the
    /// connection is dropped and the next request opens a new one.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        api_key: Option<&str>,
        body: &[u8],
    ) -> io::Result<Response> {
        let result = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, api_key, body)).await;
        let result =
            result.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        api_key: Option<&str>,
        body: &[u8],
    ) -> io::Result<Response> {
        self.request_buffer.clear();
        write_head(&mut self.request_buffer, method, path, &self.address, api_key, body.len());
        self.request_buffer.extend_from_slice(body);
        if self.stream.is_none() {
            self.stream = Some(self.open().await?);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no connection"));
        };
        stream.write_all(&self.request_buffer).await?;
        self.read_buffer.clear();
        let head = loop {
            if let Some(head) = parse_head(&self.read_buffer)? {
                break head;
            }
            if self.read_buffer.len() > HEAD_BYTES_MAX {
                return Err(invalid("response head too large"));
            }
            read_more(stream, &mut self.read_buffer).await?;
        };
        self.read_buffer.advance(head.length);
        while self.read_buffer.len() < head.content_length {
            read_more(stream, &mut self.read_buffer).await?;
        }
        let body = self.read_buffer.split_to(head.content_length).to_vec();
        if head.close {
            self.stream = None;
        }
        Ok(Response { status: head.status, retry_after_s: head.retry_after_s, body })
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut BytesMut) -> io::Result<()> {
    buffer.reserve(16 * 1024);
    if stream.read_buf(buffer).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by the server"));
    }
    Ok(())
}

fn write_head(out: &mut Vec<u8>, method: &str, path: &str, host: &str, api_key: Option<&str>, length: usize) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tally-load\r\n");
    if let Some(key) = api_key {
        let _ = write!(out, "X-API-Key: {key}\r\n");
    }
    if length > 0 || method == "POST" {
        let _ = write!(out, "Content-Type: application/json\r\nContent-Length: {length}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    /// Bytes of the head, the blank line included.
    length: usize,
    status: u16,
    content_length: usize,
    close: bool,
    retry_after_s: Option<u64>,
}

/// The head at the start of `buffer`, or `None` until it is complete.
fn parse_head(buffer: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buffer[..end]).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(&format!("not an HTTP/1.x response: {status_line:?}")));
    }
    let status = parts.next().and_then(|code| code.parse().ok()).ok_or_else(|| invalid("bad status line"))?;
    let mut head = Head {
        length: end + 4,
        status,
        content_length: 0,
        close: version == "HTTP/1.0",
        retry_after_s: None,
    };
    let mut has_length = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().map_err(|_| invalid("bad Content-Length"))?;
            has_length = true;
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after_s = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(invalid("chunked responses are not supported"));
        }
    }
    let bodiless = status == 204 || status == 304 || (100..200).contains(&status);
    if !has_length && !bodiless {
        return Err(invalid("response without Content-Length"));
    }
    if head.content_length > BODY_BYTES_MAX {
        return Err(invalid("response body too large"));
    }
    Ok(Some(head))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_once_complete() {
        let response = b"HTTP/1.1 207 Multi-Status\r\ncontent-type: application/json\r\nContent-Length: 2\r\nretry-after: 1\r\n\r\n{}";
        assert_eq!(parse_head(&response[..30]).expect("partial is fine"), None);
        let head = parse_head(response).expect("valid").expect("complete");
        assert_eq!(head.status, 207);
        assert_eq!(head.content_length, 2);
        assert_eq!(head.retry_after_s, Some(1));
        assert!(!head.close);
        assert_eq!(&response[head.length..], b"{}");
    }

    #[test]
    fn unsupported_responses_are_errors() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        let closing = parse_head(b"HTTP/1.1 503 X\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(closing.expect("valid").expect("complete").close);
    }

    #[test]
    fn requests_carry_key_and_length() {
        let mut out = Vec::new();
        write_head(&mut out, "POST", "/api/v1/events", "127.0.0.1:8000", Some("tk_1"), 12);
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.starts_with("POST /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"));
        assert!(text.contains("X-API-Key: tk_1\r\n") && text.contains("Content-Length: 12\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[tokio::test]
    async fn a_keep_alive_exchange_against_a_scripted_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut received = Vec::new();
            for reply in [
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
                "HTTP/1.1 503 X\r\nContent-Length: 0\r\nRetry-After: 2\r\n\r\n",
            ] {
                let mut buffer = vec![0; 4096];
                let read = socket.read(&mut buffer).await.expect("read");
                received.push(String::from_utf8_lossy(&buffer[..read]).into_owned());
                socket.write_all(reply.as_bytes()).await.expect("write");
            }
            received
        });
        let mut connection = HttpConnection::connect(&address).await.expect("connect");
        let first = connection.request("POST", "/a", Some("k"), b"{}").await.expect("first");
        assert_eq!((first.status, first.body.as_slice()), (200, &b"first"[..]));
        let second =
            connection.request("GET", "/health", None, b"").await.expect("second on the same socket");
        assert_eq!((second.status, second.retry_after_s), (503, Some(2)));
        let received = server.await.expect("server");
        assert!(received[0].ends_with("\r\n\r\n{}"));
        assert!(received[1].starts_with("GET /health HTTP/1.1"));
    }
}
