//! SQLite's side of the event log and webhook delivery (`bursar_storage::events`). Every
//! write that must be serialised (sequencing, claiming) runs under `BEGIN IMMEDIATE`, which
//! SQLite's single writer lock makes one step for every process sharing the file; since
//! writers are serialised, the relay's `seq` follows commit order.

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};
use bursar_storage::events::{
    Attempt, ClaimedDelivery, Completion, Delivery, Endpoint, EndpointPatch, EventLogStore,
    EventRenderer, Finished, Health, LoggedEvent, NewEndpoint, Outcome, RECENT_ATTEMPTS, Recent,
    Replay, ReplayRequest, TypeFilter, delivery_events, endpoint_disabled_event, plain_successes,
    render_body, state, type_matches,
};
use bursar_storage::{NewEvent, PageRequest, Result, StorageError};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use crate::writer::WriteTx;
use crate::{SqliteStore, err};

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

fn logged(r: &SqliteRow) -> Result<LoggedEvent> {
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

fn endpoint(r: &SqliteRow) -> Result<Endpoint> {
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

fn replay(r: &SqliteRow) -> Result<Replay> {
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

fn delivery(r: &SqliteRow) -> Result<Delivery> {
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

fn types_json(types: &[String]) -> String {
    serde_json::to_string(types).expect("a list of strings always serialises")
}

/// `(? = '' OR event_type IN (SELECT value FROM json_each(?)))` binds: the filter as a JSON
/// list, empty for none.
fn type_filter(types: &[String]) -> String {
    if types.is_empty() {
        String::new()
    } else {
        types_json(types)
    }
}

/// Appends an operational event about endpoint `about` to the outbox, like a business
/// command appends its events (`crate::append_event`), in the caller's transaction; the
/// relay sequences and fans it out like any other.
async fn append_operational(
    tx: &mut WriteTx,
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
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

/// A delivery with its event's type, read on `conn`: the writer, when the read must see what a
/// write just left and nothing committed after it.
async fn delivery_by_id(
    conn: &mut SqliteConnection,
    account: AccountId,
    id: i64,
) -> Result<Delivery> {
    let row = sqlx::query(concat!(
        "SELECT ",
        delivery_cols!(),
        " FROM webhook_deliveries d JOIN outbox_events e ON e.event_id = d.event_id \
             WHERE d.account_id = ? AND d.id = ?"
    ))
    .bind(account)
    .bind(id)
    .fetch_one(conn)
    .await
    .map_err(err)?;
    delivery(&row)
}

/// An outbox row read for sequencing, its object rendered, waiting for its number.
struct Unsequenced {
    id: i64,
    about: Option<i64>,
    object: String,
    event: LoggedEvent,
}

#[async_trait]
impl EventLogStore for SqliteStore {
    async fn sequence_events(
        &self,
        limit: u32,
        now: Timestamp,
        render: &dyn EventRenderer,
        published: bool,
    ) -> Result<Vec<LoggedEvent>> {
        // Read and render on a reader, outside the write lock, which this pass then holds
        // only to number, store and fan out. A reader sees committed rows only, and SQLite
        // hands out ids under the write lock, so no event committed later can come before
        // the ones read here. Another relay may sequence some of them meanwhile: the
        // transaction takes those still unsequenced, which keep their order.
        let rows = sqlx::query(
            "SELECT id, account_id, event_type, aggregate_type, aggregate_id, \
             aggregate_version, payload, request_id, trace_id, created_at, about_endpoint_id \
             FROM outbox_events WHERE seq IS NULL ORDER BY id LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut read: Vec<Unsequenced> = rows
            .iter()
            .map(|r| {
                let aggregate_type: String = r.get("aggregate_type");
                let payload: String = r.get("payload");
                let object = render.object(&aggregate_type, &payload).unwrap_or(payload);
                Unsequenced {
                    id: r.get("id"),
                    about: r.get("about_endpoint_id"),
                    object,
                    event: LoggedEvent {
                        event_id: render.new_id(),
                        seq: 0,
                        account_id: r.get("account_id"),
                        event_type: r.get("event_type"),
                        aggregate_type,
                        aggregate_id: r.get("aggregate_id"),
                        aggregate_version: r.get("aggregate_version"),
                        request_id: r.get("request_id"),
                        trace_id: r.get("trace_id"),
                        created_at: Timestamp(r.get("created_at")),
                        body: String::new(),
                    },
                }
            })
            .collect();
        let mut tx = self.writer.begin().await?;
        let ids: Vec<i64> = read.iter().map(|u| u.id).collect();
        let still: std::collections::HashSet<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox_events WHERE seq IS NULL \
             AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::Value::from(ids).to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?
        .into_iter()
        .collect();
        read.retain(|u| still.contains(&u.id));
        if read.is_empty() {
            return Ok(Vec::new());
        }
        // Each account's sequence moves once per batch, by its number of events, which take
        // the numbers after the previous end in outbox order (as one move per event would).
        let mut counts: std::collections::BTreeMap<AccountId, i64> = Default::default();
        for u in &read {
            *counts.entry(u.event.account_id).or_default() += 1;
        }
        let mut next_seq = std::collections::HashMap::with_capacity(counts.len());
        let mut endpoints = std::collections::HashMap::with_capacity(counts.len());
        for (account, n) in counts {
            let last: i64 = sqlx::query_scalar(
                "UPDATE accounts SET event_seq = event_seq + ? WHERE id = ? RETURNING event_seq",
            )
            .bind(n)
            .bind(account)
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
            next_seq.insert(account, last - n + 1);
            let eps = sqlx::query(
                "SELECT id, event_types FROM webhook_endpoints \
                 WHERE account_id = ? AND enabled = 1",
            )
            .bind(account)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
            .iter()
            .map(|e| {
                let types: String = e.get("event_types");
                let types: Vec<String> = serde_json::from_str(&types)
                    .map_err(|e| StorageError::Internal(Box::new(e)))?;
                Ok((e.get::<i64, _>("id"), types))
            })
            .collect::<Result<Vec<_>>>()?;
            endpoints.insert(account, eps);
        }
        let mut out = Vec::with_capacity(read.len());
        let mut rowids = Vec::with_capacity(read.len());
        let mut fan_out = Vec::new();
        for u in read {
            let account = u.event.account_id;
            let seq = next_seq.get_mut(&account).expect("counted above");
            let mut event = u.event;
            event.seq = *seq;
            *seq += 1;
            event.body = render_body(&event, &u.object)?;
            for (endpoint_id, types) in &endpoints[&account] {
                if u.about != Some(*endpoint_id) && type_matches(types, &event.event_type) {
                    fan_out.push(serde_json::json!([account, endpoint_id, event.event_id]));
                }
            }
            rowids.push(u.id);
            out.push(event);
        }
        // One call stores every event's sequence and body and inserts every delivery. Only
        // fixed fragments and a row count go into the text; every value is bound.
        // The deliveries read their events as just stored (the statements run in order).
        let sql = format!(
            "UPDATE outbox_events SET event_id = v.column2, seq = v.column3, body = v.column4, \
             sequenced_at = ?, published_at = ? FROM (VALUES {}) AS v \
             WHERE outbox_events.id = v.column1; \
             INSERT INTO webhook_deliveries (account_id, endpoint_id, event_id, state, \
             next_attempt_at, created_at, updated_at, aggregate_key, event_seq) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, 'pending', ?, ?, ?, {} \
             FROM json_each(?) AS j \
             JOIN outbox_events ev ON ev.event_id = j.value ->> 2 \
             JOIN webhook_endpoints ep ON ep.id = j.value ->> 1 WHERE true \
             ON CONFLICT (event_id, endpoint_id) DO NOTHING",
            vec!["(?, ?, ?, ?)"; out.len()].join(", "),
            bursar_storage::fifo_columns!("ep", "ev"),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now.0)
            .bind(published.then_some(now.0));
        for (e, id) in out.iter().zip(rowids) {
            q = q
                .bind(id)
                .bind(e.event_id.clone())
                .bind(e.seq)
                .bind(e.body.clone());
        }
        q.bind(now.0)
            .bind(now.0)
            .bind(now.0)
            .bind(serde_json::Value::from(fan_out).to_string())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(out)
    }

    async fn events_after(
        &self,
        account: AccountId,
        after: i64,
        types: &[String],
        limit: u32,
    ) -> Result<Vec<LoggedEvent>> {
        let filter = type_filter(types);
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = ? AND seq > ? \
             AND (? = '' OR event_type IN (SELECT value FROM json_each(?))) \
             ORDER BY seq LIMIT ?"
        ))
        .bind(account)
        .bind(after)
        .bind(&filter)
        .bind(&filter)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn unpublished_events(&self, limit: u32) -> Result<Vec<LoggedEvent>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE seq IS NOT NULL AND published_at IS NULL \
             ORDER BY sequenced_at, account_id, seq LIMIT ?"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn mark_published(&self, event_ids: &[String], now: Timestamp) -> Result<u64> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        let ids =
            serde_json::to_string(event_ids).map_err(|e| StorageError::Internal(Box::new(e)))?;
        let done = sqlx::query(
            "UPDATE outbox_events SET published_at = ? \
             WHERE event_id IN (SELECT value FROM json_each(?)) AND published_at IS NULL",
        )
        .bind(now.0)
        .bind(ids)
        .execute(&mut *self.writer.lock().await?)
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
        let filter = type_filter(types);
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = ? AND seq IS NOT NULL AND seq < ? \
             AND (? = '' OR event_type IN (SELECT value FROM json_each(?))) \
             ORDER BY seq DESC LIMIT ?"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(&filter)
        .bind(&filter)
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter().map(logged).collect()
    }

    async fn get_event(&self, account: AccountId, event_id: &str) -> Result<Option<LoggedEvent>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            event_cols!(),
            " FROM outbox_events WHERE account_id = ? AND event_id = ?"
        ))
        .bind(account)
        .bind(event_id)
        .fetch_optional(&self.readers)
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING ",
            endpoint_cols!()
        ))
        .bind(account)
        .bind(&new.url)
        .bind(&new.description)
        .bind(types_json(&new.event_types))
        .bind(&new.secret_enc)
        .bind(new.max_concurrency)
        .bind(new.fifo_per_aggregate)
        .bind(now.0)
        .bind(now.0)
        .fetch_one(&mut *self.writer.lock().await?)
        .await
        .map_err(err)?;
        endpoint(&row)
    }

    async fn get_endpoint(&self, account: AccountId, id: i64) -> Result<Option<Endpoint>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM webhook_endpoints WHERE account_id = ? AND id = ?"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        row.as_ref().map(endpoint).transpose()
    }

    async fn list_endpoints(&self, account: AccountId, page: PageRequest) -> Result<Vec<Endpoint>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            endpoint_cols!(),
            " FROM webhook_endpoints WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
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
            "UPDATE webhook_endpoints SET url = COALESCE(?1, url), \
             description = CASE WHEN ?2 THEN ?3 ELSE description END, \
             event_types = COALESCE(?4, event_types), \
             enabled = COALESCE(?5, enabled), \
             max_concurrency = COALESCE(?6, max_concurrency), \
             disabled_reason = CASE WHEN ?7 THEN NULL ELSE disabled_reason END, \
             first_failure_at = CASE WHEN ?7 THEN NULL ELSE first_failure_at END, \
             consecutive_failures = CASE WHEN ?7 THEN 0 ELSE consecutive_failures END, \
             circuit_state = CASE WHEN ?7 THEN 'closed' ELSE circuit_state END, \
             circuit_open_until = CASE WHEN ?7 THEN NULL ELSE circuit_open_until END, \
             fifo_per_aggregate = COALESCE(?11, fifo_per_aggregate), \
             version = version + 1, updated_at = ?8 \
             WHERE account_id = ?9 AND id = ?10 RETURNING ",
            endpoint_cols!()
        ))
        .bind(&patch.url)
        .bind(set_description)
        .bind(&description)
        .bind(patch.event_types.as_deref().map(types_json))
        .bind(patch.enabled)
        .bind(patch.max_concurrency)
        .bind(patch.enabled == Some(true))
        .bind(now.0)
        .bind(account)
        .bind(id)
        .bind(patch.fifo_per_aggregate)
        .fetch_optional(&mut *self.writer.lock().await?)
        .await
        .map_err(err)?;
        row.as_ref()
            .map(endpoint)
            .transpose()?
            .ok_or(StorageError::NotFound)
    }

    async fn delete_endpoint(&self, account: AccountId, id: i64) -> Result<bool> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE account_id = ? AND id = ?")
            .bind(account)
            .bind(id)
            .execute(&mut *self.writer.lock().await?)
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
             previous_secret_expires_at = ?, secret_enc = ?, version = version + 1, \
             updated_at = ? WHERE account_id = ? AND id = ? RETURNING ",
            endpoint_cols!()
        ))
        .bind(previous_expires_at.0)
        .bind(new_secret_enc)
        .bind(now.0)
        .bind(account)
        .bind(id)
        .fetch_optional(&mut *self.writer.lock().await?)
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
             WHERE d.account_id = ? AND d.endpoint_id = ? AND d.id < ? \
             ORDER BY d.id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
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
             WHERE d.account_id = ? AND a.endpoint_id = ? AND a.id < ? \
             ORDER BY a.id DESC LIMIT ?",
        )
        .bind(account)
        .bind(endpoint_id)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok(Attempt {
                    id: r.get("id"),
                    delivery_id: r.get("delivery_id"),
                    attempt_no: r.get("attempt_no"),
                    status_code: r.get("status_code"),
                    duration_ms: r.get("duration_ms"),
                    error_kind: r.get("error_kind"),
                    response_snippet: r.get("response_snippet"),
                    created_at: Timestamp(r.get("created_at")),
                })
            })
            .collect()
    }

    async fn redeliver(
        &self,
        account: AccountId,
        endpoint_id: i64,
        event_id: &str,
        now: Timestamp,
    ) -> Result<Delivery> {
        let mut writer = self.writer.lock().await?;
        let id: Option<i64> = sqlx::query_scalar(concat!(
            "INSERT INTO webhook_deliveries (account_id, endpoint_id, event_id, state, \
             next_attempt_at, created_at, updated_at, aggregate_key, event_seq) \
             SELECT ?, ep.id, ev.event_id, 'pending', ?, ?, ?, ",
            bursar_storage::fifo_columns!("ep", "ev"),
            " FROM webhook_endpoints ep, outbox_events ev \
             WHERE ep.account_id = ? AND ep.id = ? AND ev.account_id = ? AND ev.event_id = ? \
             ON CONFLICT (event_id, endpoint_id) DO UPDATE SET \
               state = CASE WHEN state = 'in_flight' THEN state ELSE 'pending' END, \
               next_attempt_at = CASE WHEN state = 'in_flight' THEN next_attempt_at \
                                 ELSE excluded.next_attempt_at END, \
               updated_at = excluded.updated_at \
             RETURNING id",
        ))
        .bind(account)
        .bind(now.0)
        .bind(now.0)
        .bind(now.0)
        .bind(account)
        .bind(endpoint_id)
        .bind(account)
        .bind(event_id)
        .fetch_optional(&mut *writer)
        .await
        .map_err(err)?;
        // Read under the same hold of the writer: a completion committed between the upsert
        // and a later read would answer its outcome, as if this call had queued the delivery.
        delivery_by_id(&mut writer, account, id.ok_or(StorageError::NotFound)?).await
    }

    async fn claim_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        lease_token: &str,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>> {
        let mut tx = self.writer.begin().await?;
        // Under the write lock: no other claim runs meanwhile, so each endpoint's room (its
        // cap, or one probe for a half-open circuit, less its live leases) is exact. Each
        // endpoint contributes at most `limit` of its oldest due deliveries (from the partial
        // index of migration 0010) before they are ranked against its room, so a claim reads
        // what it may take, not the whole backlog. `MATERIALIZED` and `CROSS JOIN` pin the
        // plan to "for each endpoint, look up its rows": flattened, SQLite would scan every
        // delivery and run the per-endpoint lookup for each.
        let due: Vec<i64> = sqlx::query_scalar(concat!(
            "WITH live AS (\
               SELECT endpoint_id, count(*) AS n FROM webhook_deliveries \
               WHERE state = 'in_flight' AND lease_expires_at >= ?1 GROUP BY endpoint_id), \
             eps AS MATERIALIZED (\
               SELECT ep.id, CASE WHEN ep.circuit_state = 'closed' THEN ep.max_concurrency \
                                  ELSE 1 END - COALESCE(live.n, 0) AS room \
               FROM webhook_endpoints ep LEFT JOIN live ON live.endpoint_id = ep.id \
               WHERE ep.enabled = 1 \
                 AND (ep.circuit_state = 'closed' OR ep.circuit_open_until <= ?1)), \
             candidates AS (\
               SELECT d.id, d.endpoint_id, d.next_attempt_at, eps.room \
               FROM eps CROSS JOIN webhook_deliveries d \
               WHERE eps.room > 0 AND d.id IN (\
                 SELECT x.id FROM webhook_deliveries x \
                 WHERE x.endpoint_id = eps.id AND x.state IN ('pending', 'retrying') \
                   AND x.next_attempt_at <= ?1 AND ",
            bursar_storage::fifo_ready!("x"),
            " ORDER BY x.next_attempt_at, x.id LIMIT ?2) \
               UNION ALL \
               SELECT d.id, d.endpoint_id, d.next_attempt_at, eps.room \
               FROM eps CROSS JOIN webhook_deliveries d \
               WHERE eps.room > 0 AND d.endpoint_id = eps.id AND d.state = 'in_flight' \
                 AND d.lease_expires_at < ?1), \
             ranked AS (\
               SELECT id, next_attempt_at, room, row_number() OVER (\
                 PARTITION BY endpoint_id ORDER BY next_attempt_at, id) AS rn \
               FROM candidates) \
             SELECT id FROM ranked WHERE rn <= room ORDER BY next_attempt_at, id LIMIT ?2",
        ))
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(&due).expect("integers serialise");
        // One call for the rest. A delivery taken over in flight lost its attempt (a crashed
        // or stalled worker): that is recorded before the attempt count moves on; then the
        // leases, then what the sends need.
        let rows = sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, duration_ms, \
             error_kind, created_at) \
             SELECT id, endpoint_id, attempt_count, 0, 'lease_lost', ?1 FROM webhook_deliveries \
             WHERE id IN (SELECT value FROM json_each(?2)) AND state = 'in_flight' \
             ON CONFLICT (delivery_id, attempt_no) DO NOTHING; \
             UPDATE webhook_deliveries SET state = 'in_flight', lease_token = ?3, \
             lease_expires_at = ?4, attempt_count = attempt_count + 1, updated_at = ?1 \
             WHERE id IN (SELECT value FROM json_each(?2)); \
             SELECT d.id, d.account_id, d.endpoint_id, d.attempt_count, d.event_id, e.body, \
             e.request_id, e.trace_id, ep.url, ep.secret_enc, ep.previous_secret_enc, \
             ep.previous_secret_expires_at \
             FROM webhook_deliveries d JOIN outbox_events e ON e.event_id = d.event_id \
             JOIN webhook_endpoints ep ON ep.id = d.endpoint_id \
             WHERE d.id IN (SELECT value FROM json_each(?2)) AND d.lease_token = ?3 \
             ORDER BY d.next_attempt_at, d.id",
        )
        .bind(now.0)
        .bind(&ids)
        .bind(lease_token)
        .bind(lease_until.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| ClaimedDelivery {
                delivery_id: r.get("id"),
                account_id: r.get("account_id"),
                endpoint_id: r.get("endpoint_id"),
                attempt_no: r.get("attempt_count"),
                event_id: r.get("event_id"),
                body: r.get("body"),
                url: r.get("url"),
                secret_enc: r.get("secret_enc"),
                previous_secret_enc: r.get("previous_secret_enc"),
                previous_secret_expires_at: r
                    .get::<Option<i64>, _>("previous_secret_expires_at")
                    .map(Timestamp),
                request_id: r.get("request_id"),
                trace_id: r.get("trace_id"),
                slot: None,
            })
            .collect())
    }

    async fn complete_delivery(&self, c: Completion, now: Timestamp) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let held = complete_in(&mut tx, c, now).await?;
        tx.commit().await.map_err(err)?;
        Ok(held)
    }

    /// Plain successes (`plain_successes`) are written by two calls for the whole batch (their
    /// endpoints' health, then the attempts and the deliveries as one multi-statement call);
    /// the rest one by one, as `complete_delivery` does, in the same transaction.
    async fn complete_deliveries(&self, cs: Vec<Completion>, now: Timestamp) -> Result<Vec<bool>> {
        let mut tx = self.writer.begin().await?;
        let ids = serde_json::to_string(&cs.iter().map(|c| c.delivery_id).collect::<Vec<_>>())
            .expect("integers serialise");
        let rows = sqlx::query(concat!(
            "SELECT x.delivery_id, ",
            endpoint_cols!(),
            " FROM (SELECT id AS delivery_id, endpoint_id AS of_endpoint FROM webhook_deliveries \
               WHERE id IN (SELECT value FROM json_each(?))) AS x \
             JOIN webhook_endpoints ON webhook_endpoints.id = x.of_endpoint"
        ))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        let of = |r: &SqliteRow| Ok((r.try_get("delivery_id").map_err(err)?, endpoint(r)?));
        let plain = plain_successes(&cs, rows.iter().map(of).collect::<Result<_>>()?);
        let together: Vec<&Completion> = cs
            .iter()
            .zip(&plain)
            .filter(|p| *p.1)
            .map(|p| p.0)
            .collect();
        let held_together = complete_plain(&mut tx, &together, now).await?;
        let mut held = Vec::with_capacity(cs.len());
        for (c, plain) in cs.into_iter().zip(plain) {
            held.push(if plain {
                held_together.contains(&c.delivery_id)
            } else {
                complete_in(&mut tx, c, now).await?
            });
        }
        tx.commit().await.map_err(err)?;
        Ok(held)
    }

    async fn purge_deliveries(&self, before: Timestamp, limit: u32) -> Result<u64> {
        let delete = |sql: &'static str| async move {
            sqlx::query(sql)
                .bind(before.0)
                .bind(i64::from(limit))
                .execute(&mut *self.writer.lock().await?)
                .await
                .map(|done| done.rows_affected())
                .map_err(err)
        };
        let attempts = delete(
            "DELETE FROM webhook_attempts WHERE id IN (\
               SELECT a.id FROM webhook_deliveries d \
               JOIN webhook_attempts a ON a.delivery_id = d.id \
               WHERE d.state IN ('succeeded', 'failed', 'cancelled') AND d.updated_at < ?1 \
               LIMIT ?2)",
        )
        .await?;
        if attempts > 0 {
            return Ok(attempts);
        }
        delete(
            "DELETE FROM webhook_deliveries WHERE id IN (\
               SELECT d.id FROM webhook_deliveries d \
               WHERE d.state IN ('succeeded', 'failed', 'cancelled') AND d.updated_at < ?1 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_attempts a WHERE a.delivery_id = d.id) \
               LIMIT ?2)",
        )
        .await
    }

    async fn release_deliveries(&self, lease_token: &str, now: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET lease_expires_at = ?, updated_at = ? \
             WHERE lease_token = ? AND state = 'in_flight'",
        )
        .bind(now.0 - 1)
        .bind(now.0)
        .bind(lease_token)
        .execute(&mut *self.writer.lock().await?)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }

    /// SQLite leases nothing ahead (the default `claim_ahead`): what a worker gives back here
    /// is a slot's one delivery that it had not sent when the worker stopped.
    async fn return_unsent(&self, lease_token: &str, ids: &[i64], now: Timestamp) -> Result<u64> {
        let ids = serde_json::to_string(ids).map_err(|e| StorageError::Internal(Box::new(e)))?;
        // One writer: a 410 recorded for the endpoint is either before this (and seen) or
        // after it (and its cancel catches what this gives back).
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET attempt_count = attempt_count - 1, \
             state = CASE WHEN gone THEN 'cancelled' \
               WHEN attempt_count > 1 THEN 'retrying' ELSE 'pending' END, \
             last_error = CASE WHEN gone THEN 'gone' ELSE last_error END, \
             lease_token = NULL, lease_expires_at = NULL, updated_at = ? \
             FROM (SELECT id AS ep_id, enabled = 0 AND disabled_reason IS 'gone' AS gone \
               FROM webhook_endpoints) \
             WHERE ep_id = endpoint_id AND id IN (SELECT value FROM json_each(?)) \
               AND lease_token = ? AND state = 'in_flight'",
        )
        .bind(now.0)
        .bind(ids)
        .bind(lease_token)
        .execute(&mut *self.writer.lock().await?)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }

    async fn replay(
        &self,
        account: AccountId,
        endpoint_id: i64,
        req: ReplayRequest,
        now: Timestamp,
    ) -> Result<Replay> {
        let mut tx = self.writer.begin().await?;
        let types: Option<String> = sqlx::query_scalar(
            "SELECT event_types FROM webhook_endpoints WHERE account_id = ? AND id = ?",
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
             WHERE account_id = ?1 AND seq IS NOT NULL AND created_at >= ?2 AND created_at < ?3 \
               AND (about_endpoint_id IS NULL OR about_endpoint_id <> ?4) \
               AND (?5 OR event_type IN (SELECT value FROM json_each(?6)) \
                    OR EXISTS (SELECT 1 FROM json_each(?7) p \
                               WHERE substr(event_type, 1, length(p.value) + 1) = p.value || '.')) \
             ORDER BY seq LIMIT ?8",
        )
        .bind(account)
        .bind(req.since.0)
        .bind(req.until.0)
        .bind(endpoint_id)
        .bind(filter.all)
        .bind(types_json(&filter.exact))
        .bind(types_json(&filter.prefixes))
        .bind(req.max_events.saturating_add(1))
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        let max = usize::try_from(req.max_events.max(0)).unwrap_or(usize::MAX);
        let next_since = found.get(max).map(|(_, at)| Timestamp(*at));
        let matched: Vec<String> = found.into_iter().take(max).map(|(id, _)| id).collect();
        let ids = types_json(&matched);
        let requeued = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = ?1, \
             updated_at = ?1 \
             WHERE account_id = ?2 AND endpoint_id = ?3 \
               AND event_id IN (SELECT value FROM json_each(?4)) \
               AND (state IN ('failed', 'cancelled') OR (?5 AND state = 'succeeded'))",
        )
        .bind(now.0)
        .bind(account)
        .bind(endpoint_id)
        .bind(&ids)
        .bind(req.include_succeeded)
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        let created = sqlx::query(concat!(
            "INSERT INTO webhook_deliveries (account_id, endpoint_id, event_id, state, \
             next_attempt_at, created_at, updated_at, aggregate_key, event_seq) \
             SELECT ?1, ?2, j.value, 'pending', ?3, ?3, ?3, ",
            bursar_storage::fifo_columns!("ep", "ev"),
            " FROM json_each(?4) AS j JOIN outbox_events ev ON ev.event_id = j.value \
             JOIN webhook_endpoints ep ON ep.id = ?2 WHERE true \
             ON CONFLICT (event_id, endpoint_id) DO NOTHING",
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(now.0)
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(err)?
        .rows_affected();
        let row = sqlx::query(concat!(
            "INSERT INTO webhook_replays (account_id, endpoint_id, since_at, until_at, \
             include_succeeded, status, events_matched, deliveries_created, \
             deliveries_requeued, capped, next_since_at, created_at) \
             VALUES (?, ?, ?, ?, ?, 'completed', ?, ?, ?, ?, ?, ?) RETURNING ",
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
            " FROM webhook_replays WHERE account_id = ? AND endpoint_id = ? AND id = ?"
        ))
        .bind(account)
        .bind(endpoint_id)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        row.as_ref().map(replay).transpose()
    }
}

