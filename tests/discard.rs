//! blkdiscard, blkdiscard -z, fallocate -p and fallocate -z through the
//! library on VHD, VHDX and VDI images, their differencing children and a
//! partition window (issue 16): the range reads as zeros afterwards (through
//! the library and through `qemu-img convert`), everything else is
//! unchanged, the image stays clean for its checker; misaligned,
//! out-of-window and read-only requests get the kernel's errors and change
//! nothing.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::os::unix::fs::symlink;
use std::path::Path;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

const FORMATS: &[(&str, &str, &str)] = &[
    ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    ("vhdx", "subformat=dynamic,block_size=1M", "vhdx"),
    ("vdi", "static=off", "vdi"),
];

/// The disk (or window) `dev` as a program reads it through the library.
fn read_through_library(dir: &Path, dev: &str) -> Vec<u8> {
    preload::run(
        dir,
        "dd",
        &[&format!("if={dev}"), "of=back.raw", "bs=1M", "status=none"],
    );
    let back = std::fs::read(dir.join("back.raw")).unwrap();
    std::fs::remove_file(dir.join("back.raw")).unwrap();
    back
}

/// The tools' requests, each with the range it zeroes (bytes of `dev`).
fn tool_requests(dir: &Path, dev: &str, model: &mut [u8]) {
    let m = |n: u64| (n * MIB).to_string();
    let runs: [(&str, Vec<String>, u64, u64); 5] = [
        (
            "blkdiscard",
            vec!["-f".into(), "-o".into(), m(1), "-l".into(), m(3)],
            MIB,
            3 * MIB,
        ),
        (
            "blkdiscard",
            vec![
                "-f".into(),
                "-z".into(),
                "-o".into(),
                m(6),
                "-l".into(),
                m(1),
            ],
            6 * MIB,
            MIB,
        ),
        (
            "fallocate",
            vec![
                "-p".into(),
                "-o".into(),
                "9437696".into(),
                "-l".into(),
                m(3),
            ],
            9437696,
            3 * MIB,
        ),
        (
            "fallocate",
            vec!["-z".into(), "-o".into(), m(14), "-l".into(), "5120".into()],
            14 * MIB,
            5120,
        ),
        (
            "blkdiscard",
            vec!["-f".into(), "-o".into(), m(17), "-l".into(), m(2)],
            17 * MIB,
            2 * MIB,
        ),
    ];
    for (program, mut args, off, len) in runs {
        args.push(dev.to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        preload::run(dir, program, &a);
        model[off as usize..(off + len) as usize].fill(0);
    }
}

#[test]
fn blkdiscard_and_fallocate_on_each_format() {
    for &(fmt, opts, ext) in FORMATS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut model = common::nonzero_data(5, SIZE);
        let name = format!("d.{ext}");
        let img = common::qemu_image_from(&model, dir, &name, fmt, opts);
        let before = std::fs::metadata(&img).unwrap().len();
        tool_requests(dir, &name, &mut model);
        common::assert_same(
            &read_through_library(dir, &name),
            &model,
            &format!("{fmt}: library"),
        );
        common::assert_same(
            &common::qemu_raw(&img, fmt),
            &model,
            &format!("{fmt}: qemu-img"),
        );
        vhd_util::assert_clean(fmt, &img);
        let after = std::fs::metadata(&img).unwrap().len();
        assert!(
            after <= before,
            "{fmt}: the file grew from {before} to {after}"
        );
        // A whole-disk discard leaves zeros (and little but metadata).
        preload::run(dir, "blkdiscard", &["-f", &name]);
        common::assert_same(
            &read_through_library(dir, &name),
            &vec![0; SIZE as usize],
            &format!("{fmt}: all"),
        );
        common::assert_same(
            &common::qemu_raw(&img, fmt),
            &vec![0; SIZE as usize],
            &format!("{fmt}: qemu all"),
        );
        vhd_util::assert_clean(fmt, &img);
    }
}

#[test]
fn discard_in_a_differencing_child_never_shows_the_parent() {
    for &(fmt, opts, ext) in FORMATS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut model = common::nonzero_data(9, SIZE);
        let parent = common::qemu_image_from(&model, dir, &format!("p.{ext}"), fmt, opts);
        let parent_bytes = std::fs::read(&parent).unwrap();
        let child = dir.join(format!("c.{ext}"));
        {
            let p = std::fs::File::open(&parent).unwrap();
            let c = std::fs::File::create_new(&child).unwrap();
            vdisk::snapshot(&parent, &(p, false), &(c, true), &child).unwrap();
        }
        let name = format!("c.{ext}");
        tool_requests(dir, &name, &mut model);
        common::assert_same(
            &read_through_library(dir, &name),
            &model,
            &format!("{fmt} child"),
        );
        assert_eq!(
            std::fs::read(&parent).unwrap(),
            parent_bytes,
            "{fmt}: parent written"
        );
    }
}

