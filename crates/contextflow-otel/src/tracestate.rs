//! W3C Trace Context: the `tracestate` header, vendor data that travels with a trace.
//!
//! A `tracestate` is a list of `key=value` members, such as `rojo=00f067aa0ba902b7,congo=t61rcWkgMzE`.
//! The grammar is the current W3C text's: `key = ( lcalpha / DIGIT ) 0*255 ( keychar )` with
//! `keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"` (so `tenant@system`, `foo@` and
//! `foo@@bar` are all keys), values are printable ASCII without `,` and `=`. Parsing rejects
//! the whole list when a member breaks the grammar or there are more than 32 members; a
//! repeated key keeps its first member and the later ones are discarded (vendors MAY discard
//! duplicates). Order is kept, an updated member moves to the front, and the list is kept
//! within 512 characters: members longer than 128 characters go first, then members from the
//! end.
//!
//! OpenTelemetry's own `TraceState` still checks the older `tenant@vendor` key grammar, so
//! [`TraceState::to_otel`] keeps only the members it accepts; the propagator carries the
//! full list next to it (see [`TraceContextPropagator`](crate::TraceContextPropagator)).

use std::{fmt, str::FromStr};

use crate::traceparent::trim_ows;

/// The name of the `tracestate` field.
///
/// ```
/// assert_eq!(contextflow_otel::TRACESTATE, "tracestate");
/// ```
pub const TRACESTATE: &str = "tracestate";

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
/// use contextflow_otel::TraceState;
///
/// let mut state: TraceState = "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE".parse()?;
/// assert_eq!(state.get("congo"), Some("t61rcWkgMzE"));
/// state.insert("congo", "ucfJifl5GOE")?;
/// assert_eq!(state.to_string(), "congo=ucfJifl5GOE,rojo=00f067aa0ba902b7");
/// let deduplicated: TraceState = "a=1,a=2".parse()?;
/// assert_eq!(deduplicated.to_string(), "a=1", "a repeated key keeps its first member");
/// # Ok::<(), contextflow_otel::InvalidTraceState>(())
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
/// use contextflow_otel::TraceState;
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
    /// use contextflow_otel::TraceState;
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
    /// When a member breaks the grammar or there are more than 32 members.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let state = TraceState::parse_bytes(b"a=1 ,, \tb@sys=2")?;
    /// assert_eq!(state.len(), 2);
    /// assert!(TraceState::parse_bytes(b"a=1,b").is_err());
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn parse_bytes(value: &[u8]) -> Result<Self, InvalidTraceState> {
        let mut state = TraceState::new();
        state.append_bytes(value)?;
        state.enforce_len(0);
        Ok(state)
    }

    /// Reads several `tracestate` values as one list (HTTP allows a list header to be split
    /// over several lines). No value gives an empty `tracestate`.
    ///
    /// # Errors
    ///
    /// As [`parse_bytes`](TraceState::parse_bytes), for the combined list, and when the values
    /// add up to more than 32 KiB.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let state = TraceState::from_values([&b"a=1"[..], b"b=2"])?;
    /// assert_eq!(state.to_string(), "a=1,b=2");
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn from_values<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, InvalidTraceState> {
        let mut state = TraceState::new();
        let mut raw_len = 0;
        for value in values {
            raw_len += value.len();
            if raw_len > MAX_RAW_LEN {
                return Err(InvalidTraceState::new("header too long"));
            }
            state.append_bytes(value)?;
        }
        state.enforce_len(0);
        Ok(state)
    }

    /// The members OpenTelemetry's `TraceState` accepts (its key check is the older
    /// `tenant@vendor` grammar), in order.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let state: TraceState = "a=1,foo@@bar=2,t@v=3".parse()?;
    /// assert_eq!(state.to_otel().header(), "a=1,t@v=3");
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn to_otel(&self) -> opentelemetry::trace::TraceState {
        let mut out = opentelemetry::trace::TraceState::default();
        // `insert` puts each member in front, so go from the back to keep the order.
        for (k, v) in self.members.iter().rev() {
            if let Ok(next) = out.insert(k.as_str(), v.as_str()) {
                out = next;
            }
        }
        out
    }

    /// The members of an OpenTelemetry `TraceState` that pass this grammar, in order.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let otel = opentelemetry::trace::TraceState::from_key_value([("a", "1"), ("b", "2")]).unwrap();
    /// assert_eq!(TraceState::from_otel(&otel).to_string(), "a=1,b=2");
    /// ```
    pub fn from_otel(state: &opentelemetry::trace::TraceState) -> Self {
        let header = state.header();
        let mut out = TraceState::new();
        for member in header.split(',') {
            let _ = out.append_bytes(member.as_bytes());
        }
        out.enforce_len(0);
        out
    }

    /// This list (as received) after OpenTelemetry's view of it, `projected`, was changed into
    /// `now` (by a sampler or the application): the members `now` changed or added first, in its
    /// order; then the received members `now` kept unchanged, and those OpenTelemetry never saw
    /// (its key grammar refused them), in the received order; members `now` removed are gone.
    pub(crate) fn updated_by(
        &self,
        projected: &opentelemetry::trace::TraceState,
        now: &opentelemetry::trace::TraceState,
    ) -> TraceState {
        let now = TraceState::from_otel(now);
        let mut members: Vec<(String, String)> = now
            .members
            .iter()
            .filter(|(k, v)| self.get(k) != Some(v.as_str()))
            .cloned()
            .collect();
        let changed = members.len();
        for (k, v) in &self.members {
            let kept = now.get(k) == Some(v.as_str());
            let unseen = projected.get(k).is_none() && now.get(k).is_none();
            if (kept || unseen) && !members[..changed].iter().any(|(m, _)| m == k) {
                members.push((k.clone(), v.clone()));
            }
        }
        members.truncate(MAX_MEMBERS);
        let mut out = TraceState { members };
        out.enforce_len(changed.min(out.members.len()));
        out
    }

    /// The value of member `key`.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let state: TraceState = "t@sys=v".parse()?;
    /// assert_eq!(state.get("t@sys"), Some("v"));
    /// assert_eq!(state.get("t"), None);
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
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
    /// When `key` or `value` breaks the grammar, or the member would be longer than the whole
    /// header may be (512 characters); the list is then unchanged.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let mut state: TraceState = "a=1,b=2".parse()?;
    /// state.insert("b", "3")?;
    /// state.insert("c", "4")?;
    /// assert_eq!(state.to_string(), "c=4,b=3,a=1");
    /// assert!(state.insert("c", "no,commas").is_err());
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), InvalidTraceState> {
        validate_key(key.as_bytes())?;
        validate_value(value.as_bytes())?;
        if key.len() + 1 + value.len() > MAX_LEN {
            // A 256-character key and a 256-character value: the grammar allows the member, the
            // header's 512-character limit does not.
            return Err(InvalidTraceState::new("member longer than 512 characters"));
        }
        self.members.retain(|(k, _)| k != key);
        self.members.insert(0, (key.to_owned(), value.to_owned()));
        self.members.truncate(MAX_MEMBERS);
        self.enforce_len(1);
        Ok(())
    }

    /// Removes member `key` and returns its value.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let mut state: TraceState = "a=1,b=2".parse()?;
    /// assert_eq!(state.remove("a").as_deref(), Some("1"));
    /// assert_eq!(state.to_string(), "b=2");
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let index = self.members.iter().position(|(k, _)| k == key)?;
        Some(self.members.remove(index).1)
    }

    /// The members, in order.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// let state: TraceState = "a=1,b=2".parse()?;
    /// let keys: Vec<&str> = state.iter().map(|(k, _)| k).collect();
    /// assert_eq!(keys, ["a", "b"]);
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.members.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of members.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// assert_eq!("a=1,b=2".parse::<TraceState>()?.len(), 2);
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member.
    ///
    /// ```
    /// use contextflow_otel::TraceState;
    /// assert!(" , ".parse::<TraceState>()?.is_empty());
    /// # Ok::<(), contextflow_otel::InvalidTraceState>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Appends the members of `value` to the list, checking the grammar and the member limit;
    /// a key already in the list keeps its first member.
    fn append_bytes(&mut self, value: &[u8]) -> Result<(), InvalidTraceState> {
        if value.len() > MAX_RAW_LEN {
            return Err(InvalidTraceState::new("header too long"));
        }
        for member in value.split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            let eq = member
                .iter()
                .position(|&b| b == b'=')
                .ok_or(InvalidTraceState::new("list member without '='"))?;
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            validate_key(key)?;
            validate_value(value)?;
            if self.members.iter().any(|(k, _)| k.as_bytes() == key) {
                // A duplicate: the first member wins (the spec lets vendors discard it).
                continue;
            }
            if self.members.len() == MAX_MEMBERS {
                return Err(InvalidTraceState::new("more than 32 list members"));
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

fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
}

/// `key = ( lcalpha / DIGIT ) 0*255 ( keychar )`.
fn validate_key(key: &[u8]) -> Result<(), InvalidTraceState> {
    let ok = (1..=256).contains(&key.len())
        && (key[0].is_ascii_lowercase() || key[0].is_ascii_digit())
        && key[1..].iter().all(|&b| is_key_char(b));
    if ok {
        Ok(())
    } else {
        Err(InvalidTraceState::new("invalid key"))
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
