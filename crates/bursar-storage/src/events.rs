//! The event log and webhook delivery (issue 5): sequencing committed outbox rows, the
//! events API, webhook endpoints, and the delivery queue with leases and fencing tokens.
//!
//! Business commands append `outbox_events` rows in their own transaction (no dual write).
//! A relay then *sequences* them: in one transaction, serialised across relays, it gives each
//! committed, unsequenced row its public `event_id`, the next per-account `seq` and its rendered
//! body (the exact bytes every webhook, SSE frame and NATS message carries), and fans it out to
//! one `webhook_deliveries` row per matching endpoint (`UNIQUE (event_id, endpoint_id)`).
//! Assigning `seq` after commit, in one serialised step, is what keeps a `seq > last` reader
//! from skipping a row that committed late (the sequence-gap trap of spec §3.5).

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::{NewEvent, PageRequest, Result};

/// A sequenced event, as the events API, SSE, NATS and webhooks serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub event_id: String,
    pub seq: i64,
    pub account_id: AccountId,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: i64,
    pub aggregate_version: i64,
    pub request_id: String,
    pub trace_id: String,
    pub created_at: Timestamp,
    /// The rendered event (see [`render_body`]): sent byte for byte, never re-serialised.
    pub body: String,
}

/// The wire form of an event. Field order is fixed here, once, for every transport.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    /// The event time (RFC 3339, UTC, milliseconds).
    timestamp: String,
    seq: i64,
    account_id: AccountId,
    request_id: &'a str,
    trace_id: &'a str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    aggregate_type: &'a str,
    aggregate_id: i64,
    aggregate_version: i64,
    object: &'a RawValue,
}

/// What the relay decides for each event it sequences: its public id, and the public form of
/// the aggregate snapshot written with the business change (the API object, as `GET` of the
/// resource serves it). Storage writes what the server decides; a plain closure gives ids and
/// keeps snapshots as stored.
pub trait EventRenderer: Send + Sync {
    fn new_id(&self) -> String;

    /// The public JSON of `payload`, a snapshot of an `aggregate_type`; `None` keeps it as is.
    fn object(&self, aggregate_type: &str, payload: &str) -> Option<String> {
        let _ = (aggregate_type, payload);
        None
    }
}

impl<F: Fn() -> String + Send + Sync> EventRenderer for F {
    fn new_id(&self) -> String {
        self()
    }
}

/// Renders an event's body: `{"id","type","timestamp","seq","account_id","request_id",
/// "trace_id","data":{"aggregate_type","aggregate_id","aggregate_version","object"}}`.
/// `e.body` is ignored; `object` is the aggregate's JSON (see [`EventRenderer::object`]).
pub fn render_body(e: &LoggedEvent, object: &str) -> Result<String> {
    let object: &RawValue =
        serde_json::from_str(object).map_err(|err| crate::StorageError::Internal(Box::new(err)))?;
    let envelope = Envelope {
        id: &e.event_id,
        event_type: &e.event_type,
        timestamp: e.created_at.rfc3339(),
        seq: e.seq,
        account_id: e.account_id,
        request_id: &e.request_id,
        trace_id: &e.trace_id,
        data: Data {
            aggregate_type: &e.aggregate_type,
            aggregate_id: e.aggregate_id,
            aggregate_version: e.aggregate_version,
            object,
        },
    };
    serde_json::to_string(&envelope).map_err(|err| crate::StorageError::Internal(Box::new(err)))
}

/// Does `event_type` match one of `patterns`? `*` matches everything; `order.*` matches every
/// type whose first segment is `order`; anything else matches exactly.
pub fn type_matches(patterns: &[String], event_type: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p == event_type
            || p.strip_suffix(".*").is_some_and(|prefix| {
                event_type
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
    })
}

/// A webhook endpoint. Secrets are stored encrypted; the store never sees them in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: i64,
    pub account_id: AccountId,
    pub url: String,
    pub description: Option<String>,
    /// Event-type patterns (see [`type_matches`]).
    pub event_types: Vec<String>,
    pub secret_enc: String,
    /// The secret replaced by the last rotation, while it still signs deliveries.
    pub previous_secret_enc: Option<String>,
    pub previous_secret_expires_at: Option<Timestamp>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    /// At most this many of its deliveries are in flight at once, across all workers.
    pub max_concurrency: i64,
    /// Per-aggregate FIFO: a delivery is claimed only once every earlier delivery (by event
    /// sequence) of the same aggregate to this endpoint has finished.
    pub fifo_per_aggregate: bool,
    pub health: Health,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

pub struct NewEndpoint {
    pub url: String,
    pub description: Option<String>,
    pub event_types: Vec<String>,
    pub secret_enc: String,
    pub max_concurrency: i64,
    pub fifo_per_aggregate: bool,
}

