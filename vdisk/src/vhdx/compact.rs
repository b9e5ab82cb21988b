//! Offline compaction of a VHDX: payload blocks move down into free 1 MiB
//! aligned space, a round at a time (see `crate::relocate`): copied and
//! synced, then their BAT entries committed through the log (which makes
//! them durable); at the end the log's cleared GUID is made durable and the
//! file is cut after the last block or structure.

use super::{MIB, VhdxImage, bat};
use crate::bytes::align_up;
use crate::{Error, Result};

/// File extents in use (start, end), and payload blocks (BAT index, offset).
type Extents = (Vec<(u64, u64)>, Vec<(u64, u64)>);

impl VhdxImage {
    /// Extents in use: header area, log, regions, sector bitmap blocks and
    /// payload blocks; and the payload blocks as (index, offset).
    fn used_extents(&self) -> Result<Extents> {
        let l = &self.layout;
        let mut used = vec![
            (0, MIB),
            (self.log_region.offset, self.log_region.end()),
            (self.regions.bat.offset, self.regions.bat.end()),
            (self.regions.metadata.offset, self.regions.metadata.end()),
        ];
        let mut blocks = Vec::new();
        for b in 0..l.payload_blocks {
            let index = l.payload_index(b);
            let e = self.entry(index)?;
            if matches!(bat::state(e), bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                blocks.push((index, bat::offset(e)));
                used.push((bat::offset(e), bat::offset(e) + l.block_size));
            }
        }
        if l.has_parent {
            for k in 0..l.bitmap_blocks {
                if let Some(e) = self.bat.get(l.bitmap_index(k))
                    && bat::state(e) == bat::SB_BLOCK_PRESENT
                {
                    used.push((bat::offset(e), bat::offset(e) + MIB));
                }
            }
        }
        Ok((used, blocks))
    }

    pub(super) fn relocate_blocks(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.meta.leave_blocks_allocated {
            return Ok(0);
        }
        let mut st = self.lock();
        self.begin_session(&mut st)?;
        self.commit_pending(&mut st)?;
        self.storage.sync()?;
        // Holes are found from the BAT below; the list of reusable blocks
        // would go stale as blocks move and the file shrinks.
        st.reusable.clear();
        let bs = self.layout.block_size;
        // Entries per round: well inside what one log entry holds.
        let max = (super::log::capacity(self.log_half()) * 64).clamp(1, 4096);
        let total = self.used_extents()?.1.len() as u64;
        let mut moved = 0u64;
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let (used, blocks) = self.used_extents()?;
            let moves = crate::relocate::round(&blocks, &used, bs, |p| align_up(p, MIB), max);
            if moves.is_empty() {
                break;
            }
            let file_len = self.storage.len()?;
            for m in &moves {
                let n = bs.min(file_len.saturating_sub(m.from));
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(MIB) as usize;
                    self.storage.read_exact_at(&mut buf[..k], m.from + done)?;
                    self.storage.write_all_at(&buf[..k], m.to + done)?;
                    done += k as u64;
                }
            }
            for m in &moves {
                let state = bat::state(self.entry(m.id)?);
                self.bat.set(m.id, bat::entry(state, m.to));
                st.pending
                    .insert(self.bat.entry_offset(m.id) & !(super::log::SECTOR - 1));
            }
            // The log entry's first barrier makes the copies durable before
            // anything names them; the commit syncs the BAT in place.
            self.commit_pending(&mut st)?;
            moved += moves.len() as u64;
            progress(moved, total);
        }
        let (used, _) = self.used_extents()?;
        let end = used.iter().map(|&(_, e)| e).max().unwrap_or(MIB);
        let end = align_up(end, MIB).unwrap_or(end);
        if self.storage.len()? > end {
            // The cleared log GUID is durable before the file shrinks: an
            // old log entry names a longer file.
            self.storage.sync()?;
            self.storage.set_len(end)?;
        }
        Ok(moved)
    }
}
