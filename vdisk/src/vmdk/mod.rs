//! VMDK (VMware): a descriptor naming extents, sparse or flat.
//!
//! The file opened is either a text descriptor (monolithicFlat,
//! twoGbMaxExtent*, vmfs*, ...: its extent files are opened through the
//! [`ParentOpener`], relative to the descriptor's folder), or a sparse
//! extent (`KDMV`, `COWD`) that is the whole disk, with its descriptor
//! embedded (monolithicSparse, streamOptimized) or none. The disk is the
//! extents one after the other.
//!
//! Data addresses ([`Mapping::Data`]'s `file_offset`) name the extent in
//! bits 48..63 and the byte in its file below; compressed grains are
//! [`Mapping::Compressed`] (inflated by [`Image::read_compressed`]).
//!
//! Snapshots: a child's `parentCID` must be its parent's `CID`, and the
//! parent is found by `parentFileNameHint`. The first write of an open
//! gives the image a new CID (as VMware and qemu do, so that children of
//! the old contents see the change); that line is the only one of the
//! descriptor ever written. Stream-optimized (compressed) extents, COWD
//! (VMFSSPARSE) extents and version-3 sparse files are read-only here.

pub mod create;
pub mod descriptor;
mod extents;
pub mod header;
mod link;
pub mod sesparse;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{
    Error, Format, Geometry, Image, Mapping, OpenOptions, ParentLink, ParentOpener, Result, Storage,
};
use descriptor::{Descriptor, NO_PARENT};
use extents::{Body, Extent, checked_bytes, open_extents, sparse_writable};
use header::{COWD, KDMV};
pub use link::cid_id;
use link::{new_cid, parent_link};
use sparse::{Grain, SparseExtent};

const EXTENT_SHIFT: u32 = 48;
const OFFSET_MASK: u64 = (1 << EXTENT_SHIFT) - 1;
const MAX_EXTENTS: usize = (1 << 15) - 1;
/// The CID qemu gives a sparse file that has no descriptor.
const DEFAULT_CID: u32 = 0xFFFF_FFFE;

pub fn open(
    storage: Box<dyn Storage>,
    path: &Path,
    opts: OpenOptions,
    opener: &dyn ParentOpener,
) -> Result<Box<dyn Image>> {
    Ok(Box::new(VmdkImage::open(storage, path, opts, opener)?))
}

/// Whether `head` (the first bytes, `len` the file length) is a VMDK: a sparse
/// extent magic, or a small text descriptor.
pub fn probe(head: &[u8], len: u64) -> bool {
    (len >= 512 && (head.starts_with(KDMV) || head.starts_with(COWD)))
        || (len <= descriptor::MAX_TEXT && descriptor::looks_like_text(head))
}

/// A VMDK disk: its descriptor and extents.
pub struct VmdkImage {
    /// `files[0]` is the file opened; extent files follow.
    files: Vec<Box<dyn Storage>>,
    extents: Vec<Extent>,
    size: u64,
    descriptor: Descriptor,
    /// The descriptor text in `files[0]`: byte offset and room (text files: to the end).
    desc_at: Option<(u64, u64)>,
    text_descriptor: bool,
    writable: bool,
    parent: Option<ParentLink>,
    /// The current CID and whether this open has changed it.
    cid: Mutex<(u32, bool)>,
    path: PathBuf,
}

