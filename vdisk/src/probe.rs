//! Deciding from the first and last sectors whether a file is an image.

use crate::bytes::le32;
use crate::vhd::footer::{COOKIE as VHD_COOKIE, Footer};
use crate::{Format, Result, Storage};

/// `vhdxfile` at offset 0 (MS-VHDX 2.2.1).
pub const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// VDI signature at offset 0x40.
pub const VDI_SIGNATURE: u32 = 0xBEDA_107F;

/// Which format `storage` holds, or `None` if it is not an image.
///
/// Reads at most the first and last sectors. A VHD is recognised by its footer
/// at the end of the file (also the 511-byte footer of old Virtual PC), or by
/// the footer copy at offset 0 of a dynamic or differencing disk; a `conectix`
/// at offset 0 alone is not enough, since a fixed disk may hold a VHD as data.
pub fn probe(storage: &dyn Storage) -> Result<Option<Format>> {
    let len = storage.len()?;
    if len < 512 {
        // A VMDK text descriptor can be this small.
        let mut head = vec![0u8; len as usize];
        storage.read_exact_at(&mut head, 0)?;
        return Ok(crate::vmdk::probe(&head, len).then_some(Format::Vmdk));
    }
    let mut first = [0u8; 512];
    storage.read_exact_at(&mut first, 0)?;
    if &first[..8] == VHDX_SIGNATURE {
        return Ok(Some(Format::Vhdx));
    }
    if &first[..4] == crate::qcow2::header::MAGIC {
        return Ok(Some(Format::Qcow2));
    }
    if le32(&first, 0x40) == VDI_SIGNATURE {
        return Ok(Some(Format::Vdi));
    }
    let mut last = [0u8; 512];
    storage.read_exact_at(&mut last, len - 512)?;
    // A blktap-disabled VHD (`v_poison`) is recognised so that opening it is
    // refused, not passed through as a raw file.
    if &last[..8] == VHD_COOKIE
        || &last[1..9] == VHD_COOKIE
        || &last[..8] == crate::vhd::footer::POISON_COOKIE
    {
        return Ok(Some(Format::Vhd));
    }
    if &first[..8] == VHD_COOKIE
        && let Ok(footer) = Footer::parse(&first)
        && footer.disk_type.is_sparse()
        && footer.data_offset < len
    {
        return Ok(Some(Format::Vhd));
    }
    // After the VHD footer: a fixed VHD may hold a VMDK as its data.
    if crate::vmdk::probe(&first, len) {
        return Ok(Some(Format::Vmdk));
    }
    Ok(None)
}
