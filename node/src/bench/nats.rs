//! `thingraft bench nats`: publishes to a NATS JetStream stream and waits for each JetStream
//! PubAck, keeping N messages in flight; a minimal client of the NATS text protocol (CONNECT,
//! SUB, PUB with a reply inbox, MSG), so the comparison needs no extra crates.
//!
//! The reply subject of each publish carries its send time, so matching acks to sends needs no
//! shared table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(clap::Args)]
pub struct Args {
    /// A NATS server of the cluster.
    #[arg(long, default_value = "127.0.0.1:4222")]
    server: String,
    /// Stream name (created if missing, subjects `<stream>.>`).
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Stream replicas.
    #[arg(long, default_value_t = 3)]
    replicas: u32,
    /// Message size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages in flight.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
}

async fn read_msg<R: AsyncBufReadExt + Unpin>(
    rd: &mut R,
    line: &mut String,
) -> anyhow::Result<Option<(String, Vec<u8>)>> {
    line.clear();
    if rd.read_line(line).await? == 0 {
        anyhow::bail!("server closed the connection");
    }
    let l = line.trim_end();
    if let Some(rest) = l.strip_prefix("MSG ") {
        let parts: Vec<&str> = rest.split(' ').collect();
        let len: usize = parts.last().context("MSG without length")?.parse()?;
        let subject = parts[0].to_string();
        let mut payload = vec![0u8; len + 2];
        rd.read_exact(&mut payload).await?;
        payload.truncate(len);
        return Ok(Some((subject, payload)));
    }
    if l.starts_with("-ERR") {
        anyhow::bail!("server error: {l}");
    }
    Ok(None) // +OK, PING, PONG, INFO
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let sock = TcpStream::connect(&a.server)
        .await
        .with_context(|| format!("connecting to {}", a.server))?;
    sock.set_nodelay(true)?;
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(1 << 16, rd);
    let mut wr = BufWriter::with_capacity(1 << 16, wr);
    let mut line = String::new();
    rd.read_line(&mut line).await?; // INFO
    wr.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"echo\":false}\r\nSUB _INBOX.b.> 1\r\nPING\r\n")
        .await?;
    wr.flush().await?;
    loop {
        line.clear();
        rd.read_line(&mut line).await?;
        if line.starts_with("PONG") {
            break;
        }
        anyhow::ensure!(!line.starts_with("-ERR"), "connect failed: {line}");
    }
    // Create the stream (an "already in use" answer means it exists; that is fine).
    let cfg = format!(
        "{{\"name\":\"{}\",\"subjects\":[\"{}.>\"],\"num_replicas\":{},\"storage\":\"file\"}}",
        a.stream, a.stream, a.replicas
    );
    wr.write_all(
        format!(
            "PUB $JS.API.STREAM.CREATE.{} _INBOX.b.create {}\r\n{cfg}\r\n",
            a.stream,
            cfg.len()
        )
        .as_bytes(),
    )
    .await?;
    wr.flush().await?;
    let created = loop {
        if let Some((_, p)) = read_msg(&mut rd, &mut line).await? {
            break String::from_utf8_lossy(&p).into_owned();
        }
    };
    anyhow::ensure!(
        !created.contains("\"error\"") || created.contains("already in use"),
        "stream create failed: {created}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    let permits = Arc::new(Semaphore::new(a.inflight));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let payload = vec![b'x'; a.size];
    let subject = format!("{}.x", a.stream);

    let writer = {
        let (permits, stop) = (permits.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let p = match permits.try_acquire() {
                    Ok(p) => p,
                    Err(_) => {
                        wr.flush().await?;
                        match permits.acquire().await {
                            Ok(p) => p,
                            Err(_) => break,
                        }
                    }
                };
                p.forget();
                let t = start.elapsed().as_nanos();
                wr.write_all(format!("PUB {subject} _INBOX.b.{t} {}\r\n", payload.len()).as_bytes())
                    .await?;
                wr.write_all(&payload).await?;
                wr.write_all(b"\r\n").await?;
            }
            wr.flush().await?;
            anyhow::Ok(())
        })
    };
    let reader = {
        let (permits, stop, measuring, errors) =
            (permits.clone(), stop.clone(), measuring.clone(), errors.clone());
        tokio::spawn(async move {
            let mut h = super::histogram();
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                let msg = match tokio::time::timeout(Duration::from_millis(200), read_msg(&mut rd, &mut line))
                    .await
                {
                    Err(_) => continue,
                    Ok(m) => m?,
                };
                let Some((subj, p)) = msg else { continue };
                let Some(t) = subj
                    .strip_prefix("_INBOX.b.")
                    .and_then(|t| t.parse::<u128>().ok())
                else {
                    continue;
                };
                if p.windows(5).any(|w| w == b"\"seq\"") {
                    if measuring.load(Ordering::Relaxed) {
                        let us = (start.elapsed().as_nanos().saturating_sub(t) / 1000) as u64;
                        h.saturating_record(us);
                    }
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                permits.add_permits(1);
            }
            anyhow::Ok(h)
        })
    };
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    permits.close();
    let h = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .context("reader did not stop")???;
    writer.abort();
    let extra = format!(
        "stream: {} (R{}, file), in flight: {}, message: {} B, errors: {}",
        a.stream,
        a.replicas,
        a.inflight,
        a.size,
        errors.load(Ordering::Relaxed)
    );
    super::report(
        &format!("nats-jetstream R{}", a.replicas),
        h.len(),
        elapsed,
        &h,
        &extra,
    );
    Ok(())
}
