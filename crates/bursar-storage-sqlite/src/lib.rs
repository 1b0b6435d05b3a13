//! SQLite backend of the Bursar storage port.
//!
//! One writer connection and a small read pool: SQLite serialises writers anyway, and a single
//! writer avoids lock hand-offs (measured faster than a pool of writers). WAL lets readers run
//! beside the writer; every write transaction opens with `BEGIN IMMEDIATE` so it takes the write
//! lock up front and waits in `busy_timeout` instead of failing with `SQLITE_BUSY` mid-way
//! (which also keeps two `bursar` processes on one file safe). Creates, the hot path, go
//! through a group-commit writer task (`batch`) that writes every waiting create in one
//! transaction.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bursar_domain::{AccountId, OrderAction, Timestamp};
use bursar_storage::group_commit::{Create, GroupCommit, Keyed, Written};
use bursar_storage::*;
use bursar_storage::{decode, operations};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, FromRow, Row, Sqlite};

use crate::writer::{WriteTx, Writer};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Tunables for [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long a writer waits for the lock before giving up.
    pub busy_timeout: Duration,
    /// Connections of the read pool.
    pub readers: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            readers: 4,
        }
    }
}

pub struct SqliteStore {
    /// The one write connection (`writer`).
    writer: Writer,
    readers: SqlitePool,
    /// Creates go through group commit (see `batch`).
    creates: Arc<GroupCommit<batch::SqliteCreates>>,
    /// The steps of phased work on the way to a payment go through group commit too (see
    /// `steps`).
    steps: Arc<GroupCommit<steps::SqliteSteps>>,
    step_commits: Arc<AtomicU64>,
    create_commits: Arc<AtomicU64>,
    /// Copies the write-ahead log into the database file off the writer's timeline.
    checkpointer: Arc<checkpoint::Checkpointer>,
}

fn err(e: sqlx::Error) -> StorageError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StorageError::Conflict,
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        sqlx::Error::Database(db)
            if db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| matches!(c & 0xff, 5 | 6)) =>
        {
            StorageError::Unavailable(Box::new(e))
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StorageError::Unavailable(Box::new(e))
        }
        _ => StorageError::Internal(Box::new(e)),
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or a plain path)
    /// and runs the migrations.
    pub async fn open(url: &str, opts: &SqliteOptions) -> Result<SqliteStore> {
        let connect = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(err)?
        } else {
            SqliteConnectOptions::new().filename(Path::new(url))
        };
        let connect = connect
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(opts.busy_timeout);
        // No ping before each acquire: a SQLite connection cannot go stale, and the ping is
        // one more hop to the connection's worker thread on every request.
        // Batched creates produce one statement text per batch size and kind; keep them all.
        let writer_connect = connect
            .clone()
            .statement_cache_capacity(4 * batch::MAX_BATCH)
            // The checkpointer copies most of the log in the background (`checkpoint`).
            .pragma("wal_autocheckpoint", checkpoint::WRITER_PAGES.to_string());
        let mut conn = writer_connect.connect().await.map_err(err)?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| StorageError::Internal(Box::new(e)))?;
        let writer = Writer::new(conn, opts.busy_timeout * 2);
        let checkpointer = checkpoint::Checkpointer::start(&connect).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(opts.readers.max(1))
            .test_before_acquire(false)
            .connect_with(connect.read_only(true))
            .await
            .map_err(err)?;
        let create_commits = Arc::new(AtomicU64::new(0));
        let creates = Arc::new(GroupCommit::spawn(
            batch::SqliteCreates {
                writer: writer.clone(),
                commits: create_commits.clone(),
            },
            batch::MAX_BATCH,
            // No size bound: statements go to an in-process library, not over a socket.
            usize::MAX,
            1,
        ));
        let step_commits = Arc::new(AtomicU64::new(0));
        let steps = Arc::new(GroupCommit::spawn(
            steps::SqliteSteps {
                writer: writer.clone(),
                commits: step_commits.clone(),
            },
            steps::MAX_BATCH,
            usize::MAX,
            1,
        ));
        Ok(SqliteStore {
            writer,
            readers,
            creates,
            steps,
            create_commits,
            step_commits,
            checkpointer,
        })
    }

    /// Transactions the steps' group-commit writer has committed (each carries one or more
    /// steps of phased work).
    pub fn step_commits(&self) -> u64 {
        self.step_commits.load(Ordering::Relaxed)
    }

    /// Transactions the group-commit writer has committed (each carries one or more creates).
    pub fn create_commits(&self) -> u64 {
        self.create_commits.load(Ordering::Relaxed)
    }
}

