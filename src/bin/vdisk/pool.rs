//! `vdisk pool-*`: storage pools with virsh's verbs, arguments and output.

use std::path::PathBuf;

use clap::Subcommand;
use vdisk::pool::units::pretty;
use vdisk::pool::{Pool, PoolDef, PoolState, Registry, RegistryPaths};
use vdisk::{Error, Result};

/// Opens the registry: `--config-dir`, else `VDISK_CONFIG_DIR`, else the
/// XDG default.
pub fn registry(config_dir: Option<&PathBuf>) -> Result<Registry> {
    let paths = match config_dir {
        Some(d) => RegistryPaths::new(d),
        None => RegistryPaths::from_env()?,
    };
    Registry::open(paths)
}

/// A virsh-style table: a leading space per cell, columns padded to the
/// widest cell plus two spaces, a dashed line of (width + 3) per column,
/// and a blank line after.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let width = |s: &str| s.chars().count();
    let mut w: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(width(c));
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push(' ');
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w[i] - width(c) + 2));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    out.push_str(&"-".repeat(w.iter().map(|x| x + 3).sum()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out.push('\n');
    out
}

/// Writes to standard output; a closed pipe (`vdisk vol-list | head`)
/// drops the rest quietly instead of panicking.
pub fn emit(text: &str) {
    out!("{text}");
}

/// Replaces control characters the way virsh's tables do (`\x1b`).
pub fn safe(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        if c.is_control() {
            o.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            o.push(c);
        }
    }
    o
}

/// Pool commands.
#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Define a pool from arguments (virsh pool-define-as).
    #[command(name = "pool-define-as")]
    DefineAs {
        /// Pool name.
        name: String,
        /// Pool type: dir, fs or netfs.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Target directory.
        #[arg(long)]
        target: Option<PathBuf>,
        /// netfs: the server.
        #[arg(long = "source-host")]
        source_host: Option<String>,
        /// netfs: the exported directory.
        #[arg(long = "source-path")]
        source_path: Option<String>,
        /// fs: the device.
        #[arg(long = "source-dev")]
        source_dev: Option<String>,
        /// fs/netfs: the filesystem type.
        #[arg(long = "source-format")]
        source_format: Option<String>,
        /// Print the XML instead of defining.
        #[arg(long = "print-xml")]
        print_xml: bool,
    },
    /// Define a pool from an XML file (virsh pool-define).
    #[command(name = "pool-define")]
    Define {
        /// The pool XML file.
        file: PathBuf,
    },
    /// List pools (virsh pool-list).
    #[command(name = "pool-list")]
    List {
        /// Inactive pools too.
        #[arg(long)]
        all: bool,
        /// Only inactive pools.
        #[arg(long)]
        inactive: bool,
        /// State, persistence and sizes.
        #[arg(long)]
        details: bool,
        /// Only names.
        #[arg(long)]
        name: bool,
    },
    /// Pool state and sizes (virsh pool-info).
    #[command(name = "pool-info")]
    Info {
        /// Pool name or UUID.
        pool: String,
        /// Sizes in bytes.
        #[arg(long)]
        bytes: bool,
    },
    /// Create the target directory (virsh pool-build).
    #[command(name = "pool-build")]
    Build {
        /// Pool name or UUID.
        pool: String,
    },
    /// Start a pool (virsh pool-start).
    #[command(name = "pool-start")]
    Start {
        /// Pool name or UUID.
        pool: String,
        /// Build it first.
        #[arg(long)]
        build: bool,
    },
    /// Rescan a pool's volumes (virsh pool-refresh).
    #[command(name = "pool-refresh")]
    Refresh {
        /// Pool name or UUID.
        pool: String,
    },
    /// Stop a pool; data is untouched (virsh pool-destroy).
    #[command(name = "pool-destroy")]
    Destroy {
        /// Pool name or UUID.
        pool: String,
    },
    /// Remove an empty target directory (virsh pool-delete).
    #[command(name = "pool-delete")]
    Delete {
        /// Pool name or UUID.
        pool: String,
    },
    /// Remove a pool definition (virsh pool-undefine).
    #[command(name = "pool-undefine")]
    Undefine {
        /// Pool name or UUID.
        pool: String,
    },
    /// Start a pool after boot, or not (virsh pool-autostart).
    #[command(name = "pool-autostart")]
    Autostart {
        /// Pool name or UUID.
        pool: String,
        /// Turn autostart off.
        #[arg(long)]
        disable: bool,
    },
    /// Print the pool XML (virsh pool-dumpxml).
    #[command(name = "pool-dumpxml")]
    DumpXml {
        /// Pool name or UUID.
        pool: String,
        /// The definition without live figures.
        #[arg(long)]
        inactive: bool,
    },
}

