//! Device payloads as ThingsBoard's `JsonConverter` reads them: the telemetry and client-attribute
//! JSON that devices post over MQTT, HTTP and CoAP, and the typing rules that turn each JSON value
//! into a stored [`Value`].
//!
//! The typing rules follow ThingsBoard with type casting enabled (its default):
//!
//! - `true`/`false` is a [`Value::Bool`]; `null` is skipped; an object or array is a [`Value::Json`]
//!   holding its compact text, with number literals and key order as written.
//! - A number is read as a decimal (unscaled digits and a scale, as Java's `BigDecimal` does). Written
//!   without a `.` and integral once trailing zeros are stripped (`42`, `1e3`, `5E2`), it is a
//!   [`Value::Long`] — so is `4.2e1`: as in ThingsBoard's `JsonConverter`, a `.` counts only in a
//!   literal without an exponent. Written with a `.` and no exponent (`42.0`) or fractional
//!   (`15e-1`, `1.5e-3`), it is a
//!   [`Value::Double`] when its scale as written is at most 16. Anything else (an integer beyond
//!   `i64`, a scale above 16, a double too large for `f64`) is a [`Value::String`] holding the plain
//!   decimal text, so no digit is lost.
//! - A string that reads as such a decimal without an exponent (`"42"`, `"4.5"`, `".5"`) is typed
//!   by the same rules; any other string (`"-1e2"`, `"0x10"`, `"NaN"`, `" 42"`, `""`) stays a
//!   string, as ThingsBoard never casts a string with an exponent.
//! - A `ts` may be a number or a numeric string (`"ts":"1451649600512"`), as in ThingsBoard.
//! - An exponent beyond ±10000 is not expanded: the value is kept as a string, as written, so a
//!   ten-byte literal cannot become a string of a billion zeros.
//!
//! Objects keep the key order of the payload; when a key repeats, the last value wins and the key
//! keeps its first position, as in ThingsBoard's (Gson's) `JsonObject`.

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The largest scale (digits after the point, as written) that is stored as a double.
const MAX_DOUBLE_SCALE: i64 = 16;

/// The largest exponent magnitude that is expanded; larger ones keep the literal as a string.
const MAX_EXPONENT: i64 = 10_000;

/// How many characters of a bad value an error quotes.
const QUOTE_CHARS: usize = 40;

/// A typed attribute or telemetry value, as ThingsBoard stores it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// `BOOLEAN`.
    Bool(bool),
    /// `LONG`.
    Long(i64),
    /// `DOUBLE`.
    Double(f64),
    /// `STRING`.
    String(String),
    /// `JSON`: the compact JSON text of an object or array.
    Json(String),
}

/// Values sharing one timestamp (epoch ms).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TsKv {
    /// The timestamp, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// The values, in the order of the payload.
    pub values: Vec<(String, Value)>,
}

/// The kind of a JSON value, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// A number.
    Number,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Number => "a number",
            Self::String => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        })
    }
}

/// Why a device payload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    /// The payload is not JSON (or not UTF-8).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The payload is not a message of the device profile's protobuf schema, or the device has
    /// no such schema.
    #[error("invalid protobuf payload: {0}")]
    InvalidProtobuf(String),
    /// Attributes must be one JSON object.
    #[error("expected a JSON object, found {found}")]
    NotAnObject {
        /// What the payload was instead.
        found: JsonKind,
    },
    /// Telemetry must be a JSON object or an array of objects.
    #[error("expected a JSON object or an array of objects, found {found}")]
    NotObjectOrArray {
        /// What the payload was instead.
        found: JsonKind,
    },
    /// An item of a telemetry array is not an object.
    #[error("telemetry array item {index} must be a JSON object, found {found}")]
    ArrayItemNotObject {
        /// The item's position in the array, from 0.
        index: usize,
        /// What the item was instead.
        found: JsonKind,
    },
    /// `ts` is not a number of epoch milliseconds that fits in an `i64`.
    #[error("\"ts\" must be a number of epoch milliseconds, found {found}")]
    BadTs {
        /// The `ts` value as written (its first 40 characters).
        found: String,
    },
    /// `values` beside `ts` is not an object.
    #[error("\"values\" must be a JSON object, found {found}")]
    ValuesNotAnObject {
        /// What `values` was instead.
        found: JsonKind,
    },
}

/// Device telemetry: `{"k":v,..}` (ts = `server_ts_ms`), `{"ts":ms,"values":{..}}`, or a JSON array
/// of either form.
///
/// An object is in the `ts` form only when it has both `ts` and `values`, as in ThingsBoard; then
/// other keys (like `metadata`) are ignored, `ts` must be a number (a fraction is truncated toward
/// zero) and `values` must be an object. Otherwise `ts` and `values` are ordinary keys. Entries left
/// without values (`{}`, `{"a":null}`) are dropped, so `{}` and `[]` give an empty `Vec`.
pub fn parse_telemetry(payload: &[u8], server_ts_ms: i64) -> Result<Vec<TsKv>, PayloadError> {
    let root = parse_root(payload)?;
    let mut out = Vec::new();
    match kind(root) {
        JsonKind::Object => push_telemetry_object(root, server_ts_ms, &mut out)?,
        JsonKind::Array => {
            let items: Vec<&RawValue> = serde_json::from_str(root.get()).map_err(invalid_json)?;
            for (index, item) in items.into_iter().enumerate() {
                match kind(item) {
                    JsonKind::Object => push_telemetry_object(item, server_ts_ms, &mut out)?,
                    found => return Err(PayloadError::ArrayItemNotObject { index, found }),
                }
            }
        }
        found => return Err(PayloadError::NotObjectOrArray { found }),
    }
    Ok(out)
}

