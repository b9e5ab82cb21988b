//! Checking qcow2 refcounts against the references of the metadata and the
//! L1/L2 tables (the active one and every internal snapshot's): a refcount
//! below the references is corruption, one above is a leak. Also the base
//! of the repair of an image left dirty by lazy refcounts.

use crate::bytes::{be16, be32, be64};
use crate::storage::read_table;
use crate::{Error, Result, Storage};

use super::header::{HEADER_AREA, Header};
use super::refcount::Refcounts;
use super::{COMPRESSED, OFFSET_MASK};

/// Clusters counted at most (a larger image is refused: checking it would
/// need too much memory).
const MAX_CLUSTERS: u64 = 1 << 28;

#[derive(Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub leaks: u64,
    pub clusters: u64,
}

/// References per host cluster of the image in `s`.
pub struct References {
    pub counts: Vec<u32>,
    pub errors: Vec<String>,
}

pub fn header_of(s: &dyn Storage) -> Result<Header> {
    let len = s.len()?;
    let mut raw = vec![0u8; len.min(HEADER_AREA as u64) as usize];
    s.read_exact_at(&mut raw, 0)?;
    Header::parse(&raw, len)
}

/// Counts the references to each host cluster.
pub fn references(s: &dyn Storage, h: &Header) -> Result<References> {
    let cs = h.cluster_size();
    let len = s.len()?;
    let n = len.div_ceil(cs);
    if n > MAX_CLUSTERS {
        return Err(Error::unsupported(format!(
            "checking a qcow2 of {n} clusters (at most {MAX_CLUSTERS})"
        )));
    }
    let mut r = References {
        counts: vec![0; n as usize],
        errors: Vec::new(),
    };
    let add = |r: &mut References, off: u64, bytes: u64, what: &str| {
        if bytes == 0 {
            return;
        }
        let (first, last) = (off / cs, (off + bytes - 1) / cs);
        for c in first..=last {
            match r.counts.get_mut(c as usize) {
                Some(x) => *x = x.saturating_add(1),
                None => {
                    r.errors
                        .push(format!("{what} at {off} is past the end of the file"));
                    return;
                }
            }
        }
    };
    add(&mut r, 0, cs, "header");
    add(
        &mut r,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
        "refcount table",
    );
    let rt = read_table(
        s,
        h.refcount_table_offset,
        (h.refcount_table_clusters as u64 * cs / 8) as usize,
        8,
        |c| be64(c, 0),
    )?;
    for &b in &rt {
        if b & !511 != 0 {
            add(&mut r, b & !511, cs, "refcount block");
        }
    }
    let mut l1s = vec![(h.l1_table_offset, h.l1_size, true)];
    if h.nb_snapshots > 0 {
        // The snapshot table: variable-length entries.
        let mut at = h.snapshots_offset;
        let start = at;
        for i in 0..h.nb_snapshots {
            let mut e = [0u8; 40];
            s.read_exact_at(&mut e, at)?;
            let extra = be32(&e, 36) as u64;
            let (id, name) = (be16(&e, 12) as u64, be16(&e, 14) as u64);
            l1s.push((be64(&e, 0), be32(&e, 8), false));
            at += (40 + extra + id + name).div_ceil(8) * 8;
            if at - start > 64 << 20 {
                r.errors
                    .push(format!("snapshot table entry {i} runs too far"));
                break;
            }
        }
        add(&mut r, start, at - start, "snapshot table");
    }
    let data_file = h.incompatible & super::header::INCOMPAT_DATA_FILE != 0;
    let l2_words = if h.extended_l2() { 2 } else { 1 };
    for (l1_off, l1_size, _active) in l1s {
        add(&mut r, l1_off, l1_size as u64 * 8, "L1 table");
        let l1 = read_table(s, l1_off, l1_size as usize, 8, |c| be64(c, 0))?;
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            add(&mut r, l2, cs, "L2 table");
            let mut raw = vec![0u8; cs as usize];
            if s.read_exact_at(&mut raw, l2).is_err() {
                r.errors.push(format!("L2 table {i} at {l2} unreadable"));
                continue;
            }
            for j in 0..(cs / 8 / l2_words) as usize {
                let e = be64(&raw, j * 8 * l2_words as usize);
                if e & COMPRESSED != 0 {
                    let x = 62 - (h.cluster_bits - 8);
                    let off = e & ((1u64 << x) - 1);
                    let sectors = ((e >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
                    add(
                        &mut r,
                        off,
                        sectors * 512 - (off & 511),
                        "compressed cluster",
                    );
                } else if e & OFFSET_MASK != 0 && !data_file {
                    add(&mut r, e & OFFSET_MASK, cs, "data cluster");
                }
            }
        }
    }
    Ok(r)
}

/// Compares refcounts with references.
pub fn check(s: &dyn Storage) -> Result<CheckReport> {
    let h = header_of(s)?;
    let refs = references(s, &h)?;
    let mut rc = Refcounts::load(
        s,
        h.cluster_size(),
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )?;
    let mut rep = CheckReport {
        errors: refs.errors,
        clusters: refs.counts.len() as u64,
        ..Default::default()
    };
    for (c, &want) in refs.counts.iter().enumerate() {
        let have = rc.get(s, c as u64)?;
        if have < want as u64 {
            if rep.errors.len() < 100 {
                rep.errors
                    .push(format!("cluster {c}: refcount {have}, {want} references"));
            }
        } else if have > want as u64 && want == 0 {
            rep.leaks += 1;
        }
    }
    Ok(rep)
}

/// Sets every refcount to the number of references (the repair of an image
/// left dirty by lazy refcounts), then clears the dirty bit. The caller
/// syncs nothing before: this writes refcounts, syncs, then the header.
pub fn repair_refcounts(s: &dyn Storage) -> Result<u64> {
    let h = header_of(s)?;
    let refs = references(s, &h)?;
    if let Some(e) = refs.errors.first() {
        return Err(Error::corrupt("qcow2 image", e.clone()));
    }
    let mut rc = Refcounts::load(
        s,
        h.cluster_size(),
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )?;
    let mut fixed = 0;
    for (c, &want) in refs.counts.iter().enumerate() {
        if rc.get(s, c as u64)? != want as u64 {
            rc.set(s, c as u64, want as u64)?;
            fixed += 1;
        }
    }
    rc.write(s)?;
    s.sync()?;
    let mut b = [0u8; 8];
    crate::bytes::put_be64(&mut b, 0, h.incompatible & !super::header::INCOMPAT_DIRTY);
    s.write_all_at(&b, super::header::OFF_INCOMPAT as u64)?;
    s.sync()?;
    Ok(fixed)
}
