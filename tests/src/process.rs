//! A server process whose lifetime is tied to the test process, plus the small helpers both
//! servers need (free ports, temporary directories, readiness polling).
//!
//! # How servers die with the test process
//!
//! The workspace forbids `unsafe`, so there is no `pre_exec` + `prctl(PR_SET_PDEATHSIG)`. Instead
//! every server runs under a small `sh` supervisor ([`SUPERVISOR_SCRIPT`]) whose standard input is
//! a pipe whose only write end lives in the test process (std creates pipes close-on-exec, so no
//! other child inherits it). The supervisor reads one request per line (`start`, `stop SIGNAL`)
//! and answers on its standard output. When the test process exits for any reason (normal exit,
//! panic, `SIGKILL`), the kernel closes the write end, `read` sees end-of-file, and the supervisor
//! sends the server `SIGINT`, waits for it and removes the server's temporary directory. The same
//! happens when a dedicated server is dropped. This reacts at once, unlike polling the test
//! process's pid, and cannot be fooled by pid reuse.
//!
//! The supervisor ignores `SIGINT`, `SIGTERM` and `SIGHUP`: a Ctrl-C in a terminal reaches the
//! whole process group, and the supervisor must outlive the test process to clean up after it.
//! Servers start with those signals ignored too, but PostgreSQL and Redis install their own
//! handlers for them.

use std::ffi::OsString;
use std::fmt::Display;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a server may take to accept connections after `start`.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after a stop signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of the server's log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 40;

/// Arguments: `$1` the directory to delete at the end, `$2` the server's log file, then the
/// server's command line. See the module documentation.
const SUPERVISOR_SCRIPT: &str = r#"
dir=$1; log=$2; shift 2
trap '' INT TERM HUP
child=
while IFS= read -r request; do
  case $request in
    start)
      if [ -n "$child" ]; then echo "error already running"; continue; fi
      "$@" >>"$log" 2>&1 </dev/null &
      child=$!
      echo "started $child" ;;
    "stop "*)
      if [ -z "$child" ]; then echo "error not running"; continue; fi
      kill "-${request#stop }" "$child" 2>/dev/null
      wait "$child" 2>/dev/null
      echo "stopped $?"
      child= ;;
    *) echo "error unknown request" ;;
  esac
done
if [ -n "$child" ]; then kill -INT "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
rm -rf "$dir"
"#;

/// Whether a server is the one shared by the whole test process, which no test may stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharing {
    Shared,
    Dedicated,
}

/// The signal a stop request sends to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopSignal {
    /// PostgreSQL: fast shutdown. Redis: shutdown.
    Int,
    /// PostgreSQL: immediate shutdown, crash recovery on the next start.
    Quit,
    /// Redis: a crash.
    Kill,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Int => "INT",
            StopSignal::Quit => "QUIT",
            StopSignal::Kill => "KILL",
        }
    }
}

/// A server process under its supervisor, and the temporary directory they own.
#[derive(Debug)]
pub(crate) struct Supervised {
    /// For messages: "postgres", "redis".
    name: &'static str,
    dir: PathBuf,
    log: PathBuf,
    channel: Arc<Mutex<Channel>>,
    /// The running server's pid, 0 when stopped. Outside the mutex so readiness polling never
    /// waits behind a request.
    server_pid: AtomicU32,
}

#[derive(Debug)]
struct Channel {
    supervisor: Child,
    /// `None` once closed, which tells the supervisor to clean up.
    requests: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
}

