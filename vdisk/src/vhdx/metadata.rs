//! The metadata region (MS-VHDX 2.6): the five required items and the parent locator.

use crate::bytes::{le16, le32, le64, put_le16, put_le32};
use crate::vhdx::MIB;
use crate::vhdx::guid::{Guid, from_hex};
use crate::vhdx::region::Region;
use crate::{Error, Result, Storage};

const TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: usize = 2047;

pub const FILE_PARAMETERS: Guid = from_hex("3767a1ca36fa434db3b633f0aa44e76b");
pub const VIRTUAL_DISK_SIZE: Guid = from_hex("2442a52f1bcd7648b2115dbed83bf4b8");
pub const PAGE83: Guid = from_hex("ab12cabee6b2234593efc309e000c746");
pub const LOGICAL_SECTOR_SIZE: Guid = from_hex("1dbf41816fa90947ba47f233a8faab5f");
pub const PHYSICAL_SECTOR_SIZE: Guid = from_hex("c748a3cd5d4471449cc9e9885251c556");
pub const PARENT_LOCATOR: Guid = from_hex("2d5fd3a80bb34d45abf7d3d84834ab0c");
/// LocatorType of a VHDX parent locator.
pub const VHDX_LOCATOR_TYPE: Guid = from_hex("b7ef4ab09ed1814ab78925b8e9445913");

/// Largest virtual disk the spec allows.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// What the metadata says about the virtual disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page83: Guid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Key/value pairs of the parent locator (differencing disks only).
    pub parent_locator: Vec<(String, String)>,
}

