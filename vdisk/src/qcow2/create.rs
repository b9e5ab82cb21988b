//! Creating qcow2 images: header, L1 table, refcount table and blocks, as
//! `qemu-img create -f qcow2` lays them out (with 16-bit refcounts).

use crate::bytes::{put_be32, put_be64};
use crate::{Error, Result, Storage};

pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
const REFCOUNT_ORDER: u32 = 4;

/// Options beyond size and cluster size.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Version 2 (`compat=0.10`) instead of 3.
    pub v2: bool,
    /// Backing file name as recorded (relative to the image's folder) and format name.
    pub backing: Option<(String, String)>,
}

/// Writes an empty qcow2 image of `size` bytes into the empty `storage`.
pub fn create(storage: &dyn Storage, size: u64, cluster_size: u32, o: &Qcow2Options) -> Result<()> {
    if !(512..=(2 << 20)).contains(&cluster_size) || !cluster_size.is_power_of_two() {
        return Err(Error::unsupported(format!(
            "qcow2 cluster size {cluster_size} (powers of two from 512 B to 2 MiB)"
        )));
    }
    let cs = cluster_size as u64;
    let l1_entries = size.div_ceil(cs / 8 * cs);
    if l1_entries > super::header::MAX_L1_ENTRIES {
        return Err(Error::unsupported(format!(
            "a {size}-byte qcow2 with {cs}-byte clusters (L1 table too large; use larger clusters)"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    // Header, L1, refcount table, refcount blocks: grow until they cover themselves.
    let (mut rt_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + l1_clusters + rt_clusters + blocks;
        let need_blocks = total.div_ceil(per_block);
        let need_rt = (need_blocks * 8).div_ceil(cs);
        if need_blocks <= blocks && need_rt <= rt_clusters {
            break;
        }
        blocks = blocks.max(need_blocks);
        rt_clusters = rt_clusters.max(need_rt);
    }
    let l1_off = cs;
    let rt_off = l1_off + l1_clusters * cs;
    let rb_off = rt_off + rt_clusters * cs;
    let total = 1 + l1_clusters + rt_clusters + blocks;

    let mut h = vec![0u8; cs as usize];
    h[..4].copy_from_slice(super::header::MAGIC);
    put_be32(&mut h, 4, if o.v2 { 2 } else { 3 });
    put_be32(&mut h, 20, cluster_size.trailing_zeros());
    put_be64(&mut h, 24, size);
    put_be32(&mut h, 36, l1_entries as u32);
    put_be64(&mut h, 40, l1_off);
    put_be64(&mut h, 48, rt_off);
    put_be32(&mut h, 56, rt_clusters as u32);
    let mut at = 72;
    if !o.v2 {
        put_be32(&mut h, 96, REFCOUNT_ORDER);
        put_be32(&mut h, 100, 104);
        at = 104;
    }
    if let Some((name, format)) = &o.backing {
        put_be32(&mut h, at, 0xe279_2aca);
        put_be32(&mut h, at + 4, format.len() as u32);
        h[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
        at += 8; // end of extensions
        if name.is_empty() || name.len() > 1023 || at + name.len() > h.len() {
            return Err(Error::unsupported(format!(
                "backing file name of {} bytes",
                name.len()
            )));
        }
        put_be64(&mut h, 8, at as u64);
        put_be32(&mut h, 16, name.len() as u32);
        h[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    storage.write_all_at(&h, 0)?;
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for b in 0..blocks {
        put_be64(&mut rt, (b * 8) as usize, rb_off + b * cs);
    }
    storage.write_all_at(&rt, rt_off)?;
    let mut rb = vec![0u8; (blocks * cs) as usize];
    for c in 0..total {
        rb[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    storage.write_all_at(&rb, rb_off)?;
    storage.set_len(total * cs)?;
    storage.sync()?;
    Ok(())
}
