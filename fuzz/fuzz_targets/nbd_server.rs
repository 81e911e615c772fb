//! `nbd_server`: see `vdisk::testing::fuzzing::nbd_server` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::nbd_server(data);
});
