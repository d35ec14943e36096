//! Finding the ivshmem PCI device through sysfs and mapping its BARs.
//!
//! Discovery reads only sysfs files (`vendor`, `device`, `resource`, `config`, the `driver`
//! and `iommu_group` links) under a configurable root, so tests point it at a fake tree.
//! Mapping goes through the `resourceN` files: BAR2 becomes a [`SharedRegion`] owned by its
//! mapping, BAR0 becomes [`Registers`], accessed only with aligned 32-bit volatile loads and
//! stores as the ivshmem spec demands.

use crate::error::{Error, Result};
use ivring::SharedRegion;
use memmap2::{MmapOptions, MmapRaw};
use pci_driver::regions::{MappedOwningPciRegion, OwningPciRegion, PciRegion};
use std::any::Any;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// PCI vendor id of ivshmem (Red Hat, Inc.).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// PCI device id of ivshmem.
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// Where Linux lists PCI devices.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys/bus/pci/devices";
/// The smallest shared memory this crate accepts (BAR2).
pub const MIN_BAR2: u64 = 64 * 1024;

/// BAR0 register offset: this peer's id (read-only; 0 without interrupts).
pub const REG_IV_POSITION: usize = 8;
/// BAR0 register offset: the doorbell, written `(peer << 16) | vector`.
pub const REG_DOORBELL: usize = 12;
/// PCI command register, low byte: memory space enable.
const CMD_MEMORY: u8 = 1 << 1;
/// The size of the register block the spec defines (the BAR itself is 256 bytes).
const REG_SPAN: usize = 16;

/// Which of QEMU's two ivshmem devices this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// `ivshmem-plain`: memory only, no BAR1, no interrupts, IVPosition reads 0.
    Plain,
    /// `ivshmem-doorbell`: memory, doorbell register and MSI-X vectors (BAR1).
    Doorbell,
}

/// What sysfs says about one ivshmem device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// PCI address, e.g. `0000:00:04.0`.
    pub bdf: String,
    /// Its sysfs directory.
    pub path: PathBuf,
    /// Sizes of BAR0..BAR5 in bytes (0: unused).
    pub bar_sizes: [u64; 6],
    /// Start addresses of BAR0..BAR5 (0 when unknown).
    pub bar_starts: [u64; 6],
    /// Whether the device has MSI-X (BAR1 present or an MSI-X capability).
    pub has_msix: bool,
    /// The bound kernel driver (`vfio-pci`, `uio_pci_generic`, ...), if any.
    pub driver: Option<String>,
    /// The IOMMU group number, if the guest has an IOMMU.
    pub iommu_group: Option<u32>,
}

impl DeviceInfo {
    /// Plain or doorbell, by the presence of MSI-X.
    pub fn kind(&self) -> DeviceKind {
        if self.has_msix {
            DeviceKind::Doorbell
        } else {
            DeviceKind::Plain
        }
    }

    /// Size of the shared memory (BAR2).
    pub fn bar2_size(&self) -> u64 {
        self.bar_sizes[2]
    }

    /// Checks that BAR2 is a power of two of at least 64 KiB.
    pub fn check_bar2(&self) -> Result<()> {
        let size = self.bar2_size();
        if size < MIN_BAR2 || !size.is_power_of_two() {
            return Err(Error::BadBar2 {
                bdf: self.bdf.clone(),
                size,
            });
        }
        Ok(())
    }

    /// Maps BAR2 through `resource2` as a shared region owned by the mapping.
    pub fn map_shared(&self) -> Result<SharedRegion> {
        self.check_bar2()?;
        let len = usize::try_from(self.bar2_size()).map_err(|_| Error::BadBar2 {
            bdf: self.bdf.clone(),
            size: self.bar2_size(),
        })?;
        let map = map_file(&self.path.join("resource2"), len)?;
        let base = map.as_mut_ptr();
        // SAFETY: `map` is a shared mapping of `len` bytes, readable and writable, page
        // aligned (so 8-aligned); the Arc we hand over keeps it mapped as long as any clone
        // of the region lives, and this process holds no other references into it.
        Ok(unsafe { SharedRegion::new(base, len, Arc::new(map)) })
    }

    /// Sets the memory-space bit of the PCI command register through the sysfs `config`
    /// file if it is clear. Best effort: a missing or read-only `config` is left alone.
    pub fn enable_memory_decoding(&self) {
        use std::os::unix::fs::FileExt;
        let Ok(cfg) = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join("config"))
        else {
            return;
        };
        let mut cmd = [0u8; 2];
        if cfg.read_exact_at(&mut cmd, 4).is_ok() && cmd[0] & CMD_MEMORY == 0 {
            cmd[0] |= CMD_MEMORY;
            let _ = cfg.write_all_at(&cmd, 4);
        }
    }

    /// Maps BAR0 (the registers) through `resource0`.
    pub fn map_registers(&self) -> Result<Registers> {
        // The kernel maps whole pages starting at the page that holds the BAR; a BAR that is
        // not page aligned starts `sub` bytes into the first page.
        let sub = (self.bar_starts[0] % page_size() as u64) as usize;
        let len = (self.bar_sizes[0] as usize).max(REG_SPAN);
        let map = map_file(&self.path.join("resource0"), sub + len)?;
        let base = map.as_mut_ptr().wrapping_add(sub);
        // SAFETY: `base..base + len` lies inside the mapping (it is `sub + len` long), which
        // the owner keeps alive; nothing else in this process references it.
        Ok(unsafe { Registers::from_raw(base, len, Arc::new(map)) })
    }
}

