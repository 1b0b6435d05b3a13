//! Extractors that turn a request into validated inputs, answering with `ApiError` (never a
//! bare framework rejection) when they cannot.

use std::sync::Arc;

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use bursar_api::ErrorCode;
use bursar_domain::AccountId;
use bursar_domain::apikey::{KeyMode, ParsedKey, Scope};
use bursar_storage::ApiKeyRecord;
use serde::de::DeserializeOwned;

use super::context::{RequestInfo, payload_too_large};
use super::error::{ApiError, issue};
use crate::AppState;
use crate::product::access::{client_ip, needed_scope, route_class};
use crate::product::{Billing, Limits, PendingRates, Refusal};
use crate::services::Call;

/// The authenticated caller. Extracting it runs the whole front of the request path
/// (`product`): per-IP limits, the failed-auth check, the key (shape and checksum with no I/O,
/// then the per-instance cache or a lookup by SHA-256 hash), expiry, scope, rate limits and the
/// monthly quota — in that order, so a 401/403/429 consumes nothing of the key's quota.
#[derive(Debug, Clone)]
pub struct Auth {
    pub account_id: AccountId,
    pub key_id: i64,
    pub mode: KeyMode,
    /// `None`: full access.
    pub scopes: Option<Vec<Scope>>,
    /// The account's plan (`None`: the default), as of the key's cached record.
    pub plan: Option<String>,
    /// When the key stops working, as of its cached record (live streams check it again).
    pub expires_at: Option<bursar_domain::Timestamp>,
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Auth, ApiError> {
        let info = parts.extensions.get::<Arc<RequestInfo>>().cloned();
        let product = state.product.clone();
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let ip = client_ip(peer, &parts.headers, &product.trusted);
        let mut limits = match ip {
            Some(ip) => product
                .ip_rate(ip)
                .await
                .map_err(|r| refusal(r, info.as_deref()))?,
            None => Limits::default(),
        };
        let now = state.clock.now();
        let hash = bearer_key(parts).map(|key| key.hash());
        let cached = hash.as_deref().ok().and_then(|h| state.keys.get(h));
        // An address out of failed attempts is refused before any lookup; a key verified
        // moments ago (cached) needs no lookup and skips the question.
        if cached.is_none()
            && let Some(ip) = ip
        {
            product
                .auth_budget(ip)
                .await
                .map_err(|r| refusal(r, info.as_deref()))?;
        }
        let record = match verify_key(state, hash, cached, now).await {
            Ok(record) => record,
            Err(e) => {
                if let Some(ip) = ip {
                    product.failed_auth(ip).await;
                }
                return Err(e);
            }
        };
        if let Some(info) = &info {
            let _ = info.account_id.set(record.account_id);
        }
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        if let Some(needed) = route.and_then(|r| needed_scope(&parts.method, r))
            && !Scope::allows(record.scopes.as_deref(), needed)
        {
            return Err(ApiError::new(
                ErrorCode::InsufficientPermissions,
                format!("This API key does not have the {} scope.", needed.render()),
            ));
        }
        let (plan_name, plan) = state.config.plan(record.plan.as_deref());
        let billing = |charge| Billing {
            product: product.clone(),
            store: state.store.clone(),
            account: record.account_id,
            key_id: record.id,
            class: route_class(&parts.method),
            at: now,
            charge,
        };
        if let Some(info) = &info
            && matches!(parts.method, Method::GET | Method::HEAD)
            && product.speculate(&record, plan_name, plan)
        {
            let task = tokio::spawn({
                let product = product.clone();
                let record = record.clone();
                let plan_name = plan_name.to_owned();
                async move { product.rates(&record, &plan_name).await }
            });
            let pending = PendingRates {
                task,
                front: limits,
                billing: billing(None),
            };
            *info.pending_rates.lock().unwrap_or_else(|e| e.into_inner()) = Some(pending);
            return Ok(Auth::of(record));
        }
        let mut key_limits = product
            .rates(&record, plan_name)
            .await
            .map_err(|r| refusal(r, info.as_deref()))?;
        limits.states.append(&mut key_limits.states);
        let idempotency_key = (parts.method != Method::GET)
            .then(|| parts.headers.get("idempotency-key"))
            .flatten()
            .and_then(|v| v.to_str().ok());
        let charged = product
            .quota(
                state.store.as_ref(),
                plan,
                record.account_id,
                idempotency_key,
                now,
                &mut limits,
            )
            .await
            .map_err(|r| refusal(r, info.as_deref()))?;
        if let Some(info) = &info {
            let _ = info.limits.set(limits);
            let _ = info.billing.set(billing(charged));
        }
        Ok(Auth::of(record))
    }
}

impl Auth {
    fn of(record: ApiKeyRecord) -> Auth {
        Auth {
            account_id: record.account_id,
            key_id: record.id,
            mode: record.mode,
            scopes: record.scopes,
            plan: record.plan,
            expires_at: record.expires_at,
        }
    }
}

