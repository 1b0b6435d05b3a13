//! Keys, usage and the invoice preview (issue 6).

use std::collections::BTreeMap;

use bursar_api as api;
use bursar_domain::apikey::{KeyMode, Scope};
use bursar_domain::money::decimal_string;
use bursar_domain::pricing::{Period, day_of};
use bursar_domain::{Currency, Timestamp};
use bursar_storage::{ApiKeyInfo, NewApiKey, Page, PageRequest, UsageRow};
use rust_decimal::Decimal;

use super::Call;
use super::accounts::new_key;
use crate::http::error::{ApiError, issue};
use crate::http::render::time;

/// Longest grace a roll may give the old key.
pub const MAX_GRACE_SECS: u64 = 30 * 86_400;
const DAY_MS: i64 = 86_400_000;

/// The wire form of a key; `secret` only right after create or roll.
pub fn render_key(k: &ApiKeyInfo, secret: Option<String>) -> api::ApiKey {
    api::ApiKey {
        id: k.id,
        object: "api_key".into(),
        name: k.name.clone(),
        mode: k.mode.as_str().into(),
        secret,
        start: k.start.clone(),
        last4: k.last4.clone(),
        scopes: k
            .scopes
            .as_ref()
            .map(|v| v.iter().map(|s| s.render()).collect()),
        created_at: time(k.created_at),
        last_used_at: k.last_used_at.map(time),
        expires_at: k.expires_at.map(time),
        revoked_at: k.revoked_at.map(time),
        rotated_from: k.rotated_from,
    }
}

/// Creates a key. Not stored for idempotent replay on purpose: the answer holds the secret,
/// which is never written anywhere; a retried create makes a second key (revoke the spare).
pub async fn create_key(call: &Call, req: api::CreateApiKey) -> Result<api::ApiKey, ApiError> {
    let now = call.state.clock.now();
    let mut issues = Vec::new();
    let name = req.name.unwrap_or_default();
    if name.chars().count() > 100 || name.chars().any(char::is_control) {
        issues.push(issue(
            "name",
            "invalid",
            "at most 100 characters, no control characters",
        ));
    }
    let mode = match req.mode.as_deref() {
        None => call.auth.mode,
        Some(m) => KeyMode::parse(m).unwrap_or_else(|| {
            issues.push(issue("mode", "invalid", "must be test or live"));
            call.auth.mode
        }),
    };
    let scopes = match req.scopes {
        None => None,
        Some(list) => {
            let mut parsed = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match Scope::parse(s) {
                    Some(scope) => parsed.push(scope),
                    None => issues.push(issue(
                        format!("scopes[{i}]"),
                        "invalid",
                        "must be resource:read or resource:write with a known resource",
                    )),
                }
            }
            if list.is_empty() {
                issues.push(issue(
                    "scopes",
                    "invalid",
                    "omit scopes for full access; an empty list allows nothing",
                ));
            }
            parsed.sort();
            parsed.dedup();
            Some(parsed)
        }
    };
    let expires_at = match req.expires_at.as_deref() {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(t) if t.timestamp_millis() > now.0 => Some(Timestamp(t.timestamp_millis())),
            Ok(_) => {
                issues.push(issue("expires_at", "in_the_past", "must be in the future"));
                None
            }
            Err(_) => {
                issues.push(issue("expires_at", "invalid", "must be an RFC 3339 time"));
                None
            }
        },
    };
    if !issues.is_empty() {
        return Err(ApiError::validation(issues));
    }
    // A restricted key cannot mint more than it holds.
    within_own_scopes(call, scopes.as_deref(), "create")?;
    let key = new_key(mode);
    let new = NewApiKey {
        account_id: call.auth.account_id,
        mode,
        key_hash: key.hash(),
        start: key.start(),
        last4: key.last4(),
        name,
        scopes,
        expires_at,
    };
    let id = call.state.store.create_api_key(new, now).await?;
    let info = call
        .state
        .store
        .get_api_key(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::internal("a key just created is missing"))?;
    Ok(render_key(&info, Some(key.reveal().to_owned())))
}

