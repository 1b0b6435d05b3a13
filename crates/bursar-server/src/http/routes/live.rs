//! Live streams (issue 5): `GET /api/events/stream` (Server-Sent Events) and
//! `GET /api/events/ws` (WebSocket). Both serve one account's events by `seq` through the
//! same subscription (`live::stream`); this file only speaks the two wire formats.

use std::convert::Infallible;
use std::pin::{Pin, pin};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bursar_api::ErrorBody;
use futures_util::{SinkExt, Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::IntoParams;

use super::{bad_param, split_types};
use crate::AppState;
use crate::http::error::ApiError;
use crate::http::extract::Auth;
use crate::http::extract::Params;
use crate::live::stream::{self as live_stream, End, Feed, Item, Subscription};
use crate::services::{Call, webhooks::check_patterns};

/// Largest WebSocket message a client may send (subscribe messages are small).
const WS_MESSAGE_MAX: usize = 16 * 1024;
/// Close code for a subscriber that fell too far behind (private-use range, RFC 6455 §7.4.2).
const WS_CLOSE_LAGGED: u16 = 4000;
/// Close code when the event log could not be read.
const WS_CLOSE_UNAVAILABLE: u16 = 1011;
/// Close code on server shutdown ("going away").
const WS_CLOSE_GOING_AWAY: u16 = 1001;
/// Close code when the stream's API key was revoked or expired (private-use range).
const WS_CLOSE_KEY_ENDED: u16 = 4001;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Resume after this `seq`, as the `Last-Event-ID` header does (the header wins).
    #[param(value_type = Option<i64>)]
    pub last_event_id: Option<String>,
    /// Only these event types (comma-separated); `order.*` and `*` patterns work.
    pub types: Option<String>,
}

/// A cursor: `0` means from the first event.
fn parse_cursor(field: &str, raw: &str) -> Result<i64, ApiError> {
    match raw.trim().parse::<i64>() {
        Ok(v) if v >= 0 => Ok(v),
        _ => Err(bad_param(
            field,
            "must be a seq, a non-negative integer".into(),
        )),
    }
}

/// Splits `types=a,b`; patterns are checked as webhook endpoints' are.
pub fn parse_types(raw: Option<&str>) -> Result<Vec<String>, ApiError> {
    let types = split_types(raw);
    if raw.is_some() {
        let mut issues = Vec::new();
        check_patterns(&mut issues, "types", &types);
        if let Some(first) = issues.into_iter().next() {
            return Err(bad_param("types", first.message));
        }
    }
    Ok(types)
}

#[utoipa::path(get, path = "/api/events/stream", tag = "events", params(StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this `seq` (sent by EventSource on reconnect)")),
    responses(
        (status = 200, description = "`text/event-stream`: first a `retry:` field, then one frame per event (`id:` = seq, `event:` = type, `data:` = the event, one line of JSON), a comment every 15 s when idle. `event: reset` (data `{\"head\":seq}`) when the cursor is ahead of the log: reload over REST. The stream ends when the client falls too far behind (reconnect with the last id) and, after a comment saying so, when the API key is revoked or expires (the reconnect gets 401).", content_type = "text/event-stream"),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn sse(
    call: Call,
    headers: HeaderMap,
    Params(q): Params<StreamQuery>,
) -> Result<Response, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("invalid"));
    let after = match (header, q.last_event_id.as_deref()) {
        (Some(raw), _) => Some(parse_cursor("Last-Event-ID", raw)?),
        (None, Some(raw)) => Some(parse_cursor("last_event_id", raw)?),
        (None, None) => None,
    };
    let sub = Subscription {
        account: call.auth.account_id,
        patterns: parse_types(q.types.as_deref())?,
        after,
    };
    let config = &call.state.config.live;
    let retry = std::time::Duration::from_millis(config.retry_ms);
    let first = stream::iter([Ok(Event::default().retry(retry))]);
    let feed = live_stream::start(&call.state, sub);
    let ended = Box::pin(key_ended(call.state.clone(), &call.auth));
    let frames = first.chain(sse_frames(feed, ended));
    let sse = Sse::new(frames).keep_alive(KeepAlive::new().interval(config.keep_alive()));
    Ok((
        [(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        )],
        sse,
    )
        .into_response())
}

/// Resolves when the stream's key stops being valid (`live::keys`), so the reconnect meets
/// the 401.
fn key_ended(state: AppState, auth: &Auth) -> impl Future<Output = ()> + Send + 'static {
    let mut watching = state.live.keys.watch(auth.account_id, auth.key_id);
    let expires_at = auth.expires_at;
    async move { watching.ended(&state, expires_at).await }
}

type KeyEnded = Pin<Box<dyn Future<Output = ()> + Send>>;

fn sse_frames(feed: Feed, ended: KeyEnded) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some((feed, ended)), |state| async move {
        let (mut feed, mut ended) = state?;
        let item = tokio::select! {
            item = feed.items.recv() => item,
            () = &mut ended => {
                let why = "the API key was revoked or expired: reconnecting gets 401";
                return Some((Ok(Event::default().comment(why)), None));
            }
        };
        match item {
            Some(Item::Event(e)) => {
                let frame = Event::default()
                    .id(e.seq.to_string())
                    .event(e.event_type.as_str())
                    .data(e.body.as_str());
                Some((Ok(frame), Some((feed, ended))))
            }
            Some(Item::Reset { head }) => {
                let frame = Event::default()
                    .id(head.to_string())
                    .event("reset")
                    .data(serde_json::json!({ "head": head }).to_string());
                Some((Ok(frame), Some((feed, ended))))
            }
            // The subscription ended: say why in a comment, then end the response.
            None => match feed.end.try_recv() {
                Ok(End::Lagged) => Some((
                    Ok(Event::default().comment("lagged: reconnect with Last-Event-ID")),
                    None,
                )),
                _ => None,
            },
        }
    })
}

