//! Sparse extent headers: hosted `KDMV` (VMware "Virtual Disk Format 1.1",
//! SparseExtentHeader) and ESX `COWD` (VMFSSPARSE, qemu's VMDK3Header).
//! All fields little-endian; offsets and sizes in 512-byte sectors.
//!
//! KDMV: magic 0, version 4, flags 8, capacity 12, grainSize 20,
//! descriptorOffset 28, descriptorSize 36, numGTEsPerGT 44, rgdOffset 48,
//! gdOffset 56, overHead 64, uncleanShutdown 72, newline check bytes 73..77
//! ("\n \r\n"), compressAlgorithm 77.
//!
//! COWD: magic 0, version 4, flags 8, numSectors 12, grainSize 16,
//! gdOffset 20, numGDEntries 24, freeSector 28; 4096 entries per table.

use crate::bytes::{le16, le32, le64, put_le16, put_le32, put_le64};
use crate::{Error, Result};

pub const KDMV: &[u8; 4] = b"KDMV";
pub const COWD: &[u8; 4] = b"COWD";
pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` of a stream-optimized file whose directory is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
pub const COMPRESSION_DEFLATE: u16 = 1;
/// Largest grain accepted (1 GiB, as qemu): a grain is one buffer.
pub const MAX_GRAIN_SECTORS: u64 = 1 << 21;
/// Largest grain directory accepted, in entries (qemu's bound).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
const COWD_GTES: u32 = 4096;
/// The check bytes after `uncleanShutdown`: a file moved through a text-mode
/// transfer has them mangled.
pub const NEWLINE_BYTES: [u8; 4] = *b"\n \r\n";

/// A parsed sparse extent header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// ESX `COWD` rather than hosted `KDMV`.
    pub cowd: bool,
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub compress: u16,
}

impl SparseHeader {
    /// Parses the first sector of a sparse extent.
    pub fn parse(b: &[u8]) -> Result<SparseHeader> {
        let bad = |d: String| Error::corrupt("VMDK sparse header", d);
        if b.len() < 512 {
            return Err(bad("shorter than a sector".into()));
        }
        let h = if &b[..4] == KDMV {
            SparseHeader {
                cowd: false,
                version: le32(b, 4),
                flags: le32(b, 8),
                capacity: le64(b, 12),
                grain_sectors: le64(b, 20),
                desc_offset: le64(b, 28),
                desc_size: le64(b, 36),
                gtes_per_gt: le32(b, 44),
                rgd_offset: le64(b, 48),
                gd_offset: le64(b, 56),
                overhead: le64(b, 64),
                compress: le16(b, 77),
            }
        } else if &b[..4] == COWD {
            SparseHeader {
                cowd: true,
                version: le32(b, 4),
                flags: le32(b, 8),
                capacity: le32(b, 12) as u64,
                grain_sectors: le32(b, 16) as u64,
                desc_offset: 0,
                desc_size: 0,
                gtes_per_gt: COWD_GTES,
                rgd_offset: 0,
                gd_offset: le32(b, 20) as u64,
                overhead: 0,
                compress: 0,
            }
        } else {
            return Err(bad("no KDMV or COWD magic".into()));
        };
        if !h.cowd && !(1..=3).contains(&h.version) {
            return Err(Error::unsupported(format!(
                "VMDK sparse extent version {}",
                h.version
            )));
        }
        if h.grain_sectors == 0 || h.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(bad(format!("grain size of {} sectors", h.grain_sectors)));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > COWD_GTES {
            return Err(bad(format!("{} entries per grain table", h.gtes_per_gt)));
        }
        if !h.cowd
            && (h.compress > COMPRESSION_DEFLATE
                || (h.flags & FLAG_COMPRESSED != 0 && h.compress == 0))
        {
            return Err(Error::unsupported(format!(
                "VMDK compression algorithm {}",
                h.compress
            )));
        }
        // Cowd directories hold their count; a KDMV one follows from the capacity.
        if h.cowd && (le32(b, 24) as u64) < h.gd_entries() {
            return Err(bad(format!(
                "{} directory entries for {} sectors",
                le32(b, 24),
                h.capacity
            )));
        }
        if h.gd_entries() > MAX_GD_ENTRIES {
            return Err(bad(format!("{} grain directory entries", h.gd_entries())));
        }
        Ok(h)
    }

    pub fn compressed(&self) -> bool {
        !self.cowd && (self.flags & FLAG_COMPRESSED != 0 || self.compress == COMPRESSION_DEFLATE)
    }
    pub fn has_markers(&self) -> bool {
        !self.cowd && self.flags & FLAG_MARKERS != 0
    }
    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * 512
    }
    /// Sectors one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_sectors * self.gtes_per_gt as u64
    }
    pub fn gd_entries(&self) -> u64 {
        self.capacity.div_ceil(self.gt_coverage())
    }

    /// The KDMV sector (the first of a hosted sparse file and its footer).
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(KDMV);
        put_le32(&mut b, 4, self.version);
        put_le32(&mut b, 8, self.flags);
        put_le64(&mut b, 12, self.capacity);
        put_le64(&mut b, 20, self.grain_sectors);
        put_le64(&mut b, 28, self.desc_offset);
        put_le64(&mut b, 36, self.desc_size);
        put_le32(&mut b, 44, self.gtes_per_gt);
        put_le64(&mut b, 48, self.rgd_offset);
        put_le64(&mut b, 56, self.gd_offset);
        put_le64(&mut b, 64, self.overhead);
        b[73..77].copy_from_slice(&NEWLINE_BYTES);
        put_le16(&mut b, 77, self.compress);
        b
    }
}

/// Marker types of stream-optimized files (a marker is a sector: u64 value,
/// u32 size 0, u32 type).
pub const MARKER_EOS: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;

/// Parses a metadata marker sector: (value, type), or `None` if the sector
/// is a grain marker (its size is not 0).
pub fn marker(b: &[u8]) -> Option<(u64, u32)> {
    (b.len() >= 16 && le32(b, 8) == 0).then(|| (le64(b, 0), le32(b, 12)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosted() -> SparseHeader {
        SparseHeader {
            cowd: false,
            version: 1,
            flags: FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT,
            capacity: 10 << 20,
            grain_sectors: 128,
            desc_offset: 1,
            desc_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 663,
            overhead: 1408,
            compress: 0,
        }
    }

    #[test]
    fn round_trip_and_sizes() {
        let h = hosted();
        assert_eq!(SparseHeader::parse(&h.encode()).unwrap(), h);
        assert_eq!(h.gd_entries(), 160);
        assert_eq!(h.grain_bytes(), 65536);
    }

    #[test]
    fn bad_headers_are_refused() {
        for f in [
            |h: &mut SparseHeader| h.grain_sectors = 0,
            |h: &mut SparseHeader| h.gtes_per_gt = 0,
            |h: &mut SparseHeader| h.version = 4,
            |h: &mut SparseHeader| h.compress = 7,
            |h: &mut SparseHeader| {
                h.grain_sectors = 1;
                h.gtes_per_gt = 1;
                h.capacity = u64::MAX;
            },
        ] {
            let mut h = hosted();
            f(&mut h);
            assert!(SparseHeader::parse(&h.encode()).is_err(), "{h:?}");
        }
        assert!(SparseHeader::parse(&[0u8; 512]).is_err());
    }
}
