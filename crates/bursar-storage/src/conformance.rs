//! One conformance suite for every backend. Each case is a plain async function over
//! `Arc<dyn Storage>`; [`conformance_tests!`](crate::conformance_tests) expands one named
//! `#[tokio::test]` per case in the backend's test crate, so SQLite and PostgreSQL run the
//! same cases under the same names.

use std::collections::BTreeMap;
use std::sync::Arc;

use bursar_domain::apikey::KeyMode;
use bursar_domain::{Currency, Metadata, Money, OrderAction, OrderStatus, Timestamp};

use crate::*;

mod events;
mod money;
mod operations;
mod product;
pub use events::*;
pub use money::*;
pub use operations::*;
pub use product::*;

/// Expands the suite for one backend. `$make` is an expression evaluating to a future of a
/// fresh, migrated, isolated `Option<Arc<dyn Storage>>`; `None` skips the case (a backend whose
/// server is not configured in this environment).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            accounts_and_keys,
            customers_are_scoped_to_their_account,
            customer_update_is_compare_and_set,
            order_needs_a_customer_of_the_same_account,
            order_amounts_round_trip_exactly,
            order_list_filters_and_pages,
            pages_are_stable_under_concurrent_inserts,
            order_transitions_follow_the_state_machine,
            concurrent_updates_with_one_version_have_one_winner,
            concurrent_cancels_have_one_winner,
            concurrent_creates_each_get_their_own_outcome,
            every_write_appends_one_event,
            idempotent_create_runs_once_and_stores_its_response,
            idempotency_keys_are_scoped_to_the_account,
            business_refusals_are_stored_but_failures_roll_back,
            expired_idempotency_records_are_absent_and_swept,
            concurrent_claims_of_one_key_write_once,
            concurrent_keyed_creates_each_get_their_own_outcome,
            operations_advance_through_recovery_points_under_a_lease,
            a_lapsed_lease_is_taken_over_and_the_old_driver_is_fenced,
            a_released_lease_resumes_at_once,
            the_completer_claims_only_abandoned_work,
            concurrent_begins_of_one_key_lease_once,
            unfinished_work_is_never_swept,
            payments_post_balanced_entries_and_follow_the_order,
            records_written_together_keep_their_own_outcomes,
            captures_and_voids_settle_an_authorization_once,
            captures_made_together_keep_their_own_outcomes,
            concurrent_refunds_never_exceed_the_capture,
            conversions_move_available_funds_once,
            concurrent_conversions_never_overdraw,
            money_is_scoped_to_its_account,
            a_claim_prefetches_what_its_first_phase_reads,
            a_claims_first_step_is_written_with_it,
            claims_made_together_keep_their_own_outcomes,
            an_order_takes_one_payment_at_a_time,
            events_are_sequenced_per_account_once,
            concurrent_sequencers_never_share_a_seq,
            fan_out_follows_endpoint_filters_once,
            endpoints_are_scoped_and_rotate,
            deliveries_are_leased_fenced_and_retried,
            slots_lease_ahead_within_the_cap,
            completions_in_one_batch_apply_each_fenced,
            a_batch_survives_an_endpoint_deleted_under_it,
            fifo_endpoints_get_one_aggregate_at_a_time_in_order,
            a_gone_receiver_disables_its_endpoint,
            a_delivery_given_back_to_a_gone_endpoint_is_cancelled,
            concurrent_workers_never_claim_one_delivery_twice,
            a_redelivery_answers_what_it_wrote,
            published_events_leave_the_backlog,
            events_sequenced_as_published_skip_the_backlog,
            claims_never_exceed_an_endpoints_concurrency,
            completions_hand_leases_on_within_the_cap,
            the_circuit_opens_probes_and_closes,
            half_of_twenty_attempts_failing_opens_the_circuit,
            retention_purges_finished_deliveries_in_bounded_batches,
            failing_too_long_disables_and_a_success_resets_the_clock,
            operational_events_are_written_once_and_never_loop,
            replays_requeue_without_duplicates,
            keys_are_listed_rolled_and_revoked_within_their_account,
            quota_charges_stop_at_the_limit_once_per_key,
            concurrent_quota_charges_never_pass_the_limit,
            usage_adds_up_and_moves_last_used
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(store) = $make.await else { return };
                $crate::conformance::$case(store.clone()).await;
                store.close().await;
            }
        )*
    };
}

