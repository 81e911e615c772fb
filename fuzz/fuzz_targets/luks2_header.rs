//! `luks2_header`: see `vdisk::testing::fuzzing::luks2_header` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::luks2_header(data);
});
