//! thingraft-proto: the wire schema and the one error-code table.
//!
//! - [`v1`]: log records as clients see them (`Log` service) and the node-to-node Raft transport
//!   (`Raft` service), generated from `proto/thingraft.proto`.
//! - [`error`]: [`ErrorClass`], mapped to gRPC, HTTP, MQTT 5 and CoAP codes in one place.

pub mod device;
pub mod error;
pub mod records;

pub use error::ErrorClass;

/// Generated from `proto/thingraft.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("thingraft.v1");
}
