//! Reference counts of host clusters (refcount table -> refcount blocks),
//! for writes: loaded on demand, changed in memory, written at commit.
//!
//! New clusters are taken at the end of the file only (never a freed one
//! below it): so a cluster freed in memory can never be handed out again
//! before the table entries that dropped it are durable.

use std::collections::{BTreeSet, HashMap};

use crate::bytes::put_be64;
use crate::{Error, Result, Storage};

pub struct Refcounts {
    cluster_size: u64,
    /// log2 of the refcount width in bits (0..=6).
    order: u32,
    per_block: u64,
    pub table_offset: u64,
    pub table: Vec<u64>,
    blocks: HashMap<usize, Vec<u8>>,
    dirty_blocks: BTreeSet<usize>,
    dirty_entries: BTreeSet<usize>,
    /// The table was moved (grown): written whole, then the header; the old
    /// table's clusters are freed afterwards.
    pub moved_from: Option<(u64, u64)>,
    /// First cluster index that may be free: allocation starts here.
    end: u64,
}

impl Refcounts {
    pub fn load(
        storage: &dyn Storage,
        cluster_size: u64,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Refcounts> {
        let n = (table_clusters as u64 * cluster_size / 8) as usize;
        let table = crate::storage::read_table(storage, table_offset, n, 8, |c| {
            u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))
        })?;
        for (i, &e) in table.iter().enumerate() {
            if e & 511 != 0 || !(e & !511).is_multiple_of(cluster_size) {
                return Err(Error::corrupt(
                    "qcow2 refcount table",
                    format!("entry {i} ({e:#x}) is not a cluster offset"),
                ));
            }
        }
        Ok(Refcounts {
            cluster_size,
            order,
            per_block: (cluster_size * 8) >> order,
            table_offset,
            table,
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            dirty_entries: BTreeSet::new(),
            moved_from: None,
            end: storage.len()?.div_ceil(cluster_size),
        })
    }

    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    fn block(&mut self, storage: &dyn Storage, ti: usize) -> Result<Option<&mut Vec<u8>>> {
        let off = self.table.get(ti).copied().unwrap_or(0);
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&ti) {
            let mut raw = vec![0u8; self.cluster_size as usize];
            storage.read_exact_at(&mut raw, off).map_err(|e| {
                Error::corrupt(
                    "qcow2 refcount table",
                    format!("refcount block at {off} unreadable: {e}"),
                )
            })?;
            self.blocks.insert(ti, raw);
        }
        Ok(self.blocks.get_mut(&ti))
    }

    /// The refcount of host cluster `c`.
    pub fn get(&mut self, storage: &dyn Storage, c: u64) -> Result<u64> {
        let (ti, i) = ((c / self.per_block) as usize, c % self.per_block);
        let order = self.order;
        Ok(self
            .block(storage, ti)?
            .map_or(0, |b| entry_get(b, order, i as usize)))
    }

    /// Sets the refcount of host cluster `c`, creating refcount blocks and
    /// growing the table as needed.
    pub fn set(&mut self, storage: &dyn Storage, c: u64, v: u64) -> Result<()> {
        let ti = (c / self.per_block) as usize;
        if ti >= self.table.len() {
            self.grow(storage, ti)?;
        }
        if self.table[ti] == 0 {
            let b = self.take_end(storage)?;
            self.table[ti] = b * self.cluster_size;
            self.blocks
                .insert(ti, vec![0u8; self.cluster_size as usize]);
            self.dirty_entries.insert(ti);
            self.dirty_blocks.insert(ti);
            self.set(storage, b, 1)?;
        }
        let (order, i) = (self.order, (c % self.per_block) as usize);
        let Some(block) = self.block(storage, ti)? else {
            return Err(Error::corrupt("qcow2 refcount table", "block vanished"));
        };
        entry_set(block, order, i, v);
        self.dirty_blocks.insert(ti);
        Ok(())
    }

    /// The first cluster at or past the end with refcount 0, taken (the
    /// caller sets its refcount).
    fn take_end(&mut self, storage: &dyn Storage) -> Result<u64> {
        self.skip_used(storage)?;
        let c = self.end;
        self.end += 1;
        Ok(c)
    }

    /// Moves `end` past clusters in use beyond the end of the file (a
    /// preallocation); a hostile image with endless ones is refused.
    fn skip_used(&mut self, storage: &dyn Storage) -> Result<()> {
        let mut skipped = 0u32;
        while self.get(storage, self.end)? != 0 {
            self.end += 1;
            skipped += 1;
            if skipped > 1 << 22 {
                return Err(Error::corrupt(
                    "qcow2 refcount table",
                    format!("no free cluster after {skipped} in use past the end of the file"),
                ));
            }
        }
        Ok(())
    }

    /// A new host cluster with refcount 1.
    pub fn allocate(&mut self, storage: &dyn Storage) -> Result<u64> {
        let c = self.take_end(storage)?;
        self.set(storage, c, 1)?;
        Ok(c * self.cluster_size)
    }

    /// Moves the table to new clusters at the end, large enough for entry `ti`.
    fn grow(&mut self, storage: &dyn Storage, ti: usize) -> Result<()> {
        let cs = self.cluster_size;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(cs);
        let want = ((ti as u64 + 1) * 8).div_ceil(cs).max(old_clusters * 2);
        if want * cs > super::header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::NoSpace(format!(
                "qcow2 refcount table would exceed {} bytes",
                super::header::MAX_REFCOUNT_TABLE_BYTES
            )));
        }
        self.skip_used(storage)?;
        let start = self.end;
        self.end += want;
        if self.moved_from.is_none() {
            self.moved_from = Some((self.table_offset, old_clusters));
        }
        self.table.resize((want * cs / 8) as usize, 0);
        self.table_offset = start * cs;
        for k in 0..want {
            self.set(storage, start + k, 1)?;
        }
        Ok(())
    }

    /// Forgets clean refcount blocks when many are loaded (after a commit
    /// every block is clean; the next use reads it again).
    pub fn trim_cache(&mut self) {
        if self.dirty_blocks.is_empty() && self.blocks.len() as u64 * self.cluster_size > 32 << 20 {
            self.blocks.clear();
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty_blocks.is_empty() || !self.dirty_entries.is_empty() || self.moved_from.is_some()
    }

    /// Writes the changed blocks, then (after a barrier) the table entries
    /// that point at new blocks, or the moved table and the header.
    pub fn write(&mut self, storage: &dyn Storage) -> Result<()> {
        for &ti in &self.dirty_blocks {
            storage.write_all_at(&self.blocks[&ti], self.table[ti])?;
        }
        self.dirty_blocks.clear();
        if self.dirty_entries.is_empty() && self.moved_from.is_none() {
            return Ok(());
        }
        storage.sync()?;
        if let Some((old_off, old_clusters)) = self.moved_from.take() {
            let mut raw = vec![0u8; self.table.len() * 8];
            for (i, &e) in self.table.iter().enumerate() {
                put_be64(&mut raw, i * 8, e);
            }
            storage.write_all_at(&raw, self.table_offset)?;
            storage.sync()?;
            let mut h = [0u8; 12];
            put_be64(&mut h, 0, self.table_offset);
            h[8..].copy_from_slice(&((raw.len() as u64 / self.cluster_size) as u32).to_be_bytes());
            storage.write_all_at(&h, super::header::OFF_REFCOUNT_TABLE as u64)?;
            storage.sync()?;
            // The old table is unreferenced now.
            let first = old_off / self.cluster_size;
            for c in first..first + old_clusters {
                self.set(storage, c, 0)?;
            }
            for &ti in &self.dirty_blocks {
                storage.write_all_at(&self.blocks[&ti], self.table[ti])?;
            }
            self.dirty_blocks.clear();
        } else {
            for &ti in &self.dirty_entries {
                let mut e = [0u8; 8];
                put_be64(&mut e, 0, self.table[ti]);
                storage.write_all_at(&e, self.table_offset + ti as u64 * 8)?;
            }
        }
        self.dirty_entries.clear();
        Ok(())
    }
}

/// Entry `i` of a refcount block of width `1 << order` bits.
pub fn entry_get(block: &[u8], order: u32, i: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        ((block[bit / 8] >> (bit % 8)) as u64) & ((1 << bits) - 1)
    } else {
        let n = bits / 8;
        block[i * n..i * n + n]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | b as u64)
    }
}

pub fn entry_set(block: &mut [u8], order: u32, i: usize, v: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = i * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        block[bit / 8] = (block[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
    } else {
        let n = bits / 8;
        for k in 0..n {
            block[i * n + k] = (v >> (8 * (n - 1 - k))) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                entry_set(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    entry_get(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "{bits} bits, {i}"
                );
            }
            entry_set(&mut block, order, 3, max);
            assert_eq!(entry_get(&block, order, 3), max);
            assert_eq!(entry_get(&block, order, 2), 15 & max);
        }
        // Sub-byte widths: bit 0 is the least significant bit.
        let mut b = [0u8; 1];
        entry_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        entry_set(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b1101);
    }
}
