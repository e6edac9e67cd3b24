//! The cloud's HTTP API as the simulator uses it: JSON requests with the admin key over a few
//! kept-alive HTTP/1.1 connections (hyper's client connection), a `429` waited out as its
//! `Retry-After` says, and every refusal counted by kind.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::stats::Errors;

/// Most idle connections kept for reuse.
const MAX_IDLE: usize = 64;
/// Attempts of one request refused with 429 (each waits its `Retry-After`).
const RATE_LIMIT_ATTEMPTS: u32 = 20;
/// Attempts of one request whose connection failed.
const CONNECT_ATTEMPTS: u32 = 3;
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read (a page of 1000 devices is well under it).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("cannot reach the API at {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

/// A client of one cloud's API.
pub(crate) struct Api {
    /// `host:port`.
    addr: String,
    key: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    errors: Arc<Errors>,
}

impl Api {
    /// `url` is `http://host:port` (a trailing `/` is fine; HTTPS is not supported).
    pub(crate) fn new(url: &str, key: &str, errors: Arc<Errors>) -> Result<Api, String> {
        let addr = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("the API URL {url:?} must start with http://"))?
            .trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') {
            return Err(format!("the API URL {url:?} must be http://HOST:PORT"));
        }
        Ok(Api {
            addr: addr.to_string(),
            key: key.to_string(),
            idle: Mutex::new(Vec::new()),
            errors,
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.call("GET", path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        self.call("POST", path, Some(body)).await
    }

    pub(crate) async fn delete(&self, path: &str, body: Value) -> Result<Value, ApiError> {
        self.call("DELETE", path, Some(body)).await
    }

    /// One request, retried while the API says to wait (429) or a connection fails; a 429 and
    /// a failed connection are counted each time (`api_rate_limited`, `api_transport`), a final
    /// error status by its code (`api_status_NNN`).
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let mut limited = 0;
        let mut failed = 0;
        loop {
            match self.once(method, path, body.as_ref()).await {
                Ok((status, _, value)) if (200..300).contains(&status) => return Ok(value),
                Ok((429, retry_after, value)) => {
                    self.errors.add("api_rate_limited", 1);
                    limited += 1;
                    if limited >= RATE_LIMIT_ATTEMPTS {
                        return Err(ApiError::Status {
                            status: 429,
                            body: value.to_string(),
                        });
                    }
                    tokio::time::sleep(retry_after.unwrap_or(Duration::from_millis(200))).await;
                }
                Ok((status, _, value)) => {
                    self.errors.add(&format!("api_status_{status}"), 1);
                    return Err(ApiError::Status {
                        status,
                        body: value.to_string(),
                    });
                }
                Err(reason) => {
                    self.errors.add("api_transport", 1);
                    failed += 1;
                    if failed >= CONNECT_ATTEMPTS {
                        return Err(ApiError::Transport {
                            addr: self.addr.clone(),
                            reason,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failed))).await;
                }
            }
        }
    }

    /// `GET path` without the key and without retries: (status, body). For `/ready`.
    pub(crate) async fn probe(&self, path: &str) -> Result<(u16, Value), String> {
        let (status, _, value) = self.send(self.request("GET", path, None, false)?).await?;
        Ok((status, value))
    }

    async fn once(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Option<Duration>, Value), String> {
        self.send(self.request(method, path, body, true)?).await
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        authorized: bool,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let bytes = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if authorized {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.key));
        }
        builder
            .body(Full::new(bytes))
            .map_err(|e| format!("cannot build the request {method} {path}: {e}"))
    }

    async fn send(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(u16, Option<Duration>, Value), String> {
        let mut conn = self.connection().await?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = conn
                .send_request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| format!("cannot read the answer: {e}"))?
                .to_bytes();
            let value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
            };
            Ok::<_, String>((status, retry_after, value))
        })
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))??;
        let mut idle = self.idle.lock().await;
        if idle.len() < MAX_IDLE && !conn.is_closed() {
            idle.push(conn);
        }
        Ok(answer)
    }

    /// An idle connection that is still open, or a new one.
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        while let Some(mut conn) = self.idle.lock().await.pop() {
            if conn.ready().await.is_ok() {
                return Ok(conn);
            }
        }
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the server closes it.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// Checks a name that goes into a request path as it is: the API's names (`[A-Za-z0-9_.-]`,
/// 1 to 64) need no escaping.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} must be 1 to 64 of A-Z, a-z, 0-9, _ . -"
        ))
    }
}
