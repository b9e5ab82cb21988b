//! Parent links: `parentCID` and `parentFileNameHint`, CIDs.

use std::path::Path;

use super::DEFAULT_CID;
use super::descriptor::{Descriptor, NO_PARENT};
use super::extents::resolve;
use crate::{Error, ParentLink, Result};

/// The parent link `d` records, candidates resolved against `path`.
pub(super) fn parent_link(d: &Descriptor, path: &Path) -> Result<Option<ParentLink>> {
    if d.parent_cid == NO_PARENT {
        return Ok(None);
    }
    let Some(hint) = &d.parent_hint else {
        return Err(Error::corrupt(
            "VMDK descriptor",
            format!("parentCID={:08x} but no parentFileNameHint", d.parent_cid),
        ));
    };
    let mut candidates = vec![resolve(path, hint)];
    // A hint written on another machine (or Windows): the name alone, beside the child.
    if let Some(base) = hint.rsplit(['/', '\\']).next()
        && let Some(dir) = path.parent()
    {
        let c = dir.join(base);
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    Ok(Some(ParentLink {
        candidates,
        id: cid_id(d.parent_cid),
        alternate_id: None,
        description: format!(
            "VMDK parent \"{hint}\" with CID {:08x} (the child's parentCID; a parent written after the child was made has another CID)",
            d.parent_cid
        ),
    }))
}

/// The link identity of a CID.
pub fn cid_id(cid: u32) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(b"VMDK");
    id[4..8].copy_from_slice(&cid.to_le_bytes());
    id
}

/// A new CID, different from `old` and from "no parent".
pub(super) fn new_cid(old: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ ((std::process::id() as u64) << 32) ^ old as u64;
    // splitmix64
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let c = (z ^ (z >> 31)) as u32;
    if c == old || c == NO_PARENT || c == DEFAULT_CID {
        c ^ 0x5A5A_0001
    } else {
        c
    }
}
