//! Runs a fuzz target body on files, on stable Rust (for looking at a
//! crasher): `cargo run --release --example fuzz_run -- TARGET FILE...`.
//! `VDISK_FUZZ_TRACE=1` prints the operations of `qcow2_ops`.

fn main() {
    let mut a = std::env::args().skip(1);
    let t = a.next().unwrap();
    for f in a {
        let d = std::fs::read(&f).unwrap();
        eprintln!("== {f}");
        vdisk::testing::fuzzing::run(&t, &d);
    }
}
