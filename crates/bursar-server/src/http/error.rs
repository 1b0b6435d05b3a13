//! The one error type at the HTTP edge. Handlers and services return `ApiError`; its
//! `IntoResponse` only attaches it to an empty response, and the request-context middleware
//! renders the body (envelope or RFC 9457) with the request id, trace id and latency, and logs
//! it. That keeps logging out of `IntoResponse` and gives one renderer for every error.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bursar_api::{ErrorCode, FieldIssue};
use bursar_storage::StorageError;
use serde_json::{Map, Value};

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Vec<FieldIssue>,
    /// Code-specific top-level members (`current_version`, …).
    pub extra: Map<String, Value>,
    /// Seconds for `Retry-After`, on 503s.
    pub retry_after: Option<u32>,
    /// The underlying failure of a 5xx: logged, never sent.
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            details: Vec::new(),
            extra: Map::new(),
            retry_after: None,
            source: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn with_details(mut self, details: Vec<FieldIssue>) -> ApiError {
        self.details = details;
        self
    }

    pub fn with_extra(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// 422 `validation_failed` listing every field problem found.
    pub fn validation(details: Vec<FieldIssue>) -> ApiError {
        let message = match details.as_slice() {
            [one] => format!("Invalid value for `{}`: {}", one.field, one.message),
            _ => format!("{} fields are invalid; see details.", details.len()),
        };
        ApiError::new(ErrorCode::ValidationFailed, message).with_details(details)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(ErrorCode::ResourceNotFound, format!("No such {what}."))
    }

    pub fn version_mismatch(current: i64) -> ApiError {
        ApiError::new(
            ErrorCode::VersionMismatch,
            format!(
                "The resource has changed; its current version is {current}. \
                 Fetch it again and retry with If-Match: \"{current}\"."
            ),
        )
        .with_extra("current_version", current)
    }

    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ApiError {
        let mut e = ApiError::new(ErrorCode::InternalError, "An unexpected error occurred.");
        e.source = Some(source.into());
        e
    }

    pub fn unavailable(source: Box<dyn std::error::Error + Send + Sync>) -> ApiError {
        let mut e = ApiError::new(
            ErrorCode::ServiceUnavailable,
            "The database is unavailable; retry shortly.",
        );
        e.retry_after = Some(1);
        e.source = Some(source);
        e
    }
}

/// A field issue, the building block of 422 details.
pub fn issue(field: impl Into<String>, code: &str, message: impl Into<String>) -> FieldIssue {
    FieldIssue {
        field: field.into(),
        code: code.to_owned(),
        message: message.into(),
    }
}

/// Storage failures that no service handled specifically.
impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        match e {
            StorageError::NotFound => ApiError::not_found("resource"),
            StorageError::VersionMismatch { current } => ApiError::version_mismatch(current),
            StorageError::InvalidState { current } => ApiError::new(
                ErrorCode::InvalidState,
                format!(
                    "The order is {}; this action is not allowed.",
                    current.as_str()
                ),
            )
            .with_extra("current_status", current.as_str()),
            StorageError::UnknownCustomer => ApiError::new(
                ErrorCode::UnknownCustomer,
                "customer_id does not name a customer of this account.",
            )
            .with_details(vec![issue(
                "customer_id",
                "unknown_customer",
                "no such customer in this account",
            )]),
            StorageError::Unavailable(source) => ApiError::unavailable(source),
            // Services turn each rule into its own code; this is the generic fallback.
            StorageError::Rule(rule) => ApiError::new(
                ErrorCode::InvalidState,
                format!("The request conflicts with the current state: {rule:?}."),
            ),
            e @ (StorageError::Conflict | StorageError::Fenced | StorageError::Internal(_)) => {
                ApiError::internal(e)
            }
        }
    }
}

/// Carried in response extensions from the handler to the rendering middleware.
#[derive(Clone)]
pub struct ErrorSlot(pub Arc<ApiError>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = self.status().into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(ErrorSlot(Arc::new(self)));
        resp
    }
}
