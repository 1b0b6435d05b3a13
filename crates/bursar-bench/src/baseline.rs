//! The bare baseline: axum + sqlx doing one statement per request and nothing else (no auth,
//! transaction, outbox or logging). The ratio against it is Bursar's overhead.
//!
//! It runs on a tokio runtime of its own so that, like the separate `bursar` process, it does
//! not share worker threads with the load generator.
//!
//! For the `payments` scenario it is the *ceiling*: its `POST /payments` (and `…/capture`)
//! makes the very processor call Bursar makes — over HTTP to the sandbox processor served in
//! the same process, under the request's idempotency key — and stores nothing. A pay op can
//! go no faster than this on the machine, whatever Bursar's storage does.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reqwest::Client;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::load::Target;
use crate::{Backend, Scratch};

// Same columns as Bursar's `orders` (migrations/0001_init.sql), minus foreign keys and indexes.
// The baseline's schema is Bursar's own (same tables, indexes and foreign keys), seeded with
// one account and one customer, so its INSERT is the very statement Bursar runs for an order —
// minus everything Bursar adds around it (auth, validation, the outbox event, rendering, logs).
const SQLITE_SCHEMA: &str = include_str!("../../bursar-storage-sqlite/migrations/0001_init.sql");
const PG_SCHEMA: &str = include_str!("../../bursar-storage-postgres/migrations/0001_init.sql");
const SEED: &str = "INSERT INTO accounts (name, created_at) VALUES ('bench', 0); \
    INSERT INTO customers (account_id, name, email, metadata, version, created_at, updated_at) \
    VALUES (1, 'bench', NULL, '{}', 1, 0, 0)";
// Wall-clock milliseconds come from the database: the workspace bans `SystemTime::now`.
const SQLITE_INSERT: &str = "INSERT INTO orders (account_id, customer_id, amount_minor, \
    currency, status, description, metadata, version, created_at, updated_at) \
    SELECT 1, ?, ?, ?, 'pending', NULL, '{}', 1, CAST(unixepoch('subsec') * 1000 AS INTEGER), \
    CAST(unixepoch('subsec') * 1000 AS INTEGER) \
    WHERE EXISTS (SELECT 1 FROM customers WHERE account_id = 1 AND id = ?1) RETURNING id";
const PG_INSERT: &str = "INSERT INTO orders (account_id, customer_id, amount_minor, \
    currency, status, description, metadata, version, created_at, updated_at) \
    SELECT 1, $1, $2, $3, 'pending', NULL, '{}'::jsonb, 1, \
    (extract(epoch FROM now()) * 1000)::bigint, (extract(epoch FROM now()) * 1000)::bigint \
    WHERE EXISTS (SELECT 1 FROM customers WHERE account_id = 1 AND id = $1) RETURNING id";
// The whole row, as a real GET would read it.
const SQLITE_SELECT: &str = "SELECT id, account_id, customer_id, amount_minor, currency, status, \
    description, metadata, version, created_at, updated_at FROM orders WHERE id = ?";
const PG_SELECT: &str = "SELECT id, account_id, customer_id, amount_minor, currency, status, \
    description, metadata::text AS metadata, version, created_at, updated_at \
    FROM orders WHERE id = $1";

/// The axum state: the pools and the processor the ceiling's payments call.
#[derive(Clone)]
struct App {
    db: Db,
    processor: Processor,
}

/// The sandbox processor served on a port of the baseline's own, as `bursar serve` serves it in
/// test mode, and the HTTP client that calls it.
#[derive(Clone)]
struct Processor {
    http: Client,
    /// `http://127.0.0.1:PORT/v1/payments`.
    payments: String,
}

#[derive(Clone)]
enum Db {
    Sqlite {
        writer: SqlitePool,
        readers: SqlitePool,
    },
    Postgres(PgPool),
}

pub struct Baseline {
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    db: Db,
    scratch: Scratch,
}

