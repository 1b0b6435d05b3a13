//! Group commit for the record of a payment's charge (`MoneyStore::record_payment`) and of
//! its capture (`MoneyStore::capture_payment`), as creates have it (`batch`).
//!
//! A payment's record was one statement per payment, in autocommit. Measured, that statement
//! cost more than the key's whole claim transaction, while dropping its ledger rows changed
//! nothing (docs/PERFORMANCE.md): what it costs is per statement — the executor's set-up of a
//! dozen data-modifying parts, the round trip, the commit — not per row. So records waiting
//! together go in one set-based statement: each payment is a row of the input arrays, every
//! write is a join on the steps that took, and the statement is static, prepared once.
//!
//! Fencing stays per payment: the statement starts with every record's fenced step, and each
//! other part writes only for the payments whose step took (`stepped`), so a replaced
//! driver's payment writes nothing while its neighbours commit, and is answered `Fenced`.
//!
//! Order of writes, as the single statement had it: the payments' events get their ids before
//! any order's event (the orders' move reads the whole of `ev`); each payment's journal
//! entries get ids in its entries' order (one insert sorted by entry); balance rows are locked
//! in one total order, (account, currency, ledger account, shard) bytewise, of which every
//! single command's order (currency, ledger account on its shard) is a part, so a batch and a
//! command wait for each other instead of deadlocking. The records' own rows are locked first:
//! only the same work's takeovers touch them, and those lock the record first too.
//!
//! A capture goes the same way ([`CAPTURES`], writer `captures`), with the payment's move to
//! succeeded in place of its insert. Its response and event are rendered before the write
//! from the payment as the caller read it, so a capture writes only where the payment is
//! still at the version read and its work's key still held (locked first). One that did not
//! take wrote nothing, and the caller settles it alone from the payment as stored, which
//! answers exactly: fenced, no longer capturable, or captured after all.

use async_trait::async_trait;
use bursar_domain::ledger::Entry;
use bursar_storage::group_commit::{Batchable, GroupWriter};
use bursar_storage::money::{NewPayment, Payment, PaymentStatus, Responder, Step, StepEnd};
use bursar_storage::{NewEvent, StorageError, StoredResponse, WriteMeta, decode};
use sqlx::Row;
use sqlx::postgres::PgPool;

use crate::err;

/// Most records one statement carries.
pub const MAX_BATCH: usize = 64;

/// Most bytes of bound data one statement carries ([`Batchable::bound_bytes`]). A record
/// binds about 2.5 KiB (its response and event are rendered), so creates' bound
/// (`batch::STATEMENT_BYTES`, one TLS record, against a stall sqlx 0.9.0 had with Nagle's
/// algorithm on) would cut batches at four. sqlx sets `TCP_NODELAY` since 0.9.1, so a
/// statement may span several TLS records without waiting for a delayed ACK.
pub const STATEMENT_BYTES: usize = 256 * 1024;

/// What a recorded payment does to its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderMove {
    /// Nothing (an authorization awaiting capture).
    Stay,
    /// Pending to paid, with `order.paid`, if the payment captured the order's whole amount.
    Follow,
    /// The work's claim on the order goes (the payment failed), so it can be paid again.
    Release,
}

impl OrderMove {
    fn as_str(self) -> &'static str {
        match self {
            OrderMove::Stay => "stay",
            OrderMove::Follow => "follow",
            OrderMove::Release => "release",
        }
    }
}

/// One payment's record, rendered before the write: the payment with its drawn id, its
/// ledger entries, its event and the response its work stores.
#[derive(Clone)]
pub(crate) struct Record {
    pub step: Step,
    pub payment: Payment,
    pub entries: Vec<Entry>,
    pub order: OrderMove,
    pub event: NewEvent,
    pub response: StoredResponse,
    /// `response.headers` as the JSON text stored.
    pub headers: String,
    /// The balance shard its card movements go to.
    pub shard: i16,
}

impl Batchable for Record {
    /// One statement for every record, whatever its outcome.
    fn same_kind(&self, _other: &Record) -> bool {
        true
    }

