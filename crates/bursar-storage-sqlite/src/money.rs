//! SQLite's side of payments, refunds, the ledger and conversions (`bursar_storage::money`).
//! Every command runs in one `BEGIN IMMEDIATE` transaction on the writer, so its checks and
//! writes see no interleaving writer; the step's fenced `UPDATE` is its last statement.

use async_trait::async_trait;
use bursar_domain::ledger::{Entry, Posting};
use bursar_domain::{AccountId, Currency, Timestamp};
use bursar_storage::money::*;
use bursar_storage::operations::fenced_unless_one;
use bursar_storage::{
    NewEvent, Page, PageRequest, Result, StorageError, StoredResponse, WriteMeta, decode,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::steps::{Gate, Reference, Sql, StepWrite, entries_sql, step_sql};
use crate::writer::WriteTx;
use crate::{SqliteStore, append_event, err};

type Tx = WriteTx;

const REFUNDED: (&str, &str) = ("paid", "refunded");

macro_rules! refund_cols {
    () => {
        "id, account_id, payment_id, amount_minor, currency, status, \
    processor_id, failure_code, created_at, updated_at"
    };
}
macro_rules! quote_cols {
    () => {
        "id, account_id, from_currency, from_minor, to_currency, to_minor, \
    market_rate, rate, spread_bps, created_at, expires_at, used_at"
    };
}
macro_rules! conversion_cols {
    () => {
        "id, account_id, quote_id, from_currency, from_minor, to_currency, to_minor, rate, created_at"
    };
}

/// One row of `$table` of `$account` where `$column` = `$value`, decoded by `$decode`:
/// the single-row lookups, each scoped to its account.
macro_rules! row_by {
    ($pool:expr, $cols:ident, $table:literal, $column:literal, $account:expr, $value:expr,
     $decode:ident) => {{
        let row = sqlx::query(concat!(
            "SELECT ",
            $cols!(),
            " FROM ",
            $table,
            " WHERE account_id = ? AND ",
            $column,
            " = ?"
        ))
        .bind($account)
        .bind($value)
        .fetch_optional($pool)
        .await
        .map_err(err)?;
        row.as_ref().map($decode).transpose()
    }};
}

pub(crate) fn payment(r: &SqliteRow) -> Result<Payment> {
    Ok(Payment {
        id: r.get("id"),
        account_id: r.get("account_id"),
        order_id: r.get("order_id"),
        processor_id: r.get("processor_id"),
        payment_method: r.get("payment_method"),
        amount: decode::money(r.get("amount_minor"), r.get("currency"))?,
        status: decode::payment_status(r.get("status"))?,
        captured_minor: r.get("captured_minor"),
        refunded_minor: r.get("refunded_minor"),
        failure_code: r.get("failure_code"),
        failure_message: r.get("failure_message"),
        version: r.get("version"),
        created_at: Timestamp(r.get("created_at")),
        updated_at: Timestamp(r.get("updated_at")),
    })
}

fn refund(r: &SqliteRow) -> Result<Refund> {
    Ok(Refund {
        id: r.get("id"),
        account_id: r.get("account_id"),
        payment_id: r.get("payment_id"),
        amount: decode::money(r.get("amount_minor"), r.get("currency"))?,
        status: decode::refund_status(r.get("status"))?,
        processor_id: r.get("processor_id"),
        failure_code: r.get("failure_code"),
        created_at: Timestamp(r.get("created_at")),
        updated_at: Timestamp(r.get("updated_at")),
    })
}

fn quote(r: &SqliteRow) -> Result<Quote> {
    let spread: i64 = r.get("spread_bps");
    Ok(Quote {
        id: r.get("id"),
        account_id: r.get("account_id"),
        from: decode::money(r.get("from_minor"), r.get("from_currency"))?,
        to: decode::money(r.get("to_minor"), r.get("to_currency"))?,
        market_rate: r.get("market_rate"),
        rate: r.get("rate"),
        spread_bps: u32::try_from(spread)
            .map_err(|_| StorageError::Internal("stored spread out of range".into()))?,
        created_at: Timestamp(r.get("created_at")),
        expires_at: Timestamp(r.get("expires_at")),
        used_at: r.get::<Option<i64>, _>("used_at").map(Timestamp),
    })
}

fn conversion(r: &SqliteRow) -> Result<Conversion> {
    Ok(Conversion {
        id: r.get("id"),
        account_id: r.get("account_id"),
        quote_id: r.get("quote_id"),
        from: decode::money(r.get("from_minor"), r.get("from_currency"))?,
        to: decode::money(r.get("to_minor"), r.get("to_currency"))?,
        rate: r.get("rate"),
        created_at: Timestamp(r.get("created_at")),
    })
}

/// Commits the phased work's step as the transaction's last write: fenced on the lease's
/// token and on the recovery point, so a replaced driver's whole transaction rolls back.
async fn commit_step(
    tx: &mut Tx,
    step: &Step,
    response: Option<&StoredResponse>,
    resource_id: i64,
) -> Result<()> {
    let mut sql = Sql::default();
    step_sql(&mut sql, 0, step, response, resource_id)?;
    let done = sql.fetch_all(tx).await?;
    fenced_unless_one(done.len() as u64)
}

/// Writes `entry` and moves the balances it touches, in the caller's transaction, as one
/// call to the writer (`steps::entries_sql`). Statement hand-offs are what a transaction holds
/// SQLite's one writer for (`docs/PERFORMANCE.md`).
async fn post_entry(
    tx: &mut Tx,
    account: AccountId,
    entry: &Entry,
    (reference_type, id): (&'static str, i64),
    at: Timestamp,
) -> Result<()> {
    let mut sql = Sql::default();
    entries_sql(
        &mut sql,
        account,
        &[entry],
        (reference_type, Reference::Known(id)),
        at,
        &Gate::Always,
    );
    if !sql.is_empty() {
        sql.fetch_all(tx).await?;
    }
    Ok(())
}

/// Moves the payment's order from `from` to `to` (with its `order.<to>` event) when the
/// payment moved the order's whole amount, `settled_minor`: paid when captured in full,
/// refunded when refunded in full.
async fn follow_order(
    tx: &mut Tx,
    meta: &WriteMeta,
    order_id: i64,
    (from, to): (&str, &str),
    settled_minor: i64,
) -> Result<()> {
    let sql = concat!(
        "UPDATE orders SET status = ?, version = version + 1, updated_at = ? \
         WHERE account_id = ? AND id = ? AND status = ? AND amount_minor = ? RETURNING ",
        order_cols!()
    );
    let row: Option<crate::OrderRow> = sqlx::query_as(sql)
        .bind(to)
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(order_id)
        .bind(from)
        .bind(settled_minor)
        .fetch_optional(&mut **tx)
        .await
        .map_err(err)?;
    if let Some(row) = row {
        let o = row.into_record()?;
        append_event(tx, meta, NewEvent::for_order(o.status.as_str(), &o)).await?;
    }
    Ok(())
}

/// Releases the order's payment claim held by the work of `operation` (the payment failed
/// or was voided), so the order can be paid again.
async fn release_order(
    tx: &mut Tx,
    account: AccountId,
    order_id: i64,
    operation: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE orders SET payment_operation_id = NULL \
         WHERE account_id = ? AND id = ? AND payment_operation_id = ?",
    )
    .bind(account)
    .bind(order_id)
    .bind(operation)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(())
}

async fn payment_in(tx: &mut Tx, account: AccountId, id: i64) -> Result<Payment> {
    let found: Option<Payment> = row_by!(
        &mut **tx,
        payment_cols,
        "payments",
        "id",
        account,
        id,
        payment
    )?;
    found.ok_or(StorageError::NotFound)
}

/// Moves an authorized payment to `to` (with the captured amount) or says why it cannot.
async fn settle_authorization(
    tx: &mut Tx,
    meta: &WriteMeta,
    payment_id: i64,
    to: PaymentStatus,
    captured_minor: i64,
) -> Result<Payment> {
    let row = sqlx::query(concat!(
        "UPDATE payments SET status = ?, captured_minor = ?, version = version + 1, \
         updated_at = ? WHERE account_id = ? AND id = ? AND status = ? \
         AND ? BETWEEN 0 AND amount_minor RETURNING ",
        payment_cols!()
    ))
    .bind(to.as_str())
    .bind(captured_minor)
    .bind(meta.at.0)
    .bind(meta.account_id)
    .bind(payment_id)
    .bind(PaymentStatus::RequiresCapture.as_str())
    .bind(captured_minor)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)?;
    match row {
        Some(r) => payment(&r),
        None => {
            let current = payment_in(tx, meta.account_id, payment_id).await?;
            Err(StorageError::Rule(Rule::PaymentState(current.status)))
        }
    }
}

