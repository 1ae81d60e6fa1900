//! Authentication primitives for the ThingsBoard-compatible REST API: HS512 JWTs carrying the
//! claims ThingsBoard issues (access tokens for 9000 s, refresh tokens for 604800 s), extraction
//! of the bearer token from `X-Authorization` / `Authorization`, PBKDF2-HMAC-SHA256 password
//! hashes stored as `pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>`, and ThingsBoard's JSON
//! error envelope (`{"status","message","errorCode","timestamp"}`) as an axum response.

// The REST router wiring that uses these items lands next; until then most of them are unused.
#![allow(dead_code)]

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Sha256, Sha512};

type HmacSha512 = Hmac<Sha512>;
type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

/// Lifetime of an access token (ThingsBoard's `JWT_TOKEN_EXPIRATION_TIME` default).
pub const ACCESS_TOKEN_TTL_S: i64 = 9000;
/// Lifetime of a refresh token (ThingsBoard's `JWT_REFRESH_TOKEN_EXPIRATION_TIME` default).
pub const REFRESH_TOKEN_TTL_S: i64 = 604_800;
/// The `iss` claim ThingsBoard puts in its tokens.
pub const ISSUER: &str = "thingsboard.io";
/// The single scope of a refresh token.
pub const REFRESH_TOKEN_SCOPE: &str = "REFRESH_TOKEN";

/// The compact header ThingsBoard emits, byte for byte.
const JWT_HEADER: &[u8] = br#"{"alg":"HS512"}"#;

/// The claims of a ThingsBoard JWT. `None` names are omitted from the token, as ThingsBoard does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// The user's email.
    pub sub: String,
    /// `["TENANT_ADMIN"]`, `["CUSTOMER_USER"]` or `["SYS_ADMIN"]`; `["REFRESH_TOKEN"]` for a
    /// refresh token.
    pub scopes: Vec<String>,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    pub enabled: bool,
    pub is_public: bool,
    pub tenant_id: String,
    pub customer_id: String,
    pub session_id: String,
    /// [`ISSUER`].
    pub iss: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
}

/// Why a token was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url segments, a header that is not `HS512`, or claims that do not parse.
    Malformed,
    /// The signature does not match the secret.
    BadSignature,
    /// `exp` is not in the future.
    Expired,
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwtError::Malformed => "malformed token",
            JwtError::BadSignature => "invalid token signature",
            JwtError::Expired => "token has expired",
        })
    }
}

impl std::error::Error for JwtError {}

