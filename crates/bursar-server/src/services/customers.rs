//! Customer use cases.

use bursar_api::{CreateCustomer, UpdateCustomer};
use bursar_storage::{Customer, CustomerPatch, NewCustomer, Page, PageRequest};

use super::{Call, check_metadata, check_text, finish, resolve_precondition};
use crate::http::error::{ApiError, issue};
use crate::http::extract::IfMatch;

const NAME_MAX: usize = 200;
const EMAIL_MAX: usize = 254;

fn check_email(issues: &mut Vec<bursar_api::FieldIssue>, email: &Option<String>) {
    check_text(issues, "email", email, EMAIL_MAX);
    if let Some(e) = email {
        let plausible = e
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            && !e.chars().any(|c| c.is_whitespace() || c.is_control());
        if !plausible {
            issues.push(issue(
                "email",
                "invalid_email",
                "must look like name@example.com",
            ));
        }
    }
}

pub async fn create(call: &Call, req: CreateCustomer) -> Result<Customer, ApiError> {
    let mut issues = Vec::new();
    check_text(&mut issues, "name", &req.name, NAME_MAX);
    check_email(&mut issues, &req.email);
    let metadata = check_metadata(&mut issues, req.metadata);
    finish(issues)?;
    let new = NewCustomer {
        name: req.name,
        email: req.email,
        metadata: metadata.unwrap_or_default(),
    };
    Ok(call
        .state
        .store
        .create_customer(&call.write_meta(), new)
        .await?)
}

pub async fn get(call: &Call, id: i64) -> Result<Customer, ApiError> {
    call.state
        .store
        .get_customer(call.auth.account_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))
}

pub async fn list(call: &Call, page: PageRequest) -> Result<Page<Customer>, ApiError> {
    Ok(call
        .state
        .store
        .list_customers(call.auth.account_id, page)
        .await?)
}

pub async fn update(
    call: &Call,
    id: i64,
    if_match: IfMatch,
    req: UpdateCustomer,
) -> Result<Customer, ApiError> {
    let mut issues = Vec::new();
    check_text(&mut issues, "name", &req.name, NAME_MAX);
    check_email(&mut issues, &req.email);
    let metadata = check_metadata(&mut issues, req.metadata);
    finish(issues)?;
    let expected = resolve_precondition(if_match, req.version, "customer", || async {
        let current = call
            .state
            .store
            .get_customer(call.auth.account_id, id)
            .await?;
        Ok(current.map(|c| c.version))
    })
    .await?;
    let patch = CustomerPatch {
        name: req.name,
        email: req.email,
        metadata,
    };
    call.state
        .store
        .update_customer(&call.write_meta(), id, expected, patch)
        .await
        .map_err(|e| match e {
            bursar_storage::StorageError::NotFound => ApiError::not_found("customer"),
            other => other.into(),
        })
}
