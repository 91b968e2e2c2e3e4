//! The request id: one opaque id per request, echoed back and forwarded to other services.
//!
//! An incoming `x-request-id` is honoured only when it is 1 to 128 bytes of visible ASCII
//! (`0x21..=0x7e`): anything longer, empty, or holding spaces, control characters or non-ASCII
//! bytes is replaced by a new UUID v4, so a client cannot push megabytes, terminal escapes or
//! log-forging newlines through it.

use std::{fmt, str::FromStr};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::rand;

/// The name of the request id header.
///
/// ```
/// assert_eq!(contextflow_http::X_REQUEST_ID, "x-request-id");
/// ```
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id accepted, in bytes.
const MAX_LEN: usize = 128;

/// A validated request id: 1 to 128 bytes of visible ASCII. Cheap to clone.
///
/// ```
/// use contextflow_http::RequestId;
///
/// let id: RequestId = "req-42".parse()?;
/// assert_eq!(id.as_str(), "req-42");
/// assert!("two words".parse::<RequestId>().is_err());
/// assert_eq!(RequestId::new().as_str().len(), 36, "a hyphenated UUID v4");
/// # Ok::<(), contextflow_http::InvalidRequestId>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

/// Why a request id was rejected.
///
/// The message names the rule that failed, never the rejected value, so it is safe to log.
///
/// ```
/// use contextflow_http::RequestId;
/// let err = "".parse::<RequestId>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid request id: empty");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidRequestId {
    reason: &'static str,
}

// ===== impl RequestId =====

impl RequestId {
    /// A new random request id: a lower-case hyphenated UUID v4.
    ///
    /// ```
    /// use contextflow_http::RequestId;
    /// let id = RequestId::new();
    /// assert_eq!(uuid::Uuid::parse_str(id.as_str()).unwrap().get_version_num(), 4);
    /// assert_ne!(id, RequestId::new());
    /// ```
    #[allow(clippy::new_without_default)] // a `Default` that is random each time would surprise
    pub fn new() -> Self {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&rand::next_u64().to_ne_bytes());
        bytes[8..].copy_from_slice(&rand::next_u64().to_ne_bytes());
        let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = uuid.hyphenated().encode_lower(&mut buf);
        // A hyphenated UUID is 36 visible ASCII characters, so this cannot fail.
        RequestId(HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-")))
    }

    /// Checks a header value: 1 to 128 bytes, each visible ASCII (`0x21..=0x7e`).
    ///
    /// # Errors
    ///
    /// When the value is empty, too long, or holds any other byte.
    ///
    /// ```
    /// use contextflow_http::RequestId;
    /// use http::HeaderValue;
    /// assert!(RequestId::from_header_value(&HeaderValue::from_static("abc")).is_ok());
    /// assert!(RequestId::from_header_value(&HeaderValue::from_bytes(b"caf\xc3\xa9")?).is_err());
    /// # Ok::<(), http::header::InvalidHeaderValue>(())
    /// ```
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, InvalidRequestId> {
        validate(value.as_bytes())?;
        Ok(RequestId(value.clone()))
    }

    /// Reads the `x-request-id` of a request: `Ok(None)` when there is none.
    ///
    /// # Errors
    ///
    /// When the value is invalid, or when there is more than one `x-request-id` header.
    ///
    /// ```
    /// use contextflow_http::RequestId;
    /// use http::HeaderMap;
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(RequestId::from_headers(&headers), Ok(None));
    /// headers.insert("x-request-id", "r-1".parse()?);
    /// assert_eq!(RequestId::from_headers(&headers)?.unwrap().as_str(), "r-1");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, InvalidRequestId> {
        let mut values = headers.get_all(X_REQUEST_ID).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(InvalidRequestId::new("more than one header"));
        }
        RequestId::from_header_value(first).map(Some)
    }

    /// The id as text.
    ///
    /// ```
    /// use contextflow_http::RequestId;
    /// assert_eq!("abc".parse::<RequestId>()?.as_str(), "abc");
    /// # Ok::<(), contextflow_http::InvalidRequestId>(())
    /// ```
    pub fn as_str(&self) -> &str {
        // Validated as visible ASCII on construction, so `to_str` cannot fail.
        self.0.to_str().unwrap_or_default()
    }

    /// The id as a header value.
    ///
    /// ```
    /// use contextflow_http::RequestId;
    /// assert_eq!(*"abc".parse::<RequestId>()?.header_value(), "abc");
    /// # Ok::<(), contextflow_http::InvalidRequestId>(())
    /// ```
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl FromStr for RequestId {
    type Err = InvalidRequestId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        validate(s.as_bytes())?;
        HeaderValue::from_str(s)
            .map(RequestId)
            .map_err(|_| InvalidRequestId::new("not a header value"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

// ===== impl InvalidRequestId =====

impl InvalidRequestId {
    const fn new(reason: &'static str) -> Self {
        InvalidRequestId { reason }
    }
}

impl fmt::Display for InvalidRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid request id: {}", self.reason)
    }
}

impl std::error::Error for InvalidRequestId {}

fn validate(bytes: &[u8]) -> Result<(), InvalidRequestId> {
    if bytes.is_empty() {
        Err(InvalidRequestId::new("empty"))
    } else if bytes.len() > MAX_LEN {
        Err(InvalidRequestId::new("longer than 128 bytes"))
    } else if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        Err(InvalidRequestId::new("not visible ASCII"))
    } else {
        Ok(())
    }
}
