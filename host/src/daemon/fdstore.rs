//! systemd's file descriptor store (placeholder: filled in below).

/// The fd store of the service manager, when there is one.
#[derive(Debug, Default)]
pub struct FdStore {
    enabled: bool,
}

impl FdStore {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> FdStore {
        FdStore { enabled: false }
    }

    /// Whether fds are kept across a restart.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Keeps what the VMs `names` need.
    pub fn sync(&self, names: &[String]) {
        let _ = names;
    }
}
