//! `/api/events` and `/api/webhook_endpoints` (issue 5).

use axum::Json as AxumJson;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bursar_api::{
    CreateReplay, CreateWebhookEndpoint, ErrorBody, List, Redeliver, UpdateWebhookEndpoint,
    WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookReplay,
};
use bursar_storage::events::{Attempt, Delivery, Endpoint, LoggedEvent, REPLAY_MAX_EVENTS, Replay};
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

fn endpoint(call: &Call, e: &Endpoint, secret: String) -> WebhookEndpoint {
    let h = &e.health;
    WebhookEndpoint {
        id: e.id,
        object: "webhook_endpoint".into(),
        url: e.url.clone(),
        description: e.description.clone(),
        event_types: e.event_types.clone(),
        enabled: e.enabled,
        disabled_reason: e.disabled_reason.clone(),
        max_concurrency: e.max_concurrency,
        fifo_per_aggregate: e.fifo_per_aggregate,
        circuit_state: h.circuit_state(call.state.clock.now()).to_owned(),
        circuit_open_until: h.circuit_open_until.filter(|_| h.circuit_open).map(time),
        first_failure_at: h.first_failure_at.map(time),
        consecutive_failures: h.consecutive_failures,
        secret,
        previous_secret_expires_at: e.previous_secret_expires_at.map(time),
        version: e.version,
        created_at: time(e.created_at),
        updated_at: time(e.updated_at),
    }
}

fn masked(call: &Call, e: &Endpoint) -> WebhookEndpoint {
    endpoint(call, e, webhooks::masked_secret(call, e))
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
        id: a.id,
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
        &endpoint(&call, e, c.secret),
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
    Ok(AxumJson(endpoint(&call, &c.endpoint, c.secret)))
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

fn replay(r: &Replay) -> WebhookReplay {
    WebhookReplay {
        id: r.id,
        object: "webhook_replay".into(),
        endpoint_id: r.endpoint_id,
        status: r.status.clone(),
        since: time(r.since),
        until: time(r.until),
        include_succeeded: r.include_succeeded,
        events_matched: r.events_matched,
        deliveries_created: r.deliveries_created,
        deliveries_requeued: r.deliveries_requeued,
        capped: r.capped,
        next_since: r.next_since.map(time),
        max_events: REPLAY_MAX_EVENTS,
        created_at: time(r.created_at),
    }
}

#[utoipa::path(post, path = "/api/webhook_endpoints/{id}/replay", tag = "webhooks",
    request_body = CreateReplay,
    params(("id" = i64, Path, description = "Endpoint id")),
    responses(
        (status = 202, description = "Queued: the endpoint's events of the range (by event time, matching its `event_types`, at most 10,000, oldest first) go out again with their original `webhook-id` and body; events already queued are not queued twice", body = WebhookReplay),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_replay(
    call: Call,
    Id(id): Id,
    Json(req): Json<CreateReplay>,
) -> Result<Response, ApiError> {
    let r = webhooks::replay(&call, id, req).await?;
    let location = format!("/api/webhook_endpoints/{id}/replays/{}", r.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        AxumJson(replay(&r)),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/webhook_endpoints/{id}/replays/{replay_id}", tag = "webhooks",
    params(
        ("id" = i64, Path, description = "Endpoint id"),
        ("replay_id" = i64, Path, description = "Replay id")),
    responses(
        (status = 200, description = "The replay and what it queued", body = WebhookReplay),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_replay(
    call: Call,
    Path((id, replay_id)): Path<(String, String)>,
) -> Result<AxumJson<WebhookReplay>, ApiError> {
    let parse = |raw: &str| raw.parse::<i64>().ok().filter(|&n| n > 0);
    let (Some(id), Some(replay_id)) = (parse(&id), parse(&replay_id)) else {
        return Err(ApiError::not_found("webhook replay"));
    };
    let r = webhooks::get_replay(&call, id, replay_id).await?;
    Ok(AxumJson(replay(&r)))
}
