//! `vhdio compact IMAGE`: gives the space of a dynamic image back. Blocks
//! that hold only zeros are unmapped (a discard: unallocated in a base image,
//! the format's zero state in a VHDX or VDI child), the remaining blocks move
//! down into the holes and the file is cut (`Image::relocate`). Crash-safe
//! at every step (see `vdisk::Image::relocate`). Offline: refused while
//! another process (qemu, the library, `vhdio serve`) writes the image.

use std::io::{IsTerminal, Write};
use std::path::Path;

use vdisk::{Format, Image, Mapping};

use crate::units::human;
use crate::{EXIT_ERROR, EXIT_OK, Failure, fail};

pub struct CompactOptions<'a> {
    pub image: &'a Path,
    pub dry_run: bool,
    pub progress: bool,
}

/// The blocks of `image` that store only zeros, as (first byte, length) runs.
/// In a child (`child`), only blocks stored whole: a part it does not store
/// shows the parent, which an unmapped block would hide.
fn zero_block_runs(image: &dyn Image, bs: u64, child: bool) -> vdisk::Result<Vec<(u64, u64)>> {
    let size = image.virtual_size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = Vec::new();
    for b in 0..size.div_ceil(bs) {
        let (start, end) = (b * bs, ((b + 1) * bs).min(size));
        let (mut stored, mut zeros, mut pos) = (false, true, start);
        while pos < end && zeros {
            let (m, n) = image.map(pos, end - pos)?;
            match m {
                Mapping::Data { file_offset } => {
                    stored = true;
                    buf.resize(n as usize, 0);
                    image.read_data(&mut buf, file_offset)?;
                    zeros = buf.iter().all(|&x| x == 0);
                }
                Mapping::Unallocated if child => zeros = false,
                Mapping::Unallocated | Mapping::Zero => {}
                // Stored, but not as plain bytes: kept.
                Mapping::Compressed => {
                    stored = true;
                    zeros = false;
                }
            }
            pos += n.max(1);
        }
        if stored && zeros {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == start => *l += end - start,
                _ => runs.push((start, end - start)),
            }
        }
    }
    Ok(runs)
}

pub fn compact(o: CompactOptions) -> Result<u8, Failure> {
    let shown = o.image.display();
    let err = |e: vdisk::Error| fail(EXIT_ERROR, format!("{shown}: {e}"));
    // The writer locks, held to the end: qemu, the library and nbdkit are
    // refused while the blocks move. Reader locks on the parents (and on
    // the image itself for a dry run, which only reads).
    let (_lock, read_locks) = if o.dry_run {
        (None, crate::lock::ReadLocks::all())
    } else {
        (
            Some(crate::lock::lock_writer(o.image)?),
            crate::lock::ReadLocks::except(&[o.image.to_path_buf()]),
        )
    };
    let _chain = crate::chain::open_chain(o.image, &read_locks)?;
    let before = std::fs::metadata(o.image)
        .map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?
        .len();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!o.dry_run)
        .open(o.image)
        .map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?;
    let disk = vdisk::open_disk(
        Box::new((file, !o.dry_run)),
        o.image,
        vdisk::OpenOptions {
            writable: !o.dry_run,
        },
        &vdisk::StdParentOpener,
    )
    .map_err(err)?;
    let top = &disk.layers()[0];
    let Some(bs) = top.allocation_block() else {
        println!("{shown}: no blocks to move (a fixed layout): nothing to compact");
        return Ok(EXIT_OK);
    };
    let usage = vdisk::block_usage(top.as_ref(), false)
        .map_err(err)?
        .unwrap_or_default();
    // A VHD child has no zero state: its zero blocks hide the parent's data.
    let unmappable = !(top.format() == Format::Vhd && disk.layers().len() > 1);
    let runs = if unmappable {
        zero_block_runs(top.as_ref(), bs, disk.layers().len() > 1).map_err(err)?
    } else {
        Vec::new()
    };
    let zero: u64 = runs.iter().map(|r| r.1.div_ceil(bs)).sum();
    let keep = usage.allocated - zero;
    println!(
        "{shown}: {} blocks of {} allocated, {zero} of them only zeros; file {}",
        usage.allocated,
        human(bs),
        human(before)
    );
    if o.dry_run {
        let data = keep * bs;
        println!(
            "would unmap {zero} blocks ({}) and move the rest down: about {} of blocks stay, \
             {} of the file not in them would go (less its metadata)",
            human(zero * bs),
            human(data),
            human(before.saturating_sub(data))
        );
        return Ok(EXIT_OK);
    }
    for &(start, len) in &runs {
        disk.discard(start, len).map_err(err)?;
    }
    disk.flush().map_err(err)?;
    let tty = o.progress && std::io::stderr().is_terminal();
    let mut report = |done: u64, total: u64| {
        if tty {
            eprint!("\rcompacting: {done}/{total} blocks moved");
            let _ = std::io::stderr().flush();
        }
    };
    let moved = disk.layers()[0].relocate(&mut report).map_err(err)?;
    if tty {
        eprintln!();
    }
    disk.close().map_err(err)?;
    drop(disk);
    let after = std::fs::metadata(o.image)
        .map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?
        .len();
    // (VDI moves blocks into freed slots already at the flush after the
    // unmapping: those moves are not counted here.)
    println!(
        "unmapped {zero} zero blocks, then moved {moved} blocks; file {} -> {} ({} freed)",
        human(before),
        human(after),
        human(before.saturating_sub(after))
    );
    Ok(EXIT_OK)
}