/// Settles a read whose rate check ran alongside its handler (`Product::speculate`): on allow,
/// the handler's response stands with the limit states and billing set as on the ordinary path;
/// on refusal (or if the check's task died) the response becomes the 429 or 503 the check would
/// have answered first.
pub(crate) async fn settle_rates(
    pending: PendingRates,
    info: &RequestInfo,
    resp: axum::response::Response,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let outcome = pending.task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "rate check task failed");
        Err(Refusal::Unavailable)
    });
    match outcome {
        Ok(mut key_limits) => {
            let mut limits = pending.front;
            limits.states.append(&mut key_limits.states);
            let _ = info.limits.set(limits);
            let _ = info.billing.set(pending.billing);
            resp
        }
        Err(r) => refusal(r, Some(info)).into_response(),
    }
}

fn invalid_key() -> ApiError {
    ApiError::new(ErrorCode::InvalidApiKey, "The API key is not valid.")
}

/// The bearer key, well-formed and with a good checksum (no I/O).
fn bearer_key(parts: &Parts) -> Result<ParsedKey, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            ErrorCode::AuthenticationRequired,
            "Send your API key as Authorization: Bearer <key>.",
        ));
    };
    let text = value.to_str().map_err(|_| invalid_key())?;
    let (scheme, key) = text.split_once(' ').ok_or_else(invalid_key)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(invalid_key());
    }
    ParsedKey::parse(key.trim()).map_err(|_| invalid_key())
}

/// The bearer key's record: known (from the cache or by its hash), not revoked, not expired.
async fn verify_key(
    state: &AppState,
    hash: Result<String, ApiError>,
    cached: Option<ApiKeyRecord>,
    now: bursar_domain::Timestamp,
) -> Result<ApiKeyRecord, ApiError> {
    let hash = hash?;
    let record = match cached {
        Some(hit) => hit,
        None => {
            let found = state.store.find_api_key(&hash).await?;
            let record = found.filter(|k| !k.revoked).ok_or_else(invalid_key)?;
            state.keys.insert(hash, record.clone());
            // A revoke that landed while this lookup ran must not be undone by the fill.
            if state.product.is_tombstoned(record.id) {
                state.keys.remove_id(record.id);
            }
            record
        }
    };
    if state.product.is_tombstoned(record.id) {
        return Err(invalid_key());
    }
    if record.expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::new(
            ErrorCode::ExpiredApiKey,
            "The API key has expired; roll or create a new one.",
        ));
    }
    Ok(record)
}

/// The 429 or 503 of a refused request; its limit states go into the response headers.
fn refusal(r: Refusal, info: Option<&RequestInfo>) -> ApiError {
    match r {
        Refusal::Limited {
            limits,
            violated,
            retry_after,
            quota,
        } => {
            if let Some(info) = info {
                let _ = info.limits.set(limits);
            }
            let (code, message) = if quota {
                (
                    ErrorCode::QuotaExceeded,
                    "The monthly request quota of this account is used up.",
                )
            } else {
                (
                    ErrorCode::RateLimited,
                    "Rate limit exceeded; retry after the time in Retry-After.",
                )
            };
            let mut e = ApiError::new(code, message);
            e.extra.insert(
                "violated-policies".into(),
                serde_json::Value::from(violated),
            );
            e.retry_after = Some(u32::try_from(retry_after.max(1)).unwrap_or(u32::MAX));
            e
        }
        Refusal::Unavailable => {
            let mut e = ApiError::new(
                ErrorCode::ServiceUnavailable,
                "Rate limiting is unavailable; retry shortly.",
            );
            e.retry_after = Some(1);
            e
        }
    }
}

/// The authenticated call as services take it: state, caller and request facts in one.
impl FromRequestParts<AppState> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Call, ApiError> {
        let auth = Auth::from_request_parts(parts, state).await?;
        let info = parts
            .extensions
            .get::<Arc<RequestInfo>>()
            .cloned()
            .expect("the request-context layer wraps every route");
        Ok(Call {
            state: state.clone(),
            auth,
            info,
        })
    }
}

/// A JSON request body: `Content-Type: application/json` (415 otherwise), within the body
/// limit (413), syntactically valid (400 `malformed_json`), and of the right shape — unknown
/// fields, missing fields and wrong types are 422 `validation_failed` naming the field.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Json<T>, ApiError> {
        let bytes = json_bytes(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// A JSON body as [`Json`] does it, together with its bytes (which an idempotent create
/// fingerprints).
pub struct JsonWithBytes<T>(pub T, pub Bytes);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonWithBytes<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonWithBytes<T>, ApiError> {
        let bytes = json_bytes(req, state).await?;
        parse_json(&bytes).map(|v| JsonWithBytes(v, bytes))
    }
}

/// The bytes of a JSON body (content type and size checked) for handlers that parse it
/// themselves, such as registered operations.
pub struct JsonBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBytes, ApiError> {
        json_bytes(req, state).await.map(JsonBytes)
    }
}

