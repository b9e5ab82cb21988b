//! One layer of a virtual disk: the contract every format implements.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{ParentOpener, Result, Storage};

/// The image formats this crate understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Vhd,
    Vhdx,
    Vdi,
    /// VMware VMDK (descriptor and extents).
    Vmdk,
    /// A plain disk file (never probed; see [`crate::RawImage`]).
    Raw,
    Qcow2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Vmdk => "vmdk",
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// Cylinder/head/sector geometry, as recorded by the image (HDIO_GETGEO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u32,
    pub heads: u32,
    pub sectors: u32,
}

/// Where a run of virtual bytes lives in one image layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this layer's file, starting at `file_offset`.
    Data { file_offset: u64 },
    /// Reads as zeros, whatever the parents hold.
    Zero,
    /// Not stored in this layer: the parent's bytes, or zeros in a base image.
    Unallocated,
    /// Stored in this layer, but not as plain bytes at one file offset (a
    /// compressed cluster), or not to be overwritten in place (a qcow2
    /// cluster shared with a snapshot): read with [`Image::read_compressed`].
    Compressed,
}

/// What a discard ([`Image::discard`]) may do with the space it zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zeroing {
    /// Whole blocks may give their space up (unallocated in a base image,
    /// the format's zero state in a child); without, blocks this layer
    /// holds keep it and read zeros.
    pub unmap: bool,
    /// Data kept in place (fixed images, parts of blocks, blocks a format
    /// cannot unmap) becomes holes in the container file where the host
    /// file system can punch them, instead of written zeros (an open
    /// option, [`crate::Disk::with_punch_holes`]: some hosts refuse sparse
    /// image files).
    pub punch: bool,
}

/// How a differencing image names its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLink {
    /// Paths to try, in order (already resolved against the child's folder).
    pub candidates: Vec<PathBuf>,
    /// The identity the parent must have: its [`Image::link_id`].
    pub id: [u8; 16],
    /// Another identity the parent may have instead (VHDX `parent_linkage2`,
    /// written while a merge is in progress).
    pub alternate_id: Option<[u8; 16]>,
    /// What to name in an error when no candidate matches.
    pub description: String,
}