/// Fields an update may change (`None` = unchanged).
#[derive(Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub event_types: Option<Vec<String>>,
    /// `Some(true)` also clears the disabled reason and the endpoint's health (failure clock,
    /// circuit).
    pub enabled: Option<bool>,
    pub max_concurrency: Option<i64>,
    pub fifo_per_aggregate: Option<bool>,
}

/// Delivery states (spec §2.3).
pub mod state {
    pub const PENDING: &str = "pending";
    pub const IN_FLIGHT: &str = "in_flight";
    pub const RETRYING: &str = "retrying";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub account_id: AccountId,
    pub endpoint_id: i64,
    pub event_id: String,
    pub event_type: String,
    pub state: String,
    pub attempt_count: i64,
    pub next_attempt_at: Timestamp,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Its id in the delivery log (the `starting_after` cursor of the attempts list); 0 for
    /// an attempt being recorded.
    pub id: i64,
    pub delivery_id: i64,
    pub attempt_no: i64,
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    /// `None` on success; otherwise `timeout`, `connect`, `tls`, `blocked_ip`, `http_status`,
    /// `lease_lost`.
    pub error_kind: Option<String>,
    /// At most 16 KiB of the answer's body.
    pub response_snippet: Option<String>,
    pub created_at: Timestamp,
}

/// A delivery a worker holds a lease on, with what it needs to send it.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub account_id: AccountId,
    pub endpoint_id: i64,
    pub attempt_no: i64,
    pub event_id: String,
    pub body: String,
    pub url: String,
    pub secret_enc: String,
    pub previous_secret_enc: Option<String>,
    pub previous_secret_expires_at: Option<Timestamp>,
    pub request_id: String,
    pub trace_id: String,
    /// The slot of its endpoint it was leased to, where the store leases ahead
    /// ([`EventLogStore::claim_ahead`]): the deliveries of one slot are sent one after the
    /// other, never two at once. `None`: a slot of its own.
    pub slot: Option<i64>,
}

/// How an attempt ends a delivery's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Failed; try again at this time.
    Retry(Timestamp),
    /// Failed and out of attempts.
    Exhausted,
    /// The receiver answered 410: the endpoint is disabled and its pending deliveries cancelled.
    Gone,
}

/// What a finished attempt writes.
#[derive(Debug, Clone)]
pub struct Completion {
    pub delivery_id: i64,
    pub lease_token: String,
    pub attempt: Attempt,
    pub outcome: Outcome,
    /// How the attempt moves its endpoint's health (circuit breaker, auto-disable).
    pub policy: HealthPolicy,
}

/// The endpoint health rules (spec §2.3), applied by the completion of each attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// This many consecutive failed attempts open the circuit.
    pub breaker_threshold: i64,
    /// How long an open circuit sends nothing before it lets one probe through.
    pub cooldown_ms: i64,
    /// Failing for longer than this with no success disables the endpoint.
    pub disable_after_ms: i64,
    /// The failure-rate trigger: at least half of at least this many attempts failed...
    pub rate_min_attempts: i64,
    /// ...within this long before the failure being recorded (spec: 20 attempts, 5 minutes).
    pub rate_window_ms: i64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            breaker_threshold: 5,
            cooldown_ms: 60_000,
            disable_after_ms: 5 * 24 * 3_600_000,
            rate_min_attempts: 20,
            rate_window_ms: 300_000,
        }
    }
}

/// The endpoint's recent attempts before the one being recorded, for the failure-rate
/// trigger: its last [`RECENT_ATTEMPTS`] at most, within `rate_window_ms`, lost leases not
/// counted. Backends read it only for a failure of a closed circuit (the only case that uses
/// it), so healthy traffic pays nothing for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    pub attempts: i64,
    pub failures: i64,
}

/// How many of an endpoint's latest attempts the failure-rate trigger looks at, at most.
pub const RECENT_ATTEMPTS: i64 = 100;

/// An endpoint's health, as stored on the endpoint row.
///
/// The circuit is *closed* (deliveries flow up to `max_concurrency` at once), *open* (nothing
/// is claimed until `circuit_open_until`), or *half-open*: open with `circuit_open_until`
/// past, when claims let one delivery at a time through, the probe. Only completions change
/// it (see [`Health::after`]); claims only read it, so a half-open circuit needs no state of
/// its own: the probe's live lease is what keeps a second one from being claimed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// When the current unbroken run of failed attempts began; `None` after any 2xx.
    pub first_failure_at: Option<Timestamp>,
    pub consecutive_failures: i64,
    pub circuit_open: bool,
    pub circuit_open_until: Option<Timestamp>,
}

/// SQL: endpoint `$ep` is in full health (its columns equal [`Health::default`]), spelled
/// here beside the struct so the two cannot drift; a statement that writes plain successes
/// (see [`plain_successes`]) without reading the endpoint first checks it with this.
#[macro_export]
macro_rules! endpoint_healthy {
    ($ep:literal) => {
        concat!(
            $ep,
            ".first_failure_at IS NULL AND ",
            $ep,
            ".consecutive_failures = 0 AND ",
            $ep,
            ".circuit_state <> 'open' AND ",
            $ep,
            ".circuit_open_until IS NULL"
        )
    };
}

