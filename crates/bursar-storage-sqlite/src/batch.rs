//! SQLite's side of group commit (`bursar_storage::group_commit`).
//!
//! SQLite has one writer, so write throughput is set by how long each transaction holds it and
//! by how many times the async side hands work to the connection's worker thread and waits.
//! A batch of creates is therefore sent as one SQL text, `BEGIN IMMEDIATE; …; COMMIT`, in a
//! single call: one hand-off and one commit for the whole batch.
//!
//! Creates under an `Idempotency-Key` take two calls: the first claims every key, inserts the
//! orders whose claim succeeded and their events; the service then renders each response,
//! and the second call stores the responses and commits. A key that was already claimed
//! comes back as `Written::Conflict`, and the store answers it outside the batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bursar_storage::group_commit::{Create, GroupWriter, Written};
use bursar_storage::{StorageError, StoredResponse, WriteMeta, decode};
use sqlx::FromRow;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Row, Sqlite};

use crate::writer::Writer;
use crate::{OrderRow, err};

/// Most creates one transaction carries (12 bind parameters each, far below SQLite's limit).
pub const MAX_BATCH: usize = 64;

type Query = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

/// The statements of one create; `{slot}` tags its RETURNING row with its place in the batch.
fn sql_of(create: &Create) -> &'static str {
    match create {
        // Claim the key, then insert the order only if the claim took (`changes() = 1` right
        // after the claim), and its event only if the order went in. A key with any record (even an expired
        // one awaiting its sweep) is a conflict, answered outside the batch.
        Create::Order { keyed: Some(_), .. } => concat!(
            "INSERT INTO idempotency_keys (account_id, idem_key, method, route, fingerprint, \
             response_status, response_headers, response_body, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, 0, '[]', x'', ?, ?) \
             ON CONFLICT (account_id, idem_key) DO NOTHING \
             RETURNING {slot} AS slot, 'claim' AS kind, id AS key_id; \
             INSERT INTO orders (account_id, customer_id, amount_minor, currency, status, \
             description, metadata, version, created_at, updated_at) \
             SELECT ?, ?, ?, ?, 'pending', ?, ?, 1, ?, ? WHERE EXISTS \
             (SELECT 1 FROM customers WHERE account_id = ? AND id = ?) AND changes() = 1 \
             RETURNING {slot} AS slot, 'row' AS kind, ",
            order_cols!(),
            "; INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
             aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, 'order.created', 'order', id, version, ",
            order_json!(),
            ", ?, ?, created_at FROM orders WHERE id = last_insert_rowid() \
             AND changes() = 1;"
        ),
        Create::Customer { .. } => concat!(
            "INSERT INTO customers (account_id, name, email, metadata, version, created_at, \
             updated_at) VALUES (?, ?, ?, ?, 1, ?, ?) RETURNING {slot} AS slot, ",
            customer_cols!(),
            "; INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
             aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, 'customer.created', 'customer', id, version, ",
            customer_json!(),
            ", ?, ?, created_at FROM customers WHERE id = last_insert_rowid() \
             AND changes() = 1;"
        ),
        // The order row exists only if the customer belongs to the same account; the
        // event insert is guarded by `changes() = 1`, so nothing is appended otherwise.
        Create::Order { .. } => concat!(
            "INSERT INTO orders (account_id, customer_id, amount_minor, currency, status, \
             description, metadata, version, created_at, updated_at) \
             SELECT ?, ?, ?, ?, 'pending', ?, ?, 1, ?, ? WHERE EXISTS \
             (SELECT 1 FROM customers WHERE account_id = ? AND id = ?) \
             RETURNING {slot} AS slot, ",
            order_cols!(),
            "; INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
             aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, 'order.created', 'order', id, version, ",
            order_json!(),
            ", ?, ?, created_at FROM orders WHERE id = last_insert_rowid() \
             AND changes() = 1;"
        ),
    }
}

