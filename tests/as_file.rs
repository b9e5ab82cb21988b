//! Regular-file mode (LIBVHD_IO_AS_FILE=1, issue 14 items 3 and 4): an image
//! stats as a regular file of its virtual size, so `tar`/`cp -a` of a folder
//! store the virtual disk (the default mode stores a device node 0:0: the
//! trap the README names), and ntfs-3g mounts an image (whole disk and a
//! partition link, whose name survives realpath) instead of refusing with
//! "Block device required". fuse2fs, which works in the default mode, is
//! kept working. FUSE tests skip only without /dev/fuse or where mounting is
//! not permitted (a container), and say so.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Rng, pattern, qemu_image_from, qemu_raw};
use preload::fuse::{Mount, no_fuse, or_skip};

const AS_FILE: (&str, &str) = ("LIBVHD_IO_AS_FILE", "1");

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Runs `program` in `dir` under the library with `env`; must succeed.
fn lib(dir: &Path, env: &[(&str, &str)], program: &str, args: &[&str]) -> Output {
    let mut c = preload::command(dir, program, args);
    c.env_remove("LIBVHD_IO_AS_FILE")
        .env_remove("LIBVHD_IO_ONLY");
    c.envs(env.iter().copied());
    must(c)
}

/// Runs `program` in `dir` without the library; must succeed.
fn plain(dir: &Path, program: &str, args: &[&str]) -> Output {
    let mut c = Command::new(program);
    c.args(args).current_dir(dir).env_remove("LD_PRELOAD");
    must(c)
}

