//! Creating VDI files: dynamic ("normal"), fixed ("static") and differencing.
//!
//! Header version 1.1 of 0x180 bytes (as QEMU writes), block map at 0x200,
//! data 1 MiB aligned (as VirtualBox aligns it), no block extra. A fixed image
//! has every block allocated in order (map[b] = b) in a file extended to its
//! full size (a hole until written). A differencing image has the parent's
//! size and block size, type 4, uuidLinkage = the parent's uuidCreate and
//! uuidParentModify = the parent's uuidModify; every block FREE.

use crate::bytes::{put_le32, put_le64};
use crate::create::{NewImage, random_id};
use crate::vdi::block_map::FREE;
use crate::vdi::header::{
    HEADER_AREA, Header, ImageType, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SIGNATURE, V1_HEADER_SIZE,
    VERSION_1_1,
};
use crate::{Error, Format, Result, Storage};

/// 1 MiB: VirtualBox's default and the only block size QEMU reads.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Text of the pre-header (ignored by readers).
pub const PRE_HEADER_TEXT: &str = "<<< libvhdio VDI Disk Image >>>\n";
/// Where the block map starts.
const MAP_OFFSET: u64 = 0x200;
/// Alignment of the data area.
const DATA_ALIGN: u64 = 1 << 20;
/// QEMU's limits: at most 0x1FFFFF80 blocks (and this many bytes, 512 TiB - 128 MiB).
const MAX_BLOCKS: u64 = 0x1FFF_FF80;

struct Fields {
    image_type: u32,
    size: u64,
    block_size: u32,
    blocks: u32,
    allocated: u32,
    uuid_create: [u8; 16],
    uuid_linkage: [u8; 16],
    uuid_parent_modify: [u8; 16],
}

fn check(size: u64, block_size: u32) -> Result<u32> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::unsupported(format!(
            "VDI block size {block_size} (a power of two, 512 B to 256 MiB)"
        )));
    }
    let blocks = size.div_ceil(block_size as u64);
    if size == 0 || !size.is_multiple_of(512) || blocks > MAX_BLOCKS {
        return Err(Error::unsupported(format!("VDI virtual size {size}")));
    }
    Ok(blocks as u32)
}

/// Writes the header and block map; returns the data offset.
fn write(storage: &dyn Storage, f: &Fields) -> Result<u64> {
    let map_len = f.blocks as u64 * 4;
    let data_offset = (MAP_OFFSET + map_len).next_multiple_of(DATA_ALIGN);
    let data_offset32 =
        u32::try_from(data_offset).map_err(|_| Error::unsupported("VDI block map beyond 4 GiB"))?;
    let mut h = [0u8; HEADER_AREA];
    h[..PRE_HEADER_TEXT.len()].copy_from_slice(PRE_HEADER_TEXT.as_bytes());
    put_le32(&mut h, 0x40, SIGNATURE);
    put_le32(&mut h, 0x44, VERSION_1_1);
    put_le32(&mut h, 0x48, V1_HEADER_SIZE);
    put_le32(&mut h, 0x4C, f.image_type);
    put_le32(&mut h, 0x50, 0);
    put_le32(&mut h, 0x154, MAP_OFFSET as u32);
    put_le32(&mut h, 0x158, data_offset32);
    // Legacy geometry: none, 512-byte sectors (QEMU requires the 512).
    put_le32(&mut h, 0x168, 512);
    put_le64(&mut h, 0x170, f.size);
    put_le32(&mut h, 0x178, f.block_size);
    put_le32(&mut h, 0x17C, 0);
    put_le32(&mut h, 0x180, f.blocks);
    put_le32(&mut h, 0x184, f.allocated);
    h[0x188..0x198].copy_from_slice(&f.uuid_create);
    h[0x198..0x1A8].copy_from_slice(&random_id()?);
    h[0x1A8..0x1B8].copy_from_slice(&f.uuid_linkage);
    h[0x1B8..0x1C8].copy_from_slice(&f.uuid_parent_modify);

    let mut map = vec![0u8; map_len as usize];
    for (b, e) in map.chunks_exact_mut(4).enumerate() {
        let v = if f.allocated == f.blocks {
            b as u32
        } else {
            FREE
        };
        e.copy_from_slice(&v.to_le_bytes());
    }
    let data_end = data_offset + f.allocated as u64 * f.block_size as u64;
    // Validate what we wrote with the reader's own checks.
    Header::parse(&h, data_end)?;
    storage.set_len(data_end)?;
    storage.write_all_at(&h, 0)?;
    storage.write_all_at(&map, MAP_OFFSET)?;
    storage.sync()?;
    Ok(data_offset)
}

/// Writes a new dynamic or fixed VDI of `size` bytes (a multiple of 512) into
/// `storage` (empty).
pub fn create(storage: &dyn Storage, size: u64, fixed: bool, block_size: u32) -> Result<NewImage> {
    let blocks = check(size, block_size)?;
    let id = random_id()?;
    write(
        storage,
        &Fields {
            image_type: if fixed { 2 } else { 1 },
            size,
            block_size,
            blocks,
            allocated: if fixed { blocks } else { 0 },
            uuid_create: id,
            uuid_linkage: [0; 16],
            uuid_parent_modify: [0; 16],
        },
    )?;
    Ok(NewImage {
        format: Format::Vdi,
        size,
        block_size: Some(block_size),
        logical_sector_size: 512,
        fixed,
        link_id: id,
        parent_id: None,
    })
}

/// Makes `child` a differencing VDI of the VDI in `parent`.
pub fn snapshot(parent: &dyn Storage, child: &dyn Storage) -> Result<NewImage> {
    let len = parent.len()?;
    let mut raw = [0u8; HEADER_AREA];
    let n = len.min(HEADER_AREA as u64) as usize;
    parent.read_exact_at(&mut raw[..n], 0)?;
    let p = Header::parse(&raw, len)?;
    let size = p.virtual_size();
    let blocks = check(size, p.block_size)?;
    if p.image_type == ImageType::Diff && p.uuid_linkage == [0; 16] {
        return Err(Error::corrupt(
            "VDI header",
            "differencing parent without a parent UUID",
        ));
    }
    let id = random_id()?;
    write(
        child,
        &Fields {
            image_type: 4,
            size,
            block_size: p.block_size,
            blocks,
            allocated: 0,
            uuid_create: id,
            uuid_linkage: p.uuid_create,
            uuid_parent_modify: p.uuid_modify,
        },
    )?;
    Ok(NewImage {
        format: Format::Vdi,
        size,
        block_size: Some(p.block_size),
        logical_sector_size: 512,
        fixed: false,
        link_id: id,
        parent_id: Some(p.uuid_create),
    })
}
