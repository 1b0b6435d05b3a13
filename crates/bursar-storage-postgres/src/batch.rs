//! PostgreSQL's side of group commit (`bursar_storage::group_commit`).
//!
//! A batch is one statement: the creates arrive as arrays, `unnest` turns them into rows, ids
//! are drawn from the table's identity sequence up front so each inserted row (and its outbox
//! event) can be matched back to the create that asked for it, and the whole statement is one
//! implicit transaction. Static SQL, so it is prepared once whatever the batch size.

use async_trait::async_trait;
use bursar_storage::group_commit::{Create, GroupWriter, Written};
use bursar_storage::{StorageError, StoredResponse, WriteMeta, decode};
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

// Claims the key of every create whose customer is the account's, with its 201 already in
// place (a key already claimed returns no claim row), inserts the claimed orders and appends
// their events; reports per slot whether the claim took. The ids were drawn and the 201s
// rendered before the statement, so the whole keyed batch is this one statement: one round
// trip, one implicit transaction. A create for a foreign customer claims nothing here; it is
// answered on the lone path, which stores the refusal (rare, so it may be slow).
const KEYED_ORDERS: &str = concat!(
    "WITH input AS MATERIALIZED (\
       SELECT t.* FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], \
                              $5::text[], $6::text[], $7::bigint[], $8::text[], $9::text[], \
                              $10::text[], $11::text[], $12::text[], $13::text[], \
                              $14::bigint[], $15::bigint[], $16::int[], $17::text[], \
                              $18::bytea[]) WITH ORDINALITY \
         AS t(account_id, customer_id, amount_minor, currency, description, metadata, at, \
              request_id, trace_id, idem_key, method, route, fingerprint, expires_at, id, \
              status, headers, body, slot) \
       WHERE EXISTS (SELECT 1 FROM customers k \
                     WHERE k.account_id = t.account_id AND k.id = t.customer_id)), \
     claims AS (INSERT INTO idempotency_keys (account_id, idem_key, method, route, \
           fingerprint, response_status, response_headers, response_body, created_at, \
           expires_at, resource_id) \
           SELECT account_id, idem_key, method, route, fingerprint, status, headers, \
           body, at, expires_at, id FROM input \
           ON CONFLICT ON CONSTRAINT idempotency_keys_account_key DO NOTHING \
           RETURNING id AS key_id, account_id, idem_key), \
     claimed AS MATERIALIZED (\
       SELECT input.*, claims.key_id FROM input JOIN claims USING (account_id, idem_key)), \
     o AS (INSERT INTO orders (id, account_id, customer_id, amount_minor, currency, status, \
           description, metadata, version, created_at, updated_at) \
           OVERRIDING SYSTEM VALUE \
           SELECT id, account_id, customer_id, amount_minor, currency, 'pending', description, \
           metadata::jsonb, 1, at, at FROM claimed \
           RETURNING *), \
     j AS (SELECT o.*, claimed.request_id AS rid, claimed.trace_id AS tid \
           FROM o JOIN claimed USING (id)), \
     e AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
           aggregate_version, payload, request_id, trace_id, created_at) \
           SELECT account_id, 'order.created', 'order', id, version, ",
    order_json!(),
    ", rid, tid, created_at FROM j) \
     SELECT slot FROM claimed"
);

/// Ids for `$1` orders from the table's identity sequence.
const ORDER_IDS: &str =
    "SELECT nextval(pg_get_serial_sequence('orders', 'id')) FROM generate_series(1, $1)";
/// Ids for `$1` payments from the table's identity sequence.
const PAYMENT_IDS: &str =
    "SELECT nextval(pg_get_serial_sequence('payments', 'id')) FROM generate_series(1, $1)";

