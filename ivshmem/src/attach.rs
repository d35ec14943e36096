//! Attaching an [`Endpoint`] to real shared memory: joined to an ivshmem server (as QEMU
//! is), embedding a server, or a plain shared file without doorbells.

use crate::client::{Client, ConnectOptions};
use crate::error::HostError;
use crate::server::{Server, ServerHandle};
use crate::shm;
use ivring::doorbell::Polling;
use ivring::{Config, Endpoint, Geometry, Role, SharedRegion};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the shared memory and doorbells come from.
#[derive(Clone, Debug)]
pub enum Attach {
    /// Join a running ivshmem server (`ivring-host serve`, or QEMU's own) as a peer.
    /// Survives our own restarts: the server and QEMU keep the memory.
    Join(PathBuf),
    /// [`Attach::Join`] with options, e.g. [`ConnectOptions::allow_unsealed`] for QEMU's
    /// own ivshmem-server.
    JoinWith(PathBuf, ConnectOptions),
    /// Run an ivshmem server in this process on `socket` and join it. The link ends when
    /// this process exits (QEMU cannot reconnect to a new server).
    Serve {
        /// Socket path QEMU's `-chardev socket,path=` names.
        socket: PathBuf,
        /// Shared memory size in bytes (a power of two).
        size: u64,
        /// Interrupt vectors per peer (QEMU's `vectors=`).
        vectors: usize,
    },
    /// A plain shared file (`memory-backend-file,share=on` with `ivshmem-plain`): no
    /// doorbells, the link polls. Created with `size` if it does not exist.
    Plain {
        /// Usually `/dev/shm/NAME`.
        file: PathBuf,
        /// Size to create it with; an existing file must have this size if given.
        size: Option<u64>,
    },
}

/// An attached endpoint with what keeps its memory and doorbells alive.
pub struct HostLink {
    /// The endpoint (dropped first, so it detaches while the mapping still exists).
    pub endpoint: Endpoint,
    region: SharedRegion,
    client: Option<Client>,
    server: Option<ServerHandle>,
}

impl Attach {
    /// Joining the server at `socket`; `allow_unsealed` as [`ConnectOptions::allow_unsealed`].
    pub fn join(socket: PathBuf, allow_unsealed: bool) -> Attach {
        if allow_unsealed {
            Attach::JoinWith(
                socket,
                ConnectOptions {
                    allow_unsealed,
                    ..ConnectOptions::default()
                },
            )
        } else {
            Attach::Join(socket)
        }
    }
}

impl std::fmt::Display for Attach {
    /// The link as log lines name it: the server's socket or the plain file.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::Join(p) | Attach::JoinWith(p, _) => write!(f, "server {}", p.display()),
            Attach::Serve { socket, .. } => write!(f, "server {}", socket.display()),
            Attach::Plain { file, .. } => write!(f, "plain {}", file.display()),
        }
    }
}

impl HostLink {
    /// Attaches in `role`.
    pub fn open(role: Role, attach: &Attach, cfg: Config) -> Result<HostLink, HostError> {
        HostLink::open_with(role, attach, cfg, |_| Ok(()))
    }

    /// Attaches in `role` after `prepare` has run on the not yet attached endpoint: the
    /// place to start listeners, so that no connect arriving at once is refused.
    pub fn open_with(
        role: Role,
        attach: &Attach,
        cfg: Config,
        prepare: impl FnOnce(&Endpoint) -> std::io::Result<()>,
    ) -> Result<HostLink, HostError> {
        let (server, client, region, doorbell): (_, _, _, Arc<dyn ivring::Doorbell>) = match attach
        {
            Attach::Join(path) => {
                let c = Client::connect(path)?;
                let (r, d) = (c.region(), c.doorbell());
                (None, Some(c), r, d)
            }
            Attach::JoinWith(path, opts) => {
                let c = Client::connect_with(path, opts)?;
                let (r, d) = (c.region(), c.doorbell());
                (None, Some(c), r, d)
            }
            Attach::Serve {
                socket,
                size,
                vectors,
            } => {
                let s = Server::bind(socket, *size, *vectors)?.spawn();
                let c = Client::connect(socket)?;
                let (r, d) = (c.region(), c.doorbell());
                (Some(s), Some(c), r, d)
            }
            Attach::Plain { file, size } => {
                if let Some(size) = size {
                    shm::open_or_create_file(file, *size)?;
                }
                let r = shm::map_file(file)?;
                (None, None, r, Arc::new(Polling::new()))
            }
        };
        if role == Role::Guest {
            if let Some(notice) = Geometry::header_wait_notice(&region, cfg.layout_wait) {
                tracing::warn!("{notice}");
            }
        }
        let endpoint =
            Endpoint::unattached(role, region.clone(), doorbell, cfg).map_err(HostError::Layout)?;
        prepare(&endpoint).map_err(|e| HostError::Io {
            what: "prepare the endpoint".into(),
            source: e,
        })?;
        endpoint.attach();
        Ok(HostLink {
            endpoint,
            region,
            client,
            server,
        })
    }

    /// Our ivshmem peer id (`None` in plain mode).
    pub fn peer_id(&self) -> Option<u16> {
        self.client.as_ref().map(|c| c.id())
    }

    /// The shared memory (a clone), e.g. to read the words each side publishes.
    pub fn region(&self) -> SharedRegion {
        self.region.clone()
    }

    /// Whether this process serves the ivshmem protocol itself.
    pub fn embeds_server(&self) -> bool {
        self.server.is_some()
    }

    /// How the link is woken, and why: "interrupts: ..." or "polling: ...".
    pub fn why(&self) -> String {
        match &self.client {
            Some(c) if c.vectors() > 0 => format!(
                "interrupts: {} eventfd vector{} from the ivshmem server",
                c.vectors(),
                if c.vectors() == 1 { "" } else { "s" }
            ),
            Some(_) => "polling: the ivshmem server gives no doorbell vectors (QEMU's \
                        ivshmem-server -n 0)"
                .into(),
            None => "polling: plain shared file".into(),
        }
    }
}

impl std::ops::Deref for HostLink {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}