/// HMAC accepts keys of any length (longer ones are hashed), so this cannot fail.
fn hmac_sha512(key: &[u8]) -> HmacSha512 {
    HmacSha512::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// HMAC accepts keys of any length (longer ones are hashed), so this cannot fail.
fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// Signs `claims` into a compact JWT: `base64url(header).base64url(claims).base64url(sig)`.
pub fn encode(claims: &Claims, secret: &[u8]) -> String {
    // Strings, numbers and booleans only: serialization cannot fail.
    let payload = serde_json::to_vec(claims).expect("Claims serialize to JSON");
    let mut token = URL_SAFE_NO_PAD.encode(JWT_HEADER);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let mut mac = hmac_sha512(secret);
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Verifies `token`'s HS512 signature against `secret` (in constant time) and that it has not
/// expired (`exp > now_s`), and returns its claims.
///
/// The header must be a JSON object whose `alg` is `HS512`; any other algorithm (`none`
/// included) is [`JwtError::Malformed`]. The claims are parsed only once the signature checks.
pub fn decode(token: &str, secret: &[u8], now_s: i64) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| JwtError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
    if header.alg != "HS512" {
        return Err(JwtError::Malformed);
    }

    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let mut mac = hmac_sha512(secret);
    mac.update(&token.as_bytes()[..signed_len]);
    mac.verify_slice(&signature).map_err(|_| JwtError::BadSignature)?;

    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
    if claims.exp <= now_s {
        return Err(JwtError::Expired);
    }
    Ok(claims)
}

/// The token of an `X-Authorization: Bearer <t>` or `Authorization: Bearer <t>` header, in that
/// order of preference (ThingsBoard accepts both). The scheme is matched case-insensitively; a
/// header that is not a non-empty bearer token is skipped.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    ["x-authorization", "authorization"].into_iter().find_map(|name| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        let (scheme, token) = value.split_once([' ', '\t'])?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    })
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------------------------

/// PBKDF2 iterations of a new hash.
pub const PBKDF2_ITERATIONS: u32 = 100_000;
const PBKDF2_PREFIX: &str = "pbkdf2-sha256";
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Bounds on a stored hash, so a corrupt record cannot make a login spin or allocate.
const MAX_ITERATIONS: u32 = 10_000_000;
const MIN_STORED_HASH_LEN: usize = 16;
const MAX_STORED_HASH_LEN: usize = 64;

/// PBKDF2-HMAC-SHA256 (RFC 8018 §5.2) of `password` and `salt`, filling `out`.
fn pbkdf2_hmac_sha256(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    let prf = hmac_sha256(password);
    for (block_index, chunk) in (1u32..).zip(out.chunks_mut(HASH_LEN)) {
        let mut mac = prf.clone();
        mac.update(salt);
        mac.update(&block_index.to_be_bytes());
        let mut u = mac.finalize().into_bytes();
        let mut t = u;
        for _ in 1..iterations {
            let mut mac = prf.clone();
            mac.update(&u);
            u = mac.finalize().into_bytes();
            t.iter_mut().zip(u.iter()).for_each(|(t, u)| *t ^= u);
        }
        chunk.copy_from_slice(&t[..chunk.len()]);
    }
}

fn hash_password_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; HASH_LEN];
    pbkdf2_hmac_sha256(password.as_bytes(), salt, iterations, &mut hash);
    format!(
        "{PBKDF2_PREFIX}${iterations}${}${}",
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(hash)
    )
}

/// Hashes `password` with a fresh 16-byte random salt and [`PBKDF2_ITERATIONS`] iterations, as
/// `pbkdf2-sha256$<iterations>$<salt>$<hash>` (standard base64 without padding).
///
/// This takes tens of milliseconds of CPU: call it from `spawn_blocking` on a server.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; SALT_LEN] = rand::random();
    hash_password_with(password, &salt, PBKDF2_ITERATIONS)
}

/// Whether `password` matches a string made by [`hash_password`]; `false` if `stored` is
/// malformed. The comparison runs in constant time. Costs as much CPU as [`hash_password`].
pub fn verify_password(password: &str, stored: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some(PBKDF2_PREFIX), Some(iterations), Some(salt), Some(expected), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let Ok(iterations) = iterations.parse::<u32>() else {
        return false;
    };
    let (Ok(salt), Ok(expected)) = (STANDARD_NO_PAD.decode(salt), STANDARD_NO_PAD.decode(expected)) else {
        return false;
    };
    if !(1..=MAX_ITERATIONS).contains(&iterations)
        || !(MIN_STORED_HASH_LEN..=MAX_STORED_HASH_LEN).contains(&expected.len())
    {
        return false;
    }
    let mut actual = vec![0u8; expected.len()];
    pbkdf2_hmac_sha256(password.as_bytes(), &salt, iterations, &mut actual);
    actual
        .iter()
        .zip(&expected)
        .fold(0u8, |acc, (a, e)| acc | (a ^ e))
        == 0
}

// ---------------------------------------------------------------------------------------------
// Error envelope
// ---------------------------------------------------------------------------------------------

pub use thingraft_proto::error::tb_error_code as error_code;

/// A ThingsBoard error response:
/// `{"status":<http>,"message":"...","errorCode":<n>,"timestamp":<ms>}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub error_code: u32,
}

impl ApiError {
    pub fn status(status: StatusCode, message: impl Into<String>, error_code: u32) -> Self {
        ApiError {
            status,
            message: message.into(),
            error_code,
        }
    }

