//! A sandbox payment processor, served over HTTP exactly like a real one, so that Bursar's
//! processor client, its retries and its crash recovery are exercised against a real network
//! peer — in tests, and in test mode when no processor is configured.
//!
//! Like a real processor it honours its own `Idempotency-Key` header (a retried call never
//! charges twice; the same key with a different request is refused) and keeps a ledger of
//! every money movement, which tests read at `GET /v1/ledger` to check what was really
//! charged. Amounts are integer minor units with a currency code.
//!
//! Test payment methods behave deterministically:
//! `pm_card_visa` succeeds; `pm_card_declined` and `pm_card_insufficient_funds` are declined
//! (402); `pm_card_timeout` never answers; `pm_card_flaky` answers 503 to the first
//! [`FLAKY_FAILURES`] attempts under one idempotency key, then succeeds.
//!
//! Trouble can be injected ([`Faults`]): latency before a request is handled, a rate of random
//! 503s that handle nothing, and an answer delay after a request is handled and its answer
//! stored, so the money has moved (and the ledger shows it) while the caller still waits — a
//! caller that times out or crashes then must not know whether it was charged. Faults apply
//! to the four money-moving `POST` routes only; they are set at construction and changed at
//! runtime with [`Sandbox::set_faults`] or `POST /v1/sandbox/faults`, and every request reads
//! them as it arrives (the answer delay as its handling ends).
//!
//! Routes: `POST /v1/payments` (authorize, optionally capture), `POST
//! /v1/payments/{id}/capture`, `POST /v1/payments/{id}/void`, `POST /v1/refunds`,
//! `GET /v1/payments/{id}`, `GET /v1/ledger`, and the admin route `GET`/`POST
//! /v1/sandbox/faults` (JSON `{"latency_ms", "failure_percent", "answer_delay_ms"}`, each
//! optional and 0 when missing; `POST` replaces the faults and answers the new ones, a bad
//! body is a 400). State lives in memory: it is a sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Attempts of `pm_card_flaky` (per idempotency key) that fail before one succeeds.
pub const FLAKY_FAILURES: u32 = 2;

/// Injected trouble for the money-moving `POST` routes (reads and the admin route are never
/// subject to it). Changeable at runtime: [`Sandbox::set_faults`], `POST /v1/sandbox/faults`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Waited before a request is handled (a client that gives up meanwhile charged nothing).
    pub latency: Duration,
    /// Percentage (0–100) of requests answered 503 without being handled or stored.
    pub failure_percent: u8,
    /// Waited after a request is handled and its answer stored under its idempotency key,
    /// before the answer is sent: the money has moved while the caller still waits. Replayed
    /// answers are held back too; a concurrent retry with the same key gets the stored answer
    /// and never charges again.
    pub answer_delay: Duration,
}

/// [`Faults`] as the admin route reads and writes them: whole milliseconds, missing = 0.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FaultsJson {
    latency_ms: u64,
    failure_percent: u8,
    answer_delay_ms: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<Faults> for FaultsJson {
    fn from(f: Faults) -> FaultsJson {
        FaultsJson {
            latency_ms: millis(f.latency),
            failure_percent: f.failure_percent,
            answer_delay_ms: millis(f.answer_delay),
        }
    }
}

impl From<FaultsJson> for Faults {
    fn from(f: FaultsJson) -> Faults {
        Faults {
            latency: Duration::from_millis(f.latency_ms),
            failure_percent: f.failure_percent,
            answer_delay: Duration::from_millis(f.answer_delay_ms),
        }
    }
}

/// One money movement as the processor recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// `authorization`, `capture`, `void` or `refund`.
    pub kind: String,
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: String,
    /// The idempotency key the call carried, if any.
    pub idempotency_key: Option<String>,
    /// The W3C `traceparent` the call carried, if any, so tests can follow a trace across.
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Payment {
    id: String,
    status: &'static str,
    amount_minor: i64,
    currency: String,
    payment_method: String,
    captured_minor: i64,
    refunded_minor: i64,
}

