//! `vdisk`: disk images from the command line, in the spirit of `qemu-img`.

mod common;
mod compare;
mod convert;
mod info;
mod map;

use clap::{Parser, Subcommand};

/// Virtual-machine disk images (raw, qcow2, vmdk).
#[derive(Parser, Debug)]
#[command(name = "vdisk", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show an image's format, sizes, backing chain and snapshots.
    Info(info::InfoArgs),
    /// Copy an image into a new one, keeping holes.
    Convert(convert::ConvertArgs),
    /// Show how guest ranges map to data, zeros and backing files.
    Map(map::MapArgs),
    /// Compare the guest contents of two images.
    Compare(compare::CompareArgs),
}

fn main() {
    let cli = Cli::parse();
    let (res, err_code) = match &cli.cmd {
        Cmd::Info(a) => (info::run(a), 1),
        Cmd::Convert(a) => (convert::run(a), 1),
        Cmd::Map(a) => (map::run(a), 1),
        Cmd::Compare(a) => (compare::run(a), 2),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vdisk: {e}");
            std::process::exit(err_code);
        }
    }
}
