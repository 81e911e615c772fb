//! The one public error type.
//!
//! An [`Error`] carries an [`ErrorKind`] a caller can match on, a message that
//! names what was wrong (lowercase, no trailing period), optional context (the
//! path, the format, the on-disk field, a guest or host offset) and an optional
//! source error. `Display` shows the context, what was being done and the
//! message on one line, one level only; the cause chain is reached through
//! [`std::error::Error::source`], and [`Error::report`] prints it all once.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is.
///
/// New kinds may be added in minor releases, so a `match` needs a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The host I/O layer failed (the source holds the `std::io::Error`).
    Io,
    /// The file is not a valid image of the expected format (bad magic,
    /// impossible header field, table outside the file, ...).
    InvalidImage,
    /// The image's metadata is inconsistent in a way that was detected while
    /// using it (a mapping pointing into metadata, an invalid L2 entry, ...).
    Corrupt,
    /// A valid image feature or an operation that vdisk (or this device) does
    /// not implement.
    Unsupported,
    /// A guest offset or length outside the device.
    OutOfBounds,
    /// A write was attempted on a device opened read-only.
    ReadOnly,
    /// A count or size from the image or the caller is beyond a documented limit.
    LimitExceeded,
    /// The caller passed an invalid argument or option.
    InvalidArgument,
    /// Encryption: a key is needed, or the cipher failed.
    Crypto,
    /// A file, snapshot, pool or volume does not exist.
    NotFound,
    /// A file, snapshot, pool or volume already exists.
    AlreadyExists,
    /// The image is in use by another process (it holds a conflicting lock).
    Busy,
    /// A bug in vdisk: please report it.
    Internal,
}

impl ErrorKind {
    /// A short lowercase name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "i/o error",
            ErrorKind::InvalidImage => "invalid image",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::LimitExceeded => "limit exceeded",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Crypto => "encryption",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Busy => "in use",
            ErrorKind::Internal => "internal error (please report)",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error type of every fallible vdisk operation.
pub struct Error {
    repr: Box<Repr>,
}

struct Repr {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    format: Option<&'static str>,
    field: Option<&'static str>,
    offset: Option<u64>,
    /// What was being done, outermost first (`opening backing file 'b'`).
    context: Vec<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with a message naming what was wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            repr: Box::new(Repr {
                kind,
                message: message.into(),
                path: None,
                format: None,
                field: None,
                offset: None,
                context: Vec::new(),
                source: None,
            }),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidImage`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, message)
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::LimitExceeded`].
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An [`ErrorKind::OutOfBounds`] error for a guest request.
    pub fn out_of_bounds(offset: u64, len: u64, size: u64) -> Self {
        Self::new(
            ErrorKind::OutOfBounds,
            format!("request at offset {offset} length {len} is beyond the device size {size}"),
        )
        .with_offset(offset)
    }

    /// An [`ErrorKind::ReadOnly`] error.
    pub fn read_only(what: &str) -> Self {
        Self::new(ErrorKind::ReadOnly, format!("{what}: the device is read-only"))
    }

    /// Wraps an I/O error with a message saying what was being done.
    pub fn io(message: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        Self::new(kind, message).with_source(source)
    }

    /// Adds the path of the file concerned (kept if one is already set).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.repr.path.is_none() {
            self.repr.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Adds the format concerned (kept if one is already set).
    pub fn with_format(mut self, format: &'static str) -> Self {
        if self.repr.format.is_none() {
            self.repr.format = Some(format);
        }
        self
    }

    /// Adds the on-disk field or option concerned.
    pub fn with_field(mut self, field: &'static str) -> Self {
        if self.repr.field.is_none() {
            self.repr.field = Some(field);
        }
        self
    }

    /// Adds the (guest or host, as the message says) offset concerned.
    pub fn with_offset(mut self, offset: u64) -> Self {
        if self.repr.offset.is_none() {
            self.repr.offset = Some(offset);
        }
        self
    }

