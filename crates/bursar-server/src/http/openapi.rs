//! The OpenAPI 3.1 document, generated from the handlers' annotations and the wire types.
//! A snapshot test compares it with `docs/openapi.json`, so every change to the contract
//! shows up in review.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes::{customers, events, live, money, orders, product, system};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bursar API",
        description = "Orders, payments and currency conversions. Errors share one envelope \
                       (see ErrorBody); send `Accept: application/problem+json` for RFC 9457.",
        license(name = "Apache-2.0")
    ),
    paths(
        customers::create, customers::list, customers::get, customers::update,
        events::list_events, live::sse, live::websocket, events::get_event, events::create_endpoint, events::list_endpoints,
        events::get_endpoint, events::update_endpoint, events::delete_endpoint,
        events::rotate_secret, events::deliveries, events::attempts, events::redeliver,
        events::create_replay, events::get_replay,
        orders::create, orders::list, orders::get, orders::update, orders::cancel,
        money::create_payment, money::list_payments, money::get_payment,
        money::capture_payment, money::cancel_payment,
        money::create_refund, money::list_refunds, money::get_refund,
        money::balances, money::ledger_entries,
        money::rates, money::create_quote, money::get_quote,
        money::create_conversion, money::get_conversion,
        product::create, product::list, product::get, product::roll, product::revoke,
        product::usage, product::upcoming_invoice,
        system::healthz, system::readyz, system::metrics,
    ),
    components(schemas(bursar_api::ErrorBody, bursar_api::FieldIssue)),
    modifiers(&BearerKey),
    tags(
        (name = "customers", description = "Who orders are for"),
        (name = "orders", description = "Amounts owed, with a state machine"),
        (name = "payments", description = "Card payments through the processor: authorize, capture, cancel"),
        (name = "refunds", description = "Refunds of captured payments, never more than captured"),
        (name = "ledger", description = "Balances and the double-entry journal behind them"),
        (name = "fx", description = "Rates, quotes that lock a rate, and conversions"),
        (name = "events", description = "The event log: every committed change, in order per account"),
        (name = "webhooks", description = "Signed webhook endpoints, their deliveries and attempts"),
        (name = "keys", description = "API keys: scopes, expiry, roll with a grace period, revoke"),
        (name = "usage", description = "Metered requests and the invoice they add up to"),
        (name = "system", description = "Health and readiness"),
    )
)]
struct ApiDoc;

struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("bsr_test_… / bsr_live_…")
                    .build(),
            ),
        );
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