/// Client attributes: a flat JSON object; an array or scalar is an error. `null` values are skipped.
pub fn parse_attributes(payload: &[u8]) -> Result<Vec<(String, Value)>, PayloadError> {
    let root = parse_root(payload)?;
    match kind(root) {
        JsonKind::Object => typed_values(members(root)?),
        found => Err(PayloadError::NotAnObject { found }),
    }
}

/// One JSON value (given as its raw JSON text, so number literals keep their spelling) -> typed
/// value; `None` for `null`, which device APIs skip.
pub fn value_from_raw(raw: &RawValue) -> Result<Option<Value>, PayloadError> {
    let text = raw.get().trim();
    Ok(match kind(raw) {
        JsonKind::Null => None,
        JsonKind::Bool => Some(Value::Bool(text == "true")),
        // A JSON number always reads as a decimal; the fallback only keeps the function total.
        JsonKind::Number => Some(number_value(text).unwrap_or_else(|| Value::String(text.to_owned()))),
        JsonKind::String => {
            let s: String = serde_json::from_str(text).map_err(invalid_json)?;
            // ThingsBoard casts a numeric string only when it has no exponent (`"-1e2"` stays
            // a string).
            if s.contains(['e', 'E']) {
                return Ok(Some(Value::String(s)));
            }
            Some(match number_value(&s) {
                Some(value) => value,
                None => Value::String(s),
            })
        }
        JsonKind::Array | JsonKind::Object => Some(Value::Json(compact_json(text)?)),
    })
}

impl Value {
    /// The value as typed JSON (Bool -> `true`, Long -> `42`, Double -> `4.5`, String -> `"s"`,
    /// Json -> the parsed JSON).
    ///
    /// A non-finite double (which parsing never produces) becomes `null`, as JSON has no such
    /// number; JSON text that does not parse (likewise never produced) is returned as a string.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => serde_json::Value::Bool(*b),
            Self::Long(n) => serde_json::Value::from(*n),
            Self::Double(d) => {
                serde_json::Number::from_f64(*d).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Self::String(s) => serde_json::Value::String(s.clone()),
            Self::Json(text) => {
                serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
            }
        }
    }

    /// The value as ThingsBoard's REST API shows it without strict types: a string (`"true"`,
    /// `"42"`, `"4.5"`, `"s"`, JSON text).
    ///
    /// Doubles are spelled as Java's `Double.toString` spells them (`42.0`, `1.0E7`, `1.0E-4`),
    /// because that is the text ThingsBoard's clients see.
    pub fn to_text(&self) -> String {
        match self {
            Self::Bool(b) => b.to_string(),
            Self::Long(n) => n.to_string(),
            Self::Double(d) => java_double_text(*d),
            Self::String(s) | Self::Json(s) => s.clone(),
        }
    }

    /// The type name ThingsBoard uses: `"BOOLEAN"`, `"LONG"`, `"DOUBLE"`, `"STRING"`, `"JSON"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Bool(_) => "BOOLEAN",
            Self::Long(_) => "LONG",
            Self::Double(_) => "DOUBLE",
            Self::String(_) => "STRING",
            Self::Json(_) => "JSON",
        }
    }
}

fn invalid_json(e: serde_json::Error) -> PayloadError {
    PayloadError::InvalidJson(e.to_string())
}

/// Checks the whole payload once and keeps it as raw text, so that number literals keep their
/// spelling until they are typed.
fn parse_root(payload: &[u8]) -> Result<&RawValue, PayloadError> {
    serde_json::from_slice(payload).map_err(invalid_json)
}

/// The kind of a valid JSON value, from its first character.
fn kind(raw: &RawValue) -> JsonKind {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => JsonKind::Object,
        Some(b'[') => JsonKind::Array,
        Some(b'"') => JsonKind::String,
        Some(b't' | b'f') => JsonKind::Bool,
        Some(b'n') => JsonKind::Null,
        _ => JsonKind::Number,
    }
}

/// Parses one telemetry object (either form) and appends its entry, unless it has no values.
fn push_telemetry_object(raw: &RawValue, server_ts_ms: i64, out: &mut Vec<TsKv>) -> Result<(), PayloadError> {
    let members = members(raw)?;
    let find = |name: &str| {
        members
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| *value)
    };
    let (ts_ms, values) = match (find("ts"), find("values")) {
        (Some(ts), Some(values)) => {
            let ts_ms = ts_millis(ts)?;
            let values = match kind(values) {
                JsonKind::Object => typed_values(self::members(values)?)?,
                found => return Err(PayloadError::ValuesNotAnObject { found }),
            };
            (ts_ms, values)
        }
        _ => (server_ts_ms, typed_values(members)?),
    };
    if !values.is_empty() {
        out.push(TsKv { ts_ms, values });
    }
    Ok(())
}

/// Reads `ts` as Gson's `getAsLong` does for a number: a fraction is truncated toward zero. Unlike
/// Gson, a value beyond `i64` is refused rather than wrapped around.
fn ts_millis(raw: &RawValue) -> Result<i64, PayloadError> {
    let text = raw.get().trim();
    let millis = match kind(raw) {
        JsonKind::Number => parse_decimal(text).ok().and_then(|d| d.truncated()),
        // ThingsBoard also takes a numeric string (`"ts":"1451649600512"`).
        JsonKind::String => serde_json::from_str::<String>(text)
            .ok()
            .and_then(|s| parse_decimal(s.trim()).ok())
            .and_then(|d| d.truncated()),
        _ => None,
    };
    millis.ok_or_else(|| PayloadError::BadTs {
        found: text.chars().take(QUOTE_CHARS).collect(),
    })
}

