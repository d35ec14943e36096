//! Bridges between a UNIX stream socket and ivring sessions.
//!
//! [`relay_async`] copies bytes both ways between one async session and one tokio UNIX
//! stream, passing half-closes through and waiting on readiness alone (no timed
//! re-polls). [`run_host`] is `ivring-host bridge`: it offers a UNIX socket, as QEMU's
//! `-chardev socket,server=on` does for the guest agent, and opens one session to the
//! guest's port per accepted client, relayed by [`relay_async`]; the guest half
//! (`ivring-guest bridge`) relays each session to the agent the same way.
//!
//! One client at a time: the guest agent serves one client at a time, so the host bridge
//! accepts the next client only when the current one has left. A second client that
//! connects meanwhile waits in the socket's listen backlog (its connect succeeds, its
//! requests wait unanswered) until the first client leaves, exactly as a second client of
//! qemu-ga's own socket does.

pub mod guest;

use crate::logging::{self, LinkWatch};
use anyhow::{bail, Context, Result};
use ivring::tokio::AsyncSession;
use ivring::{Config, Role};
use ivring_ivshmem::attach::{Attach, HostLink};
use std::cell::Cell;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The port the guest bridge listens on by default (the guest agent's).
pub const PORT_QGA: u32 = 5;

/// How [`relay_async`] behaves.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Once one side has finished sending (EOF), how long the other side may still send
    /// before the relay gives up on it.
    pub linger: Duration,
    /// Set to end the relay from another thread.
    pub stop: Option<Arc<AtomicBool>>,
    /// End as soon as the session's EOF has been passed on (the host bridge: the guest
    /// side closed, so the client gets EOF and nothing it sends could be answered).
    pub end_on_session_eof: bool,
    /// End as soon as the stream's EOF has been passed on (the guest bridge: the agent
    /// closed its connection; it never half-closes).
    pub end_on_stream_eof: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            linger: Duration::from_secs(10),
            stop: None,
            end_on_session_eof: false,
            end_on_stream_eof: false,
        }
    }
}

/// How a relay ended, and how much it carried.
#[derive(Clone, Debug)]
pub struct RelayEnd {
    /// Bytes copied from the stream into the session.
    pub to_session: u64,
    /// Bytes copied from the session into the stream.
    pub to_stream: u64,
    /// Both sides closed in order (EOF both ways), as opposed to an error, a stop or the
    /// linger time running out.
    pub clean: bool,
    /// Why it ended, in words for a log.
    pub why: String,
}

/// How often a relay looks at `stop`, when one is set.
const IDLE_WAIT: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 << 10;

/// Copies `r` into `w` until EOF, counting what `w` took.
async fn copy_counted<R, W>(r: &mut R, w: &mut W, count: &Cell<u64>) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.set(count.get() + n as u64);
    }
}

/// Copies bytes both ways between an async session and a tokio UNIX stream (on the
/// caller's runtime, which needs the I/O and time drivers), waiting on readiness alone:
/// each direction is a copy that ends by passing the EOF on as a shutdown of the other
/// side's write half. `to_session` (bytes already read from the stream) goes to the
/// session first. Ends when both ways are closed, one way as `opts.end_on_*` say, on an
/// error, when the linger time after the first direction finished runs out, or on
/// `opts.stop` (looked at every 200 ms, and only when set). Neither side is closed here.
pub async fn relay_async(
    session: &mut AsyncSession,
    stream: &mut tokio::net::UnixStream,
    to_session: Vec<u8>,
    opts: &RelayOptions,
) -> RelayEnd {
    use tokio::io::AsyncWriteExt;
    let (up_bytes, down_bytes) = (Cell::new(0u64), Cell::new(0u64));
    let end = |clean: bool, why: String| RelayEnd {
        to_session: up_bytes.get(),
        to_stream: down_bytes.get(),
        clean,
        why,
    };
    let (mut from_session, mut to_session_half) = session.split();
    let (mut from_stream, mut to_stream_half) = stream.split();
    let up = async {
        to_session_half.write_all(&to_session).await?;
        up_bytes.set(to_session.len() as u64);
        copy_counted(&mut from_stream, &mut to_session_half, &up_bytes).await?;
        to_session_half.shutdown().await
    };
    let down = async {
        copy_counted(&mut from_session, &mut to_stream_half, &down_bytes).await?;
        // The peer may already be gone; that ends the relay just as well.
        let _ = to_stream_half.shutdown().await;
        io::Result::Ok(())
    };
    let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
    let (mut up_done, mut down_done) = (false, false);
    let mut linger_until: Option<tokio::time::Instant> = None;
    loop {
        let linger = async {
            match linger_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let stop = async {
            match &opts.stop {
                Some(flag) => {
                    while !flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(IDLE_WAIT).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) => return end(false, format!("socket -> session: {e}")),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) => return end(false, format!("session -> socket: {e}")),
            },
            () = linger => {
                return end(
                    false,
                    format!(
                        "{} closed and the other side kept its half open for {:?}",
                        if up_done { "socket" } else { "session" },
                        opts.linger
                    ),
                );
            }
            () = stop => return end(false, "stopped".into()),
        }
        if up_done && down_done {
            return end(true, "closed".into());
        }
        if up_done && opts.end_on_stream_eof {
            return end(true, "socket closed".into());
        }
        if down_done && opts.end_on_session_eof {
            return end(true, "session closed".into());
        }
        linger_until.get_or_insert_with(|| tokio::time::Instant::now() + opts.linger);
    }
}

