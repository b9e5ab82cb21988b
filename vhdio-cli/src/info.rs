//! `vhdio info`: what an image is, what it holds, where its parents are.

use std::path::Path;

use vdisk::{Image, Mapping};

use crate::chain::{self, LayerInfo};
use crate::lock::ReadLocks;
use crate::units::human;
use crate::{EXIT_ERROR, EXIT_OK, Failure, fail};

/// Bytes of the virtual disk stored in this layer's file, and bytes it marks
/// as zero, by walking its mapping.
pub fn allocation(image: &dyn Image) -> vdisk::Result<(u64, u64)> {
    let size = image.virtual_size();
    let (mut data, mut zero) = (0u64, 0u64);
    let mut off = 0u64;
    while off < size {
        let (m, run) = image.map(off, (size - off).min(1 << 30))?;
        if run == 0 {
            break;
        }
        match m {
            Mapping::Data { .. } | Mapping::Compressed => data += run,
            Mapping::Zero => zero += run,
            Mapping::Unallocated => {}
        }
        off += run;
    }
    Ok((data, zero))
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0%".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

pub fn info(path: &Path, locks: &ReadLocks) -> Result<u8, Failure> {
    let layers = match chain::open_chain(path, locks) {
        Ok(l) => l,
        Err(e) => return crate::info_json::broken_chain(path, e, false, locks),
    };
    let mut alloc = Vec::new();
    for l in &layers {
        alloc.push(
            allocation(l.image.as_ref())
                .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", l.path.display())))?,
        );
    }
    let blocks = vdisk::block_usage(layers[0].image.as_ref(), false)
        .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", path.display())))?;
    let describe: Vec<String> = layers.iter().map(|l| l.image.describe()).collect();
    let (disk, infos) = chain::into_disk(layers);
    let top: &LayerInfo = &infos[0];
    let size = disk.size();
    println!("image: {}", path.display());
    println!("format: {} {}", top.format, top.kind);
    println!("virtual size: {} ({size} bytes)", human(size));
    if disk.logical_sector_size() != 512 || disk.physical_sector_size() != 512 {
        println!(
            "sector size: {} logical, {} physical",
            disk.logical_sector_size(),
            disk.physical_sector_size()
        );
    }
    if let Some(g) = disk.geometry() {
        println!(
            "geometry: {}/{}/{} (C/H/S)",
            g.cylinders, g.heads, g.sectors
        );
    }
    match top.block_size {
        Some(b) => println!("block size: {} ({b} bytes)", human(b)),
        None => println!("block size: none (fixed layout)"),
    }
    let (data, zero) = alloc[0];
    print!(
        "allocated: {} of {} ({}) in this file",
        human(data),
        human(size),
        percent(data, size)
    );
    if zero > 0 {
        print!(", {} marked zero", human(zero));
    }
    println!();
    println!(
        "file size: {} ({} bytes)",
        human(top.file_len),
        top.file_len
    );
    if let Some(u) = blocks {
        // Space of the file that holds no block: metadata, and space freed
        // by discards that `vhdio compact` gives back.
        let other = top.file_len.saturating_sub(u.allocated * u.block_size);
        println!(
            "blocks: {} of {} allocated; {} of the file not in blocks (metadata, free space)",
            u.allocated,
            u.blocks,
            human(other)
        );
    }
    println!("identity: {}", top.id);
    println!("details: {}", describe[0]);
    if infos.len() > 1 {
        println!("chain ({} images, top first):", infos.len());
        for (i, (l, d)) in infos.iter().zip(&describe).enumerate() {
            let stored = alloc[i].0;
            println!("  [{i}] {}", l.path.display());
            println!(
                "      {} {}, identity {}, {} stored",
                l.format,
                l.kind,
                l.id,
                human(stored)
            );
            println!("      {d}");
        }
    }
    match vdisk::part::partitions(&disk) {
        Ok(parts) if parts.is_empty() => println!("partitions: none"),
        Ok(parts) => {
            let ss = disk.logical_sector_size();
            println!("partitions ({ss}-byte sectors):");
            println!(
                "  {:>3}  {:>12}  {:>12}  {:>10}  type",
                "#", "start", "sectors", "size"
            );
            for p in parts {
                println!(
                    "  {:>3}  {:>12}  {:>12}  {:>10}  {}",
                    p.number,
                    p.start_sector(),
                    p.sectors(),
                    human(p.sectors() * ss as u64),
                    p.type_description()
                );
            }
        }
        Err(e) => println!("partitions: unreadable table ({e})"),
    }
    Ok(EXIT_OK)
}
