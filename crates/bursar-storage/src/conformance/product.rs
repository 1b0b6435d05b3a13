//! Conformance cases of key management, plans, quotas and usage (`crate::product`).

use bursar_domain::apikey::Scope;

use super::*;

fn new_key(account: i64, n: u8, mode: KeyMode) -> NewApiKey {
    NewApiKey {
        account_id: account,
        mode,
        key_hash: format!("{n:02x}").repeat(32),
        start: format!("bsr_{}_{n:04}", mode.as_str()),
        last4: format!("{n:04}"),
        name: format!("key {n}"),
        scopes: None,
        expires_at: None,
    }
}

pub async fn keys_are_listed_rolled_and_revoked_within_their_account(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let read = Scope::parse("orders:read").unwrap();
    let mut scoped = new_key(a, 1, KeyMode::Test);
    scoped.scopes = Some(vec![read]);
    scoped.expires_at = Some(Timestamp(5_000));
    let k1 = s.create_api_key(scoped, Timestamp(10)).await.unwrap();
    let k2 = s
        .create_api_key(new_key(a, 2, KeyMode::Live), Timestamp(20))
        .await
        .unwrap();
    let kb = s
        .create_api_key(new_key(b, 3, KeyMode::Test), Timestamp(30))
        .await
        .unwrap();

    // Newest first, one account only, paged.
    let first = PageRequest {
        limit: 1,
        starting_after: None,
    };
    let page = s.list_api_keys(a, first).await.unwrap();
    assert_eq!(page.items.iter().map(|k| k.id).collect::<Vec<_>>(), [k2]);
    assert!(page.has_more);
    let next = PageRequest {
        limit: 10,
        starting_after: Some(k2),
    };
    let page = s.list_api_keys(a, next).await.unwrap();
    assert_eq!(page.items.iter().map(|k| k.id).collect::<Vec<_>>(), [k1]);
    assert!(!page.has_more);
    let info = &page.items[0];
    assert_eq!(info.scopes, Some(vec![read]));
    assert_eq!(info.expires_at, Some(Timestamp(5_000)));
    assert_eq!(info.name, "key 1");
    assert_eq!(
        (info.start.as_str(), info.last4.as_str()),
        ("bsr_test_0001", "0001")
    );
    assert!(s.get_api_key(a, kb).await.unwrap().is_none());
    assert!(s.get_api_key(b, kb).await.unwrap().is_some());

    // The plan travels with the key lookup.
    let hash1 = "01".repeat(32);
    assert_eq!(s.find_api_key(&hash1).await.unwrap().unwrap().plan, None);
    s.set_account_plan(a, Some("pro")).await.unwrap();
    let found = s.find_api_key(&hash1).await.unwrap().unwrap();
    assert_eq!(found.plan.as_deref(), Some("pro"));
    assert_eq!(found.scopes, Some(vec![read]));
    assert!(matches!(
        s.set_account_plan(999_999, Some("pro")).await,
        Err(StorageError::NotFound)
    ));

    // Roll: the successor inherits scopes, name, expiry and the rate-limit identity; the old
    // key's expiry becomes the grace. Rolling the successor keeps the chain's identity.
    let rolled = s
        .roll_api_key(
            a,
            k1,
            new_key(a, 4, KeyMode::Test),
            Timestamp(3_000),
            Timestamp(100),
        )
        .await
        .unwrap();
    assert_eq!(rolled.rotated_from, Some(k1));
    assert_eq!(rolled.scopes, Some(vec![read]));
    assert_eq!(rolled.expires_at, Some(Timestamp(5_000)));
    assert_eq!(rolled.name, "key 1");
    let old = s.get_api_key(a, k1).await.unwrap().unwrap();
    assert_eq!(old.expires_at, Some(Timestamp(3_000)));
    let successor = s.find_api_key(&"04".repeat(32)).await.unwrap().unwrap();
    assert_eq!(successor.limit_id, k1);
    let again = s
        .roll_api_key(
            a,
            rolled.id,
            new_key(a, 5, KeyMode::Test),
            Timestamp(200),
            Timestamp(150),
        )
        .await
        .unwrap();
    let third = s.find_api_key(&"05".repeat(32)).await.unwrap().unwrap();
    assert_eq!((third.id, third.limit_id), (again.id, k1));
    // A grace later than the key's own expiry does not extend it.
    let k6 = {
        let mut k = new_key(a, 6, KeyMode::Test);
        k.expires_at = Some(Timestamp(1_000));
        s.create_api_key(k, Timestamp(10)).await.unwrap()
    };
    s.roll_api_key(
        a,
        k6,
        new_key(a, 7, KeyMode::Test),
        Timestamp(9_000),
        Timestamp(100),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_api_key(a, k6).await.unwrap().unwrap().expires_at,
        Some(Timestamp(1_000))
    );
    // Expired, foreign, unknown or other-mode rolls are refused.
    for (acct, id, n, mode, at) in [
        (a, k6, 8, KeyMode::Test, 2_000),
        (a, kb, 9, KeyMode::Test, 100),
        (a, 999_999, 10, KeyMode::Test, 100),
    ] {
        let r = s.roll_api_key(
            acct,
            id,
            new_key(a, n, mode),
            Timestamp(at + 10),
            Timestamp(at),
        );
        assert!(matches!(r.await, Err(StorageError::NotFound)), "{id}");
    }
    let r = s.roll_api_key(
        a,
        k2,
        new_key(a, 11, KeyMode::Test),
        Timestamp(500),
        Timestamp(100),
    );
    assert!(matches!(r.await, Err(StorageError::Conflict)));

    // Revoke: scoped, once, and the lookup says so.
    assert!(matches!(
        s.revoke_api_key(b, k2, Timestamp(300)).await,
        Err(StorageError::NotFound)
    ));
    let revoked = s.revoke_api_key(a, k2, Timestamp(300)).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(Timestamp(300)));
    let twice = s.revoke_api_key(a, k2, Timestamp(400)).await.unwrap();
    assert_eq!(twice.revoked_at, Some(Timestamp(300)));
    assert!(
        s.find_api_key(&"02".repeat(32))
            .await
            .unwrap()
            .unwrap()
            .revoked
    );
    let r = s.roll_api_key(
        a,
        k2,
        new_key(a, 12, KeyMode::Live),
        Timestamp(500),
        Timestamp(350),
    );
    assert!(matches!(r.await, Err(StorageError::NotFound)));
}

