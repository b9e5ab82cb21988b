//! The VHD hard disk footer (512 bytes, big-endian), spec section "Hard Disk Footer Format".

use crate::bytes::{arr, be16, be32, be64, put_be32};
use crate::{Error, Geometry, Result};

pub const COOKIE: &[u8; 8] = b"conectix";
/// blktap marks a disabled VHD by rewriting the cookie.
pub const POISON_COOKIE: &[u8; 8] = b"v_poison";
pub const FOOTER_SIZE: usize = 512;
/// `data_offset` of a fixed disk.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
const CHECKSUM_OFFSET: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn from_u32(v: u32) -> Option<DiskType> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    /// Dynamic and differencing disks have a header, a BAT and a footer copy at 0.
    pub fn is_sparse(self) -> bool {
        self != DiskType::Fixed
    }
}

/// A parsed footer. `raw` keeps every byte, so re-encoding preserves fields
/// this library does not interpret (reserved bytes, blktap's hidden flag).
#[derive(Clone, Debug)]
pub struct Footer {
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 00:00 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    /// Whether the stored checksum matches the bytes.
    pub checksum_ok: bool,
    pub raw: [u8; FOOTER_SIZE],
}

/// The VHD checksum: one's complement of the byte sum, with the field itself as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

impl Footer {
    /// Parses a footer; the cookie and disk type must be valid, the checksum is
    /// only recorded (the caller decides what a mismatch means).
    pub fn parse(b: &[u8]) -> Result<Footer> {
        let raw: [u8; FOOTER_SIZE] = arr(b, 0);
        if &raw[..8] == POISON_COOKIE {
            return Err(Error::unsupported(
                "VHD disabled by blktap (cookie v_poison)",
            ));
        }
        if &raw[..8] != COOKIE {
            return Err(Error::corrupt("VHD footer", "no 'conectix' cookie"));
        }
        let code = be32(&raw, 60);
        let disk_type = DiskType::from_u32(code)
            .ok_or_else(|| Error::unsupported(format!("VHD disk type {code}")))?;
        Ok(Footer {
            data_offset: be64(&raw, 16),
            timestamp: be32(&raw, 24),
            creator_app: arr(&raw, 28),
            current_size: be64(&raw, 48),
            geometry: Geometry {
                cylinders: be16(&raw, 56) as u32,
                heads: raw[58] as u32,
                sectors: raw[59] as u32,
            },
            disk_type,
            unique_id: arr(&raw, 68),
            checksum_ok: checksum(&raw, CHECKSUM_OFFSET) == be32(&raw, CHECKSUM_OFFSET),
            raw,
        })
    }

    /// The footer bytes with a correct checksum.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = self.raw;
        let sum = checksum(&b, CHECKSUM_OFFSET);
        put_be32(&mut b, CHECKSUM_OFFSET, sum);
        b
    }

    /// Size of the virtual disk, by the rule of qemu 10: Virtual PC and old qemu
    /// size disks by CHS geometry, everyone else (Hyper-V, disk2vhd, blktap,
    /// qemu with force_size, Azure) by `current_size`. Rounded down to sectors.
    pub fn virtual_size(&self) -> u64 {
        let g = self.geometry;
        let by_chs = (&self.creator_app == b"vpc " || &self.creator_app == b"qemu")
            && !(g.cylinders == 65535 && g.heads == 16 && g.sectors == 255);
        let size = if by_chs {
            g.cylinders as u64 * g.heads as u64 * g.sectors as u64 * 512
        } else {
            self.current_size
        };
        size & !511
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{put_be16, put_be64};

    fn footer(creator: &[u8; 4], size: u64, chs: (u16, u8, u8)) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(COOKIE);
        put_be32(&mut b, 8, 2);
        put_be32(&mut b, 12, 0x10000);
        put_be64(&mut b, 16, NO_DATA_OFFSET);
        b[28..32].copy_from_slice(creator);
        put_be64(&mut b, 40, size);
        put_be64(&mut b, 48, size);
        put_be16(&mut b, 56, chs.0);
        b[58] = chs.1;
        b[59] = chs.2;
        put_be32(&mut b, 60, 2);
        let c = checksum(&b, 64);
        put_be32(&mut b, 64, c);
        b
    }

    #[test]
    fn size_rule_follows_qemu() {
        // qemu creator: CHS wins (121*4*17 sectors).
        let f = Footer::parse(&footer(b"qemu", 4_300_000, (121, 4, 17))).unwrap();
        assert!(f.checksum_ok);
        assert_eq!(f.virtual_size(), 121 * 4 * 17 * 512);
        // Hyper-V: current size.
        let f = Footer::parse(&footer(b"win ", 4_194_304, (120, 4, 17))).unwrap();
        assert_eq!(f.virtual_size(), 4_194_304);
        // qemu force_size: maximal geometry means current size.
        let f = Footer::parse(&footer(b"qemu", 4_194_304, (65535, 16, 255))).unwrap();
        assert_eq!(f.virtual_size(), 4_194_304);
    }

    #[test]
    fn checksum_mismatch_is_recorded_and_fixed_by_encode() {
        let mut b = footer(b"qemu", 1 << 20, (30, 4, 17));
        b[64] ^= 1;
        let f = Footer::parse(&b).unwrap();
        assert!(!f.checksum_ok);
        assert!(Footer::parse(&f.encode()).unwrap().checksum_ok);
    }

    #[test]
    fn rejects_bad_cookie_and_type() {
        let mut b = footer(b"qemu", 1 << 20, (30, 4, 17));
        b[0] = b'x';
        assert!(Footer::parse(&b).is_err());
        let mut b = footer(b"qemu", 1 << 20, (30, 4, 17));
        put_be32(&mut b, 60, 5);
        assert!(Footer::parse(&b).is_err());
    }
}
