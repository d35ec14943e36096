//! The command line of `ivring-host`, apart from what runs it: `main.rs` parses it and
//! `xtask` makes the man page and shell completions from it.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use ivring_host::shm;
use ivring_tools::{bench, checks, logging};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ivring-host",
    version,
    about = "ivring on the host: ivshmem server, demo, bench, bridge, check",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub verbosity: logging::Verbosity,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Host,
    Guest,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Serve the ivshmem protocol (start before QEMU): shared memory and doorbells for
    /// QEMU's ivshmem-doorbell device and for host programs.
    Serve {
        /// Socket path, as QEMU's `-chardev socket,path=` names it.
        #[arg(long, value_name = "SOCK")]
        socket: PathBuf,
        /// Shared memory size: a power of two from 64K to 1G.
        #[arg(long, default_value = "4M", value_parser = parse_region_size)]
        size: u64,
        /// Interrupt vectors per peer (QEMU's `vectors=`).
        #[arg(long, default_value_t = 1)]
        vectors: usize,
        /// Most peers served at once; more are refused (and logged).
        #[arg(long, default_value_t = ivring_host::server::MAX_PEERS as u16,
              value_parser = clap::value_parser!(u16).range(1..))]
        max_peers: u16,
        /// Mode of the socket, in octal (e.g. 0660 with --group for a QEMU running as
        /// another user).
        #[arg(long, default_value = "0600", value_parser = ivring_tools::bridge::parse_mode)]
        mode: u32,
        /// Group of the socket (name or number).
        #[arg(long)]
        group: Option<String>,
        /// A second socket, for the VM alone: QEMU connecting there gets peer id 0, which
        /// it requires of `ivshmem-doorbell,master=on`, the only mode it migrates and
        /// snapshots. Host programs join on --socket (ids from 1).
        #[arg(long, value_name = "SOCK")]
        vm_socket: Option<PathBuf>,
    },
    /// Show the transport working on this machine: two processes over a real memfd and
    /// eventfds, sessions both ways, a peer restart, throughput and latency.
    Demo {
        /// Shared memory size.
        #[arg(long, default_value = "16M", value_parser = parse_region_size)]
        size: u64,
        /// Seconds per throughput and latency figure.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// Run the echo, check, source and sink services on a link (the other side of the
    /// demo, the bench and the tests).
    Peer {
        /// Join the ivshmem server on this socket.
        #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// Use this plain shared file instead (no doorbells), created with --size if
        /// missing.
        #[arg(long, value_name = "FILE")]
        plain: Option<PathBuf>,
        /// With --plain: the file's size, to create it (start before QEMU) or to check it.
        #[arg(long, requires = "plain", conflicts_with = "join",
              value_parser = parse_region_size)]
        size: Option<u64>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Which side of the link to be.
        #[arg(long, value_enum, default_value = "guest")]
        role: RoleArg,
        /// Open a session to the other side's port 9 and greet it.
        #[arg(long)]
        hello: bool,
        /// How blocked readers and writers wait: poll, block or adaptive.
        #[arg(long, value_parser = bench::parse_wait, default_value = "adaptive")]
        wait: ivring::WaitMode,
    },
    /// Offer a UNIX socket for the guest agent's clients (as QEMU's `-chardev
    /// socket,server=on` does) and carry each client over one ivring session to the guest
    /// bridge. One client at a time: a second client waits until the first leaves.
    Bridge {
        /// The socket clients connect to.
        #[arg(long, value_name = "SOCK")]
        listen: PathBuf,
        /// Join the ivshmem server on this socket (`ivring-host serve`).
        #[arg(long, value_name = "SOCK", conflicts_with_all = ["serve", "plain"])]
        join: Option<PathBuf>,
        /// With --join: how long to wait for the server's socket to appear, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30.0, requires = "join",
              value_parser = parse_seconds)]
        join_wait: f64,
        /// Serve the ivshmem protocol on this socket ourselves (start before QEMU; the link
        /// ends when the bridge exits).
        #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
        serve: Option<PathBuf>,
        /// Use this plain shared file (`ivshmem-plain`), created with --size if missing.
        #[arg(long, value_name = "FILE")]
        plain: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Shared memory size with --serve or --plain (the server decides it with --join).
        #[arg(long, default_value = "4M", value_parser = parse_region_size,
              conflicts_with = "join")]
        size: u64,
        /// Interrupt vectors per peer with --serve (QEMU's `vectors=`; the server decides
        /// them with --join, and --plain has none).
        #[arg(long, default_value_t = 1, conflicts_with_all = ["join", "plain"])]
        vectors: usize,
        /// The guest bridge's port.
        #[arg(long, default_value_t = ivring_tools::bridge::PORT_QGA)]
        port: u32,
        /// Mode of the socket, in octal.
        #[arg(long, default_value = "0600", value_parser = ivring_tools::bridge::parse_mode)]
        mode: u32,
        /// Group of the socket (name or number).
        #[arg(long)]
        group: Option<String>,
    },
    /// Pass/fail checks of a link against the other side's services (`ivring-guest serve`
    /// or `check`), serving ours meanwhile: prints `PASS name` / `FAIL name: why` lines.
    Check {
        /// Join the ivshmem server on this socket.
        #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// Use this plain shared file instead (no doorbells).
        #[arg(long, value_name = "FILE")]
        plain: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Which side of the link to be.
        #[arg(long, value_enum, default_value = "host")]
        role: RoleArg,
        #[command(flatten)]
        args: checks::CheckArgs,
    },
    /// Throughput and latency against baselines measured in the same run (loopback pair,
    /// or a guest with --serve).
    Bench(bench::BenchArgs),
    /// Show a running link from outside: its state (up, waiting, reset, down), the peer
    /// ids, epochs and words each side published. Exits 0 when the link is up, 3 when
    /// not.
    ///
    /// It writes nothing: the memory is mapped private (copy-on-write), so nothing can
    /// reach the link. With --join it must still join the server for a moment to be
    /// handed the memory (the ivshmem protocol has no other way): the server and every
    /// peer, QEMU included, see one peer join and leave, which ivring links ignore.
    /// --plain, and `ivring-guest status` on a device, are invisible to the link.
    Status {
        /// The ivshmem server's socket.
        #[arg(long, value_name = "SOCK", conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// A plain shared file.
        #[arg(long, value_name = "FILE")]
        plain: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        /// One JSON object on stdout instead of the text.
        #[arg(long)]
        json: bool,
    },
    /// One process serving every VM on the host: an ivshmem socket and an agent socket per
    /// VM, added and removed while it runs (`ivring-host vm`), under one runtime directory.
    Daemon(ivring_tools::daemon::args::DaemonArgs),
    /// Add, remove, list or recover the VMs a running `ivring-host daemon` serves.
    #[command(subcommand)]
    Vm(ivring_tools::daemon::args::VmCmd),
}

