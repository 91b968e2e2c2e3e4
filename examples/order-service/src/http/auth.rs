//! Authentication: the only code that sets the tenant.
//!
//! A static token table maps bearer tokens to tenants. A missing, malformed or unknown token
//! gets `401` with a JSON error; a known one binds [`TENANT`] for the rest of the request.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::Response,
};
use tracing::info;

use super::ApiError;
use crate::context::{TenantId, TENANT};

/// The demo's tokens: `(token, tenant)`.
pub const DEMO_TOKENS: [(&str, &str); 3] = [
    ("token-acme", "acme"),
    ("token-globex", "globex"),
    ("token-initech", "initech"),
];

/// Bearer token to tenant.
#[derive(Clone, Debug)]
pub struct TokenTable(Arc<HashMap<String, TenantId>>);

impl TokenTable {
    /// A table from `(token, tenant)` pairs.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        TokenTable(Arc::new(
            pairs
                .into_iter()
                .map(|(token, tenant)| (token.to_string(), TenantId::new(tenant)))
                .collect(),
        ))
    }

    /// The table of [`DEMO_TOKENS`].
    pub fn demo() -> Self {
        TokenTable::new(DEMO_TOKENS)
    }

    /// The tenant `token` belongs to.
    pub fn tenant(&self, token: &str) -> Option<&TenantId> {
        self.0.get(token)
    }

    /// Every tenant in the table.
    pub fn tenants(&self) -> Vec<TenantId> {
        let mut tenants: Vec<TenantId> = self.0.values().cloned().collect();
        tenants.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        tenants.dedup();
        tenants
    }
}

/// Checks `Authorization: Bearer <token>` and runs the rest of the request as its tenant.
///
/// # Errors
/// `401` JSON error when the header is missing, malformed or names no tenant.
pub async fn authenticate(
    State(tokens): State<TokenTable>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let span = tracing::info_span!("auth");
    let tenant = span.in_scope(|| {
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("malformed authorization header"))?;
        tokens
            .tenant(token)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("unknown token"))
    })?;
    let handle = async move {
        // Logged inside the scope: the line's own tenant field shows who was authenticated.
        span.in_scope(|| info!("authenticated"));
        next.run(req).await
    };
    Ok(TENANT.scope(tenant, handle).await)
}
