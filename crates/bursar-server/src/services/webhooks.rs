//! Events API and webhook endpoint use cases (issue 5).

use bursar_api::{CreateReplay, CreateWebhookEndpoint, FieldIssue, UpdateWebhookEndpoint};
use bursar_domain::Timestamp;
use bursar_domain::webhook::WebhookSecret;
use bursar_storage::events::{
    Attempt, Delivery, Endpoint, EndpointPatch, LoggedEvent, NewEndpoint, REPLAY_MAX_EVENTS,
    Replay, ReplayRequest, state,
};
use bursar_storage::{Page, PageRequest, StorageError};

use super::{Call, check_text, finish};
use crate::http::error::{ApiError, issue};
use crate::ssrf;

const DESCRIPTION_MAX: usize = 500;
const TYPES_MAX: usize = 50;
const TYPE_MAX: usize = 100;
/// `max_concurrency` bounds, and the default.
const CONCURRENCY_MAX: i64 = 100;
const CONCURRENCY_DEFAULT: i64 = 4;

/// A new endpoint and its secret in clear, shown this once.
pub struct Created {
    pub endpoint: Endpoint,
    pub secret: String,
}

fn check_types(issues: &mut Vec<FieldIssue>, types: &Option<Vec<String>>) {
    if let Some(types) = types {
        check_patterns(issues, "event_types", types);
    }
}

/// Event types are dot-separated `[A-Za-z0-9_]` segments; a pattern may end in `.*` or be `*`.
/// The same patterns filter webhook endpoints and live streams.
pub fn check_patterns(issues: &mut Vec<FieldIssue>, field: &str, types: &[String]) {
    if types.is_empty() || types.len() > TYPES_MAX {
        issues.push(issue(
            field,
            "invalid",
            format!("must list 1 to {TYPES_MAX} event types"),
        ));
    }
    let segment =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    for t in types {
        let body = t.strip_suffix(".*").unwrap_or(t);
        let ok = t == "*" || (t.len() <= TYPE_MAX && body.split('.').all(segment));
        if !ok {
            issues.push(issue(
                field,
                "invalid",
                format!("{t:?} is not an event type, a `prefix.*` pattern or `*`"),
            ));
        }
    }
}

fn check_concurrency(issues: &mut Vec<FieldIssue>, value: Option<i64>) {
    if value.is_some_and(|n| !(1..=CONCURRENCY_MAX).contains(&n)) {
        issues.push(issue(
            "max_concurrency",
            "invalid",
            format!("must be from 1 to {CONCURRENCY_MAX}"),
        ));
    }
}

async fn check_url(call: &Call, issues: &mut Vec<FieldIssue>, raw: &str) {
    let policy = &call.state.webhooks.policy;
    let problem = match reqwest::Url::parse(raw) {
        Err(_) => Some(("invalid_url", "must be an absolute http(s) URL".to_owned())),
        Ok(url) => ssrf::check_url_resolving(policy, &url)
            .await
            .err()
            .map(|p| (p.kind(), p.to_string())),
    };
    if let Some((kind, message)) = problem {
        issues.push(issue("url", kind, message));
    }
}

fn new_secret(call: &Call) -> Result<WebhookSecret, ApiError> {
    let mut bytes = [0u8; 32];
    call.state
        .webhooks
        .secrets
        .random_bytes(&mut bytes)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    WebhookSecret::from_random_bytes(&bytes).map_err(|e| ApiError::internal(e.to_string()))
}

fn seal(call: &Call, secret: &WebhookSecret) -> Result<String, ApiError> {
    call.state
        .webhooks
        .secrets
        .seal(secret.as_str())
        .map_err(|e| ApiError::internal(e.to_string()))
}

