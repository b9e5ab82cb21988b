//! Rewriting the parent link of a VDI: uuidLinkage (the parent's
//! uuidCreate) and uuidParentModify (its uuidModify), in the header sector;
//! making a differencing VDI standalone (type normal, no linkage). One
//! 512-byte sector write, then a sync. VDI records no parent path.

use crate::bytes::{le32, put_le32};
use crate::vdi::header::{HEADER_AREA, Header, ImageType, VERSION_1_1};
use crate::{Error, Result, Storage};

/// The header sector of a version 1.1 VDI, parsed.
fn read(storage: &dyn Storage) -> Result<([u8; HEADER_AREA], Header)> {
    let len = storage.len()?;
    let mut raw = [0u8; HEADER_AREA];
    let n = len.min(HEADER_AREA as u64) as usize;
    storage.read_exact_at(&mut raw[..n], 0)?;
    let h = Header::parse(&raw, len)?;
    if le32(&raw, 0x44) != VERSION_1_1 {
        return Err(Error::unsupported(
            "relinking a VDI of header version 0.x (convert it first)",
        ));
    }
    Ok((raw, h))
}

/// Makes the VDI in `child` a child of the VDI in `parent` (same virtual
/// size), or standalone for `None`.
pub fn relink(child: &dyn Storage, parent: Option<&dyn Storage>) -> Result<()> {
    let (mut raw, h) = read(child)?;
    match parent {
        Some(p) => {
            let (_, ph) = read(p)?;
            if ph.virtual_size() != h.virtual_size() {
                return Err(Error::unsupported(format!(
                    "a VDI parent of {} bytes for a child of {}",
                    ph.virtual_size(),
                    h.virtual_size()
                )));
            }
            put_le32(&mut raw, 0x4C, 4);
            raw[0x1A8..0x1B8].copy_from_slice(&ph.uuid_create);
            raw[0x1B8..0x1C8].copy_from_slice(&ph.uuid_modify);
        }
        None => {
            if h.image_type == ImageType::Diff {
                put_le32(&mut raw, 0x4C, 1);
            }
            raw[0x1A8..0x1C8].fill(0);
        }
    }
    // Validate with the reader's own checks before writing.
    Header::parse(&raw, child.len()?)?;
    child.write_all_at(&raw, 0)?;
    child.sync()?;
    Ok(())
}

/// Every block map entry free (then a barrier), no blocks allocated, the
/// file cut at the data area.
pub fn empty(child: &dyn Storage) -> Result<()> {
    let (mut raw, h) = read(child)?;
    let map = vec![0xFFu8; h.blocks as usize * 4];
    child.write_all_at(&map, h.blocks_offset)?;
    child.sync()?;
    put_le32(&mut raw, 0x184, 0);
    child.write_all_at(&raw, 0)?;
    child.sync()?;
    child.set_len(h.data_offset)?;
    child.sync()?;
    Ok(())
}
