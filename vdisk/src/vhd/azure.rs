//! Fixed VHDs that Azure accepts: a virtual size of a whole number of MiB,
//! `current_size` (and `original_size`) equal to it, so that the file is
//! exactly size + 512 bytes, and the creator fields Hyper-V writes (`win `,
//! version 10.0, host `Wi2k`), which every reader sizes by `current_size`
//! (QEMU and old Virtual PC size `vpc `/`qemu` disks by their CHS geometry,
//! which rounds down and so never gives a whole MiB).

use crate::bytes::put_be32;
use crate::create::{NewImage, random_id};
use crate::vhd::create::{MAX_SIZE, chs_geometry, footer};
use crate::vhd::footer::DiskType;
use crate::{Error, Format, Result, Storage};

/// Azure's alignment of virtual sizes.
pub const ALIGN: u64 = 1 << 20;

/// `size` rounded up to a whole MiB.
pub fn azure_size(size: u64) -> u64 {
    size.next_multiple_of(ALIGN)
}

/// Writes a fixed VHD of `size` bytes rounded up to a whole MiB into
/// `storage` (empty); the data area is a hole of the file until written.
pub fn create_fixed(storage: &dyn Storage, size: u64) -> Result<NewImage> {
    let size = azure_size(size);
    if size == 0 || size > MAX_SIZE / ALIGN * ALIGN {
        return Err(Error::unsupported(format!(
            "VHD virtual size {size} (1 MiB to 2040 GiB)"
        )));
    }
    let id = random_id()?;
    let mut f = footer(DiskType::Fixed, size, chs_geometry(size), id)?;
    f.raw[28..32].copy_from_slice(b"win ");
    put_be32(&mut f.raw, 32, 0x000A_0000);
    f.raw[36..40].copy_from_slice(b"Wi2k");
    f.creator_app = *b"win ";
    storage.set_len(size)?;
    storage.write_all_at(&f.encode(), size)?;
    storage.sync()?;
    Ok(NewImage {
        format: Format::Vhd,
        size,
        block_size: None,
        logical_sector_size: 512,
        fixed: true,
        link_id: id,
        parent_id: None,
    })
}
