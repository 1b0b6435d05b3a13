//! Typed Rust client for the Bursar API.
//!
//! Every call returns the decoded body together with the response headers (`ETag`,
//! `X-Request-Id`, …), and every failure as [`Error::Api`] carrying the server's error body,
//! so callers branch on the stable `error_code` rather than on message text.

use bursar_api::{
    Balance, CapturePayment, Conversion, CreateConversion, CreateCustomer, CreateOrder,
    CreatePayment, CreateQuote, CreateRefund, Customer, ErrorBody, LedgerEntry, List, Order,
    Payment, Quote, Refund, UpdateCustomer, UpdateOrder,
};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod webhooks;

pub use bursar_api as api;
pub use reqwest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body.
    #[error("{status}: {} ({})", body.error_code, body.message)]
    Api {
        status: StatusCode,
        headers: HeaderMap,
        body: Box<ErrorBody>,
    },
    /// The server answered something that is not the documented shape.
    #[error("unexpected {status} response: {text}")]
    Unexpected { status: StatusCode, text: String },
    #[error("transport error: {0}")]
    Transport(#[from] reqwest::Error),
}

impl Error {
    /// The `error_code` of an API error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { body, .. } => Some(&body.error_code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } | Error::Unexpected { status, .. } => Some(*status),
            Error::Transport(e) => e.status(),
        }
    }
}

/// A successful answer: status, headers and decoded body.
#[derive(Debug)]
pub struct Reply<T> {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: T,
}

