//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::AppState;
use crate::http::error::ApiError;

/// Alive: the process answers. Never touches the database.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: the database answers within two seconds; otherwise 503 so a load balancer
/// takes this instance out of rotation.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, description = "Ready to serve"),
              (status = 503, description = "service_unavailable", body = bursar_api::ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(
            json!({"status": "ready", "database": state.store.backend()}),
        )),
        Ok(Err(e)) => Err(ApiError::unavailable(Box::new(e))),
        Err(elapsed) => Err(ApiError::unavailable(Box::new(elapsed))),
    }
}

/// Counters in the Prometheus text format (`ratelimit_store_errors_total`,
/// `ratelimit_fallback_total`, `ratelimit_degraded_checks_total`, `rate_limited_total`,
/// `quota_exceeded_total`, `usage_flush_failures_total`), and summaries (quantiles over the
/// last minute) such as `webhook_claim_seconds`. Unauthenticated like the probes: it
/// holds counts, never tenant data; keep it off the public edge.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics_handle().render(),
    )
}
