//! The one table that maps every class of internal error to each protocol's own code.
//!
//! Transports and APIs classify their errors into an [`ErrorClass`] and answer with the code this
//! table gives; the detail goes to the log, not to the device.

/// A class of error, as protocols see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Malformed or invalid input (bad packet, JSON, unknown partition).
    BadRequest,
    /// The input is well-formed but larger than a configured limit.
    TooLarge,
    /// Credentials missing or wrong.
    Unauthorized,
    /// Authenticated, but not allowed.
    Forbidden,
    /// The named thing does not exist.
    NotFound,
    /// A bounded queue or rate limit is full; retry later.
    Overloaded,
    /// No leader, node starting or stopping, peer unreachable; retry later.
    Unavailable,
    /// The outcome is unknown (the write may or may not have committed).
    Timeout,
    /// A bug or a damaged store.
    Internal,
}

impl ErrorClass {
    /// The gRPC status code.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::BadRequest => Code::InvalidArgument,
            Self::TooLarge => Code::OutOfRange,
            Self::Unauthorized => Code::Unauthenticated,
            Self::Forbidden => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::Overloaded => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Timeout => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }

    /// The HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::TooLarge => 413,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Overloaded => 429,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    /// The MQTT 5 reason code (PUBACK / CONNACK / SUBACK).
    pub fn mqtt5_reason(self) -> u8 {
        match self {
            Self::BadRequest => 0x99,   // Payload format invalid
            Self::TooLarge => 0x95,     // Packet too large
            Self::Unauthorized => 0x86, // Bad user name or password
            Self::Forbidden => 0x87,    // Not authorized
            Self::NotFound => 0x90,     // Topic name invalid
            Self::Overloaded => 0x97,   // Quota exceeded
            Self::Unavailable => 0x88,  // Server unavailable
            Self::Timeout => 0x80,      // Unspecified error
            Self::Internal => 0x83,     // Implementation specific error
        }
    }

    /// The CoAP response code as (class, detail), e.g. (4, 0) for 4.00.
    pub fn coap_code(self) -> (u8, u8) {
        match self {
            Self::BadRequest => (4, 0),
            Self::TooLarge => (4, 13),
            Self::Unauthorized => (4, 1),
            Self::Forbidden => (4, 3),
            Self::NotFound => (4, 4),
            Self::Overloaded => (5, 3),
            Self::Unavailable => (5, 3),
            Self::Timeout => (5, 4),
            Self::Internal => (5, 0),
        }
    }

    /// The class of a gRPC status code (the inverse of [`Self::grpc_code`] where it is one).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::FailedPrecondition => Self::BadRequest,
            Code::OutOfRange => Self::TooLarge,
            Code::Unauthenticated => Self::Unauthorized,
            Code::PermissionDenied => Self::Forbidden,
            Code::NotFound => Self::NotFound,
            Code::ResourceExhausted => Self::Overloaded,
            Code::Unavailable | Code::Aborted => Self::Unavailable,
            Code::DeadlineExceeded | Code::Cancelled => Self::Timeout,
            _ => Self::Internal,
        }
    }
}

/// ThingsBoard's error codes (`ThingsboardErrorCode`), as its JSON error envelope carries them.
pub mod tb_error_code {
    pub const GENERAL: u32 = 2;
    pub const AUTHENTICATION: u32 = 10;
    pub const JWT_TOKEN_EXPIRED: u32 = 11;
    pub const PERMISSION_DENIED: u32 = 20;
    pub const INVALID_ARGUMENTS: u32 = 30;
    pub const BAD_REQUEST_PARAMS: u32 = 31;
    pub const ITEM_NOT_FOUND: u32 = 32;
    pub const TOO_MANY_REQUESTS: u32 = 33;
}

impl ErrorClass {
    /// ThingsBoard's `errorCode` for this class.
    pub fn tb_error_code(self) -> u32 {
        match self {
            Self::BadRequest | Self::TooLarge => tb_error_code::BAD_REQUEST_PARAMS,
            Self::Unauthorized => tb_error_code::AUTHENTICATION,
            Self::Forbidden => tb_error_code::PERMISSION_DENIED,
            Self::NotFound => tb_error_code::ITEM_NOT_FOUND,
            Self::Overloaded => tb_error_code::TOO_MANY_REQUESTS,
            Self::Unavailable | Self::Timeout | Self::Internal => tb_error_code::GENERAL,
        }
    }
}

/// ThingsBoard's JSON error envelope:
/// `{"status":<http>,"message":"...","errorCode":<n>,"timestamp":<ms>}`.
pub fn tb_error_envelope(status: u16, message: &str, error_code: u32, timestamp_ms: i64) -> String {
    serde_json::json!({
        "status": status,
        "message": message,
        "errorCode": error_code,
        "timestamp": timestamp_ms,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorClass; 9] = [
        ErrorClass::BadRequest,
        ErrorClass::TooLarge,
        ErrorClass::Unauthorized,
        ErrorClass::Forbidden,
        ErrorClass::NotFound,
        ErrorClass::Overloaded,
        ErrorClass::Unavailable,
        ErrorClass::Timeout,
        ErrorClass::Internal,
    ];

    #[test]
    fn grpc_codes_map_back_to_their_class() {
        for c in ALL {
            assert_eq!(ErrorClass::from_grpc_code(c.grpc_code()), c);
        }
    }

    #[test]
    fn client_errors_are_4xx_and_server_errors_5xx() {
        for c in ALL {
            let client = matches!(
                c,
                ErrorClass::BadRequest
                    | ErrorClass::TooLarge
                    | ErrorClass::Unauthorized
                    | ErrorClass::Forbidden
                    | ErrorClass::NotFound
                    | ErrorClass::Overloaded
            );
            assert_eq!(c.http_status() < 500, client, "{c:?}");
            assert!(c.mqtt5_reason() >= 0x80, "MQTT 5 failure codes are >= 0x80");
        }
    }
}
