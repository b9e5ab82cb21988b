//! ESXi seSparse extents (read-only; the format is not documented, these are
//! the facts qemu's reader relies on).
//!
//! Constant header (sector 0, little-endian u64s): magic `0xcafebabe` 0,
//! version 8 (`0x0000000200000001`), capacity 16, grain size 24 (8 sectors),
//! grain table size 32 (64 sectors: 4096 entries), flags 40 (0), volatile
//! header offset 80, grain directory offset 128 and size 136, grain tables
//! offset 144, grains offset 192 (all in sectors). The volatile header
//! (magic `0xcafecafe`) says at u64 24 whether a journal must be replayed.
//!
//! Directory entry: 0, or `0x10000000_xxxxxxxx` naming table `x`. Table
//! entry: 0 unallocated; top nibble 1 (unmapped) or 2 zero; 3 allocated, grain
//! `((e >> 48) & 0xfff) | ((e & 0xffff_ffff_ffff) << 12)` from the grains offset.

use std::sync::OnceLock;

use crate::bytes::le64;
use crate::storage::read_table;
use crate::{Error, Mapping, Result, Storage};

pub const MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
const GRAIN_SECTORS: u64 = 8;
const TABLE_SECTORS: u64 = 64;
const ENTRIES: u64 = TABLE_SECTORS * 512 / 8;

pub struct SeSparseExtent {
    pub capacity: u64,
    dir: Vec<u64>,
    tables_at: u64,
    grains_at: u64,
    tables: Vec<OnceLock<Box<[u64]>>>,
    len: u64,
}

impl SeSparseExtent {
    pub fn open(storage: &dyn Storage) -> Result<SeSparseExtent> {
        let bad = |d: String| Error::corrupt("VMDK seSparse header", d);
        let len = storage.len()?;
        let mut h = [0u8; 512];
        storage.read_exact_at(&mut h, 0)?;
        if le64(&h, 0) != MAGIC {
            return Err(bad("no 0xcafebabe magic".into()));
        }
        if le64(&h, 8) != VERSION {
            return Err(Error::unsupported(format!(
                "seSparse version {:#x}",
                le64(&h, 8)
            )));
        }
        if le64(&h, 24) != GRAIN_SECTORS || le64(&h, 32) != TABLE_SECTORS || le64(&h, 40) != 0 {
            return Err(Error::unsupported(format!(
                "seSparse grain size {}, table size {}, flags {:#x} (8, 64 and 0 are known)",
                le64(&h, 24),
                le64(&h, 32),
                le64(&h, 40)
            )));
        }
        let sector = |o: usize| -> Result<u64> {
            le64(&h, o)
                .checked_mul(512)
                .filter(|&b| b < len)
                .ok_or_else(|| bad(format!("offset at byte {o} is outside the file")))
        };
        let mut v = [0u8; 32];
        storage.read_exact_at(&mut v, sector(80)?)?;
        if le64(&v, 0) != VOLATILE_MAGIC {
            return Err(bad("no volatile header".into()));
        }
        if le64(&v, 24) != 0 {
            return Err(Error::unsupported(
                "a seSparse extent whose journal must be replayed (open it in ESXi first)",
            ));
        }
        let capacity = le64(&h, 16);
        let dir_at = sector(128)?;
        let entries = le64(&h, 136).saturating_mul(512) / 8;
        let needed = capacity.div_ceil(GRAIN_SECTORS * ENTRIES);
        if entries < needed || entries > super::header::MAX_GD_ENTRIES {
            return Err(bad(format!(
                "{entries} directory entries for {capacity} sectors"
            )));
        }
        let entries = needed as usize;
        if dir_at + entries as u64 * 8 > len {
            return Err(bad("grain directory outside the file".into()));
        }
        let dir = read_table(storage, dir_at, entries, 8, |c| le64(c, 0))?;
        Ok(SeSparseExtent {
            capacity,
            dir,
            tables_at: sector(144)?,
            grains_at: le64(&h, 192)
                .checked_mul(512)
                .ok_or_else(|| bad("grains offset".into()))?,
            tables: (0..entries).map(|_| OnceLock::new()).collect(),
            len,
        })
    }

    pub fn grain_bytes(&self) -> u64 {
        GRAIN_SECTORS * 512
    }

    fn table(&self, storage: &dyn Storage, i: usize) -> Result<Option<&[u64]>> {
        let Some(slot) = self.tables.get(i) else {
            return Ok(None);
        };
        if let Some(t) = slot.get() {
            return Ok(Some(t));
        }
        let e = self.dir[i];
        if e == 0 {
            return Ok(None);
        }
        let bad = || Error::corrupt("VMDK seSparse directory", format!("entry {i}: {e:#018x}"));
        if e & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(bad());
        }
        let at = (e & 0xffff_ffff)
            .checked_mul(TABLE_SECTORS * 512)
            .and_then(|o| o.checked_add(self.tables_at))
            .filter(|&o| o + ENTRIES * 8 <= self.len)
            .ok_or_else(bad)?;
        let t = read_table(storage, at, ENTRIES as usize, 8, |c| le64(c, 0))?.into_boxed_slice();
        let _ = slot.set(t);
        Ok(slot.get().map(|t| &t[..]))
    }

    fn grain(&self, storage: &dyn Storage, g: u64) -> Result<Mapping> {
        let Some(t) = self.table(storage, (g / ENTRIES) as usize)? else {
            return Ok(Mapping::Unallocated);
        };
        let e = t[(g % ENTRIES) as usize];
        let bad = || Error::corrupt("VMDK seSparse grain table", format!("grain {g}: {e:#018x}"));
        Ok(match e >> 60 {
            0 if e == 0 => Mapping::Unallocated,
            1 | 2 => Mapping::Zero,
            3 => {
                let index = ((e >> 48) & 0xfff) | ((e & 0xffff_ffff_ffff) << 12);
                let at = index
                    .checked_mul(self.grain_bytes())
                    .and_then(|o| o.checked_add(self.grains_at))
                    .filter(|&o| o + self.grain_bytes() <= self.len)
                    .ok_or_else(bad)?;
                Mapping::Data { file_offset: at }
            }
            _ => return Err(bad()),
        })
    }

    /// Maps `len` bytes at `offset` of the extent; data addresses get `base`.
    pub fn map(
        &self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        base: u64,
    ) -> Result<(Mapping, u64)> {
        let gb = self.grain_bytes();
        let with_base = |m: Mapping| match m {
            Mapping::Data { file_offset } => Mapping::Data {
                file_offset: base | file_offset,
            },
            m => m,
        };
        let at = |m: Mapping, in_g: u64| match m {
            Mapping::Data { file_offset } => Mapping::Data {
                file_offset: file_offset + in_g,
            },
            m => m,
        };
        let first = at(self.grain(storage, offset / gb)?, offset % gb);
        let mut run = (gb - offset % gb).min(len);
        while run < len {
            let next = self.grain(storage, (offset + run) / gb)?;
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
        Ok((with_base(first), run))
    }
}