/// What a WebSocket client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    /// Start (or replace) the subscription, resuming after `last_seq` if given.
    Subscribe {
        #[serde(default)]
        types: Vec<String>,
        last_seq: Option<i64>,
    },
    Unsubscribe,
}

/// What the server sends over a WebSocket.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerMessage<'a> {
    Subscribed {
        last_seq: Option<i64>,
    },
    Unsubscribed,
    Event {
        seq: i64,
        event_type: &'a str,
        event: &'a RawValue,
    },
    Reset {
        head: i64,
    },
    Error {
        error_code: &'static str,
        message: String,
    },
}

#[utoipa::path(get, path = "/api/events/ws", tag = "events",
    responses(
        (status = 101, description = "WebSocket. Send `{\"type\":\"subscribe\",\"types\":[\"order.*\"],\"last_seq\":50}` (both fields optional) or `{\"type\":\"unsubscribe\"}`. Received: `subscribed`, `event` (`seq`, `event_type`, `event`: the event as the events API serves it), `reset` (`head`), `unsubscribed`, `error` (`error_code`, `message`). The server pings when idle; close code 4000 means the client fell behind: subscribe again with the last seq; 4001 means the API key was revoked or expired."),
        (status = "4XX", description = "Error", body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn websocket(call: Call, upgrade: WebSocketUpgrade) -> Response {
    let state = call.state.clone();
    let account = call.auth.account_id;
    let ended = Box::pin(key_ended(state.clone(), &call.auth));
    upgrade
        .max_message_size(WS_MESSAGE_MAX)
        .on_upgrade(move |socket| ws_session(socket, state, account, ended))
}

fn text(message: &ServerMessage<'_>) -> Message {
    // Serialising these types cannot fail (no maps with non-string keys, no custom impls).
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(message).unwrap_or_default(),
    ))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// The next item of the subscription, or never while there is none.
async fn next_item(feed: &mut Option<Feed>) -> Option<Item> {
    match feed {
        Some(f) => f.items.recv().await,
        None => std::future::pending().await,
    }
}

async fn ws_session(socket: WebSocket, state: AppState, account: i64, mut ended: KeyEnded) {
    let (mut sink, mut source) = socket.split();
    let mut feed: Option<Feed> = None;
    let mut ping = tokio::time::interval(state.config.live.keep_alive());
    ping.reset();
    let mut closed = pin!(state.live.closed());
    loop {
        let out = tokio::select! {
            incoming = source.next() => match incoming {
                Some(Ok(Message::Text(t))) => match handle(&state, account, &t, &mut feed) {
                    Ok(reply) | Err(reply) => reply,
                },
                Some(Ok(Message::Binary(_))) => text(&ServerMessage::Error {
                    error_code: "invalid_message",
                    message: "messages are JSON text frames".into(),
                }),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue, // pings are answered by the library; pongs need nothing
            },
            item = next_item(&mut feed) => match item {
                Some(Item::Event(e)) => match serde_json::from_str::<&RawValue>(&e.body) {
                    Ok(event) => text(&ServerMessage::Event { seq: e.seq, event_type: &e.event_type, event }),
                    Err(_) => continue,
                },
                Some(Item::Reset { head }) => text(&ServerMessage::Reset { head }),
                None => {
                    let why = feed.take().and_then(|mut f| f.end.try_recv().ok());
                    let _ = sink.send(match why {
                        Some(End::Lagged) => close(WS_CLOSE_LAGGED, "lagged: subscribe again with your last seq"),
                        _ => close(WS_CLOSE_UNAVAILABLE, "event log unavailable: subscribe again with your last seq"),
                    }).await;
                    return;
                }
            },
            _ = ping.tick() => Message::Ping(Default::default()),
            () = &mut closed => {
                let _ = sink.send(close(WS_CLOSE_GOING_AWAY, "server shutting down")).await;
                return;
            }
            () = &mut ended => {
                let _ = sink.send(close(WS_CLOSE_KEY_ENDED, "API key revoked or expired")).await;
                return;
            }
        };
        if sink.send(out).await.is_err() {
            return;
        }
    }
}

/// Applies one client message; the reply (or the error) to send back.
fn handle(
    state: &AppState,
    account: i64,
    raw: &str,
    feed: &mut Option<Feed>,
) -> Result<Message, Message> {
    let invalid = |message: String| {
        text(&ServerMessage::Error {
            error_code: "invalid_message",
            message,
        })
    };
    let message: ClientMessage = serde_json::from_str(raw).map_err(|e| {
        invalid(format!(
            "expected {{\"type\":\"subscribe\",\"types\":[…],\"last_seq\":n}} or {{\"type\":\"unsubscribe\"}}: {e}"
        ))
    })?;
    match message {
        ClientMessage::Subscribe { types, last_seq } => {
            if last_seq.is_some_and(|s| s < 0) {
                return Err(invalid("last_seq must be a non-negative integer".into()));
            }
            if !types.is_empty() {
                let mut issues = Vec::new();
                check_patterns(&mut issues, "types", &types);
                if let Some(first) = issues.into_iter().next() {
                    return Err(invalid(format!("types: {}", first.message)));
                }
            }
            // Replacing the feed drops the old subscription (its pump stops).
            *feed = Some(live_stream::start(
                state,
                Subscription {
                    account,
                    patterns: types,
                    after: last_seq,
                },
            ));
            Ok(text(&ServerMessage::Subscribed { last_seq }))
        }
        ClientMessage::Unsubscribe => {
            *feed = None;
            Ok(text(&ServerMessage::Unsubscribed))
        }
    }
}
