//! `ivring-host daemon`: one process serving every VM on the host.
//!
//! For each VM it runs an ivshmem server socket (`DIR/NAME.ivshmem.sock`, what QEMU's
//! `-chardev socket,path=` or libvirt's `<shmem><server path=>` names), takes the host
//! side of the VM's link itself, and offers the guest agent's clients a socket
//! (`DIR/NAME.qga.sock`) carried over the link to the guest bridge, as `ivring-host
//! bridge` does. VMs are added and removed while it runs through its control socket
//! (`DIR/control.sock`, line-delimited JSON: [`control`]), which `ivring-host vm
//! add|remove|list|recover` speak.
//!
//! Threads: three, whatever the number of VMs. One ([`hub`]) serves every VM's ivshmem
//! socket; one ("ivring-links", `links.rs`) runs the keeper of every VM's link, its
//! endpoint being attached with `attach_driven` (an epoll loop over every link's doorbell
//! and one set of deadlines for the heartbeats: no thread per link); and one (the
//! caller's, running a current-thread tokio runtime) serves the control socket, every
//! agent socket and every relay. See the README's figures.
//!
//! The VM list is kept in `DIR/vms.json` (written atomically) and re-created when the
//! daemon starts: `Daemon::restore` and the README's "What survives a daemon restart"
//! say what survives a restart.

pub mod args;
pub mod control;
pub mod fdstore;
pub mod hub;
mod links;

use crate::bridge::{relay_async, RelayOptions};
use anyhow::{anyhow, bail, Context, Result};
use hub::{Hub, HubBell, VmServer};
use ivring::tokio::AsyncSession;
use ivring::{Config, Endpoint, Role};
use ivring_ivshmem::HostError;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// The daemon's runtime directory by default.
pub const DEFAULT_DIR: &str = ivring_ivshmem::server::RUNTIME_DIR;
/// The control socket's file name in the runtime directory.
pub const CONTROL_SOCK: &str = "control.sock";
/// The VM list's file name in the runtime directory.
pub const STATE_FILE: &str = "vms.json";

/// What one VM gets: its memory, doorbells, limits and sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's name: letters, digits, `.`, `_`, `-`, at most 64, not starting with `.`
    /// or `-` (libvirt's domain name, usually).
    pub name: String,
    /// Shared memory size (a power of two from 64 KiB to 1 GiB; QEMU's `size` must match).
    pub size: u64,
    /// Interrupt vectors per peer (QEMU's `vectors=`).
    pub vectors: usize,
    /// Most peers on the VM's ivshmem socket (QEMU, guest-role programs, host programs).
    pub max_peers: usize,
    /// Most sessions open at once on the VM's link.
    pub max_sessions: usize,
    /// Receive buffer per session, in bytes.
    pub buf_size: u32,
    /// Largest receive buffer a session grows to, in bytes.
    pub max_buf_size: u32,
    /// The daemon takes the host side of the link and offers the agent socket. Without
    /// it the daemon only serves the ivshmem socket, and a host program joins it as
    /// with `ivring-host serve` (`ivring-host bridge --join`, your own program).
    pub agent: bool,
    /// The guest bridge's port.
    pub agent_port: u32,
    /// More guest ports offered as `NAME.portN.sock` (any number of clients at once).
    pub forward: Vec<u32>,
}