/// One image file (one layer of a chain), as a map from virtual offsets to
/// file extents plus the operations that change it.
///
/// Offsets given to `map` and `write` are inside `0..virtual_size()`;
/// `write` offsets and lengths are multiples of `logical_sector_size()`. The
/// chain logic in [`crate::Disk`] guarantees both.
pub trait Image: Send + Sync {
    fn format(&self) -> Format;
    fn virtual_size(&self) -> u64;
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        self.logical_sector_size()
    }
    fn geometry(&self) -> Option<Geometry> {
        None
    }
    /// Maps the run starting at `offset` of at most `len` bytes (`len > 0`).
    /// Returns the mapping and the length of the run it covers, `1..=len`.
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)>;
    /// The layer's own file.
    fn storage(&self) -> &dyn Storage;
    /// Reads bytes of a `Mapping::Data` run from this layer's file.
    fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        Ok(self.storage().read_exact_at(buf, file_offset)?)
    }
    /// Overwrites bytes of a `Mapping::Data` run in place (no metadata
    /// changes); formats whose data spans several files override it.
    fn write_data(&self, buf: &[u8], file_offset: u64) -> Result<()> {
        Ok(self.storage().write_all_at(buf, file_offset)?)
    }
    /// Makes bytes of a `Mapping::Data` run read zeros in place (no
    /// metadata changes): with `punch`, a hole in the container where the
    /// file system can punch one, else zeros written. Formats whose data
    /// spans several files override it, as [`Image::write_data`].
    fn zero_data(&self, file_offset: u64, len: u64, punch: bool) -> Result<()> {
        if !self.is_writable() {
            return Err(crate::Error::ReadOnly);
        }
        Ok(crate::storage::zero_file_range(
            self.storage(),
            file_offset,
            len,
            punch,
        )?)
    }
    /// Syncs the layer's files without committing anything.
    fn sync(&self) -> Result<()> {
        Ok(self.storage().sync()?)
    }
    /// Reads bytes of a `Mapping::Compressed` run at virtual `offset`.
    fn read_compressed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _ = (buf, offset);
        Err(crate::Error::unsupported(format!(
            "{} images have no compressed runs",
            self.format()
        )))
    }
    /// Like [`Image::map`], for a write in place: a run that must not be
    /// overwritten where it lies (shared with a snapshot) is not `Data`.
    fn map_for_overwrite(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.map(offset, len)
    }
    /// Writes sector-aligned data. `parent` reads the chain below this layer
    /// (zeros for a base image), for formats that copy whole blocks on write.
    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()>;
    /// Makes every completed write durable: metadata still held in memory
    /// (see [`Image::commit`]) is committed, then the file is synced. A layer
    /// opened read-only syncs its file too: another process may have written
    /// it, and on Linux a flush on a read-only fd flushes the file.
    fn flush(&self) -> Result<()> {
        if self.is_writable() {
            self.commit()?;
        }
        Ok(self.storage().sync()?)
    }
    /// Writes table updates that allocations keep in memory (group commit)
    /// into the file, after a barrier that makes the data they point at
    /// durable. Not itself a flush: the updates may still be in the page
    /// cache when it returns. Formats that write metadata at once have
    /// nothing to do.
    fn commit(&self) -> Result<()> {
        Ok(())
    }
    /// The last user of a layer that was written is done with it, after its
    /// last flush: space reserved for allocations is given back (VHD).
    fn close(&self) -> Result<()> {
        Ok(())
    }
    /// Whether this layer was opened for writing.
    fn is_writable(&self) -> bool {
        self.storage().is_writable()
    }
    /// The identity a child image records for this one as its parent.
    fn link_id(&self) -> [u8; 16];
    /// For a differencing image: how to find its parent.
    fn parent_link(&self) -> Option<&ParentLink> {
        None
    }
    /// The parent link with its candidates, for formats that record no parent
    /// path and search for it with `opener` (VDI). `path` is where this image
    /// was found. The default is [`Image::parent_link`].
    fn find_parent(&self, path: &Path, opener: &dyn ParentOpener) -> Result<Option<ParentLink>> {
        let _ = (path, opener);
        Ok(self.parent_link().cloned())
    }
    /// For an image that names its parent by path alone, recording no
    /// identity (a qcow2 backing file): `Some(format)`, where `format` is the
    /// one the child records (a raw parent cannot be probed). `None`: the
    /// parent's [`Image::link_id`] must match the link.
    fn parent_by_path(&self) -> Option<Option<Format>> {
        None
    }
    /// Opens the other files the layer reads besides its parent (a qcow2
    /// external data file), through `opener`, read-only. `path` is where
    /// this image was found.
    fn open_companions(&self, path: &Path, opener: &dyn ParentOpener) -> Result<()> {
        let _ = (path, opener);
        Ok(())
    }
    /// One line describing the layer, for logs and `vhdio info`.
    fn describe(&self) -> String {
        format!("{} image, {} bytes", self.format(), self.virtual_size())
    }
    /// Makes `offset..offset + len` (sector-aligned, inside the disk) read
    /// as zeros in this layer, whatever its parents hold (never stale data,
    /// never the parent's); `how` says what may become of the space (see
    /// [`Zeroing`]). `parent` reads the chain below, as for
    /// [`Image::write`]. The default writes zeros (or punches the runs this
    /// layer stores in place, with `how.punch`), which is right for every
    /// format.
    fn discard(
        &self,
        offset: u64,
        len: u64,
        how: Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        crate::disk::zero_fill(self, offset, len, how.punch, parent)
    }
    /// Changes whenever a place in the file that a block's mapping named
    /// may come to hold another block's data (a freed place reused, a block
    /// moved into a freed slot), before any such data is written there.
    /// Readers take no lock: one that finds it changed across a map and
    /// the read of the data maps and reads again ([`crate::Disk`]). Layers
    /// that never reuse places answer 0.
    fn mapping_epoch(&self) -> u64 {
        0
    }
    /// Whether the next flush has space to give back by moving blocks (VDI
    /// slots freed by discards): [`crate::Disk::flush`] then runs
    /// [`Image::reclaim`] with every writer shut out, as in-place overwrites
    /// of a block being moved would be lost.
    /// `written`: the disk was written since the last flush (also by
    /// overwrites in place, which the image itself does not see).
    fn reclaim_pending(&self, written: bool) -> bool {
        let _ = written;
        false
    }
    /// Gives back the space [`Image::reclaim_pending`] announced. The
    /// caller holds off every other writer of the disk.
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }
    /// The unit in which this layer allocates space (its block size), for
    /// formats that allocate in blocks; `None` for fixed and raw files.
    fn allocation_block(&self) -> Option<u64> {
        None
    }
    /// Offline compaction (`vhdio compact`): moves the blocks this layer
    /// stores down into free space of its file and cuts the file after the
    /// last one. Crash-safe: a block is copied and made durable before its
    /// table entry switches, and its old place is reused only after that
    /// switch is durable. The caller holds the image alone and has flushed.
    /// `progress(done, total)` counts moved blocks. Returns the blocks moved.
    /// The default moves nothing (formats without blocks).
    fn relocate(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        let _ = progress;
        Ok(0)
    }
    /// The identity ([`Image::link_id`]) this layer takes at its first
    /// write, for formats whose identity changes when written (VHDX
    /// DataWriteGuid): a commit records it in the child beforehand, so the
    /// child finds its parent at every moment. Others ignore it.
    fn set_next_data_write_guid(&self, guid: [u8; 16]) -> Result<()> {
        let _ = guid;
        Ok(())
    }
}