fn must(mut c: Command) -> Output {
    let what = format!("{c:?}");
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("libvhdio["),
        "{what}: the library warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Partitions `image` with sfdisk `script` through the library.
fn sfdisk(dir: &Path, image: &str, script: &str) {
    use std::io::Write;
    let mut c = preload::command(dir, "sfdisk", &["-q", image]);
    c.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    drop(stdin);
    assert!(
        child.wait().unwrap().success(),
        "sfdisk through the library"
    );
}

/// `qemu-img create` of an empty `name` of format `fmt` in `dir`.
fn create(dir: &Path, fmt: &str, name: &str, size: &str) {
    plain(dir, "qemu-img", &["create", "-q", "-f", fmt, name, size]);
}

/// `qemu-img convert` of `img` (format `fmt`) in `dir` into the raw file `raw`.
fn to_raw(dir: &Path, fmt: &str, img: &str, raw: &str) {
    plain(
        dir,
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", img, raw],
    );
}

/// `qemu-img check` of `img` (format `fmt`) in `dir`: must be clean.
fn qemu_check(dir: &Path, fmt: &str, img: &str) {
    plain(dir, "qemu-img", &["check", "-q", "-f", fmt, img]);
}

/// True, after saying why, where the machine has no FUSE: the test skips.
fn fuse_missing() -> bool {
    match no_fuse() {
        Some(why) => {
            eprintln!("skipping: {why}");
            true
        }
        None => false,
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A folder `d` holding `disk.vhdx` with distinctive data; returns the
/// virtual disk as qemu-img extracts it.
fn folder_with_image(dir: &Path) -> Vec<u8> {
    let (data, _) = pattern(14, 6 << 20);
    fs::create_dir(dir.join("d")).unwrap();
    let img = qemu_image_from(&data, dir, "disk.vhdx", "vhdx", "");
    fs::rename(img, dir.join("d/disk.vhdx")).unwrap();
    let raw = qemu_raw(&dir.join("d/disk.vhdx"), "vhdx");
    assert_eq!(&raw[..data.len()], &data[..], "qemu-img round trip");
    raw
}

/// `tar -tvf` line of the archive member `name`.
fn member_line(dir: &Path, tar: &str, name: &str) -> String {
    let list = text(&plain(dir, "tar", &["-tvf", tar]));
    list.lines()
        .find(|l| l.ends_with(name))
        .unwrap_or_else(|| panic!("{name} not in {tar}: {list}"))
        .to_string()
}

#[test]
fn tar_in_regular_file_mode_archives_the_virtual_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = folder_with_image(dir);
    for (tar, opts) in [("a.tar", "-cf"), ("sparse.tar", "--sparse -cf")] {
        let mut args: Vec<&str> = opts.split(' ').collect();
        args.extend([tar, "d"]);
        lib(dir, &[AS_FILE], "tar", &args);
        let line = member_line(dir, tar, "d/disk.vhdx");
        assert!(line.starts_with('-'), "{tar}: not a regular file: {line}");
        // Extracted by stock tar, without the library.
        let member = plain(dir, "tar", &["-xOf", tar, "d/disk.vhdx"]).stdout;
        assert_eq!(member.len(), raw.len(), "{tar}: member size");
        assert!(
            member == raw,
            "{tar}: member bytes differ from qemu-img's raw"
        );
    }
    // cp -a and rsync -a of the folder: a regular file holding the virtual disk.
    lib(dir, &[AS_FILE], "cp", &["-a", "d", "cp"]);
    lib(dir, &[AS_FILE], "rsync", &["-a", "d", "rsync"]);
    for copy in ["cp/disk.vhdx", "rsync/d/disk.vhdx"] {
        let copy = dir.join(copy);
        assert!(fs::symlink_metadata(&copy).unwrap().file_type().is_file());
        assert!(
            fs::read(&copy).unwrap() == raw,
            "{} differs from qemu-img's raw",
            copy.display()
        );
    }
}

/// The documented trap: in the default mode an image is a block device, and
/// tar stores a device node 0:0 (no data), cp -a makes one; LIBVHD_IO_ONLY naming other files
/// leaves the container alone, so tar stores the container file itself.
#[test]
fn tar_in_default_mode_stores_a_device_node() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    folder_with_image(dir);
    lib(dir, &[], "tar", &["-cf", "b.tar", "d"]);
    let line = member_line(dir, "b.tar", "d/disk.vhdx");
    assert!(
        line.starts_with('b') && line.contains("0,0"),
        "the default mode archives a block device 0:0: {line}"
    );
    // cp -a makes a device node too (or fails where mknod is not permitted).
    let mut cp = preload::command(dir, "cp", &["-a", "d", "cp"]);
    if cp.status().unwrap().success() {
        let meta = fs::symlink_metadata(dir.join("cp/disk.vhdx")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_block_device(), "cp -a: {meta:?}");
    }
    let only = dir.join("elsewhere");
    lib(
        dir,
        &[("LIBVHD_IO_ONLY", only.to_str().unwrap())],
        "tar",
        &["-cf", "c.tar", "d"],
    );
    let member = plain(dir, "tar", &["-xOf", "c.tar", "d/disk.vhdx"]).stdout;
    assert!(
        member == fs::read(dir.join("d/disk.vhdx")).unwrap(),
        "with LIBVHD_IO_ONLY elsewhere, tar stores the container"
    );
}

const STAT_PY: &str = r#"
import fcntl, os, stat, struct, sys
for path, want in zip(sys.argv[1::2], map(int, sys.argv[2::2])):
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode), (path, oct(st.st_mode))
    assert (st.st_size, st.st_blocks, st.st_rdev) == (want, (want + 511) // 512, 0), (path, st)
    fd = os.open(path, os.O_RDONLY)
    fst = os.fstat(fd)
    assert stat.S_ISREG(fst.st_mode) and fst.st_size == want, (path, fst)
    assert (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)
    got = struct.unpack('Q', fcntl.ioctl(fd, 0x80081272, b'\0' * 8))[0]
    assert got == want, ('BLKGETSIZE64', path, got)
    assert os.lseek(fd, 0, os.SEEK_END) == want
    assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
    assert os.lseek(fd, 4096, os.SEEK_HOLE) == want
    for by_fd in (f'/proc/self/fd/{fd}', f'/dev/fd/{fd}'):
        assert os.stat(by_fd) == fst, (by_fd, os.stat(by_fd), fst)
    os.close(fd)
print("ok")
"#;

#[test]
fn regular_file_mode_stat_of_disk_and_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "vhdx", "disk.vhdx", "32M");
    sfdisk(dir, "disk.vhdx", "label: dos\n,8M,83\n,,83\n");
    std::os::unix::fs::symlink("disk.vhdx", dir.join("disk.vhdx2")).unwrap();
    let part = 32 * 1024 * 1024 - 9 * 1024 * 1024; // from sector 2048 + 8 MiB
    fs::write(dir.join("stat.py"), STAT_PY).unwrap();
    let (whole, p2) = ((32u64 << 20).to_string(), part.to_string());
    let out = lib(
        dir,
        &[AS_FILE],
        preload::python(),
        &["stat.py", "disk.vhdx", &whole, "disk.vhdx2", &p2],
    );
    assert_eq!(text(&out).trim(), "ok");
    // statx (coreutils stat), and lstat of the link stays a link.
    let out = lib(
        dir,
        &[AS_FILE],
        "stat",
        &["-c", "%F %s %b", "disk.vhdx", "-L", "disk.vhdx2"],
    );
    let want = format!(
        "regular file {whole} {}\nregular file {p2} {}\n",
        (32u64 << 20) / 512,
        part / 512
    );
    assert_eq!(text(&out), want);
    let out = lib(dir, &[AS_FILE], "stat", &["-c", "%F", "disk.vhdx2"]);
    assert_eq!(text(&out), "symbolic link\n");
    // The default mode is unchanged: a block device of size 0.
    let out = lib(
        dir,
        &[],
        "stat",
        &["-c", "%F %s", "disk.vhdx", "-L", "disk.vhdx2"],
    );
    assert_eq!(text(&out), "block special file 0\nblock special file 0\n");
    // /dev/stdin and /dev/fd/N naming an image fd (statx by path through the
    // link to the dummy memfd) read as that fd, in both modes.
    let script = "stat -L -c '%F %s' /dev/stdin < disk.vhdx; exec 3< disk.vhdx2; stat -L -c '%F %s' /dev/fd/3";
    let out = lib(dir, &[AS_FILE], "sh", &["-c", script]);
    assert_eq!(
        text(&out),
        format!("regular file {whole}\nregular file {p2}\n")
    );
    let out = lib(dir, &[], "sh", &["-c", script]);
    assert_eq!(text(&out), "block special file 0\nblock special file 0\n");
}