impl VmSpec {
    /// A spec with the defaults for `name`.
    pub fn new(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            size: 4 << 20,
            vectors: 1,
            max_peers: 8,
            max_sessions: 64,
            buf_size: 64 << 10,
            max_buf_size: 1 << 20,
            agent: true,
            agent_port: crate::bridge::PORT_QGA,
            forward: Vec::new(),
        }
    }

    /// As the control protocol and the state file write it.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name, "size": self.size, "vectors": self.vectors,
            "max_peers": self.max_peers, "max_sessions": self.max_sessions,
            "buf_size": self.buf_size, "max_buf_size": self.max_buf_size,
            "agent": self.agent, "agent_port": self.agent_port, "forward": self.forward,
        })
    }

    /// Reads what [`VmSpec::to_json`] wrote; missing fields take the defaults.
    pub fn from_json(v: &Value) -> Result<VmSpec> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("a VM needs a \"name\""))?;
        let mut s = VmSpec::new(name);
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        if let Some(x) = u("size") {
            s.size = x;
        }
        if let Some(x) = u("vectors") {
            s.vectors = x as usize;
        }
        if let Some(x) = u("max_peers") {
            s.max_peers = x as usize;
        }
        if let Some(x) = u("max_sessions") {
            s.max_sessions = x as usize;
        }
        if let Some(x) = u("buf_size") {
            s.buf_size = u32::try_from(x).context("buf_size is too large")?;
        }
        if let Some(x) = u("max_buf_size") {
            s.max_buf_size = u32::try_from(x).context("max_buf_size is too large")?;
        }
        if let Some(x) = v.get("agent").and_then(Value::as_bool) {
            s.agent = x;
        }
        if let Some(x) = u("agent_port") {
            s.agent_port = x as u32;
        }
        if let Some(a) = v.get("forward").and_then(Value::as_array) {
            s.forward = a
                .iter()
                .filter_map(Value::as_u64)
                .map(|p| p as u32)
                .collect();
        }
        Ok(s)
    }

    /// Checks the name and the limits, in one line saying what to change.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        ivring_ivshmem::shm::validate_size("shared memory", self.size)?;
        if self.vectors == 0 || self.vectors > ivring_ivshmem::server::MAX_VECTORS {
            bail!(
                "vm {}: --vectors {}: give 1 to {}",
                self.name,
                self.vectors,
                ivring_ivshmem::server::MAX_VECTORS
            );
        }
        if self.max_peers == 0 || self.max_peers > 1024 {
            bail!(
                "vm {}: --max-peers {}: give 1 to 1024",
                self.name,
                self.max_peers
            );
        }
        if self.max_sessions == 0 {
            bail!("vm {}: --max-sessions must be at least 1", self.name);
        }
        if self.buf_size < 4096 || self.max_buf_size < self.buf_size {
            bail!(
                "vm {}: --buf-size must be at least 4K and at most --max-buf-size",
                self.name
            );
        }
        if self.forward.contains(&self.agent_port) {
            bail!(
                "vm {}: --forward {}: that is the agent's port, already offered as {}.qga.sock",
                self.name,
                self.agent_port,
                self.name
            );
        }
        Ok(())
    }

    fn config(&self, heartbeat: Duration) -> Config {
        Config {
            heartbeat,
            max_sessions: self.max_sessions,
            buf_size: self.buf_size,
            max_buf_size: self.max_buf_size,
            ..Config::default()
        }
    }
}

/// A VM name is a file name in the runtime directory: letters, digits, `.`, `_`, `-`, at
/// most 64, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!(
            "bad VM name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting \
             with '.' or '-'"
        );
    }
    Ok(())
}

/// The ivshmem socket of VM `name` in `dir`.
pub fn ivshmem_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.ivshmem.sock"))
}

/// The agent socket of VM `name` in `dir`.
pub fn agent_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.qga.sock"))
}

/// The socket of forwarded guest port `port` of VM `name` in `dir`.
pub fn port_socket(dir: &Path, name: &str, port: u32) -> PathBuf {
    dir.join(format!("{name}.port{port}.sock"))
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The runtime directory: the control socket, the state file, every VM's sockets.
    pub dir: PathBuf,
    /// Group given access to the sockets (mode 0660 instead of 0600), for a QEMU and
    /// agent clients running as another user.
    pub group: Option<u32>,
    /// The heartbeat period of every link's host side (the ring's default is 100 ms).
    pub heartbeat: Duration,
    /// Keep every VM's fds in the service manager's store (`$NOTIFY_SOCKET`), and take
    /// them back at start: see [`fdstore`].
    pub fd_store: bool,
}

impl DaemonOptions {
    /// Defaults for `dir`.
    pub fn new(dir: PathBuf) -> DaemonOptions {
        DaemonOptions {
            dir,
            group: None,
            heartbeat: Config::default().heartbeat,
            fd_store: false,
        }
    }

    fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    fn group_str(&self) -> Option<String> {
        self.group.map(|g| g.to_string())
    }
}

/// One VM the daemon serves.
struct Vm {
    spec: VmSpec,
    /// The daemon's side of the link (with `spec.agent`).
    endpoint: Option<Arc<Endpoint>>,
    bell: Option<Arc<HubBell>>,
    /// Set to end the VM's socket tasks (and their clients).
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    clients: Arc<AtomicU64>,
    /// Restored from the state file after a restart without the fd store: a QEMU that
    /// was running holds the old memory, and its doorbell device is dead.
    restored_fresh: bool,
}

