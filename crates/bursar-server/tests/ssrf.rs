//! The SSRF guard end to end: a real client, a real listener, and a count of the TCP
//! connections that reached it. "Refused" must mean no connection was opened, not merely that
//! the response was discarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use axum::serve::ListenerExt;
use bursar_server::ssrf::{self, Policy};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(5);

fn install_crypto() {
    // Another test in this binary may have installed it already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves `router` on a fresh loopback port; returns the port and a counter of accepted
/// connections.
async fn serve_counting(router: Router) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (port, accepted)
}

fn ok_router() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn policy(allow: &[&str]) -> Arc<Policy> {
    let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
    Arc::new(Policy::new(&allow).unwrap())
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_before_connecting() {
    install_crypto();
    let (port, accepted) = serve_counting(ok_router()).await;
    let client = ssrf::client(policy(&[]), TIMEOUT, "bursar-test").unwrap();

    let err = client
        .get(format!("http://localhost:{port}/"))
        .send()
        .await
        .unwrap_err();

    assert!(ssrf::is_blocked(&err), "not classified as blocked: {err:?}");
    // Give a stray connection time to be accepted before asserting there was none.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn ip_literals_bypass_the_resolver_so_check_url_must_refuse_them() {
    let url = reqwest::Url::parse("http://127.0.0.1:9/").unwrap();
    let err = ssrf::check_url(&policy(&[]), &url).unwrap_err();
    assert_eq!(err.kind(), "blocked_ip");
    assert!(ssrf::is_blocked(&err));
}

#[tokio::test]
async fn the_allow_list_lets_the_same_request_through() {
    install_crypto();
    let (port, accepted) = serve_counting(ok_router()).await;
    let client = ssrf::client(policy(&["127.0.0.0/8", "::1/128"]), TIMEOUT, "bursar-test").unwrap();

    let response = client
        .get(format!("http://localhost:{port}/"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ok");
    assert!(accepted.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    install_crypto();
    let (target_port, target_accepted) = serve_counting(ok_router()).await;
    let location = format!("http://localhost:{target_port}/");
    let redirecting = Router::new().route(
        "/",
        get(move || async move { (StatusCode::FOUND, [(header::LOCATION, location)]) }),
    );
    let (port, accepted) = serve_counting(redirecting).await;
    let client = ssrf::client(policy(&["127.0.0.0/8", "::1/128"]), TIMEOUT, "bursar-test").unwrap();

    let response = client
        .get(format!("http://localhost:{port}/"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(target_accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn require_https_refuses_plain_http_before_connecting() {
    install_crypto();
    let (port, accepted) = serve_counting(ok_router()).await;
    let mut p = Policy::new(&["127.0.0.0/8".to_owned(), "::1/128".to_owned()]).unwrap();
    p.require_https = true;
    let client = ssrf::client(Arc::new(p), TIMEOUT, "bursar-test").unwrap();

    let result = client.get(format!("http://localhost:{port}/")).send().await;

    assert!(result.is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}
