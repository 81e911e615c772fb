//! `nbd_client`: see `vdisk::testing::fuzzing::nbd_client` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::nbd_client(data);
});
