//! A raw disk: the file is the disk, byte for byte. Not probed (any file is
//! raw); used for in-memory disks (partition tests, fuzzing) and available to
//! callers who know a file is raw.

use crate::{Format, Image, Mapping, Result, Storage};

pub struct RawImage {
    storage: Box<dyn Storage>,
    size: u64,
    sector_size: u32,
}

impl RawImage {
    /// A disk of the file's current length (rounded down to whole sectors).
    pub fn new(storage: Box<dyn Storage>, sector_size: u32) -> Result<RawImage> {
        let size = storage.len()? / sector_size as u64 * sector_size as u64;
        Ok(RawImage {
            storage,
            size,
            sector_size,
        })
    }
}

impl Image for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.sector_size
    }
    fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        Ok((
            Mapping::Data {
                file_offset: offset,
            },
            len,
        ))
    }
    fn write(
        &self,
        buf: &[u8],
        offset: u64,
        _parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        Ok(self.storage.write_all_at(buf, offset)?)
    }
    fn link_id(&self) -> [u8; 16] {
        [0; 16]
    }
}
