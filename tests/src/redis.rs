//! Redis: one shared server per test process and dedicated servers for fault tests.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use crate::process::{self, Sharing, StopSignal, Supervised};

/// The binary, looked up on `PATH`.
const REDIS_SERVER: &str = "redis-server";
/// Attempts at a first start, each on a new free port, for when another process takes the port.
const START_ATTEMPTS: usize = 3;
/// Bounds one readiness probe, so a server that accepts but never answers cannot hang it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

static SHARED: OnceCell<RedisServer> = OnceCell::const_new();

/// The Redis server shared by every test in this process, started on first use, without
/// persistence. It stops and its directory is removed when the process exits, however it exits.
/// Tests share its keyspace: use unique keys, never `FLUSHALL`, never stop it (use
/// [`dedicated_redis`]).
///
/// # Panics
///
/// If the server cannot be started; the message includes the server's log.
pub async fn redis() -> &'static RedisServer {
    match SHARED.get_or_try_init(|| RedisServer::launch(Sharing::Shared, RedisPersistence::None)).await {
        Ok(server) => server,
        Err(error) => panic!("failed to start the shared redis server: {error:#}"),
    }
}

/// A private Redis server with its own directory and port, for tests that stop and start it.
/// Dropping it stops the server and removes its directory.
pub async fn dedicated_redis(persistence: RedisPersistence) -> Result<RedisServer> {
    RedisServer::launch(Sharing::Dedicated, persistence).await
}

/// What a Redis server keeps across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisPersistence {
    /// `--save '' --appendonly no`: a restart starts empty.
    None,
    /// `--appendonly yes --appendfsync everysec`: a clean stop keeps everything; a crash may
    /// lose the last second of writes.
    AppendOnlyEverySec,
}

/// A running (or, for a dedicated server, stopped) Redis server on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    sharing: Sharing,
    persistence: RedisPersistence,
    process: Supervised,
}

impl RedisServer {
    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn persistence(&self) -> RedisPersistence {
        self.persistence
    }

    /// The temporary directory holding `redis.conf`, `redis.log` and any append-only files;
    /// removed when the server is dropped or the process exits.
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// Clean shutdown (`SIGINT`; with append-only persistence the file is flushed): waits for
    /// the server to exit. The directory and port are kept for [`RedisServer::start`]. Only for
    /// dedicated servers.
    pub async fn stop(&self) -> Result<()> {
        self.refuse_if_shared("stop")?;
        self.process.stop(StopSignal::Int).await
    }

    /// `SIGKILL`: a crash, nothing is flushed. Only for dedicated servers.
    pub async fn crash(&self) -> Result<()> {
        self.refuse_if_shared("crash")?;
        self.process.stop(StopSignal::Kill).await
    }

    /// Starts a stopped server again on the same directory and port, and waits until it answers
    /// `PING` (after loading any append-only file). Only for dedicated servers.
    pub async fn start(&self) -> Result<()> {
        self.refuse_if_shared("start")?;
        self.process.start().await?;
        wait_until_ready(&self.process, self.port).await
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    fn refuse_if_shared(&self, action: &str) -> Result<()> {
        if self.sharing == Sharing::Shared {
            bail!("refusing to {action} the shared redis server; use dedicated_redis()");
        }
        Ok(())
    }

    async fn launch(sharing: Sharing, persistence: RedisPersistence) -> Result<RedisServer> {
        let dir = process::create_temp_dir("redis")?;
        let config = dir.join("redis.conf");
        let server_command = vec![REDIS_SERVER.into(), config.clone().into()];
        // From here on the supervisor owns the directory: any error below removes it.
        let process = Supervised::spawn("redis", dir.clone(), dir.join("redis.log"), server_command)?;
        let mut attempt = 1;
        let port = loop {
            let port = process::free_loopback_port()?;
            std::fs::write(&config, settings(&dir, port, persistence))
                .context("failed to write redis.conf")?;
            process.start().await?;
            match wait_until_ready(&process, port).await {
                Ok(()) => break port,
                // The port was probably taken between choosing and binding it: try another.
                Err(error) if process.server_exited() && attempt < START_ATTEMPTS => {
                    tracing::warn!(port, "redis exited during start-up, retrying: {error:#}");
                    process.stop(StopSignal::Int).await?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        tracing::info!(port, dir = %dir.display(), "redis ready");
        Ok(RedisServer { port, sharing, persistence, process })
    }
}

/// The whole configuration, in a file so a restart after `stop` reuses it.
fn settings(dir: &Path, port: u16, persistence: RedisPersistence) -> String {
    let persistence = match persistence {
        RedisPersistence::None => "appendonly no\n",
        RedisPersistence::AppendOnlyEverySec => "appendonly yes\nappendfsync everysec\n",
    };
    format!(
        "bind 127.0.0.1\n\
         port {port}\n\
         daemonize no\n\
         save \"\"\n\
         dir \"{}\"\n\
         {persistence}",
        dir.display()
    )
}

async fn wait_until_ready(process: &Supervised, port: u16) -> Result<()> {
    let address = format!("127.0.0.1:{port}");
    process.wait_until_ready(&address, || ping(&address)).await
}

/// One `PING` over a new connection; `Ok` only for `+PONG` (a loading server answers `-LOADING`).
async fn ping(address: &str) -> Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = Vec::new();
        let mut buffer = [0_u8; 64];
        while !reply.ends_with(b"\r\n") {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                bail!("connection closed");
            }
            reply.extend_from_slice(&buffer[..read]);
        }
        if reply != b"+PONG\r\n" {
            bail!("PING answered {:?}", String::from_utf8_lossy(&reply).trim_end());
        }
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange).await.context("PING timed out")?
}