/// Types each member's value, skipping `null`s.
fn typed_values(members: Vec<(String, &RawValue)>) -> Result<Vec<(String, Value)>, PayloadError> {
    let mut out = Vec::with_capacity(members.len());
    for (key, raw) in members {
        if let Some(value) = value_from_raw(raw)? {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// The members of a JSON object in payload order, the last value winning for a repeated key.
fn members(raw: &RawValue) -> Result<Vec<(String, &RawValue)>, PayloadError> {
    serde_json::from_str::<Members<'_>>(raw.get())
        .map(|m| m.0)
        .map_err(invalid_json)
}

/// An object's members with their values left as raw text. Serde has no ordered map of its own,
/// and a `BTreeMap` would lose the payload's key order.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(String, &'de RawValue)> = Vec::new();
                // The position of each key, so a repeated key updates its first slot in O(1).
                let mut position: HashMap<String, usize> = HashMap::new();
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    match position.get(&key).and_then(|&i| members.get_mut(i)) {
                        Some(slot) => slot.1 = value,
                        None => {
                            position.insert(key.clone(), members.len());
                            members.push((key, value));
                        }
                    }
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

/// The compact text of a valid JSON object or array: whitespace between tokens is dropped, number
/// literals and key order stay as written, and strings are re-escaped in one canonical way (so
/// `"\u0041"` becomes `"A"`), as Gson writes them back.
fn compact_json(text: &str) -> Result<String, PayloadError> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => {
                let end = string_end(bytes, i)
                    .ok_or_else(|| PayloadError::InvalidJson("unterminated string".to_owned()))?;
                let token = text.get(i..end).unwrap_or_default();
                let s: String = serde_json::from_str(token).map_err(invalid_json)?;
                out.push_str(&serde_json::to_string(&s).map_err(invalid_json)?);
                i = end;
            }
            _ => {
                // Outside strings valid JSON is ASCII, so every run boundary is a char boundary.
                let start = i;
                while bytes
                    .get(i)
                    .is_some_and(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'"'))
                {
                    i += 1;
                }
                out.push_str(text.get(start..i).unwrap_or_default());
            }
        }
    }
    Ok(out)
}

/// The index just past the closing quote of the string that opens at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Why a text is not typed as a number.
#[derive(Debug, PartialEq)]
enum NotDecimal {
    /// Not a decimal at all; a string stays a string.
    Syntax,
    /// A decimal whose exponent is beyond [`MAX_EXPONENT`]; it is kept as written.
    HugeExponent,
}

/// A decimal literal split as Java's `BigDecimal` reads it: `-`? digits (`.` digits)? (`e` exponent)?.
#[derive(Debug, PartialEq)]
struct Decimal {
    negative: bool,
    /// The integer and fraction digits run together, without leading zeros (empty for zero).
    unscaled: String,
    /// Digits after the point as written, less the exponent: `1.50` has 2, `1e3` has -3.
    scale: i64,
    /// Whether the literal is written with a `.`.
    has_dot: bool,
    /// Whether the literal has an exponent (`e`/`E`).
    has_exp: bool,
}

/// Reads a decimal. Besides JSON's number syntax this accepts what ThingsBoard accepts in strings:
/// leading zeros (`007`) and a bare fraction (`.5`, `-.5`). It refuses a leading `+`, a trailing
/// `.`, spaces, hexadecimal, `NaN` and `Infinity`.
fn parse_decimal(text: &str) -> Result<Decimal, NotDecimal> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, rest) = split_digits(rest);
    let (frac, has_dot, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let (frac, rest) = split_digits(after);
            if frac.is_empty() {
                return Err(NotDecimal::Syntax);
            }
            (frac, true, rest)
        }
        None => ("", false, rest),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(NotDecimal::Syntax);
    }
    let has_exp = rest.starts_with(['e', 'E']);
    let exponent = match rest.strip_prefix(['e', 'E']) {
        Some(exponent) => parse_exponent(exponent)?,
        None if rest.is_empty() => 0,
        None => return Err(NotDecimal::Syntax),
    };
    let mut unscaled = String::with_capacity(int.len() + frac.len());
    unscaled.push_str(int);
    unscaled.push_str(frac);
    let unscaled = unscaled.trim_start_matches('0').to_owned();
    Ok(Decimal {
        negative,
        unscaled,
        scale: frac.len() as i64 - exponent,
        has_dot,
        has_exp,
    })
}

/// Splits a text after its leading ASCII digits.
fn split_digits(text: &str) -> (&str, &str) {
    let n = text.bytes().take_while(u8::is_ascii_digit).count();
    text.split_at_checked(n).unwrap_or((text, ""))
}

/// Reads an exponent (`+`/`-` and digits), saturating so that any length of digits is safe.
fn parse_exponent(text: &str) -> Result<i64, NotDecimal> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NotDecimal::Syntax);
    }
    let magnitude = digits.bytes().fold(0i64, |acc, b| {
        acc.saturating_mul(10).saturating_add(i64::from(b - b'0'))
    });
    if magnitude > MAX_EXPONENT {
        return Err(NotDecimal::HugeExponent);
    }
    Ok(if negative { -magnitude } else { magnitude })
}

impl Decimal {
    /// The unscaled digits and scale after `BigDecimal.stripTrailingZeros` (zero has scale 0).
    fn stripped(&self) -> (&str, i64) {
        let digits = self.unscaled.trim_end_matches('0');
        if digits.is_empty() {
            return ("", 0);
        }
        (digits, self.scale - (self.unscaled.len() - digits.len()) as i64)
    }

    /// The value as an `i64`, truncated toward zero; `None` beyond the `i64` range.
    fn truncated(&self) -> Option<i64> {
        if self.scale > 0 {
            let keep = self
                .unscaled
                .len()
                .saturating_sub(usize::try_from(self.scale).unwrap_or(usize::MAX));
            to_i64(self.negative, self.unscaled.get(..keep)?, 0)
        } else {
            to_i64(self.negative, &self.unscaled, self.scale.unsigned_abs())
        }
    }

