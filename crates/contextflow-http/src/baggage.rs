//! W3C Baggage: application-defined `key=value` pairs that travel with a request.
//!
//! A `baggage` header looks like `userId=alice,serverNode=DF%2028;region=eu`: a list of
//! members, each a token key, a percent-encoded value and optional `;`-separated properties.
//! Parsing is lenient, as the [W3C Baggage](https://www.w3.org/TR/baggage/) spec allows: a
//! member that breaks the grammar is dropped and the others are kept; nothing panics. At most
//! 180 members and 8,192 bytes (formatted) are kept; a member that does not fit is dropped
//! whole, never cut. A repeated key keeps its first position and its last value.
//!
//! Baggage is for infrastructure metadata (a deployment, a test run, a feature flag name).
//! It is sent by the client, so it is untrusted: never put a tenant or a user in it, and never
//! use it for an authorization decision.

use std::{fmt, str::FromStr};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::trace_context::trim_ows;

/// The name of the `baggage` header.
///
/// ```
/// assert_eq!(contextflow_http::BAGGAGE_HEADER, "baggage");
/// ```
pub const BAGGAGE_HEADER: HeaderName = HeaderName::from_static("baggage");

/// At most this many members.
const MAX_MEMBERS: usize = 180;
/// At most this many bytes in the formatted list.
const MAX_BYTES: usize = 8192;

/// A parsed `baggage` list (at most 180 members, at most 8,192 bytes once formatted).
///
/// ```
/// use contextflow_http::Baggage;
///
/// let mut baggage = Baggage::parse("userId=alice, serverNode=DF%2028;region=eu, bad key=1");
/// assert_eq!(baggage.get("serverNode"), Some("DF 28"));
/// assert_eq!(baggage.len(), 2, "the invalid member is dropped");
/// baggage.insert("deploy", "blue green")?;
/// assert_eq!(
///     baggage.to_string(),
///     "userId=alice,serverNode=DF%2028;region=eu,deploy=blue%20green"
/// );
/// # Ok::<(), contextflow_http::InvalidBaggage>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Baggage {
    members: Vec<BaggageMember>,
    /// The formatted length of `members`, kept up to date.
    len: usize,
}

/// One member of a [`Baggage`]: a key, a decoded value, and properties.
///
/// ```
/// use contextflow_http::Baggage;
///
/// let baggage = Baggage::parse("k=v%21;ttl=60;hidden");
/// let member = baggage.iter().next().unwrap();
/// assert_eq!((member.key(), member.value()), ("k", "v!"));
/// let props: Vec<_> = member.properties().collect();
/// assert_eq!(props, [("ttl", Some("60")), ("hidden", None)]);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BaggageMember {
    key: String,
    value: String,
    /// Normalized raw properties (`a=1;b`), without the leading `;`; empty when none.
    properties: String,
}

/// Why a baggage member could not be added.
///
/// ```
/// use contextflow_http::Baggage;
/// let err = Baggage::new().insert("no spaces", "x").unwrap_err();
/// assert_eq!(err.to_string(), "invalid baggage: key is not a token");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidBaggage {
    reason: &'static str,
}

// ===== impl Baggage =====

impl Baggage {
    /// An empty baggage.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert!(Baggage::new().is_empty());
    /// ```
    pub const fn new() -> Self {
        Baggage {
            members: Vec::new(),
            len: 0,
        }
    }

    /// Parses a `baggage` value, dropping invalid members.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse("a=1,=2,b=%ZZ").to_string(), "a=1,b=%25ZZ");
    /// ```
    pub fn parse(value: &str) -> Self {
        Baggage::parse_bytes(value.as_bytes())
    }

    /// Parses a `baggage` value given as bytes (a header value need not be UTF-8), dropping
    /// invalid members.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse_bytes(b"a=1,b=\xff").len(), 1);
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Self {
        let mut baggage = Baggage::new();
        baggage.append_bytes(value);
        baggage
    }