fn charge(account: i64, period: i64, limit: i64, key: Option<&str>) -> QuotaCharge {
    QuotaCharge {
        account_id: account,
        period_start: Timestamp(period),
        limit,
        cost: 1,
        idempotency_key: key.map(str::to_owned),
    }
}

pub async fn quota_charges_stop_at_the_limit_once_per_key(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    for n in 1..=3 {
        assert_eq!(
            s.charge_quota(&charge(a, 1_000, 3, None)).await.unwrap(),
            QuotaOutcome::Charged { used: n }
        );
    }
    assert_eq!(
        s.charge_quota(&charge(a, 1_000, 3, None)).await.unwrap(),
        QuotaOutcome::Exhausted { used: 3 }
    );
    // Another period and another account have their own counters.
    assert_eq!(
        s.charge_quota(&charge(a, 2_000, 3, None)).await.unwrap(),
        QuotaOutcome::Charged { used: 1 }
    );
    assert_eq!(s.quota_used(b, Timestamp(1_000)).await.unwrap(), 0);
    // A key is charged once; an exhausted keyed charge leaves no trace of the key.
    assert_eq!(
        s.charge_quota(&charge(b, 1_000, 2, Some("k1")))
            .await
            .unwrap(),
        QuotaOutcome::Charged { used: 1 }
    );
    assert_eq!(
        s.charge_quota(&charge(b, 1_000, 2, Some("k1")))
            .await
            .unwrap(),
        QuotaOutcome::AlreadyCharged { used: 1 }
    );
    assert_eq!(
        s.charge_quota(&charge(b, 1_000, 2, Some("k2")))
            .await
            .unwrap(),
        QuotaOutcome::Charged { used: 2 }
    );
    assert_eq!(
        s.charge_quota(&charge(b, 1_000, 2, Some("k3")))
            .await
            .unwrap(),
        QuotaOutcome::Exhausted { used: 2 }
    );
    // A refund gives the unit back and forgets the key.
    s.refund_quota(&charge(b, 1_000, 2, Some("k2")))
        .await
        .unwrap();
    assert_eq!(s.quota_used(b, Timestamp(1_000)).await.unwrap(), 1);
    assert_eq!(
        s.charge_quota(&charge(b, 1_000, 2, Some("k3")))
            .await
            .unwrap(),
        QuotaOutcome::Charged { used: 2 }
    );
    // A cost over the limit is refused, even on an empty counter.
    let mut big = charge(b, 3_000, 2, None);
    big.cost = 3;
    assert_eq!(
        s.charge_quota(&big).await.unwrap(),
        QuotaOutcome::Exhausted { used: 0 }
    );
}

pub async fn concurrent_quota_charges_never_pass_the_limit(s: Store) {
    let a = account(&s, "a").await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            let key = (i % 2 == 0).then(|| format!("key-{i}"));
            tokio::spawn(async move {
                let c = charge(a, 5_000, 50, key.as_deref());
                s.charge_quota(&c).await.unwrap()
            })
        })
        .collect();
    let mut charged = 0;
    for t in tasks {
        if let QuotaOutcome::Charged { used } = t.await.unwrap() {
            assert!((1..=50).contains(&used));
            charged += 1;
        }
    }
    assert_eq!(charged, 50);
    assert_eq!(s.quota_used(a, Timestamp(5_000)).await.unwrap(), 50);
}

pub async fn usage_adds_up_and_moves_last_used(s: Store) {
    let a = account(&s, "a").await;
    let b = account(&s, "b").await;
    let k = s
        .create_api_key(new_key(a, 1, KeyMode::Test), Timestamp(10))
        .await
        .unwrap();
    let row = |day: i64, class: &str, n: i64, last: i64| UsageRow {
        account_id: a,
        key_id: k,
        route_class: class.into(),
        day: Timestamp(day),
        requests: n,
        last_at: Timestamp(last),
    };
    s.add_usage(&[row(0, "read", 3, 500), row(0, "write", 1, 400)])
        .await
        .unwrap();
    s.add_usage(&[
        row(0, "read", 2, 300),
        row(86_400_000, "read", 7, 86_400_100),
    ])
    .await
    .unwrap();
    s.add_usage(&[]).await.unwrap();
    let rows = s
        .usage(a, Timestamp(0), Timestamp(86_400_000))
        .await
        .unwrap();
    let counts: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r.route_class.clone(), r.requests))
        .collect();
    assert_eq!(counts, [("read".into(), 5), ("write".into(), 1)]);
    let all = s.usage(a, Timestamp(0), Timestamp(i64::MAX)).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(
        s.usage(b, Timestamp(0), Timestamp(i64::MAX))
            .await
            .unwrap()
            .is_empty()
    );
    // last_used_at only moves forward.
    let info = s.get_api_key(a, k).await.unwrap().unwrap();
    assert_eq!(info.last_used_at, Some(Timestamp(86_400_100)));
}