pub type Store = Arc<dyn Storage>;

/// The PostgreSQL server the test suites use (`BURSAR_TEST_DATABASE_URL`); `None` skips them,
/// and says so — unless `BURSAR_TEST_REQUIRE_POSTGRES` is set (as `.ci/run` does), in which
/// case a missing URL fails the test instead of passing it vacuously.
pub fn postgres_test_url() -> Option<String> {
    match std::env::var("BURSAR_TEST_DATABASE_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var_os("BURSAR_TEST_REQUIRE_POSTGRES").is_none(),
                "BURSAR_TEST_REQUIRE_POSTGRES is set but BURSAR_TEST_DATABASE_URL is not"
            );
            eprintln!("skipped: BURSAR_TEST_DATABASE_URL is not set");
            None
        }
    }
}

fn meta(account: i64) -> WriteMeta {
    WriteMeta {
        account_id: account,
        at: Timestamp(1_700_000_000_000),
        request_id: "req_conformance".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
    }
}

fn meta_at(account: i64, ms: i64) -> WriteMeta {
    WriteMeta {
        at: Timestamp(ms),
        ..meta(account)
    }
}

fn usd(minor: i64) -> Money {
    Money::from_minor(minor, Currency::from_code("USD").unwrap()).unwrap()
}

fn page(limit: u32, starting_after: Option<i64>) -> PageRequest {
    PageRequest {
        limit,
        starting_after,
    }
}

fn all_orders(limit: u32) -> OrderFilter {
    OrderFilter {
        page: page(limit, None),
        customer_id: None,
        status: None,
        created_gte: None,
        created_lt: None,
    }
}

async fn account(s: &Store, name: &str) -> i64 {
    s.create_account(name, Timestamp(1)).await.unwrap().id
}

async fn customer(s: &Store, account: i64) -> Customer {
    s.create_customer(&meta(account), NewCustomer::default())
        .await
        .unwrap()
}

async fn order(s: &Store, account: i64, customer_id: i64, minor: i64) -> Order {
    order_at(s, account, customer_id, minor, 1_700_000_000_000).await
}

async fn order_at(s: &Store, account: i64, customer_id: i64, minor: i64, at: i64) -> Order {
    let new = NewOrder {
        customer_id,
        amount: usd(minor),
        description: None,
        metadata: Metadata::default(),
    };
    s.create_order(&meta_at(account, at), new).await.unwrap()
}