/// Wraps an error as virsh reports it: what failed, then why (printed as
/// two `error:` lines by main).
pub fn fail(what: String) -> impl FnOnce(Error) -> Error {
    move |e| Error::new(e.kind(), what).with_source(e)
}

fn define_as(
    name: &str,
    kind: &str,
    target: Option<&PathBuf>,
    host: Option<&String>,
    path: Option<&String>,
    dev: Option<&String>,
    format: Option<&String>,
) -> Result<PoolDef> {
    use vdisk::pool::xml::Element;
    let target = target.ok_or_else(|| Error::invalid_argument("--target is required"))?;
    let target = if target.is_absolute() {
        target.clone()
    } else {
        std::env::current_dir().map_err(|e| Error::io("cannot read the current directory", e))?.join(target)
    };
    let mut source = Element::new("source");
    if let Some(h) = host {
        source.push(Element::new("host").with_attr("name", h.as_str()));
    }
    if let Some(d) = dev {
        source.push(Element::new("device").with_attr("path", d.as_str()));
    }
    if let Some(p) = path {
        source.push(Element::new("dir").with_attr("path", p.as_str()));
    }
    if let Some(f) = format {
        source.push(Element::new("format").with_attr("type", f.as_str()));
    }
    let doc = Element::new("pool")
        .with_attr("type", kind)
        .with_child(Element::new("name").with_text(name))
        .with_child(source)
        .with_child(
            Element::new("target").with_child(Element::new("path").with_text(target.to_string_lossy().into_owned())),
        );
    PoolDef::from_xml(&doc.to_xml(), "pool-define-as")
}

