//! Records → wire types, and the success responses that carry them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bursar_api as api;
use bursar_domain::{OrderStatus, Timestamp};
use bursar_storage::{Customer, Order, StoredResponse, money};
use serde::Serialize;

/// RFC 3339 in UTC with milliseconds: `2026-03-25T09:14:07.123Z`.
pub fn time(t: Timestamp) -> String {
    t.rfc3339()
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
        amount: amount(o.amount.minor, o.amount.currency),
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

/// An amount that may be zero or negative (captured so far, a balance, a posting), with
/// exactly the currency's decimals.
pub fn amount(minor: i64, currency: bursar_domain::Currency) -> api::Amount {
    api::Amount::number(&bursar_domain::money::decimal_string(minor, currency))
        .expect("a signed decimal string is a JSON number")
}

/// A 200 as a phased operation stores it (a capture, a cancel): the same status, headers
/// and bytes as [`with_etag`].
pub fn ok_stored<T: Serialize>(version: i64, body: &T) -> StoredResponse {
    StoredResponse {
        status: StatusCode::OK.as_u16(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("etag".into(), format!("\"{version}\"")),
        ],
        body: serde_json::to_vec(body).expect("wire types always serialise"),
    }
}

pub fn payment(p: &money::Payment) -> api::Payment {
    let c = p.amount.currency;
    api::Payment {
        id: p.id,
        object: "payment".into(),
        order_id: p.order_id,
        amount: amount(p.amount.minor, c),
        amount_minor: p.amount.minor,
        currency: c.code().to_owned(),
        status: match p.status {
            money::PaymentStatus::RequiresCapture => api::PaymentStatus::RequiresCapture,
            money::PaymentStatus::Succeeded => api::PaymentStatus::Succeeded,
            money::PaymentStatus::Canceled => api::PaymentStatus::Canceled,
            money::PaymentStatus::Failed => api::PaymentStatus::Failed,
        },
        payment_method: p.payment_method.clone(),
        amount_captured: amount(p.captured_minor, c),
        amount_captured_minor: p.captured_minor,
        amount_refunded: amount(p.refunded_minor, c),
        amount_refunded_minor: p.refunded_minor,
        failure_code: p.failure_code.clone(),
        failure_message: p.failure_message.clone(),
        version: p.version,
        created_at: time(p.created_at),
        updated_at: time(p.updated_at),
    }
}

pub fn refund(r: &money::Refund) -> api::Refund {
    api::Refund {
        id: r.id,
        object: "refund".into(),
        payment_id: r.payment_id,
        amount: amount(r.amount.minor, r.amount.currency),
        amount_minor: r.amount.minor,
        currency: r.amount.currency.code().to_owned(),
        status: match r.status {
            money::RefundStatus::Pending => api::RefundStatus::Pending,
            money::RefundStatus::Succeeded => api::RefundStatus::Succeeded,
            money::RefundStatus::Failed => api::RefundStatus::Failed,
        },
        failure_code: r.failure_code.clone(),
        created_at: time(r.created_at),
        updated_at: time(r.updated_at),
    }
}

/// The ledger accounts of each currency, one object per currency (absent accounts are 0).
pub fn balances(all: &[money::Balance]) -> Vec<api::Balance> {
    use bursar_domain::ledger::LedgerAccount;
    let mut by_currency: std::collections::BTreeMap<&str, (bursar_domain::Currency, [i64; 4])> =
        std::collections::BTreeMap::new();
    for b in all {
        let slot = match b.ledger_account {
            LedgerAccount::Available => 0,
            LedgerAccount::Pending => 1,
            LedgerAccount::ProcessorClearing => 2,
            LedgerAccount::FxClearing => 3,
        };
        by_currency
            .entry(b.currency.code())
            .or_insert((b.currency, [0; 4]))
            .1[slot] = b.minor;
    }
    by_currency
        .into_values()
        .map(|(c, [available, pending, processor, fx])| api::Balance {
            object: "balance".into(),
            currency: c.code().to_owned(),
            available: amount(available, c),
            available_minor: available,
            pending: amount(pending, c),
            pending_minor: pending,
            processor_clearing: amount(processor, c),
            processor_clearing_minor: processor,
            fx_clearing: amount(fx, c),
            fx_clearing_minor: fx,
        })
        .collect()
}

pub fn ledger_entry(e: &money::JournalEntry) -> api::LedgerEntry {
    api::LedgerEntry {
        id: e.id,
        object: "ledger_entry".into(),
        kind: e.kind.as_str().to_owned(),
        reference_type: e.reference_type.clone(),
        reference_id: e.reference_id,
        postings: e
            .postings
            .iter()
            .map(|p| api::Posting {
                ledger_account: p.ledger_account.as_str().to_owned(),
                currency: p.currency.code().to_owned(),
                amount: amount(p.minor, p.currency),
                amount_minor: p.minor,
            })
            .collect(),
        created_at: time(e.created_at),
    }
}

pub fn rate(r: &money::FxRate) -> api::Rate {
    api::Rate {
        object: "rate".into(),
        base_currency: r.base.code().to_owned(),
        quote_currency: r.quote.code().to_owned(),
        rate: r.rate.clone(),
        set_at: time(r.set_at),
    }
}

pub fn quote(q: &money::Quote) -> api::Quote {
    api::Quote {
        id: q.id,
        object: "quote".into(),
        from_currency: q.from.currency.code().to_owned(),
        from_amount: amount(q.from.minor, q.from.currency),
        from_amount_minor: q.from.minor,
        to_currency: q.to.currency.code().to_owned(),
        to_amount: amount(q.to.minor, q.to.currency),
        to_amount_minor: q.to.minor,
        rate: q.rate.clone(),
        market_rate: q.market_rate.clone(),
        spread_bps: q.spread_bps,
        created_at: time(q.created_at),
        expires_at: time(q.expires_at),
        used: q.used_at.is_some(),
    }
}

pub fn conversion(c: &money::Conversion) -> api::Conversion {
    api::Conversion {
        id: c.id,
        object: "conversion".into(),
        quote_id: c.quote_id,
        from_currency: c.from.currency.code().to_owned(),
        from_amount: amount(c.from.minor, c.from.currency),
        from_amount_minor: c.from.minor,
        to_currency: c.to.currency.code().to_owned(),
        to_amount: amount(c.to.minor, c.to.currency),
        to_amount_minor: c.to.minor,
        rate: c.rate.clone(),
        created_at: time(c.created_at),
    }
}
