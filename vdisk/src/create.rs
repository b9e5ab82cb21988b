//! Creating images: new base images of every format, and differencing
//! children ("snapshots") of existing ones.
//!
//! Like the rest of the crate, nothing here opens a path: the caller hands in
//! the storage of the new file (empty, writable) and, for a snapshot, the
//! storage of the parent (read-only is enough; it is never written). Paths are
//! only recorded, as parent locators in the child.
//!
//! * [`create`]: a fixed or dynamic image of `size` bytes (rounded up to the
//!   logical sector size), every block unallocated (dynamic) or preallocated
//!   as a sparse file (fixed).
//! * [`snapshot`]: a differencing image whose parent is the given image, with
//!   the identity links and locators each format defines; it reads exactly
//!   the parent's content until written, and writing it never touches the
//!   parent. The parent must not be written afterwards (that would change what
//!   the child shows, and for VHDX orphan it).
//!
//! Used by `vhdio create`, `vhdio snapshot`, the tests, and the preload
//! library's snapshot test mode (`LIBVHD_IO_TEST`), which renames the open
//! image to a parent name and creates the child under the old name.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Format, Result, Storage, probe, vdi, vhd, vhdx};

/// What [`create`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual disk size in bytes; rounded up to a whole logical sector.
    pub size: u64,
    /// Preallocate every block (VHD fixed, VHDX LeaveBlocksAllocated, VDI
    /// static) instead of a dynamic (sparse) image.
    pub fixed: bool,
    /// Block size in bytes (power of two); `None` is the format's default, see
    /// [`default_block_size`]. Ignored for a fixed VHD, which has no blocks.
    pub block_size: Option<u32>,
    /// 512, or 4096 for VHDX (VHD and VDI have 512-byte sectors only).
    pub logical_sector_size: u32,
}

impl CreateOptions {
    /// A dynamic image of `size` bytes with default block size and 512-byte sectors.
    pub fn new(format: Format, size: u64) -> CreateOptions {
        CreateOptions {
            format,
            size,
            fixed: false,
            block_size: None,
            logical_sector_size: 512,
        }
    }
}

/// What was made, as a tool reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewImage {
    pub format: Format,
    /// Virtual disk size in bytes (the requested size rounded up to sectors).
    pub size: u64,
    /// Block size, if the image has blocks (every kind but a fixed VHD).
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub fixed: bool,
    /// The identity a child records for this image ([`crate::Image::link_id`]).
    pub link_id: [u8; 16],
    /// For a snapshot: the identity of the parent recorded in the child.
    pub parent_id: Option<[u8; 16]>,
}

/// Default block size: VHD 2 MiB (the spec's, and the largest blktap takes),
/// VDI 1 MiB (the only size QEMU reads), VHDX 32 MiB (Hyper-V's) or 8 MiB for
/// disks of at most 1 GiB (QEMU's choice for small disks; a first write then
/// allocates less).
pub fn default_block_size(format: Format, size: u64) -> u32 {
    match format {
        Format::Vhd => vhd::create::DEFAULT_BLOCK_SIZE,
        Format::Vdi => vdi::create::DEFAULT_BLOCK_SIZE,
        Format::Vhdx if size <= 1 << 30 => 8 << 20,
        Format::Vhdx => 32 << 20,
        Format::Raw => 1 << 20,
        Format::Vmdk => crate::vmdk::create::DEFAULT_GRAIN,
        Format::Qcow2 => crate::qcow2::create::DEFAULT_CLUSTER_SIZE,
    }
}

