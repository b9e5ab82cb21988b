//! The VDI pre-header and header (little-endian), versions 1.1 (`cbHeader`
//! 0x180, or 0x190 with LCHS geometry) and the old 0.x layout.
//!
//! Offsets are absolute in the file. Version 1.1: type 0x4C, flags 0x50,
//! comment 0x54, offBlocks 0x154, offData 0x158, legacy geometry 0x15C, disk
//! size 0x170, block size 0x178, block extra 0x17C, blocks 0x180, allocated
//! 0x184, uuidCreate 0x188, uuidModify 0x198, uuidLinkage 0x1A8,
//! uuidParentModify 0x1B8, LCHS geometry 0x1C8. Version 0.x (0x00000002):
//! type 0x48, flags 0x4C, comment 0x50, geometry 0x150, disk size 0x160,
//! block size 0x168, blocks 0x16C, allocated 0x170, uuidCreate 0x174,
//! uuidModify 0x184, uuidLinkage 0x194; the block map follows at 0x1A4 and
//! the data follows the map, with no block extra and no parent-modify UUID.

use crate::bytes::{arr, le32, le64, put_le32, put_le64};
use crate::{Error, Geometry, Result};

/// Bytes 0..512 hold every header variant.
pub const HEADER_AREA: usize = 512;
/// Signature at 0x40.
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// Version 1.1 (major 1 is what VirtualBox checks).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// The old layout, accepted by VirtualBox as this exact value only.
pub const VERSION_0: u32 = 0x0000_0002;
/// `cbHeader` of version 1.1 and of 1.1 with LCHS geometry ("1.1+").
pub const V1_HEADER_SIZE: u32 = 0x180;
pub const V1_PLUS_HEADER_SIZE: u32 = 0x190;
/// The pre-header: 64 bytes of text, signature, version.
const PRE_HEADER: u64 = 72;
/// End of the 0.x header, where its block map starts.
const V0_END: u64 = 0x1A4;
/// Block sizes accepted: VirtualBox takes any power of two; writes copy whole
/// blocks, so a block must hold a sector and stay a sane size.
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 28;
/// Image flags VirtualBox knows: zero-expand (written as bit 0 by VBox's
/// creator, declared as 0x100 in its mask); both are harmless for reading.
const KNOWN_FLAGS: u32 = 0x0000_0101;
pub const SECTOR: u64 = 512;

/// `u32Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically growing ("normal").
    Normal,
    /// Preallocated ("static"); every block is allocated at creation.
    Fixed,
    /// Legacy undo image; VirtualBox treats it as normal.
    Undo,
    /// Differencing: FREE blocks read from the parent.
    Diff,
}

impl ImageType {
    fn from_u32(v: u32) -> Option<ImageType> {
        Some(match v {
            1 => ImageType::Normal,
            2 => ImageType::Fixed,
            3 => ImageType::Undo,
            4 => ImageType::Diff,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            ImageType::Normal => "dynamic",
            ImageType::Fixed => "fixed",
            ImageType::Undo => "undo",
            ImageType::Diff => "differencing",
        }
    }
}

/// Where the mutable fields live in the two layouts.
#[derive(Clone, Copy, Debug)]
struct Layout {
    disk_size: usize,
    allocated: usize,
    uuid_modify: usize,
}

const V1_LAYOUT: Layout = Layout {
    disk_size: 0x170,
    allocated: 0x184,
    uuid_modify: 0x198,
};
const V0_LAYOUT: Layout = Layout {
    disk_size: 0x160,
    allocated: 0x170,
    uuid_modify: 0x184,
};

/// A parsed and validated header. `raw` keeps the bytes so a rewrite changes
/// only the fields this library updates.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    /// `cbHeader` (0x180 or more) for 1.1; 0 for 0.x.
    pub header_size: u32,
    pub image_type: ImageType,
    pub flags: u32,
    pub blocks_offset: u64,
    pub data_offset: u64,
    /// Disk size as stored (may not be a multiple of 512, see `virtual_size`).
    pub disk_size: u64,
    pub block_size: u32,
    pub block_extra: u32,
    pub blocks: u32,
    pub blocks_allocated: u32,
    pub uuid_create: [u8; 16],
    pub uuid_modify: [u8; 16],
    pub uuid_linkage: [u8; 16],
    pub uuid_parent_modify: [u8; 16],
    pub legacy_geometry: [u32; 4],
    pub lchs_geometry: Option<[u32; 4]>,
    layout: Layout,
    /// End of the header fields this library knows (the bytes rewritten).
    end: usize,
    raw: [u8; HEADER_AREA],
}

