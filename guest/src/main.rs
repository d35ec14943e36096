//! `ivring-guest`: the guest side of ivring, run inside the VM.

use anyhow::{Context, Result};
use ivring::layout::{side, HOST_BLOCK, PEER_ID_VALID};
use ivring::{Config, Endpoint, Geometry, Role, SharedRegion};
use ivring_guest::{device, GuestDevice, OpenOptions};
use ivring_ivshmem::attach::{Attach, HostLink};
use ivring_ivshmem::shm::human_size;
use ivring_tools::logging::{self, LinkWatch};
use ivring_tools::{checks, services, status};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{info, warn};

mod cli;
use cli::{AttachArgs, Cli, Cmd};

/// The guest role attached to a device, or (for tests on the host) through ivring-host.
enum GuestLink {
    /// `ep` is declared first so it detaches before the device is unmapped.
    Device {
        ep: Endpoint,
        dev: GuestDevice,
    },
    Host(HostLink),
}

impl GuestLink {
    fn open(a: &AttachArgs, cfg: Config) -> Result<GuestLink> {
        GuestLink::open_with(a, cfg, |_| Ok(()))
    }

    /// Opens, runs `prepare` (start listeners) before attaching, then attaches.
    fn open_with(
        a: &AttachArgs,
        cfg: Config,
        prepare: impl FnOnce(&Endpoint) -> std::io::Result<()>,
    ) -> Result<GuestLink> {
        let attach = match (&a.join, &a.plain) {
            (Some(sock), _) => Attach::join(sock.clone(), a.allow_unsealed),
            (None, Some(file)) => Attach::Plain {
                file: file.clone(),
                size: None,
            },
            (None, None) => {
                let dev = open_device(a.device.clone(), a.no_vfio)?;
                if let Some(notice) = Geometry::header_wait_notice(&dev.region(), cfg.layout_wait) {
                    warn!("{notice}");
                }
                let ep = Endpoint::unattached(Role::Guest, dev.region(), dev.doorbell(), cfg)?;
                prepare(&ep)?;
                ep.attach();
                return Ok(GuestLink::Device { ep, dev });
            }
        };
        Ok(GuestLink::Host(HostLink::open_with(
            Role::Guest,
            &attach,
            cfg,
            prepare,
        )?))
    }

    fn endpoint(&self) -> &Endpoint {
        match self {
            GuestLink::Device { ep, .. } => ep,
            GuestLink::Host(h) => h,
        }
    }

    fn region(&self) -> SharedRegion {
        match self {
            GuestLink::Device { dev, .. } => dev.region(),
            GuestLink::Host(h) => h.region(),
        }
    }

    /// The link as log lines name it: the device, server socket or file.
    fn label(&self, a: &AttachArgs) -> String {
        match self {
            GuestLink::Device { dev, .. } => format!("device {}", dev.bdf()),
            GuestLink::Host(_) => match (&a.join, &a.plain) {
                (Some(sock), _) => format!("server {}", sock.display()),
                (None, Some(file)) => format!("plain {}", file.display()),
                (None, None) => "link".into(),
            },
        }
    }

    /// "interrupts: ..." or "polling: ...".
    fn why(&self) -> String {
        match self {
            GuestLink::Device { dev, .. } => format!("{}: {}", dev.bdf(), dev.why()),
            GuestLink::Host(h) => h.why(),
        }
    }
}

fn open_device(device: Option<String>, no_vfio: bool) -> Result<GuestDevice> {
    let opts = OpenOptions {
        device: device.filter(|d| d != "auto"),
        vfio: !no_vfio,
        ..OpenOptions::default()
    };
    Ok(ivring_guest::open(&opts)?)
}

fn main() {
    let cli: Cli = ivring_tools::cli::parse_args_from("ivring-guest", cli::command());
    logging::init("ivring-guest", cli.verbosity);
    let r = match cli.cmd {
        Cmd::Probe { device, no_vfio } => probe(device, no_vfio),
        Cmd::Status {
            device,
            json,
            sysfs_root,
        } => status(device, json, &sysfs_root),
        Cmd::Serve(a) => serve(&a),
        Cmd::Check { attach, args } => check(&attach, &args),
        Cmd::Bridge {
            connect,
            attach,
            port,
        } => bridge(connect, &attach, port),
    };
    if let Err(e) = r {
        eprintln!("ivring-guest: error: {}", ivring_tools::cli::one_line(&e));
        std::process::exit(1);
    }
}

