//! Group commit for the claims of new phased work (`OperationStore::begin_operation`), as
//! payments' records have it (`recording`, ADR 0009).
//!
//! A claim on its own is a transaction of six round trips: the key's insert, the prefetched
//! order's read, the order's claim and the step to the first recovery point (ADR 0007), with
//! `BEGIN` and `COMMIT`. Claims waiting together share one transaction of five: every key
//! inserted by one `unnest` statement, every prefetched order read by one (and every
//! prefetched payment, a capture's or a cancel's, by one more), the first steps decided in
//! Rust between them (the service's pure `FirstPhase`), and every order claimed and step
//! written by one.
//!
//! Only the common case is batched: new work whose key is free. Anything else — a key already
//! taken (a retry, a takeover, an expired record to clear), a key twice in one batch — is
//! answered `None` and the caller claims it alone (`ops`), as before; nothing of it was
//! written here.
//!
//! Per claim, the outcome is what the lone path gives: an order the first step may not claim
//! (not pending, being paid by other work, gone, or claimed by another claim of the same
//! batch) leaves the work at `started`, and its phase answers the refusal. The orders are
//! locked in (account, id) order before they are claimed, so two batches claiming the same
//! orders wait for each other instead of deadlocking.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use bursar_domain::Timestamp;
use bursar_storage::group_commit::{Batchable, GroupWriter};
use bursar_storage::money::Payment;
use bursar_storage::money::StepEnd;
use bursar_storage::operations::{FirstPhase, FirstStep, Prefetch, Prefetched, STARTED};
use bursar_storage::{IdempotencyClaim, LeasedOperation, Order, StorageError, WriteMeta};
use sqlx::Row;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use crate::{OrderRow, err};

/// Most claims one transaction carries.
pub const MAX_BATCH: usize = 64;

/// Most bytes of bound data one statement carries (see `recording::STATEMENT_BYTES`).
pub const STATEMENT_BYTES: usize = 256 * 1024;

/// One claim of new work, as `begin_operation` was asked for it.
#[derive(Clone)]
pub(crate) struct Claim {
    pub claim: IdempotencyClaim,
    pub request: Vec<u8>,
    pub lease_until: Timestamp,
    /// What to read with the claim, if anything.
    pub prefetch: Option<Prefetch>,
    pub first: Option<FirstPhase>,
}

impl Batchable for Claim {
    /// One transaction shape for every claim.
    fn same_kind(&self, _other: &Claim) -> bool {
        true
    }

    fn bound_bytes(&self) -> usize {
        const PER_ELEMENT: usize = 8;
        // The first step's state, written in the third statement.
        const STATE: usize = 256;
        10 * PER_ELEMENT
            + self.claim.key.len()
            + self.claim.method.len()
            + self.claim.route.len()
            + self.claim.fingerprint.len()
            + self.request.len()
            + 2 * 40
            + STATE
    }
}

/// The claims' group-commit writer.
pub(crate) struct PgClaims {
    pub pool: PgPool,
}

/// Inserts every key of the batch that is free, as new work at `$11` leased until its own
/// time; returns the claimed records with their keys (a taken key returns nothing).
const INSERT_KEYS: &str = concat!(
    "INSERT INTO idempotency_keys (account_id, idem_key, method, route, fingerprint, \
     response_status, response_headers, response_body, created_at, expires_at, \
     recovery_point, phase_state, fence, locked_until, last_run_at, attempts, request_body, \
     request_id, trace_id) \
     SELECT t.account_id, t.idem_key, t.method, t.route, t.fingerprint, 0, '[]', ''::bytea, \
       t.at, $12, $11, '{}', 1, t.lease_until, t.at, 1, t.request_body, t.request_id, \
       t.trace_id \
     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], \
       $7::bigint[], $8::bytea[], $9::text[], $10::text[]) \
       AS t(account_id, idem_key, method, route, fingerprint, at, lease_until, request_body, \
            request_id, trace_id) \
     ON CONFLICT ON CONSTRAINT idempotency_keys_account_key DO NOTHING \
     RETURNING idem_key, ",
    leased_cols!()
);

/// The orders named by the pairs (`$1` account, `$2` id).
const READ_ORDERS: &str = concat!(
    "SELECT ",
    order_cols!(),
    " FROM orders WHERE (account_id, id) IN \
      (SELECT * FROM unnest($1::bigint[], $2::bigint[]))"
);