pub async fn accounts_and_keys(s: Store) {
    assert_eq!(s.count_accounts().await.unwrap(), 0);
    let a = s.create_account("acme", Timestamp(5)).await.unwrap();
    assert!(matches!(
        s.create_account("acme", Timestamp(6)).await,
        Err(StorageError::Conflict)
    ));
    assert_eq!(s.find_account("acme").await.unwrap(), Some(a.clone()));
    assert_eq!(
        s.find_account(&a.id.to_string()).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(s.find_account("nope").await.unwrap(), None);
    assert_eq!(s.count_accounts().await.unwrap(), 1);

    let hash = "ab".repeat(32);
    let key = NewApiKey {
        account_id: a.id,
        mode: KeyMode::Test,
        key_hash: hash.clone(),
        start: "bsr_test_abcd".into(),
        last4: "wxyz".into(),
        name: String::new(),
        scopes: None,
        expires_at: None,
    };
    let id = s.create_api_key(key.clone(), Timestamp(7)).await.unwrap();
    let found = s.find_api_key(&hash).await.unwrap().unwrap();
    assert_eq!(
        found,
        ApiKeyRecord {
            id,
            account_id: a.id,
            mode: KeyMode::Test,
            revoked: false,
            expires_at: None,
            scopes: None,
            limit_id: id,
            plan: None,
        }
    );
    assert!(s.find_api_key(&"cd".repeat(32)).await.unwrap().is_none());
    assert!(matches!(
        s.create_api_key(key, Timestamp(8)).await,
        Err(StorageError::Conflict)
    ));
}

pub async fn customers_are_scoped_to_their_account(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let new = NewCustomer {
        name: Some("Ada".into()),
        email: Some("ada@example.com".into()),
        metadata: Metadata::new(BTreeMap::from([("tier".into(), "gold".into())])).unwrap(),
    };
    let c = s.create_customer(&meta(a), new).await.unwrap();
    assert_eq!(c.version, 1);
    assert_eq!(c.account_id, a);
    assert_eq!(c.metadata.as_map()["tier"], "gold");
    assert_eq!(s.get_customer(a, c.id).await.unwrap(), Some(c.clone()));
    assert_eq!(s.get_customer(b, c.id).await.unwrap(), None);
    assert!(
        s.list_customers(b, page(10, None))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let c2 = customer(&s, a).await;
    let c3 = customer(&s, a).await;
    let first = s.list_customers(a, page(2, None)).await.unwrap();
    assert_eq!(
        first.items.iter().map(|c| c.id).collect::<Vec<_>>(),
        [c3.id, c2.id]
    );
    assert!(first.has_more);
    let second = s.list_customers(a, page(2, Some(c2.id))).await.unwrap();
    assert_eq!(
        second.items.iter().map(|c| c.id).collect::<Vec<_>>(),
        [c.id]
    );
    assert!(!second.has_more);
}

pub async fn customer_update_is_compare_and_set(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let c = customer(&s, a).await;
    let patch = CustomerPatch {
        name: Some("Grace".into()),
        ..Default::default()
    };
    let u = s
        .update_customer(&meta(a), c.id, Precondition::Version(1), patch.clone())
        .await
        .unwrap();
    assert_eq!((u.version, u.name.as_deref()), (2, Some("Grace")));
    let stale = s
        .update_customer(&meta(a), c.id, Precondition::Version(1), patch.clone())
        .await;
    assert!(matches!(
        stale,
        Err(StorageError::VersionMismatch { current: 2 })
    ));
    let any = s
        .update_customer(&meta(a), c.id, Precondition::Any, CustomerPatch::default())
        .await
        .unwrap();
    assert_eq!((any.version, any.name.as_deref()), (3, Some("Grace")));
    for (acct, id) in [(b, c.id), (a, c.id + 1000)] {
        let r = s
            .update_customer(&meta(acct), id, Precondition::Version(3), patch.clone())
            .await;
        assert!(matches!(r, Err(StorageError::NotFound)), "{r:?}");
    }
    assert_eq!(s.get_customer(a, c.id).await.unwrap().unwrap().version, 3);
}

pub async fn order_needs_a_customer_of_the_same_account(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let cb = customer(&s, b).await;
    for customer_id in [cb.id, cb.id + 1000] {
        let new = NewOrder {
            customer_id,
            amount: usd(100),
            description: None,
            metadata: Metadata::default(),
        };
        let r = s.create_order(&meta(a), new).await;
        assert!(matches!(r, Err(StorageError::UnknownCustomer)), "{r:?}");
    }
    assert!(
        s.list_orders(a, all_orders(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(s.events_for(a, "order", 1).await.unwrap().is_empty());
    // The refused write left nothing open behind it: the next one commits.
    let ca = customer(&s, a).await;
    let o = order(&s, a, ca.id, 100).await;
    assert_eq!(s.events_for(a, "order", o.id).await.unwrap().len(), 1);
}

pub async fn order_amounts_round_trip_exactly(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    for (code, minor) in [
        ("USD", 19900),
        ("JPY", 500),
        ("KWD", 1500),
        ("USD", 999_999_999_999_999),
    ] {
        let amount = Money::from_minor(minor, Currency::from_code(code).unwrap()).unwrap();
        let new = NewOrder {
            customer_id: c.id,
            amount,
            description: Some("naïve café ☕".into()),
            metadata: Metadata::default(),
        };
        let o = s.create_order(&meta(a), new).await.unwrap();
        assert_eq!(o.amount, amount);
        assert_eq!(o.status, OrderStatus::Pending);
        let back = s.get_order(a, o.id).await.unwrap().unwrap();
        assert_eq!(back, o);
        assert_eq!(back.description.as_deref(), Some("naïve café ☕"));
    }
}

pub async fn order_list_filters_and_pages(s: Store) {
    let a = account(&s, "a").await;
    let c1 = customer(&s, a).await;
    let c2 = customer(&s, a).await;
    let o1 = order_at(&s, a, c1.id, 100, 1000).await;
    let o2 = order_at(&s, a, c2.id, 200, 2000).await;
    let o3 = order_at(&s, a, c1.id, 300, 3000).await;
    s.transition_order(&meta(a), o3.id, Precondition::Any, OrderAction::Cancel)
        .await
        .unwrap();
    let ids = |p: Page<Order>| p.items.iter().map(|o| o.id).collect::<Vec<_>>();
    let f = all_orders(10);
    assert_eq!(
        ids(s.list_orders(a, f).await.unwrap()),
        [o3.id, o2.id, o1.id]
    );
    let by_customer = OrderFilter {
        customer_id: Some(c1.id),
        ..f
    };
    assert_eq!(
        ids(s.list_orders(a, by_customer).await.unwrap()),
        [o3.id, o1.id]
    );
    let by_status = OrderFilter {
        status: Some(OrderStatus::Pending),
        ..f
    };
    assert_eq!(
        ids(s.list_orders(a, by_status).await.unwrap()),
        [o2.id, o1.id]
    );
    let by_range = OrderFilter {
        created_gte: Some(Timestamp(2000)),
        created_lt: Some(Timestamp(3000)),
        ..f
    };
    assert_eq!(ids(s.list_orders(a, by_range).await.unwrap()), [o2.id]);
    let p1 = s.list_orders(a, all_orders(2)).await.unwrap();
    assert!(p1.has_more);
    let next = OrderFilter {
        page: page(2, Some(o2.id)),
        ..f
    };
    let p2 = s.list_orders(a, next).await.unwrap();
    assert!(!p2.has_more);
    assert_eq!(ids(p2), [o1.id]);
}

pub async fn pages_are_stable_under_concurrent_inserts(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let mut made = Vec::new();
    for i in 0..6 {
        made.push(order(&s, a, c.id, 100 + i).await.id);
    }
    let first = s.list_orders(a, all_orders(3)).await.unwrap();
    let last_seen = first.items.last().unwrap().id;
    // Rows inserted between two page requests land before the cursor and never shift the rest.
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { order(&s, a, c.id, 1000 + i).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let rest = OrderFilter {
        page: page(3, Some(last_seen)),
        ..all_orders(3)
    };
    let second = s.list_orders(a, rest).await.unwrap();
    let mut seen: Vec<i64> = first
        .items
        .iter()
        .chain(&second.items)
        .map(|o| o.id)
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, made);
    assert!(!second.has_more);
}

pub async fn order_transitions_follow_the_state_machine(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 100).await;
    let r = s
        .transition_order(&meta(b), o.id, Precondition::Any, OrderAction::Cancel)
        .await;
    assert!(matches!(r, Err(StorageError::NotFound)));
    let r = s
        .transition_order(
            &meta(a),
            o.id,
            Precondition::Version(7),
            OrderAction::Cancel,
        )
        .await;
    assert!(matches!(
        r,
        Err(StorageError::VersionMismatch { current: 1 })
    ));
    let canceled = s
        .transition_order(
            &meta(a),
            o.id,
            Precondition::Version(1),
            OrderAction::Cancel,
        )
        .await
        .unwrap();
    assert_eq!(
        (canceled.status, canceled.version),
        (OrderStatus::Canceled, 2)
    );
    for action in [OrderAction::Cancel, OrderAction::Pay, OrderAction::Refund] {
        let r = s
            .transition_order(&meta(a), o.id, Precondition::Any, action)
            .await;
        assert!(
            matches!(
                r,
                Err(StorageError::InvalidState {
                    current: OrderStatus::Canceled
                })
            ),
            "{r:?}"
        );
    }
    let o2 = order(&s, a, c.id, 100).await;
    let paid = s
        .transition_order(&meta(a), o2.id, Precondition::Any, OrderAction::Pay)
        .await
        .unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    let r = s
        .transition_order(&meta(a), o2.id, Precondition::Any, OrderAction::Cancel)
        .await;
    assert!(matches!(
        r,
        Err(StorageError::InvalidState {
            current: OrderStatus::Paid
        })
    ));
}

pub async fn concurrent_updates_with_one_version_have_one_winner(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 100).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let patch = OrderPatch {
                    description: Some(format!("writer {i}")),
                    metadata: None,
                };
                s.update_order(&meta(a), o.id, Precondition::Version(1), patch)
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(u) => {
                wins += 1;
                assert_eq!(u.version, 2);
            }
            Err(StorageError::VersionMismatch { current: 2 }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(s.get_order(a, o.id).await.unwrap().unwrap().version, 2);
    assert_eq!(s.events_for(a, "order", o.id).await.unwrap().len(), 2);
}

pub async fn concurrent_cancels_have_one_winner(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await;
    let o = order(&s, a, c.id, 100).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.transition_order(&meta(a), o.id, Precondition::Any, OrderAction::Cancel)
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StorageError::InvalidState {
                current: OrderStatus::Canceled,
            }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(wins, 1);
    let events = s.events_for(a, "order", o.id).await.unwrap();
    let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["order.created", "order.canceled"]);
}

pub async fn concurrent_creates_each_get_their_own_outcome(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let mine = customer(&s, a).await.id;
    let theirs = customer(&s, b).await.id;
    let tasks: Vec<_> = (0..60_i64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let customer_id = if i % 3 == 0 { theirs } else { mine };
                let new = NewOrder {
                    customer_id,
                    amount: usd(100 + i),
                    description: Some(format!("order {i}")),
                    metadata: Metadata::default(),
                };
                (i, s.create_order(&meta(a), new).await)
            })
        })
        .collect();
    let mut created = Vec::new();
    for t in tasks {
        let (i, outcome) = t.await.unwrap();
        match outcome {
            Ok(o) => {
                assert_ne!(i % 3, 0, "order {i} used another account's customer");
                assert_eq!((o.amount.minor, o.customer_id), (100 + i, mine));
                assert_eq!(o.description, Some(format!("order {i}")));
                created.push(o);
            }
            Err(StorageError::UnknownCustomer) => assert_eq!(i % 3, 0),
            Err(e) => panic!("order {i}: {e:?}"),
        }
    }
    assert_eq!(created.len(), 40);
    let listed = s.list_orders(a, all_orders(100)).await.unwrap().items;
    assert_eq!(listed.len(), 40);
    for o in &created {
        let events = s.events_for(a, "order", o.id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].payload, serde_json::to_value(o).unwrap());
    }
}

