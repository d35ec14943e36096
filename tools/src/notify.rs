//! Telling systemd a daemon is ready (`Type=notify`): one datagram `READY=1` to the socket
//! named in `$NOTIFY_SOCKET`, sent once the daemon's sockets accept connections. Without
//! that variable (not started by systemd) nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `READY=1` and `STATUS=status` to systemd, if it asked for them. A failure is
/// logged, not returned: the daemon works the same, and systemd reports the timeout.
pub fn ready(status: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("READY=1\nSTATUS={status}\n");
    let sent = (|| {
        let bytes = path.as_encoded_bytes();
        // `@name` is an abstract socket (systemd's own is a path under /run).
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!("could not tell systemd we are ready ({path:?}): {e}");
    }
}