const REALPATH_PY: &str = r#"
import ctypes, sys
libc = ctypes.CDLL(None)
for f in (libc.realpath, libc.canonicalize_file_name, libc.__realpath_chk):
    f.restype = ctypes.c_char_p
buf = ctypes.create_string_buffer(4096)
for p in sys.argv[1:]:
    b = p.encode()
    print(libc.realpath(b, None).decode(), libc.realpath(b, buf).decode(),
          libc.canonicalize_file_name(b).decode(), libc.__realpath_chk(b, buf, 4096).decode())
"#;

/// realpath(3) and friends keep a partition link's name (in its canonical
/// folder); other links and files resolve as glibc resolves them.
#[test]
fn realpath_keeps_a_partition_links_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    create(&dir, "vpc", "disk.vhd", "8M");
    fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink("../disk.vhd", dir.join("sub/disk.vhd1")).unwrap();
    std::os::unix::fs::symlink("sub", dir.join("via")).unwrap();
    fs::write(dir.join("plain.vhd"), b"not an image").unwrap();
    std::os::unix::fs::symlink("plain.vhd", dir.join("plain.vhd2")).unwrap();
    fs::write(dir.join("realpath.py"), REALPATH_PY).unwrap();
    let out = lib(
        &dir,
        &[],
        preload::python(),
        &["realpath.py", "via/disk.vhd1", "disk.vhd", "plain.vhd2"],
    );
    let d = dir.to_str().unwrap();
    let lines: Vec<String> = text(&out).lines().map(str::to_string).collect();
    let four = |p: String| [p.as_str(); 4].join(" ");
    assert_eq!(
        lines,
        [
            four(format!("{d}/sub/disk.vhd1")),
            four(format!("{d}/disk.vhd")),
            four(format!("{d}/plain.vhd")),
        ]
    );
}