/// What one finished attempt does to its endpoint (see [`Health::after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// The endpoint's health from now on.
    pub health: Health,
    /// The circuit (re)opened: pending and retrying deliveries of the endpoint that are due
    /// earlier wait until then (their attempt count does not move).
    pub defer_backlog_until: Option<Timestamp>,
    /// The circuit closed: the backlog is due now (the recovery fast path).
    pub drain_backlog: bool,
    /// Disable the endpoint, for this reason (`gone`: a 410; `failing`: failures for longer
    /// than `disable_after`).
    pub disable: Option<&'static str>,
}

/// Circuit states as the API shows them.
pub mod circuit {
    pub const CLOSED: &str = "closed";
    pub const OPEN: &str = "open";
    pub const HALF_OPEN: &str = "half_open";
}

impl HealthChange {
    /// When a failed attempt's delivery is next due: the schedule's time, or the end of the
    /// cooldown if the circuit is open until later (the attempt was in flight when it opened).
    pub fn next_attempt(&self, outcome: Outcome) -> Option<Timestamp> {
        let Outcome::Retry(at) = outcome else {
            return None;
        };
        match (self.health.circuit_open, self.health.circuit_open_until) {
            (true, Some(until)) if until > at => Some(until),
            _ => Some(at),
        }
    }
}

impl Health {
    /// `closed`, `open`, or `half_open` (open, cooldown over: one probe at a time).
    pub fn circuit_state(&self, now: Timestamp) -> &'static str {
        match (self.circuit_open, self.circuit_open_until) {
            (false, _) => circuit::CLOSED,
            (true, Some(until)) if until <= now => circuit::HALF_OPEN,
            (true, _) => circuit::OPEN,
        }
    }

    /// How an attempt of the endpoint that ended with `outcome` at `now` changes its health;
    /// `None` when nothing changes. Both backends apply exactly this, inside the attempt's
    /// completion transaction.
    ///
    /// - A 2xx resets the failure clock and closes an open circuit (a probe's success, or
    ///   any attempt that was still in flight when it opened), draining the backlog.
    /// - A failure counts; the `breaker_threshold`-th in a row opens a closed circuit for
    ///   `cooldown_ms`, and so does a failure that makes at least half of the endpoint's
    ///   `recent` attempts in `rate_window_ms` (this one included, at least
    ///   `rate_min_attempts` of them) failures — an endpoint that fails every other request
    ///   never reaches the threshold in a row. Any failure of a half-open circuit (the probe's)
    ///   reopens it. A
    ///   failure while it is open and cooling down (an attempt in flight when it opened)
    ///   changes nothing but the count.
    /// - A failure more than `disable_after_ms` after the first of an unbroken run disables
    ///   the endpoint (`failing`); a 410 disables it at once (`gone`).
    pub fn after(
        &self,
        outcome: Outcome,
        now: Timestamp,
        p: &HealthPolicy,
        recent: Recent,
    ) -> Option<HealthChange> {
        let mut change = HealthChange {
            health: self.clone(),
            defer_backlog_until: None,
            drain_backlog: false,
            disable: None,
        };
        match outcome {
            Outcome::Succeeded => {
                if *self == Health::default() {
                    return None;
                }
                change.health = Health::default();
                change.drain_backlog = self.circuit_open;
            }
            Outcome::Gone => change.disable = Some("gone"),
            Outcome::Retry(_) | Outcome::Exhausted => {
                let h = &mut change.health;
                h.consecutive_failures += 1;
                let since = *h.first_failure_at.get_or_insert(now);
                let reopen = match (self.circuit_open, self.circuit_open_until) {
                    (false, _) => {
                        let (attempts, failures) = (recent.attempts + 1, recent.failures + 1);
                        h.consecutive_failures >= p.breaker_threshold
                            || (attempts >= p.rate_min_attempts && failures * 2 >= attempts)
                    }
                    (true, Some(until)) => until <= now,
                    (true, None) => true,
                };
                if reopen {
                    let until = Timestamp(now.0.saturating_add(p.cooldown_ms));
                    h.circuit_open = true;
                    h.circuit_open_until = Some(until);
                    change.defer_backlog_until = Some(until);
                }
                if now.0 - since.0 > p.disable_after_ms {
                    change.disable = Some("failing");
                }
            }
        }
        Some(change)
    }
}

