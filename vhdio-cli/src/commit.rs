//! `vhdio commit`: writes what IMAGE (and the images between it and BASE)
//! store into BASE (default: IMAGE's parent), then replaces IMAGE by an
//! empty child of BASE, so both read the disk IMAGE showed.
//!
//! Crash safety: only ranges IMAGE's upper layers decide are written into
//! BASE, with the bytes IMAGE shows there, so IMAGE's view does not change
//! while BASE is written. A VHDX BASE gets a new DataWriteGuid at its first
//! write; it is chosen beforehand and recorded in the layer above BASE as
//! parent_linkage2, so that layer finds BASE at every moment. BASE is
//! flushed and closed; then IMAGE is relinked to BASE and emptied (every
//! block unallocated), keeping its identity, so children of IMAGE still
//! find it. Images between IMAGE and BASE no longer read as before (BASE
//! holds what IMAGE showed, also where they showed BASE's old data) and
//! should be removed: each is named in a warning; a VHDX one no longer opens
//! (the layer above BASE loses the parent_linkage2 the commit gave it). They
//! cannot be relinked into a correct state: BASE's old data is gone.

use std::path::Path;

use vdisk::copy::{CHUNK, GRANULE};
use vdisk::{Disk, Format, Image, Mapping, OpenOptions, StdParentOpener};

use crate::lock::ReadLocks;
use crate::progress::Progress;
use crate::rebase::open_rw;
use crate::{EXIT_ERROR, EXIT_OK, Failure, chain, fail};

fn err(path: &Path, e: impl std::fmt::Display) -> Failure {
    fail(EXIT_ERROR, format!("{}: {e}", path.display()))
}

/// Whether layers `0..layers.len()` decide how the run at `offset` reads
/// (data or zeros stored, or the end of a smaller layer), and its length.
fn decided_above(layers: &[&dyn Image], offset: u64, len: u64) -> vdisk::Result<(bool, u64)> {
    let Some((image, below)) = layers.split_first() else {
        return Ok((false, len));
    };
    let inside = image.virtual_size().saturating_sub(offset);
    if inside == 0 {
        return Ok((true, len));
    }
    let want = len.min(inside);
    let (m, run) = image.map(offset, want)?;
    if run == 0 || run > want {
        return Err(vdisk::Error::corrupt(
            "mapping",
            format!("mapped {run} of {want}"),
        ));
    }
    match m {
        Mapping::Data { .. } | Mapping::Zero | Mapping::Compressed => Ok((true, run)),
        Mapping::Unallocated => decided_above(below, offset, run),
    }
}

