//! Small HTTP helpers the server's handlers share: the body type and
//! answers in the shapes E2B uses (JSON errors `{"code", "message"}`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use serde::Serialize;

/// Every answer's body. A streamed one fails (the connection is cut)
/// when its source fails after the answer started.
pub type HttpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A streamed body's source side.
pub type BodySender = http_body_util::channel::Sender<Bytes, std::io::Error>;

/// A streamed body and its sender, which may hold `buffer` chunks.
pub fn channel(
    buffer: usize,
) -> (
    BodySender,
    http_body_util::channel::Channel<Bytes, std::io::Error>,
) {
    http_body_util::channel::Channel::new(buffer)
}

pub fn bytes(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<HttpBody> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

pub fn json(status: StatusCode, value: &impl Serialize) -> Response<HttpBody> {
    bytes(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

pub fn empty(status: StatusCode) -> Response<HttpBody> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// An E2B API error: `{"code": STATUS, "message": ...}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<HttpBody> {
    let message: String = message.into();
    json(
        status,
        &serde_json::json!({"code": status.as_u16(), "message": message}),
    )
}

/// An answer whose body comes from `body` as it is produced.
pub fn streamed(
    status: StatusCode,
    content_type: &str,
    body: http_body_util::channel::Channel<Bytes, std::io::Error>,
) -> Response<HttpBody> {
    let mut resp = Response::new(body.boxed());
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// The query string's value for `name`, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == name).then(|| decode(v)).flatten()
    })
}

/// Percent-decoding (and `+` as space, as forms write it); `None` when the
/// result is not UTF-8 or an escape is bad.
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = Some("path=%2Fhome%2Fuser%2Fa+b.txt&username=root&x");
        assert_eq!(
            query_param(q, "path").as_deref(),
            Some("/home/user/a b.txt")
        );
        assert_eq!(query_param(q, "username").as_deref(), Some("root"));
        assert_eq!(query_param(q, "x").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(Some("path=%zz"), "path"), None);
        assert_eq!(query_param(Some("path=%e2%82"), "path"), None);
        assert_eq!(query_param(None, "path"), None);
    }
}