/// Operational events (spec §2.2): written to the outbox by the completion that causes them,
/// in its transaction, so each is written once; then sequenced, listed and delivered like
/// business events, with two rules that keep them from feeding themselves:
///
/// - an operational event names the endpoint it is about (`outbox_events.about_endpoint_id`)
///   and is never fanned out or replayed to that endpoint;
/// - deliveries of operational events never cause operational events (their failures still
///   count for the circuit and the failure clock). Without this, two failing endpoints that
///   both subscribe to `*` would notify each other about each other's notifications forever.
pub mod operational {
    pub const DELIVERY_FAILING: &str = "webhook.delivery.failing";
    pub const DELIVERY_EXHAUSTED: &str = "webhook.delivery.exhausted";
    pub const DELIVERY_RECOVERED: &str = "webhook.delivery.recovered";
    pub const ENDPOINT_DISABLED: &str = "webhook.endpoint.disabled";
    /// `webhook.delivery.failing` follows the failure of this attempt of a delivery;
    /// `webhook.delivery.recovered` a success after it.
    pub const FAILING_AFTER_ATTEMPTS: i64 = 4;

    /// Is `event_type` an operational event?
    pub fn is_operational(event_type: &str) -> bool {
        event_type.starts_with("webhook.")
    }
}

/// The object of a `webhook.delivery.*` event: the delivery after the attempt.
#[derive(Serialize)]
struct DeliveryNotice<'a> {
    id: i64,
    endpoint_id: i64,
    event_id: &'a str,
    event_type: &'a str,
    state: &'a str,
    attempt_count: i64,
    next_attempt_at: Option<Timestamp>,
    last_status: Option<i64>,
    last_error: Option<&'a str>,
}

/// The object of a `webhook.endpoint.disabled` event: the endpoint, without its secrets.
#[derive(Serialize)]
struct EndpointNotice<'a> {
    id: i64,
    url: &'a str,
    description: Option<&'a str>,
    event_types: &'a [String],
    enabled: bool,
    disabled_reason: Option<&'a str>,
    max_concurrency: i64,
    fifo_per_aggregate: bool,
    version: i64,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// An attempt whose completion held its lease, as the completion saw it.
pub struct Finished<'a> {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    pub event_id: &'a str,
    /// The type of the event delivered.
    pub event_type: &'a str,
    pub attempt: &'a Attempt,
    pub outcome: Outcome,
    /// The delivery's `last_error` before this attempt: `Some` when its previous attempt failed.
    pub previous_error: Option<&'a str>,
}

fn notice_event(
    event_type: &str,
    aggregate_type: &'static str,
    id: i64,
    version: i64,
    object: &impl Serialize,
) -> NewEvent {
    NewEvent {
        event_type: event_type.to_owned(),
        aggregate_type,
        aggregate_id: id,
        aggregate_version: version,
        payload: serde_json::to_string(object)
            .expect("notices are plain data and always serialise"),
    }
}

/// SQL: per-aggregate FIFO lets delivery `$d` be claimed (it carries no aggregate, or no earlier
/// delivery of its aggregate to its endpoint is unfinished). Backends read it from a partial
/// index of unfinished rows that carry an aggregate, so endpoints without FIFO pay nothing.
/// A claim holds its endpoint exclusively (SQLite's write lock, PostgreSQL's advisory lock per
/// endpoint), so no other claim leases a delivery of the same endpoint meanwhile.
#[macro_export]
macro_rules! fifo_ready {
    ($d:literal) => {
        concat!(
            "(",
            $d,
            ".aggregate_key IS NULL OR NOT EXISTS (SELECT 1 FROM webhook_deliveries f \
             WHERE f.endpoint_id = ",
            $d,
            ".endpoint_id AND f.aggregate_key = ",
            $d,
            ".aggregate_key AND f.event_seq < ",
            $d,
            ".event_seq \
             AND f.state IN ('pending', 'retrying', 'in_flight')))"
        )
    };
}

/// SQL: the `aggregate_key, event_seq` values of a new delivery of event `$ev` to endpoint
/// `$ep`, the one definition of what FIFO orders by (the event's aggregate, `order:42`, and its
/// sequence): set only when the endpoint has per-aggregate FIFO. Every statement that creates
/// deliveries (fan-out, redelivery, replay) uses it.
#[macro_export]
macro_rules! fifo_columns {
    ($ep:literal, $ev:literal) => {
        concat!(
            "CASE WHEN ",
            $ep,
            ".fifo_per_aggregate THEN ",
            $ev,
            ".aggregate_type || ':' || ",
            $ev,
            ".aggregate_id END, CASE WHEN ",
            $ep,
            ".fifo_per_aggregate THEN ",
            $ev,
            ".seq END"
        )
    };
}

/// Whether a completion is plain (see [`plain_successes`]) as long as its endpoint is in full
/// health: a success that cannot cause a `recovered` notice. A batch of only these (each
/// delivery once) can be written before its endpoints' health is known, by a statement that
/// takes the ones whose endpoint it finds healthy and leaves the rest to the caller.
pub fn plain_if_healthy(c: &Completion) -> bool {
    matches!(c.outcome, Outcome::Succeeded)
        && c.attempt.attempt_no <= operational::FAILING_AFTER_ATTEMPTS
}

