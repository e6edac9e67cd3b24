//! The two requests `scale-out` makes of a cloud node itself: `GET /ready` (is it serving) and
//! `GET /v1/status` (its counters: partitions held, sessions, messages handled). The fleet
//! simulator has its own API client for the fleet's work; these are the harness's polls, one
//! short-lived HTTP/1.1 connection each (hyper's client connection, as the simulator's).

use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (a status is a few KiB).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// `GET path` of the API at `addr` (`HOST:PORT`), with `key` as its bearer key when given:
/// the answer's status and its JSON body (`Null` when empty or not JSON).
pub async fn get(addr: &str, path: &str, key: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let answer = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes the connection.
            let _ = connection.await;
        });
        let mut request = hyper::Request::builder()
            .method("GET")
            .uri(path)
            .header(hyper::header::HOST, addr);
        if let Some(key) = key {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("GET {path}: cannot read the answer: {e}"))?
            .to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        anyhow::Ok((status, value))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(answer) => answer,
        Err(_) => bail!("GET {path} at {addr}: no answer within {REQUEST_TIMEOUT:?}"),
    }
}

/// A counter of a `GET /v1/status` answer (its fields are at the top level); 0 when absent.
pub fn counter(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_counter_reads_as_zero() {
        let v = json!({"sessions": 7, "cluster_partitions_held": 21, "reason": "x"});
        assert_eq!(counter(&v, "sessions"), 7);
        assert_eq!(counter(&v, "cluster_partitions_held"), 21);
        assert_eq!(counter(&v, "reason"), 0);
        assert_eq!(counter(&v, "missing"), 0);
    }
}
