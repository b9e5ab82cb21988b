//! Discard in a VHDX: whole blocks become PAYLOAD_BLOCK_ZERO (reads zeros in
//! a base image and in a child, in every reader), their BAT change staged
//! and committed through the log like an allocation's. The block's old file
//! space is reused by new blocks only once that BAT change is committed (a
//! crash before must still find the old data there); `vhdio compact` gives
//! the rest back. Parts of blocks get zeros written where they do not read
//! zeros.

use super::{State, VhdxImage, bat, log};
use crate::{Error, Result, Zeroing};

impl VhdxImage {
    pub(super) fn discard_range(
        &self,
        offset: u64,
        len: u64,
        how: Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let mut st = self.lock();
        self.begin_session(&mut st)?;
        // A fixed file keeps every block present.
        let how = Zeroing {
            unmap: how.unmap && !self.meta.leave_blocks_allocated,
            ..how
        };
        let bs = self.layout.block_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (b, in_block) = self.layout.block_of(pos);
            let visible = bs.min(self.meta.virtual_size - b * bs);
            let n = (visible - in_block).min(end - pos);
            self.discard_in_block(&mut st, b, (in_block, n), how, parent)?;
            pos += n;
        }
        if st.pending.len() >= log::capacity(self.log_half()) {
            self.commit_pending(&mut st)?;
        }
        Ok(())
    }

    fn discard_in_block(
        &self,
        st: &mut State,
        b: u64,
        (in_block, n): (u64, u64),
        how: Zeroing,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let unmap = how.unmap;
        let l = &self.layout;
        let index = l.payload_index(b);
        let e = self.entry(index)?;
        let state = bat::state(e);
        let visible = l.block_size.min(self.meta.virtual_size - b * l.block_size);
        let whole = in_block == 0 && n == visible;
        let reads_zeros = match state {
            bat::ZERO | bat::UNMAPPED | bat::UNMAPPED_V095 | bat::UNDEFINED => true,
            bat::NOT_PRESENT => !l.has_parent,
            _ => false,
        };
        if reads_zeros {
            return Ok(());
        }
        // Present data is kept (and zeroed) without `unmap`; a block that
        // shows its parent becomes ZERO either way: no space to keep.
        if whole && (unmap || state != bat::FULLY_PRESENT) {
            if matches!(state, bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT) {
                st.freed.push(bat::offset(e));
            }
            self.bat.set(index, bat::entry(bat::ZERO, 0));
            st.pending
                .insert(self.bat.entry_offset(index) & !(log::SECTOR - 1));
            return Ok(());
        }
        // Data of a present block stays in place: a hole where punching is on.
        if state == bat::FULLY_PRESENT {
            let at = bat::offset(e) + in_block;
            return Ok(crate::storage::zero_file_range(
                self.storage.as_ref(),
                at,
                n,
                how.punch,
            )?);
        }
        let zeros = vec![0u8; n.min(super::MIB) as usize];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(super::MIB);
            self.write_block(st, b, in_block + done, &zeros[..k as usize], parent)?;
            done += k;
        }
        Ok(())
    }
}
