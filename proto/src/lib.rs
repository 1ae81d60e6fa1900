//! thingraft-proto: the wire schema and the one error-code table.
//!
//! - [`v1`]: log records as clients see them (`Log` service) and the node-to-node Raft transport
//!   (`Raft` service), generated from `proto/thingraft.proto`.
//! - [`tb`]: ThingsBoard's fixed device-API messages for protobuf devices.
//! - [`error`]: [`ErrorClass`], mapped to gRPC, HTTP, MQTT 5 and CoAP codes in one place.

pub mod device;
pub mod error;
pub mod records;

pub use error::ErrorClass;

/// ThingsBoard's fixed device-API messages for protobuf devices, generated from
/// `proto/tb_transport.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod tb {
    tonic::include_proto!("transport");
}

/// Generated from `proto/thingraft.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("thingraft.v1");
}
