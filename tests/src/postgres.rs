//! PostgreSQL: one shared server per test process, dedicated servers for fault tests, and a fresh
//! database per test.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tokio::sync::OnceCell;

use crate::process::{self, Sharing, StopSignal, Supervised};

/// Where Debian and Ubuntu install PostgreSQL, one folder per major version.
const PG_INSTALL_ROOT: &str = "/usr/lib/postgresql";
/// Overrides the folder holding `initdb` and `postgres`.
const PG_BIN_ENV: &str = "TALLY_PG_BIN";
/// The superuser `initdb` creates; there is no password (`-A trust`).
const PG_USER: &str = "tally";
/// The OS user servers run as when the tests run as root (initdb refuses root).
const PG_OS_USER: &str = "postgres";
/// How long `initdb` may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at a first start, each on a new free port, for when another process takes the port.
const START_ATTEMPTS: usize = 3;

static SHARED: OnceCell<PgServer> = OnceCell::const_new();

/// The PostgreSQL server shared by every test in this process, started on first use. It stops
/// and its directory is removed when the process exits, however it exits. Use
/// [`PgServer::fresh_database`] for isolation; never stop it (use [`dedicated_postgres`]).
///
/// # Panics
///
/// If the server cannot be started; the message includes the server's log.
pub async fn postgres() -> &'static PgServer {
    match SHARED.get_or_try_init(|| PgServer::launch(Sharing::Shared, "")).await {
        Ok(server) => server,
        Err(error) => panic!("failed to start the shared postgres server: {error:#}"),
    }
}

/// A private PostgreSQL server with its own data directory and port, for tests that stop and
/// start it. Dropping it stops the server and removes its directory.
pub async fn dedicated_postgres() -> Result<PgServer> {
    PgServer::launch(Sharing::Dedicated, "").await
}

/// A dedicated server (see [`dedicated_postgres`]) with `extra_settings` appended to its
/// configuration: `postgresql.conf` lines such as `shared_preload_libraries = 'timescaledb'`.
pub async fn dedicated_postgres_with(extra_settings: &str) -> Result<PgServer> {
    PgServer::launch(Sharing::Dedicated, extra_settings).await
}

/// A running (or, for a dedicated server, stopped) PostgreSQL server on 127.0.0.1.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    sharing: Sharing,
    process: Supervised,
}

/// A database created for one test; nothing else uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDb {
    /// The database name, `t_` and a UUID.
    pub name: String,
    /// `postgres://tally@127.0.0.1:PORT/NAME`.
    pub url: String,
}

impl TestDb {
    /// A new connection to this database.
    pub async fn connect(&self) -> Result<PgConnection> {
        PgConnection::connect(&self.url)
            .await
            .with_context(|| format!("failed to connect to database {}", self.name))
    }
}

