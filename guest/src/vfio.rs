//! Driving the ivshmem device through VFIO (pci-driver), for MSI-X interrupts in user space.
//!
//! Steps: bind the device to vfio-pci (`driver_override`, unbind, `drivers_probe`), open its
//! group in a new type1v2 container, enable bus mastering (vfio-pci leaves it off and MSI-X
//! is not delivered without it), map BAR2 and BAR0, and route MSI-X vectors 0 and 1 (if the
//! device has them) to eventfds.
//!
//! pci-driver needs a real IOMMU (type1v2 container); a guest without `-device intel-iommu`
//! and `intel_iommu=on` gets [`Error::NoIommu`], and the caller polls instead.

use crate::device::{DeviceInfo, Registers};
use crate::error::{Error, Result};
use ivring::SharedRegion;
use pci_driver::backends::vfio::VfioPciDevice;
use pci_driver::device::PciDevice;
use pci_driver::regions::{PciRegion, Permissions};
use rustix::event::{eventfd, EventfdFlags};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the VFIO container device lives.
pub const VFIO_CONTAINER: &str = "/dev/vfio/vfio";
/// The command register in PCI config space.
const PCI_COMMAND: u64 = 0x04;
/// Command register: memory space enable.
const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable (needed for MSI-X).
const CMD_BUS_MASTER: u16 = 1 << 2;
/// The most MSI-X vectors we route (QEMU's ivshmem rings vector 0; 1 is spare).
const MAX_VECTORS: usize = 2;

/// An ivshmem device opened through VFIO, with MSI-X vectors routed to eventfds.
///
/// Dropping it disables MSI-X and closes the device (the mappings it handed out stay valid
/// while they live).
#[derive(Debug)]
pub struct VfioDevice {
    bdf: String,
    device: VfioPciDevice,
    vectors: Vec<OwnedFd>,
}

impl VfioDevice {
    /// Opens `info` through VFIO: binds it to vfio-pci if needed, enables bus mastering and
    /// routes its MSI-X vectors to eventfds. `root` is the sysfs devices directory (its
    /// parent holds `drivers_probe`).
    pub fn open(info: &DeviceInfo, root: &Path) -> Result<VfioDevice> {
        let bdf = info.bdf.as_str();
        let Some(group) = info.iommu_group else {
            return Err(Error::NoIommu {
                bdf: bdf.to_owned(),
                detail: "the device has no iommu_group".into(),
            });
        };
        if !Path::new(VFIO_CONTAINER).exists() {
            return Err(Error::vfio(
                bdf,
                format!("{VFIO_CONTAINER} is missing: load the vfio-pci module"),
                io::ErrorKind::NotFound.into(),
            ));
        }
        bind_vfio_pci(info, root)?;
        wait_for(
            Path::new(&format!("/dev/vfio/{group}")),
            Duration::from_secs(2),
        );

        let device = VfioPciDevice::open(&info.path).map_err(|e| {
            // pci-driver reports a container without type1v2 IOMMU support (e.g. only
            // no-IOMMU mode) as InvalidInput; everything else keeps its own message.
            if e.kind() == io::ErrorKind::InvalidInput {
                Error::NoIommu {
                    bdf: bdf.to_owned(),
                    detail: format!("VFIO group {group} has no type1v2 IOMMU container: {e}"),
                }
            } else {
                Error::vfio(bdf, format!("opening VFIO group {group}"), e)
            }
        })?;

        let cfg = device.config();
        let cmd = cfg
            .read_le_u16(PCI_COMMAND)
            .map_err(|e| Error::vfio(bdf, "reading the command register", e))?;
        cfg.write_le_u16(PCI_COMMAND, cmd | CMD_MEMORY | CMD_BUS_MASTER)
            .map_err(|e| Error::vfio(bdf, "enabling bus mastering", e))?;

        let interrupts = device.interrupts();
        let msix = interrupts.msi_x();
        let n = msix.max().min(MAX_VECTORS);
        if n == 0 {
            return Err(Error::vfio(
                bdf,
                "the device offers no MSI-X vectors",
                io::ErrorKind::Unsupported.into(),
            ));
        }
        let vectors = (0..n)
            .map(|_| eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::vfio(bdf, "creating eventfds", e.into()))?;
        let raw: Vec<_> = vectors.iter().map(|fd| fd.as_raw_fd()).collect();
        msix.enable(&raw)
            .map_err(|e| Error::vfio(bdf, "enabling MSI-X", e))?;

        Ok(VfioDevice {
            bdf: bdf.to_owned(),
            device,
            vectors,
        })
    }

