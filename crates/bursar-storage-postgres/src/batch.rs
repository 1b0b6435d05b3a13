//! PostgreSQL's side of group commit (`bursar_storage::group_commit`).
//!
//! A batch is one statement: the creates arrive as arrays, `unnest` turns them into rows, ids
//! are drawn from the table's identity sequence up front so each inserted row (and its outbox
//! event) can be matched back to the create that asked for it, and the whole statement is one
//! implicit transaction. Static SQL, so it is prepared once whatever the batch size.

use async_trait::async_trait;
use bursar_storage::group_commit::{Create, GroupWriter, Written};
use bursar_storage::{StorageError, WriteMeta};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use crate::err;

/// Most creates one statement carries.
pub const MAX_BATCH: usize = 64;

const CUSTOMERS: &str = concat!(
    "WITH input AS MATERIALIZED (\
       SELECT nextval(pg_get_serial_sequence('customers', 'id')) AS id, t.* \
       FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], \
                   $7::text[]) WITH ORDINALITY \
         AS t(account_id, name, email, metadata, at, request_id, trace_id, slot)), \
     c AS (INSERT INTO customers (id, account_id, name, email, metadata, version, created_at, \
           updated_at) OVERRIDING SYSTEM VALUE \
           SELECT id, account_id, name, email, metadata::jsonb, 1, at, at FROM input \
           RETURNING *), \
     j AS (SELECT c.*, input.request_id AS rid, input.trace_id AS tid, input.slot \
           FROM c JOIN input USING (id)), \
     e AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
           aggregate_version, payload, request_id, trace_id, created_at) \
           SELECT account_id, 'customer.created', 'customer', id, version, ",
    customer_json!(),
    ", rid, tid, created_at FROM j) \
     SELECT slot, ",
    customer_cols!(),
    " FROM j"
);

// Rows whose customer is not in the create's account are filtered out before an id is drawn,
// so they insert nothing and their create is answered `UnknownCustomer`.
const ORDERS: &str = concat!(
    "WITH input AS MATERIALIZED (\
       SELECT nextval(pg_get_serial_sequence('orders', 'id')) AS id, t.* \
       FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], \
                   $6::text[], $7::bigint[], $8::text[], $9::text[]) WITH ORDINALITY \
         AS t(account_id, customer_id, amount_minor, currency, description, metadata, at, \
              request_id, trace_id, slot) \
       WHERE EXISTS (SELECT 1 FROM customers k \
                     WHERE k.account_id = t.account_id AND k.id = t.customer_id)), \
     o AS (INSERT INTO orders (id, account_id, customer_id, amount_minor, currency, status, \
           description, metadata, version, created_at, updated_at) OVERRIDING SYSTEM VALUE \
           SELECT id, account_id, customer_id, amount_minor, currency, 'pending', description, \
           metadata::jsonb, 1, at, at FROM input \
           RETURNING *), \
     j AS (SELECT o.*, input.request_id AS rid, input.trace_id AS tid, input.slot \
           FROM o JOIN input USING (id)), \
     e AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
           aggregate_version, payload, request_id, trace_id, created_at) \
           SELECT account_id, 'order.created', 'order', id, version, ",
    order_json!(),
    ", rid, tid, created_at FROM j) \
     SELECT slot, ",
    order_cols!(),
    " FROM j"
);

pub struct PgCreates {
    pub pool: PgPool,
}

#[async_trait]
impl GroupWriter for PgCreates {
    type Row = PgRow;

    async fn write(
        &self,
        batch: &[(WriteMeta, Create)],
    ) -> Result<Vec<Written<PgRow>>, StorageError> {
        if batch.iter().any(|(_, c)| c.keyed().is_some()) {
            // Keyed creates run their own transaction on PostgreSQL (create_order_idempotent).
            return Err(StorageError::Internal(
                "keyed creates are not batched here".into(),
            ));
        }
        let accounts: Vec<i64> = batch.iter().map(|(m, _)| m.account_id).collect();
        let at: Vec<i64> = batch.iter().map(|(m, _)| m.at.0).collect();
        let request_ids: Vec<&str> = batch.iter().map(|(m, _)| m.request_id.as_str()).collect();
        let trace_ids: Vec<&str> = batch.iter().map(|(m, _)| m.trace_id.as_str()).collect();
        let rows = match batch.first().map(|(_, w)| w) {
            None => return Ok(Vec::new()),
            Some(Create::Customer { .. }) => {
                let (mut names, mut emails, mut metadata) = (vec![], vec![], vec![]);
                for (_, w) in batch {
                    if let Create::Customer {
                        name,
                        email,
                        metadata_json,
                    } = w
                    {
                        names.push(name.as_deref());
                        emails.push(email.as_deref());
                        metadata.push(metadata_json.as_str());
                    }
                }
                sqlx::query(CUSTOMERS)
                    .bind(&accounts)
                    .bind(&names)
                    .bind(&emails)
                    .bind(&metadata)
                    .bind(&at)
                    .bind(&request_ids)
                    .bind(&trace_ids)
                    .fetch_all(&self.pool)
                    .await
            }
            Some(Create::Order { .. }) => {
                let (mut customers, mut amounts, mut currencies) = (vec![], vec![], vec![]);
                let (mut descriptions, mut metadata) = (vec![], vec![]);
                for (_, w) in batch {
                    if let Create::Order {
                        customer_id,
                        amount_minor,
                        currency,
                        description,
                        metadata_json,
                        keyed: None,
                    } = w
                    {
                        customers.push(*customer_id);
                        amounts.push(*amount_minor);
                        currencies.push(*currency);
                        descriptions.push(description.as_deref());
                        metadata.push(metadata_json.as_str());
                    }
                }
                sqlx::query(ORDERS)
                    .bind(&accounts)
                    .bind(&customers)
                    .bind(&amounts)
                    .bind(&currencies)
                    .bind(&descriptions)
                    .bind(&metadata)
                    .bind(&at)
                    .bind(&request_ids)
                    .bind(&trace_ids)
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(err)?;
        // The collector never mixes kinds; a mixed batch would leave the others unanswered
        // with `missing`, which is still a safe (retryable-looking) outcome.
        let mut by_slot: Vec<Option<PgRow>> = (0..batch.len()).map(|_| None).collect();
        for row in rows {
            let slot = row
                .try_get::<i64, _>("slot")
                .ok()
                .and_then(|s| usize::try_from(s - 1).ok());
            if let Some(place) = slot.and_then(|s| by_slot.get_mut(s)) {
                *place = Some(row);
            }
        }
        Ok(by_slot
            .into_iter()
            .map(|row| row.map_or(Written::Missing, Written::Row))
            .collect())
    }
}