/// A control request and where its answer goes.
pub(crate) struct Request {
    pub body: Value,
    pub reply: oneshot::Sender<Value>,
}

/// The daemon's state, owned by its manager task.
struct Daemon {
    opts: DaemonOptions,
    hub: Hub,
    links: links::Links,
    vms: BTreeMap<String, Vm>,
    store: Arc<fdstore::FdStore>,
}

/// Runs the daemon until SIGTERM/SIGINT-less death (it runs for ever; systemd stops it).
pub fn run(opts: DaemonOptions) -> Result<()> {
    // First, before any thread exists: it takes the fds passed back and clears the
    // environment variables naming them.
    let store = Arc::new(if opts.fd_store {
        fdstore::FdStore::from_env()
    } else {
        fdstore::FdStore::disabled()
    });
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("create the runtime directory {}", opts.dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // One thread: the relays are not `Send` (and need not be).
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let control_path = opts.dir.join(CONTROL_SOCK);
        let listener =
            crate::bridge::bind_socket(&control_path, opts.mode(), opts.group_str().as_deref())
                .map_err(|e| {
                    if e.to_string().contains("in use") {
                        anyhow!(
                    "{}: another ivring-host daemon is running on {}; stop it first or give \
                     another --dir",
                    control_path.display(),
                    opts.dir.display()
                )
                    } else {
                        e
                    }
                })?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let (tx, rx) = mpsc::channel::<Request>(64);
        let mut daemon = Daemon {
            hub: Hub::start()?,
            links: links::Links::start()?,
            store,
            vms: BTreeMap::new(),
            opts,
        };
        daemon.restore();
        crate::notify::ready(&format!(
            "{} VMs, control on {}",
            daemon.vms.len(),
            control_path.display()
        ));
        info!(
            "daemon: control on {} ({} VM{} restored)",
            control_path.display(),
            daemon.vms.len(),
            if daemon.vms.len() == 1 { "" } else { "s" }
        );
        tokio::spawn(control::serve(listener, tx));
        daemon.manage(rx).await;
        Ok(())
    })
}

impl Daemon {
    async fn manage(&mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(req) = rx.recv().await {
            let answer = match self.handle(&req.body).await {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": crate::cli::one_line(&e)}),
            };
            let _ = req.reply.send(answer);
        }
    }

