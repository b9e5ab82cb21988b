//! A bounded cache of L2 tables, shared by all readers and the writer.
//!
//! Entries are atomics: a writer changes a cached table in place (readers see
//! the new entry at once) and pins it until the change is committed, so a
//! dirty table is never evicted and read back stale. Readers take the map's
//! read lock for a lookup only; a miss reads the table outside any lock.
//!
//! Readers never wait for the lock while no table is dirty: a forked child
//! of a multi-threaded program may inherit the lock held by a thread that
//! does not exist in it. They try a few times, then read the table from the
//! file (which then holds every entry) without caching it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, TryLockError};

use crate::Result;

/// One L2 table: its 64-bit words as read (big-endian decoded). With
/// extended L2 entries, words 2i and 2i+1 are entry i and its bitmap.
pub struct L2Table {
    words: Box<[AtomicU64]>,
    /// Changed in memory and not yet written: not evictable.
    pub dirty: AtomicBool,
}

impl L2Table {
    pub fn from_bytes(raw: &[u8]) -> L2Table {
        L2Table {
            words: raw
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            dirty: AtomicBool::new(false),
        }
    }
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }
    pub fn set_word(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release);
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        out
    }
}

pub struct L2Cache {
    tables: RwLock<HashMap<u64, Arc<L2Table>>>,
    /// Insertion order, for FIFO eviction.
    order: Mutex<VecDeque<u64>>,
    capacity: usize,
    /// Tables marked dirty and not yet written back.
    pub pinned: AtomicUsize,
}

impl L2Cache {
    pub fn new(capacity: usize) -> L2Cache {
        L2Cache {
            tables: RwLock::new(HashMap::new()),
            order: Mutex::new(VecDeque::new()),
            capacity: capacity.max(2),
            pinned: AtomicUsize::new(0),
        }
    }

    /// The table at file offset `offset`, read with `load` on a miss.
    pub fn get(&self, offset: u64, load: impl FnOnce() -> Result<L2Table>) -> Result<Arc<L2Table>> {
        let Some(tables) = self.read() else {
            return Ok(Arc::new(load()?));
        };
        if let Some(t) = tables.get(&offset) {
            return Ok(t.clone());
        }
        drop(tables);
        let table = Arc::new(load()?);
        // A reader's insert is skipped when the lock is busy.
        match self.tables.try_write() {
            Ok(tables) => Ok(self.insert_locked(tables, offset, table)),
            Err(_) => Ok(table),
        }
    }

    /// Inserts `table` (unless another thread did first: that one is kept
    /// and returned), evicting the oldest clean tables past the capacity.
    pub fn insert(&self, offset: u64, table: Arc<L2Table>) -> Arc<L2Table> {
        let tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        self.insert_locked(tables, offset, table)
    }

    fn insert_locked(
        &self,
        mut tables: std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<L2Table>>>,
        offset: u64,
        table: Arc<L2Table>,
    ) -> Arc<L2Table> {
        if let Some(t) = tables.get(&offset) {
            return t.clone();
        }
        tables.insert(offset, table.clone());
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        order.push_back(offset);
        let mut tries = order.len();
        while tables.len() > self.capacity && tries > 0 {
            tries -= 1;
            let Some(old) = order.pop_front() else { break };
            match tables.get(&old) {
                Some(t) if t.dirty.load(Ordering::Acquire) || old == offset => order.push_back(old),
                Some(_) => {
                    tables.remove(&old);
                }
                None => {}
            }
        }
        table
    }

    /// The read lock; `None` (read the file instead) when it stays busy and
    /// no table is dirty.
    fn read(&self) -> Option<RwLockReadGuard<'_, HashMap<u64, Arc<L2Table>>>> {
        for _ in 0..64 {
            match self.tables.try_read() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => std::thread::yield_now(),
            }
        }
        if self.pinned.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.tables.read().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock held by a thread that will never release it (a forked child
    /// inherits it so) does not block a reader while nothing is dirty.
    #[test]
    fn busy_lock_reads_the_file_when_nothing_is_dirty() {
        let cache = L2Cache::new(4);
        let raw = 7u64.to_be_bytes().repeat(4);
        cache.insert(512, Arc::new(L2Table::from_bytes(&raw)));
        let held = cache.tables.write().unwrap();
        let t = cache
            .get(512, || Ok(L2Table::from_bytes(&9u64.to_be_bytes())))
            .unwrap();
        assert_eq!(t.word(0), 9, "read from the file, uncached");
        drop(held);
        assert_eq!(cache.get(512, || unreachable!()).unwrap().word(0), 7);
    }
}
