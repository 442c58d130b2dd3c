//! `--spawn`: a throwaway PostgreSQL (from the `tests` harness) and a `tally-edge` child process
//! on free loopback ports, with tenants and keys made by `tally-edge` itself. With `--embedded`
//! no PostgreSQL: the edge stores into SQLite in a fresh data directory inside its scratch
//! folder. Everything is removed when the [`Environment`] is dropped, on Ctrl-C, and (through the
//! supervisors) when this process is killed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::{Connection, Executor, PgConnection};

use crate::cpu;
use crate::http::HttpConnection;
use crate::verify::Database;

/// How long the edge may take to answer `/health` after it starts (it migrates first).
const EDGE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the edge may take to exit after `SIGTERM` before it is killed.
const EDGE_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of the edge's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// Runs the edge (`$2...`) with its output in `$1/edge.log`, prints its pid, and when its
/// standard input closes (the loader dropped it, exited, or was killed) stops the edge with
/// `SIGTERM` and removes the folder `$1`. Ignores the terminal's signals so that it outlives the
/// loader long enough to do that; the edge installs its own handlers and shuts down gracefully on
/// Ctrl-C by itself.
const SUPERVISOR_SCRIPT: &str = r#"
dir=$1; shift
trap '' INT TERM HUP
"$@" >>"$dir/edge.log" 2>&1 </dev/null &
child=$!
echo "$child"
while read -r _; do :; done
kill -TERM "$child" 2>/dev/null
wait "$child"
rm -rf "$dir"
"#;

/// What `--spawn` starts.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    pub tenants: usize,
    /// `tally-edge`; default: next to this executable.
    pub edge_bin: Option<PathBuf>,
    /// Extra flags for `tally-edge` (e.g. `--sink-workers=4`).
    pub edge_args: Vec<String>,
    /// Turn on `fsync`, `synchronous_commit` and `full_page_writes` (the harness turns them off).
    pub pg_durable: bool,
    /// Connect the edge (and verification) over PostgreSQL's Unix socket instead of TCP.
    pub pg_socket: bool,
    /// No PostgreSQL: the edge uses its embedded SQLite backend in a temporary data directory.
    pub embedded: bool,
}

/// Where a spawned `tally-edge` (server or admin command) stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeStorage {
    /// `DATABASE_URL` set to this.
    Postgres(String),
    /// No `DATABASE_URL`; `--data-dir` this folder (the file is `tally.db` inside).
    Embedded(PathBuf),
}

impl EdgeStorage {
    /// Points a `tally-edge` command at the storage. The embedded case removes `DATABASE_URL`
    /// and `TALLY_DATA_DIR` from its environment, so nothing inherited can redirect it.
    fn configure(&self, command: &mut Command) {
        match self {
            EdgeStorage::Postgres(url) => {
                command.env("DATABASE_URL", url);
            }
            EdgeStorage::Embedded(data_dir) => {
                command
                    .env_remove("DATABASE_URL")
                    .env_remove("TALLY_DATA_DIR")
                    .arg("--data-dir")
                    .arg(data_dir);
            }
        }
    }

    /// The database to verify against.
    pub fn database(&self) -> Database {
        match self {
            EdgeStorage::Postgres(url) => Database::Postgres(url.clone()),
            EdgeStorage::Embedded(data_dir) => {
                Database::Sqlite(data_dir.join(sink::sqlite::DATABASE_FILE_NAME))
            }
        }
    }
}

/// A spawned edge, and the PostgreSQL behind it unless embedded. Fields drop in order: the edge
/// stops (and its scratch folder, with an embedded data directory, goes) before the database.
#[derive(Debug)]
pub struct Environment {
    pub edge: EdgeChild,
    pub tenants: Vec<SpawnedTenant>,
    pub storage: EdgeStorage,
    pub postgres: Option<SpawnedPostgres>,
    pub edge_bin: PathBuf,
}

/// A harness PostgreSQL server and the fresh database the edge uses. The database drops first.
#[derive(Debug)]
pub struct SpawnedPostgres {
    pub database: tests::TestDb,
    pub server: tests::PgServer,
}

/// A tenant made by `tally-edge tenant create`, with its key.
#[derive(Debug, Clone)]
pub struct SpawnedTenant {
    pub name: String,
    pub id: uuid::Uuid,
    pub api_key: String,
}

impl Environment {
    /// Starts PostgreSQL and migrates a fresh database (or, embedded, makes a data directory),
    /// creates tenants and keys, starts the edge and waits until it answers `/health`.
    pub async fn start(options: &SpawnOptions) -> Result<Environment> {
        let edge_bin = edge_binary(options.edge_bin.as_deref())?;
        let scratch = ScratchDir::create()?;
        let (storage, postgres) = match options.embedded {
            true => (EdgeStorage::Embedded(scratch.path().join("data")), None),
            false => {
                let server = start_postgres(options.pg_durable).await?;
                let mut database = server.fresh_database().await?;
                database.url = database_url(&server, &database, options.pg_socket);
                (EdgeStorage::Postgres(database.url.clone()), Some(SpawnedPostgres { database, server }))
            }
        };
        migrate(&edge_bin, &storage).await?;
        let tenants = create_tenants(&edge_bin, &storage, options.tenants, "load").await?;
        let edge = EdgeChild::start_in(scratch, &edge_bin, &storage, &options.edge_args).await?;
        Ok(Environment { edge, tenants, storage, postgres, edge_bin })
    }

