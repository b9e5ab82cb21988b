//! The served export: the image (with its parent chain) opened through vdisk,
//! the window on it (whole disk or one partition) and the writer lock. The
//! parents hold qemu's backing-file locks while they are open.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vdisk::Disk;

use vdisk::FileWriterLock as WriterLock;

/// The plugin's parameters (`nbdkit vhdio file=... [partition=N] [readonly=BOOL]
/// [punch-holes=BOOL]`).
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub partition: Option<u32>,
    /// `Some(true)`: open read-only, take no lock (as `-r` does, at startup).
    /// `Some(false)`: open for writing and take the writer lock at startup.
    /// `None`: decided by the first client (`-r` or not).
    pub readonly: Option<bool>,
    /// `punch-holes=true`: trims and zeroing punch holes in the image file
    /// where data stays in place ([`vdisk::Disk::with_punch_holes`]).
    pub punch_holes: bool,
}

/// One opened image, shared by every connection.
pub struct Export {
    pub disk: Disk,
    /// The window: byte offset and length of the partition (or whole disk).
    pub start: u64,
    pub size: u64,
    /// Held while the export is writable.
    _lock: Option<WriterLock>,
}

impl Export {
    pub fn writable(&self) -> bool {
        self.disk.is_writable()
    }
}

pub static CONFIG: Mutex<Config> = Mutex::new(Config {
    file: None,
    partition: None,
    readonly: None,
    punch_holes: false,
});
/// The current export: opened read-only at startup (to fail early on a bad
/// image), replaced by a writable one at the first read-write client.
static CURRENT: Mutex<Option<Arc<Export>>> = Mutex::new(None);

pub fn config() -> Config {
    CONFIG.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The export for a client; `writable` opens the image for writing (and
/// takes the writer lock) if the current one is read-only.
pub fn get(writable: bool) -> Result<Arc<Export>, String> {
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = current.as_ref()
        && (e.writable() || !writable)
    {
        return Ok(e.clone());
    }
    let e = Arc::new(open(&config(), writable)?);
    *current = Some(e.clone());
    Ok(e)
}

/// A partition link: `disk.vhdx2`, a symlink to a file named `disk.vhdx`
/// (the preload library's convention). Returns the image and the number.
fn partition_link(path: &Path) -> Option<(PathBuf, u32)> {
    let name = path.file_name()?.to_str()?;
    let digits = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits == name.len() {
        return None;
    }
    let (stem, number) = name.split_at(name.len() - digits);
    if !std::fs::symlink_metadata(path)
        .ok()?
        .file_type()
        .is_symlink()
    {
        return None;
    }
    let target = std::fs::read_link(path).ok()?;
    if target.file_name()?.to_str()? != stem {
        return None;
    }
    let number = number.parse().ok().filter(|&n| n > 0)?;
    Some((std::fs::canonicalize(path).ok()?, number))
}

fn open(config: &Config, writable: bool) -> Result<Export, String> {
    let given = config
        .file
        .as_deref()
        .ok_or("missing parameter file=IMAGE")?;
    let (path, partition) = match (partition_link(given), config.partition) {
        (Some((image, n)), None) => (image, Some(n)),
        (Some(_), Some(_)) => {
            return Err(format!(
                "{}: a partition link and partition= together",
                given.display()
            ));
        }
        (None, n) => (given.to_path_buf(), n),
    };
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&path)
        .map_err(|e| {
            let hint = if writable {
                " (to serve it read-only: nbdkit -r, vhdio serve --read-only)"
            } else {
                ""
            };
            format!("{shown}: {e}{hint}")
        })?;
    let kind = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !kind.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    // The lock comes before the writable open: opening for writing may
    // already write (a VHDX log replay).
    let lock = if writable {
        Some(WriterLock::take(&path).map_err(|e| match e {
            vdisk::lock::WriterLockError::Busy => format!(
                "{shown}: {} (to serve it read-only: nbdkit -r, vhdio serve --read-only)",
                vdisk::writer_refusal(&path)
            ),
            vdisk::lock::WriterLockError::Io(e) => format!("{shown}: cannot lock: {e}"),
        })?)
    } else {
        None
    };
    let disk = vdisk::open_disk(
        Box::new((file, writable)),
        &path,
        vdisk::OpenOptions { writable },
        // Parents hold qemu's backing-file locks while served: nobody
        // writes them under the child (and a parent being written is refused).
        &vdisk::LockingParentOpener,
    )
    .map_err(|e| format!("{shown}: {e}"))?
    .with_punch_holes(config.punch_holes);
    let (start, size) = match partition {
        None => (0, disk.size()),
        Some(n) => match vdisk::part::partition(&disk, n) {
            Ok(Some(p)) => (p.start, p.device_size()),
            Ok(None) => return Err(format!("{shown}: the disk has no partition {n}")),
            Err(e) => return Err(format!("{shown}: cannot read the partition table: {e}")),
        },
    };
    Ok(Export {
        disk,
        start,
        size,
        _lock: lock,
    })
}

/// Closes the current export's disk (see `Disk::close`); errors are logged.
pub fn close() {
    let current = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(e) = current
        && let Err(err) = e.disk.close()
    {
        let file = config().file.unwrap_or_default();
        log::error!(
            "{}: committing the image at unload failed: {err}; data written since the last \
             flush may be lost",
            file.display()
        );
    }
}

/// Opened once at startup (`get_ready`), so that a bad image, a missing
/// parent or a busy image fails nbdkit before it serves.
pub fn open_at_startup() -> Result<(), String> {
    let writable = config().readonly == Some(false);
    get(writable).map(drop)
}
