//! Changing the virtual size of an image file, per format (see
//! `vhd::resize`, `vhdx::resize`, `vdi::resize`). Like the rest of the
//! crate, the caller hands in the storage (writable, not open as an image
//! elsewhere). Bytes that the old size did not cover read as zeros after a
//! grow, also inside a partly used last block.

use crate::{Disk, Error, Format, Mapping, Result, Storage, probe, vdi, vhd, vhdx};

/// Resizes the image in `storage` to `new_size` bytes (rounded up to its
/// logical sector size by the caller). Returns the old size.
pub fn resize(storage: &dyn Storage, new_size: u64) -> Result<u64> {
    if !storage.is_writable() {
        return Err(Error::ReadOnly);
    }
    match probe(storage)?.ok_or(Error::NotAnImage)? {
        Format::Vhd => vhd::resize::resize(storage, new_size),
        Format::Vhdx => vhdx::resize::resize(storage, new_size),
        Format::Vdi => vdi::resize::resize(storage, new_size),
        f @ (Format::Vmdk | Format::Qcow2) => Err(Error::unsupported(format!(
            "resizing a {f} image (VHD, VHDX and VDI only; qemu-img resize does qcow2)"
        ))),
        Format::Raw => {
            let old = storage.len()?;
            storage.set_len(new_size)?;
            storage.sync()?;
            Ok(old)
        }
    }
}

/// After growing from `old_size`: writes zeros over what the top layer of
/// `disk` stores between `old_size` and the end of its block (bytes a
/// partly used last block kept from before, e.g. an earlier shrink).
pub fn zero_grown_tail(disk: &Disk, old_size: u64, block_size: u64) -> Result<()> {
    let end = old_size
        .next_multiple_of(block_size.max(1))
        .min(disk.size());
    let top = &disk.layers()[0];
    let mut at = old_size;
    while at < end {
        let (m, n) = top.map(at, end - at)?;
        if let Mapping::Data { .. } = m {
            disk.write_at(&vec![0u8; n as usize], at)?;
        }
        at += n;
    }
    Ok(())
}
