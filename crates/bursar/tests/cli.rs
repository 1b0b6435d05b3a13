//! The `bursar` binary as an operator meets it: first start, admin commands, configuration,
//! and shutdown on SIGTERM with a request in flight. Each case runs on SQLite (a temp data dir)
//! and on PostgreSQL (a fresh schema via `BURSAR_DATABASE__SCHEMA`) when configured.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Where a test's database lives, as `bursar` flags and environment.
struct Db {
    args: Vec<String>,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    Db {
        args: vec!["--data-dir".into(), dir.path().display().to_string()],
        env: vec![],
        _dir: dir,
    }
}

fn postgres() -> Option<Db> {
    let url = bursar_storage::conformance::postgres_test_url()?;
    let dir = tempfile::tempdir().unwrap();
    // The data dir still holds files on PostgreSQL (the webhook key): keep them out of the tree.
    let data_dir = dir.path().display().to_string();
    Some(Db {
        args: vec!["--database-url".into(), url, "--data-dir".into(), data_dir],
        env: vec![(
            "BURSAR_DATABASE__SCHEMA".into(),
            format!("t_{}", uuid::Uuid::new_v4().simple()),
        )],
        _dir: dir,
    })
}

fn bursar(db: &Db, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bursar"));
    cmd.args(args).args(&db.args).envs(db.env.iter().cloned());
    cmd.env_remove("BURSAR_DATABASE_URL")
        .env_remove("BURSAR_DATA_DIR");
    cmd.kill_on_drop(true);
    cmd
}

async fn run(db: &Db, args: &[&str]) -> (bool, String, String) {
    let out = bursar(db, args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A running `bursar serve`, with what it printed on stdout before serving.
struct Server {
    child: Child,
    base: String,
    banner: Vec<String>,
}

async fn serve(db: &Db, extra_env: &[(&str, &str)]) -> Server {
    let mut cmd = bursar(db, &["serve", "--listen", "127.0.0.1:0"]);
    cmd.envs(extra_env.iter().map(|(k, v)| (*k, *v)));
    // Each start truncates the log file, so it holds this run's lines only.
    let log = std::fs::File::create(db._dir.path().join("stderr.log")).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    let read_banner = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Press Ctrl-C");
            banner.push(line);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_banner)
        .await
        .expect("server start");
    let api = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("API:"))
        .expect("API url printed")
        .trim()
        .to_owned();
    Server {
        child,
        base: api.trim_end_matches("/api").to_owned(),
        banner,
    }
}

impl Server {
    fn key(&self) -> Option<String> {
        self.banner
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with("bsr_test_"))
            .map(str::to_owned)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
    }
}

