//! Drives the real `bursar` binary: a scratch store, accounts and keys via the admin CLI,
//! `bursar serve` as a child process (with a config file of the bench's), and one customer per
//! account to attach the orders to.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reqwest::header::AUTHORIZATION;
use reqwest::{Client, StatusCode, Url};
use tokio::process::{Child, Command};

use crate::load::{Target, id_of};
use crate::{Backend, Scratch};

/// `--data-dir DIR` or `--database-url URL`.
pub type Flags = [OsString; 2];

/// A fresh store and the flags that point `bursar` at it. PostgreSQL gets a whole database:
/// the CLI has no schema option, and Bursar's tables (`orders`, …) could clash with others.
pub async fn store(backend: Backend, database_url: Option<&str>) -> Result<(Scratch, Flags)> {
    if backend == Backend::Sqlite {
        let dir = tempfile::tempdir().context("creating Bursar's data dir")?;
        let flags = ["--data-dir".into(), dir.path().into()];
        return Ok((Scratch::Dir(dir), flags));
    }
    let url = database_url.context("--database-url is required for postgres")?;
    let mut db_url = Url::parse(url).context("parsing --database-url")?;
    let (scratch, name) = Scratch::postgres(url, "DATABASE").await?;
    db_url.set_path(&format!("/{name}"));
    Ok((scratch, ["--database-url".into(), db_url.as_str().into()]))
}

/// A `bursar` command that sees only our store flags: a stray `BURSAR_DATABASE_URL` in the
/// environment would otherwise point it at some other store, `BURSAR_PROCESSOR__URL` at some
/// other processor than its in-process sandbox (etc.), so no `BURSAR_*` variable gets through.
fn command(bin: &Path, flags: &Flags, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    for (var, _) in std::env::vars_os() {
        if var.as_encoded_bytes().starts_with(b"BURSAR_") {
            cmd.env_remove(var);
        }
    }
    cmd.args(args)
        .args(flags)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `bursar admin …`, which prints just the new value, and returns it.
async fn admin(bin: &Path, flags: &Flags, args: &[&str]) -> Result<String> {
    let what = format!("bursar {}", args.join(" "));
    let out = command(bin, flags, args)
        .output()
        .await
        .context(what.clone())?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), &out.stderr);
    let ok = out.status.success() && !stdout.trim().is_empty();
    ensure!(
        ok,
        "{what}: {}: {stdout} {}",
        out.status,
        String::from_utf8_lossy(stderr)
    );
    Ok(stdout.trim().to_owned())
}

/// A running `bursar serve` and the temp dir holding its config file (and, on PostgreSQL, its
/// data dir: the webhook key file goes there rather than into the working directory). The
/// process is killed when this is dropped.
pub struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// The process id (for reading its memory from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("killing bursar")
    }
}

/// Starts `bursar serve` on a free port with `config` (TOML) added to its config file, waits
/// for `/readyz`, and returns one target per `(target name, account name)` in `accounts`:
/// each account is created with a key (admin CLI, before the server starts) and one customer
/// that its orders belong to.
pub async fn start(
    bin: &Path,
    flags: &Flags,
    client: &Client,
    config: &str,
    accounts: &[(&'static str, &str)],
) -> Result<(Server, Vec<Target>)> {
    let mut keys = Vec::new();
    for (_, account) in accounts {
        admin(bin, flags, &["admin", "accounts", "create", account]).await?;
        let args = ["admin", "keys", "create", "--account", account];
        keys.push(admin(bin, flags, &args).await?);
    }
    let dir = tempfile::tempdir().context("creating Bursar's config dir")?;
    let data_dir = dir
        .path()
        .to_str()
        .context("a temp dir path that is not UTF-8")?;
    // A JSON string is a valid TOML basic string. The --data-dir flag (SQLite) wins over it.
    let text = format!(
        "# Written by bursar-bench.\ndata_dir = {}\n{config}",
        serde_json::to_string(data_dir)?
    );
    let file = dir.path().join("bursar.toml");
    std::fs::write(&file, text).context("writing Bursar's config file")?;
    let file = file.to_str().context("a temp dir path that is not UTF-8")?;
    // The port is free once the probe is dropped; a race with another process is unlikely.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    let listen = probe.local_addr()?.to_string();
    drop(probe);
    // Logs stay on (they are part of Bursar's real cost) but go nowhere.
    let mut cmd = command(
        bin,
        flags,
        &["serve", "--listen", &listen, "--config", file],
    );
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let mut server = Server { child, _dir: dir };
    let base = format!("http://{listen}");
    wait_ready(&mut server.child, client, &base).await?;
    let mut targets = Vec::new();
    for ((name, _), key) in accounts.iter().zip(keys) {
        targets.push(with_customer(client, &base, name, &key).await?);
    }
    Ok((server, targets))
}

/// Creates the customer that the target's orders belong to.
async fn with_customer(
    client: &Client,
    base: &str,
    name: &'static str,
    key: &str,
) -> Result<Target> {
    let auth = format!("Bearer {key}");
    let req = client
        .post(format!("{base}/api/customers"))
        .header(AUTHORIZATION, &auth);
    let resp = req
        .json(&serde_json::json!({ "name": "bench" }))
        .send()
        .await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    // The id keeps its JSON type (number or string) in the order body.
    let Some(customer) = id_of(&body).filter(|_| status == StatusCode::CREATED) else {
        bail!(
            "POST /api/customers: {status}: {}",
            String::from_utf8_lossy(&body)
        );
    };
    let body = format!(r#"{{"customer_id":{customer},"amount":199.00,"currency":"USD"}}"#);
    let orders = format!("{base}/api/orders");
    Ok(Target::new(name, client, orders, Some(auth), body))
}

async fn wait_ready(child: &mut Child, client: &Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("bursar serve exited early ({status}); run it by hand to see its logs");
        }
        let ready = client.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "bursar not ready on {base}/readyz after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
