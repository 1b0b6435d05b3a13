//! The processor client against the sandbox processor over real HTTP: what it retries, what
//! it does not, and that retries never charge twice.

use std::time::Duration;

use bursar_sandbox::{Faults, Sandbox};
use bursar_server::processor::{
    HttpProcessor, PaymentRequest, Processor, ProcessorError, RetryPolicy,
};

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        timeout: Duration::from_millis(300),
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
    }
}

async fn sandbox(faults: Faults) -> (Sandbox, HttpProcessor) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox = Sandbox::new(faults);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(bursar_sandbox::serve(listener, sandbox.clone()));
    (sandbox, HttpProcessor::new(&url, policy()).unwrap())
}

fn card(method: &str, capture: bool) -> PaymentRequest {
    PaymentRequest {
        amount_minor: 19900,
        currency: "USD".into(),
        payment_method: method.into(),
        capture,
    }
}

fn kinds(s: &Sandbox) -> Vec<String> {
    s.ledger().into_iter().map(|e| e.kind).collect()
}

#[tokio::test]
async fn flaky_calls_are_retried_under_one_key_and_charge_once() {
    let (s, p) = sandbox(Faults::default()).await;
    let paid = p
        .create_payment(&"bursar-1".into(), &card("pm_card_flaky", true))
        .await
        .unwrap();
    assert_eq!(
        (paid.status.as_str(), paid.captured_minor),
        ("captured", 19900)
    );
    assert_eq!(kinds(&s), ["authorization", "capture"]);
    assert_eq!(s.payment_calls(), 3, "two 503s, then the charge");
    // The caller retries later (a resumed phase): the same key, the same payment.
    let again = p
        .create_payment(&"bursar-1".into(), &card("pm_card_flaky", true))
        .await
        .unwrap();
    assert_eq!(again, paid);
    assert_eq!(s.ledger().len(), 2);
    assert!(
        s.ledger()
            .iter()
            .all(|e| e.idempotency_key.as_deref() == Some("bursar-1"))
    );
}

#[tokio::test]
async fn declines_are_answers_and_are_not_retried() {
    let (s, p) = sandbox(Faults::default()).await;
    for (method, code) in [
        ("pm_card_declined", "card_declined"),
        ("pm_card_insufficient_funds", "insufficient_funds"),
    ] {
        let e = p
            .create_payment(&method.into(), &card(method, true))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ProcessorError::Declined { code: ref c, .. } if c == code),
            "{e:?}"
        );
    }
    let e = p
        .create_payment(&"k".into(), &card("pm_card_bogus", true))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProcessorError::Refused { status: 422, .. }),
        "{e:?}"
    );
    assert!(kinds(&s).is_empty());
    assert_eq!(s.payment_calls(), 3, "one call each, no retries");
}

#[tokio::test]
async fn timeouts_outages_and_refused_connections_end_unavailable_after_three_attempts() {
    let (s, p) = sandbox(Faults::default()).await;
    let e = p
        .create_payment(&"t".into(), &card("pm_card_timeout", true))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProcessorError::Unavailable { attempts: 3, ref reason } if reason == "timed out"),
        "{e:?}"
    );
    assert_eq!(s.payment_calls(), 3, "three timed-out attempts");

    let (s, p) = sandbox(Faults {
        failure_percent: 100,
        ..Faults::default()
    })
    .await;
    let e = p
        .create_payment(&"o".into(), &card("pm_card_visa", true))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProcessorError::Unavailable { attempts: 3, .. }),
        "{e:?}"
    );
    assert!(kinds(&s).is_empty());

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let p = HttpProcessor::new(&url, policy()).unwrap();
    let e = p
        .create_payment(&"c".into(), &card("pm_card_visa", true))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProcessorError::Unavailable { attempts: 3, ref reason } if reason.starts_with("connection failed")),
        "{e:?}"
    );
}

#[tokio::test]
async fn capture_void_and_refund_round_trip() {
    let (s, p) = sandbox(Faults::default()).await;
    let auth = p
        .create_payment(&"a".into(), &card("pm_card_visa", false))
        .await
        .unwrap();
    assert_eq!(auth.status, "authorized");
    let captured = p.capture(&"c".into(), &auth.id, Some(15000)).await.unwrap();
    assert_eq!(captured.captured_minor, 15000);
    let refund = p.refund(&"r".into(), &auth.id, None).await.unwrap();
    assert_eq!(
        (refund.amount_minor, refund.payment_id.as_str()),
        (15000, auth.id.as_str())
    );
    let e = p.refund(&"r2".into(), &auth.id, Some(1)).await.unwrap_err();
    assert!(
        matches!(e, ProcessorError::Refused { status: 422, .. }),
        "{e:?}"
    );
    let other = p
        .create_payment(&"b".into(), &card("pm_card_visa", false))
        .await
        .unwrap();
    assert_eq!(
        p.void(&"v".into(), &other.id).await.unwrap().status,
        "voided"
    );
    assert_eq!(
        kinds(&s),
        [
            "authorization",
            "capture",
            "refund",
            "authorization",
            "void"
        ]
    );
}
