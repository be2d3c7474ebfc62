//! The CLI's side of the API: one HTTP/1.1 request per command.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::ApiAddr;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the weft agent at {addr}: {source}; is `weft launch` running? (--api or WEFT_API choose another address)")]
    Connect {
        addr: ApiAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the weft agent: {0}")]
    Http(#[source] hyper::Error),
    #[error("bad request to the weft agent: {0}")]
    Request(#[source] hyper::http::Error),
    /// The agent answered with an error; its message says why.
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// The CLI itself refused the arguments (nothing was sent).
    #[error("{0}")]
    Usage(String),
    /// A command that ran on this host without the agent failed.
    #[error(transparent)]
    Local(Box<dyn std::error::Error + Send + Sync>),
}

impl ClientError {
    /// Whether no agent answered at all (`weft reset --force` then works alone).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// Sends a request and returns the body of a successful answer; an error answer
/// becomes [`ClientError::Refused`] carrying the agent's message.
pub async fn request(
    api: &ApiAddr,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<String, ClientError> {
    let connect = |source| ClientError::Connect { addr: api.clone(), source };
    match api {
        ApiAddr::Tcp(a) => {
            let stream = tokio::net::TcpStream::connect(a).await.map_err(connect)?;
            exchange(stream, &a.to_string(), method, path, body).await
        }
        ApiAddr::Unix(p) => {
            let stream = tokio::net::UnixStream::connect(p).await.map_err(connect)?;
            exchange(stream, "localhost", method, path, body).await
        }
    }
}

async fn exchange<S>(stream: S, host: &str, method: Method, path: &str, body: Option<(&str, Vec<u8>)>) -> Result<String, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ClientError::Http)?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path).header("host", host);
    let payload = match body {
        Some((content_type, bytes)) => {
            req = req.header("content-type", content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(payload)).map_err(ClientError::Request)?;
    let resp = sender.send_request(req).await.map_err(ClientError::Http)?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(ClientError::Http)?.to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if status == StatusCode::OK {
        Ok(text)
    } else {
        Err(ClientError::Refused { status: status.as_u16(), message: text.trim().to_string() })
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> (&'static str, Vec<u8>) {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    ("application/x-www-form-urlencoded", body.join("&").into_bytes())
}

/// JSON of `value`.
pub fn json<T: serde::Serialize>(value: &T) -> (&'static str, Vec<u8>) {
    ("application/json", serde_json::to_vec(value).expect("requests serialize"))
}
