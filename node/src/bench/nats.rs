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
    ping: &AtomicBool,
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
    if l == "PING" {
        // The server drops clients that do not answer its PINGs; the writer sends the PONG.
        ping.store(true, Ordering::Relaxed);
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
        if let Some((_, p)) = read_msg(&AtomicBool::new(false), &mut rd, &mut line).await? {
            break String::from_utf8_lossy(&p).into_owned();
        }
    };
    anyhow::ensure!(
        !created.contains("\"error\"") || created.contains("already in use"),
        "stream create failed: {created}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    let pending_pong = Arc::new(AtomicBool::new(false));
    let permits = Arc::new(Semaphore::new(a.inflight));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let payload = vec![b'x'; a.size];
    let subject = format!("{}.x", a.stream);

    let writer = {
        let (permits, stop, pong) = (permits.clone(), stop.clone(), pending_pong.clone());
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
                if pong.swap(false, Ordering::Relaxed) {
                    wr.write_all(b"PONG\r\n").await?;
                }
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
    let hist = Arc::new(std::sync::Mutex::new(super::histogram()));
    let reader = {
        let (permits, stop, measuring, errors, pending_pong) = (
            permits.clone(),
            stop.clone(),
            measuring.clone(),
            errors.clone(),
            pending_pong.clone(),
        );
        let hist = hist.clone();
        tokio::spawn(async move {
            let mut line = String::new();
            // Never cancel a read half-way (that would desynchronise the protocol); the task is
            // aborted once the run is over.
            while !stop.load(Ordering::Relaxed) {
                let Some((subj, p)) = read_msg(&pending_pong, &mut rd, &mut line).await? else {
                    continue;
                };
                let Some(t) = subj
                    .strip_prefix("_INBOX.b.")
                    .and_then(|t| t.parse::<u128>().ok())
                else {
                    continue;
                };
                if p.windows(5).any(|w| w == b"\"seq\"") {
                    if measuring.load(Ordering::Relaxed) {
                        let us = (start.elapsed().as_nanos().saturating_sub(t) / 1000) as u64;
                        hist.lock().expect("histogram lock").saturating_record(us);
                    }
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                permits.add_permits(1);
            }
            anyhow::Ok(())
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
    // A reader error before the end is a failed run; after it, the server closing our
    // half-closed connection is expected.
    if reader.is_finished() && !writer.is_finished() {
        let why = match reader.await {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(())) => "it returned".to_string(),
            Err(e) => e.to_string(),
        };
        anyhow::bail!("reader stopped early: {why}");
    }
    reader.abort();
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(1), reader).await
        && h_len(&hist) == 0
    {
        anyhow::bail!("reader failed: {e:#}");
    }
    let h = hist.lock().expect("histogram lock").clone();
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

fn h_len(h: &std::sync::Mutex<hdrhistogram::Histogram<u64>>) -> u64 {
    h.lock().expect("histogram lock").len()
}
