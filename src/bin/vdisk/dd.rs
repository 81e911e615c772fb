//! `vdisk dd`: `qemu-img dd` — copy `count` blocks of `bs` bytes from an
//! image into a new one, starting `skip` blocks in.
//!
//! Operands are `bs=`, `count=`, `skip=`, `if=`, `of=` as qemu-img takes
//! them (sizes with qemu's suffixes). As in qemu-img, `count` counts from
//! the start of the input, not from `skip`, and the new image's size is
//! what lies between the two; every block is written (no holes kept).

use std::sync::Arc;

use vdisk::{BlockDevice, Error, FileStorage, Format, Raw, Result};

use crate::common::{open_arg_shared, parse_size, CreatedFiles};
use crate::secrets::SecretArgs;

/// Arguments of `vdisk dd`.
#[derive(clap::Args, Debug)]
pub struct DdArgs {
    /// Input format (probed when absent).
    #[arg(short = 'f')]
    pub src_fmt: Option<String>,
    /// Output format (raw or qcow2; vmdk too).
    #[arg(short = 'O', default_value = "raw")]
    pub out_fmt: String,
    /// Open the input even if another process holds it.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Operands: `if=INPUT of=OUTPUT [bs=SIZE] [count=N] [skip=N]`.
    pub operands: Vec<String>,
}

/// The operands, checked as qemu-img checks them.
#[derive(Debug, PartialEq, Eq)]
struct Operands {
    input: String,
    output: String,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

fn operands(words: &[String]) -> Result<Operands> {
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512u64, None, 0u64);
    for w in words {
        let (k, v) = w.split_once('=').ok_or_else(|| {
            Error::invalid_argument(format!("unrecognized operand '{w}' (if=, of=, bs=, count=, skip=)"))
        })?;
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                bs = parse_size(v)?;
                if bs == 0 || bs > i32::MAX as u64 {
                    return Err(Error::invalid_argument(format!(
                        "invalid bs '{v}': must be between 1 and {}",
                        i32::MAX
                    )));
                }
            }
            "count" => count = Some(parse_size(v)?),
            "skip" => skip = parse_size(v)?,
            other => return Err(Error::invalid_argument(format!("unrecognized operand '{other}'"))),
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(Operands { input, output, bs, count, skip }),
        _ => Err(Error::invalid_argument("must specify both input and output files (if=, of=)")),
    }
}

/// Runs `vdisk dd`.
pub fn run(a: &DdArgs) -> Result<i32> {
    let op = operands(&a.operands)?;
    let (_, src) = open_arg_shared(&a.secrets, &op.input, a.src_fmt.as_deref(), true, true, a.force_share)?;
    let mut size = src.size();
    if let Some(c) = op.count {
        if let Some(n) = c.checked_mul(op.bs).filter(|&n| n < size) {
            size = n;
        }
    }
    let start = op
        .skip
        .checked_mul(op.bs)
        .filter(|&s| s <= size)
        .ok_or_else(|| Error::invalid_argument(format!("{}: cannot skip to specified offset", op.input)))?;
    let out_size = size - start;
    let dst_path = std::path::PathBuf::from(&op.output);
    let created = CreatedFiles::before(&dst_path);
    copy(&src, &dst_path, Format::from_name(&a.out_fmt)?, start, out_size, op.bs)
        .inspect_err(|_| created.remove_new())?;
    Ok(0)
}

fn copy(src: &dyn BlockDevice, dst_path: &std::path::Path, fmt: Format, start: u64, len: u64, bs: u64) -> Result<()> {
    // Image sizes are whole sectors, as qemu-img creates them.
    let size = len.div_ceil(512) * 512;
    let dst: Box<dyn BlockDevice> = match fmt {
        Format::Raw => Box::new(Raw::create(Arc::new(FileStorage::create(dst_path)?), size)?),
        Format::Qcow2 => {
            Box::new(vdisk::Qcow2::create_file(dst_path, &vdisk::qcow2::create::CreateOptions::new(size))?)
        }
        Format::Vmdk => Box::new(vdisk::Vmdk::create(dst_path, size, &vdisk::VmdkCreateOptions::default())?),
        Format::Vpc | Format::Vdi => crate::vpcvdi::create(fmt, dst_path, size, &[])?,
        Format::Vhdx => Box::new(vdisk::Vhdx::create(dst_path, size, &vdisk::VhdxCreateOptions::default())?),
        Format::Luks => return Err(Error::unsupported("dd cannot create luks output (it needs a passphrase)")),
    };
    // Blocks of `bs`, read and written in pieces of at most 4 MiB.
    let chunk = bs.min(4 << 20);
    let mut buf = vdisk::storage::Aligned::new(chunk as usize);
    let dst_len = dst.size().min(len);
    let mut done = 0u64;
    while done < dst_len {
        let n = chunk.min(dst_len - done);
        let b = &mut buf.as_mut_slice()[..n as usize];
        src.read_at(b, start + done)?;
        dst.write_at(b, done)?;
        done += n;
    }
    dst.make_clean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn operands_as_qemu_img_reads_them() {
        let o = operands(&w(&["if=a", "of=b", "bs=64k", "count=10", "skip=2"])).unwrap();
        assert_eq!(o, Operands { input: "a".into(), output: "b".into(), bs: 65536, count: Some(10), skip: 2 });
        assert!(operands(&w(&["if=a"])).is_err());
        assert!(operands(&w(&["if=a", "of=b", "bs=0"])).is_err());
        assert!(operands(&w(&["if=a", "of=b", "conv=notrunc"])).is_err());
    }
}
