//! Live streams end to end (issue 5, spec checklist C): SSE and WebSocket clients against the
//! real server, resuming from the log by `seq`; across two instances through a real NATS; and
//! JetStream's de-duplication of a re-published event.

use std::sync::Arc;
use std::time::Duration;

use bursar_server::SystemClock;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Backend, TestApp, error_body};

/// Long enough for a debug build under load; every wait ends as soon as the frame arrives.
const WITHIN: Duration = Duration::from_secs(10);

/// One SSE frame as it came over the wire.
#[derive(Debug, Default)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    retry: Option<u64>,
    comments: Vec<String>,
}

impl Frame {
    fn json(&self) -> Value {
        assert_eq!(self.data.len(), 1, "one data line per event: {self:?}");
        serde_json::from_str(&self.data[0]).unwrap()
    }

    fn seq(&self) -> i64 {
        self.id.as_deref().unwrap().parse().unwrap()
    }
}

/// A raw reader of `text/event-stream`: the tests check the wire format itself (fields,
/// comments, the `retry:` line), which a client library would hide.
struct Sse {
    body: Body,
    buf: Vec<u8>,
}

/// A response body: reqwest's, or hyper's on a socket with a tiny receive buffer.
enum Body {
    Reqwest(reqwest::Response),
    Hyper(hyper::body::Incoming),
}

impl Body {
    async fn chunk(&mut self) -> Option<axum::body::Bytes> {
        match self {
            Body::Reqwest(r) => r.chunk().await.unwrap(),
            Body::Hyper(b) => loop {
                use http_body_util::BodyExt;
                match b.frame().await {
                    None => return None,
                    Some(f) => {
                        if let Ok(data) = f.unwrap().into_data() {
                            return Some(data);
                        }
                    }
                }
            },
        }
    }
}

impl Sse {
    /// The next frame, or `None` when the server ended the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(parse_frame(std::str::from_utf8(&raw).unwrap()));
            }
            let chunk = tokio::time::timeout(WITHIN, self.body.chunk())
                .await
                .expect("no SSE frame in time");
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => return None,
            }
        }
    }

    /// The next frame carrying an event (skipping keep-alive comments).
    async fn event(&mut self) -> Frame {
        loop {
            let f = self.frame().await.expect("the stream ended");
            if f.event.is_some() {
                return f;
            }
        }
    }

    /// The next `n` events' seqs, checking each frame's shape on the way.
    async fn seqs(&mut self, n: usize, account: i64) -> Vec<i64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let f = self.event().await;
            let body = f.json();
            assert_eq!(body["seq"], f.seq(), "id: is the seq: {f:?}");
            assert_eq!(body["type"].as_str(), f.event.as_deref());
            assert_eq!(body["account_id"], account, "another tenant's event: {f:?}");
            assert!(body["id"].as_str().unwrap().starts_with("evt_"));
            out.push(f.seq());
        }
        out
    }
}

fn parse_frame(raw: &str) -> Frame {
    let mut f = Frame::default();
    for line in raw.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix(':') {
            f.comments.push(comment.trim().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "id" => f.id = Some(value),
            "event" => f.event = Some(value),
            "data" => f.data.push(value),
            "retry" => f.retry = Some(value.parse().unwrap()),
            other => panic!("unknown SSE field {other:?} in {raw:?}"),
        }
    }
    f
}

async fn open(app: &TestApp, key: &str, query: &str, last_event_id: Option<i64>) -> Sse {
    let resp = stream_request(app, key, query, last_event_id).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    let header = |name: &str| resp.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "text/event-stream");
    assert_eq!(header("cache-control"), "no-cache");
    assert_eq!(header("x-accel-buffering"), "no");
    let mut sse = Sse {
        body: Body::Reqwest(resp),
        buf: Vec::new(),
    };
    let first = sse.frame().await.unwrap();
    assert_eq!(
        first.retry,
        Some(3000),
        "the first frame sets retry: {first:?}"
    );
    sse
}

