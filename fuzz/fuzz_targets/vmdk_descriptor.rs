//! `vmdk_descriptor`: see `vdisk::testing::fuzzing::vmdk_descriptor` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::vmdk_descriptor(data);
});
