//! Conformance cases of payments, refunds, the ledger and conversions (`crate::money`),
//! identical on every backend. After each case the ledger invariants are checked: every
//! entry balances per currency, and every balance is the sum of its postings.

use std::collections::BTreeMap;

use bursar_domain::ledger::{EntryKind, LedgerAccount, is_balanced};

use super::*;
use crate::money::*;
use crate::operations::{FirstPhase, FirstStep, Prefetch, Prefetched, STARTED};

const LEASE: i64 = 90_000;

fn claim(key: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        method: "POST".into(),
        route: "/api/payments".into(),
        fingerprint: format!("fp-{key}"),
        expires_at: Timestamp(NOW + DAY),
    }
}

async fn lease(s: &Store, account: i64, key: &str) -> Lease {
    leased_with(s, account, key, None, None).await.lease
}

/// New work under `key`, claimed with `prefetch` and `first`.
async fn leased_with(
    s: &Store,
    account: i64,
    key: &str,
    prefetch: Option<Prefetch>,
    first: Option<FirstPhase>,
) -> LeasedOperation {
    match s
        .begin_operation(
            &meta(account),
            &claim(key),
            b"{}",
            Timestamp(NOW + LEASE),
            prefetch,
            first,
        )
        .await
        .unwrap()
    {
        Begun::Leased(op) => op,
        Begun::Existing(r) => panic!("expected a lease, got {r:?}"),
    }
}

/// `lease` as a driver holds it after another took its work over (one fence later).
fn overtaken(lease: Lease) -> Lease {
    Lease {
        fence: lease.fence + 1,
        ..lease
    }
}

fn finish(lease: Lease) -> Step {
    Step {
        lease,
        from: STARTED.into(),
        state: "{}".into(),
        now: Timestamp(NOW),
        end: StepEnd::Finish {
            expires_at: Timestamp(NOW + DAY),
        },
    }
}

fn advance(lease: Lease, to: &str) -> Step {
    Step {
        end: StepEnd::Advance {
            to: to.into(),
            lease_until: Timestamp(NOW + LEASE),
        },
        ..finish(lease)
    }
}

fn answer<T: std::fmt::Debug>(what: &T) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: format!("{what:?}").into_bytes(),
    }
}

/// [`answer`] as a payment command takes it.
fn payment_answer() -> Responder<Payment> {
    std::sync::Arc::new(answer)
}

fn new_payment(order: &Order, status: PaymentStatus, captured: i64) -> NewPayment {
    NewPayment {
        order_id: order.id,
        amount: order.amount,
        payment_method: "pm_card_visa".into(),
        processor_id: Some("pay_1".into()),
        status,
        captured_minor: captured,
        failure: None,
    }
}

async fn pay(s: &Store, account: i64, key: &str, order: &Order, status: PaymentStatus) -> Payment {
    let captured = if status == PaymentStatus::Succeeded {
        order.amount.minor
    } else {
        0
    };
    let l = lease(s, account, key).await;
    s.record_payment(
        &meta(account),
        &finish(l),
        new_payment(order, status, captured),
        payment_answer(),
    )
    .await
    .unwrap()
}

fn balance(all: &[Balance], account: LedgerAccount, code: &str) -> i64 {
    all.iter()
        .find(|b| b.ledger_account == account && b.currency.code() == code)
        .map_or(0, |b| b.minor)
}

/// Every entry balances per currency; every balance equals the sum of its postings.
pub async fn check_ledger(s: &Store, account: i64) {
    let mut sums: BTreeMap<(LedgerAccount, String), i64> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = s.journal(account, page(100, after)).await.unwrap();
        for e in &page.items {
            assert_eq!(e.account_id, account);
            assert!(is_balanced(&e.postings), "unbalanced entry {e:?}");
            for p in &e.postings {
                *sums
                    .entry((p.ledger_account, p.currency.code().to_owned()))
                    .or_default() += p.minor;
            }
        }
        if !page.has_more {
            break;
        }
        after = page.items.last().map(|e| e.id);
    }
    let balances = s.balances(account).await.unwrap();
    let stored: BTreeMap<(LedgerAccount, String), i64> = balances
        .iter()
        .map(|b| ((b.ledger_account, b.currency.code().to_owned()), b.minor))
        .collect();
    assert_eq!(
        stored, sums,
        "balances must equal the sum of their postings"
    );
}