/// Claims each order for its work and writes the work's step, the step only where the claim
/// took; returns the records stepped. The orders are locked first, sorted, and read whole
/// (`count(*)`), so the claims wait in one order.
const CLAIM_ORDERS: &str = "WITH i AS (\
       SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::text[], $6::text[], $7::text[], $8::bigint[], $9::bigint[]) \
       AS t(rid, account_id, order_id, fence, from_point, to_point, state, lease_until, at)), \
     locked AS (SELECT o.id FROM orders o JOIN i ON o.account_id = i.account_id \
       AND o.id = i.order_id ORDER BY o.account_id, o.id FOR NO KEY UPDATE OF o), \
     claimed AS (UPDATE orders o SET payment_operation_id = i.rid FROM i \
       WHERE o.account_id = i.account_id AND o.id = i.order_id AND o.status = 'pending' \
         AND (o.payment_operation_id IS NULL OR o.payment_operation_id = i.rid) \
         AND (SELECT count(*) FROM locked) >= 0 \
       RETURNING i.rid), \
     stepped AS (UPDATE idempotency_keys k SET recovery_point = i.to_point, \
         phase_state = i.state, locked_until = i.lease_until, last_run_at = i.at \
       FROM i JOIN claimed USING (rid) \
       WHERE k.id = i.rid AND k.fence = i.fence AND k.recovery_point = i.from_point \
       RETURNING k.id) \
     SELECT id FROM stepped";

#[async_trait]
impl GroupWriter for PgClaims {
    type Item = Claim;
    /// The work, leased (and advanced by its first step where that took); `None`: not
    /// claimed here, claim it alone.
    type Out = Option<LeasedOperation>;
    const NAME: &'static str = "claims";

    async fn write(
        &self,
        batch: &[(WriteMeta, Claim)],
    ) -> Result<Vec<Option<LeasedOperation>>, StorageError> {
        let mut out: Vec<Option<LeasedOperation>> = batch.iter().map(|_| None).collect();
        // A key twice in the batch is claimed once here; the other goes alone and finds it.
        let mut seen = HashSet::new();
        let sent: Vec<usize> = (0..batch.len())
            .filter(|&i| {
                let (meta, c) = &batch[i];
                seen.insert((meta.account_id, c.claim.key.as_str()))
            })
            .collect();
        let mut tx = self.pool.begin().await.map_err(err)?;
        let col = |f: &dyn Fn(&(WriteMeta, Claim)) -> i64| -> Vec<i64> {
            sent.iter().map(|&i| f(&batch[i])).collect()
        };
        let text = |f: &dyn Fn(&(WriteMeta, Claim)) -> &str| -> Vec<&str> {
            sent.iter().map(|&i| f(&batch[i])).collect()
        };
        let rows = sqlx::query(INSERT_KEYS)
            .bind(col(&|(m, _)| m.account_id))
            .bind(text(&|(_, c)| &c.claim.key))
            .bind(text(&|(_, c)| &c.claim.method))
            .bind(text(&|(_, c)| &c.claim.route))
            .bind(text(&|(_, c)| &c.claim.fingerprint))
            .bind(col(&|(m, _)| m.at.0))
            .bind(col(&|(_, c)| c.lease_until.0))
            .bind(
                sent.iter()
                    .map(|&i| batch[i].1.request.as_slice())
                    .collect::<Vec<&[u8]>>(),
            )
            .bind(text(&|(m, _)| &m.request_id))
            .bind(text(&|(m, _)| &m.trace_id))
            .bind(STARTED)
            .bind(i64::MAX)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        let place: HashMap<(i64, &str), usize> = sent
            .iter()
            .map(|&i| ((batch[i].0.account_id, batch[i].1.claim.key.as_str()), i))
            .collect();
        let mut claimed: Vec<(usize, LeasedOperation)> = Vec::with_capacity(rows.len());
        for row in &rows {
            let key: String = row.try_get("idem_key").map_err(err)?;
            let op = crate::ops::leased(row)?;
            if let Some(&i) = place.get(&(op.account_id, key.as_str())) {
                claimed.push((i, op));
            }
        }
        // What the first phases read, as it stands now that the keys are held; then the first
        // steps, decided from the work as claimed.
        let (orders, payments) = read_prefetched(&mut tx, batch, &claimed).await?;
        let mut steps: Vec<Option<FirstStep>> = Vec::with_capacity(claimed.len());
        for (i, op) in &mut claimed {
            let key = |id| (op.account_id, id);
            op.prefetched = batch[*i].1.prefetch.map(|wanted| {
                Box::new(match wanted {
                    Prefetch::Order(id) => Prefetched::Order(id, orders.get(&key(id)).cloned()),
                    Prefetch::Payment(id) => {
                        Prefetched::Payment(id, payments.get(&key(id)).cloned())
                    }
                })
            });
            steps.push(batch[*i].1.first.as_ref().and_then(|decide| decide(op)));
        }
        let decided = claimed.iter().zip(&steps);
        let decided = decided.filter_map(|((_, op), step)| Some((op.account_id, step.as_ref()?)));
        let took = claim_orders(&mut tx, decided).await?;
        tx.commit().await.map_err(err)?;
        for ((i, mut op), step) in claimed.into_iter().zip(steps) {
            if let Some(step) = step
                && took.contains(&op.lease.record_id)
            {
                op.advanced_by(&step);
            }
            out[i] = Some(op);
        }
        Ok(out)
    }

