//! How an image layer's blocks are used: allocated, holding only zeros
//! (space that a discard or `vhdio compact` gives back), from the format's
//! own table and the stored bytes.

use crate::{Image, Mapping, Result};

/// Block counts of one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockUsage {
    pub block_size: u64,
    /// Blocks of the virtual disk.
    pub blocks: u64,
    /// Blocks that store data in this layer's file.
    pub allocated: u64,
    /// Allocated blocks whose stored bytes are all zeros (only counted when asked).
    pub zero: u64,
}

/// Counts the blocks of `image` (None for formats without blocks). With
/// `scan`, reads every allocated block to count those holding only zeros.
pub fn block_usage(image: &dyn Image, scan: bool) -> Result<Option<BlockUsage>> {
    let Some(bs) = image.allocation_block() else {
        return Ok(None);
    };
    let size = image.virtual_size();
    let mut u = BlockUsage {
        block_size: bs,
        blocks: size.div_ceil(bs),
        ..Default::default()
    };
    let mut buf = Vec::new();
    for b in 0..u.blocks {
        let start = b * bs;
        let end = (start + bs).min(size);
        let mut pos = start;
        let (mut stored, mut zeros) = (false, true);
        while pos < end {
            let (m, n) = image.map(pos, end - pos)?;
            match m {
                Mapping::Data { file_offset } => {
                    stored = true;
                    if scan && zeros {
                        buf.resize(n as usize, 0);
                        image.read_data(&mut buf, file_offset)?;
                        zeros = crate::disk::is_zero(&buf);
                    }
                }
                // Stored, not as plain bytes (not scanned: counted as data).
                Mapping::Compressed => {
                    stored = true;
                    zeros = false;
                }
                Mapping::Zero | Mapping::Unallocated => {}
            }
            pos += n.max(1);
        }
        if stored {
            u.allocated += 1;
            if scan && zeros {
                u.zero += 1;
            }
        }
    }
    Ok(Some(u))
}