/// Ids of one table drawn ahead of the writes that need them (their responses are rendered
/// before the write: keyed creates, and a payment's record written in one statement).
/// Drawing per write would cost a round trip — and, every 32 values, a WAL flush for the
/// sequence — per write; drawing ahead amortises both. One draw runs at a time: writers that
/// find the pool empty together wait for it instead of each drawing a full pool, which
/// replaced the others' (measured: 11.6 ids drawn per payment at 32 clients, 0.1 s a second of
/// PostgreSQL's time). Ids held longer than [`DrawnIds::MAX_AGE`] are dropped (a gap in the
/// sequence, which ids never promised to lack), so an id is never more than that out of step
/// with creation order. The draw size adapts: it doubles while every drawn id is used in
/// time and halves when some expire, so light traffic draws one id at a time and leaves no
/// gaps.
pub struct DrawnIds {
    state: std::sync::Mutex<IdState>,
    /// Held while drawing, so draws do not overlap.
    drawing: tokio::sync::Mutex<()>,
    /// `ORDER_IDS` or `PAYMENT_IDS`.
    draw: &'static str,
}

#[derive(Default)]
struct IdState {
    ids: std::collections::VecDeque<i64>,
    drawn_at: Option<std::time::Instant>,
    size: usize,
}

impl DrawnIds {
    const MAX_AGE: std::time::Duration = std::time::Duration::from_millis(500);
    const MAX_DRAW: usize = 256;

    pub fn orders() -> DrawnIds {
        DrawnIds::new(ORDER_IDS)
    }

    pub fn payments() -> DrawnIds {
        DrawnIds::new(PAYMENT_IDS)
    }