    fn took(out: &Option<LeasedOperation>) -> bool {
        out.is_some()
    }
}

/// The orders and payments the claimed work asked to read with its claim, by (account, id).
async fn read_prefetched(
    tx: &mut Transaction<'static, Postgres>,
    batch: &[(WriteMeta, Claim)],
    claimed: &[(usize, LeasedOperation)],
) -> Result<(HashMap<(i64, i64), Order>, HashMap<(i64, i64), Payment>), StorageError> {
    let wanted = |kind: fn(Prefetch) -> Option<i64>| -> Vec<(i64, i64)> {
        claimed
            .iter()
            .filter_map(|(i, op)| Some((op.account_id, kind(batch[*i].1.prefetch?)?)))
            .collect()
    };
    let (wanted_orders, wanted_payments) = (wanted(order_of), wanted(payment_of));
    let mut orders = HashMap::new();
    if !wanted_orders.is_empty() {
        let found: Vec<OrderRow> = sqlx::query_as(READ_ORDERS)
            .bind(wanted_orders.iter().map(|w| w.0).collect::<Vec<_>>())
            .bind(wanted_orders.iter().map(|w| w.1).collect::<Vec<_>>())
            .fetch_all(&mut **tx)
            .await
            .map_err(err)?;
        for row in found {
            let order = row.into_record()?;
            orders.insert((order.account_id, order.id), order);
        }
    }
    let mut payments = HashMap::new();
    if !wanted_payments.is_empty() {
        for p in crate::money::payments_by_ids(tx, &wanted_payments).await? {
            payments.insert((p.account_id, p.id), p);
        }
    }
    Ok((orders, payments))
}

/// Claims each step's order in its account and writes the step where the claim took
/// ([`CLAIM_ORDERS`]); returns the records stepped.
async fn claim_orders<'s>(
    tx: &mut Transaction<'static, Postgres>,
    steps: impl Iterator<Item = (i64, &'s FirstStep)>,
) -> Result<HashSet<i64>, StorageError> {
    let mut c = StepColumns::default();
    for (account, FirstStep::ClaimOrder { step, order_id }) in steps {
        let StepEnd::Advance { to, lease_until } = &step.end else {
            return Err(StorageError::Internal(
                "a first step advances its work".into(),
            ));
        };
        c.records.push(step.lease.record_id);
        c.accounts.push(account);
        c.orders.push(*order_id);
        c.fences.push(step.lease.fence);
        c.froms.push(step.from.as_str());
        c.tos.push(to.as_str());
        c.states.push(step.state.as_str());
        c.leases.push(lease_until.0);
        c.at.push(step.now.0);
    }
    if c.records.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = sqlx::query(CLAIM_ORDERS)
        .bind(&c.records)
        .bind(&c.accounts)
        .bind(&c.orders)
        .bind(&c.fences)
        .bind(&c.froms)
        .bind(&c.tos)
        .bind(&c.states)
        .bind(&c.leases)
        .bind(&c.at)
        .fetch_all(&mut **tx)
        .await
        .map_err(err)?;
    rows.iter()
        .map(|row| row.try_get::<i64, _>("id").map_err(err))
        .collect()
}

/// The first steps' arrays of [`CLAIM_ORDERS`], one element per step.
#[derive(Default)]
struct StepColumns<'a> {
    records: Vec<i64>,
    accounts: Vec<i64>,
    orders: Vec<i64>,
    fences: Vec<i64>,
    froms: Vec<&'a str>,
    tos: Vec<&'a str>,
    states: Vec<&'a str>,
    leases: Vec<i64>,
    at: Vec<i64>,
}

/// The order a prefetch names, if it names one.
fn order_of(prefetch: Prefetch) -> Option<i64> {
    match prefetch {
        Prefetch::Order(id) => Some(id),
        Prefetch::Payment(_) => None,
    }
}

/// The payment a prefetch names, if it names one.
fn payment_of(prefetch: Prefetch) -> Option<i64> {
    match prefetch {
        Prefetch::Payment(id) => Some(id),
        Prefetch::Order(_) => None,
    }
}
