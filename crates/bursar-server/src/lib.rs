//! The Bursar server: HTTP layers and handlers (`http`), use cases (`services`), and the wiring
//! of a storage backend. Transports stay thin — parse, authenticate, call a service, render —
//! so the rules live once, in `bursar-domain` and the services.

pub mod config;
pub mod http;
pub mod live;
pub mod processor;
pub mod product;
pub mod services;
pub mod ssrf;
pub mod state;
pub mod store;
pub mod trace;
pub mod webhooks;

pub use config::Config;
pub use state::{AppState, FaultPoint, SystemClock};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;

use tokio::net::TcpListener;

/// The process's metrics recorder, installed on first use (one per process, whatever number of
/// servers it runs), rendered at `GET /metrics`.
pub fn metrics_handle() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only its own");
        }
        handle
    })
}

/// Serves the API on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish for at most `config.shutdown_grace`, and closes the storage pools.
/// Taking the listener (not an address) lets tests bind port 0 and read the port first.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = state.config.shutdown_grace();
    let store = state.store.clone();
    metrics_handle();
    let sweeper = tokio::spawn(sweep_idempotency(state.clone()));
    // With no operation registered there is no work a completer could finish.
    let completer = (state.operations.all().next().is_some())
        .then(|| tokio::spawn(complete_abandoned(state.clone())));
    let workers = state
        .config
        .webhooks
        .run_workers
        .then(|| Workers::start(&state, grace));
    // The live tail from every instance, for this process's SSE and WebSocket subscribers.
    let subscriber = state
        .nats
        .clone()
        .map(|link| tokio::spawn(live::nats::run_subscriber(state.clone(), link)));
    let live = state.live.clone();
    let stream_keys = tokio::spawn(live::keys::run(state.clone()));
    // Limits, metering and key invalidations.
    let product = state.product.clone();
    let mut product_tasks = product.spawn_sweepers();
    product_tasks.push(tokio::spawn(product::meter::run(
        product.meter.clone(),
        store.clone(),
        state.config.metering.flush_interval(),
    )));
    product_tasks.push(tokio::spawn(
        product
            .clone()
            .run_invalidation_listener(state.keys.clone()),
    ));
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining in-flight requests");
        // Live streams never finish by themselves: end them, so their clients reconnect
        // (elsewhere) with their last seq instead of holding the shutdown for the grace.
        live.close();
        let _ = stopping_tx.send(());
    });
    let drained = async move {
        // Only starts counting once shutdown began; a dropped sender means the server ended.
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result?,
        () = drained => tracing::warn!(grace_ms = self::millis(grace), "grace period over; abandoning in-flight requests"),
    }
    sweeper.abort();
    stream_keys.abort();
    if let Some(subscriber) = subscriber {
        subscriber.abort();
    }
    if let Some(workers) = workers {
        workers.stop().await;
    }
    if let Some(completer) = completer {
        completer.abort();
    }
    for task in product_tasks {
        task.abort();
    }
    // Usage counted since the last flush is written before the pools close.
    if let Err(e) = product.meter.flush(store.as_ref()).await {
        tracing::error!(error = %e, pending = product.meter.pending(), "final usage flush failed");
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the background workers alone (`bursar worker`): the event relay, the webhook delivery
/// worker and, with NATS, the publisher. Any number of these may run beside any number of
/// `bursar serve` processes on one database. On `shutdown` the delivery worker lets its sends
/// finish for up to the grace period and hands back the rest.
pub async fn work(
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = state.store.clone();
    let workers = Workers::start(&state, state.config.shutdown_grace());
    shutdown.await;
    tracing::info!("shutdown requested; finishing deliveries in flight");
    workers.stop().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The relay, the delivery worker, the NATS publisher and the delivery purge of one process.
struct Workers {
    relay: tokio::task::JoinHandle<()>,
    purge: tokio::task::JoinHandle<()>,
    publisher: Option<tokio::task::JoinHandle<()>>,
    worker: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Workers {
    fn start(state: &AppState, grace: std::time::Duration) -> Workers {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        Workers {
            relay: tokio::spawn(webhooks::relay::run(state.clone())),
            purge: tokio::spawn(purge_deliveries(state.clone())),
            publisher: state
                .nats
                .clone()
                .map(|link| tokio::spawn(live::nats::run_publisher(state.clone(), link))),
            worker: tokio::spawn(webhooks::worker::run(state.clone(), stopped, grace)),
            stop,
        }
    }

    /// Stops claiming; what was sequenced but not published waits in the log for the next
    /// publisher.
    async fn stop(self) {
        self.relay.abort();
        self.purge.abort();
        if let Some(publisher) = self.publisher {
            publisher.abort();
        }
        let _ = self.stop.send(true);
        // The worker lets its sends finish (up to the grace) and hands back the rest.
        let _ = self.worker.await;
    }
}

/// Deletes expired idempotency records in bounded batches, so no sweep holds the writer for
/// long. Expired records already count as absent, so a late sweep never changes an answer.
async fn sweep_idempotency(state: AppState) {
    const BATCH: u32 = 1000;
    let mut tick = tokio::time::interval(state.config.idempotency.sweep_interval());
    loop {
        tick.tick().await;
        loop {
            match state
                .store
                .sweep_idempotency(state.clock.now(), BATCH)
                .await
            {
                Ok(n) if n == u64::from(BATCH) => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(deleted = n, "swept expired idempotency records");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency sweep failed; will retry");
                    break;
                }
            }
        }
    }
}

/// Deletes finished deliveries past `webhooks.retention_days` with their attempts, in
/// statements of at most 1000 rows with a pause between them, so claims and completions are
/// never held up behind a long delete. Several processes may purge at once: a row deleted by
/// one is simply not found by the others.
async fn purge_deliveries(state: AppState) {
    const BATCH: u32 = 1000;
    let hooks = &state.config.webhooks;
    let retention = i64::try_from(hooks.retention().as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(hooks.purge_interval());
    loop {
        tick.tick().await;
        let before = bursar_domain::Timestamp(state.clock.now().0.saturating_sub(retention));
        let mut purged = 0;
        loop {
            match state.store.purge_deliveries(before, BATCH).await {
                Ok(0) => break,
                Ok(n) => {
                    purged += n;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purging old webhook deliveries failed; will retry");
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::info!(rows = purged, "purged webhook deliveries past retention");
        }
    }
}

/// Finishes work whose driver died (`services::operations`), in batches, so no crash leaves a
/// payment half-done waiting for a client retry that may never come.
async fn complete_abandoned(state: AppState) {
    const BATCH: u32 = 100;
    let mut tick = tokio::time::interval(state.config.idempotency.completer_interval());
    loop {
        tick.tick().await;
        match services::operations::complete_abandoned(&state, BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(finished = n, "completed abandoned work"),
            Err(e) => tracing::warn!(error = %e, "completer pass failed; will retry"),
        }
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