pub async fn payments_post_balanced_entries_and_follow_the_order(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1999).await;
    let l = lease(&s, a, "pay-1").await;
    // A step fenced out writes nothing at all: no payment, no ledger, no event.
    let fenced = s
        .record_payment(
            &meta(a),
            &finish(overtaken(l)),
            new_payment(&o, PaymentStatus::Succeeded, 1999),
            payment_answer(),
        )
        .await;
    assert!(matches!(fenced, Err(StorageError::Fenced)), "{fenced:?}");
    assert!(s.balances(a).await.unwrap().is_empty());
    assert!(s.journal(a, page(10, None)).await.unwrap().items.is_empty());
    let of_order = PaymentFilter {
        page: page(10, None),
        order_id: Some(o.id),
    };
    assert!(s.list_payments(a, of_order).await.unwrap().items.is_empty());
    let untouched = s.get_order(a, o.id).await.unwrap().unwrap();
    assert_eq!(
        (untouched.status, untouched.version),
        (OrderStatus::Pending, o.version)
    );
    let order_events = s.events_for(a, "order", o.id).await.unwrap();
    assert_eq!(
        order_events.len(),
        1,
        "only order.created: {order_events:?}"
    );
    let p = s
        .record_payment(
            &meta(a),
            &finish(l),
            new_payment(&o, PaymentStatus::Succeeded, 1999),
            payment_answer(),
        )
        .await
        .unwrap();
    assert_eq!(
        (p.status, p.captured_minor, p.refunded_minor, p.version),
        (PaymentStatus::Succeeded, 1999, 0, 1)
    );
    assert_eq!(s.get_payment(a, p.id).await.unwrap(), Some(p.clone()));
    // The step stored the response naming the payment and finished the record.
    let record = s
        .find_idempotency(a, "pay-1", Timestamp(NOW))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.in_flight, None);
    assert_eq!(record.resource_id, Some(p.id));
    assert_eq!(record.response, answer(&p));
    // A second payment of the same work cannot be written.
    let again = s
        .record_payment(
            &meta(a),
            &finish(l),
            new_payment(&o, PaymentStatus::Succeeded, 1999),
            payment_answer(),
        )
        .await;
    assert!(again.is_err());
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 1999);
    assert_eq!(balance(&b, LedgerAccount::Pending, "USD"), 0);
    assert_eq!(balance(&b, LedgerAccount::ProcessorClearing, "USD"), -1999);
    // Captured at once: the authorization, then its capture, each entry with its own
    // postings (a backend may write them together).
    let journal = s.journal(a, page(10, None)).await.unwrap().items;
    let booked: Vec<(EntryKind, Vec<(LedgerAccount, i64)>)> = journal
        .iter()
        .rev()
        .map(|e| {
            assert_eq!(
                (e.reference_type.as_str(), e.reference_id),
                ("payment", p.id)
            );
            let mut lines: Vec<_> = e
                .postings
                .iter()
                .map(|p| (p.ledger_account, p.minor))
                .collect();
            lines.sort();
            (e.kind, lines)
        })
        .collect();
    assert_eq!(
        booked,
        [
            (
                EntryKind::Authorization,
                vec![
                    (LedgerAccount::Pending, 1999),
                    (LedgerAccount::ProcessorClearing, -1999)
                ]
            ),
            (
                EntryKind::Capture,
                vec![
                    (LedgerAccount::Available, 1999),
                    (LedgerAccount::Pending, -1999)
                ]
            ),
        ]
    );
    assert_eq!(
        s.get_order(a, o.id).await.unwrap().unwrap().status,
        OrderStatus::Paid
    );
    let events: Vec<String> = s
        .events_for(a, "payment", p.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(events, ["payment.succeeded"]);
    let order_events = s.events_for(a, "order", o.id).await.unwrap();
    let types: Vec<&str> = order_events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["order.created", "order.paid"]);
    // The payment's event comes before the order's move it caused, in the account's sequence
    // (also where a backend writes both in one statement).
    let mut logged = super::events::sequence_all(&s, &super::events::ids()).await;
    logged.sort_by_key(|e| e.seq);
    let caused: Vec<&str> = logged
        .iter()
        .filter(|e| {
            e.account_id == a
                && (e.event_type == "order.paid" || e.event_type.starts_with("payment."))
        })
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(caused, ["payment.succeeded", "order.paid"]);
    // The move's event carries the order as it now stands, in its serde form (a backend may
    // build the payload in SQL).
    let paid = s.get_order(a, o.id).await.unwrap().unwrap();
    assert_eq!(
        (order_events[1].aggregate_version, &order_events[1].payload),
        (paid.version, &serde_json::to_value(&paid).unwrap())
    );
    // A declined payment is recorded without moving money.
    let o2 = order(&s, a, c.id, 500).await;
    let l2 = lease(&s, a, "pay-2").await;
    let failed = s
        .record_payment(
            &meta(a),
            &finish(l2),
            NewPayment {
                processor_id: None,
                failure: Some(("card_declined".into(), "declined".into())),
                ..new_payment(&o2, PaymentStatus::Failed, 0)
            },
            payment_answer(),
        )
        .await
        .unwrap();
    assert_eq!(failed.failure_code.as_deref(), Some("card_declined"));
    assert_eq!(
        s.get_order(a, o2.id).await.unwrap().unwrap().status,
        OrderStatus::Pending
    );
    let listed = s
        .list_payments(
            a,
            PaymentFilter {
                page: page(10, None),
                order_id: Some(o2.id),
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.items, vec![failed]);
    check_ledger(&s, a).await;
}

