//! Opening an image and its parents layer by layer, keeping each layer's path
//! and format details (which `vdisk::open_disk` does not report).
//!
//! The parent search is `vdisk::open_disk`'s: each layer's
//! `Image::find_parent` candidates through `StdParentOpener`, the first whose
//! identity matches.

use std::path::{Path, PathBuf};

use vdisk::vdi::VdiImage;
use vdisk::vhd::VhdImage;
use vdisk::vhdx::VhdxImage;
use vdisk::{Format, Image, OpenOptions, StdParentOpener, Storage};

use crate::lock::ReadLocks;
use crate::{EXIT_ERROR, Failure, fail};

/// One opened layer.
pub struct Layer {
    pub path: PathBuf,
    pub format: Format,
    /// fixed, dynamic, differencing (VDI: also undo).
    pub kind: String,
    pub block_size: Option<u64>,
    /// The identity children link to, as the format prints it.
    pub id: String,
    /// Size of the file.
    pub file_len: u64,
    pub image: Box<dyn Image>,
}

/// Why a chain did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The file cannot be opened or is not an image: nothing to check.
    Unreadable(String),
    /// An image whose structure (or chain) is broken.
    Broken(String),
    /// Another process writes the file (its reader locks were refused).
    Locked(String),
}

impl OpenError {
    pub fn into_failure(self, broken_status: u8) -> Failure {
        match self {
            OpenError::Unreadable(m) | OpenError::Locked(m) => fail(EXIT_ERROR, m),
            OpenError::Broken(m) => fail(broken_status, m),
        }
    }
    fn from_vdisk(path: &Path, e: vdisk::Error) -> OpenError {
        let m = format!("{}: {e}", path.display());
        match e {
            vdisk::Error::Io(_) | vdisk::Error::NotAnImage => OpenError::Unreadable(m),
            _ => OpenError::Broken(m),
        }
    }
}

impl From<OpenError> for Failure {
    fn from(e: OpenError) -> Failure {
        e.into_failure(EXIT_ERROR)
    }
}

