//! The payment provider: a client that carries the trace to it, and a small in-process stub
//! of it (its own axum server on 127.0.0.1) so the service runs with no set-up.
//!
//! The outgoing request carries the context across the process boundary the W3C way, written
//! by `contextflow-http`'s reqwest middleware: a `traceparent` naming this hop as parent (same
//! trace id, fresh span id) and the `x-request-id`. Nothing else crosses: the tenant stays
//! home, and the stub does not learn it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Json, Router,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn, Instrument as _};

use contextflow_http::{InjectContextMiddleware, PropagateContextLayer};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};

use crate::http::payment_request_span;

/// Calls the payment provider.
#[derive(Clone, Debug)]
pub struct PaymentClient {
    http: ClientWithMiddleware,
    url: String,
}

/// Why a payment did not go through.
#[derive(Debug, PartialEq, Eq)]
pub enum PaymentError {
    /// The provider declined it.
    Declined,
    /// The provider refused the request itself (a `4xx` other than `402`, `408`, `409` and
    /// `429`: a bad request, bad credentials): this call charged nothing, but an earlier call
    /// with the same key may have (its answer lost), so only a first call may take it for a
    /// decline.
    Refused(u16),
    /// The provider could not be reached or answered nonsense.
    Unavailable(String),
}

/// The idempotency key of the charge of the order `reference` of `tenant`: what names the
/// order for its client, unique per tenant. Not the order's id: ids start again with a new
/// database (a restored backup, a fresh schema), and a provider that keeps its keys would
/// answer a new order with an old order's payment, charging nothing. The tenant is written in
/// hex: the key is ASCII (a header value) whatever the tenant's name, and no two (tenant,
/// reference) pairs give one key (hex has no `-`). A tenant name too long for the key to stay
/// within the provider's 128 bytes is written as `h` and 32 hex digits of its SHA-256 instead
/// (`h` is no hex digit: the two forms never meet). Stored on the order row when it is
/// placed: the resolver asks again with the key the first call used.
///
/// ```
/// use order_service::payment::idempotency_key;
/// assert_eq!(idempotency_key("acme", "ord-7"), "order-61636d65-ord-7");
/// assert_ne!(idempotency_key("acme", "eu-7"), idempotency_key("acme-eu", "7"));
/// assert!(idempotency_key("müller", "r-1").is_ascii());
/// let long = idempotency_key(&"t".repeat(40), &"r".repeat(64));
/// assert!(long.starts_with("order-h") && long.len() <= 128);
/// ```
pub fn idempotency_key(tenant: &str, reference: &str) -> String {
    use std::fmt::Write as _;
    const HEX_BUDGET: usize = 128 - "order-".len() - 1 - 64;
    let mut key = String::with_capacity(6 + 2 * tenant.len().min(32) + 1 + reference.len());
    key.push_str("order-");
    if 2 * tenant.len() <= HEX_BUDGET {
        for b in tenant.bytes() {
            let _ = write!(key, "{b:02x}");
        }
    } else {
        use sha2::Digest as _;
        key.push('h');
        for b in &sha2::Sha256::digest(tenant.as_bytes())[..16] {
            let _ = write!(key, "{b:02x}");
        }
    }
    key.push('-');
    key.push_str(reference);
    key
}

/// The body of `POST /payments`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PaymentRequest {
    /// The order's reference.
    pub reference: String,
    /// The amount to charge, in cents.
    pub amount_cents: i64,
}

/// The stub's answer to an authorized payment.
#[derive(Debug, Serialize, Deserialize)]
pub struct PaymentResponse {
    /// The provider's id for the payment.
    pub payment_id: String,
}

/// How long a connection to the provider may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long one call to the provider may take, answer included.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

// ===== impl PaymentClient =====

