//! The phase machinery for work that leaves the database (spec `idempotency.md` E27–E29),
//! driven through a test operation that charges an HTTP double of a payment processor. The
//! double honours its own `Idempotency-Key` and keeps a ledger, so "charged once" is read
//! from the third party's side, as it would be with a real processor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bursar_server::services::operations::{
    Operation, Operations, Phase, PhaseCtx, PhaseError, complete_abandoned,
};
use bursar_storage::StoredResponse;
use bursar_storage::operations::STARTED;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::harness::{ManualClock, TestApp, error_body};

const ROUTE: &str = "/api/test_charges";

/// The processor double: `POST /charges` with `Idempotency-Key`.
#[derive(Default)]
struct Processor {
    /// Charge id by idempotency key: the processor's ledger.
    charges: Mutex<HashMap<String, String>>,
    /// Every key it was called with, in order.
    calls: Mutex<Vec<String>>,
    /// Answer 503 to this many calls (before charging).
    fail_next: AtomicU32,
    /// Hold the response of the next call (after charging) until `release` is notified.
    stall_next: AtomicBool,
    release: Notify,
}

impl Processor {
    fn charge_count(&self) -> usize {
        self.charges.lock().unwrap().len()
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

async fn charge(
    State(p): State<Arc<Processor>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
    p.calls.lock().unwrap().push(key.clone());
    if p.fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let id = {
        let mut charges = p.charges.lock().unwrap();
        let n = charges.len();
        charges
            .entry(key)
            .or_insert_with(|| format!("ch_{n}"))
            .clone()
    };
    if p.stall_next.swap(false, Ordering::SeqCst) {
        p.release.notified().await;
    }
    Json(json!({"id": id, "amount": body["amount"]})).into_response()
}

async fn start_processor() -> (Arc<Processor>, String) {
    let p = Arc::new(Processor::default());
    let app = axum::Router::new()
        .route("/charges", axum::routing::post(charge))
        .with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (p, url)
}

/// A two-phase charge: `started` → (processor call) → `charged` → finish with a 201.
struct ChargeOp {
    processor: String,
    http: reqwest::Client,
    /// Abort the run right after the processor charged, before the recovery point commits:
    /// the in-process stand-in for `kill -9` at the worst moment.
    crash_after_charge: AtomicBool,
}

fn json_response(status: u16, body: Value) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(&body).unwrap(),
    }
}

#[async_trait]
impl Operation for ChargeOp {
    fn route(&self) -> &'static str {
        ROUTE
    }

    fn validate(&self, body: &[u8]) -> Result<(), bursar_server::http::error::ApiError> {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if v["amount"].is_string() {
            Ok(())
        } else {
            Err(bursar_server::http::error::ApiError::validation(vec![
                bursar_server::http::error::issue("amount", "required", "a decimal string"),
            ]))
        }
    }

    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError> {
        match point {
            STARTED => {
                let req: Value = serde_json::from_slice(&ctx.request).unwrap();
                let resp = self
                    .http
                    .post(format!("{}/charges", self.processor))
                    .header("idempotency-key", ctx.outbound_key())
                    .json(&json!({"amount": req["amount"]}))
                    .send()
                    .await
                    .map_err(|e| PhaseError::Retryable(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(PhaseError::Retryable(format!(
                        "processor {}",
                        resp.status()
                    )));
                }
                let charge: Value = resp.json().await.unwrap();
                if self.crash_after_charge.swap(false, Ordering::SeqCst) {
                    panic!("simulated crash after the processor charged");
                }
                Ok(Phase::Advance {
                    to: "charged".into(),
                    state: json!({"charge": charge["id"]}),
                })
            }
            "charged" => Ok(Phase::Finish(json_response(
                201,
                json!({
                    "record": ctx.lease.record_id,
                    "charge": state["charge"],
                    "finished_by_fence": ctx.lease.fence,
                }),
            ))),
            other => panic!("unknown recovery point {other}"),
        }
    }

    fn abandoned(&self, _ctx: &PhaseCtx, point: &str, _state: &Value) -> StoredResponse {
        json_response(502, json!({"error": "gave up", "point": point}))
    }
}

struct Rig {
    app: TestApp,
    clock: Arc<ManualClock>,
    processor: Arc<Processor>,
    op: Arc<ChargeOp>,
}

async fn rig(base: &TestApp, change: impl FnOnce(&mut bursar_server::Config)) -> Rig {
    let (processor, url) = start_processor().await;
    let op = Arc::new(ChargeOp {
        processor: url,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        crash_after_charge: AtomicBool::new(false),
    });
    let mut ops = Operations::default();
    ops.register(op.clone());
    let clock = ManualClock::new();
    // The background completer stays out of the way unless a test asks for it.
    let app = base
        .sibling_with(
            |c| {
                c.idempotency.completer_interval_secs = 3600;
                change(c);
            },
            clock.clone(),
            ops,
        )
        .await;
    Rig {
        app,
        clock,
        processor,
        op,
    }
}

