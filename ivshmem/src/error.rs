//! Errors of the ivshmem side: one line each, saying what went wrong and what to do.

use std::io;
use std::path::PathBuf;

/// Everything the host side can fail with.
///
/// Variants carrying an [`io::Error`] expose it as their [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A system call failed; `what` says which operation.
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed, e.g. "create eventfd".
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The region has a size ivring cannot use.
    #[error(
        "region {what} is {size} bytes; ivring needs a power of two from 64 KiB to 1 GiB: \
         recreate it with size={suggest}"
    )]
    BadSize {
        /// The region (a path, or "memfd from the ivshmem server").
        what: String,
        /// Its size in bytes.
        size: u64,
        /// A usable size close to it, e.g. "4M".
        suggest: String,
    },

    /// The fd is not a memfd or shmem file (`F_GET_SEALS` said EINVAL).
    #[error(
        "{what} is not a memfd, so nothing stops its owner shrinking it under our mapping; \
         refusing to map it: if the ivshmem server is trusted (QEMU's ivshmem-server -m), \
         join with --allow-unsealed; otherwise use a server that seals its memfd"
    )]
    NotMemfd {
        /// The fd's description.
        what: String,
    },

    /// The memfd can be shrunk by someone else, so mapping it could SIGBUS us.
    #[error(
        "{what} is not sealed against shrinking (F_SEAL_SHRINK); refusing to map it: \
         if the ivshmem server is trusted (QEMU's ivshmem-server -M), join with \
         --allow-unsealed; otherwise use a server that seals its memfd, or plain mode on a \
         file you own"
    )]
    NotSealed {
        /// The fd's description.
        what: String,
    },

    /// A live server already listens on the socket path.
    #[error("socket {} is in use by a running server; stop it or choose another --socket", .path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },

    /// The socket path exists and is not a socket; it was left untouched.
    #[error("{} exists and is not a socket; remove it yourself or choose another --socket", .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },

    /// The directory a socket should go in does not exist.
    #[error("directory {} does not exist: create it (mkdir -p {}) or put the socket elsewhere", .dir.display(), .dir.display())]
    NoSocketDir {
        /// The missing directory.
        dir: PathBuf,
    },

    /// `--join` named something that is not a socket.
    #[error("{} is not a socket: give the socket of a running ivshmem server (ivring-host serve --socket)", .path.display())]
    NotAServerSocket {
        /// The path.
        path: PathBuf,
    },

    /// Nothing exists where the ivshmem server's socket should be.
    #[error("no ivshmem server socket at {}: start the server first (ivring-host serve --socket {})", .path.display(), .path.display())]
    NoServer {
        /// The socket path.
        path: PathBuf,
    },

    /// A group name the system's name service does not know.
    #[error("no group named {name:?}: give an existing group's name or number")]
    NoSuchGroup {
        /// The name given.
        name: String,
    },

    /// The number of vectors asked for is out of range.
    #[error("{vectors} vectors asked for; ivshmem needs 1 to {max}: pass --vectors in that range")]
    BadVectors {
        /// What was asked for.
        vectors: usize,
        /// The largest accepted.
        max: usize,
    },

    /// The server spoke a protocol version other than 0.
    #[error("ivshmem server at {} speaks protocol version {version}, expected 0: is it an ivshmem server?", .path.display())]
    BadVersion {
        /// The socket path.
        path: PathBuf,
        /// The version it sent.
        version: i64,
    },

    /// The server broke the protocol (or closed the socket) during or after the handshake.
    #[error("ivshmem protocol error from {}: {detail}", .path.display())]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// A message came with more than one fd, or its fds were truncated (MSG_CTRUNC).
    /// Every received fd has been closed.
    #[error("ivshmem message carried {count} fds{}; all closed", if *.truncated { " (truncated)" } else { "" })]
    BadFds {
        /// How many fds arrived.
        count: usize,
        /// Whether the kernel truncated the control data.
        truncated: bool,
    },

    /// Waiting for the server's handshake timed out.
    #[error("ivshmem server at {} did not finish the handshake in time; is it an ivshmem server?", .path.display())]
    HandshakeTimeout {
        /// The socket path.
        path: PathBuf,
    },

    /// The shared memory cannot carry ivring (size, or someone else's data in it).
    #[error("{0}")]
    Layout(ivring::LayoutError),
}

impl HostError {
    /// Wraps an OS error with the operation that failed.
    pub fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        HostError::Io {
            what: what.into(),
            source: source.into(),
        }
    }

    /// Whether the link is over (as opposed to an error in setup input).
    pub fn is_broken_link(&self) -> bool {
        matches!(
            self,
            HostError::Protocol { .. }
                | HostError::BadFds { .. }
                | HostError::HandshakeTimeout { .. }
        )
    }
}

/// Result with a [`HostError`].
pub type Result<T, E = HostError> = std::result::Result<T, E>;
