//! PostgreSQL's side of the event log and webhook delivery (`bursar_storage::events`), the
//! SQLite backend's behaviour translated to PostgreSQL. There is no writer lock here, so what
//! SQLite gets from `BEGIN IMMEDIATE` is spelled out:
//!
//! - Sequencing is serialised across relays by a transaction-scoped advisory lock, taken
//!   before anything is read. Each later statement of the (READ COMMITTED) transaction sees
//!   every relay transaction that ran before it, so `seq` is handed out in the order the
//!   relays commit, and only to committed rows: a `seq > last` reader never skips a row that
//!   committed late, because the row only gets its `seq` after it committed.
//! - Claiming takes due deliveries with `SKIP LOCKED`: concurrent workers lease disjoint rows
//!   and never wait for each other. The per-endpoint cap needs more than row locks: two
//!   claimers could each see room for the same endpoint. So a claim first takes a
//!   transaction-scoped advisory lock per endpoint it means to serve (`pg_try_…`: an endpoint
//!   another claimer holds is left to it), then, in a later statement whose snapshot sees every
//!   claim committed before the lock was granted, counts the endpoint's live leases and claims
//!   only into the room left. Claims never wait on a lock.
//! - Completion is guarded by the lease token in the `UPDATE`'s `WHERE`, re-checked against
//!   the newest row version after any wait, so a worker whose lease was taken over changes
//!   nothing.
//!
//! Lock order, so concurrent commands wait instead of deadlocking: an endpoint before its
//! deliveries (as the cascade of an endpoint's deletion takes them). Completions and replays
//! lock the endpoint row first, then write deliveries; claims take no row lock they could
//! wait for.

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};
use bursar_storage::events::{
    Attempt, ClaimedDelivery, Completion, Delivery, Endpoint, EndpointPatch, EventLogStore,
    EventRenderer, Finished, Health, LoggedEvent, NewEndpoint, Outcome, RECENT_ATTEMPTS, Recent,
    Replay, ReplayRequest, TypeFilter, delivery_events, endpoint_disabled_event, plain_if_healthy,
    plain_successes, render_body, state, type_matches,
};
use bursar_storage::{NewEvent, PageRequest, Result, StorageError};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use crate::{PostgresStore, err, planned_each_call};

/// The advisory lock key that serialises relays (`pg_advisory_xact_lock`): "BURSAR" and the
/// issue that introduced the event log, combined with a hash of the schema. Advisory locks are
/// per database, not per schema, so without the hash stores sharing a database in separate
/// schemas (tenants of one cluster, parallel test runs) would sequence one after the other. Two
/// schemas whose hashes collide still only wait for each other. Claims lock in the two-key
/// space (schema, endpoint), which PostgreSQL keeps apart from this single-key one.
const SEQUENCER_LOCK: i64 = 0x4255_5253_4152_0005;

macro_rules! event_cols {
    () => {
        "event_id, seq, account_id, event_type, aggregate_type, aggregate_id, \
         aggregate_version, request_id, trace_id, created_at, body"
    };
}

macro_rules! endpoint_cols {
    () => {
        "id, account_id, url, description, event_types, secret_enc, previous_secret_enc, \
         previous_secret_expires_at, enabled, disabled_reason, max_concurrency, version, \
         created_at, updated_at, first_failure_at, consecutive_failures, circuit_state, \
         circuit_open_until, fifo_per_aggregate"
    };
}

macro_rules! replay_cols {
    () => {
        "id, account_id, endpoint_id, since_at, until_at, include_succeeded, status, \
         events_matched, deliveries_created, deliveries_requeued, capped, next_since_at, \
         created_at"
    };
}

macro_rules! delivery_cols {
    () => {
        "d.id, d.account_id, d.endpoint_id, d.event_id, e.event_type, d.state, \
         d.attempt_count, d.next_attempt_at, d.last_status, d.last_error, d.created_at, \
         d.updated_at"
    };
}

/// Sequences a batch, in one statement: picks the oldest committed unsequenced rows, moves
/// each account's counter past them at once, and numbers the account's rows from the old
/// counter value in `id` order, so every account's `seq` stays dense. Nothing else writes
/// `event_seq`, and relays hold the advisory lock, so the counter rows are never contended.
const SEQUENCE_BATCH: &str = "\
    WITH batch AS MATERIALIZED (\
       SELECT id, account_id, event_type, aggregate_type, aggregate_id, aggregate_version, \
              payload::text AS payload, request_id, trace_id, created_at, about_endpoint_id \
       FROM outbox_events WHERE seq IS NULL ORDER BY id LIMIT $1), \
     counts AS (SELECT account_id, count(*) AS n FROM batch GROUP BY account_id), \
     bumped AS (UPDATE accounts a SET event_seq = a.event_seq + c.n FROM counts c \
                WHERE a.id = c.account_id RETURNING a.id, a.event_seq - c.n AS base) \
    SELECT b.*, k.base + row_number() OVER (PARTITION BY b.account_id ORDER BY b.id) AS seq \
    FROM batch b JOIN bumped k ON k.id = b.account_id ORDER BY b.id";

/// Stores the sequenced events and fans them out, in one statement. The deliveries' foreign
/// key to `outbox_events (event_id)` is checked at the end of the statement, after the `UPDATE`
/// gave the rows their ids. A delivery is only paired with an event of the endpoint's account.
const STORE_AND_FAN_OUT: &str = concat!(
    "\
    WITH sequenced AS (\
       UPDATE outbox_events o SET event_id = u.event_id, seq = u.seq, body = u.body, \
              sequenced_at = $5, published_at = $9 \
       FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[]) \
            AS u (id, event_id, seq, body) \
       WHERE o.id = u.id \
       RETURNING o.account_id, o.event_id, o.aggregate_type, o.aggregate_id, o.seq) \
    INSERT INTO webhook_deliveries (account_id, endpoint_id, event_id, state, next_attempt_at, \
                                    created_at, updated_at, aggregate_key, event_seq) \
    SELECT s.account_id, f.endpoint_id, s.event_id, 'pending', $5, $5, $5, ",
    bursar_storage::fifo_columns!("ep", "s"),
    " FROM unnest($6::bigint[], $7::bigint[], $8::text[]) WITH ORDINALITY \
           AS f (account_id, endpoint_id, event_id, n) \
    JOIN sequenced s ON s.event_id = f.event_id AND s.account_id = f.account_id \
    JOIN webhook_endpoints ep ON ep.id = f.endpoint_id \
    ORDER BY f.n \
    ON CONFLICT (event_id, endpoint_id) DO NOTHING"
);

/// The slots of an endpoint's rows under a live lease, counted over those rows (a `GROUP BY
/// endpoint_id`, or a subquery over one endpoint's rows, whose own columns the unqualified
/// names resolve to): each a lease token with its slot number (`claim_ahead`), a row leased
/// before slots existed a slot of its own.
macro_rules! live_slots {
    () => {
        "count(DISTINCT (lease_token, COALESCE(lease_slot, -id)))"
    };
}

/// How many more slots of endpoint `ep` may be leased: its cap, or one probe for a
/// half-open circuit, less its slots under a live lease (`live.n`).
macro_rules! room {
    () => {
        "(CASE WHEN ep.circuit_state = 'closed' THEN ep.max_concurrency ELSE 1 END \
          - COALESCE(live.n, 0))"
    };
}