/// Records plain successes (`plain_successes`) in the caller's write transaction, as one call:
/// every attempt (`lease_lost` where the lease is no longer the completion's, as
/// `complete_in` records it), then every delivery whose lease is still held. Returns the ids
/// of those. Only fixed fragments and a row count go into the text; every value is bound.
async fn complete_plain(
    tx: &mut WriteTx,
    cs: &[&Completion],
    now: Timestamp,
) -> Result<std::collections::HashSet<i64>> {
    if cs.is_empty() {
        return Ok(Default::default());
    }
    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; cs.len()].join(", ");
    // The update needs only the lease and the outcome, not the snippet again.
    let outcomes = vec!["(?, ?, ?, ?)"; cs.len()].join(", ");
    let sql = format!(
        "INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, status_code, \
         duration_ms, error_kind, response_snippet, created_at) \
         SELECT d.id, d.endpoint_id, v.column3, v.column4, v.column5, \
           CASE WHEN d.lease_token = v.column2 THEN v.column6 ELSE 'lease_lost' END, \
           v.column7, v.column8 \
         FROM (VALUES {values}) AS v JOIN webhook_deliveries d ON d.id = v.column1 WHERE true \
         ON CONFLICT (delivery_id, attempt_no) DO NOTHING; \
         UPDATE webhook_deliveries SET state = '{succeeded}', lease_token = NULL, \
           lease_expires_at = NULL, last_status = v.column3, last_error = v.column4, \
           updated_at = ? \
         FROM (VALUES {outcomes}) AS v \
         WHERE webhook_deliveries.id = v.column1 AND webhook_deliveries.lease_token = v.column2 \
         RETURNING webhook_deliveries.id",
        succeeded = state::SUCCEEDED,
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for c in cs {
        let a = &c.attempt;
        q = q
            .bind(c.delivery_id)
            .bind(c.lease_token.clone())
            .bind(a.attempt_no)
            .bind(a.status_code)
            .bind(a.duration_ms)
            .bind(a.error_kind.clone())
            .bind(a.response_snippet.clone())
            .bind(a.created_at.0);
    }
    q = q.bind(now.0);
    for c in cs {
        let a = &c.attempt;
        q = q
            .bind(c.delivery_id)
            .bind(c.lease_token.clone())
            .bind(a.status_code)
            .bind(a.error_kind.clone());
    }
    let held: Vec<i64> = q
        .fetch_all(&mut **tx)
        .await
        .map_err(err)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(err)?;
    Ok(held.into_iter().collect())
}

