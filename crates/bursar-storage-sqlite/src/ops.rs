//! SQLite's side of phased work (`bursar_storage::operations`). Every statement that writes
//! under a lease names the fencing token in its `WHERE`, so a replaced driver changes
//! nothing; takeovers are single conditional `UPDATE`s, so two drivers cannot both win.
//! Single-statement writes run in autocommit on the writer connection.

use async_trait::async_trait;
use bursar_domain::Timestamp;
use bursar_storage::operations::{FINISHED, FirstPhase, Prefetch};
use bursar_storage::{
    Begun, IdempotencyClaim, Lease, LeasedOperation, OperationStore, Result, StorageError,
    StoredResponse, WriteMeta, decode,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use bursar_storage::operations::fenced_unless_one;

use crate::steps::StepWrite;
use crate::{SqliteStore, err};

pub(crate) fn leased(r: &SqliteRow) -> Result<LeasedOperation> {
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
impl OperationStore for SqliteStore {
    /// Group-committed with other claims (`steps`).
    async fn begin_operation(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        request: &[u8],
        lease_until: Timestamp,
        prefetch: Option<Prefetch>,
        first: Option<FirstPhase>,
    ) -> Result<Begun> {
        let write = StepWrite::Begin {
            claim: claim.clone(),
            request: request.into(),
            lease_until,
            prefetch,
            first,
        };
        self.step(meta, write).await?.begun()
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
            "UPDATE idempotency_keys SET recovery_point = ?, phase_state = ?, \
             locked_until = ?, last_run_at = ? \
             WHERE id = ? AND fence = ? AND recovery_point = ?",
        )
        .bind(to)
        .bind(state)
        .bind(lease_until.0)
        .bind(now.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(from)
        .execute(&mut *self.writer.lock().await?)
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
            "UPDATE idempotency_keys SET recovery_point = ?, phase_state = ?, \
             response_status = ?, response_headers = ?, response_body = ?, \
             locked_until = NULL, last_run_at = ?, expires_at = ? \
             WHERE id = ? AND fence = ? AND recovery_point <> ?",
        )
        .bind(FINISHED)
        .bind(state)
        .bind(i64::from(response.status))
        .bind(decode::headers_json(&response.headers))
        .bind(&response.body)
        .bind(now.0)
        .bind(expires_at.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(FINISHED)
        .execute(&mut *self.writer.lock().await?)
        .await
        .map_err(err)?;
        fenced_unless_one(done.rows_affected())
    }

    async fn release_operation(&self, lease: Lease, now: Timestamp) -> Result<()> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET locked_until = ?, last_run_at = ? \
             WHERE id = ? AND fence = ? AND recovery_point <> ?",
        )
        .bind(now.0)
        .bind(now.0)
        .bind(lease.record_id)
        .bind(lease.fence)
        .bind(FINISHED)
        .execute(&mut *self.writer.lock().await?)
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
        // `BEGIN IMMEDIATE` makes the pick and the takeover one step for every writer. The
        // literal 'finished' lets SQLite use the partial index of unfinished records.
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(concat!(
            "UPDATE idempotency_keys SET fence = fence + 1, locked_until = ?, \
             last_run_at = ?, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM idempotency_keys \
                          WHERE recovery_point <> 'finished' AND locked_until <= ? \
                          AND last_run_at <= ? ORDER BY last_run_at LIMIT ?) \
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
