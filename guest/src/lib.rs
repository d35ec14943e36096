//! ivring-guest: the ivshmem PCI device seen from inside a QEMU guest.
//!
//! [`open`] finds the device through sysfs, maps its shared memory (BAR2) and registers
//! (BAR0), and picks how the guest is woken:
//!
//! - **interrupts**: MSI-X through VFIO, when the device is ivshmem-doorbell, the guest has
//!   an IOMMU (`-device intel-iommu`, `intel_iommu=on`) and VFIO is available;
//! - **polling** otherwise (ivshmem-plain, no IOMMU, no vfio-pci): the guest still rings the
//!   host through the Doorbell register, but sleeps with backoff to see what the host sends.
//!
//! [`GuestDevice::why`] says which mode was chosen and why, in words meant for a log.
//!
//! ```no_run
//! use ivring::Doorbell;
//! let dev = ivring_guest::open(&ivring_guest::OpenOptions::default())?;
//! eprintln!("{} ({} bytes): {}", dev.bdf(), dev.region().len(), dev.why());
//! dev.doorbell().ring(0);
//! # Ok::<(), ivring_guest::Error>(())
//! ```
#![deny(missing_docs)]

pub mod device;
pub mod doorbell;
pub mod error;
pub mod vfio;

pub use device::{DeviceInfo, DeviceKind, Registers};
pub use doorbell::GuestDoorbell;
pub use error::{Error, Result};

use ivring::SharedRegion;
use std::path::PathBuf;
use std::sync::Arc;

/// How [`open`] finds and drives the device.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The sysfs PCI devices directory (default `/sys/bus/pci/devices`).
    pub sysfs_root: PathBuf,
    /// The device to use (`--device BDF`); `None`: the only ivshmem device.
    pub device: Option<String>,
    /// Whether to try VFIO (and bind the device to vfio-pci) for MSI-X interrupts.
    pub vfio: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            sysfs_root: PathBuf::from(device::DEFAULT_SYSFS_ROOT),
            device: None,
            vfio: true,
        }
    }
}

/// How the guest learns that the host rang.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// MSI-X vectors through VFIO wake [`ivring::Doorbell::wait`].
    Interrupts,
    /// No interrupts: waits sleep with backoff.
    Polling,
}

/// An opened ivshmem device: shared memory, registers, doorbell, and the chosen mode.
#[derive(Debug)]
pub struct GuestDevice {
    info: DeviceInfo,
    region: SharedRegion,
    doorbell: Arc<GuestDoorbell>,
    mode: Mode,
    why: String,
}

impl GuestDevice {
    /// The shared memory (BAR2); clones keep the mapping alive.
    pub fn region(&self) -> SharedRegion {
        self.region.clone()
    }

    /// The doorbell to hand to the ring.
    pub fn doorbell(&self) -> Arc<GuestDoorbell> {
        self.doorbell.clone()
    }

    /// Interrupts or polling.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Why this mode, e.g. "polling: device is ivshmem-plain (no MSI-X)".
    pub fn why(&self) -> &str {
        &self.why
    }

    /// The device's PCI address.
    pub fn bdf(&self) -> &str {
        &self.info.bdf
    }

    /// Sizes of BAR0..BAR5 in bytes (0: unused).
    pub fn bar_sizes(&self) -> [u64; 6] {
        self.info.bar_sizes
    }

    /// What sysfs said about the device when it was opened.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// This peer's id as the device reports it now (IVPosition; 0 on ivshmem-plain).
    pub fn iv_position(&self) -> u16 {
        self.doorbell.registers().iv_position()
    }
}

/// Finds the device, maps it, and picks interrupts (VFIO + MSI-X) or polling.
///
/// Errors that leave no device (none found, `--device` wrong, BAR2 unusable, no access to
/// the resource files) are returned; VFIO problems are not errors but a fall back to
/// polling, explained by [`GuestDevice::why`].
pub fn open(opts: &OpenOptions) -> Result<GuestDevice> {
    let root = &opts.sysfs_root;
    let info = device::select(root, opts.device.as_deref())?;

    let no_vfio = if !info.has_msix {
        Some("polling: device is ivshmem-plain (no MSI-X)".to_owned())
    } else if !opts.vfio {
        Some("polling: VFIO turned off by the caller".to_owned())
    } else if info.iommu_group.is_none() {
        Some(
            "polling: no IOMMU group; boot the guest with intel_iommu=on and -device intel-iommu"
                .to_owned(),
        )
    } else if !std::path::Path::new(vfio::VFIO_CONTAINER).exists() {
        Some(format!(
            "polling: {} missing; load the vfio-pci module",
            vfio::VFIO_CONTAINER
        ))
    } else {
        None
    };

    let why = match no_vfio {
        Some(why) => why,
        None => match open_vfio(&info, root) {
            Ok((region, doorbell, nvec)) => {
                return Ok(GuestDevice {
                    why: format!("interrupts: MSI-X through VFIO ({nvec} vectors)"),
                    info,
                    region,
                    doorbell: Arc::new(doorbell),
                    mode: Mode::Interrupts,
                });
            }
            Err(e) if e.is_fallback() => format!("polling: {e}"),
            Err(e) => return Err(e),
        },
    };

    // A device left behind by vfio-pci (a failed VFIO attempt) may have memory decoding
    // off, and then BAR accesses through sysfs would read all ones.
    info.enable_memory_decoding();
    let region = info.map_shared()?;
    let regs = info.map_registers()?;
    let doorbell = GuestDoorbell::polling(regs).map_err(|e| Error::Io {
        path: "eventfd".into(),
        source: e,
    })?;
    Ok(GuestDevice {
        info,
        region,
        doorbell: Arc::new(doorbell),
        mode: Mode::Polling,
        why,
    })
}

/// The VFIO half of [`open`]: every failure here is a reason to poll instead.
fn open_vfio(
    info: &DeviceInfo,
    root: &std::path::Path,
) -> Result<(SharedRegion, GuestDoorbell, usize)> {
    let v = vfio::VfioDevice::open(info, root)?;
    let region = v.map_shared()?;
    let regs = v.registers()?;
    let nvec = v.vectors().len();
    let doorbell = GuestDoorbell::msix(regs, v)
        .map_err(|e| Error::vfio(&info.bdf, "creating the interrupt eventfd", e))?;
    Ok((region, doorbell, nvec))
}
