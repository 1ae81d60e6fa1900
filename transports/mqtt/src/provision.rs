//! ThingsBoard's MQTT device provisioning: a connection with user name (or client id)
//! `provision` may only publish `/provision/request` and receive `/provision/response`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Transport;
use crate::codec::{self, ConnackCode, Connect, DisconnectCode, Incoming, PubAckCode, Version};

/// The user name (or client id) of a provisioning connection.
pub(crate) const PROVISION: &str = "provision";

const REQUEST: &str = "/provision/request";
const RESPONSE: &str = "/provision/response";

pub(crate) fn is_provisioning(c: &Connect) -> bool {
    c.username.as_deref() == Some(PROVISION) || c.client_id == PROVISION
}

/// Serves a provisioning connection until the device leaves (or stays silent for a minute).
pub(crate) async fn serve(
    t: Arc<Transport>,
    mut stream: crate::Stream,
    mut rbuf: BytesMut,
    version: Version,
) {
    let mut wbuf = BytesMut::new();
    codec::write_connack(&mut wbuf, version, ConnackCode::Accepted, false);
    loop {
        if !wbuf.is_empty() {
            if stream.write_all(&wbuf).await.is_err() {
                return;
            }
            wbuf.clear();
        }
        loop {
            let p = match codec::read(&mut rbuf, Some(version), t.config.max_packet_bytes) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(error = %e, "provisioning connection: bad packet");
                    codec::write_disconnect(&mut wbuf, version, e.disconnect_code());
                    let _ = stream.write_all(&wbuf).await;
                    return;
                }
            };
            match p {
                Incoming::Disconnect => return,
                Incoming::PingReq => codec::write_pingresp(&mut wbuf, version),
                Incoming::PubAck { .. } => {}
                Incoming::Connect(_) => {
                    codec::write_disconnect(&mut wbuf, version, DisconnectCode::ProtocolError);
                    let _ = stream.write_all(&wbuf).await;
                    return;
                }
                Incoming::Subscribe { pkid, filters } => {
                    let results: Vec<Result<u8, ()>> = filters
                        .iter()
                        .map(|(f, qos)| if f == RESPONSE { Ok((*qos).min(1)) } else { Err(()) })
                        .collect();
                    codec::write_suback(&mut wbuf, version, pkid, &results);
                }
                Incoming::Unsubscribe { pkid, filters } => {
                    codec::write_unsuback(&mut wbuf, version, pkid, filters.len())
                }
                Incoming::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } => {
                    let ack = (qos > 0).then_some(pkid);
                    if topic != REQUEST {
                        tracing::info!(topic, "provisioning connection published elsewhere");
                        if let Some(pkid) = ack {
                            codec::write_puback(&mut wbuf, version, pkid, PubAckCode::TopicNameInvalid);
                        }
                        continue;
                    }
                    let Some(dir) = t.hub.directory() else {
                        codec::write_disconnect(
                            &mut wbuf,
                            version,
                            DisconnectCode::ImplementationSpecificError,
                        );
                        let _ = stream.write_all(&wbuf).await;
                        return;
                    };
                    match thingraft_transport_common::provision(dir.as_ref(), &payload).await {
                        Ok(answer) => {
                            if let Some(pkid) = ack {
                                codec::write_puback(&mut wbuf, version, pkid, PubAckCode::Success);
                            }
                            codec::write_publish(&mut wbuf, version, RESPONSE, 1, t.next_pkid(), &answer);
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "provision request refused");
                            match (version, ack) {
                                (Version::V5, Some(pkid)) => codec::write_puback(
                                    &mut wbuf,
                                    version,
                                    pkid,
                                    PubAckCode::PayloadFormatInvalid,
                                ),
                                (Version::V5, None) => {}
                                (Version::V3_1_1, _) => {
                                    let _ = stream.write_all(&wbuf).await;
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }
        if !wbuf.is_empty() {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(60), stream.read_buf(&mut rbuf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}
