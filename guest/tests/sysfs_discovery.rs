//! Discovery, error messages and the sysfs mapping path, on a fake sysfs tree in a temp dir.
//!
//! The fake tree mimics `/sys/bus/pci`: `devices/<bdf>/{vendor,device,resource,resourceN}`,
//! `driver` and `iommu_group` symlinks, and `drivers_probe` beside `devices/`. The
//! `resourceN` files are regular files, so mapping them exercises the same mmap code that
//! maps a real BAR, without a VM.

use ivring::Doorbell;
use ivring_guest::device::{self, DeviceKind};
use ivring_guest::{open, Error, Mode, OpenOptions};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const BAR0_START: u64 = 0xfebf_1000;
const BAR1_START: u64 = 0xfebf_2000;
const BAR2_START: u64 = 0x8_0000_0000;

struct FakeSysfs {
    dir: tempfile::TempDir,
}

/// One fake PCI function.
struct Dev<'a> {
    bdf: &'a str,
    vendor: u16,
    device: u16,
    /// (start, size) of BAR0..BAR5; size 0 = unused.
    bars: [(u64, u64); 6],
    driver: Option<&'a str>,
    group: Option<u32>,
    /// Write the `resource` file (else only `resourceN` files give the sizes).
    resource_file: bool,
}

impl<'a> Dev<'a> {
    fn other(bdf: &'a str, vendor: u16, device: u16) -> Self {
        let mut bars = [(0, 0); 6];
        bars[0] = (0xfe00_0000, 0x1000);
        Dev {
            bdf,
            vendor,
            device,
            bars,
            driver: Some("virtio-pci"),
            group: None,
            resource_file: true,
        }
    }

    fn ivshmem(bdf: &'a str, doorbell: bool, bar2: u64) -> Self {
        let mut bars = [(0, 0); 6];
        bars[0] = (BAR0_START, 256);
        if doorbell {
            bars[1] = (BAR1_START, 4096);
        }
        bars[2] = (BAR2_START, bar2);
        Dev {
            bdf,
            vendor: 0x1af4,
            device: 0x1110,
            bars,
            driver: None,
            group: None,
            resource_file: true,
        }
    }
}

impl FakeSysfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bus/pci/devices")).unwrap();
        fs::create_dir_all(dir.path().join("bus/pci/drivers")).unwrap();
        fs::write(dir.path().join("bus/pci/drivers_probe"), "").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        FakeSysfs { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("bus/pci/devices")
    }

    fn add(&self, d: Dev<'_>) -> PathBuf {
        let p = self.root().join(d.bdf);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("vendor"), format!("0x{:04x}\n", d.vendor)).unwrap();
        fs::write(p.join("device"), format!("0x{:04x}\n", d.device)).unwrap();
        fs::write(p.join("driver_override"), "(null)\n").unwrap();
        let mut resource = String::new();
        for (i, &(start, size)) in d.bars.iter().enumerate() {
            if size == 0 {
                resource += "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
                continue;
            }
            resource += &format!(
                "0x{start:016x} 0x{:016x} 0x0000000000040200\n",
                start + size - 1
            );
            let f = fs::File::create(p.join(format!("resource{i}"))).unwrap();
            f.set_len(size).unwrap();
        }
        resource += "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"; // ROM
        if d.resource_file {
            fs::write(p.join("resource"), resource).unwrap();
        }
        if let Some(drv) = d.driver {
            let dp = self.dir.path().join("bus/pci/drivers").join(drv);
            fs::create_dir_all(&dp).unwrap();
            fs::write(dp.join("unbind"), "").unwrap();
            symlink(&dp, p.join("driver")).unwrap();
        }
        if let Some(g) = d.group {
            let gp = self.dir.path().join(format!("kernel/iommu_groups/{g}"));
            fs::create_dir_all(&gp).unwrap();
            symlink(&gp, p.join("iommu_group")).unwrap();
        }
        p
    }

    fn opts(&self, device: Option<&str>) -> OpenOptions {
        OpenOptions {
            sysfs_root: self.root(),
            device: device.map(str::to_owned),
            vfio: true,
        }
    }
}

/// A tree with a virtio NIC, a host bridge, and one ivshmem-doorbell device.
fn mixed_tree() -> FakeSysfs {
    let t = FakeSysfs::new();
    t.add(Dev::other("0000:00:00.0", 0x8086, 0x29c0));
    t.add(Dev::other("0000:00:02.0", 0x1af4, 0x1000));
    let mut d = Dev::ivshmem("0000:00:04.0", true, 1 << 20);
    d.driver = Some("vfio-pci");
    d.group = Some(7);
    t.add(d);
    t
}

