//! `open_vhdx`: see `vdisk::testing::fuzzing::open_vhdx` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::open_vhdx(data);
});
