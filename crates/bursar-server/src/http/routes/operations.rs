//! `POST <route>` of every registered operation (`services::operations`).

use std::sync::Arc;

use axum::extract::RawPathParams;
use axum::http::{HeaderMap, Uri};
use axum::routing::{MethodRouter, post};

use crate::AppState;
use crate::http::extract::JsonBytes;
use crate::http::idempotency;
use crate::services::Call;
use crate::services::operations::{self, Operation};

/// The handler of one operation: the key and the raw body go to the driver, which validates
/// before it claims anything.
pub fn create(op: Arc<dyn Operation>) -> MethodRouter<AppState> {
    post(
        move |call: Call,
              params: RawPathParams,
              headers: HeaderMap,
              uri: Uri,
              JsonBytes(body): JsonBytes| {
            let op = op.clone();
            let params: Vec<(String, String)> = params
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            async move {
                let key = idempotency::parse_key(&headers)?;
                operations::run(&call, op, key, uri.query(), &params, &body).await
            }
        },
    )
}