#[test]
fn discovery_finds_ivshmem_among_others() {
    let t = mixed_tree();
    let all = device::list(&t.root()).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    let d = &all[0];
    assert_eq!(d.bdf, "0000:00:04.0");
    assert_eq!(d.path, t.root().join("0000:00:04.0"));
    assert_eq!(d.bar_sizes, [256, 4096, 1 << 20, 0, 0, 0]);
    assert_eq!(d.bar_starts[0], BAR0_START);
    assert!(d.has_msix);
    assert_eq!(d.kind(), DeviceKind::Doorbell);
    assert_eq!(d.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(d.iommu_group, Some(7));
    assert_eq!(&device::select(&t.root(), None).unwrap(), d);
}

#[test]
fn plain_device_has_no_msix_driver_or_group() {
    let t = FakeSysfs::new();
    t.add(Dev::ivshmem("0000:00:05.0", false, 4 << 20));
    let d = device::select(&t.root(), None).unwrap();
    assert_eq!(d.kind(), DeviceKind::Plain);
    assert!(!d.has_msix);
    assert_eq!(d.bar_sizes[1], 0);
    assert_eq!(d.driver, None);
    assert_eq!(d.iommu_group, None);
}

#[test]
fn bar_sizes_fall_back_to_resource_files() {
    let t = FakeSysfs::new();
    let mut d = Dev::ivshmem("0000:00:04.0", true, 1 << 16);
    d.resource_file = false;
    t.add(d);
    let d = device::select(&t.root(), None).unwrap();
    assert_eq!(d.bar_sizes, [256, 4096, 1 << 16, 0, 0, 0]);
    assert!(d.has_msix);
}

#[test]
fn msix_capability_in_config_space_counts() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", false, 1 << 16));
    let mut cfg = vec![0u8; 256];
    cfg[6] = 0x10; // status: capability list
    cfg[0x34] = 0x40;
    cfg[0x40] = 0x05; // MSI, next 0x50
    cfg[0x41] = 0x50;
    cfg[0x50] = 0x11; // MSI-X
    fs::write(p.join("config"), cfg).unwrap();
    assert!(device::select(&t.root(), None).unwrap().has_msix);
}