fn geometry_at(b: &[u8], off: usize) -> [u32; 4] {
    [
        le32(b, off),
        le32(b, off + 4),
        le32(b, off + 8),
        le32(b, off + 12),
    ]
}

fn corrupt(detail: String) -> Error {
    Error::corrupt("VDI header", detail)
}

impl Header {
    /// Parses the first `HEADER_AREA` bytes of a file of `file_len` bytes
    /// (bytes past the end of a short file are zero) and validates every field
    /// against that length.
    pub fn parse(raw: &[u8; HEADER_AREA], file_len: u64) -> Result<Header> {
        if le32(raw, 0x40) != SIGNATURE {
            return Err(Error::NotAnImage);
        }
        let version = le32(raw, 0x44);
        let h = if version >> 16 == 1 {
            Self::parse_v1(raw, version)?
        } else if version == VERSION_0 {
            Self::parse_v0(raw)?
        } else {
            return Err(Error::unsupported(format!(
                "VDI header version {:#010x}",
                version
            )));
        };
        h.validate(file_len)?;
        Ok(h)
    }

    fn parse_v1(raw: &[u8; HEADER_AREA], version: u32) -> Result<Header> {
        let header_size = le32(raw, 0x48);
        if header_size < V1_HEADER_SIZE {
            return Err(corrupt(format!(
                "header size {header_size:#x} < {V1_HEADER_SIZE:#x}"
            )));
        }
        let lchs = header_size >= V1_PLUS_HEADER_SIZE;
        let known = if lchs {
            V1_PLUS_HEADER_SIZE
        } else {
            V1_HEADER_SIZE
        };
        Ok(Header {
            version,
            header_size,
            image_type: Self::image_type(le32(raw, 0x4C))?,
            flags: le32(raw, 0x50),
            blocks_offset: le32(raw, 0x154) as u64,
            data_offset: le32(raw, 0x158) as u64,
            legacy_geometry: geometry_at(raw, 0x15C),
            disk_size: le64(raw, 0x170),
            block_size: le32(raw, 0x178),
            block_extra: le32(raw, 0x17C),
            blocks: le32(raw, 0x180),
            blocks_allocated: le32(raw, 0x184),
            uuid_create: arr(raw, 0x188),
            uuid_modify: arr(raw, 0x198),
            uuid_linkage: arr(raw, 0x1A8),
            uuid_parent_modify: arr(raw, 0x1B8),
            lchs_geometry: lchs.then(|| geometry_at(raw, 0x1C8)),
            layout: V1_LAYOUT,
            end: PRE_HEADER as usize + known as usize,
            raw: *raw,
        })
    }

    fn parse_v0(raw: &[u8; HEADER_AREA]) -> Result<Header> {
        let blocks = le32(raw, 0x16C);
        Ok(Header {
            version: VERSION_0,
            header_size: 0,
            image_type: Self::image_type(le32(raw, 0x48))?,
            flags: le32(raw, 0x4C),
            blocks_offset: V0_END,
            data_offset: V0_END + blocks as u64 * 4,
            legacy_geometry: geometry_at(raw, 0x150),
            disk_size: le64(raw, 0x160),
            block_size: le32(raw, 0x168),
            block_extra: 0,
            blocks,
            blocks_allocated: le32(raw, 0x170),
            uuid_create: arr(raw, 0x174),
            uuid_modify: arr(raw, 0x184),
            uuid_linkage: arr(raw, 0x194),
            uuid_parent_modify: [0; 16],
            lchs_geometry: None,
            layout: V0_LAYOUT,
            end: V0_END as usize,
            raw: *raw,
        })
    }