/// A claim's first statement: up to `$2` endpoints with due deliveries (pending or retrying and
/// due at `$1`, or in flight under a lapsed lease) and room for more (as this snapshot sees it),
/// oldest due first, each advisory-locked for this transaction; those another claimer holds are
/// skipped. Each endpoint's oldest due delivery is one probe of a partial index (migration
/// 0010), so the statement's cost follows the number of endpoints, not the backlog. The lock key pairs a hash of the schema with the endpoint
/// id, so deployments sharing a database in separate schemas never share a lock.
const CLAIM_ENDPOINTS: &str = concat!(
    "WITH live AS (\
       SELECT endpoint_id, ",
    live_slots!(),
    " AS n FROM webhook_deliveries \
       WHERE state = 'in_flight' AND lease_expires_at >= $1 GROUP BY endpoint_id), \
     candidates AS MATERIALIZED (\
       SELECT ep.id AS endpoint_id, f.first_due \
       FROM webhook_endpoints ep LEFT JOIN live ON live.endpoint_id = ep.id \
       CROSS JOIN LATERAL (SELECT min(t) AS first_due FROM (\
         (SELECT d.next_attempt_at AS t FROM webhook_deliveries d \
          WHERE d.endpoint_id = ep.id AND d.state IN ('pending', 'retrying') \
            AND d.next_attempt_at <= $1 AND ",
    bursar_storage::fifo_ready!("d"),
    " ORDER BY d.next_attempt_at LIMIT 1) \
         UNION ALL \
         (SELECT d.next_attempt_at FROM webhook_deliveries d \
          WHERE d.endpoint_id = ep.id AND d.state = 'in_flight' AND d.lease_expires_at < $1 \
          ORDER BY d.next_attempt_at LIMIT 1)) u) f \
       WHERE f.first_due IS NOT NULL AND ep.enabled \
         AND (ep.circuit_state = 'closed' OR ep.circuit_open_until <= $1) AND ",
    room!(),
    " > 0 \
       ORDER BY f.first_due, ep.id LIMIT $2) \
    SELECT endpoint_id FROM candidates \
    WHERE pg_try_advisory_xact_lock(hashtext(current_schema()), \
                                    (endpoint_id % 2147483647)::integer)"
);

/// A claim's second statement, on the endpoints locked by the first (`$5`): leases each one's
/// oldest due deliveries up to its room (at most `$2` read per endpoint), counted afresh (this statement's snapshot sees every
/// claim that committed before the locks were granted; completions only make room).
/// `FOR NO KEY UPDATE` is the lock the claiming `UPDATE` takes anyway; unlike `FOR UPDATE` it
/// does not conflict with the `KEY SHARE` locks of foreign-key checks, so a fenced-off worker
/// recording its lost attempt never waits for a claimer (and a claimer never skips a row only
/// because of such a check). A taken-over in-flight delivery gets its lost attempt recorded
/// here, for the rows this statement locked only, so two claimers never record the same one;
/// the fenced-off worker's own record of it then does nothing (`ON CONFLICT`).
const CLAIM: &str = concat!(
    "WITH live AS (\
       SELECT endpoint_id, ",
    live_slots!(),
    " AS n FROM webhook_deliveries \
       WHERE state = 'in_flight' AND lease_expires_at >= $1 AND endpoint_id = ANY($5) \
       GROUP BY endpoint_id), \
     ranked AS MATERIALIZED (\
       SELECT x.id, row_number() OVER (PARTITION BY x.endpoint_id \
                                       ORDER BY x.next_attempt_at, x.id) AS rn, x.room, \
              x.deep \
       FROM (SELECT ep.id AS eid, ",
    room!(),
    " AS room, CASE WHEN ep.circuit_state = 'closed' THEN $6 ELSE 1 END AS deep \
             FROM webhook_endpoints ep LEFT JOIN live ON live.endpoint_id = ep.id \
             WHERE ep.id = ANY($5) AND ep.enabled \
               AND (ep.circuit_state = 'closed' OR ep.circuit_open_until <= $1)) e \
       CROSS JOIN LATERAL (\
         (SELECT d.id, d.endpoint_id, d.next_attempt_at, e.room, e.deep \
          FROM webhook_deliveries d \
          WHERE d.endpoint_id = e.eid AND d.state IN ('pending', 'retrying') \
            AND d.next_attempt_at <= $1 AND ",
    bursar_storage::fifo_ready!("d"),
    " ORDER BY d.next_attempt_at, d.id LIMIT $2 * $6) \
         UNION ALL \
         (SELECT d.id, d.endpoint_id, d.next_attempt_at, e.room, e.deep \
          FROM webhook_deliveries d \
          WHERE d.endpoint_id = e.eid AND d.state = 'in_flight' \
            AND d.lease_expires_at < $1)) x), \
     due AS MATERIALIZED (\
       SELECT d.id, d.endpoint_id, d.state, d.attempt_count, (r.rn - 1) % r.room AS slot \
       FROM webhook_deliveries d JOIN ranked r ON r.id = d.id \
       WHERE r.rn <= r.room * r.deep \
         AND ((d.state IN ('pending', 'retrying') AND d.next_attempt_at <= $1) \
              OR (d.state = 'in_flight' AND d.lease_expires_at < $1)) \
       ORDER BY d.next_attempt_at, d.id LIMIT $2 * $6 \
       FOR NO KEY UPDATE OF d SKIP LOCKED), \
     lost AS (\
       INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, duration_ms, \
                                     error_kind, created_at) \
       SELECT id, endpoint_id, attempt_count, 0, 'lease_lost', $1 FROM due \
       WHERE state = 'in_flight' \
       ON CONFLICT (delivery_id, attempt_no) DO NOTHING), \
     claimed AS (\
       UPDATE webhook_deliveries w SET state = 'in_flight', lease_token = $3, \
              lease_slot = due.slot, lease_expires_at = $4, \
              attempt_count = w.attempt_count + 1, updated_at = $1 \
       FROM due WHERE w.id = due.id \
       RETURNING w.id, w.account_id, w.endpoint_id, w.attempt_count, w.event_id, \
                 w.next_attempt_at, w.lease_slot) \
    SELECT c.id, c.account_id, c.endpoint_id, c.attempt_count, c.event_id, e.body, \
           e.request_id, e.trace_id, ep.url, ep.secret_enc, ep.previous_secret_enc, \
           ep.previous_secret_expires_at, c.lease_slot::bigint AS slot \
    FROM claimed c JOIN outbox_events e ON e.event_id = c.event_id \
    JOIN webhook_endpoints ep ON ep.id = c.endpoint_id \
    ORDER BY c.next_attempt_at, c.id"
);

/// Ends a lease and records its attempt, in one statement. The attempt is recorded whether or
/// not the lease is still `$7`'s; when it is not, as `lease_lost` (its number may already be
/// recorded so, by the worker that took over). Returns, when the lease was held, the delivery
/// with its error before this attempt (`prev`: this statement's snapshot, taken before its
/// `UPDATE`) and the event it carries.
///
/// A held lease's attempt comes from the `UPDATE`'s own row. A lost one's comes from the
/// delivery read under a `KEY SHARE` lock, so a delivery deleted meanwhile (with its endpoint)
/// records nothing instead of failing the attempt's foreign key; that read is only used when
/// the `UPDATE` matched nothing, because a locking read skips a row the same statement has
/// already updated.
const COMPLETE: &str = "\
    WITH prev AS (SELECT last_error FROM webhook_deliveries WHERE id = $6), \
     owned AS (\
       UPDATE webhook_deliveries SET state = $1, next_attempt_at = COALESCE($2, next_attempt_at), \
              lease_token = NULL, lease_slot = NULL, lease_expires_at = NULL, last_status = $3, \
              last_error = $4, updated_at = $5 \
       WHERE id = $6 AND lease_token = $7 RETURNING id, account_id, endpoint_id, event_id), \
     unowned AS (SELECT id, endpoint_id FROM webhook_deliveries WHERE id = $6 FOR KEY SHARE), \
     recorded AS (\
       INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, status_code, \
                                     duration_ms, error_kind, response_snippet, created_at) \
       SELECT t.id, t.endpoint_id, $8, $3, $9, t.kind, $10, $11 \
       FROM (SELECT id, endpoint_id, $4::text AS kind FROM owned \
             UNION ALL \
             SELECT id, endpoint_id, 'lease_lost' FROM unowned \
             WHERE NOT EXISTS (SELECT 1 FROM owned)) AS t \
       ON CONFLICT (delivery_id, attempt_no) DO NOTHING) \
    SELECT o.account_id, o.endpoint_id, o.event_id, (SELECT last_error FROM prev) AS prev_error, \
           e.event_type, e.request_id, e.trace_id \
    FROM owned o JOIN outbox_events e ON e.event_id = o.event_id";

/// Appends an operational event about endpoint `about` to the outbox, like a business
/// command appends its events (`crate::append_event`), in the caller's transaction; the
/// relay sequences and fans it out like any other.
async fn append_operational(
    tx: &mut Transaction<'static, Postgres>,
    account: AccountId,
    about: i64,
    request_id: String,
    trace_id: String,
    at: Timestamp,
    ev: NewEvent,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
         aggregate_version, payload, request_id, trace_id, created_at, about_endpoint_id) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)",
    )
    .bind(account)
    .bind(ev.event_type)
    .bind(ev.aggregate_type)
    .bind(ev.aggregate_id)
    .bind(ev.aggregate_version)
    .bind(ev.payload)
    .bind(request_id)
    .bind(trace_id)
    .bind(at.0)
    .bind(about)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(())
}

