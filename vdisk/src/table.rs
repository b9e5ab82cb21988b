//! A table of 32-bit entries held in memory (the VHD BAT, the VDI block map),
//! whose changes stay pending until they are committed.
//!
//! Group commit: an allocation writes its data and stages the new entry
//! here, where readers see it at once. [`EntryTable::commit`] writes every
//! pending entry after a barrier, so that no entry reaches the disk before
//! the data it points at, and a whole batch costs one barrier instead of
//! one per allocation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::storage::read_table;
use crate::{Result, Storage};

/// How entries are stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    Big,
    Little,
}

impl ByteOrder {
    fn decode(self, b: [u8; 4]) -> u32 {
        match self {
            ByteOrder::Big => u32::from_be_bytes(b),
            ByteOrder::Little => u32::from_le_bytes(b),
        }
    }
    fn encode(self, v: u32) -> [u8; 4] {
        match self {
            ByteOrder::Big => v.to_be_bytes(),
            ByteOrder::Little => v.to_le_bytes(),
        }
    }
}

/// The table; entries are atomics so readers take no lock.
#[derive(Debug)]
pub struct EntryTable {
    offset: u64,
    order: ByteOrder,
    entries: Vec<AtomicU32>,
    /// Indices changed in memory and not yet written to the file. Held for
    /// the whole of a commit, so that a flush that finds nothing pending
    /// knows that every earlier commit has written its entries.
    pending: Mutex<Vec<usize>>,
}

impl EntryTable {
    /// Reads `count` entries at `offset`; the caller has bounded both by the file length.
    pub fn load(
        storage: &dyn Storage,
        offset: u64,
        count: usize,
        order: ByteOrder,
    ) -> std::io::Result<EntryTable> {
        let entries = read_table(storage, offset, count, 4, |c| {
            AtomicU32::new(order.decode([c[0], c[1], c[2], c[3]]))
        })?;
        Ok(EntryTable {
            offset,
            order,
            entries,
            pending: Mutex::new(Vec::new()),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `i` as readers see it (staged changes included).
    pub fn get(&self, i: usize) -> Option<u32> {
        Some(self.entries.get(i)?.load(Ordering::Acquire))
    }

    /// Changes entry `i` in memory; the file follows at the next commit.
    /// The caller has written what the new value points at.
    pub fn stage(&self, i: usize, value: u32) {
        let mut pending = self.lock();
        self.entries[i].store(value, Ordering::Release);
        pending.push(i);
    }

    /// How many changes wait for a commit.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Writes every pending entry, after `barrier` (which must make what
    /// they point at durable). Consecutive entries are one write. Returns
    /// whether anything was pending. On an error the entries stay pending.
    pub fn commit(
        &self,
        storage: &dyn Storage,
        barrier: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        let mut pending = self.lock();
        if pending.is_empty() {
            return Ok(false);
        }
        barrier()?;
        pending.sort_unstable();
        pending.dedup();
        let mut run: Vec<u8> = Vec::new();
        let mut k = 0;
        while k < pending.len() {
            let first = pending[k];
            run.clear();
            while k < pending.len() && pending[k] == first + run.len() / 4 {
                let v = self.entries[pending[k]].load(Ordering::Acquire);
                run.extend_from_slice(&self.order.encode(v));
                k += 1;
            }
            storage.write_all_at(&run, self.offset + first as u64 * 4)?;
        }
        pending.clear();
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    #[test]
    fn staged_entries_reach_the_file_at_commit_in_runs() {
        let s = MemStorage::new(vec![0xFF; 32]);
        let t = EntryTable::load(&s, 4, 6, ByteOrder::Big).unwrap();
        t.stage(3, 7);
        t.stage(1, 5);
        t.stage(2, 6);
        assert_eq!(
            (t.get(1), t.get(3)),
            (Some(5), Some(7)),
            "readers see staged entries"
        );
        assert_eq!(
            s.contents(),
            vec![0xFF; 32],
            "nothing written before the commit"
        );
        let mut barriers = 0;
        assert!(
            t.commit(&s, || {
                barriers += 1;
                Ok(())
            })
            .unwrap()
        );
        assert_eq!(barriers, 1);
        let c = s.contents();
        assert_eq!(&c[8..20], &[0, 0, 0, 5, 0, 0, 0, 6, 0, 0, 0, 7]);
        assert_eq!(&c[..8], &[0xFF; 8]);
        assert!(
            !t.commit(&s, || panic!("no barrier when nothing is pending"))
                .unwrap()
        );
    }

    #[test]
    fn failed_barrier_keeps_entries_pending() {
        let s = MemStorage::new(vec![0; 16]);
        let t = EntryTable::load(&s, 0, 4, ByteOrder::Little).unwrap();
        t.stage(0, 9);
        assert!(t.commit(&s, || Err(crate::Error::ReadOnly)).is_err());
        assert_eq!(t.pending(), 1);
        assert_eq!(s.contents(), vec![0; 16]);
    }
}