    fn image_type(v: u32) -> Result<ImageType> {
        ImageType::from_u32(v).ok_or_else(|| Error::unsupported(format!("VDI image type {v}")))
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::unsupported(format!(
                "VDI image flags {:#x}",
                self.flags
            )));
        }
        if (self.end as u64) > file_len {
            return Err(corrupt(format!(
                "file of {file_len} bytes is shorter than the header"
            )));
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(corrupt(format!("block size {bs}")));
        }
        if self.block_extra != 0 && !self.block_extra.is_power_of_two() {
            return Err(corrupt(format!("block extra {}", self.block_extra)));
        }
        if self.disk_size == 0 || self.blocks == 0 {
            return Err(corrupt(format!(
                "disk size {}, {} blocks",
                self.disk_size, self.blocks
            )));
        }
        // u32 * u32 cannot overflow a u64.
        if (bs as u64) * (self.blocks as u64) < self.disk_size {
            return Err(corrupt(format!(
                "{} blocks of {bs} bytes hold less than the disk size {}",
                self.blocks, self.disk_size
            )));
        }
        if self.blocks_allocated > self.blocks {
            return Err(corrupt(format!(
                "{} blocks allocated of {}",
                self.blocks_allocated, self.blocks
            )));
        }
        if self.blocks_offset < self.end as u64 {
            return Err(corrupt(format!(
                "block map at {:#x} overlaps the header (ends at {:#x})",
                self.blocks_offset, self.end
            )));
        }
        let map_end = self.blocks_offset + self.blocks as u64 * 4;
        if self.data_offset < map_end {
            return Err(corrupt(format!(
                "data at {:#x} overlaps the block map (ends at {map_end:#x})",
                self.data_offset
            )));
        }
        if map_end > file_len {
            return Err(corrupt(format!(
                "block map ends at {map_end} past the end of the file ({file_len})"
            )));
        }
        if let Some(g) = self.lchs_geometry
            && g[..3].iter().all(|&v| v != 0)
            && g[3] as u64 != SECTOR
        {
            return Err(corrupt(format!("LCHS sector size {}", g[3])));
        }
        if self.uuid_create == [0; 16] {
            return Err(corrupt("creation UUID is null".into()));
        }
        if self.image_type == ImageType::Diff && self.uuid_linkage == [0; 16] {
            return Err(corrupt("differencing image without a parent UUID".into()));
        }
        Ok(())
    }

    /// The size of the virtual disk: the stored size rounded **down** to whole
    /// sectors, as VirtualBox does (QEMU rounds up). VirtualBox owns the format
    /// and its guests only ever saw whole sectors (the device reports a sector
    /// count), so the partial sector never held guest data; a rewritten header
    /// stores the rounded size, as VirtualBox does on a read-write open.
    pub fn virtual_size(&self) -> u64 {
        self.disk_size / SECTOR * SECTOR
    }

    /// `offData + slot * (block + extra) + extra`: where a slot's data starts.
    pub fn slot_offset(&self, slot: u32) -> Option<u64> {
        let stride = self.block_size as u64 + self.block_extra as u64;
        (slot as u64)
            .checked_mul(stride)?
            .checked_add(self.data_offset)?
            .checked_add(self.block_extra as u64)
    }

    /// Geometry for HDIO_GETGEO: the LCHS geometry of a 1.1+ header, else the
    /// legacy one, if set.
    pub fn geometry(&self) -> Option<Geometry> {
        let set = |g: [u32; 4]| {
            (g[0] != 0 && g[1] != 0 && g[2] != 0).then_some(Geometry {
                cylinders: g[0],
                heads: g[1],
                sectors: g[2],
            })
        };
        self.lchs_geometry
            .and_then(set)
            .or_else(|| set(self.legacy_geometry))
    }

    /// Text form of the version, e.g. "1.1".
    pub fn version_text(&self) -> String {
        format!("{}.{}", self.version >> 16, self.version & 0xFFFF)
    }

    /// The header bytes (from offset 0 to the end of the known fields) with the
    /// fields this library changes written back.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.raw;
        let l = self.layout;
        put_le64(&mut b, l.disk_size, self.disk_size);
        put_le32(&mut b, l.allocated, self.blocks_allocated);
        b[l.uuid_modify..l.uuid_modify + 16].copy_from_slice(&self.uuid_modify);
        b[..self.end].to_vec()
    }
}

/// A UUID as VirtualBox prints it: the bytes are an RTUUID, whose first three
/// fields are little-endian.
pub fn uuid_text(u: &[u8; 16]) -> String {
    format!(
        "{{{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
        u[3],
        u[2],
        u[1],
        u[0],
        u[5],
        u[4],
        u[7],
        u[6],
        u[8],
        u[9],
        u[10],
        u[11],
        u[12],
        u[13],
        u[14],
        u[15]
    )
}

