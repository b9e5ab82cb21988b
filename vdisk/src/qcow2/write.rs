//! Writing qcow2 images (the active L1 only).
//!
//! * A cluster whose L2 entry has COPIED set (refcount exactly one) is
//!   overwritten in place ([`crate::Disk`] does that without this module).
//! * Any other cluster is written whole to a new cluster taken at the end of
//!   the file: the bytes the write does not cover are what the cluster read
//!   before (the backing chain for an unallocated one, zeros, the
//!   decompressed data of a compressed one, the old data of a cluster shared
//!   with an internal snapshot). With extended L2 entries only the touched
//!   subclusters are written and marked allocated. A whole cluster of zeros
//!   becomes a zero entry (v3), or nothing where it reads zeros already. An
//!   L2 table shared with a snapshot (L1 entry without COPIED) is copied first.
//! * Group commit: the new L2/L1 entries and refcounts are kept in memory
//!   (readers see the entries at once) and written by [`commit`] in
//!   qemu's order, each step after a barrier: the data; the refcount blocks,
//!   then the table entries naming new blocks (or a grown table, then the
//!   header); the L2 tables, then the L1 entries naming new ones; last the
//!   refcount decrements of clusters no longer referenced. A crash at any
//!   point leaves at worst leaked clusters, which `qemu-img check` accepts.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::cache::L2Table;
use super::header::{self, Header};
use super::refcount::Refcounts;
use super::{COPIED, Entry, OFFSET_MASK, Qcow2Image};
use crate::bytes::put_be64;
use crate::{Error, Image, Result};

/// Pending L2 tables (count, bytes) that trigger a commit without waiting
/// for a flush: dirty tables are pinned in memory.
const COMMIT_BOUND: usize = 512;
const COMMIT_BOUND_BYTES: u64 = 64 << 20;

pub struct WriteState {
    refcounts: Refcounts,
    /// L2 tables changed in memory: (file offset, table).
    dirty_l2: Vec<(u64, Arc<L2Table>)>,
    dirty_l1: BTreeSet<usize>,
    /// Host clusters whose reference was dropped: decremented after the
    /// tables that dropped them are durable.
    released: Vec<u64>,
    /// The header was updated for writing (autoclear bits cleared).
    header_done: bool,
}

impl WriteState {
    pub fn load(img: &Qcow2Image) -> Result<WriteState> {
        let h = &img.header;
        Ok(WriteState {
            refcounts: Refcounts::load(
                img.storage.as_ref(),
                img.cluster_size,
                h.refcount_order,
                h.refcount_table_offset,
                h.refcount_table_clusters,
            )?,
            dirty_l2: Vec::new(),
            dirty_l1: BTreeSet::new(),
            released: Vec::new(),
            header_done: false,
        })
    }
}

/// Whether the image may be opened for writing.
pub fn check_writable(h: &Header, path: &Path) -> Result<()> {
    let p = path.display();
    if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
        return Err(Error::unsupported(format!(
            "{p}: the qcow2 corrupt bit is set: the image may only be read (repair it with `qemu-img check -r all`)"
        )));
    }
    if h.incompatible & header::INCOMPAT_DIRTY != 0 {
        return Err(Error::unsupported(format!(
            "{p}: the qcow2 dirty bit is set (lazy refcounts not yet written): repair the refcounts with `qemu-img check -r all` before writing, or open it read-only"
        )));
    }
    if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
        return Err(Error::unsupported(format!(
            "{p}: writing qcow2 images with an external data file is not supported; use `vhdio serve` over `qemu-nbd`, or read it only"
        )));
    }
    Ok(())
}

fn state(img: &Qcow2Image) -> Result<std::sync::MutexGuard<'_, WriteState>> {
    match &img.write {
        Some(m) => Ok(m.lock().unwrap_or_else(|e| e.into_inner())),
        None => Err(Error::ReadOnly),
    }
}

