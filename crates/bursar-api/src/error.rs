//! The error body and the catalogue of stable error codes.
//!
//! Codes are part of the API contract: clients branch on them, so a code is never renamed or
//! reused for another meaning. `docs/API.md` lists them all (a test keeps the two in step).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Every error Bursar can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AuthenticationRequired,
    InvalidApiKey,
    ExpiredApiKey,
    InsufficientPermissions,
    RateLimited,
    QuotaExceeded,
    MalformedJson,
    InvalidParameter,
    UnsupportedMediaType,
    ValidationFailed,
    UnknownCustomer,
    ResourceNotFound,
    RouteNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    PreconditionRequired,
    VersionMismatch,
    InvalidState,
    IdempotencyKeyMissing,
    IdempotencyKeyInvalid,
    IdempotencyKeyReused,
    IdempotencyRequestInProgress,
    CardDeclined,
    InsufficientFunds,
    RefundExceedsCaptured,
    QuoteExpired,
    QuoteUsed,
    RateUnavailable,
    ProcessorError,
    RequestTimeout,
    ServiceUnavailable,
    InternalError,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::AuthenticationRequired,
        ErrorCode::InvalidApiKey,
        ErrorCode::ExpiredApiKey,
        ErrorCode::InsufficientPermissions,
        ErrorCode::RateLimited,
        ErrorCode::QuotaExceeded,
        ErrorCode::MalformedJson,
        ErrorCode::InvalidParameter,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::ValidationFailed,
        ErrorCode::UnknownCustomer,
        ErrorCode::ResourceNotFound,
        ErrorCode::RouteNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::PreconditionRequired,
        ErrorCode::VersionMismatch,
        ErrorCode::InvalidState,
        ErrorCode::IdempotencyKeyMissing,
        ErrorCode::IdempotencyKeyInvalid,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::IdempotencyRequestInProgress,
        ErrorCode::CardDeclined,
        ErrorCode::InsufficientFunds,
        ErrorCode::RefundExceedsCaptured,
        ErrorCode::QuoteExpired,
        ErrorCode::QuoteUsed,
        ErrorCode::RateUnavailable,
        ErrorCode::ProcessorError,
        ErrorCode::RequestTimeout,
        ErrorCode::ServiceUnavailable,
        ErrorCode::InternalError,
    ];

    /// The stable string sent as `error_code`.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            AuthenticationRequired => "authentication_required",
            InvalidApiKey => "invalid_api_key",
            ExpiredApiKey => "expired_api_key",
            InsufficientPermissions => "insufficient_permissions",
            RateLimited => "rate_limited",
            QuotaExceeded => "quota_exceeded",
            MalformedJson => "malformed_json",
            InvalidParameter => "invalid_parameter",
            UnsupportedMediaType => "unsupported_media_type",
            ValidationFailed => "validation_failed",
            UnknownCustomer => "unknown_customer",
            ResourceNotFound => "resource_not_found",
            RouteNotFound => "route_not_found",
            MethodNotAllowed => "method_not_allowed",
            PayloadTooLarge => "payload_too_large",
            PreconditionRequired => "precondition_required",
            VersionMismatch => "version_mismatch",
            InvalidState => "invalid_state",
            IdempotencyKeyMissing => "idempotency_key_missing",
            IdempotencyKeyInvalid => "idempotency_key_invalid",
            IdempotencyKeyReused => "idempotency_key_reused",
            IdempotencyRequestInProgress => "idempotency_request_in_progress",
            CardDeclined => "card_declined",
            InsufficientFunds => "insufficient_funds",
            RefundExceedsCaptured => "refund_exceeds_captured",
            QuoteExpired => "quote_expired",
            QuoteUsed => "quote_used",
            RateUnavailable => "rate_unavailable",
            ProcessorError => "processor_error",
            RequestTimeout => "request_timeout",
            ServiceUnavailable => "service_unavailable",
            InternalError => "internal_error",
        }
    }

    /// The HTTP status this code is always sent with.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            AuthenticationRequired | InvalidApiKey | ExpiredApiKey => 401,
            InsufficientPermissions => 403,
            RateLimited | QuotaExceeded => 429,
            MalformedJson | InvalidParameter | IdempotencyKeyMissing | IdempotencyKeyInvalid => 400,
            UnsupportedMediaType => 415,
            ValidationFailed | UnknownCustomer | IdempotencyKeyReused => 422,
            ResourceNotFound | RouteNotFound => 404,
            MethodNotAllowed => 405,
            PayloadTooLarge => 413,
            PreconditionRequired => 428,
            VersionMismatch => 412,
            InvalidState | IdempotencyRequestInProgress | QuoteExpired | QuoteUsed => 409,
            CardDeclined => 402,
            InsufficientFunds | RefundExceedsCaptured | RateUnavailable => 422,
            ProcessorError => 502,
            RequestTimeout | ServiceUnavailable => 503,
            InternalError => 500,
        }
    }

    /// Constant human title, used as the RFC 9457 `title`.
    pub fn title(self) -> &'static str {
        use ErrorCode::*;
        match self {
            AuthenticationRequired => "Authentication required",
            InvalidApiKey => "Invalid API key",
            ExpiredApiKey => "Expired API key",
            InsufficientPermissions => "Insufficient permissions",
            RateLimited => "Rate limit exceeded",
            QuotaExceeded => "Quota exceeded",
            MalformedJson => "Malformed JSON",
            InvalidParameter => "Invalid query parameter",
            UnsupportedMediaType => "Unsupported media type",
            ValidationFailed => "Validation failed",
            UnknownCustomer => "Unknown customer",
            ResourceNotFound => "Resource not found",
            RouteNotFound => "Route not found",
            MethodNotAllowed => "Method not allowed",
            PayloadTooLarge => "Payload too large",
            PreconditionRequired => "Precondition required",
            VersionMismatch => "Version mismatch",
            InvalidState => "Invalid state",
            IdempotencyKeyMissing => "Idempotency-Key is required",
            IdempotencyKeyInvalid => "Idempotency-Key is malformed",
            IdempotencyKeyReused => "Idempotency-Key is already used",
            IdempotencyRequestInProgress => "Idempotency-Key request in progress",
            CardDeclined => "Card declined",
            InsufficientFunds => "Insufficient funds",
            RefundExceedsCaptured => "Refund exceeds the captured amount",
            QuoteExpired => "Quote expired",
            QuoteUsed => "Quote already converted",
            RateUnavailable => "No rate for this currency pair",
            ProcessorError => "Payment processor refused the request",
            RequestTimeout => "Request timed out",
            ServiceUnavailable => "Service unavailable",
            InternalError => "Internal error",
        }
    }

    /// RFC 9457 `type`: a stable URI per code.
    pub fn problem_type(self) -> String {
        // Both 429s use the IANA-registered type of the RateLimit draft, which clients know.
        if matches!(self, ErrorCode::RateLimited | ErrorCode::QuotaExceeded) {
            return "https://iana.org/assignments/http-problem-types#quota-exceeded".into();
        }
        format!(
            "https://bursar.dev/problems/{}",
            self.as_str().replace('_', "-")
        )
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

/// One problem with one input field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldIssue {
    /// The offending field (`amount`, `metadata.key`, `limit`).
    pub field: String,
    /// Stable code of the problem (`too_many_decimals`, `required`, `unknown_field`, …).
    pub code: String,
    pub message: String,
}

/// The error envelope. With `Accept: application/problem+json` the same members are sent as an
/// RFC 9457 document, where `status` is the numeric HTTP status and `type`, `title`, `detail`
/// and `instance` are added.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `"error"` in the envelope; the numeric HTTP status in the problem form.
    #[schema(value_type = String, example = "error")]
    pub status: Value,
    #[schema(example = "version_mismatch")]
    pub error_code: String,
    pub message: String,
    #[schema(example = "req_0197a1c2-7d4e-7a10-9c55-2f0e8b6b1d42")]
    pub request_id: String,
    #[schema(example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    pub trace_id: String,
    pub latency_ms: u64,
    pub details: Vec<FieldIssue>,
    /// Code-specific members (`current_version`, …) and the problem-form members.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()));
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
            assert!((400..600).contains(&c.http_status()));
        }
    }
}
