//! `pool_xml`: see `vdisk::fuzzing::pool_xml` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::fuzzing::pool_xml(data);
});
