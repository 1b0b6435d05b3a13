//! PostgreSQL backend of the Bursar storage port.
//!
//! One pool; writes are READ COMMITTED transactions whose compare-and-set `UPDATE`s re-check
//! their `WHERE` clause against the newest row version after waiting on a row lock, so two
//! racing writers with the same expected version cannot both win. Queries mirror the SQLite
//! backend statement for statement (same file layout, so the two diff cleanly).

use std::time::Duration;

use async_trait::async_trait;
use bursar_domain::{AccountId, OrderAction, Timestamp};
use bursar_storage::group_commit::{Create, GroupCommit, Keyed, Written};
use bursar_storage::*;
use bursar_storage::{decode, operations};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, FromRow, Postgres, Row, Transaction};
use std::str::FromStr;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Tunables for [`PostgresStore::open`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before answering 503.
    pub acquire_timeout: Duration,
    /// Schema to create (if missing) and use via `search_path`. Lets several Bursar
    /// deployments — or parallel tests — share one database without seeing each other.
    pub schema: Option<String>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
        }
    }
}

/// How many batches each of a payment's group-commit writers (claims, records, captures)
/// writes at once. One: what waits meanwhile gathers into the next batch, and one-step and
/// two-step payments both measured a quarter to a half faster than with an eighth of the
/// pool each (docs/PERFORMANCE.md). Why batches side by side lose was not pinned down; a
/// payment's steps meet on the account's balance rows and on its orders.
const PAYMENT_BATCHES_AT_ONCE: usize = 1;

pub struct PostgresStore {
    pool: PgPool,
    /// The worker's completion batches (`COMPLETE_PLAIN`) run here, on sessions of their own
    /// ([`completion_sessions`]).
    completions: PgPool,
    /// Creates go through group commit (see `batch`).
    creates: GroupCommit<batch::PgCreates>,
    /// Payments' records, group-committed (`recording`).
    records: GroupCommit<recording::PgRecords>,
    /// Captures of authorized payments, group-committed (`recording`).
    captures: GroupCommit<recording::PgCaptures>,
    /// Claims of new phased work, group-committed (`claiming`).
    claims: GroupCommit<claiming::PgClaims>,
    /// Payment ids drawn ahead: a payment's record stores a response that names the payment
    /// and is rendered before its batch is written (`recording`), so the id is known first.
    payment_ids: batch::DrawnIds,
}

/// A statement planned with its arguments on every call instead of once per connection.
///
/// For statements whose inputs are arrays (a batch's ids, `unnest` of its rows) and that probe
/// tables which grow while the server runs. A prepared statement gets a generic plan after
/// its fifth call, costed against the table as it was then, and keeps it until the table is
/// next analyzed. Planned while `webhook_deliveries` held a few hundred rows, the completion
/// batch's generic plan scanned the whole table to find the batch's 15 rows; measured in the
/// fan-out bench, that grew to 13 ms at 92,000 rows (32 ms at 130,000 for the batch's health
/// read), where a custom plan probes the primary key in microseconds. Not for every statement:
/// planning each call of every statement (`plan_cache_mode = force_custom_plan`, measured)
/// made fan-out slower, because the claims' large plans cost more to make than they saved.
/// The completer's statement is planned once per session instead, on sessions whose settings
/// keep its generic plan on indexes ([`completion_sessions`]).
fn planned_each_call(
    sql: &'static str,
) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql).persistent(false)
}

fn err(e: sqlx::Error) -> StorageError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StorageError::Conflict,
        // Serialization failure, deadlock, too many connections, shutting down, cannot connect.
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| {
                matches!(&*c, "40001" | "40P01" | "53300" | "57P01" | "57P03")
            }) =>
        {
            StorageError::Unavailable(Box::new(e))
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StorageError::Unavailable(Box::new(e))
        }
        _ => StorageError::Internal(Box::new(e)),
    }
}