fn logged(r: &PgRow) -> Result<LoggedEvent> {
    let get = || -> std::result::Result<LoggedEvent, sqlx::Error> {
        Ok(LoggedEvent {
            event_id: r.try_get("event_id")?,
            seq: r.try_get("seq")?,
            account_id: r.try_get("account_id")?,
            event_type: r.try_get("event_type")?,
            aggregate_type: r.try_get("aggregate_type")?,
            aggregate_id: r.try_get("aggregate_id")?,
            aggregate_version: r.try_get("aggregate_version")?,
            request_id: r.try_get("request_id")?,
            trace_id: r.try_get("trace_id")?,
            created_at: Timestamp(r.try_get("created_at")?),
            body: r.try_get("body")?,
        })
    };
    get().map_err(err)
}

fn endpoint(r: &PgRow) -> Result<Endpoint> {
    let get = || -> std::result::Result<Endpoint, sqlx::Error> {
        let types: String = r.try_get("event_types")?;
        Ok(Endpoint {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            url: r.try_get("url")?,
            description: r.try_get("description")?,
            event_types: serde_json::from_str(&types)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            secret_enc: r.try_get("secret_enc")?,
            previous_secret_enc: r.try_get("previous_secret_enc")?,
            previous_secret_expires_at: r
                .try_get::<Option<i64>, _>("previous_secret_expires_at")?
                .map(Timestamp),
            enabled: r.try_get("enabled")?,
            disabled_reason: r.try_get("disabled_reason")?,
            max_concurrency: r.try_get("max_concurrency")?,
            fifo_per_aggregate: r.try_get("fifo_per_aggregate")?,
            health: Health {
                first_failure_at: r
                    .try_get::<Option<i64>, _>("first_failure_at")?
                    .map(Timestamp),
                consecutive_failures: r.try_get("consecutive_failures")?,
                circuit_open: r.try_get::<String, _>("circuit_state")? == "open",
                circuit_open_until: r
                    .try_get::<Option<i64>, _>("circuit_open_until")?
                    .map(Timestamp),
            },
            version: r.try_get("version")?,
            created_at: Timestamp(r.try_get("created_at")?),
            updated_at: Timestamp(r.try_get("updated_at")?),
        })
    };
    get().map_err(err)
}

fn replay(r: &PgRow) -> Result<Replay> {
    let get = || -> std::result::Result<Replay, sqlx::Error> {
        Ok(Replay {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            endpoint_id: r.try_get("endpoint_id")?,
            since: Timestamp(r.try_get("since_at")?),
            until: Timestamp(r.try_get("until_at")?),
            include_succeeded: r.try_get("include_succeeded")?,
            status: r.try_get("status")?,
            events_matched: r.try_get("events_matched")?,
            deliveries_created: r.try_get("deliveries_created")?,
            deliveries_requeued: r.try_get("deliveries_requeued")?,
            capped: r.try_get("capped")?,
            next_since: r.try_get::<Option<i64>, _>("next_since_at")?.map(Timestamp),
            created_at: Timestamp(r.try_get("created_at")?),
        })
    };
    get().map_err(err)
}

fn delivery(r: &PgRow) -> Result<Delivery> {
    let get = || -> std::result::Result<Delivery, sqlx::Error> {
        Ok(Delivery {
            id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            endpoint_id: r.try_get("endpoint_id")?,
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            state: r.try_get("state")?,
            attempt_count: r.try_get("attempt_count")?,
            next_attempt_at: Timestamp(r.try_get("next_attempt_at")?),
            last_status: r.try_get("last_status")?,
            last_error: r.try_get("last_error")?,
            created_at: Timestamp(r.try_get("created_at")?),
            updated_at: Timestamp(r.try_get("updated_at")?),
        })
    };
    get().map_err(err)
}

fn attempt(r: &PgRow) -> Result<Attempt> {
    let get = || -> std::result::Result<Attempt, sqlx::Error> {
        Ok(Attempt {
            id: r.try_get("id")?,
            delivery_id: r.try_get("delivery_id")?,
            attempt_no: r.try_get("attempt_no")?,
            status_code: r.try_get("status_code")?,
            duration_ms: r.try_get("duration_ms")?,
            error_kind: r.try_get("error_kind")?,
            response_snippet: r.try_get("response_snippet")?,
            created_at: Timestamp(r.try_get("created_at")?),
        })
    };
    get().map_err(err)
}

fn claimed(r: &PgRow) -> Result<ClaimedDelivery> {
    let get = || -> std::result::Result<ClaimedDelivery, sqlx::Error> {
        Ok(ClaimedDelivery {
            delivery_id: r.try_get("id")?,
            account_id: r.try_get("account_id")?,
            endpoint_id: r.try_get("endpoint_id")?,
            attempt_no: r.try_get("attempt_count")?,
            event_id: r.try_get("event_id")?,
            body: r.try_get("body")?,
            url: r.try_get("url")?,
            secret_enc: r.try_get("secret_enc")?,
            previous_secret_enc: r.try_get("previous_secret_enc")?,
            previous_secret_expires_at: r
                .try_get::<Option<i64>, _>("previous_secret_expires_at")?
                .map(Timestamp),
            request_id: r.try_get("request_id")?,
            trace_id: r.try_get("trace_id")?,
            slot: r.try_get("slot")?,
        })
    };
    get().map_err(err)
}

fn types_json(types: &[String]) -> String {
    serde_json::to_string(types).expect("a list of strings always serialises")
}

