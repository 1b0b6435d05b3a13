//! Order use cases.

use std::sync::Arc;

use axum::response::Response;
use bursar_api::{CreateOrder, UpdateOrder};
use bursar_domain::{Currency, OrderAction, Timestamp};
use bursar_storage::{
    IdempotencyClaim, Idempotent, NewOrder, Order, OrderFilter, OrderPatch, OrderResponder, Page,
    StorageError, StoredResponse,
};

use super::{Call, check_metadata, check_text, finish, resolve_precondition};
use crate::FaultPoint;
use crate::http::context::error_body;
use crate::http::error::{ApiError, issue};
use crate::http::extract::IfMatch;
use crate::http::{idempotency, render};

const DESCRIPTION_MAX: usize = 1000;

fn not_found(e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound => ApiError::not_found("order"),
        other => other.into(),
    }
}

/// The route template idempotency records and fingerprints name.
pub const CREATE_ROUTE: &str = "/api/orders";

/// Checks a create request and turns it into the storage input, reporting every bad field.
/// Failures here happen before any work, so they are never stored under an idempotency key.
fn validate(req: CreateOrder) -> Result<NewOrder, ApiError> {
    let mut issues = Vec::new();
    let currency = Currency::from_code(&req.currency.to_ascii_uppercase());
    if currency.is_none() {
        issues.push(issue(
            "currency",
            "unsupported_currency",
            format!(
                "{:?} is not a supported ISO 4217 currency code",
                req.currency
            ),
        ));
    }
    let amount = match currency {
        Some(c) => super::parse_amount("amount", &req.amount, c)
            .map_err(|i| issues.push(i))
            .ok(),
        // Without a currency the allowed decimals are unknown: only the shape is checked,
        // and the currency issue is reported.
        None => {
            if req.amount.text().is_none() {
                issues.push(super::amount_shape_issue("amount"));
            }
            None
        }
    };
    check_text(
        &mut issues,
        "description",
        &req.description,
        DESCRIPTION_MAX,
    );
    let metadata = check_metadata(&mut issues, req.metadata);
    finish(issues)?;
    Ok(NewOrder {
        customer_id: req.customer_id,
        amount: amount.expect("validated above"),
        description: req.description,
        metadata: metadata.unwrap_or_default(),
    })
}

pub async fn create(call: &Call, req: CreateOrder) -> Result<Order, ApiError> {
    let new = validate(req)?;
    Ok(call
        .state
        .store
        .create_order(&call.write_meta(), new)
        .await?)
}

/// A create under an `Idempotency-Key`: the first request runs and its response is stored in
/// the same transaction; a retry of the same request gets that response again (replayed); the
/// same key on a different request is a 422. `body` and `query` are what is fingerprinted.
pub async fn create_idempotent(
    call: &Call,
    key: String,
    query: Option<&str>,
    body: &[u8],
    req: CreateOrder,
) -> Result<Response, ApiError> {
    let new = validate(req)?;
    let fingerprint = idempotency::fingerprint("POST", CREATE_ROUTE, query, body);
    let meta = call.write_meta();
    let store = &call.state.store;
    let replays = &call.state.replays;
    // A replay of a record this instance has seen is answered from memory. Anything else
    // goes to the write path, which claims the key or reports the record holding it: a read
    // first would cost every fresh create a round trip.
    if let Some(record) = replays.get(meta.account_id, &key, meta.at) {
        return idempotency::answer_existing(&record, &fingerprint, meta.at);
    }
    let retention =
        i64::try_from(call.state.config.idempotency.retention().as_millis()).unwrap_or(i64::MAX);
    let claim_key = key.clone();
    let claim = IdempotencyClaim {
        key,
        method: "POST".into(),
        route: CREATE_ROUTE.into(),
        fingerprint: fingerprint.clone(),
        expires_at: Timestamp(meta.at.0.saturating_add(retention)),
    };
    let info = call.info.clone();
    let state = call.state.clone();
    // What is stored: the 201, or the deterministic 422 for a customer of another account.
    // Anything else (the database failing) rolls back, so the request can be retried. It runs
    // inside the write's transaction, possibly on the group-commit writer's task.
    let respond: OrderResponder =
        Arc::new(
            move |outcome: Result<&Order, &StorageError>| match outcome {
                Ok(o) => {
                    state.crash_if(FaultPoint::MidTransaction);
                    Some(render::created_stored(
                        format!("/api/orders/{}", o.id),
                        o.version,
                        &render::order(o),
                    ))
                }
                Err(StorageError::UnknownCustomer) => {
                    let err = ApiError::from(StorageError::UnknownCustomer);
                    let (content_type, body) = error_body(&err, &info);
                    Some(StoredResponse {
                        status: err.status().as_u16(),
                        headers: vec![("content-type".into(), content_type.into())],
                        body,
                    })
                }
                Err(_) => None,
            },
        );
    match store
        .create_order_idempotent(&meta, &claim, new, respond)
        .await?
    {
        Idempotent::Fresh(stored) => {
            call.state.crash_if(FaultPoint::AfterCommit);
            Ok(idempotency::from_stored(&stored, false))
        }
        Idempotent::Existing(record) => {
            // Only finished records are immutable, hence cacheable.
            if record.in_flight.is_none() {
                replays.insert(meta.account_id, claim_key, Arc::new(record.clone()));
            }
            idempotency::answer_existing(&record, &fingerprint, meta.at)
        }
    }
}

/// The order's version, `None` if it does not exist here; a database failure stays an error
/// (it must not turn into a 404).
async fn current_version(call: &Call, id: i64) -> Result<Option<i64>, ApiError> {
    let current = call.state.store.get_order(call.auth.account_id, id).await?;
    Ok(current.map(|o| o.version))
}

pub async fn get(call: &Call, id: i64) -> Result<Order, ApiError> {
    call.state
        .store
        .get_order(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))
}

pub async fn list(call: &Call, filter: OrderFilter) -> Result<Page<Order>, ApiError> {
    Ok(call
        .state
        .store
        .list_orders(call.auth.account_id, filter)
        .await?)
}

pub async fn update(
    call: &Call,
    id: i64,
    if_match: IfMatch,
    req: UpdateOrder,
) -> Result<Order, ApiError> {
    let mut issues = Vec::new();
    check_text(
        &mut issues,
        "description",
        &req.description,
        DESCRIPTION_MAX,
    );
    let metadata = check_metadata(&mut issues, req.metadata);
    finish(issues)?;
    let expected = resolve_precondition(if_match, req.version, "order", || async {
        current_version(call, id).await
    })
    .await?;
    let patch = OrderPatch {
        description: req.description,
        metadata,
    };
    call.state
        .store
        .update_order(&call.write_meta(), id, expected, patch)
        .await
        .map_err(not_found)
}

/// Cancels a pending order. `If-Match` is optional here: the state machine already refuses a
/// second cancel, but a client that sends one gets the same compare-and-set as an update.
pub async fn cancel(call: &Call, id: i64, if_match: IfMatch) -> Result<Order, ApiError> {
    let expected = match if_match {
        IfMatch::Absent => bursar_storage::Precondition::Any,
        other => {
            resolve_precondition(other, None, "order", || async {
                current_version(call, id).await
            })
            .await?
        }
    };
    call.state
        .store
        .transition_order(&call.write_meta(), id, expected, OrderAction::Cancel)
        .await
        .map_err(not_found)
}
