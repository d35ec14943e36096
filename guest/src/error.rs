//! Errors of the guest device layer.
//!
//! Each message is one line that says what to check. [`Error::is_fallback`] separates the
//! errors after which the caller can still run the link by polling (VFIO is not usable) from
//! those that leave no link at all (no device, no access to its BARs).

use std::io;
use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while finding, mapping or driving the ivshmem device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PCI device 1af4:1110 under the sysfs root.
    #[error(
        "no ivshmem device (1af4:1110) in {}: start QEMU with -device ivshmem-plain or \
         ivshmem-doorbell",
        root.display()
    )]
    NoDevice {
        /// The sysfs devices directory that was searched.
        root: PathBuf,
    },

    /// Several ivshmem devices and no `--device` to choose one.
    #[error("several ivshmem devices ({}): choose one with --device BDF", bdfs.join(", "))]
    Ambiguous {
        /// The addresses of the ivshmem devices found.
        bdfs: Vec<String>,
    },

    /// `--device` names no PCI device.
    #[error(
        "no PCI device {bdf} in {}: check --device against `lspci -D -d 1af4:1110`",
        root.display()
    )]
    DeviceNotFound {
        /// The address asked for.
        bdf: String,
        /// The sysfs devices directory.
        root: PathBuf,
    },

    /// `--device` names a PCI device that is not ivshmem.
    #[error(
        "{bdf} is {vendor:04x}:{device:04x}, not ivshmem (1af4:1110): check --device against \
         `lspci -D -d 1af4:1110`"
    )]
    NotIvshmem {
        /// The address asked for.
        bdf: String,
        /// Its vendor id.
        vendor: u16,
        /// Its device id.
        device: u16,
    },

    /// BAR2 (the shared memory) is too small or not a power of two.
    #[error(
        "{bdf}: BAR2 (shared memory) is {size} bytes; it must be a power of two of at least \
         64 KiB: check size= of the memory backend or the ivshmem server's memory size"
    )]
    BadBar2 {
        /// The device address.
        bdf: String,
        /// The size found.
        size: u64,
    },

    /// A resource (or sysfs control) file could not be opened for lack of rights.
    #[error(
        "{}: permission denied: run as root (mapping PCI BARs through sysfs needs root and \
         CAP_SYS_ADMIN)",
        path.display()
    )]
    PermissionDenied {
        /// The file.
        path: PathBuf,
        /// The error from the kernel.
        #[source]
        source: io::Error,
    },

    /// A sysfs file held something this crate cannot parse.
    #[error("{}: unexpected contents ({what}): is this a PCI sysfs device directory?", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },

    /// A system call on a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error from the kernel.
        #[source]
        source: io::Error,
    },

    /// The guest has no usable IOMMU, so VFIO (and with it MSI-X) is unavailable; poll instead.
    #[error(
        "{bdf}: no IOMMU for VFIO ({detail}): boot the guest with intel_iommu=on and QEMU with \
         -machine q35 -device intel-iommu,intremap=on, or poll"
    )]
    NoIommu {
        /// The device address.
        bdf: String,
        /// What was missing.
        detail: String,
    },

    /// VFIO is present but a step of setting the device up failed; poll instead.
    #[error("{bdf}: VFIO: {step}: {source}")]
    Vfio {
        /// The device address.
        bdf: String,
        /// The step that failed, e.g. "binding to vfio-pci".
        step: String,
        /// The error from the kernel or pci-driver.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Whether the caller can still use the device without interrupts (by polling): true
    /// for the VFIO errors, false when the device itself cannot be used.
    pub fn is_fallback(&self) -> bool {
        matches!(self, Error::NoIommu { .. } | Error::Vfio { .. })
    }

    /// Classifies an `io::Error` from opening or mapping `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::PermissionDenied
            || source.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error())
        {
            Error::PermissionDenied { path, source }
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn vfio(bdf: &str, step: impl Into<String>, source: io::Error) -> Self {
        Error::Vfio {
            bdf: bdf.to_owned(),
            step: step.into(),
            source,
        }
    }
}