    /// Its texts plus a length prefix or fixed width per bound element.
    fn bound_bytes(&self) -> usize {
        const PER_ELEMENT: usize = 8;
        let p = &self.payment;
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let postings: usize = self.entries.iter().map(|e| e.postings().len()).sum();
        28 * PER_ELEMENT
            + 3 * PER_ELEMENT * self.entries.len()
            + 5 * PER_ELEMENT * postings
            + self.step.from.len()
            + self.step.state.len()
            + self.headers.len()
            + self.response.body.len()
            + text(&p.processor_id)
            + p.payment_method.len()
            + text(&p.failure_code)
            + text(&p.failure_message)
            + self.event.event_type.len()
            + self.event.payload.len()
            + 2 * 40
    }
}

/// The records' group-commit writer.
pub(crate) struct PgRecords {
    pub pool: PgPool,
}

/// The fenced step of each input row whose other conditions `$from` joins in, storing its
/// response and finishing its work, then the rows whose step took (`stepped`), which every
/// later part joins on: a row whose step did not take writes nothing.
macro_rules! step_parts {
    ($from:literal) => {
        concat!(
            "step AS (UPDATE idempotency_keys k SET recovery_point = 'finished', \
               phase_state = i.state, response_status = i.status, \
               response_headers = i.headers, response_body = i.body, \
               resource_id = i.payment_id, locked_until = NULL, last_run_at = i.at, \
               expires_at = i.expires_at \
             FROM ",
            $from,
            " WHERE k.id = i.record_id AND k.fence = i.fence \
               AND k.recovery_point = i.from_point \
             RETURNING i.slot), \
           stepped AS MATERIALIZED (SELECT i.* FROM input i JOIN step USING (slot)), "
        )
    };
}

