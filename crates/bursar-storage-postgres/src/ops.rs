//! PostgreSQL's side of phased work (`bursar_storage::operations`). Every statement that writes
//! under a lease names the fencing token in its `WHERE`, so a replaced driver changes
//! nothing; takeovers are single conditional `UPDATE`s, so two drivers cannot both win.
//! Single-statement writes run in autocommit. New work with a free key is claimed with the
//! claims waiting (`claiming`); what that leaves, here.

use async_trait::async_trait;
use bursar_domain::Timestamp;
use bursar_storage::operations::{FINISHED, FirstPhase, FirstStep, Prefetch, Prefetched, STARTED};
use bursar_storage::{
    Begun, IdempotencyClaim, Lease, LeasedOperation, OperationStore, Result, StorageError,
    StoredResponse, WriteMeta, decode,
};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use bursar_storage::operations::fenced_unless_one;

use crate::claiming::Claim;
use crate::{PostgresStore, clear_expired_key, err, find_key};

/// A claimed record as the lease it gives, from a row of `leased_cols!()`.
pub(crate) fn leased(r: &PgRow) -> Result<LeasedOperation> {
    let get = || -> Result<LeasedOperation, sqlx::Error> {
        Ok(LeasedOperation {
            lease: Lease {
                record_id: r.try_get("id")?,
                fence: r.try_get("fence")?,
            },
            account_id: r.try_get("account_id")?,
            method: r.try_get("method")?,
            route: r.try_get("route")?,
            recovery_point: r.try_get("recovery_point")?,
            state: r
                .try_get::<Option<String>, _>("phase_state")?
                .unwrap_or_else(|| "{}".into()),
            request: r
                .try_get::<Option<Vec<u8>>, _>("request_body")?
                .unwrap_or_default(),
            request_id: r
                .try_get::<Option<String>, _>("request_id")?
                .unwrap_or_default(),
            trace_id: r
                .try_get::<Option<String>, _>("trace_id")?
                .unwrap_or_default(),
            attempts: r.try_get("attempts")?,
            prefetched: None,
        })
    };
    get().map_err(err)
}

