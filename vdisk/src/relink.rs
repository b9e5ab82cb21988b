//! Rewriting the parent link of a differencing image (`vhdio rebase -u`,
//! and the last step of commit and safe rebase), per format: VHD locators,
//! VHDX locator entries (through the log), VDI parent UUIDs. Like
//! [`crate::snapshot`], nothing here opens a path: the caller hands in the
//! child's storage (writable) and the new parent's (read-only), and the
//! paths to record.

use std::path::Path;

use crate::create::Links;
use crate::{Error, Format, Result, Storage, probe, vdi, vhd, vhdx};

/// Makes the image in `child` (found at `child_path`) a child of the image
/// in `parent` (found at that path), or standalone with `None`. The child's
/// data is not touched: what it shows changes unless the new parent reads
/// as the old one did (the caller's business: `rebase` checks identities or
/// copies the differences first).
pub fn relink(
    child: &dyn Storage,
    child_path: &Path,
    parent: Option<(&Path, &dyn Storage)>,
) -> Result<()> {
    if !child.is_writable() {
        return Err(Error::ReadOnly);
    }
    let format = probe(child)?.ok_or(Error::NotAnImage)?;
    let links = match parent {
        Some((p, s)) => {
            let pf = probe(s)?.ok_or(Error::NotAnImage)?;
            if pf != format {
                return Err(Error::ParentMismatch(format!(
                    "a {pf} parent for a {format} child"
                )));
            }
            Some((Links::new(p, child_path)?, s))
        }
        None => None,
    };
    let with_links = links.as_ref().map(|(l, s)| (l, *s));
    match format {
        Format::Vhd => vhd::relink::relink(child, with_links),
        Format::Vhdx => vhdx::relink::relink(child, with_links),
        Format::Vdi => vdi::relink::relink(child, with_links.map(|(_, s)| s)),
        Format::Raw => Err(Error::unsupported("raw disks have no parent")),
        f @ (Format::Vmdk | Format::Qcow2) => Err(Error::unsupported(format!(
            "rewriting the parent link of a {f} image (VHD, VHDX and VDI only)"
        ))),
    }
}

/// Makes the image in `child` store nothing: every block unallocated, so it
/// reads its parent's disk. Each entry cleared is one block the parent now
/// shows, so after a crash at any point the child reads as before if the
/// parent holds what the child held (the end of a commit). The child keeps
/// its identity; space of the freed blocks is given back where the format
/// allows (VHD, VDI: the file is cut after its metadata).
pub fn empty(child: &dyn Storage) -> Result<()> {
    if !child.is_writable() {
        return Err(Error::ReadOnly);
    }
    match probe(child)?.ok_or(Error::NotAnImage)? {
        Format::Vhd => vhd::relink::empty(child),
        Format::Vhdx => vhdx::relink::empty(child),
        Format::Vdi => vdi::relink::empty(child),
        Format::Raw => Err(Error::unsupported("emptying a raw disk")),
        f @ (Format::Vmdk | Format::Qcow2) => Err(Error::unsupported(format!(
            "emptying a {f} image (VHD, VHDX and VDI only)"
        ))),
    }
}