pub async fn create(call: &Call, req: CreateWebhookEndpoint) -> Result<Created, ApiError> {
    let mut issues = Vec::new();
    check_url(call, &mut issues, &req.url).await;
    check_types(&mut issues, &req.event_types);
    check_text(
        &mut issues,
        "description",
        &req.description,
        DESCRIPTION_MAX,
    );
    check_concurrency(&mut issues, req.max_concurrency);
    finish(issues)?;
    let secret = new_secret(call)?;
    let new = NewEndpoint {
        url: req.url,
        description: req.description,
        event_types: req.event_types.unwrap_or_else(|| vec!["*".into()]),
        secret_enc: seal(call, &secret)?,
        max_concurrency: req.max_concurrency.unwrap_or(CONCURRENCY_DEFAULT),
        fifo_per_aggregate: req.fifo_per_aggregate.unwrap_or(false),
    };
    let endpoint = call
        .state
        .store
        .create_endpoint(call.auth.account_id, new, call.state.clock.now())
        .await?;
    Ok(Created {
        endpoint,
        secret: secret.as_str().to_owned(),
    })
}

pub async fn get(call: &Call, id: i64) -> Result<Endpoint, ApiError> {
    call.state
        .store
        .get_endpoint(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint"))
}

pub async fn list(call: &Call, page: PageRequest) -> Result<Page<Endpoint>, ApiError> {
    let rows = call
        .state
        .store
        .list_endpoints(call.auth.account_id, page)
        .await?;
    Ok(Page::from_lookahead(rows, page))
}

fn endpoint_not_found(e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound => ApiError::not_found("webhook endpoint"),
        other => other.into(),
    }
}

pub async fn update(
    call: &Call,
    id: i64,
    req: UpdateWebhookEndpoint,
) -> Result<Endpoint, ApiError> {
    let mut issues = Vec::new();
    if let Some(url) = &req.url {
        check_url(call, &mut issues, url).await;
    }
    check_types(&mut issues, &req.event_types);
    check_text(
        &mut issues,
        "description",
        &req.description,
        DESCRIPTION_MAX,
    );
    check_concurrency(&mut issues, req.max_concurrency);
    finish(issues)?;
    let patch = EndpointPatch {
        url: req.url,
        description: req.description.map(Some),
        event_types: req.event_types,
        enabled: req.enabled,
        max_concurrency: req.max_concurrency,
        fifo_per_aggregate: req.fifo_per_aggregate,
    };
    call.state
        .store
        .update_endpoint(call.auth.account_id, id, patch, call.state.clock.now())
        .await
        .map_err(endpoint_not_found)
}

pub async fn delete(call: &Call, id: i64) -> Result<(), ApiError> {
    if call
        .state
        .store
        .delete_endpoint(call.auth.account_id, id)
        .await?
    {
        Ok(())
    } else {
        Err(ApiError::not_found("webhook endpoint"))
    }
}

/// A new secret; the old one keeps signing (beside it) for `rotation_grace_secs`.
pub async fn rotate(call: &Call, id: i64) -> Result<Created, ApiError> {
    let secret = new_secret(call)?;
    let now = call.state.clock.now();
    let grace = call.state.webhooks.config.rotation_grace_secs;
    let until = Timestamp(now.0 + i64::try_from(grace.saturating_mul(1000)).unwrap_or(i64::MAX));
    let endpoint = call
        .state
        .store
        .rotate_secret(call.auth.account_id, id, &seal(call, &secret)?, until, now)
        .await
        .map_err(endpoint_not_found)?;
    Ok(Created {
        endpoint,
        secret: secret.as_str().to_owned(),
    })
}

/// The masked form of an endpoint's current secret, for reads.
pub fn masked_secret(call: &Call, e: &Endpoint) -> String {
    call.state
        .webhooks
        .secrets
        .open(&e.secret_enc)
        .ok()
        .and_then(|s| WebhookSecret::parse(&s).ok())
        .map_or_else(|| "whsec_…".to_owned(), |s| s.masked())
}

pub async fn deliveries(
    call: &Call,
    endpoint_id: i64,
    page: PageRequest,
) -> Result<Page<Delivery>, ApiError> {
    get(call, endpoint_id).await?;
    let rows = call
        .state
        .store
        .list_deliveries(call.auth.account_id, endpoint_id, page)
        .await?;
    Ok(Page::from_lookahead(rows, page))
}