    pub fn api_keys(&self) -> Vec<String> {
        self.tenants.iter().map(|tenant| tenant.api_key.clone()).collect()
    }

    /// The postmaster's pid; `None` when embedded.
    pub fn postmaster_pid(&self) -> Result<Option<u32>> {
        self.postgres.as_ref().map(|postgres| cpu_postmaster(&postgres.server)).transpose()
    }
}

/// A fresh folder under the system's temporary directory, removed when dropped (and by the edge
/// supervisor when this process dies).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn create() -> Result<ScratchDir> {
        let dir = std::env::temp_dir().join(format!("tally-load-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The URL of `database`: over TCP as the harness gives it, or over the server's Unix socket.
///
/// Why the choice matters: sqlx does not set `TCP_NODELAY`, and a `COPY` ends with a small
/// `CopyDone` write behind the data, which Nagle's algorithm holds until the server's delayed
/// ACK (about 40 ms on Linux). A Unix socket has no such delay.
pub fn database_url(server: &tests::PgServer, database: &tests::TestDb, unix_socket: bool) -> String {
    match unix_socket {
        true => format!(
            "postgres://tally@localhost:{}/{}?host={}",
            server.port(),
            database.name,
            server.dir().display()
        ),
        false => database.url.clone(),
    }
}

/// The pid of a harness server's postmaster.
pub fn cpu_postmaster(server: &tests::PgServer) -> Result<u32> {
    cpu::postmaster_pid(&server.dir().join("data"))
}

/// `tally-edge` next to this executable, or the given path.
pub fn edge_binary(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => {
            let exe = std::env::current_exe().context("failed to find this executable")?;
            exe.parent().context("this executable has no folder")?.join("tally-edge")
        }
    };
    if !path.is_file() {
        bail!("no tally-edge at {}: build it (cargo build -p tally) or pass --edge-bin", path.display());
    }
    Ok(path)
}

/// A dedicated PostgreSQL from the harness, made durable on request.
pub async fn start_postgres(durable: bool) -> Result<tests::PgServer> {
    let server = tests::dedicated_postgres().await.context("failed to start PostgreSQL")?;
    if durable {
        make_durable(&server).await?;
    }
    Ok(server)
}

/// The harness turns durability off for speed; a benchmark of durable acks wants it on.
async fn make_durable(server: &tests::PgServer) -> Result<()> {
    let url = server.url("postgres");
    let mut connection = PgConnection::connect(&url).await?;
    for setting in ["fsync = on", "synchronous_commit = on", "full_page_writes = on"] {
        connection.execute(sqlx::AssertSqlSafe(format!("ALTER SYSTEM SET {setting}"))).await?;
    }
    connection.execute("SELECT pg_reload_conf()").await?;
    connection.close().await?;
    // The reload is asynchronous: wait until a new session sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut connection = PgConnection::connect(&url).await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&mut connection).await?;
        connection.close().await?;
        if fsync == "on" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not turn fsync on after a reload");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `version`, `fsync`, `synchronous_commit`, `shared_buffers` of the server behind `url`.
pub async fn describe_postgres(url: &str) -> Result<String> {
    let mut connection = PgConnection::connect(url).await?;
    let mut parts = Vec::new();
    for (name, query) in [
        ("", "SHOW server_version"),
        ("fsync", "SHOW fsync"),
        ("synchronous_commit", "SHOW synchronous_commit"),
        ("full_page_writes", "SHOW full_page_writes"),
        ("shared_buffers", "SHOW shared_buffers"),
    ] {
        let value: String = sqlx::query_scalar(query).fetch_one(&mut connection).await?;
        parts.push(if name.is_empty() { format!("PostgreSQL {value}") } else { format!("{name}={value}") });
    }
    connection.close().await?;
    Ok(parts.join(", "))
}

/// `tally-edge migrate`: the schema and today's partitions (embedded: the file and its schema).
pub async fn migrate(edge_bin: &Path, storage: &EdgeStorage) -> Result<()> {
    run_admin(edge_bin, storage, &["migrate"]).await.map(drop)
}

/// `tally-edge tenant create` and `key create` for `count` tenants named `{prefix}-{i}`.
pub async fn create_tenants(
    edge_bin: &Path,
    storage: &EdgeStorage,
    count: usize,
    prefix: &str,
) -> Result<Vec<SpawnedTenant>> {
    let mut tenants = Vec::with_capacity(count);
    for index in 0..count {
        let name = format!("{prefix}-{index}");
        let created = run_admin(edge_bin, storage, &["tenant", "create", &name]).await?;
        let id = created
            .lines()
            .find_map(|line| line.rsplit_once("with id ").map(|(_, id)| id.trim().to_owned()))
            .and_then(|id| uuid::Uuid::parse_str(&id).ok())
            .with_context(|| format!("tally-edge tenant create printed no id: {created:?}"))?;
        let output =
            run_admin(edge_bin, storage, &["key", "create", "--tenant", &name, "--scopes", "ingest"]).await?;
        let api_key = output.lines().last().map(str::trim).filter(|key| !key.is_empty());
        let api_key = api_key.context("tally-edge key create printed no key")?.to_owned();
        tenants.push(SpawnedTenant { name, id, api_key });
    }
    Ok(tenants)
}

async fn run_admin(edge_bin: &Path, storage: &EdgeStorage, args: &[&str]) -> Result<String> {
    let mut command = tokio::process::Command::new(edge_bin);
    command.args(args).env("RUST_LOG", "warn").kill_on_drop(true);
    storage.configure(command.as_std_mut());
    let output = command.output().await.with_context(|| format!("failed to run {}", edge_bin.display()))?;
    if !output.status.success() {
        bail!(
            "tally-edge {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A `tally-edge` server under a small `sh` supervisor (see [`SUPERVISOR_SCRIPT`]).
#[derive(Debug)]
pub struct EdgeChild {
    supervisor: Child,
    pid: u32,
    dir: ScratchDir,
    pub wire_addr: String,
    pub http_addr: String,
}

impl EdgeChild {
    /// Starts the server on two free loopback ports and waits until `/health` answers.
    pub async fn start(edge_bin: &Path, storage: &EdgeStorage, extra_args: &[String]) -> Result<EdgeChild> {
        Self::start_in(ScratchDir::create()?, edge_bin, storage, extra_args).await
    }

    /// Like [`EdgeChild::start`], with its log in `dir` (which it removes when it stops, with
    /// whatever else is in it, such as an embedded data directory).
    pub async fn start_in(
        dir: ScratchDir,
        edge_bin: &Path,
        storage: &EdgeStorage,
        extra_args: &[String],
    ) -> Result<EdgeChild> {
        let (wire_addr, http_addr) = free_loopback_addresses()?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SUPERVISOR_SCRIPT)
            .arg("tally-edge-supervisor")
            .arg(dir.path())
            .arg(edge_bin)
            .args(["--wire-addr", &wire_addr, "--http-addr", &http_addr])
            .args(extra_args)
            .env("RUST_LOG", std::env::var("TALLY_EDGE_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        storage.configure(&mut command);
        let mut supervisor = command.spawn().context("failed to start the edge supervisor")?;
        let pid = supervisor.stdout.take().and_then(|stdout| {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).ok()?;
            line.trim().parse::<u32>().ok()
        });
        let edge = EdgeChild { supervisor, pid: pid.unwrap_or(0), dir, wire_addr, http_addr };
        if edge.pid == 0 {
            bail!("the edge supervisor printed no pid");
        }
        edge.wait_until_healthy().await?;
        Ok(edge)
    }

    /// The edge server's own pid (not the supervisor's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines of the edge's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("edge.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn has_exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).map_or(true, |stat| {
            stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    }

    async fn wait_until_healthy(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let probe = async {
                let mut connection = HttpConnection::connect(&self.http_addr).await?;
                connection.request("GET", "/health", None, b"").await
            };
            let last_error = match probe.await {
                Ok(response) if response.status == 200 => return Ok(()),
                Ok(response) => format!("HTTP {}", response.status),
                Err(error) => error.to_string(),
            };
            if self.has_exited() || started.elapsed() > EDGE_READY_TIMEOUT {
                bail!(
                    "tally-edge did not become healthy on {} ({last_error}); its log:\n{}",
                    self.http_addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EdgeChild {
    /// Closes the supervisor's input (it sends the edge `SIGTERM` and waits), waits a bounded
    /// time, and kills what is left; the log folder goes when `dir` drops.
    fn drop(&mut self) {
        drop(self.supervisor.stdin.take());
        let deadline = Instant::now() + EDGE_STOP_TIMEOUT;
        loop {
            match self.supervisor.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    tracing::warn!(pid = self.pid, "tally-edge did not stop in time; killing it");
                    let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
                    let _ = self.supervisor.kill();
                    let _ = self.supervisor.wait();
                    break;
                }
            }
        }
    }
}

/// Two loopback addresses that were free a moment ago.
fn free_loopback_addresses() -> Result<(String, String)> {
    let first = std::net::TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    let second = std::net::TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok((first.local_addr()?.to_string(), second.local_addr()?.to_string()))
}