pub fn write(
    img: &Qcow2Image,
    buf: &[u8],
    offset: u64,
    parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    let mut st = state(img)?;
    if !st.header_done {
        begin_writes(img)?;
        st.header_done = true;
    }
    let cs = img.cluster_size;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let (vc, inc) = (pos >> img.cluster_bits, pos & (cs - 1));
        let n = ((cs - inc) as usize).min(buf.len() - done);
        write_cluster(img, &mut st, vc, inc, &buf[done..done + n], parent)?;
        done += n;
    }
    if st.dirty_l2.len() >= COMMIT_BOUND
        || st.dirty_l2.len() as u64 * img.cluster_size >= COMMIT_BOUND_BYTES
    {
        commit_state(img, &mut st)?;
    }
    Ok(())
}

/// Before the first write: autoclear features this library does not keep
/// up to date (bitmaps) are cleared, as the spec demands.
fn begin_writes(img: &Qcow2Image) -> Result<()> {
    let h = &img.header;
    if h.version < 3 {
        return Ok(());
    }
    let keep = h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW;
    if keep != h.autoclear {
        let mut b = [0u8; 8];
        put_be64(&mut b, 0, keep);
        img.storage.write_all_at(&b, header::OFF_AUTOCLEAR as u64)?;
        img.storage.sync()?;
        if h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            log::warn!(
                "{}: qcow2 dirty bitmaps are not updated by this library; marked inconsistent",
                img.path.display()
            );
        }
    }
    Ok(())
}

/// The L2 table of guest cluster `vc`, allocated or copied (if shared) so
/// that it may be changed in memory.
fn writable_l2(img: &Qcow2Image, st: &mut WriteState, vc: u64) -> Result<(Arc<L2Table>, usize)> {
    let l1i = (vc / img.l2_entries) as usize;
    let idx = (vc % img.l2_entries) as usize;
    let e = img.l1[l1i].load(Ordering::Acquire);
    let old = e & OFFSET_MASK;
    if old != 0 && e & COPIED != 0 {
        let t = img.l2_table(old)?;
        mark_dirty(img, st, old, &t);
        return Ok((t, idx));
    }
    let storage = img.storage.as_ref();
    let new = st.refcounts.allocate(storage)?;
    let table = if old == 0 {
        L2Table::from_bytes(&vec![0u8; img.cluster_size as usize])
    } else {
        // Shared with a snapshot: a copy (its entries keep COPIED clear).
        st.released.push(old);
        L2Table::from_bytes(&img.l2_table(old)?.to_bytes())
    };
    let t = img.cache.insert(new, Arc::new(table));
    mark_dirty(img, st, new, &t);
    img.l1[l1i].store(new | COPIED, Ordering::Release);
    st.dirty_l1.insert(l1i);
    Ok((t, idx))
}

fn mark_dirty(img: &Qcow2Image, st: &mut WriteState, off: u64, t: &Arc<L2Table>) {
    if !t.dirty.swap(true, Ordering::AcqRel) {
        img.cache.pinned.fetch_add(1, Ordering::AcqRel);
        st.dirty_l2.push((off, t.clone()));
    }
}

