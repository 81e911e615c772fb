//! `open_vpc_vdi`: see `vdisk::testing::fuzzing::open_vpc_vdi` for what it exercises and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdisk::testing::fuzzing::open_vpc_vdi(data);
});