/// Records that arrive together (a backend may write them in one statement) keep their own
/// outcomes: a fenced one writes nothing and is answered `Fenced`, the others are written as
/// if alone, each payment's event before its order's, each one's entries in order.
pub async fn records_written_together_keep_their_own_outcomes(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let statuses = [
        PaymentStatus::Succeeded,
        PaymentStatus::Failed,
        PaymentStatus::Succeeded,
        PaymentStatus::RequiresCapture,
        PaymentStatus::Succeeded,
        PaymentStatus::Succeeded,
    ];
    let fenced_at = 2;
    let mut writes = Vec::new();
    let mut orders = Vec::new();
    for (i, status) in statuses.into_iter().enumerate() {
        let o = order(&s, a, c.id, 1000 + i64::try_from(i).unwrap()).await;
        let l = lease(&s, a, &format!("together-{i}")).await;
        let step = finish(if i == fenced_at { overtaken(l) } else { l });
        let captured = if status == PaymentStatus::Succeeded {
            o.amount.minor
        } else {
            0
        };
        writes.push((step, new_payment(&o, status, captured)));
        orders.push(o);
    }
    // All at once, so that they wait for the writer together.
    let before = s.writes_taken_together();
    let start = Arc::new(tokio::sync::Barrier::new(writes.len()));
    let mut tasks = Vec::new();
    for (step, new) in writes {
        let (s, start) = (s.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            s.record_payment(&meta(a), &step, new, payment_answer())
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    shared_a_batch(&s, before);
    let mut available = 0;
    let mut pending = 0;
    for (i, (outcome, o)) in outcomes.iter().zip(&orders).enumerate() {
        let stored = s.get_order(a, o.id).await.unwrap().unwrap();
        if i == fenced_at {
            assert!(matches!(outcome, Err(StorageError::Fenced)), "{outcome:?}");
            assert_eq!(stored.status, OrderStatus::Pending);
            let none = PaymentFilter {
                page: page(10, None),
                order_id: Some(o.id),
            };
            assert!(s.list_payments(a, none).await.unwrap().items.is_empty());
            continue;
        }
        let p = outcome.as_ref().unwrap();
        assert_eq!(s.get_payment(a, p.id).await.unwrap().as_ref(), Some(p));
        assert_eq!((p.order_id, p.status), (o.id, statuses[i]));
        let paid = statuses[i] == PaymentStatus::Succeeded;
        let want = if paid {
            OrderStatus::Paid
        } else {
            OrderStatus::Pending
        };
        assert_eq!(stored.status, want, "order of payment {i}");
        match statuses[i] {
            PaymentStatus::Succeeded => available += o.amount.minor,
            PaymentStatus::RequiresCapture => pending += o.amount.minor,
            _ => {}
        }
    }
    // Each payment's entries, in id order: its authorization, then its capture.
    let journal = s.journal(a, page(100, None)).await.unwrap().items;
    for (i, outcome) in outcomes.iter().enumerate() {
        let Ok(p) = outcome else { continue };
        let kinds = entry_kinds(&journal, p.id);
        let want: &[EntryKind] = match statuses[i] {
            PaymentStatus::Succeeded => &[EntryKind::Authorization, EntryKind::Capture],
            PaymentStatus::RequiresCapture => &[EntryKind::Authorization],
            _ => &[],
        };
        assert_eq!(kinds, want, "entries of payment {i}");
    }
    // Each paid order's move comes after its payment's event in the account's sequence.
    let mut logged = super::events::sequence_all(&s, &super::events::ids()).await;
    logged.sort_by_key(|e| e.seq);
    for (outcome, o) in outcomes.iter().zip(&orders) {
        let Ok(p) = outcome else { continue };
        let at = |kind: &str, id: i64| {
            logged
                .iter()
                .position(|e| e.event_type == kind && e.aggregate_id == id)
        };
        let payment_event = at(&format!("payment.{}", kind_of(p.status)), p.id);
        assert!(payment_event.is_some(), "the event of payment {}", p.id);
        if p.status == PaymentStatus::Succeeded {
            assert!(at("order.paid", o.id) > payment_event, "order {}", o.id);
        }
    }
    let balances = s.balances(a).await.unwrap();
    assert_eq!(
        balance(&balances, LedgerAccount::Available, "USD"),
        available
    );
    assert_eq!(balance(&balances, LedgerAccount::Pending, "USD"), pending);
    check_ledger(&s, a).await;
}

/// The kinds of payment `id`'s journal entries in `journal`, in id order.
fn entry_kinds(journal: &[JournalEntry], id: i64) -> Vec<EntryKind> {
    let mut mine: Vec<&JournalEntry> = journal
        .iter()
        .filter(|e| e.reference_type == "payment" && e.reference_id == id)
        .collect();
    mine.sort_by_key(|e| e.id);
    mine.iter().map(|e| e.kind).collect()
}

/// Writes made together must have shared a transaction at least once since `before` (a
/// reading of [`Storage::writes_taken_together`]): their outcomes are the same when each
/// falls back to being written alone, so only this shows that the shared path ran. At least
/// one, not all: the first to arrive may find the writer idle and go alone.
fn shared_a_batch(s: &Store, before: u64) {
    let taken = s.writes_taken_together() - before;
    assert!(taken >= 1, "no write took effect in a batch with others");
}

/// The event a recorded payment of `status` appends (`payment.<kind>`).
fn kind_of(status: PaymentStatus) -> &'static str {
    match status {
        PaymentStatus::Failed => "failed",
        PaymentStatus::RequiresCapture => "authorized",
        PaymentStatus::Succeeded | PaymentStatus::Canceled => "succeeded",
    }
}

/// Captures that wait for the writer together each keep their own outcome: a full capture
/// pays its order and a partial one does not; one whose read is out of date settles from the
/// payment as stored; one of a payment captured meanwhile and one whose lease was taken over
/// write nothing; of two captures of one payment exactly one takes.
pub async fn captures_made_together_keep_their_own_outcomes(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let mut orders = Vec::new();
    let mut read = Vec::new();
    for i in 0..6 {
        let o = order(&s, a, c.id, 1000 + i).await;
        read.push(
            pay(
                &s,
                a,
                &format!("auth-{i}"),
                &o,
                PaymentStatus::RequiresCapture,
            )
            .await,
        );
        orders.push(o);
    }
    let whole = |i: usize| read[i].amount.minor;
    // Payment 3 is captured before the others start, from the same read.
    let l = lease(&s, a, "before").await;
    s.capture_payment(&meta(a), &finish(l), &read[3], whole(3), payment_answer())
        .await
        .unwrap();
    let out_of_date = Payment {
        version: read[2].version + 7,
        ..read[2].clone()
    };
    let wanted = [
        ("full", read[0].clone(), whole(0), false),
        ("partial", read[1].clone(), 600, false),
        ("out-of-date", out_of_date, whole(2), false),
        ("late", read[3].clone(), whole(3), false),
        ("fenced", read[4].clone(), whole(4), true),
        ("twice-1", read[5].clone(), whole(5), false),
        ("twice-2", read[5].clone(), whole(5), false),
    ];
    let mut captures = Vec::new();
    for (key, read, minor, fenced) in wanted {
        let l = lease(&s, a, key).await;
        captures.push((
            key,
            finish(if fenced { overtaken(l) } else { l }),
            read,
            minor,
        ));
    }
    // All at once, so that they wait for the writer together.
    let before = s.writes_taken_together();
    let start = Arc::new(tokio::sync::Barrier::new(captures.len()));
    let mut tasks = Vec::new();
    for (_, step, read, minor) in captures.clone() {
        let (s, start) = (s.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            s.capture_payment(&meta(a), &step, &read, minor, payment_answer())
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    shared_a_batch(&s, before);
    let refused = |o: &Result<Payment>, why: &str| {
        matches!(
            (o, why),
            (Err(StorageError::Fenced), "fenced")
                | (
                    Err(StorageError::Rule(Rule::PaymentState(
                        PaymentStatus::Succeeded
                    ))),
                    "captured"
                )
        )
    };
    for (i, want) in [(0, whole(0)), (1, 600), (2, whole(2))] {
        let p = outcomes[i].as_ref().unwrap();
        assert_eq!(
            (p.status, p.captured_minor, p.version),
            (PaymentStatus::Succeeded, want, 2),
            "capture {i}"
        );
        assert_eq!(s.get_payment(a, p.id).await.unwrap().as_ref(), Some(p));
    }
    assert!(refused(&outcomes[3], "captured"), "{:?}", outcomes[3]);
    assert!(refused(&outcomes[4], "fenced"), "{:?}", outcomes[4]);
    let took: Vec<&Payment> = outcomes[5..]
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .collect();
    assert_eq!(took.len(), 1, "{:?}", &outcomes[5..]);
    assert!(outcomes[5..].iter().any(|o| refused(o, "captured")));
    // What each left behind: the payment, its order, its work's record.
    let stored = |i: usize| {
        let s = s.clone();
        let id = read[i].id;
        async move { s.get_payment(a, id).await.unwrap().unwrap() }
    };
    assert_eq!(
        (stored(3).await.captured_minor, stored(3).await.version),
        (whole(3), 2)
    );
    assert_eq!(stored(4).await.status, PaymentStatus::RequiresCapture);
    assert_eq!(stored(5).await.version, 2);
    for (i, want) in [
        OrderStatus::Paid,
        OrderStatus::Pending,
        OrderStatus::Paid,
        OrderStatus::Paid,
        OrderStatus::Pending,
        OrderStatus::Paid,
    ]
    .into_iter()
    .enumerate()
    {
        let o = s.get_order(a, orders[i].id).await.unwrap().unwrap();
        assert_eq!(o.status, want, "order {i}");
    }
    for ((key, ..), outcome) in captures.iter().zip(&outcomes) {
        let record = s.find_idempotency(a, key, Timestamp(NOW)).await.unwrap();
        let in_flight = record.unwrap().in_flight.is_some();
        assert_eq!(in_flight, outcome.is_err(), "the record of {key}");
    }
    // Each payment captured once: its authorization, then one capture, in id order, and
    // `payment.captured` before the order's move it caused.
    let journal = s.journal(a, page(100, None)).await.unwrap().items;
    let mut logged = super::events::sequence_all(&s, &super::events::ids()).await;
    logged.sort_by_key(|e| e.seq);
    for (i, (p, o)) in read.iter().zip(&orders).enumerate() {
        let kinds = entry_kinds(&journal, p.id);
        let captured = i != 4;
        let want: &[EntryKind] = if captured {
            &[EntryKind::Authorization, EntryKind::Capture]
        } else {
            &[EntryKind::Authorization]
        };
        assert_eq!(kinds, want, "entries of payment {i}");
        let at = |kind: &str, aggregate: &str, id: i64| {
            let found = logged
                .iter()
                .enumerate()
                .filter(|(_, e)| e.event_type == kind && e.aggregate_type == aggregate)
                .filter(|(_, e)| e.aggregate_id == id)
                .map(|(n, _)| n)
                .collect::<Vec<_>>();
            assert!(found.len() <= 1, "{kind} of {id} twice");
            found.first().copied()
        };
        let event = at("payment.captured", "payment", p.id);
        assert_eq!(event.is_some(), captured, "payment {i}");
        if i != 1 && captured {
            assert!(at("order.paid", "order", o.id) > event, "order {i}");
        }
    }
    let balances = s.balances(a).await.unwrap();
    let available = whole(0) + 600 + whole(2) + whole(3) + whole(5);
    assert_eq!(
        balance(&balances, LedgerAccount::Available, "USD"),
        available
    );
    assert_eq!(balance(&balances, LedgerAccount::Pending, "USD"), whole(4));
    check_ledger(&s, a).await;
}

pub async fn captures_and_voids_settle_an_authorization_once(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let p = pay(&s, a, "auth-1", &o, PaymentStatus::RequiresCapture).await;
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Pending, "USD"), 1000);
    // A partial capture releases the rest and does not pay the order.
    let l = lease(&s, a, "cap-1").await;
    let captured = s
        .capture_payment(&meta(a), &finish(l), &p, 600, payment_answer())
        .await
        .unwrap();
    assert_eq!(
        (captured.status, captured.captured_minor, captured.version),
        (PaymentStatus::Succeeded, 600, 2)
    );
    let events: Vec<String> = s
        .events_for(a, "payment", p.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(events, ["payment.authorized", "payment.captured"]);
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Pending, "USD"), 0);
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 600);
    assert_eq!(
        s.get_order(a, o.id).await.unwrap().unwrap().status,
        OrderStatus::Pending
    );
    let l = lease(&s, a, "cap-2").await;
    let twice = s
        .capture_payment(&meta(a), &finish(l), &p, 400, payment_answer())
        .await;
    assert!(
        matches!(
            twice,
            Err(StorageError::Rule(Rule::PaymentState(
                PaymentStatus::Succeeded
            )))
        ),
        "{twice:?}"
    );
    // The refused capture left its record unfinished and wrote nothing.
    assert!(
        s.find_idempotency(a, "cap-2", Timestamp(NOW))
            .await
            .unwrap()
            .unwrap()
            .in_flight
            .is_some()
    );
    let o2 = order(&s, a, c.id, 700).await;
    let p2 = pay(&s, a, "auth-2", &o2, PaymentStatus::RequiresCapture).await;
    let l = lease(&s, a, "void-1").await;
    let voided = s
        .void_payment(&meta(a), &finish(l), p2.id, &answer)
        .await
        .unwrap();
    assert_eq!(voided.status, PaymentStatus::Canceled);
    let l = lease(&s, a, "void-2").await;
    assert!(matches!(
        s.void_payment(&meta(a), &finish(l), p2.id, &answer).await,
        Err(StorageError::Rule(Rule::PaymentState(
            PaymentStatus::Canceled
        )))
    ));
    // A full capture pays the order.
    let o3 = order(&s, a, c.id, 300).await;
    let p3 = pay(&s, a, "auth-3", &o3, PaymentStatus::RequiresCapture).await;
    let l = lease(&s, a, "cap-3").await;
    // A capture whose step is fenced out settles nothing (also where a backend settles
    // before it writes the step).
    let fenced = s
        .capture_payment(&meta(a), &finish(overtaken(l)), &p3, 300, payment_answer())
        .await;
    assert!(matches!(fenced, Err(StorageError::Fenced)), "{fenced:?}");
    assert_eq!(
        s.get_payment(a, p3.id).await.unwrap().unwrap().status,
        PaymentStatus::RequiresCapture
    );
    s.capture_payment(&meta(a), &finish(l), &p3, 300, payment_answer())
        .await
        .unwrap();
    assert_eq!(
        s.get_order(a, o3.id).await.unwrap().unwrap().status,
        OrderStatus::Paid
    );
    // The capture's event comes before the order's move it caused.
    let mut logged = super::events::sequence_all(&s, &super::events::ids()).await;
    logged.sort_by_key(|e| e.seq);
    let caused: Vec<&str> = logged
        .iter()
        .filter(|e| {
            (e.aggregate_type == "payment" && e.aggregate_id == p3.id)
                || (e.aggregate_type == "order" && e.aggregate_id == o3.id)
        })
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        caused,
        [
            "order.created",
            "payment.authorized",
            "payment.captured",
            "order.paid"
        ]
    );
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 900);
    assert_eq!(balance(&b, LedgerAccount::Pending, "USD"), 0);
    check_ledger(&s, a).await;
}

