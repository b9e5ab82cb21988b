//! What a range of the virtual disk is made of, through the whole chain: the
//! allocation map that NBD block status (`base:allocation`) reports.

use crate::{Disk, Error, Mapping, Result};

/// How a run of the virtual disk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in some layer.
    Data,
    /// Zeros stored by no layer: unallocated through the whole chain, past
    /// the end of a smaller parent, or marked zero in a layer above the data.
    Hole,
}

impl Disk {
    /// The allocation of the run starting at `offset` of at most `len` bytes
    /// (`len > 0`, inside the disk): the kind and the run's length, `1..=len`.
    pub fn map_allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let in_disk = self.size().saturating_sub(offset);
        if len == 0 || len > in_disk {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            });
        }
        self.map_layer(0, offset, len)
    }

    fn map_layer(&self, level: usize, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let Some(image) = self.layers().get(level) else {
            return Ok((Allocation::Hole, len));
        };
        let inside = image.virtual_size().saturating_sub(offset);
        if inside == 0 {
            return Ok((Allocation::Hole, len));
        }
        let want = len.min(inside);
        let (mapping, run) = image.map(offset, want)?;
        if run == 0 || run > want {
            return Err(Error::corrupt(
                "mapping",
                format!("layer {level} mapped {run} bytes of {want}"),
            ));
        }
        match mapping {
            Mapping::Data { .. } | Mapping::Compressed => Ok((Allocation::Data, run)),
            Mapping::Zero => Ok((Allocation::Hole, run)),
            Mapping::Unallocated => self.map_layer(level + 1, offset, run),
        }
    }
}
