//! Starts the real server on port 0, on a fresh SQLite file or a fresh PostgreSQL schema, with
//! two accounts (A and B) and an SDK client for each.

use std::sync::Arc;

use std::sync::atomic::{AtomicI64, Ordering};

use bursar_domain::apikey::KeyMode;
use bursar_domain::{Clock, Timestamp};
use bursar_sdk::Client;
use bursar_server::processor::Processor;
use bursar_server::services::accounts;
use bursar_server::services::operations::Operations;
use bursar_server::{AppState, Config, SystemClock};
use bursar_storage::Storage;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub backend: Backend,
    pub url: String,
    pub a: Client,
    pub b: Client,
    pub key_a: String,
    pub key_b: String,
    pub account_a: i64,
    pub account_b: i64,
    pub store: Arc<dyn Storage>,
    /// The server's state (shared store, clock and registered operations).
    pub state: AppState,
    pub http: reqwest::Client,
    /// What [`TestApp::restart`] starts again with.
    config: Config,
    keys: Vec<String>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// The configuration of a test server; `None` when the backend is not available here.
pub fn test_config(backend: Backend) -> Option<(Config, Option<tempfile::TempDir>)> {
    let mut config = Config::default();
    // A fixed key: no key file is written beside the tests (PostgreSQL has no data_dir).
    config.webhooks.encryption_key = Some("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into());
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            config.data_dir = dir.path().to_owned();
            Some((config, Some(dir)))
        }
        Backend::Postgres => {
            let url = bursar_storage::conformance::postgres_test_url()?;
            config.database_url = url;
            config.database.max_connections = 8;
            config.database.schema = Some(format!("t_{}", uuid::Uuid::new_v4().simple()));
            Some((config, None))
        }
    }
}

impl TestApp {
    pub async fn start(backend: Backend) -> Option<TestApp> {
        let (config, dir) = test_config(backend)?;
        Some(
            TestApp::start_with(
                backend,
                config,
                dir,
                Arc::new(SystemClock),
                Operations::default(),
            )
            .await,
        )
    }

    /// A second server of the same backend with its own database, a changed configuration
    /// and/or a controllable clock.
    pub async fn sibling(
        &self,
        change: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> TestApp {
        self.sibling_with(change, clock, Operations::default())
            .await
    }

    /// [`TestApp::sibling`] that also runs `operations`.
    pub async fn sibling_with(
        &self,
        change: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
        operations: Operations,
    ) -> TestApp {
        let (mut config, dir) = test_config(self.backend).expect("the backend is available");
        change(&mut config);
        TestApp::start_with(self.backend, config, dir, clock, operations).await
    }

    pub async fn start_with(
        backend: Backend,
        config: Config,
        dir: Option<tempfile::TempDir>,
        clock: Arc<dyn Clock>,
        operations: Operations,
    ) -> TestApp {
        TestApp::start_full(backend, config, dir, clock, operations, None).await
    }

    /// [`TestApp::start_with`] with a payment processor.
    pub async fn start_full(
        backend: Backend,
        config: Config,
        dir: Option<tempfile::TempDir>,
        clock: Arc<dyn Clock>,
        operations: Operations,
        processor: Option<Arc<dyn Processor>>,
    ) -> TestApp {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = bursar_server::store::open(&config).await.unwrap();
        let mut keys = Vec::new();
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let acct = accounts::create_account(store.as_ref(), clock.as_ref(), name)
                .await
                .unwrap();
            ids.push(acct.id);
            keys.push(
                accounts::create_key(store.as_ref(), clock.as_ref(), name, KeyMode::Test)
                    .await
                    .unwrap(),
            );
        }
        let mut state = AppState::new(store.clone(), clock, config.clone()).unwrap();
        state.operations = Arc::new(operations);
        state.processor = processor;
        TestApp::run(backend, state, config, keys, (ids[0], ids[1]), dir).await
    }

