//! The command lines of `ivring-host daemon` and `ivring-host vm`, and what runs them
//! (the binary's `cli.rs` and `main.rs` only name them).

use super::{DaemonOptions, VmSpec};
use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// `ivring-host daemon`.
#[derive(Args, Clone, Debug)]
pub struct DaemonArgs {
    /// The runtime directory: control.sock, vms.json and every VM's sockets.
    #[arg(long, value_name = "DIR", default_value = super::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Give this group (name or number) read/write access to every socket (mode 0660
    /// instead of 0600), e.g. the group QEMU runs as (libvirt's `kvm` or `libvirt-qemu`).
    #[arg(long)]
    pub group: Option<String>,
    /// Heartbeat period of every link's host side, in milliseconds (the ring's default).
    /// Each idle link is driven this often, on the one thread driving every link, and
    /// idle links wake together. Keep it at most a quarter of the guests' `peer_timeout`
    /// (1 s by default).
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=1000))]
    pub heartbeat_ms: u64,
    /// Keep every VM's memory, sockets, doorbells and QEMU's connection in systemd's file
    /// descriptor store (the unit sets FileDescriptorStoreMax=), so that a restart of the
    /// daemon cuts no VM off. Without it a restart gives every VM new memory.
    #[arg(long)]
    pub fd_store: bool,
}

