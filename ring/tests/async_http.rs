//! hyper over ivring (the `tokio` feature): an HTTP/1.1 server in one role and hyper
//! clients in the other, in both directions of who listens; every body checksummed; a
//! peer restart in the middle fails the open connections with `ConnectionReset`, and new
//! connections work.

mod common;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, Role, SharedRegion};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PORT: u32 = 80;
const CONNECTIONS: usize = 16;
const REQUESTS: usize = 100;

fn cfg() -> Config {
    Config {
        peer_timeout: Duration::from_secs(60),
        ..Config::default()
    }
}

/// FNV-1a, enough to catch a lost, doubled or shifted byte.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn body_for(conn: usize, req: usize) -> Vec<u8> {
    // Sizes from a few bytes to past one frame (64 KiB), so bodies span frames.
    let len = (conn * 7919 + req * 104_729) % 150_000;
    (0..len).map(|i| (i * 31 + conn * 7 + req) as u8).collect()
}

/// Answers every request with a body derived from it (reversed) and the checksum of
/// what it received in a header.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    let sum = checksum(&body);
    let mut reply = body.to_vec();
    reply.reverse();
    Ok(Response::builder()
        .header("x-request-sum", sum.to_string())
        .body(Full::new(Bytes::from(reply)))
        .expect("response"))
}

