//! qcow2 (QEMU): versions 2 and 3, 512 B to 2 MiB clusters, zero clusters,
//! compressed clusters (deflate, zstd), extended L2 entries (subclusters),
//! internal snapshots (the active L1 is read and written), external data
//! files (read), backing files of any format this crate opens.
//!
//! Layout: a two-level map (L1 table -> L2 tables of one cluster) from guest
//! clusters to host clusters; host clusters are reference-counted (refcount
//! table -> refcount blocks). An L2 entry is a standard cluster (offset,
//! zero flag, COPIED bit 63 when its refcount is exactly one) or a
//! compressed one (byte offset + sector count). L2 tables are read through a
//! bounded shared cache ([`cache::L2Cache`]).
//!
//! Writes: see [`write`].

pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod header;
pub mod refcount;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::storage::read_table;
use crate::{
    Error, Format, Image, Mapping, OpenOptions, ParentLink, ParentOpener, Result, Storage,
};
use cache::{L2Cache, L2Table};
use header::{Compression, HEADER_AREA, Header};

/// Bits 9-55 of L1 and standard L2 entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry bit 63: refcount exactly one (may be written in place).
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit 0 (version 3 without extended L2): reads zeros.
pub const ZERO: u64 = 1;
/// L2 cache budget per image, in bytes (at least a few tables).
const L2_CACHE_BYTES: u64 = 16 << 20;

pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Box<dyn Image>> {
    Ok(Box::new(Qcow2Image::open(storage, path, opts)?))
}

/// What one guest cluster (or subcluster) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    Zero,
    /// Host offset of the cluster, and whether it may be written in place.
    Data {
        host: u64,
        copied: bool,
    },
    /// The raw L2 entry of a compressed cluster.
    Compressed(u64),
}

/// A qcow2 file.
pub struct Qcow2Image {
    storage: Box<dyn Storage>,
    /// The external data file, opened by [`Image::open_companions`].
    data_file: OnceLock<Box<dyn Storage>>,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    l2_entries: u64,
    extended_l2: bool,
    zero_flag: bool,
    compression: Compression,
    size: u64,
    /// The active L1 table; writes change it in memory (group commit).
    l1: Vec<AtomicU64>,
    cache: L2Cache,
    /// The last decompressed cluster: (L2 entry, data).
    last_compressed: Mutex<Option<(u64, Vec<u8>)>>,
    parent: Option<ParentLink>,
    parent_format: Option<Format>,
    link_id: [u8; 16],
    path: PathBuf,
    writable: bool,
    write: Option<Mutex<write::WriteState>>,
}

