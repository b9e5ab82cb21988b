//! The dynamic disk header (1024 bytes, big-endian) and its parent locator entries.

use crate::bytes::{arr, be32, be64, put_be32};
use crate::vhd::footer::checksum;
use crate::{Error, Result};

pub const HEADER_SIZE: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
const CHECKSUM_OFFSET: usize = 36;
pub const LOCATOR_COUNT: usize = 8;

/// One of the eight parent locator entries (24 bytes at 576 + 24 * i).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    pub platform_code: [u8; 4],
    /// Space reserved for the locator data: sectors per spec, bytes in practice.
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Absolute file offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    pub fn is_used(&self) -> bool {
        self.platform_code != [0; 4]
    }
    /// Reserved space in bytes: values below 512 are sectors, multiples of 512
    /// are bytes (Windows and blktap write bytes), as blktap decides.
    pub fn space_bytes(&self) -> u64 {
        if self.data_space < 512 {
            self.data_space as u64 * 512
        } else {
            self.data_space as u64
        }
    }
}

#[derive(Clone, Debug)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent file name (UTF-16BE in the file); Windows stores a full path.
    pub parent_name: String,
    pub locators: [ParentLocator; LOCATOR_COUNT],
    pub checksum_ok: bool,
    pub raw: [u8; HEADER_SIZE],
}

impl DynamicHeader {
    pub fn parse(b: &[u8]) -> Result<DynamicHeader> {
        let raw: [u8; HEADER_SIZE] = arr(b, 0);
        if &raw[..8] != COOKIE {
            return Err(Error::corrupt("VHD dynamic header", "no 'cxsparse' cookie"));
        }
        let block_size = be32(&raw, 32);
        if !block_size.is_power_of_two() || !(512..=1 << 28).contains(&block_size) {
            return Err(Error::corrupt(
                "VHD dynamic header",
                format!("block size {block_size}"),
            ));
        }
        let units: Vec<u16> = raw[64..576]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        let parent_name = String::from_utf16_lossy(&units[..end]);
        let mut locators = [ParentLocator::default(); LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *loc = ParentLocator {
                platform_code: arr(&raw, o),
                data_space: be32(&raw, o + 4),
                data_length: be32(&raw, o + 8),
                data_offset: be64(&raw, o + 16),
            };
        }
        Ok(DynamicHeader {
            table_offset: be64(&raw, 16),
            max_table_entries: be32(&raw, 28),
            block_size,
            parent_unique_id: arr(&raw, 40),
            parent_timestamp: be32(&raw, 56),
            parent_name,
            locators,
            checksum_ok: checksum(&raw, CHECKSUM_OFFSET) == be32(&raw, CHECKSUM_OFFSET),
            raw,
        })
    }

    /// The header bytes with a correct checksum.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = self.raw;
        let sum = checksum(&b, CHECKSUM_OFFSET);
        put_be32(&mut b, CHECKSUM_OFFSET, sum);
        b
    }
}