pub async fn concurrent_refunds_never_exceed_the_capture(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let p = pay(&s, a, "pay", &o, PaymentStatus::Succeeded).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let l = lease(&s, a, &format!("refund-{i}")).await;
            let r = s
                .reserve_refund(&meta(a), &advance(l, "reserved"), p.id, Some(150))
                .await;
            (l, r)
        }));
    }
    let mut reserved = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (l, Ok(r)) => reserved.push((l, r)),
            (_, Err(StorageError::Rule(Rule::RefundExceedsCaptured { refundable_minor }))) => {
                assert!(refundable_minor < 150)
            }
            (_, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(reserved.len(), 6, "6 × 150 fit in 1000, a 7th does not");
    assert_eq!(
        s.get_payment(a, p.id)
            .await
            .unwrap()
            .unwrap()
            .refunded_minor,
        900
    );
    // One is refused by the processor: its reservation is released.
    let settled = |l: Lease| Step {
        from: "reserved".into(),
        ..finish(l)
    };
    let (l0, r0) = &reserved[0];
    assert_eq!(r0.status, RefundStatus::Pending);
    assert_eq!(
        s.refund_for_operation(a, l0.record_id).await.unwrap(),
        Some(r0.clone())
    );
    let failed = s
        .settle_refund(
            &meta(a),
            &settled(*l0),
            RefundOutcome::Failed {
                code: "processor_refused".into(),
            },
            &answer,
        )
        .await
        .unwrap();
    assert_eq!(failed.status, RefundStatus::Failed);
    for (l, _) in &reserved[1..] {
        let r = s
            .settle_refund(
                &meta(a),
                &settled(*l),
                RefundOutcome::Succeeded {
                    processor_id: format!("re_{}", l.record_id),
                },
                &answer,
            )
            .await
            .unwrap();
        assert_eq!(r.status, RefundStatus::Succeeded);
    }
    assert_eq!(
        s.get_payment(a, p.id)
            .await
            .unwrap()
            .unwrap()
            .refunded_minor,
        750
    );
    assert_eq!(
        s.get_order(a, o.id).await.unwrap().unwrap().status,
        OrderStatus::Paid
    );
    // The rest (250, when none is given) refunds the payment in full: the order follows.
    let l = lease(&s, a, "refund-rest").await;
    let rest = s
        .reserve_refund(&meta(a), &advance(l, "reserved"), p.id, None)
        .await
        .unwrap();
    assert_eq!(rest.amount.minor, 250);
    s.settle_refund(
        &meta(a),
        &settled(l),
        RefundOutcome::Succeeded {
            processor_id: "re_rest".into(),
        },
        &answer,
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_order(a, o.id).await.unwrap().unwrap().status,
        OrderStatus::Refunded
    );
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 0);
    let refunds = s
        .list_refunds(a, Some(p.id), page(100, None))
        .await
        .unwrap();
    assert_eq!(refunds.items.len(), 7);
    // Refunding an authorization that is not captured is refused.
    let o2 = order(&s, a, c.id, 100).await;
    let p2 = pay(&s, a, "auth", &o2, PaymentStatus::RequiresCapture).await;
    let l = lease(&s, a, "refund-auth").await;
    assert!(matches!(
        s.reserve_refund(&meta(a), &advance(l, "reserved"), p2.id, None)
            .await,
        Err(StorageError::Rule(Rule::PaymentState(
            PaymentStatus::RequiresCapture
        )))
    ));
    check_ledger(&s, a).await;
}

