//! Authentication: the only code that sets the tenant.
//!
//! A static token table maps bearer tokens to tenants. A missing, malformed or unknown token
//! gets `401` with a JSON error; a known one binds [`TENANT`] for the rest of the request.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{header::AUTHORIZATION, HeaderMap, StatusCode},
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

/// Bearer token to tenant. Its `Debug` shows the tenants only: tokens are secrets.
#[derive(Clone)]
pub struct TokenTable(Arc<HashMap<String, TenantId>>);

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTable")
            .field("tokens", &self.0.len())
            .field("tenants", &self.tenants())
            .finish()
    }
}

impl TokenTable {
    /// A table from `(token, tenant)` pairs.
    ///
    /// # Panics
    ///
    /// When a token is listed twice: one tenant's clients would be served as the other's.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut table = HashMap::new();
        for (token, tenant) in pairs {
            let previous = table.insert(token.to_string(), TenantId::new(tenant));
            assert!(
                previous.is_none(),
                "a token is listed twice in the token table (tenants {:?} and {tenant:?})",
                previous.as_ref().map(TenantId::as_str).unwrap_or_default()
            );
        }
        TokenTable(Arc::new(table))
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
/// `401` JSON error when the header is missing, malformed or names no tenant; `400` when it is
/// repeated (which one would count is ambiguous, so neither does).
pub async fn authenticate(
    State(tokens): State<TokenTable>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let span = tracing::info_span!("auth");
    let tenant = span.in_scope(|| tenant_of(&tokens, req.headers()))?;
    let handle = async move {
        // Logged inside the scope: the line's own tenant field shows who was authenticated.
        span.in_scope(|| info!("authenticated"));
        next.run(req).await
    };
    Ok(TENANT.scope(tenant, handle).await)
}

/// The tenant of the request's one `Authorization: Bearer <token>` header. The scheme is
/// case-insensitive (RFC 7235); the token is what follows the spaces after it.
fn tenant_of(tokens: &TokenTable, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let header = values
        .next()
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    if values.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "more than one authorization header",
        ));
    }
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_matches(' '))
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::unauthorized("malformed authorization header"))?;
    tokens
        .tenant(token)
        .cloned()
        .ok_or_else(|| ApiError::unauthorized("unknown token"))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn tenant(values: &[&[u8]]) -> Result<String, (StatusCode, String)> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
        }
        tenant_of(&TokenTable::demo(), &headers)
            .map(|t| t.to_string())
            .map_err(|e| (e.status(), e.message().to_owned()))
    }

    #[test]
    fn debug_shows_no_token() {
        let shown = format!("{:?}", TokenTable::demo());
        assert!(!shown.contains("token-"), "{shown}");
        assert!(shown.contains("acme"), "{shown}");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in [
            &b"Bearer token-acme"[..],
            b"bearer token-acme",
            b"BEARER token-acme",
            b"bEaReR   token-acme  ",
        ] {
            assert_eq!(tenant(&[value]).as_deref(), Ok("acme"), "{value:?}");
        }
    }

    #[test]
    fn malformed_missing_unknown_and_repeated_headers_are_refused() {
        let unauthorized = |why: &str| Err((StatusCode::UNAUTHORIZED, why.to_owned()));
        assert_eq!(tenant(&[]), unauthorized("missing bearer token"));
        for value in [
            &b"Basic dG9rZW4tYWNtZQ=="[..],
            b"Bearer",
            b"Bearer ",
            b"Bearertoken-acme",
            b"token-acme",
            b"Bearer \xfftoken",
            b"Bearer\ttoken-acme",
        ] {
            assert_eq!(
                tenant(&[value]),
                unauthorized("malformed authorization header"),
                "{value:?}"
            );
        }
        assert_eq!(
            tenant(&[b"Bearer token-nobody"]),
            unauthorized("unknown token")
        );
        assert_eq!(
            tenant(&[b"Bearer token-acme", b"Bearer token-globex"]),
            Err((
                StatusCode::BAD_REQUEST,
                "more than one authorization header".to_owned()
            )),
            "a repeated header is refused, even when one of them is valid"
        );
    }

    /// Review finding: a token listed for two tenants was silently given to the last one.
    #[test]
    #[should_panic(expected = "a token is listed twice")]
    fn a_token_listed_twice_is_refused() {
        TokenTable::new([("t", "acme"), ("t", "globex")]);
    }
}