impl VmdkImage {
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: OpenOptions,
        opener: &dyn ParentOpener,
    ) -> Result<VmdkImage> {
        let len = storage.len()?;
        let mut head = vec![0u8; len.min(512) as usize];
        storage.read_exact_at(&mut head, 0)?;
        let mut files = vec![storage];
        let mut extents = Vec::new();
        let mut read_only = None;
        let (descriptor, desc_at, text) = if head.len() == 512
            && (head.starts_with(KDMV) || head.starts_with(COWD))
        {
            let sp = SparseExtent::open(files[0].as_ref(), &head)?;
            let h = sp.header.clone();
            let embedded = if !h.cowd && h.desc_offset != 0 && h.desc_size != 0 {
                let (at, room) = (
                    h.desc_offset.saturating_mul(512),
                    h.desc_size.saturating_mul(512),
                );
                if room > descriptor::MAX_TEXT || at.saturating_add(room) > len {
                    return Err(Error::corrupt(
                        "VMDK sparse header",
                        format!("descriptor of {room} bytes at {at} is outside the file"),
                    ));
                }
                let mut raw = vec![0u8; room as usize];
                files[0].read_exact_at(&mut raw, at)?;
                Some((Descriptor::parse(&raw)?, (at, room)))
            } else {
                None
            };
            match embedded {
                // A sparse file holding only a descriptor (qemu reads these).
                Some((d, at)) if h.capacity == 0 => {
                    extents = open_extents(&d, path, opts, opener, &mut files, &mut read_only)?;
                    (d, Some(at), false)
                }
                _ if h.capacity == 0 => {
                    return Err(Error::corrupt("VMDK sparse header", "capacity 0"));
                }
                embedded => {
                    let writable = opts.writable && sparse_writable(&sp, &mut read_only);
                    extents.push(Extent {
                        start: 0,
                        len: checked_bytes(h.capacity)?,
                        body: Body::Sparse {
                            file: 0,
                            sparse: Box::new(sp),
                        },
                        writable,
                        name: path.display().to_string(),
                    });
                    match embedded {
                        Some((d, at)) => {
                            if d.sectors() != Some(h.capacity) {
                                log::warn!(
                                    "{}: the embedded descriptor's extents ({:?} sectors) differ from the sparse header's capacity ({}); the header is used",
                                    path.display(),
                                    d.sectors(),
                                    h.capacity
                                );
                            }
                            (d, Some(at), false)
                        }
                        None => (
                            Descriptor {
                                version: 1,
                                cid: DEFAULT_CID,
                                parent_cid: NO_PARENT,
                                create_type: if h.cowd {
                                    "vmfsSparse"
                                } else {
                                    "monolithicSparse"
                                }
                                .into(),
                                ..Descriptor::default()
                            },
                            None,
                            false,
                        ),
                    }
                }
            }
        } else if len <= descriptor::MAX_TEXT && descriptor::looks_like_text(&head) {
            let mut raw = vec![0u8; len as usize];
            files[0].read_exact_at(&mut raw, 0)?;
            let d = Descriptor::parse(&raw)?;
            extents = open_extents(&d, path, opts, opener, &mut files, &mut read_only)?;
            (d, Some((0, len)), true)
        } else {
            return Err(Error::NotAnImage);
        };
        let size = extents.iter().map(|e| e.len).sum::<u64>();
        if size == 0 {
            return Err(Error::corrupt("VMDK descriptor", "no extents"));
        }
        let writable = opts.writable && read_only.is_none();
        if let (true, Some(why)) = (opts.writable, &read_only) {
            log::warn!(
                "{}: opened read-only, writes fail with EROFS: {why}; to write, convert it: qemu-img convert -O vmdk -o subformat=monolithicSparse",
                path.display()
            );
        }
        let parent = parent_link(&descriptor, path)?;
        Ok(VmdkImage {
            files,
            extents,
            size,
            cid: Mutex::new((descriptor.cid, false)),
            descriptor,
            desc_at,
            text_descriptor: text,
            writable,
            parent,
            path: path.to_path_buf(),
        })
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The current CID (changed by the first write of this open).
    pub fn cid(&self) -> u32 {
        self.cid.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn extent_at(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }

    fn file_of(&self, e: &Extent) -> Option<usize> {
        match e.body {
            Body::Flat { file, .. } | Body::Sparse { file, .. } | Body::SeSparse { file, .. } => {
                Some(file)
            }
            _ => None,
        }
    }

    /// The extent and file an address names.
    fn decode(&self, addr: u64) -> Result<(&Extent, &dyn Storage, u64)> {
        let i = (addr >> EXTENT_SHIFT) as usize;
        let e = self.extents.get(i);
        match e.and_then(|e| Some((e, self.file_of(e)?))) {
            Some((e, f)) => Ok((e, self.files[f].as_ref(), addr & OFFSET_MASK)),
            None => Err(Error::corrupt(
                "mapping",
                format!("bad VMDK address {addr:#x}"),
            )),
        }
    }

    /// On the first write: a new CID in the descriptor, the line rewritten alone.
    fn touch_cid(&self) -> Result<()> {
        let mut cid = self.cid.lock().unwrap_or_else(|e| e.into_inner());
        if cid.1 {
            return Ok(());
        }
        let Some((at, room)) = self.desc_at else {
            cid.1 = true;
            return Ok(());
        };
        let file = self.files[0].as_ref();
        let old_len = if self.text_descriptor {
            file.len()?
        } else {
            room
        };
        let mut raw = vec![0u8; old_len.min(room) as usize];
        file.read_exact_at(&mut raw, at)?;
        // A new CID of as many hex digits as the old one, so that the line
        // keeps its length (the descriptor is rewritten from there on).
        let width = descriptor::cid_width(&raw).unwrap_or(8).min(8) as u32;
        let mut new = new_cid(cid.0);
        if width < 8 {
            new = (new & ((1 << (4 * width)) - 1)) | (1 << (4 * (width - 1)));
            if new == cid.0 {
                new ^= 1;
            }
        }
        let (line, mut tail) = descriptor::replace_cid(&raw, new)
            .ok_or_else(|| Error::corrupt("VMDK descriptor", "no CID line"))?;
        let end = line as u64 + tail.len() as u64;
        if !self.text_descriptor {
            if end > room {
                return Err(Error::NoSpace(
                    "the VMDK descriptor has no room for the new CID".into(),
                ));
            }
            let text_end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            tail.resize(tail.len() + text_end.saturating_sub(end as usize), 0);
        }
        file.write_all_at(&tail, at + line as u64)?;
        if self.text_descriptor && end < old_len {
            file.set_len(end)?;
        }
        *cid = (new, true);
        Ok(())
    }

    fn write_sparse(
        &self,
        e: &Extent,
        file: &dyn Storage,
        sp: &SparseExtent,
        local: u64,
        data: &[u8],
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let gb = sp.grain_bytes();
        let mut done = 0usize;
        while done < data.len() {
            let off = local + done as u64;
            let (g, in_g) = (off / gb, off % gb);
            let n = ((gb - in_g) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            match sp.grain(file, g)? {
                Grain::At(s) => sp.overwrite(file, s, in_g, piece)?,
                was => {
                    let shows_parent = was == Grain::Unallocated && self.parent.is_some();
                    let zeros = piece.iter().all(|&b| b == 0);
                    if !shows_parent && zeros {
                        // Reads zeros already.
                        done += n;
                        continue;
                    }
                    let whole = in_g == 0 && n as u64 == gb.min(e.len - g * gb);
                    if zeros && whole && sp.has_zero_grains() {
                        // A zeroed-grain entry hides the parent without a grain.
                        sp.mark_zero(file, g)?;
                        done += n;
                        continue;
                    }
                    let mut grain = vec![0u8; gb as usize];
                    if shows_parent {
                        let inside = gb.min(e.len - g * gb) as usize;
                        parent(&mut grain[..inside], e.start + g * gb)?;
                    }
                    grain[in_g as usize..in_g as usize + n].copy_from_slice(piece);
                    sp.allocate(file, g, &grain)?;
                }
            }
            done += n;
        }
        Ok(())
    }
}

impl Image for VmdkImage {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn geometry(&self) -> Option<Geometry> {
        self.descriptor.geometry
    }
    fn storage(&self) -> &dyn Storage {
        self.files[0].as_ref()
    }
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let i = self.extent_at(offset);
        let Some(e) = self.extents.get(i) else {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        };
        let local = offset - e.start;
        let len = len.min(e.len - local);
        let base = (i as u64) << EXTENT_SHIFT;
        match &e.body {
            Body::Flat { start, .. } => Ok((
                Mapping::Data {
                    file_offset: base | (start + local),
                },
                len,
            )),
            Body::SeSparse { file, extent } => {
                extent.map(self.files[*file].as_ref(), local, len, base)
            }
            Body::Zero => Ok((Mapping::Zero, len)),
            Body::NoAccess => Err(Error::unsupported(format!(
                "VMDK extent {} is NOACCESS",
                e.name
            ))),
            Body::Sparse { file, sparse } => {
                sparse.map(self.files[*file].as_ref(), local, len, base)
            }
        }
    }

    fn read_data(&self, buf: &mut [u8], addr: u64) -> Result<()> {
        let (_, file, off) = self.decode(addr)?;
        Ok(file.read_exact_at(buf, off)?)
    }

    fn read_compressed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // `map` gives compressed runs inside one sparse extent.
        let e = self.extents.get(self.extent_at(offset));
        match e.map(|e| (e, &e.body)) {
            Some((e, Body::Sparse { file, sparse }))
                if offset + buf.len() as u64 <= e.start + e.len =>
            {
                sparse.read_compressed(self.files[*file].as_ref(), buf, offset - e.start)
            }
            _ => Err(Error::corrupt(
                "mapping",
                format!("no compressed VMDK grains at {offset}"),
            )),
        }
    }

    fn write_data(&self, buf: &[u8], addr: u64) -> Result<()> {
        let (e, file, off) = self.decode(addr)?;
        if !self.writable || !e.writable {
            return Err(Error::ReadOnly);
        }
        Ok(file.write_all_at(buf, off)?)
    }

    fn zero_data(&self, addr: u64, len: u64, punch: bool) -> Result<()> {
        let (e, file, off) = self.decode(addr)?;
        if !self.writable || !e.writable {
            return Err(Error::ReadOnly);
        }
        Ok(crate::storage::zero_file_range(file, off, len, punch)?)
    }

    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.touch_cid()?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let Some(e) = self.extents.get(self.extent_at(off)) else {
                return Err(Error::OutOfRange {
                    offset,
                    len: buf.len() as u64,
                    size: self.size,
                });
            };
            let local = off - e.start;
            let n = ((e.len - local) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            if !e.writable {
                return Err(match e.body {
                    Body::Zero | Body::NoAccess => Error::unsupported(format!(
                        "VMDK extent {} ({}) cannot be written",
                        e.name,
                        if matches!(e.body, Body::Zero) {
                            "ZERO"
                        } else {
                            "NOACCESS"
                        }
                    )),
                    _ => Error::ReadOnly,
                });
            }
            match &e.body {
                Body::Flat { file, start } => {
                    self.files[*file].write_all_at(data, start + local)?
                }
                Body::Sparse { file, sparse } => {
                    self.write_sparse(e, self.files[*file].as_ref(), sparse, local, data, parent)?
                }
                Body::Zero | Body::NoAccess | Body::SeSparse { .. } => {
                    return Err(Error::ReadOnly);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn commit(&self) -> Result<()> {
        for e in &self.extents {
            if let Body::Sparse { file, sparse } = &e.body {
                sparse.commit(self.files[*file].as_ref())?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.commit()?;
        }
        for f in &self.files {
            f.sync()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        for f in &self.files {
            f.sync()?;
        }
        Ok(())
    }

    fn link_id(&self) -> [u8; 16] {
        cid_id(self.cid())
    }
    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }
    /// The link, after a look at the candidates' CIDs: a parent found only
    /// with another CID (written after the child was made) is a clear
    /// mismatch, naming both CIDs, rather than "not found".
    fn find_parent(&self, _path: &Path, opener: &dyn ParentOpener) -> Result<Option<ParentLink>> {
        let Some(link) = &self.parent else {
            return Ok(None);
        };
        let mut others = Vec::new();
        for c in &link.candidates {
            let Ok(s) = opener.open_parent(c) else {
                continue;
            };
            match create::identity(s.as_ref()) {
                Ok((cid, _)) if cid == self.descriptor.parent_cid => return Ok(Some(link.clone())),
                Ok((cid, _)) => others.push(format!("{} has CID {cid:08x}", c.display())),
                Err(_) => {}
            }
        }
        if others.is_empty() {
            return Ok(Some(link.clone()));
        }
        Err(Error::ParentMismatch(format!(
            "parentCID is {:08x}, but {} (the parent was written after this child was made; the child's data no longer fits it)",
            self.descriptor.parent_cid,
            others.join(", ")
        )))
    }

    fn describe(&self) -> String {
        let kinds: Vec<String> = self
            .extents
            .iter()
            .map(|e| match &e.body {
                Body::Flat { .. } => format!("FLAT {}", e.name),
                Body::Sparse { sparse, .. } => format!(
                    "SPARSE {} ({} KiB grains{})",
                    e.name,
                    sparse.grain_bytes() >> 10,
                    if sparse.compressed() {
                        ", compressed"
                    } else {
                        ""
                    }
                ),
                Body::SeSparse { .. } => format!("SESPARSE {} (4 KiB grains)", e.name),
                Body::Zero => "ZERO".to_string(),
                Body::NoAccess => format!("NOACCESS {}", e.name),
            })
            .collect();
        let parent = if self.descriptor.parent_cid == NO_PARENT {
            String::new()
        } else {
            format!(", parent CID {:08x}", self.descriptor.parent_cid)
        };
        format!(
            "VMDK {}, {} bytes, CID {:08x}{parent}, extents: {}",
            self.descriptor.create_type,
            self.size,
            self.cid(),
            kinds.join(", ")
        )
    }
}

impl VmdkImage {
    /// For `check`: every sparse extent's grain tables against the
    /// redundant copies, as (extent name, grain, entry, redundant entry).
    pub fn redundant_mismatches(&self) -> Result<Vec<(String, u64, u32, u32)>> {
        let mut out = Vec::new();
        for e in &self.extents {
            if let Body::Sparse { file, sparse } = &e.body {
                for (g, a, b) in sparse.redundant_mismatches(self.files[*file].as_ref())? {
                    out.push((e.name.clone(), g, a, b));
                }
            }
        }
        Ok(out)
    }

    /// The grain size of the first sparse extent, if any.
    pub fn grain_bytes(&self) -> Option<u64> {
        self.extents.iter().find_map(|e| match &e.body {
            Body::Sparse { sparse, .. } => Some(sparse.grain_bytes()),
            _ => None,
        })
    }

    /// Where the image was opened (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests;
