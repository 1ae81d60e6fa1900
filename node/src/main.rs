//! `thingraft`: the node binary.
//!
//! - `serve`: run a node (single node with embedded defaults, or one node of a cluster).
//! - `status`: print a node's view of the cluster.
//! - `config print`: print the commented default configuration.
//! - `bench log` / `bench nats`: load generators (see BENCHMARKS.md).

mod bench;
mod config;
mod directory;
mod downlinks;
mod rest;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thingraft_log::{LogClient, LogNode};

use crate::config::{NodeConfig, Overrides};

#[derive(Parser)]
#[command(
    name = "thingraft",
    version,
    about = "An IoT platform on a built-in replicated Raft log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// TOML config file (see `thingraft config print`).
        #[arg(long, env = "THINGRAFT_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print a node's view of the cluster: members, partitions, leaders, lag.
    Status {
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Load generators.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the commented default configuration.
    Print,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve { config, overrides } => serve(config, overrides).await,
            Command::Status { addr, json } => status(&addr, json).await,
            Command::Config {
                command: ConfigCommand::Print,
            } => {
                print!("{}", config::DEFAULT_CONFIG_TOML);
                Ok(())
            }
            Command::Bench { command } => bench::run(command).await,
        }
    })
}

async fn serve(file: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(file.as_deref(), &overrides)?;
    let listener = tokio::net::TcpListener::bind(&cfg.node.grpc_listen)
        .await
        .with_context(|| format!("binding {}", cfg.node.grpc_listen))?;
    tracing::info!(
        node_id = cfg.log.node_id,
        grpc = %cfg.node.grpc_listen,
        data_dir = %cfg.log.data_dir.display(),
        partitions = cfg.log.partitions,
        members = cfg.log.members.len().max(1),
        "starting thingraft node"
    );
    // Bind every listener first, so a taken port fails the start at once.
    let mqtt_listener = match cfg.mqtt.listen.as_str() {
        "" => None,
        a => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding MQTT {a}"))?,
        ),
    };
    let mqtt_tls = match cfg.mqtt.tls_listen.as_str() {
        "" => None,
        a => Some((
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding MQTT TLS {a}"))?,
            thingraft_transport_mqtt::tls::acceptor(&cfg.mqtt).context("MQTT TLS certificate")?,
        )),
    };
    let http_listener = match cfg.http.listen.as_str() {
        "" => None,
        a => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding HTTP {a}"))?,
        ),
    };
    let coap_socket = match cfg.coap.listen.as_str() {
        "" => None,
        a => Some(thingraft_transport_coap::bind(&cfg.coap).with_context(|| format!("binding CoAP {a}"))?),
    };
    let coap_dtls = match cfg.coap.dtls_listen.as_str() {
        "" => None,
        a => Some((
            thingraft_transport_coap::bind_addr(a, &cfg.coap)
                .with_context(|| format!("binding CoAP DTLS {a}"))?,
            thingraft_transport_coap::dtls::context(&cfg.coap.dtls_cert_file, &cfg.coap.dtls_key_file)
                .context("CoAP DTLS certificate")?,
        )),
    };
    thingraft_log::probe::start();
    let (node, log_runtime) = start_log(&cfg, listener).await?;
    let handle = node.handle();
    let hub = thingraft_transport_common::Hub::new(cfg.transport.clone(), handle.clone());
    let mqtt = thingraft_transport_mqtt::Transport::new(cfg.mqtt.clone(), hub.clone());
    let downlinks = std::sync::Arc::new(downlinks::ClusterDownlinks {
        log: handle.clone(),
        hub: hub.clone(),
    });
    downlinks.install();
    let engine = thingraft_engine::Engine::start(
        handle.clone(),
        &cfg.log.data_dir.join("store"),
        downlinks,
        cfg.engine.clone(),
    )?;
    let eh = engine.handle();
    hub.set_directory(std::sync::Arc::new(directory::EngineDirectory {
        engine: eh.clone(),
        claim_allowed_by_default: cfg.security.claim_allowed_by_default,
        schemas: Default::default(),
    }));
    if let Some(l) = mqtt_listener {
        tracing::info!(addr = %cfg.mqtt.listen, "MQTT listening");
        tokio::spawn(mqtt.clone().serve(l));
    }
    if let Some((l, acceptor)) = mqtt_tls {
        tracing::info!(addr = %cfg.mqtt.tls_listen, "MQTT over TLS listening");
        tokio::spawn(mqtt.clone().serve_tls(l, acceptor));
    }
    let coap = coap_socket.map(|socket| {
        tracing::info!(addr = %cfg.coap.listen, "CoAP listening");
        let t = thingraft_transport_coap::Transport::new(cfg.coap.clone(), hub.clone(), socket);
        tokio::spawn(t.clone().serve());
        t
    });
    let coap_dtls = coap_dtls.map(|(socket, ctx)| {
        tracing::info!(addr = %cfg.coap.dtls_listen, "CoAP over DTLS listening");
        let t = thingraft_transport_coap::Transport::new_dtls(cfg.coap.clone(), hub.clone(), socket, ctx);
        tokio::spawn(t.clone().serve());
        t
    });
    let ready = {
        let handle = handle.clone();
        let eh = eh.clone();
        let hub = hub.clone();
        let seed = cfg.seed.seed();
        tokio::spawn(async move {
            if handle.wait_for_leaders(Duration::from_secs(60)).await.is_ok() {
                tracing::info!("all partitions have a leader");
            }
            // The cluster may still be forming: retry until the registry is reachable.
            let secret = loop {
                let seeded = eh.registry.seed(&seed, rest::auth::hash_password).await;
                match (seeded, eh.registry.shared_secret("jwt").await) {
                    (Ok(_), Ok(s)) => break s,
                    (a, b) => {
                        tracing::info!(seed = ?a.err(), secret = ?b.err(), "registry not ready; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            // What a lagging replica of the metadata group (this node was down, or lost its
            // data) has not applied yet would read as missing: a device that exists answers 404.
            while let Err(e) = handle.meta_barrier().await {
                tracing::info!(error = %e, "metadata not caught up; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // From here a device's unknown credentials are refused as such (MQTT, CoAP).
            hub.set_caught_up();
            tracing::info!("node ready");
            secret
        })
    };
    let http = if let Some(l) = http_listener {
        let addr = cfg.http.listen.clone();
        let eh = eh.clone();
        let hub = hub.clone();
        let device_http = cfg.http.device.clone();
        Some(tokio::spawn(async move {
            let Ok(secret) = ready.await else { return };
            let app = rest::router(rest::AppState {
                engine: eh,
                secret: std::sync::Arc::new(secret),
            })
            .merge(thingraft_transport_http::router(hub, device_http));
            tracing::info!(%addr, "REST API listening");
            use axum::serve::ListenerExt;
            // Answers go out at once, not after the client's delayed ACK.
            let l = l.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
            });
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "REST server failed");
            }
        }))
    } else {
        None
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    mqtt.shutdown();
    for c in coap.iter().chain(coap_dtls.iter()) {
        c.shutdown();
    }
    if let Some(h) = http {
        h.abort();
    }
    engine.shutdown().await;
    node.shutdown().await;
    if let Some(rt) = log_runtime {
        rt.shutdown_background();
    }
    Ok(())
}

/// Starts the log node: on a runtime of its own with `[node] log_threads` workers (returned, to
/// be shut down after the node), or on the caller's runtime when that is 0 (decision 0015).
async fn start_log(
    cfg: &NodeConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<(LogNode, Option<tokio::runtime::Runtime>)> {
    if cfg.node.log_threads == 0 {
        return Ok((LogNode::start(cfg.log.clone(), listener).await?, None));
    }
    // A listener belongs to the runtime it was made in: move it to the log's.
    let listener = listener.into_std()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.node.log_threads)
        .thread_name("log")
        .enable_all()
        .build()?;
    let log = cfg.log.clone();
    // Spawned there, the node's tasks (Raft groups, batchers, state machines, gRPC server) run
    // there, and so do the tasks they spawn.
    let started = rt
        .spawn(async move { LogNode::start(log, tokio::net::TcpListener::from_std(listener)?).await })
        .await;
    match started {
        Ok(Ok(node)) => Ok((node, Some(rt))),
        // A runtime must not be dropped inside another one.
        Ok(Err(e)) => {
            rt.shutdown_background();
            Err(e)
        }
        Err(e) => {
            rt.shutdown_background();
            Err(e.into())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn status(addr: &str, json: bool) -> anyhow::Result<()> {
    let client = LogClient::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let s = client.status(client.entry_node()).await?;
    if json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "group": g.group, "leader": g.leader, "term": g.term, "state": g.state,
                    "last_log_index": g.last_log_index, "applied_index": g.applied_index,
                    "next_offset": g.next_offset, "start_offset": g.start_offset,
                    "voters": g.voters, "learners": g.learners,
                    "batches": g.batches, "batched_records": g.batched_records,
                    "commit_us_total": g.commit_us_total,
                    "snapshots_installed": g.snapshots_installed,
                    "preferred_leader": g.preferred_leader,
                })
            })
            .collect();
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| serde_json::json!({"node_id": m.node_id, "addr": m.addr}))
            .collect();
        let v = serde_json::json!({
            "node_id": s.node_id, "initialized": s.initialized, "partitions": s.partitions,
            "members": members, "groups": groups,
            "fsyncs": s.fsyncs, "fsynced_appends": s.fsynced_appends, "fsync_us_total": s.fsync_us_total,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "node {} (initialized: {}), {} partitions",
        s.node_id, s.initialized, s.partitions
    );
    for m in &s.members {
        println!("  member {} at {}", m.node_id, m.addr);
    }
    println!(
        "{:>6} {:>6} {:>9} {:>6} {:>10} {:>10} {:>12} {:>10}  state",
        "group", "leader", "preferred", "term", "last_log", "applied", "next_offset", "lag"
    );
    for g in &s.groups {
        println!(
            "{:>6} {:>6} {:>9} {:>6} {:>10} {:>10} {:>12} {:>10}  {}",
            if g.group == 0 {
                "meta".to_string()
            } else {
                format!("p{}", g.group - 1)
            },
            g.leader,
            if g.preferred_leader == 0 {
                "-".to_string()
            } else {
                g.preferred_leader.to_string()
            },
            g.term,
            g.last_log_index,
            g.applied_index,
            g.next_offset,
            g.last_log_index.saturating_sub(g.applied_index),
            g.state
        );
    }
    let installed: u64 = s.groups.iter().map(|g| g.snapshots_installed).sum();
    if installed > 0 {
        println!("snapshots installed from leaders since start: {installed}");
    }
    // Counters since the node started: what group commit achieved here.
    let (batches, records, commit_us) = s.groups.iter().fold((0u64, 0u64, 0u64), |(b, r, c), g| {
        (b + g.batches, r + g.batched_records, c + g.commit_us_total)
    });
    println!(
        "entries proposed here {batches}, records {records} ({:.1} per entry), mean proposal to commit {} µs",
        records as f64 / batches.max(1) as f64,
        commit_us / batches.max(1)
    );
    println!(
        "fsyncs {}, appends made durable {} ({:.1} per fsync), mean fsync {} µs",
        s.fsyncs,
        s.fsynced_appends,
        s.fsynced_appends as f64 / s.fsyncs.max(1) as f64,
        s.fsync_us_total / s.fsyncs.max(1)
    );
    Ok(())
}
