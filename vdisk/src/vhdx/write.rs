//! Writing a VHDX: the session's header update, block allocation, and the
//! group commit of BAT changes through the log (see the module comment of
//! `vhdx`).

use super::{Guid, MIB, State, VhdxImage, bat, log};
use crate::bytes::{align_up, put_le64};
use crate::{Error, Image, Mapping, Result};

impl VhdxImage {
    /// Before the first write of a session: new FileWriteGuid and DataWriteGuid.
    pub(super) fn begin_session(&self, st: &mut State) -> Result<()> {
        if st.data_guid_renewed {
            return Ok(());
        }
        let session = match st.session {
            Some(g) => g,
            None => Guid::random()?,
        };
        let data = match st.next_data_guid.take() {
            Some(g) => g,
            None => Guid::random()?,
        };
        st.headers.update(self.storage.as_ref(), |h| {
            h.file_write_guid = session;
            h.data_write_guid = data;
        })?;
        st.session = Some(session);
        st.data_guid_renewed = true;
        Ok(())
    }

    /// A new block at the end of the file, 1 MiB aligned; the file grows first.
    pub(super) fn allocate(&self) -> Result<u64> {
        let len = self.storage.len()?;
        let start = align_up(len, MIB).ok_or_else(|| Error::NoSpace("VHDX file offset".into()))?;
        let end = start
            .checked_add(self.layout.block_size)
            .ok_or_else(|| Error::NoSpace("VHDX file offset".into()))?;
        self.storage.set_len(end)?;
        Ok(start)
    }

    /// Writes `data` at `in_block` of block `b`; a block that is not fully
    /// present becomes so, its new BAT entry staged in memory.
    pub(super) fn write_block(
        &self,
        st: &mut State,
        b: u64,
        in_block: u64,
        data: &[u8],
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let l = &self.layout;
        let index = l.payload_index(b);
        let e = self.entry(index)?;
        let state = bat::state(e);
        if state == bat::FULLY_PRESENT {
            return Ok(self.storage.write_all_at(data, bat::offset(e) + in_block)?);
        }
        let start = b * l.block_size;
        let visible = l.block_size.min(self.meta.virtual_size - start);
        // A block freed by a discard holds old data: not fresh.
        let (target, fresh) = if state == bat::PARTIALLY_PRESENT {
            (bat::offset(e), false)
        } else if let Some(off) = st.reusable.pop() {
            // A reader may still hold the old mapping: the epoch tells it.
            self.reuse_epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (off, false)
        } else {
            (self.allocate()?, true)
        };
        // A fresh block reads zeros; only parent data must be copied into it.
        let zeros_before =
            state != bat::PARTIALLY_PRESENT && (state != bat::NOT_PRESENT || !l.has_parent);
        let (w_lo, w_hi) = (in_block, in_block + data.len() as u64);
        let mut tmp = Vec::new();
        let mut p = 0;
        while p < visible {
            let p_end = (p + MIB).min(visible);
            let (lo, hi) = (w_lo.max(p), w_hi.min(p_end));
            if lo == p && hi == p_end {
                self.storage.write_all_at(
                    &data[(p - w_lo) as usize..(p_end - w_lo) as usize],
                    target + p,
                )?;
            } else if fresh && zeros_before {
                if lo < hi {
                    self.storage.write_all_at(
                        &data[(lo - w_lo) as usize..(hi - w_lo) as usize],
                        target + lo,
                    )?;
                }
            } else {
                tmp.resize((p_end - p) as usize, 0);
                self.read_visible(&mut tmp, start + p, parent)?;
                if lo < hi {
                    tmp[(lo - p) as usize..(hi - p) as usize]
                        .copy_from_slice(&data[(lo - w_lo) as usize..(hi - w_lo) as usize]);
                }
                self.storage.write_all_at(&tmp, target + p)?;
            }
            p = p_end;
        }
        self.bat.set(index, bat::entry(bat::FULLY_PRESENT, target));
        st.pending
            .insert(self.bat.entry_offset(index) & !(log::SECTOR - 1));
        Ok(())
    }

    /// Reads what this layer shows at virtual `offset` (parent data included).
    pub(super) fn read_visible(
        &self,
        buf: &mut [u8],
        offset: u64,
        parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (m, run) = self.map(off, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + run as usize];
            match m {
                Mapping::Data { file_offset } => self.storage.read_exact_at(chunk, file_offset)?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => parent(chunk, off)?,
                Mapping::Compressed => self.read_compressed(chunk, off)?,
            }
            done += run as usize;
        }
        Ok(())
    }

    /// The part of the log one entry may use: entries alternate between
    /// the two halves (see the module comment).
    pub(super) fn log_half(&self) -> u64 {
        (self.log_region.length / 2) & !(log::SECTOR - 1)
    }

    /// Commits the pending BAT sectors through the log (MS-VHDX 2.3).
    pub(super) fn commit_pending(&self, st: &mut State) -> Result<()> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let capacity = log::capacity(self.log_half());
        if capacity == 0 {
            return Err(Error::unsupported(
                "VHDX file without a log cannot be written",
            ));
        }
        // Whole 4 KiB BAT sectors: the file's, with the entries in memory
        // (the truth, staged changes included) merged in.
        let first_entry = self.bat.region.offset;
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::with_capacity(st.pending.len());
        for &sector in &st.pending {
            let mut buf = vec![0u8; log::SECTOR as usize];
            self.storage.read_exact_at(&mut buf, sector)?;
            for i in 0..log::SECTOR / 8 {
                let at = sector + i * 8;
                if let Some(value) = at
                    .checked_sub(first_entry)
                    .and_then(|rel| self.bat.get(rel / 8))
                {
                    put_le64(&mut buf, (i * 8) as usize, value);
                }
            }
            sectors.push((sector, buf));
        }
        for group in sectors.chunks(capacity) {
            let guid = Guid::random()?;
            st.log_sequence += 1;
            let at = self.log_half() * (st.log_sequence % 2);
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            let entry = log::encode_entry(guid, st.log_sequence, at, self.storage.len()?, &refs);
            self.storage
                .write_all_at(&entry, self.log_region.offset + at)?;
            // The payload the entry points at, the entry, and the previous
            // commit's cleared LogGuid are durable before a header names it.
            self.storage.sync()?;
            st.headers
                .write_one(self.storage.as_ref(), |h| h.log_guid = guid)?;
            self.storage.sync()?;
            for (offset, data) in group {
                self.storage.write_all_at(data, *offset)?;
            }
            self.storage.sync()?;
            st.headers
                .write_one(self.storage.as_ref(), |h| h.log_guid = Guid::ZERO)?;
            for (offset, _) in group {
                st.pending.remove(offset);
            }
        }
        // The BAT sectors are durable (synced in place): blocks freed by
        // the changes committed here may now be reused.
        let freed = std::mem::take(&mut st.freed);
        st.reusable.extend(freed);
        Ok(())
    }
}