pub async fn conversions_move_available_funds_once(s: Store) {
    let usd_c = Currency::from_code("USD").unwrap();
    let eur = Currency::from_code("EUR").unwrap();
    s.set_rates(&[(usd_c, eur, "0.9".into())], Timestamp(5))
        .await
        .unwrap();
    s.set_rates(&[(usd_c, eur, "0.92".into())], Timestamp(6))
        .await
        .unwrap();
    let rates = s.rates().await.unwrap();
    assert_eq!(
        rates,
        vec![FxRate {
            base: usd_c,
            quote: eur,
            rate: "0.92".into(),
            set_at: Timestamp(6)
        }]
    );
    let a = account(&s, "a").await;
    let new_quote = |minor: i64, expires_at: i64| NewQuote {
        from: usd(minor),
        to: Money::from_minor(minor * 9 / 10, eur).unwrap(),
        market_rate: "0.92".into(),
        rate: "0.9".into(),
        spread_bps: 217,
        expires_at: Timestamp(expires_at),
    };
    let l = lease(&s, a, "quote-1").await;
    let q = s
        .record_quote(&meta(a), &finish(l), new_quote(1000, NOW + 60_000), &answer)
        .await
        .unwrap();
    assert_eq!(s.get_quote(a, q.id).await.unwrap(), Some(q.clone()));
    // Nothing available yet.
    let l = lease(&s, a, "convert-1").await;
    let poor = s.convert(&meta(a), &finish(l), q.id, &answer).await;
    assert!(
        matches!(
            poor,
            Err(StorageError::Rule(Rule::InsufficientFunds {
                available_minor: 0
            }))
        ),
        "{poor:?}"
    );
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1500).await;
    pay(&s, a, "pay", &o, PaymentStatus::Succeeded).await;
    let l = lease(&s, a, "convert-2").await;
    let conv = s
        .convert(&meta(a), &finish(l), q.id, &answer)
        .await
        .unwrap();
    assert_eq!((conv.from, conv.to, conv.quote_id), (q.from, q.to, q.id));
    assert_eq!(
        s.get_conversion(a, conv.id).await.unwrap(),
        Some(conv.clone())
    );
    let l = lease(&s, a, "convert-3").await;
    assert!(matches!(
        s.convert(&meta(a), &finish(l), q.id, &answer).await,
        Err(StorageError::Rule(Rule::QuoteUsed))
    ));
    let l = lease(&s, a, "quote-2").await;
    let stale = s
        .record_quote(&meta(a), &finish(l), new_quote(100, NOW), &answer)
        .await
        .unwrap();
    let l = lease(&s, a, "convert-4").await;
    assert!(matches!(
        s.convert(&meta(a), &finish(l), stale.id, &answer).await,
        Err(StorageError::Rule(Rule::QuoteExpired))
    ));
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 500);
    assert_eq!(balance(&b, LedgerAccount::Available, "EUR"), 900);
    assert_eq!(balance(&b, LedgerAccount::FxClearing, "USD"), 1000);
    assert_eq!(balance(&b, LedgerAccount::FxClearing, "EUR"), -900);
    let journal = s.journal(a, page(10, None)).await.unwrap();
    assert_eq!(journal.items[0].kind, EntryKind::Conversion);
    assert_eq!(journal.items[0].reference_id, conv.id);
    let events = s.events_for(a, "conversion", conv.id).await.unwrap();
    assert_eq!(events[0].event_type, "conversion.completed");
    check_ledger(&s, a).await;
}

