//! Opening an image file and its parent chain.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::Path;

use crate::{probe, vhd, Disk, Error, Format, Image, Result, Storage, MAX_CHAIN_DEPTH};

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
}

/// Opens parents with `std::fs::File`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdParentOpener;

impl ParentOpener for StdParentOpener {
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        let file = File::open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(Box::new((file, false)))
    }
}

/// Opens one image layer of a known format, without its parents.
/// `path` is where the file was found; parent locators are resolved against it.
pub fn open_image(storage: Box<dyn Storage>, format: Format, path: &Path, opts: OpenOptions) -> Result<Box<dyn Image>> {
    if opts.writable && !storage.is_writable() {
        return Err(Error::ReadOnly);
    }
    match format {
        Format::Vhd => Ok(Box::new(vhd::VhdImage::open(storage, path, opts)?)),
        Format::Vhdx => crate::vhdx::open(storage, path, opts),
        Format::Vdi => crate::vdi::open(storage, path, opts),
    }
}

/// Probes `storage`, opens it and every parent it links to.
pub fn open_disk(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions, opener: &dyn ParentOpener) -> Result<Disk> {
    let format = probe(storage.as_ref())?.ok_or(Error::NotAnImage)?;
    let top = open_image(storage, format, path, opts)?;
    let mut seen = HashSet::new();
    seen.insert(top.link_id());
    let mut layers = vec![top];
    while let Some(link) = layers.last().and_then(|l| l.parent_link()).cloned() {
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::corrupt("parent chain", format!("deeper than {MAX_CHAIN_DEPTH}")));
        }
        let parent = open_parent(&link, opener)?;
        if !seen.insert(parent.link_id()) {
            return Err(Error::corrupt("parent chain", format!("loop at {}", link.description)));
        }
        layers.push(parent);
    }
    Disk::new(layers)
}

/// Tries each candidate of `link`; the first image whose identity matches wins.
fn open_parent(link: &crate::ParentLink, opener: &dyn ParentOpener) -> Result<Box<dyn Image>> {
    let mut tried = Vec::new();
    for path in &link.candidates {
        let storage = match opener.open_parent(path) {
            Ok(s) => s,
            Err(e) => {
                tried.push(format!("{} ({e})", path.display()));
                continue;
            }
        };
        let format = match probe(storage.as_ref()) {
            Ok(Some(f)) => f,
            Ok(None) => {
                tried.push(format!("{} (not an image)", path.display()));
                continue;
            }
            Err(e) => {
                tried.push(format!("{} ({e})", path.display()));
                continue;
            }
        };
        let image = open_image(storage, format, path, OpenOptions { writable: false })?;
        if image.link_id() != link.id {
            tried.push(format!("{} (identity differs)", path.display()));
            continue;
        }
        return Ok(image);
    }
    let tried = if tried.is_empty() { "no candidate paths".to_string() } else { tried.join(", ") };
    Err(Error::ParentNotFound(format!("{}; tried: {tried}", link.description)))
}