pub async fn every_write_appends_one_event(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let c = customer(&s, a).await;
    s.update_customer(&meta(a), c.id, Precondition::Any, CustomerPatch::default())
        .await
        .unwrap();
    let ce = s.events_for(a, "customer", c.id).await.unwrap();
    assert_eq!(
        ce.iter()
            .map(|e| (e.event_type.as_str(), e.aggregate_version))
            .collect::<Vec<_>>(),
        [("customer.created", 1), ("customer.updated", 2)]
    );
    // Payloads are the record as it was written, whichever code path built them.
    assert_eq!(ce[0].payload, serde_json::to_value(&c).unwrap());
    let c2 = s.get_customer(a, c.id).await.unwrap().unwrap();
    assert_eq!(ce[1].payload, serde_json::to_value(&c2).unwrap());
    let new = NewOrder {
        customer_id: c.id,
        amount: usd(19900),
        description: Some("a \"quoted\" café".into()),
        metadata: Metadata::new(BTreeMap::from([("k".into(), "v".into())])).unwrap(),
    };
    let o = s.create_order(&meta(a), new).await.unwrap();
    let oe = s.events_for(a, "order", o.id).await.unwrap();
    assert_eq!(oe.len(), 1);
    assert_eq!(oe[0].payload, serde_json::to_value(&o).unwrap());
    let e = &oe[0];
    assert_eq!((e.account_id, e.aggregate_id), (a, o.id));
    assert_eq!(e.request_id, "req_conformance");
    assert_eq!(e.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(e.payload["amount"]["minor"], 19900);
    assert_eq!(e.payload["amount"]["currency"], "USD");
    assert_eq!(e.payload["status"], "pending");
    // Another account sees none of these events.
    assert!(s.events_for(b, "order", o.id).await.unwrap().is_empty());
    // A refused write appends nothing.
    let _ = s
        .update_order(
            &meta(a),
            o.id,
            Precondition::Version(9),
            OrderPatch::default(),
        )
        .await;
    assert_eq!(s.events_for(a, "order", o.id).await.unwrap().len(), 1);
}

fn claim(key: &str, fingerprint: &str, expires_at: i64) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        method: "POST".into(),
        route: "/api/orders".into(),
        fingerprint: fingerprint.into(),
        expires_at: Timestamp(expires_at),
    }
}