pub async fn attempts(
    call: &Call,
    endpoint_id: i64,
    page: PageRequest,
) -> Result<Page<Attempt>, ApiError> {
    get(call, endpoint_id).await?;
    let rows = call
        .state
        .store
        .list_attempts(call.auth.account_id, endpoint_id, page)
        .await?;
    Ok(Page::from_lookahead(rows, page))
}

pub async fn redeliver(
    call: &Call,
    endpoint_id: i64,
    event_id: &str,
) -> Result<Delivery, ApiError> {
    // A delivery whose attempt is in flight is not queued again by the store: that attempt
    // may already have reached the receiver, which then never sees the redelivery it asked
    // for. So wait for the attempt to be recorded (normally milliseconds after the send)
    // and queue it then; an attempt still running after `IN_FLIGHT_WAIT` is answered as it
    // stands, in flight, with its lease bounding when it is sent again.
    let started = tokio::time::Instant::now();
    loop {
        let d = call
            .state
            .store
            .redeliver(
                call.auth.account_id,
                endpoint_id,
                event_id,
                call.state.clock.now(),
            )
            .await
            .map_err(|e| match e {
                StorageError::NotFound => ApiError::not_found("webhook endpoint or event"),
                other => other.into(),
            })?;
        if d.state != state::IN_FLIGHT || started.elapsed() >= IN_FLIGHT_WAIT {
            call.state.webhooks.relayed.notify_waiters();
            return Ok(d);
        }
        tokio::time::sleep(IN_FLIGHT_POLL).await;
    }
}

/// How long a redelivery waits for an attempt in flight to be recorded.
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const IN_FLIGHT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Resends the endpoint's events of a time range (at most [`REPLAY_MAX_EVENTS`], the oldest),
/// queued at once in one transaction and recorded; the worker then sends them with their
/// original ids and bodies.
pub async fn replay(call: &Call, endpoint_id: i64, req: CreateReplay) -> Result<Replay, ApiError> {
    let now = call.state.clock.now();
    let mut issues = Vec::new();
    let mut time = |field: &str, raw: &str| match chrono::DateTime::parse_from_rfc3339(raw) {
        Ok(t) => Some(Timestamp(t.timestamp_millis())),
        Err(_) => {
            issues.push(issue(field, "invalid", "must be an RFC 3339 time"));
            None
        }
    };
    let since = time("since", &req.since);
    let until = match &req.until {
        Some(raw) => time("until", raw),
        None => Some(now),
    };
    let (since, until) = match (since, until) {
        (Some(since), Some(until)) if since < until => (since, until),
        (Some(_), Some(_)) => {
            issues.push(issue("until", "invalid", "must be later than since"));
            return Err(ApiError::validation(issues));
        }
        _ => return Err(ApiError::validation(issues)),
    };
    let r = call
        .state
        .store
        .replay(
            call.auth.account_id,
            endpoint_id,
            ReplayRequest {
                since,
                until,
                include_succeeded: req.include_succeeded.unwrap_or(false),
                max_events: REPLAY_MAX_EVENTS,
            },
            now,
        )
        .await
        .map_err(endpoint_not_found)?;
    call.state.webhooks.relayed.notify_waiters();
    Ok(r)
}

pub async fn get_replay(call: &Call, endpoint_id: i64, id: i64) -> Result<Replay, ApiError> {
    call.state
        .store
        .get_replay(call.auth.account_id, endpoint_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook replay"))
}

pub async fn list_events(
    call: &Call,
    types: &[String],
    page: PageRequest,
) -> Result<Page<LoggedEvent>, ApiError> {
    let rows = call
        .state
        .store
        .list_events(call.auth.account_id, types, page)
        .await?;
    Ok(Page::from_lookahead(rows, page))
}

pub async fn get_event(call: &Call, event_id: &str) -> Result<LoggedEvent, ApiError> {
    call.state
        .store
        .get_event(call.auth.account_id, event_id)
        .await?
        .ok_or_else(|| ApiError::not_found("event"))
}
