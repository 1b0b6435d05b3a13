//! SQLite's side of group commit (`bursar_storage::group_commit`).
//!
//! SQLite has one writer, so write throughput is set by how long each transaction holds it and
//! by how many times the async side hands work to the connection's worker thread and waits.
//! A batch of creates is therefore sent as one SQL text, `BEGIN IMMEDIATE; …; COMMIT`, in a
//! single call: one hand-off and one commit for the whole batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bursar_storage::group_commit::{Create, GroupWriter};
use bursar_storage::{StorageError, WriteMeta};
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};

use crate::err;

/// Most creates one transaction carries (12 bind parameters each, far below SQLite's limit).
pub const MAX_BATCH: usize = 64;

type Query = sqlx::query::Query<'static, Sqlite, SqliteArguments>;

/// The statements of one create; `{slot}` tags its RETURNING row with its place in the batch.
fn sql_of(create: &Create) -> &'static str {
    match create {
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
        } => q
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
    pub pool: SqlitePool,
    /// Committed transactions, for metrics and tests.
    pub commits: Arc<AtomicU64>,
}

#[async_trait]
impl GroupWriter for SqliteCreates {
    type Row = SqliteRow;

    /// One call to the writer connection: `BEGIN IMMEDIATE; <each create>; COMMIT`.
    /// `fetch_all` drives every statement to the end; after a failure `ROLLBACK` leaves the
    /// connection clean for the next batch.
    async fn write(
        &self,
        batch: &[(WriteMeta, Create)],
    ) -> Result<Vec<Option<SqliteRow>>, StorageError> {
        let mut sql = String::from("BEGIN IMMEDIATE; ");
        for (slot, (_, write)) in batch.iter().enumerate() {
            sql.push_str(&sql_of(write).replace("{slot}", &slot.to_string()));
        }
        sql.push_str(" COMMIT;");
        // The text is assembled only from the static statements above and slot numbers.
        let mut query: Query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (meta, write) in batch {
            query = bind(write, meta, query);
        }
        let mut conn = self.pool.acquire().await.map_err(err)?;
        let rows = match query.fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(err(e));
            }
        };
        self.commits.fetch_add(1, Ordering::Relaxed);
        let mut by_slot: Vec<Option<SqliteRow>> = (0..batch.len()).map(|_| None).collect();
        for row in rows {
            let slot = row
                .try_get::<i64, _>("slot")
                .ok()
                .and_then(|s| usize::try_from(s).ok());
            if let Some(place) = slot.and_then(|s| by_slot.get_mut(s)) {
                *place = Some(row);
            }
        }
        Ok(by_slot)
    }
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
            out.push(t.await.unwrap());
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
}
