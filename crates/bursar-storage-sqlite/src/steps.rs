//! Group commit for the steps of phased work: claiming an operation's key, claiming an
//! order for payment, recording the payment and recording a capture
//! (`bursar_storage::group_commit`, ADR 0006).
//!
//! SQLite has one writer. A transaction holds it for as long as the async side takes to
//! hand it each statement and wait for the answer, and under load each of those hand-offs
//! also waits for the task to be scheduled again (docs/PERFORMANCE.md). So, as creates do,
//! these steps are queued and a collector writes every step waiting in one transaction:
//! `BEGIN IMMEDIATE`; every step's statements; what depends on the rows they returned
//! (events, stored responses, the fenced step); `COMMIT`. Statements go in calls of one
//! shape and a power-of-two length ([`runs`]), so the connection's cache of prepared
//! multi-statement texts stays small.
//!
//! Steps share a transaction without sharing a fate: every statement of a step is guarded
//! by its own conditions (the lease's fencing token and recovery point, the order's state),
//! so a step that may not write writes nothing and is answered alone, while its neighbours
//! commit. A statement error fails the batch, and each step is then written again alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bursar_domain::ledger::Entry;
use bursar_domain::{AccountId, Money, OrderStatus, Timestamp};
use bursar_storage::group_commit::{Batchable, GroupWriter};
use bursar_storage::money::{NewPayment, Payment, PaymentStatus, Responder, Rule, Step, StepEnd};
use bursar_storage::operations::{FINISHED, FirstPhase, FirstStep, Prefetch, Prefetched, STARTED};
use bursar_storage::{
    Begun, IdempotencyClaim, LeasedOperation, NewEvent, Result, StorageError, StoredResponse,
    WriteMeta, decode,
};
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments, Encode, FromRow, Row, Sqlite, Type};

use crate::writer::Writer;
use crate::{OrderRow, SqliteStore, err, key_record};

/// Most steps one transaction carries.
pub const MAX_BATCH: usize = 64;

/// SQL text and its bound values, built together so each `?` sits next to its value. Only
/// fixed fragments and slot numbers go into the text.
#[derive(Default)]
pub(crate) struct Sql {
    text: String,
    args: SqliteArguments,
    bad: Option<sqlx::error::BoxDynError>,
}

impl Sql {
    pub(crate) fn push(&mut self, text: &str) -> &mut Sql {
        self.text.push_str(text);
        self
    }

    pub(crate) fn bind<'t, T: Encode<'t, Sqlite> + Type<Sqlite> + 't>(
        &mut self,
        value: T,
    ) -> &mut Sql {
        if let Err(e) = self.args.add(value) {
            self.bad.get_or_insert(e);
        }
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    fn query(self) -> Result<sqlx::query::Query<'static, Sqlite, SqliteArguments>> {
        if let Some(e) = self.bad {
            return Err(StorageError::Internal(e));
        }
        Ok(sqlx::query_with(sqlx::AssertSqlSafe(self.text), self.args))
    }

    /// Runs every statement, collecting the rows they return.
    pub(crate) async fn fetch_all(self, conn: &mut SqliteConnection) -> Result<Vec<SqliteRow>> {
        self.query()?.fetch_all(conn).await.map_err(err)
    }
}

/// The condition that `step` still holds its lease at its recovery point. Every write of a
/// batched step carries it, so a replaced driver's step writes nothing.
fn guard(sql: &mut Sql, step: &Step) {
    sql.push(
        " EXISTS (SELECT 1 FROM idempotency_keys WHERE id = ? AND fence = ? \
         AND recovery_point = ?)",
    )
    .bind(step.lease.record_id)
    .bind(step.lease.fence)
    .bind(step.from.clone());
}

/// What a batched statement is conditional on.
pub(crate) enum Gate<'a> {
    /// Nothing: the caller's own transaction decides.
    Always,
    /// `step` still holds its lease ([`guard`]).
    Step(&'a Step),
    /// The statement before it changed a row: a chain of statements that each change at
    /// least one row when they run, opened by a step's conditional first write.
    Chained,
}

impl Gate<'_> {
    fn push(&self, sql: &mut Sql) {
        match self {
            // An upsert from a SELECT needs a WHERE to parse.
            Gate::Always => {
                sql.push(" WHERE true");
            }
            Gate::Step(step) => guard(sql.push(" WHERE"), step),
            Gate::Chained => {
                sql.push(" WHERE changes() > 0");
            }
        }
    }
}

/// Where a journal entry's reference id comes from.
pub(crate) enum Reference {
    Known(i64),
    /// The payment this transaction inserted last (a batched payment's id is not known
    /// before its insert; the writer holds the only write lock, so it is the largest).
    NewestPayment,
}