/// The event payload of a customer, built by SQL from the inserted row. The conformance suite
/// checks it equals the serde form of `bursar_storage::Customer` that updates emit.
macro_rules! customer_json {
    () => {
        "json_object('id', id, 'account_id', account_id, 'name', name, 'email', email, \
         'metadata', json(metadata), 'version', version, 'created_at', created_at, \
         'updated_at', updated_at)"
    };
}
/// The event payload of an order (see `customer_json!`).
macro_rules! order_json {
    () => {
        "json_object('id', id, 'account_id', account_id, 'customer_id', customer_id, \
         'amount', json_object('minor', amount_minor, 'currency', currency), 'status', status, \
         'description', description, 'metadata', json(metadata), 'version', version, \
         'created_at', created_at, 'updated_at', updated_at)"
    };
}

macro_rules! customer_cols {
    () => {
        "id, account_id, name, email, metadata, version, created_at, updated_at"
    };
}
macro_rules! order_cols {
    () => {
        "id, account_id, customer_id, amount_minor, currency, status, description, metadata, \
         version, created_at, updated_at"
    };
}

/// The columns a payment is read with (`money::payment` decodes them).
macro_rules! payment_cols {
    () => {
        "id, account_id, order_id, processor_id, payment_method, \
    amount_minor, currency, status, captured_minor, refunded_minor, failure_code, \
    failure_message, version, created_at, updated_at"
    };
}
/// The columns phased work is leased with (`ops::leased` decodes them).
macro_rules! leased_cols {
    () => {
        "id, fence, account_id, method, route, recovery_point, phase_state, request_body, \
         request_id, trace_id, attempts"
    };
}
/// The columns an idempotency record is read with (`key_record` decodes them).
macro_rules! key_cols {
    () => {
        "id, method, route, fingerprint, response_status, response_headers, response_body, \
         created_at, expires_at, recovery_point, locked_until, resource_id"
    };
}

// Declared after the SQL macros above, which they use.
mod batch;
mod checkpoint;
mod events;
mod money;
mod ops;
mod product;
mod steps;
mod writer;

#[derive(FromRow)]
struct CustomerRow {
    id: i64,
    account_id: i64,
    name: Option<String>,
    email: Option<String>,
    metadata: String,
    version: i64,
    created_at: i64,
    updated_at: i64,
}

impl CustomerRow {
    fn into_record(self) -> Result<Customer> {
        Ok(Customer {
            id: self.id,
            account_id: self.account_id,
            name: self.name,
            email: self.email,
            metadata: decode::metadata(&self.metadata)?,
            version: self.version,
            created_at: Timestamp(self.created_at),
            updated_at: Timestamp(self.updated_at),
        })
    }
}

#[derive(FromRow)]
struct OrderRow {
    id: i64,
    account_id: i64,
    customer_id: i64,
    amount_minor: i64,
    currency: String,
    status: String,
    description: Option<String>,
    metadata: String,
    version: i64,
    created_at: i64,
    updated_at: i64,
}

impl OrderRow {
    fn into_record(self) -> Result<Order> {
        Ok(Order {
            id: self.id,
            account_id: self.account_id,
            customer_id: self.customer_id,
            amount: decode::money(self.amount_minor, &self.currency)?,
            status: decode::status(&self.status)?,
            description: self.description,
            metadata: decode::metadata(&self.metadata)?,
            version: self.version,
            created_at: Timestamp(self.created_at),
            updated_at: Timestamp(self.updated_at),
        })
    }
}

async fn append_event(tx: &mut WriteTx, meta: &WriteMeta, ev: NewEvent) -> Result<()> {
    let mut sql = steps::Sql::default();
    steps::event_sql(&mut sql, meta, ev);
    sql.fetch_all(tx).await?;
    Ok(())
}