#[async_trait]
impl OperationStore for PostgresStore {
    async fn begin_operation(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        request: &[u8],
        lease_until: Timestamp,
        prefetch: Option<Prefetch>,
        first: Option<FirstPhase>,
    ) -> Result<Begun> {
        // New work with a free key goes with the claims waiting (`claiming`); the rest, and
        // a claim it could not take, here.
        let batched = Claim {
            claim: claim.clone(),
            request: request.to_vec(),
            lease_until,
            prefetch,
            first: first.clone(),
        };
        if let Some(op) = self.claims.submit(meta.clone(), batched).await? {
            return Ok(Begun::Leased(op));
        }
        let mut tx = self.write_tx().await?;
        let mut fresh = claim_key(&mut tx, meta, claim, request, lease_until).await?;
        // Only a finished record expires (an unfinished one's expiry is the largest integer).
        // An expired record counts as absent: it goes, and the key is claimed anew.
        if fresh.is_none() && clear_expired_key(&mut tx, meta, &claim.key).await? {
            fresh = claim_key(&mut tx, meta, claim, request, lease_until).await?;
        }
        // Not new: take the work over if it is this request's and its lease has lapsed.
        let row = match fresh {
            Some(row) => Some(row),
            None => sqlx::query(concat!(
                "UPDATE idempotency_keys SET fence = fence + 1, locked_until = $1, \
                 last_run_at = $2, attempts = attempts + 1 \
                 WHERE account_id = $3 AND idem_key = $4 AND fingerprint = $5 \
                 AND recovery_point <> $6 AND locked_until <= $7 RETURNING ",
                leased_cols!()
            ))
            .bind(lease_until.0)
            .bind(meta.at.0)
            .bind(meta.account_id)
            .bind(&claim.key)
            .bind(&claim.fingerprint)
            .bind(FINISHED)
            .bind(meta.at.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?,
        };
        let mut op = match row {
            Some(row) => leased(&row)?,
            None => {
                let existing = find_key(&mut *tx, meta.account_id, &claim.key)
                    .await?
                    .ok_or_else(|| StorageError::Internal("claimed key vanished".into()))?;
                tx.commit().await.map_err(err)?;
                return Ok(Begun::Existing(existing));
            }
        };
        // What the first phase reads, and its first step when the service can decide it from
        // that, go in the claim's transaction (ADR 0007): one commit instead of three. A step
        // the order refuses writes nothing, and the work stays where the claim left it.
        if let Some(wanted) = prefetch {
            op.prefetched = Some(Box::new(match wanted {
                Prefetch::Order(id) => {
                    Prefetched::Order(id, crate::order_by_id(&mut *tx, op.account_id, id).await?)
                }
                Prefetch::Payment(id) => Prefetched::Payment(
                    id,
                    match crate::money::payment_in(&mut tx, op.account_id, id).await {
                        Ok(p) => Some(p),
                        Err(StorageError::NotFound) => None,
                        Err(e) => return Err(e),
                    },
                ),
            }));
        }
        if let Some(step) = first.and_then(|decide| decide(&op)) {
            let FirstStep::ClaimOrder { step: s, order_id } = &step;
            match crate::money::claim_order_in(&mut tx, meta, s, *order_id).await {
                Ok(()) => op.advanced_by(&step),
                Err(StorageError::Rule(_) | StorageError::NotFound | StorageError::Fenced) => {}
                Err(e) => return Err(e),
            }
        }
        tx.commit().await.map_err(err)?;
        Ok(Begun::Leased(op))
    }

    async fn advance_operation(
        &self,
        lease: Lease,
        from: &str,
        to: &str,
        state: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<()> {
        if to == FINISHED {
            return Err(StorageError::Internal(
                "an operation finishes with finish_operation".into(),
            ));
        }
        let done = sqlx::query(
            "UPDATE idempotency_keys SET recovery_point = $1, phase_state = $2, \
             locked_until = $3, last_run_at = $4 \
             WHERE id = $5 AND fence = $6 AND recovery_point = $7",
        )
        .bind(to)
        .bind(state)
        .bind(lease_until.0)
        .bind(now.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        fenced_unless_one(done.rows_affected())
    }

    async fn finish_operation(
        &self,
        lease: Lease,
        state: &str,
        response: &StoredResponse,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET recovery_point = $1, phase_state = $2, \
             response_status = $3, response_headers = $4, response_body = $5, \
             locked_until = NULL, last_run_at = $6, expires_at = $7 \
             WHERE id = $8 AND fence = $9 AND recovery_point <> $10",
        )
        .bind(FINISHED)
        .bind(state)
        .bind(i32::from(response.status))
        .bind(decode::headers_json(&response.headers))
        .bind(&response.body)
        .bind(now.0)
        .bind(expires_at.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(FINISHED)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        fenced_unless_one(done.rows_affected())
    }

    async fn release_operation(&self, lease: Lease, now: Timestamp) -> Result<()> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET locked_until = $1, last_run_at = $2 \
             WHERE id = $3 AND fence = $4 AND recovery_point <> $5",
        )
        .bind(now.0)
        .bind(now.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(FINISHED)
        .execute(&self.pool)
        .await
        .map_err(err)?;
        fenced_unless_one(done.rows_affected())
    }

    async fn claim_abandoned(
        &self,
        now: Timestamp,
        idle_since: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<LeasedOperation>> {
        // `SKIP LOCKED`: two completers pick disjoint records and never wait on each other.
        // The literal 'finished' matches the partial index of unfinished records.
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(concat!(
            "UPDATE idempotency_keys SET fence = fence + 1, locked_until = $1, \
             last_run_at = $2, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM idempotency_keys \
                          WHERE recovery_point <> 'finished' AND locked_until <= $3 \
                          AND last_run_at <= $4 ORDER BY last_run_at LIMIT $5 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            leased_cols!()
        ))
        .bind(lease_until.0)
        .bind(now.0)
        .bind(now.0)
        .bind(idle_since.0)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        rows.iter().map(leased).collect()
    }
}

/// Inserts `claim`'s record as new work leased until `lease_until`; `None` if the key has a
/// record already (live or expired).
async fn claim_key(
    tx: &mut Transaction<'static, Postgres>,
    meta: &WriteMeta,
    claim: &IdempotencyClaim,
    request: &[u8],
    lease_until: Timestamp,
) -> Result<Option<PgRow>> {
    sqlx::query(concat!(
        "INSERT INTO idempotency_keys (account_id, idem_key, method, route, fingerprint, \
         response_status, response_headers, response_body, created_at, expires_at, \
         recovery_point, phase_state, fence, locked_until, last_run_at, attempts, \
         request_body, request_id, trace_id) \
         VALUES ($1, $2, $3, $4, $5, 0, '[]', ''::bytea, $6, $7, $8, '{}', 1, $9, $10, 1, \
         $11, $12, $13) \
         ON CONFLICT ON CONSTRAINT idempotency_keys_account_key DO NOTHING RETURNING ",
        leased_cols!()
    ))
    .bind(meta.account_id)
    .bind(&claim.key)
    .bind(&claim.method)
    .bind(&claim.route)
    .bind(&claim.fingerprint)
    .bind(meta.at.0)
    .bind(i64::MAX)
    .bind(STARTED)
    .bind(lease_until.0)
    .bind(meta.at.0)
    .bind(request)
    .bind(&meta.request_id)
    .bind(&meta.trace_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)
}