impl Qcow2Image {
    pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Qcow2Image> {
        let len = storage.len()?;
        let mut raw = vec![0u8; len.min(HEADER_AREA as u64) as usize];
        storage.read_exact_at(&mut raw, 0)?;
        let mut header = Header::parse(&raw, len)?;
        let dirty = header.incompatible & header::INCOMPAT_DIRTY != 0;
        if opts.writable && dirty && header.incompatible & header::INCOMPAT_CORRUPT == 0 {
            let fixed = check::repair_refcounts(storage.as_ref())?;
            log::info!(
                "{}: qcow2 dirty bit set (lazy refcounts): {fixed} refcounts repaired",
                path.display()
            );
            storage.read_exact_at(&mut raw, 0)?;
            header = Header::parse(&raw, storage.len()?)?;
        }
        let cs = header.cluster_size();
        let l1 = read_table(
            storage.as_ref(),
            header.l1_table_offset,
            header.l1_size as usize,
            8,
            |c| AtomicU64::new(u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))),
        )?;
        for (i, e) in l1.iter().enumerate() {
            let off = e.load(Ordering::Relaxed) & OFFSET_MASK;
            if !off.is_multiple_of(cs) {
                return Err(Error::corrupt(
                    "qcow2 L1 table",
                    format!("entry {i} points at unaligned offset {off}"),
                ));
            }
        }
        let parent_format = match header.backing_format.as_deref() {
            None => None,
            Some("raw") => Some(Format::Raw),
            Some("qcow2") => Some(Format::Qcow2),
            Some("vpc") => Some(Format::Vhd),
            Some("vhdx") => Some(Format::Vhdx),
            Some("vdi") => Some(Format::Vdi),
            Some(f) => {
                return Err(Error::unsupported(format!(
                    "qcow2 backing file format '{f}' (raw, qcow2, vpc, vhdx and vdi are supported)"
                )));
            }
        };
        let parent = header.backing_file.as_ref().map(|name| {
            let p = Path::new(name);
            let candidate = if p.is_absolute() {
                p.to_path_buf()
            } else {
                folder_of(path).join(p)
            };
            ParentLink {
                candidates: vec![candidate],
                id: [0; 16],
                alternate_id: None,
                description: format!("qcow2 backing file '{name}'"),
            }
        });
        if opts.writable {
            write::check_writable(&header, path)?;
        }
        let tables = (L2_CACHE_BYTES / cs).max(8) as usize;
        let mut img = Qcow2Image {
            cluster_bits: header.cluster_bits,
            cluster_size: cs,
            l2_entries: header.l2_entries(),
            extended_l2: header.extended_l2(),
            zero_flag: header.version >= 3 && !header.extended_l2(),
            compression: header.compression,
            size: header.size,
            l1,
            cache: L2Cache::new(tables),
            last_compressed: Mutex::new(None),
            parent,
            parent_format,
            link_id: identity(&raw, storage.len()?),
            path: path.to_path_buf(),
            writable: opts.writable,
            write: None,
            data_file: OnceLock::new(),
            header,
            storage,
        };
        if opts.writable {
            img.write = Some(Mutex::new(write::WriteState::load(&img)?));
        }
        Ok(img)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The L2 table at host offset `off`.
    fn l2_table(&self, off: u64) -> Result<Arc<L2Table>> {
        self.cache.get(off, || {
            let mut raw = vec![0u8; self.cluster_size as usize];
            self.storage.read_exact_at(&mut raw, off).map_err(|e| {
                Error::corrupt(
                    "qcow2 L1 table",
                    format!("L2 table at {off} unreadable: {e}"),
                )
            })?;
            Ok(L2Table::from_bytes(&raw))
        })
    }

    /// The L2 table and entry index of guest cluster `vc`, or `None` when
    /// its L1 entry is empty.
    fn l2_slot(&self, vc: u64) -> Result<Option<(Arc<L2Table>, usize)>> {
        let l1i = (vc / self.l2_entries) as usize;
        let Some(e) = self.l1.get(l1i) else {
            return Err(Error::corrupt(
                "qcow2 L1 table",
                format!("cluster {vc} is beyond the L1 table"),
            ));
        };
        let off = e.load(Ordering::Acquire) & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        Ok(Some((self.l2_table(off)?, (vc % self.l2_entries) as usize)))
    }

    /// The raw L2 entry and subcluster bitmap of guest cluster `vc`.
    fn raw_entry(&self, vc: u64) -> Result<(u64, u64)> {
        Ok(match self.l2_slot(vc)? {
            None => (0, 0),
            // Bitmap first: a writer stores a new entry before its bitmap.
            Some((t, i)) if self.extended_l2 => {
                let bitmap = t.word(2 * i + 1);
                (t.word(2 * i), bitmap)
            }
            Some((t, i)) => (t.word(i), 0),
        })
    }

    /// What the guest bytes at `in_cluster` of cluster `vc` are, and how
    /// many bytes of the cluster from there share it (subclusters).
    fn classify(&self, vc: u64, in_cluster: u64) -> Result<(Entry, u64)> {
        let (e, bitmap) = self.raw_entry(vc)?;
        let rest = self.cluster_size - in_cluster;
        if e & COMPRESSED != 0 {
            return Ok((Entry::Compressed(e), rest));
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size) {
            return Err(Error::corrupt(
                "qcow2 L2 table",
                format!("cluster {vc} maps to unaligned offset {host}"),
            ));
        }
        let has_host = host != 0 || (e & COPIED != 0 && self.data_file_used());
        let data = Entry::Data {
            host,
            copied: e & COPIED != 0,
        };
        if !self.extended_l2 {
            let entry = if self.zero_flag && e & ZERO != 0 {
                Entry::Zero
            } else if has_host {
                data
            } else {
                Entry::Unallocated
            };
            return Ok((entry, rest));
        }
        let sc_size = self.cluster_size / 32;
        let sc = (in_cluster / sc_size) as u32;
        let state = |s: u32| (bitmap >> s & 1, bitmap >> (32 + s) & 1);
        let first = state(sc);
        let mut last = sc + 1;
        while last < 32 && state(last) == first {
            last += 1;
        }
        let run = last as u64 * sc_size - in_cluster;
        let entry = match first {
            (1, _) if has_host => data,
            (1, _) => {
                return Err(Error::corrupt(
                    "qcow2 L2 table",
                    format!("cluster {vc} has allocated subclusters but no offset"),
                ));
            }
            (0, 1) => Entry::Zero,
            _ => Entry::Unallocated,
        };
        Ok((entry, run))
    }

    fn data_file_used(&self) -> bool {
        self.header.incompatible & header::INCOMPAT_DATA_FILE != 0
    }

    fn mapping_of(&self, e: Entry, in_cluster: u64, overwrite: bool) -> Mapping {
        match e {
            Entry::Unallocated => Mapping::Unallocated,
            Entry::Zero => Mapping::Zero,
            // A shared cluster must be copied before a write: not in place.
            Entry::Data { copied: false, .. } if overwrite && !self.data_file_used() => {
                Mapping::Compressed
            }
            Entry::Data { host, .. } => Mapping::Data {
                file_offset: host + in_cluster,
            },
            Entry::Compressed(_) => Mapping::Compressed,
        }
    }

    fn map_run(&self, offset: u64, len: u64, overwrite: bool) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size;
        let (vc, inc) = (offset >> self.cluster_bits, offset & (cs - 1));
        let (e, run) = self.classify(vc, inc)?;
        let first = self.mapping_of(e, inc, overwrite);
        let mut run = run.min(len);
        if matches!(first, Mapping::Compressed) {
            return Ok((first, run));
        }
        // Extend over the following clusters that continue the mapping,
        // within the same L2 table.
        while run < len && (inc + run).is_multiple_of(cs) {
            let next = vc + (inc + run) / cs;
            if next / self.l2_entries != vc / self.l2_entries {
                break;
            }
            let (e, r) = self.classify(next, 0)?;
            let m = self.mapping_of(e, 0, overwrite);
            let continues = match (first, m) {
                (Mapping::Data { file_offset: f }, Mapping::Data { file_offset: g }) => {
                    g == f + run
                }
                (Mapping::Compressed, _) => false,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            run = (run + r).min(len);
        }
        Ok((first, run))
    }

    /// The storage holding guest data.
    fn data_storage(&self) -> Result<&dyn Storage> {
        if !self.data_file_used() {
            return Ok(self.storage.as_ref());
        }
        self.data_file.get().map(|s| s.as_ref()).ok_or_else(|| {
            Error::unsupported(format!(
                "qcow2 external data file '{}' was not opened",
                self.header.data_file.as_deref().unwrap_or("(unnamed)")
            ))
        })
    }

    /// Decompresses the cluster whose L2 entry is `e` into `out`.
    fn read_compressed_cluster(&self, e: u64, out: &mut [u8]) -> Result<()> {
        // try_lock: a cache only, never waited for (a forked child must not
        // block on a lock another thread of its parent held).
        if let Ok(guard) = self.last_compressed.try_lock()
            && let Some((k, data)) = &*guard
            && *k == e
        {
            out.copy_from_slice(data);
            return Ok(());
        }
        let (off, csize) = self.compressed_extent(e);
        let file_len = self.storage.len()?;
        if off >= file_len {
            return Err(Error::corrupt(
                "qcow2 L2 table",
                format!("compressed cluster at {off} is past the end of the file"),
            ));
        }
        let n = csize.min(file_len - off) as usize;
        let mut input = vec![0u8; n];
        self.storage.read_exact_at(&mut input, off)?;
        compress::decompress_cluster(self.compression, &input, out)?;
        if let Ok(mut guard) = self.last_compressed.try_lock() {
            *guard = Some((e, out.to_vec()));
        }
        Ok(())
    }

    /// Host byte offset and length (sector-rounded) of a compressed cluster.
    pub fn compressed_extent(&self, e: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let off = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (off, sectors * 512 - (off & 511))
    }
}

