//! PostgreSQL's side of group commit (`bursar_storage::group_commit`).
//!
//! A batch is one statement: the creates arrive as arrays, `unnest` turns them into rows, ids
//! are drawn from the table's identity sequence up front so each inserted row (and its outbox
//! event) can be matched back to the create that asked for it, and the whole statement is one
//! implicit transaction. Static SQL, so it is prepared once whatever the batch size.

use async_trait::async_trait;
use bursar_storage::group_commit::{Create, GroupWriter, Written};
use bursar_storage::{StorageError, WriteMeta, decode};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{FromRow, Row};

use crate::{OrderRow, err};

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

// Claims every key (a key already claimed returns no claim row), inserts an order for each
// claimed create whose customer is the account's, appends their events, and reports per slot
// the claim and the order (both may be NULL).
const KEYED_ORDERS: &str = concat!(
    "WITH input AS MATERIALIZED (\
       SELECT t.* FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], \
                              $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[], \
                              $10::text[], $11::text[], $12::text[], $13::text[], \
                              $14::bigint[]) WITH ORDINALITY \
         AS t(account_id, customer_id, amount_minor, currency, description, metadata, at, \
              request_id, trace_id, idem_key, method, route, fingerprint, expires_at, slot)), \
     claims AS (INSERT INTO idempotency_keys (account_id, idem_key, method, route, \
           fingerprint, response_status, response_headers, response_body, created_at, \
           expires_at) \
           SELECT account_id, idem_key, method, route, fingerprint, 0, '[]'::jsonb, \
           ''::bytea, at, expires_at FROM input \
           ON CONFLICT ON CONSTRAINT idempotency_keys_account_key DO NOTHING \
           RETURNING id AS key_id, account_id, idem_key), \
     claimed AS MATERIALIZED (\
       SELECT input.*, claims.key_id, nextval(pg_get_serial_sequence('orders', 'id')) AS id \
       FROM input JOIN claims USING (account_id, idem_key) \
       WHERE EXISTS (SELECT 1 FROM customers k \
                     WHERE k.account_id = input.account_id AND k.id = input.customer_id)), \
     o AS (INSERT INTO orders (id, account_id, customer_id, amount_minor, currency, status, \
           description, metadata, version, created_at, updated_at, idempotency_key_id) \
           OVERRIDING SYSTEM VALUE \
           SELECT id, account_id, customer_id, amount_minor, currency, 'pending', description, \
           metadata::jsonb, 1, at, at, key_id FROM claimed \
           RETURNING *), \
     j AS (SELECT o.*, claimed.request_id AS rid, claimed.trace_id AS tid, claimed.slot \
           FROM o JOIN claimed USING (id)), \
     e AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
           aggregate_version, payload, request_id, trace_id, created_at) \
           SELECT account_id, 'order.created', 'order', id, version, ",
    order_json!(),
    ", rid, tid, created_at FROM j) \
     SELECT input.slot, c.key_id, jo.* FROM input \
     LEFT JOIN claims c USING (account_id, idem_key) \
     LEFT JOIN (SELECT slot AS order_slot, ",
    order_cols!(),
    " FROM j) jo ON jo.order_slot = input.slot"
);

const STORE_RESPONSES: &str = "UPDATE idempotency_keys k SET response_status = t.status, \
    response_headers = t.headers::jsonb, response_body = t.body \
    FROM unnest($1::bigint[], $2::int[], $3::text[], $4::bytea[]) AS t(id, status, headers, body) \
    WHERE k.id = t.id";

