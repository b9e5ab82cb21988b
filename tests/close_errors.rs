//! A commit that fails at the last close of a written image is not silent:
//! close() returns -1/EIO (and the fd is released all the same, as Linux
//! does), fclose() returns EOF/EIO, and at exit, with nobody to tell, an
//! error line names the image. An earlier close of a dup'ed fd, or of one of
//! two opens, is not the last and succeeds.
//!
//! The container's writes fail for real, from the kernel: after its writes
//! the program lowers its RLIMIT_FSIZE to 0 (SIGXFSZ ignored), so every
//! later write to a regular file fails with EFBIG, as writes to a full file
//! system fail with ENOSPC; the commit's table writes are among them. The
//! library reports every such commit failure as EIO (a block device's
//! failed write-back), with the cause (EFBIG here) in the log line.
//! Afterwards the image must still be consistent (qemu-img check, the VHD
//! checker), read as before the lost writes, and take new writes.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
mod vhd_util;

use std::path::Path;
use std::process::Command;

const FORMATS: [(&str, &str); 5] = [
    ("vpc", "vhd"),
    ("vhdx", "vhdx"),
    ("vdi", "vdi"),
    ("qcow2", "qcow2"),
    ("vmdk", "vmdk"),
];

/// argv: image, mode. Allocates 4 MiB of new blocks at 8 MiB, makes every
/// further write to a regular file fail, then closes as `mode` says and
/// prints what each close returned.
const WRITER_PY: &str = r#"
import ctypes, errno, os, resource, signal, sys
path, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fwrite.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
libc.fseek.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
libc.fflush.argtypes = [ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]

def fill_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

def close(fd, what):
    try:
        os.close(fd)
        print(what, 'ok')
    except OSError as e:
        print(what, errno.errorcode[e.errno])
    try:
        os.fstat(fd)
        print(what, 'fd still open')
    except OSError:
        pass

block = b'\xab' * 65536
if mode == 'fclose':
    fp = libc.fopen(path.encode(), b'r+')
    assert fp
    assert libc.fseek(fp, 8 << 20, 0) == 0
    for i in range(64):
        assert libc.fwrite(block, 1, len(block), fp) == len(block)
    assert libc.fflush(fp) == 0
    fill_disk()
    r = libc.fclose(fp)
    print('fclose', 'ok' if r == 0 else errno.errorcode[ctypes.get_errno()])
    sys.exit(0)

fd = os.open(path, os.O_RDWR)
for i in range(64):
    assert os.pwrite(fd, block, (8 << 20) + i * 65536) == 65536
if mode == 'close':
    fill_disk()
    close(fd, 'close')
elif mode == 'shared':
    dup = os.dup(fd)
    reader = os.open(path, os.O_RDONLY)
    fill_disk()
    close(fd, 'first')
    close(dup, 'dup')
    close(reader, 'last')
elif mode == 'exit':
    fill_disk()
    print('exiting', flush=True)
    sys.exit(0)
"#;

fn new_image(dir: &Path, qemu: &str, ext: &str) -> std::path::PathBuf {
    let img = dir.join(format!("full.{ext}"));
    let _ = std::fs::remove_file(&img);
    common::run(
        "qemu-img",
        &["create", "-q", "-f", qemu, img.to_str().unwrap(), "64M"],
    );
    img
}

/// Runs the writer under the library: (stdout, stderr).
fn writer(dir: &Path, img: &Path, mode: &str) -> (String, String) {
    std::fs::write(dir.join("writer.py"), WRITER_PY).unwrap();
    let out = preload::command(
        dir,
        preload::python(),
        &["writer.py", img.to_str().unwrap(), mode],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{mode}: {stdout}{stderr}");
    (stdout, stderr)
}

/// The image is consistent, reads zeros where the lost writes went, and
/// takes (and keeps) a new write once writes work again.
fn still_sound(dir: &Path, img: &Path, qemu: &str, what: &str) {
    check(img, qemu, what);
    let raw = common::qemu_raw(img, qemu);
    assert!(
        raw.iter().all(|&b| b == 0 || b == 0xab),
        "{what}: bytes never written"
    );
    preload::pwrite_through_library(dir, img, &[(8 << 20, vec![0x5c; 65536])]);
    check(img, qemu, what);
    let raw = common::qemu_raw(img, qemu);
    assert!(
        raw[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0x5c),
        "{what}: a write after the failure was lost"
    );
}

fn check(img: &Path, qemu: &str, what: &str) {
    if qemu == "vpc" {
        vhd_util::check_file(img).unwrap_or_else(|e| panic!("{what}: VHD check: {e}"));
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", qemu])
        .arg(img)
        .output()
        .unwrap();
    // 0: clean; 3: leaked clusters only (space a failed commit left unused).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The error line: from the library, naming the image and the cause.
fn assert_logged(stderr: &str, img: &Path, when: &str, what: &str) {
    let line = stderr
        .lines()
        .find(|l| l.contains("libvhdio[") && l.contains("committing"))
        .unwrap_or_else(|| panic!("{what}: no log line: {stderr}"));
    assert!(
        line.contains(img.to_str().unwrap())
            && line.contains(when)
            && line.contains("may be lost")
            && line.contains("too large"),
        "{what}: {line}"
    );
}

#[test]
fn last_close_reports_a_failed_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in FORMATS {
        let img = new_image(dir, qemu, ext);
        let (out, err) = writer(dir, &img, "close");
        assert_eq!(out.trim(), "close EIO", "{ext}: close: {err}");
        assert_logged(&err, &img, "last close", ext);
        still_sound(dir, &img, qemu, &format!("{ext}: close"));
    }
}

#[test]
fn only_the_close_of_the_last_reference_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in FORMATS {
        let img = new_image(dir, qemu, ext);
        let (out, err) = writer(dir, &img, "shared");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["first ok", "dup ok", "last EIO"],
            "{ext}: {err}"
        );
        assert_logged(&err, &img, "last close", ext);
        still_sound(dir, &img, qemu, &format!("{ext}: shared"));
    }
}

#[test]
fn fclose_reports_a_failed_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in FORMATS {
        let img = new_image(dir, qemu, ext);
        let (out, err) = writer(dir, &img, "fclose");
        assert_eq!(out.trim(), "fclose EIO", "{ext}: {err}");
        assert_logged(&err, &img, "last close", ext);
        still_sound(dir, &img, qemu, &format!("{ext}: fclose"));
    }
}

#[test]
fn exit_logs_a_failed_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (qemu, ext) in FORMATS {
        let img = new_image(dir, qemu, ext);
        let (out, err) = writer(dir, &img, "exit");
        assert_eq!(out.trim(), "exiting");
        assert_logged(&err, &img, "exit", ext);
        still_sound(dir, &img, qemu, &format!("{ext}: exit"));
    }
}