pub async fn list_keys(call: &Call, page: PageRequest) -> Result<Page<ApiKeyInfo>, ApiError> {
    Ok(call
        .state
        .store
        .list_api_keys(call.auth.account_id, page)
        .await?)
}

pub async fn get_key(call: &Call, id: i64) -> Result<ApiKeyInfo, ApiError> {
    call.state
        .store
        .get_api_key(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))
}

/// Rolls key `id`: a new key with the same scopes, name, expiry and rate-limit identity; the
/// old one works for `grace_secs` more. Every instance re-reads the old key at once.
pub async fn roll_key(call: &Call, id: i64, req: api::RollApiKey) -> Result<api::ApiKey, ApiError> {
    let grace = req.grace_secs.unwrap_or(86_400);
    if grace > MAX_GRACE_SECS {
        return Err(ApiError::validation(vec![issue(
            "grace_secs",
            "out_of_range",
            format!("must be from 0 to {MAX_GRACE_SECS}"),
        )]));
    }
    let old = get_key(call, id).await?;
    // Rolling hands out a key with the old one's scopes: a restricted key may only roll keys
    // that hold no more than it does.
    within_own_scopes(call, old.scopes.as_deref(), "roll")?;
    let now = call.state.clock.now();
    let key = new_key(old.mode);
    let new = NewApiKey {
        account_id: call.auth.account_id,
        mode: old.mode,
        key_hash: key.hash(),
        start: key.start(),
        last4: key.last4(),
        name: String::new(),
        scopes: None,
        expires_at: None,
    };
    let grace_ms = i64::try_from(grace * 1000).unwrap_or(i64::MAX);
    let info = call
        .state
        .store
        .roll_api_key(
            call.auth.account_id,
            id,
            new,
            Timestamp(now.0 + grace_ms),
            now,
        )
        .await
        .map_err(|e| match e {
            bursar_storage::StorageError::NotFound => ApiError::new(
                bursar_api::ErrorCode::InvalidState,
                "Only a live key (not revoked, not expired) can be rolled.",
            ),
            other => other.into(),
        })?;
    invalidate(call, id, grace == 0).await;
    Ok(render_key(&info, Some(key.reveal().to_owned())))
}

/// Revokes key `id`. Returns only after the commit and the broadcast to other instances.
pub async fn revoke_key(call: &Call, id: i64) -> Result<api::ApiKey, ApiError> {
    let now = call.state.clock.now();
    let info = call
        .state
        .store
        .revoke_api_key(call.auth.account_id, id, now)
        .await
        .map_err(|e| match e {
            bursar_storage::StorageError::NotFound => ApiError::not_found("API key"),
            other => other.into(),
        })?;
    invalidate(call, id, true).await;
    Ok(render_key(&info, None))
}

async fn invalidate(call: &Call, id: i64, revoked: bool) {
    let product = &call.state.product;
    product.invalidate_local(&call.state.keys, id, revoked);
    product.publish_invalidation(id, revoked).await;
}

/// Which dimensions `GET /api/usage` groups by.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupBy {
    pub day: bool,
    pub key: bool,
    pub class: bool,
}

/// A usage group: day, key and route class, each `None` when not grouped by.
type GroupKey = (Option<i64>, Option<i64>, Option<String>);

/// Usage in days `[from, to)`, after writing this instance's pending counts.
pub async fn usage(
    call: &Call,
    from: Option<Timestamp>,
    to: Option<Timestamp>,
    group: GroupBy,
) -> Result<api::Usage, ApiError> {
    let now = call.state.clock.now();
    let from = day_of(from.unwrap_or(Period::month_of(now).start));
    let to = to.map_or(Timestamp(day_of(now).0 + DAY_MS), day_of);
    if to <= from {
        return Err(ApiError::validation(vec![issue(
            "to",
            "invalid",
            "must be after from",
        )]));
    }
    let rows = current_usage(call, from, to).await?;
    let mut groups: BTreeMap<GroupKey, i64> = BTreeMap::new();
    for r in &rows {
        let slot = (
            group.day.then_some(r.day.0),
            group.key.then_some(r.key_id),
            group.class.then(|| r.route_class.clone()),
        );
        *groups.entry(slot).or_default() += r.requests;
    }
    let total = rows.iter().map(|r| r.requests).sum();
    let names = [
        ("day", group.day),
        ("key", group.key),
        ("route_class", group.class),
    ];
    Ok(api::Usage {
        object: "usage".into(),
        from: date(from),
        to: date(to),
        group_by: names
            .iter()
            .filter(|n| n.1)
            .map(|n| n.0.to_owned())
            .collect(),
        total,
        data: groups
            .into_iter()
            .map(|((day, key_id, route_class), requests)| api::UsageGroup {
                day: day.map(|d| date(Timestamp(d))),
                key_id,
                route_class,
                requests,
            })
            .collect(),
    })
}