fn new_order(customer_id: i64, minor: i64) -> NewOrder {
    NewOrder {
        customer_id,
        amount: usd(minor),
        description: None,
        metadata: Metadata::default(),
    }
}

/// What the server stores: 201 with the order as the body, or 422 for an unknown customer.
fn respond(outcome: Result<&Order, &StorageError>) -> Option<StoredResponse> {
    match outcome {
        Ok(o) => Some(StoredResponse {
            status: 201,
            headers: vec![("location".into(), format!("/api/orders/{}", o.id))],
            body: serde_json::to_vec(o).unwrap(),
        }),
        Err(StorageError::UnknownCustomer) => Some(StoredResponse {
            status: 422,
            headers: vec![],
            body: b"unknown_customer".to_vec(),
        }),
        Err(_) => None,
    }
}

fn responder() -> OrderResponder {
    Arc::new(respond)
}

const NOW: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

pub async fn idempotent_create_runs_once_and_stores_its_response(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await.id;
    let k = claim("order-20260325-00091", "fp1", NOW + DAY);
    let first = s
        .create_order_idempotent(&meta(a), &k, new_order(c, 19900), responder())
        .await
        .unwrap();
    let Idempotent::Fresh(stored) = first else {
        panic!("a new key runs the create")
    };
    assert_eq!(stored.status, 201);
    let rendered: serde_json::Value = serde_json::from_slice(&stored.body).unwrap();
    let id = rendered["id"].as_i64().unwrap();
    let again = s
        .create_order_idempotent(&meta(a), &k, new_order(c, 19900), responder())
        .await
        .unwrap();
    let Idempotent::Existing(record) = again else {
        panic!("a used key writes nothing")
    };
    assert_eq!(record.response, stored);
    assert_eq!(
        (record.method.as_str(), record.route.as_str()),
        ("POST", "/api/orders")
    );
    assert_eq!(record.fingerprint, "fp1");
    assert_eq!(
        s.list_orders(a, all_orders(10)).await.unwrap().items.len(),
        1
    );
    let events = s.events_for(a, "order", id).await.unwrap();
    assert_eq!(events.len(), 1);
    let order = s.get_order(a, id).await.unwrap().unwrap();
    assert_eq!(events[0].payload, serde_json::to_value(&order).unwrap());
    // The response was rendered from exactly the record that was stored (a backend may
    // render it before the write, with the id drawn up front).
    assert_eq!(rendered, serde_json::to_value(&order).unwrap());
    assert_eq!(
        record.resource_id,
        Some(id),
        "the record names the order it created"
    );
    let found = s.find_idempotency(a, &k.key, Timestamp(NOW)).await.unwrap();
    assert_eq!(found, Some(record));
}