/// Parses a socket mode written in octal (`0600`, `660`).
pub fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 0600"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: a socket mode is at most 0777"));
    }
    Ok(m)
}

/// Looks a group up by number, or by name through the system's name service (LDAP and
/// sssd groups as well as `/etc/group`).
pub fn resolve_group(g: &str) -> Result<u32> {
    Ok(ivring_ivshmem::server::resolve_group(g)?)
}

/// Binds a listening UNIX socket at `path` with `mode` (and `group`), created with no
/// access for others from the start. A stale socket (nobody listening) is replaced; a
/// socket in use, or anything that is not a socket, is an error.
pub fn bind_socket(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if !md.file_type().is_socket() => {
            bail!("{}: exists and is not a socket", path.display())
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "{}: in use (another process is listening on it)",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("{}: removing the stale socket", path.display()))?;
            }
            Err(e) => bail!("{}: cannot tell whether it is in use: {e}", path.display()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", path.display()),
    }
    let gid = group.map(resolve_group).transpose()?;
    // Owner-only from the moment the socket exists; widened below if asked.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("{}: bind", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("{}: chown to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("{}: chmod {mode:o}", path.display()))?;
    Ok(listener)
}

/// What `ivring-host bridge` does.
#[derive(Clone, Debug)]
pub struct HostBridgeOptions {
    /// The UNIX socket to offer clients.
    pub listen: PathBuf,
    /// Where the link to the guest comes from.
    pub attach: Attach,
    /// The guest bridge's port.
    pub port: u32,
    /// The socket's mode.
    pub mode: u32,
    /// The socket's group (name or number).
    pub group: Option<String>,
    /// Relay tunables.
    pub relay: RelayOptions,
    /// How long a refused session (nobody listening on the guest's port yet) is retried
    /// before the client is given EOF.
    pub refused_wait: Duration,
    /// Log one line per client (failures to open a session are always logged).
    pub verbose: bool,
}

impl HostBridgeOptions {
    /// Defaults for the rest.
    pub fn new(listen: PathBuf, attach: Attach) -> HostBridgeOptions {
        HostBridgeOptions {
            listen,
            attach,
            port: PORT_QGA,
            mode: 0o600,
            group: None,
            relay: RelayOptions {
                end_on_session_eof: true,
                ..RelayOptions::default()
            },
            refused_wait: Duration::from_secs(5),
            verbose: true,
        }
    }
}

/// Runs the host bridge: binds the socket, attaches the link, then serves clients one at
/// a time for ever. Survives guest restarts: each client opens a fresh session, which
/// waits (up to `Config::connect_timeout`) for the link to come back up.
pub fn run_host(opts: &HostBridgeOptions) -> Result<()> {
    let listener = bind_socket(&opts.listen, opts.mode, opts.group.as_deref())?;
    let link = HostLink::open(Role::Host, &opts.attach, Config::default())
        .context("attaching to the shared memory")?;
    info!(
        "bridge: clients on {} -> guest port {} ({}; {})",
        opts.listen.display(),
        opts.port,
        if link.is_up() {
            "guest attached"
        } else {
            "guest not attached yet"
        },
        link.why()
    );
    // One thread: clients are served one at a time, and each relay waits on readiness.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    crate::notify::ready(&format!("bridge on {}", opts.listen.display()));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            LinkWatch::new(opts.attach.to_string()).run(&link, logging::WATCH_PERIOD, &stop)
        });
        let mut n = 0u64;
        for client in listener.incoming() {
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    warn!("bridge: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            n += 1;
            serve_client(&rt, &link, client, n, opts);
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(())
}

/// Serves one client: a session to the guest, then the relay; both closed at the end.
fn serve_client(
    rt: &tokio::runtime::Runtime,
    link: &HostLink,
    client: UnixStream,
    n: u64,
    opts: &HostBridgeOptions,
) {
    // A client that came and went while queued gets no session at all.
    let mut first = Vec::new();
    if client.set_nonblocking(true).is_ok() {
        let mut b = [0u8; 4096];
        match (&client).read(&mut b) {
            Ok(0) => return,
            Ok(k) => first.extend_from_slice(&b[..k]),
            Err(_) => {}
        }
    }
    // Right after a guest (re)start the link can be up a moment before the guest bridge
    // listens: a refusal is retried for a while.
    let since = Instant::now();
    let session = loop {
        match link.connect(opts.port) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && since.elapsed() < opts.refused_wait =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                warn!("bridge: client {n}: no session to the guest: {e}");
                return;
            }
        }
    };
    let id = session.id();
    let end = rt.block_on(async {
        let mut session = AsyncSession::from_session(session)?;
        client.set_nonblocking(true)?;
        let mut stream = tokio::net::UnixStream::from_std(client)?;
        io::Result::Ok(relay_async(&mut session, &mut stream, first, &opts.relay).await)
    });
    let end = match end {
        Ok(end) => end,
        Err(e) => RelayEnd {
            to_session: 0,
            to_stream: 0,
            clean: false,
            why: format!("relay: {e}"),
        },
    };
    let (why, to_guest, back) = (&end.why, end.to_session, end.to_stream);
    if !end.clean {
        warn!("bridge: client {n}: session {id} ended ({why}): {to_guest} bytes to the guest, {back} back");
    } else if opts.verbose {
        info!("bridge: client {n}: session {id} ended ({why}): {to_guest} bytes to the guest, {back} back");
    }
}
