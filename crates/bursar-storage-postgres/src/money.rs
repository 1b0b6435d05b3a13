//! PostgreSQL's side of payments, refunds, the ledger and conversions (`bursar_storage::money`).
//! Every command is one READ COMMITTED transaction whose step's fenced `UPDATE` is its last
//! statement, or whose last statement starts with it and gates every write on it (a
//! capture's; a payment's record is group-committed, `recording`).
//! No writer lock serialises commands as SQLite's `BEGIN IMMEDIATE` does, so each rule is
//! checked under the row lock of what it guards: a refund's reservation is one conditional
//! `UPDATE` of the payment, a conversion locks its quote and the balances it moves before
//! checking them.
//!
//! Lock order, the same in every command, so concurrent commands wait instead of
//! deadlocking: the payment, refund or quote first; then the balance rows, sorted by
//! (currency, ledger account) bytewise; then the order; the idempotency record last.
//! The exception, the statements that start with their step (`finishing_statement`, a
//! capture's after its settlement, and a batch of payments' records, `recording`), lock their
//! own idempotency records before the balances and the order: only the same work's claim and
//! takeovers touch such a row, and they lock it first too (then, at most, the order), so no
//! cycle can form through it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bursar_domain::ledger::{Entry, LedgerAccount, Posting};
use bursar_domain::{AccountId, Currency, OrderStatus, Timestamp};
use bursar_storage::money::*;
use bursar_storage::operations::{FINISHED, fenced_unless_one};
use bursar_storage::{
    NewEvent, Page, PageRequest, Result, StorageError, StoredResponse, WriteMeta, decode,
};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use crate::{PostgresStore, append_event, err};

type Tx = Transaction<'static, Postgres>;

const PAID: (&str, &str) = ("pending", "paid");
const REFUNDED: (&str, &str) = ("paid", "refunded");

macro_rules! payment_cols {
    () => {
        "id, account_id, order_id, processor_id, payment_method, \
    amount_minor, currency, status, captured_minor, refunded_minor, failure_code, \
    failure_message, version, created_at, updated_at"
    };
}
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
            " WHERE account_id = $1 AND ",
            $column,
            " = $2"
        ))
        .bind($account)
        .bind($value)
        .fetch_optional($pool)
        .await
        .map_err(err)?;
        row.as_ref().map($decode).transpose()
    }};
}

