//! W3C Trace Context: the `tracestate` header, vendor data that travels with a trace.
//!
//! A `tracestate` is a list of `key=value` members, such as `rojo=00f067aa0ba902b7,congo=t61rcWkgMzE`.
//! Keys are simple (`vendor`) or multi-tenant (`tenant@system`); values are printable ASCII
//! without `,` and `=`. Parsing rejects the whole header when a member breaks the grammar, a
//! key appears twice or there are more than 32 members, as the W3C test suite expects.
//! Order is kept, an updated member moves to the front, and the list is kept within 512
//! characters: members longer than 128 characters go first, then members from the end.

use std::{fmt, str::FromStr};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::trace_context::trim_ows;

/// The name of the `tracestate` header.
///
/// ```
/// assert_eq!(contextflow_http::TRACESTATE, "tracestate");
/// ```
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// At most this many members.
const MAX_MEMBERS: usize = 32;
/// At most this many characters in the formatted list.
const MAX_LEN: usize = 512;
/// Members longer than this are the first to go when the list is too long.
const LARGE_MEMBER: usize = 128;
/// Raw headers longer than this are rejected without parsing (32 members of at most
/// 513 characters, with room for white space).
const MAX_RAW_LEN: usize = 32 * 1024;

/// A parsed `tracestate`: an ordered list of vendor members (at most 32, at most 512 characters).
///
/// ```
/// use contextflow_http::TraceState;
///
/// let mut state: TraceState = "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE".parse()?;
/// assert_eq!(state.get("congo"), Some("t61rcWkgMzE"));
/// state.insert("congo", "ucfJifl5GOE")?;
/// assert_eq!(state.to_string(), "congo=ucfJifl5GOE,rojo=00f067aa0ba902b7");
/// assert!("a=1,a=2".parse::<TraceState>().is_err(), "duplicate keys are invalid");
/// # Ok::<(), contextflow_http::InvalidTraceState>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct TraceState {
    members: Vec<(String, String)>,
}

/// Why a `tracestate` (or one member) was rejected.
///
/// The message names the rule that failed, never the rejected value, so it is safe to log.
///
/// ```
/// use contextflow_http::TraceState;
/// let err = "Upper=1".parse::<TraceState>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid tracestate: invalid key");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidTraceState {
    reason: &'static str,
}

// ===== impl TraceState =====

impl TraceState {
    /// An empty `tracestate`.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// assert!(TraceState::new().is_empty());
    /// ```
    pub const fn new() -> Self {
        TraceState {
            members: Vec::new(),
        }
    }

    /// Parses a `tracestate` given as bytes (a header value need not be UTF-8). Empty list
    /// members and optional white space around members are allowed.
    ///
    /// # Errors
    ///
    /// When a member breaks the grammar, a key is repeated or there are more than 32 members.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// let state = TraceState::parse_bytes(b"a=1 ,, \tb@sys=2")?;
    /// assert_eq!(state.len(), 2);
    /// assert!(TraceState::parse_bytes(b"a=1,b").is_err());
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Result<Self, InvalidTraceState> {
        let mut state = TraceState::new();
        state.append_bytes(value)?;
        state.enforce_len(0);
        Ok(state)
    }

