//! Conformance cases of the event log and webhook delivery (`crate::events`), identical on
//! every backend.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::events::*;

use super::*;

const T0: i64 = 1_700_000_000_000;

fn ids() -> impl Fn() -> String + Send + Sync {
    let n = AtomicU64::new(0);
    let run = uuid_free_run_id();
    move || format!("evt_{run}_{}", n.fetch_add(1, Ordering::Relaxed))
}

/// Distinct per call, so two sequencers in one test never hand out the same id.
fn uuid_free_run_id() -> u64 {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    RUNS.fetch_add(1, Ordering::Relaxed)
}

fn endpoint(types: &[&str]) -> NewEndpoint {
    NewEndpoint {
        url: "https://receiver.example/hooks".into(),
        description: Some("test".into()),
        event_types: types.iter().map(|t| t.to_string()).collect(),
        secret_enc: "enc:secret".into(),
        max_concurrency: 4,
    }
}

/// Sequences everything committed so far.
async fn sequence_all(s: &Store, new_id: &(dyn Fn() -> String + Send + Sync)) -> Vec<LoggedEvent> {
    let mut all = Vec::new();
    loop {
        let batch = s.sequence_events(100, Timestamp(T0), new_id).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

pub async fn events_are_sequenced_per_account_once(s: Store) {
    let (a, b) = (account(&s, "a").await, account(&s, "b").await);
    let ca = customer(&s, a).await;
    let cb = customer(&s, b).await;
    order(&s, a, ca.id, 100).await;
    order(&s, b, cb.id, 200).await;
    order(&s, a, ca.id, 300).await;
    let new_id = ids();
    let logged = sequence_all(&s, &new_id).await;
    // 2 customers + 3 orders, each sequenced once; seqs per account start at 1 and are dense.
    assert_eq!(logged.len(), 5);
    let seqs = |acc| {
        logged
            .iter()
            .filter(|e| e.account_id == acc)
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(a), vec![1, 2, 3]);
    assert_eq!(seqs(b), vec![1, 2]);
    assert!(
        sequence_all(&s, &new_id).await.is_empty(),
        "sequenced twice"
    );
    // The body is the envelope, parseable, naming the event and its aggregate.
    let first = &logged[0];
    let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(body["id"], first.event_id.as_str());
    assert_eq!(body["type"], first.event_type.as_str());
    assert_eq!(body["seq"], first.seq);
    assert_eq!(body["data"]["aggregate_id"], first.aggregate_id);
    assert_eq!(body["data"]["aggregate_version"], first.aggregate_version);
    assert_eq!(body["timestamp"], "2023-11-14T22:13:20.000Z");
    assert_eq!(body["request_id"], "req_conformance");
    // Stored and served byte for byte.
    let got = s.get_event(a, &first.event_id).await.unwrap().unwrap();
    assert_eq!(&got, first);
    assert!(s.get_event(b, &first.event_id).await.unwrap().is_none());
    // Resume after a seq, with and without a type filter; newest-first listing.
    let after = s.events_after(a, 1, &[], 10).await.unwrap();
    assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
    let orders_only = s
        .events_after(a, 0, &["order.created".into()], 10)
        .await
        .unwrap();
    assert_eq!(orders_only.len(), 2);
    let listed = s.list_events(a, &[], page(2, None)).await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let next = s.list_events(a, &[], page(2, Some(2))).await.unwrap();
    assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
}

pub async fn concurrent_sequencers_never_share_a_seq(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                order(&s, a, c.id, 100 + i).await;
            }
        })
    };
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let new_id = ids();
                let mut got = Vec::new();
                for _ in 0..40 {
                    let batch = s.sequence_events(7, Timestamp(T0), &new_id).await.unwrap();
                    got.extend(batch.into_iter().map(|e| e.seq));
                    tokio::task::yield_now().await;
                }
                got
            })
        })
        .collect();
    writer.await.unwrap();
    let mut seqs = Vec::new();
    for r in relays {
        seqs.extend(r.await.unwrap());
    }
    seqs.extend(sequence_all(&s, &ids()).await.into_iter().map(|e| e.seq));
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=61).collect::<Vec<_>>(), "dense, each once");
}

