//! Idempotent work that leaves the database, driven in atomic phases (spec `idempotency.md`
//! §1 "External calls", §3.4, checklist E27–E29). The storage half — recovery points, the
//! fenced lease, the completer's claim — is `bursar_storage::operations`; this is the driver.
//!
//! An [`Operation`] (a payment, later) is a route plus a `phase` function: given the
//! recovery point the work stands at and the state the earlier phases committed, it does one
//! foreign call (with the outbound key, so reruns never repeat it at the third party) and
//! says where the work moves next, or what the final answer is. The driver commits each step
//! under the lease's fencing token. Whoever holds the lease drives: the first request, a
//! retry that finds the lease lapsed, or the completer.
//!
//! Registering an operation mounts `POST <route>`: validation first (nothing stored for a bad
//! request), then the claim, then the phases on a task of their own, so a client that hangs
//! up or a request timeout does not abandon the work half-way.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use axum::response::Response;
use bursar_api::ErrorCode;
use bursar_domain::{AccountId, Timestamp};
use bursar_storage::operations::{FirstPhase, FirstStep, Prefetch, Prefetched, STARTED};
use bursar_storage::{
    Begun, IdempotencyClaim, Lease, LeasedOperation, Step, StepEnd, StorageError, StoredResponse,
    WriteMeta,
};
use serde_json::Value;

use super::Call;
use crate::AppState;
use crate::http::error::ApiError;
use crate::http::idempotency;

/// What a phase decided.
#[derive(Debug)]
pub enum Phase {
    /// Commit recovery point `to` with `state` (everything later phases need, e.g. the
    /// processor's charge id) and run the phase that starts there.
    Advance { to: String, state: Value },
    /// The final answer, stored and replayed from now on. Deterministic failures (a card
    /// decline) finish too: they are answers, not faults.
    Finish(StoredResponse),
    /// The phase already committed its end itself, inside the transaction of its own writes
    /// (a payment row and its ledger entry), with a [`PhaseCtx::finish_step`]: this is the
    /// answer it stored.
    Stored(StoredResponse),
    /// Like [`Phase::Stored`], for a phase that committed an [`PhaseCtx::advance_step`].
    Advanced { to: String, state: Value },
}

/// A phase that could not decide. The work stays unfinished at its last recovery point and
/// the lease is released, so the client's retry (or the completer) resumes it.
#[derive(Debug)]
pub enum PhaseError {
    /// A third party timed out, refused the connection or answered 5xx.
    Retryable(String),
    /// A storage command of the phase failed. `Fenced` means another driver took over;
    /// anything else leaves the lease to lapse, as the outcome of the write is unknown.
    Storage(StorageError),
}

impl From<StorageError> for PhaseError {
    fn from(e: StorageError) -> Self {
        PhaseError::Storage(e)
    }
}

/// What a phase may use. Built from the lease, so a rerun by another instance or the
/// completer sees exactly what the first run saw.
pub struct PhaseCtx {
    pub state: AppState,
    pub lease: Lease,
    pub account_id: AccountId,
    /// The request body as the client first sent it.
    pub request: Vec<u8>,
    pub request_id: String,
    pub trace_id: String,
    /// The originating request's trace flags; `01` (sampled) for a driver without the
    /// request, such as the completer (the record keeps the trace id, not the flags).
    pub trace_flags: String,
    /// Runs of this work so far, this one included.
    pub attempts: i64,
    /// What the claim read for the first phase ([`Operation::prefetch`]); a later driver
    /// has none and reads for itself.
    pub prefetched: Option<Box<Prefetched>>,
}

impl PhaseCtx {
    /// `bursar-<record id>`: the idempotency key for every call to a third party.
    pub fn outbound_key(&self) -> String {
        self.lease.outbound_key()
    }

    /// What a processor call carries: the outbound key, and the originating request's trace
    /// with a new parent-id for this call.
    pub fn outbound(&self) -> crate::processor::Outbound {
        crate::processor::Outbound {
            key: self.outbound_key(),
            traceparent: (self.trace_id.len() == 32)
                .then(|| crate::trace::child_traceparent(&self.trace_id, &self.trace_flags)),
        }
    }

    /// The step that finishes the work at `point` with `state`, for a storage command that
    /// commits it in its own transaction (then return [`Phase::Stored`]).
    pub fn finish_step(&self, point: &str, state: &Value) -> Step {
        let now = self.state.clock.now();
        Step {
            lease: self.lease,
            from: point.to_owned(),
            state: state_text(state),
            now,
            end: StepEnd::Finish {
                expires_at: retention_end(&self.state, now),
            },
        }
    }