pub async fn concurrent_conversions_never_overdraw(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    pay(&s, a, "pay", &o, PaymentStatus::Succeeded).await;
    let eur = Currency::from_code("EUR").unwrap();
    let mut quotes = Vec::new();
    for i in 0..8 {
        let l = lease(&s, a, &format!("q{i}")).await;
        let new = NewQuote {
            from: usd(300),
            to: Money::from_minor(270, eur).unwrap(),
            market_rate: "0.9".into(),
            rate: "0.9".into(),
            spread_bps: 0,
            expires_at: Timestamp(NOW + 60_000),
        };
        quotes.push(
            s.record_quote(&meta(a), &finish(l), new, &answer)
                .await
                .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for (i, q) in quotes.into_iter().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let l = lease(&s, a, &format!("c{i}")).await;
            s.convert(&meta(a), &finish(l), q.id, &answer).await
        }));
    }
    let mut done = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => done += 1,
            Err(StorageError::Rule(Rule::InsufficientFunds { .. })) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(done, 3, "3 × 300 fit in 1000");
    let b = s.balances(a).await.unwrap();
    assert_eq!(balance(&b, LedgerAccount::Available, "USD"), 100);
    check_ledger(&s, a).await;
}

/// The record a claim prefetches comes with the lease, as it stood, and only from the
/// work's own account; a claim that finds the key taken reads nothing.
pub async fn a_claim_prefetches_what_its_first_phase_reads(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let p = pay(&s, a, "pay", &o, PaymentStatus::RequiresCapture).await;
    let begin = |account: i64, key: &'static str, prefetch: Prefetch| {
        let s = s.clone();
        async move {
            let claimed = s
                .begin_operation(
                    &meta(account),
                    &claim(key),
                    b"{}",
                    Timestamp(NOW + LEASE),
                    Some(prefetch),
                    None,
                )
                .await
                .unwrap();
            match claimed {
                Begun::Leased(op) => op.prefetched.map(|p| *p),
                Begun::Existing(_) => None,
            }
        }
    };
    let got = begin(a, "o-1", Prefetch::Order(o.id)).await;
    assert_eq!(Prefetched::order(got.as_ref(), o.id), Some(Some(o.clone())));
    // Asked for one record, it answers for that one only.
    assert_eq!(Prefetched::order(got.as_ref(), o.id + 1), None);
    assert_eq!(Prefetched::payment(got.as_ref(), o.id), None);
    let got = begin(a, "p-1", Prefetch::Payment(p.id)).await;
    assert_eq!(
        Prefetched::payment(got.as_ref(), p.id),
        Some(Some(p.clone()))
    );
    // Another account's order and payment are absent, not shown.
    let got = begin(b, "o-2", Prefetch::Order(o.id)).await;
    assert_eq!(Prefetched::order(got.as_ref(), o.id), Some(None));
    let got = begin(b, "p-2", Prefetch::Payment(p.id)).await;
    assert_eq!(Prefetched::payment(got.as_ref(), p.id), Some(None));
    // The same key again: the work is in flight, nothing is leased or read.
    let again = s
        .begin_operation(
            &meta(a),
            &claim("o-1"),
            b"{}",
            Timestamp(NOW + LEASE),
            Some(Prefetch::Order(o.id)),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(again, Begun::Existing(r) if r.in_flight.is_some()));
}