// ---------------------------------------------------------------------------
// FUSE file systems on images

/// ntfs-3g on `dev` (the whole disk or a partition link of `disk.vhdx`, NTFS
/// made by mkntfs through the library, `f.bin` put by ntfscp): `ls` and a
/// read through the mount see f.bin, a file copied in is read back by
/// ntfscat through the library. Returns g.bin's contents.
fn ntfs3g_round_trip(dir: &Path, dev: &str) -> Option<Vec<u8>> {
    let f = payload(1, 150_000);
    let g = payload(2, 333_333);
    fs::write(dir.join("f.bin"), &f).unwrap();
    fs::write(dir.join("g.bin"), &g).unwrap();
    lib(dir, &[], "mkntfs", &["-Q", dev]);
    lib(dir, &[], "ntfscp", &[dev, "f.bin", "f.bin"]);
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut ntfs3g = preload::command(dir, "ntfs-3g", &["-o", "no_detach", dev, "mnt"]);
    ntfs3g.env(AS_FILE.0, AS_FILE.1);
    let m = or_skip(Mount::start(ntfs3g, dir, &mnt))?;
    let source = m.source().unwrap();
    assert_eq!(
        source,
        format!("{}/{dev}", fs::canonicalize(dir).unwrap().display()),
        "ntfs-3g mounted a different device"
    );
    let ls = text(&plain(dir, "ls", &["mnt"]));
    assert!(ls.lines().any(|l| l == "f.bin"), "ls of the mount: {ls}");
    assert!(
        fs::read(mnt.join("f.bin")).unwrap() == f,
        "f.bin read through the mount"
    );
    plain(dir, "cp", &["g.bin", "mnt/g.bin"]);
    m.finish();
    let back = lib(dir, &[], "ntfscat", &[dev, "g.bin"]).stdout;
    assert!(back == g, "ntfscat of g.bin through the library");
    Some(g)
}

#[test]
fn ntfs3g_mounts_a_whole_disk_image() {
    if fuse_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "vhdx", "disk.vhdx", "64M");
    let Some(g) = ntfs3g_round_trip(dir, "disk.vhdx") else {
        return;
    };
    to_raw(dir, "vhdx", "disk.vhdx", "disk.raw");
    let back = plain(dir, "ntfscat", &["disk.raw", "g.bin"]).stdout;
    assert!(back == g, "ntfscat of g.bin on qemu-img's raw");
    qemu_check(dir, "vhdx", "disk.vhdx");
}

#[test]
fn ntfs3g_mounts_a_partition_link() {
    if fuse_missing() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "vhdx", "disk.vhdx", "64M");
    sfdisk(dir, "disk.vhdx", "label: dos\n,16M,7\n,,7\n");
    std::os::unix::fs::symlink("disk.vhdx", dir.join("disk.vhdx2")).unwrap();
    let Some(g) = ntfs3g_round_trip(dir, "disk.vhdx2") else {
        return;
    };
    to_raw(dir, "vhdx", "disk.vhdx", "disk.raw");
    // Partition 2 from sector 2048 + 16 MiB to the end, cut out with dd.
    let start = (1u64 << 20) + (16 << 20);
    plain(
        dir,
        "dd",
        &[
            "if=disk.raw",
            "of=part.raw",
            "bs=1M",
            &format!("skip={}", start >> 20),
            "status=none",
        ],
    );
    let back = plain(dir, "ntfscat", &["part.raw", "g.bin"]).stdout;
    assert!(
        back == g,
        "ntfscat of g.bin on partition 2 of qemu-img's raw"
    );
    let raw = fs::read(dir.join("disk.raw")).unwrap();
    assert!(
        raw[512..start as usize].iter().all(|&b| b == 0),
        "bytes outside partition 2 (but the table) were written"
    );
    qemu_check(dir, "vhdx", "disk.vhdx");
}