    /// The value as a finite `f64`, correctly rounded; `None` if it is too large for an `f64`.
    fn to_f64(&self) -> Option<f64> {
        let (digits, scale) = self.stripped();
        if digits.is_empty() {
            // BigDecimal has no negative zero, so neither has ThingsBoard's `-0.0`.
            return Some(0.0);
        }
        let sign = if self.negative { "-" } else { "" };
        format!("{sign}{digits}e{}", -scale)
            .parse::<f64>()
            .ok()
            .filter(|d| d.is_finite())
    }

    /// The text of `BigDecimal.toPlainString` for the decimal as written: no exponent, trailing
    /// zeros kept (`0.12345678901234567890` stays as it is, `1E19` becomes twenty digits).
    fn plain_text(&self) -> String {
        let digits = self.unscaled.as_str();
        if digits.is_empty() {
            return match usize::try_from(self.scale) {
                Ok(scale) if scale > 0 => format!("0.{}", "0".repeat(scale)),
                _ => "0".to_owned(),
            };
        }
        let sign = if self.negative { "-" } else { "" };
        let Ok(scale) = usize::try_from(self.scale) else {
            return format!("{sign}{digits}{}", "0".repeat(self.scale.unsigned_abs() as usize));
        };
        match digits.split_at_checked(digits.len().saturating_sub(scale)) {
            Some((int, frac)) if !int.is_empty() && !frac.is_empty() => format!("{sign}{int}.{frac}"),
            Some((int, _)) if !int.is_empty() => format!("{sign}{int}"),
            _ => format!("{sign}0.{}{digits}", "0".repeat(scale - digits.len())),
        }
    }
}