    /// Reads all the `baggage` headers of a request as one list, dropping invalid members.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// use http::HeaderMap;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.append("baggage", "a=1".parse()?);
    /// headers.append("baggage", "b=2".parse()?);
    /// assert_eq!(Baggage::from_headers(&headers).to_string(), "a=1,b=2");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Baggage::from_headers_counting(headers).0
    }

    /// As [`from_headers`](Baggage::from_headers), also returning how many members were dropped.
    pub(crate) fn from_headers_counting(headers: &HeaderMap) -> (Self, usize) {
        let mut baggage = Baggage::new();
        let mut dropped = 0;
        for value in headers.get_all(BAGGAGE_HEADER) {
            dropped += baggage.append_bytes(value.as_bytes());
        }
        (baggage, dropped)
    }

    /// The value of member `key`.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse("a=%F0%9F%A6%80").get("a"), Some("🦀"));
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        self.member(key).map(BaggageMember::value)
    }

    /// Member `key`, with its properties.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// let baggage = Baggage::parse("a=1;p");
    /// assert_eq!(baggage.member("a").unwrap().properties().count(), 1);
    /// ```
    pub fn member(&self, key: &str) -> Option<&BaggageMember> {
        self.members.iter().find(|m| m.key == key)
    }

    /// Sets member `key` to `value` (without properties), in place when the key exists,
    /// otherwise at the end.
    ///
    /// # Errors
    ///
    /// When `key` is not an HTTP token, or when the member would break the 180-member or
    /// 8,192-byte limit; the baggage is then unchanged.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// let mut baggage = Baggage::new();
    /// baggage.insert("env", "staging; eu")?;
    /// assert_eq!(baggage.to_string(), "env=staging%3B%20eu");
    /// assert!(baggage.insert("big", &"x".repeat(9000)).is_err());
    /// # Ok::<(), contextflow_http::InvalidBaggage>(())
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), InvalidBaggage> {
        if !is_token(key.as_bytes()) {
            return Err(InvalidBaggage::new("key is not a token"));
        }
        self.push(BaggageMember {
            key: key.to_owned(),
            value: value.to_owned(),
            properties: String::new(),
        })
    }

    /// Removes member `key` and returns its value.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// let mut baggage = Baggage::parse("a=1,b=2");
    /// assert_eq!(baggage.remove("a").as_deref(), Some("1"));
    /// assert_eq!(baggage.to_string(), "b=2");
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let index = self.members.iter().position(|m| m.key == key)?;
        let member = self.members.remove(index);
        self.len = self.formatted_len();
        Some(member.value)
    }

    /// The members, in order.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// let baggage = Baggage::parse("a=1,b=2");
    /// let keys: Vec<_> = baggage.iter().map(|m| m.key()).collect();
    /// assert_eq!(keys, ["a", "b"]);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = &BaggageMember> + '_ {
        self.members.iter()
    }

    /// The number of members.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse("a=1,a=2").len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert!(Baggage::parse(" , ").is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The list as a header value, or `None` when it is empty.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert!(Baggage::new().to_header_value().is_none());
    /// assert_eq!(Baggage::parse("a=1").to_header_value().unwrap(), "a=1");
    /// ```
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        if self.is_empty() {
            return None;
        }
        // Formatting percent-encodes everything but visible ASCII, so this cannot fail.
        HeaderValue::try_from(self.to_string()).ok()
    }

    /// Appends the valid members of `value`; returns how many were dropped.
    fn append_bytes(&mut self, value: &[u8]) -> usize {
        let mut dropped = 0;
        for raw in value.split(|&b| b == b',') {
            let raw = trim_ows(raw);
            if raw.is_empty() {
                continue;
            }
            let accepted = match parse_member(raw) {
                Some(member) => self.push(member).is_ok(),
                None => false,
            };
            dropped += usize::from(!accepted);
        }
        dropped
    }

    /// Adds `member` (replacing the value of an existing key) if the limits allow it.
    fn push(&mut self, member: BaggageMember) -> Result<(), InvalidBaggage> {
        let added = member.formatted_len();
        if let Some(index) = self.members.iter().position(|m| m.key == member.key) {
            let removed = self.members[index].formatted_len();
            if self.len - removed + added > MAX_BYTES {
                return Err(InvalidBaggage::new("more than 8192 bytes"));
            }
            self.members[index] = member;
            self.len = self.len - removed + added;
            return Ok(());
        }
        if self.members.len() == MAX_MEMBERS {
            return Err(InvalidBaggage::new("more than 180 members"));
        }
        let new_len = self.len + added + usize::from(!self.members.is_empty());
        if new_len > MAX_BYTES {
            return Err(InvalidBaggage::new("more than 8192 bytes"));
        }
        self.members.push(member);
        self.len = new_len;
        Ok(())
    }

    fn formatted_len(&self) -> usize {
        self.members
            .iter()
            .map(BaggageMember::formatted_len)
            .sum::<usize>()
            + self.members.len().saturating_sub(1)
    }
}