    /// 400, code 31.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::status(StatusCode::BAD_REQUEST, message, error_code::BAD_REQUEST_PARAMS)
    }

    /// 400, code 30.
    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::status(StatusCode::BAD_REQUEST, message, error_code::INVALID_ARGUMENTS)
    }

    /// 401, code 10.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::status(StatusCode::UNAUTHORIZED, message, error_code::AUTHENTICATION)
    }

    /// 401, code 10, "Invalid username or password": a failed login.
    pub fn invalid_credentials() -> Self {
        Self::unauthorized("Invalid username or password")
    }

    /// 401, code 10, "Authentication failed": a missing or invalid token.
    pub fn authentication_failed() -> Self {
        Self::unauthorized("Authentication failed")
    }

    /// 401, code 11, "Token has expired".
    pub fn token_expired() -> Self {
        Self::status(
            StatusCode::UNAUTHORIZED,
            "Token has expired",
            error_code::JWT_TOKEN_EXPIRED,
        )
    }

    /// 403, code 20.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::status(StatusCode::FORBIDDEN, message, error_code::PERMISSION_DENIED)
    }

    /// 404, code 32.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::status(StatusCode::NOT_FOUND, message, error_code::ITEM_NOT_FOUND)
    }

    /// 429, code 33.
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::status(
            StatusCode::TOO_MANY_REQUESTS,
            message,
            error_code::TOO_MANY_REQUESTS,
        )
    }

    /// 500, code 2.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(StatusCode::INTERNAL_SERVER_ERROR, message, error_code::GENERAL)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (error code {}): {}",
            self.status, self.error_code, self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// An expired token is "Token has expired" (code 11); any other bad token is