/// `ivring-host vm ...`. (`dir`: [`DirArg`].)
#[allow(missing_docs)]
#[derive(Subcommand, Clone, Debug)]
pub enum VmCmd {
    /// Serve a VM: its ivshmem socket DIR/NAME.ivshmem.sock (start QEMU after this) and
    /// its agent socket DIR/NAME.qga.sock.
    Add(VmAddArgs),
    /// Stop serving a VM: its sockets are removed, its clients get EOF, its memory is
    /// freed (a QEMU still running keeps its own mapping, with no doorbells).
    Remove {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        dir: DirArg,
        /// Succeed when no such VM is served (for hooks).
        #[arg(long)]
        if_exists: bool,
    },
    /// List the VMs served: sockets, peers, link state, clients served.
    List {
        #[command(flatten)]
        dir: DirArg,
        /// The daemon's answer as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// After a daemon restart without its fd store (the VM was given new memory): say
    /// what its QEMU needs, and clear the VM's `needs_recover` flag.
    Recover {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

/// Where the daemon runs.
#[derive(Args, Clone, Debug)]
pub struct DirArg {
    /// The daemon's runtime directory (its --dir).
    #[arg(long, value_name = "DIR", default_value = super::DEFAULT_DIR)]
    pub dir: PathBuf,
}

/// `ivring-host vm add`. (`dir`: [`DirArg`].)
#[allow(missing_docs)]
#[derive(Args, Clone, Debug)]
pub struct VmAddArgs {
    /// The VM's name (libvirt's domain name): letters, digits, '.', '_', '-'.
    pub name: String,
    #[command(flatten)]
    pub dir: DirArg,
    /// Shared memory size: a power of two from 64K to 1G (QEMU's size must match).
    #[arg(long, default_value = "4M", value_parser = parse_region_size)]
    pub size: u64,
    /// Interrupt vectors per peer (QEMU's `vectors=`).
    #[arg(long, default_value_t = 1)]
    pub vectors: usize,
    /// Most peers on the VM's ivshmem socket at once.
    #[arg(long, default_value_t = 8)]
    pub max_peers: usize,
    /// Most sessions open at once on the VM's link.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Receive buffer per session (e.g. 64K).
    #[arg(long, default_value = "64K", value_parser = parse_u32_size)]
    pub buf_size: u32,
    /// Largest receive buffer a session grows to.
    #[arg(long, default_value = "1M", value_parser = parse_u32_size)]
    pub max_buf_size: u32,
    /// Serve only the ivshmem socket: no agent socket, and the host side of the link is
    /// left to a host program that joins (`ivring-host bridge --join`, your own).
    #[arg(long)]
    pub no_agent: bool,
    /// The guest bridge's port.
    #[arg(long, default_value_t = crate::bridge::PORT_QGA)]
    pub agent_port: u32,
    /// Also offer the guest's port PORT as DIR/NAME.portPORT.sock (repeatable).
    #[arg(long, value_name = "PORT", conflicts_with = "no_agent")]
    pub forward: Vec<u32>,
    /// Succeed, changing nothing, when a VM of that name is served already (for hooks).
    #[arg(long)]
    pub if_missing: bool,
}

fn parse_region_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if ivring_ivshmem::shm::is_region_size(n) {
        Ok(n)
    } else {
        Err(format!(
            "the shared memory must be a power of two from 64 KiB to 1 GiB (try {})",
            ivring_ivshmem::shm::short_size(ivring_ivshmem::shm::nearest_region_size(n))
        ))
    }
}

fn parse_u32_size(s: &str) -> Result<u32, String> {
    u32::try_from(parse_size(s)?).map_err(|_| format!("{s}: at most 4G-1"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let upper = s.to_ascii_uppercase();
    let t = upper.trim_end_matches("IB").trim_end_matches('B');
    let (num, mul) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size: write e.g. 4M, 64K or 1G"))
}

/// Runs `ivring-host daemon`.
pub fn run_daemon(a: DaemonArgs) -> Result<()> {
    let mut opts = DaemonOptions::new(a.dir);
    opts.group = a
        .group
        .as_deref()
        .map(ivring_ivshmem::server::resolve_group)
        .transpose()?;
    opts.heartbeat = Duration::from_millis(a.heartbeat_ms);
    opts.fd_store = a.fd_store;
    super::run(opts)
}

/// Runs `ivring-host vm ...`, printing what the daemon says.
pub fn run_vm(c: VmCmd) -> Result<()> {
    match c {
        VmCmd::Add(a) => {
            let spec = VmSpec {
                name: a.name.clone(),
                size: a.size,
                vectors: a.vectors,
                max_peers: a.max_peers,
                max_sessions: a.max_sessions,
                buf_size: a.buf_size,
                max_buf_size: a.max_buf_size,
                agent: !a.no_agent,
                agent_port: a.agent_port,
                forward: a.forward,
            };
            spec.validate()?;
            let r = super::request(&a.dir.dir, &json!({"op": "add", "vm": spec.to_json()}));
            let r = match r {
                Err(e) if a.if_missing && e.to_string().contains("already served") => {
                    println!("vm {}: already served", a.name);
                    return Ok(());
                }
                r => r?,
            };
            let vm = &r["vm"];
            println!(
                "vm {}: ivshmem socket {} (QEMU: -chardev socket,path={},id=ivs -device \
                 ivshmem-doorbell,chardev=ivs,vectors={}){}",
                a.name,
                vm["ivshmem_socket"].as_str().unwrap_or("?"),
                vm["ivshmem_socket"].as_str().unwrap_or("?"),
                a.vectors,
                vm["agent_socket"]
                    .as_str()
                    .map(|s| format!("; agent socket {s}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        VmCmd::Remove {
            name,
            dir,
            if_exists,
        } => {
            super::check_name(&name)?;
            match super::request(&dir.dir, &json!({"op": "remove", "name": name})) {
                Ok(_) => println!("vm {name}: removed"),
                Err(e) if if_exists && e.to_string().contains("no VM named") => {
                    println!("vm {name}: not served")
                }
                Err(e) => return Err(e),
            }
            Ok(())
        }
        VmCmd::List { dir, json } => {
            let r = super::request(&dir.dir, &json!({"op": "list"}))?;
            if json {
                println!("{r}");
                return Ok(());
            }
            let vms = r["vms"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<20} {:>6} {:>5} {:>5} {:>8} {:>8}  AGENT SOCKET",
                "NAME", "SIZE", "PEERS", "LINK", "SESSIONS", "CLIENTS"
            );
            for v in &vms {
                let link = match v["link_up"].as_bool() {
                    Some(true) => "up",
                    Some(false) => "down",
                    None => "-",
                };
                println!(
                    "{:<20} {:>6} {:>5} {:>5} {:>8} {:>8}  {}{}",
                    v["name"].as_str().unwrap_or("?"),
                    ivring_ivshmem::shm::short_size(v["size"].as_u64().unwrap_or(0)),
                    v["peers"].to_string(),
                    link,
                    v["sessions"].as_u64().map_or("-".into(), |n| n.to_string()),
                    v["clients"].to_string(),
                    v["agent_socket"].as_str().unwrap_or("-"),
                    if v["needs_recover"] == Value::Bool(true) {
                        "  (restored: see `ivring-host vm recover`)"
                    } else {
                        ""
                    }
                );
            }
            let threads = r["threads"].as_u64().unwrap_or(0);
            // Threads that come with a VM: a ring keeper thread per endpoint not driven
            // by the daemon's links thread (none).
            let keepers = r["keeper_threads"].as_u64().unwrap_or(0);
            println!(
                "{} VM{}; daemon pid {}, {} threads ({}); fd store {}",
                vms.len(),
                if vms.len() == 1 { "" } else { "s" },
                r["pid"],
                threads,
                if vms.is_empty() {
                    "no VMs".to_string()
                } else {
                    format!(
                        "{:.2} per VM; {} links driven by one thread",
                        keepers as f64 / vms.len() as f64,
                        r["driven_links"].as_u64().unwrap_or(0)
                    )
                },
                if r["fd_store"] == Value::Bool(true) {
                    "on (a restart keeps the VMs' memory and QEMU's connections)"
                } else {
                    "off (a restart gives the VMs new memory: see `ivring-host vm recover`)"
                }
            );
            Ok(())
        }
        VmCmd::Recover { name, dir } => {
            super::check_name(&name)?;
            let r = super::request(&dir.dir, &json!({"op": "recover", "name": name}))?;
            println!("{}", r["next"].as_str().unwrap_or(""));
            Ok(())
        }
    }
}