pub async fn fan_out_follows_endpoint_filters_once(s: Store) {
    let a = account(&s, "a").await;
    let all = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    let orders = s
        .create_endpoint(a, endpoint(&["order.*"]), Timestamp(T0))
        .await
        .unwrap();
    let exact = s
        .create_endpoint(a, endpoint(&["customer.created"]), Timestamp(T0))
        .await
        .unwrap();
    let off = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    let patch = EndpointPatch {
        enabled: Some(false),
        ..Default::default()
    };
    s.update_endpoint(a, off.id, patch, Timestamp(T0))
        .await
        .unwrap();
    let other = account(&s, "other").await;
    let foreign = s
        .create_endpoint(other, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    let c = customer(&s, a).await;
    order(&s, a, c.id, 100).await;
    sequence_all(&s, &ids()).await;
    let count = |id| {
        let s = s.clone();
        async move {
            s.list_deliveries(a, id, page(50, None))
                .await
                .unwrap()
                .iter()
                .map(|d| d.event_type.clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(count(all.id).await.len(), 2);
    assert_eq!(count(orders.id).await, vec!["order.created"]);
    assert_eq!(count(exact.id).await, vec!["customer.created"]);
    assert!(count(off.id).await.is_empty());
    assert!(
        s.list_deliveries(other, foreign.id, page(50, None))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(type_matches(&["order.*".into()], "order.paid"));
    assert!(!type_matches(&["order.*".into()], "payment.captured"));
    assert!(!type_matches(&["order.*".into()], "orders.x"));
}

pub async fn endpoints_are_scoped_and_rotate(s: Store) {
    let (a, b) = (account(&s, "a").await, account(&s, "b").await);
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    assert_eq!((e.version, e.enabled), (1, true));
    assert!(s.get_endpoint(b, e.id).await.unwrap().is_none());
    let patch = || EndpointPatch {
        url: Some("https://other.example/x".into()),
        ..Default::default()
    };
    assert!(matches!(
        s.update_endpoint(b, e.id, patch(), Timestamp(T0)).await,
        Err(StorageError::NotFound)
    ));
    let updated = s
        .update_endpoint(a, e.id, patch(), Timestamp(T0 + 1))
        .await
        .unwrap();
    assert_eq!(updated.url, "https://other.example/x");
    assert_eq!(updated.description.as_deref(), Some("test"));
    assert_eq!(updated.version, 2);
    let rotated = s
        .rotate_secret(a, e.id, "enc:new", Timestamp(T0 + 5), Timestamp(T0 + 2))
        .await
        .unwrap();
    assert_eq!(rotated.secret_enc, "enc:new");
    assert_eq!(rotated.previous_secret_enc.as_deref(), Some("enc:secret"));
    assert_eq!(rotated.previous_secret_expires_at, Some(Timestamp(T0 + 5)));
    let listed = s.list_endpoints(a, page(10, None)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        s.list_endpoints(b, page(10, None))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!s.delete_endpoint(b, e.id).await.unwrap());
    assert!(s.delete_endpoint(a, e.id).await.unwrap());
    assert!(s.get_endpoint(a, e.id).await.unwrap().is_none());
}

fn attempt(c: &ClaimedDelivery, status: Option<i64>, kind: Option<&str>) -> Attempt {
    Attempt {
        delivery_id: c.delivery_id,
        attempt_no: c.attempt_no,
        status_code: status,
        duration_ms: 3,
        error_kind: kind.map(str::to_owned),
        response_snippet: Some("ok".into()),
        created_at: Timestamp(T0),
    }
}

pub async fn deliveries_are_leased_fenced_and_retried(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    customer(&s, a).await;
    let logged = sequence_all(&s, &ids()).await;
    let (now, lease) = (Timestamp(T0), Timestamp(T0 + 1_000));
    let claimed = s.claim_deliveries(now, lease, "A", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!((c.attempt_no, c.endpoint_id), (1, e.id));
    assert_eq!(c.body, logged[0].body);
    assert_eq!(c.secret_enc, "enc:secret");
    assert_eq!(c.request_id, "req_conformance");
    // Leased: nobody else gets it until the lease lapses.
    assert!(
        s.claim_deliveries(now, lease, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A fails; retry later.
    let done = Completion {
        delivery_id: c.delivery_id,
        lease_token: "A".into(),
        attempt: attempt(c, Some(503), Some("http_status")),
        outcome: Outcome::Retry(Timestamp(T0 + 5_000)),
    };
    assert!(s.complete_delivery(done, now).await.unwrap());
    assert!(
        s.claim_deliveries(Timestamp(T0 + 4_999), lease, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Due again: B takes attempt 2, and stalls past its lease; C takes over attempt 3.
    let t = Timestamp(T0 + 5_000);
    let b = s
        .claim_deliveries(t, Timestamp(T0 + 6_000), "B", 10)
        .await
        .unwrap();
    assert_eq!(b[0].attempt_no, 2);
    let c3 = s
        .claim_deliveries(Timestamp(T0 + 6_001), Timestamp(T0 + 9_000), "C", 10)
        .await
        .unwrap();
    assert_eq!(c3[0].attempt_no, 3);
    let ok = |claimed: &ClaimedDelivery, token: &str| Completion {
        delivery_id: claimed.delivery_id,
        lease_token: token.into(),
        attempt: attempt(claimed, Some(200), None),
        outcome: Outcome::Succeeded,
    };
    assert!(s.complete_delivery(ok(&c3[0], "C"), t).await.unwrap());
    // B wakes up: fenced, changes nothing.
    assert!(!s.complete_delivery(ok(&b[0], "B"), t).await.unwrap());
    let d = &s.list_deliveries(a, e.id, page(10, None)).await.unwrap()[0];
    assert_eq!((d.state.as_str(), d.attempt_count), ("succeeded", 3));
    let attempts = s.list_attempts(a, e.id, page(10, None)).await.unwrap();
    let mut numbered: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt_no, a.error_kind.clone()))
        .collect();
    numbered.sort();
    assert_eq!(
        numbered,
        vec![
            (1, Some("http_status".into())),
            (2, Some("lease_lost".into())),
            (3, None)
        ]
    );
    // Succeeded deliveries are never claimed again; redelivery queues it anew.
    let later = Timestamp(T0 + 100_000);
    assert!(
        s.claim_deliveries(later, later, "D", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = s
        .redeliver(a, e.id, &logged[0].event_id, later)
        .await
        .unwrap();
    assert_eq!(again.state, "pending");
    assert_eq!(
        s.claim_deliveries(later, Timestamp(later.0 + 1), "D", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(matches!(
        s.redeliver(a, e.id, "evt_missing", later).await,
        Err(StorageError::NotFound)
    ));
}

pub async fn a_gone_receiver_disables_its_endpoint(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..3 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let claimed = s
        .claim_deliveries(Timestamp(T0), Timestamp(T0 + 1_000), "A", 1)
        .await
        .unwrap();
    let c = &claimed[0];
    let gone = Completion {
        delivery_id: c.delivery_id,
        lease_token: "A".into(),
        attempt: attempt(c, Some(410), Some("http_status")),
        outcome: Outcome::Gone,
    };
    assert!(s.complete_delivery(gone, Timestamp(T0)).await.unwrap());
    let ep = s.get_endpoint(a, e.id).await.unwrap().unwrap();
    assert_eq!(
        (ep.enabled, ep.disabled_reason.as_deref()),
        (false, Some("gone"))
    );
    let states: BTreeSet<_> = s
        .list_deliveries(a, e.id, page(10, None))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.state)
        .collect();
    assert_eq!(states, BTreeSet::from(["cancelled".to_owned()]));
    let later = Timestamp(T0 + 100_000);
    assert!(
        s.claim_deliveries(later, later, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn concurrent_workers_never_claim_one_delivery_twice(s: Store) {
    let a = account(&s, "a").await;
    s.create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..200 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let token = format!("w{w}");
                let mut got = Vec::new();
                loop {
                    let lease = Timestamp(T0 + 60_000);
                    let batch = s
                        .claim_deliveries(Timestamp(T0), lease, &token, 8)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    for c in batch {
                        let done = Completion {
                            delivery_id: c.delivery_id,
                            lease_token: token.clone(),
                            attempt: attempt(&c, Some(200), None),
                            outcome: Outcome::Succeeded,
                        };
                        assert!(s.complete_delivery(done, Timestamp(T0)).await.unwrap());
                        got.push(c.delivery_id);
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let distinct: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (200, 200));
}

pub async fn published_events_leave_the_backlog(s: Store) {
    let (a, b) = (account(&s, "a").await, account(&s, "b").await);
    let ca = customer(&s, a).await;
    let cb = customer(&s, b).await;
    order(&s, a, ca.id, 100).await;
    order(&s, b, cb.id, 200).await;
    // Unsequenced rows are not publishable: they have no id, seq or body yet.
    assert!(s.unpublished_events(10).await.unwrap().is_empty());
    let new_id = ids();
    let logged = sequence_all(&s, &new_id).await;
    assert_eq!(logged.len(), 4);
    let backlog = s.unpublished_events(10).await.unwrap();
    let mut expected = logged.clone();
    expected.sort_by_key(|e| (e.account_id, e.seq));
    let mut got = backlog.clone();
    got.sort_by_key(|e| (e.account_id, e.seq));
    assert_eq!(
        got, expected,
        "the backlog is the sequenced events, as logged"
    );
    // Per account, the backlog comes in seq order (the order a live subscriber needs).
    for acc in [a, b] {
        let seqs: Vec<i64> = backlog
            .iter()
            .filter(|e| e.account_id == acc)
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }
    let first_two: Vec<String> = backlog[..2].iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        s.mark_published(&first_two, Timestamp(T0)).await.unwrap(),
        2
    );
    assert_eq!(
        s.mark_published(&first_two, Timestamp(T0)).await.unwrap(),
        0,
        "marking twice changes nothing"
    );
    let rest = s.unpublished_events(10).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|e| !first_two.contains(&e.event_id)));
    assert_eq!(
        s.unpublished_events(1).await.unwrap().len(),
        1,
        "limit holds"
    );
    assert_eq!(s.mark_published(&[], Timestamp(T0)).await.unwrap(), 0);
}
