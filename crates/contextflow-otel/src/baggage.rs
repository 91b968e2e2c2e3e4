//! W3C Baggage: application-defined `key=value` pairs that travel with a request.
//!
//! A `baggage` header looks like `userId=alice,serverNode=DF%2028;region=eu`: a list of
//! members, each a token key, a percent-encoded value and optional `;`-separated properties.
//! Parsing is lenient, as the [W3C Baggage](https://www.w3.org/TR/baggage/) spec allows: a
//! member that breaks the grammar is dropped and the others are kept; nothing panics. Values
//! and property values are percent-decoded (invalid UTF-8 becomes U+FFFD) and encoded again
//! when written. At most 64 members and 8,192 bytes (formatted) are kept, the spec's minimum
//! and OpenTelemetry's limits; a member that does not fit is dropped whole, never cut. A
//! repeated key keeps its first position and its last value.
//!
//! Baggage is for infrastructure metadata (a deployment, a test run, a feature flag name).
//! It is sent by the client, so it is untrusted: never put a tenant or a user in it, and never
//! use it for an authorization decision.

use std::{fmt, str::FromStr};

use crate::traceparent::trim_ows;

/// The name of the `baggage` field.
///
/// ```
/// assert_eq!(contextflow_otel::BAGGAGE, "baggage");
/// ```
pub const BAGGAGE: &str = "baggage";

/// At most this many members.
const MAX_MEMBERS: usize = 64;
/// At most this many bytes in the formatted list.
const MAX_BYTES: usize = 8192;
/// The most bytes of one `baggage` value that are parsed (four times the list's limit, for
/// OWS, encoding and members that replace earlier ones); the rest is dropped unread.
const MAX_RAW_LEN: usize = 32 * 1024;

/// A parsed `baggage` list (at most 64 members, at most 8,192 bytes once formatted).
///
/// ```
/// use contextflow_otel::Baggage;
///
/// let mut baggage = Baggage::parse("userId=alice, serverNode=DF%2028;region=eu, bad key=1");
/// assert_eq!(baggage.get("serverNode"), Some("DF 28"));
/// assert_eq!(baggage.len(), 2, "the invalid member is dropped");
/// baggage.insert("deploy", "blue green")?;
/// assert_eq!(
///     baggage.to_string(),
///     "userId=alice,serverNode=DF%2028;region=eu,deploy=blue%20green"
/// );
/// # Ok::<(), contextflow_otel::InvalidBaggage>(())
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
/// use contextflow_otel::Baggage;
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
    /// Properties: keys and decoded values, in order.
    properties: Vec<(String, Option<String>)>,
}

