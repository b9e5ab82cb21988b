//! `vhdio compare`: whether two disks (images with their chains, or raw
//! files) read the same, as `qemu-img compare` says it: exit 0 the same, 1
//! they differ (the first differing offset is printed), 2 an error. Disks of
//! different sizes are the same if the larger one reads zeros past the end
//! of the smaller (qemu-img compare without -s).

use std::path::Path;

use vdisk::copy::first_difference;

use crate::convert::open_source;
use crate::lock::ReadLocks;
use crate::progress::Progress;
use crate::{EXIT_ERROR, EXIT_OK, EXIT_PROBLEMS, Failure, fail};

pub fn compare(a: &Path, b: &Path, progress: bool, locks: &ReadLocks) -> Result<u8, Failure> {
    let da = open_source(a, None, locks)?;
    let db = open_source(b, None, locks)?;
    let mut p = Progress::new(progress);
    let diff = first_difference(&da.disk, &db.disk, &mut |done, total| p.update(done, total))
        .map_err(|e| {
            fail(
                EXIT_ERROR,
                format!("{} / {}: {e}", a.display(), b.display()),
            )
        })?;
    p.finish();
    match diff {
        None => {
            if da.disk.size() != db.disk.size() {
                println!(
                    "Warning: Image size mismatch! ({} and {} bytes)",
                    da.disk.size(),
                    db.disk.size()
                );
            }
            println!("Images are identical.");
            Ok(EXIT_OK)
        }
        Some(off) => {
            println!("Content mismatch at offset {off}!");
            Ok(EXIT_PROBLEMS)
        }
    }
}