impl PaymentClient {
    /// A client for the provider at `base_url` (`http://127.0.0.1:port`). Each call is a
    /// client span of OpenTelemetry's global provider (none when no SDK is installed).
    pub fn new(base_url: &str) -> Self {
        PaymentClient {
            http: ClientBuilder::new(
                // Bounded: a provider that accepts the connection and never answers must not
                // hold a request (or the resolver, which asks about pending orders one after
                // the other, and the outbox deliveries behind it) forever. A call that times out
                // is `Unavailable`: the order stays pending for the resolver.
                reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .build()
                    .expect("a plain HTTP client builds"),
            )
            .with(InjectContextMiddleware::new().with_global_tracer())
            .build(),
            url: format!("{base_url}/payments"),
        }
    }

    /// Authorizes `amount_cents` for the order `reference`; returns the provider's payment id.
    /// `key` (the `idempotency-key` header) names the charge: the provider charges a key at
    /// most once and answers a repeated key with the same payment, so a retry after a lost
    /// answer or a crash never charges twice.
    ///
    /// # Errors
    /// [`PaymentError::Declined`] when declined (`402`); [`PaymentError::Refused`] for another
    /// `4xx` but `408`, `409` and `429` (the provider refused the request and this call charged
    /// nothing); [`PaymentError::Unavailable`]
    /// when the provider cannot be reached, does not answer within 10 s, or fails (the charge may or may not have happened: retry
    /// with the same key to find out).
    pub async fn authorize(
        &self,
        key: &str,
        reference: &str,
        amount_cents: i64,
    ) -> Result<String, PaymentError> {
        let span = tracing::info_span!("http.client", peer = "payment", method = "POST");
        async {
            // No header set by hand: the middleware writes `traceparent` and `x-request-id`.
            let request =
                self.http
                    .post(&self.url)
                    .header(IDEMPOTENCY_KEY, key)
                    .json(&PaymentRequest {
                        reference: reference.to_owned(),
                        amount_cents,
                    });
            debug!(amount_cents, "calling payment provider");
            let response = request
                .send()
                .await
                .map_err(|e| PaymentError::Unavailable(e.without_url().to_string()))?;
            let status = response.status();
            // The stub's own "payment authorized" line says a success; anything else is news.
            if status == StatusCode::OK {
                debug!(status = status.as_u16(), "payment provider answered");
            } else {
                info!(status = status.as_u16(), "payment provider answered");
            }
            match status {
                StatusCode::OK => response
                    .json::<PaymentResponse>()
                    .await
                    .map(|r| r.payment_id)
                    .map_err(|e| PaymentError::Unavailable(e.without_url().to_string())),
                StatusCode::PAYMENT_REQUIRED => Err(PaymentError::Declined),
                // The provider refused the request itself (this call charged nothing): the
                // caller decides what that means (see `PaymentError::Refused`). A timeout or
                // rate limit (408, 429) is worth asking again, and so is 409: a request with
                // the same idempotency key still in progress (another resolver, a retry), whose
                // own answer may be a charge.
                other
                    if other.is_client_error()
                        && other != StatusCode::REQUEST_TIMEOUT
                        && other != StatusCode::TOO_MANY_REQUESTS
                        && other != StatusCode::CONFLICT =>
                {
                    Err(PaymentError::Refused(other.as_u16()))
                }
                other => Err(PaymentError::Unavailable(format!("status {other}"))),
            }
        }
        .instrument(span)
        .await
    }
}

impl std::fmt::Display for PaymentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PaymentError::Declined => f.write_str("payment declined"),
            PaymentError::Refused(status) => {
                write!(f, "payment provider refused the request (status {status})")
            }
            PaymentError::Unavailable(why) => write!(f, "payment provider unavailable: {why}"),
        }
    }
}

impl std::error::Error for PaymentError {}

/// The header that names a charge.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The stub's state: which keys it charged, and for which amount. Clones share it, so a test
/// can keep a stub alive across a restart of the service.
#[derive(Clone, Debug, Default)]
pub struct Stub {
    charges: Arc<Mutex<HashMap<String, Charge>>>,
}

