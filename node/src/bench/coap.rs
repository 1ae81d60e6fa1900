//! `thingraft bench coap`: N CoAP clients, each on its own UDP socket and device, post
//! telemetry (3 data points) as confirmable requests with a window of unanswered ones; reports
//! 2.01 answers per second and their latency. A 2.01 comes only after the commit.
//!
//! Devices are `bench-<i>` with token `bench-token-<i>`, created through the REST API first.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use tokio::net::UdpSocket;

use super::{Meter, RestArgs};

#[derive(clap::Args)]
pub struct Args {
    /// CoAP (UDP) address of a node.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: String,
    #[command(flatten)]
    rest: RestArgs,
    /// Clients, each with its own socket and device.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Unanswered requests per client (RFC 7252's NSTART is 1).
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

struct Shared {
    meter: Arc<Meter>,
    /// Requests with no answer in 5 s.
    lost: AtomicU64,
    /// Requests answered with another code than 2.01.
    refused: AtomicU64,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.clients > 0 && a.inflight > 0,
        "clients and inflight must be > 0"
    );
    let jwt = a.rest.login().await?;
    super::create_devices(&a.rest.http, &jwt, a.clients).await?;
    let shared = Arc::new(Shared {
        meter: Meter::new(),
        lost: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for i in 0..a.clients {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(&a.coap).await?;
        tasks.push(tokio::spawn(client(sock, i, a.inflight, shared.clone())));
    }
    let (answered, secs, h) = shared.meter.window(a.warmup, a.seconds).await;
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            eprintln!("client failed: {e:#}");
        }
    }
    let extra = format!(
        "clients: {}, in flight per client: {}, data points per request: 3, unanswered in 5 s: {}, refused: {}",
        a.clients,
        a.inflight,
        shared.lost.load(Ordering::Relaxed),
        shared.refused.load(Ordering::Relaxed)
    );
    super::report("thingraft CoAP confirmable telemetry", answered, secs, &h, &extra);
    Ok(())
}

fn request(token: &str, mid: u16, seq: u64) -> anyhow::Result<Vec<u8>> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in ["api", "v1", token, "telemetry"] {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.payload = format!(
        r#"{{"temperature":{}.5,"humidity":{},"pressure":{}}}"#,
        20 + seq % 10,
        40 + seq % 20,
        1000 + seq % 7
    )
    .into_bytes();
    p.to_bytes().map_err(|e| anyhow::anyhow!("encoding: {e:?}"))
}

async fn client(sock: UdpSocket, i: usize, inflight: usize, shared: Arc<Shared>) -> anyhow::Result<()> {
    let token = format!("bench-token-{i}");
    let mut mid: u16 = (i as u16).wrapping_mul(7919);
    let mut sent: HashMap<u16, Instant> = HashMap::new();
    let mut seq = 0u64;
    let mut buf = [0u8; 1500];
    while !shared.meter.stopped() {
        while sent.len() < inflight {
            mid = mid.wrapping_add(1);
            sock.send(&request(&token, mid, seq)?).await?;
            seq += 1;
            sent.insert(mid, Instant::now());
        }
        match tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await {
            Err(_) => {
                // Lost (UDP): counted, and the window is refilled with new requests.
                shared.lost.fetch_add(sent.len() as u64, Ordering::Relaxed);
                sent.clear();
            }
            Ok(r) => {
                let n = r?;
                let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                    continue;
                };
                if p.header.code == MessageClass::Empty {
                    // An empty ACK: the answer follows as a separate response.
                    continue;
                }
                if p.header.get_type() == MessageType::Confirmable {
                    let mut ack = Packet::new();
                    ack.header.set_version(1);
                    ack.header.set_type(MessageType::Acknowledgement);
                    ack.header.message_id = p.header.message_id;
                    if let Ok(b) = ack.to_bytes() {
                        sock.send(&b).await?;
                    }
                }
                // Requests are matched by token (the request's message id), which separate
                // responses keep.
                let Ok(tok) = <[u8; 2]>::try_from(p.get_token()) else {
                    continue;
                };
                let Some(t) = sent.remove(&u16::from_be_bytes(tok)) else {
                    continue;
                };
                if p.header.code != MessageClass::Response(ResponseType::Created) {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                shared.meter.answered([t], Instant::now());
            }
        }
    }
    Ok(())
}
