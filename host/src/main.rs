//! `ivring-host`: the host side of ivring.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ivring::{Config, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::{bench, checks, demo, services, Server};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ivring-host",
    version,
    about = "ivring on the host: ivshmem server, demo, bench, bridge, check"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Host,
    Guest,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the ivshmem protocol (start before QEMU): shared memory and doorbells for
    /// QEMU's ivshmem-doorbell device and for host programs.
    Serve {
        /// Socket path, as QEMU's `-chardev socket,path=` names it.
        #[arg(long)]
        socket: PathBuf,
        /// Shared memory size: a power of two from 64K to 1G.
        #[arg(long, default_value = "4M", value_parser = parse_size)]
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
        #[arg(long, default_value = "0600", value_parser = ivring_host::bridge::parse_mode)]
        mode: u32,
        /// Group of the socket (name or number).
        #[arg(long)]
        group: Option<String>,
    },
    /// Show the transport working on this machine: two processes over a real memfd and
    /// eventfds, sessions both ways, a peer restart, throughput and latency.
    Demo {
        /// Shared memory size.
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        size: u64,
        /// Seconds per throughput and latency figure.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// Run the echo, check, source and sink services on a link (the other side of the
    /// demo, the bench and the tests).
    Peer {
        /// Join the ivshmem server on this socket.
        #[arg(long, conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// Use this plain shared file instead (no doorbells).
        #[arg(long)]
        plain: Option<PathBuf>,
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
        #[arg(long)]
        listen: PathBuf,
        /// Join the ivshmem server on this socket (`ivring-host serve`).
        #[arg(long, conflicts_with_all = ["serve", "plain"])]
        join: Option<PathBuf>,
        /// Serve the ivshmem protocol on this socket ourselves (start before QEMU; the link
        /// ends when the bridge exits).
        #[arg(long, conflicts_with = "plain")]
        serve: Option<PathBuf>,
        /// Use this plain shared file (`ivshmem-plain`), created with --size if missing.
        #[arg(long)]
        plain: Option<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Shared memory size with --serve or --plain.
        #[arg(long, default_value = "4M", value_parser = parse_size)]
        size: u64,
        /// Interrupt vectors per peer with --serve (QEMU's `vectors=`).
        #[arg(long, default_value_t = 1)]
        vectors: usize,
        /// The guest bridge's port.
        #[arg(long, default_value_t = ivring_host::bridge::PORT_QGA)]
        port: u32,
        /// Mode of the socket, in octal.
        #[arg(long, default_value = "0600", value_parser = ivring_host::bridge::parse_mode)]
        mode: u32,
        /// Group of the socket (name or number).
        #[arg(long)]
        group: Option<String>,
    },
    /// Pass/fail checks of a link against the other side's services (`ivring-guest serve`
    /// or `check`), serving ours meanwhile: prints `PASS name` / `FAIL name: why` lines.
    Check {
        /// Join the ivshmem server on this socket.
        #[arg(long, conflicts_with = "plain")]
        join: Option<PathBuf>,
        /// Use this plain shared file instead (no doorbells).
        #[arg(long)]
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
}

/// Who may be trusted with shared memory that is not sealed.
#[derive(Clone, Copy, clap::Args)]
struct TrustArgs {
    /// With --join: accept shared memory the server has not sealed against shrinking
    /// (QEMU's own ivshmem-server, -M or -m). Only for a trusted server: a process holding
    /// the memory can shrink it, and a shrunk mapping kills us with SIGBUS.
    #[arg(long, requires = "join", conflicts_with = "plain")]
    allow_unsealed: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
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

fn main() {
    let cli: Cli = ivring_host::error::parse_args("ivring-host");
    if let Err(e) = run(cli) {
        eprintln!("ivring-host: error: {}", ivring_host::error::one_line(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve {
            socket,
            size,
            vectors,
            max_peers,
            mode,
            group,
        } => {
            let gid = group
                .as_deref()
                .map(ivring_host::bridge::resolve_group)
                .transpose()?;
            let server = Server::bind(&socket, size, vectors)?.with_max_peers(max_peers.into());
            server.set_socket_access(mode, gid)?;
            eprintln!(
                "ivring-host: serving {} MiB on {} ({} vector{}, at most {max_peers} peers, socket mode {mode:04o}); start QEMU with -chardev socket,path={},id=ivs -device ivshmem-doorbell,chardev=ivs,vectors={}",
                size >> 20,
                socket.display(),
                vectors,
                if vectors == 1 { "" } else { "s" },
                socket.display(),
                vectors
            );
            server.run()?;
            Ok(())
        }
        Cmd::Demo { size, seconds } => demo::run(&demo::DemoOptions { size, seconds }),
        Cmd::Peer {
            join,
            plain,
            trust,
            role,
            hello,
            wait,
        } => {
            let cfg = Config {
                wait,
                ..Config::default()
            };
            // Listen before attaching, so that no connect the other side makes the moment
            // it sees us is refused.
            let link = HostLink::open_with(role.into(), &attach(join, plain, trust)?, cfg, |ep| {
                services::spawn_all(ep)
            })?;
            eprintln!("ivring-host: serving ports 1-4 and 6; {}", link.why());
            if hello {
                let mut s = link
                    .connect(demo::PORT_HELLO)
                    .context("greet the other side")?;
                write!(s, "hello from pid {}", std::process::id())?;
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Bridge {
            listen,
            join,
            serve,
            plain,
            trust,
            size,
            vectors,
            port,
            mode,
            group,
        } => {
            let attach = match (join, serve, plain) {
                (Some(j), None, None) => Attach::join(j, trust.allow_unsealed),
                (None, Some(socket), None) => Attach::Serve {
                    socket,
                    size,
                    vectors,
                },
                (None, None, Some(file)) => Attach::Plain {
                    file,
                    size: Some(size),
                },
                _ => bail!("give one of --join SOCKET, --serve SOCKET or --plain FILE"),
            };
            if trust.allow_unsealed && !matches!(attach, Attach::JoinWith(..)) {
                bail!("--allow-unsealed applies to --join only: drop it, or join a server");
            }
            let mut opts = ivring_host::bridge::HostBridgeOptions::new(listen, attach);
            opts.port = port;
            opts.mode = mode;
            opts.group = group;
            ivring_host::bridge::run_host(&opts)
        }
        Cmd::Check {
            join,
            plain,
            trust,
            role,
            args,
        } => {
            let link = HostLink::open(role.into(), &attach(join, plain, trust)?, args.config())?;
            checks::out(format_args!("INFO {}", link.why()));
            checks::run(&link, Some(&link.region()), role.into(), &args)
        }
        Cmd::Bench(args) => bench::run(&args),
    }
}

fn attach(join: Option<PathBuf>, plain: Option<PathBuf>, trust: TrustArgs) -> Result<Attach> {
    Ok(match (join, plain) {
        (Some(j), None) => Attach::join(j, trust.allow_unsealed),
        (None, Some(p)) => Attach::Plain {
            file: p,
            size: None,
        },
        _ => bail!("give --join SOCKET or --plain FILE"),
    })
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Host => Role::Host,
            RoleArg::Guest => Role::Guest,
        }
    }
}