/// A schema name is spliced into DDL, so only plain identifiers are accepted.
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…`) and runs the migrations.
    pub async fn open(url: &str, opts: &PostgresOptions) -> Result<PostgresStore> {
        let mut connect = PgConnectOptions::from_str(url).map_err(err)?;
        if let Some(schema) = &opts.schema {
            if !valid_schema(schema) {
                return Err(StorageError::Internal(
                    format!("invalid schema name {schema:?}").into(),
                ));
            }
            let mut conn = sqlx::PgConnection::connect_with(&connect)
                .await
                .map_err(err)?;
            let ddl = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
                .execute(&mut conn)
                .await
                .map_err(err)?;
            conn.close().await.map_err(err)?;
            connect = connect.options([("search_path", schema.as_str())]);
        }
        // No ping before each acquire (a round trip per request). A connection that died
        // with a server restart fails its next statement instead, which surfaces as a
        // retryable 503 and is dropped from the pool.
        let completions = completion_sessions(&connect, opts);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .test_before_acquire(false)
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(err)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StorageError::Internal(Box::new(e)))?;
        // An eighth of the pool writes batches at once: fewer, fuller batches measured faster
        // than more, emptier ones (docs/PERFORMANCE.md); the rest stays free for reads.
        let creates = GroupCommit::spawn(
            batch::PgCreates {
                pool: pool.clone(),
                ids: batch::DrawnIds::orders(),
            },
            batch::MAX_BATCH,
            batch::STATEMENT_BYTES,
            (opts.max_connections / 8).max(1) as usize,
        );
        let records = GroupCommit::spawn(
            recording::PgRecords { pool: pool.clone() },
            recording::MAX_BATCH,
            recording::STATEMENT_BYTES,
            PAYMENT_BATCHES_AT_ONCE,
        );
        let captures = GroupCommit::spawn(
            recording::PgCaptures { pool: pool.clone() },
            recording::MAX_BATCH,
            recording::STATEMENT_BYTES,
            PAYMENT_BATCHES_AT_ONCE,
        );
        let claims = GroupCommit::spawn(
            claiming::PgClaims { pool: pool.clone() },
            claiming::MAX_BATCH,
            claiming::STATEMENT_BYTES,
            PAYMENT_BATCHES_AT_ONCE,
        );
        Ok(PostgresStore {
            pool,
            completions,
            creates,
            records,
            captures,
            claims,
            payment_ids: batch::DrawnIds::payments(),
        })
    }

    async fn write_tx(&self) -> Result<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(err)
    }
}

/// Two sessions (a process runs one completer, which writes one batch at a time) that plan
/// the worker's completion statement once each, with sequential scans off.
///
/// The completer is the serial stage of delivery on PostgreSQL: it records about 200 batches
/// a second at 500 events/s, and planning the statement took 0.85 ms of each. A cached
/// generic plan was unsafe on the shared pool ([`planned_each_call`]): made while the
/// deliveries table was small, it scanned the whole table later. Here the sessions force the
/// generic plan and disable sequential scans, so the plan reads every table through its
/// indexes whatever their size when it was made (each of its lookups has one; the setting
/// only prices a sequential scan out, it forbids nothing). Measured at 500 events/s:
/// deliveries arrived at the offered rate and the drain after the window rose from 4,078–
/// 4,998 to 6,409–8,626 a second (docs/PERFORMANCE.md).
fn completion_sessions(connect: &PgConnectOptions, opts: &PostgresOptions) -> PgPool {
    let settings = [
        ("enable_seqscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ];
    PgPoolOptions::new()
        .max_connections(2)
        .test_before_acquire(false)
        .acquire_timeout(opts.acquire_timeout)
        .connect_lazy_with(connect.clone().options(settings))
}

/// The event payload of a customer, built by SQL from the inserted row. The conformance suite
/// checks it equals the serde form of `bursar_storage::Customer` that updates emit.
macro_rules! customer_json {
    () => {
        "jsonb_build_object('id', id, 'account_id', account_id, 'name', name, 'email', email, \
         'metadata', metadata, 'version', version, 'created_at', created_at, \
         'updated_at', updated_at)"
    };
}
/// The event payload of an order (see `customer_json!`).
macro_rules! order_json {
    () => {
        "jsonb_build_object('id', id, 'account_id', account_id, 'customer_id', customer_id, \
         'amount', jsonb_build_object('minor', amount_minor, 'currency', currency), \
         'status', status, 'description', description, 'metadata', metadata, \
         'version', version, 'created_at', created_at, 'updated_at', updated_at)"
    };
}

macro_rules! customer_cols {
    () => {
        "id, account_id, name, email, metadata::text AS metadata, version, created_at, updated_at"
    };
}
/// The columns a claimed record's lease is read from (`ops::leased`).
macro_rules! leased_cols {
    () => {
        "id, fence, account_id, method, route, recovery_point, phase_state, request_body, \
         request_id, trace_id, attempts"
    };
}

macro_rules! order_cols {
    () => {
        "id, account_id, customer_id, amount_minor, currency, status, description, \
         metadata::text AS metadata, version, created_at, updated_at"
    };
}

/// The order `id` of `account`, on the pool or in a transaction.
async fn order_by_id<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    account: AccountId,
    id: i64,
) -> Result<Option<Order>> {
    let row: Option<OrderRow> = sqlx::query_as(concat!(
        "SELECT ",
        order_cols!(),
        " FROM orders WHERE account_id = $1 AND id = $2"
    ))
    .bind(account)
    .bind(id)
    .fetch_optional(ex)
    .await
    .map_err(err)?;
    row.map(OrderRow::into_record).transpose()
}

// Declared after the SQL macros above, which it uses.
mod batch;
mod claiming;
mod events;
mod money;
mod ops;
mod product;
mod recording;

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

async fn append_event(
    tx: &mut Transaction<'static, Postgres>,
    meta: &WriteMeta,
    ev: NewEvent,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
         aggregate_version, payload, request_id, trace_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9)",
    )
    .bind(meta.account_id)
    .bind(ev.event_type)
    .bind(ev.aggregate_type)
    .bind(ev.aggregate_id)
    .bind(ev.aggregate_version)
    .bind(ev.payload)
    .bind(&meta.request_id)
    .bind(&meta.trace_id)
    .bind(meta.at.0)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(())
}

/// After a conditional UPDATE matched nothing: tell "gone" from "stale" from "wrong state".
async fn explain_miss(
    tx: &mut Transaction<'static, Postgres>,
    table_is_orders: bool,
    account: AccountId,
    id: i64,
    expected: Precondition,
) -> StorageError {
    let row = if table_is_orders {
        sqlx::query("SELECT version, status FROM orders WHERE account_id = $1 AND id = $2")
    } else {
        sqlx::query(
            "SELECT version, NULL::TEXT AS status FROM customers WHERE account_id = $1 AND id = $2",
        )
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
impl AccountStore for PostgresStore {
    async fn create_account(&self, name: &str, at: Timestamp) -> Result<Account> {
        let mut tx = self.write_tx().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO accounts (name, created_at) VALUES ($1, $2) RETURNING id",
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
            "SELECT id, name, created_at FROM accounts WHERE id = $1::BIGINT OR name = $2 \
             ORDER BY (id = $3) DESC LIMIT 1",
        )
        .bind(id)
        .bind(name_or_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(err)?;
        Ok(row.map(|r: PgRow| Account {
            id: r.get("id"),
            name: r.get("name"),
            created_at: Timestamp(r.get("created_at")),
        }))
    }

    async fn count_accounts(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(&self.pool)
            .await
            .map_err(err)
    }

    async fn create_api_key(&self, key: NewApiKey, at: Timestamp) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        let id = sqlx::query_scalar(
            "INSERT INTO api_keys (account_id, mode, key_hash, start, last4, created_at, name, \
             scopes, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
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
             FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
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
impl CustomerStore for PostgresStore {
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
            " FROM customers WHERE account_id = $1 AND id = $2"
        ))
        .bind(account)
        .bind(id)
        .fetch_optional(&self.pool)
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
            " FROM customers WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
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
        let mut tx = self.write_tx().await?;
        let row: Option<CustomerRow> = sqlx::query_as(concat!(
            "UPDATE customers SET name = COALESCE($1, name), email = COALESCE($2, email), \
             metadata = COALESCE($3::jsonb, metadata), version = version + 1, updated_at = $4 \
             WHERE account_id = $5 AND id = $6 AND ($7::BIGINT IS NULL OR version = $8) RETURNING ",
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

impl PostgresStore {
    /// A keyed create in a transaction of its own (see `create_order_idempotent`).
    async fn create_order_idempotent_alone(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        new: NewOrder,
        respond: OrderResponder,
    ) -> Result<Idempotent> {
        let mut tx = self.write_tx().await?;
        // Only keys that came back from the batch as taken come here, so the expired record
        // is cleared first (inserting first would only add a statement here).
        clear_expired_key(&mut tx, meta, &claim.key).await?;
        // A concurrent claimer of the same key waits here until the first commits (then takes
        // the conflict path and sees the finished record) or rolls back (then claims it).
        let claimed: Option<i64> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (account_id, idem_key, method, route, fingerprint, \
             response_status, response_headers, response_body, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, 0, '[]', ''::bytea, $6, $7) \
             ON CONFLICT ON CONSTRAINT idempotency_keys_account_key DO NOTHING RETURNING id",
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
             SELECT $1, $2, $3, $4, 'pending', $5, $6::jsonb, 1, $7, $7 \
             WHERE EXISTS (SELECT 1 FROM customers WHERE account_id = $1 AND id = $2) \
             RETURNING ",
            order_cols!()
        ))
        .bind(meta.account_id)
        .bind(new.customer_id)
        .bind(new.amount.minor)
        .bind(new.amount.currency.code())
        .bind(&new.description)
        .bind(decode::metadata_json(&new.metadata))
        .bind(meta.at.0)
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
            "UPDATE idempotency_keys SET response_status = $1, response_headers = $2, \
             response_body = $3, resource_id = $4 WHERE id = $5",
        )
        .bind(i32::from(response.status))
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
impl OrderStore for PostgresStore {
    async fn create_order(&self, meta: &WriteMeta, new: NewOrder) -> Result<Order> {
        let written = self
            .creates
            .submit(meta.clone(), Create::order(new, None))
            .await?;
        let row = written_row(written)?;
        OrderRow::from_row(&row).map_err(err)?.into_record()
    }

    async fn get_order(&self, account: AccountId, id: i64) -> Result<Option<Order>> {
        order_by_id(&self.pool, account, id).await
    }

    async fn list_orders(&self, account: AccountId, f: OrderFilter) -> Result<Page<Order>> {
        let rows: Vec<OrderRow> = sqlx::query_as(concat!(
            "SELECT ",
            order_cols!(),
            " FROM orders WHERE account_id = $1 AND id < $2 \
             AND ($3::BIGINT IS NULL OR customer_id = $4) AND ($5::TEXT IS NULL OR status = $6) \
             AND ($7::BIGINT IS NULL OR created_at >= $8) AND ($9::BIGINT IS NULL OR created_at < $10) \
             ORDER BY id DESC LIMIT $11"
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
        .fetch_all(&self.pool)
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
        let mut tx = self.write_tx().await?;
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "UPDATE orders SET description = COALESCE($1, description), \
             metadata = COALESCE($2::jsonb, metadata), version = version + 1, updated_at = $3 \
             WHERE account_id = $4 AND id = $5 AND ($6::BIGINT IS NULL OR version = $7) RETURNING ",
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
        let mut tx = self.write_tx().await?;
        let row: Option<OrderRow> = sqlx::query_as(concat!(
            "UPDATE orders SET status = $1, version = version + 1, updated_at = $2 \
             WHERE account_id = $3 AND id = $4 AND ($5::BIGINT IS NULL OR version = $6) \
             AND strpos($7, ',' || status || ',') > 0 RETURNING ",
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
fn written_row(written: Written<PgRow>) -> Result<PgRow> {
    match written {
        Written::Row(row) => Ok(row),
        _ => Err(StorageError::Internal(
            "unexpected outcome of a create".into(),
        )),
    }
}

/// Deletes `key`'s record if it has expired (an expired record counts as absent), so the key
/// can be claimed anew in the same transaction; whether it did. Phased work calls it only
/// after its claim found the key taken: most of those claims are of new keys, and clearing
/// first cost each a statement that deleted nothing.
async fn clear_expired_key(
    tx: &mut Transaction<'static, Postgres>,
    meta: &WriteMeta,
    key: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE account_id = $1 AND idem_key = $2 \
         AND expires_at <= $3",
    )
    .bind(meta.account_id)
    .bind(key)
    .bind(meta.at.0)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(done.rows_affected() > 0)
}

/// Reads one idempotency record (expired or not) inside a transaction or on the pool.
async fn find_key<'e, E: sqlx::Executor<'e, Database = Postgres>>(
    executor: E,
    account: AccountId,
    key: &str,
) -> Result<Option<IdempotencyRecord>> {
    let row = sqlx::query(
        "SELECT id, method, route, fingerprint, response_status, \
         response_headers, response_body, created_at, expires_at, \
         recovery_point, locked_until, resource_id FROM idempotency_keys \
         WHERE account_id = $1 AND idem_key = $2",
    )
    .bind(account)
    .bind(key)
    .fetch_optional(executor)
    .await
    .map_err(err)?;
    row.map(|r| {
        let status: i32 = r.get("response_status");
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
    })
    .transpose()
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn find_idempotency(
        &self,
        account: AccountId,
        key: &str,
        now: Timestamp,
    ) -> Result<Option<IdempotencyRecord>> {
        let found = find_key(&self.pool, account, key).await?;
        Ok(found.filter(|r| r.expires_at > now))
    }

    async fn sweep_idempotency(&self, now: Timestamp, limit: u32) -> Result<u64> {
        // A bounded batch per statement, so no long lock on the table.
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE id IN \
             (SELECT id FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(err)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn events_for(
        &self,
        account: AccountId,
        aggregate_type: &str,
        aggregate_id: i64,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT id, account_id, event_type, aggregate_type, aggregate_id, aggregate_version, \
             payload::text AS payload, request_id, trace_id, created_at FROM outbox_events \
             WHERE account_id = $1 AND aggregate_type = $2 AND aggregate_id = $3 ORDER BY id",
        )
        .bind(account)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_all(&self.pool)
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
impl Storage for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    fn writes_taken_together(&self) -> u64 {
        self.creates.taken_together()
            + self.records.taken_together()
            + self.captures.taken_together()
            + self.claims.taken_together()
    }
}