/// Which completions of a batch can be written together, as multi-row statements, without
/// reading or changing anything else: successes that cannot cause a `recovered` notice (at most
/// [`FAILING_AFTER_ATTEMPTS`](operational::FAILING_AFTER_ATTEMPTS) attempts) at an endpoint in
/// full health (which a success leaves as it is, so [`Health::after`] has nothing to apply).
/// An endpoint with any other completion in the batch, or a delivery that appears twice, sends
/// all of that endpoint's completions one by one instead. The two groups concern different
/// endpoints, so recording one before the other decides everything exactly as in arrival order.
///
/// `endpoints` maps each delivery of the batch to its endpoint, as read in the completion's
/// transaction (a delivery missing from it, e.g. deleted with its endpoint, is not plain).
pub fn plain_successes(
    cs: &[Completion],
    endpoints: std::collections::HashMap<i64, Endpoint>,
) -> Vec<bool> {
    use std::collections::HashSet;
    let mut seen = HashSet::new();
    let mut mixed = HashSet::new();
    for c in cs {
        let Some(e) = endpoints.get(&c.delivery_id) else {
            continue;
        };
        if !seen.insert(c.delivery_id) || !plain_if_healthy(c) || e.health != Health::default() {
            mixed.insert(e.id);
        }
    }
    cs.iter()
        .map(|c| {
            endpoints
                .get(&c.delivery_id)
                .is_some_and(|e| !mixed.contains(&e.id))
        })
        .collect()
}

/// The `webhook.delivery.*` events an attempt causes: `failing` when its attempt number
/// [`FAILING_AFTER_ATTEMPTS`](operational::FAILING_AFTER_ATTEMPTS) fails and more follow,
/// `exhausted` when its last attempt fails, `recovered` when it succeeds after a failed attempt
/// at or past that number. Their aggregate is the delivery, versioned by attempt number.
pub fn delivery_events(f: &Finished<'_>) -> Vec<NewEvent> {
    use operational::*;
    if is_operational(f.event_type) {
        return Vec::new();
    }
    let n = f.attempt.attempt_no;
    let (event_type, state, next) = match f.outcome {
        Outcome::Retry(at) if n == FAILING_AFTER_ATTEMPTS => {
            (DELIVERY_FAILING, state::RETRYING, Some(at))
        }
        Outcome::Exhausted => (DELIVERY_EXHAUSTED, state::FAILED, None),
        Outcome::Succeeded if n > FAILING_AFTER_ATTEMPTS && f.previous_error.is_some() => {
            (DELIVERY_RECOVERED, state::SUCCEEDED, None)
        }
        _ => return Vec::new(),
    };
    let notice = DeliveryNotice {
        id: f.delivery_id,
        endpoint_id: f.endpoint_id,
        event_id: f.event_id,
        event_type: f.event_type,
        state,
        attempt_count: n,
        next_attempt_at: next,
        last_status: f.attempt.status_code,
        last_error: f.attempt.error_kind.as_deref(),
    };
    vec![notice_event(
        event_type,
        "webhook_delivery",
        f.delivery_id,
        n,
        &notice,
    )]
}

/// The `webhook.endpoint.disabled` event of an endpoint just disabled (versioned by the
/// endpoint's version).
pub fn endpoint_disabled_event(e: &Endpoint) -> NewEvent {
    let notice = EndpointNotice {
        id: e.id,
        url: &e.url,
        description: e.description.as_deref(),
        event_types: &e.event_types,
        enabled: e.enabled,
        disabled_reason: e.disabled_reason.as_deref(),
        max_concurrency: e.max_concurrency,
        fifo_per_aggregate: e.fifo_per_aggregate,
        version: e.version,
        created_at: e.created_at,
        updated_at: e.updated_at,
    };
    notice_event(
        operational::ENDPOINT_DISABLED,
        "webhook_endpoint",
        e.id,
        e.version,
        &notice,
    )
}

/// At most this many events are replayed by one request; the replay says when it hit it.
pub const REPLAY_MAX_EVENTS: i64 = 10_000;

/// What a replay asks for: events with `since <= event time < until`.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub since: Timestamp,
    pub until: Timestamp,
    /// Also resend events the endpoint already got (succeeded deliveries).
    pub include_succeeded: bool,
    /// Take at most this many events, the oldest (the API uses [`REPLAY_MAX_EVENTS`]).
    pub max_events: i64,
}

/// A replay as recorded. It runs in one transaction within the request, so it is always
/// `completed` when it is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub id: i64,
    pub account_id: AccountId,
    pub endpoint_id: i64,
    pub since: Timestamp,
    pub until: Timestamp,
    pub include_succeeded: bool,
    pub status: String,
    /// Events in the range that the endpoint's filter matches (at most `max_events`).
    pub events_matched: i64,
    /// Deliveries created for matched events the endpoint never had.
    pub deliveries_created: i64,
    /// Failed or cancelled (and, with `include_succeeded`, succeeded) deliveries made pending.
    pub deliveries_requeued: i64,
    /// More events matched than `max_events`; the oldest were taken.
    pub capped: bool,
    /// When capped: the event time of the first event left out, the `since` of the next
    /// replay (events of that same time already queued are not queued twice).
    pub next_since: Option<Timestamp>,
    pub created_at: Timestamp,
}