#[derive(Default)]
struct Inner {
    payments: HashMap<String, Payment>,
    /// key → (request fingerprint, status, body) of the first answer.
    answers: HashMap<String, (String, u16, Value)>,
    /// Attempts seen per key for `pm_card_flaky`.
    flaky: HashMap<String, u32>,
    ledger: Vec<LedgerEntry>,
    /// `POST /v1/payments` calls received, answered or not.
    payment_calls: u64,
}

/// The sandbox's shared state.
#[derive(Clone, Default)]
pub struct Sandbox {
    inner: Arc<Mutex<Inner>>,
    /// Shared by every clone, so a change reaches the running server.
    faults: Arc<Mutex<Faults>>,
}

impl Sandbox {
    pub fn new(faults: Faults) -> Sandbox {
        Sandbox {
            inner: Arc::default(),
            faults: Arc::new(Mutex::new(faults)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The faults now in force.
    pub fn faults(&self) -> Faults {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the faults; requests arriving from now on see the new ones (a request already
    /// being handled reads the answer delay as its handling ends).
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// How many `POST /v1/payments` calls arrived (retries included), so tests can tell
    /// what a client retried.
    pub fn payment_calls(&self) -> u64 {
        self.lock().payment_calls
    }

    /// Everything charged, captured, voided and refunded so far, oldest first.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.lock().ledger.clone()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/payments", post(create_payment))
            .route("/v1/payments/{id}", get(get_payment))
            .route("/v1/payments/{id}/capture", post(capture))
            .route("/v1/payments/{id}/void", post(void))
            .route("/v1/refunds", post(refund))
            .route("/v1/ledger", get(ledger))
            .route("/v1/sandbox/faults", get(get_faults).post(set_faults))
            .with_state(self.clone())
    }
}

/// Serves the sandbox on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, sandbox: Sandbox) -> std::io::Result<()> {
    axum::serve(listener, sandbox.router()).await
}

type Answer = (StatusCode, Value);

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    (status, json!({"error": {"code": code, "message": message}}))
}

fn reply((status, body): Answer) -> Response {
    (status, axum::Json(body)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePayment {
    amount_minor: i64,
    currency: String,
    payment_method: String,
    #[serde(default)]
    capture: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Amount {
    amount_minor: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRefund {
    payment_id: String,
    amount_minor: Option<i64>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    let body = if body.is_empty() { b"{}" } else { body };
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            &e.to_string(),
        )
    })
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Injected latency and failures (the faults in force when the request arrives), then the
/// idempotent execution of `run`, then the injected answer delay (read once handling is done).
/// The first answer under a key is stored (whatever its status) and replayed for the same
/// request; the same key on a different request is a 422. `run` and the storing of its answer
/// happen under the state lock, before any answer delay, so two concurrent calls with one key
/// cannot both run and a retry during the delay gets the stored answer.
async fn idempotent(
    sandbox: &Sandbox,
    headers: &HeaderMap,
    fingerprint: String,
    run: impl FnOnce(&mut Inner, Option<&str>) -> Answer,
) -> Response {
    let faults = sandbox.faults();
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    let fail =
        faults.failure_percent > 0 && rand::rng().random_range(0..100u8) < faults.failure_percent;
    if fail {
        return reply(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "injected_failure",
            "injected failure; retry",
        ));
    }
    let resp = handle(sandbox, headers, fingerprint, run);
    let answer_delay = sandbox.faults().answer_delay;
    if !answer_delay.is_zero() {
        // The work is done and stored: a caller that gives up now has been charged.
        tokio::time::sleep(answer_delay).await;
    }
    resp
}

/// The replay or the execution of `run`, and the storing of its answer, all under one hold of
/// the state lock.
fn handle(
    sandbox: &Sandbox,
    headers: &HeaderMap,
    fingerprint: String,
    run: impl FnOnce(&mut Inner, Option<&str>) -> Answer,
) -> Response {
    let key = idempotency_key(headers);
    let mut inner = sandbox.lock();
    if let Some(k) = &key
        && let Some((fp, status, body)) = inner.answers.get(k)
    {
        if *fp != fingerprint {
            return reply(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this key was used for a different request",
            ));
        }
        let mut resp = reply((
            StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
            body.clone(),
        ));
        resp.headers_mut().insert(
            "idempotent-replayed",
            "true".parse().expect("static header"),
        );
        return resp;
    }
    let recorded = inner.ledger.len();
    let (status, body) = run(&mut inner, key.as_deref());
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    for entry in &mut inner.ledger[recorded..] {
        entry.traceparent.clone_from(&traceparent);
    }
    // A 503 is a fault, not an answer: the retry must run again.
    if let Some(k) = key
        && status != StatusCode::SERVICE_UNAVAILABLE
    {
        inner
            .answers
            .insert(k, (fingerprint, status.as_u16(), body.clone()));
    }
    reply((status, body))
}

fn fingerprint(route: &str, body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<Value>(body)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    format!("{route}\n{canonical}")
}

fn record(inner: &mut Inner, kind: &str, p: &Payment, amount: i64, key: Option<&str>) {
    inner.ledger.push(LedgerEntry {
        kind: kind.into(),
        payment_id: p.id.clone(),
        amount_minor: amount,
        currency: p.currency.clone(),
        idempotency_key: key.map(str::to_owned),
        traceparent: None,
    });
}

fn payment_json(p: &Payment) -> Value {
    serde_json::to_value(p).expect("plain data serialises")
}

async fn create_payment(State(s): State<Sandbox>, headers: HeaderMap, body: Bytes) -> Response {
    s.lock().payment_calls += 1;
    let req: CreatePayment = match parse(&body) {
        Ok(r) => r,
        Err(e) => return reply(e),
    };
    if req.payment_method == "pm_card_timeout" {
        // Never answers: the caller's timeout is what ends the call.
        std::future::pending::<()>().await;
    }
    let fp = fingerprint("POST /v1/payments", &body);
    idempotent(&s, &headers, fp, |inner, key| {
        if req.amount_minor <= 0 || req.currency.len() != 3 {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "amount_minor must be positive and currency a 3-letter code",
            );
        }
        match req.payment_method.as_str() {
            "pm_card_visa" => {}
            "pm_card_flaky" => {
                let seen = inner.flaky.entry(key.unwrap_or("").to_owned()).or_insert(0);
                *seen += 1;
                if *seen <= FLAKY_FAILURES {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "processor_unavailable",
                        "try again",
                    );
                }
            }
            "pm_card_declined" => {
                return error(StatusCode::PAYMENT_REQUIRED, "card_declined", "declined");
            }
            "pm_card_insufficient_funds" => {
                return error(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_funds",
                    "insufficient funds",
                );
            }
            _ => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_payment_method",
                    "use a pm_card_* test payment method",
                );
            }
        }
        let mut p = Payment {
            id: format!("pay_{}", uuid::Uuid::now_v7().simple()),
            status: "authorized",
            amount_minor: req.amount_minor,
            currency: req.currency.to_ascii_uppercase(),
            payment_method: req.payment_method.clone(),
            captured_minor: 0,
            refunded_minor: 0,
        };
        record(inner, "authorization", &p, p.amount_minor, key);
        if req.capture {
            p.status = "captured";
            p.captured_minor = p.amount_minor;
            record(inner, "capture", &p, p.amount_minor, key);
        }
        let body = payment_json(&p);
        inner.payments.insert(p.id.clone(), p);
        (StatusCode::CREATED, body)
    })
    .await
}

