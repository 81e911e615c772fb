//! `open_vmdk`: see `vdisk::testing::fuzzing::open_vmdk` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::open_vmdk(data);
});
