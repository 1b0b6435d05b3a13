//! `/api/events` and `/api/webhook_endpoints` (issue 5).

use axum::Json as AxumJson;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bursar_api::{
    CreateWebhookEndpoint, ErrorBody, List, Redeliver, UpdateWebhookEndpoint, WebhookAttempt,
    WebhookDelivery, WebhookEndpoint,
};
use bursar_storage::events::{Attempt, Delivery, Endpoint, LoggedEvent};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{PageQuery, parse_page, split_types};
use crate::http::error::ApiError;
use crate::http::extract::{Id, Json, Params};
use crate::http::render::{self, time};
use crate::services::{Call, webhooks};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Page size, 1–100 (default 10).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Return events older than this `seq` (the last `seq` of the previous page).
    #[param(value_type = Option<i64>)]
    pub starting_after: Option<String>,
    /// Only these event types (comma-separated), e.g. `order.created,order.paid`.
    pub types: Option<String>,
}

/// The stored body, byte for byte: what webhooks were signed over.
fn raw_json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn event_list(events: &[LoggedEvent], has_more: bool) -> String {
    let data: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
    format!(
        r#"{{"object":"list","data":[{}],"has_more":{has_more}}}"#,
        data.join(",")
    )
}

#[utoipa::path(get, path = "/api/events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "A page of events, newest first (by `seq`)", body = List<serde_json::Value>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_events(call: Call, Params(q): Params<EventsQuery>) -> Result<Response, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let types = split_types(q.types.as_deref());
    let p = webhooks::list_events(&call, &types, page).await?;
    Ok(raw_json(StatusCode::OK, event_list(&p.items, p.has_more)))
}