    fn new(draw: &'static str) -> DrawnIds {
        DrawnIds {
            state: std::sync::Mutex::default(),
            drawing: tokio::sync::Mutex::new(()),
            draw,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `n` ids from the pool if it holds that many fresh ones; otherwise `Err` with how many
    /// to draw (stale ids are dropped here).
    fn pooled(&self, n: usize) -> std::result::Result<Vec<i64>, usize> {
        let mut st = self.lock();
        let stale = st.drawn_at.is_some_and(|t| t.elapsed() > Self::MAX_AGE);
        if stale {
            if !st.ids.is_empty() {
                st.size /= 2;
            }
            st.ids.clear();
        }
        if st.ids.len() >= n {
            return Ok(st.ids.drain(..n).collect());
        }
        // Everything drawn was used in time: draw more next time.
        if !stale && st.drawn_at.is_some() {
            st.size = (st.size * 2).min(Self::MAX_DRAW);
        }
        Err(st.size.max(n))
    }

    /// `n` fresh ids, in increasing order.
    pub async fn take(&self, pool: &PgPool, n: usize) -> Result<Vec<i64>, StorageError> {
        if let Ok(ids) = self.pooled(n) {
            return Ok(ids);
        }
        let _one = self.drawing.lock().await;
        // The draw this one waited for may have filled the pool.
        let draw = match self.pooled(n) {
            Ok(ids) => return Ok(ids),
            Err(draw) => draw,
        };
        let mut fresh: Vec<i64> = sqlx::query_scalar(self.draw)
            .bind(i64::try_from(draw).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await
            .map_err(err)?;
        fresh.sort_unstable();
        let rest = fresh.split_off(n.min(fresh.len()));
        let mut st = self.lock();
        st.ids.clear();
        st.ids.extend(rest);
        st.drawn_at = Some(std::time::Instant::now());
        st.size = st.size.max(1);
        Ok(fresh)
    }
}

pub struct PgCreates {
    pub pool: PgPool,
    pub ids: DrawnIds,
}

impl PgCreates {
    /// Keyed creates in one statement: draw the ids, render each create's possible
    /// responses (the service's callback), then claim, insert, append events and store the
    /// responses at once. A key that appears twice in a batch, or has a record already (live,
    /// or expired and awaiting its sweep), comes back as `Written::Conflict` and is answered
    /// outside the batch, where an expired record is cleared first.
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
        if included.is_empty() {
            return Ok(finish(outcomes));
        }
        let ids = self.ids.take(&self.pool, included.len()).await?;
        // Each sent create's 201, rendered from the record it will insert. A create whose
        // service stores no 201 cannot go in the statement; like a taken key, it is answered
        // on the lone path.
        let mut sent = Vec::with_capacity(included.len());
        for (&i, &id) in included.iter().zip(&ids) {
            let (meta, create) = &batch[i];
            let Some(keyed) = create.keyed() else {
                return Err(StorageError::Internal(
                    "unkeyed create in a keyed batch".into(),
                ));
            };
            let order = create.order_record(meta, id)?;
            let Some(created) = (keyed.respond)(Ok(&order)) else {
                outcomes[i] = Some(Written::Conflict);
                continue;
            };
            let headers = decode::headers_json(&created.headers);
            sent.push(Rendered {
                at: i,
                id,
                created,
                headers,
            });
        }
        let sizes: Vec<usize> = sent.iter().map(|r| r.wire_bytes(&batch[r.at])).collect();
        for (n, part) in by_bytes(&sizes).into_iter().enumerate() {
            let chunk = &sent[part];
            let mut cols = KeyedColumns::default();
            for r in chunk {
                let (meta, create) = &batch[r.at];
                cols.push(meta, create, r);
            }
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
                .bind(&cols.ids)
                .bind(&cols.statuses)
                .bind(&cols.headers)
                .bind(&cols.bodies)
                .fetch_all(&self.pool)
                .await
                .map_err(err);
            let rows = match rows {
                Ok(rows) => rows,
                // Nothing is committed yet: the collector retries the creates one by one.
                Err(e) if n == 0 => return Err(e),
                // Earlier statements committed: the rest go down the lone path, which claims
                // afresh (this statement rolled back) or replays what did commit.
                Err(_) => break,
            };
            // Every returned slot claimed its key and inserted its order; the rest found the
            // key taken or the customer foreign, and go down the lone path.
            for row in rows {
                let slot: i64 = row.try_get("slot").map_err(err)?;
                if let Some(r) = usize::try_from(slot - 1).ok().and_then(|s| chunk.get(s)) {
                    outcomes[r.at] = Some(Written::Stored(r.created.clone()));
                }
            }
        }
        Ok(finish(outcomes))
    }
}

/// Unanswered creates are sent down the lone path, which always finds the truth.
fn finish(outcomes: Vec<Option<Written<PgRow>>>) -> Vec<Written<PgRow>> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Written::Conflict))
        .collect()
}

/// A keyed create with its id and its 201, ready to bind.
struct Rendered {
    /// Its index in the batch.
    at: usize,
    id: i64,
    created: StoredResponse,
    /// `created.headers` as the JSON text stored, serialised once for sizing and binding.
    headers: String,
}

impl Rendered {
    /// What this create adds to the statement's Bind message: a 4-byte length and the data
    /// of each of its 18 array elements.
    fn wire_bytes(&self, (meta, create): &(WriteMeta, Create)) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let (description, metadata) = match create {
            Create::Order {
                description,
                metadata_json,
                ..
            } => (text(description), metadata_json.len()),
            Create::Customer { .. } => (0, 0),
        };
        let claim = create.keyed().map_or(0, |k| {
            k.claim.key.len()
                + k.claim.method.len()
                + k.claim.route.len()
                + k.claim.fingerprint.len()
        });
        let r = &self.created;
        let headers = self.headers.len();
        18 * 4
            + 6 * 8
            + 4
            + 3
            + description
            + metadata
            + meta.request_id.len()
            + meta.trace_id.len()
            + claim
            + headers
            + r.body.len()
    }
}

