//! `open_qcow2`: see `vdisk::testing::fuzzing::open_qcow2` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::open_qcow2(data);
});
