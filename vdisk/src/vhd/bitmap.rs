//! The per-block sector bitmap: bit set = sector stored in this file. Bits are
//! MSB first (byte 0, bit 7 is sector 0), unlike VHDX.

/// Bytes of bitmap in front of a block of `block_size` bytes: one bit per
/// sector, padded to a whole sector.
pub fn bitmap_size(block_size: u32) -> u32 {
    (block_size / 512).div_ceil(8).div_ceil(512) * 512
}

pub fn is_set(bits: &[u8], sector: u32) -> bool {
    bits[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
}

/// The state of `first` and how many sectors from it, at most `max` (and at
/// most to the end of the bitmap), share it.
pub fn run(bits: &[u8], first: u32, max: u32) -> (bool, u32) {
    let max = max.min((bits.len() as u32 * 8).saturating_sub(first));
    let state = is_set(bits, first);
    let mut n = 1;
    while n < max {
        let s = first + n;
        // Whole bytes at once where possible.
        if s.is_multiple_of(8) && n + 8 <= max {
            let byte = bits[(s / 8) as usize];
            if byte == if state { 0xFF } else { 0 } {
                n += 8;
                continue;
            }
        }
        if is_set(bits, s) != state {
            break;
        }
        n += 1;
    }
    (state, n)
}

/// Sets the bits of sectors `first..first + count`.
pub fn set_range(bits: &mut [u8], first: u32, count: u32) {
    for s in first..first + count {
        bits[(s / 8) as usize] |= 0x80 >> (s % 8);
    }
}

/// Whether every one of `sectors` bits is set.
pub fn is_full(bits: &[u8], sectors: u32) -> bool {
    run(bits, 0, sectors) == (true, sectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_first_runs() {
        let mut bits = [0u8; 64];
        set_range(&mut bits, 3, 20);
        assert_eq!(bits[0], 0b0001_1111);
        assert_eq!(run(&bits, 0, 512), (false, 3));
        assert_eq!(run(&bits, 3, 512), (true, 20));
        assert_eq!(run(&bits, 23, 512), (false, 489));
        assert_eq!(run(&bits, 5, 4), (true, 4));
        assert!(!is_full(&bits, 512));
        set_range(&mut bits, 0, 512);
        assert!(is_full(&bits, 512));
    }

    #[test]
    fn sizes() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
    }
}

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Recently read bitmaps of partly written blocks, so that reads of such a
/// block do not re-read its bitmap each time (full blocks need no bitmap at
/// all). Bounded to about 1 MiB. Only `try_lock` is used: a busy cache is a
/// miss, so it never blocks a reader, nor a child after fork.
pub struct BitmapCache {
    map: Mutex<HashMap<usize, Arc<[u8]>>>,
    max_entries: usize,
    /// Bumped by every bitmap write: a bitmap read before a write must not be
    /// cached after it.
    generation: AtomicU64,
    /// A write could not take the lock to drop its entry: clear everything
    /// at the next use instead.
    stale: AtomicBool,
}

impl BitmapCache {
    pub fn new(bitmap_size: u64) -> BitmapCache {
        BitmapCache {
            map: Mutex::new(HashMap::new()),
            max_entries: ((1 << 20) / bitmap_size.max(1)).max(16) as usize,
            generation: AtomicU64::new(0),
            stale: AtomicBool::new(false),
        }
    }

    /// Call before reading a bitmap from the file; pass the result to `put`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn locked(&self) -> Option<std::sync::MutexGuard<'_, HashMap<usize, Arc<[u8]>>>> {
        let mut map = self.map.try_lock().ok()?;
        if self.stale.swap(false, Ordering::AcqRel) {
            map.clear();
        }
        Some(map)
    }

    pub fn get(&self, block: usize) -> Option<Arc<[u8]>> {
        self.locked()?.get(&block).cloned()
    }

    /// Caches `bits` of `block`, read from the file at `generation`.
    pub fn put(&self, block: usize, bits: Arc<[u8]>, generation: u64) {
        let Some(mut map) = self.locked() else { return };
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.max_entries {
            map.clear();
        }
        map.insert(block, bits);
    }

    /// After writing `block`'s bitmap to the file.
    pub fn written(&self, block: usize) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        match self.map.try_lock() {
            Ok(mut map) => {
                map.remove(&block);
            }
            Err(_) => self.stale.store(true, Ordering::Release),
        }
    }
}

/// Bitmap changes of allocated blocks, kept in memory until the next commit
/// (group commit). Setting a sector's bit on the disk before its data is
/// durable would, after a power cut, show zeros or stale bytes where the
/// parent's data (or older data) was: so bitmaps are written after the
/// commit's barrier, like BAT entries. Reads look here first.
#[derive(Default)]
pub struct PendingBitmaps {
    map: Mutex<HashMap<usize, Arc<[u8]>>>,
    /// Entries in `map`: reads of partly written blocks skip the lock while 0.
    count: AtomicU64,
}

impl PendingBitmaps {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<[u8]>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bitmap of `block` as it will be committed, if it changed.
    pub fn get(&self, block: usize) -> Option<Arc<[u8]>> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.lock().get(&block).cloned()
    }

    /// Records `block`'s new bitmap.
    pub fn stage(&self, block: usize, bits: Arc<[u8]>) {
        let mut map = self.lock();
        map.insert(block, bits);
        self.count.store(map.len() as u64, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every pending bitmap (a copy: they stay visible until `committed`).
    pub fn snapshot(&self) -> Vec<(usize, Arc<[u8]>)> {
        self.lock()
            .iter()
            .map(|(&b, bits)| (b, bits.clone()))
            .collect()
    }

    /// Drops the entries of `done` that were not staged again since.
    pub fn committed(&self, done: &[(usize, Arc<[u8]>)]) {
        let mut map = self.lock();
        for (b, bits) in done {
            if map.get(b).is_some_and(|now| Arc::ptr_eq(now, bits)) {
                map.remove(b);
            }
        }
        self.count.store(map.len() as u64, Ordering::Release);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn a_write_invalidates_and_a_stale_read_is_not_cached() {
        let c = BitmapCache::new(512);
        let g = c.generation();
        c.put(3, Arc::from(vec![1u8; 512]), g);
        assert_eq!(c.get(3).unwrap()[0], 1);
        c.written(3);
        assert!(c.get(3).is_none());
        // Read before a write, put after it: refused.
        let g = c.generation();
        c.written(3);
        c.put(3, Arc::from(vec![2u8; 512]), g);
        assert!(c.get(3).is_none());
        // A write that finds the lock busy clears the cache at the next use.
        let g = c.generation();
        c.put(4, Arc::from(vec![4u8; 512]), g);
        {
            let _busy = c.map.lock().unwrap();
            c.written(4);
        }
        assert!(c.get(4).is_none());
    }

    #[test]
    fn bounded() {
        let c = BitmapCache::new(512 * 1024);
        for b in 0..100 {
            c.put(b, Arc::from(vec![0u8; 8]), c.generation());
        }
        assert!(c.map.lock().unwrap().len() <= 16);
    }
}
