//! The daemon's control socket: `DIR/control.sock`, mode 0600 (0660 with the daemon's
//! `--group`), one JSON object per line each way.
//!
//! Requests (one answer line each, in order; a connection may send many):
//!
//! ```text
//! {"op":"add","vm":{"name":"web1","size":4194304,"vectors":1,"max_peers":8,
//!                   "max_sessions":64,"buf_size":65536,"max_buf_size":1048576,
//!                   "agent":true,"agent_port":5,"forward":[]}}
//! {"op":"remove","name":"web1"}
//! {"op":"list"}
//! {"op":"recover","name":"web1"}
//! ```
//!
//! Answers: `{"ok":true,...}` (`add` and `recover` describe the VM under `"vm"`, `list`
//! every VM under `"vms"`), or `{"ok":false,"error":"one line saying what to do"}`.

use super::Request;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Longest request line taken; a longer one ends the connection.
const MAX_LINE: usize = 64 << 10;

/// Accepts control connections for ever, passing each request to the manager.
pub(crate) async fn serve(listener: tokio::net::UnixListener, tx: mpsc::Sender<Request>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(connection(s, tx.clone()));
            }
            Err(e) => {
                warn!("daemon: control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: tokio::net::UnixStream, tx: mpsc::Sender<Request>) {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = match (&mut r).take(MAX_LINE as u64).read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let answer = if n >= MAX_LINE && !line.ends_with('\n') {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            match serde_json::from_str::<Value>(line.trim()) {
                Ok(body) => {
                    let (reply, rx) = oneshot::channel();
                    if tx.send(Request { body, reply }).await.is_err() {
                        return;
                    }
                    rx.await
                        .unwrap_or_else(|_| json!({"ok": false, "error": "the daemon is stopping"}))
                }
                Err(e) => json!({"ok": false, "error": format!("not a JSON request: {e}")}),
            }
        };
        let mut out = answer.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// What to tell someone whose daemon is not there.
fn not_running(dir: &Path, why: &str) -> anyhow::Error {
    anyhow!(
        "the ivring daemon is not running on {} ({why}): start it with `ivring-host daemon{}` \
         or `systemctl start ivring-daemon`",
        dir.display(),
        if dir == Path::new(super::DEFAULT_DIR) {
            String::new()
        } else {
            format!(" --dir {}", dir.display())
        }
    )
}

/// Sends `body` to the daemon whose runtime directory is `dir`; an answer with `"ok":
/// false` becomes its error line.
pub fn request(dir: &Path, body: &Value) -> Result<Value> {
    let path = dir.join(super::CONTROL_SOCK);
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => not_running(dir, "no control.sock"),
                std::io::ErrorKind::ConnectionRefused => {
                    not_running(dir, "control.sock refuses connections")
                }
                std::io::ErrorKind::PermissionDenied => anyhow!(
                    "{}: permission denied: run as root, or as a member of the daemon's \
                     --group",
                    path.display()
                ),
                _ => anyhow!("{}: {e}", path.display()),
            })
        }
    };
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = body.to_string();
    line.push('\n');
    (&sock)
        .write_all(line.as_bytes())
        .with_context(|| format!("{}: send", path.display()))?;
    let mut answer = String::new();
    BufReader::new(&sock)
        .read_line(&mut answer)
        .with_context(|| format!("{}: no answer from the daemon", path.display()))?;
    if answer.is_empty() {
        bail!(
            "{}: the daemon closed the connection without answering",
            path.display()
        );
    }
    let v: Value = serde_json::from_str(answer.trim())
        .with_context(|| format!("{}: the daemon's answer is not JSON", path.display()))?;
    if v.get("ok").and_then(Value::as_bool) != Some(true) {
        bail!(
            "{}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon refused the request")
        );
    }
    Ok(v)
}