#[async_trait]
impl MoneyStore for SqliteStore {
    /// Group-committed with other steps (`steps`).
    async fn claim_order(&self, meta: &WriteMeta, step: &Step, order_id: i64) -> Result<()> {
        let step = step.clone();
        let write = StepWrite::ClaimOrder { step, order_id };
        self.step(meta, write).await?.claimed()
    }

    /// Group-committed with other payments (`steps`).
    async fn record_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        new: NewPayment,
        respond: Responder<Payment>,
    ) -> Result<Payment> {
        let step = step.clone();
        let write = StepWrite::RecordPayment { step, new, respond };
        self.step(meta, write).await?.recorded()
    }

    /// Group-committed with other captures (`steps`).
    async fn capture_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        read: &Payment,
        captured_minor: i64,
        respond: Responder<Payment>,
    ) -> Result<Payment> {
        let write = StepWrite::CapturePayment {
            step: step.clone(),
            payment_id: read.id,
            authorized: read.amount,
            captured_minor,
            respond,
        };
        self.step(meta, write).await?.recorded()
    }

    async fn void_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        payment_id: i64,
        respond: Respond<'_, Payment>,
    ) -> Result<Payment> {
        let mut tx = self.writer.begin().await?;
        let p = settle_authorization(&mut tx, meta, payment_id, PaymentStatus::Canceled, 0).await?;
        post_entry(
            &mut tx,
            meta.account_id,
            &Entry::void(p.amount),
            ("payment", p.id),
            meta.at,
        )
        .await?;
        append_event(&mut tx, meta, NewEvent::for_payment("canceled", &p)).await?;
        let operation: i64 = sqlx::query_scalar("SELECT operation_id FROM payments WHERE id = ?")
            .bind(p.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(err)?;
        release_order(&mut tx, meta.account_id, p.order_id, operation).await?;
        commit_step(&mut tx, step, Some(&respond(&p)), p.id).await?;
        tx.commit().await.map_err(err)?;
        Ok(p)
    }

    async fn get_payment(&self, account: AccountId, id: i64) -> Result<Option<Payment>> {
        row_by!(
            &self.readers,
            payment_cols,
            "payments",
            "id",
            account,
            id,
            payment
        )
    }

    async fn list_payments(
        &self,
        account: AccountId,
        filter: PaymentFilter,
    ) -> Result<Page<Payment>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            payment_cols!(),
            " FROM payments WHERE account_id = ? AND id < ? \
             AND (? IS NULL OR order_id = ?) ORDER BY id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(filter.page.before_id())
        .bind(filter.order_id)
        .bind(filter.order_id)
        .bind(filter.page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        let items = rows.iter().map(payment).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_lookahead(items, filter.page))
    }

    async fn reserve_refund(
        &self,
        meta: &WriteMeta,
        step: &Step,
        payment_id: i64,
        amount_minor: Option<i64>,
    ) -> Result<Refund> {
        let mut tx = self.writer.begin().await?;
        let p = payment_in(&mut tx, meta.account_id, payment_id).await?;
        if p.status != PaymentStatus::Succeeded {
            return Err(StorageError::Rule(Rule::PaymentState(p.status)));
        }
        let refundable = p.captured_minor - p.refunded_minor;
        let amount = amount_minor.unwrap_or(refundable);
        if amount <= 0 || amount > refundable {
            return Err(StorageError::Rule(Rule::RefundExceedsCaptured {
                refundable_minor: refundable,
            }));
        }
        // BEGIN IMMEDIATE already serialises writers; the guard keeps the rule in SQL too.
        let reserved = sqlx::query(
            "UPDATE payments SET refunded_minor = refunded_minor + ?, version = version + 1, \
             updated_at = ? WHERE id = ? AND refunded_minor + ? <= captured_minor",
        )
        .bind(amount)
        .bind(meta.at.0)
        .bind(p.id)
        .bind(amount)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        if reserved.rows_affected() != 1 {
            return Err(StorageError::Rule(Rule::RefundExceedsCaptured {
                refundable_minor: refundable,
            }));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO refunds (account_id, payment_id, operation_id, amount_minor, currency, \
             status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING ",
            refund_cols!()
        ))
        .bind(meta.account_id)
        .bind(p.id)
        .bind(step.lease.record_id)
        .bind(amount)
        .bind(p.amount.currency.code())
        .bind(RefundStatus::Pending.as_str())
        .bind(meta.at.0)
        .bind(meta.at.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let r = refund(&row)?;
        commit_step(&mut tx, step, None, r.id).await?;
        tx.commit().await.map_err(err)?;
        Ok(r)
    }

    async fn settle_refund(
        &self,
        meta: &WriteMeta,
        step: &Step,
        outcome: RefundOutcome,
        respond: Respond<'_, Refund>,
    ) -> Result<Refund> {
        let mut tx = self.writer.begin().await?;
        let (status, processor_id, code) = match &outcome {
            RefundOutcome::Succeeded { processor_id } => {
                (RefundStatus::Succeeded, Some(processor_id.as_str()), None)
            }
            RefundOutcome::Failed { code } => (RefundStatus::Failed, None, Some(code.as_str())),
        };
        let row = sqlx::query(concat!(
            "UPDATE refunds SET status = ?, processor_id = ?, failure_code = ?, updated_at = ? \
             WHERE account_id = ? AND operation_id = ? AND status = ? RETURNING ",
            refund_cols!()
        ))
        .bind(status.as_str())
        .bind(processor_id)
        .bind(code)
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(step.lease.record_id)
        .bind(RefundStatus::Pending.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let r = row
            .as_ref()
            .map(refund)
            .transpose()?
            .ok_or(StorageError::NotFound)?;
        match status {
            RefundStatus::Succeeded => {
                let entry = Entry::refund(r.amount);
                post_entry(&mut tx, meta.account_id, &entry, ("refund", r.id), meta.at).await?;
                append_event(&mut tx, meta, NewEvent::for_refund("created", &r)).await?;
                let p = payment_in(&mut tx, meta.account_id, r.payment_id).await?;
                let refunded: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(SUM(amount_minor), 0) FROM refunds \
                     WHERE payment_id = ? AND status = 'succeeded'",
                )
                .bind(p.id)
                .fetch_one(&mut *tx)
                .await
                .map_err(err)?;
                if refunded == p.captured_minor {
                    follow_order(&mut tx, meta, p.order_id, REFUNDED, refunded).await?;
                }
            }
            RefundStatus::Failed | RefundStatus::Pending => {
                sqlx::query(
                    "UPDATE payments SET refunded_minor = refunded_minor - ?, \
                     version = version + 1, updated_at = ? WHERE id = ?",
                )
                .bind(r.amount.minor)
                .bind(meta.at.0)
                .bind(r.payment_id)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
                append_event(&mut tx, meta, NewEvent::for_refund("failed", &r)).await?;
            }
        }
        commit_step(&mut tx, step, Some(&respond(&r)), r.id).await?;
        tx.commit().await.map_err(err)?;
        Ok(r)
    }

    async fn refund_for_operation(
        &self,
        account: AccountId,
        operation_id: i64,
    ) -> Result<Option<Refund>> {
        row_by!(
            &mut *self.writer.lock().await?,
            refund_cols,
            "refunds",
            "operation_id",
            account,
            operation_id,
            refund
        )
    }

    async fn get_refund(&self, account: AccountId, id: i64) -> Result<Option<Refund>> {
        row_by!(
            &self.readers,
            refund_cols,
            "refunds",
            "id",
            account,
            id,
            refund
        )
    }

    async fn list_refunds(
        &self,
        account: AccountId,
        payment_id: Option<i64>,
        page: PageRequest,
    ) -> Result<Page<Refund>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            refund_cols!(),
            " FROM refunds WHERE account_id = ? AND id < ? \
             AND (? IS NULL OR payment_id = ?) ORDER BY id DESC LIMIT ?"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(payment_id)
        .bind(payment_id)
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        let items = rows.iter().map(refund).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_lookahead(items, page))
    }

    async fn set_rates(&self, rates: &[(Currency, Currency, String)], at: Timestamp) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        for (base, quote, rate) in rates {
            sqlx::query(
                "INSERT INTO fx_rates (base_currency, quote_currency, rate, set_at) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (base_currency, quote_currency) DO UPDATE \
                 SET rate = excluded.rate, set_at = excluded.set_at",
            )
            .bind(base.code())
            .bind(quote.code())
            .bind(rate)
            .bind(at.0)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        }
        tx.commit().await.map_err(err)
    }

    async fn rates(&self) -> Result<Vec<FxRate>> {
        let rows = sqlx::query(
            "SELECT base_currency, quote_currency, rate, set_at FROM fx_rates \
             ORDER BY base_currency, quote_currency",
        )
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok(FxRate {
                    base: decode::currency(r.get("base_currency"))?,
                    quote: decode::currency(r.get("quote_currency"))?,
                    rate: r.get("rate"),
                    set_at: Timestamp(r.get("set_at")),
                })
            })
            .collect()
    }

    async fn record_quote(
        &self,
        meta: &WriteMeta,
        step: &Step,
        new: NewQuote,
        respond: Respond<'_, Quote>,
    ) -> Result<Quote> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO fx_quotes (account_id, from_currency, from_minor, to_currency, \
             to_minor, market_rate, rate, spread_bps, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING ",
            quote_cols!()
        ))
        .bind(meta.account_id)
        .bind(new.from.currency.code())
        .bind(new.from.minor)
        .bind(new.to.currency.code())
        .bind(new.to.minor)
        .bind(&new.market_rate)
        .bind(&new.rate)
        .bind(i64::from(new.spread_bps))
        .bind(meta.at.0)
        .bind(new.expires_at.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let q = quote(&row)?;
        commit_step(&mut tx, step, Some(&respond(&q)), q.id).await?;
        tx.commit().await.map_err(err)?;
        Ok(q)
    }

    async fn get_quote(&self, account: AccountId, id: i64) -> Result<Option<Quote>> {
        row_by!(
            &self.readers,
            quote_cols,
            "fx_quotes",
            "id",
            account,
            id,
            quote
        )
    }

    async fn convert(
        &self,
        meta: &WriteMeta,
        step: &Step,
        quote_id: i64,
        respond: Respond<'_, Conversion>,
    ) -> Result<Conversion> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            quote_cols!(),
            " FROM fx_quotes WHERE account_id = ? AND id = ?"
        ))
        .bind(meta.account_id)
        .bind(quote_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(err)?;
        let q = row
            .as_ref()
            .map(quote)
            .transpose()?
            .ok_or(StorageError::NotFound)?;
        if q.used_at.is_some() {
            return Err(StorageError::Rule(Rule::QuoteUsed));
        }
        if q.expires_at <= meta.at {
            return Err(StorageError::Rule(Rule::QuoteExpired));
        }
        let available: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT amount_minor FROM balances WHERE account_id = ? \
             AND currency = ? AND ledger_account = 'available'), 0)",
        )
        .bind(meta.account_id)
        .bind(q.from.currency.code())
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        if available < q.from.minor {
            return Err(StorageError::Rule(Rule::InsufficientFunds {
                available_minor: available,
            }));
        }
        sqlx::query("UPDATE fx_quotes SET used_at = ? WHERE id = ? AND used_at IS NULL")
            .bind(meta.at.0)
            .bind(q.id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let row = sqlx::query(concat!(
            "INSERT INTO conversions (account_id, quote_id, from_currency, from_minor, \
             to_currency, to_minor, rate, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             RETURNING ",
            conversion_cols!()
        ))
        .bind(meta.account_id)
        .bind(q.id)
        .bind(q.from.currency.code())
        .bind(q.from.minor)
        .bind(q.to.currency.code())
        .bind(q.to.minor)
        .bind(&q.rate)
        .bind(meta.at.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        let c = conversion(&row)?;
        let entry = Entry::conversion(c.from, c.to);
        post_entry(
            &mut tx,
            meta.account_id,
            &entry,
            ("conversion", c.id),
            meta.at,
        )
        .await?;
        append_event(&mut tx, meta, NewEvent::for_conversion(&c)).await?;
        commit_step(&mut tx, step, Some(&respond(&c)), c.id).await?;
        tx.commit().await.map_err(err)?;
        Ok(c)
    }

    async fn get_conversion(&self, account: AccountId, id: i64) -> Result<Option<Conversion>> {
        row_by!(
            &self.readers,
            conversion_cols,
            "conversions",
            "id",
            account,
            id,
            conversion
        )
    }

    async fn balances(&self, account: AccountId) -> Result<Vec<Balance>> {
        let rows = sqlx::query(
            "SELECT ledger_account, currency, amount_minor FROM balances WHERE account_id = ? \
             ORDER BY currency, ledger_account",
        )
        .bind(account)
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        rows.iter()
            .map(|r| {
                Ok(Balance {
                    ledger_account: decode::ledger_account(r.get("ledger_account"))?,
                    currency: decode::currency(r.get("currency"))?,
                    minor: r.get("amount_minor"),
                })
            })
            .collect()
    }

    async fn journal(&self, account: AccountId, page: PageRequest) -> Result<Page<JournalEntry>> {
        let rows = sqlx::query(
            "SELECT id, account_id, kind, reference_type, reference_id, created_at \
             FROM journal_entries WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.readers)
        .await
        .map_err(err)?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.get("id");
            let postings = sqlx::query(
                "SELECT ledger_account, currency, amount_minor FROM postings \
                 WHERE entry_id = ? ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.readers)
            .await
            .map_err(err)?
            .iter()
            .map(|p| {
                Ok(Posting {
                    ledger_account: decode::ledger_account(p.get("ledger_account"))?,
                    currency: decode::currency(p.get("currency"))?,
                    minor: p.get("amount_minor"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
            entries.push(JournalEntry {
                id,
                account_id: r.get("account_id"),
                kind: decode::entry_kind(r.get("kind"))?,
                reference_type: r.get("reference_type"),
                reference_id: r.get("reference_id"),
                postings,
                created_at: Timestamp(r.get("created_at")),
            });
        }
        Ok(Page::from_lookahead(entries, page))
    }
}
