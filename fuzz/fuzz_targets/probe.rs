//! `probe`: see `vdisk::testing::fuzzing::probe` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::probe(data);
});
