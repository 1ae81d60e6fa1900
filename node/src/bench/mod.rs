//! Load generators: `thingraft bench log` (this log), `thingraft bench mqtt` and `thingraft
//! bench coap` (the device path end to end) and `thingraft bench nats` (NATS JetStream, the peer
//! the log is compared with, through a minimal client of our own). The HTTP device API is
//! measured with `wrk` (`bench/http.sh`).

mod coap;
mod http;
mod log;
mod mqtt;
mod nats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Append fixed-size records to a running node or cluster with N records in flight.
    Log(log::Args),
    /// N MQTT device connections publishing QoS 1 telemetry; acks/s, ack latency, REST lag.
    Mqtt(mqtt::Args),
    /// Publish to a NATS JetStream stream with N messages in flight (JetStream acks).
    Nats(nats::Args),
    /// N CoAP clients posting telemetry as confirmable requests; 2.01s/s and their latency.
    Coap(coap::Args),
    /// Create the bench devices (`bench-<i>`, token `bench-token-<i>`) through REST, for load
    /// generators of others (`wrk`).
    Devices(DevicesArgs),
}

/// Where the bench devices are created, and as whom.
#[derive(clap::Args)]
pub struct RestArgs {
    /// REST address of a node (bench devices are created there).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: String,
    #[arg(long, default_value = "tenant@thingsboard.org")]
    pub user: String,
    #[arg(long, default_value = "tenant")]
    pub password: String,
}

impl RestArgs {
    /// A JWT of the user.
    pub async fn login(&self) -> anyhow::Result<String> {
        http::login(&self.http, &self.user, &self.password).await
    }
}

#[derive(clap::Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    rest: RestArgs,
    #[arg(long, default_value_t = 100)]
    count: usize,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Log(a) => log::run(a).await,
        BenchCommand::Nats(a) => nats::run(a).await,
        BenchCommand::Mqtt(a) => mqtt::run(a).await,
        BenchCommand::Coap(a) => coap::run(a).await,
        BenchCommand::Devices(a) => {
            let jwt = a.rest.login().await?;
            create_devices(&a.rest.http, &jwt, a.count).await
        }
    }
}

/// Creates `n` devices through the REST API, `bench-<i>` with access token `bench-token-<i>`
/// (existing ones are reused).
pub async fn create_devices(addr: &str, jwt: &str, n: usize) -> anyhow::Result<()> {
    eprintln!("creating {n} devices (existing ones are reused)");
    for i in 0..n {
        let body = format!(r#"{{"name":"bench-{i}","type":"bench"}}"#);
        let (code, resp) = http::request(
            addr,
            "POST",
            &format!("/api/device?accessToken=bench-token-{i}"),
            Some(jwt),
            Some(&body),
        )
        .await?;
        anyhow::ensure!(
            code == 200 || resp.contains("already exists"),
            "creating bench-{i}: {code} {resp}"
        );
    }
    Ok(())
}

/// What a load generator's workers share: whether the measured window is open, whether to stop,
/// answers counted, and their latency while measuring.
pub struct Meter {
    measuring: AtomicBool,
    stop: AtomicBool,
    answered: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    timeline: Option<Timeline>,
}

/// Latency per window of the measured interval (`--timeline-ms`), to line up with what the
/// node does meanwhile (its log, RocksDB's LOG, the latency probe).
struct Timeline {
    step: Duration,
    /// When the measured interval began: as an `Instant`, and in ms since the Unix epoch.
    start: std::sync::OnceLock<(Instant, u128)>,
    windows: Mutex<Vec<Histogram<u64>>>,
}

impl Meter {
    pub fn new() -> Arc<Meter> {
        Self::with_timeline(None)
    }

    /// A meter that also keeps a latency histogram per `step` of the measured interval.
    pub fn with_timeline(step: Option<Duration>) -> Arc<Meter> {
        Arc::new(Meter {
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            hist: Mutex::new(histogram()),
            timeline: step.map(|step| Timeline {
                step,
                start: Default::default(),
                windows: Default::default(),
            }),
        })
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// Counts answers; while measuring, records the latency of each (sent at the instants
    /// given) up to `now`.
    pub fn answered(&self, sent: impl IntoIterator<Item = Instant>, now: Instant) {
        let mut n = 0;
        let mut h = self.measuring().then(|| self.hist.lock().expect("hist"));
        let mut tl = match (&h, &self.timeline) {
            (Some(_), Some(tl)) => tl.start.get().map(|(start, _)| {
                let i =
                    (now.saturating_duration_since(*start).as_micros() / tl.step.as_micros().max(1)) as usize;
                let mut w = tl.windows.lock().expect("timeline");
                if w.len() <= i {
                    w.resize_with(i + 1, histogram);
                }
                (w, i)
            }),
            _ => None,
        };
        for t in sent {
            n += 1;
            if let Some(h) = h.as_mut() {
                let us = now.duration_since(t).as_micros() as u64;
                let _ = h.record(us);
                if let Some((w, i)) = tl.as_mut() {
                    let _ = w[*i].record(us);
                }
            }
        }
        drop(tl);
        drop(h);
        self.answered.fetch_add(n, Ordering::Relaxed);
    }

    /// Warms up, measures for `seconds`, then tells the workers to stop; returns the answers in
    /// the window, its length in seconds, and their latency histogram.
    pub async fn window(&self, warmup: u64, seconds: u64) -> (u64, f64, Histogram<u64>) {
        tokio::time::sleep(Duration::from_secs(warmup)).await;
        let start = self.answered.load(Ordering::Relaxed);
        let t0 = Instant::now();
        if let Some(tl) = &self.timeline {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let _ = tl.start.set((t0, unix_ms));
        }
        self.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let answered = self.answered.load(Ordering::Relaxed) - start;
        let secs = t0.elapsed().as_secs_f64();
        self.measuring.store(false, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        (answered, secs, self.hist.lock().expect("hist").clone())
    }

    /// Prints the timeline, if one was kept: a line per window with its start (ms since the
    /// Unix epoch), the answers in it and their latency.
    pub fn print_timeline(&self) {
        let Some(tl) = &self.timeline else { return };
        let Some((_, start_ms)) = tl.start.get() else {
            return;
        };
        for (i, h) in tl.windows.lock().expect("timeline").iter().enumerate() {
            println!(
                "timeline: at_unix_ms {} n {} p50 {} p99 {} max {}",
                start_ms + i as u128 * tl.step.as_millis(),
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max()
            );
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Prints the standard result block and returns it as one JSON line too.
pub fn report(system: &str, acked: u64, seconds: f64, h: &Histogram<u64>, extra: &str) {
    let rate = acked as f64 / seconds;
    println!("system: {system}");
    println!("acknowledged: {acked} in {seconds:.2} s = {rate:.0} records/s");
    println!(
        "latency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    if !extra.is_empty() {
        println!("{extra}");
    }
    println!(
        "json: {{\"system\":\"{system}\",\"records_per_s\":{rate:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{}}}",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999)
    );
}