impl Supervised {
    /// Starts a supervisor that owns `dir` from now on: the directory is removed when the
    /// supervisor ends, even if spawning fails. The server itself is not started yet.
    pub(crate) fn spawn(
        name: &'static str,
        dir: PathBuf,
        log: PathBuf,
        server_command: Vec<OsString>,
    ) -> Result<Self> {
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR_SCRIPT)
            .arg("tally-supervisor")
            .arg(&dir)
            .arg(&log)
            .args(&server_command)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut supervisor = match spawned {
            Ok(supervisor) => supervisor,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(error).context(format!("failed to spawn the {name} supervisor"));
            }
        };
        let (Some(requests), Some(replies)) = (supervisor.stdin.take(), supervisor.stdout.take()) else {
            bail!("{name} supervisor has no stdin or stdout pipe");
        };
        let channel = Channel { supervisor, requests: Some(requests), replies: BufReader::new(replies) };
        Ok(Supervised {
            name,
            dir,
            log,
            channel: Arc::new(Mutex::new(channel)),
            server_pid: AtomicU32::new(0),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the server; it may not be ready yet.
    pub(crate) async fn start(&self) -> Result<()> {
        let reply = self.request("start".to_owned()).await?;
        let pid = reply
            .strip_prefix("started ")
            .and_then(|pid| pid.parse::<u32>().ok())
            .ok_or_else(|| anyhow!("failed to start {}: supervisor said {reply:?}", self.name))?;
        self.server_pid.store(pid, Ordering::SeqCst);
        tracing::debug!(server = self.name, pid, dir = %self.dir.display(), "server started");
        Ok(())
    }

    /// Sends `signal` to the server and waits for it to exit (or reaps it if it already has).
    pub(crate) async fn stop(&self, signal: StopSignal) -> Result<()> {
        let reply = self.request(format!("stop {}", signal.name())).await?;
        if !reply.starts_with("stopped ") {
            bail!("failed to stop {}: supervisor said {reply:?}", self.name);
        }
        self.server_pid.store(0, Ordering::SeqCst);
        tracing::debug!(server = self.name, status = %reply, "server stopped");
        Ok(())
    }

    /// True when the server was started and has exited since (it is a zombie until stopped).
    pub(crate) fn server_exited(&self) -> bool {
        let pid = self.server_pid.load(Ordering::SeqCst);
        if pid == 0 {
            return false;
        }
        // `/proc/PID/stat` is "PID (COMM) STATE ..."; COMM may contain spaces and parentheses.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            }
            Err(_) => true,
        }
    }

    /// The last lines of the server's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(error) => format!("(no log at {}: {error})", self.log.display()),
        }
    }

    /// Polls `probe` until it succeeds, the server exits, or [`READY_TIMEOUT`] passes. Errors
    /// quote the server's log.
    pub(crate) async fn wait_until_ready<F, Fut, E>(&self, address: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: Display,
    {
        let started = Instant::now();
        loop {
            let last_error = match probe().await {
                Ok(()) => return Ok(()),
                Err(error) => error.to_string(),
            };
            if self.server_exited() {
                bail!(
                    "{} exited before accepting connections on {address}: {last_error}\n\
                     --- {} ---\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} did not accept connections on {address} within {} s: {last_error}\n\
                     --- {} ---\n{}",
                    self.name,
                    READY_TIMEOUT.as_secs(),
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    /// Sends one request line and reads the one-line reply, off the async runtime.
    async fn request(&self, line: String) -> Result<String> {
        let channel = Arc::clone(&self.channel);
        let name = self.name;
        let exchange = tokio::task::spawn_blocking(move || {
            let mut channel = channel.lock().unwrap_or_else(PoisonError::into_inner);
            channel.exchange(&line).with_context(|| format!("{name} supervisor request {line:?}"))
        });
        match tokio::time::timeout(STOP_TIMEOUT, exchange).await {
            Ok(joined) => joined.context("supervisor request task failed")?,
            Err(_) => bail!("{name} supervisor did not answer within {} s", STOP_TIMEOUT.as_secs()),
        }
    }
}

impl Channel {
    fn exchange(&mut self, line: &str) -> Result<String> {
        let requests = self.requests.as_mut().context("supervisor is closed")?;
        writeln!(requests, "{line}")?;
        requests.flush()?;
        let mut reply = String::new();
        if self.replies.read_line(&mut reply)? == 0 {
            bail!("supervisor exited");
        }
        Ok(reply.trim_end().to_owned())
    }
}

impl Drop for Supervised {
    /// Closes the request pipe, which makes the supervisor stop the server and remove its
    /// directory, and waits (bounded) for that to finish so the next test sees a clean machine.
    fn drop(&mut self) {
        let mut channel = match self.channel.try_lock() {
            Ok(channel) => channel,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // A request is stuck; the supervisor still cleans up when this process exits.
                tracing::warn!(server = self.name, "supervisor busy, leaving cleanup to process exit");
                return;
            }
        };
        channel.requests = None;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match channel.supervisor.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::warn!(server = self.name, "supervisor did not finish cleaning up in time");
    }
}

/// A port on 127.0.0.1 that was free a moment ago. Another process may take it before the server
/// binds it; server start-up retries with a new port when the server exits early.
pub(crate) fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Creates a new, empty, private directory under the system temporary directory.
pub(crate) fn create_temp_dir(kind: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tally-{kind}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Whether this process runs with effective uid 0, read from `/proc/self/status`.
pub(crate) fn running_as_root() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(effective_uid == "0")
}