/// Parses the VirtualBox text form (braces optional, any case) into RTUUID bytes.
pub fn parse_uuid_text(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let s = s
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(s);
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != 5 || parts.iter().map(|p| p.len()).ne([8, 4, 4, 4, 12]) {
        return None;
    }
    let hex: String = parts.concat();
    let mut v = [0u8; 16];
    for (i, byte) in v.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    v[..4].reverse();
    v[4..6].reverse();
    v[6..8].reverse();
    Some(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid 1.1 header of `disk` bytes in 1 MiB blocks, map at 0x200.
    pub fn v1(disk: u64) -> [u8; HEADER_AREA] {
        let mut b = [0u8; HEADER_AREA];
        put_le32(&mut b, 0x40, SIGNATURE);
        put_le32(&mut b, 0x44, VERSION_1_1);
        put_le32(&mut b, 0x48, V1_HEADER_SIZE);
        put_le32(&mut b, 0x4C, 1);
        put_le32(&mut b, 0x154, 0x200);
        let blocks = disk.div_ceil(1 << 20) as u32;
        put_le32(&mut b, 0x158, 0x200 + (blocks * 4).div_ceil(512) * 512);
        put_le64(&mut b, 0x170, disk);
        put_le32(&mut b, 0x178, 1 << 20);
        put_le32(&mut b, 0x180, blocks);
        b[0x188] = 1;
        b[0x198] = 2;
        b
    }

    #[test]
    fn parses_and_validates() {
        let raw = v1(10 << 20);
        let h = Header::parse(&raw, 4096).unwrap();
        assert_eq!(
            (h.blocks, h.block_size, h.data_offset),
            (10, 1 << 20, 0x400)
        );
        assert_eq!(h.slot_offset(2), Some(0x400 + (2 << 20)));
        assert!(h.geometry().is_none());
        assert_eq!(h.encode(), raw[..0x1C8].to_vec());

        let bad = |f: &dyn Fn(&mut [u8; HEADER_AREA])| {
            let mut r = v1(10 << 20);
            f(&mut r);
            Header::parse(&r, 4096).unwrap_err()
        };
        assert!(matches!(bad(&|r| put_le32(r, 0x40, 0)), Error::NotAnImage));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x44, 0x0002_0000)),
            Error::Unsupported(_)
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x48, 0x100)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x4C, 9)),
            Error::Unsupported(_)
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x50, 4)),
            Error::Unsupported(_)
        ));
        for bs in [0, 3, 256, 1 << 29, u32::MAX] {
            assert!(
                matches!(bad(&|r| put_le32(r, 0x178, bs)), Error::Corrupt { .. }),
                "{bs}"
            );
        }
        assert!(matches!(
            bad(&|r| put_le32(r, 0x17C, 3)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x180, 0)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x180, 9)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x184, 11)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le64(r, 0x170, 0)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le64(r, 0x170, u64::MAX)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x154, 0x100)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x158, 0x201)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x154, u32::MAX)),
            Error::Corrupt { .. }
        ));
        assert!(matches!(bad(&|r| r[0x188] = 0), Error::Corrupt { .. }));
        assert!(matches!(
            bad(&|r| put_le32(r, 0x4C, 4)),
            Error::Corrupt { .. }
        ));
        // A huge block count whose map would lie past the end of the file.
        assert!(matches!(
            bad(&|r| {
                put_le32(r, 0x180, u32::MAX);
                put_le32(r, 0x158, u32::MAX);
            }),
            Error::Corrupt { .. }
        ));
        assert!(matches!(
            Header::parse(&v1(10 << 20), 300).unwrap_err(),
            Error::Corrupt { .. }
        ));
    }

    #[test]
    fn odd_size_rounds_down() {
        let h = Header::parse(&v1(1_000_001), 4096).unwrap();
        assert_eq!(h.virtual_size(), 999_936);
    }

    #[test]
    fn uuid_text_round_trip() {
        let u: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let t = uuid_text(&u);
        assert_eq!(t, "{33221100-5544-7766-8899-aabbccddeeff}");
        assert_eq!(parse_uuid_text(&t), Some(u));
        assert_eq!(
            parse_uuid_text("33221100-5544-7766-8899-AABBCCDDEEFF"),
            Some(u)
        );
        assert_eq!(
            parse_uuid_text("{3322110-5544-7766-8899-aabbccddeeff0}"),
            None
        );
        assert_eq!(
            parse_uuid_text("{33221100-5544-7766-8899-aabbccddeefg}"),
            None
        );
    }
}
