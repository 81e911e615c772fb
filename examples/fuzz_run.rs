fn main() {
    let mut a = std::env::args().skip(1);
    let t = a.next().unwrap();
    for f in a {
        let d = std::fs::read(&f).unwrap();
        eprintln!("== {f}");
        vdisk::fuzzing::run(&t, &d);
    }
}