pub fn commit(image: &Path, base: Option<&Path>, progress: bool) -> Result<u8, Failure> {
    // Found first without locks: which files are written depends on it.
    let layers = chain::open_chain(image, &ReadLocks::Skip)?;
    if layers.len() < 2 {
        return Err(err(image, "not a differencing image: nothing to commit"));
    }
    let k = match base {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).map_err(|e| err(b, e))?;
            layers
                .iter()
                .position(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == want))
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    err(
                        b,
                        format!("is not a parent in the chain of {}", image.display()),
                    )
                })?
        }
    };
    let base_path = layers[k].path.clone();
    // IMAGE (replaced at the end), BASE and the layer above it are written.
    let mut written: Vec<std::path::PathBuf> = Vec::new();
    for p in [image, layers[k - 1].path.as_path(), base_path.as_path()] {
        let real = std::fs::canonicalize(p).map_err(|e| err(p, e))?;
        if !written.contains(&real) {
            written.push(real);
        }
    }
    let _locks = written
        .iter()
        .map(|p| crate::lock::lock_writer(p))
        .collect::<Result<Vec<_>, _>>()?;
    // Opened again under the locks, reader locks on the files only read
    // (the images between, those below BASE), so nothing changes them now.
    let found: Vec<_> = layers.iter().map(|l| l.path.clone()).collect();
    drop(layers);
    let layers = chain::open_chain(image, &ReadLocks::except(&written))?;
    if layers.iter().map(|l| &l.path).ne(found.iter()) {
        return Err(err(image, "its chain changed while the commit started"));
    }
    let above_base = layers[k - 1].path.clone();
    let format = layers[0].format;
    let intermediates: Vec<_> = layers[1..k].iter().map(|l| l.path.clone()).collect();
    // An interrupted commit left the layer above BASE finding BASE by its
    // parent_linkage2: make that its parent_linkage before choosing the next.
    let promote = layers[k - 1]
        .image
        .parent_link()
        .is_some_and(|l| l.id != layers[k].image.link_id());
    let (view, _) = chain::into_disk(layers);
    let base_disk = vdisk::open_disk(
        Box::new((open_rw(&base_path)?, true)),
        &base_path,
        OpenOptions { writable: true },
        &StdParentOpener,
    )
    .map_err(|e| err(&base_path, e))?;
    if base_disk.size() < view.size() {
        return Err(err(
            &base_path,
            format!(
                "has {} bytes, {} has {}: resize it first",
                base_disk.size(),
                image.display(),
                view.size()
            ),
        ));
    }
    if format == Format::Vhdx {
        if promote {
            crate::rebase::relink(&above_base, Some(&base_path))?;
        }
        let guid = vdisk::create::random_id().map_err(|e| err(&base_path, e))?;
        let above = (open_rw(&above_base)?, true);
        vdisk::vhdx::relink::set_alternate_linkage(&above, Some(guid))
            .map_err(|e| err(&above_base, e))?;
        base_disk.layers()[0]
            .set_next_data_write_guid(guid)
            .map_err(|e| err(&base_path, e))?;
    }
    let mut p = Progress::new(progress);
    copy_decided(&view, k, &base_disk, &mut |d, t| p.update(d, t))
        .map_err(|e| err(&base_path, e))?;
    p.finish();
    base_disk.flush().map_err(|e| err(&base_path, e))?;
    base_disk.close().map_err(|e| err(&base_path, e))?;
    drop(base_disk);
    drop(view);
    // IMAGE's data over BASE reads as before, BASE now holding it too; and
    // BASE alone reads as IMAGE's parent did where IMAGE stores nothing.
    // So: IMAGE on its parent BASE is emptied, then relinked (VHDX: its
    // parent_linkage2 becomes parent_linkage); IMAGE above intermediates
    // names BASE first, then is emptied.
    let empty = || -> Result<(), Failure> {
        let child = (open_rw(image)?, true);
        vdisk::relink::empty(&child).map_err(|e| err(image, e))
    };
    if k == 1 {
        empty()?;
        crate::rebase::relink(image, Some(&base_path))?;
    } else {
        crate::rebase::relink(image, Some(&base_path))?;
        empty()?;
    }
    if format == Format::Vhdx && k > 1 {
        // The layer above BASE was given BASE's new DataWriteGuid for the
        // commit's sake only: without it, the stale images refuse to open
        // (VHDX's own guard) instead of showing a wrong disk.
        let above = (open_rw(&above_base)?, true);
        vdisk::vhdx::relink::set_alternate_linkage(&above, None)
            .map_err(|e| err(&above_base, e))?;
    }
    for i in &intermediates {
        eprintln!("vhdio: {}", stale_message(i, image, &base_path, format));
    }
    Ok(EXIT_OK)
}

/// The warning for an image that lay between IMAGE and BASE: BASE now
/// holds what IMAGE showed, also where this image showed BASE's old data,
/// so it no longer reads its disk (qemu-img commit -b leaves the same). It
/// cannot be repaired: BASE's old data is gone.
fn stale_message(stale: &Path, image: &Path, base: &Path, format: Format) -> String {
    let guard = if format == Format::Vhdx {
        "; it no longer opens (its parent's DataWriteGuid changed)"
    } else {
        ""
    };
    format!(
        "{}: stale: it was between {} and {}, which now holds what {} showed, so it no longer \
         reads as before{guard}; remove it (and its other children)",
        stale.display(),
        image.display(),
        base.display(),
        image.display()
    )
}

/// Writes into `base` (its top layer) what `view`'s layers `0..k` decide,
/// granule by granule where it differs from what `base` reads.
fn copy_decided(
    view: &Disk,
    k: usize,
    base: &Disk,
    progress: &mut dyn FnMut(u64, u64),
) -> vdisk::Result<()> {
    let upper: Vec<&dyn Image> = view.layers()[..k].iter().map(|l| l.as_ref()).collect();
    let size = view.size();
    let mut ours = vec![0u8; CHUNK];
    let mut theirs = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(CHUNK as u64);
        let mut at = 0u64;
        while at < len {
            let (decided, n) = decided_above(&upper, offset + at, len - at)?;
            if decided {
                let start = offset + at;
                let (o, t) = (&mut ours[..n as usize], &mut theirs[..n as usize]);
                view.read_at(o, start)?;
                base.read_at(t, start)?;
                let mut g = 0usize;
                while g < o.len() {
                    let e = (g + GRANULE).min(o.len());
                    if o[g..e] != t[g..e] {
                        base.write_at(&o[g..e], start + g as u64)?;
                    }
                    g = e;
                }
            }
            at += n;
        }
        offset += len;
        progress(offset, size);
    }
    Ok(())
}