#[test]
fn no_device_says_how_to_start_qemu() {
    let t = FakeSysfs::new();
    t.add(Dev::other("0000:00:02.0", 0x1af4, 0x1000));
    let e = device::select(&t.root(), None).unwrap_err();
    assert!(matches!(e, Error::NoDevice { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "no ivshmem device (1af4:1110) in {}: start QEMU with -device ivshmem-plain or \
             ivshmem-doorbell",
            t.root().display()
        )
    );
    // The same through open(), and with the real default root's wording.
    let e = open(&t.opts(None)).unwrap_err();
    assert!(matches!(e, Error::NoDevice { .. }));
    let default_root = Error::NoDevice {
        root: device::DEFAULT_SYSFS_ROOT.into(),
    };
    assert_eq!(
        default_root.to_string(),
        "no ivshmem device (1af4:1110) in /sys/bus/pci/devices: start QEMU with -device \
         ivshmem-plain or ivshmem-doorbell"
    );
    assert!(!e.is_fallback());
}

#[test]
fn device_option_selects_and_rejects() {
    let t = mixed_tree();
    // Short and upper-case forms name the same device.
    let d = device::select(&t.root(), Some("00:04.0")).unwrap();
    assert_eq!(d.bdf, "0000:00:04.0");

    let e = device::select(&t.root(), Some("0000:00:02.0")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotIvshmem {
                vendor: 0x1af4,
                device: 0x1000,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("0000:00:02.0 is 1af4:1000, not ivshmem (1af4:1110)"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    let e = open(&t.opts(Some("0000:00:00.0"))).unwrap_err();
    assert!(
        matches!(e, Error::NotIvshmem { vendor: 0x8086, .. }),
        "{e:?}"
    );

    let e = device::select(&t.root(), Some("0000:00:09.0")).unwrap_err();
    assert!(matches!(e, Error::DeviceNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("no PCI device 0000:00:09.0"));
}

#[test]
fn several_devices_need_device_option() {
    let t = mixed_tree();
    t.add(Dev::ivshmem("0000:00:05.0", false, 1 << 16));
    let e = device::select(&t.root(), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "several ivshmem devices (0000:00:04.0, 0000:00:05.0): choose one with --device BDF"
    );
    assert_eq!(
        device::select(&t.root(), Some("0000:00:05.0"))
            .unwrap()
            .kind(),
        DeviceKind::Plain
    );
}

#[test]
fn bar2_must_be_a_power_of_two_of_at_least_64k() {
    for bad in [32 << 10, 3 << 20, (64 << 10) + 4096] {
        let t = FakeSysfs::new();
        t.add(Dev::ivshmem("0000:00:04.0", false, bad));
        let e = device::select(&t.root(), None).unwrap_err();
        assert!(
            matches!(e, Error::BadBar2 { size, .. } if size == bad),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "0000:00:04.0: BAR2 (shared memory) is {bad} bytes; it must be a power of two \
                 of at least 64 KiB: check size= of the memory backend or the ivshmem \
                 server's memory size"
            )
        );
        assert!(open(&t.opts(None)).is_err());
    }
    let t = FakeSysfs::new();
    t.add(Dev::ivshmem("0000:00:04.0", false, 64 << 10));
    device::select(&t.root(), None).unwrap();
}

#[test]
fn mapping_without_rights_says_run_as_root() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", false, 1 << 16));
    fs::set_permissions(p.join("resource2"), fs::Permissions::from_mode(0o600)).unwrap();
    let info = device::select(&t.root(), None).unwrap();
    // Drop to `nobody` in a thread of our own: on Linux a raw setresuid changes only the
    // calling thread, and dropping from 0 clears that thread's capabilities.
    let err = std::thread::spawn(move || {
        if rustix::process::geteuid().is_root() {
            let nobody = rustix::process::Uid::from_raw(65534); // `nobody`
            rustix::thread::set_thread_res_uid(nobody, nobody, nobody).unwrap();
        }
        info.map_shared().unwrap_err()
    })
    .join()
    .unwrap();
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: permission denied: run as root (mapping PCI BARs through sysfs needs root \
             and CAP_SYS_ADMIN)",
            p.join("resource2").display()
        )
    );
}

#[test]
fn resource2_mapping_reads_and_writes_the_file() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", false, 1 << 16));
    let info = device::select(&t.root(), None).unwrap();
    let region = info.map_shared().unwrap();
    assert_eq!(region.len(), 1 << 16);

    // Region -> file.
    region.store_u64(0, 0x1122_3344_5566_7788, Ordering::Release);
    region.write((1 << 16) - 5, b"tail!");
    let file = fs::read(p.join("resource2")).unwrap();
    assert_eq!(&file[..8], &0x1122_3344_5566_7788u64.to_ne_bytes());
    assert_eq!(&file[(1 << 16) - 5..], b"tail!");

    // File -> region (another writer of the same shared mapping, like the host).
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(p.join("resource2"))
        .unwrap();
    f.write_all_at(b"from the host", 4096).unwrap();
    let mut buf = [0u8; 13];
    region.read(4096, &mut buf);
    assert_eq!(&buf, b"from the host");

    // A clone outlives the DeviceInfo and keeps the mapping.
    let clone = region.clone();
    drop(region);
    drop(info);
    assert_eq!(clone.load_u64(0, Ordering::Acquire), 0x1122_3344_5566_7788);
}

/// open() on the fake tree: polling mode, IVPosition from resource0, doorbell writes.
fn check_polling_open(t: &FakeSysfs, p: &Path, opts: &OpenOptions, why: &str) {
    use std::os::unix::fs::FileExt;
    let r0 = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.join("resource0"))
        .unwrap();
    r0.write_all_at(&5u32.to_le_bytes(), 8).unwrap();

    let dev = open(opts).unwrap();
    assert_eq!(dev.mode(), Mode::Polling);
    assert_eq!(dev.why(), why);
    assert_eq!(dev.bdf(), "0000:00:04.0");
    assert_eq!(dev.bar_sizes()[2], 1 << 20);
    assert_eq!(dev.region().len(), 1 << 20);
    assert_eq!(dev.iv_position(), 5);

    let bell = dev.doorbell();
    assert_eq!(bell.own_id(), 5);
    assert!(!bell.can_wait());
    assert_eq!(bell.peer_present(0), None);
    bell.ring(3);
    let mut reg = [0u8; 4];
    r0.read_exact_at(&mut reg, 12).unwrap();
    assert_eq!(u32::from_le_bytes(reg), 3 << 16);
    bell.registers().ring_doorbell(0x1234, 1);
    r0.read_exact_at(&mut reg, 12).unwrap();
    assert_eq!(u32::from_le_bytes(reg), 0x1234_0001);

    // Polling waits are short naps, capped by the timeout, however long it is.
    let start = Instant::now();
    for _ in 0..20 {
        bell.wait(Some(Duration::from_secs(5)));
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    bell.wait(Some(Duration::MAX));
    let start = Instant::now();
    bell.wait(Some(Duration::from_micros(10)));
    assert!(start.elapsed() < Duration::from_millis(500));

    // interrupt() from another thread ends a wait; an earlier one makes the next return.
    bell.interrupt();
    bell.wait(None);
    let b2 = bell.clone();
    let h = std::thread::spawn(move || b2.wait(Some(Duration::from_secs(5))));
    bell.interrupt();
    h.join().unwrap();
    let _ = t;
}