impl PgServer {
    /// `postgres://tally@127.0.0.1:PORT`; without a database name clients use `tally`, which
    /// exists but is shared: tests should use [`PgServer::fresh_database`].
    pub fn base_url(&self) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}", self.port)
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}", self.base_url())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory holding the data directory (`data/`), the socket and
    /// `postgres.log`; removed when the server is dropped or the process exits.
    pub fn dir(&self) -> &Path {
        self.process.dir()
    }

    /// Whether an extension can be created on this server (its files are installed; one that
    /// must be preloaded also needs [`dedicated_postgres_with`]).
    pub async fn extension_available(&self, name: &str) -> Result<bool> {
        let mut connection = PgConnection::connect(&self.url("postgres")).await?;
        let available: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1)")
                .bind(name)
                .fetch_one(&mut connection)
                .await
                .context("failed to list the available extensions")?;
        connection.close().await?;
        Ok(available)
    }

    /// Creates an empty database with a unique name.
    pub async fn fresh_database(&self) -> Result<TestDb> {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        // A connection per call, not a pool in a static: each test has its own runtime, and a
        // pool's connections belong to the runtime that opened them.
        let mut connection = PgConnection::connect(&self.url("postgres"))
            .await
            .with_context(|| format!("failed to connect to postgres on port {}", self.port))?;
        connection
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .await
            .with_context(|| format!("failed to create database {name}"))?;
        connection.close().await?;
        let url = self.url(&name);
        Ok(TestDb { name, url })
    }

    /// Fast shutdown (`SIGINT`): waits for the server to exit. The data directory and port are
    /// kept for [`PgServer::start`]. Only for dedicated servers.
    pub async fn stop(&self) -> Result<()> {
        self.refuse_if_shared("stop")?;
        self.process.stop(StopSignal::Int).await
    }

    /// Immediate shutdown (`SIGQUIT`), as close to a crash as PostgreSQL allows without leaving
    /// orphaned backends: no checkpoint, crash recovery on the next start. Only for dedicated
    /// servers.
    pub async fn crash(&self) -> Result<()> {
        self.refuse_if_shared("crash")?;
        self.process.stop(StopSignal::Quit).await
    }

    /// Starts a stopped server again on the same data directory and port, and waits until it
    /// accepts connections. Only for dedicated servers.
    pub async fn start(&self) -> Result<()> {
        self.refuse_if_shared("start")?;
        self.process.start().await?;
        self.wait_until_ready().await
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    fn refuse_if_shared(&self, action: &str) -> Result<()> {
        if self.sharing == Sharing::Shared {
            bail!("refusing to {action} the shared postgres server; use dedicated_postgres()");
        }
        Ok(())
    }

    async fn launch(sharing: Sharing, extra_settings: &str) -> Result<PgServer> {
        let bin = find_pg_bin()?;
        let run_as_postgres = process::running_as_root()?;
        let dir = process::create_temp_dir("pg")?;
        let data = dir.join("data");
        let mut server_command = as_server_user(run_as_postgres);
        server_command.extend([bin.join("postgres").into(), "-D".into(), data.clone().into()]);
        // From here on the supervisor owns the directory: any error below removes it.
        let process = Supervised::spawn("postgres", dir.clone(), dir.join("postgres.log"), server_command)?;
        if run_as_postgres {
            chown_to_postgres(&dir).await?;
        }
        initdb(&bin, &dir, &data, run_as_postgres).await?;
        let mut attempt = 1;
        let port = loop {
            let port = process::free_loopback_port()?;
            write_settings(&dir, &data, port, extra_settings)?;
            process.start().await?;
            match wait_until_ready(&process, port).await {
                Ok(()) => break port,
                // The port was probably taken between choosing and binding it: try another.
                Err(error) if process.server_exited() && attempt < START_ATTEMPTS => {
                    tracing::warn!(port, "postgres exited during start-up, retrying: {error:#}");
                    process.stop(StopSignal::Int).await?;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        let server = PgServer { port, sharing, process };
        server.create_default_database().await?;
        tracing::info!(port, dir = %dir.display(), "postgres ready");
        Ok(server)
    }

    async fn wait_until_ready(&self) -> Result<()> {
        wait_until_ready(&self.process, self.port).await
    }

    /// Makes `base_url()` usable as is: clients default to a database named after the user.
    async fn create_default_database(&self) -> Result<()> {
        let mut connection = PgConnection::connect(&self.url("postgres")).await?;
        connection
            .execute(AssertSqlSafe(format!("CREATE DATABASE \"{PG_USER}\"")))
            .await
            .context("failed to create the default database")?;
        connection.close().await?;
        Ok(())
    }
}

async fn wait_until_ready(process: &Supervised, port: u16) -> Result<()> {
    let url = format!("postgres://{PG_USER}@127.0.0.1:{port}/postgres");
    let address = format!("127.0.0.1:{port}");
    process.wait_until_ready(&address, || async { PgConnection::connect(&url).await?.close().await }).await
}

/// `TALLY_PG_BIN`, else the highest version under `/usr/lib/postgresql/*/bin`.
fn find_pg_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(PG_BIN_ENV) {
        let bin = PathBuf::from(bin);
        if !bin.join("postgres").is_file() || !bin.join("initdb").is_file() {
            bail!("{PG_BIN_ENV}={} holds no postgres and initdb", bin.display());
        }
        return Ok(bin);
    }
    let entries = std::fs::read_dir(PG_INSTALL_ROOT)
        .with_context(|| format!("no PostgreSQL under {PG_INSTALL_ROOT}; set {PG_BIN_ENV}"))?;
    let mut newest: Option<(Vec<u32>, PathBuf)> = None;
    for entry in entries {
        let entry = entry?;
        let Some(version) = entry.file_name().to_str().and_then(parse_version) else {
            continue;
        };
        let bin = entry.path().join("bin");
        let is_newer = newest.as_ref().is_none_or(|(newest_version, _)| version > *newest_version);
        if is_newer && bin.join("postgres").is_file() && bin.join("initdb").is_file() {
            newest = Some((version, bin));
        }
    }
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL binaries under {PG_INSTALL_ROOT}/*/bin; set {PG_BIN_ENV}"),
    }
}

/// "16" -> [16], "9.6" -> [9, 6].
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The command prefix that runs a program as the `postgres` OS user when we are root.
/// `setpriv` execs in place, so the supervisor's `$!` is the server itself and stop signals
/// reach it directly; `runuser` would stay in between as the parent.
fn as_server_user(run_as_postgres: bool) -> Vec<OsString> {
    if !run_as_postgres {
        return Vec::new();
    }
    ["setpriv", "--reuid", PG_OS_USER, "--regid", PG_OS_USER, "--init-groups", "--"]
        .into_iter()
        .map(OsString::from)
        .collect()
}

async fn chown_to_postgres(dir: &Path) -> Result<()> {
    let output = tokio::process::Command::new("chown")
        .arg(format!("{PG_OS_USER}:"))
        .arg(dir)
        .output()
        .await
        .context("failed to run chown")?;
    if !output.status.success() {
        bail!(
            "chown {PG_OS_USER}: {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

async fn initdb(bin: &Path, dir: &Path, data: &Path, run_as_postgres: bool) -> Result<()> {
    let mut command_line = as_server_user(run_as_postgres);
    command_line.push(bin.join("initdb").into());
    let mut command = tokio::process::Command::new(&command_line[0]);
    command
        .args(&command_line[1..])
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", PG_USER, "--no-sync", "-E", "UTF8", "--locale=C"])
        .current_dir(dir)
        .kill_on_drop(true);
    let output = tokio::time::timeout(INITDB_TIMEOUT, command.output())
        .await
        .context("initdb timed out")?
        .context("failed to run initdb")?;
    if !output.status.success() {
        bail!(
            "initdb failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Writes the harness's settings to `data/tally.conf`, included from `postgresql.conf`, so a
/// restart after `stop` uses the same port and settings. Durability is off because test data is
/// disposable; `crash()` kills PostgreSQL, not the machine, so committed data survives it anyway.
fn write_settings(dir: &Path, data: &Path, port: u16, extra_settings: &str) -> Result<()> {
    let mut settings = format!(
        "listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{}'\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         max_connections = 200\n\
         shared_buffers = 128MB\n",
        dir.display()
    );
    settings.push_str(extra_settings);
    std::fs::write(data.join("tally.conf"), settings).context("failed to write tally.conf")?;
    let main_config = data.join("postgresql.conf");
    let mut config = std::fs::read_to_string(&main_config).context("failed to read postgresql.conf")?;
    let include = "include 'tally.conf'\n";
    if !config.contains(include) {
        config.push_str(include);
        std::fs::write(&main_config, config).context("failed to write postgresql.conf")?;
    }
    Ok(())
}