/// fuse2fs works in the default mode (it does not ask for a block device):
/// mkfs.ext4 and the check through the library, a file written through the
/// mount.
#[test]
fn fuse2fs_mounts_an_image() {
    if fuse_missing() {
        return;
    }
    if Command::new("fuse2fs").arg("--help").output().is_err() {
        eprintln!("skipping: fuse2fs is not installed (Debian package fuse2fs)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "vdi", "disk.vdi", "64M");
    lib(dir, &[], "mkfs.ext4", &["-q", "disk.vdi"]);
    let h = payload(3, 200_000);
    fs::write(dir.join("h.bin"), &h).unwrap();
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut fuse2fs = preload::command(dir, "fuse2fs", &["-f", "disk.vdi", "mnt"]);
    fuse2fs.env_remove(AS_FILE.0);
    let Some(m) = or_skip(Mount::start(fuse2fs, dir, &mnt)) else {
        return;
    };
    plain(dir, "cp", &["h.bin", "mnt/h.bin"]);
    m.finish();
    lib(dir, &[], "e2fsck", &["-fn", "disk.vdi"]);
    let back = lib(dir, &[], "debugfs", &["-R", "cat /h.bin", "disk.vdi"]).stdout;
    assert!(back == h, "debugfs cat of h.bin through the library");
    qemu_check(dir, "vdi", "disk.vdi");
}

const TRUNCATE_PY: &str = r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
os.ftruncate(fd, size)
try:
    os.ftruncate(fd, size - 512)
    print("shrunk")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;

/// Writing onto an image in regular-file mode: an O_TRUNC open fails loudly
/// (a regular file opened so is empty, and cp then seeks over the source's
/// holes, which would keep the old data there); conv=notrunc writes it all;
/// ftruncate to the same size is a no-op, to another size EINVAL.
#[test]
fn regular_file_mode_refuses_to_empty_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (old, _) = pattern(21, 4 << 20);
    let img = qemu_image_from(&old, dir, "disk.vhd", "vpc", "subformat=dynamic");
    let before = qemu_raw(&img, "vpc");
    // Data, a hole, data: cp seeks over the hole.
    let mut new = vec![0u8; before.len()];
    new[..4096].copy_from_slice(&payload(5, 4096));
    let end = new.len();
    new[end - 4096..].copy_from_slice(&payload(6, 4096));
    let f = fs::File::create(dir.join("new.raw")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&new[..4096], 0).unwrap();
    f.write_all_at(&new[end - 4096..], (end - 4096) as u64)
        .unwrap();
    drop(f);
    let mut cp = preload::command(dir, "cp", &["new.raw", "disk.vhd"]);
    cp.env(AS_FILE.0, AS_FILE.1);
    let out = cp.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "cp onto the image in regular-file mode succeeded"
    );
    assert!(
        err.contains("libvhdio[") && err.contains("O_TRUNC in regular-file mode"),
        "no warning: {err}"
    );
    assert!(
        qemu_raw(&img, "vpc") == before,
        "the failed cp changed the disk"
    );
    lib(
        dir,
        &[AS_FILE],
        "dd",
        &[
            "if=new.raw",
            "of=disk.vhd",
            "bs=64k",
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(
        qemu_raw(&img, "vpc") == new,
        "dd conv=notrunc in regular-file mode"
    );
    fs::write(dir.join("truncate.py"), TRUNCATE_PY).unwrap();
    let out = lib(
        dir,
        &[AS_FILE],
        preload::python(),
        &["truncate.py", "disk.vhd"],
    );
    assert_eq!(text(&out).trim(), "EINVAL");
}
