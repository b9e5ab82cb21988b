//! `vhdio rebase`: gives a differencing image another parent (or none).
//!
//! `-u` rewrites only the link (after the parent was moved or renamed),
//! checking that the new parent has the identity the child records unless
//! `--force`. Without `-u` (safe), every range the child does not store and
//! where the old and the new parent read differently is first copied into
//! the child, with the bytes the child shows now, so its view never changes;
//! the link is rewritten last. `-b ""` makes the image standalone.

use std::fs::File;
use std::path::{Path, PathBuf};

use vdisk::copy::{CHUNK, GRANULE};
use vdisk::{Allocation, Disk, Mapping, OpenOptions, StdParentOpener};

use crate::convert::{absolute_new, open_source};
use crate::lock::ReadLocks;
use crate::progress::Progress;
use crate::{EXIT_ERROR, EXIT_OK, Failure, chain, fail};

pub struct RebaseArgs<'a> {
    pub image: &'a Path,
    /// Empty: standalone.
    pub new_parent: &'a Path,
    pub unsafe_link_only: bool,
    pub force: bool,
    pub progress: bool,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Failure {
    fail(EXIT_ERROR, format!("{}: {e}", path.display()))
}

/// Opens `path` for reading and writing (a regular file).
pub fn open_rw(path: &Path) -> Result<File, Failure> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| err(path, e))?;
    if !f.metadata().map_err(|e| err(path, e))?.is_file() {
        return Err(err(path, "not a regular file"));
    }
    Ok(f)
}

/// Rewrites the parent link of `image` to `parent` (`None`: standalone).
pub fn relink(image: &Path, parent: Option<&Path>) -> Result<(), Failure> {
    let child_abs = absolute_new(image)?;
    let child = (open_rw(image)?, true);
    match parent {
        Some(p) => {
            let p_abs = std::fs::canonicalize(p).map_err(|e| err(p, e))?;
            let ps = (File::open(&p_abs).map_err(|e| err(p, e))?, false);
            vdisk::relink::relink(&child, &child_abs, Some((&p_abs, &ps)))
        }
        None => vdisk::relink::relink(&child, &child_abs, None),
    }
    .map_err(|e| err(image, e))
}

pub fn rebase(a: RebaseArgs) -> Result<u8, Failure> {
    let new_parent: Option<PathBuf> =
        (!a.new_parent.as_os_str().is_empty()).then(|| a.new_parent.to_path_buf());
    let _lock = crate::lock::lock_writer(a.image)?;
    let top = chain::open_layer(chain::open_file(a.image, &ReadLocks::Skip)?, a.image)?;
    let link = top.image.parent_link().cloned();
    if link.is_none() && new_parent.is_none() {
        // Standalone already (as qemu-img rebase -b "" of such an image).
        return Ok(EXIT_OK);
    }
    if let Some(np) = &new_parent {
        // The new parent and its own chain must open.
        let parent_chain = chain::open_chain(np, &ReadLocks::all())?;
        let p = &parent_chain[0];
        if p.format != top.format {
            return Err(err(
                np,
                format!("a {} parent for a {} image", p.format, top.format),
            ));
        }
        let pid = p.image.link_id();
        let same = link
            .as_ref()
            .is_some_and(|l| l.id == pid || l.alternate_id == Some(pid));
        if a.unsafe_link_only && !same && !a.force {
            let recorded = link.as_ref().map_or("no parent".to_string(), |l| {
                chain::id_text(top.format, &l.id)
            });
            return Err(err(
                a.image,
                format!(
                    "{} has identity {}, the image records {recorded}; --force links it anyway (the image then shows different data unless the two read the same)",
                    np.display(),
                    chain::id_text(p.format, &pid)
                ),
            ));
        }
    }
    if !a.unsafe_link_only {
        if link.is_none() {
            return Err(err(
                a.image,
                "not a differencing image (use -u to link it to a parent)",
            ));
        }
        copy_differences(a.image, new_parent.as_deref(), a.progress)?;
    }
    drop(top);
    relink(a.image, new_parent.as_deref())?;
    Ok(EXIT_OK)
}

/// Copies into `image` every range it does not store where its current
/// parent chain and `new_parent` (zeros for none) read differently.
fn copy_differences(
    image: &Path,
    new_parent: Option<&Path>,
    progress: bool,
) -> Result<(), Failure> {
    // Reader locks on both chains while the differences are copied (the
    // image itself holds our writer locks).
    let new_view = match new_parent {
        Some(p) => Some(open_source(p, None, &ReadLocks::all())?.disk),
        None => None,
    };
    let _old_chain = chain::open_chain(image, &ReadLocks::except(&[image.to_path_buf()]))?;
    let child = vdisk::open_disk(
        Box::new((open_rw(image)?, true)),
        image,
        OpenOptions { writable: true },
        &StdParentOpener,
    )
    .map_err(|e| err(image, e))?;
    if let Some(n) = &new_view
        && n.size() < child.size()
    {
        return Err(err(
            image,
            format!(
                "the new parent has {} bytes, the image {}",
                n.size(),
                child.size()
            ),
        ));
    }
    let mut p = Progress::new(progress);
    copy_unstored(&child, new_view.as_ref(), &mut |d, t| p.update(d, t))
        .map_err(|e| err(image, e))?;
    p.finish();
    child.flush().map_err(|e| err(image, e))?;
    child.close().map_err(|e| err(image, e))?;
    Ok(())
}

/// The runs of `len` bytes at `offset` that `disk`'s top layer does not
/// store (reads from its parents).
fn unstored_runs(disk: &Disk, offset: u64, len: u64) -> vdisk::Result<Vec<(u64, u64)>> {
    let top = &disk.layers()[0];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < len {
        let (m, n) = top.map(offset + at, len - at)?;
        if m == Mapping::Unallocated {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
        }
        at += n;
    }
    Ok(runs)
}

/// Whether `disk` stores nothing in the run (a hole through the chain).
fn is_hole(disk: &Disk, offset: u64, len: u64) -> vdisk::Result<bool> {
    let mut at = 0;
    while at < len {
        let (kind, n) = disk.map_allocation(offset + at, len - at)?;
        if kind == Allocation::Data {
            return Ok(false);
        }
        at += n;
    }
    Ok(true)
}

fn copy_unstored(
    child: &Disk,
    new_view: Option<&Disk>,
    progress: &mut dyn FnMut(u64, u64),
) -> vdisk::Result<()> {
    let size = child.size();
    let mut old = vec![0u8; CHUNK];
    let mut new = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64);
        for (at, n) in unstored_runs(child, offset, len)? {
            let start = offset + at;
            let new_hole = match new_view {
                Some(v) => is_hole(v, start, n)?,
                None => true,
            };
            if new_hole && is_hole(child, start, n)? {
                continue;
            }
            let (o, w) = (&mut old[..n as usize], &mut new[..n as usize]);
            child.read_at(o, start)?;
            match new_view {
                Some(v) if !new_hole => v.read_at(w, start)?,
                _ => w.fill(0),
            }
            let mut g = 0usize;
            while g < o.len() {
                let e = (g + GRANULE).min(o.len());
                if o[g..e] != w[g..e] {
                    // The bytes the child shows now: its view is unchanged.
                    child.write_at(&o[g..e], start + g as u64)?;
                }
                g = e;
            }
        }
        offset += len;
        progress(offset, size);
    }
    Ok(())
}
