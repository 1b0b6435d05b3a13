//! The outermost layer: gives each request its id and trace context, times it, renders every
//! error body (so all errors — from handlers, extractors, the router, timeouts, panics — share
//! one envelope), sets `X-Request-Id` and `Server-Timing`, and writes the access log line.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bursar_api::{ErrorBody, ErrorCode};
use serde::Serialize;
use serde_json::Value;

use super::error::{ApiError, ErrorSlot};
use crate::trace::{TraceContext, accept_request_id, new_request_id};

/// Per-request facts shared by the middleware, extractors and handlers.
#[derive(Debug)]
pub struct RequestInfo {
    pub request_id: String,
    pub trace: TraceContext,
    pub started: Instant,
    /// The request path, the problem form's `instance`.
    pub path: String,
    wants_problem: bool,
    /// Set by the auth extractor, for the access log.
    pub account_id: OnceLock<i64>,
    /// The matched route template (`/api/orders/{id}`), for the access log.
    pub route: OnceLock<String>,
    /// Rate-limit and quota states, set by authentication, sent as `RateLimit-Policy` and
    /// `RateLimit` (and `Bursar-Rate-Limited-Reason` on a 429).
    pub limits: OnceLock<crate::product::Limits>,
    /// Metering and the quota refund, run once the response status is known.
    pub billing: OnceLock<crate::product::Billing>,
    /// A read's rate check still running alongside its handler; settled before the response
    /// goes out (it may turn it into a 429).
    pub pending_rates: std::sync::Mutex<Option<crate::product::PendingRates>>,
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub async fn request_context(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let h = req.headers();
    let info = Arc::new(RequestInfo {
        request_id: accept_request_id(header_str(h, "x-request-id")).unwrap_or_else(new_request_id),
        trace: TraceContext::from_headers(
            header_str(h, "traceparent"),
            header_str(h, "tracestate"),
        ),
        started,
        path: req.uri().path().to_owned(),
        wants_problem: header_str(h, "accept")
            .is_some_and(|a| a.to_ascii_lowercase().contains("application/problem+json")),
        account_id: OnceLock::new(),
        route: OnceLock::new(),
        limits: OnceLock::new(),
        billing: OnceLock::new(),
        pending_rates: std::sync::Mutex::new(None),
    });
    let method = req.method().clone();
    req.extensions_mut().insert(info.clone());

    let mut resp = next.run(req).await;
    let pending = info
        .pending_rates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(pending) = pending {
        resp = super::extract::settle_rates(pending, &info, resp).await;
    }

    let final_body = resp.extensions_mut().remove::<Rendered>().is_some();
    let error = resp
        .extensions_mut()
        .remove::<ErrorSlot>()
        .map(|slot| slot.0)
        .or_else(|| {
            let fallback =
                (!final_body).then(|| fallback_error(&method, &info.path, resp.status()));
            fallback.flatten().map(Arc::new)
        });
    if let Some(err) = &error {
        resp = render_error(err, &info, resp);
    }
    if let Some(limits) = info.limits.get() {
        let headers = resp.headers_mut();
        let fields = [
            ("ratelimit-policy", limits.policy_header()),
            ("ratelimit", limits.ratelimit_header()),
            (
                "bursar-rate-limited-reason",
                limits.reason.map(str::to_owned),
            ),
        ];
        for (name, value) in fields {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, v);
            }
        }
    }
    if let Some(billing) = info.billing.get() {
        let replayed = resp.headers().contains_key("idempotent-replayed");
        billing.finish(resp.status().as_u16(), replayed);
    }
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&info.request_id) {
        headers.insert("x-request-id", v);
    }
    let timing = format!(
        "app;dur={:.1}, trace;desc={}",
        started.elapsed().as_secs_f64() * 1000.0,
        info.trace.traceparent()
    );
    if let Ok(v) = HeaderValue::from_str(&timing) {
        headers.insert("server-timing", v);
    }
    access_log(
        &info,
        &method,
        &info.path,
        resp.status(),
        latency_ms,
        error.as_deref(),
    );
    resp
}

/// Records the matched route template; runs inside the router, where it is known.
pub async fn record_route(req: Request, next: Next) -> Response {
    if let (Some(info), Some(route)) = (
        req.extensions().get::<Arc<RequestInfo>>(),
        req.extensions().get::<MatchedPath>(),
    ) {
        let _ = info.route.set(route.as_str().to_owned());
    }
    next.run(req).await
}

/// Error responses produced outside Bursar's handlers (router, body limit, timeout, panic).
fn fallback_error(method: &Method, path: &str, status: StatusCode) -> Option<ApiError> {
    if status.as_u16() < 400 {
        return None;
    }
    let e = match status {
        StatusCode::NOT_FOUND => ApiError::new(
            ErrorCode::RouteNotFound,
            format!("No route for {method} {path}."),
        ),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {path}; see the Allow header."),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Send the body as Content-Type: application/json.",
        ),
        StatusCode::REQUEST_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => {
            let mut e = ApiError::new(
                ErrorCode::RequestTimeout,
                "The request took too long and was abandoned; it may be retried.",
            );
            e.retry_after = Some(1);
            e
        }
        s if s.is_client_error() => ApiError::new(
            ErrorCode::InvalidParameter,
            "The request could not be processed.",
        ),
        _ => ApiError::internal(format!("unhandled {status} response")),
    };
    Some(e)
}