fn write_cluster(
    img: &Qcow2Image,
    st: &mut WriteState,
    vc: u64,
    inc: u64,
    data: &[u8],
    parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    let cs = img.cluster_size;
    let storage = img.storage.as_ref();
    let (e, bitmap) = img.raw_entry(vc)?;
    let (kind, _) = img.classify(vc, 0)?;
    let base = vc * cs;
    // Bytes of the cluster inside the disk (the last one may be partial).
    let used = cs.min(img.size - base);
    let full_bitmap = 0xffff_ffffu64;
    if let Entry::Data { host, copied: true } = kind
        && (!img.extended_l2 || bitmap & full_bitmap == full_bitmap)
    {
        storage.write_all_at(data, host + inc)?;
        return Ok(());
    }
    let covers = inc == 0 && data.len() as u64 >= used;
    if covers && data.iter().all(|&b| b == 0) && zero_cluster(img, st, vc, e, bitmap)? {
        return Ok(());
    }
    if img.extended_l2 && e & super::COMPRESSED == 0 && (e & OFFSET_MASK == 0 || e & COPIED != 0) {
        return write_subclusters(img, st, vc, inc, data, parent, e & OFFSET_MASK, bitmap);
    }
    // A new cluster holding what the cluster reads now, with `data` over it.
    let mut whole = vec![0u8; cs as usize];
    if !covers {
        match kind {
            Entry::Zero => {}
            Entry::Compressed(ce) => img.read_compressed_cluster(ce, &mut whole)?,
            Entry::Data { host, .. } if !img.extended_l2 => {
                img.read_data(&mut whole[..used as usize], host)?
            }
            _ if img.extended_l2 => {
                // Per subcluster: allocated (old data), zero, or the parent.
                let sc = cs / 32;
                let host = e & OFFSET_MASK;
                for s in 0..32u64 {
                    let s0 = s * sc;
                    if s0 >= used {
                        break;
                    }
                    let part = &mut whole[s0 as usize..(s0 + sc).min(used) as usize];
                    if e & super::COMPRESSED == 0 && bitmap >> s & 1 == 1 {
                        img.read_data(part, host + s0)?;
                    } else if bitmap >> (32 + s) & 1 == 0 {
                        parent(part, base + s0)?;
                    }
                }
            }
            _ => parent(&mut whole[..used as usize], base)?,
        }
    }
    whole[inc as usize..inc as usize + data.len()].copy_from_slice(data);
    let new = st.refcounts.allocate(storage)?;
    storage.write_all_at(&whole, new)?;
    // The old cluster loses this reference (a zero or unallocated entry
    // may still name a preallocated one).
    if e & super::COMPRESSED != 0 {
        let (off, len) = img.compressed_extent(e);
        let first = off / cs;
        let last = (off + len - 1) / cs;
        st.released.extend((first..=last).map(|c| c * cs));
    } else if e & OFFSET_MASK != 0 {
        st.released.push(e & OFFSET_MASK);
    }
    let (t, i) = writable_l2(img, st, vc)?;
    if img.extended_l2 {
        // Entry before bitmap: readers load the bitmap first (see raw_entry).
        t.set_word(2 * i, new | COPIED);
        t.set_word(2 * i + 1, full_bitmap);
    } else {
        t.set_word(i, new | COPIED);
    }
    Ok(())
}

/// A whole-cluster write of zeros: nothing to do where the cluster reads
/// zeros already (no backing file, or a zero cluster), else a zero entry
/// (version 3) instead of an allocation. Returns whether it was handled.
fn zero_cluster(
    img: &Qcow2Image,
    st: &mut WriteState,
    vc: u64,
    e: u64,
    bitmap: u64,
) -> Result<bool> {
    let compressed = e & super::COMPRESSED != 0;
    let reads_zero = if img.extended_l2 {
        !compressed
            && bitmap & 0xffff_ffff == 0
            && (img.parent.is_none() || bitmap >> 32 == 0xffff_ffff)
    } else {
        let zero = img.zero_flag && !compressed && e & super::ZERO != 0;
        zero || (e & (OFFSET_MASK | super::COMPRESSED) == 0 && img.parent.is_none())
    };
    if reads_zero {
        return Ok(true);
    }
    if img.header.version < 3 {
        return Ok(false);
    }
    if img.extended_l2 && !compressed {
        // The cluster (if any) stays, all its subclusters zero.
        let (t, i) = writable_l2(img, st, vc)?;
        t.set_word(2 * i + 1, 0xffff_ffff << 32);
        return Ok(true);
    }
    if compressed {
        let cs = img.cluster_size;
        let (off, len) = img.compressed_extent(e);
        st.released
            .extend((off / cs..=(off + len - 1) / cs).map(|c| c * cs));
    } else if e & OFFSET_MASK != 0 {
        st.released.push(e & OFFSET_MASK);
    }
    let (t, i) = writable_l2(img, st, vc)?;
    if img.extended_l2 {
        t.set_word(2 * i + 1, 0xffff_ffff << 32);
        t.set_word(2 * i, 0);
    } else {
        t.set_word(i, super::ZERO);
    }
    Ok(true)
}