pub async fn idempotency_keys_are_scoped_to_the_account(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let ca = customer(&s, a).await.id;
    let cb = customer(&s, b).await.id;
    let k = claim("same-key", "fp", NOW + DAY);
    for (acct, c) in [(a, ca), (b, cb)] {
        let out = s
            .create_order_idempotent(&meta(acct), &k, new_order(c, 100), responder())
            .await
            .unwrap();
        assert!(matches!(out, Idempotent::Fresh(_)));
    }
    assert!(
        s.find_idempotency(b, "same-key", Timestamp(NOW))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        s.list_orders(a, all_orders(10)).await.unwrap().items.len(),
        1
    );
    assert_eq!(
        s.list_orders(b, all_orders(10)).await.unwrap().items.len(),
        1
    );
}

pub async fn business_refusals_are_stored_but_failures_roll_back(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await.id;
    let k = claim("k-unknown", "fp", NOW + DAY);
    let out = s
        .create_order_idempotent(&meta(a), &k, new_order(c + 1000, 100), responder())
        .await
        .unwrap();
    assert!(matches!(out, Idempotent::Fresh(ref r) if r.status == 422));
    let again = s
        .create_order_idempotent(&meta(a), &k, new_order(c + 1000, 100), responder())
        .await
        .unwrap();
    assert!(matches!(
        again,
        Idempotent::Existing(ref r) if r.response.status == 422 && r.resource_id.is_none()
    ));
    // A failure with no stored answer takes its claim with it: the key stays free.
    let refuse: OrderResponder = Arc::new(|_: Result<&Order, &StorageError>| None);
    let k2 = claim("k-rolled-back", "fp", NOW + DAY);
    let failed = s
        .create_order_idempotent(&meta(a), &k2, new_order(c + 1000, 100), refuse)
        .await;
    assert!(matches!(failed, Err(StorageError::UnknownCustomer)));
    assert!(
        s.find_idempotency(a, &k2.key, Timestamp(NOW))
            .await
            .unwrap()
            .is_none()
    );
    let retried = s
        .create_order_idempotent(&meta(a), &k2, new_order(c, 100), responder())
        .await
        .unwrap();
    assert!(matches!(retried, Idempotent::Fresh(ref r) if r.status == 201));
    assert_eq!(
        s.list_orders(a, all_orders(10)).await.unwrap().items.len(),
        1
    );
}

