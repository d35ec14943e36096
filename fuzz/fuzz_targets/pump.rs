//! The victim's receive path under a hostile peer: see `ivring::fuzzing::fuzz_pump`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ivring::fuzzing::fuzz_pump(data);
});