/// After a conditional UPDATE matched nothing: tell "gone" from "stale" from "wrong state".
async fn explain_miss(
    tx: &mut WriteTx,
    table_is_orders: bool,
    account: AccountId,
    id: i64,
    expected: Precondition,
) -> StorageError {
    let row = if table_is_orders {
        sqlx::query("SELECT version, status FROM orders WHERE account_id = ? AND id = ?")
    } else {
        sqlx::query("SELECT version, NULL AS status FROM customers WHERE account_id = ? AND id = ?")
    }
    .bind(account)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await;
    match row {
        Err(e) => err(e),
        Ok(None) => StorageError::NotFound,
        Ok(Some(r)) => {
            let current: i64 = r.get("version");
            if expected.version().is_some_and(|v| v != current) {
                return StorageError::VersionMismatch { current };
            }
            match r
                .get::<Option<String>, _>("status")
                .map(|s| decode::status(&s))
            {
                Some(Ok(current)) => StorageError::InvalidState { current },
                Some(Err(e)) => e,
                None => StorageError::VersionMismatch { current },
            }
        }
    }
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_account(&self, name: &str, at: Timestamp) -> Result<Account> {
        let mut tx = self.writer.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (name, created_at) VALUES (?, ?) RETURNING id",
        )
        .bind(name)
        .bind(at.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Account {
            id,
            name: name.to_owned(),
            created_at: at,
        })
    }

    async fn find_account(&self, name_or_id: &str) -> Result<Option<Account>> {
        let id = name_or_id.parse::<i64>().ok();
        let row = sqlx::query(
            "SELECT id, name, created_at FROM accounts WHERE id = ? OR name = ? \
             ORDER BY (id = ?) DESC LIMIT 1",
        )
        .bind(id)
        .bind(name_or_id)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        Ok(row.map(|r: SqliteRow| Account {
            id: r.get("id"),
            name: r.get("name"),
            created_at: Timestamp(r.get("created_at")),
        }))
    }

    async fn count_accounts(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.readers)
            .await
            .map_err(err)
    }

    async fn create_api_key(&self, key: NewApiKey, at: Timestamp) -> Result<i64> {
        let mut tx = self.writer.begin().await?;
        let id = sqlx::query_scalar(
            "INSERT INTO api_keys (account_id, mode, key_hash, start, last4, created_at, name, \
             scopes, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(key.account_id)
        .bind(key.mode.as_str())
        .bind(&key.key_hash)
        .bind(&key.start)
        .bind(&key.last4)
        .bind(at.0)
        .bind(&key.name)
        .bind(decode::scopes_text(key.scopes.as_deref()))
        .bind(key.expires_at.map(|t| t.0))
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(id)
    }

    async fn find_api_key(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>> {
        let row = sqlx::query(
            "SELECT k.id, k.account_id, k.mode, k.revoked_at IS NOT NULL AS revoked, k.expires_at, \
             k.scopes, COALESCE(k.limit_id, k.id) AS limit_id, a.plan \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?",
        )
        .bind(key_hash)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        row.map(|r| {
            Ok(ApiKeyRecord {
                id: r.get("id"),
                account_id: r.get("account_id"),
                mode: decode::key_mode(r.get("mode"))?,
                revoked: r.get("revoked"),
                expires_at: r.get::<Option<i64>, _>("expires_at").map(Timestamp),
                scopes: decode::scopes(r.get::<Option<&str>, _>("scopes"))?,
                limit_id: r.get("limit_id"),
                plan: r.get("plan"),
            })
        })
        .transpose()
    }
}

#[async_trait]
impl CustomerStore for SqliteStore {
    async fn create_customer(&self, meta: &WriteMeta, new: NewCustomer) -> Result<Customer> {
        let written = self
            .creates
            .submit(meta.clone(), Create::customer(new))
            .await?;
        let row = written_row(written)?;
        CustomerRow::from_row(&row).map_err(err)?.into_record()
    }

    async fn get_customer(&self, account: AccountId, id: i64) -> Result<Option<Customer>> {
        let row: Option<CustomerRow> = sqlx::query_as(concat!(
            "SELECT ",
            customer_cols!(),
            " FROM customers WHERE account_id = ? AND id = ?"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        row.map(CustomerRow::into_record).transpose()
    }

    async fn list_customers(
        &self,
        account: AccountId,
        page: PageRequest,
    ) -> Result<Page<Customer>> {
        let rows: Vec<CustomerRow> = sqlx::query_as(concat!(
            "SELECT ",
            customer_cols!(),
            " FROM customers WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        let items = rows
            .into_iter()
            .map(CustomerRow::into_record)
            .collect::<Result<_>>()?;
        Ok(Page::from_lookahead(items, page))
    }

    async fn update_customer(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        patch: CustomerPatch,
    ) -> Result<Customer> {
        let mut tx = self.writer.begin().await?;
        let row: Option<CustomerRow> = sqlx::query_as(concat!(
            "UPDATE customers SET name = COALESCE(?, name), email = COALESCE(?, email), \
             metadata = COALESCE(?, metadata), version = version + 1, updated_at = ? \
             WHERE account_id = ? AND id = ? AND (? IS NULL OR version = ?) RETURNING ",
            customer_cols!()
        ))
        .bind(&patch.name)
        .bind(&patch.email)
        .bind(patch.metadata.as_ref().map(decode::metadata_json))
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(id)
        .bind(expected.version())
        .bind(expected.version())
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(row) = row else {
            return Err(explain_miss(&mut tx, false, meta.account_id, id, expected).await);
        };
        let c = row.into_record()?;
        append_event(&mut tx, meta, NewEvent::for_customer("updated", &c)).await?;
        tx.commit().await.map_err(err)?;
        Ok(c)
    }
}

impl SqliteStore {
    /// A keyed create in a transaction of its own (see `create_order_idempotent`).
    async fn create_order_idempotent_alone(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        new: NewOrder,
        respond: OrderResponder,
    ) -> Result<Idempotent> {
        let mut tx = self.writer.begin().await?;
        clear_expired_key(&mut tx, meta, &claim.key).await?;
        let claimed: Option<i64> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (account_id, idem_key, method, route, fingerprint, \
             response_status, response_headers, response_body, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, 0, '[]', x'', ?, ?) \
             ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING id",
        )
        .bind(meta.account_id)
        .bind(&claim.key)
        .bind(&claim.method)
        .bind(&claim.route)
        .bind(&claim.fingerprint)
        .bind(meta.at.0)
        .bind(claim.expires_at.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(key_id) = claimed else {
            let existing = find_key(&mut *tx, meta.account_id, &claim.key).await?;
            return existing
                .map(Idempotent::Existing)
                .ok_or_else(|| StorageError::Internal("claimed key vanished".into()));
        };
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "INSERT INTO orders (account_id, customer_id, amount_minor, currency, status, \
             description, metadata, version, created_at, updated_at) \
             SELECT ?, ?, ?, ?, 'pending', ?, ?, 1, ?, ? \
             WHERE EXISTS (SELECT 1 FROM customers WHERE account_id = ? AND id = ?) RETURNING ",
            order_cols!()
        ))
        .bind(meta.account_id)
        .bind(new.customer_id)
        .bind(new.amount.minor)
        .bind(new.amount.currency.code())
        .bind(&new.description)
        .bind(decode::metadata_json(&new.metadata))
        .bind(meta.at.0)
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(new.customer_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let outcome = row
            .ok_or(StorageError::UnknownCustomer)
            .and_then(OrderRow::into_record);
        if let Ok(order) = &outcome {
            append_event(&mut tx, meta, NewEvent::for_order("created", order)).await?;
        }
        let Some(response) = respond(outcome.as_ref()) else {
            // Not a stored outcome: the transaction rolls back with the key claim.
            return Err(outcome.err().unwrap_or_else(|| {
                StorageError::Internal("no response rendered for a created order".into())
            }));
        };
        sqlx::query(
            "UPDATE idempotency_keys SET response_status = ?, response_headers = ?, \
             response_body = ?, resource_id = ? WHERE id = ?",
        )
        .bind(i64::from(response.status))
        .bind(decode::headers_json(&response.headers))
        .bind(&response.body)
        .bind(outcome.as_ref().ok().map(|o| o.id))
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(Idempotent::Fresh(response))
    }
}

#[async_trait]
impl OrderStore for SqliteStore {
    async fn create_order(&self, meta: &WriteMeta, new: NewOrder) -> Result<Order> {
        let written = self
            .creates
            .submit(meta.clone(), Create::order(new, None))
            .await?;
        let row = written_row(written)?;
        OrderRow::from_row(&row).map_err(err)?.into_record()
    }

    async fn get_order(&self, account: AccountId, id: i64) -> Result<Option<Order>> {
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            order_cols!(),
            " FROM orders WHERE account_id = ? AND id = ?"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.readers)
        .await
        .map_err(err)?;
        row.map(OrderRow::into_record).transpose()
    }

    async fn list_orders(&self, account: AccountId, f: OrderFilter) -> Result<Page<Order>> {
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            order_cols!(),
            " FROM orders WHERE account_id = ? AND id < ? \
             AND (? IS NULL OR customer_id = ?) AND (? IS NULL OR status = ?) \
             AND (? IS NULL OR created_at >= ?) AND (? IS NULL OR created_at < ?) \
             ORDER BY id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(f.page.before_id())
        .bind(f.customer_id)
        .bind(f.customer_id)
        .bind(f.status.map(|s| s.as_str()))
        .bind(f.status.map(|s| s.as_str()))
        .bind(f.created_gte.map(|t| t.0))
        .bind(f.created_gte.map(|t| t.0))
        .bind(f.created_lt.map(|t| t.0))
        .bind(f.created_lt.map(|t| t.0))
        .bind(f.page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        let items = rows
            .into_iter()
            .map(OrderRow::into_record)
            .collect::<Result<_>>()?;
        Ok(Page::from_lookahead(items, f.page))
    }

    async fn update_order(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        patch: OrderPatch,
    ) -> Result<Order> {
        let mut tx = self.writer.begin().await?;
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "UPDATE orders SET description = COALESCE(?, description), \
             metadata = COALESCE(?, metadata), version = version + 1, updated_at = ? \
             WHERE account_id = ? AND id = ? AND (? IS NULL OR version = ?) RETURNING ",
            order_cols!()
        ))
        .bind(&patch.description)
        .bind(patch.metadata.as_ref().map(decode::metadata_json))
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(id)
        .bind(expected.version())
        .bind(expected.version())
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(row) = row else {
            let miss = explain_miss(&mut tx, true, meta.account_id, id, expected).await;
            // An update has no state precondition: a miss on an existing row is a stale version.
            return Err(match miss {
                StorageError::InvalidState { .. } => StorageError::Internal(
                    "conditional update matched no row although the version matched".into(),
                ),
                other => other,
            });
        };
        let o = row.into_record()?;
        append_event(&mut tx, meta, NewEvent::for_order("updated", &o)).await?;
        tx.commit().await.map_err(err)?;
        Ok(o)
    }

    async fn create_order_idempotent(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        new: NewOrder,
        respond: OrderResponder,
    ) -> Result<Idempotent> {
        let keyed = Keyed {
            claim: claim.clone(),
            respond: respond.clone(),
        };
        let create = Create::order(new.clone(), Some(keyed));
        match self.creates.submit(meta.clone(), create).await? {
            Written::Stored(response) => Ok(Idempotent::Fresh(response)),
            // Claimed by someone else (perhaps in the same batch): answer on its own, which
            // waits for that claim's commit and then finds its record.
            Written::Conflict => {
                self.create_order_idempotent_alone(meta, claim, new, respond)
                    .await
            }
            Written::Row(_) | Written::Missing => Err(StorageError::Internal(
                "unexpected outcome of a keyed create".into(),
            )),
        }
    }

    async fn transition_order(
        &self,
        meta: &WriteMeta,
        id: i64,
        expected: Precondition,
        action: OrderAction,
    ) -> Result<Order> {
        let mut tx = self.writer.begin().await?;
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "UPDATE orders SET status = ?, version = version + 1, updated_at = ? \
             WHERE account_id = ? AND id = ? AND (? IS NULL OR version = ?) \
             AND instr(?, ',' || status || ',') > 0 RETURNING ",
            order_cols!()
        ))
        .bind(action.target().as_str())
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(id)
        .bind(expected.version())
        .bind(expected.version())
        .bind(decode::status_set(&action.sources()))
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let Some(row) = row else {
            return Err(explain_miss(&mut tx, true, meta.account_id, id, expected).await);
        };
        let o = row.into_record()?;
        append_event(&mut tx, meta, NewEvent::for_order(o.status.as_str(), &o)).await?;
        tx.commit().await.map_err(err)?;
        Ok(o)
    }
}

