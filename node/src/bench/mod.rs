//! Load generators: `thingraft bench log` (this log), `thingraft bench mqtt` (the device path
//! end to end) and `thingraft bench nats` (NATS JetStream, the peer the log is compared with,
//! through a minimal client of our own).

mod http;
mod log;
mod mqtt;
mod nats;

use hdrhistogram::Histogram;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Append fixed-size records to a running node or cluster with N records in flight.
    Log(log::Args),
    /// N MQTT device connections publishing QoS 1 telemetry; acks/s, ack latency, REST lag.
    Mqtt(mqtt::Args),
    /// Publish to a NATS JetStream stream with N messages in flight (JetStream acks).
    Nats(nats::Args),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Log(a) => log::run(a).await,
        BenchCommand::Nats(a) => nats::run(a).await,
        BenchCommand::Mqtt(a) => mqtt::run(a).await,
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