/// An endpoint's patterns split for SQL: `*`, exact types, and `prefix.*` prefixes.
pub struct TypeFilter {
    pub all: bool,
    pub exact: Vec<String>,
    pub prefixes: Vec<String>,
}

impl TypeFilter {
    pub fn new(patterns: &[String]) -> TypeFilter {
        let mut f = TypeFilter {
            all: false,
            exact: Vec::new(),
            prefixes: Vec::new(),
        };
        for p in patterns {
            if p == "*" {
                f.all = true;
            } else if let Some(prefix) = p.strip_suffix(".*") {
                f.prefixes.push(prefix.to_owned());
            } else {
                f.exact.push(p.clone());
            }
        }
        f
    }
}

/// Events and webhooks, for both backends. Every method scoped to an account takes it.
#[async_trait]
pub trait EventLogStore: Send + Sync {
    /// Sequences up to `limit` committed, unsequenced events in commit order: each gets
    /// `event_id` from `new_id`, the next `seq` of its account and its body, and one pending
    /// delivery per enabled endpoint of its account whose patterns match (but never to the
    /// endpoint an operational event is about). One transaction,
    /// serialised against other relays. Returns the events sequenced, in `seq` order.
    ///
    /// `published`: the caller's own hand-off after the commit is the publication (a single
    /// instance without NATS, whose in-process broadcast follows at once), so the events are
    /// marked published by this transaction instead of a second write per pass. With NATS it
    /// is `false`, and the publisher marks them once JetStream has acknowledged them.
    async fn sequence_events(
        &self,
        limit: u32,
        now: Timestamp,
        render: &dyn EventRenderer,
        published: bool,
    ) -> Result<Vec<LoggedEvent>>;

    /// Events of `account` with `seq > after`, oldest first (SSE backfill and resume).
    async fn events_after(
        &self,
        account: AccountId,
        after: i64,
        types: &[String],
        limit: u32,
    ) -> Result<Vec<LoggedEvent>>;

    /// Sequenced events not yet handed to the live fan-out, oldest sequencing first (per
    /// account in `seq` order): the publisher's backlog. Publishing is at least once; a
    /// crash between the hand-off and [`EventLogStore::mark_published`] re-sends, and
    /// JetStream drops the copy by its `Nats-Msg-Id`.
    async fn unpublished_events(&self, limit: u32) -> Result<Vec<LoggedEvent>>;

    /// Records that these events were published (after JetStream acknowledged them, or the
    /// in-process broadcast took them). Returns how many were newly marked.
    async fn mark_published(&self, event_ids: &[String], now: Timestamp) -> Result<u64>;

    /// Events of `account`, newest first, `seq < before` when given (the events API).
    async fn list_events(
        &self,
        account: AccountId,
        types: &[String],
        page: PageRequest,
    ) -> Result<Vec<LoggedEvent>>;

    async fn get_event(&self, account: AccountId, event_id: &str) -> Result<Option<LoggedEvent>>;