/// "Authentication failed" (code 10).
impl From<JwtError> for ApiError {
    fn from(e: JwtError) -> Self {
        match e {
            JwtError::Expired => ApiError::token_expired(),
            JwtError::Malformed | JwtError::BadSignature => ApiError::authentication_failed(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = thingraft_proto::error::tb_error_envelope(
            self.status.as_u16(),
            &self.message,
            self.error_code,
            unix_now_ms(),
        );
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use axum::http::header::CONTENT_TYPE;

    use super::*;

    const SECRET: &[u8] = b"secret";
    const NOW: i64 = 1_700_000_000;

    fn claims() -> Claims {
        Claims {
            sub: "tenant@thingsboard.org".into(),
            scopes: vec!["TENANT_ADMIN".into()],
            user_id: "5a797660-4612-11e7-a919-92ebcb67fe33".into(),
            first_name: None,
            last_name: Some("Admin".into()),
            enabled: true,
            is_public: false,
            tenant_id: "6b0bc0a0-4612-11e7-a919-92ebcb67fe33".into(),
            customer_id: "13814000-1dd2-11b2-8080-808080808080".into(),
            session_id: "0f4f2d2e-8e4b-4a5e-9a3b-6f3c0d1e2a11".into(),
            iss: ISSUER.into(),
            iat: NOW,
            exp: NOW + ACCESS_TOKEN_TTL_S,
        }
    }

    /// A token with arbitrary header and payload bytes, correctly signed.
    fn sign_raw(header: &[u8], payload: &[u8], secret: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let mut mac = hmac_sha512(secret);
        mac.update(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    fn segments(token: &str) -> Vec<&str> {
        token.split('.').collect()
    }

    #[test]
    fn round_trip() {
        let c = claims();
        let token = encode(&c, SECRET);
        assert_eq!(decode(&token, SECRET, NOW), Ok(c.clone()));
        let refresh = Claims {
            scopes: vec![REFRESH_TOKEN_SCOPE.into()],
            first_name: Some("Tenant".into()),
            exp: NOW + REFRESH_TOKEN_TTL_S,
            ..c
        };
        assert_eq!(decode(&encode(&refresh, SECRET), SECRET, NOW), Ok(refresh));
    }

    /// The exact bytes, cross-checked with Python's `hmac`/`json` (compact separators).
    #[test]
    fn golden_token() {
        let expected = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJ0ZW5hbnRAdGhpbmdzYm9hcmQub3JnIiwic2NvcGVzIjpbIlRFTkFOV\
            F9BRE1JTiJdLCJ1c2VySWQiOiI1YTc5NzY2MC00NjEyLTExZTctYTkxOS05MmViY2I2N2ZlMzMiLCJsYXN0TmFtZSI6IkFkbW\
            luIiwiZW5hYmxlZCI6dHJ1ZSwiaXNQdWJsaWMiOmZhbHNlLCJ0ZW5hbnRJZCI6IjZiMGJjMGEwLTQ2MTItMTFlNy1hOTE5LTk\
            yZWJjYjY3ZmUzMyIsImN1c3RvbWVySWQiOiIxMzgxNDAwMC0xZGQyLTExYjItODA4MC04MDgwODA4MDgwODAiLCJzZXNzaW9u\
            SWQiOiIwZjRmMmQyZS04ZTRiLTRhNWUtOWEzYi02ZjNjMGQxZTJhMTEiLCJpc3MiOiJ0aGluZ3Nib2FyZC5pbyIsImlhdCI6M\
            TcwMDAwMDAwMCwiZXhwIjoxNzAwMDA5MDAwfQ.BQWOyd6zuDBHPhBCJjgiLOsjU2YMVK_W_D-l0O0JBTESJG84XqBC9JxXnbe2\
            w0R17hC37mbAprQSIT7MUuG4Iw";
        assert_eq!(encode(&claims(), SECRET), expected);
    }

    #[test]
    fn header_is_thingsboards() {
        let token = encode(&claims(), SECRET);
        assert_eq!(segments(&token)[0], URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512"}"#));
        assert_eq!(segments(&token)[0], "eyJhbGciOiJIUzUxMiJ9");
    }

    #[test]
    fn claims_use_thingsboard_names() {
        let token = encode(&claims(), SECRET);
        let payload = URL_SAFE_NO_PAD.decode(segments(&token)[1]).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        for key in [
            "sub",
            "scopes",
            "userId",
            "lastName",
            "enabled",
            "isPublic",
            "tenantId",
            "customerId",
            "sessionId",
            "iss",
            "iat",
            "exp",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert!(json.get("firstName").is_none(), "None is omitted: {json}");
        assert_eq!(json["iss"], "thingsboard.io");
    }

    #[test]
    fn absent_names_decode_as_none() {
        let mut json = serde_json::to_value(claims()).unwrap();
        json.as_object_mut().unwrap().remove("lastName");
        let token = sign_raw(JWT_HEADER, json.to_string().as_bytes(), SECRET);
        let decoded = decode(&token, SECRET, NOW).unwrap();
        assert_eq!((decoded.first_name, decoded.last_name), (None, None));
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let token = encode(&claims(), SECRET);
        let parts = segments(&token);
        let forged = Claims {
            scopes: vec!["SYS_ADMIN".into()],
            ..claims()
        };
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(decode(&tampered, SECRET, NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn tampered_signature_is_bad_signature() {
        let token = encode(&claims(), SECRET);
        let parts = segments(&token);
        let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        signature[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&signature));
        assert_eq!(decode(&flipped, SECRET, NOW), Err(JwtError::BadSignature));
        let truncated = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            URL_SAFE_NO_PAD.encode(&signature[..32])
        );
        assert_eq!(decode(&truncated, SECRET, NOW), Err(JwtError::BadSignature));
        let empty = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(decode(&empty, SECRET, NOW), Err(JwtError::BadSignature));
        assert_eq!(decode(&token, b"other secret", NOW), Err(JwtError::BadSignature));
    }

    #[test]
    fn expiry_is_exclusive() {
        let token = encode(&claims(), SECRET);
        let exp = claims().exp;
        assert!(decode(&token, SECRET, exp - 1).is_ok());
        assert_eq!(decode(&token, SECRET, exp), Err(JwtError::Expired));
        assert_eq!(decode(&token, SECRET, exp + 1), Err(JwtError::Expired));
    }

    #[test]
    fn malformed_tokens() {
        let token = encode(&claims(), SECRET);
        let parts = segments(&token);
        let payload = serde_json::to_vec(&claims()).unwrap();
        let cases = [
            String::new(),
            "nodots".into(),
            "one.dot".into(),
            format!("{token}.extra"),
            format!("!!!.{}.{}", parts[1], parts[2]),
            format!("{}.not*base64.{}", parts[0], parts[2]),
            format!("{}.{}.$$$", parts[0], parts[1]),
            // Padded base64 is not base64url-without-padding.
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            sign_raw(b"not json", &payload, SECRET),
            sign_raw(br#"{"alg":"HS256"}"#, &payload, SECRET),
            sign_raw(br#"{"alg":"none"}"#, &payload, SECRET),
            sign_raw(br#"{"typ":"JWT"}"#, &payload, SECRET),
            sign_raw(JWT_HEADER, b"not json", SECRET),
            sign_raw(JWT_HEADER, br#"{"sub":"a@b.c"}"#, SECRET),
            sign_raw(JWT_HEADER, b"[]", SECRET),
        ];
        for case in cases {
            assert_eq!(decode(&case, SECRET, NOW), Err(JwtError::Malformed), "{case}");
        }
    }

    #[test]
    fn jwt_error_display() {
        assert_eq!(JwtError::Expired.to_string(), "token has expired");
        let e: Box<dyn std::error::Error> = Box::new(JwtError::Malformed);
        assert_eq!(e.to_string(), "malformed token");
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn bearer_from_either_header() {
        assert_eq!(
            bearer(&headers(&[("x-authorization", "Bearer abc.def.ghi")])),
            Some("abc.def.ghi")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc.def.ghi")])),
            Some("abc.def.ghi")
        );
        assert_eq!(bearer(&headers(&[("X-Authorization", "bearer t1")])), Some("t1"));
        assert_eq!(bearer(&headers(&[("Authorization", "BEARER  t2 ")])), Some("t2"));
        assert_eq!(
            bearer(&headers(&[
                ("authorization", "Bearer second"),
                ("x-authorization", "Bearer first")
            ])),
            Some("first")
        );
        // A non-bearer X-Authorization falls back to Authorization.
        assert_eq!(
            bearer(&headers(&[
                ("x-authorization", "Basic Zm9v"),
                ("authorization", "Bearer t3")
            ])),
            Some("t3")
        );
    }

    #[test]
    fn bearer_rejects_other_values() {
        assert_eq!(bearer(&HeaderMap::new()), None);
        assert_eq!(bearer(&headers(&[("authorization", "Basic Zm9vOmJhcg==")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer   ")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "Bearerabc")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "abc.def.ghi")])), None);
        let mut map = HeaderMap::new();
        map.insert("authorization", HeaderValue::from_bytes(b"Bearer \xff").unwrap());
        assert_eq!(bearer(&map), None);
    }

    fn pbkdf2_hex(password: &str, salt: &str, iterations: u32, len: usize) -> String {
        let mut out = vec![0u8; len];
        pbkdf2_hmac_sha256(password.as_bytes(), salt.as_bytes(), iterations, &mut out);
        out.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Well-known PBKDF2-HMAC-SHA256 vectors; the 64-byte ones are RFC 7914 §11's.
    #[test]
    fn pbkdf2_vectors() {
        let cases: [(&str, &str, u32, usize, &str); 6] = [
            (
                "password",
                "salt",
                1,
                32,
                "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b",
            ),
            (
                "password",
                "salt",
                2,
                32,
                "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43",
            ),
            (
                "password",
                "salt",
                4096,
                32,
                "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a",
            ),
            (
                "passwordPASSWORDpassword",
                "saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                40,
                "348c89dbcbd32b2f32d814b8116e84cf2b17347ebc1800181c4e2a1fb8dd53e1c635518c7dac47e9",
            ),
            (
                "passwd",
                "salt",
                1,
                64,
                "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
                 49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
            ),
            (
                "Password",
                "NaCl",
                80_000,
                64,
                "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56\
                 a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d",
            ),
        ];
        for (password, salt, iterations, len, expected) in cases {
            assert_eq!(
                pbkdf2_hex(password, salt, iterations, len),
                expected,
                "{password}/{salt}/{iterations}"
            );
        }
    }

    #[test]
    fn hash_and_verify() {
        let stored = hash_password("s3cret pässword");
        let parts: Vec<&str> = stored.split('$').collect();
        assert_eq!(parts.len(), 4, "{stored}");
        assert_eq!(parts[0], "pbkdf2-sha256");
        assert_eq!(parts[1], "100000");
        assert_eq!(STANDARD_NO_PAD.decode(parts[2]).unwrap().len(), SALT_LEN);
        assert_eq!(STANDARD_NO_PAD.decode(parts[3]).unwrap().len(), HASH_LEN);
        assert!(verify_password("s3cret pässword", &stored));
        assert!(!verify_password("s3cret password", &stored));
        assert!(!verify_password("", &stored));
        // A fresh salt each time.
        assert_ne!(hash_password("same"), hash_password("same"));
    }

    #[test]
    fn verify_honours_stored_iterations() {
        let stored = hash_password_with("pw", b"0123456789abcdef", 3);
        assert!(stored.starts_with("pbkdf2-sha256$3$"));
        assert!(verify_password("pw", &stored));
        assert!(!verify_password("pw2", &stored));
    }

    #[test]
    fn malformed_stored_hashes_never_verify() {
        let good = hash_password_with("pw", b"0123456789abcdef", 2);
        assert!(verify_password("pw", &good));
        let parts: Vec<&str> = good.split('$').collect();
        let (salt, hash) = (parts[2], parts[3]);
        let cases = [
            String::new(),
            "pw".into(),
            format!("bcrypt$2${salt}${hash}"),
            format!("pbkdf2-sha256$0${salt}${hash}"),
            format!("pbkdf2-sha256$-1${salt}${hash}"),
            format!("pbkdf2-sha256$x${salt}${hash}"),
            format!("pbkdf2-sha256$99999999999${salt}${hash}"),
            format!("pbkdf2-sha256$2$!!${hash}"),
            format!("pbkdf2-sha256$2${salt}$!!"),
            format!("pbkdf2-sha256$2${salt}$"),
            format!("pbkdf2-sha256$2${salt}${}", &hash[..8]),
            format!("pbkdf2-sha256$2${salt}"),
            format!("{good}$extra"),
        ];
        for case in cases {
            assert!(!verify_password("pw", &case), "{case}");
        }
    }

    async fn body_json(error: ApiError) -> (StatusCode, Option<HeaderValue>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, content_type, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn envelope_fields() {
        let before = unix_now_ms();
        let (status, content_type, json) = body_json(ApiError::invalid_credentials()).await;
        let after = unix_now_ms();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(content_type, Some(HeaderValue::from_static("application/json")));
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), 4, "{json}");
        assert_eq!(json["status"], 401);
        assert_eq!(json["message"], "Invalid username or password");
        assert_eq!(json["errorCode"], 10);
        let timestamp = json["timestamp"].as_i64().unwrap();
        assert!(
            (before..=after).contains(&timestamp),
            "{timestamp} not in {before}..={after}"
        );
    }

    #[tokio::test]
    async fn envelope_constructors() {
        let cases = [
            (ApiError::bad_request("b"), 400, 31, "b"),
            (ApiError::invalid_args("i"), 400, 30, "i"),
            (ApiError::unauthorized("u"), 401, 10, "u"),
            (
                ApiError::authentication_failed(),
                401,
                10,
                "Authentication failed",
            ),
            (ApiError::token_expired(), 401, 11, "Token has expired"),
            (ApiError::forbidden("f"), 403, 20, "f"),
            (ApiError::not_found("n"), 404, 32, "n"),
            (ApiError::too_many_requests("t"), 429, 33, "t"),
            (ApiError::internal("x"), 500, 2, "x"),
            (
                ApiError::status(StatusCode::CONFLICT, "c".to_string(), 2),
                409,
                2,
                "c",
            ),
        ];
        for (error, http, code, message) in cases {
            let (status, _, json) = body_json(error).await;
            assert_eq!(status.as_u16(), http);
            assert_eq!(json["status"], http);
            assert_eq!(json["errorCode"], code);
            assert_eq!(json["message"], message);
        }
    }

    #[test]
    fn jwt_errors_map_to_envelopes() {
        assert_eq!(ApiError::from(JwtError::Expired), ApiError::token_expired());
        assert_eq!(
            ApiError::from(JwtError::BadSignature),
            ApiError::authentication_failed()
        );
        assert_eq!(
            ApiError::from(JwtError::Malformed),
            ApiError::authentication_failed()
        );
        assert_eq!(
            ApiError::forbidden("nope").to_string(),
            "403 Forbidden (error code 20): nope"
        );
    }
}