/// Extended L2, a cluster of its own or none yet: only the subclusters
/// the write touches are written (a partly touched one is completed from
/// its zero bit or the backing chain) and become allocated; the others
/// keep reading what they read.
#[allow(clippy::too_many_arguments)]
fn write_subclusters(
    img: &Qcow2Image,
    st: &mut WriteState,
    vc: u64,
    inc: u64,
    data: &[u8],
    parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
    old: u64,
    bitmap: u64,
) -> Result<()> {
    let storage = img.storage.as_ref();
    let cs = img.cluster_size;
    let sc = cs / 32;
    let base = vc * cs;
    let used = cs.min(img.size - base);
    let host = if old != 0 {
        old
    } else {
        st.refcounts.allocate(storage)?
    };
    let end = inc + data.len() as u64;
    let mut tmp = vec![0u8; sc as usize];
    let mut new_bitmap = bitmap;
    for s in inc / sc..=(end - 1) / sc {
        let (s0, s1) = (s * sc, (s + 1) * sc);
        let (w0, w1) = (inc.max(s0), end.min(s1));
        let part = &data[(w0 - inc) as usize..(w1 - inc) as usize];
        if bitmap >> s & 1 == 1 || (w0 == s0 && w1 == s1) {
            storage.write_all_at(part, host + w0)?;
        } else {
            tmp.fill(0);
            if bitmap >> (32 + s) & 1 == 0 && s0 < used {
                let n = (s1.min(used) - s0) as usize;
                parent(&mut tmp[..n], base + s0)?;
            }
            tmp[(w0 - s0) as usize..(w1 - s0) as usize].copy_from_slice(part);
            storage.write_all_at(&tmp, host + s0)?;
        }
        new_bitmap = (new_bitmap | 1 << s) & !(1 << (32 + s));
    }
    if old == 0 && storage.len()? < host + cs {
        storage.set_len(host + cs)?;
    }
    if new_bitmap != bitmap || old == 0 {
        let (t, i) = writable_l2(img, st, vc)?;
        // Entry before bitmap: readers load the bitmap first (see raw_entry).
        if old == 0 {
            t.set_word(2 * i, host | COPIED);
        }
        t.set_word(2 * i + 1, new_bitmap);
    }
    Ok(())
}

pub fn commit(img: &Qcow2Image) -> Result<()> {
    if img.write.is_none() {
        return Ok(());
    }
    let mut st = state(img)?;
    commit_state(img, &mut st)
}

fn commit_state(img: &Qcow2Image, st: &mut WriteState) -> Result<()> {
    if st.dirty_l2.is_empty() && st.dirty_l1.is_empty() && !st.refcounts.is_dirty() {
        return Ok(());
    }
    let storage = img.storage.as_ref();
    // The data (and new clusters' contents) first.
    storage.sync()?;
    st.refcounts.write(storage)?;
    storage.sync()?;
    for (off, t) in &st.dirty_l2 {
        storage.write_all_at(&t.to_bytes(), *off)?;
    }
    if !st.dirty_l1.is_empty() {
        storage.sync()?;
        let l1_off = img.header.l1_table_offset;
        for &i in &st.dirty_l1 {
            let mut b = [0u8; 8];
            put_be64(&mut b, 0, img.l1[i].load(Ordering::Acquire));
            storage.write_all_at(&b, l1_off + i as u64 * 8)?;
        }
    }
    for (_, t) in st.dirty_l2.drain(..) {
        t.dirty.store(false, Ordering::Release);
        img.cache.pinned.fetch_sub(1, Ordering::AcqRel);
    }
    st.dirty_l1.clear();
    if !st.released.is_empty() {
        storage.sync()?;
        let cs = img.cluster_size;
        for host in std::mem::take(&mut st.released) {
            let c = host / cs;
            let r = st.refcounts.get(storage, c)?;
            if r == 0 {
                log::warn!(
                    "{}: qcow2 cluster at {host} released with refcount 0",
                    img.path.display()
                );
                continue;
            }
            st.refcounts.set(storage, c, r - 1)?;
        }
        st.refcounts.write(storage)?;
    }
    st.refcounts.trim_cache();
    Ok(())
}
