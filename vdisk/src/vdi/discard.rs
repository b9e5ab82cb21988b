//! Discard in a VDI. Whole blocks lose their slot: FREE in a base image,
//! ZERO in a child (both read zeros); the slots are given back at the next
//! commit (flush or close), so a batch of discards costs one round. VDI slots must stay dense, as
//! VirtualBox keeps them: qemu and VirtualBox allocate at the header's
//! count, and `qemu-img check` calls a count above the slots in use a
//! corruption. So, as VirtualBox's own discard does, the blocks in the last
//! slots move down into the freed ones, and the file is cut at close.
//!
//! Crash order: the freed entries are committed and made durable first (until
//! then a freed slot may still be named on the disk and must keep its data);
//! then the moved blocks are copied and made durable; then their entries
//! switch (committed, durable); only then does the header count drop. A
//! crash in between leaves at worst unused slots below the count: a leak the
//! next writable open takes back (its first flush after a write gives the
//! slots back). Until then `qemu-img check` calls the image corrupt
//! ("allocated blocks mismatch"), even after a plain kill: with dense slots,
//! every give-back changes two entries and the header count, and no order
//! of single writes keeps the count equal to the slots in use at every
//! moment (each step must also be durable before the next for power loss).

use std::sync::atomic::Ordering;

use super::block_map::Entry;
use super::header::ImageType;
use super::{COPY_CHUNK, State, VdiImage};
use crate::{Error, Result, Zeroing};

impl VdiImage {
    pub(super) fn discard_range(
        &self,
        offset: u64,
        len: u64,
        how: Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if !self.storage.is_writable() {
            return Err(Error::ReadOnly);
        }
        let mut st = self.state();
        self.mark_modified(&mut st)?;
        // A fixed image keeps its slots.
        let unmap = how.unmap && self.image_type != ImageType::Fixed;
        let zero_state = if self.parent.is_some() {
            Entry::Zero
        } else {
            Entry::Free
        };
        let bs = self.block_size;
        let end = offset + len;
        let mut freed = Vec::new(); // slots no longer used (given back at commit)
        let mut pos = offset;
        while pos < end {
            let (b, in_block) = (pos / bs, pos % bs);
            let used = bs.min(self.size - b * bs);
            let n = (used - in_block).min(end - pos);
            let whole = in_block == 0 && n == used;
            match self.map.get(b as usize) {
                Entry::Zero => {}
                Entry::Free if self.parent.is_none() => {}
                Entry::Slot(s) if whole && unmap => {
                    self.map.stage(b as usize, zero_state);
                    freed.push(s);
                }
                Entry::Slot(s) => {
                    let at = self.slot_offset(s) + in_block;
                    self.write_zeros(at, n, how.punch)?;
                }
                Entry::Free if whole => self.map.stage(b as usize, Entry::Zero),
                Entry::Free => {
                    let zeros = vec![0u8; n as usize];
                    self.allocate(&mut st, b, Entry::Free, in_block, &zeros, parent)?;
                }
            }
            pos += n;
        }
        // The slots are given back at the next commit (a flush, or close):
        // one round of barriers and moves for a whole batch of discards.
        st.holes |= !freed.is_empty();
        Ok(())
    }

    /// At a flush ([`crate::Image::reclaim`], with every other writer of
    /// the disk shut out): after discards freed slots, the blocks of the last
    /// slots move into them.
    pub(super) fn commit_with_holes(&self) -> Result<()> {
        let mut st = self.state();
        self.commit_state(&mut st)?;
        if st.holes {
            self.mark_modified(&mut st)?;
            self.give_back(&mut st, &mut |_, _| {})?;
        }
        Ok(())
    }

    fn write_zeros(&self, at: u64, n: u64, punch: bool) -> Result<()> {
        Ok(crate::storage::zero_file_range(
            self.storage.as_ref(),
            at,
            n,
            punch,
        )?)
    }

    /// Makes the freed slots unused on the disk, then fills the holes below
    /// the count with the blocks of the last slots (see the module comment).
    pub(super) fn give_back(
        &self,
        st: &mut State,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        self.commit_state(st)?;
        self.storage.sync()?;
        let mut owner: Vec<Option<u32>> = vec![None; st.next_slot as usize];
        for (b, e) in self.map.iter() {
            if let Entry::Slot(s) = e
                && let Some(o) = owner.get_mut(s as usize)
            {
                *o = Some(b as u32);
            }
        }
        // Readers take no lock: one that mapped a block into a freed slot
        // (or into a slot about to move) reads again when the epoch changed
        // across its read. Before any slot gets another block's data...
        self.slot_epoch.fetch_add(1, Ordering::SeqCst);
        let mut n = st.next_slot;
        let mut moves = Vec::new();
        let mut hole = 0u32;
        loop {
            while n > 0 && owner[n as usize - 1].is_none() {
                n -= 1;
            }
            while hole < n && owner[hole as usize].is_some() {
                hole += 1;
            }
            if hole >= n {
                break;
            }
            let last = n - 1;
            let Some(b) = owner[last as usize].take() else {
                break;
            };
            self.copy_slot(last, hole)?;
            owner[hole as usize] = Some(b);
            moves.push((b, hole));
            progress(moves.len() as u64, 0);
        }
        if !moves.is_empty() {
            self.storage.sync()?;
            for &(b, slot) in &moves {
                self.map.stage(b as usize, Entry::Slot(slot));
            }
            self.commit_state(st)?;
            self.storage.sync()?;
        }
        // ... and before the slots above `n` may be taken by new blocks.
        self.slot_epoch.fetch_add(1, Ordering::SeqCst);
        st.next_slot = n;
        st.free_slots.clear();
        st.gave_back = true;
        st.holes = false;
        st.header.blocks_allocated = n;
        self.write_header(&st.header)?;
        Ok(moves.len() as u64)
    }

    /// Offline compaction: fills every unused slot below the count (freed
    /// or leaked) with the blocks of the last slots, then cuts the file.
    pub(super) fn relocate_blocks(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        if !self.storage.is_writable() {
            return Err(Error::ReadOnly);
        }
        if self.image_type == ImageType::Fixed {
            return Ok(0);
        }
        let moved = {
            let mut st = self.state();
            self.mark_modified(&mut st)?;
            self.give_back(&mut st, progress)?
        };
        self.cut_tail()?;
        Ok(moved)
    }

    fn copy_slot(&self, from: u32, to: u32) -> Result<()> {
        let (src, dst) = (self.slot_offset(from), self.slot_offset(to));
        let mut buf = vec![0u8; COPY_CHUNK.min(self.block_size) as usize];
        let mut done = 0;
        while done < self.block_size {
            let k = (self.block_size - done).min(buf.len() as u64) as usize;
            self.storage.read_exact_at(&mut buf[..k], src + done)?;
            self.storage.write_all_at(&buf[..k], dst + done)?;
            done += k as u64;
        }
        Ok(())
    }

    /// At close: the file ends after the last slot in use (discards moved
    /// blocks down; their old places are cut only now, when no reader can
    /// still be reading them).
    pub(super) fn cut_tail(&self) -> Result<()> {
        let st = self.state();
        if !st.gave_back {
            return Ok(());
        }
        let extra = st.header.block_extra as u64;
        let Some(end) = st.header.slot_offset(st.next_slot).map(|o| o - extra) else {
            return Ok(());
        };
        if self.storage.len()? > end {
            self.storage.sync()?;
            self.storage.set_len(end)?;
        }
        Ok(())
    }
}
