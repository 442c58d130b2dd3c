//! `tally-edge`, the production ingest server, serves what the older gateway served on its port
//! besides ingest: `GET /api/v1/usage` (the older SDK's `get_usage`) and `/docs`. Runs the real
//! binary on a temporary embedded database.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const EDGE: &str = env!("CARGO_BIN_EXE_tally-edge");

/// The edge child; killed when dropped, its data directory removed.
struct Edge {
    child: Child,
    dir: PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn admin(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(EDGE).arg("--data-dir").arg(dir).args(args).output().expect("runs");
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("utf-8")
}

/// `GET path` over a plain HTTP/1.1 connection: the status and the body.
fn get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let key = key.map(|key| format!("X-API-Key: {key}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{key}Connection: close\r\n\r\n").expect("writes");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reads");
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn the_ingest_port_serves_the_listing_and_docs() {
    let dir = std::env::temp_dir().join(format!("tally-edge-port-{}", std::process::id()));
    admin(&dir, &["tenant", "create", "acme"]);
    let created = admin(&dir, &["key", "create", "--tenant", "acme"]);
    let key = created.lines().last().expect("a key").trim().to_owned();
    let mut child = Command::new(EDGE)
        .arg("--data-dir")
        .arg(&dir)
        .args(["--wire-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let edge = Edge { child, dir };
    // "tally-edge: binary protocol on ..., HTTP on http://127.0.0.1:PORT"
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, addr)) = line.split_once("HTTP on http://") {
                let _ = sender.send(addr.trim().to_owned());
            }
        }
    });
    let addr = receiver.recv_timeout(Duration::from_secs(60)).expect("the edge says where it listens");

    let (status, body) = get(&addr, "/api/v1/usage?tenant_id=acme", Some(&key));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"total_count\":0") && body.contains("\"events\":[]"), "{body}");
    let (status, body) = get(&addr, "/api/v1/usage", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("authentication_required"), "{body}");
    let (status, body) = get(&addr, "/docs/", None);
    assert!(status == 200 && body.to_lowercase().contains("swagger"), "{status}: {body}");
    let (status, body) = get(&addr, "/openapi.json", None);
    assert!(status == 200 && body.contains("/api/v1/events/batch"), "{status}: {body}");
    let (status, body) = get(&addr, "/health", None);
    assert!(status == 200 && body.contains("\"status\":\"healthy\""), "{status}: {body}");
    drop(edge);
}
