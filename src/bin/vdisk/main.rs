//! `vdisk`: disk images from the command line, in the spirit of `qemu-img`.

mod common;
mod compare;
mod convert;
mod info;
mod map;
mod pool;
mod vol;

use clap::{Parser, Subcommand};

/// Virtual-machine disk images (raw, qcow2, vmdk).
#[derive(Parser, Debug)]
#[command(name = "vdisk", version, about)]
struct Cli {
    /// Storage pool configuration directory (default: $VDISK_CONFIG_DIR,
    /// else $XDG_CONFIG_HOME/vdisk/storage).
    #[arg(long = "config-dir", global = true, value_name = "DIR")]
    config_dir: Option<std::path::PathBuf>,
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
    #[command(flatten)]
    Pool(pool::PoolCmd),
    #[command(flatten)]
    Vol(vol::VolCmd),
}

fn main() {
    let cli = Cli::parse();
    let (res, err_code) = match &cli.cmd {
        Cmd::Info(a) => (info::run(a), 1),
        Cmd::Convert(a) => (convert::run(a), 1),
        Cmd::Map(a) => (map::run(a), 1),
        Cmd::Compare(a) => (compare::run(a), 2),
        Cmd::Pool(c) => return virsh_exit(pool::run(c, cli.config_dir.as_ref())),
        Cmd::Vol(c) => return virsh_exit(vol::run(c, cli.config_dir.as_ref())),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vdisk: {e}");
            std::process::exit(err_code);
        }
    }
}

/// Pool and volume commands report errors as virsh does: `error: ` lines
/// (what failed, then why), exit code 1.
fn virsh_exit(res: vdisk::Result<i32>) {
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            use std::error::Error as _;
            match e.source().and_then(|s| s.downcast_ref::<vdisk::Error>()) {
                Some(inner) => eprintln!("error: {}\nerror: {inner}", e.message()),
                None => eprintln!("error: {e}"),
            }
            std::process::exit(1);
        }
    }
}
