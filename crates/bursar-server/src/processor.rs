//! The payment processor client (issue 4, item 1). [`Processor`] is the port payments will
//! call from their phases; [`HttpProcessor`] is its first adapter, speaking the sandbox
//! processor's HTTP API (`bursar-sandbox`). A real processor's adapter implements the same
//! trait.
//!
//! Retries are safe only because every attempt of a call carries the same idempotency key
//! (the operation's outbound key, `bursar-<record id>`): the processor answers a repeated key
//! with its first answer instead of charging again. So the adapter retries exactly what may
//! not have been processed — timeouts, connection errors and 5xx — at most
//! [`RetryPolicy::attempts`] times, with capped exponential backoff and full jitter, and never
//! a 4xx: a decline is an answer.

use std::time::Duration;

use async_trait::async_trait;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What to authorize (and capture at once when `capture`). Amounts are minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentRequest {
    pub amount_minor: i64,
    pub currency: String,
    pub payment_method: String,
    pub capture: bool,
}

/// A payment as the processor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProcessorPayment {
    pub id: String,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub captured_minor: i64,
    pub refunded_minor: i64,
}

/// A refund as the processor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProcessorRefund {
    pub id: String,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
}

/// How a processor call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessorError {
    /// The card was declined (402): a deterministic business answer, to be stored.
    #[error("declined: {code}")]
    Declined { code: String, message: String },
    /// Any other 4xx: the request itself was refused; retrying cannot help.
    #[error("refused with {status}: {code}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer that settles the call after every attempt (timeouts, connection errors,
    /// 5xx). The outcome at the processor is unknown; a later retry with the same key finds
    /// out, so the work must stay unfinished.
    #[error("processor unavailable after {attempts} attempts: {reason}")]
    Unavailable { attempts: u32, reason: String },
}

/// What every call to the processor carries besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The idempotency key, the same on every attempt and every rerun of the work.
    pub key: String,
    /// W3C trace context: the originating request's trace, a new parent-id per call.
    pub traceparent: Option<String>,
}

impl From<&str> for Outbound {
    fn from(key: &str) -> Outbound {
        Outbound {
            key: key.to_owned(),
            traceparent: None,
        }
    }
}

/// The port payments call. Every method takes the idempotency key (and trace) for the
/// processor.
#[async_trait]
pub trait Processor: Send + Sync {
    async fn create_payment(
        &self,
        call: &Outbound,
        req: &PaymentRequest,
    ) -> Result<ProcessorPayment, ProcessorError>;
    /// Captures `amount_minor` (all of it when `None`) of an authorized payment.
    async fn capture(
        &self,
        call: &Outbound,
        payment_id: &str,
        amount_minor: Option<i64>,
    ) -> Result<ProcessorPayment, ProcessorError>;
    async fn void(
        &self,
        call: &Outbound,
        payment_id: &str,
    ) -> Result<ProcessorPayment, ProcessorError>;
    /// Refunds `amount_minor` (what is left when `None`) of a captured payment.
    async fn refund(
        &self,
        call: &Outbound,
        payment_id: &str,
        amount_minor: Option<i64>,
    ) -> Result<ProcessorRefund, ProcessorError>;
}

/// When and how often [`HttpProcessor`] tries a call.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Limit on each attempt, connection included.
    pub timeout: Duration,
    /// The backoff before attempt n+1 is drawn uniformly from
    /// `0..=min(max_delay, base_delay * 2^(n-1))` ("full jitter").
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            timeout: Duration::from_secs(10),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The jittered pause after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        let cap = self.base_delay.saturating_mul(factor).min(self.max_delay);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=cap_ms))
    }
}

/// [`Processor`] over the sandbox processor's HTTP API.
pub struct HttpProcessor {
    http: reqwest::Client,
    base: String,
    policy: RetryPolicy,
}