/// Creates a customer through the API and returns its JSON.
async fn create_customer(http: &reqwest::Client, base: &str, key: &str) -> serde_json::Value {
    let resp = http
        .post(format!("{base}/api/customers"))
        .bearer_auth(key)
        .json(&serde_json::json!({"name": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// `bursar sandbox-processor` on a port of its own, and its URL.
async fn sandbox_processor() -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bursar"))
        .args(["sandbox-processor", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("sandbox start")
        .unwrap()
        .unwrap();
    let url = first
        .strip_prefix("Sandbox processor listening on ")
        .expect("the URL is printed")
        .to_owned();
    // Keep reading: a closed pipe would make the sandbox's next line fail.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

/// The entries of `kind` in a sandbox ledger.
fn ledger_kinds(ledger: &serde_json::Value, kind: &str) -> usize {
    ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .count()
}

/// What a sandbox processor at `url` has recorded.
async fn sandbox_ledger(http: &reqwest::Client, url: &str) -> serde_json::Value {
    let resp = http.get(format!("{url}/v1/ledger")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn first_start(db: Db) {
    let server = serve(&db, &[]).await;
    let text = server.banner.join("\n");
    assert!(text.contains("/docs"), "{text}");
    // No processor configured: the sandbox runs in-process, over real HTTP.
    let sandbox = server
        .banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("Processor: sandbox (test mode) at "))
        .unwrap_or_else(|| panic!("the sandbox processor is announced: {text}"))
        .to_owned();
    let key = server
        .key()
        .unwrap_or_else(|| panic!("first start prints a key: {text}"));
    let http = client();
    let ledger = sandbox_ledger(&http, &sandbox).await;
    assert_eq!(ledger["entries"], serde_json::json!([]));
    let customer = create_customer(&http, &server.base, &key).await;
    let body = format!(
        r#"{{"customer_id": {}, "amount": 199.00, "currency": "USD"}}"#,
        customer["id"]
    );
    let resp = http
        .post(format!("{}/api/orders", server.base))
        .header("Idempotency-Key", "order-20260325-00091")
        .header("Content-Type", "application/json")
        .bearer_auth(&key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#""amount":199.00"#) && text.contains(r#""currency":"USD""#),
        "{text}"
    );
    assert!(server.terminate().await.success());

    // The log is one JSON object per line, with what a request is debugged by.
    let log = std::fs::read_to_string(db._dir.path().join("stderr.log")).unwrap();
    let line: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON log line"))
        .find(|v| v["route"] == "/api/orders")
        .expect("an access log line for the order");
    assert_eq!(line["status"], 201);
    assert_eq!(line["method"], "POST");
    assert!(line["request_id"].as_str().unwrap().starts_with("req_"));
    assert_eq!(line["trace_id"].as_str().map(str::len), Some(32));
    assert!(
        line["account_id"].is_i64() && line["latency_ms"].is_u64(),
        "{line}"
    );
    assert!(!log.contains(&key), "the API key never reaches the log");
    // Nor the database: only its SHA-256 is stored (SQLite: scan the files byte for byte,
    // including the WAL).
    let mut scanned = 0;
    for entry in std::fs::read_dir(db._dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("bursar.db") {
            scanned += 1;
            let bytes = std::fs::read(&path).unwrap();
            let found = bytes.windows(key.len()).any(|w| w == key.as_bytes());
            assert!(!found, "the key is stored in clear in {}", path.display());
        }
    }
    assert!(
        db.args[0] != "--data-dir" || scanned >= 1,
        "the database file was scanned (a clean shutdown folds the WAL into it)"
    );

    // The second start finds the account: no new key, and the first one still works.
    let again = serve(&db, &[]).await;
    assert_eq!(again.key(), None, "{:?}", again.banner);
    let resp = http
        .get(format!("{}/api/orders", again.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(again.terminate().await.success());
}

async fn admin_commands(db: Db) {
    let (ok, out, err) = run(&db, &["migrate"]).await;
    assert!(ok, "{err}");
    assert!(out.is_empty());
    let (ok, id, err) = run(&db, &["admin", "accounts", "create", "acme"]).await;
    assert!(ok, "{err}");
    let id: i64 = id
        .trim_end_matches('\n')
        .parse()
        .expect("only the id on stdout");
    for account in ["acme".to_owned(), id.to_string()] {
        let (ok, key, err) = run(&db, &["admin", "keys", "create", "--account", &account]).await;
        assert!(ok, "{err}");
        let key = key.strip_suffix('\n').unwrap();
        assert!(
            key.starts_with("bsr_test_") && key.len() == 45 && !key.contains('\n'),
            "{key}"
        );
    }
    let (ok, key, _) = run(
        &db,
        &[
            "admin",
            "keys",
            "create",
            "--account",
            "acme",
            "--mode",
            "live",
        ],
    )
    .await;
    assert!(ok && key.starts_with("bsr_live_"));
    let (ok, out, err) = run(&db, &["admin", "accounts", "create", "acme"]).await;
    assert!(
        !ok && out.is_empty() && err.contains("already exists"),
        "{err}"
    );
    let (ok, out, err) = run(&db, &["admin", "keys", "create", "--account", "nobody"]).await;
    assert!(!ok && out.is_empty() && err.contains("no account"), "{err}");
    // Plans come from the configuration (here the environment); accounts name one.
    let out = bursar(&db, &["admin", "accounts", "set-plan", "acme", "pro"])
        .env("BURSAR_PLANS__PRO__MONTHLY_QUOTA", "1000")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pro\n");
    let (ok, out, err) = run(&db, &["admin", "accounts", "set-plan", "acme", "pro"]).await;
    assert!(
        !ok && out.is_empty() && err.contains("no plan named"),
        "{err}"
    );
    let (ok, _, err) = run(&db, &["admin", "accounts", "set-plan", "nobody", "default"]).await;
    assert!(!ok && err.contains("no account"), "{err}");
    let (ok, out, err) = run(&db, &["admin", "accounts", "set-plan", "acme", "default"]).await;
    assert!(ok && out == "default\n", "{err}");
    // A server started on a database that already has accounts creates none.
    let server = serve(&db, &[]).await;
    assert_eq!(server.key(), None);
    assert!(server.terminate().await.success());
}

async fn sigterm_lets_in_flight_requests_finish(db: Db) {
    let server = serve(&db, &[]).await;
    let key = server
        .key()
        .unwrap_or_else(|| panic!("no key in {:?}", server.banner));
    // A request whose body is still arriving when the signal comes. `Expect: 100-continue`
    // makes the server say when the handler has started reading the body, so the signal
    // provably lands while the request is in flight.
    let body = br#"{"name":"in flight"}"#;
    let conn = TcpStream::connect(server.addr()).await.unwrap();
    let mut conn = BufReader::new(conn);
    let head = format!(
        "POST /api/customers HTTP/1.1\r\nHost: bursar\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let mut status_line = String::new();
    conn.read_line(&mut status_line).await.unwrap();
    assert!(status_line.starts_with("HTTP/1.1 100"), "{status_line}");
    let addr = server.addr();
    let pid = server.child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    // Wait until the listener is closed: shutdown has begun.
    tokio::time::timeout(Duration::from_secs(10), async {
        while TcpStream::connect(&addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("stops accepting after SIGTERM");
    conn.get_mut().write_all(body).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("HTTP/1.1 201"), "{answer}");
    let mut child = server.child;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

async fn shutdown_is_bounded(db: Db) {
    let server = serve(&db, &[("BURSAR_HTTP__SHUTDOWN_GRACE_MS", "300")]).await;
    let key = server
        .key()
        .unwrap_or_else(|| panic!("no key in {:?}", server.banner));
    // This client never finishes its body; the grace period must end the wait.
    let mut conn = TcpStream::connect(server.addr()).await.unwrap();
    let head = format!(
        "POST /api/customers HTTP/1.1\r\nHost: bursar\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    assert!(server.terminate().await.success());
    drop(conn);
}

async fn configuration(db: Db) {
    let out = Command::new(env!("CARGO_BIN_EXE_bursar"))
        .args(["config", "print-default"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let out = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Table = toml::from_str(&out).expect("valid TOML");
    for key in [
        "listen",
        "data_dir",
        "database_url",
        "http",
        "database",
        "idempotency",
        "processor",
        "log",
    ] {
        assert!(parsed.contains_key(key), "{key}");
    }
    for (var, value) in [
        ("BURSAR_HTTP__BODY_LIMIT_BYTES", "lots"),
        ("BURSAR_LISTEN", "not-an-address"),
        ("BURSAR_PROCESSOR__URL", "ftp://processor.example"),
        ("BURSAR_IDEMPOTENCY__LEASE_SECS", "0"),
    ] {
        let out = bursar(&db, &["migrate"])
            .env(var, value)
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("invalid configuration"),
            "{var}: {err}"
        );
    }
    let cfg = db._dir.path().join("bursar.toml");
    std::fs::write(&cfg, "[http]\nbody_limt_bytes = 5\n").unwrap();
    let out = bursar(&db, &["migrate", "--config", cfg.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "a typo in the file is refused");
    // Test-suite variables that merely share the prefix are not configuration.
    let out = bursar(&db, &["migrate"])
        .env("BURSAR_TEST_SOMETHING", "x")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a server with a staged crash, sends one keyed create (which kills it), restarts it
/// on the same database and retries: returns the retry's response and the order count.
async fn crash_then_retry(db: &Db, fault: &str) -> (reqwest::Response, usize) {
    let first = serve(db, &[]).await;
    let key = first.key().expect("first start prints a key");
    let http = client();
    let customer = create_customer(&http, &first.base, &key).await;
    assert!(first.terminate().await.success());
    let body = format!(
        r#"{{"customer_id": {}, "amount": 199.00, "currency": "USD"}}"#,
        customer["id"]
    );
    let send = |base: String| {
        http.post(format!("{base}/api/orders"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "order-20260325-00091")
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    };
    let mut doomed = serve(db, &[("BURSAR_TEST_FAULT", fault)]).await;
    let lost = send(doomed.base.clone()).await;
    assert!(lost.is_err(), "the client never got an answer: {lost:?}");
    let status = tokio::time::timeout(Duration::from_secs(30), doomed.child.wait())
        .await
        .expect("the staged crash ends the process")
        .unwrap();
    assert!(!status.success(), "killed, not exited");
    let again = serve(db, &[]).await;
    let retry = send(again.base.clone()).await.unwrap();
    let orders: serde_json::Value = http
        .get(format!("{}/api/orders", again.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(again.terminate().await.success());
    (retry, orders["data"].as_array().unwrap().len())
}

async fn crash_after_commit_is_answered_by_the_retry(db: Db) {
    let (retry, orders) = crash_then_retry(&db, "after_commit").await;
    assert_eq!(retry.status(), 201);
    assert_eq!(
        retry.headers()["idempotent-replayed"],
        "true",
        "the stored 201"
    );
    assert_eq!(orders, 1, "committed once, never repeated");
}

async fn crash_mid_transaction_leaves_nothing(db: Db) {
    let (retry, orders) = crash_then_retry(&db, "mid_transaction").await;
    assert_eq!(retry.status(), 201);
    assert!(
        retry.headers().get("idempotent-replayed").is_none(),
        "ran anew"
    );
    assert_eq!(orders, 1, "the crashed attempt left nothing behind");
}

/// Two processes on one database, the same key sent to both at once, fifty times over.
#[tokio::test]
async fn two_processes_one_key_one_order() {
    let Some(db) = postgres() else { return };
    let a = serve(&db, &[]).await;
    let b = serve(&db, &[]).await;
    let key = a.key().expect("the first process creates the account");
    assert_eq!(b.key(), None);
    let http = client();
    let customer = create_customer(&http, &a.base, &key).await;
    let body = format!(
        r#"{{"customer_id": {}, "amount": 5, "currency": "EUR"}}"#,
        customer["id"]
    );
    let send = |base: &str, k: String| {
        http.post(format!("{base}/api/orders"))
            .bearer_auth(&key)
            .header("Idempotency-Key", k)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    };
    for i in 0..50 {
        let k = format!("twin-{i}");
        let (ra, rb) = tokio::join!(send(&a.base, k.clone()), send(&b.base, k));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            (ra.status().as_u16(), rb.status().as_u16()),
            (201, 201),
            "key {i}"
        );
        let replays = [&ra, &rb]
            .iter()
            .filter(|r| r.headers().contains_key("idempotent-replayed"))
            .count();
        assert_eq!(replays, 1, "key {i}: one ran, one replayed");
        assert_eq!(ra.bytes().await.unwrap(), rb.bytes().await.unwrap());
    }
    let orders: serde_json::Value = http
        .get(format!("{}/api/orders?limit=100", b.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        orders["data"].as_array().unwrap().len(),
        50,
        "one order per key"
    );
    assert!(a.terminate().await.success());
    assert!(b.terminate().await.success());
}

/// One webhook request as [`hook_receiver`] got it.
#[derive(Clone, Debug)]
struct Hook {
    /// Names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
}

impl Hook {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

/// A webhook receiver in the test process.
struct HookReceiver {
    url: String,
    got: Arc<Mutex<Vec<Hook>>>,
}

impl HookReceiver {
    fn received(&self) -> Vec<Hook> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived, for at most `limit`.
    async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Hook> {
        let waited = async {
            loop {
                let got = self.received();
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(limit, waited)
            .await
            .unwrap_or_else(|_| panic!("{n} webhook requests within {limit:?}"))
    }
}

/// Records every request and answers 200; with `hold_first`, the first request is never
/// answered (its connection stays open until the sender goes away).
async fn hook_receiver(hold_first: bool) -> HookReceiver {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Hook>>> = Arc::default();
    let all = got.clone();
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let all = all.clone();
            async move {
                let hook = Hook {
                    headers: headers
                        .iter()
                        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                        .collect(),
                    body: body.to_vec(),
                    at: Instant::now(),
                };
                let first = {
                    let mut all = all.lock().unwrap();
                    all.push(hook);
                    all.len() == 1
                };
                if first && hold_first {
                    std::future::pending::<()>().await;
                }
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    HookReceiver { url, got }
}

/// Lets the delivery worker reach receivers on this machine over plain HTTP.
const WEBHOOKS_TO_LOCALHOST: (&str, &str) = ("BURSAR_WEBHOOKS__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#);

/// An API request with the key, answered with JSON: (status, body).
async fn api(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http.request(method, url).bearer_auth(key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// An endpoint for `order.*` events at `receiver`, and an order (the one event it gets):
/// (endpoint id, order id).
async fn endpoint_and_order(
    http: &reqwest::Client,
    server: &Server,
    key: &str,
    receiver: &HookReceiver,
) -> (i64, i64) {
    let base = &server.base;
    let (status, endpoint) = api(
        http,
        reqwest::Method::POST,
        format!("{base}/api/webhook_endpoints"),
        key,
        Some(serde_json::json!({"url": receiver.url, "event_types": ["order.*"]})),
    )
    .await;
    assert_eq!(status, 201, "{endpoint}");
    let customer = create_customer(http, base, key).await;
    let (status, order) = api(
        http,
        reqwest::Method::POST,
        format!("{base}/api/orders"),
        key,
        Some(
            serde_json::json!({"customer_id": customer["id"], "amount": "12.50",
                                "currency": "EUR"}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{order}");
    (
        endpoint["id"].as_i64().unwrap(),
        order["id"].as_i64().unwrap(),
    )
}

/// The account's `order.created` events through the events API.
async fn order_events(http: &reqwest::Client, base: &str, key: &str) -> Vec<serde_json::Value> {
    let url = format!("{base}/api/events?types=order.created");
    let (status, events) = api(http, reqwest::Method::GET, url, key, None).await;
    assert_eq!(status, 200, "{events}");
    events["data"].as_array().unwrap().clone()
}

/// The endpoint's one delivery, once it is `succeeded`.
async fn succeeded_delivery(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    endpoint: i64,
) -> serde_json::Value {
    let url = format!("{base}/api/webhook_endpoints/{endpoint}/deliveries");
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, page) = api(http, reqwest::Method::GET, url.clone(), key, None).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "{page}");
        if data[0]["state"] == "succeeded" {
            return data[0].clone();
        }
        last = page;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the delivery did not succeed: {last}");
}

/// SIGKILL: no shutdown, no flushing.
async fn kill_9(server: Server) {
    let mut child = server.child;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited");
}

/// Spec checklist B12: `kill -9` after the business commit and before the relay ran (the
/// workers are off, so the order's event is committed but neither sequenced nor sent). After
/// a restart with the workers on, the receiver gets it within the poll interval + 5 s, with
/// `webhook-id` = the event id of `GET /api/events` and the event's stored body, exactly once.
async fn an_event_committed_before_a_crash_is_delivered_after_restart(db: Db) {
    let receiver = hook_receiver(false).await;
    let http = client();
    let off = [
        WEBHOOKS_TO_LOCALHOST,
        ("BURSAR_WEBHOOKS__RUN_WORKERS", "false"),
    ];
    let first = serve(&db, &off).await;
    let key = first.key().expect("first start prints a key");
    let (endpoint, order) = endpoint_and_order(&http, &first, &key, &receiver).await;
    // Committed, not relayed: the event has no id yet, so the events API lists nothing.
    assert_eq!(
        order_events(&http, &first.base, &key).await,
        Vec::<serde_json::Value>::new()
    );
    kill_9(first).await;
    assert!(receiver.received().is_empty());

    let poll = Duration::from_millis(200);
    let on = [
        WEBHOOKS_TO_LOCALHOST,
        ("BURSAR_WEBHOOKS__POLL_INTERVAL_MS", "200"),
    ];
    let again = serve(&db, &on).await;
    let hooks = receiver.wait_for(1, poll + Duration::from_secs(5)).await;
    let events = order_events(&http, &again.base, &key).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["data"]["aggregate_id"], order, "{event}");
    let event_id = event["id"].as_str().unwrap();
    assert!(event_id.starts_with("evt_"), "{event}");
    assert_eq!(hooks[0].header("webhook-id"), event_id);
    let stored = http
        .get(format!("{}/api/events/{event_id}", again.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(hooks[0].body, stored, "the stored bytes are sent");
    let delivery = succeeded_delivery(&http, &again.base, &key, endpoint).await;
    assert_eq!(delivery["event_id"], event_id);
    assert_eq!(delivery["attempt_count"], 1, "{delivery}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "sent once");
    assert!(again.terminate().await.success());
}

/// `bursar worker` alone does the background work: `serve` runs without workers, a separate
/// worker process sequences the event and delivers it, and SIGTERM stops it cleanly.
async fn a_separate_worker_process_delivers(db: Db) {
    let receiver = hook_receiver(false).await;
    let http = client();
    let off = [
        WEBHOOKS_TO_LOCALHOST,
        ("BURSAR_WEBHOOKS__RUN_WORKERS", "false"),
    ];
    let api_only = serve(&db, &off).await;
    let key = api_only.key().expect("first start prints a key");
    let (endpoint, order) = endpoint_and_order(&http, &api_only, &key, &receiver).await;
    let mut worker = bursar(&db, &["worker"])
        .envs([WEBHOOKS_TO_LOCALHOST])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(60), async {
        let mut banner = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Press Ctrl-C");
            banner.push(line);
            if done {
                break;
            }
        }
        banner
    })
    .await
    .expect("worker start");
    assert!(banner[0].contains("worker is running"), "{banner:?}");
    let hooks = receiver.wait_for(1, Duration::from_secs(10)).await;
    let events = order_events(&http, &api_only.base, &key).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["aggregate_id"], order);
    assert_eq!(
        hooks[0].header("webhook-id"),
        events[0]["id"].as_str().unwrap()
    );
    succeeded_delivery(&http, &api_only.base, &key, endpoint).await;
    let pid = worker.id().unwrap().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(api_only.terminate().await.success());
}

/// Spec checklist B13: `kill -9` while the receiver holds the first request (sent, never
/// answered, attempt not recorded). After a restart, once the 3 s lease lapsed, the delivery
/// is sent again with the same `webhook-id` and body: the receiver saw exactly 2 copies, the
/// delivery is `succeeded`, and the attempts log shows attempt 1 `lease_lost` (recorded by the
/// claim that took it over) and attempt 2 answered 200.
async fn a_crash_mid_delivery_resends_after_the_lease(db: Db) {
    let receiver = hook_receiver(true).await;
    let http = client();
    let lease = Duration::from_secs(3);
    let poll = Duration::from_millis(200);
    let env = [
        WEBHOOKS_TO_LOCALHOST,
        ("BURSAR_WEBHOOKS__LEASE_SECS", "3"),
        ("BURSAR_WEBHOOKS__POLL_INTERVAL_MS", "200"),
    ];
    let first = serve(&db, &env).await;
    let key = first.key().expect("first start prints a key");
    let (endpoint, order) = endpoint_and_order(&http, &first, &key, &receiver).await;
    let held = receiver.wait_for(1, Duration::from_secs(10)).await;
    kill_9(first).await;

    let again = serve(&db, &env).await;
    let restarted = Instant::now();
    let hooks = receiver
        .wait_for(2, lease + poll + Duration::from_secs(5))
        .await;
    let (first_copy, second_copy) = (&held[0], &hooks[1]);
    // Not before the lease lapsed (it was taken just before the first copy was sent).
    let gap = second_copy.at - first_copy.at;
    assert!(
        gap >= lease - Duration::from_millis(500),
        "resent after {gap:?}"
    );
    assert!(
        second_copy.at - restarted <= lease + poll + Duration::from_secs(1),
        "resent {:?} after the restart",
        second_copy.at - restarted
    );
    let events = order_events(&http, &again.base, &key).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["aggregate_id"], order);
    let event_id = events[0]["id"].as_str().unwrap();
    for copy in [first_copy, second_copy] {
        assert_eq!(copy.header("webhook-id"), event_id);
    }
    assert_eq!(first_copy.body, second_copy.body, "byte-identical copies");
    let delivery = succeeded_delivery(&http, &again.base, &key, endpoint).await;
    assert_eq!(delivery["attempt_count"], 2, "{delivery}");
    let id = delivery["id"].as_i64().unwrap();
    assert_eq!(
        first_copy.header("x-bursar-delivery-id"),
        format!("dlv_{id}_1")
    );
    assert_eq!(
        second_copy.header("x-bursar-delivery-id"),
        format!("dlv_{id}_2")
    );
    let url = format!("{}/api/webhook_endpoints/{endpoint}/attempts", again.base);
    let (status, page) = api(&http, reqwest::Method::GET, url, &key, None).await;
    assert_eq!(status, 200, "{page}");
    let mut attempts = page["data"].as_array().unwrap().clone();
    attempts.sort_by_key(|a| a["attempt_no"].as_i64());
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                a["delivery_id"].as_i64(),
                a["attempt_no"].as_i64(),
                a["status_code"].as_i64(),
                a["error_kind"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (Some(id), Some(1), None, Some("lease_lost")),
            (Some(id), Some(2), Some(200), None),
        ],
        "{page}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 2, "exactly two copies");
    assert!(again.terminate().await.success());
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $case() { super::$case(super::sqlite()).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() { if let Some(db) = super::postgres() { super::$case(db).await } } )*
        }
    };
}

/// Issue 4: `bursar serve` is SIGKILLed after the processor authorized a payment and before
/// Bursar recorded it (the sandbox holds its answer back). After a restart, the retry with
/// the same key completes the payment: one payment in Bursar, one charge at the processor.
async fn sigkill_after_the_processor_charged_charges_once(db: Db) {
    let (_sandbox, sandbox_url) = sandbox_processor().await;
    let http = client();
    let env = [
        ("BURSAR_PROCESSOR__URL", sandbox_url.as_str()),
        // The killed run's lease must lapse before the retry can resume the work.
        ("BURSAR_IDEMPOTENCY__LEASE_SECS", "1"),
    ];
    let first = serve(&db, &env).await;
    let key = first.key().expect("first start prints a key");
    let customer = create_customer(&http, &first.base, &key).await;
    let order: serde_json::Value = http
        .post(format!("{}/api/orders", first.base))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"customer_id": customer["id"], "amount": "42.00",
                                  "currency": "EUR"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let faults = |delay: u64| {
        http.post(format!("{sandbox_url}/v1/sandbox/faults"))
            .json(&serde_json::json!({"answer_delay_ms": delay}))
            .send()
    };
    assert_eq!(faults(30_000).await.unwrap().status(), 200);
    let body = serde_json::json!({"order_id": order["id"], "payment_method": "pm_card_visa"});
    let pay = |base: String| {
        http.post(format!("{base}/api/payments"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "pay-order-1")
            .json(&body)
            .send()
    };
    let in_flight = tokio::spawn(pay(first.base.clone()));
    // Wait until the processor has charged: the answer is now held back.
    let charged = async {
        while ledger_kinds(&sandbox_ledger(&http, &sandbox_url).await, "authorization") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), charged)
        .await
        .expect("the processor charges");
    let mut killed = first;
    killed.child.start_kill().unwrap();
    let status = killed.child.wait().await.unwrap();
    assert!(!status.success(), "SIGKILLed");
    assert!(
        in_flight.await.unwrap().is_err(),
        "the client never got an answer"
    );
    assert_eq!(faults(0).await.unwrap().status(), 200);

    let again = serve(&db, &env).await;
    let retried = async {
        loop {
            let resp = pay(again.base.clone()).await.unwrap();
            if resp.status() != 409 {
                return resp;
            }
            // The killed run's lease has not lapsed yet: 409 in progress.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), retried)
        .await
        .expect("the retry resumes the work");
    assert_eq!(resp.status(), 201);
    let payment: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(payment["status"], "succeeded");
    let payments: serde_json::Value = http
        .get(format!(
            "{}/api/payments?order_id={}",
            again.base, order["id"]
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(payments["data"].as_array().unwrap().len(), 1, "one payment");
    let ledger = sandbox_ledger(&http, &sandbox_url).await;
    assert_eq!(
        ledger_kinds(&ledger, "authorization"),
        1,
        "one charge: {ledger}"
    );
    assert_eq!(ledger_kinds(&ledger, "capture"), 1, "{ledger}");
    assert!(again.terminate().await.success());
}

/// `fx.rates_file` is loaded at start and `bursar admin rates load` replaces rates; a bad
/// file is refused with its reason and changes nothing.
async fn rates_come_from_a_file(db: Db) {
    let file = db._dir.path().join("rates.json");
    std::fs::write(
        &file,
        r#"{"rates": [{"base": "USD", "quote": "EUR", "rate": "0.9213"}]}"#,
    )
    .unwrap();
    let path = file.display().to_string();
    let server = serve(&db, &[("BURSAR_FX__RATES_FILE", path.as_str())]).await;
    let key = server.key().expect("first start prints a key");
    let http = client();
    let rates = |base: String| {
        let req = http.get(format!("{base}/api/rates")).bearer_auth(&key);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let loaded = rates(server.base.clone()).await;
    assert_eq!(loaded["data"][0]["rate"], "0.9213", "{loaded}");
    assert_eq!(loaded["data"][0]["base_currency"], "USD");
    std::fs::write(
        &file,
        r#"{"rates": [{"base": "USD", "quote": "EUR", "rate": "0.93"},
                      {"base": "EUR", "quote": "JPY", "rate": "161.2"}]}"#,
    )
    .unwrap();
    let (ok, out, err) = run(&db, &["admin", "rates", "load", &path]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    std::fs::write(
        &file,
        r#"{"rates": [{"base": "USD", "quote": "XXX", "rate": "1"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = run(&db, &["admin", "rates", "load", &path]).await;
    assert!(!ok);
    assert!(err.contains("unknown currency"), "{err}");
    let now = rates(server.base.clone()).await;
    let pairs: Vec<(&str, &str)> = now["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["quote_currency"].as_str().unwrap(),
                r["rate"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(pairs, [("JPY", "161.2"), ("EUR", "0.93")]);
    assert!(server.terminate().await.success());
}

on_both_backends!(
    sigkill_after_the_processor_charged_charges_once,
    rates_come_from_a_file,
    first_start,
    admin_commands,
    sigterm_lets_in_flight_requests_finish,
    shutdown_is_bounded,
    configuration,
    crash_after_commit_is_answered_by_the_retry,
    crash_mid_transaction_leaves_nothing,
    an_event_committed_before_a_crash_is_delivered_after_restart,
    a_crash_mid_delivery_resends_after_the_lease,
    a_separate_worker_process_delivers,
);

/// `bursar sandbox-processor` serves the sandbox over HTTP: a charge, its replay under the
/// same key, and the ledger that shows it once.
#[tokio::test]
async fn sandbox_processor_serves_test_cards() {
    let (mut child, url) = sandbox_processor().await;
    let http = client();
    let charge = serde_json::json!({"amount_minor": 500, "currency": "EUR",
                                    "payment_method": "pm_card_visa", "capture": true});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(format!("{url}/v1/payments"))
            .header("idempotency-key", "cli-1")
            .json(&charge)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let body: serde_json::Value = resp.json().await.unwrap();
        ids.push(body["id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
    let ledger = sandbox_ledger(&http, &url).await;
    let kinds: Vec<&str> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["authorization", "capture"]);
    child.kill().await.unwrap();
}
