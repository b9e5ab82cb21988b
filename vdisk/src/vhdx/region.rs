//! The region table (MS-VHDX 2.2.3): where the BAT and the metadata region are.

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::crc::crc32c;
use crate::vhdx::MIB;
use crate::vhdx::guid::{Guid, from_hex};
use crate::{Error, Result, Storage};

pub const TABLE_SIZE: usize = 64 * 1024;
/// File offsets of region table 1 and 2.
pub const SLOTS: [u64; 2] = [192 * 1024, 256 * 1024];
const MAX_ENTRIES: u32 = 2047;

pub const BAT_GUID: Guid = from_hex("6677c22d23f600429d64115e9bfd4a08");
pub const METADATA_GUID: Guid = from_hex("06a27c8b90479a4bb8fe575f050f886e");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        offset < self.end() && self.offset < offset.saturating_add(length)
    }
}

/// The two regions this library knows; an unknown required region is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// Parses one table and checks every entry against the file length.
pub fn parse(b: &[u8], file_len: u64) -> Result<Regions> {
    if b.len() != TABLE_SIZE || &b[..4] != b"regi" {
        return Err(Error::corrupt("VHDX region table", "bad signature"));
    }
    let mut copy = b.to_vec();
    copy[4..8].fill(0);
    let (stored, computed) = (le32(b, 4), crc32c(&copy));
    if stored != computed {
        return Err(Error::corrupt(
            "VHDX region table",
            format!("checksum {stored:#x}, computed {computed:#x}"),
        ));
    }
    let count = le32(b, 8);
    if count > MAX_ENTRIES {
        return Err(Error::corrupt(
            "VHDX region table",
            format!("{count} entries"),
        ));
    }
    let mut seen: Vec<(Guid, Region)> = Vec::new();
    for i in 0..count as usize {
        let e = &b[16 + 32 * i..48 + 32 * i];
        let guid = Guid(crate::bytes::arr(e, 0));
        let region = Region {
            offset: le64(e, 16),
            length: le32(e, 24) as u64,
        };
        let required = le32(e, 28) & 1 != 0;
        if guid != BAT_GUID && guid != METADATA_GUID {
            if required {
                return Err(Error::unsupported(format!("VHDX required region {guid}")));
            }
            log::debug!("ignoring optional VHDX region {guid}");
        }
        if !region.offset.is_multiple_of(MIB)
            || !region.length.is_multiple_of(MIB)
            || region.offset < MIB
            || region.length == 0
        {
            return Err(Error::corrupt(
                "VHDX region table",
                format!(
                    "region {guid} of {} bytes at {} is not 1 MiB aligned",
                    region.length, region.offset
                ),
            ));
        }
        if region.end() > file_len {
            return Err(Error::corrupt(
                "VHDX region table",
                format!(
                    "region {guid} ends at {}, past the end of the file ({file_len})",
                    region.end()
                ),
            ));
        }
        if let Some((other, _)) = seen
            .iter()
            .find(|(g, r)| *g == guid || r.overlaps(region.offset, region.length))
        {
            return Err(Error::corrupt(
                "VHDX region table",
                format!("region {guid} duplicates or overlaps {other}"),
            ));
        }
        seen.push((guid, region));
    }
    let find = |g: Guid, name: &str| {
        seen.iter()
            .find(|(x, _)| *x == g)
            .map(|(_, r)| *r)
            .ok_or_else(|| Error::corrupt("VHDX region table", format!("no {name} region")))
    };
    Ok(Regions {
        bat: find(BAT_GUID, "BAT")?,
        metadata: find(METADATA_GUID, "metadata")?,
    })
}

/// Reads table 1, falling back to table 2 when table 1 is damaged.
pub fn read(storage: &dyn Storage, file_len: u64) -> Result<Regions> {
    let mut buf = vec![0u8; TABLE_SIZE];
    storage.read_exact_at(&mut buf, SLOTS[0])?;
    let first = match parse(&buf, file_len) {
        Ok(r) => return Ok(r),
        Err(e @ Error::Unsupported(_)) => return Err(e),
        Err(e) => e,
    };
    storage.read_exact_at(&mut buf, SLOTS[1])?;
    match parse(&buf, file_len) {
        Ok(r) => {
            log::warn!("VHDX region table 1 is invalid ({first}); using table 2");
            Ok(r)
        }
        Err(_) => Err(first),
    }
}

/// The bytes of the table `read` takes (table 1, else table 2).
pub fn read_raw(storage: &dyn Storage, file_len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; TABLE_SIZE];
    let mut first = None;
    for slot in SLOTS {
        storage.read_exact_at(&mut buf, slot)?;
        match parse(&buf, file_len) {
            Ok(_) => return Ok(buf),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| Error::corrupt("VHDX region table", "unreadable")))
}

/// `raw` (a table `parse` accepted) with the BAT entry naming `bat`, every
/// other entry kept (optional regions this library does not know included),
/// and its checksum recomputed.
pub fn with_bat(raw: &[u8], bat: Region) -> Result<Vec<u8>> {
    let mut b = raw.to_vec();
    let count = (le32(&b, 8).min(MAX_ENTRIES)) as usize;
    let e = (0..count)
        .map(|i| 16 + 32 * i)
        .find(|&e| b[e..e + 16] == BAT_GUID.0)
        .ok_or_else(|| Error::corrupt("VHDX region table", "no BAT region"))?;
    let length = u32::try_from(bat.length)
        .map_err(|_| Error::unsupported(format!("VHDX BAT region of {} bytes", bat.length)))?;
    put_le64(&mut b, e + 16, bat.offset);
    put_le32(&mut b, e + 24, length);
    b[4..8].fill(0);
    let crc = crc32c(&b);
    put_le32(&mut b, 4, crc);
    Ok(b)
}

/// Encodes a table holding the BAT and metadata regions (both not required,
/// as QEMU writes them).
pub fn encode(regions: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[..4].copy_from_slice(b"regi");
    put_le32(&mut b, 8, 2);
    for (i, (g, r)) in [(BAT_GUID, regions.bat), (METADATA_GUID, regions.metadata)]
        .iter()
        .enumerate()
    {
        let e = 16 + 32 * i;
        b[e..e + 16].copy_from_slice(&g.0);
        put_le64(&mut b, e + 16, r.offset);
        put_le32(&mut b, e + 24, r.length as u32);
    }
    let crc = crc32c(&b);
    put_le32(&mut b, 4, crc);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let r = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        let b = encode(&r);
        assert_eq!(parse(&b, 4 * MIB).unwrap(), r);
        assert!(parse(&b, 4 * MIB - 1).is_err(), "past end of file");
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(parse(&bad, 4 * MIB).is_err(), "checksum");
        let overlapping = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: 2 * MIB,
            },
            ..r
        };
        assert!(parse(&encode(&overlapping), 8 * MIB).is_err());
    }

    #[test]
    fn with_bat_moves_only_the_bat() {
        let r = Regions {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        let bat = Region {
            offset: 8 * MIB,
            length: 2 * MIB,
        };
        let moved = with_bat(&encode(&r), bat).unwrap();
        assert_eq!(parse(&moved, 10 * MIB).unwrap(), Regions { bat, ..r });
        assert!(parse(&moved, 10 * MIB - 1).is_err(), "past end of file");
        // Only the first 4 KiB sector changes (the CRC covers all 64 KiB).
        assert_eq!(moved[4096..], encode(&r)[4096..]);
    }
}
