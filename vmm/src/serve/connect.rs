//! The Connect protocol (connectrpc.com/docs/protocol), server side, as
//! the E2B SDKs speak it to envd: unary calls (`application/json` or
//! `application/proto`, the message is the body) and streaming calls
//! (`application/connect+json` or `+proto`: enveloped messages, the
//! response ending with an end-of-stream envelope that carries the
//! error, if any).
//!
//! Everything arriving here is untrusted: bodies and envelopes are
//! limited in size and a bad one is an `invalid_argument` or
//! `resource_exhausted` error, never a panic or an unbounded allocation.

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{HeaderMap, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::http::{self, HttpBody};

/// The largest request message (and unary body) accepted.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Envelope flags.
const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END_STREAM: u8 = 0x02;

/// Connect error codes (the ones this server answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (the protocol's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: a code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct Error {
    pub code: Code,
    pub message: String,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.name(), "message": self.message})
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How messages are encoded on this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

/// A message type the codecs handle: prost for protobuf, pbjson's serde
/// impls for JSON.
pub trait Msg: prost::Message + Default + Serialize + DeserializeOwned {}
impl<T: prost::Message + Default + Serialize + DeserializeOwned> Msg for T {}

impl Codec {
    /// The codec of a request's content type, and whether it is a
    /// streaming call.
    pub fn of(headers: &HeaderMap) -> Result<(Codec, bool)> {
        let ct = headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ct = ct.split(';').next().unwrap_or("").trim();
        Ok(match ct {
            "application/json" => (Codec::Json, false),
            "application/proto" => (Codec::Proto, false),
            "application/connect+json" => (Codec::Json, true),
            "application/connect+proto" => (Codec::Proto, true),
            other => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    format!("unsupported content type {other:?}: use application/json, application/proto or their connect+ forms"),
                ))
            }
        })
    }

    pub fn decode<M: Msg>(self, bytes: &[u8]) -> Result<M> {
        let bad = |e: String| Error::new(Code::InvalidArgument, format!("bad message: {e}"));
        match self {
            Codec::Proto => M::decode(bytes).map_err(|e| bad(e.to_string())),
            Codec::Json if bytes.is_empty() => Ok(M::default()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| bad(e.to_string())),
        }
    }

    pub fn encode<M: Msg>(self, msg: &M) -> Vec<u8> {
        match self {
            Codec::Proto => msg.encode_to_vec(),
            Codec::Json => serde_json::to_vec(msg).unwrap_or_default(),
        }
    }

    fn content_type(self, streaming: bool) -> &'static str {
        match (self, streaming) {
            (Codec::Json, false) => "application/json",
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, true) => "application/connect+json",
            (Codec::Proto, true) => "application/connect+proto",
        }
    }
}

/// Refuses compressed requests: this server asks for none.
fn check_encoding(headers: &HeaderMap, streaming: bool) -> Result<()> {
    let name = match streaming {
        true => "connect-content-encoding",
        false => "content-encoding",
    };
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(Error::new(
            Code::Unimplemented,
            format!("compression {other:?} is not supported: send identity"),
        )),
    }
}

/// Reads a whole body, at most `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Error::new(
                Code::ResourceExhausted,
                format!("the request is larger than {limit} bytes"),
            ))
        }
        Err(e) => Err(Error::new(
            Code::Canceled,
            format!("cannot read the request: {e}"),
        )),
    }
}

/// The request message of a unary call or of a server-streaming call
/// (whose body is one envelope).
pub async fn read_request<M: Msg>(
    headers: &HeaderMap,
    body: Incoming,
    codec: Codec,
    streaming: bool,
) -> Result<M> {
    check_encoding(headers, streaming)?;
    let bytes = read_body(body, MAX_MESSAGE + 5).await?;
    if !streaming {
        return codec.decode(&bytes);
    }
    let mut reader = Envelopes::default();
    reader.buf.extend_from_slice(&bytes);
    match reader.next_message()? {
        Some(msg) => codec.decode(&msg),
        None => Err(Error::new(
            Code::InvalidArgument,
            "the request has no message",
        )),
    }
}

/// Splits a byte stream into envelopes.
#[derive(Default)]
pub struct Envelopes {
    buf: BytesMut,
}

