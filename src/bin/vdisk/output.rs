//! Standard output that a closed pipe cannot break: `vdisk info | head -1`
//! must neither panic nor stop a command half-way (an image being written
//! is still closed cleanly). Once stdout is gone, output is dropped and the
//! command finishes its work and exits as it would have.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Standard output failed (closed pipe or another error): print no more.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes formatted text to standard output, unless it is gone.
pub fn write(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = writeln!(std::io::stderr(), "vdisk: cannot write to standard output: {e}");
        }
    }
}

/// Whether output was lost because standard output failed.
#[allow(dead_code)]
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Whether `e` (or its cause) is a write into a closed pipe.
pub fn is_broken_pipe(e: &vdisk::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        cur = c.source();
    }
    false
}