/// Most bytes of bound data one statement carries. sqlx 0.9.0 leaves Nagle's algorithm on
/// (upstream issue transact-rs/sqlx#4335), and over TLS a message larger than one TLS record
/// (16 KiB) goes out as several writes, the last of which waits for the server's delayed ACK:
/// a 40 ms stall per statement. Batches are cut below one record instead: the collector
/// bounds them by [`Create::bound_bytes`] (an estimate), and the keyed writer, which knows
/// the size once the responses are rendered, splits what exceeds [`STATEMENT_BYTES_HARD`].
pub const STATEMENT_BYTES: usize = 13 * 1024;

/// The writer's bound on the data of one keyed statement, counted exactly
/// ([`Rendered::wire_bytes`]): with the message's own overhead (array headers, format codes,
/// Execute, Sync: under 1 KiB) it stays inside one 16 KiB TLS record.
const STATEMENT_BYTES_HARD: usize = 15 * 1024;

/// Consecutive ranges of `sizes` whose sums stay within [`STATEMENT_BYTES_HARD`] (a single
/// oversized element gets a range of its own).
fn by_bytes(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes + size > STATEMENT_BYTES_HARD {
            parts.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        parts.push(start..sizes.len());
    }
    parts
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
    ids: Vec<i64>,
    statuses: Vec<i32>,
    headers: Vec<String>,
    bodies: Vec<Vec<u8>>,
}

impl KeyedColumns {
    fn push(&mut self, meta: &WriteMeta, create: &Create, rendered: &Rendered) {
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
        self.ids.push(rendered.id);
        self.statuses.push(i32::from(rendered.created.status));
        self.headers.push(rendered.headers.clone());
        self.bodies.push(rendered.created.body.clone());
    }
}

#[async_trait]
impl GroupWriter for PgCreates {
    type Item = Create;
    type Out = Written<PgRow>;
    const NAME: &'static str = "creates";

    fn settle(create: &Create, out: Written<PgRow>) -> Result<Written<PgRow>, StorageError> {
        create.settle(out)
    }

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

    fn took(out: &Written<PgRow>) -> bool {
        out.took()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takers that find the pool empty together share one draw, instead of each drawing a
    /// full pool that replaces the others'.
    #[tokio::test]
    async fn takers_of_an_empty_pool_share_one_draw() {
        let Some(url) = bursar_storage::conformance::postgres_test_url() else {
            return;
        };
        let opts = crate::PostgresOptions {
            max_connections: 8,
            schema: Some(format!("t_{}", uuid::Uuid::new_v4().simple())),
            ..Default::default()
        };
        let store = crate::PostgresStore::open(&url, &opts).await.unwrap();
        let ids = std::sync::Arc::new(DrawnIds::payments());
        // As after a busy stretch: draws have grown to the largest and the pool is empty.
        {
            let mut st = ids.lock();
            st.size = DrawnIds::MAX_DRAW;
            st.drawn_at = Some(std::time::Instant::now());
        }
        let mut takers = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (ids, pool) = (ids.clone(), store.pool.clone());
            takers.spawn(async move { ids.take(&pool, 1).await.unwrap()[0] });
        }
        let mut got: Vec<i64> = takers.join_all().await;
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 32, "every taker has an id of its own");
        let next: i64 =
            sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('payments', 'id'))")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(
            next,
            DrawnIds::MAX_DRAW as i64 + 1,
            "one draw served all 32"
        );
    }

    #[test]
    fn statements_are_cut_below_the_byte_bound() {
        let hard = STATEMENT_BYTES_HARD;
        assert_eq!(by_bytes(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(by_bytes(&[10, 20, 30]).len(), 1);
        assert_eq!(by_bytes(&[hard / 2, hard / 2, 1]), [0..2, 2..3]);
        // An element too big for any statement still gets one of its own.
        assert_eq!(by_bytes(&[1, hard * 2, 1]), [0..1, 1..2, 2..3]);
        let sizes = vec![1000; 40];
        let parts = by_bytes(&sizes);
        assert!(parts.iter().all(|p| p.len() * 1000 <= hard));
        assert_eq!(parts.iter().map(ExactSizeIterator::len).sum::<usize>(), 40);
    }
}