fn payment(r: &PgRow) -> Result<Payment> {
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

fn refund(r: &PgRow) -> Result<Refund> {
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

fn quote(r: &PgRow) -> Result<Quote> {
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

fn conversion(r: &PgRow) -> Result<Conversion> {
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

/// Claims the order for the work's payment and advances the work, in the caller's
/// transaction: the claim only if the order is payable and not another work's, the step only
/// after it. A refusal by the order's rules writes nothing, so the caller may go on and
/// commit what it wrote before (a key's claim carrying its first step, ADR 0007); a fenced
/// step leaves an order claim only this work's record can hold, and take again.
pub(crate) async fn claim_order_in(
    tx: &mut Tx,
    meta: &WriteMeta,
    step: &Step,
    order_id: i64,
) -> Result<()> {
    let claimed = sqlx::query(
        "UPDATE orders SET payment_operation_id = $1 WHERE account_id = $2 AND id = $3 \
         AND status = 'pending' AND (payment_operation_id IS NULL OR payment_operation_id = $4)",
    )
    .bind(step.lease.record_id)
    .bind(meta.account_id)
    .bind(order_id)
    .bind(step.lease.record_id)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    if claimed.rows_affected() != 1 {
        let row = sqlx::query("SELECT status FROM orders WHERE account_id = $1 AND id = $2")
            .bind(meta.account_id)
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(err)?;
        let Some(row) = row else {
            return Err(StorageError::NotFound);
        };
        let status = decode::status(row.get("status"))?;
        return Err(StorageError::Rule(if status == OrderStatus::Pending {
            Rule::OrderPaymentInProgress
        } else {
            Rule::OrderNotPayable(status)
        }));
    }
    commit_step(tx, step, None, order_id).await
}

/// Commits the phased work's step as the transaction's last write: fenced on the lease's
/// token and on the recovery point, so a replaced driver's whole transaction rolls back.
async fn commit_step(
    tx: &mut Tx,
    step: &Step,
    response: Option<&StoredResponse>,
    resource_id: i64,
) -> Result<()> {
    let done = match (&step.end, response) {
        (StepEnd::Advance { to, lease_until }, _) => sqlx::query(
            "UPDATE idempotency_keys SET recovery_point = $1, phase_state = $2, \
             locked_until = $3, last_run_at = $4 \
             WHERE id = $5 AND fence = $6 AND recovery_point = $7",
        )
        .bind(to)
        .bind(&step.state)
        .bind(lease_until.0)
        .bind(step.now.0),
        (StepEnd::Finish { expires_at }, Some(r)) => sqlx::query(
            "UPDATE idempotency_keys SET recovery_point = $1, phase_state = $2, \
             response_status = $3, response_headers = $4, response_body = $5, resource_id = $6, \
             locked_until = NULL, last_run_at = $7, expires_at = $8 \
             WHERE id = $9 AND fence = $10 AND recovery_point = $11",
        )
        .bind(FINISHED)
        .bind(&step.state)
        .bind(i32::from(r.status))
        .bind(decode::headers_json(&r.headers))
        .bind(&r.body)
        .bind(resource_id)
        .bind(step.now.0)
        .bind(expires_at.0),
        (StepEnd::Finish { .. }, None) => {
            return Err(StorageError::Internal(
                "a finishing step needs a response".into(),
            ));
        }
    }
    .bind(step.lease.record_id)
    .bind(step.lease.fence)
    .bind(&step.from)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    fenced_unless_one(done.rows_affected())
}

/// A balance row of the command's account: (currency code, ledger account).
type BalanceKey = (&'static str, &'static str);

/// What `entries` move, per balance row, in the one order every command locks balances in.
fn balance_moves(entries: &[Entry]) -> BTreeMap<BalanceKey, i64> {
    let mut moves = BTreeMap::new();
    for p in entries.iter().flat_map(Entry::postings) {
        *moves
            .entry((p.currency.code(), p.ledger_account.as_str()))
            .or_insert(0) += p.minor;
    }
    moves
}

/// Locks the shard-0 balance rows `entries` will move (creating missing ones at zero), in
/// the order `post_entries` moves them. Conversions post on shard 0 only, so the lock on
/// the source's shard-0 row serialises every conversion out of that currency; the caller
/// then sums all shards with a fresh statement, which sees every committed move.
async fn lock_balances(
    tx: &mut Tx,
    account: AccountId,
    entries: &[Entry],
    at: Timestamp,
) -> Result<()> {
    for (currency, ledger_account) in balance_moves(entries).into_keys() {
        sqlx::query(
            "INSERT INTO balances (account_id, ledger_account, currency, shard, amount_minor, \
             updated_at) VALUES ($1, $2, $3, 0, 0, $4) \
             ON CONFLICT (account_id, currency, ledger_account, shard) DO UPDATE SET \
             amount_minor = balances.amount_minor",
        )
        .bind(account)
        .bind(ledger_account)
        .bind(currency)
        .bind(at.0)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    }
    Ok(())
}

/// Balance rows per ledger account and currency: card movements spread over this many
/// rows (by the work's record id) so that concurrent payments of one account do not queue
/// on one row lock until each commits; a balance is the sum of its shards.
const BALANCE_SHARDS: i64 = 16;

/// The shard a money command of the work of idempotency record `operation` posts to.
fn shard_of(operation: i64) -> i16 {
    i16::try_from(operation.rem_euclid(BALANCE_SHARDS)).expect("below 16")
}

/// Writes `entries` (in order) and moves the balances they touch, in the caller's
/// transaction. The balances move once per row, sorted, whatever the entries' order. One
/// statement: each entry with its postings is a data-modifying `WITH` part, each entry
/// selected from the one before so their ids follow the entries' order, and the balance
/// upsert is the statement itself.
async fn post_entries(
    tx: &mut Tx,
    account: AccountId,
    entries: &[Entry],
    (reference, shard): ((&str, i64), i16),
    at: Timestamp,
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "WITH {} {}",
        entry_parts(entries.len(), FIRST_ENTRY_PARAM, None),
        balance_upsert(None)
    );
    // Only fixed fragments and parameter numbers go into the text; every value is bound.
    let q = sqlx::query(sqlx::AssertSqlSafe(sql));
    let q = bind_entries(q, account, entries, (reference, shard), at);
    bind_entry_rows(q, entries)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    Ok(())
}

/// The first of the entries' parameters in [`entry_parts`]: `$1` account, `$2` shard, `$3`
/// at, `$4` reference type, `$5` reference id and `$6`–`$8` the balance moves come before
/// them ([`bind_entries`]).
const FIRST_ENTRY_PARAM: usize = 9;

/// `e0 AS (…), p0 AS (…), …`: each of `n` entries with its postings as data-modifying `WITH`
/// parts, its kind and postings' three arrays from `$first` on, four parameters an entry.
/// After the first, an entry is inserted from the one before: PostgreSQL runs the parts of a
/// statement in no set order, and this makes ids follow the entries. The first is inserted
/// once per row of `gate` when given (none when the gate is empty).
fn entry_parts(n: usize, first: usize, gate: Option<&str>) -> String {
    let mut sql = String::new();
    for k in 0..n {
        let p = first + 4 * k;
        if k > 0 {
            sql.push_str(", ");
        }
        let from = match (k, gate) {
            (0, None) => String::new(),
            (0, Some(gate)) => format!(" FROM {gate}"),
            _ => format!(" FROM e{}", k - 1),
        };
        sql.push_str(&format!(
            "e{k} AS (INSERT INTO journal_entries (account_id, kind, reference_type, \
             reference_id, created_at) SELECT $1, ${p}, $4, $5, $3{from} RETURNING id), \
             p{k} AS (INSERT INTO postings (entry_id, account_id, ledger_account, currency, \
             amount_minor) SELECT e{k}.id, $1, p.l, p.c, p.m FROM e{k}, \
             unnest(${}::text[], ${}::text[], ${}::bigint[]) WITH ORDINALITY AS p (l, c, m, n) \
             ORDER BY p.n)",
            p + 1,
            p + 2,
            p + 3
        ));
    }
    sql
}

/// The balance upsert of the moves `$6`–`$8` on shard `$2`, locking the rows in the sorted
/// order of the moves; only if `gate` has a row, when given.
fn balance_upsert(gate: Option<&str>) -> String {
    let gated = gate.map_or(String::new(), |g| {
        format!(" WHERE EXISTS (SELECT 1 FROM {g})")
    });
    format!(
        "INSERT INTO balances (account_id, ledger_account, currency, shard, amount_minor, \
         updated_at) SELECT $1, m.l, m.c, $2, m.a, $3 \
         FROM unnest($6::text[], $7::text[], $8::bigint[]) WITH ORDINALITY AS m (c, l, a, n){gated} \
         ORDER BY m.n \
         ON CONFLICT (account_id, currency, ledger_account, shard) DO UPDATE SET \
         amount_minor = balances.amount_minor + EXCLUDED.amount_minor, \
         updated_at = EXCLUDED.updated_at"
    )
}

/// Binds `$1`–`$8` of [`entry_parts`] and [`balance_upsert`]; the entries' own parameters
/// follow ([`bind_entry_rows`]), from [`FIRST_ENTRY_PARAM`] on unless others come between.
fn bind_entries<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    account: AccountId,
    entries: &[Entry],
    (reference, shard): ((&'q str, i64), i16),
    at: Timestamp,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let moves = balance_moves(entries);
    let currencies: Vec<&str> = moves.keys().map(|(c, _)| *c).collect();
    let accounts: Vec<&str> = moves.keys().map(|(_, l)| *l).collect();
    let minors: Vec<i64> = moves.values().copied().collect();
    q.bind(account)
        .bind(shard)
        .bind(at.0)
        .bind(reference.0)
        .bind(reference.1)
        .bind(currencies)
        .bind(accounts)
        .bind(minors)
}

/// Binds each entry's kind and postings' three arrays, in order (see [`entry_parts`]).
fn bind_entry_rows<'q>(
    mut q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    entries: &[Entry],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for entry in entries {
        let postings = entry.postings();
        let accounts: Vec<&str> = postings.iter().map(|p| p.ledger_account.as_str()).collect();
        let currencies: Vec<&str> = postings.iter().map(|p| p.currency.code()).collect();
        let minors: Vec<i64> = postings.iter().map(|p| p.minor).collect();
        q = q
            .bind(entry.kind().as_str())
            .bind(accounts)
            .bind(currencies)
            .bind(minors);
    }
    q
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
    // The order's event is written by the same statement, its payload built from the updated
    // row (`order_json!`, as group-committed creates do): one round trip instead of two in
    // the transaction that records a payment, a capture or a refund.
    let sql = concat!(
        "WITH o AS (UPDATE orders SET status = $1, version = version + 1, updated_at = $2 \
         WHERE account_id = $3 AND id = $4 AND status = $5 AND amount_minor = $6 RETURNING *) \
         INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
         aggregate_version, payload, request_id, trace_id, created_at) \
         SELECT account_id, 'order.' || status, 'order', id, version, ",
        order_json!(),
        ", $7, $8, $2 FROM o"
    );
    sqlx::query(sql)
        .bind(to)
        .bind(meta.at.0)
        .bind(meta.account_id)
        .bind(order_id)
        .bind(from)
        .bind(settled_minor)
        .bind(&meta.request_id)
        .bind(&meta.trace_id)
        .execute(&mut **tx)
        .await
        .map_err(err)?;
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
         WHERE account_id = $1 AND id = $2 AND payment_operation_id = $3",
    )
    .bind(account)
    .bind(order_id)
    .bind(operation)
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    Ok(())
}

/// The payment `id` of `account`, read in the caller's transaction.
pub(crate) async fn payment_in(tx: &mut Tx, account: AccountId, id: i64) -> Result<Payment> {
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

/// The payments named by the pairs (account, id), read in the caller's transaction: what
/// claims made together prefetch (`claiming`).
pub(crate) async fn payments_by_ids(tx: &mut Tx, pairs: &[(i64, i64)]) -> Result<Vec<Payment>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        payment_cols!(),
        " FROM payments WHERE (account_id, id) IN \
         (SELECT * FROM unnest($1::bigint[], $2::bigint[]))"
    ))
    .bind(pairs.iter().map(|p| p.0).collect::<Vec<_>>())
    .bind(pairs.iter().map(|p| p.1).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await
    .map_err(err)?;
    rows.iter().map(payment).collect()
}