#[test]
fn blkdiscard_of_a_partition_stays_inside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = common::sfdisk_raw(dir, "src.raw", SIZE, "label: dos\n,8M,83\n,,83\n");
    let mut model = std::fs::read(&raw).unwrap();
    // Data everywhere after the partition table.
    let fill = common::nonzero_data(3, SIZE - MIB);
    model[MIB as usize..].copy_from_slice(&fill);
    for &(fmt, opts, ext) in FORMATS {
        let name = format!("d.{ext}");
        let img = common::qemu_image_from(&model, dir, &name, fmt, opts);
        symlink(&name, dir.join(format!("{name}2"))).unwrap();
        let mut want = model.clone();
        preload::run(dir, "blkdiscard", &["-f", &format!("{name}2")]);
        want[9 * MIB as usize..].fill(0);
        common::assert_same(
            &common::qemu_raw(&img, fmt),
            &want,
            &format!("{fmt}: partition 2 only"),
        );
        vhd_util::assert_clean(fmt, &img);
    }
}

/// Raw calls from python (ctypes reaches the library's fallocate; ioctl
/// goes through fcntl): each prints its errno.
const PROBE_PY: &str = r#"
import ctypes, fcntl, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
BLKDISCARD, BLKZEROOUT, BLKSECDISCARD = 0x1277, 0x127F, 0x127D
PUNCH, KEEP, ZERO = 0x02, 0x01, 0x10
path, size = sys.argv[1], int(sys.argv[2])
def ioc(fd, req, off, n):
    try:
        fcntl.ioctl(fd, req, struct.pack('QQ', off, n))
        return 0
    except OSError as e:
        return e.errno
def fal(fd, mode, off, n):
    r = libc.fallocate(fd, mode, off, n)
    return 0 if r == 0 else ctypes.get_errno()
rw = os.open(path, os.O_RDWR)
ro = os.open(path, os.O_RDONLY)
out = [
    ioc(rw, BLKDISCARD, 1, 512), ioc(rw, BLKDISCARD, 512, 100), ioc(rw, BLKDISCARD, size - 512, 1024),
    ioc(rw, BLKDISCARD, 0, 0), ioc(rw, BLKZEROOUT, 256, 512), ioc(rw, BLKZEROOUT, size, 512),
    ioc(rw, BLKSECDISCARD, 0, 512), ioc(ro, BLKDISCARD, 0, 512), ioc(ro, BLKZEROOUT, 0, 512),
    fal(rw, PUNCH | KEEP, 1, 512), fal(rw, PUNCH, 0, 512), fal(rw, 0, 0, 512),
    fal(rw, ZERO, size, 512), fal(rw, ZERO, 0, 0), fal(ro, PUNCH | KEEP, 0, 512),
    fal(rw, ZERO | KEEP, size - 512, 4096),
]
print(' '.join(map(str, out)))
"#;

#[test]
fn bad_requests_get_the_kernels_errors_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("probe.py"), PROBE_PY).unwrap();
    for &(fmt, opts, ext) in FORMATS {
        let name = format!("d.{ext}");
        let mut model = common::nonzero_data(4, SIZE);
        let img = common::qemu_image_from(&model, dir, &name, fmt, opts);
        let out = preload::run(
            dir,
            preload::python(),
            &["probe.py", &name, &SIZE.to_string()],
        );
        let (einval, ebadf, eopnotsupp) = (libc::EINVAL, libc::EBADF, libc::EOPNOTSUPP);
        let want = [
            einval, einval, einval, einval, einval, einval, eopnotsupp, ebadf, ebadf, einval,
            eopnotsupp, eopnotsupp, einval, einval, ebadf, 0,
        ]
        .map(|e| e.to_string())
        .join(" ");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{fmt}");
        // Only the last request (ZERO_RANGE|KEEP_SIZE cut at the end) zeroed.
        let end = model.len();
        model[end - 512..].fill(0);
        common::assert_same(
            &common::qemu_raw(&img, fmt),
            &model,
            &format!("{fmt}: after bad requests"),
        );
    }
}

/// Blocks the image's own table says it stores, and those of them holding
/// only zeros.
fn zero_blocks(img: &Path) -> (u64, u64) {
    let disk = common::open(img, false).unwrap();
    let u = vdisk::block_usage(disk.layers()[0].as_ref(), true)
        .unwrap()
        .expect("a format with blocks");
    (u.allocated, u.zero)
}

/// Zero detection: `mkfs.ext4 -E lazy_itable_init=0` on a fresh 2 GiB image
/// (with its initial discard, and with -E nodiscard, where it writes the
/// inode tables' zeros itself) leaves no allocated block holding only
/// zeros; e2fsck on the raw disk is clean.
#[test]
fn mkfs_ext4_allocates_no_block_of_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for &(fmt, _, ext) in FORMATS {
        for extended in ["lazy_itable_init=0", "lazy_itable_init=0,nodiscard"] {
            let name = format!("fs.{ext}");
            let img = dir.join(&name);
            std::fs::remove_file(&img).ok();
            common::run(
                "qemu-img",
                &["create", "-q", "-f", fmt, img.to_str().unwrap(), "2G"],
            );
            preload::run(dir, "mkfs.ext4", &["-q", "-F", "-E", extended, &name]);
            let (allocated, zero) = zero_blocks(&img);
            assert!(allocated > 0, "{fmt} {extended}: nothing allocated");
            assert_eq!(
                zero, 0,
                "{fmt} {extended}: {zero} of {allocated} allocated blocks hold only zeros"
            );
            let raw = dir.join("fs.raw");
            common::run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    fmt,
                    "-O",
                    "raw",
                    img.to_str().unwrap(),
                    raw.to_str().unwrap(),
                ],
            );
            common::run("e2fsck", &["-fn", raw.to_str().unwrap()]);
            std::fs::remove_file(&raw).unwrap();
        }
    }
}