/// One completion inside the caller's write transaction (see `Store::complete_delivery`).
async fn complete_in(tx: &mut WriteTx, c: Completion, now: Timestamp) -> Result<bool> {
    let (new_state, next_at) = match c.outcome {
        Outcome::Succeeded => (state::SUCCEEDED, None),
        Outcome::Retry(at) => (state::RETRYING, Some(at.0)),
        Outcome::Exhausted => (state::FAILED, None),
        Outcome::Gone => (state::CANCELLED, None),
    };
    let a = &c.attempt;
    // The delivery as it was before this attempt, if the lease is still this worker's.
    let held = sqlx::query(
        "SELECT d.account_id, d.endpoint_id, d.event_id, d.last_error, e.event_type, \
         e.request_id, e.trace_id \
         FROM webhook_deliveries d JOIN outbox_events e ON e.event_id = d.event_id \
         WHERE d.id = ? AND d.lease_token = ?",
    )
    .bind(c.delivery_id)
    .bind(&c.lease_token)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)?;
    // The endpoint's health and what this attempt does to it (applied below, with the
    // lease held).
    let ep = match &held {
        Some(h) => {
            let row = sqlx::query(concat!(
                "SELECT ",
                endpoint_cols!(),
                " FROM webhook_endpoints WHERE id = ?"
            ))
            .bind(h.get::<i64, _>("endpoint_id"))
            .fetch_one(&mut **tx)
            .await
            .map_err(err)?;
            Some(endpoint(&row)?)
        }
        None => None,
    };
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
    if held.is_some() {
        sqlx::query(
            "UPDATE webhook_deliveries SET state = ?, \
             next_attempt_at = COALESCE(?, next_attempt_at), lease_token = NULL, \
             lease_expires_at = NULL, last_status = ?, last_error = ?, updated_at = ? \
             WHERE id = ?",
        )
        .bind(new_state)
        .bind(next_at)
        .bind(a.status_code)
        .bind(&a.error_kind)
        .bind(now.0)
        .bind(c.delivery_id)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    }
    let error_kind = if held.is_some() {
        a.error_kind.clone()
    } else {
        Some("lease_lost".to_owned())
    };
    // The attempt number is the lease's; a lost lease's number may already be recorded
    // (as `lease_lost`, by the worker that took over).
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, endpoint_id, attempt_no, status_code, \
         duration_ms, error_kind, response_snippet, created_at) \
         SELECT id, endpoint_id, ?, ?, ?, ?, ?, ? FROM webhook_deliveries WHERE id = ? \
         ON CONFLICT (delivery_id, attempt_no) DO NOTHING",
    )
    .bind(a.attempt_no)
    .bind(a.status_code)
    .bind(a.duration_ms)
    .bind(&error_kind)
    .bind(&a.response_snippet)
    .bind(a.created_at.0)
    .bind(c.delivery_id)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    let (Some(held), Some(ep)) = (held, ep) else {
        return Ok(false);
    };
    let account: AccountId = held.get("account_id");
    let endpoint_id = ep.id;
    let mut notices = Vec::new();
    if let Some(change) = change {
        // A disabled endpoint is only disabled again by a 410 (which names the reason).
        let disable = change.disable.filter(|r| ep.enabled || *r == "gone");
        let h = &change.health;
        let row = sqlx::query(concat!(
            "UPDATE webhook_endpoints SET first_failure_at = ?1, consecutive_failures = ?2, \
             circuit_state = ?3, circuit_open_until = ?4, \
             enabled = CASE WHEN ?5 IS NULL THEN enabled ELSE 0 END, \
             disabled_reason = COALESCE(?5, disabled_reason), \
             version = CASE WHEN ?5 IS NULL THEN version ELSE version + 1 END, \
             updated_at = CASE WHEN ?5 IS NULL THEN updated_at ELSE ?6 END \
             WHERE id = ?7 RETURNING ",
            endpoint_cols!()
        ))
        .bind(h.first_failure_at.map(|t| t.0))
        .bind(h.consecutive_failures)
        .bind(if h.circuit_open { "open" } else { "closed" })
        .bind(h.circuit_open_until.map(|t| t.0))
        .bind(disable)
        .bind(now.0)
        .bind(endpoint_id)
        .fetch_one(&mut **tx)
        .await
        .map_err(err)?;
        let updated = endpoint(&row)?;
        if let Some(until) = change.defer_backlog_until {
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = ?1, updated_at = ?2 \
                 WHERE endpoint_id = ?3 AND state IN ('pending', 'retrying') \
                 AND next_attempt_at < ?1",
            )
            .bind(until.0)
            .bind(now.0)
            .bind(endpoint_id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if change.drain_backlog {
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = ?1, updated_at = ?1 \
                 WHERE endpoint_id = ?2 AND state IN ('pending', 'retrying') \
                 AND next_attempt_at > ?1",
            )
            .bind(now.0)
            .bind(endpoint_id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if disable == Some("gone") {
            sqlx::query(
                "UPDATE webhook_deliveries SET state = 'cancelled', last_error = 'gone', \
                 updated_at = ? WHERE endpoint_id = ? AND state IN ('pending', 'retrying')",
            )
            .bind(now.0)
            .bind(endpoint_id)
            .execute(&mut **tx)
            .await
            .map_err(err)?;
        }
        if disable.is_some() && ep.enabled {
            notices.push(endpoint_disabled_event(&updated));
        }
    }
    let event_id: String = held.get("event_id");
    let event_type: String = held.get("event_type");
    let previous_error: Option<String> = held.get("last_error");
    let finished = Finished {
        delivery_id: c.delivery_id,
        endpoint_id,
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
            endpoint_id,
            held.get("request_id"),
            held.get("trace_id"),
            now,
            ev,
        )
        .await?;
    }
    Ok(true)
}

/// The endpoint's latest attempts since `since` (at most `RECENT_ATTEMPTS`, lost leases not
/// counted) and how many failed, for the failure-rate trigger of `Health::after`.
async fn recent_attempts(tx: &mut WriteTx, endpoint_id: i64, since: Timestamp) -> Result<Recent> {
    let row = sqlx::query(
        "SELECT count(*) AS n, count(error_kind) AS failed FROM (\
           SELECT error_kind FROM webhook_attempts \
           WHERE endpoint_id = ?1 AND created_at >= ?2 \
             AND (error_kind IS NULL OR error_kind <> 'lease_lost') \
           ORDER BY id DESC LIMIT ?3) AS latest",
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