/// Writes a new, empty image into `storage`, which must be empty and writable.
pub fn create(storage: &dyn Storage, opts: CreateOptions) -> Result<NewImage> {
    if !storage.is_writable() {
        return Err(Error::ReadOnly);
    }
    if storage.len()? != 0 {
        return Err(Error::unsupported("creating an image needs an empty file"));
    }
    let ss = opts.logical_sector_size;
    match (opts.format, ss) {
        (_, 512) | (Format::Vhdx, 4096) => {}
        (f, _) => {
            return Err(Error::unsupported(format!(
                "{f} images with {ss}-byte sectors"
            )));
        }
    }
    if opts.size == 0 {
        return Err(Error::unsupported("a virtual disk of 0 bytes"));
    }
    let size = opts
        .size
        .checked_next_multiple_of(ss as u64)
        .ok_or_else(|| Error::unsupported(format!("virtual size {}", opts.size)))?;
    let block_size = opts
        .block_size
        .unwrap_or_else(|| default_block_size(opts.format, size));
    if !block_size.is_power_of_two() {
        return Err(Error::unsupported(format!(
            "block size {block_size} (not a power of two)"
        )));
    }
    match opts.format {
        Format::Vhd => vhd::create::create(storage, size, opts.fixed, block_size),
        Format::Vdi => vdi::create::create(storage, size, opts.fixed, block_size),
        Format::Vhdx => create_vhdx(storage, size, opts.fixed, block_size, ss, None),
        Format::Vmdk => crate::vmdk::create::create(storage, size, opts.fixed, block_size),
        Format::Qcow2 => {
            if opts.fixed {
                return Err(Error::unsupported(
                    "preallocated qcow2 images (use qemu-img create -o preallocation=)",
                ));
            }
            crate::qcow2::create::create(storage, size, block_size, &Default::default())?;
            Ok(NewImage {
                format: Format::Qcow2,
                size,
                block_size: Some(block_size),
                logical_sector_size: 512,
                fixed: false,
                link_id: qcow2_identity(storage)?,
                parent_id: None,
            })
        }
        Format::Raw => {
            storage.set_len(size)?;
            Ok(NewImage {
                format: Format::Raw,
                size,
                block_size: None,
                logical_sector_size: ss,
                fixed: true,
                link_id: [0; 16],
                parent_id: None,
            })
        }
    }
}

/// Makes `child` (empty, writable storage that will live at `child_path`) a
/// differencing image of the image in `parent` (found at `parent_path`), in
/// the parent's format, with the parent's size, sector size and block size.
///
/// Links and locators: VHD: footer type 4, parent unique id and time stamp,
/// parent name (file name, UTF-16BE), W2ru (relative), W2ku (absolute) and
/// MacX (file URL) locators. VHDX: HasParent, a parent locator with
/// parent_linkage (the parent's DataWriteGuid), relative_path and
/// absolute_win32_path, the parent's virtual disk id. VDI: type diff,
/// uuidLinkage and uuidParentModify from the parent (VDI records no path; the
/// parent is found by UUID in the child's folder and the usual places).
///
/// Relative paths run from the child's folder to the parent. Pass absolute or
/// canonical paths: relative ones are taken against the current directory,
/// lexically (symlinks are not resolved).
pub fn snapshot(
    parent_path: &Path,
    parent: &dyn Storage,
    child: &dyn Storage,
    child_path: &Path,
) -> Result<NewImage> {
    if !child.is_writable() {
        return Err(Error::ReadOnly);
    }
    if child.len()? != 0 {
        return Err(Error::unsupported("creating an image needs an empty file"));
    }
    let links = Links::new(parent_path, child_path)?;
    let format = probe(parent)?.ok_or(Error::NotAnImage)?;
    match format {
        Format::Vhd => vhd::create::snapshot(parent, child, &links),
        Format::Vdi => vdi::create::snapshot(parent, child),
        Format::Vhdx => snapshot_vhdx(parent, child, &links),
        Format::Raw => Err(Error::unsupported("differencing children of raw disks")),
        Format::Vmdk => crate::vmdk::create::snapshot(parent, child, &links, child_path),
        Format::Qcow2 => snapshot_qcow2(parent, child, &links),
    }
}

