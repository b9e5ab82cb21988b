//! Discard and zeroing on a [`Disk`]: the range reads as zeros afterwards
//! (never stale data, never a parent's), and whole blocks give their space
//! back where the format can. Also zero detection on the allocation path.

use std::sync::atomic::Ordering;

use super::Disk;
use crate::{Error, Image, Mapping, Result, Zeroing};

/// Writes of at least this size that are all zeros take the zeroing path
/// even over allocated data (whole blocks of every format are at least
/// this large): smaller overwrites are never scanned.
const UNMAP_CHECK: usize = 1 << 20;

/// Zeros are written in pieces of at most this size: a multiple of every
/// allocation unit a format's `write` treats whole (qcow2 clusters up to
/// 2 MiB), so that an aligned zero range reaches it as whole units.
const ZERO_CHUNK: u64 = 4 << 20;

/// Whether every byte of `buf` is zero (whole 64-byte chunks at a time).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// The generic discard: zeros written through [`Image::write`]. With
/// `punch`, the runs the layer stores in place ([`Image::map_for_overwrite`]
/// says `Data`) are zeroed there instead ([`Image::zero_data`]: holes in the
/// container where the file system can).
pub(crate) fn zero_fill<I: Image + ?Sized>(
    image: &I,
    offset: u64,
    len: u64,
    punch: bool,
    parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = ZERO_CHUNK.min(end - pos);
        if punch {
            let (mapping, run) = image.map_for_overwrite(pos, n)?;
            if let Mapping::Data { file_offset } = mapping {
                image.zero_data(file_offset, run, true)?;
                pos += run;
                continue;
            }
            if mapping != Mapping::Zero {
                image.write(&zeros[..run as usize], pos, parent)?;
            }
            pos += run;
            continue;
        }
        image.write(&zeros[..n as usize], pos, parent)?;
        pos += n;
    }
    Ok(())
}

impl Disk {
    /// BLKDISCARD, fallocate(PUNCH_HOLE): afterwards the range reads as
    /// zeros; whole blocks give their space back where the format can.
    /// `offset` and `len` are multiples of the logical sector size.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    /// BLKZEROOUT, fallocate(ZERO_RANGE): afterwards the range reads as
    /// zeros. Without `may_unmap`, blocks the top image holds keep their
    /// space (zeros are written into them); blocks it does not hold get the
    /// format's zero state rather than new space.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_range(offset, len, may_unmap)
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        if !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        let ss = self.logical_sector_size() as u64;
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("discard of {len} bytes at {offset} is not aligned to {ss}-byte sectors"),
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let _serial = self.write_lock.write().unwrap_or_else(|e| e.into_inner());
        self.writes_begun.store(true, Ordering::Release);
        let parent = |b: &mut [u8], off: u64| self.read_layer(1, b, off);
        // A zeroing that keeps space (BLKZEROOUT's NOUNMAP) punches nothing.
        let how = Zeroing {
            unmap,
            punch: unmap && self.punch_holes,
        };
        let done = self.layers[0].discard(offset, len, how, &parent);
        self.dirty.store(true, Ordering::Release);
        done
    }

    /// Whether an aligned write must skip the in-place overwrite: a large
    /// all-zero write may unmap whole blocks instead.
    pub(super) fn unmaps_zeros(buf: &[u8]) -> bool {
        buf.len() >= UNMAP_CHECK && is_zero(buf)
    }

    /// The whole sectors of a write on the allocation path (under the
    /// exclusive lock). Zeros allocate nothing where the disk reads zeros
    /// already; in a base image whole zero blocks are unmapped.
    pub(super) fn write_whole_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !is_zero(buf) {
            return self.write_top(buf, offset);
        }
        let parent = |b: &mut [u8], off: u64| self.read_layer(1, b, off);
        let top = &self.layers[0];
        let how = Zeroing {
            unmap: true,
            punch: self.punch_holes,
        };
        if self.layers.len() == 1 {
            return top.discard(offset, buf.len() as u64, how, &parent);
        }
        // A child: where it holds nothing and the parent reads zeros, there
        // is nothing to do; elsewhere zeros are written (or a zero state set).
        let mut runs = Vec::new();
        self.each_run(0, offset, buf.len(), |at, mapping, n| {
            runs.push((at as u64, mapping, n as u64));
            Ok(true)
        })?;
        let mut tmp = Vec::new();
        for (at, mapping, n) in runs {
            let off = offset + at;
            if mapping == Mapping::Zero {
                continue;
            }
            if mapping == Mapping::Unallocated {
                tmp.resize(n as usize, 0);
                self.read_layer(1, &mut tmp, off)?;
                if is_zero(&tmp) {
                    continue;
                }
            }
            top.discard(off, n, how, &parent)?;
        }
        Ok(())
    }
}
