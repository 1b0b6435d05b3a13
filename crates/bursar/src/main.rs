//! `bursar`: the one binary. `serve` runs the API; `worker` runs only the background workers;
//! `migrate`, `config` and `admin` are the operator's tools. Admin commands print only what they created on stdout, so scripts can
//! capture it: `KEY=$(bursar admin keys create --account acme)`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bursar_domain::Clock;
use bursar_server::config::{DEFAULT_TOML, LogFormat};
use bursar_server::services::accounts;
use bursar_server::{AppState, Config, FaultPoint, SystemClock};
use clap::{Args, Parser, Subcommand, ValueEnum};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "bursar",
    version,
    about = "Orders, payments and currency conversions API server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server (embedded SQLite under ./bursar-data unless told otherwise).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on [env: BURSAR_LISTEN] [default: 127.0.0.1:8080]
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The payment processor [env: BURSAR_PROCESSOR__URL]; without one, the sandbox
        /// processor runs in-process (test mode).
        #[arg(long)]
        processor_url: Option<String>,
        #[command(flatten)]
        events: EventFlags,
    },
    /// Run only the background workers: the event relay, webhook delivery and (with NATS) the
    /// JetStream publisher. Any number may run beside `bursar serve` on one database.
    Worker {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        events: EventFlags,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Accounts and API keys.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Run the sandbox payment processor: test cards, its own idempotency keys, a ledger at
    /// /v1/ledger, faults changeable at /v1/sandbox/faults. State is in memory.
    SandboxProcessor {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Percentage (0-100) of requests answered 503 without being handled.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        failure_percent: u8,
        /// Waited after a request is handled and its answer stored, before the answer is
        /// sent (the charge is made while the caller still waits), in milliseconds.
        #[arg(long, default_value_t = 0)]
        answer_delay_ms: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every configuration key with its default and documentation.
    PrintDefault,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Manage accounts.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage the market rates quotes are made from.
    Rates {
        #[command(subcommand)]
        command: RatesCommand,
    },
}

#[derive(Subcommand)]
enum RatesCommand {
    /// Load a rates file (`{"rates": [{"base": "USD", "quote": "EUR", "rate": "0.92"}]}`):
    /// every rate in it is set now, all or nothing; prints how many.
    Load {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Create an account; prints its id.
    Create {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Put an account on a plan of the configuration (`default`: the configured default).
    /// Instances apply it within the key cache lifetime (5 s).
    SetPlan {
        /// Account name or id.
        account: String,
        plan: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key; prints the key (shown only this once).
    Create {
        /// Account name or id.
        #[arg(long)]
        account: String,
        #[arg(long, value_enum, default_value_t = Mode::Test)]
        mode: Mode,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Test,
    Live,
}

/// Flags shared by every command that touches the database.
#[derive(Args, Serialize)]
struct Common {
    /// TOML configuration file [env: BURSAR_CONFIG]
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Directory of the embedded SQLite database [env: BURSAR_DATA_DIR]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// postgres://… or sqlite:… (default: SQLite in the data dir) [env: BURSAR_DATABASE_URL]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    database_url: Option<String>,
}

/// Flags of the processes that move events (`serve`, `worker`).
#[derive(Args)]
struct EventFlags {
    /// NATS server with JetStream: events are published there, and live streams see every
    /// instance's events [env: BURSAR_NATS__URL]
    #[arg(long)]
    nats_url: Option<String>,
    /// Let webhook URLs reach this private range, e.g. 127.0.0.0/8 for receivers on this
    /// machine; repeatable [config: webhooks.allow_cidrs]
    #[arg(long = "webhook-allow-cidr", value_name = "CIDR")]
    webhook_allow_cidrs: Vec<String>,
    /// Redis for rate limits shared by every instance and for key revocations reaching them
    /// at once [env: BURSAR_LIMITS__REDIS_URL]
    #[arg(long)]
    redis_url: Option<String>,
}

impl EventFlags {
    /// Flags win over the file and the environment.
    fn apply(self, config: &mut Config) -> anyhow::Result<()> {
        if let Some(url) = self.nats_url {
            config.nats.url = Some(url);
        }
        config.webhooks.allow_cidrs.extend(self.webhook_allow_cidrs);
        if let Some(url) = self.redis_url {
            config.limits.redis_url = Some(url);
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }
}

/// Top-level keys that may come from `BURSAR_*` variables; others (BURSAR_CONFIG, variables of
/// the test suites) are not configuration keys.
const ENV_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "database_url",
    "http",
    "database",
    "idempotency",
    "processor",
    "fx",
    "webhooks",
    "live",
    "nats",
    "limits",
    "metering",
    "plans",
    "log",
];

fn load_config(common: &Common, listen: Option<SocketAddr>) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    let file = common
        .config
        .clone()
        .or_else(|| std::env::var_os("BURSAR_CONFIG").map(PathBuf::from));
    if let Some(path) = file {
        if !path.exists() {
            bail!("configuration file {} does not exist", path.display());
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment
        .merge(Env::prefixed("BURSAR_").split("__").filter(|k| {
            // Keys arrive upper case, with `__` already mapped to `.`.
            let top = k.as_str().split('.').next().unwrap_or_default();
            ENV_KEYS.iter().any(|known| top.eq_ignore_ascii_case(known))
        }))
        .merge(Serialized::defaults(common));
    if let Some(listen) = listen {
        figment = figment.merge(Serialized::default("listen", listen));
    }
    let config: Config = figment.extract().context("invalid configuration")?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(config)
}

/// JSON (or pretty) lines on stderr, written by a background thread so a request never waits
/// on the terminal or pipe. Not lossy: when the buffer is full, logging applies backpressure
/// rather than dropping access lines. Keep the returned guard alive: dropping it flushes.
fn init_logging(config: &Config, quiet: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let level = if quiet {
        "warn"
    } else {
        config.log.level.as_str()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
    guard
}

/// Registers SIGTERM and SIGINT handlers *now* (before anything is printed, so a supervisor
/// that signals as soon as it sees the banner is handled) and returns the future that
/// resolves on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Reads a rates file and stores its rates (`services::money::load_rates`).
async fn load_rates_file(
    store: &dyn bursar_storage::Storage,
    file: &Path,
    now: bursar_domain::Timestamp,
) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading rates file {}", file.display()))?;
    bursar_server::services::money::load_rates(store, &text, now)
        .await
        .with_context(|| format!("loading rates file {}", file.display()))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let clock = Arc::new(SystemClock);
    let store = bursar_server::store::open(&config)
        .await
        .with_context(|| format!("opening database {}", config.redacted_database_url()))?;
    let first_key = accounts::bootstrap(store.as_ref(), clock.as_ref()).await?;
    if let Some(file) = &config.fx.rates_file {
        let loaded = load_rates_file(store.as_ref(), Path::new(file), clock.now()).await?;
        tracing::info!(rates = loaded, file = %file, "loaded market rates");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    println!("Bursar {} is running.", env!("CARGO_PKG_VERSION"));
    println!("  API:      http://{host}/api");
    println!("  Docs:     http://{host}/docs");
    println!("  Database: {}", config.redacted_database_url());
    let processor_url = match &config.processor.url {
        Some(url) => {
            let shown = config.redacted_processor_url().unwrap_or_default();
            println!("  Processor: {shown}");
            url.clone()
        }
        None => {
            // Test mode: the sandbox answers on a port of its own, over real HTTP.
            let sandbox = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", sandbox.local_addr()?);
            tokio::spawn(bursar_sandbox::serve(
                sandbox,
                bursar_sandbox::Sandbox::new(bursar_sandbox::Faults::default()),
            ));
            println!("  Processor: sandbox (test mode) at {url}");
            url
        }
    };
    let processor = bursar_server::processor::HttpProcessor::new(
        &processor_url,
        config.processor.retry_policy(),
    )
    .context("setting up the processor client")?;
    if let Some(key) = first_key {
        println!(
            "First API key for account \"{}\" (shown only this once; store it now):",
            accounts::DEFAULT_ACCOUNT
        );
        println!("  {key}");
    }
    println!("Press Ctrl-C to stop.");
    tracing::info!(listen = %addr, backend = store.backend(), "serving");
    let nats = config
        .nats
        .url
        .is_some()
        .then(|| config.nats.redacted_url());
    let mut state = AppState::new(store, clock, config)?;
    state.processor = Some(Arc::new(processor));
    state.connect_nats().await?;
    state.connect_redis().await?;
    if let Some(url) = nats {
        tracing::info!(nats = %url, "publishing events to NATS JetStream");
    }
    if let Ok(name) = std::env::var("BURSAR_TEST_FAULT") {
        let point = FaultPoint::parse(&name)
            .ok_or_else(|| anyhow::anyhow!("unknown BURSAR_TEST_FAULT {name:?}"))?;
        tracing::warn!(?point, "a crash is staged for testing (BURSAR_TEST_FAULT)");
        state.fault = Some(point);
    }
    bursar_server::serve(listener, state, shutdown).await
}

/// `bursar worker`: the relay, webhook delivery and NATS publisher, without the HTTP API.
async fn worker(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let store = bursar_server::store::open(&config)
        .await
        .with_context(|| format!("opening database {}", config.redacted_database_url()))?;
    println!("Bursar {} worker is running.", env!("CARGO_PKG_VERSION"));
    println!("  Database: {}", config.redacted_database_url());
    if config.nats.url.is_some() {
        println!("  NATS:     {}", config.nats.redacted_url());
    }
    println!("Press Ctrl-C to stop.");
    tracing::info!(backend = store.backend(), "working");
    let mut state = AppState::new(store, Arc::new(SystemClock), config)?;
    state.connect_nats().await?;
    bursar_server::work(state, shutdown).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            command: ConfigCommand::PrintDefault,
        } => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Serve {
            common,
            listen,
            processor_url,
            events,
        } => {
            let mut config = load_config(&common, listen)?;
            if let Some(url) = processor_url {
                config.processor.url = Some(url);
            }
            events.apply(&mut config)?;
            let _log = init_logging(&config, false);
            serve(config).await
        }
        Command::Worker { common, events } => {
            let mut config = load_config(&common, None)?;
            events.apply(&mut config)?;
            let _log = init_logging(&config, false);
            worker(config).await
        }
        Command::SandboxProcessor {
            listen,
            latency_ms,
            failure_percent,
            answer_delay_ms,
        } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let shutdown = shutdown_signal()?;
            println!(
                "Sandbox processor listening on http://{}",
                listener.local_addr()?
            );
            println!("Press Ctrl-C to stop.");
            let sandbox = bursar_sandbox::Sandbox::new(bursar_sandbox::Faults {
                latency: std::time::Duration::from_millis(latency_ms),
                failure_percent,
                answer_delay: std::time::Duration::from_millis(answer_delay_ms),
            });
            tokio::select! {
                served = bursar_sandbox::serve(listener, sandbox) => served?,
                () = shutdown => {}
            }
            Ok(())
        }
        Command::Migrate { common } => {
            let config = load_config(&common, None)?;
            let _log = init_logging(&config, false);
            let store = bursar_server::store::open(&config).await?;
            store.close().await;
            eprintln!("migrated {}", config.redacted_database_url());
            Ok(())
        }
        Command::Admin { command } => {
            let clock = SystemClock;
            match command {
                AdminCommand::Accounts {
                    command: AccountsCommand::Create { name, common },
                } => {
                    let config = load_config(&common, None)?;
                    let _log = init_logging(&config, true);
                    let store = bursar_server::store::open(&config).await?;
                    let account = accounts::create_account(store.as_ref(), &clock, &name).await;
                    store.close().await;
                    println!("{}", account?.id);
                }
                AdminCommand::Accounts {
                    command:
                        AccountsCommand::SetPlan {
                            account,
                            plan,
                            common,
                        },
                } => {
                    let config = load_config(&common, None)?;
                    let _log = init_logging(&config, true);
                    let store = bursar_server::store::open(&config).await?;
                    let set = accounts::set_plan(store.as_ref(), &config, &account, &plan).await;
                    store.close().await;
                    println!("{}", set?);
                }
                AdminCommand::Keys {
                    command:
                        KeysCommand::Create {
                            account,
                            mode,
                            common,
                        },
                } => {
                    let config = load_config(&common, None)?;
                    let _log = init_logging(&config, true);
                    let store = bursar_server::store::open(&config).await?;
                    let mode = match mode {
                        Mode::Test => bursar_domain::apikey::KeyMode::Test,
                        Mode::Live => bursar_domain::apikey::KeyMode::Live,
                    };
                    let key = accounts::create_key(store.as_ref(), &clock, &account, mode).await;
                    store.close().await;
                    println!("{}", key?);
                }
                AdminCommand::Rates {
                    command: RatesCommand::Load { file, common },
                } => {
                    let config = load_config(&common, None)?;
                    let _log = init_logging(&config, true);
                    let store = bursar_server::store::open(&config).await?;
                    let loaded = load_rates_file(store.as_ref(), &file, clock.now()).await;
                    store.close().await;
                    println!("{}", loaded?);
                }
            }
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    // reqwest and sqlx both reach rustls; exactly one crypto provider must be installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