    async fn create_endpoint(
        &self,
        account: AccountId,
        new: NewEndpoint,
        now: Timestamp,
    ) -> Result<Endpoint>;
    async fn get_endpoint(&self, account: AccountId, id: i64) -> Result<Option<Endpoint>>;
    async fn list_endpoints(&self, account: AccountId, page: PageRequest) -> Result<Vec<Endpoint>>;
    /// `NotFound` when there is no such endpoint.
    async fn update_endpoint(
        &self,
        account: AccountId,
        id: i64,
        patch: EndpointPatch,
        now: Timestamp,
    ) -> Result<Endpoint>;
    /// Deletes the endpoint with its deliveries and attempts; `false` if there was none.
    async fn delete_endpoint(&self, account: AccountId, id: i64) -> Result<bool>;
    /// Replaces the secret; the old one keeps signing until `previous_expires_at`.
    async fn rotate_secret(
        &self,
        account: AccountId,
        id: i64,
        new_secret_enc: &str,
        previous_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<Endpoint>;

    async fn list_deliveries(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Delivery>>;
    async fn list_attempts(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Attempt>>;
    /// Queues `event_id` for the endpoint again, now (a new delivery, or an existing one not
    /// in flight made pending). `NotFound` when the event or endpoint is not the account's.
    async fn redeliver(
        &self,
        account: AccountId,
        endpoint_id: i64,
        event_id: &str,
        now: Timestamp,
    ) -> Result<Delivery>;

    /// Leases up to `limit` due deliveries (pending or retrying and due, or in flight with a
    /// lapsed lease) of enabled endpoints, under `lease_token` until `lease_until`; each claim
    /// counts an attempt. An in-flight delivery taken over gets its lost attempt recorded as
    /// `lease_lost`. Oldest due first, within each endpoint's room:
    ///
    /// - an endpoint never has more than `max_concurrency` deliveries under a live lease
    ///   (`lease_expires_at >= now`), whatever the number of claimers;
    /// - an open circuit (see [`Health`]) gets nothing claimed until `circuit_open_until`;
    ///   after it, one delivery at a time (the probe) while no other is under a live lease.
    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>>;

    /// [`claim_deliveries`](Self::claim_deliveries) for up to `limit` slots, where each slot
    /// of an endpoint with a closed circuit may lease up to `depth` of its due deliveries
    /// ahead ([`ClaimedDelivery::slot`]), and the cap counts slots, not deliveries: an
    /// endpoint never has more than `max_concurrency` slots with a live lease. A worker sends
    /// a slot's deliveries one after the other, so the receiver never has more requests in
    /// flight than the cap, and sends the next while the previous one's attempt is being
    /// recorded. Why: at a busy endpoint a slot's turn was its send plus the wait for its
    /// record, and with the cap bounding the slots, that wait bounded the endpoint's rate.
    /// A handed-on lease ([`complete_and_hand_on`](Self::complete_and_hand_on)) stays in its
    /// slot. The default leases one delivery per slot (`depth` ignored), for a backend whose
    /// records are cheap.
    async fn claim_ahead(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
        depth: u32,
    ) -> Result<Vec<ClaimedDelivery>> {
        let _ = depth;
        self.claim_deliveries(now, lease_until, lease_token, limit)
            .await
    }

    /// Gives back deliveries leased ahead under `lease_token` that were never sent (a worker
    /// stopping, a slot whose last send failed): each is due again as it was before the
    /// claim, its attempt not counted, so no attempt that never happened is recorded as lost
    /// — unless its endpoint answered 410 meanwhile: then it is cancelled (`gone`), as the
    /// 410 cancelled the endpoint's other due deliveries. Rows no longer under the token are
    /// left alone. Returns how many it gave back.
    async fn return_unsent(&self, lease_token: &str, ids: &[i64], now: Timestamp) -> Result<u64>;

    /// Records the attempt and applies the outcome if the lease is still `lease_token`'s;
    /// otherwise records the attempt as `lease_lost` and changes nothing else (`false`).
    /// With the lease held, in the same transaction: the endpoint's health moves as
    /// [`Health::after`] says (deferring or draining its backlog, disabling it; a 410 also
    /// cancels its pending deliveries), and the operational events of [`delivery_events`] and
    /// [`endpoint_disabled_event`] are appended to the outbox.
    async fn complete_delivery(&self, c: Completion, now: Timestamp) -> Result<bool>;

    /// [`complete_delivery`](Self::complete_delivery) for several attempts in one transaction
    /// (all or none), in order, answering one `bool` per completion. Why: a worker finishes
    /// many sends at once, and one commit for all of them instead of one each is what lets
    /// deliveries keep up with fan-out (the same reasoning as group commit for creates).
    async fn complete_deliveries(&self, cs: Vec<Completion>, now: Timestamp) -> Result<Vec<bool>>;

    /// [`complete_deliveries`](Self::complete_deliveries), and, with `hand_on_until` given,
    /// in the same statement: each held success at an endpoint in full health may hand its
    /// lease on to one of that endpoint's oldest due deliveries (pending or retrying,
    /// per-aggregate FIFO respected), leased under the same token until `hand_on_until`,
    /// its attempt counted, and returned beside the completion it follows. The endpoint's
    /// number of live leases does not move, so the cap holds without a claim's count; an
    /// endpoint that is disabled, has an open circuit or more live leases than its cap hands
    /// nothing on. Why: at a busy endpoint a claim's round trips between one send's end and
    /// the next send's start were a third of each delivery's cycle, and with the cap bounding
    /// what is in flight, the cycle bounds the rate. The default hands nothing on, for a
    /// backend whose claims are cheap.
    async fn complete_and_hand_on(
        &self,
        cs: Vec<Completion>,
        now: Timestamp,
        hand_on_until: Option<Timestamp>,
    ) -> Result<Vec<(bool, Option<ClaimedDelivery>)>> {
        let _ = hand_on_until;
        let held = self.complete_deliveries(cs, now).await?;
        Ok(held.into_iter().map(|h| (h, None)).collect())
    }

    /// Retention: deletes at most `limit` rows belonging to finished deliveries (succeeded,
    /// failed, cancelled) last changed before `before` — their attempts first, then the
    /// deliveries left without attempts — in one statement, so each call is one short
    /// transaction and claims get the database between calls. Pending, retrying and in-flight
    /// deliveries and the events themselves are never touched. Returns the rows deleted (0:
    /// nothing left to purge).
    async fn purge_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64>;

    /// Ends leases held under `lease_token` (graceful shutdown): due again now.
    async fn release_deliveries(&self, lease_token: &str, now: Timestamp) -> Result<u64>;

    /// Queues the endpoint's events of `req`'s time range again, in one transaction: the
    /// sequenced events of `account` with `since <= created_at < until` that the endpoint's
    /// patterns match (operational events about the endpoint itself excepted), the oldest
    /// `max_events` by `seq`. Events it never had get a pending delivery; failed and
    /// cancelled deliveries (and succeeded ones with `include_succeeded`) become pending now;
    /// pending, retrying and in-flight ones stay as they are, so no event is queued twice.
    /// Records and returns the replay. `NotFound` when the endpoint is not the account's.
    async fn replay(
        &self,
        account: AccountId,
        endpoint_id: i64,
        req: ReplayRequest,
        now: Timestamp,
    ) -> Result<Replay>;

    async fn get_replay(
        &self,
        account: AccountId,
        endpoint_id: i64,
        id: i64,
    ) -> Result<Option<Replay>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(delivery_id: i64, attempt_no: i64, outcome: Outcome) -> Completion {
        Completion {
            delivery_id,
            lease_token: "t".into(),
            attempt: Attempt {
                id: 0,
                delivery_id,
                attempt_no,
                status_code: Some(204),
                duration_ms: 1,
                error_kind: None,
                response_snippet: None,
                created_at: Timestamp(1),
            },
            outcome,
            policy: HealthPolicy::default(),
        }
    }

    /// Only first successes at healthy endpoints with nothing else in the batch go together.
    #[test]
    fn plain_successes_leave_every_other_endpoint_to_one_by_one() {
        let ok = Outcome::Succeeded;
        let failing = Health {
            consecutive_failures: 1,
            first_failure_at: Some(Timestamp(1)),
            ..Health::default()
        };
        let at = |id: i64, health: Health| Endpoint {
            id,
            account_id: 1,
            url: "https://receiver.example/hooks".into(),
            description: None,
            event_types: vec!["*".into()],
            secret_enc: String::new(),
            previous_secret_enc: None,
            previous_secret_expires_at: None,
            enabled: true,
            disabled_reason: None,
            max_concurrency: 4,
            fifo_per_aggregate: false,
            health,
            version: 1,
            created_at: Timestamp(1),
            updated_at: Timestamp(1),
        };
        let endpoints = || {
            std::collections::HashMap::from([
                (1, at(10, Health::default())),
                (2, at(10, Health::default())),
                (3, at(20, Health::default())),
                (4, at(20, Health::default())),
                (5, at(30, failing.clone())),
                (6, at(40, Health::default())),
                (7, at(50, Health::default())),
            ])
        };
        let cs = [
            completion(1, 1, ok),
            completion(2, 2, ok),
            // Endpoint 20 also has a failure in the batch: both of its go one by one.
            completion(3, 1, ok),
            completion(4, 1, Outcome::Retry(Timestamp(9))),
            // A success at a failing endpoint resets its health.
            completion(5, 1, ok),
            // A success after the `failing` notice may be a `recovered` one.
            completion(6, operational::FAILING_AFTER_ATTEMPTS + 1, ok),
            // Twice in one batch (a lease taken over and both attempts finished).
            completion(7, 1, ok),
            completion(7, 2, ok),
            // Unknown (its endpoint was deleted).
            completion(8, 1, ok),
        ];
        assert_eq!(
            plain_successes(&cs, endpoints()),
            [true, true, false, false, false, false, false, false, false]
        );
    }

    /// The failure-rate trigger: half of at least 20 recent attempts, this failure included.
    #[test]
    fn half_of_twenty_recent_attempts_failing_opens_the_circuit() {
        let p = HealthPolicy::default();
        let healthy = Health::default();
        let fail = Outcome::Retry(Timestamp(5_000));
        let opens = |recent| {
            healthy
                .after(fail, Timestamp(1_000), &p, recent)
                .is_some_and(|c| c.health.circuit_open)
        };
        assert!(
            opens(Recent {
                attempts: 19,
                failures: 9
            }),
            "10 of 20"
        );
        assert!(
            !opens(Recent {
                attempts: 19,
                failures: 8
            }),
            "9 of 20"
        );
        assert!(
            !opens(Recent {
                attempts: 18,
                failures: 18
            }),
            "19 attempts only"
        );
        assert!(
            opens(Recent {
                attempts: 99,
                failures: 49
            }),
            "50 of 100"
        );
        // A success never opens it, whatever came before.
        let open = healthy.after(
            Outcome::Succeeded,
            Timestamp(1_000),
            &p,
            Recent {
                attempts: 99,
                failures: 99,
            },
        );
        assert!(open.is_none());
        // Consecutive failures still open it without any history.
        let run = Health {
            consecutive_failures: 4,
            first_failure_at: Some(Timestamp(0)),
            ..Health::default()
        };
        assert!(
            run.after(fail, Timestamp(1_000), &p, Recent::default())
                .unwrap()
                .health
                .circuit_open
        );
    }
}
