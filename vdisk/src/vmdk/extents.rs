//! Opening the extents an extent description names.

use std::path::{Path, PathBuf};

use super::descriptor::{Access, Descriptor, ExtentKind};
use super::sparse::SparseExtent;
use super::{MAX_EXTENTS, OFFSET_MASK, sesparse};
use crate::{Error, OpenOptions, ParentOpener, Result, Storage};

/// What holds an extent's bytes (`file` indexes the image's files).
pub(super) enum Body {
    Flat {
        file: usize,
        start: u64,
    },
    Sparse {
        file: usize,
        sparse: Box<SparseExtent>,
    },
    SeSparse {
        file: usize,
        extent: Box<sesparse::SeSparseExtent>,
    },
    Zero,
    NoAccess,
}

/// One extent: where it sits on the disk and what holds it.
pub(super) struct Extent {
    /// First byte on the disk, and length.
    pub start: u64,
    pub len: u64,
    pub body: Body,
    pub writable: bool,
    /// The file name (or type) for messages.
    pub name: String,
}

/// An extent that cannot be opened, named.
pub(super) fn open_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("VMDK extent {}: {e}", path.display()),
    ))
}

/// Whether a sparse extent can be written here; if not, why (into `why`).
pub(super) fn sparse_writable(sp: &SparseExtent, why: &mut Option<String>) -> bool {
    let h = &sp.header;
    let reason = if h.compressed() {
        Some("stream-optimized (compressed) VMDK extents are read-only here")
    } else if h.cowd {
        Some("VMFSSPARSE (COWD) extents are read-only here")
    } else if h.version == 3 {
        Some("version-3 sparse extents (changed block tracking) are read-only, as in qemu")
    } else {
        None
    };
    if let Some(r) = reason {
        why.get_or_insert_with(|| r.to_string());
    }
    reason.is_none()
}

/// Sectors as bytes, below the 256 TiB an address can hold.
pub(super) fn checked_bytes(sectors: u64) -> Result<u64> {
    sectors
        .checked_mul(512)
        .filter(|&b| b <= OFFSET_MASK)
        .ok_or_else(|| Error::corrupt("VMDK extent", format!("{sectors} sectors is too large")))
}

/// `name` as written in a descriptor, against the descriptor's folder.
pub(super) fn resolve(path: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    path.parent().unwrap_or(Path::new("")).join(p)
}

/// Opens every extent line of `d` through `opener`, relative to `path`;
/// `read_only` gets the reason the image must stay read-only, if any.
pub(super) fn open_extents(
    d: &Descriptor,
    path: &Path,
    opts: OpenOptions,
    opener: &dyn ParentOpener,
    files: &mut Vec<Box<dyn Storage>>,
    read_only: &mut Option<String>,
) -> Result<Vec<Extent>> {
    if d.extents.len() > MAX_EXTENTS {
        return Err(Error::unsupported(format!(
            "{} VMDK extents (at most {MAX_EXTENTS})",
            d.extents.len()
        )));
    }
    let mut out = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    for line in &d.extents {
        let len = checked_bytes(line.sectors)?;
        let name = line.file.clone().unwrap_or_else(|| line.type_name.clone());
        let want_write = opts.writable && line.access == Access::ReadWrite;
        let open_file = |files: &mut Vec<Box<dyn Storage>>| -> Result<usize> {
            let p = resolve(path, line.file.as_deref().unwrap_or_default());
            let s = opener
                .open_extent(&p, want_write)
                .map_err(|e| open_err(&p, e))?;
            files.push(s);
            Ok(files.len() - 1)
        };
        let (body, writable) = match (line.access, line.kind) {
            (Access::NoAccess, _) => (Body::NoAccess, false),
            (_, ExtentKind::Zero) => (Body::Zero, false),
            (_, ExtentKind::SeSparse) => {
                let file = open_file(files)?;
                let extent = sesparse::SeSparseExtent::open(files[file].as_ref())?;
                if extent.capacity < line.sectors {
                    log::warn!(
                        "{}: seSparse extent {name} holds {} sectors of {}; the rest reads as unallocated",
                        path.display(),
                        extent.capacity,
                        line.sectors
                    );
                }
                if want_write {
                    read_only.get_or_insert_with(|| {
                        "seSparse extents are read-only here (as in qemu)".to_string()
                    });
                }
                (
                    Body::SeSparse {
                        file,
                        extent: Box::new(extent),
                    },
                    false,
                )
            }
            (_, ExtentKind::Flat) => {
                let file = open_file(files)?;
                let start = checked_bytes(line.offset)?;
                let end = start.checked_add(len).filter(|&e| e <= OFFSET_MASK);
                let flen = files[file].len()?;
                if end.is_none_or(|e| e > flen) {
                    return Err(Error::corrupt(
                        "VMDK flat extent",
                        format!("{name}: {flen} bytes, the extent needs {len} from {start}"),
                    ));
                }
                (Body::Flat { file, start }, want_write)
            }
            (_, ExtentKind::Sparse) => {
                let file = open_file(files)?;
                let f = files[file].as_ref();
                let mut head = [0u8; 512];
                f.read_exact_at(&mut head, 0)?;
                let sparse = SparseExtent::open(f, &head)?;
                if sparse.header.capacity < line.sectors {
                    log::warn!(
                        "{}: sparse extent {name} holds {} sectors of {}; the rest reads as unallocated",
                        path.display(),
                        sparse.header.capacity,
                        line.sectors
                    );
                }
                let w = want_write && sparse_writable(&sparse, read_only);
                (
                    Body::Sparse {
                        file,
                        sparse: Box::new(sparse),
                    },
                    w,
                )
            }
        };
        out.push(Extent {
            start,
            len,
            body,
            writable,
            name,
        });
        start = start
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("VMDK descriptor", "extents too large"))?;
    }
    Ok(out)
}