/// A qcow2 child: backing file name relative to the child's folder (as
/// `qemu-img create -b` records it when given a relative name), format qcow2.
fn snapshot_qcow2(parent: &dyn Storage, child: &dyn Storage, links: &Links) -> Result<NewImage> {
    let len = parent.len()?;
    let mut raw = vec![0u8; len.min(crate::qcow2::header::HEADER_AREA as u64) as usize];
    parent.read_exact_at(&mut raw, 0)?;
    let h = crate::qcow2::header::Header::parse(&raw, len)?;
    let name = links.relative.strip_prefix("./").unwrap_or(&links.relative);
    let o = crate::qcow2::create::Qcow2Options {
        v2: h.version == 2,
        backing: Some((name.to_string(), "qcow2".to_string())),
    };
    let cs = h.cluster_size() as u32;
    crate::qcow2::create::create(child, h.size, cs, &o)?;
    Ok(NewImage {
        format: Format::Qcow2,
        size: h.size,
        block_size: Some(cs),
        logical_sector_size: 512,
        fixed: false,
        link_id: qcow2_identity(child)?,
        parent_id: Some(crate::qcow2::identity(&raw, len)),
    })
}

/// What [`crate::Image::link_id`] of a qcow2 in `s` is.
fn qcow2_identity(s: &dyn Storage) -> Result<[u8; 16]> {
    let len = s.len()?;
    let mut raw = vec![0u8; len.min(crate::qcow2::header::HEADER_AREA as u64) as usize];
    s.read_exact_at(&mut raw, 0)?;
    Ok(crate::qcow2::identity(&raw, len))
}

/// How a child names its parent: paths, already worked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Links {
    /// The parent's file name.
    pub file_name: String,
    /// Absolute path of the parent (normalised, `/` separators).
    pub absolute: String,
    /// From the child's folder to the parent, `/` separators, starting with
    /// `./` or `../`.
    pub relative: String,
}

impl Links {
    pub fn new(parent: &Path, child: &Path) -> Result<Links> {
        let parent = absolute(parent)?;
        let child = absolute(child)?;
        let bad =
            |p: &Path| Error::unsupported(format!("path '{}' is not valid UTF-8", p.display()));
        let file_name = parent
            .file_name()
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "parent path '{}' has no file name",
                    parent.display()
                ))
            })?
            .to_str()
            .ok_or_else(|| bad(&parent))?
            .to_string();
        let child_dir = child.parent().unwrap_or(Path::new("/"));
        let relative = relative_path(child_dir, &parent);
        Ok(Links {
            file_name,
            absolute: parent.to_str().ok_or_else(|| bad(&parent))?.to_string(),
            relative: relative.to_str().ok_or_else(|| bad(&parent))?.to_string(),
        })
    }

    /// `relative` with Windows separators: `.\p.vhd`, `..\dir\p.vhd`.
    pub fn relative_windows(&self) -> String {
        self.relative.replace('/', "\\")
    }

    /// `absolute` with Windows separators (`\dir\p.vhd`: rooted, no drive).
    pub fn absolute_windows(&self) -> String {
        self.absolute.replace('/', "\\")
    }
}

