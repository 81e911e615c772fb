//! `vdisk`: disk images from the command line, in the spirit of `qemu-img`.

/// `print!` to standard output through [`output::write`]: a closed pipe
/// never panics.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*)) };
}

/// `println!` through [`output::write`].
macro_rules! outln {
    () => { $crate::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

mod output;

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod handoff;
mod info;
mod io;
mod luks2_cli;
mod luks_info;
mod map;
mod measure;
mod pool;
mod rebase;
mod resize;
mod salvage;
mod secrets;
mod serve;
mod snapshot;
mod vhdx_cli;
mod vol;
mod vpcvdi;

use std::io::Write as _;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Virtual-machine disk images (raw, qcow2, vmdk).
#[derive(Parser, Debug)]
#[command(name = "vdisk", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The pool and volume verbs, the only ones that read pool definitions.
fn pool_verbs() -> Vec<String> {
    let pools = <pool::PoolCmd as Subcommand>::augment_subcommands(clap::Command::new("pools"));
    let vols = <vol::VolCmd as Subcommand>::augment_subcommands(clap::Command::new("vols"));
    pools.get_subcommands().chain(vols.get_subcommands()).map(|c| c.get_name().to_string()).collect()
}

/// Parses the command line; `--config-dir` exists on the pool and volume
/// verbs only (image verbs know no pools).
fn parse() -> (Cli, Option<std::path::PathBuf>) {
    let mut cmd = Cli::command();
    for name in pool_verbs() {
        cmd = cmd.mut_subcommand(name, |s| {
            s.arg(
                clap::Arg::new("config-dir")
                    .long("config-dir")
                    .value_name("DIR")
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help("Storage pool configuration directory (default: $VDISK_CONFIG_DIR, else $XDG_CONFIG_HOME/vdisk/storage)"),
            )
        });
    }
    let matches = cmd.get_matches();
    // `try_get_one`: image verbs have no such argument (`get_one` would
    // panic on them in debug builds).
    let config_dir = matches
        .subcommand()
        .and_then(|(_, m)| m.try_get_one::<std::path::PathBuf>("config-dir").ok().flatten().cloned());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    (cli, config_dir)
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show an image's format, sizes, backing chain and snapshots.
    Info(info::InfoArgs),
    /// Create a new image.
    Create(create::CreateArgs),
    /// Copy an image into a new one, keeping holes (optionally compressed).
    Convert(convert::ConvertArgs),
    /// Show how guest ranges map to data, zeros and backing files.
    Map(map::MapArgs),
    /// Compare the guest contents of two images.
    Compare(compare::CompareArgs),
    /// Check an image's metadata (and repair it).
    Check(check::CheckArgs),
    /// Change an image's virtual size.
    Resize(resize::ResizeArgs),
    /// Run qemu-io style commands on an image.
    Io(io::IoArgs),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Add, remove, clear, enable, disable, merge or dump persistent dirty bitmaps (qemu-img bitmap).
    Bitmap(bitmap::BitmapArgs),
    /// Change an image's options (qemu-img amend).
    Amend(amend::AmendArgs),
    /// Write an image's data into its backing file (qemu-img commit).
    Commit(commit::CommitArgs),
    /// Move a qcow2 image onto another backing file (qemu-img rebase).
    Rebase(rebase::RebaseArgs),
    /// Copy blocks of an image into a new one (qemu-img dd).
    Dd(dd::DdArgs),
    /// How large a new image would be (qemu-img measure).
    Measure(measure::MeasureArgs),
    /// Run the workloads of qemu-img bench.
    Bench(bench::BenchArgs),
    /// Export images over NBD (qemu-nbd).
    Serve(serve::ServeArgs),
    /// Hand the images of a running `serve --control` over: activate, inactivate, status.
    Handoff(handoff::HandoffArgs),
    #[command(flatten)]
    Pool(pool::PoolCmd),
    #[command(flatten)]
    Vol(vol::VolCmd),
}

fn main() {
    let (cli, config_dir) = parse();
    let (res, err_code) = match &cli.cmd {
        Cmd::Info(a) => (info::run(a), 1),
        Cmd::Create(a) => (create::run(a), 1),
        Cmd::Convert(a) => (convert::run(a), 1),
        Cmd::Map(a) => (map::run(a), 1),
        Cmd::Compare(a) => (compare::run(a), 2),
        Cmd::Check(a) => (check::run(a), 1),
        Cmd::Resize(a) => (resize::run(a), 1),
        Cmd::Io(a) => (io::run(a), 1),
        Cmd::Snapshot(a) => (snapshot::run(a), 1),
        Cmd::Bitmap(a) => (bitmap::run(a), 1),
        Cmd::Bench(a) => (bench::run(a), 1),
        Cmd::Measure(a) => (measure::run(a), 1),
        Cmd::Dd(a) => (dd::run(a), 1),
        Cmd::Rebase(a) => (rebase::run(a), 1),
        Cmd::Commit(a) => (commit::run(a), 1),
        Cmd::Amend(a) => (amend::run(a), 1),
        Cmd::Serve(a) => (serve::run(a), 1),
        Cmd::Handoff(a) => (handoff::run(a), 1),
        Cmd::Pool(c) => return virsh_exit(pool::run(c, config_dir.as_ref())),
        Cmd::Vol(c) => return virsh_exit(vol::run(c, config_dir.as_ref())),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vdisk: {}", e.report());
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
                Some(inner) => {
                    let _ = writeln!(std::io::stderr(), "error: {e}\nerror: {}", inner.report());
                }
                None => {
                    let _ = writeln!(std::io::stderr(), "error: {}", e.report());
                }
            }
            std::process::exit(1);
        }
    }
}