impl FromStr for Baggage {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Baggage::parse(s))
    }
}

impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{member}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.members).finish()
    }
}

// ===== impl BaggageMember =====

impl BaggageMember {
    /// The key.
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse("k=v").iter().next().unwrap().key(), "k");
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value, percent-decoded (invalid UTF-8 replaced by U+FFFD, as the spec says).
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// assert_eq!(Baggage::parse("k=%FF").get("k"), Some("\u{fffd}"));
    /// ```
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The properties, as `(key, value)` pairs in order (values as sent, not decoded).
    ///
    /// ```
    /// use contextflow_http::Baggage;
    /// let baggage = Baggage::parse("k=v ; a = 1 ;b");
    /// let member = baggage.member("k").unwrap();
    /// assert_eq!(member.properties().collect::<Vec<_>>(), [("a", Some("1")), ("b", None)]);
    /// ```
    pub fn properties(&self) -> impl Iterator<Item = (&str, Option<&str>)> + '_ {
        self.properties
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (p, None),
            })
    }

    fn formatted_len(&self) -> usize {
        let value: usize = self
            .value
            .bytes()
            .map(|b| if is_plain_octet(b) { 1 } else { 3 })
            .sum();
        let properties = if self.properties.is_empty() {
            0
        } else {
            1 + self.properties.len()
        };
        self.key.len() + 1 + value + properties
    }
}

impl fmt::Display for BaggageMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.key)?;
        for b in self.value.bytes() {
            if is_plain_octet(b) {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        if !self.properties.is_empty() {
            write!(f, ";{}", self.properties)?;
        }
        Ok(())
    }
}

impl fmt::Debug for BaggageMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

// ===== impl InvalidBaggage =====

impl InvalidBaggage {
    const fn new(reason: &'static str) -> Self {
        InvalidBaggage { reason }
    }
}

impl fmt::Display for InvalidBaggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid baggage: {}", self.reason)
    }
}

impl std::error::Error for InvalidBaggage {}

// ===== grammar =====

/// `list-member = key OWS "=" OWS value *( OWS ";" OWS property )`; `None` when invalid.
fn parse_member(raw: &[u8]) -> Option<BaggageMember> {
    let mut parts = raw.split(|&b| b == b';');
    let pair = parts.next()?;
    let eq = pair.iter().position(|&b| b == b'=')?;
    let key = trim_ows(&pair[..eq]);
    let value = trim_ows(&pair[eq + 1..]);
    if !is_token(key) || !value.iter().all(|&b| is_baggage_octet(b)) {
        return None;
    }
    let mut properties = String::new();
    for property in parts {
        let property = trim_ows(property);
        if property.is_empty() {
            continue;
        }
        let (pkey, pvalue) = match property.iter().position(|&b| b == b'=') {
            Some(eq) => (
                trim_ows(&property[..eq]),
                Some(trim_ows(&property[eq + 1..])),
            ),
            None => (property, None),
        };
        let pvalue_ok = match pvalue {
            Some(v) => v.iter().all(|&b| is_baggage_octet(b)),
            None => true,
        };
        if !is_token(pkey) || !pvalue_ok {
            return None;
        }
        if !properties.is_empty() {
            properties.push(';');
        }
        // Tokens and baggage octets are ASCII, so these conversions keep every byte.
        properties.push_str(&String::from_utf8_lossy(pkey));
        if let Some(pvalue) = pvalue {
            properties.push('=');
            properties.push_str(&String::from_utf8_lossy(pvalue));
        }
    }
    Some(BaggageMember {
        key: String::from_utf8_lossy(key).into_owned(),
        value: percent_decode(value),
        properties,
    })
}

/// `token` of RFC 9110: one or more of `!#$%&'*+-.^_`|~`, digits and letters.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// `baggage-octet`: visible ASCII but `"`, `,`, `;` and `\`.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

/// A byte written as is when formatting a value: a baggage octet other than `%`.
fn is_plain_octet(b: u8) -> bool {
    b != b'%' && is_baggage_octet(b)
}

/// Percent-decodes `value`; a `%` not followed by two hex digits stays as it is.
fn percent_decode(value: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' && i + 2 < value.len() {
            if let (Some(hi), Some(lo)) = (hex(value[i + 1]), hex(value[i + 2])) {
                // Two hex digits make at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX));
                i += 3;
                continue;
            }
        }
        out.push(value[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
