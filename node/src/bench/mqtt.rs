//! `thingraft bench mqtt`: N device connections publish QoS 1 telemetry (3 data points per
//! message) with a window of unacknowledged messages each; reports acknowledged messages/s, ack
//! latency percentiles, and the lag until a message is readable through the REST API.
//!
//! The devices are created through the REST API first (`bench-<i>`, token `bench-token-<i>`).
//! The MQTT client is a minimal one of our own (CONNECT, PUBLISH, PUBACK, PINGREQ), so that the
//! load generator costs little of the machine it shares with the node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, BytesMut};
use thingraft_transport_mqtt::codec::{self, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Meter, RestArgs, histogram, http};

#[derive(clap::Args)]
pub struct Args {
    /// MQTT address of a node.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: String,
    #[command(flatten)]
    rest: RestArgs,
    /// Device connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Unacknowledged messages per connection.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Total publish rate (messages/s); 0 = as fast as acknowledgements allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Also print the ack latency of every window of this many ms of the measured interval.
    #[arg(long)]
    timeline_ms: Option<u64>,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.connections > 0 && a.inflight > 0,
        "connections and inflight must be > 0"
    );
    anyhow::ensure!(a.inflight < 60_000, "inflight must be < 60000");
    let token = a.rest.login().await?;
    super::create_devices(&a.rest.http, &token, a.connections + 1).await?;
    let shared = Meter::with_timeline(a.timeline_ms.map(Duration::from_millis));
    eprintln!("connecting {} devices", a.connections);
    let mut conns = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let s = connect(&a.mqtt, &format!("bench-token-{i}"))
            .await
            .with_context(|| format!("connecting device {i}"))?;
        conns.push(s);
    }
    let per_conn_rate = (a.rate > 0).then(|| a.rate as f64 / a.connections as f64);
    let mut tasks = Vec::new();
    for (i, s) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(publisher(
            s,
            i,
            a.connections,
            a.inflight,
            per_conn_rate,
            shared.clone(),
        )));
    }
    // The lag probe: its own device, one message at a time, read back through REST.
    let probe_stream = connect(&a.mqtt, &format!("bench-token-{}", a.connections)).await?;
    let probe_id = device_id(&a.rest.http, &token, &format!("bench-{}", a.connections)).await?;
    let probe = tokio::spawn(lag_probe(
        probe_stream,
        a.rest.http.clone(),
        token.clone(),
        probe_id,
        shared.clone(),
    ));

    let (acked, secs, h) = shared.window(a.warmup, a.seconds).await;
    let lag = probe.await??;
    let mut failed = 0;
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            failed += 1;
            eprintln!("connection failed: {e:#}");
        }
    }
    let extra = format!(
        "connections: {} (failed {failed}), in flight per connection: {}, data points per message: 3\n\
         readable through REST after ack+apply: samples {}, lag µs p50 {} p99 {} max {}",
        a.connections,
        a.inflight,
        lag.len(),
        lag.value_at_quantile(0.5),
        lag.value_at_quantile(0.99),
        lag.max()
    );
    super::report("thingraft MQTT QoS 1 telemetry", acked, secs, &h, &extra);
    shared.print_timeline();
    Ok(())
}

async fn device_id(addr: &str, token: &str, name: &str) -> anyhow::Result<String> {
    let (code, body) = http::request(
        addr,
        "GET",
        &format!("/api/tenant/device?deviceName={name}"),
        Some(token),
        None,
    )
    .await?;
    anyhow::ensure!(code == 200, "device {name}: {code} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["id"]["id"].as_str().map(String::from).context("device id")
}

/// CONNECT (MQTT 3.1.1, the token as user name) and wait for CONNACK accepted.
async fn connect(addr: &str, token: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut body = Vec::new();
    body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 120]);
    body.extend_from_slice(&[0, 0]); // empty client id
    body.extend_from_slice(&(token.len() as u16).to_be_bytes());
    body.extend_from_slice(token.as_bytes());
    let mut pkt = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack)).await??;
    anyhow::ensure!(ack == [0x20, 2, 0, 0], "CONNACK refused: {ack:?}");
    Ok(s)
}

fn payload(seq: u64) -> String {
    format!(
        r#"{{"temperature":{}.5,"humidity":{},"pressure":{}}}"#,
        20 + seq % 10,
        40 + seq % 20,
        1000 + seq % 7
    )
}

/// Reads PUBACK packet ids from `buf` (skips anything else the server sends).
fn take_pubacks(buf: &mut BytesMut, out: &mut Vec<u16>) -> anyhow::Result<()> {
    loop {
        if buf.len() < 2 {
            return Ok(());
        }
        // Remaining length (at most 4 bytes).
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
        loop {
            let Some(&b) = buf.get(i) else { return Ok(()) };
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            anyhow::ensure!(i < 5, "malformed remaining length");
        }
        if buf.len() < i + len {
            return Ok(());
        }
        let kind = buf[0] >> 4;
        if kind == 4 && len >= 2 {
            out.push(u16::from_be_bytes([buf[i], buf[i + 1]]));
            anyhow::ensure!(
                len == 2 || buf[i + 2] == 0,
                "PUBACK with reason {:#x}",
                buf[i + 2]
            );
        }
        buf.advance(i + len);
    }
}