#[utoipa::path(get, path = "/api/events/{id}", tag = "events",
    params(("id" = String, Path, description = "Event id (`evt_…`)")),
    responses(
        (status = 200, description = "The event", body = serde_json::Value),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_event(call: Call, Path(id): Path<String>) -> Result<Response, ApiError> {
    let e = webhooks::get_event(&call, &id).await?;
    Ok(raw_json(StatusCode::OK, e.body))
}

fn endpoint(e: &Endpoint, secret: String) -> WebhookEndpoint {
    WebhookEndpoint {
        id: e.id,
        object: "webhook_endpoint".into(),
        url: e.url.clone(),
        description: e.description.clone(),
        event_types: e.event_types.clone(),
        enabled: e.enabled,
        disabled_reason: e.disabled_reason.clone(),
        secret,
        previous_secret_expires_at: e.previous_secret_expires_at.map(time),
        version: e.version,
        created_at: time(e.created_at),
        updated_at: time(e.updated_at),
    }
}

fn masked(call: &Call, e: &Endpoint) -> WebhookEndpoint {
    endpoint(e, webhooks::masked_secret(call, e))
}

fn delivery(d: &Delivery) -> WebhookDelivery {
    WebhookDelivery {
        id: d.id,
        endpoint_id: d.endpoint_id,
        event_id: d.event_id.clone(),
        event_type: d.event_type.clone(),
        state: d.state.clone(),
        attempt_count: d.attempt_count,
        next_attempt_at: time(d.next_attempt_at),
        last_status: d.last_status,
        last_error: d.last_error.clone(),
        created_at: time(d.created_at),
        updated_at: time(d.updated_at),
    }
}

fn attempt(a: &Attempt) -> WebhookAttempt {
    WebhookAttempt {
        delivery_id: a.delivery_id,
        attempt_no: a.attempt_no,
        status_code: a.status_code,
        duration_ms: a.duration_ms,
        error_kind: a.error_kind.clone(),
        response_snippet: a.response_snippet.clone(),
        created_at: time(a.created_at),
    }
}

#[utoipa::path(post, path = "/api/webhook_endpoints", tag = "webhooks",
    request_body = CreateWebhookEndpoint,
    responses(
        (status = 201, description = "Created; `secret` is shown in full this once", body = WebhookEndpoint),
        (status = "4XX", description = "Error (a refused URL is 422 validation_failed)", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_endpoint(
    call: Call,
    Json(req): Json<CreateWebhookEndpoint>,
) -> Result<Response, ApiError> {
    let c = webhooks::create(&call, req).await?;
    let e = &c.endpoint;
    Ok(render::created(
        format!("/api/webhook_endpoints/{}", e.id),
        e.version,
        &endpoint(e, c.secret),
    ))
}

#[utoipa::path(get, path = "/api/webhook_endpoints", tag = "webhooks", params(PageQuery),
    responses(
        (status = 200, description = "A page of endpoints, newest first (secrets masked)", body = List<WebhookEndpoint>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_endpoints(
    call: Call,
    Params(q): Params<PageQuery>,
) -> Result<AxumJson<List<WebhookEndpoint>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let p = webhooks::list(&call, page).await?;
    let data = p.items.iter().map(|e| masked(&call, e)).collect();
    Ok(AxumJson(List::new(data, p.has_more)))
}

#[utoipa::path(get, path = "/api/webhook_endpoints/{id}", tag = "webhooks",
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 200, description = "The endpoint (secret masked)", body = WebhookEndpoint),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_endpoint(call: Call, Id(id): Id) -> Result<AxumJson<WebhookEndpoint>, ApiError> {
    let e = webhooks::get(&call, id).await?;
    Ok(AxumJson(masked(&call, &e)))
}

#[utoipa::path(patch, path = "/api/webhook_endpoints/{id}", tag = "webhooks",
    request_body = UpdateWebhookEndpoint,
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 200, description = "Updated", body = WebhookEndpoint),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn update_endpoint(
    call: Call,
    Id(id): Id,
    Json(req): Json<UpdateWebhookEndpoint>,
) -> Result<AxumJson<WebhookEndpoint>, ApiError> {
    let e = webhooks::update(&call, id, req).await?;
    Ok(AxumJson(masked(&call, &e)))
}

#[utoipa::path(delete, path = "/api/webhook_endpoints/{id}", tag = "webhooks",
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 204, description = "Deleted, with its deliveries and attempts"),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_endpoint(call: Call, Id(id): Id) -> Result<StatusCode, ApiError> {
    webhooks::delete(&call, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/webhook_endpoints/{id}/rotate_secret", tag = "webhooks",
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 200, description = "The new secret, shown in full this once; the old one keeps signing for the grace period", body = WebhookEndpoint),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn rotate_secret(call: Call, Id(id): Id) -> Result<AxumJson<WebhookEndpoint>, ApiError> {
    let c = webhooks::rotate(&call, id).await?;
    Ok(AxumJson(endpoint(&c.endpoint, c.secret)))
}

#[utoipa::path(get, path = "/api/webhook_endpoints/{id}/deliveries", tag = "webhooks",
    params(("id" = i64, Path, description = "Endpoint id"), PageQuery),
    responses(
        (status = 200, description = "Deliveries, newest first", body = List<WebhookDelivery>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn deliveries(
    call: Call,
    Id(id): Id,
    Params(q): Params<PageQuery>,
) -> Result<AxumJson<List<WebhookDelivery>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let p = webhooks::deliveries(&call, id, page).await?;
    Ok(AxumJson(List::new(
        p.items.iter().map(delivery).collect(),
        p.has_more,
    )))
}

#[utoipa::path(get, path = "/api/webhook_endpoints/{id}/attempts", tag = "webhooks",
    params(("id" = i64, Path, description = "Endpoint id"), PageQuery),
    responses(
        (status = 200, description = "Every attempt, newest first", body = List<WebhookAttempt>),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn attempts(
    call: Call,
    Id(id): Id,
    Params(q): Params<PageQuery>,
) -> Result<AxumJson<List<WebhookAttempt>>, ApiError> {
    let page = parse_page(q.limit.as_deref(), q.starting_after.as_deref())?;
    let p = webhooks::attempts(&call, id, page).await?;
    Ok(AxumJson(List::new(
        p.items.iter().map(attempt).collect(),
        p.has_more,
    )))
}

#[utoipa::path(post, path = "/api/webhook_endpoints/{id}/redeliver", tag = "webhooks",
    request_body = Redeliver,
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 202, description = "Queued now, with the original `webhook-id` and body", body = WebhookDelivery),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn redeliver(
    call: Call,
    Id(id): Id,
    Json(req): Json<Redeliver>,
) -> Result<(StatusCode, AxumJson<WebhookDelivery>), ApiError> {
    let d = webhooks::redeliver(&call, id, &req.event_id).await?;
    Ok((StatusCode::ACCEPTED, AxumJson(delivery(&d))))
}
