//! A sparse extent: grain directory -> grain tables -> grains.
//!
//! Grain `g` of the extent has its entry at index `g % gtes_per_gt` of the
//! table that directory entry `g / gtes_per_gt` points at (both in
//! sectors). An entry of 0 is an unallocated grain (the parent's, or zeros),
//! 1 a zeroed grain, anything else the sector of the grain's data; in a
//! compressed (stream-optimized) extent, of a grain marker: u64 LBA, u32
//! compressed length, then a zlib stream.
//!
//! Tables are read on first use (a 2 TiB extent has 64 MiB of them) and kept.
//!
//! Writes: a new grain is written at the end of the file (rounded up to the
//! grain size, as qemu does), its table entry staged in memory (group
//! commit). A commit syncs the file, then writes the staged entries into the
//! grain table and into the redundant one: a crash leaves at worst grains
//! that no table points at. Both directories are never changed (tables are
//! preallocated by VMware and qemu); a grain whose table does not exist is
//! refused with an error.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::header::{GD_AT_END, MARKER_EOS, MARKER_FOOTER, SparseHeader, marker};
use crate::bytes::le32;
use crate::storage::read_table;
use crate::{Error, Mapping, Result, Storage};

/// Staged entries that trigger a commit without waiting for a flush.
const COMMIT_BOUND: usize = 4096;

/// What one grain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    Unallocated,
    Zero,
    /// Sector of the grain (or of its marker, compressed).
    At(u64),
}

pub struct SparseExtent {
    pub header: SparseHeader,
    grain_bytes: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    tables: Vec<OnceLock<Box<[AtomicU32]>>>,
    /// Grains whose entries changed in memory only.
    pending: Mutex<Vec<u64>>,
    /// End of the file's used part in bytes: where the next grain goes.
    end: AtomicU64,
    /// The last grain decompressed: (grain, data).
    cache: Mutex<Option<(u64, Vec<u8>)>>,
}