async fn current_usage(
    call: &Call,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<UsageRow>, ApiError> {
    let store = call.state.store.as_ref();
    call.state.product.meter.flush(store).await?;
    Ok(store.usage(call.auth.account_id, from, to).await?)
}

/// `YYYY-MM-DD` of a UTC midnight.
fn date(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// The current period's invoice as it stands: the plan's fee plus priced usage.
pub async fn upcoming_invoice(call: &Call) -> Result<api::Invoice, ApiError> {
    let now = call.state.clock.now();
    let period = Period::month_of(now);
    let (name, plan) = call.state.config.plan(call.auth.plan.as_deref());
    let currency = Currency::from_code(&plan.currency)
        .ok_or_else(|| ApiError::internal("a plan's currency was validated at start"))?;
    let rows = current_usage(call, period.start, period.end).await?;
    let units: i64 = rows.iter().map(|r| r.requests).sum();
    let scale = Decimal::from(10_i64.pow(u32::from(currency.minor_units())));
    let fee_minor = i64::try_from((plan.base_fee * scale).trunc())
        .map_err(|_| ApiError::internal("plan fee out of range"))?;
    let mut lines = vec![api::InvoiceLine {
        description: format!("Plan {name}"),
        units: None,
        unit_amount: None,
        amount: decimal_string(fee_minor, currency),
    }];
    let mut total = fee_minor;
    if let Some(price) = &plan.price {
        let priced = price
            .price(u64::try_from(units).unwrap_or(0), currency)
            .map_err(|e| ApiError::internal(format!("pricing failed: {e}")))?;
        for l in &priced.lines {
            let range = match l.up_to {
                Some(up) => format!("{}–{up}", l.from),
                None => format!("{} and above", l.from),
            };
            lines.push(api::InvoiceLine {
                description: format!("Requests {range} ({})", price.mode.as_str()),
                units: Some(l.units),
                unit_amount: Some(l.unit_amount.normalize().to_string()),
                amount: decimal_string(l.amount_minor, currency),
            });
        }
        total = total
            .checked_add(priced.total_minor)
            .ok_or_else(|| ApiError::internal("invoice total out of range"))?;
    }
    Ok(api::Invoice {
        object: "invoice".into(),
        status: "upcoming".into(),
        plan: name.to_owned(),
        currency: currency.code().to_owned(),
        period_start: time(period.start),
        period_end: time(period.end),
        units,
        included_units: plan.price.as_ref().map_or(0, |p| p.included_units),
        pricing: plan.price.as_ref().map(|p| p.mode.as_str().to_owned()),
        lines,
        total: decimal_string(total, currency),
    })
}

/// 403 unless the caller's key holds every scope of `scopes` (`None`: full access, which only
/// a full-access key holds), so a restricted key can never `verb` a key wider than itself.
fn within_own_scopes(call: &Call, scopes: Option<&[Scope]>, verb: &str) -> Result<(), ApiError> {
    let Some(held) = call.auth.scopes.as_deref() else {
        return Ok(());
    };
    let wider = scopes.is_none_or(|wanted| wanted.iter().any(|w| !Scope::allows(Some(held), *w)));
    if wider {
        return Err(ApiError::new(
            bursar_api::ErrorCode::InsufficientPermissions,
            format!("A restricted key can only {verb} keys within its own scopes."),
        ));
    }
    Ok(())
}