    /// The step that moves the work from `point` to `to` (then return [`Phase::Advanced`]).
    pub fn advance_step(&self, point: &str, to: &str, state: &Value) -> Step {
        let now = self.state.clock.now();
        Step {
            lease: self.lease,
            from: point.to_owned(),
            state: state_text(state),
            now,
            end: StepEnd::Advance {
                to: to.to_owned(),
                lease_until: lease_end(&self.state, now),
            },
        }
    }

    /// A stored error answer in the envelope, attributed to the originating request. (The
    /// client's `Accept` is not known to a later driver, so it is always the JSON envelope.)
    pub fn error_response(&self, err: &ApiError) -> StoredResponse {
        stored_error(&self.request_id, &self.trace_id, err)
    }

    /// Metadata for writes made by a phase: attributed to the originating request.
    pub fn write_meta(&self) -> WriteMeta {
        WriteMeta {
            account_id: self.account_id,
            at: self.state.clock.now(),
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
        }
    }
}

/// [`PhaseCtx::error_response`] for a responder that outlives the context.
pub fn stored_error(request_id: &str, trace_id: &str, err: &ApiError) -> StoredResponse {
    let body = crate::http::context::envelope(err, request_id, trace_id, 0);
    StoredResponse {
        status: err.status().as_u16(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(&body).expect("error bodies are plain data"),
    }
}

/// A kind of work that leaves the database. Phases must be bounded well within the lease
/// (their foreign calls carry timeouts), or another driver takes over mid-call — harmless
/// thanks to the outbound key and fencing, but wasted work.
#[async_trait]
pub trait Operation: Send + Sync + 'static {
    /// The route template it serves (`/api/payments`); records are matched to it by route.
    fn route(&self) -> &'static str;
    /// Checks the request before anything is stored (failures here are never replayed).
    fn validate(&self, body: &[u8]) -> Result<(), ApiError>;
    /// The request as stored, fingerprinted and handed to the phases, from the route's path
    /// parameters and the body. By default the validated body; an operation whose route
    /// names a resource (`/api/payments/{id}/capture`) folds the id in, so the stored
    /// request says everything a later driver needs.
    fn prepare(&self, params: &[(String, String)], body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let _ = params;
        self.validate(body)?;
        Ok(body.to_vec())
    }
    /// A record the first phase reads, for the store to read along with the claim (one wait
    /// instead of two). The phase finds it in [`PhaseCtx::prefetched`].
    fn prefetch(&self, request: &[u8]) -> Option<Prefetch> {
        let _ = request;
        None
    }
    /// The step the first phase would write, decided without waiting on anything (from the
    /// request and [`PhaseCtx::prefetched`]), for the store to write with the claim (ADR
    /// 0007). `None` leaves the first phase to run as usual; so does a step the store
    /// refuses. Called only for work at [`STARTED`], and only if
    /// [`Operation::decides_first_step`].
    fn first_step(&self, ctx: &PhaseCtx) -> Option<FirstStep> {
        let _ = ctx;
        None
    }
    /// Whether [`Operation::first_step`] may decide anything: the claim then carries it.
    fn decides_first_step(&self) -> bool {
        false
    }
    /// Runs the phase that starts at `point` ([`bursar_storage::operations::STARTED`] first).
    async fn phase(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> Result<Phase, PhaseError>;
    /// The final answer stored when the completer gives up after `max_attempts` runs.
    fn abandoned(&self, ctx: &PhaseCtx, point: &str, state: &Value) -> StoredResponse;
}

/// The operations a server runs, by route.
#[derive(Default, Clone)]
pub struct Operations(BTreeMap<&'static str, Arc<dyn Operation>>);

impl Operations {
    /// Payments, captures, cancels, refunds, quotes and conversions: what a server runs.
    pub fn money() -> Operations {
        let mut ops = Operations::default();
        super::money::register(&mut ops);
        ops
    }

    pub fn register(&mut self, op: Arc<dyn Operation>) {
        self.0.insert(op.route(), op);
    }

    pub fn get(&self, route: &str) -> Option<&Arc<dyn Operation>> {
        self.0.get(route)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Operation>> {
        self.0.values()
    }
}

/// How a run of the driver ended.
#[derive(Debug)]
pub enum Driven {
    /// The work finished (now or by this run) with this answer.
    Finished(StoredResponse),
    /// Another driver took the lease over; the record says what happened.
    Fenced,
    /// A phase failed in a retryable way; the work waits for a retry or the completer.
    Paused(String),
}

/// The committed phase state; `{}` if the stored text is not JSON (it always is, as the
/// driver writes it), so every phase sees an object.
fn state_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::Object(Default::default()))
}

fn state_text(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value always serialises")
}

fn lease_end(state: &AppState, now: Timestamp) -> Timestamp {
    let lease = i64::try_from(state.config.idempotency.lease().as_millis()).unwrap_or(i64::MAX);
    Timestamp(now.0.saturating_add(lease))
}

fn retention_end(state: &AppState, now: Timestamp) -> Timestamp {
    let keep = i64::try_from(state.config.idempotency.retention().as_millis()).unwrap_or(i64::MAX);
    Timestamp(now.0.saturating_add(keep))
}

/// Trace flags for a driver that has no request of its own.
const SAMPLED: &str = "01";

fn ctx_for(state: &AppState, op: &LeasedOperation, trace_flags: &str) -> PhaseCtx {
    PhaseCtx {
        state: state.clone(),
        lease: op.lease,
        account_id: op.account_id,
        request: op.request.clone(),
        request_id: op.request_id.clone(),
        trace_id: op.trace_id.clone(),
        trace_flags: trace_flags.to_owned(),
        attempts: op.attempts,
        prefetched: op.prefetched.clone(),
    }
}

/// Runs `leased` from its recovery point to the end, committing each phase under the lease.
/// A storage failure leaves the lease to lapse (the outcome of the last write is unknown).
pub async fn drive(
    state: &AppState,
    op: &dyn Operation,
    leased: LeasedOperation,
    trace_flags: &str,
) -> Result<Driven, StorageError> {
    let ctx = ctx_for(state, &leased, trace_flags);
    let store = &state.store;
    let mut point = leased.recovery_point;
    let mut current = state_value(&leased.state);
    loop {
        let step = op.phase(&ctx, &point, &current).await;
        let now = state.clock.now();
        let failed = match step {
            Ok(Phase::Advance { to, state: next }) => {
                let written = store
                    .advance_operation(
                        ctx.lease,
                        &point,
                        &to,
                        &state_text(&next),
                        now,
                        lease_end(state, now),
                    )
                    .await;
                match written {
                    Ok(()) => {
                        point = to;
                        current = next;
                        continue;
                    }
                    Err(e) => e,
                }
            }
            Ok(Phase::Finish(response)) => {
                let written = store
                    .finish_operation(
                        ctx.lease,
                        &state_text(&current),
                        &response,
                        now,
                        retention_end(state, now),
                    )
                    .await;
                match written {
                    Ok(()) => return Ok(Driven::Finished(response)),
                    Err(e) => e,
                }
            }
            Ok(Phase::Stored(response)) => return Ok(Driven::Finished(response)),
            Ok(Phase::Advanced { to, state: next }) => {
                point = to;
                current = next;
                continue;
            }
            Err(PhaseError::Storage(e)) => e,
            Err(PhaseError::Retryable(why)) => {
                tracing::warn!(record = ctx.lease.record_id, point = %point, reason = %why,
                    "phase failed; the work waits for a retry");
                match store.release_operation(ctx.lease, now).await {
                    Ok(()) => return Ok(Driven::Paused(why)),
                    Err(e) => e,
                }
            }
        };
        return match failed {
            StorageError::Fenced => Ok(Driven::Fenced),
            e => Err(e),
        };
    }
}

/// Serves `POST <op.route()>`: claims the key (or mints one, so the work is recoverable
/// even without a client key), then drives or answers from the record.
pub async fn run(
    call: &Call,
    op: Arc<dyn Operation>,
    key: Option<String>,
    query: Option<&str>,
    params: &[(String, String)],
    body: &[u8],
) -> Result<Response, ApiError> {
    let request = op.prepare(params, body)?;
    let body = request.as_slice();
    let route = op.route();
    let config = &call.state.config.idempotency;
    let key = match key {
        Some(k) => k,
        None if config.requires("POST", route) => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyMissing,
                format!("POST {route} requires an Idempotency-Key header on this server."),
            ));
        }
        // Not addressable by the client, but the work can still be completed after a crash.
        None => format!("bursar-auto-{}", uuid::Uuid::now_v7()),
    };
    let fingerprint = idempotency::fingerprint("POST", route, query, body);
    let meta = call.write_meta();
    let state = &call.state;
    if let Some(record) = state.replays.get(meta.account_id, &key, meta.at) {
        return idempotency::answer_existing(&record, &fingerprint, meta.at);
    }
    let claim = IdempotencyClaim {
        key: key.clone(),
        method: "POST".into(),
        route: route.into(),
        fingerprint: fingerprint.clone(),
        expires_at: retention_end(state, meta.at),
    };
    let first: Option<FirstPhase> = op.decides_first_step().then(|| {
        let (state, op, flags) = (state.clone(), op.clone(), call.info.trace.flags.clone());
        Arc::new(move |leased: &LeasedOperation| {
            (leased.recovery_point == STARTED)
                .then(|| op.first_step(&ctx_for(&state, leased, &flags)))
                .flatten()
        }) as FirstPhase
    });
    let begun = state
        .store
        .begin_operation(
            &meta,
            &claim,
            body,
            lease_end(state, meta.at),
            op.prefetch(body),
            first,
        )
        .await?;
    let leased = match begun {
        Begun::Existing(record) => {
            if record.in_flight.is_none() {
                state
                    .replays
                    .insert(meta.account_id, key, Arc::new(record.clone()));
            }
            return idempotency::answer_existing(&record, &fingerprint, meta.at);
        }
        Begun::Leased(leased) => leased,
    };
    // The phases run on their own task: the work must not stop because the client left.
    let task = {
        let state = state.clone();
        let flags = call.info.trace.flags.clone();
        tokio::spawn(async move { drive(&state, op.as_ref(), leased, &flags).await })
    };
    let driven = task.await.map_err(|e| {
        // A phase panicked: like a crash, the lease is left to lapse and the work resumes.
        ApiError::internal(format!("operation task failed: {e}"))
    })??;
    match driven {
        Driven::Finished(response) => Ok(idempotency::from_stored(&response, false)),
        Driven::Paused(_) => {
            let mut e = ApiError::new(
                ErrorCode::ServiceUnavailable,
                "A downstream service did not complete the request; retry with the same \
                 Idempotency-Key to resume it.",
            );
            e.retry_after = Some(1);
            Err(e)
        }
        // Someone else finished or holds the work: answer from the record, as a retry would.
        Driven::Fenced => {
            let now = state.clock.now();
            match state
                .store
                .find_idempotency(meta.account_id, &key, now)
                .await?
            {
                Some(record) => idempotency::answer_existing(&record, &fingerprint, now),
                None => Err(ApiError::internal("an operation's record vanished")),
            }
        }
    }
}

