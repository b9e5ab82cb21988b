//! Opening an image file and its parent chain.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::lock::{PARENT_BUSY_MESSAGE, WriterLockError};
use crate::{Disk, Error, Format, Image, MAX_CHAIN_DEPTH, Result, Storage, probe, vhd};

/// How to open the top image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing. Parents are always opened read-only.
    pub writable: bool,
}

/// Opens candidate parent files, read-only. The caller decides what may be
/// opened (the library itself never opens a path).
pub trait ParentOpener {
    /// Opens `path` read-only; must refuse anything but a regular file.
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn Storage>>;
    /// The entries of `dir`, as full paths: a VDI names its parent by UUID
    /// only, so its folders are searched. Default: `std::fs::read_dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect()
    }
    /// At most `max` bytes of a small file (a VirtualBox media registry),
    /// read through [`ParentOpener::open_parent`].
    fn read_small_file(&self, path: &Path, max: u64) -> io::Result<Vec<u8>> {
        let storage = self.open_parent(path)?;
        let len = storage.len()?.min(max);
        let mut buf = vec![0u8; len as usize];
        storage.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
    /// Opens an extent file of a multi-file image (VMDK), for writing when
    /// the image is opened for writing; must refuse anything but a regular
    /// file. Default: read-only through [`ParentOpener::open_parent`]; a
    /// writable open is refused.
    fn open_extent(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
        if writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this opener opens extent files read-only",
            ));
        }
        self.open_parent(path)
    }
    /// More folders to search for VDI parents, after the image's own. Default: none.
    fn search_dirs(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Opens parents with `std::fs::File`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdParentOpener;

/// Opens `path` read-only as a parent candidate: a regular file only.
pub(crate) fn open_regular_file(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

impl ParentOpener for StdParentOpener {
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new((open_regular_file(path)?, false)))
    }
    fn open_extent(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(Box::new((file, writable)))
    }
    /// The folders in `LIBVHD_IO_VDI_PATH` (colon-separated), read at each call.
    fn search_dirs(&self) -> Vec<PathBuf> {
        std::env::var_os(crate::vdi::SEARCH_PATH_VAR)
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Opens one image layer of a known format, without its parents.
/// `path` is where the file was found; parent locators are resolved against it.
/// Images made of several files (VMDK descriptors) need [`open_image_with`].
pub fn open_image(
    storage: Box<dyn Storage>,
    format: Format,
    path: &Path,
    opts: OpenOptions,
) -> Result<Box<dyn Image>> {
    open_image_with(storage, format, path, opts, &NoFiles)
}

/// Refuses to open any other file.
struct NoFiles;

impl ParentOpener for NoFiles {
    fn open_parent(&self, _: &Path) -> io::Result<Box<dyn Storage>> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no opener for other files was given (use open_disk or open_image_with)",
        ))
    }
}

/// [`open_image`], opening the other files of the layer (VMDK extents)
/// through `opener`.
pub fn open_image_with(
    storage: Box<dyn Storage>,
    format: Format,
    path: &Path,
    opts: OpenOptions,
    opener: &dyn ParentOpener,
) -> Result<Box<dyn Image>> {
    if opts.writable && !storage.is_writable() {
        return Err(Error::ReadOnly);
    }
    match format {
        Format::Vhd => Ok(Box::new(vhd::VhdImage::open(storage, path, opts)?)),
        Format::Vhdx => crate::vhdx::open(storage, path, opts),
        Format::Vdi => crate::vdi::open(storage, path, opts),
        Format::Raw => Ok(Box::new(crate::RawImage::new(storage, 512)?)),
        Format::Vmdk => crate::vmdk::open(storage, path, opts, opener),
        Format::Qcow2 => crate::qcow2::open(storage, path, opts),
    }
}