/// A claim's first step (ADR 0007) is written with the claim when the order allows it: the
/// work comes back at the step's recovery point with its state, and the order is claimed by
/// it. Refused (the order is another work's, or another account's) or not decided, the work
/// comes back at `started`, unchanged, and nothing but the key is written.
/// A first phase that claims the prefetched order if it was found pending, as a payment's
/// does, moving its work to `authorizing` with the order's id as its state.
fn claims_pending_order() -> FirstPhase {
    std::sync::Arc::new(|op: &LeasedOperation| {
        let Some(Prefetched::Order(id, Some(order))) = op.prefetched.as_deref() else {
            return None;
        };
        (order.status == OrderStatus::Pending).then(|| FirstStep::ClaimOrder {
            step: Step {
                end: StepEnd::Advance {
                    to: "authorizing".into(),
                    lease_until: Timestamp(NOW + LEASE),
                },
                state: format!("{{\"order_id\":{id}}}"),
                ..finish(op.lease)
            },
            order_id: *id,
        })
    })
}

pub async fn a_claims_first_step_is_written_with_it(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let first = claims_pending_order();
    let begin = |account: i64, key: &'static str, order_id: i64, first: Option<FirstPhase>| {
        let s = s.clone();
        async move { leased_with(&s, account, key, Some(Prefetch::Order(order_id)), first).await }
    };
    let took = begin(a, "k1", o.id, Some(first.clone())).await;
    assert_eq!(took.recovery_point, "authorizing");
    assert_eq!(took.state, format!("{{\"order_id\":{}}}", o.id));
    // The order is this work's now: a second payment's first step is refused, and so is its
    // own claim of the order.
    let refused = begin(a, "k2", o.id, Some(first.clone())).await;
    assert_eq!(
        (refused.recovery_point.as_str(), refused.state.as_str()),
        (STARTED, "{}")
    );
    assert!(matches!(
        s.claim_order(&meta(a), &advance(refused.lease, "authorizing"), o.id)
            .await,
        Err(StorageError::Rule(Rule::OrderPaymentInProgress))
    ));
    // The recovery point is stored: the work advances from it, and not from `started`.
    assert!(matches!(
        s.advance_operation(
            took.lease,
            STARTED,
            "x",
            "{}",
            Timestamp(NOW),
            Timestamp(NOW + LEASE)
        )
        .await,
        Err(StorageError::Fenced)
    ));
    s.advance_operation(
        took.lease,
        "authorizing",
        "charged",
        "{}",
        Timestamp(NOW),
        Timestamp(NOW + LEASE),
    )
    .await
    .unwrap();
    // Another account's order is absent to the claim: nothing decided, nothing written.
    let foreign = begin(b, "k3", o.id, Some(first.clone())).await;
    assert_eq!(foreign.recovery_point, STARTED);
    // No first step asked for, or none decided: the claim alone.
    let o2 = order(&s, a, c.id, 500).await;
    let plain = begin(a, "k4", o2.id, None).await;
    assert_eq!(plain.recovery_point, STARTED);
    let undecided: FirstPhase = std::sync::Arc::new(|_: &LeasedOperation| None);
    let none = begin(a, "k5", o2.id, Some(undecided)).await;
    assert_eq!(none.recovery_point, STARTED);
    // Neither claimed the order: a later first step takes it.
    let later = begin(a, "k6", o2.id, Some(first)).await;
    assert_eq!(later.recovery_point, "authorizing");
}

/// Claims that arrive together (a backend may write them in one transaction) each get what
/// a lone claim would: their own lease, their order claimed by exactly one of them when two
/// want it, a refusal left to the phase, and one lease for a key sent twice.
pub async fn claims_made_together_keep_their_own_outcomes(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let free: Vec<Order> = [
        order(&s, a, c.id, 100).await,
        order(&s, a, c.id, 200).await,
        order(&s, a, c.id, 300).await,
    ]
    .into();
    let contested = order(&s, a, c.id, 400).await;
    let paid = order(&s, a, c.id, 500).await;
    let payment = pay(&s, a, "paid-before", &paid, PaymentStatus::Succeeded).await;
    let first = claims_pending_order();
    let mut wanted: Vec<(String, Prefetch)> = free
        .iter()
        .enumerate()
        .map(|(i, o)| (format!("free-{i}"), Prefetch::Order(o.id)))
        .collect();
    wanted.push(("contested-1".into(), Prefetch::Order(contested.id)));
    wanted.push(("contested-2".into(), Prefetch::Order(contested.id)));
    wanted.push(("paid".into(), Prefetch::Order(paid.id)));
    let absent = Prefetch::Order(free[0].id + 1_000_000);
    wanted.push(("twice".into(), absent));
    wanted.push(("twice".into(), absent));
    // A capture's claim reads the payment it settles.
    wanted.push(("capture".into(), Prefetch::Payment(payment.id)));
    // Every claim of `wanted` at once, so that they wait for the writer together.
    let together = |wanted: Vec<(String, Prefetch)>| {
        let (s, first) = (s.clone(), first.clone());
        async move {
            let start = Arc::new(tokio::sync::Barrier::new(wanted.len()));
            let mut tasks = Vec::new();
            for (key, prefetch) in wanted {
                let (s, start, first) = (s.clone(), start.clone(), first.clone());
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    s.begin_operation(
                        &meta(a),
                        &claim(&key),
                        b"{}",
                        Timestamp(NOW + LEASE),
                        Some(prefetch),
                        Some(first),
                    )
                    .await
                    .unwrap()
                }));
            }
            let mut begun = Vec::new();
            for t in tasks {
                begun.push(t.await.unwrap());
            }
            begun
        }
    };
    let before = s.writes_taken_together();
    let begun = together(wanted).await;
    shared_a_batch(&s, before);
    let point = |b: &Begun| match b {
        Begun::Leased(op) => op.recovery_point.clone(),
        Begun::Existing(r) if r.in_flight.is_some() => "in flight".into(),
        Begun::Existing(_) => "finished".into(),
    };
    for (i, o) in free.iter().enumerate() {
        let Begun::Leased(op) = &begun[i] else {
            panic!("free-{i}: {:?}", point(&begun[i]));
        };
        assert_eq!(op.recovery_point, "authorizing", "free-{i}");
        assert_eq!(op.state, format!("{{\"order_id\":{}}}", o.id));
        assert_eq!(
            Prefetched::order(op.prefetched.as_deref(), o.id),
            Some(Some(o.clone()))
        );
    }
    // The contested order goes to one of its two claims; the other stays at the start.
    let mut contest = [point(&begun[3]), point(&begun[4])];
    contest.sort();
    assert_eq!(contest, ["authorizing", STARTED]);
    // A paid order refuses the first step, which the phase then answers.
    assert_eq!(point(&begun[5]), STARTED);
    // A key sent twice at once: one lease, and the other finds it in flight.
    let mut twice = [point(&begun[6]), point(&begun[7])];
    twice.sort();
    assert_eq!(twice, ["in flight", STARTED]);
    let Begun::Leased(capture) = &begun[8] else {
        panic!("capture: {:?}", point(&begun[8]));
    };
    assert_eq!(
        (
            capture.recovery_point.as_str(),
            capture.prefetched.as_deref()
        ),
        (
            STARTED,
            Some(&Prefetched::Payment(payment.id, Some(payment.clone())))
        )
    );
    // What the leases say is what is stored: later claims of the claimed orders, together or
    // alone, are refused.
    let later: Vec<(String, Prefetch)> = free
        .iter()
        .chain([&contested])
        .map(|o| (format!("later-{}", o.id), Prefetch::Order(o.id)))
        .collect();
    for b in together(later).await {
        assert_eq!(point(&b), STARTED);
    }
    for o in free.iter().chain([&contested]) {
        let late = leased_with(&s, a, &format!("late-{}", o.id), None, None).await;
        assert!(matches!(
            s.claim_order(&meta(a), &advance(late.lease, "authorizing"), o.id)
                .await,
            Err(StorageError::Rule(Rule::OrderPaymentInProgress))
        ));
    }
}

