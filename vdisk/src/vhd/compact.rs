//! Offline compaction of a dynamic or differencing VHD: blocks (bitmap +
//! data) move down into free space, a round at a time (see
//! `crate::relocate`): copied, synced, BAT entries committed and synced;
//! then the footer moves to just past the last block and the file is cut.

use std::sync::atomic::Ordering;

use super::VhdImage;
use crate::Result;
use crate::bytes::align_up;

/// Blocks per round (each round costs two barriers).
const ROUND: usize = 256;

impl VhdImage {
    pub(super) fn relocate_blocks(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        let Some(s) = &self.sparse else {
            return Ok(0);
        };
        if !self.storage.is_writable() {
            return Err(crate::Error::ReadOnly);
        }
        self.repair_checksums()?;
        self.commit_sparse(s)?;
        self.storage.sync()?;
        // Holes are found from the BAT below; freed places would go stale
        // as blocks move and the file shrinks.
        *s.freed() = Default::default();
        let span = s.bitmap_size + s.block_size;
        // Blocks start on sectors: a hole left by a block written by another
        // tool (qemu does not align data to DATA_ALIGN) must fit its size.
        let place = |pos: u64| align_up(pos, 512);
        let total = s.bat.allocated().count() as u64;
        let mut moved = 0u64;
        loop {
            let blocks: Vec<(u64, u64)> = s.bat.allocated().map(|(b, o)| (b as u64, o)).collect();
            let mut used = s.structures.clone();
            used.extend(blocks.iter().map(|&(_, o)| (o, o + span)));
            let moves = crate::relocate::round(&blocks, &used, span, place, ROUND);
            if moves.is_empty() {
                break;
            }
            let mut buf = vec![0u8; span as usize];
            for m in &moves {
                self.storage.read_exact_at(&mut buf, m.from)?;
                self.storage.write_all_at(&buf, m.to)?;
            }
            // Copies durable, then the entries (commit's barrier), then durable.
            self.storage.sync()?;
            for m in &moves {
                s.bat.stage(m.id as usize, m.to)?;
            }
            self.commit_sparse(s)?;
            self.storage.sync()?;
            moved += moves.len() as u64;
            progress(moved, total);
        }
        // The footer goes right after the last block (or the structures).
        let end = s
            .bat
            .allocated()
            .map(|(_, o)| o + span)
            .chain(s.structures.iter().map(|&(_, e)| e))
            .max()
            .unwrap_or(0);
        s.next_free.store(end, Ordering::Release);
        self.trim_reservation(s)?;
        Ok(moved)
    }
}
