//! `ivring-guest bridge`: each ivring session on the agent's port becomes one connection
//! to the QEMU guest agent (`qemu-ga -m unix-listen -p QGA_SOCK`).
//!
//! A new session first closes the previous agent connection (the agent serves one client
//! at a time), then connects and scrubs the agent's parser state: it sends a 0xFF byte and
//! `{"execute":"guest-sync-delimited","arguments":{"id":N}}` with a fresh random N, and
//! discards everything the agent sends up to and including the reply `0xFF{"return": N}`.
//! The host client thus starts on a clean stream: no half request of a previous client is
//! glued to its first request, and no reply to a request it never sent reaches it.
//!
//! The bridge needs the agent to allow `guest-sync-delimited` (and nothing else). An agent
//! that refuses it, or a missing agent socket, ends the session at once (the host client
//! reads EOF) with a one-line error in the bridge's log that says what to fix.
//!
//! Closing the session closes the agent connection, and the agent closing its connection
//! closes the session. The agent connection is always closed gracefully (shut down for
//! writing, then read until the agent's EOF): qemu-ga 10.0 in `unix-listen` mode exits
//! when a client resets the connection (closes it with a reply unread).

use super::{relay_async, RelayEnd, RelayOptions};
use anyhow::{Context, Result};
use ivring::tokio::AsyncSession;
use ivring::{Endpoint, Session};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What `ivring-guest bridge` does.
#[derive(Clone, Debug)]
pub struct GuestBridgeOptions {
    /// The agent's socket (`qemu-ga -m unix-listen -p QGA_SOCK`).
    pub qga: PathBuf,
    /// The port to listen on.
    pub port: u32,
    /// How long connecting to the agent and its sync reply may take (the agent may be
    /// restarting).
    pub sync_timeout: Duration,
    /// How long closing the agent connection waits for the agent's EOF.
    pub drain_timeout: Duration,
    /// Relay tunables.
    pub relay: RelayOptions,
    /// Log one line per session.
    pub verbose: bool,
}

impl GuestBridgeOptions {
    /// Defaults for the rest.
    pub fn new(qga: PathBuf) -> GuestBridgeOptions {
        GuestBridgeOptions {
            qga,
            port: super::PORT_QGA,
            sync_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            relay: RelayOptions {
                end_on_stream_eof: true,
                ..RelayOptions::default()
            },
            verbose: true,
        }
    }
}

/// Serves sessions on `opts.port` for ever, one agent connection at a time.
pub fn run(endpoint: &Endpoint, opts: &GuestBridgeOptions) -> Result<()> {
    let listener = endpoint
        .listen(opts.port)
        .with_context(|| format!("listening on port {}", opts.port))?;
    info!("bridge: port {} -> {}", opts.port, opts.qga.display());
    crate::notify::ready(&format!("bridge on port {}", opts.port));
    if !opts.qga.exists() {
        warn!(
            "agent at {}: {}",
            opts.qga.display(),
            missing_socket(&opts.qga)
        );
    }
    let mut current: Option<(Arc<AtomicBool>, JoinHandle<()>)> = None;
    let mut n = 0u64;
    loop {
        let session = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                return Err(e).context("accept");
            }
            Err(e) => {
                warn!("bridge: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        n += 1;
        // The previous agent connection is closed before the next one is made.
        if let Some((stop, h)) = current.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = h.join();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (o, st) = (opts.clone(), stop.clone());
        let h = std::thread::Builder::new()
            .name(format!("qga-session-{n}"))
            .spawn(move || serve_session(session, n, &o, st))
            .context("spawning a session thread")?;
        current = Some((stop, h));
    }
}

fn serve_session(session: Session, n: u64, opts: &GuestBridgeOptions, stop: Arc<AtomicBool>) {
    let id = fresh_id();
    let (agent, leftover) = match open_agent(&opts.qga, id, opts.sync_timeout) {
        Ok(x) => x,
        Err(e) => {
            warn!(
                "bridge: session {}: agent at {}: {e:#}",
                session.id(),
                opts.qga.display()
            );
            return;
        }
    };
    let mut ropts = opts.relay.clone();
    ropts.stop = Some(stop);
    let sid = session.id();
    let end = relay_session(session, &agent, leftover, &ropts).unwrap_or_else(|e| RelayEnd {
        to_session: 0,
        to_stream: 0,
        clean: false,
        why: format!("relay: {e}"),
    });
    close_agent(agent, opts.drain_timeout);
    let (why, to_agent, back) = (&end.why, end.to_stream, end.to_session);
    if !end.clean {
        warn!("bridge: session {sid} (#{n}, sync id {id}) ended ({why}): {to_agent} bytes to the agent, {back} back");
    } else if opts.verbose {
        info!("bridge: session {sid} (#{n}, sync id {id}) ended ({why}): {to_agent} bytes to the agent, {back} back");
    }
}

/// A fresh random sync id (1..=2^31-1, an integer every JSON parser keeps exact).
pub fn fresh_id() -> u64 {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    let x = if ok {
        u64::from_le_bytes(b)
    } else {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.finish()
    };
    x % 0x7fff_ffff + 1
}

/// The request that scrubs the agent's parser state: 0xFF, then a delimited sync.
pub fn sync_request(id: u64) -> Vec<u8> {
    let mut v = vec![0xFF];
    v.extend_from_slice(
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
            .as_bytes(),
    );
    v
}

/// Where the delimited sync reply for `id` ends in `buf` (the index after its newline):
/// a line whose part after its last 0xFF byte is the JSON `{"return": id}`.
pub fn find_sync_reply(buf: &[u8], id: u64) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        if let Some(ff) = line.iter().rposition(|&b| b == 0xFF) {
            let reply = serde_json::from_slice::<serde_json::Value>(&line[ff + 1..]);
            if reply.is_ok_and(|v| v.get("return").and_then(|r| r.as_u64()) == Some(id)) {
                return Some(start + nl + 1);
            }
        }
        start += nl + 1;
    }
    None
}