    /// Reads all the `tracestate` headers of a request as one list (HTTP allows a list header
    /// to be split over several lines). No header gives an empty `tracestate`.
    ///
    /// # Errors
    ///
    /// As [`parse_bytes`](TraceState::parse_bytes), for the combined list.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// use http::HeaderMap;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.append("tracestate", "a=1".parse()?);
    /// headers.append("tracestate", "b=2".parse()?);
    /// assert_eq!(TraceState::from_headers(&headers)?.to_string(), "a=1,b=2");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, InvalidTraceState> {
        let mut state = TraceState::new();
        let mut raw_len = 0;
        for value in headers.get_all(TRACESTATE) {
            raw_len += value.len();
            if raw_len > MAX_RAW_LEN {
                return Err(InvalidTraceState::new("header too long"));
            }
            state.append_bytes(value.as_bytes())?;
        }
        state.enforce_len(0);
        Ok(state)
    }

    /// The value of member `key`.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// let state: TraceState = "t@sys=v".parse()?;
    /// assert_eq!(state.get("t@sys"), Some("v"));
    /// assert_eq!(state.get("t"), None);
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets member `key` to `value` and moves it to the front, as a vendor does when it updates
    /// its data. Drops the last member past 32, then members past 512 characters (the longest
    /// ones first), never the one just inserted.
    ///
    /// # Errors
    ///
    /// When `key` or `value` breaks the grammar; the list is then unchanged.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// let mut state: TraceState = "a=1,b=2".parse()?;
    /// state.insert("b", "3")?;
    /// state.insert("c", "4")?;
    /// assert_eq!(state.to_string(), "c=4,b=3,a=1");
    /// assert!(state.insert("c", "no,commas").is_err());
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), InvalidTraceState> {
        validate_key(key.as_bytes())?;
        validate_value(value.as_bytes())?;
        self.members.retain(|(k, _)| k != key);
        self.members.insert(0, (key.to_owned(), value.to_owned()));
        self.members.truncate(MAX_MEMBERS);
        self.enforce_len(1);
        Ok(())
    }

    /// Removes member `key` and returns its value.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// let mut state: TraceState = "a=1,b=2".parse()?;
    /// assert_eq!(state.remove("a").as_deref(), Some("1"));
    /// assert_eq!(state.to_string(), "b=2");
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let index = self.members.iter().position(|(k, _)| k == key)?;
        Some(self.members.remove(index).1)
    }

    /// The members, in order.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// let state: TraceState = "a=1,b=2".parse()?;
    /// let keys: Vec<&str> = state.iter().map(|(k, _)| k).collect();
    /// assert_eq!(keys, ["a", "b"]);
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.members.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of members.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// assert_eq!("a=1,b=2".parse::<TraceState>()?.len(), 2);
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member.
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// assert!(" , ".parse::<TraceState>()?.is_empty());
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The list as a header value, or `None` when it is empty (an empty `tracestate` is not sent).
    ///
    /// ```
    /// use contextflow_http::TraceState;
    /// assert!(TraceState::new().to_header_value().is_none());
    /// let state: TraceState = "a=1".parse()?;
    /// assert_eq!(state.to_header_value().unwrap(), "a=1");
    /// # Ok::<(), contextflow_http::InvalidTraceState>(())
    /// ```
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        if self.is_empty() {
            return None;
        }
        // Keys and values are printable ASCII (checked on the way in), so this cannot fail.
        HeaderValue::try_from(self.to_string()).ok()
    }

    /// Appends the members of `value` to the list, checking the grammar, duplicate keys and
    /// the member limit.
    fn append_bytes(&mut self, value: &[u8]) -> Result<(), InvalidTraceState> {
        if value.len() > MAX_RAW_LEN {
            return Err(InvalidTraceState::new("header too long"));
        }
        for member in value.split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            if self.members.len() == MAX_MEMBERS {
                return Err(InvalidTraceState::new("more than 32 list members"));
            }
            let eq = member
                .iter()
                .position(|&b| b == b'=')
                .ok_or(InvalidTraceState::new("list member without '='"))?;
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            validate_key(key)?;
            validate_value(value)?;
            if self.members.iter().any(|(k, _)| k.as_bytes() == key) {
                return Err(InvalidTraceState::new("duplicate key"));
            }
            // Validated as ASCII above, so the lossy conversion never replaces anything.
            self.members.push((
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
        Ok(())
    }

    /// Drops members until the formatted list fits in 512 characters: the last member longer
    /// than 128 characters first, then the last member. The first `keep` members stay.
    fn enforce_len(&mut self, keep: usize) {
        let member_len = |(k, v): &(String, String)| k.len() + 1 + v.len();
        let mut len = self.members.iter().map(member_len).sum::<usize>()
            + self.members.len().saturating_sub(1);
        while len > MAX_LEN && self.members.len() > keep {
            let index = self.members[keep..]
                .iter()
                .rposition(|m| member_len(m) > LARGE_MEMBER)
                .map_or(self.members.len() - 1, |i| i + keep);
            let removed = self.members.remove(index);
            len -= member_len(&removed) + usize::from(!self.members.is_empty());
        }
    }
}

impl FromStr for TraceState {
    type Err = InvalidTraceState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceState::parse_bytes(s.as_bytes())
    }
}

impl fmt::Display for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

// ===== impl InvalidTraceState =====

impl InvalidTraceState {
    const fn new(reason: &'static str) -> Self {
        InvalidTraceState { reason }
    }
}

impl fmt::Display for InvalidTraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid tracestate: {}", self.reason)
    }
}

impl std::error::Error for InvalidTraceState {}

// ===== grammar =====

fn is_lcalpha(b: u8) -> bool {
    b.is_ascii_lowercase()
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// `simple-key = lcalpha 0*255(keychar)`, or `tenant-id "@" system-id` where
/// `tenant-id = (lcalpha / DIGIT) 0*240(keychar)` and `system-id = lcalpha 0*13(keychar)`.
fn validate_key(key: &[u8]) -> Result<(), InvalidTraceState> {
    const INVALID: InvalidTraceState = InvalidTraceState::new("invalid key");
    let ok = match key.iter().position(|&b| b == b'@') {
        None => {
            (1..=256).contains(&key.len())
                && is_lcalpha(key[0])
                && key[1..].iter().all(|&b| is_key_char(b))
        }
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            (1..=241).contains(&tenant.len())
                && (is_lcalpha(tenant[0]) || tenant[0].is_ascii_digit())
                && tenant[1..].iter().all(|&b| is_key_char(b))
                && (1..=14).contains(&system.len())
                && is_lcalpha(system[0])
                && system[1..].iter().all(|&b| is_key_char(b))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(INVALID)
    }
}

/// `value = 0*255(chr) nblk-chr` where `nblk-chr` is printable ASCII but `,` and `=`, and
/// `chr` adds the space.
fn validate_value(value: &[u8]) -> Result<(), InvalidTraceState> {
    let nblk = |b: u8| (0x21..=0x7e).contains(&b) && b != b',' && b != b'=';
    let ok = (1..=256).contains(&value.len())
        && value[..value.len() - 1]
            .iter()
            .all(|&b| b == b' ' || nblk(b))
        && nblk(value[value.len() - 1]);
    if ok {
        Ok(())
    } else {
        Err(InvalidTraceState::new("invalid value"))
    }
}