pub async fn money_is_scoped_to_its_account(s: Store) {
    let a = account(&s, "a").await;
    let other = account(&s, "b").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let p = pay(&s, a, "pay", &o, PaymentStatus::RequiresCapture).await;
    assert_eq!(s.get_payment(other, p.id).await.unwrap(), None);
    let l = lease(&s, other, "cap").await;
    assert!(matches!(
        s.capture_payment(&meta(other), &finish(l), &p, 1000, payment_answer())
            .await,
        Err(StorageError::NotFound)
    ));
    let l = lease(&s, other, "refund").await;
    assert!(matches!(
        s.reserve_refund(&meta(other), &advance(l, "reserved"), p.id, None)
            .await,
        Err(StorageError::NotFound)
    ));
    assert!(s.balances(other).await.unwrap().is_empty());
    assert!(
        s.journal(other, page(10, None))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let filter = PaymentFilter {
        page: page(10, None),
        order_id: None,
    };
    assert!(
        s.list_payments(other, filter)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    check_ledger(&s, a).await;
}

pub async fn an_order_takes_one_payment_at_a_time(s: Store) {
    let a = account(&s, "a").await;
    let other = account(&s, "b").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 1000).await;
    let claim = |l: Lease| advance(l, "authorizing");
    let record = |l: Lease| Step {
        from: "authorizing".into(),
        ..finish(l)
    };
    let first = lease(&s, a, "p1").await;
    s.claim_order(&meta(a), &claim(first), o.id).await.unwrap();
    // The step committed: repeating it is fenced (a rerun resumes at `authorizing`).
    assert!(matches!(
        s.claim_order(&meta(a), &claim(first), o.id).await,
        Err(StorageError::Fenced)
    ));
    // Another payment's work cannot claim the order.
    let second = lease(&s, a, "p2").await;
    let busy = s.claim_order(&meta(a), &claim(second), o.id).await;
    assert!(
        matches!(busy, Err(StorageError::Rule(Rule::OrderPaymentInProgress))),
        "{busy:?}"
    );
    // A decline releases the order.
    s.record_payment(
        &meta(a),
        &record(first),
        NewPayment {
            processor_id: None,
            failure: Some(("card_declined".into(), "declined".into())),
            ..new_payment(&o, PaymentStatus::Failed, 0)
        },
        payment_answer(),
    )
    .await
    .unwrap();
    s.claim_order(&meta(a), &claim(second), o.id).await.unwrap();
    let authorized = s
        .record_payment(
            &meta(a),
            &record(second),
            new_payment(&o, PaymentStatus::RequiresCapture, 0),
            payment_answer(),
        )
        .await
        .unwrap();
    // Authorized: still claimed. Voided: free again.
    let third = lease(&s, a, "p3").await;
    assert!(matches!(
        s.claim_order(&meta(a), &claim(third), o.id).await,
        Err(StorageError::Rule(Rule::OrderPaymentInProgress))
    ));
    let v = lease(&s, a, "void").await;
    s.void_payment(&meta(a), &finish(v), authorized.id, &answer)
        .await
        .unwrap();
    s.claim_order(&meta(a), &claim(third), o.id).await.unwrap();
    s.record_payment(
        &meta(a),
        &record(third),
        new_payment(&o, PaymentStatus::Succeeded, 1000),
        payment_answer(),
    )
    .await
    .unwrap();
    // Paid: not payable any more.
    let fourth = lease(&s, a, "p4").await;
    assert!(matches!(
        s.claim_order(&meta(a), &claim(fourth), o.id).await,
        Err(StorageError::Rule(Rule::OrderNotPayable(OrderStatus::Paid)))
    ));
    // Unknown, or another account's, order.
    assert!(matches!(
        s.claim_order(&meta(a), &claim(fourth), o.id + 1000).await,
        Err(StorageError::NotFound)
    ));
    let theirs = lease(&s, other, "p5").await;
    assert!(matches!(
        s.claim_order(&meta(other), &claim(theirs), o.id).await,
        Err(StorageError::NotFound)
    ));
    // Concurrent claims of one pending order: one wins.
    let o2 = order(&s, a, c.id, 500).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let l = lease(&s, a, &format!("race-{i}")).await;
            s.claim_order(&meta(a), &advance(l, "authorizing"), o2.id)
                .await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => won += 1,
            Err(StorageError::Rule(Rule::OrderPaymentInProgress)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    check_ledger(&s, a).await;
}