/// Probes `storage`, opens it and every parent it links to.
pub fn open_disk(
    storage: Box<dyn Storage>,
    path: &Path,
    opts: OpenOptions,
    opener: &dyn ParentOpener,
) -> Result<Disk> {
    let format = probe(storage.as_ref())?.ok_or(Error::NotAnImage)?;
    let top = open_image_with(storage, format, path, opts, opener)?;
    top.open_companions(path, opener)?;
    let mut seen = HashSet::new();
    seen.insert(top.link_id());
    let mut layers = vec![top];
    let mut path = path.to_path_buf();
    while let Some(link) = layers
        .last()
        .map(|l| l.find_parent(&path, opener))
        .transpose()?
        .flatten()
    {
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::corrupt(
                "parent chain",
                format!("deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        let by_path = layers.last().and_then(|l| l.parent_by_path());
        let (parent, parent_path) = open_parent(&link, by_path, opener)?;
        parent.open_companions(&parent_path, opener)?;
        let child = layers.last().map(|l| (l.format(), l.logical_sector_size()));
        if let Some((format, ss)) = child {
            check_parent(format, ss, parent.as_ref(), &parent_path)?;
        }
        if !seen.insert(parent.link_id()) {
            return Err(Error::corrupt(
                "parent chain",
                format!("loop at {}", link.description),
            ));
        }
        layers.push(parent);
        path = parent_path;
    }
    Disk::new(layers)
}

/// A parent must present the child's sector size (LBAs would not line up),
/// and VHD and VHDX children name parents of their own format (MS specs);
/// VirtualBox lets a VDI child sit on other formats.
fn check_parent(format: Format, sector_size: u32, parent: &dyn Image, path: &Path) -> Result<()> {
    let same_format = matches!(format, Format::Vdi | Format::Qcow2) || parent.format() == format;
    if !same_format || parent.logical_sector_size() != sector_size {
        return Err(Error::ParentMismatch(format!(
            "{}: a {} parent with {}-byte sectors for a {format} child with {sector_size}-byte sectors",
            path.display(),
            parent.format(),
            parent.logical_sector_size()
        )));
    }
    Ok(())
}

/// Tries each candidate of `link`; the first image whose identity matches wins.
/// `by_path` (see [`Image::parent_by_path`]): no identity to match; opened as
/// the recorded format, else probed, else raw (as qemu does).
fn open_parent(
    link: &crate::ParentLink,
    by_path: Option<Option<Format>>,
    opener: &dyn ParentOpener,
) -> Result<(Box<dyn Image>, PathBuf)> {
    let mut tried = Vec::new();
    for path in &link.candidates {
        let storage: Arc<dyn Storage> = match opener.open_parent(path) {
            Ok(s) => Arc::from(s),
            Err(e) => {
                tried.push(format!("{} ({e})", path.display()));
                continue;
            }
        };
        let format = match (by_path, probe(storage.as_ref())) {
            (Some(Some(f)), _) => f,
            (_, Ok(Some(f))) => f,
            (Some(None), Ok(None)) => Format::Raw,
            (_, Ok(None)) => {
                tried.push(format!("{} (not an image)", path.display()));
                continue;
            }
            (_, Err(e)) => {
                tried.push(format!("{} ({e})", path.display()));
                continue;
            }
        };
        let image = open_image_with(
            Box::new(SharedStorage(storage.clone())),
            format,
            path,
            OpenOptions { writable: false },
            opener,
        )?;
        if by_path.is_none()
            && image.link_id() != link.id
            && Some(image.link_id()) != link.alternate_id
        {
            tried.push(format!("{} (identity differs)", path.display()));
            continue;
        }
        // Locked only now that it is known to be the parent: a VDI's parent
        // search opens other images (other VMs' disks) that must not be.
        match storage.lock_as_parent() {
            Ok(()) => {}
            Err(WriterLockError::Busy) => {
                return Err(Error::ParentBusy(format!(
                    "{}: {PARENT_BUSY_MESSAGE}",
                    path.display()
                )));
            }
            // A file system without OFD locks (qemu's locking=auto also
            // goes on without): the child opens, and says what is missing.
            Err(WriterLockError::Io(e)) => log::warn!(
                "{}: cannot lock this parent against writers ({e}); another process \
                 could change it under its child unnoticed",
                path.display()
            ),
        }
        return Ok((image, path.clone()));
    }
    let tried = if tried.is_empty() {
        "no candidate paths".to_string()
    } else {
        tried.join(", ")
    };
    Err(Error::ParentNotFound(format!(
        "{}; tried: {tried}",
        link.description
    )))
}

/// A parent's storage, also held by [`open_parent`] until it knows whether
/// to lock it (the image owns the other reference).
struct SharedStorage(Arc<dyn Storage>);

impl Storage for SharedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn is_writable(&self) -> bool {
        self.0.is_writable()
    }
    fn lock_as_parent(&self) -> std::result::Result<(), WriterLockError> {
        self.0.lock_as_parent()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
}
