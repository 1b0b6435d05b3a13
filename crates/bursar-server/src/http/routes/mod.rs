//! Handlers: parse, authenticate, call a service, render. Nothing else.

/// Declares one list's query parameters: a page (`limit`, `starting_after`) and the list's
/// own filters, with `deny_unknown_fields`, so a filter of another list is a 400 and the
/// OpenAPI document shows each list's filters only.
macro_rules! list_query {
    ($name:ident $(, $filter:ident: $doc:literal)*) => {
        #[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
        #[serde(deny_unknown_fields)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// Page size, 1–100 (default 10).
            #[param(value_type = Option<u32>)]
            pub limit: Option<String>,
            /// The last id of the previous page.
            #[param(value_type = Option<i64>)]
            pub starting_after: Option<String>,
            $(
                #[doc = $doc]
                #[param(value_type = Option<i64>)]
                pub $filter: Option<String>,
            )*
        }
    };
}

list_query!(PageQuery);

pub mod customers;
pub mod events;
pub mod live;
pub mod money;
pub mod operations;
pub mod orders;
pub mod product;
pub mod system;

use bursar_domain::Timestamp;
use bursar_storage::PageRequest;

use super::error::{ApiError, issue};
use bursar_api::ErrorCode;

pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;

pub fn bad_param(field: &str, message: String) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidParameter,
        format!("Invalid query parameter `{field}`: {message}."),
    )
    .with_details(vec![issue(field, "invalid", message)])
}

/// `types=a,b` as a list (blanks dropped); an absent parameter is the empty list.
pub fn split_types(raw: Option<&str>) -> Vec<String> {
    raw.iter()
        .flat_map(|t| t.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A positive integer id given as a query parameter.
pub fn parse_id(field: &str, raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|r| match r.parse::<i64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(bad_param(field, "must be a positive integer id".into())),
    })
    .transpose()
}

/// `limit` (1–100, default 10) and `starting_after` (an id from the previous page).
pub fn parse_page(
    limit: Option<&str>,
    starting_after: Option<&str>,
) -> Result<PageRequest, ApiError> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<u32>() {
            Ok(v) if (1..=MAX_LIMIT).contains(&v) => v,
            _ => {
                return Err(bad_param(
                    "limit",
                    format!("must be an integer from 1 to {MAX_LIMIT}"),
                ));
            }
        },
    };
    Ok(PageRequest {
        limit,
        starting_after: parse_id("starting_after", starting_after)?,
    })
}

/// A time bound given as RFC 3339 (`2026-03-25T00:00:00Z`) or Unix seconds.
pub fn parse_time(field: &str, raw: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    if let Ok(secs) = raw.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .map(|ms| Some(Timestamp(ms)))
            .ok_or_else(|| bad_param(field, "out of range".into()));
    }
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|d| Some(Timestamp(d.timestamp_millis())))
        .map_err(|_| bad_param(field, "must be RFC 3339 or Unix seconds".into()))
}