/// `payment_in`, holding the payment's row lock until the transaction ends: what is decided
/// from it stays true until then. The lock an `UPDATE` of the payment takes (`NO KEY`: it
/// does not hold up the foreign-key checks of refunds being inserted for the payment).
async fn payment_locked(tx: &mut Tx, account: AccountId, id: i64) -> Result<Payment> {
    let row = sqlx::query(concat!(
        "SELECT ",
        payment_cols!(),
        " FROM payments WHERE account_id = $1 AND id = $2 FOR NO KEY UPDATE"
    ))
    .bind(account)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)?;
    row.as_ref()
        .map(payment)
        .transpose()?
        .ok_or(StorageError::NotFound)
}

/// Moves an authorized payment to `to` (with the captured amount) or says why it cannot. The
/// conditional `UPDATE` waits for a concurrent settlement and re-checks the status after it,
/// so only one settles an authorization.
async fn settle_authorization(
    tx: &mut Tx,
    meta: &WriteMeta,
    payment_id: i64,
    to: PaymentStatus,
    captured_minor: i64,
) -> Result<Payment> {
    let row = sqlx::query(concat!(
        "UPDATE payments SET status = $1, captured_minor = $2, version = version + 1, \
         updated_at = $3 WHERE account_id = $4 AND id = $5 AND status = $6 \
         AND $7 BETWEEN 0 AND amount_minor RETURNING ",
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

/// Reserves `amount` of a captured payment for a refund if it still fits, in one conditional
/// `UPDATE`: a concurrent reservation holds the row until it ends, and the condition is then
/// re-checked against what it committed. `None` when the payment is missing, not captured,
/// or the amount does not fit.
async fn try_reserve(
    tx: &mut Tx,
    meta: &WriteMeta,
    payment_id: i64,
    amount: i64,
) -> Result<Option<Payment>> {
    let row = sqlx::query(concat!(
        "UPDATE payments SET refunded_minor = refunded_minor + $1, version = version + 1, \
         updated_at = $2 WHERE account_id = $3 AND id = $4 AND status = $5 AND $6 > 0 \
         AND refunded_minor + $7 <= captured_minor RETURNING ",
        payment_cols!()
    ))
    .bind(amount)
    .bind(meta.at.0)
    .bind(meta.account_id)
    .bind(payment_id)
    .bind(PaymentStatus::Succeeded.as_str())
    .bind(amount)
    .bind(amount)
    .fetch_optional(&mut **tx)
    .await
    .map_err(err)?;
    row.as_ref().map(payment).transpose()
}

/// One statement that finishes a capture's work: the step's fenced `UPDATE` first, storing
/// the response; then, as data-modifying `WITH` parts that write once per row the step
/// returns (so a fenced step writes nothing at all), the payment's event, its `entries` with
/// their postings and balance moves, and the order's move to paid with its event when the
/// capture took the order's whole amount. PostgreSQL runs a statement's parts in no set
/// order, so the order's event reads the payment's (their `seq`s in order). Returns the
/// step's row count. For a capture the batch did not take (`recording::CAPTURES`), settled
/// alone; a payment's own record is always group-committed.
///
/// Parameters ([`finishing`]): `$1`–`$8` as [`bind_entries`] (the payment as the
/// reference); the step `$9`–`$18`; the order `$19` and the captured amount `$20`; the
/// payment's event `$21`–`$26`; then the entries (four each).
fn finishing_statement(entries: usize) -> String {
    let mut sql = String::from(
        "WITH step AS (UPDATE idempotency_keys SET recovery_point = $12, phase_state = $13, \
         response_status = $14, response_headers = $15, response_body = $16, resource_id = $5, \
         locked_until = NULL, last_run_at = $17, expires_at = $18 \
         WHERE id = $9 AND fence = $10 AND recovery_point = $11 RETURNING id), \
         ev AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
         aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
         SELECT $1, $21, $26, $5, $22, $23::jsonb, $24, $25, $3 FROM step RETURNING id)",
    );
    if entries > 0 {
        sql.push_str(&format!(
            ", {}, bal AS ({})",
            entry_parts(entries, 27, Some("step")),
            balance_upsert(Some("step"))
        ));
    }
    sql.push_str(&format!(
        concat!(
            ", o AS (UPDATE orders SET status = '{to}', version = version + 1, \
             updated_at = $3 WHERE account_id = $1 AND id = $19 AND status = '{from}' \
             AND amount_minor = $20 AND EXISTS (SELECT 1 FROM ev) RETURNING *), \
             oe AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
             aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, 'order.' || status, 'order', id, version, ",
            order_json!(),
            ", $24, $25, $3 FROM o)"
        ),
        from = PAID.0,
        to = PAID.1
    ));
    sql.push_str(" SELECT count(*) FROM step");
    sql
}

/// A [`finishing_statement`] for payment `p` with `$1`–`$26` bound; the caller runs it
/// ([`run_finishing`]).
fn finishing<'q>(
    (meta, step): (&'q WriteMeta, &'q Step),
    p: &Payment,
    entries: &[Entry],
    (response, event): (&'q StoredResponse, &'q NewEvent),
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>> {
    let StepEnd::Finish { expires_at } = step.end else {
        return Err(StorageError::Internal(
            "this command finishes its work".into(),
        ));
    };
    let sql = finishing_statement(entries.len());
    Ok(bind_entries(
        sqlx::query(sqlx::AssertSqlSafe(sql)),
        meta.account_id,
        entries,
        (("payment", p.id), shard_of(step.lease.record_id)),
        meta.at,
    )
    .bind(step.lease.record_id)
    .bind(step.lease.fence)
    .bind(&step.from)
    .bind(FINISHED)
    .bind(&step.state)
    .bind(i32::from(response.status))
    .bind(decode::headers_json(&response.headers))
    .bind(&response.body)
    .bind(step.now.0)
    .bind(expires_at.0)
    .bind(p.order_id)
    .bind(p.captured_minor)
    .bind(&event.event_type)
    .bind(event.aggregate_version)
    .bind(&event.payload)
    .bind(&meta.request_id)
    .bind(&meta.trace_id)
    .bind(event.aggregate_type))
}

/// Binds the entries' rows of a [`finishing`] statement and runs it on `ex`: `Fenced` unless
/// its step wrote.
async fn run_finishing<'q, 'e>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    entries: &[Entry],
    ex: impl sqlx::PgExecutor<'e>,
) -> Result<()> {
    let stepped: i64 = bind_entry_rows(q, entries)
        .fetch_one(ex)
        .await
        .map_err(err)?
        .get(0);
    fenced_unless_one(u64::try_from(stepped).unwrap_or(0))
}

#[async_trait]
impl MoneyStore for PostgresStore {
    async fn claim_order(&self, meta: &WriteMeta, step: &Step, order_id: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        claim_order_in(&mut tx, meta, step, order_id).await?;
        tx.commit().await.map_err(err)
    }

    /// Group-committed with other records (`recording`), with the payment's id drawn ahead
    /// (`payment_ids`) so its response and event are rendered before the write.
    async fn record_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        new: NewPayment,
        respond: Responder<Payment>,
    ) -> Result<Payment> {
        let id = self.payment_ids.take(&self.pool, 1).await?[0];
        let (failure_code, failure_message) = new.failure.clone().unzip();
        let p = Payment {
            id,
            account_id: meta.account_id,
            order_id: new.order_id,
            processor_id: new.processor_id.clone(),
            payment_method: new.payment_method.clone(),
            amount: new.amount,
            status: new.status,
            captured_minor: new.captured_minor,
            refunded_minor: 0,
            failure_code,
            failure_message,
            version: 1,
            created_at: meta.at,
            updated_at: meta.at,
        };
        let rendered = (NewEvent::for_recorded_payment(&p), respond(&p));
        let shard = shard_of(step.lease.record_id);
        let record = crate::recording::record(step, (&new, p.clone()), rendered, shard);
        if self.records.submit(meta.clone(), record).await? {
            Ok(p)
        } else {
            Err(StorageError::Fenced)
        }
    }

    /// Group-committed with other captures (`recording`) while the payment is as `read`;
    /// otherwise, or when the key's lease no longer holds, settled alone from the payment as
    /// stored, which says why not.
    async fn capture_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        read: &Payment,
        captured_minor: i64,
        respond: Responder<Payment>,
    ) -> Result<Payment> {
        let shard = shard_of(step.lease.record_id);
        let captured =
            crate::recording::capture((meta, step), read, captured_minor, &respond, shard);
        let settled = captured.payment.clone();
        if self.captures.submit(meta.clone(), captured).await? {
            return Ok(settled);
        }
        let payment_id = read.id;
        let mut tx = self.write_tx().await?;
        let p = settle_authorization(
            &mut tx,
            meta,
            payment_id,
            PaymentStatus::Succeeded,
            captured_minor,
        )
        .await?;
        // The rest in one statement of the same transaction (`finishing_statement`): a
        // fenced step writes none of it, and the settlement rolls back with the transaction.
        let entries = [Entry::capture(p.amount, p.captured_minor)];
        let event = NewEvent::for_payment("captured", &p);
        let response = respond(&p);
        let q = finishing((meta, step), &p, &entries, (&response, &event))?;
        run_finishing(q, &entries, &mut *tx).await?;
        tx.commit().await.map_err(err)?;
        Ok(p)
    }

    async fn void_payment(
        &self,
        meta: &WriteMeta,
        step: &Step,
        payment_id: i64,
        respond: Respond<'_, Payment>,
    ) -> Result<Payment> {
        let mut tx = self.write_tx().await?;
        let p = settle_authorization(&mut tx, meta, payment_id, PaymentStatus::Canceled, 0).await?;
        post_entries(
            &mut tx,
            meta.account_id,
            &[Entry::void(p.amount)],
            (("payment", p.id), shard_of(step.lease.record_id)),
            meta.at,
        )
        .await?;
        append_event(&mut tx, meta, NewEvent::for_payment("canceled", &p)).await?;
        let operation: i64 = sqlx::query_scalar("SELECT operation_id FROM payments WHERE id = $1")
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
            &self.pool,
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
            " FROM payments WHERE account_id = $1 AND id < $2 \
             AND ($3::BIGINT IS NULL OR order_id = $4) ORDER BY id DESC LIMIT $5"
        ))
        .bind(account)
        .bind(filter.page.before_id())
        .bind(filter.order_id)
        .bind(filter.order_id)
        .bind(filter.page.fetch_limit())
        .fetch_all(&self.pool)
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
        let mut tx = self.write_tx().await?;
        // A given amount is reserved by the conditional `UPDATE` alone.
        let reserved = match amount_minor {
            Some(amount) => try_reserve(&mut tx, meta, payment_id, amount)
                .await?
                .map(|p| (p, amount)),
            None => None,
        };
        let (p, amount) = match reserved {
            Some(done) => done,
            // The rest, or why the amount does not fit: decided under the payment's row lock,
            // so the reservation that follows cannot miss.
            None => {
                let p = payment_locked(&mut tx, meta.account_id, payment_id).await?;
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
                let p = try_reserve(&mut tx, meta, p.id, amount)
                    .await?
                    .ok_or_else(|| {
                        StorageError::Internal("a reservation under the row lock missed".into())
                    })?;
                (p, amount)
            }
        };
        let row = sqlx::query(concat!(
            "INSERT INTO refunds (account_id, payment_id, operation_id, amount_minor, currency, \
             status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
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
        let mut tx = self.write_tx().await?;
        let (status, processor_id, code) = match &outcome {
            RefundOutcome::Succeeded { processor_id } => {
                (RefundStatus::Succeeded, Some(processor_id.as_str()), None)
            }
            RefundOutcome::Failed { code } => (RefundStatus::Failed, None, Some(code.as_str())),
        };
        let row = sqlx::query(concat!(
            "UPDATE refunds SET status = $1, processor_id = $2, failure_code = $3, \
             updated_at = $4 WHERE account_id = $5 AND operation_id = $6 AND status = $7 \
             RETURNING ",
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
                // Refunds of one payment settle one at a time (and before the balances, in
                // the lock order): the last to settle sees every other success and moves
                // the order.
                let p = payment_locked(&mut tx, meta.account_id, r.payment_id).await?;
                let entry = Entry::refund(r.amount);
                post_entries(
                    &mut tx,
                    meta.account_id,
                    &[entry],
                    (("refund", r.id), shard_of(step.lease.record_id)),
                    meta.at,
                )
                .await?;
                append_event(&mut tx, meta, NewEvent::for_refund("created", &r)).await?;
                let refunded: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(SUM(amount_minor), 0)::BIGINT FROM refunds \
                     WHERE payment_id = $1 AND status = 'succeeded'",
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
                    "UPDATE payments SET refunded_minor = refunded_minor - $1, \
                     version = version + 1, updated_at = $2 WHERE id = $3",
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
            &self.pool,
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
            &self.pool,
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
            " FROM refunds WHERE account_id = $1 AND id < $2 \
             AND ($3::BIGINT IS NULL OR payment_id = $4) ORDER BY id DESC LIMIT $5"
        ))
        .bind(account)
        .bind(page.before_id())
        .bind(payment_id)
        .bind(payment_id)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        let items = rows.iter().map(refund).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_lookahead(items, page))
    }

    async fn set_rates(&self, rates: &[(Currency, Currency, String)], at: Timestamp) -> Result<()> {
        // Pairs are written in one order, so two concurrent replacements cannot deadlock.
        let mut sorted: Vec<_> = rates.iter().collect();
        sorted.sort_by_key(|(base, quote, _)| (base.code(), quote.code()));
        let mut tx = self.write_tx().await?;
        for (base, quote, rate) in sorted {
            sqlx::query(
                "INSERT INTO fx_rates (base_currency, quote_currency, rate, set_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (base_currency, quote_currency) DO UPDATE \
                 SET rate = EXCLUDED.rate, set_at = EXCLUDED.set_at",
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
        .fetch_all(&self.pool)
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
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO fx_quotes (account_id, from_currency, from_minor, to_currency, \
             to_minor, market_rate, rate, spread_bps, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING ",
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
            &self.pool,
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
        let mut tx = self.write_tx().await?;
        // The quote's row lock: a concurrent conversion of it waits, then sees it used.
        let row = sqlx::query(concat!(
            "SELECT ",
            quote_cols!(),
            " FROM fx_quotes WHERE account_id = $1 AND id = $2 FOR NO KEY UPDATE"
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
        // Every balance the conversion moves is locked (in the lock order) before the source
        // is checked, so concurrent conversions debit it one at a time and never overdraw.
        let entries = [Entry::conversion(q.from, q.to)];
        lock_balances(&mut tx, meta.account_id, &entries, meta.at).await?;
        let available: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount_minor), 0)::BIGINT FROM balances \
             WHERE account_id = $1 AND currency = $2 AND ledger_account = $3",
        )
        .bind(meta.account_id)
        .bind(q.from.currency.code())
        .bind(LedgerAccount::Available.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
        if available < q.from.minor {
            return Err(StorageError::Rule(Rule::InsufficientFunds {
                available_minor: available,
            }));
        }
        sqlx::query("UPDATE fx_quotes SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
            .bind(meta.at.0)
            .bind(q.id)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        let row = sqlx::query(concat!(
            "INSERT INTO conversions (account_id, quote_id, from_currency, from_minor, \
             to_currency, to_minor, rate, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
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
        post_entries(
            &mut tx,
            meta.account_id,
            &entries,
            (("conversion", c.id), 0),
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
            &self.pool,
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
            "SELECT ledger_account, currency, SUM(amount_minor)::BIGINT AS amount_minor \
             FROM balances WHERE account_id = $1 GROUP BY currency, ledger_account \
             ORDER BY currency, ledger_account",
        )
        .bind(account)
        .fetch_all(&self.pool)
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
             FROM journal_entries WHERE account_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(account)
        .bind(page.before_id())
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .await
        .map_err(err)?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.get("id");
            let postings = sqlx::query(
                "SELECT ledger_account, currency, amount_minor FROM postings \
                 WHERE entry_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&self.pool)
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