/// Binds one create's values in the order of its statements.
fn bind(create: &Create, meta: &WriteMeta, q: Query) -> Query {
    let q = match create {
        Create::Customer {
            name,
            email,
            metadata_json,
        } => q
            .bind(meta.account_id)
            .bind(name.clone())
            .bind(email.clone())
            .bind(metadata_json.clone())
            .bind(meta.at.0)
            .bind(meta.at.0),
        Create::Order {
            customer_id,
            amount_minor,
            currency,
            description,
            metadata_json,
            keyed,
        } => match keyed {
            Some(k) => q
                .bind(meta.account_id)
                .bind(k.claim.key.clone())
                .bind(k.claim.method.clone())
                .bind(k.claim.route.clone())
                .bind(k.claim.fingerprint.clone())
                .bind(meta.at.0)
                .bind(k.claim.expires_at.0),
            None => q,
        }
        .bind(meta.account_id)
        .bind(*customer_id)
        .bind(*amount_minor)
        .bind(*currency)
        .bind(description.clone())
        .bind(metadata_json.clone())
        .bind(meta.at.0)
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(*customer_id),
    };
    q.bind(meta.request_id.clone()).bind(meta.trace_id.clone())
}

/// Writes batches on the single writer connection.
pub struct SqliteCreates {
    pub(crate) writer: Writer,
    /// Committed transactions, for metrics and tests.
    pub commits: Arc<AtomicU64>,
}

#[async_trait]
impl GroupWriter for SqliteCreates {
    type Item = Create;
    type Out = Written<SqliteRow>;
    const NAME: &'static str = "creates";

    fn settle(
        create: &Create,
        out: Written<SqliteRow>,
    ) -> Result<Written<SqliteRow>, StorageError> {
        create.settle(out)
    }

