//! The little HTTP/1.1 the control socket speaks: one request per
//! connection, read incrementally (the server never waits on a client),
//! a JSON answer, `Connection: close`.

use std::io::{self, Write};

use serde_json::Value;

/// Longest request head or body accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Parses the request at the start of `buf`: Ok(None) while it is
/// incomplete, an error (what is wrong) when it is malformed or too large.
pub fn parse_request(buf: &[u8]) -> Result<Option<HttpRequest>, String> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        if buf.len() > MAX_REQUEST {
            return Err("request head too large".into());
        }
        return Ok(None);
    };
    if head_len > MAX_REQUEST {
        return Err("request head too large".into());
    }
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "request head is not text")?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err("not HTTP/1.x".into());
    }
    let mut length = 0usize;
    for header in lines {
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| "bad Content-Length")?;
            }
        }
    }
    if length > MAX_REQUEST {
        return Err("body too large".into());
    }
    if buf.len() < head_len + length {
        return Ok(None);
    }
    Ok(Some(HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
        body: buf[head_len..head_len + length].to_vec(),
    }))
}

/// Writes a response with a JSON body (none for 204).
pub fn write_response(stream: &mut impl Write, status: u16, body: &Value) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let text = if status == 204 {
        String::new()
    } else {
        body.to_string()
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(raw: &[u8]) -> HttpRequest {
        parse_request(raw).unwrap().unwrap()
    }

    #[test]
    fn parses_requests_with_and_without_bodies() {
        let req = full(b"PUT /vm/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("PUT", "/vm/stop", &b"{}"[..])
        );
        assert!(full(b"GET /vm HTTP/1.1\r\n\r\n").body.is_empty());
    }

    #[test]
    fn incomplete_requests_wait_and_every_prefix_is_safe() {
        let raw = b"PUT /vm/fork HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"count\": 2}\n";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(full(raw).body, b"{\"count\": 2}\n");
    }

    #[test]
    fn rejects_malformed_requests() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /vm SPDY/3\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nX: \xff\r\n\r\n",
        ] {
            assert!(parse_request(raw).is_err(), "{raw:?}");
        }
        let endless = vec![b'a'; MAX_REQUEST + 1];
        assert!(parse_request(&endless).is_err());
    }
}
