//! The HTTP transport: layers, extractors, handlers, rendering and the OpenAPI document.

pub mod context;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod openapi;
pub mod render;
pub mod routes;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn;
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa_swagger_ui::SwaggerUi;

use crate::AppState;
use routes::{customers, events, live, money, orders, product, system};

/// The whole application. Layer order, outermost first: request context (id, trace, error
/// rendering, access log) → panic guard → timeout (innermost, so a timed-out request is still
/// rendered and logged) → body limit → routing → auth and body extractors in the handlers.
/// Registered operations (`services::operations`) each add `POST <route>`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.http.body_limit_bytes;
    let timeout = state.config.request_timeout();
    let mut api = Router::new()
        .route(
            "/api/customers",
            post(customers::create).get(customers::list),
        )
        .route(
            "/api/customers/{id}",
            get(customers::get).patch(customers::update),
        )
        .route("/api/orders", post(orders::create).get(orders::list))
        .route("/api/orders/{id}", get(orders::get).patch(orders::update))
        .route("/api/orders/{id}/cancel", post(orders::cancel))
        .route("/api/payments", get(money::list_payments))
        .route("/api/payments/{id}", get(money::get_payment))
        .route("/api/refunds", get(money::list_refunds))
        .route("/api/refunds/{id}", get(money::get_refund))
        .route("/api/balances", get(money::balances))
        .route("/api/ledger_entries", get(money::ledger_entries))
        .route("/api/rates", get(money::rates))
        .route("/api/quotes/{id}", get(money::get_quote))
        .route("/api/conversions/{id}", get(money::get_conversion))
        .route("/api/events", get(events::list_events))
        .route("/api/events/stream", get(live::sse))
        .route("/api/events/ws", get(live::websocket))
        .route("/api/events/{id}", get(events::get_event))
        .route(
            "/api/webhook_endpoints",
            post(events::create_endpoint).get(events::list_endpoints),
        )
        .route(
            "/api/webhook_endpoints/{id}",
            get(events::get_endpoint)
                .patch(events::update_endpoint)
                .delete(events::delete_endpoint),
        )
        .route(
            "/api/webhook_endpoints/{id}/rotate_secret",
            post(events::rotate_secret),
        )
        .route(
            "/api/webhook_endpoints/{id}/deliveries",
            get(events::deliveries),
        )
        .route(
            "/api/webhook_endpoints/{id}/attempts",
            get(events::attempts),
        )
        .route(
            "/api/webhook_endpoints/{id}/redeliver",
            post(events::redeliver),
        )
        .route(
            "/api/webhook_endpoints/{id}/replay",
            post(events::create_replay),
        )
        .route(
            "/api/webhook_endpoints/{id}/replays/{replay_id}",
            get(events::get_replay),
        )
        .route("/api/keys", post(product::create).get(product::list))
        .route("/api/keys/{id}", get(product::get))
        .route("/api/keys/{id}/roll", post(product::roll))
        .route("/api/keys/{id}/revoke", post(product::revoke))
        .route("/api/usage", get(product::usage))
        .route("/api/invoices/upcoming", get(product::upcoming_invoice))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics));
    for op in state.operations.all() {
        api = api.route(op.route(), routes::operations::create(op.clone()));
    }
    api.route_layer(from_fn(context::record_route))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::webhooks::relay::wake_on_write,
        ))
        .with_state(state)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::document()))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            ServiceBuilder::new()
                .layer(from_fn(context::request_context))
                .layer(CatchPanicLayer::custom(context::panic_response))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    timeout,
                )),
        )
}
