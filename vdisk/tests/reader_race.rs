//! Readers take no lock (issue 16): a reader that mapped a block and is
//! about to read its data must not return another block's data when, in
//! between, a discard freed the place, a flush made it reusable (or, in a
//! VDI, moved a block into a freed slot and freed the slot above) and a new
//! block took it. The reader is stopped deterministically inside its data
//! read (a storage that parks the first large read once armed) while the
//! other thread discards, flushes and allocates; then it goes on, and what
//! it returns is compared with what it may see: the block's data before
//! the discard, or zeros if it read the discarded block itself.

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use vdisk::Storage;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
/// Reads at least this long are data reads (maps read bitmaps of 512 bytes).
const PARKED_READ: usize = 64 * 1024;

/// Parks the first data read after [`Trap::arm`] until the test lets it go.
#[derive(Default)]
struct Trap {
    armed: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl Trap {
    /// Returns (reader parked, let it go).
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (parked_tx, parked_rx) = channel();
        let (go_tx, go_rx) = channel();
        *self.armed.lock().unwrap() = Some((parked_tx, go_rx));
        (parked_rx, go_tx)
    }
}

struct TrappedFile {
    file: (File, bool),
    trap: Arc<Trap>,
}

impl Storage for TrappedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if buf.len() >= PARKED_READ {
            let taken = self.trap.armed.lock().unwrap().take();
            if let Some((parked, go)) = taken {
                parked.send(()).unwrap();
                go.recv().unwrap();
            }
        }
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }
    fn is_writable(&self) -> bool {
        true
    }
}

fn block(byte: u8) -> Vec<u8> {
    (0..MIB).map(|i| byte ^ (i % 251) as u8 | 1).collect()
}

/// An image with data in MiB `b` and MiB `c` (1 MiB each), allocated in
/// that order in the file (qemu allocates in disk order).
fn image(dir: &Path, fmt: &str, opts: &str, b: u64, c: u64) -> std::path::PathBuf {
    let mut raw = vec![0u8; SIZE as usize];
    raw[(b * MIB) as usize..((b + 1) * MIB) as usize].copy_from_slice(&block(0x20));
    raw[(c * MIB) as usize..((c + 1) * MIB) as usize].copy_from_slice(&block(0x40));
    common::qemu_image_from(&raw, dir, &format!("r.{fmt}"), fmt, opts)
}

/// Reader reads 64 KiB of block `read` and is parked in its data read;
/// meanwhile block `b` is discarded, the disk flushed, and new data written
/// into block `d` (blocks of `bs` bytes). `touch`: a sector of an allocated
/// block for the open's first write. Returns what the reader got.
fn race(img: &Path, (b, read, d): (u64, u64, u64), bs: u64, touch: u64) -> Vec<u8> {
    let trap = Arc::new(Trap::default());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let storage = TrappedFile {
        file: (file, true),
        trap: trap.clone(),
    };
    let disk = Arc::new(
        vdisk::open_disk(
            Box::new(storage),
            img,
            vdisk::OpenOptions { writable: true },
            &vdisk::StdParentOpener,
        )
        .unwrap(),
    );
    // The first write of an open does one-time work (a new VDI uuidModify).
    disk.write_at(&[1u8; 512], touch).unwrap();
    disk.flush().unwrap();
    let (parked, go) = trap.arm();
    let reader = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; PARKED_READ];
            disk.read_at(&mut buf, read * bs).unwrap();
            buf
        })
    };
    parked.recv().unwrap();
    disk.discard(b * bs, bs).unwrap();
    disk.flush().unwrap();
    disk.write_at(&vec![0xEEu8; bs as usize], d * bs).unwrap();
    go.send(()).unwrap();
    reader.join().unwrap()
}

/// VDI: discarding b frees slot 0; the flush moves c from slot 1 into it
/// and frees slot 1; d takes slot 1. A reader parked reading c (mapped to
/// slot 1) must not return d's data.
#[test]
fn vdi_reader_of_a_moved_block_never_reads_the_new_owner_of_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "vdi", "static=off", 2, 5);
    let got = race(&img, (2, 5, 6), MIB, 6 * MIB - 512);
    assert!(
        got == block(0x40)[..PARKED_READ],
        "the reader of block 5 got {:#x}.. (0xee: the data of the block that took its old slot)",
        got[0]
    );
    common::run("qemu-img", &["check", "-f", "vdi", img.to_str().unwrap()]);
}

/// VDI: a reader parked reading b (slot 0) while b is discarded and c moves
/// into slot 0 must not return c's data.
#[test]
fn vdi_reader_of_a_discarded_block_never_reads_the_block_moved_into_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "vdi", "static=off", 2, 5);
    let got = race(&img, (2, 2, 6), MIB, 6 * MIB - 512);
    assert!(
        got == block(0x20)[..PARKED_READ] || got.iter().all(|&x| x == 0),
        "the reader of the discarded block 2 got {:#x}.. (neither its data nor zeros)",
        got[0]
    );
}

/// VHD and VHDX: b's place, freed by the discard and reusable after the
/// flush, is taken by d. A reader parked reading b must not return d's data.
#[test]
fn vhd_and_vhdx_reader_of_a_discarded_block_never_reads_the_block_reusing_its_place() {
    for (fmt, opts, bs) in [
        ("vpc", "subformat=dynamic,force_size=on", 2 * MIB),
        ("vhdx", "subformat=dynamic,block_size=1M", MIB),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Blocks 1 and 2 of `bs` bytes hold data.
        let (b, c) = (bs / MIB, 2 * bs / MIB);
        let img = image(dir.path(), fmt, opts, b, c);
        let got = race(&img, (1, 1, 3), bs, 3 * bs - 512);
        assert!(
            got == block(0x20)[..PARKED_READ] || got.iter().all(|&x| x == 0),
            "{fmt}: the reader of the discarded block got {:#x}.. (0xee: the data of the block reusing its place)",
            got[0]
        );
    }
}