/// [`JsonBytes`], except that a request with no body at all (and no `Content-Type`) is
/// accepted as empty: actions such as `POST /api/payments/{id}/capture` take no options by
/// default, and clients commonly send them bare.
pub struct OptionalJsonBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for OptionalJsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<OptionalJsonBytes, ApiError> {
        let bare = !req.headers().contains_key(header::CONTENT_TYPE)
            && req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        if bare {
            let bytes = Bytes::from_request(req, state)
                .await
                .map_err(|_| payload_too_large())?;
            if bytes.is_empty() {
                return Ok(OptionalJsonBytes(bytes));
            }
            return Err(not_json());
        }
        json_bytes(req, state).await.map(OptionalJsonBytes)
    }
}

/// 415: a body that is not sent as JSON.
fn not_json() -> ApiError {
    ApiError::new(
        ErrorCode::UnsupportedMediaType,
        "Send the body as Content-Type: application/json.",
    )
}

/// The body of a request that must be `application/json`, within the body limit.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        });
    if !is_json {
        return Err(not_json());
    }
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            payload_too_large()
        } else {
            ApiError::new(
                ErrorCode::MalformedJson,
                "The request body could not be read.",
            )
        }
    })
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::new(
            ErrorCode::MalformedJson,
            format!("The body is not valid JSON: {e}."),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if !inner.is_data() {
                return Err(malformed(inner));
            }
            return Err(shape_error(&path, &inner));
        }
    };
    // Trailing bytes after the value are a syntax error, not a shape error.
    de.end().map_err(malformed)?;
    Ok(value)
}

/// 422 naming the field of a well-formed body of the wrong shape.
fn shape_error(path: &str, inner: &serde_json::Error) -> ApiError {
    let msg = inner.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    // serde_path_to_error already ends the path with an unknown field's name, but not with
    // a missing one's; join without doubling.
    let join = |name: &str| {
        if path == "." {
            name.to_owned()
        } else if path == name || path.ends_with(&format!(".{name}")) {
            path.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    let (field, code) = if let Some(name) = between_backticks(&msg, "unknown field `") {
        (join(name), "unknown_field")
    } else if let Some(name) = between_backticks(&msg, "missing field `") {
        (join(name), "required")
    } else if path == "." {
        ("body".to_owned(), "invalid_type")
    } else {
        (path.to_owned(), "invalid_type")
    };
    ApiError::validation(vec![issue(field, code, msg)])
}

fn between_backticks<'a>(msg: &'a str, start: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(start)?;
    rest.split('`').next()
}

/// An integer resource id from the path. Anything that is not a positive integer cannot name
/// a resource, so it is a 404 like any other unknown id.
pub struct Id(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Id, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("resource"))?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(Id(id)),
            _ => Err(ApiError::not_found("resource")),
        }
    }
}

/// Query parameters into a struct with `deny_unknown_fields`; problems are 400
/// `invalid_parameter` naming the parameter.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Params<T>, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Params(v))
            .map_err(|e| {
                let text = e.body_text();
                let text = text.trim_start_matches("Failed to deserialize query string: ");
                // serde_urlencoded reports "<param>: <problem>".
                let (field, problem) = text.split_once(": ").unwrap_or(("query", text));
                ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!("Invalid query: {text}."),
                )
                .with_details(vec![issue(field, "invalid", problem.to_owned())])
            })
    }
}

/// A parsed `If-Match` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    Absent,
    /// `*`: any current version.
    Any,
    /// Entity tags. `strong` holds the versions of the strong tags; weak tags never match
    /// (RFC 9110 strong comparison) and are only remembered so the answer can be 412.
    Tags {
        strong: Vec<i64>,
        weak: bool,
    },
}

impl IfMatch {
    pub fn from_headers(h: &HeaderMap) -> Result<IfMatch, ApiError> {
        let mut values = h.get_all(header::IF_MATCH).iter().peekable();
        if values.peek().is_none() {
            return Ok(IfMatch::Absent);
        }
        let mut strong = Vec::new();
        let mut weak = false;
        for v in values {
            let text = v.to_str().map_err(|_| bad_tag())?;
            for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if tag == "*" {
                    return Ok(IfMatch::Any);
                }
                if tag.starts_with("W/") {
                    weak = true;
                    continue;
                }
                // A well-formed tag that is not one of ours can never match: treat as stale.
                match parse_etag(tag) {
                    Some(n) => strong.push(n),
                    None if tag.starts_with('"') && tag.ends_with('"') && tag.len() >= 2 => {
                        weak = true
                    }
                    None => return Err(bad_tag()),
                }
            }
        }
        Ok(IfMatch::Tags { strong, weak })
    }
}

fn bad_tag() -> ApiError {
    ApiError::new(
        ErrorCode::InvalidParameter,
        "If-Match must be * or a list of entity tags such as \"3\".",
    )
    .with_details(vec![issue("If-Match", "invalid", "malformed entity tag")])
}

/// `"12"` → 12.
pub fn parse_etag(tag: &str) -> Option<i64> {
    tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// Whether `If-None-Match` (weak comparison) matches `version`, making a GET a 304.
pub fn if_none_match_hits(h: &HeaderMap, version: i64) -> bool {
    h.get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || parse_etag(t.strip_prefix("W/").unwrap_or(t)) == Some(version))
}