/// `p` made absolute against the current directory and normalised lexically
/// (`.` dropped, `..` taking away the previous component).
fn absolute(p: &Path) -> Result<PathBuf> {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// The path from folder `from` to `to` (both absolute and normalised), as
/// `./a/b` or `../../a/b`.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    if common == f.len() {
        out.push(".");
    }
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// 16 random bytes from /dev/urandom, shaped as a version 4 UUID in the
/// Microsoft GUID byte order VHDX and VDI use (its Data3 is little-endian, so
/// the version nibble is in byte 7).
pub fn random_id() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[7] = (b[7] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    Ok(b)
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn create_vhdx(
    storage: &dyn Storage,
    size: u64,
    fixed: bool,
    block_size: u32,
    sector_size: u32,
    parent: Option<vhdx::ParentInfo>,
) -> Result<NewImage> {
    let mut opts = vhdx::CreateOptions::dynamic(size);
    opts.block_size = block_size;
    opts.logical_sector_size = sector_size;
    // QEMU and Hyper-V write 4096 for the physical sector of 512e disks.
    opts.physical_sector_size = 4096;
    opts.fixed = fixed;
    let parent_id = parent.as_ref().map(|p| p.data_write_guid);
    opts.parent = parent;
    vhdx::create(storage, &opts)?;
    let (header, _) = vhdx::header::read_current(storage)?;
    Ok(NewImage {
        format: Format::Vhdx,
        size,
        block_size: Some(block_size),
        logical_sector_size: sector_size,
        fixed,
        link_id: header.data_write_guid.0,
        parent_id,
    })
}

/// The current header and metadata of a VHDX, read without replaying a log
/// (the caller refuses a file whose log is not empty).
fn vhdx_identity(
    storage: &dyn Storage,
) -> Result<(
    vhdx::header::Header,
    vhdx::region::Regions,
    vhdx::metadata::Metadata,
)> {
    vhdx::header::check_identifier(storage)?;
    let (header, _) = vhdx::header::read_current(storage)?;
    if !header.log_guid.is_zero() {
        return Err(Error::unsupported(
            "VHDX parent has a log that was not replayed; open it for writing once (or qemu-img check -r all)",
        ));
    }
    let regions = vhdx::region::read(storage, storage.len()?)?;
    let meta = vhdx::metadata::read(storage, regions.metadata)?;
    Ok((header, regions, meta))
}

fn snapshot_vhdx(parent: &dyn Storage, child: &dyn Storage, links: &Links) -> Result<NewImage> {
    let (ph, _, pm) = vhdx_identity(parent)?;
    let info = vhdx::ParentInfo {
        data_write_guid: ph.data_write_guid.0,
        paths: vec![
            ("relative_path".to_string(), links.relative_windows()),
            ("absolute_win32_path".to_string(), links.absolute_windows()),
        ],
    };
    let mut made = create_vhdx(
        child,
        pm.virtual_size,
        false,
        pm.block_size,
        pm.logical_sector_size,
        Some(info),
    )?;
    // The child presents the same virtual disk: same "page 83" id, same
    // physical sector size. Rewrite the metadata the creator wrote with them.
    let (_, regions, mut cm) = vhdx_identity(child)?;
    cm.page83 = pm.page83;
    cm.physical_sector_size = pm.physical_sector_size;
    let pairs: Vec<(&str, &str)> = cm
        .parent_locator
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let locator = vhdx::metadata::encode_locator(&pairs);
    child.write_all_at(
        &vhdx::metadata::encode(&cm, Some(&locator)),
        regions.metadata.offset,
    )?;
    child.sync()?;
    made.fixed = false;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = |f: &str, t: &str| {
            relative_path(Path::new(f), Path::new(t))
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(r("/a/b", "/a/b/p.vhd"), "./p.vhd");
        assert_eq!(r("/a/b", "/a/c/p.vhd"), "../c/p.vhd");
        assert_eq!(r("/a/b/c", "/p.vhd"), "../../../p.vhd");
        assert_eq!(r("/", "/p.vhd"), "./p.vhd");
        let l = Links::new(Path::new("/x/./y/../p.vhdx"), Path::new("/x/c/child.vhdx")).unwrap();
        assert_eq!(l.absolute, "/x/p.vhdx");
        assert_eq!(l.relative_windows(), r"..\p.vhdx");
        assert_eq!(l.absolute_windows(), r"\x\p.vhdx");
        assert_eq!(l.file_name, "p.vhdx");
    }

    #[test]
    fn random_ids_are_v4() {
        let a = random_id().unwrap();
        assert_ne!(a, random_id().unwrap());
        assert_eq!(a[7] >> 4, 4);
    }
}
