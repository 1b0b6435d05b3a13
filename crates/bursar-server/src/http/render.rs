//! Records → wire types, and the success responses that carry them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bursar_api as api;
use bursar_domain::{OrderStatus, Timestamp};
use bursar_storage::{Customer, Order, StoredResponse};
use serde::Serialize;

/// RFC 3339 in UTC with milliseconds: `2026-03-25T09:14:07.123Z`.
pub fn time(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

pub fn customer(c: &Customer) -> api::Customer {
    api::Customer {
        id: c.id,
        object: "customer".into(),
        name: c.name.clone(),
        email: c.email.clone(),
        metadata: c.metadata.as_map().clone(),
        version: c.version,
        created_at: time(c.created_at),
        updated_at: time(c.updated_at),
    }
}

fn status(s: OrderStatus) -> api::OrderStatus {
    match s {
        OrderStatus::Pending => api::OrderStatus::Pending,
        OrderStatus::Paid => api::OrderStatus::Paid,
        OrderStatus::Refunded => api::OrderStatus::Refunded,
        OrderStatus::Canceled => api::OrderStatus::Canceled,
    }
}

pub fn order(o: &Order) -> api::Order {
    api::Order {
        id: o.id,
        object: "order".into(),
        customer_id: o.customer_id,
        amount: api::Amount::number(&o.amount.to_decimal_string())
            .expect("a decimal string with digits and one dot is a JSON number"),
        amount_minor: o.amount.minor,
        currency: o.amount.currency.code().to_owned(),
        status: status(o.status),
        description: o.description.clone(),
        metadata: o.metadata.as_map().clone(),
        version: o.version,
        created_at: time(o.created_at),
        updated_at: time(o.updated_at),
    }
}

/// The strong entity tag of a version: `"7"`.
pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits and quotes are valid")
}

/// 200 (or `status`) with the body and its `ETag`.
pub fn with_etag<T: Serialize>(status: StatusCode, version: i64, body: &T) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::ETAG, etag(version));
    resp
}

/// 201 with `Location` and `ETag`.
pub fn created<T: Serialize>(location: String, version: i64, body: &T) -> Response {
    let mut resp = with_etag(StatusCode::CREATED, version, body);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A 201 as an idempotent create stores it (and first sends it): the same status, headers
/// and bytes as [`created`].
pub fn created_stored<T: Serialize>(location: String, version: i64, body: &T) -> StoredResponse {
    let etag = format!("\"{version}\"");
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("etag".into(), etag),
            ("location".into(), location),
        ],
        body: serde_json::to_vec(body).expect("wire types always serialise"),
    }
}

/// 304 for a GET whose `If-None-Match` matched.
pub fn not_modified(version: i64) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    resp.headers_mut().insert(header::ETAG, etag(version));
    resp
}
