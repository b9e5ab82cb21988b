//! The one error type of `vdisk`.

use std::fmt;
use std::io;

pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while opening or using a virtual disk.
///
/// The preload library maps each variant to one errno value; tools print the
/// `Display` text.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The container file could not be read or written.
    Io(io::Error),
    /// The file is not an image of any supported format.
    NotAnImage,
    /// A structure in the file is invalid (bad signature, offset out of range, ...).
    Corrupt { what: &'static str, detail: String },
    /// A valid feature that this library does not implement.
    Unsupported(String),
    /// A write to an image (or parent) opened read-only.
    ReadOnly,
    /// An access beyond the end of the virtual disk.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The image cannot grow any further (format limit reached).
    NoSpace(String),
    /// The parent of a differencing image could not be found.
    ParentNotFound(String),
    /// A parent candidate exists but its identity does not match the child's link.
    ParentMismatch(String),
    /// The parent is being written by another process (its locks say so).
    ParentBusy(String),
}

impl Error {
    pub fn corrupt(what: &'static str, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            what,
            detail: detail.into(),
        }
    }
    pub fn unsupported(detail: impl Into<String>) -> Error {
        Error::Unsupported(detail.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::NotAnImage => write!(f, "not a VHD, VHDX, VDI or VMDK image"),
            Error::Corrupt { what, detail } => write!(f, "corrupt {what}: {detail}"),
            Error::Unsupported(d) => write!(f, "unsupported: {d}"),
            Error::ReadOnly => write!(f, "image is read-only"),
            Error::OutOfRange { offset, len, size } => {
                write!(
                    f,
                    "access of {len} bytes at {offset} is beyond the disk size {size}"
                )
            }
            Error::NoSpace(d) => write!(f, "no space: {d}"),
            Error::ParentNotFound(d) => write!(f, "parent image not found: {d}"),
            Error::ParentMismatch(d) => write!(f, "parent image does not match: {d}"),
            Error::ParentBusy(d) => write!(f, "parent image in use: {d}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            Error::NotAnImage | Error::Corrupt { .. } => {
                io::Error::new(io::ErrorKind::InvalidData, e)
            }
            Error::Unsupported(_) => io::Error::new(io::ErrorKind::Unsupported, e),
            Error::ReadOnly => io::Error::new(io::ErrorKind::ReadOnlyFilesystem, e),
            Error::OutOfRange { .. } => io::Error::new(io::ErrorKind::InvalidInput, e),
            Error::NoSpace(_) => io::Error::new(io::ErrorKind::StorageFull, e),
            Error::ParentNotFound(_) => io::Error::new(io::ErrorKind::NotFound, e),
            Error::ParentMismatch(_) => io::Error::new(io::ErrorKind::InvalidData, e),
            Error::ParentBusy(_) => io::Error::new(io::ErrorKind::ResourceBusy, e),
        }
    }
}