/// Why a baggage member could not be added.
///
/// ```
/// use contextflow_otel::Baggage;
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
    /// use contextflow_otel::Baggage;
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
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse("a=1,=2,b=%ZZ").to_string(), "a=1,b=%25ZZ");
    /// ```
    pub fn parse(value: &str) -> Self {
        Baggage::parse_bytes(value.as_bytes())
    }

    /// Parses a `baggage` value given as bytes (a header value need not be UTF-8), dropping
    /// invalid members.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse_bytes(b"a=1,b=\xff").len(), 1);
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Self {
        let mut baggage = Baggage::new();
        baggage.append_bytes(value);
        baggage
    }

    /// Reads several `baggage` values as one list, dropping invalid members; also returns how
    /// many were dropped.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// let (baggage, dropped) = Baggage::from_values([&b"a=1"[..], b"b=2,c"]);
    /// assert_eq!((baggage.to_string().as_str(), dropped), ("a=1,b=2", 1));
    /// ```
    pub fn from_values<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> (Self, usize) {
        let mut baggage = Baggage::new();
        let mut dropped = 0;
        for value in values {
            dropped += baggage.append_bytes(value);
        }
        (baggage, dropped)
    }

    /// The baggage as OpenTelemetry's: values decoded, properties as metadata in their
    /// written (encoded) form.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// let otel = Baggage::parse("k=a%20b;p=x%3By").to_otel();
    /// let (value, metadata) = otel.get_with_metadata("k").unwrap();
    /// assert_eq!((value.as_str(), metadata.as_str()), ("a b", "p=x%3By"));
    /// ```
    pub fn to_otel(&self) -> opentelemetry::baggage::Baggage {
        let mut out = opentelemetry::baggage::Baggage::new();
        for member in &self.members {
            let mut metadata = String::new();
            member.write_properties(&mut metadata);
            out.insert_with_metadata(member.key.clone(), member.value.clone(), metadata);
        }
        out
    }

    /// The members of OpenTelemetry's baggage that pass this grammar; metadata is read as
    /// properties (percent-decoded).
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// use opentelemetry::baggage::Baggage as OtelBaggage;
    /// let mut otel = OtelBaggage::new();
    /// otel.insert_with_metadata("k", "a,b", "p=1");
    /// assert_eq!(Baggage::from_otel(&otel).to_string(), "k=a%2Cb;p=1");
    /// ```
    pub fn from_otel(baggage: &opentelemetry::baggage::Baggage) -> Self {
        let mut out = Baggage::new();
        for (key, (value, metadata)) in baggage {
            if !is_token(key.as_str().as_bytes()) {
                continue;
            }
            let metadata = metadata.as_str();
            let properties = if metadata.is_empty() {
                Vec::new()
            } else {
                parse_properties(metadata.as_bytes().split(|&b| b == b';')).unwrap_or_else(|| {
                    // Metadata that is not W3C properties: the member goes without it.
                    tracing::debug!(
                        key = key.as_str(),
                        "baggage metadata is not W3C properties; left out"
                    );
                    Vec::new()
                })
            };
            let _ = out.push(BaggageMember {
                key: key.as_str().to_owned(),
                value: value.as_str().to_owned(),
                properties,
            });
        }
        out
    }

    /// The value of member `key`.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse("a=%F0%9F%A6%80").get("a"), Some("🦀"));
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        self.member(key).map(BaggageMember::value)
    }

    /// Member `key`, with its properties.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
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
    /// When `key` is not an HTTP token, or when the member would break the 64-member or
    /// 8,192-byte limit; the baggage is then unchanged.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// let mut baggage = Baggage::new();
    /// baggage.insert("env", "staging; eu")?;
    /// assert_eq!(baggage.to_string(), "env=staging%3B%20eu");
    /// assert!(baggage.insert("big", &"x".repeat(9000)).is_err());
    /// # Ok::<(), contextflow_otel::InvalidBaggage>(())
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), InvalidBaggage> {
        if !is_token(key.as_bytes()) {
            return Err(InvalidBaggage::new("key is not a token"));
        }
        self.push(BaggageMember {
            key: key.to_owned(),
            value: value.to_owned(),
            properties: Vec::new(),
        })
    }

    /// Removes member `key` and returns its value.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
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
    /// use contextflow_otel::Baggage;
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
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse("a=1,a=2").len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// assert!(Baggage::parse(" , ").is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Appends the valid members of `value`; returns how many were dropped. Past
    /// [`MAX_RAW_LEN`] bytes of a value, the rest is dropped without being parsed.
    fn append_bytes(&mut self, value: &[u8]) -> usize {
        let mut dropped = 0;
        let mut read = 0;
        for raw in value.split(|&b| b == b',') {
            read += raw.len() + 1;
            if read > MAX_RAW_LEN + 1 {
                dropped += 1;
                continue;
            }
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
            return Err(InvalidBaggage::new("more than 64 members"));
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
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse("k=v").iter().next().unwrap().key(), "k");
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value, percent-decoded (invalid UTF-8 replaced by U+FFFD, as the spec says).
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// assert_eq!(Baggage::parse("k=%FF").get("k"), Some("\u{fffd}"));
    /// ```
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The properties, as `(key, value)` pairs in order, values percent-decoded.
    ///
    /// ```
    /// use contextflow_otel::Baggage;
    /// let baggage = Baggage::parse("k=v ; a = 1%2C2 ;b");
    /// let member = baggage.member("k").unwrap();
    /// assert_eq!(member.properties().collect::<Vec<_>>(), [("a", Some("1,2")), ("b", None)]);
    /// ```
    pub fn properties(&self) -> impl Iterator<Item = (&str, Option<&str>)> + '_ {
        self.properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// Writes the properties as sent (`a=1;b`, values encoded), without a leading `;`.
    fn write_properties(&self, out: &mut impl fmt::Write) {
        for (i, (key, value)) in self.properties.iter().enumerate() {
            let _ = out.write_str(if i > 0 { ";" } else { "" });
            let _ = out.write_str(key);
            if let Some(value) = value {
                let _ = out.write_char('=');
                let _ = write_encoded(out, value);
            }
        }
    }

    fn formatted_len(&self) -> usize {
        let properties: usize = self
            .properties
            .iter()
            .map(|(k, v)| 1 + k.len() + v.as_deref().map_or(0, |v| 1 + encoded_len(v)))
            .sum();
        self.key.len() + 1 + encoded_len(&self.value) + properties
    }
}

impl fmt::Display for BaggageMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.key)?;
        write_encoded(f, &self.value)?;
        if !self.properties.is_empty() {
            f.write_str(";")?;
            self.write_properties(f);
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
    Some(BaggageMember {
        key: String::from_utf8_lossy(key).into_owned(),
        value: percent_decode(value),
        properties: parse_properties(parts)?,
    })
}

/// `property = key OWS "=" OWS value / key OWS`, values percent-decoded; empty properties are
/// skipped; `None` when one is invalid.
fn parse_properties<'a>(
    parts: impl Iterator<Item = &'a [u8]>,
) -> Option<Vec<(String, Option<String>)>> {
    let mut properties = Vec::new();
    for property in parts {
        let property = trim_ows(property);
        if property.is_empty() {
            continue;
        }
        let (key, value) = match property.iter().position(|&b| b == b'=') {
            Some(eq) => (
                trim_ows(&property[..eq]),
                Some(trim_ows(&property[eq + 1..])),
            ),
            None => (property, None),
        };
        if !is_token(key) || !value.is_none_or(|v| v.iter().all(|&b| is_baggage_octet(b))) {
            return None;
        }
        // Tokens are ASCII, so the conversion keeps every byte.
        properties.push((
            String::from_utf8_lossy(key).into_owned(),
            value.map(percent_decode),
        ));
    }
    Some(properties)
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

/// The length of `value` once percent-encoded.
fn encoded_len(value: &str) -> usize {
    value
        .bytes()
        .map(|b| if is_plain_octet(b) { 1 } else { 3 })
        .sum()
}

/// Writes `value` percent-encoded: every byte but the plain baggage octets as `%XX`.
fn write_encoded(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        if is_plain_octet(b) {
            out.write_char(char::from(b))?;
        } else {
            out.write_char('%')?;
            out.write_char(char::from(HEX[usize::from(b >> 4)]))?;
            out.write_char(char::from(HEX[usize::from(b & 0x0f)]))?;
        }
    }
    Ok(())
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