impl SparseExtent {
    /// Reads the header (the footer's copy for a stream-optimized file
    /// whose directory is at the end) and the grain directories.
    pub fn open(storage: &dyn Storage, first: &[u8]) -> Result<SparseExtent> {
        let len = storage.len()?;
        let mut header = SparseHeader::parse(first)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(storage, len)?;
        }
        let grain_bytes = header.grain_bytes();
        let entries = header.gd_entries() as usize;
        let table_bytes = header.gtes_per_gt as u64 * 4;
        let dir = |offset: u64, what: &'static str| -> Result<Vec<u32>> {
            let end = offset
                .checked_mul(512)
                .and_then(|o| o.checked_add(entries as u64 * 4));
            if offset == 0 || end.is_none_or(|e| e > len) {
                return Err(Error::corrupt(
                    "VMDK grain directory",
                    format!(
                        "{what} at sector {offset} with {entries} entries is outside the file ({len} bytes)"
                    ),
                ));
            }
            let gd = read_table(storage, offset * 512, entries, 4, |c| le32(c, 0))?;
            for (i, &t) in gd.iter().enumerate() {
                if t != 0 && t as u64 * 512 + table_bytes > len {
                    return Err(Error::corrupt(
                        "VMDK grain directory",
                        format!("{what} entry {i}: grain table at sector {t} is outside the file"),
                    ));
                }
            }
            Ok(gd)
        };
        let gd = dir(header.gd_offset, "directory")?;
        let rgd = if header.flags & super::header::FLAG_REDUNDANT_GT != 0 && header.rgd_offset != 0
        {
            Some(dir(header.rgd_offset, "redundant directory")?)
        } else {
            None
        };
        Ok(SparseExtent {
            grain_bytes,
            tables: (0..entries).map(|_| OnceLock::new()).collect(),
            gd,
            rgd,
            pending: Mutex::new(Vec::new()),
            end: AtomicU64::new(len),
            cache: Mutex::new(None),
            header,
        })
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }
    pub fn compressed(&self) -> bool {
        self.header.compressed()
    }

    /// The grain table of directory entry `i`, read on first use; `None` if
    /// the directory has no table there.
    fn table(&self, storage: &dyn Storage, i: usize) -> Result<Option<&[AtomicU32]>> {
        let Some(slot) = self.tables.get(i) else {
            return Ok(None);
        };
        if let Some(t) = slot.get() {
            return Ok(Some(t));
        }
        let at = self.gd[i];
        if at == 0 {
            return Ok(None);
        }
        let n = self.header.gtes_per_gt as usize;
        let t: Box<[AtomicU32]> = read_table(storage, at as u64 * 512, n, 4, |c| {
            AtomicU32::new(le32(c, 0))
        })?
        .into_boxed_slice();
        // A concurrent reader may have set it first: both read the same file.
        let _ = slot.set(t);
        Ok(slot.get().map(|t| &t[..]))
    }

    /// What grain `g` is.
    pub fn grain(&self, storage: &dyn Storage, g: u64) -> Result<Grain> {
        let per = self.header.gtes_per_gt as u64;
        let Some(t) = self.table(storage, (g / per) as usize)? else {
            return Ok(Grain::Unallocated);
        };
        Ok(match t[(g % per) as usize].load(Ordering::Acquire) {
            0 => Grain::Unallocated,
            1 => Grain::Zero,
            s => {
                let s = s as u64;
                let need = if self.compressed() {
                    12
                } else {
                    self.grain_bytes
                };
                if s * 512 + need > self.end.load(Ordering::Acquire) {
                    return Err(Error::corrupt(
                        "VMDK grain table",
                        format!("grain {g} at sector {s} is outside the file"),
                    ));
                }
                Grain::At(s)
            }
        })
    }

    /// Maps `len` bytes at `offset` of the extent. `base` is the extent's
    /// address prefix; compressed grains are `Mapping::Compressed` (their
    /// data is not a plain run of the file: [`SparseExtent::read_compressed`]).
    pub fn map(
        &self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        base: u64,
    ) -> Result<(Mapping, u64)> {
        let gb = self.grain_bytes;
        let mapping = |g: u64, in_g: u64| -> Result<Mapping> {
            Ok(match self.grain(storage, g)? {
                Grain::Unallocated => Mapping::Unallocated,
                Grain::Zero => Mapping::Zero,
                Grain::At(_) if self.compressed() => Mapping::Compressed,
                Grain::At(s) => Mapping::Data {
                    file_offset: base | (s * 512 + in_g),
                },
            })
        };
        let first = mapping(offset / gb, offset % gb)?;
        let mut run = (gb - offset % gb).min(len);
        while run < len {
            let next = mapping((offset + run) / gb, 0)?;
            let continues = match (first, next) {
                (Mapping::Data { file_offset: f }, Mapping::Data { file_offset: n }) => {
                    n == f + run
                }
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            run = (run + gb).min(len);
        }
        Ok((first, run))
    }

    /// Reads compressed grains at `offset` of the extent (a run
    /// [`SparseExtent::map`] called `Mapping::Compressed`).
    pub fn read_compressed(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let gb = self.grain_bytes;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (g, in_g) = (off / gb, (off % gb) as usize);
            let n = (gb as usize - in_g).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.as_ref().is_none_or(|(cg, _)| *cg != g) {
                let data = match self.grain(storage, g)? {
                    Grain::At(s) => self.inflate(storage, g, s)?,
                    _ => vec![0u8; gb as usize],
                };
                *cache = Some((g, data));
            }
            if let Some((_, data)) = cache.as_ref() {
                out.copy_from_slice(&data[in_g..in_g + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Decompresses grain `g` stored at sector `s`.
    fn inflate(&self, storage: &dyn Storage, g: u64, s: u64) -> Result<Vec<u8>> {
        let gb = self.grain_bytes as usize;
        let end = self.end.load(Ordering::Acquire);
        let at = s * 512;
        let (start, size) = if self.header.has_markers() {
            let mut m = [0u8; 12];
            storage.read_exact_at(&mut m, at)?;
            (at + 12, le32(&m, 8) as u64)
        } else {
            (at, (end - at).min(2 * gb as u64 + 512))
        };
        let bad = |d: String| Error::corrupt("VMDK compressed grain", format!("grain {g}: {d}"));
        if size == 0 || size > 2 * gb as u64 + 512 || start + size > end {
            return Err(bad(format!("{size} bytes at sector {s}")));
        }
        let mut raw = vec![0u8; size as usize];
        storage.read_exact_at(&mut raw, start)?;
        let mut out = vec![0u8; gb];
        let n = miniz_oxide::inflate::decompress_slice_iter_to_slice(
            &mut out,
            std::iter::once(&raw[..]),
            true,
            false,
        )
        .map_err(|e| bad(format!("inflate: {e:?}")))?;
        // A last grain past the end of the disk may be stored short.
        out[n..].fill(0);
        Ok(out)
    }

    /// Writes `data` at `in_g` of grain `g`, which is allocated at sector `s`.
    pub fn overwrite(&self, storage: &dyn Storage, s: u64, in_g: u64, data: &[u8]) -> Result<()> {
        Ok(storage.write_all_at(data, s * 512 + in_g)?)
    }

    /// Whether the extent may use zeroed-grain entries (GTE 1): the
    /// header's flag (qemu's `zeroed_grain=on`; VMware's hosted files).
    pub fn has_zero_grains(&self) -> bool {
        self.header.flags & super::header::FLAG_ZERO_GRAIN != 0
    }

    /// Stages a zeroed-grain entry for grain `g` (unallocated until now).
    pub fn mark_zero(&self, storage: &dyn Storage, g: u64) -> Result<()> {
        let per = self.header.gtes_per_gt as u64;
        let (i, k) = ((g / per) as usize, (g % per) as usize);
        let Some(t) = self.table(storage, i)? else {
            return Err(Error::unsupported(format!(
                "VMDK grain {g} has no grain table (directory entry {i} is 0)"
            )));
        };
        let mut pending = self.lock();
        t[k].store(1, Ordering::Release);
        pending.push(g);
        Ok(())
    }

    /// Allocates grain `g` at the end of the file with `grain` (a whole
    /// grain) as its data, and stages its entry.
    pub fn allocate(&self, storage: &dyn Storage, g: u64, grain: &[u8]) -> Result<()> {
        let per = self.header.gtes_per_gt as u64;
        let (i, k) = ((g / per) as usize, (g % per) as usize);
        let Some(t) = self.table(storage, i)? else {
            return Err(Error::unsupported(format!(
                "VMDK grain {g} has no grain table (directory entry {i} is 0); only images with preallocated grain tables can be written"
            )));
        };
        let gb = self.grain_bytes;
        let at = self.end.load(Ordering::Acquire).div_ceil(gb) * gb;
        let sector = at / 512;
        if sector > u32::MAX as u64 {
            return Err(Error::NoSpace(
                "VMDK sparse extent is at its 2 TiB limit".into(),
            ));
        }
        storage.write_all_at(grain, at)?;
        self.end.store(at + gb, Ordering::Release);
        let mut pending = self.lock();
        t[k].store(sector as u32, Ordering::Release);
        pending.push(g);
        let many = pending.len() >= COMMIT_BOUND;
        drop(pending);
        if many {
            self.commit(storage)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs the file (the new grains are durable), then writes the staged
    /// entries into both grain tables. On an error they stay staged.
    pub fn commit(&self, storage: &dyn Storage) -> Result<()> {
        let mut pending = self.lock();
        if pending.is_empty() {
            return Ok(());
        }
        storage.sync()?;
        pending.sort_unstable();
        pending.dedup();
        let per = self.header.gtes_per_gt as u64;
        let mut k = 0;
        let mut run = Vec::new();
        while k < pending.len() {
            let first = pending[k];
            let i = (first / per) as usize;
            run.clear();
            while k < pending.len()
                && pending[k] == first + run.len() as u64 / 4
                && (pending[k] / per) as usize == i
            {
                let g = pending[k];
                let v = match self.tables[i].get() {
                    Some(t) => t[(g % per) as usize].load(Ordering::Acquire),
                    None => 0,
                };
                run.extend_from_slice(&v.to_le_bytes());
                k += 1;
            }
            let in_table = (first % per) * 4;
            storage.write_all_at(&run, self.gd[i] as u64 * 512 + in_table)?;
            if let Some(rgd) = &self.rgd
                && rgd[i] != 0
            {
                storage.write_all_at(&run, rgd[i] as u64 * 512 + in_table)?;
            }
        }
        pending.clear();
        Ok(())
    }

    /// Number of grains allocated (for `describe`); reads every table.
    pub fn allocated(&self, storage: &dyn Storage) -> Result<u64> {
        let mut n = 0;
        for i in 0..self.tables.len() {
            if let Some(t) = self.table(storage, i)? {
                n += t.iter().filter(|e| e.load(Ordering::Relaxed) > 1).count() as u64;
            }
        }
        Ok(n)
    }

    /// Every table entry of both directories, for `check`: (grain, entry,
    /// redundant entry).
    pub fn redundant_mismatches(&self, storage: &dyn Storage) -> Result<Vec<(u64, u32, u32)>> {
        let Some(rgd) = &self.rgd else {
            return Ok(Vec::new());
        };
        let per = self.header.gtes_per_gt as usize;
        let mut out = Vec::new();
        for (i, &r) in rgd.iter().enumerate() {
            let primary = self.table(storage, i)?;
            let redundant: Vec<u32> = if r == 0 {
                vec![0; per]
            } else {
                read_table(storage, r as u64 * 512, per, 4, |c| le32(c, 0))?
            };
            for (k, &rv) in redundant.iter().enumerate() {
                let pv = primary.map_or(0, |t| t[k].load(Ordering::Acquire));
                if pv != rv {
                    out.push(((i * per + k) as u64, pv, rv));
                }
            }
        }
        Ok(out)
    }
}

/// The header copy in a stream-optimized file's footer: at 1536 bytes from
/// the end, a footer marker, the header, an end-of-stream marker.
fn read_footer(storage: &dyn Storage, len: u64) -> Result<SparseHeader> {
    let bad = |d: &str| Error::corrupt("VMDK stream footer", d.to_string());
    if len < 1536 + 512 {
        return Err(bad("file too short for a footer"));
    }
    let mut f = vec![0u8; 1536];
    storage.read_exact_at(&mut f, len - 1536)?;
    if marker(&f[..512]).map(|m| m.1) != Some(MARKER_FOOTER)
        || marker(&f[1024..]) != Some((0, MARKER_EOS))
    {
        return Err(bad(
            "no footer and end-of-stream markers at the end of the file",
        ));
    }
    let h = SparseHeader::parse(&f[512..1024])?;
    if h.gd_offset == GD_AT_END {
        return Err(bad("the footer has no grain directory offset"));
    }
    Ok(h)
}