    /// One call to the writer connection: `BEGIN IMMEDIATE; <each create>; COMMIT`.
    /// `fetch_all` drives every statement to the end; after a failure `ROLLBACK` leaves the
    /// connection clean for the next batch (and a task stopped half-way rolls back through
    /// `WriteTx`'s drop).
    async fn write(
        &self,
        batch: &[(WriteMeta, Create)],
    ) -> Result<Vec<Written<SqliteRow>>, StorageError> {
        // Batches are of one kind, so either every create is keyed or none is.
        let keyed = batch.first().is_some_and(|(_, c)| c.keyed().is_some());
        let mut sql = String::from("BEGIN IMMEDIATE; ");
        for (slot, (_, write)) in batch.iter().enumerate() {
            sql.push_str(&sql_of(write).replace("{slot}", &slot.to_string()));
        }
        if !keyed {
            sql.push_str(" COMMIT;");
        }
        // The text is assembled only from the static statements above and slot numbers.
        let mut query: Query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (meta, write) in batch {
            query = bind(write, meta, query);
        }
        let mut tx = self.writer.deferred().await?;
        let outcome = match query.fetch_all(&mut *tx).await {
            Ok(rows) if keyed => respond_and_commit(&mut tx, batch, rows).await,
            Ok(rows) => Ok(by_slot(batch.len(), rows, "row")
                .into_iter()
                .map(|row| row.map_or(Written::Missing, Written::Row))
                .collect()),
            Err(e) => Err(err(e)),
        };
        if outcome.is_err() {
            let _ = tx.rollback().await;
        } else {
            tx.committed();
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn took(out: &Written<SqliteRow>) -> bool {
        out.took()
    }
}

/// Rows of one `kind` by their slot (rows without a `kind` column count as `"row"`).
fn by_slot(n: usize, rows: Vec<SqliteRow>, kind: &str) -> Vec<Option<SqliteRow>> {
    let mut out: Vec<Option<SqliteRow>> = (0..n).map(|_| None).collect();
    for row in rows {
        let row_kind = row
            .try_get::<String, _>("kind")
            .unwrap_or_else(|_| "row".into());
        let slot = row
            .try_get::<i64, _>("slot")
            .ok()
            .and_then(|s| usize::try_from(s).ok());
        if let Some(place) = slot
            .and_then(|s| out.get_mut(s))
            .filter(|_| row_kind == kind)
        {
            *place = Some(row);
        }
    }
    out
}

/// The second call of a keyed batch, inside its open transaction: render each claimed
/// create's response, store them all, commit.
async fn respond_and_commit(
    conn: &mut sqlx::SqliteConnection,
    batch: &[(WriteMeta, Create)],
    rows: Vec<SqliteRow>,
) -> Result<Vec<Written<SqliteRow>>, StorageError> {
    let (claim_rows, order_rows): (Vec<SqliteRow>, Vec<SqliteRow>) = rows
        .into_iter()
        .partition(|r| r.try_get::<String, _>("kind").is_ok_and(|k| k == "claim"));
    let claims: Vec<Option<i64>> = by_slot(batch.len(), claim_rows, "claim")
        .into_iter()
        .map(|r| r.and_then(|r| r.try_get::<i64, _>("key_id").ok()))
        .collect();
    let mut orders = by_slot(batch.len(), order_rows, "row");
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut stored: Vec<(i64, Option<i64>, StoredResponse)> = Vec::new();
    for (slot, (_, create)) in batch.iter().enumerate() {
        let (Some(key_id), Some(keyed)) = (claims[slot], create.keyed()) else {
            outcomes.push(Written::Conflict);
            continue;
        };
        let order = match orders[slot].take() {
            Some(row) => OrderRow::from_row(&row)
                .map_err(err)
                .and_then(OrderRow::into_record),
            None => Err(StorageError::UnknownCustomer),
        };
        let Some(response) = (keyed.respond)(order.as_ref()) else {
            return Err(order.err().unwrap_or_else(|| {
                StorageError::Internal("no response rendered for a created order".into())
            }));
        };
        stored.push((key_id, order.as_ref().ok().map(|o| o.id), response.clone()));
        outcomes.push(Written::Stored(response));
    }
    let mut sql = String::new();
    for _ in &stored {
        sql.push_str(
            "UPDATE idempotency_keys SET response_status = ?, response_headers = ?, \
             response_body = ?, resource_id = ? WHERE id = ?; ",
        );
    }
    sql.push_str("COMMIT;");
    let mut query: Query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (key_id, resource_id, response) in stored {
        query = query
            .bind(i64::from(response.status))
            .bind(decode::headers_json(&response.headers))
            .bind(response.body)
            .bind(resource_id)
            .bind(key_id);
    }
    query.execute(&mut *conn).await.map_err(err)?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteOptions, SqliteStore};
    use bursar_domain::Timestamp;
    use bursar_storage::{AccountStore, CustomerStore, EventStore, NewCustomer};

    fn order(customer_id: i64, metadata_json: &str) -> Create {
        Create::Order {
            customer_id,
            amount_minor: 100,
            currency: "USD",
            description: None,
            metadata_json: metadata_json.into(),
            keyed: None,
        }
    }

    /// Queues every write before the collector gets to run: on a current-thread runtime the
    /// spawned submits all enqueue before the collector task is polled, so they form one batch.
    async fn submit_together(
        store: &SqliteStore,
        meta: &WriteMeta,
        writes: Vec<Create>,
    ) -> Vec<Result<SqliteRow, StorageError>> {
        let tasks: Vec<_> = writes
            .into_iter()
            .map(|w| {
                let creates = store.creates.clone();
                let meta = meta.clone();
                tokio::spawn(async move { creates.submit(meta, w).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().and_then(|w| match w {
                Written::Row(row) => Ok(row),
                _ => Err(StorageError::Internal("not a row".into())),
            }));
        }
        out
    }

    /// A fresh store with one account and one customer: (dir, store, write meta, customer id).
    async fn fixture() -> (tempfile::TempDir, SqliteStore, WriteMeta, i64) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("b.db").display());
        let store = SqliteStore::open(&url, &SqliteOptions::default())
            .await
            .unwrap();
        let a = store.create_account("a", Timestamp(1)).await.unwrap().id;
        let meta = WriteMeta {
            account_id: a,
            at: Timestamp(2),
            request_id: "req_batch".into(),
            trace_id: "0".repeat(32),
        };
        let c = store
            .create_customer(&meta, NewCustomer::default())
            .await
            .unwrap()
            .id;
        (dir, store, meta, c)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_failing_create_does_not_fail_its_batch() {
        let (_dir, store, meta, c) = fixture().await;
        let a = meta.account_id;
        // Job 1 makes the event's json() fail, so the batch as a whole fails; job 2 names an
        // unknown customer. Each must still get its own answer.
        let writes = [
            order(c, "{}"),
            order(c, "not json"),
            order(c + 99, "{}"),
            order(c, "{}"),
        ];
        let before = store.create_commits();
        let outcomes: Vec<_> = submit_together(&store, &meta, writes.to_vec())
            .await
            .into_iter()
            .map(|r| r.map(|row| row.get::<i64, _>("id")))
            .collect();
        // The batch of four failed as a whole; then each create was written alone, and all
        // but the malformed one committed (the unknown customer's transaction is empty).
        assert_eq!(store.create_commits() - before, 3, "{outcomes:?}");
        assert!(outcomes[0].is_ok() && outcomes[3].is_ok(), "{outcomes:?}");
        assert!(
            matches!(outcomes[1], Err(StorageError::Internal(_))),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[2], Err(StorageError::UnknownCustomer)),
            "{outcomes:?}"
        );
        for id in [&outcomes[0], &outcomes[3]] {
            let id = *id.as_ref().unwrap();
            assert_eq!(store.events_for(a, "order", id).await.unwrap().len(), 1);
        }
        // The connection is clean: later writes still commit.
        assert!(
            store
                .create_customer(&meta, NewCustomer::default())
                .await
                .is_ok()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_creates_share_one_transaction() {
        let (_dir, store, meta, c) = fixture().await;
        let a = meta.account_id;
        let before = store.create_commits();
        let ids: Vec<i64> = submit_together(&store, &meta, vec![order(c, "{}"); 10])
            .await
            .into_iter()
            .map(|r| r.unwrap().get::<i64, _>("id"))
            .collect();
        // Consecutive ids in submission order: written in order.
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert_eq!(
            store.create_commits() - before,
            1,
            "ten creates, one commit"
        );
        for id in ids {
            assert_eq!(store.events_for(a, "order", id).await.unwrap().len(), 1);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keyed_creates_claim_answer_and_commit_in_one_batch() {
        use bursar_storage::group_commit::Keyed;
        use bursar_storage::{IdempotencyClaim, IdempotencyStore, Order, StoredResponse};
        let (_dir, store, meta, c) = fixture().await;
        let respond: bursar_storage::OrderResponder =
            Arc::new(|o: Result<&Order, &StorageError>| {
                let status = if o.is_ok() { 201 } else { 422 };
                Some(StoredResponse {
                    status,
                    headers: vec![],
                    body: b"x".to_vec(),
                })
            });
        let keyed = |key: &str, customer: i64| {
            let claim = IdempotencyClaim {
                key: key.into(),
                method: "POST".into(),
                route: "/api/orders".into(),
                fingerprint: "fp".into(),
                expires_at: Timestamp(i64::MAX),
            };
            let write = Create::Order {
                customer_id: customer,
                amount_minor: 100,
                currency: "USD",
                description: None,
                metadata_json: "{}".into(),
                keyed: Some(Keyed {
                    claim,
                    respond: respond.clone(),
                }),
            };
            let creates = store.creates.clone();
            let meta = meta.clone();
            tokio::spawn(async move { creates.submit(meta, write).await })
        };
        let before = store.create_commits();
        let tasks = [keyed("k1", c), keyed("k1", c), keyed("k2", c + 99)];
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().unwrap());
        }
        assert_eq!(store.create_commits() - before, 1, "one transaction");
        assert!(matches!(&outcomes[0], Written::Stored(r) if r.status == 201));
        assert!(
            matches!(outcomes[1], Written::Conflict),
            "same key later in the batch"
        );
        assert!(matches!(&outcomes[2], Written::Stored(r) if r.status == 422));
        for key in ["k1", "k2"] {
            let record = store
                .find_idempotency(meta.account_id, key, Timestamp(0))
                .await
                .unwrap();
            assert!(
                record.is_some_and(|r| r.response.body == b"x"),
                "{key} stored"
            );
        }
    }
}
