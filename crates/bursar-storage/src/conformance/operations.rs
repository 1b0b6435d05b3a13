//! Conformance cases of phased work (`crate::operations`): leases, fencing, recovery points
//! and the completer's claim, identical on every backend.

use super::*;
use crate::operations::STARTED;

const LEASE: i64 = 90_000;

fn op_claim(key: &str, fingerprint: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        method: "POST".into(),
        route: "/api/payments".into(),
        fingerprint: fingerprint.into(),
        expires_at: Timestamp(NOW + DAY),
    }
}

fn stored(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

async fn begin(s: &Store, account: i64, at: i64, key: &str, fp: &str) -> Begun {
    s.begin_operation(
        &meta_at(account, at),
        &op_claim(key, fp),
        b"{\"amount\":\"1.00\"}",
        Timestamp(at + LEASE),
        None,
        None,
    )
    .await
    .unwrap()
}

fn leased(b: Begun) -> LeasedOperation {
    match b {
        Begun::Leased(op) => op,
        Begun::Existing(r) => panic!("expected a lease, got the record {r:?}"),
    }
}

fn existing(b: Begun) -> IdempotencyRecord {
    match b {
        Begun::Existing(r) => r,
        Begun::Leased(op) => panic!("expected the record, got a lease {op:?}"),
    }
}

fn fenced(r: Result<()>) {
    assert!(matches!(r, Err(StorageError::Fenced)), "{r:?}");
}

pub async fn operations_advance_through_recovery_points_under_a_lease(s: Store) {
    let a = account(&s, "a").await;
    let op = leased(begin(&s, a, NOW, "pay-1", "fp").await);
    assert_eq!(op.recovery_point, STARTED);
    assert_eq!(op.state, "{}");
    assert_eq!(op.request, b"{\"amount\":\"1.00\"}");
    assert_eq!((op.account_id, op.attempts), (a, 1));
    assert_eq!(
        op.lease.outbound_key(),
        format!("bursar-{}", op.lease.record_id)
    );
    assert_eq!(op.request_id, "req_conformance");
    // While the lease lives, the same request sees the record in flight.
    let busy = existing(begin(&s, a, NOW + 1, "pay-1", "fp").await);
    assert_eq!(busy.in_flight, Some(Timestamp(NOW + LEASE)));
    // So does a different request, which the caller answers with 422 (fingerprint).
    assert_eq!(
        existing(begin(&s, a, NOW + 1, "pay-1", "other").await).fingerprint,
        "fp"
    );
    let lease = op.lease;
    let wrong = Lease {
        fence: lease.fence + 1,
        ..lease
    };
    fenced(
        s.advance_operation(
            wrong,
            STARTED,
            "charged",
            "{}",
            Timestamp(NOW),
            Timestamp(NOW),
        )
        .await,
    );
    // A phase commits only from the point it started at.
    fenced(
        s.advance_operation(lease, "charged", "x", "{}", Timestamp(NOW), Timestamp(NOW))
            .await,
    );
    s.advance_operation(
        lease,
        STARTED,
        "charged",
        r#"{"charge":"ch_1"}"#,
        Timestamp(NOW + 5),
        Timestamp(NOW + 5 + LEASE),
    )
    .await
    .unwrap();
    assert_eq!(
        existing(begin(&s, a, NOW + 6, "pay-1", "fp").await).in_flight,
        Some(Timestamp(NOW + 5 + LEASE)),
        "each phase renews the lease"
    );
    fenced(
        s.finish_operation(
            wrong,
            "{}",
            &stored("x"),
            Timestamp(NOW),
            Timestamp(NOW + DAY),
        )
        .await,
    );
    s.finish_operation(
        lease,
        r#"{"charge":"ch_1"}"#,
        &stored("done"),
        Timestamp(NOW + 7),
        Timestamp(NOW + 7 + DAY),
    )
    .await
    .unwrap();
    // Finished: an ordinary record, replayed until its retention (counted from the finish).
    let done = existing(begin(&s, a, NOW + 8, "pay-1", "fp").await);
    assert_eq!(done.in_flight, None);
    assert_eq!(done.response, stored("done"));
    assert_eq!(done.expires_at, Timestamp(NOW + 7 + DAY));
    assert_eq!(
        s.find_idempotency(a, "pay-1", Timestamp(NOW + 8))
            .await
            .unwrap(),
        Some(done)
    );
    fenced(
        s.finish_operation(
            lease,
            "{}",
            &stored("again"),
            Timestamp(NOW),
            Timestamp(NOW + DAY),
        )
        .await,
    );
    fenced(s.release_operation(lease, Timestamp(NOW + 9)).await);
    // After retention the key is new work.
    let reborn = leased(begin(&s, a, NOW + 8 + DAY, "pay-1", "fp2").await);
    assert_ne!(reborn.lease.record_id, lease.record_id);
}

pub async fn a_lapsed_lease_is_taken_over_and_the_old_driver_is_fenced(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let first = leased(begin(&s, a, NOW, "pay-2", "fp").await);
    s.advance_operation(
        first.lease,
        STARTED,
        "charged",
        r#"{"charge":"ch_9"}"#,
        Timestamp(NOW + 1),
        Timestamp(NOW + 1 + LEASE),
    )
    .await
    .unwrap();
    // Another account's key of the same name is unrelated work.
    let other = leased(begin(&s, b, NOW + 2, "pay-2", "fp").await);
    assert_ne!(other.lease.record_id, first.lease.record_id);
    // The driver died: once the lease lapses, a retry of the same request takes over where
    // the work stands, with a new fencing token.
    let expiry = NOW + 1 + LEASE;
    assert!(matches!(
        begin(&s, a, expiry - 1, "pay-2", "fp").await,
        Begun::Existing(_)
    ));
    // A different request never takes someone else's work over.
    assert!(matches!(
        begin(&s, a, expiry + 1, "pay-2", "other").await,
        Begun::Existing(_)
    ));
    let second = leased(begin(&s, a, expiry, "pay-2", "fp").await);
    assert_eq!(second.lease.record_id, first.lease.record_id);
    assert!(second.lease.fence > first.lease.fence);
    assert_eq!(
        (second.recovery_point.as_str(), second.state.as_str()),
        ("charged", r#"{"charge":"ch_9"}"#)
    );
    assert_eq!(second.attempts, 2);
    assert_eq!(second.lease.outbound_key(), first.lease.outbound_key());
    // The stalled driver wakes up: none of its writes land.
    fenced(
        s.advance_operation(
            first.lease,
            "charged",
            "captured",
            "{}",
            Timestamp(expiry),
            Timestamp(expiry + LEASE),
        )
        .await,
    );
    fenced(
        s.finish_operation(
            first.lease,
            "{}",
            &stored("stale"),
            Timestamp(expiry),
            Timestamp(expiry + DAY),
        )
        .await,
    );
    fenced(s.release_operation(first.lease, Timestamp(expiry)).await);
    s.finish_operation(
        second.lease,
        "{}",
        &stored("fresh"),
        Timestamp(expiry + 1),
        Timestamp(expiry + DAY),
    )
    .await
    .unwrap();
    let done = existing(begin(&s, a, expiry + 2, "pay-2", "fp").await);
    assert_eq!(done.response, stored("fresh"));
}

pub async fn a_released_lease_resumes_at_once(s: Store) {
    let a = account(&s, "a").await;
    let op = leased(begin(&s, a, NOW, "pay-3", "fp").await);
    s.release_operation(op.lease, Timestamp(NOW + 10))
        .await
        .unwrap();
    let again = leased(begin(&s, a, NOW + 10, "pay-3", "fp").await);
    assert_eq!(again.recovery_point, STARTED);
    assert_eq!(again.attempts, 2);
    assert_ne!(again.lease.fence, op.lease.fence);
}

pub async fn the_completer_claims_only_abandoned_work(s: Store) {
    let a = account(&s, "a").await;
    let live = leased(begin(&s, a, NOW, "live", "fp").await);
    let crashed = leased(begin(&s, a, NOW - 2 * LEASE, "crashed", "fp").await);
    let released = leased(begin(&s, a, NOW - 2 * LEASE, "released", "fp").await);
    s.release_operation(released.lease, Timestamp(NOW - 1000))
        .await
        .unwrap();
    let done = leased(begin(&s, a, NOW - 2 * LEASE, "done", "fp").await);
    s.finish_operation(
        done.lease,
        "{}",
        &stored("ok"),
        Timestamp(NOW - LEASE),
        Timestamp(NOW + DAY),
    )
    .await
    .unwrap();
    let now = Timestamp(NOW);
    let lease_until = Timestamp(NOW + LEASE);
    // Released a second ago: too recent for an idle threshold of 5 s.
    let claimed = s
        .claim_abandoned(now, Timestamp(NOW - 5000), lease_until, 10)
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|o| o.lease.record_id).collect();
    assert_eq!(ids, [crashed.lease.record_id]);
    assert_eq!(claimed[0].request, b"{\"amount\":\"1.00\"}");
    assert!(claimed[0].lease.fence > crashed.lease.fence);
    // Claimed work is leased again: nobody else gets it, and its old driver is fenced. Once
    // idle long enough, released work is claimed too; live work never is.
    let later: Vec<i64> = s
        .claim_abandoned(now, now, lease_until, 10)
        .await
        .unwrap()
        .iter()
        .map(|o| o.lease.record_id)
        .collect();
    assert_eq!(later, [released.lease.record_id]);
    assert!(!later.contains(&live.lease.record_id));
    fenced(s.release_operation(crashed.lease, now).await);
    assert!(
        matches!(begin(&s, a, NOW, "crashed", "fp").await, Begun::Existing(r) if r.in_flight == Some(lease_until))
    );
    // Finished records are never claimed; the batch size is a bound.
    for i in 0..3 {
        leased(begin(&s, a, NOW - 2 * LEASE, &format!("old-{i}"), "fp").await);
    }
    let batch = s.claim_abandoned(now, now, lease_until, 2).await.unwrap();
    assert_eq!(batch.len(), 2);
    assert!(
        batch
            .iter()
            .all(|o| o.recovery_point == STARTED && o.route == "/api/payments")
    );
}

pub async fn concurrent_begins_of_one_key_lease_once(s: Store) {
    let a = account(&s, "a").await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { begin(&s, a, NOW, "hot", "fp").await })
        })
        .collect();
    let mut leases = 0;
    for t in tasks {
        match t.await.unwrap() {
            Begun::Leased(_) => leases += 1,
            Begun::Existing(r) => assert_eq!(r.in_flight, Some(Timestamp(NOW + LEASE))),
        }
    }
    assert_eq!(leases, 1);
    // Concurrent completers split abandoned work and never share a record.
    for i in 0..10 {
        leased(begin(&s, a, NOW - 2 * LEASE, &format!("stuck-{i}"), "fp").await);
    }
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.claim_abandoned(Timestamp(NOW), Timestamp(NOW), Timestamp(NOW + LEASE), 4)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap().into_iter().map(|o| o.lease.record_id));
    }
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), total), (10, 10));
}

pub async fn unfinished_work_is_never_swept(s: Store) {
    let a = account(&s, "a").await;
    leased(begin(&s, a, NOW, "slow", "fp").await);
    assert_eq!(
        s.sweep_idempotency(Timestamp(NOW + 365 * DAY), 100)
            .await
            .unwrap(),
        0
    );
    let r = s
        .find_idempotency(a, "slow", Timestamp(NOW + 365 * DAY))
        .await
        .unwrap();
    assert!(r.is_some_and(|r| r.in_flight.is_some()));
}