impl HttpProcessor {
    /// `base` is the processor's URL, e.g. `http://127.0.0.1:8090`.
    pub fn new(base: &str, policy: RetryPolicy) -> reqwest::Result<HttpProcessor> {
        let http = reqwest::Client::builder()
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .build()?;
        Ok(HttpProcessor {
            http,
            base: base.trim_end_matches('/').to_owned(),
            policy,
        })
    }

    /// POSTs `body` to `path` under `key`, retrying what may not have been processed.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        call: &Outbound,
        path: &str,
        body: &Value,
    ) -> Result<T, ProcessorError> {
        let url = format!("{}{path}", self.base);
        let mut reason = String::new();
        for attempt in 1..=self.policy.attempts.max(1) {
            if attempt > 1 {
                tokio::time::sleep(self.policy.backoff(attempt - 1)).await;
            }
            let mut req = self
                .http
                .post(&url)
                .header("idempotency-key", &call.key)
                .json(body);
            if let Some(tp) = &call.traceparent {
                req = req.header("traceparent", tp);
            }
            let sent = req.send().await;
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    reason = if e.is_timeout() {
                        "timed out".to_owned()
                    } else {
                        // Without the URL: it may carry credentials.
                        format!("connection failed: {}", e.without_url())
                    };
                    continue;
                }
            };
            let status = resp.status();
            if status.is_server_error() {
                reason = format!("answered {status}");
                continue;
            }
            let value: Value = match resp.json().await {
                Ok(v) => v,
                Err(e) => {
                    reason = format!("unreadable answer: {}", e.without_url());
                    continue;
                }
            };
            if status.is_success() {
                return serde_json::from_value(value).map_err(|e| ProcessorError::Refused {
                    status: status.as_u16(),
                    code: "unexpected_answer".into(),
                    message: e.to_string(),
                });
            }
            let text = |field: &str| {
                value["error"][field]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            return Err(if status.as_u16() == 402 {
                ProcessorError::Declined {
                    code: text("code"),
                    message: text("message"),
                }
            } else {
                ProcessorError::Refused {
                    status: status.as_u16(),
                    code: text("code"),
                    message: text("message"),
                }
            });
        }
        Err(ProcessorError::Unavailable {
            attempts: self.policy.attempts.max(1),
            reason,
        })
    }
}

#[async_trait]
impl Processor for HttpProcessor {
    async fn create_payment(
        &self,
        call: &Outbound,
        req: &PaymentRequest,
    ) -> Result<ProcessorPayment, ProcessorError> {
        let body = serde_json::to_value(req).expect("plain data serialises");
        self.call(call, "/v1/payments", &body).await
    }

    async fn capture(
        &self,
        call: &Outbound,
        payment_id: &str,
        amount_minor: Option<i64>,
    ) -> Result<ProcessorPayment, ProcessorError> {
        let body = serde_json::json!({ "amount_minor": amount_minor });
        self.call(call, &format!("/v1/payments/{payment_id}/capture"), &body)
            .await
    }

    async fn void(
        &self,
        call: &Outbound,
        payment_id: &str,
    ) -> Result<ProcessorPayment, ProcessorError> {
        self.call(
            call,
            &format!("/v1/payments/{payment_id}/void"),
            &serde_json::json!({}),
        )
        .await
    }

    async fn refund(
        &self,
        call: &Outbound,
        payment_id: &str,
        amount_minor: Option<i64>,
    ) -> Result<ProcessorRefund, ProcessorError> {
        let body = serde_json::json!({ "payment_id": payment_id, "amount_minor": amount_minor });
        self.call(call, "/v1/refunds", &body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_full_jitter() {
        let p = RetryPolicy {
            attempts: 3,
            timeout: Duration::from_secs(1),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
        };
        for _ in 0..200 {
            assert!(p.backoff(1) <= Duration::from_millis(100));
            assert!(p.backoff(2) <= Duration::from_millis(200));
            assert!(p.backoff(3) <= Duration::from_millis(250));
            assert!(p.backoff(30) <= Duration::from_millis(250));
        }
        // Full jitter spreads over the whole range, not around the cap.
        let draws: Vec<Duration> = (0..200).map(|_| p.backoff(3)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(125)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(125)));
    }
}
