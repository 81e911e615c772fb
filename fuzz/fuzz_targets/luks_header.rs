//! `luks_header`: see `vdisk::testing::fuzzing::luks_header` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::luks_header(data);
});