/// Text of a 16-byte identity as the format shows it.
pub fn id_text(format: Format, id: &[u8; 16]) -> String {
    match format {
        Format::Vhdx => vdisk::vhdx::guid::Guid(*id).to_string(),
        Format::Vdi => vdisk::vdi::header::uuid_text(id),
        Format::Raw | Format::Qcow2 => String::from("-"),
        Format::Vmdk => format!(
            "CID {:08x}",
            u32::from_le_bytes([id[4], id[5], id[6], id[7]])
        ),
        // VHD ids are opaque bytes; QEMU and libvhdi print them in byte order.
        Format::Vhd => {
            let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
    }
}

/// Opens `storage` (found at `path`) as one read-only layer.
pub fn open_layer(storage: Box<dyn Storage>, path: &Path) -> Result<Layer, OpenError> {
    let file_len = storage
        .len()
        .map_err(|e| OpenError::Unreadable(format!("{}: {e}", path.display())))?;
    let format = vdisk::probe(storage.as_ref())
        .map_err(|e| OpenError::from_vdisk(path, e))?
        .ok_or_else(|| {
            OpenError::Unreadable(format!("{}: not a VHD, VHDX or VDI image", path.display()))
        })?;
    let opts = OpenOptions { writable: false };
    let err = |e| OpenError::from_vdisk(path, e);
    let (kind, block_size, image): (String, Option<u64>, Box<dyn Image>) = match format {
        Format::Vhd => {
            let img = VhdImage::open(storage, path, opts).map_err(err)?;
            let kind = match img.disk_type() {
                vdisk::vhd::footer::DiskType::Fixed => "fixed",
                vdisk::vhd::footer::DiskType::Dynamic => "dynamic",
                vdisk::vhd::footer::DiskType::Differencing => "differencing",
            };
            (kind.into(), img.block_size(), Box::new(img))
        }
        Format::Vhdx => {
            let img = VhdxImage::open(storage, path, opts).map_err(err)?;
            let m = img.metadata();
            let kind = if m.has_parent {
                "differencing"
            } else if m.leave_blocks_allocated {
                "fixed"
            } else {
                "dynamic"
            };
            (kind.into(), Some(m.block_size as u64), Box::new(img))
        }
        Format::Vdi => {
            let img = VdiImage::open(storage, path, opts).map_err(err)?;
            (
                img.image_type().name().into(),
                Some(img.block_size()),
                Box::new(img),
            )
        }
        Format::Vmdk => {
            let img =
                vdisk::vmdk::VmdkImage::open(storage, path, opts, &StdParentOpener).map_err(err)?;
            let grain = img.grain_bytes();
            (img.descriptor().create_type.clone(), grain, Box::new(img))
        }
        Format::Qcow2 => {
            let img = vdisk::qcow2::Qcow2Image::open(storage, path, opts).map_err(err)?;
            let kind = if img.header().backing_file.is_some() {
                "overlay"
            } else {
                "base"
            };
            (kind.into(), Some(img.cluster_size()), Box::new(img))
        }
        // probe() never reports raw.
        Format::Raw => {
            return Err(OpenError::Unreadable(format!(
                "{}: not a VHD, VHDX or VDI image",
                path.display()
            )));
        }
    };
    let id = id_text(format, &image.link_id());
    Ok(Layer {
        path: path.to_path_buf(),
        format,
        kind,
        block_size,
        id,
        file_len,
        image,
    })
}

/// Opens the file at `path` read-only, with reader locks as `locks` says
/// (held while the storage is open).
pub fn open_file(path: &Path, locks: &ReadLocks) -> Result<Box<dyn Storage>, OpenError> {
    let unreadable = |e: std::io::Error| OpenError::Unreadable(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(OpenError::Unreadable(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    // Before any metadata is read: a writer cannot change it under us.
    locks.lock(&file, path).map_err(OpenError::Locked)?;
    Ok(Box::new((file, false)))
}

/// A raw backing file of a qcow2, as a layer.
fn raw_layer(storage: Box<dyn Storage>, path: &Path) -> Result<Layer, OpenError> {
    let file_len = storage
        .len()
        .map_err(|e| OpenError::Unreadable(format!("{}: {e}", path.display())))?;
    let image = vdisk::RawImage::new(storage, 512).map_err(|e| OpenError::from_vdisk(path, e))?;
    Ok(Layer {
        path: path.to_path_buf(),
        format: Format::Raw,
        kind: "raw".into(),
        block_size: None,
        id: "-".into(),
        file_len,
        image: Box::new(image),
    })
}

/// Opens the image at `path` and every parent, top first, each with reader
/// locks as `locks` says (held while the layers are open).
pub fn open_chain(path: &Path, locks: &ReadLocks) -> Result<Vec<Layer>, OpenError> {
    let top = open_layer(open_file(path, locks)?, path)?;
    let mut layers = vec![top];
    loop {
        let last = layers.last().expect("at least one layer");
        let link = last
            .image
            .find_parent(&last.path, &StdParentOpener)
            .map_err(|e| OpenError::from_vdisk(&last.path, e))?;
        let Some(link) = link else { break };
        if layers.len() >= vdisk::MAX_CHAIN_DEPTH {
            return Err(OpenError::Broken(format!(
                "{}: parent chain deeper than {}",
                path.display(),
                vdisk::MAX_CHAIN_DEPTH
            )));
        }
        let mut tried = Vec::new();
        let mut found = None;
        // A qcow2 backing file: no identity to match, maybe raw.
        let by_path = last.image.parent_by_path();
        for candidate in &link.candidates {
            let file = match std::fs::File::open(candidate).and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            }) {
                Ok(f) => f,
                Err(e) => {
                    tried.push(format!("{} ({e})", candidate.display()));
                    continue;
                }
            };
            // A parent another process writes is refused, not passed over.
            locks.lock(&file, candidate).map_err(OpenError::Locked)?;
            let storage: Box<dyn Storage> = Box::new((file, false));
            let raw = match by_path {
                Some(Some(Format::Raw)) => true,
                Some(None) => matches!(vdisk::probe(storage.as_ref()), Ok(None)),
                _ => false,
            };
            let layer = if raw {
                raw_layer(storage, candidate)
            } else {
                open_layer(storage, candidate)
            };
            match layer {
                Ok(l)
                    if by_path.is_some()
                        || l.image.link_id() == link.id
                        || Some(l.image.link_id()) == link.alternate_id =>
                {
                    found = Some(l);
                    break;
                }
                Ok(_) => tried.push(format!("{} (identity differs)", candidate.display())),
                Err(OpenError::Unreadable(m) | OpenError::Broken(m) | OpenError::Locked(m)) => {
                    tried.push(m)
                }
            }
        }
        let Some(parent) = found else {
            let tried = if tried.is_empty() {
                "no candidate paths".to_string()
            } else {
                tried.join(", ")
            };
            return Err(OpenError::Broken(format!(
                "{}: parent not found: {}; tried: {tried}",
                last.path.display(),
                link.description
            )));
        };
        if layers
            .iter()
            .any(|l| l.image.link_id() == parent.image.link_id())
        {
            return Err(OpenError::Broken(format!(
                "{}: parent chain loops at {}",
                path.display(),
                parent.path.display()
            )));
        }
        layers.push(parent);
    }
    Ok(layers)
}

/// The chain as a `vdisk::Disk`, keeping the per-layer details apart.
pub fn into_disk(layers: Vec<Layer>) -> (vdisk::Disk, Vec<LayerInfo>) {
    let mut images = Vec::new();
    let mut infos = Vec::new();
    for l in layers {
        infos.push(LayerInfo {
            path: l.path,
            format: l.format,
            kind: l.kind,
            block_size: l.block_size,
            id: l.id,
            file_len: l.file_len,
        });
        images.push(l.image);
    }
    (
        vdisk::Disk::new(images).expect("1 to MAX_CHAIN_DEPTH layers"),
        infos,
    )
}

/// A layer's details without the image.
pub struct LayerInfo {
    pub path: PathBuf,
    pub format: Format,
    pub kind: String,
    pub block_size: Option<u64>,
    pub id: String,
    pub file_len: u64,
}