#[test]
fn open_plain_device_polls() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", false, 1 << 20));
    check_polling_open(
        &t,
        &p,
        &t.opts(None),
        "polling: device is ivshmem-plain (no MSI-X)",
    );
}

#[test]
fn polling_open_turns_memory_decoding_on() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", false, 1 << 16));
    let mut cfg = vec![0u8; 64];
    cfg[4] = 0x04; // bus master on, memory decoding off
    fs::write(p.join("config"), &cfg).unwrap();
    let dev = open(&t.opts(None)).unwrap();
    assert_eq!(dev.mode(), Mode::Polling);
    assert_eq!(fs::read(p.join("config")).unwrap()[4], 0x06);
}

#[test]
fn open_doorbell_device_without_iommu_polls() {
    let t = FakeSysfs::new();
    let p = t.add(Dev::ivshmem("0000:00:04.0", true, 1 << 20));
    check_polling_open(
        &t,
        &p,
        &t.opts(Some("0000:00:04.0")),
        "polling: no IOMMU group; boot the guest with intel_iommu=on and -device intel-iommu",
    );
}

#[test]
fn open_with_vfio_turned_off_polls() {
    let t = FakeSysfs::new();
    let mut d = Dev::ivshmem("0000:00:04.0", true, 1 << 20);
    d.group = Some(3);
    let p = t.add(d);
    let mut opts = t.opts(None);
    opts.vfio = false;
    check_polling_open(&t, &p, &opts, "polling: VFIO turned off by the caller");
}

#[test]
fn binding_writes_override_unbind_and_probe() {
    let t = FakeSysfs::new();
    let mut d = Dev::ivshmem("0000:00:04.0", true, 1 << 20);
    d.driver = Some("uio_pci_generic");
    d.group = Some(3);
    let p = t.add(d);
    let info = device::select(&t.root(), None).unwrap();
    // Nothing rebinds in a fake tree, so the bind "fails" as vfio-pci does without an IOMMU.
    let e = ivring_guest::vfio::bind_vfio_pci(&info, &t.root()).unwrap_err();
    assert!(matches!(e, Error::NoIommu { .. }), "{e:?}");
    assert!(e.is_fallback());
    assert!(e.to_string().contains("intel_iommu=on"), "{e}");
    let read = |q: &Path| fs::read_to_string(q).unwrap();
    assert_eq!(read(&p.join("driver_override")), "vfio-pci");
    assert_eq!(
        read(&t.dir.path().join("bus/pci/drivers/uio_pci_generic/unbind")),
        "0000:00:04.0"
    );
    assert_eq!(
        read(&t.dir.path().join("bus/pci/drivers_probe")),
        "0000:00:04.0"
    );
}

#[test]
fn already_bound_to_vfio_pci_writes_nothing() {
    let t = mixed_tree();
    let info = device::select(&t.root(), None).unwrap();
    ivring_guest::vfio::bind_vfio_pci(&info, &t.root()).unwrap();
    assert_eq!(
        fs::read_to_string(info.path.join("driver_override")).unwrap(),
        "(null)\n"
    );
}

/// `ivring-guest status` on a device whose BAR2 a host program has laid out: read through
/// the sysfs `resource2` file, without opening the device (no driver bound, no doorbell).
#[test]
fn status_reads_the_device_from_outside() {
    use ivring::{Config, Role};
    use ivring_ivshmem::attach::{Attach, HostLink};
    use std::process::Command;
    let fs = FakeSysfs::new();
    let dev = fs.add(Dev::ivshmem("0000:00:04.0", true, 1 << 20));
    let bar2 = dev.join("resource2");
    let status = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ivring-guest"))
            .arg("status")
            .arg("--sysfs-root")
            .arg(fs.root())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = status(&[]);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("link    device 0000:00:04.0"), "{out}");
    assert!(out.contains("state   empty"), "{out}");

    let host = HostLink::open(
        Role::Host,
        &Attach::Plain {
            file: bar2.clone(),
            size: None,
        },
        Config::default(),
    )
    .unwrap();
    let (code, out, err) = status(&["--json", "--device", "0000:00:04.0"]);
    assert_eq!(code, Some(3), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"], "waiting", "{v}");
    assert_eq!(v["host"]["alive"], true, "{v}");
    assert_eq!(v["size"], 1 << 20, "{v}");
    drop(host);
    // Nothing was bound or changed in the tree.
    assert!(!dev.join("driver").exists());
    let (code, _, err) = status(&["--device", "0000:00:09.0"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