/// Serves HTTP/1.1 on `listener` until the endpoint closes; counts connections served.
async fn serve(listener: AsyncListener, served: Arc<AtomicU64>) {
    loop {
        let session = match listener.accept().await {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::NotConnected => return,
            Err(e) => panic!("accept: {e}"),
        };
        let served = served.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(session), hyper::service::service_fn(handle));
            // A reset link ends connections with an error; the clients check theirs.
            if conn.await.is_ok() {
                served.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// One client connection: `REQUESTS` requests, each reply checked.
async fn client(endpoint: Arc<Endpoint>, conn: usize) -> Result<(), hyper::Error> {
    let session = AsyncSession::connect(&endpoint, PORT)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(session))
        .await
        .expect("handshake");
    let driver = tokio::spawn(connection);
    for req in 0..REQUESTS {
        let body = body_for(conn, req);
        let sum = checksum(&body);
        let request = Request::post(format!("/conn/{conn}/req/{req}"))
            .header("host", "ivring")
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        sender.ready().await?;
        let reply = sender.send_request(request).await?;
        assert_eq!(reply.status(), 200);
        let told: u64 = reply.headers()["x-request-sum"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            told, sum,
            "the server read another body (conn {conn} req {req})"
        );
        let got = reply.into_body().collect().await?.to_bytes();
        let mut want = body;
        want.reverse();
        assert_eq!(got.len(), want.len());
        assert_eq!(checksum(&got), checksum(&want), "conn {conn} req {req}");
    }
    drop(sender);
    let _ = driver.await;
    Ok(())
}

/// Both sides up, and what a restart of either needs: the region and its doorbell.
struct Pair {
    host: Arc<Endpoint>,
    guest: Arc<Endpoint>,
    region: SharedRegion,
    host_bell: Arc<local::LocalDoorbell>,
    guest_bell: Arc<local::LocalDoorbell>,
}

fn pair() -> Pair {
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let (host_bell, guest_bell) = (Arc::new(a), Arc::new(b));
    let host = Endpoint::host(region.clone(), host_bell.clone(), cfg()).unwrap();
    let guest = Endpoint::guest(region.clone(), guest_bell.clone(), cfg()).unwrap();
    assert!(host.wait_up(Duration::from_secs(20)));
    assert!(guest.wait_up(Duration::from_secs(20)));
    Pair {
        host: Arc::new(host),
        guest: Arc::new(guest),
        region,
        host_bell,
        guest_bell,
    }
}

async fn many_clients(server: Arc<Endpoint>, clients: Arc<Endpoint>) {
    let served = Arc::new(AtomicU64::new(0));
    let listener = AsyncListener::bind(&server, PORT).unwrap();
    let server_task = tokio::spawn(serve(listener, served.clone()));
    let t = std::time::Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| tokio::spawn(client(clients.clone(), c)))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    println!(
        "{CONNECTIONS} connections x {REQUESTS} requests in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    server_task.abort();
    // Each server connection ends (Ok) once its client closes (generous for a loaded
    // machine: up to 20 s).
    for _ in 0..2000 {
        if served.load(Ordering::Relaxed) == CONNECTIONS as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served.load(Ordering::Relaxed), CONNECTIONS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_server_in_the_guest_role_clients_in_the_host_role() {
    let _guard = common::watchdog(
        "hyper_server_in_the_guest_role_clients_in_the_host_role",
        Duration::from_secs(60),
    );
    let p = pair();
    many_clients(p.guest, p.host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_server_in_the_host_role_clients_in_the_guest_role() {
    let _guard = common::watchdog(
        "hyper_server_in_the_host_role_clients_in_the_guest_role",
        Duration::from_secs(60),
    );
    let p = pair();
    many_clients(p.host, p.guest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_role_server_restart_resets_open_connections_and_new_ones_work() {
    let _guard = common::watchdog(
        "a_guest_role_server_restart_resets_open_connections_and_new_ones_work",
        Duration::from_secs(60),
    );
    server_restart(Role::Guest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_role_server_restart_resets_open_connections_and_new_ones_work() {
    let _guard = common::watchdog(
        "a_host_role_server_restart_resets_open_connections_and_new_ones_work",
        Duration::from_secs(60),
    );
    server_restart(Role::Host).await;
}

/// The server's side restarts (its endpoint dropped, a new one of the same role made on
/// the same region) while 16 clients are in the middle of their requests: each fails with
/// `ConnectionReset`, and new connections to the new server work.
async fn server_restart(server_role: Role) {
    let p = pair();
    let (server, clients, bell) = match server_role {
        Role::Guest => (p.guest, p.host, p.guest_bell),
        Role::Host => (p.host, p.guest, p.host_bell),
    };
    let region = p.region;
    let serving = tokio::spawn(serve(
        AsyncListener::bind(&server, PORT).unwrap(),
        Arc::new(AtomicU64::new(0)),
    ));
    let started = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|conn| {
            let clients = clients.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let session = AsyncSession::connect(&clients, PORT)
                    .await
                    .expect("connect");
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(session))
                        .await
                        .expect("handshake");
                let driver = tokio::spawn(connection);
                // Requests until the connection fails (the restart).
                let mut req = 0;
                let failure = loop {
                    let body = body_for(conn, req);
                    let request = Request::post("/")
                        .body(Full::new(Bytes::from(body)))
                        .expect("request");
                    if let Err(e) = sender.ready().await {
                        break e;
                    }
                    match sender.send_request(request).await {
                        Ok(reply) => {
                            if let Err(e) = reply.into_body().collect().await {
                                break e;
                            }
                        }
                        Err(e) => break e,
                    }
                    req += 1;
                    started.fetch_add(1, Ordering::Relaxed);
                };
                // hyper reports the transport's error as the source; the driver too.
                let driver_err = driver.await.unwrap().err();
                (failure, driver_err)
            })
        })
        .collect();
    // Restart once every client is in the middle of its requests.
    while started.load(Ordering::Relaxed) < (CONNECTIONS * 5) as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    serving.abort();
    drop(server); // the last reference: the old server side detaches
    let server = Endpoint::unattached(server_role, region, bell, cfg()).unwrap();
    let listener = AsyncListener::bind(&server, PORT).unwrap();
    server.attach();
    for t in tasks {
        let (failure, driver_err) = t.await.unwrap();
        let kinds = io_kinds(&failure)
            .into_iter()
            .chain(driver_err.iter().flat_map(io_kinds))
            .collect::<Vec<_>>();
        assert!(
            kinds.contains(&ErrorKind::ConnectionReset),
            "expected ConnectionReset, got {failure:?} / {driver_err:?}"
        );
    }
    let serving = tokio::spawn(serve(listener, Arc::new(AtomicU64::new(0))));
    let fresh: Vec<_> = (0..CONNECTIONS)
        .map(|c| tokio::spawn(client(clients.clone(), c)))
        .collect();
    for t in fresh {
        t.await.unwrap().unwrap();
    }
    serving.abort();
    drop(server);
}

/// The `io::ErrorKind`s along an error's source chain.
fn io_kinds(e: &hyper::Error) -> Vec<ErrorKind> {
    let mut kinds = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        cur = err.source();
    }
    kinds
}
