//! `vhdio resize [--shrink] IMAGE [+|-]SIZE`: changes the virtual size of
//! an image (see `vdisk::resize`). Shrinking needs `--shrink`: the data past
//! the new end is lost. A child may be resized too (it then reads zeros past
//! its parent's end).

use std::path::Path;

use vdisk::{OpenOptions, StdParentOpener};

use crate::lock::ReadLocks;
use crate::rebase::open_rw;
use crate::units::{human, parse_size};
use crate::{EXIT_ERROR, EXIT_OK, Failure, chain, fail};

fn err(path: &Path, e: impl std::fmt::Display) -> Failure {
    fail(EXIT_ERROR, format!("{}: {e}", path.display()))
}

/// The new size from `+N`, `-N` or `N`.
pub fn new_size(old: u64, text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('+') {
        old.checked_add(parse_size(rest)?)
            .ok_or_else(|| format!("size {text} too large"))
    } else if let Some(rest) = t.strip_prefix('-') {
        old.checked_sub(parse_size(rest)?)
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("size {text}: the disk would have no bytes"))
    } else {
        parse_size(t)
    }
}

pub fn resize(image: &Path, size: &str, shrink: bool) -> Result<u8, Failure> {
    let layer = chain::open_layer(chain::open_file(image, &ReadLocks::Skip)?, image)?;
    let old = layer.image.virtual_size();
    let ss = layer.image.logical_sector_size() as u64;
    let block = layer.block_size.unwrap_or(ss);
    drop(layer);
    let wanted = new_size(old, size).map_err(|e| fail(EXIT_ERROR, e))?;
    if wanted == 0 {
        return Err(fail(EXIT_ERROR, "a virtual disk of 0 bytes"));
    }
    let new = wanted
        .checked_next_multiple_of(ss)
        .ok_or_else(|| fail(EXIT_ERROR, format!("size {wanted} too large")))?;
    if new < old && !shrink {
        return Err(err(
            image,
            format!(
                "shrinking from {old} to {new} bytes loses the data past the new end; use --shrink"
            ),
        ));
    }
    let _lock = crate::lock::lock_writer(image)?;
    let storage = (open_rw(image)?, true);
    vdisk::resize::resize(&storage, new).map_err(|e| err(image, e))?;
    drop(storage);
    if new > old && !old.is_multiple_of(block) {
        // The parents a write may read from, with reader locks.
        let _parents = chain::open_chain(image, &ReadLocks::except(&[image.to_path_buf()]))?;
        let disk = vdisk::open_disk(
            Box::new((open_rw(image)?, true)),
            image,
            OpenOptions { writable: true },
            &StdParentOpener,
        )
        .map_err(|e| err(image, e))?;
        vdisk::resize::zero_grown_tail(&disk, old, block).map_err(|e| err(image, e))?;
        disk.close().map_err(|e| err(image, e))?;
    }
    if new != wanted {
        eprintln!("vhdio: size rounded up from {wanted} to {new} bytes (whole sectors)");
    }
    println!(
        "Image resized: {} ({new} bytes), was {} ({old} bytes).",
        human(new),
        human(old)
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_sizes() {
        assert_eq!(new_size(32 << 20, "+64M"), Ok(96 << 20));
        assert_eq!(new_size(96 << 20, "-64M"), Ok(32 << 20));
        assert_eq!(new_size(96 << 20, "32M"), Ok(32 << 20));
        assert!(new_size(1 << 20, "-1M").is_err());
        assert!(new_size(1 << 20, "+x").is_err());
    }
}