async fn get_payment(State(s): State<Sandbox>, Path(id): Path<String>) -> Response {
    match s.lock().payments.get(&id) {
        Some(p) => reply((StatusCode::OK, payment_json(p))),
        None => reply(error(StatusCode::NOT_FOUND, "not_found", "no such payment")),
    }
}

async fn capture(
    State(s): State<Sandbox>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: Amount = match parse(&body) {
        Ok(r) => r,
        Err(e) => return reply(e),
    };
    let fp = fingerprint(&format!("POST /v1/payments/{id}/capture"), &body);
    idempotent(&s, &headers, fp, |inner, key| {
        let Some(p) = inner.payments.get(&id).cloned() else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such payment");
        };
        if p.status != "authorized" {
            return error(StatusCode::CONFLICT, "invalid_state", p.status);
        }
        let amount = req.amount_minor.unwrap_or(p.amount_minor);
        if amount <= 0 || amount > p.amount_minor {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_amount",
                "capture between 1 and the authorized amount",
            );
        }
        let p = Payment {
            status: "captured",
            captured_minor: amount,
            ..p
        };
        record(inner, "capture", &p, amount, key);
        let body = payment_json(&p);
        inner.payments.insert(p.id.clone(), p);
        (StatusCode::OK, body)
    })
    .await
}