/// Who may be trusted with shared memory that is not sealed.
#[derive(Clone, Copy, clap::Args)]
pub struct TrustArgs {
    /// With --join: accept shared memory the server has not sealed against shrinking
    /// (QEMU's own ivshmem-server, -M or -m). Only for a trusted server: a process holding
    /// the memory can shrink it, and a shrunk mapping kills us with SIGBUS.
    #[arg(long, requires = "join", conflicts_with = "plain")]
    pub allow_unsealed: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_alphabetic()) {
        Some((i, _)) => {
            let mul = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "K" => 1u64 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                other => return Err(format!("unknown size suffix {other:?}: use K, M or G")),
            };
            (&s[..i], mul)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 4M, 64K or 1G"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A shared memory size: [`parse_size`], then a power of two from 64 KiB to 1 GiB.
pub fn parse_region_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if shm::is_region_size(size) {
        return Ok(size);
    }
    Err(format!(
        "the shared memory must be a power of two from 64 KiB to 1 GiB (try {})",
        shm::short_size(shm::nearest_region_size(size))
    ))
}

/// A positive, finite number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("give a positive number of seconds, e.g. 1 or 0.5".into()),
    }
}

/// The command with the value names the derived arguments of other modules leave at
/// their defaults, so every socket reads `<SOCK>` and every file `<FILE>`.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("bench", |c| {
        c.mut_arg("serve", |a| a.value_name("SOCK"))
            .mut_arg("plot", |a| a.value_name("FILE"))
    })
}

impl From<RoleArg> for ivring::Role {
    fn from(r: RoleArg) -> ivring::Role {
        match r {
            RoleArg::Host => ivring::Role::Host,
            RoleArg::Guest => ivring::Role::Guest,
        }
    }
}