fn state_word(p: &Pool, details: bool) -> Result<String> {
    let info = p.info()?;
    Ok(match (info.state, details) {
        (PoolState::Inactive, _) => "inactive".into(),
        (PoolState::Running, false) => "active".into(),
        (s, _) => s.name().into(),
    })
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Runs a pool command.
pub fn run(cmd: &PoolCmd, config_dir: Option<&PathBuf>) -> Result<i32> {
    let reg = registry(config_dir)?;
    match cmd {
        PoolCmd::DefineAs { name, kind, target, source_host, source_path, source_dev, source_format, print_xml } => {
            let def = define_as(
                name,
                kind,
                target.as_ref(),
                source_host.as_ref(),
                source_path.as_ref(),
                source_dev.as_ref(),
                source_format.as_ref(),
            )
            .map_err(fail(format!("Failed to define pool {name}")))?;
            if *print_xml {
                out!("{}", def.to_xml());
                return Ok(0);
            }
            reg.define(def).map_err(fail(format!("Failed to define pool {name}")))?;
            outln!("Pool {name} defined\n");
        }
        PoolCmd::Define { file } => {
            let what = format!("Failed to define pool from {}", file.display());
            let md = std::fs::metadata(file)
                .map_err(|e| Error::io("cannot read", e).with_path(file))
                .map_err(fail(what.clone()))?;
            if md.len() > vdisk::pool::xml::MAX_XML_BYTES as u64 {
                return Err(Error::limit("the file is larger than 1 MiB").with_path(file));
            }
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::io("cannot read", e).with_path(file))
                .map_err(fail(what.clone()))?;
            let def = PoolDef::from_xml(&text, &file.display().to_string()).map_err(fail(what.clone()))?;
            let p = reg.define(def).map_err(fail(what))?;
            outln!("Pool {} defined from {}\n", p.name(), file.display());
        }
        PoolCmd::List { all, inactive, details, name } => {
            let list = reg.list()?;
            for e in &list.errors {
                eprintln!("warning: {}", e.report());
            }
            let pools: Vec<&Pool> = list
                .pools
                .iter()
                .filter(|p| {
                    let a = p.is_active();
                    *all || (*inactive && !a) || (!*inactive && a)
                })
                .collect();
            if *name {
                for p in pools {
                    outln!("{}", p.name());
                }
                outln!();
                return Ok(0);
            }
            let mut rows = Vec::new();
            for p in &pools {
                let mut r = vec![safe(p.name()), state_word(p, *details)?, yes_no(p.autostart())];
                if *details {
                    r.push(yes_no(p.is_persistent()));
                    let info = p.info()?;
                    if info.state == PoolState::Running {
                        r.extend([pretty(info.capacity), pretty(info.allocation), pretty(info.available)]);
                    } else {
                        r.extend(["-".into(), "-".into(), "-".into()]);
                    }
                }
                rows.push(r);
            }
            let header: &[&str] = if *details {
                &["Name", "State", "Autostart", "Persistent", "Capacity", "Allocation", "Available"]
            } else {
                &["Name", "State", "Autostart"]
            };
            emit(&table(header, &rows));
        }
        PoolCmd::Info { pool, bytes } => {
            let p = reg.pool(pool)?;
            let info = p.info()?;
            outln!("{:<16}{}", "Name:", p.name());
            outln!("{:<16}{}", "UUID:", p.uuid());
            outln!("{:<16}{}", "State:", info.state.name());
            outln!("{:<16}{}", "Persistent:", yes_no(p.is_persistent()));
            outln!("{:<16}{}", "Autostart:", yes_no(p.autostart()));
            if info.state == PoolState::Running {
                let f = |v: u64| if *bytes { v.to_string() } else { pretty(v) };
                outln!("{:<16}{}", "Capacity:", f(info.capacity));
                outln!("{:<16}{}", "Allocation:", f(info.allocation));
                outln!("{:<16}{}", "Available:", f(info.available));
            }
            outln!();
        }
        PoolCmd::Build { pool } => {
            let p = reg.pool(pool)?;
            p.build().map_err(fail(format!("Failed to build pool {pool}")))?;
            outln!("Pool {} built\n", p.name());
        }
        PoolCmd::Start { pool, build } => {
            let p = reg.pool(pool)?;
            let what = format!("Failed to start pool {pool}");
            if *build {
                p.build().map_err(fail(what.clone()))?;
            }
            p.start().map_err(fail(what))?;
            outln!("Pool {} started\n", p.name());
        }
        PoolCmd::Refresh { pool } => {
            let p = reg.pool(pool)?;
            let what = format!("Failed to refresh pool {pool}");
            p.cleanup(vdisk::pool::STALE_TEMP_AGE).map_err(fail(what.clone()))?;
            p.refresh().map_err(fail(what))?;
            outln!("Pool {} refreshed\n", p.name());
        }
        PoolCmd::Destroy { pool } => {
            let p = reg.pool(pool)?;
            p.destroy().map_err(fail(format!("Failed to destroy pool {pool}")))?;
            outln!("Pool {} destroyed\n", p.name());
        }
        PoolCmd::Delete { pool } => {
            let p = reg.pool(pool)?;
            p.delete().map_err(fail(format!("Failed to delete pool {pool}")))?;
            outln!("Pool {} deleted\n", p.name());
        }
        PoolCmd::Undefine { pool } => {
            let p = reg.pool(pool)?;
            p.undefine().map_err(fail(format!("Failed to undefine pool {pool}")))?;
            outln!("Pool {} has been undefined\n", p.name());
        }
        PoolCmd::Autostart { pool, disable } => {
            let p = reg.pool(pool)?;
            if *disable {
                p.set_autostart(false).map_err(fail(format!("failed to unmark pool {pool} as autostarted")))?;
                outln!("Pool {} unmarked as autostarted\n", p.name());
            } else {
                p.set_autostart(true).map_err(fail(format!("failed to mark pool {pool} as autostarted")))?;
                outln!("Pool {} marked as autostarted\n", p.name());
            }
        }
        PoolCmd::DumpXml { pool, inactive } => {
            let p = reg.pool(pool)?;
            if *inactive {
                emit(&p.def().to_xml());
            } else {
                emit(&p.xml_desc()?);
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_like_virsh() {
        // virsh -c test:///default pool-list --all (libvirt 9.0).
        let t = table(
            &["Name", "State", "Autostart"],
            &[
                vec!["default-pool".into(), "active".into(), "no".into()],
                vec!["p2".into(), "inactive".into(), "no".into()],
            ],
        );
        assert_eq!(
            t,
            " Name           State      Autostart\n--------------------------------------\n default-pool   active     no\n p2             inactive   no\n\n"
        );
        assert_eq!(safe("a\x1bb"), "a\\x1bb");
    }
}