async fn post(client: &bursar_sdk::Client, key: Option<&str>, amount: &str) -> reqwest::Response {
    let mut req = client
        .request(reqwest::Method::POST, ROUTE)
        .header("content-type", "application/json")
        .body(format!(r#"{{"amount":"{amount}"}}"#));
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req.send().await.unwrap()
}

async fn created(resp: reqwest::Response, replayed: bool) -> Value {
    assert_eq!(resp.status(), 201);
    assert_eq!(
        resp.headers().get("idempotent-replayed").is_some(),
        replayed,
        "replay marker"
    );
    resp.json().await.unwrap()
}

/// E27 + E28: the run dies after the processor charged; a retry inside the lease is told to
/// wait; after the lease it resumes with the same outbound key, and the processor (which
/// saw the key before) charges nothing new.
pub async fn a_crashed_run_resumes_after_its_lease_without_charging_twice(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    r.op.crash_after_charge.store(true, Ordering::SeqCst);
    error_body(
        post(&app.a, Some("pay-1"), "10.00").await,
        500,
        "internal_error",
    )
    .await;
    assert_eq!(r.processor.charge_count(), 1);
    let record = app
        .store
        .find_idempotency(app.account_a, "pay-1", r.clock_now())
        .await
        .unwrap()
        .expect("the claim committed before the foreign call");
    assert_eq!(r.processor.calls(), [format!("bursar-{}", record.id)]);

    // Inside the lease: 409 with Retry-After (the lease left, at most 90 s).
    let busy = post(&app.a, Some("pay-1"), "10.00").await;
    let wait: u64 = busy.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=90).contains(&wait), "{wait}");
    error_body(busy, 409, "idempotency_request_in_progress").await;
    // A different request under the key is a 422 even while the work is in flight.
    error_body(
        post(&app.a, Some("pay-1"), "11.00").await,
        422,
        "idempotency_key_reused",
    )
    .await;
    // Another account's key of the same name is unrelated work.
    let other = created(post(&app.b, Some("pay-1"), "10.00").await, false).await;
    assert_ne!(other["record"].as_i64(), Some(record.id));
    assert_eq!(r.processor.charge_count(), 2);

    // After the lease the retry resumes from `started`: the processor is called again with
    // the same key and answers with the original charge.
    r.clock.advance_secs(91);
    let done = created(post(&app.a, Some("pay-1"), "10.00").await, false).await;
    assert_eq!(done["record"].as_i64(), Some(record.id));
    assert_eq!(done["charge"], "ch_0");
    assert_eq!(done["finished_by_fence"], 2);
    let calls = r.processor.calls();
    let ours: Vec<_> = calls
        .iter()
        .filter(|k| **k == format!("bursar-{}", record.id))
        .collect();
    assert_eq!(
        ours.len(),
        2,
        "resumed with the same outbound key: {calls:?}"
    );
    assert_eq!(r.processor.charge_count(), 2, "no second charge");
    // From now on, a replay.
    let again = created(post(&app.a, Some("pay-1"), "10.00").await, true).await;
    assert_eq!(again, done);
    r.app.stop().await;
}