    async fn handle(&mut self, body: &Value) -> Result<Value> {
        let op = body.get("op").and_then(Value::as_str).unwrap_or("");
        let name = || {
            body.get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("request {op:?} needs a \"name\""))
        };
        match op {
            "add" => {
                let spec = VmSpec::from_json(body.get("vm").unwrap_or(&Value::Null))?;
                self.add(spec.clone(), false)?;
                self.save();
                Ok(json!({"ok": true, "vm": self.describe(&spec.name)}))
            }
            "remove" => {
                let name = name()?;
                check_name(name)?;
                self.remove(name).await?;
                self.save();
                Ok(json!({"ok": true}))
            }
            "list" => {
                let peers: BTreeMap<String, usize> = self.hub.peers().into_iter().collect();
                let vms: Vec<Value> = self
                    .vms
                    .keys()
                    .map(|n| {
                        let mut d = self.describe(n);
                        d["peers"] = json!(peers.get(n).copied().unwrap_or(0));
                        d
                    })
                    .collect();
                Ok(json!({
                    "ok": true, "vms": vms, "dir": self.opts.dir,
                    "threads": thread_count(), "keeper_threads": keeper_threads(),
                    "driven_links": self.links.count(), "pid": std::process::id(),
                    "fd_store": self.store.enabled(),
                }))
            }
            "recover" => {
                let name = name()?.to_owned();
                check_name(&name)?;
                self.recover(&name).await
            }
            "" => bail!("a request needs an \"op\": add, remove, list or recover"),
            other => bail!("unknown request {other:?}: use add, remove, list or recover"),
        }
    }

    fn describe(&self, name: &str) -> Value {
        let Some(vm) = self.vms.get(name) else {
            return Value::Null;
        };
        let dir = &self.opts.dir;
        let mut v = vm.spec.to_json();
        v["ivshmem_socket"] = json!(ivshmem_socket(dir, name));
        if vm.spec.agent {
            v["agent_socket"] = json!(agent_socket(dir, name));
        }
        v["link_up"] = json!(vm.endpoint.as_ref().map(|e| e.is_up()));
        v["sessions"] = json!(vm.endpoint.as_ref().map(|e| e.session_count()));
        v["clients"] = json!(vm.clients.load(Ordering::Relaxed));
        v["needs_recover"] = json!(vm.restored_fresh);
        if let Some(b) = &vm.bell {
            v["peer_ids"] = json!(b.peers());
        }
        v
    }

    /// Sets a VM up: memory, its ivshmem socket on the hub, and (with `agent`) our
    /// endpoint and its sockets. `fresh_after_restart`: restored from the state file
    /// with new memory.
    fn add(&mut self, spec: VmSpec, fresh_after_restart: bool) -> Result<()> {
        spec.validate()?;
        if self.vms.contains_key(&spec.name) {
            bail!(
                "vm {} is already served (`ivring-host vm list`); remove it first with \
                 `ivring-host vm remove {}`, or choose another name",
                spec.name,
                spec.name
            );
        }
        let dir = self.opts.dir.clone();
        let (mode, group) = (self.opts.mode(), self.opts.group_str());
        let ivs = ivshmem_socket(&dir, &spec.name);
        let memfd = ivring_ivshmem::sys::create_sealed_memfd(&spec.name, spec.size)?;
        let listener = crate::bridge::bind_socket(&ivs, mode, group.as_deref())?;
        listener.set_nonblocking(true)?;
        let mut ports = BTreeMap::new();
        if spec.agent {
            let mut want = vec![(spec.agent_port, agent_socket(&dir, &spec.name))];
            want.extend(
                spec.forward
                    .iter()
                    .map(|&p| (p, port_socket(&dir, &spec.name, p))),
            );
            for (port, path) in want {
                let l = crate::bridge::bind_socket(&path, mode, group.as_deref())?;
                l.set_nonblocking(true)?;
                ports.insert(port, l);
            }
        }
        let bell = if spec.agent {
            // The first id on the socket is ours (QEMU and others join after us).
            Some(Arc::new(HubBell::new(1, spec.vectors)?))
        } else {
            None
        };
        // Into the fd store (if any) before anyone can join.
        let name = &spec.name;
        self.store.put(&format!("{name}/mem"), memfd.as_fd());
        self.store.put(&format!("{name}/listen"), listener.as_fd());
        for (p, l) in &ports {
            self.store.put(&format!("{name}/port/{p}"), l.as_fd());
        }
        if let Some(b) = &bell {
            for (k, v) in b.own_vectors().enumerate() {
                self.store.put(&format!("{name}/bell/{k}"), v);
            }
        }
        let parts = Parts {
            listener,
            memfd: Arc::new(memfd),
            ports,
            bell,
            peers: Vec::new(),
        };
        self.start_vm(spec, parts, fresh_after_restart)
    }

    /// Takes a VM up again from the fds the service manager kept across a restart:
    /// `Ok(false)` when it kept none (the VM gets new memory instead).
    fn resume(&mut self, spec: &VmSpec) -> Result<bool> {
        let name = &spec.name;
        let Some(memfd) = self.store.take(&format!("{name}/mem")) else {
            return Ok(false);
        };
        let listener = self
            .store
            .take(&format!("{name}/listen"))
            .map(std::os::unix::net::UnixListener::from)
            .ok_or_else(|| anyhow!("the fd store kept its memory but not its socket"))?;
        listener.set_nonblocking(true)?;
        ivring_ivshmem::sys::check_memfd(memfd.as_fd(), "the kept shared memory")?;
        let mut ports = BTreeMap::new();
        if spec.agent {
            let mut want = vec![spec.agent_port];
            want.extend(spec.forward.iter().copied());
            for p in want {
                let l = self
                    .store
                    .take(&format!("{name}/port/{p}"))
                    .map(std::os::unix::net::UnixListener::from)
                    .ok_or_else(|| anyhow!("the fd store did not keep its port {p} socket"))?;
                l.set_nonblocking(true)?;
                ports.insert(p, l);
            }
        }
        let bell = if spec.agent {
            let own: Vec<ivring_ivshmem::sys::EventFd> = (0..spec.vectors)
                .map_while(|k| self.store.take(&format!("{name}/bell/{k}")))
                .map(ivring_ivshmem::sys::EventFd::from_owned)
                .collect();
            if own.len() != spec.vectors {
                bail!("the fd store did not keep all of its doorbell vectors");
            }
            Some(Arc::new(HubBell::with_vectors(1, own)?))
        } else {
            None
        };
        // The peers connected before the restart (QEMU among them): same ids, same
        // eventfds, same connection.
        let mut peers = Vec::new();
        for n in self.store.passed_names(&format!("{name}/peer/")) {
            let Some(id) = n
                .strip_prefix(&format!("{name}/peer/"))
                .and_then(|r| r.strip_suffix("/sock"))
                .and_then(|id| id.parse::<u16>().ok())
            else {
                continue;
            };
            let Some(sock) = self.store.take(&n) else {
                continue;
            };
            let vectors: Vec<Arc<ivring_ivshmem::sys::EventFd>> = (0..spec.vectors)
                .map_while(|k| self.store.take(&fdstore::peer_vec_name(name, id, k)))
                .map(|fd| Arc::new(ivring_ivshmem::sys::EventFd::from_owned(fd)))
                .collect();
            if vectors.len() != spec.vectors {
                warn!("vm {name}: peer {id}: the fd store lost some of its vectors: dropped");
                self.store.remove(&n);
                continue;
            }
            peers.push(hub::Peer {
                id,
                sock: std::os::unix::net::UnixStream::from(sock),
                vectors,
            });
        }
        let n_peers = peers.len();
        let parts = Parts {
            listener,
            memfd: Arc::new(memfd),
            ports,
            bell,
            peers,
        };
        self.start_vm(spec.clone(), parts, false)?;
        info!(
            "vm {name}: taken up again from the fd store: same memory, sockets and doorbells, \
             {n_peers} peer(s) still connected"
        );
        Ok(true)
    }

    fn start_vm(&mut self, spec: VmSpec, parts: Parts, restored_fresh: bool) -> Result<()> {
        let dir = self.opts.dir.clone();
        let ivs = ivshmem_socket(&dir, &spec.name);
        let (stop, stop_rx) = watch::channel(false);
        let clients = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let region = ivring_ivshmem::shm::map_memfd(parts.memfd.as_fd())?;
        let bell = parts.bell;
        let mut endpoint = None;
        if let Some(b) = &bell {
            let ep = Endpoint::unattached(
                Role::Host,
                region,
                b.clone(),
                spec.config(self.opts.heartbeat),
            )
            .map_err(HostError::Layout)?;
            // No keeper thread: the links thread drives it, with every other VM's.
            let driver = ep
                .attach_driven()
                .ok_or_else(|| anyhow!("vm {}: its endpoint was already attached", spec.name))?;
            self.links.add(&spec.name, driver, b.clone());
            endpoint = Some(Arc::new(ep));
        }
        self.hub.add(
            VmServer::new(
                spec.name.clone(),
                ivs.clone(),
                parts.listener,
                parts.memfd,
                spec.vectors,
                spec.max_peers,
                bell.clone(),
                self.store.clone(),
            )
            .with_peers(parts.peers),
        );
        if let Some(ep) = &endpoint {
            for (port, l) in parts.ports {
                let path = if port == spec.agent_port {
                    agent_socket(&dir, &spec.name)
                } else {
                    port_socket(&dir, &spec.name, port)
                };
                let l = tokio::net::UnixListener::from_std(l)?;
                tasks.push(tokio::task::spawn_local(serve_port(
                    spec.name.clone(),
                    path,
                    l,
                    ep.clone(),
                    port,
                    port == spec.agent_port,
                    stop_rx.clone(),
                    clients.clone(),
                )));
            }
        }
        info!(
            "vm {}: serving {} of shared memory on {}{}",
            spec.name,
            ivring_ivshmem::shm::human_size(spec.size),
            ivs.display(),
            if spec.agent {
                format!(
                    ", agent clients on {}",
                    agent_socket(&dir, &spec.name).display()
                )
            } else {
                " (no host side: host programs join it)".into()
            }
        );
        self.vms.insert(
            spec.name.clone(),
            Vm {
                spec,
                endpoint,
                bell,
                stop,
                tasks,
                clients,
                restored_fresh,
            },
        );
        Ok(())
    }

    async fn remove(&mut self, name: &str) -> Result<()> {
        let Some(vm) = self.vms.remove(name) else {
            bail!("no VM named {name} is served (`ivring-host vm list` shows them)");
        };
        // Clients first, so that each is told why it ends; then the ivshmem socket.
        let _ = vm.stop.send(true);
        for t in vm.tasks {
            let _ = t.await;
        }
        self.hub.remove(name);
        // The last reference: the link detaches (the guest sees the host leave), the
        // links thread's next drive finds the endpoint gone and forgets it, and the memory
        // is unmapped once it has.
        drop(vm.endpoint);
        drop(vm.bell);
        info!("vm {name}: removed");
        Ok(())
    }

    /// After a restart without the fd store: says what the VM's QEMU needs, and clears
    /// the flag. The server already has new memory; nothing is re-created, so a QEMU
    /// that joined it since keeps its link.
    async fn recover(&mut self, name: &str) -> Result<Value> {
        let peers: BTreeMap<String, usize> = self.hub.peers().into_iter().collect();
        let Some(vm) = self.vms.get_mut(name) else {
            bail!("no VM named {name} is served (`ivring-host vm list` shows them)");
        };
        let was_stale = std::mem::replace(&mut vm.restored_fresh, false);
        let n = peers.get(name).copied().unwrap_or(0);
        let next = if !was_stale {
            format!(
                "vm {name} needs nothing: its server has run since it was added, or was taken \
                 up again from the fd store with its memory and connections"
            )
        } else if n > 0 {
            format!(
                "vm {name}: {n} peer(s) joined its new server since the daemon restarted (a \
                 QEMU started since then): their link works. A QEMU that ran before the \
                 restart and was not started again is still on the old memory: restart it \
                 (a guest reboot is not enough)"
            )
        } else {
            format!(
                "vm {name}: nothing has joined its new server: if its QEMU ran before the \
                 daemon restarted, stop and start it again (a guest reboot is not enough: \
                 QEMU never reconnects its ivshmem device) and it gets a working link"
            )
        };
        info!("{next}");
        Ok(json!({"ok": true, "vm": self.describe(name), "was_stale": was_stale, "next": next}))
    }

    /// Writes the VM list atomically (a temporary file renamed over the old one).
    fn save(&self) {
        let path = self.opts.dir.join(STATE_FILE);
        let tmp = self.opts.dir.join(format!(".{STATE_FILE}.tmp"));
        let body = json!({
            "version": 1,
            "vms": self.vms.values().map(|v| v.spec.to_json()).collect::<Vec<_>>(),
        });
        let written = (|| -> io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string_pretty(&body)?.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            warn!(
                "daemon: could not save the VM list to {}: {e} (a restart will not restore \
                 the VMs added since)",
                path.display()
            );
        }
    }

    /// Re-creates the VMs of the state file. What survives, and what does not:
    ///
    /// - With the fd store ([`fdstore`]): everything but the sessions. Each VM is taken
    ///   up again with its memory, sockets, doorbells and peers (QEMU never noticed).
    /// - Without it: every socket is re-created at the same path, with the VM's size and
    ///   limits, but with new memory and doorbells (the old lived in the old process), and
    ///   QEMU never reconnects its ivshmem chardev: a VM that was running keeps the old
    ///   memory and the daemon cannot reach it until its QEMU starts again. Such a VM is
    ///   listed with `needs_recover`, which `ivring-host vm recover NAME` clears, saying
    ///   what that VM still needs. A VM that was not running yet loses nothing.
    fn restore(&mut self) {
        let path = self.opts.dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(
                    "daemon: cannot read {}: {e}; starting with no VMs",
                    path.display()
                );
                return;
            }
        };
        let specs: Vec<VmSpec> = match serde_json::from_str::<Value>(&text) {
            Ok(v) => v
                .get("vms")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| VmSpec::from_json(v).ok()).collect())
                .unwrap_or_default(),
            Err(e) => {
                warn!(
                    "daemon: {} is not JSON ({e}); starting with no VMs",
                    path.display()
                );
                return;
            }
        };
        for spec in specs {
            let name = spec.name.clone();
            match self.resume(&spec) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => warn!(
                    "vm {name}: the fd store's copy is unusable ({}); giving it new memory",
                    crate::cli::one_line(&e)
                ),
            }
            self.store.remove_vm(&name);
            match self.add(spec, true) {
                Ok(()) => warn!(
                    "vm {name}: restored with new shared memory: a QEMU still running from \
                     before this daemon started cannot reach it; restart that VM (or re-plug \
                     its ivshmem device), then `ivring-host vm recover {name}` if it was"
                ),
                Err(e) => warn!("vm {name}: not restored: {}", crate::cli::one_line(&e)),
            }
        }
        // Kept fds of VMs no longer listed are let go.
        self.store.drop_untaken();
        self.save();
    }
}

