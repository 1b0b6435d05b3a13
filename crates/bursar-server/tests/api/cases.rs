//! API cases, each run against SQLite and PostgreSQL (see `main.rs`).

use bursar_sdk::api::{CreateCustomer, UpdateCustomer, UpdateOrder};
use bursar_sdk::{ListOrders, PageParams};
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, error_body, metric};

pub async fn canonical_order_request(app: &TestApp) {
    let customer = app.customer(&app.a).await;
    let body = format!(r#"{{"customer_id": {customer}, "amount": 199.00, "currency": "USD"}}"#);
    let resp = app
        .a
        .request(Method::POST, "/api/orders")
        .header("Idempotency-Key", "order-20260325-00091")
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(resp.headers()["etag"], "\"1\"");
    let text = resp.text().await.unwrap();
    assert!(text.contains(r#""amount":199.00"#), "{text}");
    assert!(text.contains(r#""currency":"USD""#), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["amount_minor"], 19900);
    assert_eq!(v["status"], "pending");
    assert_eq!(v["customer_id"], customer);
    assert_eq!(location, format!("/api/orders/{}", v["id"]));
    let got = app.a.get_order(v["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(got.body.amount.raw_json(), "199.00");
}

pub async fn amounts_render_with_the_currency_decimals(app: &TestApp) {
    let c = app.customer(&app.a).await;
    for (amount, currency, rendered, minor) in [
        (r#""199.00""#, "USD", "199.00", 19900_i64),
        ("199", "USD", "199.00", 19900),
        ("0.5", "EUR", "0.50", 50),
        ("500", "JPY", "500", 500),
        (r#""1.5""#, "KWD", "1.500", 1500),
        ("0.001", "BHD", "0.001", 1),
        (
            "9999999999999.99",
            "USD",
            "9999999999999.99",
            999_999_999_999_999,
        ),
        ("12.34", "usd", "12.34", 1234),
    ] {
        let body = format!(r#"{{"customer_id":{c},"amount":{amount},"currency":"{currency}"}}"#);
        let resp = app.post_order_raw(&app.a, body).await;
        assert_eq!(resp.status(), 201, "{amount} {currency}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(&format!(r#""amount":{rendered},"#)), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["amount_minor"], minor, "{text}");
        assert_eq!(v["currency"], currency.to_ascii_uppercase());
    }
}

pub async fn bad_amounts_are_422_naming_the_field(app: &TestApp) {
    let c = app.customer(&app.a).await;
    for (amount, currency, field, code) in [
        ("1.001", "USD", "amount", "too_many_decimals"),
        (r#""1.000""#, "USD", "amount", "too_many_decimals"),
        ("1.5", "JPY", "amount", "too_many_decimals"),
        (r#""0.0001""#, "KWD", "amount", "too_many_decimals"),
        ("0", "USD", "amount", "not_positive"),
        ("0.00", "USD", "amount", "not_positive"),
        ("-5", "USD", "amount", "not_positive"),
        ("1e2", "USD", "amount", "exponent_not_allowed"),
        (r#""1E2""#, "USD", "amount", "exponent_not_allowed"),
        (r#""12,50""#, "EUR", "amount", "invalid_amount"),
        (r#""""#, "EUR", "amount", "invalid_amount"),
        ("true", "USD", "amount", "invalid_amount"),
        ("null", "USD", "amount", "invalid_amount"),
        (r#"{"v":1}"#, "USD", "amount", "invalid_amount"),
        ("10000000000000.00", "USD", "amount", "too_large"),
        (
            "123456789012345678901234567890",
            "JPY",
            "amount",
            "too_large",
        ),
        ("10", "XTS", "currency", "unsupported_currency"),
        ("10", "DOLLARS", "currency", "unsupported_currency"),
    ] {
        let body = format!(r#"{{"customer_id":{c},"amount":{amount},"currency":"{currency}"}}"#);
        let resp = app.post_order_raw(&app.a, body).await;
        let v = error_body(resp, 422, "validation_failed").await;
        assert_eq!(v["details"][0]["field"], field, "{amount} {currency}: {v}");
        assert_eq!(v["details"][0]["code"], code, "{amount} {currency}: {v}");
    }
    let list = app.a.list_orders(&ListOrders::default()).await.unwrap();
    assert!(list.body.data.is_empty(), "no refused order was stored");
}

pub async fn customers_crud_with_etags(app: &TestApp) {
    let req = CreateCustomer {
        name: Some("Ada Lovelace".into()),
        email: Some("ada@example.com".into()),
        metadata: Some([("tier".to_owned(), "gold".to_owned())].into()),
    };
    let created = app.a.create_customer(&req).await.unwrap();
    assert_eq!(created.status, 201);
    let id = created.body.id;
    assert_eq!(
        created.header("location"),
        Some(format!("/api/customers/{id}").as_str())
    );
    let got = app.a.get_customer(id).await.unwrap();
    assert_eq!(got.etag_version(), Some(1));
    assert_eq!(got.body.metadata["tier"], "gold");
    for (tag, status) in [("\"1\"", 304), ("W/\"1\"", 304), ("*", 304), ("\"2\"", 200)] {
        let resp = app
            .a
            .request(Method::GET, &format!("/api/customers/{id}"))
            .header("if-none-match", tag)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "If-None-Match {tag}");
        assert_eq!(resp.headers()["etag"], "\"1\"");
    }
    let patch = UpdateCustomer {
        email: Some("ada@analytical.engine".into()),
        ..Default::default()
    };
    let updated = app.a.update_customer(id, Some(1), &patch).await.unwrap();
    assert_eq!(updated.etag_version(), Some(2));
    assert_eq!(updated.body.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(updated.body.email.as_deref(), Some("ada@analytical.engine"));
    let bad = CreateCustomer {
        email: Some("not-an-email".into()),
        name: Some("x".repeat(201)),
        ..Default::default()
    };
    let err = app.a.create_customer(&bad).await.unwrap_err();
    let Some(bursar_sdk::Error::Api { body, .. }) = Some(err) else {
        unreachable!()
    };
    let fields: Vec<_> = body.details.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["name", "email"], "every invalid field is reported");
    let page = app.a.list_customers(PageParams::default()).await.unwrap();
    assert_eq!(page.body.data.len(), 1);
}

pub async fn updates_need_a_current_version(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let o = app
        .a
        .create_order(&order(c, "10.00"), None)
        .await
        .unwrap()
        .body
        .id;
    let patch = |v: Value| {
        let path = format!("/api/orders/{o}");
        let req = app.a.request(Method::PATCH, &path).json(&v);
        async move { req }
    };
    // No precondition at all.
    let resp = patch(json!({"description": "x"}))
        .await
        .send()
        .await
        .unwrap();
    let v = error_body(resp, 428, "precondition_required").await;
    assert_eq!(v["current_version"], 1);
    // Current version: applied.
    let ok = app
        .a
        .update_order(o, Some(1), &desc("first"))
        .await
        .unwrap();
    assert_eq!(ok.etag_version(), Some(2));
    assert_eq!(ok.body.version, 2);
    // Stale, weak, and unknown tags: 412 with the current version; nothing changes.
    for tag in ["\"1\"", "W/\"2\"", "\"1\", \"7\"", "\"abc\""] {
        let resp = patch(json!({"description": "lost"}))
            .await
            .header("if-match", tag)
            .send()
            .await
            .unwrap();
        let v = error_body(resp, 412, "version_mismatch").await;
        assert_eq!(v["current_version"], 2, "If-Match {tag}");
    }
    // A list containing the current version, `*`, and a body version all pass.
    let resp = patch(json!({"description": "list"}))
        .await
        .header("if-match", "\"9\", \"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"3\"");
    let resp = patch(json!({"description": "star"}))
        .await
        .header("if-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["etag"], "\"4\"");
    let resp = patch(json!({"description": "body", "version": 4}))
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["etag"], "\"5\"");
    let resp = patch(json!({"description": "body", "version": 4}))
        .await
        .send()
        .await
        .unwrap();
    error_body(resp, 412, "version_mismatch").await;
    let final_order = app.a.get_order(o).await.unwrap();
    assert_eq!(final_order.body.description.as_deref(), Some("body"));
    assert_eq!(final_order.body.version, 5);
    // Normal checks come before preconditions: unknown id → 404, no key → 401.
    let resp = app
        .a
        .request(Method::PATCH, &format!("/api/orders/{}", o + 1000))
        .header("if-match", "\"1\"")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    error_body(resp, 404, "resource_not_found").await;
    let resp = app
        .anon(Method::PATCH, &format!("/api/orders/{o}"))
        .header("if-match", "\"1\"")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    error_body(resp, 401, "authentication_required").await;
}

pub async fn concurrent_patches_have_one_winner(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let o = app
        .a
        .create_order(&order(c, "10.00"), None)
        .await
        .unwrap()
        .body
        .id;
    // Two clients read version 1 and both write with If-Match: "1".
    let (one, two) = (desc("client one"), desc("client two"));
    let (r1, r2) = tokio::join!(
        app.a.update_order(o, Some(1), &one),
        app.a.update_order(o, Some(1), &two),
    );
    let (winner, loser) = match (r1, r2) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("expected one 200 and one 412, got {other:?}"),
    };
    assert_eq!(winner.body.version, 2);
    assert_eq!(loser.code(), Some("version_mismatch"));
    let Some(bursar_sdk::Error::Api { body, .. }) = Some(loser) else {
        unreachable!()
    };
    assert_eq!(body.extra["current_version"], 2);
    let stored = app.a.get_order(o).await.unwrap().body;
    assert_eq!(
        stored.description, winner.body.description,
        "the loser changed nothing"
    );

    // Fifty writers on the same version (spec item 40): still exactly one.
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let client = app.a.clone();
            tokio::spawn(async move {
                client
                    .update_order(o, Some(2), &desc(&format!("w{i}")))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Some("version_mismatch")),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(app.a.get_order(o).await.unwrap().body.version, 3);
}

pub async fn accounts_cannot_see_each_other(app: &TestApp) {
    let ca = app.customer(&app.a).await;
    let o = app
        .a
        .create_order(&order(ca, "5.00"), None)
        .await
        .unwrap()
        .body
        .id;
    for e in [
        app.b.get_order(o).await.unwrap_err(),
        app.b
            .update_order(o, Some(1), &desc("x"))
            .await
            .unwrap_err(),
        app.b.cancel_order(o).await.unwrap_err(),
        app.b.get_customer(ca).await.unwrap_err(),
        app.b
            .update_customer(ca, Some(1), &UpdateCustomer::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(
            (e.status().map(|s| s.as_u16()), e.code()),
            (Some(404), Some("resource_not_found"))
        );
    }
    let e = app
        .b
        .create_order(&order(ca, "5.00"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("unknown_customer"));
    assert!(
        app.b
            .list_orders(&ListOrders::default())
            .await
            .unwrap()
            .body
            .data
            .is_empty()
    );
    assert!(
        app.b
            .list_customers(PageParams::default())
            .await
            .unwrap()
            .body
            .data
            .is_empty()
    );
    let filtered = ListOrders {
        customer_id: Some(ca),
        ..Default::default()
    };
    assert!(
        app.b
            .list_orders(&filtered)
            .await
            .unwrap()
            .body
            .data
            .is_empty()
    );
    // A's view is untouched.
    assert_eq!(app.a.get_order(o).await.unwrap().body.version, 1);
}

pub async fn cancel_follows_the_state_machine(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let o = app
        .a
        .create_order(&order(c, "5.00"), None)
        .await
        .unwrap()
        .body
        .id;
    let canceled = app.a.cancel_order(o).await.unwrap();
    assert_eq!(canceled.body.version, 2);
    assert_eq!(canceled.etag_version(), Some(2));
    assert_eq!(
        serde_json::to_value(canceled.body.status).unwrap(),
        "canceled"
    );
    // The SDK's conditional GET: nothing new at the current version, the order at an old one.
    assert!(app.a.get_order_if_changed(o, 2).await.unwrap().is_none());
    let changed = app.a.get_order_if_changed(o, 1).await.unwrap().unwrap();
    assert_eq!(changed.etag_version(), Some(2));
    let again = app.a.cancel_order(o).await.unwrap_err();
    assert_eq!(
        (again.status().map(|s| s.as_u16()), again.code()),
        (Some(409), Some("invalid_state"))
    );
    let resp = app
        .a
        .request(Method::POST, &format!("/api/orders/{o}/cancel"))
        .header("accept", "application/problem+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["current_status"], "canceled");
    // A stale If-Match on an action is a 412, like on an update.
    let o2 = app
        .a
        .create_order(&order(c, "5.00"), None)
        .await
        .unwrap()
        .body
        .id;
    let resp = app
        .a
        .request(Method::POST, &format!("/api/orders/{o2}/cancel"))
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    error_body(resp, 412, "version_mismatch").await;
}

pub async fn lists_page_and_filter(app: &TestApp) {
    let c1 = app.customer(&app.a).await;
    let c2 = app.customer(&app.a).await;
    let mut ids = Vec::new();
    for (c, amount) in [
        (c1, "1.00"),
        (c2, "2.00"),
        (c1, "3.00"),
        (c2, "4.00"),
        (c1, "5.00"),
    ] {
        ids.push(
            app.a
                .create_order(&order(c, amount), None)
                .await
                .unwrap()
                .body
                .id,
        );
    }
    app.a.cancel_order(ids[2]).await.unwrap();
    let list = |f: ListOrders| {
        let client = app.a.clone();
        async move {
            let page = client.list_orders(&f).await.unwrap().body;
            (
                page.data.iter().map(|o| o.id).collect::<Vec<_>>(),
                page.has_more,
            )
        }
    };
    let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
    assert_eq!(
        list(ListOrders::default()).await,
        (newest_first.clone(), false)
    );
    let first = list(ListOrders {
        limit: Some(2),
        ..Default::default()
    })
    .await;
    assert_eq!(first, (newest_first[..2].to_vec(), true));
    let second = list(ListOrders {
        limit: Some(2),
        starting_after: Some(first.0[1]),
        ..Default::default()
    })
    .await;
    assert_eq!(second, (newest_first[2..4].to_vec(), true));
    let by_customer = list(ListOrders {
        customer_id: Some(c2),
        ..Default::default()
    })
    .await;
    assert_eq!(by_customer.0, [ids[3], ids[1]]);
    let canceled = list(ListOrders {
        status: Some("canceled".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(canceled.0, [ids[2]]);
    let created = app.a.get_order(ids[0]).await.unwrap().body.created_at;
    let in_range = list(ListOrders {
        created_gte: Some(created.clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(in_range.0.len(), 5);
    let before = list(ListOrders {
        created_lt: Some(created),
        ..Default::default()
    })
    .await;
    assert!(before.0.is_empty());
    let unix = list(ListOrders {
        created_gte: Some("0".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(unix.0.len(), 5);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("starting_after=-3", "starting_after"),
        ("status=shipped", "status"),
        ("created[gte]=yesterday", "created[gte]"),
        ("customer=1", "customer"),
    ] {
        let resp = app
            .a
            .request(Method::GET, &format!("/api/orders?{query}"))
            .send()
            .await
            .unwrap();
        let v = error_body(resp, 400, "invalid_parameter").await;
        assert_eq!(v["details"][0]["field"], field, "{query}: {v}");
    }
}

pub async fn every_error_class_has_the_envelope(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let post = |ct: Option<&str>, body: Vec<u8>| {
        let mut r = app.a.request(Method::POST, "/api/orders").body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    let valid = format!(r#"{{"customer_id":{c},"amount":1,"currency":"USD"}}"#);
    error_body(
        post(Some("application/json"), b"{\"customer_id\": ".to_vec())
            .await
            .unwrap(),
        400,
        "malformed_json",
    )
    .await;
    error_body(
        post(
            Some("application/json"),
            format!("{valid} trailing").into_bytes(),
        )
        .await
        .unwrap(),
        400,
        "malformed_json",
    )
    .await;
    error_body(
        post(Some("text/plain"), valid.clone().into_bytes())
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    error_body(
        post(None, valid.clone().into_bytes()).await.unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let v = error_body(
        post(
            Some("application/json"),
            format!(r#"{{"customer_id":{c},"amount":1,"currency":"USD","colour":"red"}}"#)
                .into_bytes(),
        )
        .await
        .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        (
            v["details"][0]["field"].as_str(),
            v["details"][0]["code"].as_str()
        ),
        (Some("colour"), Some("unknown_field"))
    );
    let v = error_body(
        post(
            Some("application/json"),
            br#"{"amount":1,"currency":"USD"}"#.to_vec(),
        )
        .await
        .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        (
            v["details"][0]["field"].as_str(),
            v["details"][0]["code"].as_str()
        ),
        (Some("customer_id"), Some("required"))
    );
    let v = error_body(
        post(
            Some("application/json"),
            br#"{"customer_id":"x","amount":1,"currency":"USD"}"#.to_vec(),
        )
        .await
        .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(v["details"][0]["field"], "customer_id");
    let v = error_body(
        post(
            Some("application/json"),
            format!(r#"{{"customer_id":{c},"amount":1,"currency":"USD","metadata":{{"k":7}}}}"#)
                .into_bytes(),
        )
        .await
        .unwrap(),
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(v["details"][0]["field"], "metadata.k");
    let big = format!(
        r#"{{"customer_id":{c},"amount":1,"currency":"USD","description":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    error_body(
        post(Some("application/json"), big.into_bytes())
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    error_body(
        app.a
            .request(Method::GET, "/api/nothing-here")
            .send()
            .await
            .unwrap(),
        404,
        "route_not_found",
    )
    .await;
    let resp = app
        .a
        .request(Method::DELETE, "/api/orders")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("allow"));
    error_body(resp, 405, "method_not_allowed").await;
    for path in [
        "/api/orders/abc",
        "/api/orders/0",
        "/api/orders/99999999999999999999",
        "/api/orders/424242",
    ] {
        error_body(
            app.a.request(Method::GET, path).send().await.unwrap(),
            404,
            "resource_not_found",
        )
        .await;
    }
    error_body(
        app.anon(Method::GET, "/api/orders").send().await.unwrap(),
        401,
        "authentication_required",
    )
    .await;
    let flipped = {
        let mut k = app.key_a.clone().into_bytes();
        k[12] = if k[12] == b'a' { b'b' } else { b'a' };
        String::from_utf8(k).unwrap()
    };
    let well_formed_unknown = bursar_domain::apikey::ParsedKey::assemble(
        bursar_domain::apikey::KeyMode::Test,
        "000000000000000000000000000000",
    )
    .unwrap();
    for auth in [
        format!("Bearer {flipped}"),
        format!("Bearer {}", well_formed_unknown.reveal()),
        "Bearer not-a-key".to_owned(),
        format!("Basic {}", app.key_a),
    ] {
        let resp = app
            .anon(Method::GET, "/api/orders")
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        error_body(resp, 401, "invalid_api_key").await;
    }
    // Bad input never becomes a 500.
    for body in [
        "null",
        "[]",
        "\"s\"",
        "1",
        "{}",
        "{\"customer_id\":1e400}",
        "{\"customer_id\":-1,\"amount\":1,\"currency\":\"USD\"}",
        "{\"customer_id\":9223372036854775808}",
        &format!("{}{}", "[".repeat(200), "]".repeat(200)),
        &format!(
            r#"{{"customer_id":{c},"amount":1,"currency":"USD","description":"nul\u0000byte"}}"#
        ),
        &format!(
            r#"{{"customer_id":{c},"amount":1,"currency":"USD","metadata":{{"k":"nul\u0000"}}}}"#
        ),
        "\u{feff}{}",
        "\u{0}",
    ] {
        let resp = post(Some("application/json"), body.as_bytes().to_vec())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{body:.60} gave {status}");
    }
    assert!(
        app.a
            .list_orders(&ListOrders::default())
            .await
            .unwrap()
            .body
            .data
            .is_empty()
    );
}

pub async fn problem_json_has_the_same_members(app: &TestApp) {
    let resp = app
        .a
        .request(Method::GET, "/api/orders/424242")
        .header("accept", "application/problem+json, application/json;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["type"], "https://bursar.dev/problems/resource-not-found");
    assert_eq!(v["title"], "Resource not found");
    assert_eq!(v["detail"], v["message"]);
    assert_eq!(v["instance"], "/api/orders/424242");
    assert_eq!(v["error_code"], "resource_not_found");
    for member in ["request_id", "trace_id", "latency_ms", "details"] {
        assert!(!v[member].is_null(), "{member} missing: {v}");
    }
    let resp = app
        .anon(Method::POST, "/api/orders")
        .header("accept", "application/problem+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["error_code"].as_str()),
        (Some(401), Some("authentication_required"))
    );
}

pub async fn request_ids_and_trace_context(app: &TestApp) {
    let inbound_id = "client-req-0123456789abcdef";
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app
        .a
        .request(Method::GET, "/api/orders/424242")
        .header("x-request-id", inbound_id)
        .header("traceparent", traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], inbound_id);
    let timing = resp.headers()["server-timing"].to_str().unwrap().to_owned();
    assert!(
        timing.contains("trace;desc=00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{timing}"
    );
    assert!(timing.contains("app;dur="), "{timing}");
    assert!(
        !timing.contains("00f067aa0ba902b7"),
        "Bursar reports its own span id: {timing}"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["request_id"], inbound_id);
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");

    let resp = app
        .a
        .request(Method::GET, "/api/orders/424242")
        .header("x-request-id", "bad id with spaces!")
        .header(
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_") && id.len() == 40, "{id}");
    let v: Value = resp.json().await.unwrap();
    assert_ne!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        v["trace_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736".to_uppercase()
    );

    // Success responses carry them too, and the write's outbox event records them.
    let c = app.customer(&app.a).await;
    let resp = app
        .a
        .request(Method::POST, "/api/orders")
        .header("x-request-id", inbound_id)
        .header("traceparent", traceparent)
        .json(&json!({"customer_id": c, "amount": "3.00", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-request-id"], inbound_id);
    let o: Value = resp.json().await.unwrap();
    let events = app
        .store
        .events_for(app.account_a, "order", o["id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, "order.created");
    assert_eq!(events[0].request_id, inbound_id);
    assert_eq!(events[0].trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
}

/// Group commit is visible where an operator looks: after a create, `/metrics` has the
/// creates writer's batch sizes, queue waits and write times.
pub async fn group_commit_is_measured(app: &TestApp) {
    app.a.create_customer(&Default::default()).await.unwrap();
    let metrics = app.metrics().await;
    for name in [
        "group_commit_batch_size",
        "group_commit_wait_seconds",
        "group_commit_write_seconds",
    ] {
        let count = format!("{name}_count{{writer=\"creates\"}}");
        let seen = metric(&metrics, &count);
        assert!(seen.is_some_and(|n| n >= 1.0), "{count} in:\n{metrics}");
    }
}

pub async fn health_readiness_and_docs(app: &TestApp) {
    let ok = app.anon(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let ready = app.anon(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let spec: Value = app
        .anon(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(spec["paths"]["/api/orders"]["post"].is_object());
    let docs = app.anon(Method::GET, "/docs/").send().await.unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger"), "docs page served from the binary");
    assert!(!html.contains("cdn"), "no CDN assets");
    // With the database gone, readiness says so; liveness does not care.
    app.store.close().await;
    let resp = app.anon(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    error_body(resp, 503, "service_unavailable").await;
    assert_eq!(
        app.anon(Method::GET, "/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

fn order(customer_id: i64, amount: &str) -> bursar_sdk::api::CreateOrder {
    serde_json::from_value(json!({"customer_id": customer_id, "amount": amount, "currency": "USD"}))
        .unwrap()
}

fn desc(d: &str) -> UpdateOrder {
    UpdateOrder {
        description: Some(d.to_owned()),
        ..Default::default()
    }
}
