//! `qcow2_ops`: see `vdisk::testing::fuzzing::qcow2_ops` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::qcow2_ops(data);
});
