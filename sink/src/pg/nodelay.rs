//! `TCP_NODELAY` on PostgreSQL connections.
//!
//! sqlx sends each protocol message with its own write and leaves Nagle's algorithm on. At the
//! end of a `COPY`, the 5-byte `CopyDone` then waits in the kernel until PostgreSQL acknowledges
//! the data before it, and PostgreSQL delays that acknowledgement by up to 40 ms: every commit
//! of a batch stalled that long over TCP (not over a Unix socket). sqlx offers no hook on its
//! socket, so once a connection is open this finds the socket among the process's descriptors
//! (by the local port PostgreSQL reports for it), takes a duplicate of the descriptor with
//! `pidfd_getfd` (no unsafe code), and sets the option on the shared socket. Linux only; where
//! the socket cannot be found (a Unix socket, a proxy in between, another system) nothing
//! changes.

use sqlx::PgConnection;

/// Sets `TCP_NODELAY` on the connection's socket; returns whether it did.
pub async fn set_nodelay(conn: &mut PgConnection, server_port: u16) -> bool {
    let client_port: Option<i32> = match sqlx::query_scalar("SELECT inet_client_port()").fetch_one(conn).await
    {
        Ok(port) => port,
        Err(error) => {
            tracing::debug!(%error, "could not ask for the client port; TCP_NODELAY not set");
            return false;
        }
    };
    let Some(client_port) = client_port.and_then(|port| u16::try_from(port).ok()) else {
        return false; // a Unix socket: no Nagle
    };
    match set_on_local_socket(client_port, server_port) {
        Ok(done) => done,
        Err(error) => {
            tracing::debug!(%error, "TCP_NODELAY not set on a PostgreSQL connection");
            false
        }
    }
}

#[cfg(target_os = "linux")]
fn set_on_local_socket(local_port: u16, remote_port: u16) -> std::io::Result<bool> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let Some(inode) = socket_inode(local_port, remote_port)? else {
        return Ok(false);
    };
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if target.as_os_str() != wanted.as_str() {
            continue;
        }
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty())?;
        let duplicate = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?;
        rustix::net::sockopt::set_tcp_nodelay(&duplicate, true)?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(not(target_os = "linux"))]
fn set_on_local_socket(_local_port: u16, _remote_port: u16) -> std::io::Result<bool> {
    Ok(false)
}

/// The inode of this process's established TCP socket from `local_port` to `remote_port`.
#[cfg(target_os = "linux")]
fn socket_inode(local_port: u16, remote_port: u16) -> std::io::Result<Option<u64>> {
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state == "01" && port_of(local) == Some(local_port) && port_of(remote) == Some(remote_port) {
                return Ok(inode.parse().ok().filter(|&inode| inode != 0));
            }
        }
    }
    Ok(None)
}

/// The port of an `ADDRESS:PORT` entry of `/proc/net/tcp` (both hexadecimal).
#[cfg(target_os = "linux")]
fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':').and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_ports_of_proc_net_tcp() {
        assert_eq!(port_of("0100007F:1538"), Some(5432));
        assert_eq!(port_of("00000000000000000000000001000000:9C40"), Some(40000));
        assert_eq!(port_of("garbage"), None);
    }

    #[test]
    fn finds_and_sets_an_established_socket() -> std::io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let _server = listener.accept()?;
        assert!(!client.nodelay()?);
        let (local, remote) = (client.local_addr()?.port(), client.peer_addr()?.port());
        assert!(set_on_local_socket(local, remote)?);
        assert!(client.nodelay()?, "the option is set on the shared socket");
        Ok(())
    }
}
