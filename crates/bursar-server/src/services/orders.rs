//! Order use cases.

use bursar_api::{CreateOrder, UpdateOrder};
use bursar_domain::{Currency, Money, OrderAction};
use bursar_storage::{NewOrder, Order, OrderFilter, OrderPatch, Page, StorageError};

use super::{Call, check_metadata, check_text, finish, resolve_precondition};
use crate::http::error::{ApiError, issue};
use crate::http::extract::IfMatch;

const DESCRIPTION_MAX: usize = 1000;

fn not_found(e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound => ApiError::not_found("order"),
        other => other.into(),
    }
}

pub async fn create(call: &Call<'_>, req: CreateOrder) -> Result<Order, ApiError> {
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
    let amount = match (req.amount.text(), currency) {
        (None, _) => {
            issues.push(issue(
                "amount",
                "invalid_amount",
                "must be a JSON number or a decimal string such as \"199.00\"",
            ));
            None
        }
        // Without a currency the allowed decimals are unknown; the currency issue is reported.
        (Some(_), None) => None,
        (Some(text), Some(c)) => match Money::parse(&text, c) {
            Ok(m) => Some(m),
            Err(e) => {
                let msg = match e {
                    bursar_domain::AmountError::TooManyDecimals => {
                        format!("{c} allows at most {} decimals", c.minor_units())
                    }
                    other => other.to_string(),
                };
                issues.push(issue("amount", e.code(), msg));
                None
            }
        },
    };
    check_text(
        &mut issues,
        "description",
        &req.description,
        DESCRIPTION_MAX,
    );
    let metadata = check_metadata(&mut issues, req.metadata);
    finish(issues)?;
    let new = NewOrder {
        customer_id: req.customer_id,
        amount: amount.expect("validated above"),
        description: req.description,
        metadata: metadata.unwrap_or_default(),
    };
    Ok(call
        .state
        .store
        .create_order(&call.write_meta(), new)
        .await?)
}

/// The order's version, `None` if it does not exist here; a database failure stays an error
/// (it must not turn into a 404).
async fn current_version(call: &Call<'_>, id: i64) -> Result<Option<i64>, ApiError> {
    let current = call.state.store.get_order(call.auth.account_id, id).await?;
    Ok(current.map(|o| o.version))
}

pub async fn get(call: &Call<'_>, id: i64) -> Result<Order, ApiError> {
    call.state
        .store
        .get_order(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("order"))
}

pub async fn list(call: &Call<'_>, filter: OrderFilter) -> Result<Page<Order>, ApiError> {
    Ok(call
        .state
        .store
        .list_orders(call.auth.account_id, filter)
        .await?)
}

pub async fn update(
    call: &Call<'_>,
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
pub async fn cancel(call: &Call<'_>, id: i64, if_match: IfMatch) -> Result<Order, ApiError> {
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
