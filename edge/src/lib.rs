//! Tally's ingest server: the binary protocol and the HTTP API, API-key authentication,
//! validation against the service registry, and bounded queues into the sink workers.

pub mod admin;
pub mod auth;
pub mod config;
pub mod http;
pub mod ingest;
pub mod json;
pub mod registry;
pub mod rerate;
mod series;
pub mod tenants;
mod wire_server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sink::{IngestQueue, Store};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, EdgeConfig};

use auth::Authenticator;
use ingest::Ingestor;
use tenants::Tenants;

/// What every connection and request handler shares.
#[derive(Debug)]
pub struct EdgeState {
    pub config: EdgeConfig,
    pub store: Arc<Store>,
    pub auth: Authenticator,
    pub ingestor: Ingestor,
    /// Whether the sink workers are up and committing (`/ready`).
    pub workers: Arc<sink::WorkerHealth>,
    /// Re-rates running in the background.
    pub rerates: rerate::RerateJobs,
    next_shard: AtomicUsize,
}

impl EdgeState {
    /// Spreads HTTP requests over the queue shards.
    pub fn next_shard(&self) -> usize {
        self.next_shard.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running edge: its bound addresses, and the handle to stop it.
#[derive(Debug)]
pub struct RunningEdge {
    pub wire_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: Arc<EdgeState>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    http: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    maintenance: JoinHandle<()>,
    /// Rounds of partition maintenance finished so far (the first starts at once).
    maintenance_rounds: tokio::sync::watch::Receiver<u64>,
    folder: JoinHandle<()>,
    drainer: Option<JoinHandle<()>>,
}

/// Starts the listeners, sink workers and maintenance. The store must be migrated.
pub async fn start(config: EdgeConfig, store: Arc<Store>) -> anyhow::Result<RunningEdge> {
    start_with_routes(config, store, axum::Router::new()).await
}

/// Like [`start`], with more routes on the HTTP port (the usage listing of the query service,
/// which the older system's SDK calls on the ingest port).
pub async fn start_with_routes(
    config: EdgeConfig,
    store: Arc<Store>,
    extra_routes: axum::Router,
) -> anyhow::Result<RunningEdge> {
    config.validate()?;
    series::register();
    let overflow = match &config.overflow {
        Some(overflow) => Some(Arc::new(sink::overflow::Overflow::connect(overflow.clone()).await?)),
        None => None,
    };
    let queue = IngestQueue::with_overflow(config.queue, overflow.clone());
    let tenants = Arc::new(Tenants::new(store.clone(), config.tenant_cache_ttl));
    let state = Arc::new(EdgeState {
        auth: Authenticator::new(store.clone(), config.key_cache_ttl),
        ingestor: Ingestor::new(queue.clone(), tenants, config.window),
        workers: sink::WorkerHealth::new(config.queue.shards),
        store: store.clone(),
        rerates: rerate::RerateJobs::default(),
        next_shard: AtomicUsize::new(0),
        config,
    });
    let wire_listener = listen(state.config.wire_addr, "ingest binary protocol", "--wire-addr").await?;
    let http_listener = listen(state.config.http_addr, "ingest HTTP", "--http-addr").await?;
    let (wire_addr, http_addr) = (wire_listener.local_addr()?, http_listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();
    let workers = sink::spawn_workers(
        queue.clone(),
        store.clone(),
        overflow.clone(),
        state.config.batch,
        state.workers.clone(),
    );
    let drainer =
        overflow.map(|overflow| tokio::spawn(sink::overflow::run_drainer(overflow, store.clone(), queue)));
    tokio::spawn(wire_server::serve(wire_listener, state.clone(), shutdown.clone(), connections.clone()));
    let http = {
        let router = http::router(state.clone()).merge(extra_routes);
        let shutdown = shutdown.clone();
        let limits = state.config.http;
        let tls = state.config.tls.clone();
        tokio::spawn(serve::serve(http_listener, router, limits, tls, "ingest", shutdown))
    };
    let folder = tokio::spawn(sink::run_folder(store.clone(), state.config.fold));
    let (rounds, maintenance_rounds) = tokio::sync::watch::channel(0);
    let maintenance = tokio::spawn(maintain_forever(
        store,
        state.config.retention_with_window(),
        state.config.maintenance_interval,
        shutdown.clone(),
        rounds,
    ));
    tracing::info!(%wire_addr, %http_addr, "tally edge listening");
    Ok(RunningEdge {
        wire_addr,
        http_addr,
        state,
        shutdown,
        connections,
        http,
        workers,
        maintenance,
        maintenance_rounds,
        folder,
        drainer,
    })
}

/// Binds `addr`; the error names the listener and the flag that moves it.
async fn listen(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| telemetry::listen_error(addr, what, flag, error))
}

async fn maintain_forever(
    store: Arc<Store>,
    retention: sink::Retention,
    every: Duration,
    shutdown: CancellationToken,
    rounds: tokio::sync::watch::Sender<u64>,
) {
    loop {
        if let Err(error) = store.maintain(&retention).await {
            tracing::warn!(%error, "partition maintenance failed; retrying next round");
        }
        rounds.send_modify(|rounds| *rounds += 1);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

impl RunningEdge {
    /// Waits until `rounds` rounds of partition maintenance have finished (successful or not),
    /// for callers that must not race the first one.
    pub async fn maintenance_rounds(&self, rounds: u64) {
        let mut receiver = self.maintenance_rounds.clone();
        let _ = receiver.wait_for(|done| *done >= rounds).await;
    }

    /// Stops in order: listeners stop accepting and connections say `Goodbye` and answer what
    /// they hold; the queue closes and workers commit everything queued; then the rest.
    /// Returns whether everything finished within the configured deadline.
    pub async fn shutdown(self) -> bool {
        let deadline = self.state.config.shutdown_timeout;
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        self.connections.close();
        let connections_done = tokio::time::timeout(deadline, self.connections.wait()).await.is_ok();
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            connections_done,
            "connections closed"
        );
        let _ = tokio::time::timeout(deadline.saturating_sub(started.elapsed()), self.http).await;
        // Re-rates stop after the batch in hand and record themselves as interrupted.
        let rerates_done = self.state.rerates.stop(deadline.saturating_sub(started.elapsed())).await;
        self.state.ingestor.queue().close();
        let mut workers_done = true;
        for worker in self.workers {
            let remaining = deadline.saturating_sub(started.elapsed());
            workers_done &= tokio::time::timeout(remaining, worker).await.is_ok_and(|joined| joined.is_ok());
        }
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, workers_done, "sink drained");
        // What is left in the overflow stays there for the next start (or another edge) to drain.
        if let Some(drainer) = self.drainer {
            drainer.abort();
        }
        self.maintenance.abort();
        // An aborted fold is rolled back: what it held stays pending for the next fold.
        self.folder.abort();
        connections_done && workers_done && rerates_done
    }

    /// A token that stops the edge's listeners when cancelled (for signal handlers).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