/// E28: nobody retries; the completer finishes the abandoned work on its own.
pub async fn the_completer_finishes_abandoned_work(base: &TestApp) {
    let r = rig(base, |c| {
        c.idempotency.completer_interval_secs = 1;
        c.idempotency.completer_idle_secs = 5;
    })
    .await;
    let app = &r.app;
    r.op.crash_after_charge.store(true, Ordering::SeqCst);
    error_body(
        post(&app.a, Some("pay-2"), "5.00").await,
        500,
        "internal_error",
    )
    .await;
    r.clock.advance_secs(120);
    let mut finished = None;
    for _ in 0..100 {
        let rec = app
            .store
            .find_idempotency(app.account_a, "pay-2", r.clock_now())
            .await
            .unwrap()
            .unwrap();
        if rec.in_flight.is_none() {
            finished = Some(rec);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rec = finished.expect("the completer finished the work within 10 s");
    assert_eq!(rec.response.status, 201);
    assert_eq!(r.processor.charge_count(), 1);
    assert_eq!(r.processor.calls().len(), 2);
    // The client comes back later: the completer's answer, replayed.
    let body = created(post(&app.a, Some("pay-2"), "5.00").await, true).await;
    assert_eq!(serde_json::to_vec(&body).unwrap(), rec.response.body);
    assert_eq!(body["charge"], "ch_0");
    r.app.stop().await;
}

/// E29: the first driver stalls past its lease, a retry takes over and finishes; when the
/// first wakes up its writes are refused and its client gets the winner's answer.
pub async fn a_stalled_driver_is_fenced_out(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    r.processor.stall_next.store(true, Ordering::SeqCst);
    let first = {
        let client = r.app.a.clone();
        tokio::spawn(async move {
            client
                .request(reqwest::Method::POST, ROUTE)
                .header("content-type", "application/json")
                .header("idempotency-key", "pay-3")
                .body(r#"{"amount":"7.00"}"#)
                .send()
                .await
                .unwrap()
        })
    };
    // Wait until the first run is inside the processor call.
    for _ in 0..100 {
        if !r.processor.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.processor.calls().len(), 1);
    r.clock.advance_secs(91);
    let second = created(post(&r.app.a, Some("pay-3"), "7.00").await, false).await;
    assert_eq!(second["finished_by_fence"], 2);
    r.processor.release.notify_one();
    let first = first.await.unwrap();
    let first = created(first, true).await;
    assert_eq!(
        first, second,
        "the stale driver's client gets the stored answer"
    );
    let rec = r
        .app
        .store
        .find_idempotency(r.app.account_a, "pay-3", r.clock_now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&rec.response.body).unwrap(),
        second
    );
    assert_eq!(r.processor.charge_count(), 1);
    r.app.stop().await;
}

/// A processor outage pauses the work (503, lease released); the retry resumes at once. A
/// bad request is refused before anything is claimed; a keyless request still runs under a
/// minted key. Work that keeps failing is given up after `max_attempts` runs with the
/// operation's final answer.
pub async fn retryable_failures_pause_and_give_up_in_the_end(base: &TestApp) {
    let r = rig(base, |c| c.idempotency.max_attempts = 2).await;
    let app = &r.app;
    error_body(
        app.a
            .request(reqwest::Method::POST, ROUTE)
            .header("content-type", "application/json")
            .header("idempotency-key", "pay-bad")
            .body(r#"{"amount":7}"#)
            .send()
            .await
            .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert!(r.processor.calls().is_empty());
    assert!(
        app.store
            .find_idempotency(app.account_a, "pay-bad", r.clock_now())
            .await
            .unwrap()
            .is_none()
    );

    r.processor.fail_next.store(1, Ordering::SeqCst);
    let paused = post(&app.a, Some("pay-4"), "3.00").await;
    assert_eq!(paused.headers()["retry-after"], "1");
    error_body(paused, 503, "service_unavailable").await;
    let done = created(post(&app.a, Some("pay-4"), "3.00").await, false).await;
    assert_eq!(done["finished_by_fence"], 2);
    assert_eq!(r.processor.charge_count(), 1);

    let keyless = created(post(&app.a, None, "1.00").await, false).await;
    assert_eq!(r.processor.charge_count(), 2);
    assert!(
        r.processor
            .calls()
            .contains(&format!("bursar-{}", keyless["record"]))
    );

    // The processor is down for good: the first run and one completer run fail, then the
    // completer gives the work up and stores the operation's final answer.
    r.processor.fail_next.store(1000, Ordering::SeqCst);
    error_body(
        post(&app.a, Some("pay-5"), "2.00").await,
        503,
        "service_unavailable",
    )
    .await;
    for expected_finished in [0, 1] {
        r.clock.advance_secs(60);
        assert_eq!(
            complete_abandoned(&app.state, 10).await.unwrap(),
            expected_finished
        );
    }
    let gave_up = post(&app.a, Some("pay-5"), "2.00").await;
    assert_eq!(gave_up.status(), 502);
    assert_eq!(gave_up.headers()["idempotent-replayed"], "true");
    let body: Value = gave_up.json().await.unwrap();
    assert_eq!(body["point"], STARTED);
    // Two runs called the processor; the third claim gave up without calling it.
    let rec = app
        .store
        .find_idempotency(app.account_a, "pay-5", r.clock_now())
        .await
        .unwrap()
        .unwrap();
    let key = format!("bursar-{}", rec.id);
    assert_eq!(r.processor.calls().iter().filter(|k| **k == key).count(), 2);
    r.app.stop().await;
}

impl Rig {
    fn clock_now(&self) -> bursar_domain::Timestamp {
        use bursar_domain::Clock;
        self.clock.now()
    }
}

/// A6/A7 end to end: a key is bound to its route and query. Used on `POST /api/orders`, the
/// same key on another route is a 422 naming the original; a changed behaviour-relevant query
/// on the same route is a 422 too.
pub async fn keys_are_bound_to_their_route_and_query(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    let c = app.customer(&app.a).await;
    let order = app
        .a
        .request(reqwest::Method::POST, "/api/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "shared-key")
        .body(format!(
            r#"{{"customer_id":{c},"amount":"1.00","currency":"USD"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);
    let v = error_body(
        post(&app.a, Some("shared-key"), "1.00").await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(
        (v["original_method"].as_str(), v["original_path"].as_str()),
        (Some("POST"), Some("/api/orders"))
    );
    assert!(r.processor.calls().is_empty(), "nothing ran");

    created(post(&app.a, Some("q-key"), "2.00").await, false).await;
    let with_query = app
        .a
        .request(reqwest::Method::POST, &format!("{ROUTE}?dry_run=true"))
        .header("content-type", "application/json")
        .header("idempotency-key", "q-key")
        .body(r#"{"amount":"2.00"}"#)
        .send()
        .await
        .unwrap();
    error_body(with_query, 422, "idempotency_key_reused").await;
    assert_eq!(r.processor.charge_count(), 1);
    r.app.stop().await;
}
