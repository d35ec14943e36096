//! `ivring-host`: the host side of ivring.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use ivring::{Config, Role};
use ivring_host::attach::{Attach, HostLink};
use ivring_host::logging::{self, LinkWatch};
use ivring_host::{bench, checks, demo, server, services, shm, status, HostError, Server};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "ivring-host",
    version,
    about = "ivring on the host: ivshmem server, demo, bench, bridge, check",
    arg_required_else_help = true
)]
struct Cli {
    #[command(flatten)]
    verbosity: logging::Verbosity,
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

/// A shared memory size: [`parse_size`], then a power of two from 64 KiB to 1 GiB.
fn parse_region_size(s: &str) -> Result<u64, String> {
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
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("give a positive number of seconds, e.g. 1 or 0.5".into()),
    }
}

const BIN: &str = "ivring-host";

fn main() {
    let cmd = Cli::command().mut_subcommand("bench", |c| {
        c.mut_arg("serve", |a| a.value_name("SOCK"))
            .mut_arg("plot", |a| a.value_name("FILE"))
    });
    let cli: Cli = ivring_host::error::parse_args_from(BIN, cmd);
    logging::init(BIN, cli.verbosity);
    if let Cmd::Bench(args) = &cli.cmd {
        if let Err(problem) = check_bench_args(args) {
            ivring_host::error::usage_error(BIN, &problem);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("{BIN}: error: {}", ivring_host::error::one_line(&e));
        std::process::exit(1);
    }
}

/// Everything about the bench's arguments that can be known before the first figure, so
/// that a mistake is not found minutes into a run.
fn check_bench_args(a: &bench::BenchArgs) -> Result<(), String> {
    let mem = a.mem_mib.checked_mul(1 << 20);
    if !mem.is_some_and(shm::is_region_size) {
        let try_mib = (shm::nearest_region_size(mem.unwrap_or(u64::MAX)) >> 20).max(1);
        return Err(format!(
            "--mem-mib {}: the shared memory must be a power of two from 64 KiB to 1 GiB \
             (try --mem-mib {try_mib})",
            a.mem_mib
        ));
    }
    for (flag, v) in [("--seconds", a.seconds), ("--idle-seconds", a.idle_seconds)] {
        if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
            return Err(format!(
                "{flag} {x}: give a positive number of seconds, e.g. 1 or 0.5"
            ));
        }
    }
    if a.modes.is_empty() {
        return Err("--modes: give at least one of poll, block, adaptive".into());
    }
    check_cpus(&a.cpus)?;
    if let Some(plot) = &a.plot {
        check_writable(plot).map_err(|e| format!("--plot {}: {e}", plot.display()))?;
    }
    Ok(())
}

/// `--cpus`: `auto`, `none`, or CPU numbers this process may run on.
fn check_cpus(spec: &str) -> Result<(), String> {
    use rustix::thread::{sched_getaffinity, CpuSet};
    if spec == "auto" || spec == "none" {
        return Ok(());
    }
    let allowed: Vec<usize> = match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => return Ok(()), // the bench itself will say what failed
    };
    let may_use = cpu_list(&allowed);
    let example = match allowed.as_slice() {
        [a, b, ..] => format!("{a},{b}"),
        [a] => a.to_string(),
        [] => "none".into(),
    };
    for c in spec.split(',') {
        let ok = match c.trim().parse::<usize>() {
            Ok(n) => allowed.contains(&n),
            Err(_) => {
                return Err(format!(
                    "--cpus {spec}: {c:?} is not a CPU number; give CPU numbers (this process \
                     may use {may_use}), e.g. --cpus {example}, or auto or none"
                ))
            }
        };
        if !ok {
            return Err(format!(
                "--cpus {spec}: CPU {} is not one this process may use ({may_use}): \
                 e.g. --cpus {example}",
                c.trim()
            ));
        }
    }
    Ok(())
}