impl Envelopes {
    /// The next complete message, if the buffer holds one. An end-of-stream
    /// envelope from a client, a compressed one or one past
    /// [`MAX_MESSAGE`] is an error.
    pub fn next_message(&mut self) -> Result<Option<Bytes>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!("a message of {len} bytes is larger than {MAX_MESSAGE}"),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(Error::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        if flags & !FLAG_COMPRESSED != 0 {
            return Err(Error::new(
                Code::InvalidArgument,
                format!("bad envelope flags {flags:#x}"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Reads the next message of a client stream from `body`; `None` at
    /// its end. Bytes left over at the end are an error.
    pub async fn next(&mut self, body: &mut Incoming) -> Result<Option<Bytes>> {
        loop {
            if let Some(msg) = self.next_message()? {
                return Ok(Some(msg));
            }
            match body.frame().await {
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(Error::new(
                        Code::InvalidArgument,
                        "the request ended inside a message",
                    ))
                }
                Some(Err(e)) => {
                    return Err(Error::new(
                        Code::Canceled,
                        format!("cannot read the request: {e}"),
                    ))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// A unary answer.
pub fn unary<M: Msg>(codec: Codec, result: Result<M>) -> Response<HttpBody> {
    match result {
        Ok(msg) => http::bytes(
            StatusCode::OK,
            codec.content_type(false),
            codec.encode(&msg),
        ),
        Err(e) => http::json(e.code.status(), &e.json()),
    }
}

/// The sending side of a streaming answer.
pub struct Stream {
    codec: Codec,
    tx: http::BodySender,
}

impl Stream {
    /// A streaming answer and its sender.
    pub fn open(codec: Codec) -> (Stream, Response<HttpBody>) {
        let (tx, body) = http::channel(16);
        let resp = http::streamed(StatusCode::OK, codec.content_type(true), body);
        (Stream { codec, tx }, resp)
    }

    /// Sends one message; false when the caller has gone.
    pub async fn send<M: Msg>(&mut self, msg: &M) -> bool {
        let bytes = envelope(0, &self.codec.encode(msg));
        self.tx.send_data(bytes).await.is_ok()
    }

    /// Ends the stream, with an error or without.
    pub async fn end(mut self, error: Option<Error>) {
        let trailer = match error {
            None => serde_json::json!({}),
            Some(e) => serde_json::json!({"error": e.json()}),
        };
        let payload = serde_json::to_vec(&trailer).unwrap_or_default();
        let _ = self.tx.send_data(envelope(FLAG_END_STREAM, &payload)).await;
    }
}

/// An error answer for a call that failed before it started, in the
/// shape its kind of call uses.
pub fn failed(codec: Codec, streaming: bool, error: Error) -> Response<HttpBody> {
    if !streaming {
        return http::json(error.code.status(), &error.json());
    }
    let trailer = serde_json::json!({"error": error.json()});
    let payload = serde_json::to_vec(&trailer).unwrap_or_default();
    http::bytes(
        StatusCode::OK,
        codec.content_type(true),
        envelope(FLAG_END_STREAM, &payload).to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;

    #[test]
    fn envelopes_split_and_bad_ones_are_refused() {
        let mut e = Envelopes::default();
        e.buf.extend_from_slice(&envelope(0, b"ab"));
        e.buf.extend_from_slice(&envelope(0, b"")[..3]);
        assert_eq!(
            e.next_message().unwrap().unwrap(),
            Bytes::from_static(b"ab")
        );
        assert_eq!(e.next_message().unwrap(), None);
        e.buf.extend_from_slice(&[0, 0]);
        assert_eq!(e.next_message().unwrap().unwrap(), Bytes::new());

        let mut huge = Envelopes::default();
        huge.buf.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            huge.next_message().unwrap_err().code,
            Code::ResourceExhausted
        );
        let mut compressed = Envelopes::default();
        compressed
            .buf
            .extend_from_slice(&envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(
            compressed.next_message().unwrap_err().code,
            Code::Unimplemented
        );
        let mut end = Envelopes::default();
        end.buf.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
        assert_eq!(end.next_message().unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn codecs_round_trip_and_refuse_garbage() {
        use crate::serve::envd::process::{ProcessConfig, StartRequest};
        let req = StartRequest {
            process: Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-c".into(), "true".into()],
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        };
        for codec in [Codec::Json, Codec::Proto] {
            let back: StartRequest = codec.decode(&codec.encode(&req)).unwrap();
            assert_eq!(back, req);
            let err = codec
                .decode::<StartRequest>(b"\xff\xff\xff garbage")
                .unwrap_err();
            assert_eq!(err.code, Code::InvalidArgument);
        }
        let json: StartRequest = Codec::Json
            .decode(br#"{"process":{"cmd":"ls","envs":{"A":"1"}},"stdin":true}"#)
            .unwrap();
        assert_eq!(json.process.unwrap().envs["A"], "1");
        assert_eq!(
            Codec::Json.decode::<StartRequest>(b"").unwrap(),
            StartRequest::default()
        );
    }

    #[test]
    fn content_types_choose_the_codec() {
        let mut h = HeaderMap::new();
        h.insert(
            hyper::header::CONTENT_TYPE,
            "application/connect+json".parse().unwrap(),
        );
        assert_eq!(Codec::of(&h).unwrap(), (Codec::Json, true));
        h.insert(
            hyper::header::CONTENT_TYPE,
            "application/proto; charset=x".parse().unwrap(),
        );
        assert_eq!(Codec::of(&h).unwrap(), (Codec::Proto, false));
        h.insert(hyper::header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(Codec::of(&h).unwrap_err().code, Code::InvalidArgument);
    }

    #[test]
    fn a_failed_stream_ends_with_its_error() {
        let resp = failed(
            Codec::Json,
            true,
            Error::new(Code::NotFound, "no such process"),
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.body().is_end_stream());
    }
}