impl PgCreates {
    /// Keyed creates in one transaction: claim, insert and append events in one statement;
    /// render each response (the service's callback); store them all; commit. A key that
    /// appears twice in a batch, or has a record already (live, or expired and awaiting its
    /// sweep), comes back as `Written::Conflict` and is answered outside the batch, where an
    /// expired record is cleared first.
    async fn write_keyed(
        &self,
        batch: &[(WriteMeta, Create)],
    ) -> Result<Vec<Written<PgRow>>, StorageError> {
        let mut seen = std::collections::HashSet::new();
        let mut included = Vec::new();
        let mut outcomes: Vec<Option<Written<PgRow>>> = Vec::with_capacity(batch.len());
        for (i, (meta, create)) in batch.iter().enumerate() {
            let fresh = create
                .keyed()
                .is_some_and(|k| seen.insert((meta.account_id, k.claim.key.clone())));
            if fresh {
                included.push(i);
                outcomes.push(None);
            } else {
                outcomes.push(Some(Written::Conflict));
            }
        }
        let mut cols = KeyedColumns::default();
        for &i in &included {
            cols.push(&batch[i].0, &batch[i].1);
        }
        let mut tx = self.pool.begin().await.map_err(err)?;
        let rows = sqlx::query(KEYED_ORDERS)
            .bind(&cols.accounts)
            .bind(&cols.customers)
            .bind(&cols.amounts)
            .bind(&cols.currencies)
            .bind(&cols.descriptions)
            .bind(&cols.metadata)
            .bind(&cols.at)
            .bind(&cols.request_ids)
            .bind(&cols.trace_ids)
            .bind(&cols.keys)
            .bind(&cols.methods)
            .bind(&cols.routes)
            .bind(&cols.fingerprints)
            .bind(&cols.expires)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        let (mut ids, mut statuses, mut headers, mut bodies) = (vec![], vec![], vec![], vec![]);
        for row in rows {
            let slot: i64 = row.try_get("slot").map_err(err)?;
            let Some(&i) = usize::try_from(slot - 1).ok().and_then(|s| included.get(s)) else {
                continue;
            };
            let Some(key_id) = row.try_get::<Option<i64>, _>("key_id").map_err(err)? else {
                outcomes[i] = Some(Written::Conflict);
                continue;
            };
            let order = match row.try_get::<Option<i64>, _>("id").map_err(err)? {
                Some(_) => OrderRow::from_row(&row)
                    .map_err(err)
                    .and_then(OrderRow::into_record),
                None => Err(StorageError::UnknownCustomer),
            };
            let Some(keyed) = batch[i].1.keyed() else {
                continue;
            };
            let Some(response) = (keyed.respond)(order.as_ref()) else {
                return Err(order.err().unwrap_or_else(|| {
                    StorageError::Internal("no response rendered for a created order".into())
                }));
            };
            ids.push(key_id);
            statuses.push(i32::from(response.status));
            headers.push(decode::headers_json(&response.headers));
            bodies.push(response.body.clone());
            outcomes[i] = Some(Written::Stored(response));
        }
        sqlx::query(STORE_RESPONSES)
            .bind(&ids)
            .bind(&statuses)
            .bind(&headers)
            .bind(&bodies)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Written::Conflict))
            .collect())
    }
}

/// The arrays a keyed batch binds, one element per create.
#[derive(Default)]
struct KeyedColumns {
    accounts: Vec<i64>,
    customers: Vec<i64>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    descriptions: Vec<Option<String>>,
    metadata: Vec<String>,
    at: Vec<i64>,
    request_ids: Vec<String>,
    trace_ids: Vec<String>,
    keys: Vec<String>,
    methods: Vec<String>,
    routes: Vec<String>,
    fingerprints: Vec<String>,
    expires: Vec<i64>,
}

impl KeyedColumns {
    fn push(&mut self, meta: &WriteMeta, create: &Create) {
        let Create::Order {
            customer_id,
            amount_minor,
            currency,
            description,
            metadata_json,
            keyed: Some(keyed),
        } = create
        else {
            return;
        };
        self.accounts.push(meta.account_id);
        self.customers.push(*customer_id);
        self.amounts.push(*amount_minor);
        self.currencies.push((*currency).to_owned());
        self.descriptions.push(description.clone());
        self.metadata.push(metadata_json.clone());
        self.at.push(meta.at.0);
        self.request_ids.push(meta.request_id.clone());
        self.trace_ids.push(meta.trace_id.clone());
        self.keys.push(keyed.claim.key.clone());
        self.methods.push(keyed.claim.method.clone());
        self.routes.push(keyed.claim.route.clone());
        self.fingerprints.push(keyed.claim.fingerprint.clone());
        self.expires.push(keyed.claim.expires_at.0);
    }
}

#[async_trait]
impl GroupWriter for PgCreates {
    type Row = PgRow;

    async fn write(
        &self,
        batch: &[(WriteMeta, Create)],
    ) -> Result<Vec<Written<PgRow>>, StorageError> {
        // Batches are of one kind, so either every create is keyed or none is.
        if batch.first().is_some_and(|(_, c)| c.keyed().is_some()) {
            return self.write_keyed(batch).await;
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
                        keyed: _,
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