/// Appends the statements of `entries`, one movement's journal entries: the entries, their
/// postings and the balances they move, three statements however many entries, each only
/// through `gate`. The entries go in as one multi-row insert, so they get consecutive ids
/// and the last is the table's newest (the transaction holds the write lock, and the ids
/// only grow); each posting finds its entry by its distance from the newest. Each statement
/// changes at least one row, so a [`Gate::Chained`] chain goes on through them.
pub(crate) fn entries_sql(
    sql: &mut Sql,
    account: AccountId,
    entries: &[&Entry],
    (reference_type, reference): (&'static str, Reference),
    at: Timestamp,
    gate: &Gate<'_>,
) {
    let entries: Vec<&Entry> = entries
        .iter()
        .copied()
        .filter(|e| !e.postings().is_empty())
        .collect();
    if entries.is_empty() {
        return;
    }
    // One upsert row per ledger account the movement nets, however many postings move it (a
    // capture moves `pending` twice, a one-step payment's entries move it there and back).
    let mut moves: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for p in entries.iter().flat_map(|e| e.postings()) {
        *moves
            .entry((p.currency.code(), p.ledger_account.as_str()))
            .or_default() += p.minor;
    }
    let when = |sql: &mut Sql| gate.push(sql);
    sql.push(
        "INSERT INTO journal_entries (account_id, kind, reference_type, reference_id, \
         created_at) SELECT ?, v.column1, ?, ",
    )
    .bind(account)
    .bind(reference_type);
    match reference {
        Reference::Known(id) => sql.push("?").bind(id),
        Reference::NewestPayment => sql.push("(SELECT max(id) FROM payments)"),
    };
    sql.push(", ? FROM (VALUES ").bind(at.0);
    for (i, e) in entries.iter().enumerate() {
        sql.push(if i == 0 { "(?)" } else { ", (?)" })
            .bind(e.kind().as_str());
    }
    sql.push(") AS v");
    when(sql);
    sql.push(
        "; INSERT INTO postings (entry_id, account_id, ledger_account, currency, \
         amount_minor) SELECT (SELECT max(id) FROM journal_entries) - v.column4, ?, \
         v.column1, v.column2, v.column3 FROM (VALUES ",
    )
    .bind(account);
    let last = entries.len() - 1;
    let mut first = true;
    for (i, e) in entries.iter().enumerate() {
        for p in e.postings() {
            sql.push(if first {
                "(?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?)"
            })
            .bind(p.ledger_account.as_str())
            .bind(p.currency.code())
            .bind(p.minor)
            .bind((last - i) as i64);
            first = false;
        }
    }
    sql.push(") AS v");
    when(sql);
    sql.push(
        "; INSERT INTO balances (account_id, ledger_account, currency, amount_minor, \
         updated_at) SELECT v.column1, v.column2, v.column3, v.column4, v.column5 FROM (VALUES ",
    );
    for (i, ((currency, ledger_account), minor)) in moves.into_iter().enumerate() {
        sql.push(if i == 0 {
            "(?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?)"
        })
        .bind(account)
        .bind(ledger_account)
        .bind(currency)
        .bind(minor)
        .bind(at.0);
    }
    sql.push(") AS v");
    when(sql);
    sql.push(
        " ON CONFLICT (account_id, currency, ledger_account, shard) DO UPDATE SET \
         amount_minor = amount_minor + excluded.amount_minor, \
         updated_at = excluded.updated_at; ",
    );
}

/// Appends the insert of one outbox event.
pub(crate) fn event_sql(sql: &mut Sql, meta: &WriteMeta, ev: NewEvent) {
    sql.push(
        "INSERT INTO outbox_events (account_id, event_type, aggregate_type, aggregate_id, \
         aggregate_version, payload, request_id, trace_id, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?); ",
    )
    .bind(meta.account_id)
    .bind(ev.event_type)
    .bind(ev.aggregate_type)
    .bind(ev.aggregate_id)
    .bind(ev.aggregate_version)
    .bind(ev.payload)
    .bind(meta.request_id.clone())
    .bind(meta.trace_id.clone())
    .bind(meta.at.0);
}

/// Appends the fenced `UPDATE` that commits `step`, returning `slot` when it took.
pub(crate) fn step_sql(
    sql: &mut Sql,
    slot: usize,
    step: &Step,
    response: Option<&StoredResponse>,
    resource_id: i64,
) -> Result<()> {
    step_sql_when(sql, slot, step, response, resource_id, |_| {})
}

/// [`step_sql`] that also takes only if what `also` appends to its `WHERE` holds.
fn step_sql_when(
    sql: &mut Sql,
    slot: usize,
    step: &Step,
    response: Option<&StoredResponse>,
    resource_id: i64,
    also: impl FnOnce(&mut Sql),
) -> Result<()> {
    match (&step.end, response) {
        (StepEnd::Advance { to, lease_until }, _) => sql
            .push(
                "UPDATE idempotency_keys SET recovery_point = ?, phase_state = ?, \
                 locked_until = ?, last_run_at = ?",
            )
            .bind(to.clone())
            .bind(step.state.clone())
            .bind(lease_until.0)
            .bind(step.now.0),
        (StepEnd::Finish { expires_at }, Some(r)) => sql
            .push(
                "UPDATE idempotency_keys SET recovery_point = ?, phase_state = ?, \
                 response_status = ?, response_headers = ?, response_body = ?, \
                 resource_id = ?, locked_until = NULL, last_run_at = ?, expires_at = ?",
            )
            .bind(FINISHED)
            .bind(step.state.clone())
            .bind(i64::from(r.status))
            .bind(decode::headers_json(&r.headers))
            .bind(r.body.clone())
            .bind(resource_id)
            .bind(step.now.0)
            .bind(expires_at.0),
        (StepEnd::Finish { .. }, None) => {
            return Err(StorageError::Internal(
                "a finishing step needs a response".into(),
            ));
        }
    };
    sql.push(" WHERE id = ? AND fence = ? AND recovery_point = ?")
        .bind(step.lease.record_id)
        .bind(step.lease.fence)
        .bind(step.from.clone());
    also(sql);
    sql.push(&format!(" RETURNING {slot} AS slot, 'step' AS kind; "));
    Ok(())
}

/// One step of phased work.
#[derive(Clone)]
pub enum StepWrite {
    /// Claim an operation's key, or take over its lapsed lease (`begin_operation`).
    Begin {
        claim: IdempotencyClaim,
        request: Arc<[u8]>,
        lease_until: Timestamp,
        prefetch: Option<Prefetch>,
        /// Decides the lease's first step, written in the batch's second part (ADR 0007).
        first: Option<FirstPhase>,
    },
    /// Claim an order for the work's payment and advance the work (`claim_order`).
    ClaimOrder { step: Step, order_id: i64 },
    /// Insert a payment with its ledger entries and events, and finish the work
    /// (`record_payment`).
    RecordPayment {
        step: Step,
        new: NewPayment,
        respond: Responder<Payment>,
    },
    /// Capture an authorized payment with its ledger entry and events, and finish the work
    /// (`capture_payment`).
    CapturePayment {
        step: Step,
        payment_id: i64,
        authorized: Money,
        captured_minor: i64,
        respond: Responder<Payment>,
    },
}

/// What a step came to. Each step has its own outcome: one refused step does not fail the
/// batch.
pub enum StepOut {
    Begun(Result<Begun>),
    /// A lease whose first step is in the batch's second part; settled into `Begun` by
    /// whether that step's row came back.
    BegunFirst(LeasedOperation, FirstStep),
    Claimed(Result<()>),
    Recorded(Result<Payment>),
}

impl Batchable for StepWrite {
    /// Steps of every kind share a transaction: the writer sends each shape in a call of
    /// its own ([`StepWrite::shape`]).
    fn same_kind(&self, _other: &StepWrite) -> bool {
        true
    }

    /// SQLite binds in process; batches are bounded by count only.
    fn bound_bytes(&self) -> usize {
        match self {
            StepWrite::Begin { request, .. } => request.len(),
            StepWrite::ClaimOrder { step, .. }
            | StepWrite::RecordPayment { step, .. }
            | StepWrite::CapturePayment { step, .. } => step.state.len(),
        }
    }
}

/// Steps whose statements have the same text: a claim with or without a prefetch (and of
/// which record), an order's claim, a payment by status (a captured one by whether in full),
/// a full or partial capture. One call per shape keeps the multi-statement texts few, so
/// their prepared statements are reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    /// The prefetch's kind, and whether a first step is decided.
    Begin(u8, bool),
    ClaimOrder,
    RecordPayment(&'static str, bool),
    CapturePayment(bool),
}

impl StepWrite {
    fn shape(&self) -> Shape {
        match self {
            StepWrite::Begin {
                prefetch, first, ..
            } => Shape::Begin(
                match prefetch {
                    None => 0,
                    Some(Prefetch::Order(_)) => 1,
                    Some(Prefetch::Payment(_)) => 2,
                },
                first.is_some(),
            ),
            StepWrite::ClaimOrder { .. } => Shape::ClaimOrder,
            StepWrite::RecordPayment { new, .. } => {
                Shape::RecordPayment(new.status.as_str(), new.captured_minor == new.amount.minor)
            }
            StepWrite::CapturePayment {
                authorized,
                captured_minor,
                ..
            } => Shape::CapturePayment(*captured_minor == authorized.minor),
        }
    }

    /// Appends the step's statements to a call of the batch's first part. Rows it returns
    /// carry its `slot`, its place in that call.
    fn stage(&self, slot: usize, meta: &WriteMeta, sql: &mut Sql) -> Result<()> {
        match self {
            StepWrite::Begin {
                claim,
                request,
                lease_until,
                prefetch,
                ..
            } => {
                // Only a finished record expires (an unfinished one's expiry is the largest
                // integer). The takeover runs only if the insert found the key taken
                // (`changes() = 0`): this request's work whose lease has lapsed.
                sql.push(
                    "DELETE FROM idempotency_keys WHERE account_id = ? AND idem_key = ? \
                     AND expires_at <= ?; ",
                )
                .bind(meta.account_id)
                .bind(claim.key.clone())
                .bind(meta.at.0);
                sql.push(
                    "INSERT INTO idempotency_keys (account_id, idem_key, method, route, \
                     fingerprint, response_status, response_headers, response_body, created_at, \
                     expires_at, recovery_point, phase_state, fence, locked_until, last_run_at, \
                     attempts, request_body, request_id, trace_id) \
                     VALUES (?, ?, ?, ?, ?, 0, '[]', x'', ?, ?, ?, '{}', 1, ?, ?, 1, ?, ?, ?) \
                     ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING ",
                )
                .bind(meta.account_id)
                .bind(claim.key.clone())
                .bind(claim.method.clone())
                .bind(claim.route.clone())
                .bind(claim.fingerprint.clone())
                .bind(meta.at.0)
                .bind(i64::MAX)
                .bind(STARTED)
                .bind(lease_until.0)
                .bind(meta.at.0)
                .bind(request.to_vec())
                .bind(meta.request_id.clone())
                .bind(meta.trace_id.clone());
                sql.push(&format!("{slot} AS slot, 'leased' AS kind, "))
                    .push(concat!(leased_cols!(), "; "));
                sql.push(
                    "UPDATE idempotency_keys SET fence = fence + 1, locked_until = ?, \
                     last_run_at = ?, attempts = attempts + 1 \
                     WHERE account_id = ? AND idem_key = ? AND fingerprint = ? \
                     AND recovery_point <> ? AND locked_until <= ? AND changes() = 0 RETURNING ",
                )
                .bind(lease_until.0)
                .bind(meta.at.0)
                .bind(meta.account_id)
                .bind(claim.key.clone())
                .bind(claim.fingerprint.clone())
                .bind(FINISHED)
                .bind(meta.at.0);
                sql.push(&format!("{slot} AS slot, 'leased' AS kind, "))
                    .push(concat!(leased_cols!(), "; "));
                sql.push(&format!("SELECT {slot} AS slot, 'record' AS kind, "))
                    .push(concat!(
                        key_cols!(),
                        " FROM idempotency_keys WHERE account_id = ? AND idem_key = ?; "
                    ))
                    .bind(meta.account_id)
                    .bind(claim.key.clone());
                // Read after the claim, in its transaction (scoped to the account).
                let (select, id) = match prefetch {
                    Some(Prefetch::Order(id)) => (
                        concat!("'order' AS kind, ", order_cols!(), " FROM orders"),
                        id,
                    ),
                    Some(Prefetch::Payment(id)) => (
                        concat!("'payment' AS kind, ", payment_cols!(), " FROM payments"),
                        id,
                    ),
                    None => return Ok(()),
                };
                sql.push(&format!("SELECT {slot} AS slot, {select}"))
                    .push(" WHERE account_id = ? AND id = ?; ")
                    .bind(meta.account_id)
                    .bind(*id);
                Ok(())
            }
            StepWrite::ClaimOrder { step, order_id } => {
                claim_order_sql(sql, slot, meta, step, *order_id)?;
                sql.push(&format!(
                    "SELECT {slot} AS slot, 'order' AS kind, status, payment_operation_id \
                     FROM orders WHERE account_id = ? AND id = ?; "
                ))
                .bind(meta.account_id)
                .bind(*order_id);
                Ok(())
            }
            StepWrite::RecordPayment { step, new, .. } => {
                record_sql(slot, meta, step, new, sql);
                Ok(())
            }
            StepWrite::CapturePayment {
                step,
                payment_id,
                authorized,
                captured_minor,
                ..
            } => {
                let payment = (*payment_id, *authorized);
                capture_sql(slot, meta, step, payment, *captured_minor, sql);
                Ok(())
            }
        }
    }

    /// Reads the step's rows from the first part and appends what depends on them to a call
    /// of the second, where its place is `slot`. `Err` fails the batch.
    fn settle(
        &self,
        slot: usize,
        meta: &WriteMeta,
        rows: Vec<SqliteRow>,
        finish: &mut Sql,
    ) -> Result<StepOut> {
        let of = |kind: &str| rows.iter().find(|r| row_kind(r) == kind);
        match self {
            StepWrite::Begin {
                prefetch, first, ..
            } => {
                let begun = match (of("leased"), of("record")) {
                    (Some(row), _) => {
                        let mut op = crate::ops::leased(row)?;
                        op.prefetched = match prefetch {
                            Some(Prefetch::Order(id)) => {
                                let found = of("order")
                                    .map(|r| OrderRow::from_row(r).map_err(err)?.into_record());
                                Some(Box::new(Prefetched::Order(*id, found.transpose()?)))
                            }
                            Some(Prefetch::Payment(id)) => {
                                let found = of("payment").map(crate::money::payment);
                                Some(Box::new(Prefetched::Payment(*id, found.transpose()?)))
                            }
                            None => None,
                        };
                        Begun::Leased(op)
                    }
                    (None, Some(row)) => Begun::Existing(key_record(row)?),
                    (None, None) => {
                        return Err(StorageError::Internal("claimed key vanished".into()));
                    }
                };
                let Some(decide) = first else {
                    return Ok(StepOut::Begun(Ok(begun)));
                };
                let decided = match &begun {
                    Begun::Leased(op) => decide(op),
                    Begun::Existing(_) => None,
                };
                match (begun, decided) {
                    (Begun::Leased(op), Some(first)) => {
                        let FirstStep::ClaimOrder { step, order_id } = &first;
                        claim_order_sql(finish, slot, meta, step, *order_id)?;
                        Ok(StepOut::BegunFirst(op, first))
                    }
                    (begun, _) => {
                        claim_order_sql(finish, slot, meta, &no_first_step(), 0)?;
                        Ok(StepOut::Begun(Ok(begun)))
                    }
                }
            }
            StepWrite::ClaimOrder { step, .. } => {
                if of("step").is_some() {
                    return Ok(StepOut::Claimed(Ok(())));
                }
                // Why not: the order's rules first (as the per-command path answers), then
                // the lease.
                let Some(order) = of("order") else {
                    return Ok(StepOut::Claimed(Err(StorageError::NotFound)));
                };
                let status = decode::status(order.get("status"))?;
                let holder: Option<i64> = order.get("payment_operation_id");
                let refused = if status != OrderStatus::Pending {
                    StorageError::Rule(Rule::OrderNotPayable(status))
                } else if holder.is_some_and(|h| h != step.lease.record_id) {
                    StorageError::Rule(Rule::OrderPaymentInProgress)
                } else {
                    StorageError::Fenced
                };
                Ok(StepOut::Claimed(Err(refused)))
            }
            StepWrite::RecordPayment { step, respond, .. } => {
                let Some(row) = of("payment") else {
                    return Ok(StepOut::Recorded(Err(StorageError::Fenced)));
                };
                let p = crate::money::payment(row)?;
                event_sql(finish, meta, NewEvent::for_recorded_payment(&p));
                if let Some(order) = of("order") {
                    let o = OrderRow::from_row(order).map_err(err)?.into_record()?;
                    event_sql(finish, meta, NewEvent::for_order(o.status.as_str(), &o));
                }
                step_sql(finish, slot, step, Some(&respond(&p)), p.id)?;
                Ok(StepOut::Recorded(Ok(p)))
            }
            StepWrite::CapturePayment { step, respond, .. } => {
                let Some(row) = of("payment") else {
                    // Why not: the payment's state first (as the per-command path answers),
                    // then the lease.
                    let refused = match of("current") {
                        None => StorageError::NotFound,
                        Some(current) => {
                            let status = decode::payment_status(current.get("status"))?;
                            if current.get::<bool, _>("capturable") {
                                StorageError::Fenced
                            } else {
                                StorageError::Rule(Rule::PaymentState(status))
                            }
                        }
                    };
                    return Ok(StepOut::Recorded(Err(refused)));
                };
                let p = crate::money::payment(row)?;
                event_sql(finish, meta, NewEvent::for_payment("captured", &p));
                if let Some(order) = of("order") {
                    let o = OrderRow::from_row(order).map_err(err)?.into_record()?;
                    event_sql(finish, meta, NewEvent::for_order(o.status.as_str(), &o));
                }
                step_sql(finish, slot, step, Some(&respond(&p)), p.id)?;
                Ok(StepOut::Recorded(Ok(p)))
            }
        }
    }
}

impl StepOut {
    /// Whether the batch's second part returns a `step` row for this step: recorded
    /// payments and captures finish there.
    fn finishes_later(&self) -> bool {
        matches!(self, StepOut::Recorded(Ok(_)))
    }

    pub(crate) fn begun(self) -> Result<Begun> {
        match self {
            StepOut::Begun(begun) => begun,
            _ => Err(mismatch()),
        }
    }

    pub(crate) fn claimed(self) -> Result<()> {
        match self {
            StepOut::Claimed(claimed) => claimed,
            _ => Err(mismatch()),
        }
    }

    /// A recorded payment or capture.
    pub(crate) fn recorded(self) -> Result<Payment> {
        match self {
            StepOut::Recorded(recorded) => recorded,
            _ => Err(mismatch()),
        }
    }
}

fn mismatch() -> StorageError {
    StorageError::Internal("a step was answered as another kind of step".into())
}

impl SqliteStore {
    /// Queues `write` for the steps' group commit and waits for its own outcome.
    pub(crate) async fn step(&self, meta: &WriteMeta, write: StepWrite) -> Result<StepOut> {
        // An order's claim advances the work; a payment's or capture's record finishes it.
        let (step, finishes) = match &write {
            StepWrite::Begin { .. } => return self.steps.submit(meta.clone(), write).await,
            StepWrite::ClaimOrder { step, .. } => (step, false),
            StepWrite::RecordPayment { step, .. } | StepWrite::CapturePayment { step, .. } => {
                (step, true)
            }
        };
        if matches!(step.end, StepEnd::Finish { .. }) != finishes {
            return Err(StorageError::Internal(
                "a step that does not end the way its command does".into(),
            ));
        }
        self.steps.submit(meta.clone(), write).await
    }
}

/// The order's claim and the step that advances the work, taking together or not at all:
/// the step only if the order is claimable, the claim only if the step took. Returns a
/// `step` row for `slot` when it took.
fn claim_order_sql(
    sql: &mut Sql,
    slot: usize,
    meta: &WriteMeta,
    step: &Step,
    order_id: i64,
) -> Result<()> {
    step_sql_when(sql, slot, step, None, order_id, |sql| {
        sql.push(
            " AND EXISTS (SELECT 1 FROM orders WHERE account_id = ? AND id = ? \
             AND status = 'pending' \
             AND (payment_operation_id IS NULL OR payment_operation_id = ?))",
        )
        .bind(meta.account_id)
        .bind(order_id)
        .bind(step.lease.record_id);
    })?;
    sql.push(
        "UPDATE orders SET payment_operation_id = ? \
         WHERE account_id = ? AND id = ? AND changes() = 1; ",
    )
    .bind(step.lease.record_id)
    .bind(meta.account_id)
    .bind(order_id);
    Ok(())
}

/// A claim-order step that matches no record: what a call of the `Begin` shape with a first
/// step carries for a claim whose first step was not decided, so the call's text is the
/// same for every claim in it.
fn no_first_step() -> Step {
    Step {
        lease: bursar_storage::Lease {
            record_id: 0,
            fence: 0,
        },
        from: String::new(),
        state: String::new(),
        now: Timestamp(0),
        end: StepEnd::Advance {
            to: String::new(),
            lease_until: Timestamp(0),
        },
    }
}

/// The first-call statements of a payment's record: the payment, its ledger entries, and the
/// order's move (paid when captured in full; the claim released when the payment failed),
/// every one only if the step still holds its lease.
fn record_sql(slot: usize, meta: &WriteMeta, step: &Step, new: &NewPayment, sql: &mut Sql) {
    let (code, message) = new.failure.clone().unzip();
    sql.push(
        "INSERT INTO payments (account_id, order_id, operation_id, processor_id, \
         payment_method, amount_minor, currency, status, captured_minor, failure_code, \
         failure_message, created_at, updated_at) \
         SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE",
    )
    .bind(meta.account_id)
    .bind(new.order_id)
    .bind(step.lease.record_id)
    .bind(new.processor_id.clone())
    .bind(new.payment_method.clone())
    .bind(new.amount.minor)
    .bind(new.amount.currency.code())
    .bind(new.status.as_str())
    .bind(new.captured_minor)
    .bind(code)
    .bind(message)
    .bind(meta.at.0)
    .bind(meta.at.0);
    guard(sql, step);
    sql.push(&format!(" RETURNING {slot} AS slot, 'payment' AS kind, "))
        .push(concat!(payment_cols!(), "; "));
    // One movement's entries, written together.
    let entries = new.entries();
    entries_sql(
        sql,
        meta.account_id,
        &entries.iter().collect::<Vec<_>>(),
        ("payment", Reference::NewestPayment),
        meta.at,
        &Gate::Step(step),
    );
    match new.status {
        PaymentStatus::Succeeded => {
            sql.push(
                "UPDATE orders SET status = 'paid', version = version + 1, updated_at = ? \
                 WHERE account_id = ? AND id = ? AND status = 'pending' AND amount_minor = ? \
                 AND",
            )
            .bind(meta.at.0)
            .bind(meta.account_id)
            .bind(new.order_id)
            .bind(new.captured_minor);
            guard(sql, step);
            sql.push(&format!(" RETURNING {slot} AS slot, 'order' AS kind, "))
                .push(concat!(order_cols!(), "; "));
        }
        PaymentStatus::Failed => {
            sql.push(
                "UPDATE orders SET payment_operation_id = NULL \
                 WHERE account_id = ? AND id = ? AND payment_operation_id = ? AND",
            )
            .bind(meta.account_id)
            .bind(new.order_id)
            .bind(step.lease.record_id);
            guard(sql, step);
            sql.push("; ");
        }
        PaymentStatus::RequiresCapture | PaymentStatus::Canceled => {}
    }
}

/// The first-call statements of a capture: the payment's move to succeeded (only if it is
/// still the authorization of `authorized` the caller read, the capture is within it, and
/// the step holds its lease), then, chained on it, the capture's ledger entry and the
/// order's move to paid when captured in full; and the payment as it stands, to say why not.
fn capture_sql(
    slot: usize,
    meta: &WriteMeta,
    step: &Step,
    (payment_id, authorized): (i64, Money),
    captured_minor: i64,
    sql: &mut Sql,
) {
    sql.push(
        "UPDATE payments SET status = 'succeeded', captured_minor = ?, version = version + 1, \
         updated_at = ? WHERE account_id = ? AND id = ? AND status = 'requires_capture' \
         AND ? BETWEEN 0 AND amount_minor AND amount_minor = ? AND currency = ? AND",
    )
    .bind(captured_minor)
    .bind(meta.at.0)
    .bind(meta.account_id)
    .bind(payment_id)
    .bind(captured_minor)
    .bind(authorized.minor)
    .bind(authorized.currency.code());
    guard(sql, step);
    sql.push(&format!(" RETURNING {slot} AS slot, 'payment' AS kind, "))
        .push(concat!(payment_cols!(), "; "));
    let capture = Entry::capture(authorized, captured_minor);
    let reference = ("payment", Reference::Known(payment_id));
    entries_sql(
        sql,
        meta.account_id,
        &[&capture],
        reference,
        meta.at,
        &Gate::Chained,
    );
    // Last in the chain: it may rightly change nothing (a partial capture).
    sql.push(
        "UPDATE orders SET status = 'paid', version = version + 1, updated_at = ? \
         WHERE account_id = ? AND amount_minor = ? AND status = 'pending' \
         AND id = (SELECT order_id FROM payments WHERE account_id = ? AND id = ?) \
         AND changes() > 0",
    )
    .bind(meta.at.0)
    .bind(meta.account_id)
    .bind(captured_minor)
    .bind(meta.account_id)
    .bind(payment_id);
    sql.push(&format!(" RETURNING {slot} AS slot, 'order' AS kind, "))
        .push(concat!(order_cols!(), "; "));
    sql.push(&format!(
        "SELECT {slot} AS slot, 'current' AS kind, status, \
         (status = 'requires_capture' AND ? BETWEEN 0 AND amount_minor) AS capturable \
         FROM payments WHERE account_id = ? AND id = ?; "
    ))
    .bind(captured_minor)
    .bind(meta.account_id)
    .bind(payment_id);
}

fn row_kind(r: &SqliteRow) -> String {
    r.try_get::<String, _>("kind").unwrap_or_default()
}

/// Rows by their slot.
fn by_slot(n: usize, rows: Vec<SqliteRow>) -> Result<Vec<Vec<SqliteRow>>> {
    let mut out: Vec<Vec<SqliteRow>> = (0..n).map(|_| Vec::new()).collect();
    for row in rows {
        let slot: i64 = row.try_get("slot").map_err(err)?;
        usize::try_from(slot)
            .ok()
            .and_then(|s| out.get_mut(s))
            .ok_or_else(|| StorageError::Internal("a row of no step".into()))?
            .push(row);
    }
    Ok(out)
}

/// Writes batches of steps on the single writer connection.
pub struct SqliteSteps {
    pub(crate) writer: Writer,
    /// Committed transactions, for tests.
    pub commits: Arc<AtomicU64>,
}

#[async_trait]
impl GroupWriter for SqliteSteps {
    type Item = StepWrite;
    type Out = StepOut;
    const NAME: &'static str = "steps";

    /// The transaction opens in the batch's first call (`BEGIN IMMEDIATE; …`), which saves
    /// the writer a hand-off per batch, as creates do. A batch that fails is rolled back, and
    /// so is one whose task stops half-way (a panic in a responder: `WriteTx`'s drop).
    async fn write(&self, batch: &[(WriteMeta, StepWrite)]) -> Result<Vec<StepOut>> {
        let mut tx = self.writer.deferred().await?;
        match write_on(&mut tx, batch).await {
            Ok(outs) => {
                tx.commit().await.map_err(err)?;
                self.commits.fetch_add(1, Ordering::Relaxed);
                Ok(outs)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    fn took(out: &StepOut) -> bool {
        match out {
            StepOut::Begun(done) => done.is_ok(),
            StepOut::BegunFirst(..) => true,
            StepOut::Claimed(done) => done.is_ok(),
            StepOut::Recorded(done) => done.is_ok(),
        }
    }
}

/// `slots` cut into runs of falling powers of two (13 → 8, 4, 1): the multi-statement
/// texts a connection prepares and caches stay few (one per shape and power of two), so the
/// cache always hits and holds a bounded number of statements.
fn runs(mut slots: &[usize]) -> Vec<&[usize]> {
    let mut out = Vec::new();
    while !slots.is_empty() {
        let n = 1 << slots.len().ilog2();
        let (run, rest) = slots.split_at(n);
        out.push(run);
        slots = rest;
    }
    out
}

async fn write_on(
    conn: &mut SqliteConnection,
    batch: &[(WriteMeta, StepWrite)],
) -> Result<Vec<StepOut>> {
    // Slots by shape, each in submission order.
    let mut shapes: std::collections::BTreeMap<Shape, Vec<usize>> = Default::default();
    for (slot, (_, step)) in batch.iter().enumerate() {
        shapes.entry(step.shape()).or_default().push(slot);
    }
    // Rows carry their step's place in its call, so a call's text depends only on its
    // shape and length.
    let mut rows: Vec<Vec<SqliteRow>> = (0..batch.len()).map(|_| Vec::new()).collect();
    // The batch's transaction opens in its first call.
    let mut opening = Some("BEGIN IMMEDIATE; ");
    for slots in shapes.values() {
        for run in runs(slots) {
            let mut first = Sql::default();
            if let Some(begin) = opening.take() {
                first.push(begin);
            }
            for (place, &slot) in run.iter().enumerate() {
                let (meta, step) = &batch[slot];
                step.stage(place, meta, &mut first)?;
            }
            for (place, found) in by_slot(run.len(), first.fetch_all(conn).await?)?
                .into_iter()
                .enumerate()
            {
                rows[run[place]] = found;
            }
        }
    }
    let mut outs: Vec<Option<StepOut>> = (0..batch.len()).map(|_| None).collect();
    for slots in shapes.values() {
        for run in runs(slots) {
            let mut finish = Sql::default();
            for (place, &slot) in run.iter().enumerate() {
                let (meta, step) = &batch[slot];
                let found = std::mem::take(&mut rows[slot]);
                outs[slot] = Some(step.settle(place, meta, found, &mut finish)?);
            }
            if finish.is_empty() {
                continue;
            }
            let done = by_slot(run.len(), finish.fetch_all(conn).await?)?;
            for (&slot, back) in run.iter().zip(done) {
                let took = match back.len() {
                    0 => false,
                    1 => true,
                    _ => return Err(StorageError::Internal("a step took twice".into())),
                };
                outs[slot] = match outs[slot].take() {
                    // A claim's first step takes if the claim and the order allow it;
                    // otherwise the work stays where the claim left it.
                    Some(StepOut::BegunFirst(mut op, first)) => {
                        if took {
                            op.advanced_by(&first);
                        }
                        Some(StepOut::Begun(Ok(Begun::Leased(op))))
                    }
                    // Every other step this call commits was checked in the first; a miss
                    // means the batch's own reading of the rows is wrong, and nothing of it
                    // may stay.
                    Some(out) if out.finishes_later() != took => {
                        return Err(StorageError::Internal("a batched step did not take".into()));
                    }
                    out => out,
                };
            }
        }
    }
    outs.into_iter()
        .map(|out| out.ok_or_else(|| StorageError::Internal("a step was not settled".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteOptions, SqliteStore};
    use bursar_domain::ledger::LedgerAccount;
    use bursar_domain::{Currency, Money};
    use bursar_storage::money::{MoneyStore, PaymentFilter};
    use bursar_storage::{
        AccountStore, CustomerStore, EventStore, IdempotencyStore, Lease, NewCustomer, NewOrder,
        Order, OrderStore, PageRequest,
    };

    const NOW: i64 = 1_000;
    const LEASE: i64 = 90_000;
    const AUTHORIZING: &str = "authorizing";

    fn meta(account: i64) -> WriteMeta {
        WriteMeta {
            account_id: account,
            at: Timestamp(NOW),
            request_id: "req_steps".into(),
            trace_id: "0".repeat(32),
        }
    }

    fn step(lease: Lease, from: &str, end: StepEnd) -> Step {
        Step {
            lease,
            from: from.into(),
            state: "{}".into(),
            now: Timestamp(NOW),
            end,
        }
    }

    fn finishing(lease: Lease, from: &str) -> Step {
        step(
            lease,
            from,
            StepEnd::Finish {
                expires_at: Timestamp(NOW + LEASE),
            },
        )
    }

    /// The same lease as a replaced driver holds it.
    fn stale(l: Lease) -> Lease {
        Lease {
            fence: l.fence + 1,
            ..l
        }
    }

    fn respond() -> Responder<Payment> {
        Arc::new(|p: &Payment| StoredResponse {
            status: 201,
            headers: vec![],
            body: p.id.to_string().into_bytes(),
        })
    }

    /// A fresh store with one account and a pending order per amount.
    async fn fixture(minors: &[i64]) -> (tempfile::TempDir, SqliteStore, i64, Vec<Order>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = SqliteStore::open(&url, &SqliteOptions::default())
            .await
            .unwrap();
        let a = store.create_account("a", Timestamp(1)).await.unwrap().id;
        let c = store
            .create_customer(&meta(a), NewCustomer::default())
            .await
            .unwrap()
            .id;
        let usd = Currency::from_code("USD").unwrap();
        let mut orders = Vec::new();
        for &minor in minors {
            let new = NewOrder {
                customer_id: c,
                amount: Money::from_minor(minor, usd).unwrap(),
                description: None,
                metadata: Default::default(),
            };
            orders.push(store.create_order(&meta(a), new).await.unwrap());
        }
        (dir, store, a, orders)
    }

    /// Queues every step before the collector runs: on a current-thread runtime the spawned
    /// submits all enqueue before the collector task is polled, so they form one batch (one
    /// per kind). Returns the outcomes and how many transactions were committed.
    async fn together(store: &SqliteStore, writes: Vec<(i64, StepWrite)>) -> (Vec<StepOut>, u64) {
        let before = store.step_commits();
        let tasks: Vec<_> = writes
            .into_iter()
            .map(|(account, w)| {
                let steps = store.steps.clone();
                tokio::spawn(async move { steps.submit(meta(account), w).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        (out, store.step_commits() - before)
    }

    fn begin(a: i64, key: &str) -> (i64, StepWrite) {
        let claim = IdempotencyClaim {
            key: key.into(),
            method: "POST".into(),
            route: "/api/payments".into(),
            fingerprint: "fp".into(),
            expires_at: Timestamp(i64::MAX),
        };
        let write = StepWrite::Begin {
            claim,
            request: Arc::from(&b"{}"[..]),
            lease_until: Timestamp(NOW + LEASE),
            prefetch: None,
            first: None,
        };
        (a, write)
    }

    fn leased(out: &StepOut) -> Lease {
        match out {
            StepOut::Begun(Ok(Begun::Leased(op))) => op.lease,
            _ => panic!("expected a lease"),
        }
    }

    async fn leases(store: &SqliteStore, a: i64, keys: &[&str]) -> Vec<Lease> {
        let (begun, _) = together(store, keys.iter().map(|k| begin(a, k)).collect()).await;
        begun.iter().map(leased).collect()
    }

    fn claim_order(a: i64, lease: Lease, order: i64) -> (i64, StepWrite) {
        let end = StepEnd::Advance {
            to: AUTHORIZING.into(),
            lease_until: Timestamp(NOW + LEASE),
        };
        let write = StepWrite::ClaimOrder {
            step: step(lease, STARTED, end),
            order_id: order,
        };
        (a, write)
    }

    fn pay(a: i64, lease: Lease, order: &Order, captured: bool) -> (i64, StepWrite) {
        let new = NewPayment {
            order_id: order.id,
            amount: order.amount,
            payment_method: "pm_card_visa".into(),
            processor_id: Some(format!("ch_{}", order.id)),
            status: if captured {
                PaymentStatus::Succeeded
            } else {
                PaymentStatus::RequiresCapture
            },
            captured_minor: if captured { order.amount.minor } else { 0 },
            failure: None,
        };
        let write = StepWrite::RecordPayment {
            step: finishing(lease, AUTHORIZING),
            new,
            respond: respond(),
        };
        (a, write)
    }

    fn paid(out: &StepOut) -> Payment {
        match out {
            StepOut::Recorded(Ok(p)) => p.clone(),
            StepOut::Recorded(Err(e)) => panic!("expected a payment, got {e:?}"),
            _ => panic!("expected a payment"),
        }
    }

    /// Pays each order through the whole path (key, order claim, payment), batched.
    async fn pay_all(
        store: &SqliteStore,
        a: i64,
        orders: &[Order],
        captured: bool,
    ) -> Vec<Payment> {
        let keys: Vec<String> = orders.iter().map(|o| format!("pay-{}", o.id)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let leases = leases(store, a, &keys).await;
        let claims = leases
            .iter()
            .zip(orders)
            .map(|(l, o)| claim_order(a, *l, o.id));
        let (claimed, _) = together(store, claims.collect()).await;
        assert!(
            claimed
                .iter()
                .all(|c| matches!(c, StepOut::Claimed(Ok(()))))
        );
        let pays = leases
            .iter()
            .zip(orders)
            .map(|(l, o)| pay(a, *l, o, captured));
        let (payments, _) = together(store, pays.collect()).await;
        payments.iter().map(paid).collect()
    }

    async fn available(store: &SqliteStore, a: i64) -> (i64, i64) {
        let all = store.balances(a).await.unwrap();
        let sum = |account: LedgerAccount| {
            all.iter()
                .filter(|b| b.ledger_account == account)
                .map(|b| b.minor)
                .sum::<i64>()
        };
        (sum(LedgerAccount::Available), sum(LedgerAccount::Pending))
    }

    async fn events(store: &SqliteStore, a: i64, kind: &str, id: i64) -> Vec<String> {
        let all = store.events_for(a, kind, id).await.unwrap();
        all.into_iter().map(|e| e.event_type).collect()
    }

    async fn order_status(store: &SqliteStore, a: i64, order: &Order) -> &'static str {
        let o = store.get_order(a, order.id).await.unwrap().unwrap();
        o.status.as_str()
    }

    /// Claims with a first step share a batch and keep their own outcomes: one takes its
    /// order, one is refused because the first took that order in the same transaction, and
    /// one whose step was not decided runs the call's no-op claim and leaves its order free.
    #[tokio::test(flavor = "current_thread")]
    async fn first_steps_in_one_batch_take_or_leave_the_work_each() {
        let (_dir, store, a, orders) = fixture(&[100, 200]).await;
        let undecided = orders[1].id;
        let first: FirstPhase = Arc::new(move |op: &LeasedOperation| {
            let Some(Prefetched::Order(id, Some(_))) = op.prefetched.as_deref() else {
                return None;
            };
            (*id != undecided).then(|| FirstStep::ClaimOrder {
                step: step(
                    op.lease,
                    STARTED,
                    StepEnd::Advance {
                        to: "authorizing".into(),
                        lease_until: Timestamp(NOW + LEASE),
                    },
                ),
                order_id: *id,
            })
        });
        let with_first = |key: &str, order: i64| {
            let (a, mut write) = begin(a, key);
            if let StepWrite::Begin {
                prefetch, first: f, ..
            } = &mut write
            {
                *prefetch = Some(Prefetch::Order(order));
                *f = Some(first.clone());
            }
            (a, write)
        };
        let writes = vec![
            with_first("k1", orders[0].id),
            with_first("k2", orders[0].id),
            with_first("k3", undecided),
        ];
        let (begun, commits) = together(&store, writes).await;
        assert_eq!(commits, 1, "three claims, one commit");
        let points: Vec<String> = begun
            .iter()
            .map(|out| match out {
                StepOut::Begun(Ok(Begun::Leased(op))) => op.recovery_point.clone(),
                _ => panic!("expected a lease"),
            })
            .collect();
        assert_eq!(points, vec!["authorizing", STARTED, STARTED]);
        let readers = store.readers.clone();
        let claimed_by = |order: i64| {
            let readers = readers.clone();
            async move {
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT payment_operation_id FROM orders WHERE account_id = ? AND id = ?",
                )
                .bind(a)
                .bind(order)
                .fetch_one(&readers)
                .await
                .unwrap()
            }
        };
        assert_eq!(
            claimed_by(orders[0].id).await,
            Some(leased(&begun[0]).record_id)
        );
        assert_eq!(claimed_by(undecided).await, None);
        let again = vec![claim_order(a, leased(&begun[2]), undecided)];
        let (claimed, _) = together(&store, again).await;
        assert!(matches!(claimed[0], StepOut::Claimed(Ok(()))));
    }

    /// Claims, order claims and payments of several operations each share one transaction,
    /// and a step that may not write (a duplicate key, an order paid by another operation,
    /// a stale fencing token) gets its own answer and writes nothing, while its neighbours
    /// commit.
    #[tokio::test(flavor = "current_thread")]
    async fn steps_share_a_transaction_and_keep_their_own_outcomes() {
        let (_dir, store, a, orders) = fixture(&[100, 200, 300]).await;
        let keys = vec![
            begin(a, "k1"),
            begin(a, "k2"),
            begin(a, "k3"),
            begin(a, "k1"),
        ];
        let (begun, commits) = together(&store, keys).await;
        assert_eq!(commits, 1, "four claims, one commit");
        let leases: Vec<Lease> = begun[..3].iter().map(leased).collect();
        assert!(
            matches!(&begun[3], StepOut::Begun(Ok(Begun::Existing(r))) if r.in_flight.is_some()),
            "the same key again in the batch finds the work in flight"
        );

        let claims = vec![
            claim_order(a, leases[0], orders[0].id),
            claim_order(a, leases[1], orders[1].id),
            // Order 1 again, for another operation: refused by the order's rule.
            claim_order(a, leases[2], orders[0].id),
            // A replaced driver of operation 3: fenced, order 3 stays unclaimed.
            claim_order(a, stale(leases[2]), orders[2].id),
        ];
        let (claimed, commits) = together(&store, claims).await;
        assert_eq!(commits, 1);
        assert!(matches!(claimed[0], StepOut::Claimed(Ok(()))));
        assert!(matches!(claimed[1], StepOut::Claimed(Ok(()))));
        assert!(matches!(
            claimed[2],
            StepOut::Claimed(Err(StorageError::Rule(Rule::OrderPaymentInProgress)))
        ));
        assert!(matches!(
            claimed[3],
            StepOut::Claimed(Err(StorageError::Fenced))
        ));
        // Operation 3 is still at its start, so it can claim order 3 now.
        let (again, _) = together(&store, vec![claim_order(a, leases[2], orders[2].id)]).await;
        assert!(matches!(again[0], StepOut::Claimed(Ok(()))));

        let pays = vec![
            pay(a, leases[0], &orders[0], true),
            pay(a, stale(leases[2]), &orders[2], true),
            pay(a, leases[1], &orders[1], true),
        ];
        let (recorded, commits) = together(&store, pays).await;
        assert_eq!(commits, 1);
        let (p1, p2) = (paid(&recorded[0]).id, paid(&recorded[2]).id);
        assert!(matches!(
            recorded[1],
            StepOut::Recorded(Err(StorageError::Fenced))
        ));

        // The fenced payment wrote nothing: two payments, two orders paid, order 3 pending,
        // and the ledger holds exactly the two captures.
        let filter = PaymentFilter {
            page: PageRequest {
                limit: 10,
                starting_after: None,
            },
            order_id: None,
        };
        let payments = store.list_payments(a, filter).await.unwrap();
        assert_eq!(payments.items.len(), 2);
        for (order, status) in [(0, "paid"), (1, "paid"), (2, "pending")] {
            assert_eq!(order_status(&store, a, &orders[order]).await, status);
        }
        assert_eq!(available(&store, a).await, (300, 0));
        for p in [p1, p2] {
            assert_eq!(events(&store, a, "payment", p).await, ["payment.succeeded"]);
        }
        for (order, expected) in [(0, 1), (1, 1), (2, 0)] {
            let types = events(&store, a, "order", orders[order].id).await;
            let paid = types.iter().filter(|t| *t == "order.paid").count();
            assert_eq!(paid, expected);
        }
        // Each finished operation stored the answer rendered for its own payment.
        for (key, p) in [("k1", p1), ("k2", p2)] {
            let record = store.find_idempotency(a, key, Timestamp(NOW)).await;
            let record = record.unwrap().unwrap();
            assert!(record.in_flight.is_none());
            assert_eq!(record.response.body, p.to_string().into_bytes());
            assert_eq!(record.resource_id, Some(p));
        }
        // Operation 3 is still in flight at its recovery point.
        let record = store.find_idempotency(a, "k3", Timestamp(NOW)).await;
        assert!(record.unwrap().unwrap().in_flight.is_some());
    }

    /// Captures share a transaction too: a second capture of a payment the batch just
    /// captured is refused by the payment's state, a stale driver is fenced, and neither
    /// writes a ledger entry or an event; a partial capture releases the rest and leaves the
    /// order pending.
    #[tokio::test(flavor = "current_thread")]
    async fn captures_share_a_transaction_and_keep_their_own_outcomes() {
        let (_dir, store, a, orders) = fixture(&[100, 200, 300]).await;
        let p = pay_all(&store, a, &orders, false).await;
        assert_eq!(available(&store, a).await, (0, 600));
        let l = leases(&store, a, &["c1", "c2", "c3", "c4"]).await;
        let capture = |lease: Lease, p: &Payment, minor: i64| {
            let write = StepWrite::CapturePayment {
                step: finishing(lease, STARTED),
                payment_id: p.id,
                authorized: p.amount,
                captured_minor: minor,
                respond: respond(),
            };
            (a, write)
        };
        let captures = vec![
            capture(l[0], &p[0], 100),
            capture(l[1], &p[0], 100),
            capture(stale(l[2]), &p[2], 300),
            capture(l[3], &p[1], 150),
        ];
        let (out, commits) = together(&store, captures).await;
        // Full and partial captures have differently shaped ledger entries: one call each,
        // one transaction for all.
        assert_eq!(commits, 1);
        assert_eq!(paid(&out[0]).status, PaymentStatus::Succeeded);
        assert!(matches!(
            out[1],
            StepOut::Recorded(Err(StorageError::Rule(Rule::PaymentState(
                PaymentStatus::Succeeded
            ))))
        ));
        assert!(matches!(
            out[2],
            StepOut::Recorded(Err(StorageError::Fenced))
        ));
        assert_eq!(paid(&out[3]).captured_minor, 150);
        // 100 + 150 available; the 300 authorization still pending; 50 released.
        assert_eq!(available(&store, a).await, (250, 300));
        assert_eq!(order_status(&store, a, &orders[0]).await, "paid");
        assert_eq!(order_status(&store, a, &orders[1]).await, "pending");
        assert_eq!(order_status(&store, a, &orders[2]).await, "pending");
        let captured = ["payment.authorized", "payment.captured"];
        assert_eq!(events(&store, a, "payment", p[0].id).await, captured);
        assert_eq!(events(&store, a, "payment", p[1].id).await, captured);
        assert_eq!(
            events(&store, a, "payment", p[2].id).await,
            ["payment.authorized"]
        );
        for (key, done) in [("c1", true), ("c2", false), ("c3", false), ("c4", true)] {
            let record = store.find_idempotency(a, key, Timestamp(NOW)).await;
            assert_eq!(record.unwrap().unwrap().in_flight.is_none(), done, "{key}");
        }
        // Every entry balances and every balance is the sum of its postings.
        let store: bursar_storage::conformance::Store = Arc::new(store);
        bursar_storage::conformance::check_ledger(&store, a).await;
    }
}
