//! Conformance cases of the event log and webhook delivery (`crate::events`), identical on
//! every backend.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::events::*;

use super::*;

const T0: i64 = 1_700_000_000_000;

pub(super) fn ids() -> impl Fn() -> String + Send + Sync {
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
        fifo_per_aggregate: false,
    }
}

/// Sequences everything committed so far.
pub(super) async fn sequence_all(s: &Store, new_id: &dyn EventRenderer) -> Vec<LoggedEvent> {
    let mut all = Vec::new();
    loop {
        let batch = s
            .sequence_events(100, Timestamp(T0), new_id, false)
            .await
            .unwrap();
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
                    let batch = s
                        .sequence_events(7, Timestamp(T0), &new_id, false)
                        .await
                        .unwrap();
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
    // Numbered in commit order: the one writer created the orders one after another.
    let logged = s.events_after(a, 0, &[], 100).await.unwrap();
    let created: Vec<i64> = logged
        .iter()
        .filter(|e| e.event_type == "order.created")
        .map(|e| e.aggregate_id)
        .collect();
    assert_eq!(created.len(), 60);
    assert!(
        created.windows(2).all(|w| w[0] < w[1]),
        "seq follows commit order: {created:?}"
    );
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
        id: 0,
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
        policy: HealthPolicy::default(),
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
        policy: HealthPolicy::default(),
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
    assert!(nothing_due(&s, later).await);
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

/// Several completions in one transaction answer and record exactly what one-by-one
/// completions would: held leases apply their outcome, a stale token changes nothing but a
/// `lease_lost` attempt, and attempts of two endpoints mix in one batch.
/// An account with two endpoints for every event type and two events, fanned out and all four
/// deliveries leased to `"A"`.
async fn two_endpoints_two_events_claimed(
    s: &Store,
) -> (AccountId, Endpoint, Endpoint, Vec<ClaimedDelivery>) {
    let a = account(s, "a").await;
    let mut endpoints = Vec::new();
    for _ in 0..2 {
        endpoints.push(
            s.create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
                .await
                .unwrap(),
        );
    }
    customer(s, a).await;
    customer(s, a).await;
    sequence_all(s, &ids()).await;
    let claimed = s
        .claim_deliveries(Timestamp(T0), Timestamp(T0 + 10_000), "A", 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4, "two events to two endpoints");
    let second = endpoints.pop().unwrap();
    (a, endpoints.pop().unwrap(), second, claimed)
}

/// An endpoint deleted (with its deliveries) while its sends were in flight: the batch that
/// records them, with other endpoints' completions beside it, either applies the others and
/// answers the deleted ones `false`, or fails as a whole and then each completion on its own
/// does (what the worker falls back to). Either way the other endpoint's deliveries end
/// succeeded with one attempt each, and nothing of the deleted endpoint comes back.
pub async fn a_batch_survives_an_endpoint_deleted_under_it(s: Store) {
    let (a, gone, kept, mut claimed) = two_endpoints_two_events_claimed(&s).await;
    let now = Timestamp(T0);
    claimed.sort_by_key(|c| (c.endpoint_id != gone.id, c.delivery_id));
    assert!(s.delete_endpoint(a, gone.id).await.unwrap());
    let batch: Vec<Completion> = claimed
        .iter()
        .map(|c| finish(c, "A", Outcome::Succeeded, HealthPolicy::default()))
        .collect();
    let held = match s.complete_deliveries(batch.clone(), now).await {
        Ok(held) => held,
        Err(_) => {
            let mut held = Vec::new();
            for c in batch {
                held.push(s.complete_delivery(c, now).await.unwrap());
            }
            held
        }
    };
    assert_eq!(held, vec![false, false, true, true]);
    assert!(s.get_endpoint(a, gone.id).await.unwrap().is_none());
    assert!(
        s.list_deliveries(a, gone.id, page(10, None))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.list_attempts(a, gone.id, page(10, None))
            .await
            .unwrap()
            .is_empty()
    );
    let states: Vec<String> = s
        .list_deliveries(a, kept.id, page(10, None))
        .await
        .unwrap()
        .iter()
        .map(|d| d.state.clone())
        .collect();
    assert_eq!(states, vec!["succeeded", "succeeded"]);
    let attempts = s.list_attempts(a, kept.id, page(10, None)).await.unwrap();
    let mut of: Vec<i64> = attempts.iter().map(|at| at.delivery_id).collect();
    of.sort_unstable();
    let mut expected: Vec<i64> = claimed[2..].iter().map(|c| c.delivery_id).collect();
    expected.sort_unstable();
    assert_eq!(
        of, expected,
        "one attempt per delivery of the kept endpoint"
    );
}

pub async fn completions_in_one_batch_apply_each_fenced(s: Store) {
    let (a, e1, e2, mut claimed) = two_endpoints_two_events_claimed(&s).await;
    let now = Timestamp(T0);
    claimed.sort_by_key(|c| (c.endpoint_id, c.delivery_id));
    let retry = Outcome::Retry(Timestamp(T0 + 5_000));
    let batch = vec![
        finish(
            &claimed[0],
            "A",
            Outcome::Succeeded,
            HealthPolicy::default(),
        ),
        finish(
            &claimed[1],
            "stale",
            Outcome::Succeeded,
            HealthPolicy::default(),
        ),
        finish(&claimed[2], "A", retry, HealthPolicy::default()),
        finish(
            &claimed[3],
            "A",
            Outcome::Succeeded,
            HealthPolicy::default(),
        ),
    ];
    assert_eq!(
        s.complete_deliveries(batch, now).await.unwrap(),
        vec![true, false, true, true]
    );
    assert_eq!(
        s.complete_deliveries(Vec::new(), now).await.unwrap(),
        Vec::<bool>::new()
    );
    let states = |id| {
        let s = s.clone();
        async move {
            let mut v: Vec<(i64, String)> = s
                .list_deliveries(a, id, page(10, None))
                .await
                .unwrap()
                .iter()
                .map(|d| (d.id, d.state.clone()))
                .collect();
            v.sort();
            v.into_iter().map(|(_, st)| st).collect::<Vec<_>>()
        }
    };
    assert_eq!(claimed[0].endpoint_id, e1.id);
    assert_eq!(states(e1.id).await, vec!["succeeded", "in_flight"]);
    assert_eq!(states(e2.id).await, vec!["retrying", "succeeded"]);
    let lost: Vec<Option<String>> = s
        .list_attempts(a, e1.id, page(10, None))
        .await
        .unwrap()
        .iter()
        .filter(|at| at.delivery_id == claimed[1].delivery_id)
        .map(|at| at.error_kind.clone())
        .collect();
    assert_eq!(lost, vec![Some("lease_lost".to_owned())]);
    // What each recorded success holds, written together or one by one alike.
    for (c, e) in [(&claimed[0], e1.id), (&claimed[3], e2.id)] {
        let attempts = s.list_attempts(a, e, page(10, None)).await.unwrap();
        let mine: Vec<_> = attempts
            .iter()
            .filter(|at| at.delivery_id == c.delivery_id)
            .map(|at| {
                let mut at = at.clone();
                at.id = 0;
                at
            })
            .collect();
        assert_eq!(mine, vec![attempt(c, Some(200), None)]);
        let d = s
            .list_deliveries(a, e, page(10, None))
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == c.delivery_id)
            .unwrap();
        assert_eq!(
            (d.last_status, d.last_error, d.updated_at),
            (Some(200), None, now)
        );
    }
}

/// Spec checklist 26 (FIFO mode): an endpoint with `fifo_per_aggregate` gets the events of one
/// aggregate one at a time, in sequence order, each only once the one before finished (retries
/// included; failing for good counts as finished); other aggregates and other endpoints are not
/// held back.
pub async fn fifo_endpoints_get_one_aggregate_at_a_time_in_order(s: Store) {
    let a = account(&s, "a").await;
    let fifo = s
        .create_endpoint(
            a,
            NewEndpoint {
                fifo_per_aggregate: true,
                ..endpoint_capped(&["*"], 10)
            },
            Timestamp(T0),
        )
        .await
        .unwrap();
    assert!(fifo.fifo_per_aggregate);
    let free = s
        .create_endpoint(a, endpoint_capped(&["*"], 10), Timestamp(T0))
        .await
        .unwrap();
    assert!(!free.fifo_per_aggregate);
    let c = customer(&s, a).await;
    for v in [1, 2] {
        s.update_customer(
            &meta(a),
            c.id,
            Precondition::Version(v),
            CustomerPatch::default(),
        )
        .await
        .unwrap();
    }
    let other = customer(&s, a).await;
    let logged = sequence_all(&s, &ids()).await;
    let version = |event_id: &str| {
        let e = logged.iter().find(|e| e.event_id == event_id).unwrap();
        (e.aggregate_id, e.aggregate_version)
    };
    let mut token = 0;
    let mut claim = |at: i64| {
        token += 1;
        let (s, token) = (s.clone(), format!("t{token}"));
        async move {
            let claimed = s
                .claim_deliveries(Timestamp(at), Timestamp(at + 60_000), &token, 20)
                .await
                .unwrap();
            (claimed, token)
        }
    };
    let of = |claimed: &[ClaimedDelivery], endpoint: i64| -> Vec<(i64, i64)> {
        let mut v: Vec<_> = claimed
            .iter()
            .filter(|d| d.endpoint_id == endpoint)
            .map(|d| version(&d.event_id))
            .collect();
        v.sort();
        v
    };
    let (first, t1) = claim(T0).await;
    // The plain endpoint gets all four at once; the FIFO one the first of each aggregate.
    assert_eq!(
        of(&first, free.id),
        vec![(c.id, 1), (c.id, 2), (c.id, 3), (other.id, 1)]
    );
    assert_eq!(of(&first, fifo.id), vec![(c.id, 1), (other.id, 1)]);
    let head = |claimed: &[ClaimedDelivery]| {
        claimed
            .iter()
            .find(|d| d.endpoint_id == fifo.id && version(&d.event_id) == (c.id, 1))
            .unwrap()
            .clone()
    };
    // Version 1 fails and waits for its retry: version 2 stays behind it.
    let retry = Outcome::Retry(Timestamp(T0 + 1_000));
    let v1 = head(&first);
    assert!(
        s.complete_delivery(finish(&v1, &t1, retry, no_breaker()), Timestamp(T0))
            .await
            .unwrap()
    );
    let (none, _) = claim(T0 + 10).await;
    assert_eq!(of(&none, fifo.id), vec![]);
    let (again, t2) = claim(T0 + 1_000).await;
    assert_eq!(
        of(&again, fifo.id),
        vec![(c.id, 1)],
        "the retry, nothing after it"
    );
    let v1 = head(&again);
    assert_eq!(v1.attempt_no, 2);
    s.complete_delivery(
        finish(&v1, &t2, Outcome::Succeeded, no_breaker()),
        Timestamp(T0 + 1_000),
    )
    .await
    .unwrap();
    let (next, t3) = claim(T0 + 1_000).await;
    assert_eq!(of(&next, fifo.id), vec![(c.id, 2)]);
    // Failing for good finishes version 2 too: version 3 goes next.
    let v2 = next.iter().find(|d| d.endpoint_id == fifo.id).unwrap();
    s.complete_delivery(
        finish(v2, &t3, Outcome::Exhausted, no_breaker()),
        Timestamp(T0 + 1_000),
    )
    .await
    .unwrap();
    let (last, _) = claim(T0 + 1_000).await;
    assert_eq!(of(&last, fifo.id), vec![(c.id, 3)]);
    // Turning FIFO off lets the endpoint's later deliveries go unordered; the flag reads back.
    let off = s
        .update_endpoint(
            a,
            fifo.id,
            EndpointPatch {
                fifo_per_aggregate: Some(false),
                ..EndpointPatch::default()
            },
            Timestamp(T0 + 2_000),
        )
        .await
        .unwrap();
    assert!(!off.fifo_per_aggregate);
}

/// Whether a claim at `at` finds nothing due (it leases what it finds, under its own token).
async fn nothing_due(s: &Store, at: Timestamp) -> bool {
    let found = s.claim_deliveries(at, at, "nothing-due", 10).await.unwrap();
    found.is_empty()
}

/// An account with an endpoint for every event and three customers' events due to it; the
/// first `n` of them leased under `A`.
async fn three_due_leasing(s: &Store, n: u32) -> (i64, Endpoint, Vec<ClaimedDelivery>) {
    let a = account(s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..3 {
        customer(s, a).await;
    }
    sequence_all(s, &ids()).await;
    let claimed = s
        .claim_deliveries(Timestamp(T0), Timestamp(T0 + 1_000), "A", n)
        .await
        .unwrap();
    assert_eq!(claimed.len(), n as usize, "{claimed:?}");
    (a, e, claimed)
}

pub async fn a_gone_receiver_disables_its_endpoint(s: Store) {
    let (a, e, claimed) = three_due_leasing(&s, 1).await;
    let gone = finish(&claimed[0], "A", Outcome::Gone, HealthPolicy::default());
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
    assert!(nothing_due(&s, later).await);
}

/// A delivery leased and never sent is given back due, its attempt not counted — unless its
/// endpoint answered 410 meanwhile: then it is cancelled like the endpoint's other due
/// deliveries, and nothing of that endpoint is due again.
pub async fn a_delivery_given_back_to_a_gone_endpoint_is_cancelled(s: Store) {
    let (a, gone, claimed) = three_due_leasing(&s, 2).await;
    let now = Timestamp(T0);
    let (sent, held) = (&claimed[0], &claimed[1]);
    let answer = finish(sent, "A", Outcome::Gone, HealthPolicy::default());
    assert!(s.complete_delivery(answer, now).await.unwrap());
    // The 410's cancel leaves the held delivery alone: it is leased.
    let state_of = |ds: &[Delivery], id: i64| {
        let d = ds.iter().find(|d| d.id == id).unwrap();
        (d.state.clone(), d.attempt_count, d.last_error.clone())
    };
    let listed = s.list_deliveries(a, gone.id, page(10, None)).await.unwrap();
    assert_eq!(state_of(&listed, held.delivery_id).0, "in_flight");
    assert_eq!(
        s.return_unsent("A", &[held.delivery_id], now)
            .await
            .unwrap(),
        1
    );
    let listed = s.list_deliveries(a, gone.id, page(10, None)).await.unwrap();
    assert_eq!(
        state_of(&listed, held.delivery_id),
        ("cancelled".to_owned(), 0, Some("gone".to_owned()))
    );
    assert!(listed.iter().all(|d| d.state == "cancelled"), "{listed:?}");
    let later = Timestamp(T0 + 100_000);
    assert!(nothing_due(&s, later).await);
    // An endpoint in good health gets its delivery back due, as it was before the claim.
    let healthy = s
        .create_endpoint(a, endpoint(&["customer.*"]), Timestamp(T0))
        .await
        .unwrap();
    customer(&s, a).await;
    sequence_all(&s, &ids()).await;
    let claimed = s.claim_deliveries(later, later, "C", 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].endpoint_id, healthy.id);
    let id = claimed[0].delivery_id;
    assert_eq!(s.return_unsent("C", &[id], later).await.unwrap(), 1);
    let listed = s
        .list_deliveries(a, healthy.id, page(10, None))
        .await
        .unwrap();
    assert_eq!(state_of(&listed, id), ("pending".to_owned(), 0, None));
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
                            policy: HealthPolicy::default(),
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

/// A redelivery racing the completion of the attempt in flight answers with the state its own
/// write left: in flight (not queued, the attempt under way) or pending (queued). Never the
/// outcome the completion recorded just after it, which would tell the caller its redelivery
/// was queued when it was not.
pub async fn a_redelivery_answers_what_it_wrote(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    customer(&s, a).await;
    let event_id = sequence_all(&s, &ids()).await[0].event_id.clone();
    for round in 0..40 {
        let now = Timestamp(T0 + round * 10_000);
        let token = format!("r{round}");
        let claimed = s
            .claim_deliveries(now, Timestamp(now.0 + 5_000), &token, 1)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "round {round}");
        let done = Completion {
            delivery_id: claimed[0].delivery_id,
            lease_token: token,
            attempt: attempt(&claimed[0], Some(200), None),
            outcome: Outcome::Succeeded,
            policy: HealthPolicy::default(),
        };
        let (completer, redeliverer) = (s.clone(), s.clone());
        let completed =
            tokio::spawn(async move { completer.complete_delivery(done, now).await.unwrap() });
        let event = event_id.clone();
        let answered =
            tokio::spawn(async move { redeliverer.redeliver(a, e.id, &event, now).await.unwrap() });
        assert!(completed.await.unwrap());
        let answered = answered.await.unwrap();
        let after = &s.list_deliveries(a, e.id, page(10, None)).await.unwrap()[0];
        match answered.state.as_str() {
            // Queued: the completion came first and the delivery is due again.
            "pending" => assert_eq!(after.state, "pending", "round {round}"),
            // Not queued: the attempt was still in flight; the completion then finished it.
            "in_flight" => {
                assert_eq!(after.state, "succeeded", "round {round}");
                s.redeliver(a, e.id, &event_id, now).await.unwrap();
            }
            other => panic!("round {round}: a redelivery answered {other:?}"),
        }
    }
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

/// A relay whose own hand-off is the publication (no NATS) marks what it sequences in the same
/// transaction: nothing reaches the publisher's backlog, the events are logged as usual, and
/// a later pass without the mark leaves its events to the publisher.
pub async fn events_sequenced_as_published_skip_the_backlog(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    order(&s, a, c.id, 100).await;
    let new_id = ids();
    let marked = s
        .sequence_events(100, Timestamp(T0), &new_id, true)
        .await
        .unwrap();
    assert_eq!(marked.len(), 2, "the customer and the order");
    assert!(s.unpublished_events(10).await.unwrap().is_empty());
    let ids_of = |evs: &[LoggedEvent]| evs.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        s.mark_published(&ids_of(&marked), Timestamp(T0 + 1))
            .await
            .unwrap(),
        0,
        "already marked by the sequencing transaction"
    );
    let logged = s.events_after(a, 0, &[], 10).await.unwrap();
    assert_eq!(
        ids_of(&logged),
        ids_of(&marked),
        "logged as usual, in seq order"
    );
    order(&s, a, c.id, 200).await;
    let later = s
        .sequence_events(100, Timestamp(T0), &new_id, false)
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(
        ids_of(&s.unpublished_events(10).await.unwrap()),
        ids_of(&later),
        "only the unmarked pass is left to the publisher"
    );
}

fn finish(c: &ClaimedDelivery, token: &str, outcome: Outcome, policy: HealthPolicy) -> Completion {
    let (status, kind) = match outcome {
        Outcome::Succeeded => (Some(200), None),
        Outcome::Gone => (Some(410), Some("http_status")),
        _ => (Some(503), Some("http_status")),
    };
    Completion {
        delivery_id: c.delivery_id,
        lease_token: token.into(),
        attempt: attempt(c, status, kind),
        outcome,
        policy,
    }
}

fn endpoint_capped(types: &[&str], max_concurrency: i64) -> NewEndpoint {
    NewEndpoint {
        max_concurrency,
        ..endpoint(types)
    }
}

/// Account `a` with one endpoint for every event, capped at 2, and five deliveries to it,
/// fanned out: the account, the endpoint, and the deliveries' ids, oldest first.
async fn five_due_at_a_cap_of_two(s: &Store) -> (i64, Endpoint, Vec<i64>) {
    let a = account(s, "a").await;
    let ep = s
        .create_endpoint(a, endpoint_capped(&["*"], 2), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..5 {
        customer(s, a).await;
    }
    sequence_all(s, &ids()).await;
    let mut all: Vec<i64> = s
        .list_deliveries(a, ep.id, page(100, None))
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    all.sort_unstable();
    (a, ep, all)
}

/// A policy whose breaker never opens (for cases about something else).
fn no_breaker() -> HealthPolicy {
    HealthPolicy {
        breaker_threshold: i64::MAX,
        rate_min_attempts: i64::MAX,
        ..HealthPolicy::default()
    }
}

/// Spec checklist 24/25: claims never lease more than an endpoint's `max_concurrency` at once,
/// however many claimers run; another endpoint is served meanwhile; lapsed leases make room.
pub async fn claims_never_exceed_an_endpoints_concurrency(s: Store) {
    let a = account(&s, "a").await;
    let capped = s
        .create_endpoint(a, endpoint_capped(&["*"], 3), Timestamp(T0))
        .await
        .unwrap();
    let other = s
        .create_endpoint(a, endpoint_capped(&["*"], 2), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..5 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let (now, lease) = (Timestamp(T0), Timestamp(T0 + 1_000));
    // One claimer asking for 10 gets 3 of the capped endpoint's and 2 of the other's.
    let first = s.claim_deliveries(now, lease, "A", 10).await.unwrap();
    let per = |batch: &[ClaimedDelivery], id| batch.iter().filter(|c| c.endpoint_id == id).count();
    assert_eq!((per(&first, capped.id), per(&first, other.id)), (3, 2));
    assert!(
        s.claim_deliveries(now, lease, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // One completes: room for exactly one more.
    let done = finish(&first[0], "A", Outcome::Succeeded, HealthPolicy::default());
    assert!(s.complete_delivery(done, now).await.unwrap());
    let next = s.claim_deliveries(now, lease, "B", 10).await.unwrap();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].endpoint_id, first[0].endpoint_id);
    // Lapsed leases are not in flight any more: they are taken over, within the cap.
    let later = Timestamp(T0 + 1_001);
    let taken = s
        .claim_deliveries(later, Timestamp(T0 + 2_000), "C", 10)
        .await
        .unwrap();
    assert_eq!((per(&taken, capped.id), per(&taken, other.id)), (3, 2));

    // Many claimers at once, each holding its leases for a while: the number held for the
    // endpoint never exceeds the cap, and every delivery goes out once.
    capped_workers(&s, "b", false).await;
}

/// Issue 5: a claim that leases ahead (`claim_ahead`) gives each of an endpoint's slots up to
/// `depth` deliveries, oldest first across the slots, and counts the cap in slots, so nobody
/// else leases anything while the endpoint's slots are taken; a lease handed on stays in its
/// slot; and a delivery held ahead but never sent is given back as it was, its attempt not
/// counted and nothing recorded for it. PostgreSQL leases ahead; a backend that does not (the
/// default) leases one delivery per slot, within the cap.
pub async fn slots_lease_ahead_within_the_cap(s: Store) {
    let (a, ep, all) = five_due_at_a_cap_of_two(&s).await;
    let (now, lease, until) = (Timestamp(T0), Timestamp(T0 + 1_000), Timestamp(T0 + 5_000));
    let claimed = s.claim_ahead(now, lease, "A", 10, 2).await.unwrap();
    let ahead = claimed.iter().any(|c| c.slot.is_some());
    assert_eq!(ahead, s.backend() == "postgres", "{claimed:?}");
    let mut slots: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for c in &claimed {
        assert_eq!((c.endpoint_id, c.account_id), (ep.id, a));
        let slot = c.slot.unwrap_or(-c.delivery_id);
        slots.entry(slot).or_default().push(c.delivery_id);
    }
    let held: Vec<Vec<i64>> = slots.into_values().collect();
    if ahead {
        assert_eq!(held, [vec![all[0], all[2]], vec![all[1], all[3]]]);
    } else {
        assert_eq!(held.len(), 2);
        assert!(held.iter().all(|slot| slot.len() == 1), "{held:?}");
    }
    // The cap counts slots: with both taken, nobody else leases anything.
    assert!(
        s.claim_ahead(now, lease, "B", 10, 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.claim_deliveries(now, lease, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
    if !ahead {
        return;
    }
    // Slot 0's first delivery succeeds and hands its lease on: the oldest due one joins the
    // slot, which now holds two again, so still nobody else leases anything.
    let first = &claimed[0];
    assert_eq!(first.delivery_id, all[0]);
    let out = s
        .complete_and_hand_on(
            vec![finish(
                first,
                "A",
                Outcome::Succeeded,
                HealthPolicy::default(),
            )],
            now,
            Some(until),
        )
        .await
        .unwrap();
    let next = out[0].1.clone().expect("a lease handed on");
    assert_eq!((next.delivery_id, next.slot), (all[4], first.slot));
    assert!(
        s.claim_ahead(now, lease, "B", 10, 2)
            .await
            .unwrap()
            .is_empty()
    );
    // Slot 0 stops before sending its second delivery: it is given back as it was. A token
    // that does not hold a delivery gives back nothing.
    assert_eq!(s.return_unsent("B", &[all[2]], now).await.unwrap(), 0);
    assert_eq!(s.return_unsent("A", &[all[2]], now).await.unwrap(), 1);
    let deliveries = s.list_deliveries(a, ep.id, page(100, None)).await.unwrap();
    let back = deliveries.iter().find(|d| d.id == all[2]).unwrap();
    assert_eq!((back.state.as_str(), back.attempt_count), ("pending", 0));
    let attempts = s.list_attempts(a, ep.id, page(100, None)).await.unwrap();
    assert!(
        attempts.iter().all(|t| t.delivery_id != all[2]),
        "{attempts:?}"
    );
    // Slot 0 still holds the delivery handed on, slot 1 its two: the cap still holds.
    assert!(
        s.claim_ahead(now, lease, "B", 10, 2)
            .await
            .unwrap()
            .is_empty()
    );
    // Once the leases lapse, a claim leases the endpoint's slots afresh, oldest due first.
    let later = Timestamp(T0 + 6_000);
    let again = s
        .claim_ahead(later, Timestamp(T0 + 7_000), "C", 10, 2)
        .await
        .unwrap();
    let mut ids: Vec<i64> = again.iter().map(|c| c.delivery_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [all[1], all[2], all[3], all[4]]);
}

/// Issue 5: a completion that hands its lease on (`complete_and_hand_on`) keeps the endpoint
/// within its cap. What is handed on is the endpoint's oldest due delivery, under the
/// completion's token, counted as its first attempt; a disabled or FIFO-held endpoint gets
/// nothing handed on; and many workers completing and claiming at once never hold more than the
/// cap, each delivery going out once. A backend may hand nothing on (the default); every check
/// below holds either way.
pub async fn completions_hand_leases_on_within_the_cap(s: Store) {
    let (a, ep, all) = five_due_at_a_cap_of_two(&s).await;
    let (now, lease, until) = (Timestamp(T0), Timestamp(T0 + 1_000), Timestamp(T0 + 5_000));
    let first = s.claim_deliveries(now, lease, "A", 10).await.unwrap();
    assert_eq!(
        first.iter().map(|c| c.delivery_id).collect::<Vec<_>>(),
        all[..2]
    );
    let done = |cs: &[ClaimedDelivery]| {
        cs.iter()
            .map(|c| finish(c, "A", Outcome::Succeeded, HealthPolicy::default()))
            .collect::<Vec<_>>()
    };
    let out = s
        .complete_and_hand_on(done(&first), now, Some(until))
        .await
        .unwrap();
    assert!(out.iter().all(|(held, _)| *held), "{out:?}");
    let handed: Vec<ClaimedDelivery> = out.into_iter().filter_map(|(_, next)| next).collect();
    let claimed = s.claim_deliveries(now, lease, "B", 10).await.unwrap();
    // Whatever was handed on plus whatever a claim finds room for: the next two, oldest first.
    let mut second: Vec<i64> = handed
        .iter()
        .chain(&claimed)
        .map(|c| c.delivery_id)
        .collect();
    second.sort_unstable();
    assert_eq!(second, all[2..4], "handed {handed:?} claimed {claimed:?}");
    for h in &handed {
        assert_eq!((h.endpoint_id, h.attempt_no, h.account_id), (ep.id, 1, a));
        assert!(!h.body.is_empty() && !h.url.is_empty());
    }
    // Handed-on leases are the completion's token's: completing them under it is held.
    let tokened: Vec<Completion> = handed
        .iter()
        .map(|c| finish(c, "A", Outcome::Succeeded, HealthPolicy::default()))
        .chain(
            claimed
                .iter()
                .map(|c| finish(c, "B", Outcome::Succeeded, HealthPolicy::default())),
        )
        .collect();
    // A disabled endpoint gets nothing handed on.
    let off = EndpointPatch {
        enabled: Some(false),
        ..Default::default()
    };
    s.update_endpoint(a, ep.id, off, now).await.unwrap();
    let out = s
        .complete_and_hand_on(tokened, now, Some(until))
        .await
        .unwrap();
    assert!(
        out.iter().all(|(held, next)| *held && next.is_none()),
        "{out:?}"
    );
    let left = s.list_deliveries(a, ep.id, page(100, None)).await.unwrap();
    let pending: Vec<i64> = left
        .iter()
        .filter(|d| d.state == "pending")
        .map(|d| d.id)
        .collect();
    assert_eq!(pending, all[4..]);

    // FIFO: customer `c` created then updated, customer `o` created. A claim takes `c`'s first
    // event and `o`'s (`c`'s second waits for its first). Completing `o`'s frees a slot whose
    // only due delivery is `c`'s second, still held back by `c`'s first in flight: nothing is
    // handed on.
    let b = account(&s, "b").await;
    let fifo = s
        .create_endpoint(
            b,
            NewEndpoint {
                fifo_per_aggregate: true,
                ..endpoint_capped(&["*"], 4)
            },
            now,
        )
        .await
        .unwrap();
    let c = customer(&s, b).await;
    s.update_customer(
        &meta(b),
        c.id,
        Precondition::Version(1),
        CustomerPatch::default(),
    )
    .await
    .unwrap();
    customer(&s, b).await;
    sequence_all(&s, &ids()).await;
    let claimed: Vec<_> = s
        .claim_deliveries(now, lease, "F", 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.endpoint_id == fifo.id)
        .collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    let others = finish(
        &claimed[1],
        "F",
        Outcome::Succeeded,
        HealthPolicy::default(),
    );
    let out = s
        .complete_and_hand_on(vec![others], now, Some(until))
        .await
        .unwrap();
    assert!(out[0].0);
    assert!(out[0].1.is_none(), "handed on past FIFO: {out:?}");

    // Many workers, each claiming, then completing and following what is handed on: never
    // more than the cap held, each delivery out once.
    capped_workers(&s, "w", true).await;
}

/// Six workers over 60 deliveries to one endpoint with a cap of 4, each claiming up to 2 at a
/// time, holding them a while and completing them one by one — with `hand_on`, through
/// `complete_and_hand_on`, sending what is handed on next. The count held (up after a claim or
/// hand-on commits, down before a completion commits, so never above the database's own
/// count) never passes the cap, and every delivery goes out exactly once.
async fn capped_workers(s: &Store, name: &str, hand_on: bool) {
    let w = account(s, name).await;
    let now = Timestamp(T0);
    let busy = s
        .create_endpoint(w, endpoint_capped(&["*"], 4), now)
        .await
        .unwrap();
    for _ in 0..60 {
        customer(s, w).await;
    }
    sequence_all(s, &ids()).await;
    let held = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let up = |held: &std::sync::atomic::AtomicI64, peak: &std::sync::atomic::AtomicI64, k| {
        peak.fetch_max(held.fetch_add(k, Ordering::SeqCst) + k, Ordering::SeqCst);
    };
    let workers: Vec<_> = (0..6)
        .map(|n| {
            let (s, held, peak) = (s.clone(), held.clone(), peak.clone());
            tokio::spawn(async move {
                let token = format!("{}{n}", if hand_on { "h" } else { "w" });
                let far = Timestamp(T0 + 600_000);
                let mut got = Vec::new();
                let mut idle = 0;
                while idle < 50 {
                    let batch = s.claim_deliveries(now, far, &token, 2).await.unwrap();
                    let mut mine: Vec<_> =
                        batch.into_iter().filter(|c| c.account_id == w).collect();
                    if mine.is_empty() {
                        idle += 1;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle = 0;
                    up(&held, &peak, mine.len() as i64);
                    while let Some(c) = mine.pop() {
                        tokio::task::yield_now().await;
                        held.fetch_sub(1, Ordering::SeqCst);
                        let done = finish(&c, &token, Outcome::Succeeded, HealthPolicy::default());
                        got.push(c.delivery_id);
                        if !hand_on {
                            assert!(s.complete_delivery(done, now).await.unwrap());
                            continue;
                        }
                        let out = s
                            .complete_and_hand_on(vec![done], now, Some(far))
                            .await
                            .unwrap();
                        let (ok, next) = out.into_iter().next().unwrap();
                        assert!(ok);
                        if let Some(next) = next {
                            up(&held, &peak, 1);
                            mine.push(next);
                        }
                    }
                }
                got
            })
        })
        .collect();
    let mut sent = Vec::new();
    for w in workers {
        sent.extend(w.await.unwrap());
    }
    let distinct: BTreeSet<_> = sent.iter().copied().collect();
    assert_eq!((sent.len(), distinct.len()), (60, 60));
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=4).contains(&peak), "peak in flight {peak}");
    let left = s
        .list_deliveries(w, busy.id, page(100, None))
        .await
        .unwrap();
    assert!(left.iter().all(|d| d.state == "succeeded"));
}

/// For a backend that hands leases on (PostgreSQL): two held successes at an endpoint with a
/// cap of 2 hand both leases on, to the two oldest due deliveries, and a claim then finds no
/// room though a fifth is still due (the generic case above accepts a backend that hands
/// nothing on).
pub async fn successes_hand_their_leases_on(s: Store) {
    let (_, ep, all) = five_due_at_a_cap_of_two(&s).await;
    let (now, lease) = (Timestamp(T0), Timestamp(T0 + 1_000));
    let first = s.claim_deliveries(now, lease, "A", 10).await.unwrap();
    assert_eq!(first.len(), 2, "the cap: {first:?}");
    let cs = first
        .iter()
        .map(|c| finish(c, "A", Outcome::Succeeded, HealthPolicy::default()))
        .collect();
    let out = s.complete_and_hand_on(cs, now, Some(lease)).await.unwrap();
    let mut handed: Vec<i64> = out
        .iter()
        .filter_map(|(_, next)| next.as_ref())
        .inspect(|n| assert_eq!((n.endpoint_id, n.attempt_no), (ep.id, 1)))
        .map(|n| n.delivery_id)
        .collect();
    handed.sort_unstable();
    // The two oldest of the three still due: the third and fourth deliveries fanned out.
    assert_eq!(handed, all[2..4], "{out:?}");
    // Two leases live at a cap of 2: the fifth, due, is not claimed.
    assert!(
        s.claim_deliveries(now, lease, "B", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Spec checklist 33: finished deliveries past retention and their attempts are purged in
/// statements of at most `limit` rows; pending, retrying and in-flight ones never are, and
/// nothing changed at or after the cutoff goes.
pub async fn retention_purges_finished_deliveries_in_bounded_batches(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint_capped(&["*"], 10), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..6 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let mut c = s
        .claim_deliveries(Timestamp(T0), Timestamp(T0 + 60_000), "W", 10)
        .await
        .unwrap();
    assert_eq!(c.len(), 6);
    c.sort_by_key(|c| c.delivery_id);
    let outcomes = [
        Outcome::Succeeded,
        Outcome::Succeeded,
        Outcome::Succeeded,
        Outcome::Exhausted,
        Outcome::Retry(Timestamp(T0 + 3_600_000)),
    ];
    for (claimed, outcome) in c.iter().zip(outcomes) {
        let done = finish(claimed, "W", outcome, no_breaker());
        assert!(s.complete_delivery(done, Timestamp(T0)).await.unwrap());
    }
    // c[5] stays in flight. Nothing changed before T0: nothing to purge.
    assert_eq!(s.purge_deliveries(Timestamp(T0), 2).await.unwrap(), 0);
    let mut calls = Vec::new();
    loop {
        let n = s.purge_deliveries(Timestamp(T0 + 1), 2).await.unwrap();
        if n == 0 {
            break;
        }
        calls.push(n);
    }
    assert!(calls.iter().all(|&n| n <= 2), "{calls:?}");
    assert_eq!(
        calls.iter().sum::<u64>(),
        8,
        "4 attempts, then 4 deliveries: {calls:?}"
    );
    let mut left: Vec<(i64, String)> = s
        .list_deliveries(a, e.id, page(10, None))
        .await
        .unwrap()
        .iter()
        .map(|d| (d.id, d.state.clone()))
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            (c[4].delivery_id, "retrying".to_owned()),
            (c[5].delivery_id, "in_flight".to_owned())
        ]
    );
    let attempts = s.list_attempts(a, e.id, page(10, None)).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].delivery_id, c[4].delivery_id);
}

/// The breaker's failure-rate trigger (spec §2.3, "≥ 50 % failures over ≥ 20 attempts"):
/// an endpoint that fails every other attempt never has five failures in a row, and its
/// circuit opens at the failure that makes 10 of 20; lost leases are not attempts.
pub async fn half_of_twenty_attempts_failing_opens_the_circuit(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..21 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let policy = HealthPolicy::default();
    // A lease lost along the way records a `lease_lost` attempt, which must not count.
    let lost = s
        .claim_deliveries(Timestamp(T0), Timestamp(T0 + 1), "L", 1)
        .await
        .unwrap();
    let late = finish(&lost[0], "stale", Outcome::Succeeded, policy);
    for i in 0..20 {
        let t = T0 + 10 + i;
        let c = s
            .claim_deliveries(Timestamp(t), Timestamp(t + 60_000), "W", 1)
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "attempt {i}");
        if i == 5 {
            assert!(
                !s.complete_delivery(late.clone(), Timestamp(t))
                    .await
                    .unwrap()
            );
        }
        let outcome = if i % 2 == 0 {
            Outcome::Succeeded
        } else {
            Outcome::Retry(Timestamp(T0 + 3_600_000))
        };
        assert!(
            s.complete_delivery(finish(&c[0], "W", outcome, policy), Timestamp(t))
                .await
                .unwrap()
        );
        let h = s.get_endpoint(a, e.id).await.unwrap().unwrap().health;
        assert!(h.consecutive_failures <= 1, "attempt {i}: {h:?}");
        assert_eq!(h.circuit_open, i == 19, "attempt {i}: {h:?}");
    }
}

/// Spec checklist 24: five failures in a row open the circuit; while open nothing is claimed
/// and attempt counts stand still; after the cooldown exactly one probe goes out; a failed
/// probe reopens it, a successful one closes it and makes the backlog due at once.
pub async fn the_circuit_opens_probes_and_closes(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..8 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let policy = HealthPolicy {
        breaker_threshold: 5,
        cooldown_ms: 10_000,
        disable_after_ms: 3_600_000,
        ..HealthPolicy::default()
    };
    let lease = |t: i64| Timestamp(t + 60_000);
    let fail = |c: &ClaimedDelivery, tok: &str, t: i64| {
        finish(c, tok, Outcome::Retry(Timestamp(t + 1_000)), policy)
    };
    // Four claimed, four fail: still closed.
    let t = T0;
    let first = s
        .claim_deliveries(Timestamp(t), lease(t), "A", 10)
        .await
        .unwrap();
    assert_eq!(first.len(), 4, "the default cap");
    for c in &first {
        assert!(
            s.complete_delivery(fail(c, "A", t), Timestamp(t))
                .await
                .unwrap()
        );
    }
    let h = s.get_endpoint(a, e.id).await.unwrap().unwrap().health;
    assert_eq!((h.consecutive_failures, h.circuit_open), (4, false));
    assert_eq!(h.first_failure_at, Some(Timestamp(t)));
    // The other four go out; the first of them to fail is the fifth in a row: open.
    let second = s
        .claim_deliveries(Timestamp(t), lease(t), "B", 10)
        .await
        .unwrap();
    assert_eq!(second.len(), 4);
    let t1 = T0 + 500;
    assert!(
        s.complete_delivery(fail(&second[0], "B", t1), Timestamp(t1))
            .await
            .unwrap()
    );
    let ep = s.get_endpoint(a, e.id).await.unwrap().unwrap();
    let until = Timestamp(t1 + 10_000);
    assert_eq!(
        (ep.health.circuit_open, ep.health.circuit_open_until),
        (true, Some(until))
    );
    assert_eq!(ep.health.circuit_state(Timestamp(t1)), "open");
    assert_eq!(ep.health.circuit_state(until), "half_open");
    // The others still in flight fail too: counted, the cooldown unchanged.
    for c in &second[1..] {
        assert!(
            s.complete_delivery(fail(c, "B", t1), Timestamp(t1))
                .await
                .unwrap()
        );
    }
    let ep = s.get_endpoint(a, e.id).await.unwrap().unwrap();
    assert_eq!(
        (ep.health.consecutive_failures, ep.health.circuit_open_until),
        (8, Some(until))
    );
    // Open: nothing is claimed, the backlog waits for the cooldown, attempts stand still.
    let snapshot = |s: Store| async move {
        let mut d = s.list_deliveries(a, e.id, page(100, None)).await.unwrap();
        d.sort_by_key(|d| d.id);
        d
    };
    let before = snapshot(s.clone()).await;
    assert!(
        before
            .iter()
            .all(|d| d.next_attempt_at >= until && d.attempt_count == 1)
    );
    for t in [t1 + 1_000, t1 + 5_000, until.0 - 1] {
        assert!(
            s.claim_deliveries(Timestamp(t), lease(t), "C", 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let counts = |d: &[Delivery]| d.iter().map(|d| d.attempt_count).collect::<Vec<_>>();
    assert_eq!(counts(&snapshot(s.clone()).await), counts(&before));
    // Half-open: exactly one probe, the oldest; nothing else while it is out.
    let probe = s
        .claim_deliveries(until, lease(until.0), "D", 10)
        .await
        .unwrap();
    assert_eq!(probe.len(), 1);
    assert_eq!(probe[0].delivery_id, before[0].id);
    assert!(
        s.claim_deliveries(until, lease(until.0), "E", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The probe fails: open again for a cooldown.
    let t2 = until.0 + 100;
    assert!(
        s.complete_delivery(fail(&probe[0], "D", t2), Timestamp(t2))
            .await
            .unwrap()
    );
    let ep = s.get_endpoint(a, e.id).await.unwrap().unwrap();
    let until2 = Timestamp(t2 + 10_000);
    assert_eq!(ep.health.circuit_open_until, Some(until2));
    assert!(
        s.claim_deliveries(Timestamp(t2 + 1), lease(t2), "F", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A probe whose worker died: its lapsed lease lets the next probe out, still one at a time.
    let probe = s
        .claim_deliveries(until2, Timestamp(until2.0 + 10), "G", 10)
        .await
        .unwrap();
    assert_eq!(probe.len(), 1);
    let t3 = until2.0 + 11;
    let probe = s
        .claim_deliveries(Timestamp(t3), lease(t3), "H", 10)
        .await
        .unwrap();
    assert_eq!(probe.len(), 1);
    assert!(
        s.claim_deliveries(Timestamp(t3), lease(t3), "I", 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The probe succeeds: closed, the clock reset, and the whole backlog due now.
    let done = finish(&probe[0], "H", Outcome::Succeeded, policy);
    assert!(s.complete_delivery(done, Timestamp(t3)).await.unwrap());
    let ep = s.get_endpoint(a, e.id).await.unwrap().unwrap();
    assert_eq!(ep.health, Health::default());
    let backlog = snapshot(s.clone()).await;
    assert!(
        backlog
            .iter()
            .filter(|d| d.state != "succeeded")
            .all(|d| d.next_attempt_at <= Timestamp(t3)),
        "{backlog:?}"
    );
    let drained = s
        .claim_deliveries(Timestamp(t3), lease(t3), "J", 10)
        .await
        .unwrap();
    assert_eq!(drained.len(), 4, "the backlog drains at the cap");
}

/// Spec checklist 23: failures for longer than `disable_after` with no success disable the
/// endpoint (`failing`) and write `webhook.endpoint.disabled`; any success in between resets
/// the clock; re-enabling clears the endpoint's health.
pub async fn failing_too_long_disables_and_a_success_resets_the_clock(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    for _ in 0..3 {
        customer(&s, a).await;
    }
    sequence_all(&s, &ids()).await;
    let policy = HealthPolicy {
        breaker_threshold: i64::MAX,
        rate_min_attempts: i64::MAX,
        cooldown_ms: 1_000,
        disable_after_ms: 10_000,
        ..HealthPolicy::default()
    };
    let run = |outcome: Outcome, t: i64| {
        let s = s.clone();
        async move {
            let got = s
                .claim_deliveries(Timestamp(t), Timestamp(t + 1_000), "W", 1)
                .await
                .unwrap();
            let c = got.first().expect("a due delivery");
            let outcome = match outcome {
                Outcome::Retry(_) => Outcome::Retry(Timestamp(t)),
                o => o,
            };
            assert!(
                s.complete_delivery(finish(c, "W", outcome, policy), Timestamp(t))
                    .await
                    .unwrap()
            );
            s.get_endpoint(a, e.id).await.unwrap().unwrap()
        }
    };
    let retry = Outcome::Retry(Timestamp(0));
    assert_eq!(
        run(retry, T0).await.health.first_failure_at,
        Some(Timestamp(T0))
    );
    assert!(run(retry, T0 + 5_000).await.enabled);
    // A success: the clock starts again at the next failure.
    let ep = run(Outcome::Succeeded, T0 + 8_000).await;
    assert_eq!(ep.health, Health::default());
    let ep = run(retry, T0 + 12_000).await;
    assert!(ep.enabled, "the clock was reset by the success");
    assert_eq!(ep.health.first_failure_at, Some(Timestamp(T0 + 12_000)));
    assert!(
        run(retry, T0 + 22_000).await.enabled,
        "exactly disable_after is not longer"
    );
    let ep = run(retry, T0 + 22_001).await;
    assert_eq!(
        (ep.enabled, ep.disabled_reason.as_deref()),
        (false, Some("failing"))
    );
    // Its deliveries wait (paused, not cancelled); nothing is claimed for it.
    let states: BTreeSet<_> = s
        .list_deliveries(a, e.id, page(10, None))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.state)
        .collect();
    assert!(!states.contains("cancelled"), "{states:?}");
    let later = Timestamp(T0 + 100_000);
    assert!(nothing_due(&s, later).await);
    // One `webhook.endpoint.disabled` event, about the endpoint, without its secret.
    let logged = sequence_all(&s, &ids()).await;
    let disabled: Vec<_> = logged
        .iter()
        .filter(|e| e.event_type == "webhook.endpoint.disabled")
        .collect();
    assert_eq!(disabled.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&disabled[0].body).unwrap();
    assert_eq!(body["data"]["aggregate_type"], "webhook_endpoint");
    assert_eq!(body["data"]["aggregate_id"], e.id);
    assert_eq!(body["data"]["aggregate_version"], ep.version);
    assert_eq!(body["data"]["object"]["disabled_reason"], "failing");
    assert_eq!(body["data"]["object"]["enabled"], false);
    assert!(!disabled[0].body.contains("enc:secret"));
    assert_eq!(disabled[0].account_id, a);
    // Re-enabled: healthy again.
    let patch = EndpointPatch {
        enabled: Some(true),
        ..Default::default()
    };
    let ep = s.update_endpoint(a, e.id, patch, later).await.unwrap();
    assert_eq!(
        (ep.enabled, ep.disabled_reason, ep.health),
        (true, None, Health::default())
    );
}

/// Spec §2.2: `webhook.delivery.failing` once after the 4th failed attempt, `exhausted` once
/// after the last, `recovered` when it then succeeds; never delivered to the endpoint they are
/// about, and deliveries of operational events cause none themselves (no feedback loop).
pub async fn operational_events_are_written_once_and_never_loop(s: Store) {
    let a = account(&s, "a").await;
    let ea = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    let eb = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    customer(&s, a).await;
    let new_id = ids();
    let first = sequence_all(&s, &new_id).await;
    assert_eq!(first.len(), 1);
    let policy = no_breaker();
    // Drives one endpoint's due deliveries through `outcomes`, one attempt each.
    let drive = |endpoint_id: i64, outcomes: Vec<Outcome>, t: i64| {
        let s = s.clone();
        async move {
            for (i, o) in outcomes.into_iter().enumerate() {
                let at = t + i as i64;
                let got = s
                    .claim_deliveries(Timestamp(at), Timestamp(at + 1_000), "W", 10)
                    .await
                    .unwrap();
                for c in got {
                    let outcome = if c.endpoint_id == endpoint_id {
                        o
                    } else {
                        Outcome::Retry(Timestamp(at + 10_000_000))
                    };
                    assert!(
                        s.complete_delivery(finish(&c, "W", outcome, policy), Timestamp(at))
                            .await
                            .unwrap()
                    );
                }
            }
        }
    };
    let now_retry = |t: i64| Outcome::Retry(Timestamp(t));
    // A fails 4 times (failing), then its 5th and last attempt fails (exhausted).
    drive(
        ea.id,
        (0..4)
            .map(|i| now_retry(T0 + i + 1))
            .chain([Outcome::Exhausted])
            .collect(),
        T0,
    )
    .await;
    let ops = sequence_all(&s, &new_id).await;
    let types: Vec<_> = ops.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        vec!["webhook.delivery.failing", "webhook.delivery.exhausted"]
    );
    let failing: serde_json::Value = serde_json::from_str(&ops[0].body).unwrap();
    let object = &failing["data"]["object"];
    assert_eq!(object["endpoint_id"], ea.id);
    assert_eq!(object["event_id"], first[0].event_id.as_str());
    assert_eq!(object["event_type"], "customer.created");
    assert_eq!(
        (object["attempt_count"].as_i64(), object["state"].as_str()),
        (Some(4), Some("retrying"))
    );
    assert_eq!(failing["data"]["aggregate_type"], "webhook_delivery");
    assert_eq!(failing["data"]["aggregate_version"], 4);
    // They go to B only: never to the endpoint they are about.
    let types_of = |id: i64| {
        let s = s.clone();
        async move {
            let mut t: Vec<String> = s
                .list_deliveries(a, id, page(50, None))
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.event_type)
                .collect();
            t.sort();
            t
        }
    };
    assert_eq!(types_of(ea.id).await, vec!["customer.created"]);
    assert_eq!(
        types_of(eb.id).await,
        vec![
            "customer.created",
            "webhook.delivery.exhausted",
            "webhook.delivery.failing"
        ]
    );
    // B fails its deliveries of them many times over: they cause no operational events.
    let t = T0 + 1_000;
    drive(eb.id, (0..6).map(|i| now_retry(t + i + 1)).collect(), t).await;
    let attempts = s.list_attempts(a, eb.id, page(50, None)).await.unwrap();
    assert_eq!(attempts.len(), 1 + 2 * 6);
    assert!(sequence_all(&s, &new_id).await.is_empty());
    // A's exhausted delivery, resent, succeeds: recovered, once.
    s.redeliver(a, ea.id, &first[0].event_id, Timestamp(T0 + 2_000))
        .await
        .unwrap();
    drive(ea.id, vec![Outcome::Succeeded], T0 + 2_000).await;
    let recovered = sequence_all(&s, &new_id).await;
    let types: Vec<_> = recovered.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["webhook.delivery.recovered"]);
    let body: serde_json::Value = serde_json::from_str(&recovered[0].body).unwrap();
    assert_eq!(body["data"]["object"]["attempt_count"], 6);
    assert_eq!(body["data"]["object"]["state"], "succeeded");
    // A success after a failure before the 4th attempt is no recovery.
    customer(&s, a).await;
    sequence_all(&s, &new_id).await;
    drive(
        ea.id,
        vec![now_retry(T0 + 3_001), Outcome::Succeeded],
        T0 + 3_000,
    )
    .await;
    assert!(sequence_all(&s, &new_id).await.is_empty());
}

/// Spec checklist 27: a replay resends matching events with their original ids and bodies,
/// requeues failed (and, when asked, succeeded) deliveries, creates those never fanned out,
/// never queues a pending one twice, is capped, scoped to the account, and recorded.
pub async fn replays_requeue_without_duplicates(s: Store) {
    let a = account(&s, "a").await;
    let e = s
        .create_endpoint(a, endpoint(&["order.*"]), Timestamp(T0))
        .await
        .unwrap();
    let c = customer(&s, a).await;
    for i in 1..=5 {
        order_at(&s, a, c.id, 100 * i, T0 + 1_000 * i).await;
    }
    let new_id = ids();
    let logged = sequence_all(&s, &new_id).await;
    let orders: Vec<_> = logged
        .iter()
        .filter(|e| e.event_type == "order.created")
        .collect();
    assert_eq!(orders.len(), 5);
    // Deliveries: 1 succeeded, 2 failed, 3 retrying, 4 in flight, 5 succeeded.
    let now = Timestamp(T0 + 10_000);
    let claimed = s
        .claim_deliveries(now, Timestamp(now.0 + 60_000), "A", 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let by_event = |id: &str| claimed.iter().find(|c| c.event_id == id);
    let policy = no_breaker();
    let outcomes = [
        Outcome::Succeeded,
        Outcome::Exhausted,
        Outcome::Retry(Timestamp(now.0 + 3_600_000)),
    ];
    for (ev, o) in orders.iter().zip(outcomes) {
        let c = by_event(&ev.event_id).unwrap();
        assert!(
            s.complete_delivery(finish(c, "A", o, policy), now)
                .await
                .unwrap()
        );
    }
    let fourth = by_event(&orders[3].event_id).unwrap().clone();
    let fifth = s
        .claim_deliveries(now, Timestamp(now.0 + 60_000), "B", 10)
        .await
        .unwrap();
    assert_eq!(fifth.len(), 1);
    assert!(
        s.complete_delivery(finish(&fifth[0], "B", Outcome::Succeeded, policy), now)
            .await
            .unwrap()
    );
    let state_of = |s: Store| async move {
        let mut d: Vec<_> = s
            .list_deliveries(a, e.id, page(50, None))
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.event_id, d.state))
            .collect();
        d.sort();
        d
    };
    let req = |since: i64, until: i64, include_succeeded: bool| ReplayRequest {
        since: Timestamp(since),
        until: Timestamp(until),
        include_succeeded,
        max_events: 10_000,
    };
    let t = Timestamp(now.0 + 1);
    // Only the failed one is requeued; nothing is duplicated.
    let r = s
        .replay(a, e.id, req(T0, T0 + 60_000, false), t)
        .await
        .unwrap();
    assert_eq!(
        (
            r.events_matched,
            r.deliveries_created,
            r.deliveries_requeued,
            r.capped
        ),
        (5, 0, 1, false),
        "the customer event does not match order.*"
    );
    assert_eq!(
        (r.status.as_str(), r.endpoint_id, r.account_id),
        ("completed", e.id, a)
    );
    let states = state_of(s.clone()).await;
    assert_eq!(states.len(), 5);
    let mut expect: Vec<_> = orders
        .iter()
        .map(|o| o.event_id.clone())
        .zip(["succeeded", "pending", "retrying", "in_flight", "succeeded"].map(String::from))
        .collect();
    expect.sort();
    assert_eq!(states, expect);
    // With include_succeeded the two succeeded ones too; again, nothing more.
    let r = s
        .replay(a, e.id, req(T0, T0 + 60_000, true), t)
        .await
        .unwrap();
    assert_eq!((r.deliveries_created, r.deliveries_requeued), (0, 2));
    let r = s
        .replay(a, e.id, req(T0, T0 + 60_000, true), t)
        .await
        .unwrap();
    assert_eq!(
        (
            r.events_matched,
            r.deliveries_created,
            r.deliveries_requeued
        ),
        (5, 0, 0)
    );
    assert_eq!(state_of(s.clone()).await.len(), 5);
    // They go out again with the original ids and bodies.
    let resent = s
        .claim_deliveries(t, Timestamp(t.0 + 60_000), "C", 10)
        .await
        .unwrap();
    let resent_ids: BTreeSet<_> = resent.iter().map(|c| c.event_id.clone()).collect();
    let want: BTreeSet<_> = [0, 1, 4].map(|i| orders[i].event_id.clone()).into();
    assert_eq!(resent_ids, want);
    for c in &resent {
        let original = orders.iter().find(|o| o.event_id == c.event_id).unwrap();
        assert_eq!(c.body, original.body);
    }
    assert!(resent.iter().all(|c| c.delivery_id != fourth.delivery_id));
    // The range is on event time, end excluded; the cap takes the oldest.
    let r = s
        .replay(a, e.id, req(T0 + 2_000, T0 + 4_000, false), t)
        .await
        .unwrap();
    assert_eq!(r.events_matched, 2);
    let r = s
        .replay(
            a,
            e.id,
            ReplayRequest {
                max_events: 3,
                ..req(T0, T0 + 60_000, false)
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!((r.events_matched, r.capped), (3, true));
    assert_eq!(
        r.next_since,
        Some(orders[3].created_at),
        "the first left out"
    );
    let r = s
        .replay(
            a,
            e.id,
            ReplayRequest {
                max_events: 3,
                ..req(r.next_since.unwrap().0, T0 + 60_000, false)
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!((r.events_matched, r.capped, r.next_since), (2, false, None));
    // An endpoint created after the events never had them: a replay creates its deliveries.
    let late = s
        .create_endpoint(a, endpoint(&["*"]), Timestamp(T0))
        .await
        .unwrap();
    let r = s
        .replay(a, late.id, req(T0, T0 + 60_000, false), t)
        .await
        .unwrap();
    assert_eq!((r.events_matched, r.deliveries_created), (6, 6));
    let got: BTreeSet<_> = s
        .list_deliveries(a, late.id, page(50, None))
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.event_id)
        .collect();
    assert_eq!(got, logged.iter().map(|e| e.event_id.clone()).collect());
    // Recorded, and scoped to the account.
    assert_eq!(
        s.get_replay(a, late.id, r.id).await.unwrap(),
        Some(r.clone())
    );
    assert_eq!(s.get_replay(a, e.id, r.id).await.unwrap(), None);
    let b = account(&s, "b").await;
    assert_eq!(s.get_replay(b, late.id, r.id).await.unwrap(), None);
    assert!(matches!(
        s.replay(b, late.id, req(T0, T0 + 60_000, false), t).await,
        Err(StorageError::NotFound)
    ));
}
