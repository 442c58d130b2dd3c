//! Any program run as a server under the same supervisor as PostgreSQL and Redis (Tally's own
//! binaries, Prometheus): stopped and its directory removed when dropped or when the test
//! process dies. Plus the small HTTP/1.0 client the tests of those servers use.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{Supervised, create_temp_dir};

/// A running program, its private directory (its working directory) and its log.
#[derive(Debug)]
pub struct Service {
    supervised: Supervised,
}

impl Service {
    /// Starts `program` with `args` and `env` in a new private directory and waits until `ready`
    /// accepts TCP connections. Errors quote the program's log.
    pub async fn start(
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        ready: SocketAddr,
    ) -> Result<Service> {
        if !program.exists() {
            bail!("{name}: {} does not exist", program.display());
        }
        let dir = create_temp_dir(name)?;
        let log = dir.join(format!("{name}.log"));
        let mut command: Vec<OsString> = vec!["env".into()];
        command.extend(env.iter().map(|(key, value)| OsString::from(format!("{key}={value}"))));
        command.push(program.into());
        command.extend(args.iter().map(OsString::from));
        let supervised = Supervised::spawn(name, dir, log, command)?;
        supervised.start().await?;
        let address = ready.to_string();
        supervised
            .wait_until_ready(
                &address,
                || async move { tokio::net::TcpStream::connect(ready).await.map(drop) },
            )
            .await?;
        Ok(Service { supervised })
    }

    /// Waits (up to 30 s) until another port of the program accepts connections.
    pub async fn wait_for_port(addr: SocketAddr) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => return Ok(()),
                Err(error) if std::time::Instant::now() > deadline => {
                    bail!("nothing accepts connections on {addr} after 30 s: {error}")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// The program's private directory (also its working directory).
    pub fn dir(&self) -> &Path {
        self.supervised.dir()
    }

    /// The last lines of the program's log.
    pub fn log_tail(&self) -> String {
        self.supervised.log_tail()
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    crate::process::free_loopback_port()
}

/// A new private directory under the system temporary directory; the caller removes it.
pub fn temp_dir(kind: &str) -> Result<PathBuf> {
    create_temp_dir(kind)
}

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON ({}): {}", self.status, self.body))
    }
}

/// Sends one HTTP/1.0 request (the server closes the connection after the answer, so the body
/// needs no chunked decoding) and reads the answer, within 30 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpAnswer> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
        .await
        .with_context(|| format!("{method} http://{addr}{path}: no answer within 30 s"))??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) =
        text.split_once("\r\n\r\n").with_context(|| format!("{method} {path}: no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(|| format!("{method} {path}: bad status line in {head:?}"))?;
    Ok(HttpAnswer { status, body: body.to_owned() })
}

/// `GET path`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpAnswer> {
    http(addr, "GET", path, &[], "").await
}