pub async fn expired_idempotency_records_are_absent_and_swept(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await.id;
    let short = claim("k-old", "fp-old", NOW + 1000);
    s.create_order_idempotent(&meta_at(a, NOW), &short, new_order(c, 100), responder())
        .await
        .unwrap();
    assert!(
        s.find_idempotency(a, "k-old", Timestamp(NOW + 999))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.find_idempotency(a, "k-old", Timestamp(NOW + 1000))
            .await
            .unwrap()
            .is_none()
    );
    // After expiry the same key is a new request, even with another body.
    let reused = claim("k-old", "fp-new", NOW + 2000 + DAY);
    let out = s
        .create_order_idempotent(
            &meta_at(a, NOW + 2000),
            &reused,
            new_order(c, 200),
            responder(),
        )
        .await
        .unwrap();
    assert!(matches!(out, Idempotent::Fresh(_)));
    for i in 0..5 {
        let k = claim(&format!("k-{i}"), "fp", NOW + 10);
        s.create_order_idempotent(&meta_at(a, NOW), &k, new_order(c, 100), responder())
            .await
            .unwrap();
    }
    // Bounded batches: 2, 2, 1, then nothing; live records stay.
    let later = Timestamp(NOW + 3000);
    let swept: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(s.sweep_idempotency(later, 2).await.unwrap());
        }
        v
    };
    assert_eq!(swept, [2, 2, 1, 0]);
    assert!(
        s.find_idempotency(a, "k-old", later)
            .await
            .unwrap()
            .is_some()
    );
    // The orders keep their data.
    assert_eq!(
        s.list_orders(a, all_orders(100)).await.unwrap().items.len(),
        7
    );
}