/// An SSE stream read through a socket with a 4 KiB receive buffer, so a client that stops
/// reading stops the server's writes within a few frames (no megabytes of kernel buffers in
/// between, which would make "slow" depend on the machine).
async fn open_small_window(app: &TestApp, key: &str, last_event_id: i64) -> Sse {
    let addr: std::net::SocketAddr = app.url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/api/events/stream")
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {key}"))
        .header("last-event-id", last_event_id.to_string())
        .body(http_body_util::Empty::<axum::body::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut sse = Sse {
        body: Body::Hyper(resp.into_body()),
        buf: Vec::new(),
    };
    assert!(sse.frame().await.unwrap().retry.is_some());
    sse
}

async fn stream_request(
    app: &TestApp,
    key: &str,
    query: &str,
    last_event_id: Option<i64>,
) -> reqwest::Response {
    let mut req = app
        .anon(reqwest::Method::GET, &format!("/api/events/stream{query}"))
        .bearer_auth(key);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    req.send().await.unwrap()
}

/// Creates `n` customers of the client's account: `n` events (`customer.created`).
async fn produce(app: &TestApp, client: &bursar_sdk::Client, n: usize) {
    for _ in 0..n {
        app.customer(client).await;
    }
}

/// Creates `n` customers of A with about 10 KB of metadata each, 8 at a time.
async fn produce_large(app: &TestApp, n: usize) {
    let metadata: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("k{i}"), json!("x".repeat(500))))
        .collect();
    let body = json!({ "metadata": metadata });
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (client, body) = (app.a.clone(), body.clone());
            let count = n / 8 + usize::from(t < n % 8);
            tokio::spawn(async move {
                for _ in 0..count {
                    let resp = client
                        .request(reqwest::Method::POST, "/api/customers")
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 201);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// SSE checklist items 35–37, 39 and 42 (tenants): format and headers, keep-alive comments,
/// resume by `Last-Event-ID` and by `?last_event_id=` (exactly the missed events, in order,
/// then live), type filters, a cursor ahead of the log, bad input, and another tenant's events
/// never appearing.
pub async fn sse_resumes_from_the_log_then_goes_live(app: &TestApp) {
    let app = app
        .sibling(|c| c.live.keep_alive_secs = 1, Arc::new(SystemClock))
        .await;
    let account_b = app.account_b;
    let mut live = open(&app, &app.key_a, "", None).await;
    let mut live_b = open(&app, &app.key_b, "", None).await;
    // 50 events of A, with B's events interleaved.
    for i in 0..50 {
        app.customer(&app.a).await;
        if i % 10 == 0 {
            app.customer(&app.b).await;
        }
    }
    let first = live.seqs(50, app.account_a).await;
    assert_eq!(
        first,
        (1..=50).collect::<Vec<_>>(),
        "A's seqs are dense from 1"
    );
    assert_eq!(live_b.seqs(5, account_b).await, vec![1, 2, 3, 4, 5]);
    drop(live);

    // Disconnected: 20 events happen. The resume gets exactly 51..70, then live.
    produce(&app, &app.a, 20).await;
    let mut resumed = open(&app, &app.key_a, "", Some(50)).await;
    assert_eq!(
        resumed.seqs(20, app.account_a).await,
        (51..=70).collect::<Vec<_>>()
    );
    produce(&app, &app.a, 1).await;
    assert_eq!(resumed.seqs(1, app.account_a).await, vec![71]);
    // The query form resumes identically; the header wins over it.
    let mut by_query = open(&app, &app.key_a, "?last_event_id=50", None).await;
    assert_eq!(
        by_query.seqs(21, app.account_a).await,
        (51..=71).collect::<Vec<_>>()
    );
    let mut both = open(&app, &app.key_a, "?last_event_id=3", Some(69)).await;
    assert_eq!(both.seqs(2, app.account_a).await, vec![70, 71]);

    // An idle stream gets keep-alive comments (every second in this configuration).
    let idle = tokio::time::timeout(Duration::from_secs(5), both.frame())
        .await
        .expect("a keep-alive comment within 5 s")
        .unwrap();
    assert!(
        idle.event.is_none() && idle.data.is_empty() && !idle.comments.is_empty(),
        "{idle:?}"
    );

    // A filter: only the matching events; the cursor still passes over the others.
    let order = create_order(&app).await;
    let mut orders_only = open(&app, &app.key_a, "?types=order.*", Some(0)).await;
    let f = orders_only.event().await;
    assert_eq!(f.event.as_deref(), Some("order.created"));
    assert_eq!(f.json()["data"]["aggregate_id"], order);
    produce(&app, &app.a, 3).await;
    let next = create_order(&app).await;
    let f = orders_only.event().await;
    assert_eq!(f.event.as_deref(), Some("order.created"));
    assert_eq!(f.json()["data"]["aggregate_id"], next);

    // A cursor ahead of the log: `reset` to the head, then the stream goes on from there.
    let head = 78;
    wait_sequenced(&app.a, head).await;
    let mut ahead = open(&app, &app.key_a, "", Some(10_000)).await;
    let reset = ahead.event().await;
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(reset.json(), json!({ "head": head }));
    assert_eq!(reset.seq(), head);
    produce(&app, &app.a, 1).await;
    assert_eq!(ahead.seqs(1, app.account_a).await, vec![head + 1]);

    // B's stream never saw A's events (checked per frame) and still follows B.
    produce(&app, &app.b, 1).await;
    assert_eq!(live_b.seqs(1, account_b).await, vec![6]);

    // Bad input is refused with the envelope; no key is a 401.
    for (query, last) in [
        ("", Some("abc")),
        ("", Some("-1")),
        ("?last_event_id=x", None),
        ("?types=order.*,no%20spaces", None),
        ("?unknown=1", None),
    ] {
        let mut req = app
            .anon(reqwest::Method::GET, &format!("/api/events/stream{query}"))
            .bearer_auth(&app.key_a);
        if let Some(last) = last {
            req = req.header("Last-Event-ID", last);
        }
        let resp = req.send().await.unwrap();
        error_body(resp, 400, "invalid_parameter").await;
    }
    let resp = app
        .anon(reqwest::Method::GET, "/api/events/stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    app.stop().await;
}

/// Checklist 41: a client that stops reading is cut off once it is further behind than the
/// buffer (memory stays bounded), and its reconnect with `Last-Event-ID` loses nothing.
pub async fn a_slow_subscriber_is_dropped_and_resumes(app: &TestApp) {
    let app = app
        .sibling(|c| c.live.buffer = 16, Arc::new(SystemClock))
        .await;
    let mut slow = open_small_window(&app, &app.key_a, 0).await;
    produce(&app, &app.a, 1).await;
    assert_eq!(slow.seqs(1, app.account_a).await, vec![1]);
    // Stop reading while far more events than the buffer and the connection's socket
    // buffers can hold happen (400 events of about 10 KB); the server ends this stream.
    produce_large(&app, 400).await;
    let mut seen = vec![1];
    let ended = loop {
        match slow.frame().await {
            Some(f) if f.event.is_some() => seen.push(f.seq()),
            Some(f) if f.comments.iter().any(|c| c.starts_with("lagged")) => {}
            Some(_) => {}
            None => break true,
        }
        if seen.len() > 401 {
            break false;
        }
    };
    assert!(
        ended,
        "a lagging stream is closed; it read {} events",
        seen.len()
    );
    let last = *seen.last().unwrap();
    assert!(
        last < 401,
        "it fell behind, so the stream ended early (at {last})"
    );
    assert_eq!(
        seen,
        (1..=last).collect::<Vec<_>>(),
        "no gap before the cut"
    );
    // Resume from the last seq received, as EventSource does (again, if this stream is cut
    // too: with a 16-event buffer, the relay still sequencing while the log is read can
    // overrun it): the rest, exactly once, in order.
    let mut rest = Vec::new();
    while rest.len() < usize::try_from(401 - last).unwrap() {
        let from = rest.last().copied().unwrap_or(last);
        let mut resumed = open(&app, &app.key_a, "", Some(from)).await;
        while let Some(f) = resumed.frame().await {
            if f.event.is_some() {
                rest.push(f.seq());
            }
            if rest.len() == usize::try_from(401 - last).unwrap() {
                break;
            }
        }
    }
    assert_eq!(rest, (last + 1..=401).collect::<Vec<_>>());
    app.stop().await;
}

/// The WebSocket endpoint: subscribe with a last seq (backfill then live), a type filter,
/// unsubscribe, bad messages answered in-band, and tenant scoping.
pub async fn websocket_subscribes_resumes_and_unsubscribes(app: &TestApp) {
    produce(app, &app.a, 5).await;
    produce(app, &app.b, 2).await;
    // A real client's last seq was sequenced already; wait for the relay so this one is too
    // (an unsequenced cursor would be ahead of the log: a `reset`).
    wait_sequenced(&app.a, 5).await;
    wait_sequenced(&app.b, 2).await;
    let mut ws = ws_connect(app, &app.key_a).await;
    send(&mut ws, json!({"type": "subscribe", "last_seq": 2})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "subscribed", "last_seq": 2})
    );
    for seq in 3..=5 {
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "event");
        assert_eq!(m["seq"], seq);
        assert_eq!(m["event_type"], "customer.created");
        assert_eq!(m["event"]["seq"], seq);
        assert_eq!(m["event"]["account_id"], app.account_a);
    }
    produce(app, &app.a, 1).await;
    assert_eq!(recv(&mut ws).await["seq"], 6, "then live");
    // Re-subscribing with a filter replaces the subscription.
    send(
        &mut ws,
        json!({"type": "subscribe", "types": ["order.*"], "last_seq": 6}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    produce(app, &app.a, 2).await;
    let order = create_order(app).await;
    let m = recv(&mut ws).await;
    assert_eq!(
        (m["seq"].clone(), m["event_type"].clone()),
        (json!(10), json!("order.created"))
    );
    assert_eq!(m["event"]["data"]["aggregate_id"], order);
    // Bad messages get an error and the connection stays usable.
    for bad in [
        json!({"type": "subscribe", "last_seq": -1}),
        json!({"type": "subscribe", "types": ["no spaces"]}),
        json!({"type": "dance"}),
    ] {
        send(&mut ws, bad.clone()).await;
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{bad}");
        assert_eq!(m["error_code"], "invalid_message");
    }
    send(&mut ws, json!({"type": "unsubscribe"})).await;
    assert_eq!(recv(&mut ws).await["type"], "unsubscribed");
    produce(app, &app.a, 1).await;
    // Nothing more arrives after unsubscribing (a ping may).
    let quiet = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(
        !matches!(quiet, Ok(Some(Ok(Message::Text(_))))),
        "{quiet:?}"
    );
    // B's socket sees only B's events.
    let mut ws_b = ws_connect(app, &app.key_b).await;
    send(&mut ws_b, json!({"type": "subscribe", "last_seq": 0})).await;
    assert_eq!(recv(&mut ws_b).await["type"], "subscribed");
    let account_b = app.account_b;
    for seq in 1..=2 {
        let m = recv(&mut ws_b).await;
        assert_eq!(
            (m["seq"].clone(), m["event"]["account_id"].clone()),
            (json!(seq), json!(account_b))
        );
    }
    // Without a key the upgrade is refused.
    let req = ws_url(app).into_client_request().unwrap();
    let refused = tokio_tungstenite::connect_async(req).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
}

/// Checklist 40 and the JetStream points: two instances on one PostgreSQL database with NATS.
/// An event created through A reaches an SSE client on B; a client that moves from A to B
/// resumes with its last seq; every event is in the stream once, under its subject, with its
/// id, request id and trace id as headers, and publishing one again is a duplicate.
pub async fn two_instances_share_events_through_nats(app: &TestApp) {
    let Some(nats_url) = std::env::var("BURSAR_TEST_NATS_URL").ok() else {
        eprintln!("skipped: BURSAR_TEST_NATS_URL is not set");
        return;
    };
    if !matches!(app.backend, Backend::Postgres) {
        // Two processes on one SQLite file work too, but the point here is the deployment
        // shape: several instances on PostgreSQL.
        return;
    }
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let nats = |c: &mut bursar_server::Config| {
        c.nats.url = Some(nats_url.clone());
        c.nats.subject_prefix = prefix.clone();
    };
    let a = app.sibling(nats, Arc::new(SystemClock)).await;
    let b = a.twin(|c| c.webhooks.run_workers = false).await;
    // B runs no relay: whatever B's clients see came from A through NATS (or B's log reads).
    let mut on_b = open(&b, &a.key_a, "", None).await;
    a.customer(&a.a).await;
    let first = on_b.event().await;
    assert_eq!(first.seq(), 1);
    assert_eq!(first.event.as_deref(), Some("customer.created"));
    // A client of A moves to B with its last seq and misses nothing.
    let mut on_a = open(&a, &a.key_a, "", Some(1)).await;
    produce(&a, &a.a, 3).await;
    let seen = on_a.seqs(2, a.account_a).await;
    assert_eq!(seen, vec![2, 3]);
    drop(on_a);
    produce(&a, &a.a, 2).await;
    let mut moved = open(&b, &a.key_a, "", Some(3)).await;
    assert_eq!(moved.seqs(3, a.account_a).await, vec![4, 5, 6]);
    assert_eq!(on_b.seqs(5, a.account_a).await, vec![2, 3, 4, 5, 6]);

    // JetStream: all 6 events are stored, once each, by the time the backlog is empty.
    let link = a.state.nats.clone().unwrap();
    for _ in 0..200 {
        if a.store.unpublished_events(10).await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(a.store.unpublished_events(10).await.unwrap().is_empty());
    let stream = link
        .jetstream()
        .get_stream(link.stream_name())
        .await
        .unwrap();
    assert_eq!(stored_messages(&a).await, 6);
    let logged = a.store.events_after(a.account_a, 0, &[], 10).await.unwrap();
    let last = logged.last().unwrap();
    let subject = format!("{prefix}.events.{}.customer.created", a.account_a);
    let stored = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(stored.payload.as_ref(), last.body.as_bytes());
    let header = |name: &str| {
        stored
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("Nats-Msg-Id"), last.event_id);
    assert_eq!(header("Bursar-Request-Id"), last.request_id);
    assert_eq!(header("Bursar-Trace-Id"), last.trace_id);
    assert_eq!(header("Bursar-Seq"), last.seq.to_string());
    // Checklist 18: publishing the same event again (a crash before `published_at` was set)
    // is acknowledged as a duplicate and stored once.
    let acks = link.publish(std::slice::from_ref(last)).await.unwrap();
    assert!(acks[0].duplicate, "{:?}", acks[0]);
    assert_eq!(stored_messages(&a).await, 6);
    link.jetstream()
        .delete_stream(link.stream_name())
        .await
        .unwrap();
    b.stop().await;
    a.stop().await;
}

/// Messages in the instance's JetStream stream.
async fn stored_messages(app: &TestApp) -> u64 {
    let link = app.state.nats.clone().expect("NATS is configured");
    let mut stream = link
        .jetstream()
        .get_stream(link.stream_name())
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// Waits until the account's newest event has `seq` at least `seq`.
async fn wait_sequenced(client: &bursar_sdk::Client, seq: i64) {
    for _ in 0..400 {
        let newest: Value = client
            .request(reqwest::Method::GET, "/api/events?limit=1")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if newest["data"][0]["seq"].as_i64().unwrap_or(0) >= seq {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("seq {seq} was never sequenced");
}

/// Checklist 38: events keep flowing while a client reconnects 100 times, each time with the
/// last seq it received, after reading a few events: what it received, end to end, is every
/// seq from 1 on, in order, with no gap and no repeat.
pub async fn reconnecting_under_load_never_gaps_or_repeats(app: &TestApp) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (client, stop) = (app.a.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = client
                    .request(reqwest::Method::POST, "/api/customers")
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
            }
        })
    };
    let mut received: Vec<i64> = Vec::new();
    for cycle in 0..100 {
        let last = received.last().copied().unwrap_or(0);
        let mut sse = open(app, &app.key_a, "", Some(last)).await;
        // Read 1 to 5 events, then drop the connection mid-stream.
        received.extend(sse.seqs(cycle % 5 + 1, app.account_a).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.await.unwrap();
    let expected: Vec<i64> = (1..=i64::try_from(received.len()).unwrap()).collect();
    assert_eq!(received, expected);
}

/// Checklist 34 (events side): a create retried with its `Idempotency-Key` makes one order and
/// one `order.created` event, however often it is replayed.
pub async fn a_replayed_create_emits_one_event(app: &TestApp) {
    let customer = app.customer(&app.a).await;
    let body = json!({"customer_id": customer, "amount": "12.50", "currency": "USD"});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let resp = app
            .a
            .request(reqwest::Method::POST, "/api/orders")
            .header("Idempotency-Key", "one-order-one-event")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        ids.push(resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    wait_sequenced(&app.a, 2).await;
    let mut sse = open(app, &app.key_a, "?types=order.*", Some(0)).await;
    let f = sse.event().await;
    assert_eq!(f.json()["data"]["aggregate_id"], ids[0]);
    // `data.object` is the order as the API serves it, not a storage snapshot.
    let served: Value = app
        .a
        .request(reqwest::Method::GET, &format!("/api/orders/{}", ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(f.json()["data"]["object"], served);
    assert!(f.data[0].contains(r#""amount":12.50"#), "{}", f.data[0]);
    // One more order: the next order event is that one, so no second event came between.
    let next = create_order(app).await;
    let f = sse.event().await;
    assert_eq!(f.json()["data"]["aggregate_id"], next);
}

/// Durability of publishing: while NATS is down, sequenced events wait in the log (and live
/// streams on the instance still get them); when NATS comes up, every one is published, once.
/// Runs its own `nats-server` on a free port, so stopping it disturbs no other test.
pub async fn events_wait_in_the_log_while_nats_is_down(app: &TestApp) {
    let Some(bin) = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        eprintln!("skipped: no nats-server binary");
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let url = format!("nats://127.0.0.1:{port}");
    let a = app
        .sibling(
            |c| {
                c.nats.url = Some(url.clone());
                c.nats.subject_prefix = prefix.clone();
            },
            Arc::new(SystemClock),
        )
        .await;
    let mut live = open(&a, &a.key_a, "", None).await;
    produce(&a, &a.a, 3).await;
    assert_eq!(
        live.seqs(3, a.account_a).await,
        vec![1, 2, 3],
        "live without NATS"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.store.unpublished_events(10).await.unwrap().len(), 3);

    let dir = tempfile::tempdir().unwrap();
    let mut server = tokio::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut published = false;
    for _ in 0..300 {
        if a.store.unpublished_events(10).await.unwrap().is_empty() {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "the backlog was published once NATS came up");
    assert_eq!(stored_messages(&a).await, 3);
    a.stop().await;
    server.kill().await.unwrap();
}

async fn create_order(app: &TestApp) -> i64 {
    let customer = app.customer(&app.a).await;
    let resp = app
        .a
        .request(reqwest::Method::POST, "/api/orders")
        .json(&json!({"customer_id": customer, "amount": "10.00", "currency": "USD"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
}

fn ws_url(app: &TestApp) -> String {
    format!("{}/api/events/ws", app.url.replacen("http://", "ws://", 1))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(app: &TestApp, key: &str) -> Ws {
    let mut req = ws_url(app).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

/// The next text message (pings are skipped).
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WITHIN, ws.next())
            .await
            .expect("no WebSocket message in time")
            .expect("the socket closed")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// A key made through the API by A's own key: `(id, secret)`.
async fn api_key(app: &TestApp, body: Value) -> (i64, String) {
    let resp = app
        .anon(reqwest::Method::POST, "/api/keys")
        .bearer_auth(&app.key_a)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let key: Value = resp.json().await.unwrap();
    (
        key["id"].as_i64().unwrap(),
        key["secret"].as_str().unwrap().to_owned(),
    )
}

/// Reads frames until the stream ends (within `within`); whether a comment said the key ended.
async fn until_ended(sse: &mut Sse, within: Duration) -> bool {
    let mut said = false;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sse.frame()).await {
            Ok(Some(frame)) => said |= frame.comments.iter().any(|c| c.contains("revoked")),
            Ok(None) => return said,
            Err(_) => panic!("the stream was still open after {within:?}"),
        }
    }
}

/// SSE checklist: an expired or revoked token ends the stream, and the reconnect gets 401. A
/// revoke on this instance ends the SSE stream and the WebSocket (close code 4001) within
/// about a quarter second; one this instance never heard of, within the 5 s re-read; a key
/// that expires ends them at its expiry.
pub async fn a_revoked_or_expired_key_ends_its_streams(app: &TestApp) {
    let (id, secret) = api_key(app, json!({"name": "stream"})).await;
    let mut sse = open(app, &secret, "", None).await;
    let mut ws = ws_connect(app, &secret).await;
    let resp = app
        .anon(reqwest::Method::POST, &format!("/api/keys/{id}/revoke"))
        .bearer_auth(&app.key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(until_ended(&mut sse, Duration::from_secs(2)).await);
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("the WebSocket was closed");
    assert_eq!(closed, 4001);
    let again = stream_request(app, &secret, "", None).await;
    assert_eq!(again.status(), 401);

    // Revoked behind this instance's back (another instance, no Redis): no tombstone here,
    // so only the watch's read of the key row (every 5 s) can end the stream.
    let (id, secret) = api_key(app, json!({"name": "elsewhere"})).await;
    let mut sse = open(app, &secret, "", None).await;
    let now = bursar_domain::Clock::now(&SystemClock);
    app.store
        .revoke_api_key(app.account_a, id, now)
        .await
        .unwrap();
    assert!(until_ended(&mut sse, Duration::from_secs(8)).await);

    let soon = bursar_domain::Timestamp(bursar_domain::Clock::now(&SystemClock).0 + 1_500);
    let (_, secret) = api_key(app, json!({"expires_at": soon.rfc3339()})).await;
    let mut sse = open(app, &secret, "", None).await;
    assert!(until_ended(&mut sse, Duration::from_secs(4)).await);
    let again = stream_request(app, &secret, "", None).await;
    assert_eq!(again.status(), 401);
}
