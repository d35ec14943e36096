//! Inputs the fuzzer (`fuzz/`, docs/FUZZING.md) once crashed on, replayed on every test
//! run: `cargo test -p ivring --features fuzzing --test fuzz_regressions`.
#![cfg(feature = "fuzzing")]

#[test]
fn replay_fuzz_findings() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        ivring::fuzzing::fuzz_pump(&bytes);
    }
}