    /// Sets the underlying cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.repr.source = Some(source.into());
        self
    }

    /// Adds what was being done; `Display` shows it before the message,
    /// which itself stays as it was ([`message`](Self::message)).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.repr.context.insert(0, what.to_string());
        self
    }

    /// What was being done when the error happened, outermost first.
    pub fn contexts(&self) -> &[String] {
        &self.repr.context
    }

    /// The error and every cause under it on one line (`Display` shows one
    /// level, as the `Error` trait asks; this is for a final report such as
    /// the CLI's).
    pub fn report(&self) -> String {
        use std::error::Error as _;
        let mut out = self.to_string();
        let mut cur = self.source();
        while let Some(c) = cur {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cur = c.source();
        }
        out
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.repr.kind
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.repr.message
    }

    /// The path of the file concerned, if known.
    pub fn path(&self) -> Option<&Path> {
        self.repr.path.as_deref()
    }

    /// The image format concerned, if known.
    pub fn format(&self) -> Option<&'static str> {
        self.repr.format
    }

    /// The on-disk field or option concerned, if known.
    pub fn field(&self) -> Option<&'static str> {
        self.repr.field
    }

    /// The offset concerned, if known.
    pub fn offset(&self) -> Option<u64> {
        self.repr.offset
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.repr;
        if let Some(path) = &r.path {
            write!(f, "{}: ", path.display())?;
        }
        if let Some(format) = r.format {
            write!(f, "{format}: ")?;
        }
        for c in &r.context {
            write!(f, "{c}: ")?;
        }
        f.write_str(&r.message)?;
        let mut parts = Vec::new();
        if let Some(field) = r.field {
            parts.push(format!("field {field}"));
        }
        if let Some(offset) = r.offset {
            parts.push(format!("offset {offset:#x}"));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        // The cause is not repeated here: `source()` gives it, and
        // `report()` prints the whole chain once.
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.repr;
        let mut d = f.debug_struct("Error");
        d.field("kind", &r.kind).field("message", &r.message);
        if !r.context.is_empty() {
            d.field("context", &r.context);
        }
        if let Some(p) = &r.path {
            d.field("path", p);
        }
        if let Some(v) = r.format {
            d.field("format", &v);
        }
        if let Some(v) = r.field {
            d.field("field", &v);
        }
        if let Some(v) = r.offset {
            d.field("offset", &format_args!("{v:#x}"));
        }
        if let Some(s) = &r.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.repr.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::Io => {
                if let Some(src) = e.repr.source.as_deref() {
                    if let Some(ioe) = src.downcast_ref::<io::Error>() {
                        ioe.kind()
                    } else {
                        io::ErrorKind::Other
                    }
                } else {
                    io::ErrorKind::Other
                }
            }
            ErrorKind::InvalidImage | ErrorKind::Corrupt => io::ErrorKind::InvalidData,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument | ErrorKind::LimitExceeded => {
                io::ErrorKind::InvalidInput
            }
            ErrorKind::ReadOnly => io::ErrorKind::PermissionDenied,
            ErrorKind::Crypto => io::ErrorKind::PermissionDenied,
            ErrorKind::NotFound => io::ErrorKind::NotFound,
            ErrorKind::AlreadyExists => io::ErrorKind::AlreadyExists,
            ErrorKind::Busy => io::ErrorKind::ResourceBusy,
            ErrorKind::Internal => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::io("i/o error", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_context() {
        let e = Error::invalid("cluster_bits 8 is outside 9..=21")
            .with_field("cluster_bits")
            .with_offset(20)
            .with_format("qcow2")
            .with_path("/tmp/x.qcow2");
        let s = e.to_string();
        assert_eq!(s, "/tmp/x.qcow2: qcow2: cluster_bits 8 is outside 9..=21 (field cluster_bits, offset 0x14)");
        assert_eq!(e.kind(), ErrorKind::InvalidImage);
    }

    #[test]
    fn io_error_mapping() {
        let e = Error::io("reading header", io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
        let ioe: io::Error = e.into();
        assert_eq!(ioe.kind(), io::ErrorKind::UnexpectedEof);
        let ioe: io::Error = Error::read_only("write").into();
        assert_eq!(ioe.kind(), io::ErrorKind::PermissionDenied);
        let e = Error::io("open", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn source_chain() {
        use std::error::Error as _;
        let e = Error::io("x", io::Error::other("inner"));
        assert_eq!(e.source().unwrap().to_string(), "inner");
        // One level in Display, the cause once in the report.
        assert_eq!(e.to_string(), "x");
        assert_eq!(e.report(), "x: inner");
    }

    #[test]
    fn context_keeps_the_message() {
        let e = Error::invalid("bad magic").context("opening backing file 'b.qcow2'").context("creating 'top.qcow2'");
        assert_eq!(e.message(), "bad magic");
        assert_eq!(e.to_string(), "creating 'top.qcow2': opening backing file 'b.qcow2': bad magic");
        assert_eq!(e.contexts().len(), 2);
    }
}
