//! Criterion benches of the ring core on heap memory: frame push/pop, header encode and
//! decode, session multiplexing through one Endpoint pair, and one small write and read.
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ivring::bench_api::RingPair;
use ivring::frame::{Header, Kind, HEADER_LEN};
use ivring::{doorbell::local, Config, Endpoint, SharedRegion, WaitMode};
use std::io::{Read, Write};
use std::sync::Arc;

fn push_pop(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    for size in [64usize, 256, 4096, 65504] {
        g.throughput(Throughput::Bytes(size as u64));
        let payload = vec![0x5au8; size];
        let mut buf = vec![0u8; size];
        let mut ring = RingPair::new(16 << 20);
        g.bench_function(format!("push_publish_pop/{size}"), |b| {
            b.iter(|| {
                assert!(ring.push(1, black_box(&payload)));
                ring.publish();
                black_box(ring.pop(&mut buf));
            })
        });
        // 32 frames per publish, as a writer with a batch does.
        let mut ring = RingPair::new(16 << 20);
        g.throughput(Throughput::Bytes(32 * size as u64));
        g.bench_function(format!("push32_publish_pop32/{size}"), |b| {
            b.iter(|| {
                for _ in 0..32 {
                    assert!(ring.push(1, black_box(&payload)));
                }
                ring.publish();
                for _ in 0..32 {
                    black_box(ring.pop(&mut buf));
                }
            })
        });
    }
    g.finish();
}

fn header(c: &mut Criterion) {
    let h = Header {
        kind: Kind::Data,
        flags: 1,
        len: 4096,
        session: 0x1234_5678,
    };
    c.bench_function("frame/encode", |b| {
        b.iter(|| black_box(black_box(&h).encode()))
    });
    let enc: [u8; HEADER_LEN] = h.encode();
    c.bench_function("frame/decode", |b| {
        b.iter(|| Header::decode(black_box(&enc), 65520, 1 << 20, 1 << 20).unwrap())
    });
}

/// A host and a guest endpoint over a 4 MiB heap region with in-process doorbells.
fn endpoint_pair(wait: WaitMode) -> (Endpoint, Endpoint) {
    let cfg = Config {
        wait,
        ..Config::default()
    };
    let region = SharedRegion::heap(4 << 20);
    let (a, b) = local::pair();
    let host = Endpoint::host(region.clone(), Arc::new(a), cfg.clone()).unwrap();
    let guest = Endpoint::guest(region, Arc::new(b), cfg).unwrap();
    (host, guest)
}

fn sessions(c: &mut Criterion) {
    let mut g = c.benchmark_group("sessions");
    g.sample_size(10);
    for n in [1usize, 4, 16] {
        let (host, guest) = endpoint_pair(WaitMode::Adaptive);
        let l = guest.listen(1).unwrap();
        let mut tx = Vec::new();
        let mut rx = Vec::new();
        for _ in 0..n {
            tx.push(host.connect(1).unwrap());
            rx.push(l.accept().unwrap());
        }
        const PER: usize = 64 << 10;
        g.throughput(Throughput::Bytes((n * PER) as u64));
        let chunk = vec![7u8; 4096];
        g.bench_function(format!("4k_writes_64k_each/{n}"), |b| {
            b.iter_batched(
                || (),
                |_| {
                    std::thread::scope(|s| {
                        for r in rx.iter_mut() {
                            s.spawn(move || {
                                let mut buf = vec![0u8; PER];
                                r.read_exact(&mut buf).unwrap();
                            });
                        }
                        for t in tx.iter_mut() {
                            for _ in 0..PER / chunk.len() {
                                t.write_all(&chunk).unwrap();
                            }
                        }
                    })
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// One 64-byte write and its read through a session, both ends on this thread: what the
/// link's software costs a small write and read, with no other CPU in the path. Compare
/// with `ring/push_publish_pop/64` of the same run (the bare ring's push, publish, pop).
fn small_write_read(c: &mut Criterion) {
    let (host, guest) = endpoint_pair(WaitMode::Poll);
    let l = guest.listen(1).unwrap();
    let mut tx = host.connect(1).unwrap();
    let mut rx = l.accept().unwrap();
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut g = c.benchmark_group("sessions");
    g.throughput(Throughput::Bytes(64));
    g.bench_function("write_read_one_thread/64", |b| {
        b.iter(|| {
            tx.write_all(black_box(&msg)).unwrap();
            rx.read_exact(&mut back).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, push_pop, header, sessions, small_write_read);
criterion_main!(benches);
