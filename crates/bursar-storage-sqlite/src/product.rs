//! Key management, plans, quotas and usage on SQLite (`bursar_storage::product`).

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};
use bursar_storage::{
    ApiKeyInfo, NewApiKey, Page, PageRequest, ProductStore, QuotaCharge, QuotaOutcome, Result,
    StorageError, UsageRow, decode,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::{SqliteStore, err};

const KEY_COLS: &str = "id, name, mode, start, last4, scopes, created_at, last_used_at, \
                        expires_at, revoked_at, rotated_from";

fn key_info(r: &SqliteRow) -> Result<ApiKeyInfo> {
    let ts = |c: &str| r.get::<Option<i64>, _>(c).map(Timestamp);
    Ok(ApiKeyInfo {
        id: r.get("id"),
        name: r.get("name"),
        mode: decode::key_mode(r.get("mode"))?,
        start: r.get("start"),
        last4: r.get("last4"),
        scopes: decode::scopes(r.get::<Option<&str>, _>("scopes"))?,
        created_at: Timestamp(r.get("created_at")),
        last_used_at: ts("last_used_at"),
        expires_at: ts("expires_at"),
        revoked_at: ts("revoked_at"),
        rotated_from: r.get("rotated_from"),
    })
}

#[async_trait]
impl ProductStore for SqliteStore {
    async fn list_api_keys(
        &self,
        account: AccountId,
        page: PageRequest,
    ) -> Result<Page<ApiKeyInfo>> {
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE account_id = ? AND id < ? \
             ORDER BY id DESC LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account)
            .bind(page.starting_after.unwrap_or(i64::MAX))
            .bind(page.fetch_limit())
            .fetch_all(&self.readers)
            .await
            .map_err(err)?;
        let items = rows.iter().map(key_info).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_lookahead(items, page))
    }

    async fn get_api_key(&self, account: AccountId, id: i64) -> Result<Option<ApiKeyInfo>> {
        let sql = format!("SELECT {KEY_COLS} FROM api_keys WHERE account_id = ? AND id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account)
            .bind(id)
            .fetch_optional(&self.readers)
            .await
            .map_err(err)?;
        row.as_ref().map(key_info).transpose()
    }

    async fn roll_api_key(
        &self,
        account: AccountId,
        id: i64,
        new: NewApiKey,
        old_expires_at: Timestamp,
        at: Timestamp,
    ) -> Result<ApiKeyInfo> {
        let mut tx = self.writer.begin().await?;
        // The old key must be live; its successor copies what it was allowed to do.
        let old = sqlx::query(
            "SELECT mode, name, scopes, expires_at, COALESCE(limit_id, id) AS limit_id \
             FROM api_keys WHERE account_id = ? AND id = ? AND revoked_at IS NULL \
               AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(account)
        .bind(id)
        .bind(at.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?
        .ok_or(StorageError::NotFound)?;
        if old.get::<&str, _>("mode") != new.mode.as_str() {
            return Err(StorageError::Conflict);
        }
        sqlx::query(
            "UPDATE api_keys SET expires_at = MIN(COALESCE(expires_at, ?1), ?1) WHERE id = ?2",
        )
        .bind(old_expires_at.0)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        let sql = format!(
            "INSERT INTO api_keys (account_id, mode, key_hash, start, last4, created_at, name, \
             scopes, expires_at, rotated_from, limit_id) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {KEY_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(account)
            .bind(new.mode.as_str())
            .bind(&new.key_hash)
            .bind(&new.start)
            .bind(&new.last4)
            .bind(at.0)
            .bind(old.get::<&str, _>("name"))
            .bind(old.get::<Option<&str>, _>("scopes"))
            .bind(old.get::<Option<i64>, _>("expires_at"))
            .bind(id)
            .bind(old.get::<i64, _>("limit_id"))
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        key_info(&row)
    }

    async fn revoke_api_key(
        &self,
        account: AccountId,
        id: i64,
        at: Timestamp,
    ) -> Result<ApiKeyInfo> {
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) \
             WHERE account_id = ? AND id = ? RETURNING {KEY_COLS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(at.0)
            .bind(account)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(err)?
            .ok_or(StorageError::NotFound)?;
        tx.commit().await.map_err(err)?;
        key_info(&row)
    }

    async fn set_account_plan(&self, account: AccountId, plan: Option<&str>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("UPDATE accounts SET plan = ? WHERE id = ?")
            .bind(plan)
            .bind(account)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        if done.rows_affected() == 0 {
            return Err(StorageError::NotFound);
        }
        tx.commit().await.map_err(err)
    }

    async fn charge_quota(&self, c: &QuotaCharge) -> Result<QuotaOutcome> {
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &c.idempotency_key {
            let fresh = sqlx::query(
                "INSERT INTO quota_charges (account_id, period_start, idempotency_key) \
                 VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(c.account_id)
            .bind(c.period_start.0)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(err)?
            .rows_affected()
                == 1;
            if !fresh {
                let used = used_in(&mut tx, c.account_id, c.period_start).await?;
                return Ok(QuotaOutcome::AlreadyCharged { used });
            }
        }
        let charged: Option<i64> = sqlx::query_scalar(
            "INSERT INTO quota_usage (account_id, period_start, used) \
             SELECT ?1, ?2, ?3 WHERE ?3 <= ?4 \
             ON CONFLICT (account_id, period_start) DO UPDATE SET used = used + excluded.used \
             WHERE used + excluded.used <= ?4 RETURNING used",
        )
        .bind(c.account_id)
        .bind(c.period_start.0)
        .bind(c.cost)
        .bind(c.limit)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        match charged {
            Some(used) => {
                tx.commit().await.map_err(err)?;
                Ok(QuotaOutcome::Charged { used })
            }
            None => {
                let used = used_in(&mut tx, c.account_id, c.period_start).await?;
                tx.rollback().await.map_err(err)?;
                Ok(QuotaOutcome::Exhausted { used })
            }
        }
    }

    async fn refund_quota(&self, c: &QuotaCharge) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &c.idempotency_key {
            sqlx::query(
                "DELETE FROM quota_charges \
                 WHERE account_id = ? AND period_start = ? AND idempotency_key = ?",
            )
            .bind(c.account_id)
            .bind(c.period_start.0)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        sqlx::query(
            "UPDATE quota_usage SET used = MAX(used - ?, 0) \
             WHERE account_id = ? AND period_start = ?",
        )
        .bind(c.cost)
        .bind(c.account_id)
        .bind(c.period_start.0)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)
    }

    async fn quota_used(&self, account: AccountId, period_start: Timestamp) -> Result<i64> {
        let mut conn = self.readers.acquire().await.map_err(err)?;
        used_in(&mut conn, account, period_start).await
    }

    async fn add_usage(&self, rows: &[UsageRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO usage_daily (account_id, day, key_id, route_class, requests) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, day, key_id, route_class) \
                 DO UPDATE SET requests = requests + excluded.requests",
            )
            .bind(r.account_id)
            .bind(r.day.0)
            .bind(r.key_id)
            .bind(&r.route_class)
            .bind(r.requests)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
            sqlx::query(
                "UPDATE api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) \
                 WHERE id = ? AND account_id = ?",
            )
            .bind(r.last_at.0)
            .bind(r.key_id)
            .bind(r.account_id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    async fn usage(
        &self,
        account: AccountId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT day, key_id, route_class, requests FROM usage_daily \
             WHERE account_id = ? AND day >= ? AND day < ? \
             ORDER BY day, key_id, route_class",
        )
        .bind(account)
        .bind(from.0)
        .bind(to.0)
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| UsageRow {
                account_id: account,
                key_id: r.get("key_id"),
                route_class: r.get("route_class"),
                day: Timestamp(r.get("day")),
                requests: r.get("requests"),
                // Not kept per row (it moved the key's `last_used_at`).
                last_at: Timestamp(r.get("day")),
            })
            .collect())
    }
}

async fn used_in(
    conn: &mut sqlx::SqliteConnection,
    account: AccountId,
    period_start: Timestamp,
) -> Result<i64> {
    let used: Option<i64> = sqlx::query_scalar(
        "SELECT used FROM quota_usage WHERE account_id = ? AND period_start = ?",
    )
    .bind(account)
    .bind(period_start.0)
    .fetch_optional(conn)
    .await
    .map_err(err)?;
    Ok(used.unwrap_or(0))
}