impl Baseline {
    pub async fn start(backend: Backend, database_url: Option<&str>) -> Result<Baseline> {
        let rt = tokio::runtime::Runtime::new()?;
        let url = database_url.map(str::to_owned);
        // Pools and the listener belong to the runtime they are created on, so set up there.
        let setup = rt.spawn(async move {
            let (db, scratch) = match backend {
                Backend::Sqlite => open_sqlite().await?,
                Backend::Postgres => open_postgres(&url.context("no --database-url")?).await?,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let processor = start_processor().await?;
            let app = Router::new().route("/orders", post(create));
            let app = app.route("/orders/{id}", get(fetch));
            let app = app.route("/payments", post(pay));
            let app = app.route("/payments/{id}/capture", post(capture));
            let state = App {
                db: db.clone(),
                processor,
            };
            let app = app.with_state(state);
            // The floor of any handler, for the idempotent-replay comparison.
            let app = app.route("/hello", get(|| async { "hello" }));
            tokio::spawn(async move { axum::serve(listener, app).await });
            anyhow::Ok((addr, db, scratch))
        });
        match setup.await.context("baseline setup panicked") {
            Ok(Ok((addr, db, scratch))) => Ok(Baseline {
                addr,
                rt,
                db,
                scratch,
            }),
            // A runtime must not be dropped inside another one; shut it down explicitly.
            Ok(Err(e)) | Err(e) => {
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    /// The baseline as the load generator sees it, under `name`.
    pub fn target(&self, name: &'static str, client: &Client) -> Target {
        let body = r#"{"customer_id":1,"amount_minor":19900,"currency":"USD"}"#;
        let orders = format!("http://{}/orders", self.addr);
        Target::new(name, client, orders, None, body.into())
    }

    /// Closes the pools and the runtime, then removes the temp dir or the schema.
    pub async fn stop(self) -> Result<()> {
        let db = self.db;
        let closed = self.rt.spawn(async move {
            match db {
                Db::Sqlite { writer, readers } => {
                    readers.close().await;
                    writer.close().await;
                }
                Db::Postgres(pool) => pool.close().await,
            }
        });
        let closed = closed.await.context("closing the baseline pools");
        self.rt.shutdown_background();
        closed.and(self.scratch.remove().await)
    }
}

/// Bursar's SQLite setup (`SqliteStore::open`): WAL, synchronous=NORMAL, busy_timeout, one
/// writer connection, a read pool of 4.
async fn open_sqlite() -> Result<(Db, Scratch)> {
    let dir = tempfile::tempdir().context("creating the baseline temp dir")?;
    let connect = SqliteConnectOptions::new()
        .filename(dir.path().join("baseline.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    // Same pool settings as Bursar: no ping on every acquire.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false);
    let writer = pool.connect_with(connect.clone()).await?;
    sqlx::raw_sql(SQLITE_SCHEMA).execute(&writer).await?;
    sqlx::raw_sql(SEED).execute(&writer).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false);
    let readers = pool.connect_with(connect.read_only(true)).await?;
    Ok((Db::Sqlite { writer, readers }, Scratch::Dir(dir)))
}

/// Serves a fresh sandbox on a port of its own; the client is built as Bursar's processor
/// client is (reqwest's defaults: a keep-alive pool, HTTP/1.1 to a plain `http` URL).
async fn start_processor() -> Result<Processor> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let payments = format!("http://{}/v1/payments", listener.local_addr()?);
    let sandbox = bursar_sandbox::Sandbox::new(bursar_sandbox::Faults::default());
    tokio::spawn(bursar_sandbox::serve(listener, sandbox));
    let http = Client::builder().timeout(Duration::from_secs(15)).build()?;
    Ok(Processor { http, payments })
}

/// A pool of 16 (Bursar's default) on a fresh schema of its own.
async fn open_postgres(url: &str) -> Result<(Db, Scratch)> {
    let (scratch, schema) = Scratch::postgres(url, "SCHEMA").await?;
    let made = async {
        let connect: PgConnectOptions = url.parse()?;
        let connect = connect.options([("search_path", &schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false);
        let pool = pool.connect_with(connect).await?;
        sqlx::raw_sql(PG_SCHEMA).execute(&pool).await?;
        sqlx::raw_sql(SEED).execute(&pool).await?;
        anyhow::Ok(pool)
    };
    match made.await {
        Ok(pool) => Ok((Db::Postgres(pool), scratch)),
        Err(e) => {
            // Best effort: the first error is the one worth reporting.
            let _ = scratch.remove().await;
            Err(e.context("setting up the PostgreSQL baseline"))
        }
    }
}

#[derive(Deserialize)]
struct NewOrder {
    customer_id: i64,
    amount_minor: i64,
    currency: String,
}

#[derive(Serialize, sqlx::FromRow)]
struct OrderView {
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

type Reply = Result<Response, (StatusCode, String)>;

fn internal(e: sqlx::Error) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// One autocommitted INSERT (the table's CHECK rejects a non-positive amount).
async fn create(State(App { db, .. }): State<App>, Json(o): Json<NewOrder>) -> Reply {
    macro_rules! insert {
        ($sql:expr, $pool:expr) => {
            sqlx::query_scalar($sql)
                .bind(o.customer_id)
                .bind(o.amount_minor)
                .bind(&o.currency)
                .fetch_one($pool)
                .await
        };
    }
    let id: i64 = match &db {
        Db::Sqlite { writer, .. } => insert!(SQLITE_INSERT, writer),
        Db::Postgres(pool) => insert!(PG_INSERT, pool),
    }
    .map_err(internal)?;
    let body = serde_json::json!({ "id": id, "status": "pending" });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn fetch(State(App { db, .. }): State<App>, Path(id): Path<i64>) -> Reply {
    macro_rules! select {
        ($sql:expr, $pool:expr) => {
            sqlx::query_as($sql).bind(id).fetch_optional($pool).await
        };
    }
    let row: Option<OrderView> = match &db {
        Db::Sqlite { readers, .. } => select!(SQLITE_SELECT, readers),
        Db::Postgres(pool) => select!(PG_SELECT, pool),
    }
    .map_err(internal)?;
    match row {
        Some(order) => Ok(Json(order).into_response()),
        None => Err((StatusCode::NOT_FOUND, format!("no order {id}"))),
    }
}

#[derive(Deserialize)]
struct NewPayment {
    payment_method: String,
    #[serde(default = "yes")]
    capture: bool,
}

fn yes() -> bool {
    true
}

/// The ceiling's payment: the processor call Bursar makes for it (the order's amount as the
/// bench creates it), the answer passed on, nothing stored.
async fn pay(State(app): State<App>, headers: HeaderMap, Json(p): Json<NewPayment>) -> Reply {
    let body = serde_json::json!({
        "amount_minor": 19900,
        "currency": "USD",
        "payment_method": p.payment_method,
        "capture": p.capture,
    });
    let url = app.processor.payments.clone();
    call_processor(&app.processor, &headers, url, &body).await
}

/// The ceiling's capture of a payment made by [`pay`]: the processor's capture, in full.
async fn capture(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Reply {
    let url = format!("{}/{id}/capture", app.processor.payments);
    let body = serde_json::json!({ "amount_minor": null });
    call_processor(&app.processor, &headers, url, &body).await
}

/// POSTs `body` to `url` under the request's `Idempotency-Key` and answers with the processor's
/// payment id and its status named as Bursar names it (`captured` is `succeeded`, `authorized`
/// is `requires_capture`), which the load tool checks.
async fn call_processor(p: &Processor, headers: &HeaderMap, url: String, body: &Value) -> Reply {
    let mut req = p.http.post(url).json(body);
    if let Some(key) = headers.get("idempotency-key") {
        req = req.header("idempotency-key", key);
    }
    let failed = |e: reqwest::Error| (StatusCode::BAD_GATEWAY, e.to_string());
    let resp = req.send().await.map_err(failed)?;
    let status = resp.status();
    let answer: Value = resp.json().await.map_err(failed)?;
    if !status.is_success() {
        return Err((
            StatusCode::BAD_GATEWAY,
            format!("processor: {status} {answer}"),
        ));
    }
    let status = match answer["status"].as_str() {
        Some("captured") => "succeeded",
        Some("authorized") => "requires_capture",
        other => {
            return Err((
                StatusCode::BAD_GATEWAY,
                format!("processor status {other:?}"),
            ));
        }
    };
    let body = serde_json::json!({ "id": answer["id"], "status": status });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
