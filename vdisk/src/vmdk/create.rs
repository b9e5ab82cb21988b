//! Creating VMDK images.

use crate::create::Links;
use crate::{Error, NewImage, Result, Storage};

/// 64 KiB grains (128 sectors), VMware's and qemu's default.
pub const DEFAULT_GRAIN: u32 = 64 << 10;

/// A new monolithicSparse image in `storage`.
pub fn create(storage: &dyn Storage, size: u64, fixed: bool, grain: u32) -> Result<NewImage> {
    let _ = (storage, size, fixed, grain);
    Err(Error::unsupported(
        "creating VMDK images (use qemu-img create -f vmdk)",
    ))
}

/// A child of the VMDK in `parent`.
pub fn snapshot(parent: &dyn Storage, child: &dyn Storage, links: &Links) -> Result<NewImage> {
    let _ = (parent, child, links);
    Err(Error::unsupported(
        "VMDK snapshots (use qemu-img create -f vmdk -b)",
    ))
}