/// For every row that `stepped`: the payment's event, its journal entries (the entries' arrays
/// `$e`, `$k`, ordered) with their postings (the postings' arrays `$ps` to `$pm`) and the
/// balances they move, locked in the one total order.
macro_rules! ledger_parts {
    ($e:literal, $k:literal, $ps:literal, $pk:literal, $pl:literal, $pc:literal, $pm:literal) => {
        concat!(
            "ev AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
               aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, event_type, aggregate_type, payment_id, event_version, \
               payload::jsonb, request_id, trace_id, at FROM stepped ORDER BY slot \
             RETURNING id), \
           ein AS (SELECT * FROM unnest($",
            $e,
            "::bigint[], $",
            $k,
            "::text[]) WITH ORDINALITY AS e(slot, kind, n)), \
           je AS (INSERT INTO journal_entries (account_id, kind, reference_type, \
               reference_id, created_at) \
             SELECT s.account_id, e.kind, 'payment', s.payment_id, s.at \
             FROM ein e JOIN stepped s USING (slot) ORDER BY e.n \
             RETURNING id, reference_id, kind), \
           pin AS (SELECT * FROM unnest($",
            $ps,
            "::bigint[], $",
            $pk,
            "::text[], $",
            $pl,
            "::text[], $",
            $pc,
            "::text[], $",
            $pm,
            "::bigint[]) WITH ORDINALITY AS p(slot, kind, l, c, m, n)), \
           pst AS (INSERT INTO postings (entry_id, account_id, ledger_account, currency, \
               amount_minor) \
             SELECT je.id, s.account_id, p.l, p.c, p.m \
             FROM pin p JOIN stepped s USING (slot) \
               JOIN je ON je.reference_id = s.payment_id AND je.kind = p.kind \
             ORDER BY p.n), \
           bal AS (INSERT INTO balances (account_id, ledger_account, currency, shard, \
               amount_minor, updated_at) \
             SELECT s.account_id, p.l, p.c, s.shard, sum(p.m)::bigint, max(s.at) \
             FROM pin p JOIN stepped s USING (slot) \
             GROUP BY s.account_id, p.c, p.l, s.shard \
             ORDER BY s.account_id, p.c COLLATE \"C\", p.l COLLATE \"C\", s.shard \
             ON CONFLICT (account_id, currency, ledger_account, shard) DO UPDATE SET \
               amount_minor = balances.amount_minor + EXCLUDED.amount_minor, \
               updated_at = EXCLUDED.updated_at), "
        )
    };
}

/// For every row that `stepped` with `order_move` follow: its pending order moves to paid
/// when the payment captured the order's whole amount, with `order.paid`. The move reads the
/// whole of `ev`, so every payment's event gets its id before any order's.
macro_rules! order_parts {
    () => {
        concat!(
            "paid AS (UPDATE orders r SET status = 'paid', version = r.version + 1, \
               updated_at = s.at FROM stepped s \
             WHERE s.order_move = 'follow' AND r.account_id = s.account_id \
               AND r.id = s.order_id AND r.status = 'pending' \
               AND r.amount_minor = s.captured_minor AND (SELECT count(*) FROM ev) > 0 \
             RETURNING r.*, s.request_id AS rid, s.trace_id AS tid, s.slot), \
           oe AS (INSERT INTO outbox_events (account_id, event_type, aggregate_type, \
               aggregate_id, aggregate_version, payload, request_id, trace_id, created_at) \
             SELECT account_id, 'order.' || status, 'order', id, version, ",
            order_json!(),
            ", rid, tid, updated_at FROM paid ORDER BY slot) "
        )
    };
}

/// One row per payment from the arrays `$1`–`$28` (`slot` is its place, from 1), as
/// [`Columns`] binds them.
macro_rules! input_part {
    ($more:literal, $names:literal) => {
        concat!(
            "WITH input AS MATERIALIZED (\
               SELECT t.* FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], \
                 $5::text[], $6::int[], $7::text[], $8::bytea[], $9::bigint[], $10::bigint[], \
                 $11::bigint[], $12::bigint[], $13::text[], $14::text[], $15::bigint[], \
                 $16::text[], $17::text[], $18::bigint[], $19::text[], $20::text[], \
                 $21::text[], $22::text[], $23::bigint[], $24::text[], $25::text[], \
                 $26::text[], $27::text[], $28::smallint[]",
            $more,
            ") WITH ORDINALITY AS t(account_id, record_id, fence, from_point, state, status, \
                 headers, body, at, expires_at, payment_id, order_id, processor_id, method, \
                 amount_minor, currency, pstatus, captured_minor, failure_code, \
                 failure_message, event_type, aggregate_type, event_version, payload, \
                 request_id, trace_id, order_move, shard",
            $names,
            ", slot)), "
        )
    };
}

/// One payment per input row, its entries in `$29`–`$30` and their postings in `$31`–`$35`,
/// each found by slot (and by kind, which is unique within a payment's entries). The
/// statement returns the slots whose step took.
const RECORDS: &str = concat!(
    input_part!("", ""),
    step_parts!("input i"),
    "pay AS (INSERT INTO payments (id, account_id, order_id, operation_id, processor_id, \
           payment_method, amount_minor, currency, status, captured_minor, failure_code, \
           failure_message, created_at, updated_at) OVERRIDING SYSTEM VALUE \
         SELECT payment_id, account_id, order_id, record_id, processor_id, method, \
           amount_minor, currency, pstatus, captured_minor, failure_code, failure_message, \
           at, at FROM stepped ORDER BY slot), ",
    ledger_parts!(29, 30, 31, 32, 33, 34, 35),
    "rel AS (UPDATE orders r SET payment_operation_id = NULL FROM stepped s \
         WHERE s.order_move = 'release' AND r.account_id = s.account_id \
           AND r.id = s.order_id AND r.payment_operation_id = s.record_id), ",
    order_parts!(),
    "SELECT slot FROM stepped"
);

/// Captures, one per input row: the payment as the capture leaves it, its version before in
/// `$36`; the capture's entry and postings as [`RECORDS`] has them. Each row's key record is
/// locked first, and only if its lease still holds; the payment moves to succeeded only
/// where it did and the payment is still the authorization that was read (same version,
/// amount and order); the step then cannot miss. Payments are locked after their keys, as a
/// capture alone locks its payment before its key: the two meet only on one work's own rows
/// under two drivers, one of which the fence already turned away. Returns the slots that
/// took; the others wrote nothing.
const CAPTURES: &str = concat!(
    input_part!(", $36::bigint[]", ", read_version"),
    "held AS MATERIALIZED (SELECT i.slot FROM input i JOIN idempotency_keys k \
         ON k.id = i.record_id AND k.fence = i.fence AND k.recovery_point = i.from_point \
         ORDER BY k.id FOR NO KEY UPDATE OF k), \
     settled AS (UPDATE payments p SET status = 'succeeded', \
           captured_minor = i.captured_minor, version = p.version + 1, updated_at = i.at \
         FROM input i JOIN held USING (slot) \
         WHERE p.account_id = i.account_id AND p.id = i.payment_id \
           AND p.status = 'requires_capture' AND p.version = i.read_version \
           AND p.amount_minor = i.amount_minor AND p.currency = i.currency \
           AND p.order_id = i.order_id AND i.captured_minor BETWEEN 0 AND p.amount_minor \
         RETURNING i.slot), ",
    step_parts!("input i JOIN settled USING (slot)"),
    ledger_parts!(29, 30, 31, 32, 33, 34, 35),
    order_parts!(),
    "SELECT slot FROM stepped"
);

/// The arrays of [`RECORDS`], one element per payment (`$1`–`$28`), per entry (`$29`–`$30`)
/// and per posting (`$31`–`$35`).
#[derive(Default)]
struct Columns<'a> {
    accounts: Vec<i64>,
    records: Vec<i64>,
    fences: Vec<i64>,
    froms: Vec<&'a str>,
    states: Vec<&'a str>,
    statuses: Vec<i32>,
    headers: Vec<&'a str>,
    bodies: Vec<&'a [u8]>,
    at: Vec<i64>,
    expires: Vec<i64>,
    payments: Vec<i64>,
    orders: Vec<i64>,
    processor_ids: Vec<Option<&'a str>>,
    methods: Vec<&'a str>,
    amounts: Vec<i64>,
    currencies: Vec<&'static str>,
    payment_statuses: Vec<&'static str>,
    captured: Vec<i64>,
    failure_codes: Vec<Option<&'a str>>,
    failure_messages: Vec<Option<&'a str>>,
    event_types: Vec<&'a str>,
    aggregate_types: Vec<&'static str>,
    event_versions: Vec<i64>,
    payloads: Vec<&'a str>,
    request_ids: Vec<&'a str>,
    trace_ids: Vec<&'a str>,
    order_moves: Vec<&'static str>,
    shards: Vec<i16>,
    entry_slots: Vec<i64>,
    entry_kinds: Vec<&'static str>,
    posting_slots: Vec<i64>,
    posting_kinds: Vec<&'static str>,
    posting_accounts: Vec<&'static str>,
    posting_currencies: Vec<&'static str>,
    posting_minors: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, slot: i64, meta: &'a WriteMeta, r: &'a Record) -> Result<(), StorageError> {
        let StepEnd::Finish { expires_at } = r.step.end else {
            return Err(StorageError::Internal("a record finishes its work".into()));
        };
        let p = &r.payment;
        self.accounts.push(meta.account_id);
        self.records.push(r.step.lease.record_id);
        self.fences.push(r.step.lease.fence);
        self.froms.push(&r.step.from);
        self.states.push(&r.step.state);
        self.statuses.push(i32::from(r.response.status));
        self.headers.push(&r.headers);
        self.bodies.push(&r.response.body);
        self.at.push(meta.at.0);
        self.expires.push(expires_at.0);
        self.payments.push(p.id);
        self.orders.push(p.order_id);
        self.processor_ids.push(p.processor_id.as_deref());
        self.methods.push(&p.payment_method);
        self.amounts.push(p.amount.minor);
        self.currencies.push(p.amount.currency.code());
        self.payment_statuses.push(p.status.as_str());
        self.captured.push(p.captured_minor);
        self.failure_codes.push(p.failure_code.as_deref());
        self.failure_messages.push(p.failure_message.as_deref());
        self.event_types.push(&r.event.event_type);
        self.aggregate_types.push(r.event.aggregate_type);
        self.event_versions.push(r.event.aggregate_version);
        self.payloads.push(&r.event.payload);
        self.request_ids.push(&meta.request_id);
        self.trace_ids.push(&meta.trace_id);
        self.order_moves.push(r.order.as_str());
        self.shards.push(r.shard);
        for entry in &r.entries {
            let kind = entry.kind().as_str();
            self.entry_slots.push(slot);
            self.entry_kinds.push(kind);
            for posting in entry.postings() {
                self.posting_slots.push(slot);
                self.posting_kinds.push(kind);
                self.posting_accounts.push(posting.ledger_account.as_str());
                self.posting_currencies.push(posting.currency.code());
                self.posting_minors.push(posting.minor);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl GroupWriter for PgRecords {
    type Item = Record;
    /// Whether the record's step took; if not, it wrote nothing.
    type Out = bool;
    const NAME: &'static str = "records";

    async fn write(&self, batch: &[(WriteMeta, Record)]) -> Result<Vec<bool>, StorageError> {
        write(&self.pool, RECORDS, batch, false).await
    }

    fn took(out: &bool) -> bool {
        *out
    }
}

/// The captures' group-commit writer: a [`Record`] of the payment as its capture leaves it
/// (`MoneyStore::capture_payment`), written only if the payment is still as read.
pub(crate) struct PgCaptures {
    pub pool: PgPool,
}

#[async_trait]
impl GroupWriter for PgCaptures {
    type Item = Record;
    /// Whether the capture took; if not, it wrote nothing.
    type Out = bool;
    const NAME: &'static str = "captures";

    async fn write(&self, batch: &[(WriteMeta, Record)]) -> Result<Vec<bool>, StorageError> {
        write(&self.pool, CAPTURES, batch, true).await
    }

    fn took(out: &bool) -> bool {
        *out
    }
}

/// Runs `statement` over `batch` ([`RECORDS`] or [`CAPTURES`], which also takes each
/// payment's version before, `$36`) and says which rows took.
async fn write(
    pool: &PgPool,
    statement: &'static str,
    batch: &[(WriteMeta, Record)],
    read_versions: bool,
) -> Result<Vec<bool>, StorageError> {
    let mut c = Columns::default();
    for (slot, (meta, record)) in (1..).zip(batch) {
        c.push(slot, meta, record)?;
    }
    let mut q = sqlx::query(statement)
        .bind(&c.accounts)
        .bind(&c.records)
        .bind(&c.fences)
        .bind(&c.froms)
        .bind(&c.states)
        .bind(&c.statuses)
        .bind(&c.headers)
        .bind(&c.bodies)
        .bind(&c.at)
        .bind(&c.expires)
        .bind(&c.payments)
        .bind(&c.orders)
        .bind(&c.processor_ids)
        .bind(&c.methods)
        .bind(&c.amounts)
        .bind(&c.currencies)
        .bind(&c.payment_statuses)
        .bind(&c.captured)
        .bind(&c.failure_codes)
        .bind(&c.failure_messages)
        .bind(&c.event_types)
        .bind(&c.aggregate_types)
        .bind(&c.event_versions)
        .bind(&c.payloads)
        .bind(&c.request_ids)
        .bind(&c.trace_ids)
        .bind(&c.order_moves)
        .bind(&c.shards)
        .bind(&c.entry_slots)
        .bind(&c.entry_kinds)
        .bind(&c.posting_slots)
        .bind(&c.posting_kinds)
        .bind(&c.posting_accounts)
        .bind(&c.posting_currencies)
        .bind(&c.posting_minors);
    if read_versions {
        let before: Vec<i64> = batch.iter().map(|(_, r)| r.payment.version - 1).collect();
        q = q.bind(before);
    }
    let rows = q.fetch_all(pool).await.map_err(err)?;
    let mut took = vec![false; batch.len()];
    for row in rows {
        let slot: i64 = row.try_get("slot").map_err(err)?;
        if let Some(t) = usize::try_from(slot - 1).ok().and_then(|s| took.get_mut(s)) {
            *t = true;
        }
    }
    Ok(took)
}

/// A [`Record`] of `payment`, recorded as `new`, finishing `step`, with what its work stores.
pub(crate) fn record(
    step: &Step,
    (new, payment): (&NewPayment, Payment),
    (event, response): (NewEvent, StoredResponse),
    shard: i16,
) -> Record {
    let order = match payment.status {
        PaymentStatus::Failed => OrderMove::Release,
        PaymentStatus::Succeeded => OrderMove::Follow,
        PaymentStatus::RequiresCapture | PaymentStatus::Canceled => OrderMove::Stay,
    };
    Record {
        step: step.clone(),
        payment,
        entries: new.entries(),
        order,
        headers: decode::headers_json(&response.headers),
        event,
        response,
        shard,
    }
}

/// A [`Record`] of the capture of `captured_minor` of the authorization `read`, finishing
/// `step` at `meta.at`: the payment as the capture leaves it (one version on), with its
/// entry, `payment.captured` and the answer rendered from it before the write.
pub(crate) fn capture(
    (meta, step): (&WriteMeta, &Step),
    read: &Payment,
    captured_minor: i64,
    respond: &Responder<Payment>,
    shard: i16,
) -> Record {
    let payment = Payment {
        status: PaymentStatus::Succeeded,
        captured_minor,
        version: read.version + 1,
        updated_at: meta.at,
        ..read.clone()
    };
    let response = respond(&payment);
    Record {
        step: step.clone(),
        entries: vec![Entry::capture(read.amount, captured_minor)],
        order: OrderMove::Follow,
        event: NewEvent::for_payment("captured", &payment),
        headers: decode::headers_json(&response.headers),
        response,
        shard,
        payment,
    }
}