pub fn payload_too_large() -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        "The request body exceeds the size limit.",
    )
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    detail: &'a str,
    instance: &'a str,
    #[serde(flatten)]
    body: &'a ErrorBody,
}

/// The error envelope of `err`, attributed to the request it answers. Phased work stored by
/// a later driver (which has no `RequestInfo`) builds its answers from this too.
pub fn envelope(err: &ApiError, request_id: &str, trace_id: &str, latency_ms: u64) -> ErrorBody {
    ErrorBody {
        status: Value::from("error"),
        error_code: err.code.as_str().to_owned(),
        message: err.message.clone(),
        request_id: request_id.to_owned(),
        trace_id: trace_id.to_owned(),
        latency_ms,
        details: err.details.clone(),
        extra: err.extra.clone(),
    }
}

/// The bytes of an error body for this request, in the form it asked for (the envelope, or
/// RFC 9457 under `Accept: application/problem+json`). Also used to render an error that is
/// stored as an idempotent outcome, so the stored bytes are the ones the client got.
pub fn error_body(err: &ApiError, info: &RequestInfo) -> (&'static str, Vec<u8>) {
    let latency_ms = u64::try_from(info.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut body = envelope(err, &info.request_id, &info.trace.trace_id, latency_ms);
    let (content_type, bytes) = if info.wants_problem {
        body.status = Value::from(err.status().as_u16());
        let problem = Problem {
            kind: err.code.problem_type(),
            title: err.code.title(),
            detail: &err.message,
            instance: &info.path,
            body: &body,
        };
        ("application/problem+json", serde_json::to_vec(&problem))
    } else {
        ("application/json", serde_json::to_vec(&body))
    };
    (content_type, bytes.expect("error bodies are plain data"))
}

fn render_error(err: &ApiError, info: &RequestInfo, original: Response) -> Response {
    let (content_type, bytes) = error_body(err, info);
    // Keep headers the producer set on purpose (Allow, Retry-After); drop stale body headers.
    let (mut parts, _) = original.into_parts();
    parts.status = err.status();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(secs) = err.retry_after {
        parts
            .headers
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Marks a response whose body is final — a stored idempotent outcome, first sent or
/// replayed. The middleware adds this exchange's headers but never re-renders the body.
#[derive(Debug, Clone, Copy)]
pub struct Rendered;

fn access_log(
    info: &RequestInfo,
    method: &Method,
    path: &str,
    status: StatusCode,
    latency_ms: u64,
    error: Option<&ApiError>,
) {
    let route = info.route.get().map(String::as_str).unwrap_or(path);
    let account = info.account_id.get().copied();
    let error_code = error.map(|e| e.code.as_str());
    match error.and_then(|e| e.source.as_ref()) {
        Some(source) if status.is_server_error() => tracing::error!(
            request_id = %info.request_id,
            trace_id = %info.trace.trace_id,
            method = %method,
            route,
            status = status.as_u16(),
            latency_ms,
            account_id = account,
            error_code,
            error = %error_chain(source.as_ref()),
            "request failed"
        ),
        _ => tracing::info!(
            request_id = %info.request_id,
            trace_id = %info.trace.trace_id,
            method = %method,
            route,
            status = status.as_u16(),
            latency_ms,
            account_id = account,
            error_code,
            "request"
        ),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Turns a handler panic into a rendered `internal_error` instead of a dropped connection.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into());
    ApiError::internal(format!("handler panicked: {what}")).into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use axum::middleware::from_fn;
    use axum::routing::get;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_http::catch_panic::CatchPanicLayer;
    use tower_http::timeout::TimeoutLayer;

    use super::*;

    async fn boom() -> &'static str {
        panic!("db password is hunter2")
    }

    /// The production layer stack around test routes that fail in ways the API cannot be
    /// made to fail on purpose.
    fn app() -> Router {
        Router::new()
            .route("/panic", get(boom))
            .route(
                "/internal",
                get(|| async {
                    Err::<(), _>(ApiError::internal(
                        "connection to 10.0.0.7 refused: hunter2",
                    ))
                }),
            )
            .route(
                "/slow",
                get(|| async { tokio::time::sleep(Duration::from_secs(60)).await }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(from_fn(request_context))
                    .layer(CatchPanicLayer::custom(panic_response))
                    .layer(TimeoutLayer::with_status_code(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Duration::from_millis(100),
                    )),
            )
    }

    async fn call(path: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
        let req = Request::get(path).body(Body::empty()).unwrap();
        let resp = app().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_500_says_internal_error_and_nothing_else() {
        for path in ["/panic", "/internal"] {
            let (status, headers, body) = call(path).await;
            assert_eq!(status, 500, "{path}");
            assert_eq!(body["error_code"], "internal_error");
            assert_eq!(body["message"], "An unexpected error occurred.");
            assert!(!body.to_string().contains("hunter2"), "{path}: {body}");
            assert!(!body.to_string().contains("10.0.0.7"), "{path}: {body}");
            assert_eq!(
                body["request_id"],
                headers["x-request-id"].to_str().unwrap()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_over_the_time_limit_is_a_retryable_503() {
        let (status, headers, body) = call("/slow").await;
        assert_eq!(status, 503);
        assert_eq!(body["error_code"], "request_timeout");
        assert_eq!(headers["retry-after"], "1");
    }
}