/// An identity for loop detection: a qcow2 records none for its backing
/// file, so the header area and the file length stand in.
pub(crate) fn identity(raw: &[u8], len: u64) -> [u8; 16] {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325 ^ len;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4 ^ len.rotate_left(17);
    for &x in raw {
        a = (a ^ x as u64).wrapping_mul(0x100_0000_01b3);
        b = (b ^ x as u64).wrapping_mul(0x100_0000_01b3).rotate_left(5);
    }
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_le_bytes());
    id[8..].copy_from_slice(&b.to_le_bytes());
    id
}

fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Image for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.map_run(offset, len, false)
    }
    fn map_for_overwrite(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        self.map_run(offset, len, true)
    }
    fn zero_data(&self, file_offset: u64, len: u64, punch: bool) -> Result<()> {
        // Where read_data reads (an external data file, when there is one).
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let s = self.data_storage()?;
        Ok(crate::storage::zero_file_range(s, file_offset, len, punch)?)
    }
    fn read_data(&self, buf: &mut [u8], file_offset: u64) -> Result<()> {
        let s = self.data_storage()?;
        // Like qemu's file driver: bytes past the end of the file read zeros
        // (preallocated metadata may point there).
        let mut done = 0;
        while done < buf.len() {
            let n = s.read_at(&mut buf[done..], file_offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
    fn read_compressed(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size;
        let mut cluster = vec![0u8; cs as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (vc, inc) = (pos >> self.cluster_bits, pos & (cs - 1));
            let n = ((cs - inc) as usize).min(buf.len() - done);
            match self.classify(vc, inc)?.0 {
                Entry::Compressed(e) => {
                    self.read_compressed_cluster(e, &mut cluster)?;
                    buf[done..done + n].copy_from_slice(&cluster[inc as usize..inc as usize + n]);
                }
                Entry::Data { host, .. } => self.read_data(&mut buf[done..done + n], host + inc)?,
                _ => {
                    return Err(Error::corrupt(
                        "qcow2 L2 table",
                        format!("cluster {vc} changed while read"),
                    ));
                }
            }
            done += n;
        }
        Ok(())
    }
    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        write::write(self, buf, offset, parent)
    }
    fn commit(&self) -> Result<()> {
        write::commit(self)
    }
    fn flush(&self) -> Result<()> {
        if self.writable {
            self.commit()?;
        }
        if let Some(d) = self.data_file.get() {
            d.sync()?;
        }
        Ok(self.storage.sync()?)
    }
    fn link_id(&self) -> [u8; 16] {
        self.link_id
    }
    fn parent_link(&self) -> Option<&ParentLink> {
        self.parent.as_ref()
    }
    fn parent_by_path(&self) -> Option<Option<Format>> {
        self.parent.as_ref().map(|_| self.parent_format)
    }
    fn open_companions(&self, path: &Path, opener: &dyn ParentOpener) -> Result<()> {
        if !self.data_file_used() || self.data_file.get().is_some() {
            return Ok(());
        }
        let Some(name) = &self.header.data_file else {
            return Err(Error::corrupt(
                "qcow2 header",
                "external data file bit set but no data file name",
            ));
        };
        let p = Path::new(name);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            folder_of(path).join(p)
        };
        let s = opener.open_parent(&p).map_err(|e| {
            Error::ParentNotFound(format!("qcow2 external data file {}: {e}", p.display()))
        })?;
        let _ = self.data_file.set(s);
        Ok(())
    }
    fn describe(&self) -> String {
        let h = &self.header;
        let mut s = format!(
            "qcow2 v{}, {} bytes, {} byte clusters, {}-bit refcounts",
            h.version,
            self.size,
            self.cluster_size,
            h.refcount_bits()
        );
        let f = h.feature_list();
        if !f.is_empty() {
            s += &format!(", {}", f.join(", "));
        }
        if h.nb_snapshots > 0 {
            s += &format!(", {} internal snapshots", h.nb_snapshots);
        }
        if let Some(b) = &h.backing_file {
            s += &format!(
                ", backing file {b} ({})",
                h.backing_format.as_deref().unwrap_or("format not recorded")
            );
        }
        s
    }
}