#[async_trait]
impl EventLogStore for PostgresStore {
    /// Statements: the advisory lock, the batch with its `seq`s, the matching endpoints, and
    /// the write of the events with their deliveries.
    async fn sequence_events(
        &self,
        limit: u32,
        now: Timestamp,
        render: &dyn EventRenderer,
        published: bool,
    ) -> Result<Vec<LoggedEvent>> {
        let mut tx = self.write_tx().await?;
        // First, in its own statement: a statement's snapshot is taken before it runs, so only
        // the statements after this one see everything the previous relay committed.
        sqlx::query("SELECT pg_advisory_xact_lock($1 # hashtext(current_schema())::bigint)")
            .bind(SEQUENCER_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let rows = sqlx::query(SEQUENCE_BATCH)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut events = Vec::with_capacity(rows.len());
        for r in &rows {
            let payload: String = r.try_get("payload").map_err(err)?;
            let mut event = LoggedEvent {
                event_id: render.new_id(),
                seq: r.try_get("seq").map_err(err)?,
                account_id: r.try_get("account_id").map_err(err)?,
                event_type: r.try_get("event_type").map_err(err)?,
                aggregate_type: r.try_get("aggregate_type").map_err(err)?,
                aggregate_id: r.try_get("aggregate_id").map_err(err)?,
                aggregate_version: r.try_get("aggregate_version").map_err(err)?,
                request_id: r.try_get("request_id").map_err(err)?,
                trace_id: r.try_get("trace_id").map_err(err)?,
                created_at: Timestamp(r.try_get("created_at").map_err(err)?),
                body: String::new(),
            };
            let object = render
                .object(&event.aggregate_type, &payload)
                .unwrap_or(payload);
            event.body = render_body(&event, &object)?;
            events.push(event);
        }
        // The enabled endpoints of the batch's accounts, share-locked until commit: an
        // endpoint a 410 disables or a deletion removes meanwhile either waits for this
        // fan-out to commit (and then cancels or deletes these deliveries too), or is waited
        // for and left out.
        let mut accounts: Vec<AccountId> = events.iter().map(|e| e.account_id).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let endpoints = sqlx::query(
            "SELECT id, account_id, event_types FROM webhook_endpoints \
             WHERE account_id = ANY($1) AND enabled ORDER BY id FOR SHARE",
        )
        .bind(&accounts)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
        .iter()
        .map(|r| {
            let types: String = r.try_get("event_types").map_err(err)?;
            let types: Vec<String> =
                serde_json::from_str(&types).map_err(|e| StorageError::Internal(Box::new(e)))?;
            Ok((
                r.try_get::<AccountId, _>("account_id").map_err(err)?,
                r.try_get::<i64, _>("id").map_err(err)?,
                types,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        let (mut fan_accounts, mut fan_endpoints, mut fan_events) = (vec![], vec![], vec![]);
        for (e, r) in events.iter().zip(&rows) {
            let about: Option<i64> = r.try_get("about_endpoint_id").map_err(err)?;
            for (account, endpoint_id, types) in &endpoints {
                if *account == e.account_id
                    && about != Some(*endpoint_id)
                    && type_matches(types, &e.event_type)
                {
                    fan_accounts.push(*account);
                    fan_endpoints.push(*endpoint_id);
                    fan_events.push(e.event_id.as_str());
                }
            }
        }
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        let event_ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
        planned_each_call(STORE_AND_FAN_OUT)
            .bind(&ids)
            .bind(&event_ids)
            .bind(&seqs)
            .bind(&bodies)
            .bind(now.0)
            .bind(&fan_accounts)
            .bind(&fan_endpoints)
            .bind(&fan_events)
            .bind(published.then_some(now.0))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(events)
    }

    async fn events_after(
        &self,
        account: AccountId,
        after: i64,
        types: &[String],
        limit: u32,
    ) -> Result<Vec<LoggedEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = $1 AND seq > $2 \
             AND (cardinality($3::text[]) = 0 OR event_type = ANY($3)) \
             ORDER BY seq LIMIT $4"
        ))
        .bind(account)
        .bind(after)
        .bind(types)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn unpublished_events(&self, limit: u32) -> Result<Vec<LoggedEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE seq IS NOT NULL AND published_at IS NULL \
             ORDER BY sequenced_at, account_id, seq LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn mark_published(&self, event_ids: &[String], now: Timestamp) -> Result<u64> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        let done = planned_each_call(
            "UPDATE outbox_events SET published_at = $1 \
             WHERE event_id = ANY($2) AND published_at IS NULL",
        )
        .bind(now.0)
        .bind(event_ids)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }

    async fn list_events(
        &self,
        account: AccountId,
        types: &[String],
        page: PageRequest,
    ) -> Result<Vec<LoggedEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = $1 AND seq < $2 \
             AND (cardinality($3::text[]) = 0 OR event_type = ANY($3)) \
             ORDER BY seq DESC LIMIT $4"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(types)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn get_event(&self, account: AccountId, event_id: &str) -> Result<Option<LoggedEvent>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = $1 AND event_id = $2"
        ))
        .bind(account)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref().map(logged).transpose()
    }

    async fn create_endpoint(
        &self,
        account: AccountId,
        new: NewEndpoint,
        now: Timestamp,
    ) -> Result<Endpoint> {
        let row = sqlx::query(concat!(
            "INSERT INTO webhook_endpoints (account_id, url, description, event_types, \
             secret_enc, max_concurrency, fifo_per_aggregate, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $8, $7, $7) RETURNING ",
            endpoint_cols!()
        ))
        .bind(account)
        .bind(&new.url)
        .bind(&new.description)
        .bind(types_json(&new.event_types))
        .bind(&new.secret_enc)
        .bind(new.max_concurrency)
        .bind(now.0)
        .bind(new.fifo_per_aggregate)
        .fetch_one(&self.pool)
        .await
        .map_err(err)?;
        endpoint(&row)
    }

    async fn get_endpoint(&self, account: AccountId, id: i64) -> Result<Option<Endpoint>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM webhook_endpoints WHERE account_id = $1 AND id = $2"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref().map(endpoint).transpose()
    }

    async fn list_endpoints(&self, account: AccountId, page: PageRequest) -> Result<Vec<Endpoint>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM webhook_endpoints WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(endpoint).collect()
    }

    async fn update_endpoint(
        &self,
        account: AccountId,
        id: i64,
        patch: EndpointPatch,
        now: Timestamp,
    ) -> Result<Endpoint> {
        let (set_description, description) = match patch.description {
            Some(d) => (true, d),
            None => (false, None),
        };
        let row = sqlx::query(concat!(
            "UPDATE webhook_endpoints SET url = COALESCE($1::text, url), \
             description = CASE WHEN $2 THEN $3::text ELSE description END, \
             event_types = COALESCE($4::text, event_types), \
             enabled = COALESCE($5::boolean, enabled), \
             disabled_reason = CASE WHEN $6 THEN NULL ELSE disabled_reason END, \
             first_failure_at = CASE WHEN $6 THEN NULL ELSE first_failure_at END, \
             consecutive_failures = CASE WHEN $6 THEN 0 ELSE consecutive_failures END, \
             circuit_state = CASE WHEN $6 THEN 'closed' ELSE circuit_state END, \
             circuit_open_until = CASE WHEN $6 THEN NULL ELSE circuit_open_until END, \
             version = version + 1, updated_at = $7, \
             max_concurrency = COALESCE($10::bigint, max_concurrency), \
             fifo_per_aggregate = COALESCE($11::boolean, fifo_per_aggregate) \
             WHERE account_id = $8 AND id = $9 RETURNING ",
            endpoint_cols!()
        ))
        .bind(&patch.url)
        .bind(set_description)
        .bind(&description)
        .bind(patch.event_types.as_deref().map(types_json))
        .bind(patch.enabled)
        .bind(patch.enabled == Some(true))
        .bind(now.0)
        .bind(account)
        .bind(id)
        .bind(patch.max_concurrency)
        .bind(patch.fifo_per_aggregate)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref()
            .map(endpoint)
            .transpose()?
            .ok_or(StorageError::NotFound)
    }

    async fn delete_endpoint(&self, account: AccountId, id: i64) -> Result<bool> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE account_id = $1 AND id = $2")
            .bind(account)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_secret(
        &self,
        account: AccountId,
        id: i64,
        new_secret_enc: &str,
        previous_expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<Endpoint> {
        let row = sqlx::query(concat!(
            "UPDATE webhook_endpoints SET previous_secret_enc = secret_enc, \
             previous_secret_expires_at = $1, secret_enc = $2, version = version + 1, \
             updated_at = $3 WHERE account_id = $4 AND id = $5 RETURNING ",
            endpoint_cols!()
        ))
        .bind(previous_expires_at.0)
        .bind(new_secret_enc)
        .bind(now.0)
        .bind(account)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref()
            .map(endpoint)
            .transpose()?
            .ok_or(StorageError::NotFound)
    }

    async fn list_deliveries(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            delivery_cols!(),
            " FROM webhook_deliveries d JOIN outbox_events e ON e.event_id = d.event_id \
             WHERE d.account_id = $1 AND d.endpoint_id = $2 AND d.id < $3 \
             ORDER BY d.id DESC LIMIT $4"
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(delivery).collect()
    }

    async fn list_attempts(
        &self,
        account: AccountId,
        endpoint_id: i64,
        page: PageRequest,
    ) -> Result<Vec<Attempt>> {
        let rows = sqlx::query(
            "SELECT a.id, a.delivery_id, a.attempt_no, a.status_code, a.duration_ms, \
             a.error_kind, a.response_snippet, a.created_at \
             FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
             WHERE d.account_id = $1 AND a.endpoint_id = $2 AND a.id < $3 \
             ORDER BY a.id DESC LIMIT $4",
        )
        .bind(account)
        .bind(endpoint_id)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        rows.iter().map(attempt).collect()
    }

    /// One statement: the upsert, and the delivery it leaves, read with its event's type.
    /// `ON CONFLICT DO UPDATE` decides on the newest version of an existing delivery (after
    /// waiting for a claimer holding it), so one just claimed stays in flight. The endpoint is
    /// key-share-locked, so one deleted meanwhile answers `NotFound`, not a foreign-key error.
    async fn redeliver(
        &self,
        account: AccountId,
        endpoint_id: i64,
        event_id: &str,
        now: Timestamp,
    ) -> Result<Delivery> {
        let row = sqlx::query(concat!(
            "WITH queued AS (\
               INSERT INTO webhook_deliveries AS w (account_id, endpoint_id, event_id, state, \
                      next_attempt_at, created_at, updated_at, aggregate_key, event_seq) \
               SELECT $1, ep.id, ev.event_id, 'pending', $2, $2, $2, ",
            bursar_storage::fifo_columns!("ep", "ev"),
            " FROM webhook_endpoints ep, outbox_events ev \
               WHERE ep.account_id = $1 AND ep.id = $3 AND ev.account_id = $1 \
                 AND ev.event_id = $4 FOR KEY SHARE OF ep \
               ON CONFLICT (event_id, endpoint_id) DO UPDATE SET \
                 state = CASE WHEN w.state = 'in_flight' THEN w.state ELSE 'pending' END, \
                 next_attempt_at = CASE WHEN w.state = 'in_flight' THEN w.next_attempt_at \
                                   ELSE EXCLUDED.next_attempt_at END, \
                 updated_at = EXCLUDED.updated_at \
               RETURNING w.*) \
             SELECT ",
            delivery_cols!(),
            " FROM queued d JOIN outbox_events e ON e.event_id = d.event_id"
        ))
        .bind(account)
        .bind(now.0)
        .bind(endpoint_id)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref()
            .map(delivery)
            .transpose()?
            .ok_or(StorageError::NotFound)
    }

    /// `claim_ahead` with one delivery per slot.
    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>> {
        self.claim_ahead(now, lease_until, lease_token, limit, 1)
            .await
    }

    /// Two statements in one transaction: `CLAIM_ENDPOINTS` locks the endpoints to serve,
    /// `CLAIM` leases their deliveries, each to a slot numbered from 0 per endpoint.
    async fn claim_ahead(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
        depth: u32,
    ) -> Result<Vec<ClaimedDelivery>> {
        let mut tx = self.write_tx().await?;
        let endpoints: Vec<i64> = sqlx::query_scalar(CLAIM_ENDPOINTS)
            .bind(now.0)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        if endpoints.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(CLAIM)
            .bind(now.0)
            .bind(i64::from(limit))
            .bind(lease_token)
            .bind(lease_until.0)
            .bind(&endpoints)
            .bind(i64::from(depth.max(1)))
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        rows.iter().map(claimed).collect()
    }

    /// A transaction: it first locks the delivery's endpoint (the lock order: endpoint, then
    /// deliveries) and reads its health, then runs `COMPLETE`; with the lease held, it moves
    /// the endpoint's health (`Health::after`), defers, drains or cancels the endpoint's
    /// backlog in statements of their own, and appends the operational events. A 410's
    /// cancellation sees every fan-out that committed before the endpoint was disabled (a
    /// relay share-locks the endpoints it fans out to).
    async fn complete_delivery(&self, c: Completion, now: Timestamp) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let held = complete_in(&mut tx, c, now).await?;
        tx.commit().await.map_err(err)?;
        Ok(held)
    }

    async fn complete_deliveries(&self, cs: Vec<Completion>, now: Timestamp) -> Result<Vec<bool>> {
        let done = self.complete_and_hand_on(cs, now, None).await?;
        Ok(done.into_iter().map(|(held, _)| held).collect())
    }

    /// A batch of nothing but plain candidates (`plain_if_healthy`, each delivery once), the
    /// usual batch at healthy receivers, is one statement outside a transaction
    /// (`COMPLETE_PLAIN`, one round trip instead of four, handing leases on); the few it
    /// leaves, at endpoints not in full health, then go through `complete_together`, which
    /// hands nothing on. Any other batch goes there whole.
    async fn complete_and_hand_on(
        &self,
        cs: Vec<Completion>,
        now: Timestamp,
        hand_on_until: Option<Timestamp>,
    ) -> Result<Vec<(bool, Option<ClaimedDelivery>)>> {
        let mut ids = std::collections::HashSet::with_capacity(cs.len());
        let candidates = cs
            .iter()
            .all(|c| plain_if_healthy(c) && ids.insert(c.delivery_id));
        if !candidates {
            let held = self.complete_together(cs, now).await?;
            return Ok(held.into_iter().map(|h| (h, None)).collect());
        }
        let all: Vec<&Completion> = cs.iter().collect();
        let on = (&self.completions, Sessions::Completions);
        let mut plain = complete_plain(on, &all, now, hand_on_until).await?;
        let rest: Vec<Completion> = cs
            .iter()
            .filter(|c| !plain.taken.contains_key(&c.delivery_id))
            .cloned()
            .collect();
        let mut rest_held = if rest.is_empty() {
            Vec::new()
        } else {
            self.complete_together(rest, now).await?
        }
        .into_iter();
        Ok(cs
            .iter()
            .map(|c| match plain.taken.get(&c.delivery_id) {
                Some(held) => (*held, plain.handed.remove(&c.delivery_id)),
                None => (rest_held.next().unwrap_or(false), None),
            })
            .collect())
    }

    async fn purge_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64> {
        let delete = |sql: &'static str| async move {
            sqlx::query(sql)
                .bind(before.0)
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await
                .map(|done| done.rows_affected())
                .map_err(err)
        };
        let attempts = delete(
            "DELETE FROM webhook_attempts WHERE id IN (\
               SELECT a.id FROM webhook_deliveries d \
               JOIN webhook_attempts a ON a.delivery_id = d.id \
               WHERE d.state IN ('succeeded', 'failed', 'cancelled') AND d.updated_at < $1 \
               LIMIT $2)",
        )
        .await?;
        if attempts > 0 {
            return Ok(attempts);
        }
        delete(
            "DELETE FROM webhook_deliveries WHERE id IN (\
               SELECT d.id FROM webhook_deliveries d \
               WHERE d.state IN ('succeeded', 'failed', 'cancelled') AND d.updated_at < $1 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_attempts a WHERE a.delivery_id = d.id) \
               LIMIT $2)",
        )
        .await
    }

    async fn release_deliveries(&self, lease_token: &str, now: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET lease_expires_at = $1, updated_at = $2 \
             WHERE lease_token = $3 AND state = 'in_flight'",
        )
        .bind(now.0 - 1)
        .bind(now.0)
        .bind(lease_token)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }

    async fn return_unsent(&self, lease_token: &str, ids: &[i64], now: Timestamp) -> Result<u64> {
        // The endpoints are share-locked first: a 410 being recorded for one of them (which
        // locks it `FOR NO KEY UPDATE` and cancels what is due) either commits before and is
        // seen here, or waits and then cancels what this gives back.
        let done = sqlx::query(
            "WITH ep AS (SELECT id, NOT enabled AND disabled_reason = 'gone' AS gone \
             FROM webhook_endpoints WHERE id IN (SELECT endpoint_id FROM webhook_deliveries \
             WHERE id = ANY($2) AND lease_token = $3 AND state = 'in_flight') \
             ORDER BY id FOR SHARE) \
             UPDATE webhook_deliveries d SET attempt_count = d.attempt_count - 1, \
             state = CASE WHEN ep.gone THEN 'cancelled' \
             WHEN d.attempt_count > 1 THEN 'retrying' ELSE 'pending' END, \
             last_error = CASE WHEN ep.gone THEN 'gone' ELSE d.last_error END, \
             lease_token = NULL, lease_slot = NULL, lease_expires_at = NULL, updated_at = $1 \
             FROM ep WHERE d.endpoint_id = ep.id \
             AND d.id = ANY($2) AND d.lease_token = $3 AND d.state = 'in_flight'",
        )
        .bind(now.0)
        .bind(ids)
        .bind(lease_token)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }

    /// One transaction: the endpoint locked first (so its completions' backlog updates and
    /// this never wait on each other's deliveries), the matching events read once, then the
    /// requeue, the new deliveries and the record.
    async fn replay(
        &self,
        account: AccountId,
        endpoint_id: i64,
        req: ReplayRequest,
        now: Timestamp,
    ) -> Result<Replay> {
        let mut tx = self.write_tx().await?;
        let types: Option<String> = sqlx::query_scalar(
            "SELECT event_types FROM webhook_endpoints WHERE account_id = $1 AND id = $2 \
             FOR NO KEY UPDATE",
        )
        .bind(account)
        .bind(endpoint_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let types: Vec<String> = serde_json::from_str(&types.ok_or(StorageError::NotFound)?)
            .map_err(|e| StorageError::Internal(Box::new(e)))?;
        let filter = TypeFilter::new(&types);
        let found: Vec<(String, i64)> = sqlx::query_as(
            "SELECT event_id, created_at FROM outbox_events \
             WHERE account_id = $1 AND seq IS NOT NULL AND created_at >= $2 AND created_at < $3 \
               AND (about_endpoint_id IS NULL OR about_endpoint_id <> $4) \
               AND ($5 OR event_type = ANY($6) \
                    OR EXISTS (SELECT 1 FROM unnest($7::text[]) AS p (prefix) \
                               WHERE left(event_type, length(p.prefix) + 1) = p.prefix || '.')) \
             ORDER BY seq LIMIT $8",
        )
        .bind(account)
        .bind(req.since.0)
        .bind(req.until.0)
        .bind(endpoint_id)
        .bind(filter.all)
        .bind(&filter.exact)
        .bind(&filter.prefixes)
        .bind(req.max_events.saturating_add(1))
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        let max = usize::try_from(req.max_events.max(0)).unwrap_or(usize::MAX);
        let next_since = found.get(max).map(|(_, at)| Timestamp(*at));
        let matched: Vec<String> = found.into_iter().take(max).map(|(id, _)| id).collect();
        let requeued = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $1, \
             updated_at = $1 \
             WHERE account_id = $2 AND endpoint_id = $3 AND event_id = ANY($4) \
               AND (state IN ('failed', 'cancelled') OR ($5 AND state = 'succeeded'))",
        )
        .bind(now.0)
        .bind(account)
        .bind(endpoint_id)
        .bind(&matched)
        .bind(req.include_succeeded)
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        let created = sqlx::query(concat!(
            "INSERT INTO webhook_deliveries (account_id, endpoint_id, event_id, state, \
             next_attempt_at, created_at, updated_at, aggregate_key, event_seq) \
             SELECT $1, $2, u.event_id, 'pending', $3, $3, $3, ",
            bursar_storage::fifo_columns!("ep", "ev"),
            " FROM unnest($4::text[]) WITH ORDINALITY AS u (event_id, n) \
             JOIN outbox_events ev ON ev.event_id = u.event_id \
             JOIN webhook_endpoints ep ON ep.id = $2 ORDER BY u.n \
             ON CONFLICT (event_id, endpoint_id) DO NOTHING",
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(now.0)
        .bind(&matched)
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        let row = sqlx::query(concat!(
            "INSERT INTO webhook_replays (account_id, endpoint_id, since_at, until_at, \
             include_succeeded, status, events_matched, deliveries_created, \
             deliveries_requeued, capped, next_since_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'completed', $6, $7, $8, $9, $10, $11) RETURNING ",
            replay_cols!()
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(req.since.0)
        .bind(req.until.0)
        .bind(req.include_succeeded)
        .bind(matched.len() as i64)
        .bind(created as i64)
        .bind(requeued as i64)
        .bind(next_since.is_some())
        .bind(next_since.map(|t| t.0))
        .bind(now.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        replay(&row)
    }

    async fn get_replay(
        &self,
        account: AccountId,
        endpoint_id: i64,
        id: i64,
    ) -> Result<Option<Replay>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            replay_cols!(),
            " FROM webhook_replays WHERE account_id = $1 AND endpoint_id = $2 AND id = $3"
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        row.as_ref().map(replay).transpose()
    }
}

impl PostgresStore {
    /// A batch in one transaction. Reads the health of every endpoint of the batch without a
    /// lock: a row lock is a write to the endpoint's row, and every batch and relay locking
    /// the same few endpoints made them the hottest rows of the database (measured: most of a
    /// completion's time was spent there). Plain successes (`plain_successes`) need no lock:
    /// they leave a healthy endpoint as it is, so they come before any health change committed
    /// meanwhile, and one statement writes them all (`COMPLETE_PLAIN`, which also leaves any
    /// whose endpoint is no longer healthy when it runs); an endpoint deleted meanwhile fails
    /// the batch on its foreign key, and the worker then records each completion on its own
    /// (`complete_delivery`). The endpoints of the rest are then locked for update in
    /// ascending id order — the order relays take their share locks in — so batches, single
    /// completions and relays never wait on each other in a cycle, and completed one by one
    /// (re-locking a held row is free).
    async fn complete_together(&self, cs: Vec<Completion>, now: Timestamp) -> Result<Vec<bool>> {
        let mut tx = self.write_tx().await?;
        let ids: Vec<i64> = cs.iter().map(|c| c.delivery_id).collect();
        let rows = planned_each_call(concat!(
            "SELECT x.delivery_id, ",
            endpoint_cols!(),
            " FROM webhook_endpoints JOIN (\
               SELECT id AS delivery_id, endpoint_id AS of_endpoint FROM webhook_deliveries \
               WHERE id = ANY($1)) AS x ON x.of_endpoint = webhook_endpoints.id \
             ORDER BY webhook_endpoints.id"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        let of = |r: &PgRow| Ok((r.try_get("delivery_id").map_err(err)?, endpoint(r)?));
        let plain = plain_successes(&cs, rows.iter().map(of).collect::<Result<_>>()?);
        let together: Vec<&Completion> = cs
            .iter()
            .zip(&plain)
            .filter(|(_, p)| **p)
            .map(|(c, _)| c)
            .collect();
        let taken = complete_plain((&mut *tx, Sessions::Shared), &together, now, None)
            .await?
            .taken;
        let one_by_one: Vec<i64> = cs
            .iter()
            .filter(|c| !taken.contains_key(&c.delivery_id))
            .map(|c| c.delivery_id)
            .collect();
        if !one_by_one.is_empty() {
            planned_each_call(
                "SELECT id FROM webhook_endpoints WHERE id IN \
                 (SELECT endpoint_id FROM webhook_deliveries WHERE id = ANY($1)) \
                 ORDER BY id FOR NO KEY UPDATE",
            )
            .bind(&one_by_one)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        }
        let mut held = Vec::with_capacity(cs.len());
        for c in cs {
            held.push(match taken.get(&c.delivery_id) {
                Some(h) => *h,
                None => complete_in(&mut tx, c, now).await?,
            });
        }
        tx.commit().await.map_err(err)?;
        Ok(held)
    }
}

/// Plain successes, all at once, for the deliveries whose endpoint this statement finds in full
/// health (`endpoint_healthy!`): each one whose lease is still the completion's is marked
/// succeeded, and each one's attempt is recorded (`lease_lost` where the lease was not held, as
/// `COMPLETE` records it). The batch's rows are found by their keys first, once (`batch`,
/// materialized: planned from the endpoints, the statement probed an index once per endpoint
/// and id, 2 ms of a 7 ms statement; as a subquery, it was still read once per endpoint).
/// Unlike `COMPLETE`, `plain` takes no row lock: in one statement a lock on a row that `owned`
/// updates would skip it. The attempts' foreign key checks lock the deliveries they name.
///
/// With `$10` (a lease's end) given, each held success hands its lease on (`handed`): the
/// endpoint's oldest due deliveries, as many as it had held successes here and FIFO respected
/// (`fifo_ready!`), are leased under the tokens and in the slots of those successes, one
/// each, and returned with them. An endpoint's slots under a live lease do not change (one
/// delivery of a slot ends, one starts, in one atomic statement), so a claim counting its
/// room never sees a slot that is about to be taken, and no endpoint lock is needed; two
/// takers of one delivery are kept apart by `SKIP LOCKED` and by the re-check of a row
/// updated meanwhile. Only an enabled endpoint (in full health, as `plain` found it) with no
/// more slots under a live lease than its cap hands anything on.
///
/// Rows: each delivery taken (`after` NULL), with whether its lease was held; then each
/// delivery handed on, as a claim returns it, with the delivery it follows (`after`).
/// The others of `$1` (an endpoint not in full health, a delivery deleted) are the caller's
/// to complete one by one.
const COMPLETE_PLAIN: &str = concat!(
    "\
    WITH v AS (\
       SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], \
                            $5::bigint[], $6::text[], $7::text[], $8::bigint[]) \
       AS v(id, token, attempt_no, status_code, duration_ms, error_kind, snippet, created_at)), \
     batch AS MATERIALIZED (SELECT id, endpoint_id, lease_slot FROM webhook_deliveries \
                            WHERE id = ANY($1)), \
     plain AS MATERIALIZED (\
       SELECT d.id, d.endpoint_id, d.lease_slot FROM batch d \
       JOIN webhook_endpoints ep ON ep.id = d.endpoint_id WHERE ",
    bursar_storage::endpoint_healthy!("ep"),
    "), \
     owned AS (\
       UPDATE webhook_deliveries d SET state = 'succeeded', lease_token = NULL, \
              lease_slot = NULL, lease_expires_at = NULL, last_status = v.status_code, \
              last_error = v.error_kind, updated_at = $9 \
       FROM v JOIN plain p ON p.id = v.id \
       WHERE d.id = v.id AND d.lease_token = v.token \
       RETURNING d.id, d.endpoint_id, p.lease_slot), \
     recorded AS (\
       INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, status_code, \
                                     duration_ms, error_kind, response_snippet, created_at) \
       SELECT p.id, p.endpoint_id, v.attempt_no, v.status_code, v.duration_ms, \
              CASE WHEN o.id IS NULL THEN 'lease_lost' ELSE v.error_kind END, v.snippet, \
              v.created_at \
       FROM v JOIN plain p ON p.id = v.id LEFT JOIN owned o ON o.id = v.id \
       ON CONFLICT (delivery_id, attempt_no) DO NOTHING), \
     freed AS (\
       SELECT o.id, o.endpoint_id, v.token, o.lease_slot, \
              row_number() OVER (PARTITION BY o.endpoint_id ORDER BY o.id) AS rn \
       FROM owned o JOIN v ON v.id = o.id WHERE $10::bigint IS NOT NULL), \
     slots AS (\
       SELECT f.endpoint_id, f.k FROM \
       (SELECT endpoint_id, count(*) AS k FROM freed GROUP BY endpoint_id) f \
       JOIN webhook_endpoints ep ON ep.id = f.endpoint_id \
       WHERE ep.enabled AND (SELECT ",
    live_slots!(),
    " FROM webhook_deliveries l WHERE l.endpoint_id = ep.id \
              AND l.state = 'in_flight' AND l.lease_expires_at >= $9) <= ep.max_concurrency), \
     next AS MATERIALIZED (\
       SELECT n.id, n.endpoint_id, \
              row_number() OVER (PARTITION BY n.endpoint_id ORDER BY n.next_attempt_at, n.id) \
              AS rn \
       FROM slots s CROSS JOIN LATERAL (\
         SELECT d.id, d.endpoint_id, d.next_attempt_at FROM webhook_deliveries d \
         WHERE d.endpoint_id = s.endpoint_id AND d.state IN ('pending', 'retrying') \
           AND d.next_attempt_at <= $9 AND ",
    bursar_storage::fifo_ready!("d"),
    " ORDER BY d.next_attempt_at, d.id LIMIT s.k \
         FOR NO KEY UPDATE OF d SKIP LOCKED) n), \
     handed AS (\
       UPDATE webhook_deliveries w SET state = 'in_flight', lease_token = f.token, \
              lease_slot = f.lease_slot, lease_expires_at = $10, \
              attempt_count = w.attempt_count + 1, updated_at = $9 \
       FROM next n JOIN freed f ON f.endpoint_id = n.endpoint_id AND f.rn = n.rn \
       WHERE w.id = n.id \
       RETURNING w.id, w.account_id, w.endpoint_id, w.attempt_count, w.event_id, \
                 w.lease_slot, f.id AS after) \
    SELECT p.id, o.id IS NOT NULL AS held, NULL::bigint AS after, NULL::bigint AS account_id, \
           NULL::bigint AS endpoint_id, NULL::bigint AS attempt_count, NULL::text AS event_id, \
           NULL::text AS body, NULL::text AS request_id, NULL::text AS trace_id, \
           NULL::text AS url, NULL::text AS secret_enc, NULL::text AS previous_secret_enc, \
           NULL::bigint AS previous_secret_expires_at, NULL::bigint AS slot \
    FROM plain p LEFT JOIN owned o ON o.id = p.id \
    UNION ALL \
    SELECT h.id, true, h.after, h.account_id, h.endpoint_id, h.attempt_count, h.event_id, \
           e.body, e.request_id, e.trace_id, ep.url, ep.secret_enc, ep.previous_secret_enc, \
           ep.previous_secret_expires_at, h.lease_slot::bigint \
    FROM handed h JOIN outbox_events e ON e.event_id = h.event_id \
    JOIN webhook_endpoints ep ON ep.id = h.endpoint_id"
);

/// What `COMPLETE_PLAIN` did: for each delivery it took, whether its lease was held; and the
/// deliveries it handed on, by the delivery each follows.
#[derive(Default)]
struct Plain {
    taken: std::collections::HashMap<i64, bool>,
    handed: std::collections::HashMap<i64, ClaimedDelivery>,
}

/// Which sessions a statement runs on, and so how it may be planned.
#[derive(Clone, Copy)]
enum Sessions {
    /// `PostgresStore::completions`: prepared once, with a generic plan that reads through
    /// indexes whatever the tables' sizes (`completion_sessions`).
    Completions,
    /// The shared pool: planned with its arguments on every call (`planned_each_call`).
    Shared,
}

/// Runs `COMPLETE_PLAIN` for `cs` on `executor` (a transaction, or a pool: one statement is
/// atomic on its own), handing leases on until `hand_on_until` if given.
async fn complete_plain<'e, E>(
    (executor, sessions): (E, Sessions),
    cs: &[&Completion],
    now: Timestamp,
    hand_on_until: Option<Timestamp>,
) -> Result<Plain>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    if cs.is_empty() {
        return Ok(Plain::default());
    }
    let col = |f: fn(&Completion) -> Option<i64>| cs.iter().map(|c| f(c)).collect::<Vec<_>>();
    let text = |f: fn(&Completion) -> Option<String>| cs.iter().map(|c| f(c)).collect::<Vec<_>>();
    let rows = match sessions {
        Sessions::Completions => sqlx::query(COMPLETE_PLAIN),
        Sessions::Shared => planned_each_call(COMPLETE_PLAIN),
    }
    .bind(col(|c| Some(c.delivery_id)))
    .bind(text(|c| Some(c.lease_token.clone())))
    .bind(col(|c| Some(c.attempt.attempt_no)))
    .bind(col(|c| c.attempt.status_code))
    .bind(col(|c| Some(c.attempt.duration_ms)))
    .bind(text(|c| c.attempt.error_kind.clone()))
    .bind(text(|c| c.attempt.response_snippet.clone()))
    .bind(col(|c| Some(c.attempt.created_at.0)))
    .bind(now.0)
    .bind(hand_on_until.map(|t| t.0))
    .fetch_all(executor)
    .await
    .map_err(err)?;
    let mut plain = Plain::default();
    for r in &rows {
        match r.try_get::<Option<i64>, _>("after").map_err(err)? {
            None => {
                let id = r.try_get("id").map_err(err)?;
                plain.taken.insert(id, r.try_get("held").map_err(err)?);
            }
            Some(after) => {
                plain.handed.insert(after, claimed(r)?);
            }
        }
    }
    Ok(plain)
}

/// One completion inside the caller's transaction (see `Store::complete_delivery`).
async fn complete_in(
    tx: &mut Transaction<'static, Postgres>,
    c: Completion,
    now: Timestamp,
) -> Result<bool> {
    let (new_state, next_at) = match c.outcome {
        Outcome::Succeeded => (state::SUCCEEDED, None),
        Outcome::Retry(at) => (state::RETRYING, Some(at.0)),
        Outcome::Exhausted => (state::FAILED, None),
        Outcome::Gone => (state::CANCELLED, None),
    };
    let a = &c.attempt;
    let ep = sqlx::query(concat!(
        "SELECT ",
        endpoint_cols!(),
        " FROM webhook_endpoints \
         WHERE id = (SELECT endpoint_id FROM webhook_deliveries WHERE id = $1) \
         FOR NO KEY UPDATE"
    ))
    .bind(c.delivery_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)?;
    let ep = ep.as_ref().map(endpoint).transpose()?;
    // What this attempt does to the endpoint, applied below if the lease was held.
    let recent = match &ep {
        Some(ep)
            if !ep.health.circuit_open
                && matches!(c.outcome, Outcome::Retry(_) | Outcome::Exhausted) =>
        {
            recent_attempts(tx, ep.id, Timestamp(now.0 - c.policy.rate_window_ms)).await?
        }
        _ => Recent::default(),
    };
    let change = ep
        .as_ref()
        .and_then(|ep| ep.health.after(c.outcome, now, &c.policy, recent));
    let next_at = change
        .as_ref()
        .and_then(|ch| ch.next_attempt(c.outcome))
        .map(|t| t.0)
        .or(next_at);
    let held = sqlx::query(COMPLETE)
        .bind(new_state)
        .bind(next_at)
        .bind(a.status_code)
        .bind(&a.error_kind)
        .bind(now.0)
        .bind(c.delivery_id)
        .bind(&c.lease_token)
        .bind(a.attempt_no)
        .bind(a.duration_ms)
        .bind(&a.response_snippet)
        .bind(a.created_at.0)
        .fetch_optional(&mut **tx)
        .await
        .map_err(err)?;
    let (Some(held), Some(ep)) = (held, ep) else {
        return Ok(false);
    };
    let account: AccountId = held.try_get("account_id").map_err(err)?;
    let mut notices = Vec::new();
    if let Some(change) = change {
        // A disabled endpoint is only disabled again by a 410 (which names the reason).
        let disable = change.disable.filter(|r| ep.enabled || *r == "gone");
        let h = &change.health;
        let row = sqlx::query(concat!(
            "UPDATE webhook_endpoints SET first_failure_at = $1, consecutive_failures = $2, \
             circuit_state = $3, circuit_open_until = $4, \
             enabled = CASE WHEN $5::text IS NULL THEN enabled ELSE FALSE END, \
             disabled_reason = COALESCE($5::text, disabled_reason), \
             version = CASE WHEN $5::text IS NULL THEN version ELSE version + 1 END, \
             updated_at = CASE WHEN $5::text IS NULL THEN updated_at ELSE $6 END \
             WHERE id = $7 RETURNING ",
            endpoint_cols!()
        ))
        .bind(h.first_failure_at.map(|t| t.0))
        .bind(h.consecutive_failures)
        .bind(if h.circuit_open { "open" } else { "closed" })
        .bind(h.circuit_open_until.map(|t| t.0))
        .bind(disable)
        .bind(now.0)
        .bind(ep.id)
        .fetch_one(&mut **tx)
        .await
        .map_err(err)?;
        let updated = endpoint(&row)?;
        if let Some(until) = change.defer_backlog_until {
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = $1, updated_at = $2 \
                 WHERE account_id = $3 AND endpoint_id = $4 \
                 AND state IN ('pending', 'retrying') AND next_attempt_at < $1",
            )
            .bind(until.0)
            .bind(now.0)
            .bind(account)
            .bind(ep.id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if change.drain_backlog {
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = $1, updated_at = $1 \
                 WHERE account_id = $2 AND endpoint_id = $3 \
                 AND state IN ('pending', 'retrying') AND next_attempt_at > $1",
            )
            .bind(now.0)
            .bind(account)
            .bind(ep.id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if disable == Some("gone") {
            sqlx::query(
                "UPDATE webhook_deliveries SET state = 'cancelled', last_error = 'gone', \
                 updated_at = $1 WHERE account_id = $2 AND endpoint_id = $3 \
                 AND state IN ('pending', 'retrying')",
            )
            .bind(now.0)
            .bind(account)
            .bind(ep.id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if disable.is_some() && ep.enabled {
            notices.push(endpoint_disabled_event(&updated));
        }
    }
    let event_id: String = held.try_get("event_id").map_err(err)?;
    let event_type: String = held.try_get("event_type").map_err(err)?;
    let previous_error: Option<String> = held.try_get("prev_error").map_err(err)?;
    let finished = Finished {
        delivery_id: c.delivery_id,
        endpoint_id: ep.id,
        event_id: &event_id,
        event_type: &event_type,
        attempt: a,
        outcome: c.outcome,
        previous_error: previous_error.as_deref(),
    };
    let mut all = delivery_events(&finished);
    all.append(&mut notices);
    for ev in all {
        append_operational(
            tx,
            account,
            ep.id,
            held.try_get("request_id").map_err(err)?,
            held.try_get("trace_id").map_err(err)?,
            now,
            ev,
        )
        .await?;
    }
    Ok(true)
}

/// The endpoint's latest attempts since `since` (at most `RECENT_ATTEMPTS`, lost leases not
/// counted) and how many failed, for the failure-rate trigger of `Health::after`.
async fn recent_attempts(
    tx: &mut Transaction<'static, Postgres>,
    endpoint_id: i64,
    since: Timestamp,
) -> Result<Recent> {
    let row = sqlx::query(
        "SELECT count(*) AS n, count(error_kind) AS failed FROM (\
           SELECT error_kind FROM webhook_attempts \
           WHERE endpoint_id = $1 AND created_at >= $2 \
             AND (error_kind IS NULL OR error_kind <> 'lease_lost') \
           ORDER BY id DESC LIMIT $3) AS latest",
    )
    .bind(endpoint_id)
    .bind(since.0)
    .bind(RECENT_ATTEMPTS)
    .fetch_one(&mut **tx)
    .await
    .map_err(err)?;
    Ok(Recent {
        attempts: row.try_get("n").map_err(err)?,
        failures: row.try_get("failed").map_err(err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PostgresOptions;

    /// A store on a schema of its own, or `None` when no PostgreSQL server is configured.
    async fn fresh_store() -> Option<PostgresStore> {
        let url = bursar_storage::conformance::postgres_test_url()?;
        let opts = PostgresOptions {
            max_connections: 2,
            schema: Some(format!("t_{}", uuid::Uuid::new_v4().simple())),
            ..Default::default()
        };
        Some(PostgresStore::open(&url, &opts).await.unwrap())
    }

    /// The completer's sessions make their plan of `COMPLETE_PLAIN` while the tables are empty
    /// (a fresh schema), as a server that starts on a new database does, and the plan still
    /// reads every table through an index: a sequential scan planned then would read the
    /// whole deliveries table for every batch once it has grown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_completion_plan_reads_through_indexes_even_made_on_empty_tables() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let mut conn = store.completions.acquire().await.unwrap();
        for (setting, value) in [
            ("enable_seqscan", "off"),
            ("plan_cache_mode", "force_generic_plan"),
        ] {
            let shown: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            assert_eq!(shown, value, "{setting} on the completer's sessions");
        }
        let prepare = format!(
            "PREPARE complete_plain (bigint[], text[], bigint[], bigint[], bigint[], text[], \
             text[], bigint[], bigint, bigint) AS {COMPLETE_PLAIN}"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(
            "EXPLAIN EXECUTE complete_plain('{1}', '{token}', '{1}', '{204}', '{3}', '{NULL}', \
             '{NULL}', '{0}', 0, 90000)",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        sqlx::raw_sql("DEALLOCATE complete_plain")
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("webhook_deliveries"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "a sequential scan:\n{plan}");
    }

    /// Tenant rows take no lock on their account's row (migration 0013, ADR 0008): every write
    /// of an account used to key-share lock that one row, and the checks cost a third of
    /// PostgreSQL's time under payments. Only the tables written at account set-up still
    /// name the account in a key, and nothing names an event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tenant_rows_lock_nothing_of_their_account() {
        let Some(store) = fresh_store().await else {
            return;
        };
        let referencing = |table: &'static str| {
            sqlx::query_scalar::<_, String>(
                "SELECT conrelid::regclass::text FROM pg_constraint \
                 WHERE contype = 'f' AND confrelid = $1::regclass ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&store.pool)
        };
        assert_eq!(
            referencing("accounts").await.unwrap(),
            ["api_keys", "webhook_endpoints"]
        );
        assert!(referencing("outbox_events").await.unwrap().is_empty());

        let account: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (name, created_at) VALUES ('a', 0) RETURNING id",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        let mut writer = store.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
             aggregate_version, payload, request_id, trace_id, created_at) \
             VALUES ($1, 'order.created', 'order', 1, 1, '{}', 'req', 'trace', 0)",
        )
        .bind(account)
        .execute(&mut *writer)
        .await
        .unwrap();
        // With a key to `accounts`, the insert above holds a KEY SHARE lock on the row until
        // it commits, and this would fail at once.
        let mut other = store.pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(account)
            .execute(&mut *other)
            .await
            .expect("the account row is not locked by its tenant's write");
        other.rollback().await.unwrap();
        writer.rollback().await.unwrap();
    }
}