impl Metadata {
    pub fn locator(&self, key: &str) -> Option<&str> {
        self.parent_locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads and validates the metadata region.
pub fn read(storage: &dyn Storage, region: Region) -> Result<Metadata> {
    let mut table = vec![0u8; TABLE_SIZE];
    storage.read_exact_at(&mut table, region.offset)?;
    if &table[..8] != b"metadata" {
        return Err(Error::corrupt("VHDX metadata", "bad signature"));
    }
    let count = le16(&table, 10) as usize;
    if count > MAX_ENTRIES {
        return Err(Error::corrupt("VHDX metadata", format!("{count} entries")));
    }
    let mut items: Vec<(Guid, Vec<u8>)> = Vec::new();
    for i in 0..count {
        let e = &table[32 + 32 * i..64 + 32 * i];
        let id = Guid(crate::bytes::arr(e, 0));
        let (offset, length, flags) = (le32(e, 16) as u64, le32(e, 20) as u64, le32(e, 24));
        let is_user = flags & 1 != 0;
        let required = flags & 4 != 0;
        if items.iter().any(|(g, _)| *g == id) {
            return Err(Error::corrupt(
                "VHDX metadata",
                format!("item {id} appears twice"),
            ));
        }
        let known = !is_user
            && [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE83,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&id);
        if !known {
            if required {
                return Err(Error::unsupported(format!(
                    "VHDX required metadata item {id}"
                )));
            }
            continue;
        }
        if length > MIB
            || (length > 0 && (offset < TABLE_SIZE as u64 || offset + length > region.length))
        {
            return Err(Error::corrupt(
                "VHDX metadata",
                format!("item {id} of {length} bytes at {offset} lies outside the metadata region"),
            ));
        }
        let mut data = vec![0u8; length as usize];
        storage.read_exact_at(&mut data, region.offset + offset)?;
        items.push((id, data));
    }
    let item = |id: Guid, name: &str, min: usize| -> Result<&[u8]> {
        match items.iter().find(|(g, _)| *g == id) {
            Some((_, d)) if d.len() >= min => Ok(d),
            Some(_) => Err(Error::corrupt(
                "VHDX metadata",
                format!("{name} item too short"),
            )),
            None => Err(Error::corrupt("VHDX metadata", format!("no {name} item"))),
        }
    };
    let params = item(FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = le32(params, 0);
    let flags = le32(params, 4);
    if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
        return Err(Error::corrupt(
            "VHDX metadata",
            format!("block size {block_size}"),
        ));
    }
    let virtual_size = le64(item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    let page83 = Guid(crate::bytes::arr(item(PAGE83, "page 83 id", 16)?, 0));
    let logical_sector_size = le32(item(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0);
    let physical_sector_size = le32(item(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?, 0);
    for (name, v) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if v != 512 && v != 4096 {
            return Err(Error::corrupt(
                "VHDX metadata",
                format!("{name} sector size {v}"),
            ));
        }
    }
    if virtual_size == 0
        || virtual_size > MAX_DISK_SIZE
        || !virtual_size.is_multiple_of(logical_sector_size as u64)
    {
        return Err(Error::corrupt(
            "VHDX metadata",
            format!("virtual disk size {virtual_size}"),
        ));
    }
    let has_parent = flags & 2 != 0;
    let parent_locator = if has_parent {
        parse_locator(item(PARENT_LOCATOR, "parent locator", 20)?)?
    } else {
        Vec::new()
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        page83,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

/// Parses a parent locator item into its key/value pairs (UTF-16LE text).
pub fn parse_locator(b: &[u8]) -> Result<Vec<(String, String)>> {
    let kind = Guid(crate::bytes::arr(b, 0));
    if kind != VHDX_LOCATOR_TYPE {
        return Err(Error::unsupported(format!(
            "VHDX parent locator type {kind}"
        )));
    }
    let count = le16(b, 18) as usize;
    let bad = |d: String| Error::corrupt("VHDX parent locator", d);
    if 20 + count * 12 > b.len() {
        return Err(bad(format!(
            "{count} entries do not fit in {} bytes",
            b.len()
        )));
    }
    let text = |off: u32, len: u16| -> Result<String> {
        let (off, len) = (off as usize, len as usize);
        let bytes = b.get(off..off + len).filter(|_| len % 2 == 0 && off >= 20);
        let bytes =
            bytes.ok_or_else(|| bad(format!("text of {len} bytes at {off} out of range")))?;
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| bad("text is not UTF-16".into()))
    };
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let e = &b[20 + 12 * i..32 + 12 * i];
        let key = text(le32(e, 0), le16(e, 8))?;
        let value = text(le32(e, 4), le16(e, 10))?;
        if key.is_empty() || pairs.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("empty or duplicate key '{key}'")));
        }
        pairs.push((key, value));
    }
    if !pairs.iter().any(|(k, _)| k == "parent_linkage") {
        return Err(bad("no parent_linkage".into()));
    }
    Ok(pairs)
}

/// Encodes a parent locator item.
pub fn encode_locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let utf16 = |s: &str| {
        s.encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let mut b = vec![0u8; 20 + 12 * pairs.len()];
    b[..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
    put_le16(&mut b, 18, pairs.len() as u16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (k, v) = (utf16(k), utf16(v));
        let e = 20 + 12 * i;
        let at = b.len() as u32;
        put_le32(&mut b, e, at);
        put_le16(&mut b, e + 8, k.len() as u16);
        b.extend_from_slice(&k);
        let at = b.len() as u32;
        put_le32(&mut b, e + 4, at);
        put_le16(&mut b, e + 10, v.len() as u16);
        b.extend_from_slice(&v);
    }
    b
}

/// Encodes the metadata region (table and items), at most 1 MiB.
pub fn encode(m: &Metadata, locator: Option<&[u8]>) -> Vec<u8> {
    let flags = m.leave_blocks_allocated as u32 | (m.has_parent as u32) << 1;
    let mut params = vec![0u8; 8];
    put_le32(&mut params, 0, m.block_size);
    put_le32(&mut params, 4, flags);
    let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (FILE_PARAMETERS, params, 4),
        (
            VIRTUAL_DISK_SIZE,
            m.virtual_size.to_le_bytes().to_vec(),
            4 | 2,
        ),
        (PAGE83, m.page83.0.to_vec(), 4 | 2),
        (
            LOGICAL_SECTOR_SIZE,
            m.logical_sector_size.to_le_bytes().to_vec(),
            4 | 2,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            m.physical_sector_size.to_le_bytes().to_vec(),
            4 | 2,
        ),
    ];
    if let Some(loc) = locator {
        items.push((PARENT_LOCATOR, loc.to_vec(), 4));
    }
    let mut b = vec![0u8; TABLE_SIZE];
    b[..8].copy_from_slice(b"metadata");
    put_le16(&mut b, 10, items.len() as u16);
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        b[e..e + 16].copy_from_slice(&id.0);
        let at = b.len() as u32;
        put_le32(&mut b, e + 16, at);
        put_le32(&mut b, e + 20, data.len() as u32);
        put_le32(&mut b, e + 24, *flags);
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(4096), 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn sample(has_parent: bool) -> Metadata {
        Metadata {
            block_size: 1 << 20,
            leave_blocks_allocated: false,
            has_parent,
            virtual_size: 5 << 20,
            page83: Guid([3; 16]),
            logical_sector_size: 4096,
            physical_sector_size: 4096,
            parent_locator: Vec::new(),
        }
    }

    #[test]
    fn round_trip_with_locator() {
        let loc = encode_locator(&[
            ("parent_linkage", "{00000000-0000-0000-0000-000000000001}"),
            ("relative_path", r"..\p.vhdx"),
        ]);
        let mut m = sample(true);
        let s = MemStorage::new(vec![0u8; 2 << 20]);
        s.write_all_at(&encode(&m, Some(&loc)), 1 << 20).unwrap();
        let got = read(
            &s,
            Region {
                offset: 1 << 20,
                length: 1 << 20,
            },
        )
        .unwrap();
        assert_eq!(got.locator("relative_path"), Some(r"..\p.vhdx"));
        m.parent_locator = got.parent_locator.clone();
        assert_eq!(got, m);
    }

    #[test]
    fn refusals() {
        let s = MemStorage::new(vec![0u8; 2 << 20]);
        let region = Region {
            offset: 1 << 20,
            length: 1 << 20,
        };
        let mut m = sample(false);
        m.block_size = 3 << 20;
        s.write_all_at(&encode(&m, None), 1 << 20).unwrap();
        assert!(read(&s, region).is_err(), "block size not a power of two");
        let mut m = sample(false);
        m.virtual_size = 4097;
        s.write_all_at(&encode(&m, None), 1 << 20).unwrap();
        assert!(
            read(&s, region).is_err(),
            "size not a multiple of the sector"
        );
        // An unknown required item.
        let mut b = encode(&sample(false), None);
        let e = 32 + 32 * 5;
        b[e] = 0x55;
        put_le32(&mut b, e + 24, 4);
        put_le16(&mut b, 10, 6);
        s.write_all_at(&b, 1 << 20).unwrap();
        assert!(matches!(read(&s, region), Err(Error::Unsupported(_))));
        // A locator whose text runs past its end.
        let mut loc = encode_locator(&[("parent_linkage", "{x}")]);
        put_le16(&mut loc, 30, 200);
        assert!(parse_locator(&loc).is_err());
    }
}