    async fn run(
        backend: Backend,
        mut state: AppState,
        config: Config,
        keys: Vec<String>,
        (account_a, account_b): (i64, i64),
        dir: Option<tempfile::TempDir>,
    ) -> TestApp {
        state.connect_nats().await.unwrap();
        state.connect_redis().await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(bursar_server::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        let http = reqwest::Client::new();
        TestApp {
            backend,
            a: Client::with_http(http.clone(), &url, &keys[0]),
            b: Client::with_http(http.clone(), &url, &keys[1]),
            key_a: keys[0].clone(),
            key_b: keys[1].clone(),
            account_a,
            account_b,
            url,
            store: state.store.clone(),
            state,
            http,
            config,
            keys,
            shutdown: Some(tx),
            server: Some(server),
            _dir: dir,
        }
    }

    /// Stops the server and starts a new one over the same database (fresh pools, caches
    /// and in-memory state; same accounts, keys, clock, operations and processor), on a new
    /// port.
    pub async fn restart(mut self) -> TestApp {
        let dir = self._dir.take();
        let (backend, config, keys, accounts) = (
            self.backend,
            self.config.clone(),
            self.keys.clone(),
            (self.account_a, self.account_b),
        );
        let old = self.state.clone();
        self.stop().await;
        let store = bursar_server::store::open(&config).await.unwrap();
        let mut state = AppState::new(store, old.clock.clone(), config.clone()).unwrap();
        state.operations = old.operations.clone();
        state.processor = old.processor.clone();
        TestApp::run(backend, state, config, keys, accounts, dir).await
    }

    /// A second server over the same database (same accounts and keys), as another instance
    /// of one deployment; `change` adjusts its configuration. Stop it before `self`.
    pub async fn twin(&self, change: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = self.config.clone();
        change(&mut config);
        let store = bursar_server::store::open(&config).await.unwrap();
        let mut state = AppState::new(store, self.state.clock.clone(), config.clone()).unwrap();
        state.operations = self.state.operations.clone();
        state.processor = self.state.processor.clone();
        TestApp::run(
            self.backend,
            state,
            config,
            self.keys.clone(),
            (self.account_a, self.account_b),
            None,
        )
        .await
    }

    /// Signals shutdown and waits for the server to drain and close its pools.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.server.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The database URL the server runs on (its SQLite file, for a test that locks it).
    pub fn database_url(&self) -> String {
        self.config.effective_database_url()
    }

    /// A raw request without any credentials.
    pub fn anon(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url))
    }

    /// The server's `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = self.anon(reqwest::Method::GET, "/metrics").send().await;
        resp.unwrap().text().await.unwrap()
    }

    pub async fn customer(&self, client: &Client) -> i64 {
        client
            .create_customer(&Default::default())
            .await
            .unwrap()
            .body
            .id
    }

    /// Creates an order from a raw JSON body, returning the raw response.
    pub async fn post_order_raw(&self, client: &Client, body: String) -> reqwest::Response {
        client
            .request(reqwest::Method::POST, "/api/orders")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }
}

/// Decodes an error response, checking the envelope members every error must carry.
pub async fn error_body(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "error content type"
    );
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["error_code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(v["request_id"], request_id.as_str(), "{v}");
    assert_eq!(v["trace_id"].as_str().map(str::len), Some(32), "{v}");
    assert!(v["latency_ms"].is_u64(), "{v}");
    assert!(v["details"].is_array(), "{v}");
    v
}

/// A clock the test moves by hand (key retention, expiry).
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(SystemClock.now().0)))
    }

    pub fn advance_hours(&self, hours: i64) {
        self.advance_secs(hours * 3600);
    }

    pub fn advance_secs(&self, secs: i64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }

    pub fn set(&self, at: Timestamp) {
        self.0.store(at.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// The value of the series `series` (its name and labels, as `/metrics` prints them) in a
/// `/metrics` text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