/// The row of a create without a key (the only outcome such a create reports).
fn written_row(written: Written<SqliteRow>) -> Result<SqliteRow> {
    match written {
        Written::Row(row) => Ok(row),
        _ => Err(StorageError::Internal(
            "unexpected outcome of a create".into(),
        )),
    }
}

/// Deletes `key`'s record if it has expired (an expired record counts as absent), so the key
/// can be claimed anew in the same transaction.
async fn clear_expired_key(tx: &mut WriteTx, meta: &WriteMeta, key: &str) -> Result<()> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE account_id = ? AND idem_key = ? \
         AND expires_at <= ?",
    )
    .bind(meta.account_id)
    .bind(key)
    .bind(meta.at.0)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(())
}

/// Reads one idempotency record (expired or not) inside a transaction or on a pool.
async fn find_key<'e, E: sqlx::Executor<'e, Database = Sqlite>>(
    executor: E,
    account: AccountId,
    key: &str,
) -> Result<Option<IdempotencyRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        key_cols!(),
        " FROM idempotency_keys WHERE account_id = ? AND idem_key = ?"
    ))
    .bind(account)
    .bind(key)
    .fetch_optional(executor)
    .await
    .map_err(err)?;
    row.as_ref().map(key_record).transpose()
}

/// Decodes a row of [`key_cols!`].
fn key_record(r: &SqliteRow) -> Result<IdempotencyRecord> {
    let status: i64 = r.get("response_status");
    Ok(IdempotencyRecord {
        id: r.get("id"),
        method: r.get("method"),
        route: r.get("route"),
        fingerprint: r.get("fingerprint"),
        response: StoredResponse {
            status: u16::try_from(status)
                .map_err(|_| StorageError::Internal("stored status out of range".into()))?,
            headers: decode::headers(r.get("response_headers"))?,
            body: r.get("response_body"),
        },
        created_at: Timestamp(r.get("created_at")),
        expires_at: Timestamp(r.get("expires_at")),
        resource_id: r.get("resource_id"),
        in_flight: (r.get::<&str, _>("recovery_point") != operations::FINISHED)
            .then(|| Timestamp(r.get::<Option<i64>, _>("locked_until").unwrap_or(0))),
    })
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn find_idempotency(
        &self,
        account: AccountId,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<IdempotencyRecord>> {
        let found = find_key(&self.readers, account, key).await?;
        Ok(found.filter(|r| r.expires_at > now))
    }

    async fn sweep_idempotency(&self, now: Timestamp, limit: u32) -> Result<u64> {
        // A bounded batch per transaction, so writers wait for at most one small delete.
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE id IN \
             (SELECT id FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn events_for(
        &self,
        account: AccountId,
        aggregate_type: &str,
        aggregate_id: i64,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT id, account_id, event_type, aggregate_type, aggregate_id, aggregate_version, \
             payload, request_id, trace_id, created_at FROM outbox_events \
             WHERE account_id = ? AND aggregate_type = ? AND aggregate_id = ? ORDER BY id",
        )
        .bind(account)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.into_iter()
            .map(|r| {
                let payload: String = r.get("payload");
                Ok(Event {
                    id: r.get("id"),
                    account_id: r.get("account_id"),
                    event_type: r.get("event_type"),
                    aggregate_type: r.get("aggregate_type"),
                    aggregate_id: r.get("aggregate_id"),
                    aggregate_version: r.get("aggregate_version"),
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StorageError::Internal(Box::new(e)))?,
                    request_id: r.get("request_id"),
                    trace_id: r.get("trace_id"),
                    created_at: Timestamp(r.get("created_at")),
                })
            })
            .collect()
    }
}

#[async_trait]
impl Storage for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.readers)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn close(&self) {
        self.checkpointer.stop();
        self.readers.close().await;
        self.writer.close().await;
    }

    fn writes_taken_together(&self) -> u64 {
        self.creates.taken_together() + self.steps.taken_together()
    }
}
