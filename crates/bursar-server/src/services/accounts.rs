//! Accounts and API keys: first-start bootstrap and the admin commands.

use bursar_domain::Clock;
use bursar_domain::apikey::{BASE62, KeyMode, ParsedKey, RANDOM_CHARS};
use bursar_storage::{Account, NewApiKey, Storage, StorageError};
use rand::RngExt;

/// Name of the account created on the first start of an empty database.
pub const DEFAULT_ACCOUNT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no account named or numbered {0:?}")]
    UnknownAccount(String),
    #[error("an account named {0:?} already exists")]
    AccountExists(String),
    #[error("account names are 1-100 characters without control characters")]
    InvalidName,
    #[error("no plan named {0:?} in the configuration")]
    UnknownPlan(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Draws a new key from the thread-local CSPRNG. Only the hash is stored; the caller shows
/// the returned secret once.
pub fn new_key(mode: KeyMode) -> ParsedKey {
    let mut rng = rand::rng();
    let random: String = (0..RANDOM_CHARS)
        .map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())]))
        .collect();
    ParsedKey::assemble(mode, &random).expect("30 base62 characters form a valid key")
}

pub async fn create_account(
    store: &dyn Storage,
    clock: &dyn Clock,
    name: &str,
) -> Result<Account, AdminError> {
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AdminError::InvalidName);
    }
    store
        .create_account(name, clock.now())
        .await
        .map_err(|e| match e {
            StorageError::Conflict => AdminError::AccountExists(name.to_owned()),
            other => other.into(),
        })
}

/// Issues a key for the account named or numbered `account`; returns the secret.
pub async fn create_key(
    store: &dyn Storage,
    clock: &dyn Clock,
    account: &str,
    mode: KeyMode,
) -> Result<String, AdminError> {
    let acct = store
        .find_account(account)
        .await?
        .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
    let key = new_key(mode);
    let record = NewApiKey {
        account_id: acct.id,
        mode,
        key_hash: key.hash(),
        start: key.start(),
        last4: key.last4(),
        name: "admin".into(),
        scopes: None,
        expires_at: None,
    };
    store.create_api_key(record, clock.now()).await?;
    Ok(key.reveal().to_owned())
}

/// On an empty database, creates the default account and its first (test-mode) key and
/// returns the key to print once. Two processes starting together on one database race
/// safely: the account name is unique, and the loser prints nothing.
pub async fn bootstrap(
    store: &dyn Storage,
    clock: &dyn Clock,
) -> Result<Option<String>, AdminError> {
    if store.count_accounts().await? > 0 {
        return Ok(None);
    }
    match create_account(store, clock, DEFAULT_ACCOUNT).await {
        Ok(_) => {}
        Err(AdminError::AccountExists(_)) => return Ok(None),
        Err(e) => return Err(e),
    }
    create_key(store, clock, DEFAULT_ACCOUNT, KeyMode::Test)
        .await
        .map(Some)
}

/// Puts `account` on `plan` (a `[plans]` name; `default` clears it back to the configured
/// default). Returns the plan now in force.
pub async fn set_plan(
    store: &dyn Storage,
    config: &crate::Config,
    account: &str,
    plan: &str,
) -> Result<String, AdminError> {
    let acct = store
        .find_account(account)
        .await?
        .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
    if !config.plans.contains_key(plan) {
        return Err(AdminError::UnknownPlan(plan.to_owned()));
    }
    let stored = (plan != config.limits.default_plan).then_some(plan);
    store.set_account_plan(acct.id, stored).await?;
    Ok(plan.to_owned())
}
