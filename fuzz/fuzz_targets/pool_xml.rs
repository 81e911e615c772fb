//! `pool_xml`: see `vdisk::testing::fuzzing::pool_xml` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::pool_xml(data);
});