fn probe(device: Option<String>, no_vfio: bool) -> Result<()> {
    let root = PathBuf::from(device::DEFAULT_SYSFS_ROOT);
    let found = device::list(&root)?;
    println!("ivshmem devices: {}", found.len());
    for d in &found {
        let bars: Vec<String> = d
            .bar_sizes
            .iter()
            .enumerate()
            .filter(|(_, &s)| s != 0)
            .map(|(i, &s)| format!("BAR{i} {}", human_size(s)))
            .collect();
        println!(
            "  {} {:?}: {}; driver {}; IOMMU group {}",
            d.bdf,
            d.kind(),
            bars.join(", "),
            d.driver.as_deref().unwrap_or("none"),
            d.iommu_group.map_or("none".into(), |g| g.to_string())
        );
    }
    let dev = open_device(device, no_vfio)?;
    println!("opened {}: {}", dev.bdf(), dev.why());
    if let Ok(now) = device::probe(&root, dev.bdf()) {
        println!("  driver now {}", now.driver.as_deref().unwrap_or("none"));
    }
    println!("own peer id (IVPosition): {}", dev.iv_position());
    let region = dev.region();
    match Geometry::read_header(&region) {
        Ok(Some(g)) => println!(
            "shared header: laid out by the host ({} rings of {} each)",
            human_size(region.len() as u64),
            human_size(g.capacity)
        ),
        Ok(None) => println!("shared header: not laid out yet (no host program has attached)"),
        Err(e) => println!("shared header: unusable: {e}"),
    }
    let epoch = region.load_u64(HOST_BLOCK + side::EPOCH, Ordering::Acquire);
    let id = region.load_u64(HOST_BLOCK + side::PEER_ID, Ordering::Acquire);
    let id = if id & PEER_ID_VALID != 0 {
        (id as u16).to_string()
    } else {
        "none".into()
    };
    println!("host side: peer id {id}, epoch {epoch}");
    Ok(())
}

fn status(device: Option<String>, json: bool, root: &std::path::Path) -> Result<()> {
    let device = device.filter(|d| d != "auto");
    let info = device::select(root, device.as_deref())?;
    info.check_bar2()?;
    let region = ivring_ivshmem::shm::map_file_private(&info.path.join("resource2"))?;
    let st = status::read(&region, format!("device {}", info.bdf), status::WATCH);
    if json {
        println!("{}", st.to_json());
    } else {
        print!("{}", st.text());
    }
    if st.state != status::State::Up {
        std::process::exit(3);
    }
    Ok(())
}

fn serve(a: &AttachArgs) -> Result<()> {
    let link = GuestLink::open_with(a, Config::default(), services::spawn_all)
        .context("start the services")?;
    info!("serving ports 1-4 and 6; {}", link.why());
    let never = AtomicBool::new(false);
    LinkWatch::new(link.label(a)).run(link.endpoint(), logging::WATCH_PERIOD, &never);
    Ok(())
}

fn check(a: &AttachArgs, args: &checks::CheckArgs) -> Result<()> {
    let link = GuestLink::open(a, args.config())?;
    println!("INFO {}", link.why());
    checks::run(link.endpoint(), Some(&link.region()), Role::Guest, args)
}

fn bridge(connect: PathBuf, a: &AttachArgs, port: u32) -> Result<()> {
    let link = GuestLink::open(a, Config::default())?;
    info!("bridge on port {port}; {}", link.why());
    let mut opts = ivring_tools::bridge::guest::GuestBridgeOptions::new(connect);
    opts.port = port;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            LinkWatch::new(link.label(a)).run(link.endpoint(), logging::WATCH_PERIOD, &stop)
        });
        let r = ivring_tools::bridge::guest::run(link.endpoint(), &opts);
        stop.store(true, Ordering::Relaxed);
        r
    })
}