/// CPU numbers as ranges: "0-3,6".
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// Whether `path` can be written: an existing file is opened for appending (left
/// unchanged), a new one is created and removed again.
fn check_writable(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().append(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => std::fs::remove_file(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "directory {} does not exist: create it first",
                            dir.display()
                        ),
                    ))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Waits up to `bound` for a socket to appear at `path` (the server's unit may still be
/// starting), saying so once.
fn wait_for_server_socket(path: &Path, bound: Duration) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = || std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket() || path.exists() {
        return Ok(());
    }
    info!(
        "waiting up to {} s for the ivshmem server's socket {}",
        bound.as_secs_f64(),
        path.display()
    );
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if is_socket() {
            return Ok(());
        }
    }
    Err(HostError::NoServer { path: path.into() }.into())
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
            let gid = group.as_deref().map(server::resolve_group).transpose()?;
            let server = Server::bind(&socket, size, vectors)?.with_max_peers(max_peers.into());
            server.set_socket_access(mode, gid)?;
            // The socket accepts from here on (the backlog holds early peers).
            ivring_host::notify::ready(&format!("serving {}", socket.display()));
            info!(
                "serving {} on {} ({} vector{}, at most {max_peers} peers, socket mode {mode:04o}); start QEMU with -chardev socket,path={},id=ivs -device ivshmem-doorbell,chardev=ivs,vectors={}",
                shm::human_size(size),
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
            size,
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
            let attach = attach(join, plain, size, trust)?;
            let link = HostLink::open_with(role.into(), &attach, cfg, services::spawn_all)?;
            info!("serving ports 1-4 and 6; {}", link.why());
            if hello {
                let mut s = link
                    .connect(demo::PORT_HELLO)
                    .context("greet the other side")?;
                write!(s, "hello from pid {}", std::process::id())?;
            }
            let never = AtomicBool::new(false);
            LinkWatch::new(attach.to_string()).run(&link, logging::WATCH_PERIOD, &never);
            Ok(())
        }
        Cmd::Bridge {
            listen,
            join,
            join_wait,
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
                (Some(j), None, None) => {
                    wait_for_server_socket(&j, Duration::from_secs_f64(join_wait))?;
                    Attach::join(j, trust.allow_unsealed)
                }
                (None, Some(socket), None) => Attach::Serve {
                    socket,
                    size,
                    vectors,
                },
                (None, None, Some(file)) => Attach::Plain {
                    file,
                    size: Some(size),
                },
                _ => bail!("give one of --join SOCK, --serve SOCK or --plain FILE"),
            };
            server::prepare_socket_dir(&listen)?;
            if trust.allow_unsealed && !matches!(attach, Attach::JoinWith(..)) {
                bail!("--allow-unsealed applies to --join only: drop it, or join a server");
            }
            let mut opts = ivring_host::bridge::HostBridgeOptions::new(listen, attach);
            opts.port = port;
            opts.mode = mode;
            // Resolved here, through the name service; the bridge takes the number as is.
            opts.group = group
                .as_deref()
                .map(server::resolve_group)
                .transpose()?
                .map(|gid| gid.to_string());
            ivring_host::bridge::run_host(&opts)
        }
        Cmd::Check {
            join,
            plain,
            trust,
            role,
            args,
        } => {
            let link = HostLink::open(
                role.into(),
                &attach(join, plain, None, trust)?,
                args.config(),
            )?;
            checks::out(format_args!("INFO {}", link.why()));
            checks::run(&link, Some(&link.region()), role.into(), &args)
        }
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Status {
            join,
            plain,
            trust,
            json,
        } => {
            let (region, what) = match (join, plain) {
                (Some(sock), None) => {
                    let opts = ivring_host::ConnectOptions {
                        allow_unsealed: trust.allow_unsealed,
                        ..Default::default()
                    };
                    let memfd = ivring_host::Client::fetch_memory(&sock, &opts)?;
                    let what = format!("server {}", sock.display());
                    (shm::map_fd_private(memfd.as_fd(), &what)?, what)
                }
                (None, Some(file)) => (
                    shm::map_file_private(&file)?,
                    format!("plain {}", file.display()),
                ),
                _ => bail!("give --join SOCK or --plain FILE"),
            };
            let st = status::read(&region, what, status::WATCH);
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
    }
}

fn attach(
    join: Option<PathBuf>,
    plain: Option<PathBuf>,
    size: Option<u64>,
    trust: TrustArgs,
) -> Result<Attach> {
    Ok(match (join, plain) {
        (Some(j), None) => Attach::join(j, trust.allow_unsealed),
        (None, Some(file)) => Attach::Plain { file, size },
        _ => bail!("give --join SOCK or --plain FILE"),
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
