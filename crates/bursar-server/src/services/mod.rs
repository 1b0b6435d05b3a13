//! Use cases. A service validates wire input into domain values (collecting every field
//! problem), resolves preconditions, and calls exactly one atomic storage command.

pub mod accounts;
pub mod customers;
pub mod money;
pub mod operations;
pub mod orders;
pub mod product;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use bursar_api::{ErrorCode, FieldIssue};
use bursar_domain::{AmountError, Currency, Metadata, Money};
use bursar_storage::{Precondition, WriteMeta};
use std::collections::BTreeMap;

use crate::AppState;
use crate::http::context::RequestInfo;
use crate::http::error::{ApiError, issue};
use crate::http::extract::{Auth, IfMatch};

/// Everything a service needs to know about the call it serves. Handlers take it as one
/// extractor (authentication included; see `http::extract`).
pub struct Call {
    pub state: AppState,
    pub auth: Auth,
    pub info: Arc<RequestInfo>,
}

impl Call {
    pub fn write_meta(&self) -> WriteMeta {
        WriteMeta {
            account_id: self.auth.account_id,
            at: self.state.clock.now(),
            request_id: self.info.request_id.clone(),
            trace_id: self.info.trace.trace_id.clone(),
        }
    }
}

/// Turns `If-Match` / body `version` into the storage precondition (spec §3.7):
/// neither → 428 (404 if the resource does not exist, as normal checks come first);
/// a single strong tag → compare-and-set on it; several tags or only weak ones → compared
/// with the current version (a weak tag never matches, so it is a 412).
pub async fn resolve_precondition<F, Fut>(
    if_match: IfMatch,
    body_version: Option<i64>,
    what: &str,
    current_version: F,
) -> Result<Precondition, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<i64>, ApiError>>,
{
    let strong = match (if_match, body_version) {
        (IfMatch::Any, None) => return Ok(Precondition::Any),
        (IfMatch::Absent | IfMatch::Any, Some(v)) => return Ok(Precondition::Version(v)),
        (IfMatch::Tags { strong, .. }, Some(v)) => {
            if strong.as_slice() != [v] {
                return Err(ApiError::validation(vec![issue(
                    "version",
                    "conflicts_with_if_match",
                    "version in the body must equal the If-Match entity tag",
                )]));
            }
            return Ok(Precondition::Version(v));
        }
        (IfMatch::Tags { strong, .. }, None) if strong.len() == 1 => {
            return Ok(Precondition::Version(strong[0]));
        }
        (IfMatch::Tags { strong, .. }, None) => Some(strong),
        (IfMatch::Absent, None) => None,
    };
    let current = current_version()
        .await?
        .ok_or_else(|| ApiError::not_found(what))?;
    match strong {
        None => Err(ApiError::new(
            ErrorCode::PreconditionRequired,
            format!(
                "Updating this {what} needs If-Match: \"<version>\" (or \"version\" in the body) \
                 so that concurrent changes are not overwritten. Current version: {current}."
            ),
        )
        .with_extra("current_version", current)),
        Some(tags) if tags.contains(&current) => Ok(Precondition::Version(current)),
        Some(_) => Err(ApiError::version_mismatch(current)),
    }
}

/// Validates an optional free-text field: length in characters and no NUL (which PostgreSQL
/// cannot store and no client means to send).
pub fn check_text(
    issues: &mut Vec<FieldIssue>,
    field: &str,
    value: &Option<String>,
    max_chars: usize,
) {
    let Some(v) = value else { return };
    if v.chars().count() > max_chars {
        issues.push(issue(
            field,
            "too_long",
            format!("at most {max_chars} characters"),
        ));
    } else if v.contains('\0') {
        issues.push(issue(field, "invalid_characters", "must not contain NUL"));
    }
}

/// Validates a metadata map, reporting the offending key as `metadata.<key>`.
pub fn check_metadata(
    issues: &mut Vec<FieldIssue>,
    value: Option<BTreeMap<String, String>>,
) -> Option<Metadata> {
    let map = value?;
    match Metadata::new(map) {
        Ok(m) => Some(m),
        Err(e) => {
            let field = match e.key() {
                Some(k) if !k.is_empty() && k.len() <= 64 => format!("metadata.{k}"),
                _ => "metadata".to_owned(),
            };
            issues.push(issue(field, e.code(), e.to_string()));
            None
        }
    }
}

/// The problem with an amount that is not decimal text at all (neither a JSON number nor a
/// string), whatever the currency.
pub fn amount_shape_issue(field: &str) -> FieldIssue {
    issue(
        field,
        "invalid_amount",
        "must be a JSON number or a decimal string such as \"199.00\"",
    )
}

/// Parses `amount` in `currency`, or names the field's problem: the one rule for every
/// amount a request carries (orders, payments, captures, refunds, quotes).
pub fn parse_amount(
    field: &str,
    amount: &bursar_api::Amount,
    currency: Currency,
) -> Result<Money, FieldIssue> {
    let text = amount.text().ok_or_else(|| amount_shape_issue(field))?;
    Money::parse(&text, currency).map_err(|e| {
        let msg = match e {
            AmountError::TooManyDecimals => {
                format!(
                    "{currency} allows at most {} decimals",
                    currency.minor_units()
                )
            }
            other => other.to_string(),
        };
        issue(field, e.code(), msg)
    })
}

/// Ends validation: every collected problem in one 422, or nothing.
pub fn finish(issues: Vec<FieldIssue>) -> Result<(), ApiError> {
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(issues))
    }
}
