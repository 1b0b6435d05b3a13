//! `POST <route>` of every registered operation (`services::operations`).

use std::sync::Arc;

use axum::extract::RawPathParams;
use axum::http::{HeaderMap, Uri};
use axum::routing::{MethodRouter, post};

use crate::AppState;
use crate::http::extract::OptionalJsonBytes;
use crate::http::idempotency;
use crate::services::Call;
use crate::services::operations::{self, Operation};

/// The handler of one operation: the key and the raw body go to the driver, which validates
/// before it claims anything. A bare request (no body, no `Content-Type`) reaches the
/// operation as an empty body: actions with only optional options accept it, the others
/// answer `malformed_json`.
pub fn create(op: Arc<dyn Operation>) -> MethodRouter<AppState> {
    post(
        move |call: Call,
              params: RawPathParams,
              headers: HeaderMap,
              uri: Uri,
              OptionalJsonBytes(body): OptionalJsonBytes| {
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
