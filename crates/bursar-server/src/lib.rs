//! The Bursar server: HTTP layers and handlers (`http`), use cases (`services`), and the wiring
//! of a storage backend. Transports stay thin — parse, authenticate, call a service, render —
//! so the rules live once, in `bursar-domain` and the services.

pub mod config;
pub mod http;
pub mod processor;
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

use tokio::net::TcpListener;

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
    let sweeper = tokio::spawn(sweep_idempotency(state.clone()));
    // With no operation registered there is no work a completer could finish.
    let completer = (state.operations.all().next().is_some())
        .then(|| tokio::spawn(complete_abandoned(state.clone())));
    let (stop_workers, workers_stop) = tokio::sync::watch::channel(false);
    let workers = state.config.webhooks.run_workers.then(|| {
        (
            tokio::spawn(webhooks::relay::run(state.clone())),
            tokio::spawn(webhooks::worker::run(state.clone(), workers_stop, grace)),
        )
    });
    let app = http::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining in-flight requests");
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
    if let Some((relay, worker)) = workers {
        relay.abort();
        let _ = stop_workers.send(true);
        // The worker lets its sends finish (up to the grace) and hands back the rest.
        let _ = worker.await;
    }
    if let Some(completer) = completer {
        completer.abort();
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
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