fn page_size() -> usize {
    rustix::param::page_size()
}

fn map_file(path: &Path, len: usize) -> Result<MmapRaw> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    MmapOptions::new()
        .len(len)
        .map_raw(&file)
        .map_err(|e| Error::io(path, e))
}

/// Normalizes a PCI address: `00:04.0` becomes `0000:00:04.0`; case is lowered.
pub fn normalize_bdf(bdf: &str) -> String {
    let bdf = bdf.trim().to_ascii_lowercase();
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf
    }
}

fn read_hex(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let t = text.trim();
    let digits = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(digits, 16).map_err(|_| Error::Malformed {
        path: path.to_owned(),
        what: format!("{t:?} is not a hex number"),
    })
}

fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Reads the vendor and device id of the device at `dir`.
fn ids(dir: &Path) -> Result<(u16, u16)> {
    let vendor = read_hex(&dir.join("vendor"))?;
    let device = read_hex(&dir.join("device"))?;
    Ok((vendor as u16, device as u16))
}

/// BAR starts and sizes from the `resource` file (`start end flags` per line), falling back
/// to the sizes of the `resourceN` files.
fn bars(dir: &Path) -> Result<([u64; 6], [u64; 6])> {
    let mut starts = [0u64; 6];
    let mut sizes = [0u64; 6];
    let path = dir.join("resource");
    match fs::read_to_string(&path) {
        Ok(text) => {
            for (i, line) in text.lines().take(6).enumerate() {
                let f: Vec<u64> = line
                    .split_whitespace()
                    .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| Error::Malformed {
                        path: path.clone(),
                        what: format!("line {} is not three hex numbers", i + 1),
                    })?;
                let [start, end, _flags] = f[..] else {
                    return Err(Error::Malformed {
                        path: path.clone(),
                        what: format!("line {} is not three hex numbers", i + 1),
                    });
                };
                if end != 0 && end >= start {
                    starts[i] = start;
                    sizes[i] = end - start + 1;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for (i, size) in sizes.iter_mut().enumerate() {
                if let Ok(m) = fs::metadata(dir.join(format!("resource{i}"))) {
                    *size = m.len();
                }
            }
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    Ok((starts, sizes))
}

/// Whether config space lists an MSI-X capability (id 0x11). Unreadable or short config
/// space (a fake tree, a non-root reader past 64 bytes) counts as no.
fn config_has_msix(dir: &Path) -> bool {
    let Ok(cfg) = fs::read(dir.join("config")) else {
        return false;
    };
    let status = cfg.get(6).copied().unwrap_or(0);
    if status & 0x10 == 0 {
        return false;
    }
    let mut ptr = cfg.get(0x34).copied().unwrap_or(0) as usize & !3;
    for _ in 0..48 {
        if ptr < 0x40 || ptr + 1 >= cfg.len() {
            return false;
        }
        if cfg[ptr] == 0x11 {
            return true;
        }
        ptr = cfg[ptr + 1] as usize & !3;
    }
    false
}

/// Reads what sysfs says about the PCI device `bdf` under `root`, which must be ivshmem.
pub fn probe(root: &Path, bdf: &str) -> Result<DeviceInfo> {
    let bdf = normalize_bdf(bdf);
    let dir = root.join(&bdf);
    if !dir.exists() {
        return Err(Error::DeviceNotFound {
            bdf,
            root: root.to_owned(),
        });
    }
    let (vendor, device) = ids(&dir)?;
    if (vendor, device) != (IVSHMEM_VENDOR, IVSHMEM_DEVICE) {
        return Err(Error::NotIvshmem {
            bdf,
            vendor,
            device,
        });
    }
    let (bar_starts, bar_sizes) = bars(&dir)?;
    let has_msix = bar_sizes[1] != 0 || config_has_msix(&dir);
    let iommu_group = link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
    Ok(DeviceInfo {
        driver: link_name(&dir.join("driver")),
        iommu_group,
        bar_sizes,
        bar_starts,
        has_msix,
        path: dir,
        bdf,
    })
}

/// Lists the ivshmem devices under `root`, sorted by address. Other devices, and entries
/// whose ids cannot be read, are skipped.
pub fn list(root: &Path) -> Result<Vec<DeviceInfo>> {
    let entries = fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut found = Vec::new();
    for name in names {
        if ids(&root.join(&name)).ok() == Some((IVSHMEM_VENDOR, IVSHMEM_DEVICE)) {
            found.push(probe(root, &name)?);
        }
    }
    Ok(found)
}

/// Picks the device to use: `bdf` if given (it must be ivshmem), else the only ivshmem
/// device under `root`. Checks that BAR2 is usable.
pub fn select(root: &Path, bdf: Option<&str>) -> Result<DeviceInfo> {
    let info = match bdf {
        Some(bdf) => probe(root, bdf)?,
        None => {
            let mut all = list(root)?;
            match all.len() {
                0 => {
                    return Err(Error::NoDevice {
                        root: root.to_owned(),
                    })
                }
                1 => all.remove(0),
                _ => {
                    return Err(Error::Ambiguous {
                        bdfs: all.into_iter().map(|d| d.bdf).collect(),
                    })
                }
            }
        }
    };
    info.check_bar2()?;
    Ok(info)
}

enum RegAccess {
    /// A mapping: `base` is valid for `len` bytes while the owner lives.
    Mapped {
        base: *mut u8,
        len: usize,
        _owner: Arc<dyn Any + Send + Sync>,
    },
    /// A VFIO region that cannot be mapped (a sub-page BAR): read and write through the
    /// device fd.
    Region(OwningPciRegion),
}

/// The ivshmem registers (BAR0): aligned 32-bit volatile accesses only.
pub struct Registers {
    access: RegAccess,
}

// SAFETY: the registers are device memory meant for concurrent access; every access is a
// single volatile 32-bit load or store, and the owner of the mapping is Send + Sync.
unsafe impl Send for Registers {}
// SAFETY: as above; `&Registers` offers only single volatile register accesses.
unsafe impl Sync for Registers {}

impl fmt::Debug for Registers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.access {
            RegAccess::Mapped { base, len, .. } => f
                .debug_struct("Registers")
                .field("base", base)
                .field("len", len)
                .finish(),
            RegAccess::Region(r) => f.debug_struct("Registers").field("region", r).finish(),
        }
    }
}

impl Registers {
    /// Wraps mapped register memory.
    ///
    /// # Safety
    /// `base` must be 4-aligned and valid for volatile reads and writes of `len` bytes as long
    /// as `owner` lives, and `len` must be at least 16.
    pub(crate) unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        assert!(base as usize & 3 == 0 && len >= REG_SPAN);
        Registers {
            access: RegAccess::Mapped {
                base,
                len,
                _owner: owner,
            },
        }
    }

    /// Registers in a mapped VFIO BAR0.
    pub(crate) fn from_vfio_map(map: MappedOwningPciRegion) -> Self {
        let base = map.as_mut_ptr();
        let len = map.len();
        // SAFETY: pci-driver mapped `len` bytes of BAR0 at `base` (page aligned) and unmaps
        // them only when `map`, which we hand over as the owner, is dropped.
        unsafe { Registers::from_raw(base, len, Arc::new(map)) }
    }

    /// Registers reached through VFIO region reads and writes.
    pub(crate) fn from_vfio_region(region: OwningPciRegion) -> Self {
        Registers {
            access: RegAccess::Region(region),
        }
    }

    /// Reads the 32-bit register at `off` (4-aligned, inside the block).
    pub fn read_u32(&self, off: usize) -> u32 {
        assert!(off & 3 == 0 && off + 4 <= REG_SPAN, "bad register {off}");
        match &self.access {
            RegAccess::Mapped { base, len, .. } => {
                debug_assert!(off + 4 <= *len);
                // SAFETY: `off` is 4-aligned and inside the mapped block (checked; len >= 16),
                // and `base` is 4-aligned, so this is one aligned 32-bit device access.
                let v = unsafe { std::ptr::read_volatile(base.add(off) as *const u32) };
                u32::from_le(v)
            }
            RegAccess::Region(r) => r.read_le_u32(off as u64).unwrap_or(0),
        }
    }

    /// Writes the 32-bit register at `off` (4-aligned, inside the block).
    pub fn write_u32(&self, off: usize, val: u32) {
        assert!(off & 3 == 0 && off + 4 <= REG_SPAN, "bad register {off}");
        match &self.access {
            RegAccess::Mapped { base, len, .. } => {
                debug_assert!(off + 4 <= *len);
                // SAFETY: as in `read_u32`: one aligned 32-bit store inside the mapped block.
                unsafe { std::ptr::write_volatile(base.add(off) as *mut u32, val.to_le()) }
            }
            RegAccess::Region(r) => {
                // A failed doorbell is like a doorbell to a missing peer: dropped. The peer
                // finds the work by polling shared memory.
                let _ = r.write_le_u32(off as u64, val);
            }
        }
    }

    /// This peer's id (IVPosition, offset 8); 0 on ivshmem-plain.
    pub fn iv_position(&self) -> u16 {
        self.read_u32(REG_IV_POSITION) as u16
    }

    /// Rings `vector` of peer `peer`: writes `(peer << 16) | vector` to the Doorbell register.
    pub fn ring_doorbell(&self, peer: u16, vector: u16) {
        self.write_u32(REG_DOORBELL, ((peer as u32) << 16) | vector as u32)
    }
}
