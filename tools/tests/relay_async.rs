//! `bridge::relay_async`: how it ends (both ways closed, the session's EOF for the host
//! bridge, the linger time), and what it counts.

use ivring::tokio::{AsyncListener, AsyncSession};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion};
use ivring_tools::bridge::{relay_async, RelayOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pair() -> (Endpoint, Endpoint) {
    let region = SharedRegion::heap(1 << 20);
    let (a, b) = local::pair();
    let cfg = Config {
        peer_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
    assert!(host.wait_up(Duration::from_secs(20)));
    assert!(guest.wait_up(Duration::from_secs(20)));
    (host, guest)
}

#[tokio::test(flavor = "current_thread")]
async fn ends_as_the_options_say() {
    let (host, guest) = pair();
    let listener = AsyncListener::bind(&guest, 5).unwrap();

    // Both ways closed: clean, with the bytes counted (the first bytes included).
    let mut session = AsyncSession::connect(&host, 5).await.unwrap();
    let mut far = listener.accept().await.unwrap();
    let (mut stream, mut client) = tokio::net::UnixStream::pair().unwrap();
    let opts = RelayOptions::default();
    let relay = relay_async(&mut session, &mut stream, b"first ".to_vec(), &opts);
    let other = async {
        client.write_all(b"up").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first up");
        far.write_all(b"down!").await.unwrap();
        far.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"down!");
    };
    let (end, ()) = tokio::join!(relay, other);
    assert!(end.clean, "{}", end.why);
    assert_eq!((end.to_session, end.to_stream), (8, 5));

    // The host bridge's rule: the session's EOF ends it, the client still open.
    let mut session = AsyncSession::connect(&host, 5).await.unwrap();
    let far = listener.accept().await.unwrap();
    let (mut stream, _client) = tokio::net::UnixStream::pair().unwrap();
    let opts = RelayOptions {
        end_on_session_eof: true,
        ..RelayOptions::default()
    };
    drop(far);
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        relay_async(&mut session, &mut stream, Vec::new(), &opts),
    )
    .await
    .unwrap();
    assert!(end.clean, "{}", end.why);
    assert_eq!(end.why, "session closed");

    // One way closed and the other kept open past the linger time: not clean.
    let mut session = AsyncSession::connect(&host, 5).await.unwrap();
    let _far = listener.accept().await.unwrap();
    let (mut stream, mut client) = tokio::net::UnixStream::pair().unwrap();
    client.shutdown().await.unwrap();
    let opts = RelayOptions {
        linger: Duration::from_millis(100),
        ..RelayOptions::default()
    };
    let end = tokio::time::timeout(
        Duration::from_secs(10),
        relay_async(&mut session, &mut stream, Vec::new(), &opts),
    )
    .await
    .unwrap();
    assert!(!end.clean);
    assert!(end.why.contains("kept its half open"), "{}", end.why);
}