async fn publisher(
    s: TcpStream,
    conn: usize,
    connections: usize,
    inflight: usize,
    rate: Option<f64>,
    shared: Arc<Meter>,
) -> anyhow::Result<()> {
    let (mut rd, mut wr) = s.into_split();
    let mut sent_at: std::collections::HashMap<u16, Instant> =
        std::collections::HashMap::with_capacity(inflight);
    let mut next_pkid: u16 = 1;
    let mut outstanding = 0usize;
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut wbuf = BytesMut::with_capacity(4096);
    let mut acks = Vec::new();
    let mut seq = conn as u64;
    // Connections start their schedules evenly spread over one message interval, so that the
    // offered load arrives smoothly and not as one burst from every connection at once.
    let start = Instant::now()
        + rate.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(conn as f64 / (r * connections as f64))
        });
    let mut sent_total = 0u64;
    loop {
        if shared.stopped() {
            return Ok(());
        }
        // Fill the window (within the rate, if any).
        let allowed = match rate {
            Some(r) => ((Instant::now().saturating_duration_since(start).as_secs_f64() * r) as u64)
                .saturating_sub(sent_total),
            None => u64::MAX,
        };
        let mut n = 0u64;
        while outstanding < inflight && n < allowed {
            let pkid = next_pkid;
            next_pkid = if next_pkid >= 60_000 { 1 } else { next_pkid + 1 };
            codec::write_publish(
                &mut wbuf,
                Version::V3_1_1,
                "v1/devices/me/telemetry",
                1,
                pkid,
                payload(seq).as_bytes(),
            );
            seq += 1;
            sent_at.insert(pkid, Instant::now());
            outstanding += 1;
            n += 1;
        }
        sent_total += n;
        if !wbuf.is_empty() {
            wr.write_all(&wbuf).await?;
            wbuf.clear();
        }
        // Wait for acknowledgements, or (with a rate) until the next message is due.
        let due = rate.map(|r| start + Duration::from_secs_f64((sent_total + 1) as f64 / r));
        let read = match (outstanding, due) {
            (0, Some(due)) => {
                tokio::time::sleep_until(due.into()).await;
                continue;
            }
            (_, Some(due)) if outstanding < inflight => {
                match tokio::time::timeout_at(due.into(), rd.read_buf(&mut rbuf)).await {
                    Ok(r) => r?,
                    Err(_) => continue,
                }
            }
            _ => match tokio::time::timeout(Duration::from_secs(1), rd.read_buf(&mut rbuf)).await {
                Ok(r) => r?,
                Err(_) => continue,
            },
        };
        anyhow::ensure!(read > 0, "connection closed by the server");
        acks.clear();
        take_pubacks(&mut rbuf, &mut acks)?;
        let sent: Vec<Instant> = acks.iter().filter_map(|pkid| sent_at.remove(pkid)).collect();
        outstanding -= sent.len();
        shared.answered(sent, Instant::now());
    }
}

/// Publishes `{"probe":n}` every 100 ms and measures until REST shows it (to within 1 ms for
/// the first 5 ms, 10 ms after that).
async fn lag_probe(
    s: TcpStream,
    http_addr: String,
    token: String,
    device: String,
    shared: Arc<Meter>,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let (mut rd, mut wr) = s.into_split();
    let mut h = histogram();
    let mut n = 0u64;
    let mut rbuf = BytesMut::new();
    let path = format!("/api/plugins/telemetry/DEVICE/{device}/values/timeseries?keys=probe");
    while !shared.stopped() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !shared.measuring() {
            continue;
        }
        n += 1;
        let mut w = BytesMut::new();
        let body = format!(r#"{{"probe":{n}}}"#);
        codec::write_publish(
            &mut w,
            Version::V3_1_1,
            "v1/devices/me/telemetry",
            1,
            (n % 60_000 + 1) as u16,
            body.as_bytes(),
        );
        let t = Instant::now();
        wr.write_all(&w).await?;
        let want = format!("\"{n}\"");
        // Polls every 1 ms at first, then every 10 ms: the probe must not load the node it
        // measures (polling every 0.5 ms throughout made ~1,000 REST requests a second under load).
        let mut polls = 0u32;
        loop {
            let (code, resp) = http::request(&http_addr, "GET", &path, Some(&token), None).await?;
            if code == 200 && resp.contains(&want) {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("probe {n} not readable after 10 s");
            }
            polls += 1;
            let pause = if polls <= 5 { 1 } else { 10 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let _ = h.record(t.elapsed().as_micros() as u64);
        // Drain the PUBACKs.
        let _ = tokio::time::timeout(Duration::from_millis(1), rd.read_buf(&mut rbuf)).await;
        rbuf.clear();
    }
    Ok(h)
}
