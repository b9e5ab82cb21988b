//! Descriptors and extents qemu-img does not write: COWD (VMFSSPARSE),
//! ZERO and RDONLY extents, a descriptor-only sparse file.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::bytes::put_le32;
use crate::{Disk, MemStorage};

/// Serves in-memory files by name; writable opens share the same bytes.
#[derive(Default)]
struct Files(HashMap<PathBuf, Arc<MemStorage>>);

struct Handle(Arc<MemStorage>, bool);

impl Storage for Handle {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        self.1
    }
}

impl ParentOpener for Files {
    fn open_parent(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        self.open_extent(path, false)
    }
    fn open_extent(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
        match self.0.get(path) {
            Some(s) => Ok(Box::new(Handle(s.clone(), writable))),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
}

impl Files {
    fn add(&mut self, name: &str, data: Vec<u8>) -> Arc<MemStorage> {
        let s = Arc::new(MemStorage::new(data));
        self.0.insert(PathBuf::from("/d").join(name), s.clone());
        s
    }
}

fn open_text(text: &str, files: &Files, writable: bool) -> Result<Disk> {
    let img = VmdkImage::open(
        Box::new(MemStorage::new(text.as_bytes().to_vec())),
        Path::new("/d/x.vmdk"),
        OpenOptions { writable },
        files,
    )?;
    Disk::new(vec![Box::new(img)])
}

/// A COWD extent of 64 sectors, 8-sector grains: grain 2 holds 0x77.
fn cowd() -> Vec<u8> {
    let mut f = vec![0u8; 512 * 8];
    f[..4].copy_from_slice(b"COWD");
    put_le32(&mut f, 4, 1);
    put_le32(&mut f, 12, 64); // sectors
    put_le32(&mut f, 16, 8); // grain
    put_le32(&mut f, 20, 1); // directory at sector 1
    put_le32(&mut f, 24, 1); // one entry
    put_le32(&mut f, 512, 2); // table at sector 2 (4096 entries: 32 sectors)
    f.resize(512 * 34, 0);
    put_le32(&mut f, 1024 + 2 * 4, 34); // grain 2 at sector 34
    f.resize(512 * 42, 0x77);
    f
}

#[test]
fn vmfs_sparse_zero_and_read_only_extents() {
    let mut files = Files::default();
    files.add("c.vmdk", cowd());
    let flat = files.add("f.vmdk", vec![0x55; 8192]);
    let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
        createType=\"vmfsSparse\"\nRW 64 VMFSSPARSE \"c.vmdk\"\nRW 8 ZERO\n\
        RDONLY 8 FLAT \"f.vmdk\" 4\n";
    let disk = open_text(text, &files, true).unwrap();
    assert_eq!(disk.size(), 80 * 512);
    let mut b = vec![0u8; 80 * 512];
    disk.read_at(&mut b, 0).unwrap();
    assert!(b[..16 * 512].iter().all(|&x| x == 0));
    assert!(b[16 * 512..24 * 512].iter().all(|&x| x == 0x77));
    assert!(b[24 * 512..72 * 512].iter().all(|&x| x == 0));
    assert!(b[72 * 512..].iter().all(|&x| x == 0x55));
    // COWD is read-only here: the whole image is.
    assert!(!disk.is_writable());
    assert!(matches!(disk.write_at(&[1; 512], 0), Err(Error::ReadOnly)));
    assert_eq!(flat.contents(), vec![0x55; 8192]);
}

#[test]
fn writes_stop_at_read_only_and_zero_extents() {
    let mut files = Files::default();
    let a = files.add("a.vmdk", vec![0; 4096]);
    let b = files.add("b.vmdk", vec![0x11; 4096]);
    let text = "version=1\nCID=1\nRW 8 FLAT \"a.vmdk\"\nRDONLY 8 FLAT \"b.vmdk\"\nRW 8 ZERO\n";
    let disk = open_text(text, &files, true).unwrap();
    disk.write_at(&[9; 1024], 1024).unwrap();
    assert_eq!(&a.contents()[1024..2048], &[9; 1024]);
    assert!(matches!(
        disk.write_at(&[9; 512], 4096),
        Err(Error::ReadOnly)
    ));
    assert!(disk.write_at(&[9; 512], 8192).is_err());
    assert_eq!(b.contents(), vec![0x11; 4096]);
    // A missing file is named.
    let e = open_text("version=1\nCID=1\nRW 8 FLAT \"nope.vmdk\"\n", &files, false).unwrap_err();
    assert!(e.to_string().contains("nope.vmdk"), "{e}");
    let e = open_text(
        "version=1\nCID=1\nRW 8 SESPARSE \"a.vmdk\"\n",
        &files,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("seSparse"), "{e}");
    let e = open_text("version=1\nCID=1\nRW 16 FLAT \"a.vmdk\"\n", &files, false).unwrap_err();
    assert!(e.to_string().contains("the extent needs"), "{e}");
}

#[test]
fn parent_hint_candidates() {
    let d = Descriptor::parse(
        b"CID=2\nparentCID=1\nparentFileNameHint=\"C:\\\\vms\\\\base.vmdk\"\nRW 8 ZERO\n",
    )
    .unwrap();
    let link = parent_link(&d, Path::new("/x/child.vmdk"))
        .unwrap()
        .unwrap();
    assert_eq!(link.id, cid_id(1));
    assert!(
        link.candidates.contains(&PathBuf::from("/x/base.vmdk")),
        "{link:?}"
    );
    let no_hint = Descriptor::parse(b"CID=2\nparentCID=1\nRW 8 ZERO\n").unwrap();
    assert!(parent_link(&no_hint, Path::new("/x/c.vmdk")).is_err());
}