pub async fn concurrent_claims_of_one_key_write_once(s: Store) {
    let a = account(&s, "a").await;
    let c = customer(&s, a).await.id;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let k = claim("hot-key", "fp", NOW + DAY);
                s.create_order_idempotent(&meta(a), &k, new_order(c, 100), responder())
                    .await
            })
        })
        .collect();
    let (mut fresh, mut existing) = (0, 0);
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Idempotent::Fresh(_) => fresh += 1,
            Idempotent::Existing(r) => {
                assert_eq!(r.response.status, 201);
                existing += 1;
            }
        }
    }
    assert_eq!((fresh, existing), (1, 19));
    let orders = s.list_orders(a, all_orders(10)).await.unwrap().items;
    assert_eq!(orders.len(), 1);
    assert_eq!(
        s.events_for(a, "order", orders[0].id).await.unwrap().len(),
        1
    );
}

/// Keyed creates under load, large enough that a backend bounding its statements by size has
/// to split them: each create still gets its own outcome — stored 201, stored 422 for a
/// foreign customer, or the record of a key used twice — and writes exactly once.
pub async fn concurrent_keyed_creates_each_get_their_own_outcome(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let mine = customer(&s, a).await.id;
    let theirs = customer(&s, b).await.id;
    let tasks: Vec<_> = (0..60_i64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let customer_id = if i % 5 == 0 { theirs } else { mine };
                let new = NewOrder {
                    customer_id,
                    amount: usd(100 + i),
                    description: Some(format!("order {i} {}", "x".repeat(900))),
                    metadata: Metadata::default(),
                };
                // Keys 50..59 repeat keys 40..49.
                let key = format!("bulk-{}", if i >= 50 { i - 10 } else { i });
                let fp = format!("fp-{}", if i >= 50 { i - 10 } else { i });
                let k = claim(&key, &fp, NOW + DAY);
                (
                    i,
                    s.create_order_idempotent(&meta(a), &k, new, responder())
                        .await,
                )
            })
        })
        .collect();
    let mut bodies = std::collections::HashMap::new();
    for t in tasks {
        let (i, outcome) = t.await.unwrap();
        let key = if i >= 50 { i - 10 } else { i };
        let response = match outcome.unwrap() {
            Idempotent::Fresh(r) => r,
            Idempotent::Existing(r) => r.response,
        };
        if let Some(first) = bodies.insert(key, response.clone()) {
            assert_eq!(first, response, "key {key} answered two ways");
        }
    }
    for (key, response) in &bodies {
        // The first create of a key ran; repeats of a key share its customer.
        if key % 5 == 0 {
            assert_eq!(response.status, 422, "key {key}");
            continue;
        }
        let stored = s
            .find_idempotency(a, &format!("bulk-{key}"), Timestamp(NOW))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&stored.response, response);
        if response.status == 201 {
            let v: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            let order = s
                .get_order(a, v["id"].as_i64().unwrap())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(v, serde_json::to_value(&order).unwrap());
            assert_eq!((order.amount.minor - 100) % 10, key % 10);
        }
    }
    // Keys 0..49 once each; a key reused by i = 50..59 ran only once.
    assert_eq!(bodies.len(), 50);
    let orders = s.list_orders(a, all_orders(100)).await.unwrap().items;
    assert_eq!(
        orders.len(),
        40,
        "one order per key whose customer is the account's"
    );
    for o in &orders {
        assert_eq!(s.events_for(a, "order", o.id).await.unwrap().len(), 1);
    }
}
