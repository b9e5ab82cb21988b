//! mmap of an image fd: read-only and private mappings hold the disk's bytes
//! (checked against `qemu-img convert -O raw`), writable shared ones are
//! refused with ENODEV, the size bound is ENOMEM, and fio's mmap engine
//! verifies a VHDX.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::os::unix::fs::symlink;

const MAP_PY: &str = r#"
import errno, hashlib, mmap, os, sys
path, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.lseek(fd, 0, os.SEEK_END)
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
print(size, hashlib.sha256(m[:]).hexdigest())
m.close()
m = mmap.mmap(fd, n, prot=mmap.PROT_READ, offset=off)
print(hashlib.sha256(m[:]).hexdigest())
m.close()
# A private writable mapping: copy-on-write memory, MADV_DONTNEED brings
# the disk's bytes back, the image is not written.
p = mmap.mmap(fd, 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
before = p[:16]
p[:16] = b'PRIVATE-WRITE-16'
assert p[:16] == b'PRIVATE-WRITE-16'
p.madvise(mmap.MADV_DONTNEED)
assert p[:16] == before, (p[:16], before)
p.close()
# As on a kernel block device, length 0 does not mean "the whole disk".
try:
    mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    print('len0 mapped')
except OSError as e:
    print('len0', errno.errorcode[e.errno])
os.close(fd)
fd = os.open(path, os.O_RDWR)
try:
    mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    print('shared-write mapped')
except OSError as e:
    print('shared-write', errno.errorcode[e.errno])
"#;

fn run_map(dir: &std::path::Path, path: &str, off: usize, n: usize) -> (Vec<String>, String) {
    let out = preload::command(
        dir,
        preload::python(),
        &["-c", MAP_PY, path, &off.to_string(), &n.to_string()],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "python mmap on {path}: {stderr}");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (lines, stderr)
}

/// The whole disk, a range at an offset, and a partition window, for VHD,
/// VHDX and VDI.
#[test]
fn python_mmap_reads_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = common::sfdisk_raw(dir, "src.raw", 12 << 20, "label: dos\n,4M,83\n,,83\n");
    let mut data = std::fs::read(&raw).unwrap();
    let (pattern, _) = common::pattern(7, data.len() - (1 << 20));
    data[1 << 20..].copy_from_slice(&pattern);
    for (fmt, opts, ext) in [
        ("vpc", "subformat=dynamic", "vhd"),
        ("vhdx", "", "vhdx"),
        ("vdi", "", "vdi"),
        ("vmdk", "", "vmdk"),
    ] {
        let name = format!("d.{ext}");
        let img = common::qemu_image_from(&data, dir, &name, fmt, opts);
        let reference = common::qemu_raw(&img, fmt);
        let part = format!("{name}2");
        symlink(&name, dir.join(&part)).unwrap();
        let p2 = &data[(2048 + 8192) * 512..];
        let (off, n) = (3 << 20, (1 << 20) + 123);
        for (dev, disk) in [(name.as_str(), &reference[..]), (part.as_str(), p2)] {
            let (lines, stderr) = run_map(dir, dev, off, n);
            assert_eq!(
                lines,
                [
                    format!("{} {}", disk.len(), common::sha256_hex(disk)),
                    common::sha256_hex(&disk[off..off + n]),
                    "len0 EINVAL".to_string(),
                    "shared-write ENODEV".to_string(),
                ],
                "python mmap on {dev} ({fmt})"
            );
            let warned: Vec<&str> = stderr.lines().filter(|l| l.contains("libvhdio[")).collect();
            assert_eq!(warned.len(), 1, "{stderr}");
            assert!(warned[0].contains("MAP_SHARED"), "{stderr}");
        }
        assert_eq!(
            common::qemu_raw(&img, fmt),
            reference,
            "the mappings wrote the image"
        );
    }
}

/// A mapping larger than LIBVHD_IO_MMAP_MAX: ENOMEM and one log line.
#[test]
fn mmap_past_the_bound_is_enomem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::qemu_image_from(&vec![1u8; 4 << 20], dir, "d.vhdx", "vhdx", "");
    let script = "import mmap, os, errno\nfd = os.open('d.vhdx', os.O_RDONLY)\n\
                  m = mmap.mmap(fd, 1 << 20, prot=mmap.PROT_READ); print(m[5])\n\
                  try:\n    mmap.mmap(fd, 2 << 20, prot=mmap.PROT_READ); print('mapped')\n\
                  except OSError as e:\n    print(errno.errorcode[e.errno])\n";
    let out = preload::command(dir, preload::python(), &["-c", script])
        .env("LIBVHD_IO_MMAP_MAX", "1M")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\nENOMEM\n");
    assert!(stderr.contains("LIBVHD_IO_MMAP_MAX"), "{stderr}");
}

/// fio's mmap engine (a read-only MAP_SHARED mapping of the whole device)
/// verifies blocks that fio wrote with checksums into a raw file, which
/// qemu-img converted to a VHDX.
#[test]
fn fio_mmap_engine_verifies_a_vhdx() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = std::process::Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=w",
            "--filename=v.raw",
            "--size=8M",
            "--rw=write",
            "--bs=64k",
            "--verify=crc32c",
            "--do_verify=0",
        ])
        .output()
        .expect("cannot run fio (install it)");
    assert!(write.status.success());
    let raw = std::fs::read(dir.join("v.raw")).unwrap();
    common::qemu_image_from(&raw, dir, "v.vhdx", "vhdx", "");
    let out = preload::run(
        dir,
        "fio",
        &[
            "--name=r",
            "--filename=v.vhdx",
            "--size=8M",
            "--ioengine=mmap",
            "--rw=write",
            "--bs=64k",
            "--verify=crc32c",
            "--verify_only",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("err= 0") && text.contains("io=8192KiB"),
        "{text}"
    );
    // And plain sequential reads.
    let out = preload::run(
        dir,
        "fio",
        &[
            "--name=r",
            "--filename=v.vhdx",
            "--ioengine=mmap",
            "--rw=read",
            "--bs=64k",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("err= 0"));
}
