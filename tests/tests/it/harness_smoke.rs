//! The harness itself: fresh databases, dedicated servers that stop and start, Redis, and
//! cleanup when the test process dies.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sqlx::Connection;
use tests::RedisPersistence;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Set in the child process of [`servers_die_with_a_killed_test_process`].
const ORPHAN_ENV: &str = "TALLY_HARNESS_SMOKE_ORPHAN";
/// Bounds each wait in these tests.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn fresh_database_round_trip_first() -> Result<()> {
    round_trip("first").await
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_database_round_trip_second() -> Result<()> {
    // Creates the same table as the test above, which only works if the databases are separate.
    round_trip("second").await
}

async fn round_trip(body: &str) -> Result<()> {
    let database = tests::postgres().await.fresh_database().await?;
    let mut connection = database.connect().await?;
    sqlx::query("CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)")
        .execute(&mut connection)
        .await?;
    sqlx::query("INSERT INTO notes (id, body) VALUES ($1, $2)")
        .bind(1_i64)
        .bind(body)
        .execute(&mut connection)
        .await?;
    let stored: String = sqlx::query_scalar("SELECT body FROM notes WHERE id = $1")
        .bind(1_i64)
        .fetch_one(&mut connection)
        .await?;
    assert_eq!(stored, body);
    connection.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_databases_are_distinct() -> Result<()> {
    let server = tests::postgres().await;
    let first = server.fresh_database().await?;
    let second = server.fresh_database().await?;
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);

    let mut first_connection = first.connect().await?;
    sqlx::query("CREATE TABLE only_in_first (id bigint)").execute(&mut first_connection).await?;
    let mut second_connection = second.connect().await?;
    let current: String =
        sqlx::query_scalar("SELECT current_database()").fetch_one(&mut second_connection).await?;
    assert_eq!(current, second.name);
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_first')::text")
        .fetch_one(&mut second_connection)
        .await?;
    assert_eq!(table, None, "a table created in {} is visible in {}", first.name, second.name);
    first_connection.close().await?;
    second_connection.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_servers_refuse_to_stop() {
    assert!(tests::postgres().await.stop().await.is_err());
    assert!(tests::postgres().await.start().await.is_err());
    assert!(tests::redis().await.stop().await.is_err());
    assert!(tests::redis().await.crash().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn dedicated_postgres_keeps_data_across_stop_and_start() -> Result<()> {
    let server = tests::dedicated_postgres().await?;
    assert_ne!(server.port(), tests::postgres().await.port());
    let database = server.fresh_database().await?;
    let mut connection = database.connect().await?;
    sqlx::query("CREATE TABLE notes (body text NOT NULL)").execute(&mut connection).await?;
    sqlx::query("INSERT INTO notes (body) VALUES ('written before the stop')")
        .execute(&mut connection)
        .await?;
    connection.close().await?;

    server.stop().await?;
    ensure!(database.connect().await.is_err(), "connected to a stopped server");

    server.start().await?;
    let mut connection = database.connect().await?;
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM notes").fetch_all(&mut connection).await?;
    assert_eq!(bodies, ["written before the stop"]);
    connection.close().await?;

    let dir = server.dir().to_owned();
    assert!(dir.exists());
    drop(server);
    assert!(!dir.exists(), "{} outlived its dedicated server", dir.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_answers_ping() -> Result<()> {
    let server = tests::redis().await;
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = [0_u8; 7];
    stream.read_exact(&mut reply).await?;
    assert_eq!(&reply, b"+PONG\r\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dedicated_redis_with_append_only_keeps_data_across_restart() -> Result<()> {
    let server = tests::dedicated_redis(RedisPersistence::AppendOnlyEverySec).await?;
    assert_eq!(redis_command(server.port(), "SET durable kept").await?, "OK");
    server.stop().await?;
    ensure!(TcpStream::connect(("127.0.0.1", server.port())).await.is_err(), "redis still up");
    server.start().await?;
    assert_eq!(redis_command(server.port(), "GET durable").await?, "kept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dedicated_redis_without_persistence_starts_empty_after_restart() -> Result<()> {
    let server = tests::dedicated_redis(RedisPersistence::None).await?;
    assert_eq!(redis_command(server.port(), "SET volatile lost").await?, "OK");
    server.crash().await?;
    server.start().await?;
    assert_eq!(redis_command(server.port(), "GET volatile").await?, "(nil)");
    Ok(())
}

/// Sends one inline command; returns a simple string, a bulk string, or "(nil)".
async fn redis_command(port: u16, command: &str) -> Result<String> {
    let mut stream = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await?);
    stream.write_all(format!("{command}\r\n").as_bytes()).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let line = line.trim_end();
    if let Some(simple) = line.strip_prefix('+') {
        return Ok(simple.to_owned());
    }
    let Some(length) = line.strip_prefix('$') else {
        bail!("{command:?} answered {line:?}");
    };
    let Ok(length) = usize::try_from(length.parse::<i64>()?) else {
        return Ok("(nil)".to_owned());
    };
    let mut bulk = vec![0_u8; length + 2];
    stream.read_exact(&mut bulk).await?;
    bulk.truncate(length);
    Ok(String::from_utf8(bulk)?)
}

/// Runs this test binary again, filtered to this test, as a child that starts the shared servers
/// and reports them; kills it with `SIGKILL`; then checks that both servers stop and their
/// directories disappear.
#[tokio::test(flavor = "multi_thread")]
async fn servers_die_with_a_killed_test_process() -> Result<()> {
    if std::env::var_os(ORPHAN_ENV).is_some() {
        return run_as_orphan().await;
    }
    let mut orphan = tokio::process::Command::new(std::env::current_exe()?)
        .args(["servers_die_with_a_killed_test_process", "--nocapture", "--test-threads=1"])
        .env(ORPHAN_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(orphan.stdout.take().context("no orphan stdout")?).lines();
    let report = tokio::time::timeout(WAIT_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            // libtest may have printed "test NAME ... " on the same line.
            if let Some((_, report)) = line.split_once("ORPHAN\t") {
                return Ok(report.to_owned());
            }
        }
        bail!("the orphan exited without reporting its servers")
    })
    .await
    .context("the orphan did not report its servers in time")??;
    let fields: Vec<&str> = report.split('\t').collect();
    let [postgres_port, postgres_dir, redis_port, redis_dir] = fields[..] else {
        bail!("unexpected report {report:?}");
    };
    let servers = [
        (postgres_port.parse::<u16>()?, PathBuf::from(postgres_dir)),
        (redis_port.parse::<u16>()?, PathBuf::from(redis_dir)),
    ];
    for (port, dir) in &servers {
        ensure!(TcpStream::connect(("127.0.0.1", *port)).await.is_ok(), "nothing on port {port}");
        ensure!(dir.exists(), "{} missing", dir.display());
    }

    orphan.kill().await?;

    let deadline = Instant::now() + WAIT_TIMEOUT;
    for (port, dir) in &servers {
        while TcpStream::connect(("127.0.0.1", *port)).await.is_ok() || dir.exists() {
            ensure!(Instant::now() < deadline, "server on port {port} outlived its test process");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The child's side: start the shared servers, report them, then wait to be killed (or for the
/// parent to go away, which closes stdin).
async fn run_as_orphan() -> Result<()> {
    let postgres = tests::postgres().await;
    let redis = tests::redis().await;
    println!(
        "ORPHAN\t{}\t{}\t{}\t{}",
        postgres.port(),
        postgres.dir().display(),
        redis.port(),
        redis.dir().display()
    );
    tokio::task::spawn_blocking(|| {
        let mut ignored = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut ignored)
    })
    .await??;
    Ok(())
}