/// What a VM is served with: new, or kept across a restart.
struct Parts {
    listener: std::os::unix::net::UnixListener,
    memfd: Arc<OwnedFd>,
    ports: BTreeMap<u32, std::os::unix::net::UnixListener>,
    bell: Option<Arc<HubBell>>,
    peers: Vec<hub::Peer>,
}

/// Serves one guest port's socket of a VM: each client gets one session to the guest's
/// `port`, relayed until either side closes. `one_at_a_time` (the agent): the next
/// client is accepted when the current one has left, as `ivring-host bridge` does.
#[allow(clippy::too_many_arguments)]
async fn serve_port(
    vm: String,
    path: PathBuf,
    listener: tokio::net::UnixListener,
    endpoint: Arc<Endpoint>,
    port: u32,
    one_at_a_time: bool,
    mut stop: watch::Receiver<bool>,
    clients: Arc<AtomicU64>,
) {
    let mut relays = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("vm {vm}: {}: accept: {e}", path.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let n = clients.fetch_add(1, Ordering::Relaxed) + 1;
        let client = serve_client(vm.clone(), endpoint.clone(), stream, port, n);
        if one_at_a_time {
            tokio::select! {
                () = client => {}
                _ = stop.changed() => {
                    warn!("vm {vm}: removed while client {n} of {} was connected: \
                           ending it (the client gets EOF)", path.display());
                    break;
                }
            }
        } else {
            relays.spawn_local(client);
        }
    }
    if !relays.is_empty() {
        warn!(
            "vm {vm}: removed while {} client(s) of {} were connected: ending them (they get EOF)",
            relays.len(),
            path.display()
        );
    }
    relays.shutdown().await;
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

/// One client: a session to the guest's `port`, then the relay.
async fn serve_client(
    vm: String,
    endpoint: Arc<Endpoint>,
    mut stream: tokio::net::UnixStream,
    port: u32,
    n: u64,
) {
    // A client that came and went while queued gets no session at all.
    let mut first = Vec::new();
    let mut b = [0u8; 4096];
    match stream.try_read(&mut b) {
        Ok(0) => return,
        Ok(k) => first.extend_from_slice(&b[..k]),
        Err(_) => {}
    }
    // Right after a guest (re)start the link can be up a moment before the guest bridge
    // listens: a refusal is retried for a while.
    let since = tokio::time::Instant::now();
    let mut session = loop {
        match AsyncSession::connect(&endpoint, port).await {
            Ok(s) => break s,
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && since.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                warn!("vm {vm}: client {n}: no session to the guest's port {port}: {e}");
                return;
            }
        }
    };
    let id = session.id();
    let opts = RelayOptions {
        end_on_session_eof: true,
        ..RelayOptions::default()
    };
    let end = relay_async(&mut session, &mut stream, first, &opts).await;
    if !end.clean {
        warn!(
            "vm {vm}: client {n}: session {id} ended ({}): {} bytes to the guest, {} back",
            end.why, end.to_session, end.to_stream
        );
    } else {
        tracing::debug!(
            "vm {vm}: client {n}: session {id} ended ({}): {} bytes to the guest, {} back",
            end.why,
            end.to_session,
            end.to_stream
        );
    }
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Threads of this process that are a ring's keeper thread (one per endpoint attached
/// with `attach`; the daemon's are driven, so none).
pub fn keeper_threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| {
        d.filter_map(|t| t.ok())
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim_end() == "ivring-keeper")
            })
            .count()
    })
}

/// Sends one request to the daemon whose runtime directory is `dir` and returns its
/// answer (`"ok": true`), or its error as one line.
pub fn request(dir: &Path, body: &Value) -> Result<Value> {
    control::request(dir, body)
}