/// One pass of the completer: takes over abandoned work (lease lapsed, idle for
/// `completer_idle_secs`) in a batch and drives each to the end; work that has run
/// `max_attempts` times is given up with its operation's final answer. Returns how many
/// records it finished.
pub async fn complete_abandoned(state: &AppState, limit: u32) -> Result<usize, StorageError> {
    let config = &state.config.idempotency;
    let now = state.clock.now();
    let idle = i64::try_from(config.completer_idle().as_millis()).unwrap_or(i64::MAX);
    let claimed = state
        .store
        .claim_abandoned(
            now,
            Timestamp(now.0.saturating_sub(idle)),
            lease_end(state, now),
            limit,
        )
        .await?;
    let mut finished = 0;
    for leased in claimed {
        let record = leased.lease.record_id;
        let Some(op) = state.operations.get(&leased.route).cloned() else {
            // Work of an operation this build does not know: leave it to one that does.
            tracing::warn!(record, route = %leased.route, "no operation for abandoned work");
            state.store.release_operation(leased.lease, now).await?;
            continue;
        };
        if leased.attempts > config.max_attempts {
            let ctx = ctx_for(state, &leased, SAMPLED);
            let current = state_value(&leased.state);
            let response = op.abandoned(&ctx, &leased.recovery_point, &current);
            tracing::warn!(
                record,
                attempts = leased.attempts,
                "giving abandoned work up"
            );
            match state
                .store
                .finish_operation(
                    leased.lease,
                    &leased.state,
                    &response,
                    now,
                    retention_end(state, now),
                )
                .await
            {
                Ok(()) => finished += 1,
                Err(StorageError::Fenced) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        match drive(state, op.as_ref(), leased, SAMPLED).await {
            Ok(Driven::Finished(_)) => finished += 1,
            Ok(Driven::Fenced | Driven::Paused(_)) => {}
            Err(e) => tracing::warn!(record, error = %e, "completer could not drive work"),
        }
    }
    Ok(finished)
}