    /// The eventfds that MSI-X vectors 0.. signal.
    pub fn vectors(&self) -> &[OwnedFd] {
        &self.vectors
    }

    /// Maps BAR2 (the shared memory) through VFIO, as a region owned by the mapping.
    pub fn map_shared(&self) -> Result<SharedRegion> {
        let bar = self
            .device
            .bar(2)
            .ok_or_else(|| Error::vfio(&self.bdf, "no BAR2", io::ErrorKind::NotFound.into()))?;
        let map = bar
            .map(.., Permissions::ReadWrite)
            .map_err(|e| Error::vfio(&self.bdf, "mapping BAR2", e))?;
        let (base, len) = (map.as_mut_ptr(), map.len());
        // SAFETY: pci-driver mapped `len` bytes of BAR2 read-write at `base` (page aligned)
        // and unmaps them only when `map`, handed over as the owner, drops; this process
        // keeps no other references into the memory.
        Ok(unsafe { SharedRegion::new(base, len, Arc::new(map)) })
    }

    /// BAR0 (the registers): mapped if VFIO allows it, else through region reads and writes.
    pub fn registers(&self) -> Result<Registers> {
        let bar = self
            .device
            .bar(0)
            .ok_or_else(|| Error::vfio(&self.bdf, "no BAR0", io::ErrorKind::NotFound.into()))?;
        if bar.is_mappable() {
            if let Ok(map) = bar.map(.., Permissions::ReadWrite) {
                return Ok(Registers::from_vfio_map(map));
            }
        }
        Ok(Registers::from_vfio_region(bar))
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        let _ = self.device.interrupts().msi_x().disable();
    }
}

fn write_sysfs(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Binds the device to vfio-pci unless it already is: writes `vfio-pci` to
/// `driver_override`, unbinds the current driver, and asks `drivers_probe` to rebind.
pub fn bind_vfio_pci(info: &DeviceInfo, root: &Path) -> Result<()> {
    let bdf = info.bdf.as_str();
    let current = || {
        fs::read_link(info.path.join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    if current().as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    let step = |what: &str, path: &Path| {
        let what = what.to_owned();
        let path = path.to_owned();
        move |e: io::Error| match Error::io(&path, e) {
            Error::PermissionDenied { path, source } => Error::PermissionDenied { path, source },
            Error::Io { source, .. } => Error::vfio(bdf, what, source),
            other => other,
        }
    };
    let ovr = info.path.join("driver_override");
    write_sysfs(&ovr, "vfio-pci").map_err(step("writing driver_override", &ovr))?;
    if current().is_some() {
        let unbind = info.path.join("driver/unbind");
        write_sysfs(&unbind, bdf).map_err(step("unbinding the current driver", &unbind))?;
    }
    let probe = root
        .parent()
        .unwrap_or(Path::new("/sys/bus/pci"))
        .join("drivers_probe");
    // drivers_probe fails (EINVAL) when vfio-pci refuses the device, as it does without an
    // IOMMU; the driver check below gives the useful message.
    let probed = write_sysfs(&probe, bdf);
    if current().as_deref() != Some("vfio-pci") {
        return Err(Error::NoIommu {
            bdf: bdf.to_owned(),
            detail: format!(
                "vfio-pci did not bind ({}); is vfio-pci loaded? see dmesg",
                probed.err().map_or("no error".into(), |e| e.to_string())
            ),
        });
    }
    Ok(())
}