async fn void(State(s): State<Sandbox>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let fp = fingerprint(&format!("POST /v1/payments/{id}/void"), b"");
    idempotent(&s, &headers, fp, |inner, key| {
        let Some(p) = inner.payments.get(&id).cloned() else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such payment");
        };
        if p.status != "authorized" {
            return error(StatusCode::CONFLICT, "invalid_state", p.status);
        }
        let p = Payment {
            status: "voided",
            ..p
        };
        record(inner, "void", &p, p.amount_minor, key);
        let body = payment_json(&p);
        inner.payments.insert(p.id.clone(), p);
        (StatusCode::OK, body)
    })
    .await
}

async fn refund(State(s): State<Sandbox>, headers: HeaderMap, body: Bytes) -> Response {
    let req: CreateRefund = match parse(&body) {
        Ok(r) => r,
        Err(e) => return reply(e),
    };
    let fp = fingerprint("POST /v1/refunds", &body);
    idempotent(&s, &headers, fp, |inner, key| {
        let Some(p) = inner.payments.get(&req.payment_id).cloned() else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such payment");
        };
        let refundable = p.captured_minor - p.refunded_minor;
        let amount = req.amount_minor.unwrap_or(refundable);
        if p.captured_minor == 0 || amount <= 0 || amount > refundable {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_amount",
                "refund between 1 and what is captured and not yet refunded",
            );
        }
        let refunded = p.refunded_minor + amount;
        let p = Payment {
            refunded_minor: refunded,
            status: if refunded == p.captured_minor {
                "refunded"
            } else {
                p.status
            },
            ..p
        };
        record(inner, "refund", &p, amount, key);
        let id = format!("re_{}", uuid::Uuid::now_v7().simple());
        let body = json!({"id": id, "payment_id": p.id, "amount_minor": amount,
                          "currency": p.currency});
        inner.payments.insert(p.id.clone(), p);
        (StatusCode::CREATED, body)
    })
    .await
}

async fn ledger(State(s): State<Sandbox>) -> Response {
    let entries = s.ledger();
    reply((StatusCode::OK, json!({"entries": entries})))
}

async fn get_faults(State(s): State<Sandbox>) -> Response {
    let body = serde_json::to_value(FaultsJson::from(s.faults())).expect("plain data serialises");
    reply((StatusCode::OK, body))
}

/// Replaces the faults. Never subject to them: tests must be able to lift them.
async fn set_faults(State(s): State<Sandbox>, body: Bytes) -> Response {
    let body = if body.is_empty() { &b"{}"[..] } else { &body };
    let faults = match serde_json::from_slice::<FaultsJson>(body) {
        Ok(f) if f.failure_percent <= 100 => f,
        Ok(_) => {
            return reply(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "failure_percent must be between 0 and 100",
            ));
        }
        Err(e) => {
            return reply(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &e.to_string(),
            ));
        }
    };
    s.set_faults(faults.into());
    get_faults(State(s)).await
}
