//! Creating VHDX files: fixed, dynamic and differencing, 512 or 4096-byte
//! logical sectors (qemu-img makes neither differencing nor 4 KiB files).
//!
//! Layout as QEMU's: header section, log at 1 MiB, metadata region (1 MiB),
//! BAT, then payload blocks.

use crate::bytes::put_le64;
use crate::vhdx::MIB;
use crate::vhdx::bat::{self, Layout};
use crate::vhdx::guid::Guid;
use crate::vhdx::header::{self, Header};
use crate::vhdx::metadata::{self, Metadata};
use crate::vhdx::region::{self, Region, Regions};
use crate::{Error, Result, Storage};

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub virtual_size: u64,
    /// Power of two, 1 to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Allocate every block (LeaveBlocksAllocated).
    pub fixed: bool,
    /// Multiple of 1 MiB.
    pub log_size: u32,
    /// For a differencing file: its parent.
    pub parent: Option<ParentInfo>,
}

impl CreateOptions {
    pub fn dynamic(virtual_size: u64) -> CreateOptions {
        CreateOptions {
            virtual_size,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            fixed: false,
            log_size: MIB as u32,
            parent: None,
        }
    }
}

/// The parent of a differencing file.
#[derive(Clone, Debug)]
pub struct ParentInfo {
    /// The parent's current DataWriteGuid (its `Image::link_id`).
    pub data_write_guid: [u8; 16],
    /// Locator entries besides parent_linkage, e.g. ("relative_path", r"..\p.vhdx").
    pub paths: Vec<(String, String)>,
}

/// Where things went, for callers that fill blocks in by hand (tests).
#[derive(Clone, Copy, Debug)]
pub struct Created {
    pub layout: Layout,
    pub bat_offset: u64,
    pub metadata_offset: u64,
    pub log_offset: u64,
    /// First byte after the metadata structures (first payload block).
    pub payload_offset: u64,
}

/// Writes a new, empty VHDX into `storage` (which should be empty).
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<Created> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(MIB as u32..=256 << 20).contains(&bs) {
        return Err(Error::unsupported(format!("VHDX block size {bs}")));
    }
    for v in [opts.logical_sector_size, opts.physical_sector_size] {
        if v != 512 && v != 4096 {
            return Err(Error::unsupported(format!("VHDX sector size {v}")));
        }
    }
    let size = opts.virtual_size;
    if size == 0
        || size > metadata::MAX_DISK_SIZE
        || !size.is_multiple_of(opts.logical_sector_size as u64)
    {
        return Err(Error::unsupported(format!("VHDX virtual size {size}")));
    }
    if !(opts.log_size as u64).is_multiple_of(MIB) || opts.log_size == 0 {
        return Err(Error::unsupported(format!(
            "VHDX log size {}",
            opts.log_size
        )));
    }
    let has_parent = opts.parent.is_some();
    let layout = Layout::new(size, bs, opts.logical_sector_size, has_parent);
    let log_offset = MIB;
    let metadata_offset = log_offset + opts.log_size as u64;
    let bat_offset = metadata_offset + MIB;
    let bat_len = (layout.total_entries() * 8).next_multiple_of(MIB);
    if bat_len > u32::MAX as u64 + 1 - MIB {
        return Err(Error::unsupported("VHDX BAT larger than 4 GiB"));
    }
    let payload_offset = bat_offset + bat_len;

    // File identifier.
    let mut ident = vec![0u8; 64 * 1024];
    ident[..8].copy_from_slice(header::SIGNATURE);
    for (i, u) in "libvhdio".encode_utf16().enumerate() {
        ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    storage.write_all_at(&ident, 0)?;

    // Headers: slot 2 current.
    let mut h = Header {
        sequence: 1,
        file_write_guid: Guid::random()?,
        data_write_guid: Guid::random()?,
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: opts.log_size,
        log_offset,
    };
    storage.write_all_at(&h.encode(), header::SLOTS[0])?;
    h.sequence = 2;
    storage.write_all_at(&h.encode(), header::SLOTS[1])?;

    let regions = Regions {
        bat: Region {
            offset: bat_offset,
            length: bat_len,
        },
        metadata: Region {
            offset: metadata_offset,
            length: MIB,
        },
    };
    let table = region::encode(&regions);
    storage.write_all_at(&table, region::SLOTS[0])?;
    storage.write_all_at(&table, region::SLOTS[1])?;

    let meta = Metadata {
        block_size: bs,
        leave_blocks_allocated: opts.fixed,
        has_parent,
        virtual_size: size,
        page83: Guid::random()?,
        logical_sector_size: opts.logical_sector_size,
        physical_sector_size: opts.physical_sector_size,
        parent_locator: Vec::new(),
    };
    let locator = opts.parent.as_ref().map(|p| {
        // Lower case: Windows parses either, and libvhdi (the independent
        // reader) accepts only lower case here.
        let linkage = Guid(p.data_write_guid).to_string().to_ascii_lowercase();
        let mut pairs: Vec<(&str, &str)> = vec![("parent_linkage", &linkage)];
        pairs.extend(p.paths.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        metadata::encode_locator(&pairs)
    });
    storage.write_all_at(
        &metadata::encode(&meta, locator.as_deref()),
        metadata_offset,
    )?;

    let mut end = payload_offset;
    if opts.fixed {
        let mut bat_bytes = vec![0u8; (layout.total_entries() * 8) as usize];
        for b in 0..layout.payload_blocks {
            let entry = bat::entry(bat::FULLY_PRESENT, payload_offset + b * bs as u64);
            put_le64(
                &mut bat_bytes,
                (layout.payload_index(b) * 8) as usize,
                entry,
            );
        }
        storage.write_all_at(&bat_bytes, bat_offset)?;
        end = payload_offset + layout.payload_blocks * bs as u64;
    }
    storage.set_len(end)?;
    storage.sync()?;
    Ok(Created {
        layout,
        bat_offset,
        metadata_offset,
        log_offset,
        payload_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStorage, OpenOptions};
    use std::path::Path;

    #[test]
    fn create_open_write_read_4k() {
        let mut opts = CreateOptions::dynamic(6 << 20);
        opts.block_size = 1 << 20;
        opts.logical_sector_size = 4096;
        let s = MemStorage::new(Vec::new());
        create(&s, &opts).unwrap();
        let img = crate::vhdx::open(
            Box::new(s),
            Path::new("/x.vhdx"),
            OpenOptions { writable: true },
        )
        .unwrap();
        assert_eq!(img.logical_sector_size(), 4096);
        assert_eq!(img.virtual_size(), 6 << 20);
        let zeros = |b: &mut [u8], _| {
            b.fill(0);
            Ok(())
        };
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        img.write(&data, (1 << 20) - 4096, &zeros).unwrap();
        let (m, run) = img.map((1 << 20) - 4096, 3 * 4096).unwrap();
        assert!(matches!(m, crate::Mapping::Data { .. }));
        assert_eq!(run, 4096);
        let mut back = vec![0u8; 4096];
        let crate::Mapping::Data { file_offset } = img.map(1 << 20, 4096).unwrap().0 else {
            panic!()
        };
        img.read_data(&mut back, file_offset).unwrap();
        assert_eq!(back, data[4096..8192]);
    }
}