impl<T> Reply<T> {
    /// The version carried by a strong `ETag: "<n>"`.
    pub fn etag_version(&self) -> Option<i64> {
        let tag = self.headers.get("etag")?.to_str().ok()?;
        tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Filters for [`Client::list_orders`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListOrders {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(rename = "created[gte]", skip_serializing_if = "Option::is_none")]
    pub created_gte: Option<String>,
    #[serde(rename = "created[lt]", skip_serializing_if = "Option::is_none")]
    pub created_lt: Option<String>,
}

/// A page request for lists without filters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PageParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starting_after: Option<i64>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    /// `base_url` is the server root, e.g. `http://127.0.0.1:8080`.
    pub fn new(base_url: &str, api_key: &str) -> Client {
        Client::with_http(reqwest::Client::new(), base_url, api_key)
    }

    /// With a caller-configured `reqwest::Client` (timeouts, pools, TLS roots).
    pub fn with_http(http: reqwest::Client, base_url: &str, api_key: &str) -> Client {
        Client {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            key: api_key.to_owned(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A raw request with the key attached, for what the typed calls do not cover.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends and decodes: 2xx bodies as `T`, error bodies as [`Error::Api`].
    pub async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<Reply<T>, Error> {
        decode(req.send().await?).await
    }

    pub async fn create_customer(&self, req: &CreateCustomer) -> Result<Reply<Customer>, Error> {
        self.send(self.request(Method::POST, "/api/customers").json(req))
            .await
    }

    pub async fn get_customer(&self, id: i64) -> Result<Reply<Customer>, Error> {
        self.send(self.request(Method::GET, &format!("/api/customers/{id}")))
            .await
    }

    pub async fn list_customers(&self, page: PageParams) -> Result<Reply<List<Customer>>, Error> {
        self.send(self.request(Method::GET, "/api/customers").query(&page))
            .await
    }

    /// `if_match` is the version the change is based on (sent as `If-Match: "<n>"`).
    pub async fn update_customer(
        &self,
        id: i64,
        if_match: Option<i64>,
        req: &UpdateCustomer,
    ) -> Result<Reply<Customer>, Error> {
        let r = self.request(Method::PATCH, &format!("/api/customers/{id}"));
        self.send(with_if_match(r, if_match).json(req)).await
    }

    /// Creates an order. Pass an idempotency key to make retries safe.
    pub async fn create_order(
        &self,
        req: &CreateOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Reply<Order>, Error> {
        let mut r = self.request(Method::POST, "/api/orders").json(req);
        if let Some(k) = idempotency_key {
            r = r.header("idempotency-key", k);
        }
        self.send(r).await
    }

    pub async fn get_order(&self, id: i64) -> Result<Reply<Order>, Error> {
        self.send(self.request(Method::GET, &format!("/api/orders/{id}")))
            .await
    }

    /// Conditional GET: `Ok(None)` when the order still has version `known_version` (304).
    pub async fn get_order_if_changed(
        &self,
        id: i64,
        known_version: i64,
    ) -> Result<Option<Reply<Order>>, Error> {
        let r = self
            .request(Method::GET, &format!("/api/orders/{id}"))
            .header("if-none-match", format!("\"{known_version}\""));
        let resp = r.send().await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        decode(resp).await.map(Some)
    }

    pub async fn list_orders(&self, filter: &ListOrders) -> Result<Reply<List<Order>>, Error> {
        self.send(self.request(Method::GET, "/api/orders").query(filter))
            .await
    }

    pub async fn update_order(
        &self,
        id: i64,
        if_match: Option<i64>,
        req: &UpdateOrder,
    ) -> Result<Reply<Order>, Error> {
        let r = self.request(Method::PATCH, &format!("/api/orders/{id}"));
        self.send(with_if_match(r, if_match).json(req)).await
    }

    pub async fn cancel_order(&self, id: i64) -> Result<Reply<Order>, Error> {
        self.send(self.request(Method::POST, &format!("/api/orders/{id}/cancel")))
            .await
    }

    /// POSTs a money create under `idempotency_key`: payments, captures, cancels, refunds,
    /// quotes and conversions all call third parties or move money, so the key is required
    /// here — retrying with the same key is what makes a timeout safe to retry.
    async fn post_keyed<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        idempotency_key: &str,
    ) -> Result<Reply<T>, Error> {
        let r = self
            .request(Method::POST, path)
            .header("idempotency-key", idempotency_key)
            .json(body);
        self.send(r).await
    }

    /// Pays an order (authorizes, and captures unless `capture: false`). A decline is
    /// [`Error::Api`] with `card_declined` and the failed payment's id in `extra`.
    pub async fn create_payment(
        &self,
        req: &CreatePayment,
        idempotency_key: &str,
    ) -> Result<Reply<Payment>, Error> {
        self.post_keyed("/api/payments", req, idempotency_key).await
    }

    /// Captures an authorized payment, in full or `req.amount` of it.
    pub async fn capture_payment(
        &self,
        id: i64,
        req: &CapturePayment,
        idempotency_key: &str,
    ) -> Result<Reply<Payment>, Error> {
        self.post_keyed(&format!("/api/payments/{id}/capture"), req, idempotency_key)
            .await
    }

    /// Voids an authorized payment.
    pub async fn cancel_payment(
        &self,
        id: i64,
        idempotency_key: &str,
    ) -> Result<Reply<Payment>, Error> {
        let empty = serde_json::Map::new();
        self.post_keyed(
            &format!("/api/payments/{id}/cancel"),
            &empty,
            idempotency_key,
        )
        .await
    }

    pub async fn get_payment(&self, id: i64) -> Result<Reply<Payment>, Error> {
        self.send(self.request(Method::GET, &format!("/api/payments/{id}")))
            .await
    }

    pub async fn create_refund(
        &self,
        req: &CreateRefund,
        idempotency_key: &str,
    ) -> Result<Reply<Refund>, Error> {
        self.post_keyed("/api/refunds", req, idempotency_key).await
    }

    /// Per-currency balances of the account's ledger accounts.
    pub async fn balances(&self) -> Result<Reply<List<Balance>>, Error> {
        self.send(self.request(Method::GET, "/api/balances")).await
    }

    /// One page of the journal, newest first.
    pub async fn ledger_entries(
        &self,
        page: PageParams,
    ) -> Result<Reply<List<LedgerEntry>>, Error> {
        self.send(
            self.request(Method::GET, "/api/ledger_entries")
                .query(&page),
        )
        .await
    }

    pub async fn create_quote(
        &self,
        req: &CreateQuote,
        idempotency_key: &str,
    ) -> Result<Reply<Quote>, Error> {
        self.post_keyed("/api/quotes", req, idempotency_key).await
    }

    pub async fn create_conversion(
        &self,
        req: &CreateConversion,
        idempotency_key: &str,
    ) -> Result<Reply<Conversion>, Error> {
        self.post_keyed("/api/conversions", req, idempotency_key)
            .await
    }
}

/// 2xx bodies as `T`, documented error bodies as [`Error::Api`], anything else as
/// [`Error::Unexpected`] with the raw text.
async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<Reply<T>, Error> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await?;
    let unexpected = || Error::Unexpected {
        status,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    };
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .map(|body| Reply {
                status,
                headers,
                body,
            })
            .map_err(|_| unexpected());
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(Error::Api {
            status,
            headers,
            body: Box::new(body),
        }),
        Err(_) => Err(unexpected()),
    }
}

fn with_if_match(r: RequestBuilder, version: Option<i64>) -> RequestBuilder {
    match version {
        Some(v) => r.header(
            "if-match",
            HeaderValue::from_str(&format!("\"{v}\"")).expect("digits"),
        ),
        None => r,
    }
}