/// One charge of the stub: its payment, and the amount asked for (`None` for a charge a test
/// made directly, which any amount matches).
#[derive(Clone, Debug)]
struct Charge {
    payment_id: String,
    amount_cents: Option<i64>,
}

impl Stub {
    /// A stub that has charged nothing.
    pub fn new() -> Self {
        Stub::default()
    }

    /// The router: `POST /payments` authorizes everything except references starting with
    /// `decline` (`402 Payment Required`); a request without an `idempotency-key` is a `400`;
    /// a key charged before answers that charge's payment, unless the request asks for
    /// another amount (`422`, as real providers refuse a key reused with other parameters):
    /// the same tenant and reference in a restored or second database is another order, and
    /// must not be taken for paid by the first one's charge.
    pub fn router(&self) -> Router {
        self.router_with(PropagateContextLayer::new())
    }

    /// [`Stub::router`] whose server spans are `tracer`'s (the stub's own `service.name`).
    pub fn router_with_tracer<T>(&self, tracer: T) -> Router
    where
        T: opentelemetry::trace::Tracer + Send + Sync + 'static,
        T::Span: Send + Sync + 'static,
    {
        self.router_with(PropagateContextLayer::new().with_tracer(tracer))
    }

    fn router_with(&self, layer: PropagateContextLayer) -> Router {
        Router::new()
            .route("/payments", post(authorize))
            .with_state(self.clone())
            .layer(axum::middleware::from_fn(payment_request_span))
            .layer(layer)
    }

    /// Charges `key` once: the payment made for it before, or a new one.
    pub fn charge(&self, key: &str) -> String {
        self.lock()
            .entry(key.to_owned())
            .or_insert_with(|| Charge {
                payment_id: format!("pay_{}", uuid::Uuid::new_v4().simple()),
                amount_cents: None,
            })
            .payment_id
            .clone()
    }

    /// How many distinct charges were made.
    pub fn charges(&self) -> usize {
        self.lock().len()
    }

    /// The payment made for `key`, if any.
    pub fn payment(&self, key: &str) -> Option<String> {
        self.lock().get(key).map(|charge| charge.payment_id.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Charge>> {
        // Only `insert` and `get` run under the lock: a panic cannot leave it half-changed.
        self.charges.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stub with no charges yet, as a router (the service's default provider).
pub fn stub_router() -> Router {
    Stub::new().router()
}

async fn authorize(
    State(stub): State<Stub>,
    headers: HeaderMap,
    Json(req): Json<PaymentRequest>,
) -> Result<Json<PaymentResponse>, StatusCode> {
    let Some(key) = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 128)
    else {
        warn!("payment request without an idempotency key");
        return Err(StatusCode::BAD_REQUEST);
    };
    if req.reference.starts_with("decline") {
        warn!(reference = %req.reference, amount_cents = req.amount_cents, "payment declined");
        return Err(StatusCode::PAYMENT_REQUIRED);
    }
    let mut charges = stub.lock();
    if let Some(charge) = charges.get(key) {
        if charge
            .amount_cents
            .is_some_and(|amount| amount != req.amount_cents)
        {
            warn!(
                reference = %req.reference,
                amount_cents = req.amount_cents,
                "idempotency key reused with another amount: refused"
            );
            return Err(StatusCode::UNPROCESSABLE_ENTITY);
        }
        let payment_id = &charge.payment_id;
        info!(reference = %req.reference, payment_id, "payment already authorized for this key");
        return Ok(Json(PaymentResponse {
            payment_id: payment_id.clone(),
        }));
    }
    let payment_id = format!("pay_{}", uuid::Uuid::new_v4().simple());
    charges.insert(
        key.to_owned(),
        Charge {
            payment_id: payment_id.clone(),
            amount_cents: Some(req.amount_cents),
        },
    );
    drop(charges);
    info!(reference = %req.reference, amount_cents = req.amount_cents, payment_id, "payment authorized");
    Ok(Json(PaymentResponse { payment_id }))
}