/// What to say about an agent socket that does not exist.
fn missing_socket(path: &Path) -> String {
    format!(
        "no such socket (start qemu-ga with `-m unix-listen -p {}`, or point --connect at the agent's socket)",
        path.display()
    )
}

/// The agent's refusal of `guest-sync-delimited`, if `line` is one: qemu-ga answers a
/// blocked or not allowed command with `{"error": {"class": "CommandNotFound", "desc":
/// "Command guest-sync-delimited has been disabled: ..."}}` (older agents: `GenericError`).
pub fn sync_refusal(line: &[u8]) -> Option<String> {
    // The part after a 0xFF byte, if any: what qemu-ga sent after our own delimiter.
    let json = line
        .iter()
        .rposition(|&b| b == 0xFF)
        .map_or(line, |ff| &line[ff + 1..]);
    let reply: serde_json::Value = serde_json::from_slice(json).ok()?;
    let desc = reply.get("error")?.get("desc")?.as_str()?;
    desc.contains("guest-sync-delimited")
        .then(|| desc.to_owned())
}

/// Relays `session` and the agent's connection through tokio on this thread (each
/// direction waits on readiness, with no polling sleeps); the session ends with it. The
/// agent's connection stays open for [`close_agent`].
fn relay_session(
    session: Session,
    agent: &UnixStream,
    leftover: Vec<u8>,
    opts: &RelayOptions,
) -> io::Result<RelayEnd> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = agent.try_clone()?;
    stream.set_nonblocking(true)?;
    rt.block_on(async {
        let mut session = AsyncSession::from_session(session)?;
        let mut stream = tokio::net::UnixStream::from_std(stream)?;
        Ok(relay_async(&mut session, &mut stream, leftover, opts).await)
    })
}

/// Connects to the agent and scrubs its state. A socket that refuses connections (the agent
/// restarting) is retried until `timeout`; a missing socket or an agent that refuses
/// `guest-sync-delimited` is an error at once. Returns the connection and whatever the
/// agent sent after the sync reply.
pub fn open_agent(path: &Path, id: u64, timeout: Duration) -> Result<(UnixStream, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut agent = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                anyhow::bail!("{}", missing_socket(path))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(e).context(format!(
                    "nothing accepted connections on {} for {timeout:?} (is qemu-ga running?)",
                    path.display()
                ))
            }
            Err(e) => return Err(e).context("connect"),
        }
    };
    agent
        .write_all(&sync_request(id))
        .context("sending the sync")?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            close_agent(agent, Duration::from_millis(100));
            anyhow::bail!("no reply to guest-sync-delimited {id} within {timeout:?}");
        }
        agent.set_read_timeout(Some(left))?;
        match agent.read(&mut buf) {
            Ok(0) => anyhow::bail!("the agent closed the connection before the sync reply"),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("reading the sync reply"),
        }
        if let Some(end) = find_sync_reply(&got, id) {
            agent.set_read_timeout(None)?;
            return Ok((agent, got.split_off(end)));
        }
        let complete = got.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if let Some(desc) = got[..complete]
            .split(|&b| b == b'\n')
            .find_map(sync_refusal)
        {
            close_agent(agent, Duration::from_millis(100));
            anyhow::bail!(
                "qemu-ga refuses guest-sync-delimited, which the bridge needs (\"{desc}\"): allow it in qemu-ga's configuration (--block-rpcs/block-rpcs must not list it; --allow-rpcs/allow-rpcs, if given, must), then restart qemu-ga"
            );
        }
    }
}

/// Closes an agent connection gracefully: shut down for writing, read (and discard)
/// until the agent's EOF or `timeout`, then close.
pub fn close_agent(agent: UnixStream, timeout: Duration) {
    let _ = agent.set_nonblocking(false);
    let _ = agent.shutdown(Shutdown::Write);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    let mut a = &agent;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || a.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match a.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_reply_is_found_after_garbage() {
        let buf = b"{\"error\": {}}\n\xff{\"return\": 17}\n{\"return\": {}}\n";
        let end = find_sync_reply(buf, 17).unwrap();
        assert_eq!(&buf[end..], b"{\"return\": {}}\n");
        assert_eq!(find_sync_reply(buf, 18), None);
        // Without the 0xFF it is not the delimited reply.
        assert_eq!(find_sync_reply(b"{\"return\": 17}\n", 17), None);
        // Incomplete line.
        assert_eq!(find_sync_reply(b"\xff{\"return\": 17}", 17), None);
    }

    #[test]
    fn sync_refusal_is_recognised() {
        let blocked = b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-sync-delimited has been disabled: the command is not allowed\"}}";
        assert_eq!(
            sync_refusal(blocked).as_deref(),
            Some("Command guest-sync-delimited has been disabled: the command is not allowed")
        );
        let older = b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"The command guest-sync-delimited has been disabled for this instance\"}}";
        assert!(sync_refusal(older).unwrap().contains("disabled"));
        // The parse error for the 0xFF byte, and other commands' errors, are not refusals.
        let stray = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\u{FFFD}'\"}}";
        assert_eq!(sync_refusal(stray.as_bytes()), None);
        assert_eq!(sync_refusal(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Command guest-exec has been disabled\"}}"), None);
        assert_eq!(sync_refusal(b"\xff{\"return\": 5}"), None);
    }

    #[test]
    fn ids_are_fresh_and_in_range() {
        let a = fresh_id();
        let b = fresh_id();
        assert!((1..1 << 31).contains(&a) && (1..1 << 31).contains(&b));
        assert_ne!(a, b);
    }
}