/// `±digits × 10^zeros` as an `i64`, or `None` beyond its range. `digits` has no leading zeros.
fn to_i64(negative: bool, digits: &str, zeros: u64) -> Option<i64> {
    if digits.is_empty() {
        return Some(0);
    }
    // 10^19 exceeds i64::MAX, so 20 or more digits never fit.
    if digits.len() as u64 + zeros > 19 {
        return None;
    }
    let mut magnitude: i128 = 0;
    for b in digits.bytes() {
        magnitude = magnitude * 10 + i128::from(b - b'0');
    }
    for _ in 0..zeros {
        magnitude *= 10;
    }
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Types a decimal text by ThingsBoard's rules; `None` if the text is not a decimal.
fn number_value(text: &str) -> Option<Value> {
    let decimal = match parse_decimal(text) {
        Ok(decimal) => decimal,
        Err(NotDecimal::Syntax) => return None,
        Err(NotDecimal::HugeExponent) => return Some(Value::String(text.to_owned())),
    };
    let (digits, stripped_scale) = decimal.stripped();
    // ThingsBoard counts a `.` only in a literal without an exponent: `4.2e1` is the integer 42.
    let dotted = decimal.has_dot && !decimal.has_exp;
    if !dotted && stripped_scale <= 0 {
        if let Some(n) = to_i64(decimal.negative, digits, stripped_scale.unsigned_abs()) {
            return Some(Value::Long(n));
        }
    // The scale as written decides between double and string, as in ThingsBoard (`bd.scale()`, not
    // the stripped one), so a literal with many trailing zeros keeps them in a string.
    } else if decimal.scale <= MAX_DOUBLE_SCALE
        && let Some(d) = decimal.to_f64()
    {
        return Some(Value::Double(d));
    }
    Some(Value::String(decimal.plain_text()))
}

/// Java's `Double.toString`: plain between 10^-3 and 10^7, otherwise `d.dddE±n`, always with a
/// digit after the point. The digits are the shortest that read back as the same double.
fn java_double_text(d: f64) -> String {
    if d.is_nan() {
        return "NaN".to_owned();
    }
    if d.is_infinite() {
        return if d > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if d == 0.0 {
        return if d.is_sign_negative() { "-0.0" } else { "0.0" }.to_owned();
    }
    let sign = if d < 0.0 { "-" } else { "" };
    // Rust's `{:e}` gives the shortest round-trip digits as `d.ddde±n`; only the layout differs.
    let scientific = format!("{:e}", d.abs());
    let Some((mantissa, exponent)) = scientific.split_once('e') else {
        return format!("{d:?}");
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return format!("{d:?}");
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    match usize::try_from(exponent) {
        Ok(e) if e < 7 => {
            let int_len = e + 1;
            match digits.split_at_checked(int_len) {
                Some((int, frac)) if !frac.is_empty() => format!("{sign}{int}.{frac}"),
                _ => format!(
                    "{sign}{digits}{}.0",
                    "0".repeat(int_len.saturating_sub(digits.len()))
                ),
            }
        }
        Err(_) if exponent >= -3 => {
            let zeros = "0".repeat(exponent.unsigned_abs() as usize - 1);
            format!("{sign}0.{zeros}{digits}")
        }
        _ => {
            let (first, rest) = digits.split_at_checked(1).unwrap_or((&digits, ""));
            let rest = if rest.is_empty() { "0" } else { rest };
            format!("{sign}{first}.{rest}E{exponent}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types one JSON value written as text.
    fn typed(json: &str) -> Option<Value> {
        let raw: &RawValue = serde_json::from_str(json).expect("test JSON");
        value_from_raw(raw).expect("typed")
    }

    fn long(json: &str) -> i64 {
        match typed(json) {
            Some(Value::Long(n)) => n,
            other => panic!("{json}: expected Long, got {other:?}"),
        }
    }

    fn double(json: &str) -> f64 {
        match typed(json) {
            Some(Value::Double(d)) => d,
            other => panic!("{json}: expected Double, got {other:?}"),
        }
    }

    fn string(json: &str) -> String {
        match typed(json) {
            Some(Value::String(s)) => s,
            other => panic!("{json}: expected String, got {other:?}"),
        }
    }

    fn kv(key: &str, value: Value) -> (String, Value) {
        (key.to_owned(), value)
    }

    // --- Typing: one test per row of the table. ---

    #[test]
    fn booleans_are_bool() {
        assert_eq!(typed("true"), Some(Value::Bool(true)));
        assert_eq!(typed("false"), Some(Value::Bool(false)));
    }

    #[test]
    fn integer_literals_are_long() {
        assert_eq!(long("42"), 42);
        assert_eq!(long("-7"), -7);
        assert_eq!(long("0"), 0);
        assert_eq!(long("-0"), 0);
        assert_eq!(long("100"), 100);
        assert_eq!(long("9223372036854775807"), i64::MAX);
        assert_eq!(long("-9223372036854775808"), i64::MIN);
    }

    #[test]
    fn integral_exponent_literals_are_long() {
        assert_eq!(long("1e3"), 1000);
        assert_eq!(long("5E2"), 500);
        assert_eq!(long("1E+1"), 10);
        assert_eq!(long("-2e0"), -2);
        // Fractional digits times a large enough exponent make an integer.
        assert_eq!(long("150e-1"), 15);
        assert_eq!(long("0e-20"), 0);
        assert_eq!(long("92233720368547758070e-1"), i64::MAX);
    }

    #[test]
    fn literals_with_a_dot_are_double_even_when_integral() {
        assert_eq!(double("42.0"), 42.0);
        // ThingsBoard: a `.` with an exponent does not make a double.
        assert_eq!(long("4.2e1"), 42);
        assert_eq!(string("9.9701010061400066E19"), "99701010061400066000");
        assert_eq!(double("1.0"), 1.0);
        assert_eq!(double("-0.0"), 0.0);
        assert!(double("-0.0").is_sign_positive());
    }

    #[test]
    fn fractional_numbers_are_double() {
        assert_eq!(double("4.5"), 4.5);
        assert_eq!(double("1.1"), 1.1);
        assert_eq!(double("1.5e-3"), 0.0015);
        assert_eq!(double("15e-1"), 1.5);
        assert_eq!(double("101E-1"), 10.1);
        assert_eq!(double("-2.25"), -2.25);
        // Sixteen digits after the point is still a double; the seventeenth is not.
        assert_eq!(double("0.1234567890123456"), 0.1234567890123456);
        assert_eq!(double("1.5e-15"), 1.5e-15);
        // Many integer digits are fine: the scale, not the length, decides.
        assert_eq!(double("123456789012345678901234567890.5"), 1.2345678901234568e29);
    }

    #[test]
    fn integers_beyond_i64_are_plain_strings() {
        assert_eq!(string("12345678901234567890"), "12345678901234567890");
        assert_eq!(string("9223372036854775808"), "9223372036854775808");
        assert_eq!(string("-9223372036854775809"), "-9223372036854775809");
        assert_eq!(string("1E19"), "10000000000000000000");
        assert_eq!(string("-25e20"), "-2500000000000000000000");
    }

    #[test]
    fn scale_beyond_sixteen_is_a_plain_string() {
        assert_eq!(string("0.12345678901234567890"), "0.12345678901234567890");
        assert_eq!(string("0.00000000000000001"), "0.00000000000000001");
        assert_eq!(string("1e-17"), "0.00000000000000001");
        assert_eq!(string("-1.5e-20"), "-0.000000000000000000015");
        // The scale as written counts, trailing zeros included.
        assert_eq!(string("1.50000000000000000000"), "1.50000000000000000000");
        assert_eq!(string("0.00000000000000000000"), "0.00000000000000000000");
    }

    #[test]
    fn doubles_too_large_for_f64_are_plain_strings() {
        let text = string("1.0e400");
        assert_eq!(text.len(), 401);
        assert!(text.starts_with("10000"));
    }

    #[test]
    fn huge_exponents_are_kept_as_written() {
        assert_eq!(string("1e10001"), "1e10001");
        assert_eq!(
            string("-2.5E-99999999999999999999999"),
            "-2.5E-99999999999999999999999"
        );
        assert_eq!(string("\"1e99999\""), "1e99999");
        // The bound itself is still expanded.
        assert_eq!(string("1e10000").len(), 10001);
    }

    #[test]
    fn numeric_strings_are_cast_by_the_same_rules() {
        assert_eq!(long("\"42\""), 42);
        assert_eq!(long("\"-7\""), -7);
        assert_eq!(long("\"007\""), 7);
        assert_eq!(string("\"-1e2\""), "-1e2");
        assert_eq!(double("\"4.5\""), 4.5);
        assert_eq!(double("\"42.0\""), 42.0);
        assert_eq!(double("\".5\""), 0.5);
        assert_eq!(double("\"-.5\""), -0.5);
        assert_eq!(string("\"12345678901234567890\""), "12345678901234567890");
        assert_eq!(string("\"0.12345678901234567890\""), "0.12345678901234567890");
    }

    #[test]
    fn non_numeric_strings_stay_strings() {
        for s in [
            "0x10",
            "NaN",
            "Infinity",
            "-Infinity",
            " 42",
            "42 ",
            "",
            "-",
            ".",
            "5.",
            "+5",
            "1e",
            "1e+",
            "1.2.3",
            "abc",
            "true",
            "4,5",
            "1_000",
        ] {
            let json = serde_json::to_string(s).expect("quote");
            assert_eq!(string(&json), s, "{json}");
        }
    }

    #[test]
    fn string_escapes_are_decoded() {
        assert_eq!(string(r#""a\"b\\c\n\u00e9""#), "a\"b\\c\né");
        assert_eq!(long(r#""\u0034\u0032""#), 42);
    }

    #[test]
    fn objects_and_arrays_are_compact_json() {
        assert_eq!(typed(r#"{"a":1}"#), Some(Value::Json(r#"{"a":1}"#.to_owned())));
        assert_eq!(typed("[1, 2]"), Some(Value::Json("[1,2]".to_owned())));
        assert_eq!(typed("[]"), Some(Value::Json("[]".to_owned())));
        assert_eq!(typed("{ }"), Some(Value::Json("{}".to_owned())));
    }

    #[test]
    fn json_keeps_literals_order_and_spaces_inside_strings() {
        let raw = "{ \"z\" : [1e3, 2.50, -0, 12345678901234567890] ,\n \
                   \"a b\":{\"y\" : \" c \",\"x\":null}, \"q\":true }";
        assert_eq!(
            typed(raw),
            Some(Value::Json(
                r#"{"z":[1e3,2.50,-0,12345678901234567890],"a b":{"y":" c ","x":null},"q":true}"#.to_owned()
            ))
        );
    }

    #[test]
    fn json_strings_are_re_escaped_canonically() {
        assert_eq!(
            typed(r#"{"\u0041":"\/ \u00e9 \" \\ \t"}"#),
            Some(Value::Json("{\"A\":\"/ é \\\" \\\\ \\t\"}".to_owned()))
        );
    }

    #[test]
    fn null_is_skipped() {
        assert_eq!(typed("null"), None);
    }

    // --- Decimal reading. ---

    #[test]
    fn decimals_split_into_unscaled_digits_and_scale() {
        let d = parse_decimal("-001.500e2").expect("decimal");
        assert_eq!(
            d,
            Decimal {
                negative: true,
                unscaled: "1500".to_owned(),
                scale: 1,
                has_dot: true,
                has_exp: true
            }
        );
        assert_eq!(d.stripped(), ("15", -1));
        assert_eq!(parse_decimal("100").expect("decimal").stripped(), ("1", -2));
        assert_eq!(parse_decimal("1.50").expect("decimal").stripped(), ("15", 1));
        assert_eq!(parse_decimal("0.000").expect("decimal").stripped(), ("", 0));
        assert_eq!(
            parse_decimal("1e99999").map(|_| ()),
            Err(NotDecimal::HugeExponent)
        );
        assert_eq!(parse_decimal("1e99999x").map(|_| ()), Err(NotDecimal::Syntax));
    }

    #[test]
    fn truncation_goes_toward_zero() {
        let t = |s: &str| parse_decimal(s).ok().and_then(|d| d.truncated());
        assert_eq!(t("1.9"), Some(1));
        assert_eq!(t("-1.9"), Some(-1));
        assert_eq!(t("0.5"), Some(0));
        assert_eq!(t("1.7e12"), Some(1_700_000_000_000));
        assert_eq!(t("123e-5"), Some(0));
        assert_eq!(t("9223372036854775807.9"), Some(i64::MAX));
        assert_eq!(t("9223372036854775808"), None);
    }

    // --- Telemetry. ---

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn telemetry_plain_object_uses_the_server_ts() {
        let got = parse_telemetry(
            br#"{"temperature":42,"humidity":73.4,"on":true,"label":"x"}"#,
            NOW,
        );
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: NOW,
                values: vec![
                    kv("temperature", Value::Long(42)),
                    kv("humidity", Value::Double(73.4)),
                    kv("on", Value::Bool(true)),
                    kv("label", Value::String("x".to_owned())),
                ],
            }])
        );
    }

    #[test]
    fn telemetry_ts_values_form() {
        let got = parse_telemetry(br#"{"ts":1451649600512,"values":{"a":1,"b":"2.5"}}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: 1_451_649_600_512,
                values: vec![kv("a", Value::Long(1)), kv("b", Value::Double(2.5))],
            }])
        );
    }

    #[test]
    fn telemetry_array_of_ts_values() {
        let got = parse_telemetry(br#"[{"ts":1,"values":{"a":1}},{"ts":2,"values":{"a":2}}]"#, NOW);
        assert_eq!(
            got,
            Ok(vec![
                TsKv {
                    ts_ms: 1,
                    values: vec![kv("a", Value::Long(1))]
                },
                TsKv {
                    ts_ms: 2,
                    values: vec![kv("a", Value::Long(2))]
                },
            ])
        );
    }

    #[test]
    fn telemetry_array_of_plain_objects() {
        let got = parse_telemetry(br#"[{"a":1},{"b":false}]"#, NOW);
        assert_eq!(
            got,
            Ok(vec![
                TsKv {
                    ts_ms: NOW,
                    values: vec![kv("a", Value::Long(1))]
                },
                TsKv {
                    ts_ms: NOW,
                    values: vec![kv("b", Value::Bool(false))]
                },
            ])
        );
    }

    #[test]
    fn telemetry_mixed_array() {
        let got = parse_telemetry(br#"[{"a":1},{"ts":5,"values":{"b":{"c":[1]}}}]"#, NOW);
        assert_eq!(
            got,
            Ok(vec![
                TsKv {
                    ts_ms: NOW,
                    values: vec![kv("a", Value::Long(1))]
                },
                TsKv {
                    ts_ms: 5,
                    values: vec![kv("b", Value::Json(r#"{"c":[1]}"#.to_owned()))]
                },
            ])
        );
    }

    #[test]
    fn telemetry_empty_object_and_array_give_nothing() {
        assert_eq!(parse_telemetry(b"{}", NOW), Ok(vec![]));
        assert_eq!(parse_telemetry(b" [ ] ", NOW), Ok(vec![]));
        assert_eq!(parse_telemetry(b"[{},{}]", NOW), Ok(vec![]));
        assert_eq!(parse_telemetry(br#"{"ts":1,"values":{}}"#, NOW), Ok(vec![]));
        // An entry whose values are all null has nothing to store either.
        assert_eq!(parse_telemetry(br#"{"a":null}"#, NOW), Ok(vec![]));
    }

    #[test]
    fn telemetry_float_ts_is_truncated() {
        let got = parse_telemetry(br#"{"ts":1451649600512.9,"values":{"a":1}}"#, NOW);
        assert_eq!(
            got.map(|v| v.iter().map(|e| e.ts_ms).collect::<Vec<_>>()),
            Ok(vec![1_451_649_600_512])
        );
        let got = parse_telemetry(br#"{"ts":1.7e12,"values":{"a":1}}"#, NOW);
        assert_eq!(
            got.map(|v| v.iter().map(|e| e.ts_ms).collect::<Vec<_>>()),
            Ok(vec![1_700_000_000_000])
        );
    }

    #[test]
    fn telemetry_extra_keys_beside_ts_and_values_are_ignored() {
        let got = parse_telemetry(
            br#"{"metadata":{"connector":"x"},"ts":7,"values":{"a":1},"other":2}"#,
            NOW,
        );
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: 7,
                values: vec![kv("a", Value::Long(1))]
            }])
        );
    }

    #[test]
    fn telemetry_ts_without_values_is_an_ordinary_key() {
        let got = parse_telemetry(br#"{"ts":7,"a":1}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: NOW,
                values: vec![kv("ts", Value::Long(7)), kv("a", Value::Long(1))]
            }])
        );
        let got = parse_telemetry(br#"{"values":{"a":1}}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: NOW,
                values: vec![kv("values", Value::Json(r#"{"a":1}"#.to_owned()))]
            }])
        );
    }

    #[test]
    fn telemetry_ts_may_be_a_numeric_string() {
        let got = parse_telemetry(br#"{"ts":"1451649600512","values":{"a":1}}"#, NOW).expect("parsed");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].ts_ms, 1_451_649_600_512);
    }

    #[test]
    fn telemetry_ts_must_be_a_number_in_range() {
        let bad = |payload: &[u8], found: &str| {
            assert_eq!(
                parse_telemetry(payload, NOW),
                Err(PayloadError::BadTs {
                    found: found.to_owned()
                }),
                "{}",
                String::from_utf8_lossy(payload)
            );
        };
        bad(br#"{"ts":"soon","values":{"a":1}}"#, "\"soon\"");
        bad(br#"{"ts":null,"values":{"a":1}}"#, "null");
        bad(br#"{"ts":true,"values":{"a":1}}"#, "true");
        bad(br#"{"ts":{},"values":{"a":1}}"#, "{}");
        bad(br#"{"ts":1e30,"values":{"a":1}}"#, "1e30");
        bad(br#"{"ts":1e99999,"values":{"a":1}}"#, "1e99999");
        bad(
            br#"{"ts":"0123456789012345678901234567890123456789xyz","values":{}}"#,
            "\"012345678901234567890123456789012345678",
        );
    }

    #[test]
    fn telemetry_values_must_be_an_object() {
        assert_eq!(
            parse_telemetry(br#"{"ts":1,"values":[1]}"#, NOW),
            Err(PayloadError::ValuesNotAnObject {
                found: JsonKind::Array
            })
        );
        assert_eq!(
            parse_telemetry(br#"{"ts":1,"values":null}"#, NOW),
            Err(PayloadError::ValuesNotAnObject {
                found: JsonKind::Null
            })
        );
    }

    #[test]
    fn telemetry_invalid_json_is_an_error() {
        let payloads: [&[u8]; 7] = [
            b"{",
            b"",
            b"{\"a\":}",
            b"{'a':1}",
            b"{\"a\":1} x",
            b"{\"a\":NaN}",
            b"\xff",
        ];
        for payload in payloads {
            assert!(
                matches!(parse_telemetry(payload, NOW), Err(PayloadError::InvalidJson(_))),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn telemetry_scalar_payload_is_an_error() {
        assert_eq!(
            parse_telemetry(b"42", NOW),
            Err(PayloadError::NotObjectOrArray {
                found: JsonKind::Number
            })
        );
        assert_eq!(
            parse_telemetry(b"\"a\"", NOW),
            Err(PayloadError::NotObjectOrArray {
                found: JsonKind::String
            })
        );
        assert_eq!(
            parse_telemetry(b"null", NOW),
            Err(PayloadError::NotObjectOrArray {
                found: JsonKind::Null
            })
        );
        assert_eq!(
            parse_telemetry(b"true", NOW),
            Err(PayloadError::NotObjectOrArray {
                found: JsonKind::Bool
            })
        );
    }

    #[test]
    fn telemetry_array_item_must_be_an_object() {
        assert_eq!(
            parse_telemetry(br#"[{"a":1},2]"#, NOW),
            Err(PayloadError::ArrayItemNotObject {
                index: 1,
                found: JsonKind::Number
            })
        );
        assert_eq!(
            parse_telemetry(br#"[[{"a":1}]]"#, NOW),
            Err(PayloadError::ArrayItemNotObject {
                index: 0,
                found: JsonKind::Array
            })
        );
    }

    #[test]
    fn telemetry_keeps_key_order_and_the_last_duplicate() {
        let got = parse_telemetry(br#"{"z":1,"a":2,"m":3,"a":4}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: NOW,
                values: vec![
                    kv("z", Value::Long(1)),
                    kv("a", Value::Long(4)),
                    kv("m", Value::Long(3))
                ],
            }])
        );
        // A later null removes the key, as it replaces the earlier value.
        let got = parse_telemetry(br#"{"a":1,"b":2,"a":null}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: NOW,
                values: vec![kv("b", Value::Long(2))]
            }])
        );
    }

    #[test]
    fn telemetry_skips_nulls() {
        let got = parse_telemetry(br#"{"ts":3,"values":{"a":null,"b":1}}"#, NOW);
        assert_eq!(
            got,
            Ok(vec![TsKv {
                ts_ms: 3,
                values: vec![kv("b", Value::Long(1))]
            }])
        );
    }

    // --- Attributes. ---

    #[test]
    fn attributes_object() {
        let got = parse_attributes(br#"{"firmware":"1.2.3","count":"10","ratio":0.5,"ok":false}"#);
        assert_eq!(
            got,
            Ok(vec![
                kv("firmware", Value::String("1.2.3".to_owned())),
                kv("count", Value::Long(10)),
                kv("ratio", Value::Double(0.5)),
                kv("ok", Value::Bool(false)),
            ])
        );
        assert_eq!(parse_attributes(b"{}"), Ok(vec![]));
    }

    #[test]
    fn attributes_nested_object_is_json() {
        let got = parse_attributes(br#"{"cfg":{"a": [1, {"b":null}]},"list":[]}"#);
        assert_eq!(
            got,
            Ok(vec![
                kv("cfg", Value::Json(r#"{"a":[1,{"b":null}]}"#.to_owned())),
                kv("list", Value::Json("[]".to_owned())),
            ])
        );
    }

    #[test]
    fn attributes_skip_nulls() {
        assert_eq!(
            parse_attributes(br#"{"a":null,"b":1}"#),
            Ok(vec![kv("b", Value::Long(1))])
        );
    }

    #[test]
    fn attributes_must_be_an_object() {
        assert_eq!(
            parse_attributes(br#"[{"a":1}]"#),
            Err(PayloadError::NotAnObject {
                found: JsonKind::Array
            })
        );
        assert_eq!(
            parse_attributes(b"1"),
            Err(PayloadError::NotAnObject {
                found: JsonKind::Number
            })
        );
        assert_eq!(
            parse_attributes(b"null"),
            Err(PayloadError::NotAnObject {
                found: JsonKind::Null
            })
        );
        assert!(matches!(
            parse_attributes(b"{\"a\""),
            Err(PayloadError::InvalidJson(_))
        ));
    }

    #[test]
    fn attributes_treat_ts_and_values_as_ordinary_keys() {
        assert_eq!(
            parse_attributes(br#"{"ts":1,"values":{"a":1}}"#),
            Ok(vec![
                kv("ts", Value::Long(1)),
                kv("values", Value::Json(r#"{"a":1}"#.to_owned()))
            ])
        );
    }

    // --- Value. ---

    #[test]
    fn to_json_is_typed() {
        use serde_json::json;
        assert_eq!(Value::Bool(true).to_json(), json!(true));
        assert_eq!(Value::Long(42).to_json(), json!(42));
        assert_eq!(Value::Double(4.5).to_json(), json!(4.5));
        assert_eq!(Value::String("s".to_owned()).to_json(), json!("s"));
        assert_eq!(
            Value::Json(r#"{"a":[1,"x"]}"#.to_owned()).to_json(),
            json!({"a": [1, "x"]})
        );
        assert_eq!(Value::Double(f64::NAN).to_json(), serde_json::Value::Null);
        assert_eq!(Value::Json("{oops".to_owned()).to_json(), json!("{oops"));
    }

    #[test]
    fn to_text_is_a_string() {
        assert_eq!(Value::Bool(true).to_text(), "true");
        assert_eq!(Value::Long(-42).to_text(), "-42");
        assert_eq!(Value::Double(4.5).to_text(), "4.5");
        assert_eq!(Value::String("s".to_owned()).to_text(), "s");
        assert_eq!(Value::Json(r#"{"a":1}"#.to_owned()).to_text(), r#"{"a":1}"#);
    }

    #[test]
    fn to_text_spells_doubles_as_java_does() {
        let cases = [
            (42.0, "42.0"),
            (4.5, "4.5"),
            (-0.5, "-0.5"),
            (100.0, "100.0"),
            (123.456, "123.456"),
            (0.001, "0.001"),
            (0.0001, "1.0E-4"),
            (1.5e-3, "0.0015"),
            (9_999_999.0, "9999999.0"),
            (1e7, "1.0E7"),
            (12_345_678.9, "1.23456789E7"),
            (1.2345678901234568e29, "1.2345678901234568E29"),
            (0.1 + 0.2, "0.30000000000000004"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (d, text) in cases {
            assert_eq!(Value::Double(d).to_text(), text, "{d:?}");
        }
    }

    #[test]
    fn type_names() {
        assert_eq!(Value::Bool(false).type_name(), "BOOLEAN");
        assert_eq!(Value::Long(0).type_name(), "LONG");
        assert_eq!(Value::Double(0.0).type_name(), "DOUBLE");
        assert_eq!(Value::String(String::new()).type_name(), "STRING");
        assert_eq!(Value::Json("{}".to_owned()).type_name(), "JSON");
    }

    #[test]
    fn values_round_trip_through_serde() {
        let entry = TsKv {
            ts_ms: 1,
            values: vec![
                kv("b", Value::Bool(true)),
                kv("l", Value::Long(-3)),
                kv("d", Value::Double(2.5)),
                kv("s", Value::String("x".to_owned())),
                kv("j", Value::Json("[1]".to_owned())),
            ],
        };
        let text = serde_json::to_string(&entry).expect("serialize");
        assert_eq!(serde_json::from_str::<TsKv>(&text).expect("deserialize"), entry);
    }

    #[test]
    fn errors_read_as_sentences() {
        assert_eq!(
            PayloadError::ArrayItemNotObject {
                index: 2,
                found: JsonKind::String
            }
            .to_string(),
            "telemetry array item 2 must be a JSON object, found a string"
        );
        assert_eq!(
            PayloadError::NotAnObject {
                found: JsonKind::Array
            }
            .to_string(),
            "expected a JSON object, found an array"
        );
    }
}
