//! The file identifier and the two headers (MS-VHDX 2.2.1, 2.2.2).

use crate::bytes::{le16, le32, le64, put_le16, put_le32, put_le64};
use crate::crc::crc32c;
use crate::vhdx::MIB;
use crate::vhdx::guid::Guid;
use crate::{Error, Result, Storage};

pub const SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIZE: usize = 4096;
/// File offsets of header 1 and header 2.
pub const SLOTS: [u64; 2] = [64 * 1024, 128 * 1024];

/// One header; only the current one is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses and checks one header: signature, CRC-32C, version, log placement.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<Header> {
        if &b[..4] != b"head" {
            return Err(Error::corrupt("VHDX header", "bad signature"));
        }
        let mut copy = *b;
        copy[4..8].fill(0);
        let (stored, computed) = (le32(b, 4), crc32c(&copy));
        if stored != computed {
            return Err(Error::corrupt(
                "VHDX header",
                format!("checksum {stored:#x}, computed {computed:#x}"),
            ));
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: Guid(crate::bytes::arr(b, 16)),
            data_write_guid: Guid(crate::bytes::arr(b, 32)),
            log_guid: Guid(crate::bytes::arr(b, 48)),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.version != 1 {
            return Err(Error::unsupported(format!(
                "VHDX header version {}",
                h.version
            )));
        }
        if h.log_version != 0 {
            return Err(Error::unsupported(format!(
                "VHDX log version {}",
                h.log_version
            )));
        }
        if !(h.log_length as u64).is_multiple_of(MIB)
            || !h.log_offset.is_multiple_of(MIB)
            || (h.log_length != 0 && h.log_offset < MIB)
        {
            return Err(Error::corrupt(
                "VHDX header",
                format!(
                    "log of {} bytes at {} is not 1 MiB aligned",
                    h.log_length, h.log_offset
                ),
            ));
        }
        Ok(h)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        put_le64(&mut b, 8, self.sequence);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put_le16(&mut b, 64, self.log_version);
        put_le16(&mut b, 66, self.version);
        put_le32(&mut b, 68, self.log_length);
        put_le64(&mut b, 72, self.log_offset);
        let crc = crc32c(&b);
        put_le32(&mut b, 4, crc);
        b
    }
}

/// Checks the file identifier at offset 0.
pub fn check_identifier(storage: &dyn Storage) -> Result<()> {
    let mut sig = [0u8; 8];
    storage.read_exact_at(&mut sig, 0)?;
    if &sig != SIGNATURE {
        return Err(Error::NotAnImage);
    }
    Ok(())
}

/// Reads both headers and picks the current one: the valid one with the higher
/// sequence number; equal sequence numbers only if both headers are identical.
/// Returns the header and its slot (0 or 1).
pub fn read_current(storage: &dyn Storage) -> Result<(Header, usize)> {
    let mut raw = [[0u8; HEADER_SIZE]; 2];
    storage.read_exact_at(&mut raw[0], SLOTS[0])?;
    storage.read_exact_at(&mut raw[1], SLOTS[1])?;
    match (Header::parse(&raw[0]), Header::parse(&raw[1])) {
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                Ok((a, 0))
            } else if b.sequence > a.sequence {
                Ok((b, 1))
            } else if raw[0] == raw[1] {
                Ok((a, 0))
            } else {
                Err(Error::corrupt(
                    "VHDX header",
                    format!(
                        "both headers have sequence number {} but differ",
                        a.sequence
                    ),
                ))
            }
        }
        (Ok(a), Err(e)) => {
            log::warn!("VHDX header 2 is invalid ({e}); using header 1");
            Ok((a, 0))
        }
        (Err(e), Ok(b)) => {
            log::warn!("VHDX header 1 is invalid ({e}); using header 2");
            Ok((b, 1))
        }
        (Err(e), Err(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            sequence: 7,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let h = sample();
        let b: [u8; HEADER_SIZE] = h.encode().try_into().unwrap();
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut bad = b;
        bad[100] ^= 1;
        assert!(Header::parse(&bad).is_err());
    }

    #[test]
    fn current_header_selection() {
        use crate::MemStorage;
        let s = MemStorage::new(vec![0u8; 1 << 20]);
        let mut a = sample();
        let mut b = sample();
        b.sequence = 8;
        s.write_all_at(&a.encode(), SLOTS[0]).unwrap();
        s.write_all_at(&b.encode(), SLOTS[1]).unwrap();
        assert_eq!(read_current(&s).unwrap(), (b.clone(), 1));
        a.sequence = 8;
        a.data_write_guid = Guid([5; 16]);
        s.write_all_at(&a.encode(), SLOTS[0]).unwrap();
        assert!(
            read_current(&s).is_err(),
            "equal sequence, different content"
        );
        s.write_all_at(&b.encode(), SLOTS[0]).unwrap();
        assert_eq!(read_current(&s).unwrap().1, 0, "identical headers");
        s.write_all_at(&[0u8; 4], SLOTS[0] + 4).unwrap();
        assert_eq!(read_current(&s).unwrap().1, 1, "header 1 damaged");
    }
}
