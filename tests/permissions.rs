//! Permissions, read-only workloads and non-image files under the library.
//!
//! * An O_RDONLY open of an image stays read-only (write and pwrite fail
//!   EBADF) while an O_RDWR open of the same image exists in the process,
//!   whichever was opened first, and through dup and /proc/self/fd reopens.
//! * Read-only workloads (dd, cat, md5sum, fdisk -l, sfdisk -d, blkid,
//!   python reads) leave every image byte-identical with its mtime
//!   unchanged, including a VHDX whose log must be replayed (in memory).
//! * A chmod 0444 image opened O_RDWR by an unprivileged user fails EACCES,
//!   as without the library; O_RDONLY still reads the virtual disk.
//! * Non-image files (plain files, text named like images, directories,
//!   missing and unreadable paths): the output and exit status of cat, cp,
//!   dd, stat, ls -l and python's errno values are identical with and
//!   without the library.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// A python that user nobody can run (python3 on PATH may live under /root).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
const NOBODY: [&str; 4] = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];

fn make_images(dir: &Path) -> Vec<(String, &'static str)> {
    let mut data = vec![0u8; 4 << 20];
    let mut rng = common::Rng(9);
    for b in data[..(1 << 20)].iter_mut() {
        *b = rng.next() as u8;
    }
    let mut v = Vec::new();
    for (fmt, name) in [
        ("vpc", "p.vhd"),
        ("vhdx", "p.vhdx"),
        ("vdi", "p.vdi"),
        ("vmdk", "p.vmdk"),
    ] {
        common::qemu_image_from(&data, dir, name, fmt, "");
        std::fs::remove_file(dir.join(format!("{name}.src.raw"))).ok();
        v.push((name.to_string(), fmt));
    }
    v
}

/// A VHDX whose headers name an active log with one entry (the file must be
/// replayed before use): vdisk's template with a log entry that allocates
/// block 0 and fills its first sector.
fn dirty_vhdx(path: &Path) -> Vec<u8> {
    use vdisk::vhdx::header::{self, SLOTS};
    let mut file = vdisk::fuzz::vhdx_template();
    let tlen = file.len() as u64;
    let (mut h, _) = header::read_current(&vdisk::MemStorage::read_only(file.clone())).unwrap();
    h.log_guid = vdisk::fuzz::LOG_GUID;
    for (i, slot) in SLOTS.iter().enumerate() {
        h.sequence += i as u64;
        let b = h.encode();
        file[*slot as usize..*slot as usize + b.len()].copy_from_slice(&b);
    }
    let regions =
        vdisk::vhdx::region::read(&vdisk::MemStorage::read_only(file.clone()), tlen).unwrap();
    let bat = regions.bat.offset as usize;
    let mut bat_sector = file[bat..bat + 4096].to_vec();
    bat_sector[..8].copy_from_slice(&(tlen | 6).to_le_bytes());
    let sector = vec![0xC3u8; 4096];
    let mut e =
        vdisk::fuzz::vhdx_log_entry(1, 0, tlen, &[(bat as u64, &bat_sector), (tlen, &sector)]);
    e[56..64].copy_from_slice(&(tlen + (1 << 20)).to_le_bytes());
    e[4..8].fill(0);
    let crc = vdisk::crc::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    let log = h.log_offset as usize;
    file[log..log + e.len()].copy_from_slice(&e);
    std::fs::write(path, &file).unwrap();
    // The virtual disk after replay: block 0 starts with the sector.
    let mut disk = vec![0u8; 2 << 20];
    disk[..4096].fill(0xC3);
    disk
}

fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

#[test]
fn read_only_open_stays_read_only_beside_a_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (name, _) in make_images(dir) {
        let script = format!(
            r#"
import os, errno
def tryw(f, what):
    try:
        f()
        return what + ':ok'
    except OSError as e:
        return what + ':' + errno.errorcode[e.errno]
out = []
# read-write first, then read-only
rw = os.open('{name}', os.O_RDWR)
ro = os.open('{name}', os.O_RDONLY)
out.append(tryw(lambda: os.pwrite(ro, b'x' * 512, 0), 'ro-pwrite'))
out.append(tryw(lambda: os.write(ro, b'x' * 512), 'ro-write'))
d = os.dup(ro)
out.append(tryw(lambda: os.pwrite(d, b'x' * 512, 0), 'ro-dup-pwrite'))
p = os.open('/proc/self/fd/%d' % ro, os.O_RDONLY)
out.append(tryw(lambda: os.pwrite(p, b'x' * 512, 0), 'ro-proc-pwrite'))
out.append(tryw(lambda: os.pwrite(rw, b'w' * 512, 512), 'rw-pwrite'))
out.append('ro-reads-write:' + str(os.pread(ro, 512, 512) == b'w' * 512))
for f in (rw, ro, d, p): os.close(f)
# read-only first, then read-write
ro = os.open('{name}', os.O_RDONLY)
rw = os.open('{name}', os.O_RDWR)
out.append(tryw(lambda: os.pwrite(ro, b'y' * 512, 0), 'ro2-pwrite'))
out.append(tryw(lambda: os.pwrite(rw, b'z' * 512, 1024), 'rw2-pwrite'))
out.append('ro2-reads-write:' + str(os.pread(ro, 512, 1024) == b'z' * 512))
print(' '.join(out))
"#
        );
        let out = preload::run(dir, "python3", &["-c", &script]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ro-pwrite:EBADF ro-write:EBADF ro-dup-pwrite:EBADF ro-proc-pwrite:EBADF rw-pwrite:ok ro-reads-write:True \
             ro2-pwrite:EBADF rw2-pwrite:ok ro2-reads-write:True",
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn read_only_workload_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut images = make_images(dir);
    let dirty_disk = dirty_vhdx(&dir.join("dirty.vhdx"));
    images.push(("dirty.vhdx".into(), "vhdx"));
    // mtime granularity: make any change visible.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for (name, _) in &images {
        let before = snapshot(&dir.join(name));
        let script = format!(
            "dd if={name} of=/dev/null bs=64k status=none && cat {name} > /dev/null && md5sum {name} && \
             fdisk -l {name} > /dev/null && sfdisk -d {name} > /dev/null 2>&1; blkid -p {name} > /dev/null; \
             python3 -c \"import os; f=os.open('{name}', os.O_RDONLY); os.pread(f, 4096, 0); os.fsync(f); os.close(f)\"; \
             dd if={name} bs=512 count=1 skip=7 status=none | od -An | head -1 > /dev/null"
        );
        let out = preload::sh(dir, &script);
        let after = snapshot(&dir.join(name));
        assert!(
            before.0 == after.0,
            "{name}: the read-only workload changed the file"
        );
        assert_eq!(
            before.1, after.1,
            "{name}: the read-only workload changed the mtime"
        );
        if name == "dirty.vhdx" {
            let md5 = String::from_utf8_lossy(&out.stdout);
            let got = preload::run(dir, "cat", &["dirty.vhdx"]).stdout;
            assert!(
                got == dirty_disk,
                "dirty.vhdx: the log was not replayed in memory ({md5})"
            );
        }
    }
}

#[test]
fn chmod_0444_image_refuses_read_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let images = make_images(dir);
    let script = r#"
import os, sys, errno
for name in sys.argv[1:]:
    try:
        os.open(name, os.O_RDWR)
        r = 'ok'
    except OSError as e:
        r = errno.errorcode[e.errno]
    try:
        fd = os.open(name, os.O_RDONLY)
        r2 = 'ro:%d' % os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        r2 = errno.errorcode[e.errno]
    print(name, r, r2)
"#;
    let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
    for n in &names {
        std::fs::set_permissions(dir.join(n), std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let mut args = NOBODY.to_vec();
    args.extend([SYSTEM_PYTHON, "-c", script]);
    args.extend(&names);
    let with = preload::run(dir, "setpriv", &args);
    let text = String::from_utf8_lossy(&with.stdout);
    for n in &names {
        // Under the library the image reads as a (at least) 4 MiB block device.
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{n} ")))
            .unwrap_or("");
        let size: u64 = line
            .rsplit("ro:")
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert!(
            line.starts_with(&format!("{n} EACCES ro:")) && (4 << 20..5 << 20).contains(&size),
            "{text}{}",
            String::from_utf8_lossy(&with.stderr)
        );
    }
    let before: Vec<_> = names.iter().map(|n| snapshot(&dir.join(n))).collect();
    // A writer that ignores the error: nothing changes.
    let out = preload::command(
        dir,
        "setpriv",
        &[
            &NOBODY[..],
            &[
                "dd",
                "if=/dev/zero",
                "of=p.vhd",
                "bs=512",
                "count=1",
                "conv=notrunc",
            ],
        ]
        .concat(),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (n, b) in names.iter().zip(&before) {
        assert!(snapshot(&dir.join(n)) == *b, "{n} changed");
    }
}

/// `program args` in `dir`, with or without the library, optionally as nobody.
fn run_plain(
    dir: &Path,
    preload_on: bool,
    as_nobody: bool,
    program: &str,
    args: &[&str],
) -> Output {
    let mut c = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    };
    c.current_dir(dir)
        .env_remove("LD_PRELOAD")
        .env("LC_ALL", "C");
    if preload_on {
        c.env("LD_PRELOAD", preload::library());
    }
    c.output().unwrap()
}

#[test]
fn non_image_files_behave_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i * 31 + (i >> 11)) as u8)
        .collect();
    std::fs::write(dir.join("plain.bin"), &big).unwrap();
    std::fs::write(dir.join("notes.txt"), "hello\nworld\n").unwrap();
    // Image-like names that are not images: text, a short file, a file with
    // a VHD cookie in the middle only, a directory, a missing path, an
    // unreadable file.
    std::fs::write(dir.join("text.vhd"), "not an image\n".repeat(100)).unwrap();
    std::fs::write(dir.join("short.vdi"), "abc").unwrap();
    let mut fake = vec![0u8; 8192];
    fake[1000..1008].copy_from_slice(b"conectix");
    fake[0..8].copy_from_slice(b"vhdxfilX");
    std::fs::write(dir.join("fake.vhdx"), &fake).unwrap();
    std::fs::create_dir(dir.join("folder.vhdx")).unwrap();
    std::fs::write(dir.join("secret.vhd"), "secret").unwrap();
    std::fs::write(dir.join("secret.txt"), "secret").unwrap();
    for f in ["secret.vhd", "secret.txt"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let py = r#"
import os, sys, errno
def e(f):
    try:
        r = f()
        return 'ok' if r is None else repr(r)[:60]
    except OSError as x:
        return errno.errorcode.get(x.errno, str(x.errno))
for p in sys.argv[1:]:
    res = [p]
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_DIRECTORY, os.O_RDWR | os.O_CREAT | os.O_EXCL):
        def op(flags=flags):
            fd = os.open(p, flags, 0o644)
            try:
                st = os.fstat(fd)
                data = os.read(fd, 64) if flags & os.O_ACCMODE != os.O_WRONLY and not os.path.isdir(p) else b''
                return (oct(st.st_mode), st.st_size, data[:16], os.lseek(fd, 0, os.SEEK_END) if not os.path.isdir(p) else 0)
            finally:
                os.close(fd)
        res.append(e(op))
    res.append(e(lambda: open(p).read(10)))
    res.append(e(lambda: (oct(os.stat(p).st_mode), os.stat(p).st_size)))
    res.append(e(lambda: os.access(p, os.R_OK | os.W_OK)))
    res.append(e(lambda: os.listdir(p)))
    print(' | '.join(res))
"#;
    let paths = [
        "plain.bin",
        "notes.txt",
        "text.vhd",
        "short.vdi",
        "fake.vhdx",
        "folder.vhdx",
        "missing.vhd",
        "missing.txt",
        "secret.vhd",
        "secret.txt",
    ];
    let mut cases: Vec<(bool, &str, Vec<&str>)> = vec![
        (
            false,
            "cat",
            vec![
                "plain.bin",
                "notes.txt",
                "text.vhd",
                "short.vdi",
                "fake.vhdx",
            ],
        ),
        (false, "cat", vec!["missing.vhd"]),
        (false, "cat", vec!["folder.vhdx"]),
        (true, "cat", vec!["secret.vhd"]),
        (
            false,
            "dd",
            vec![
                "if=fake.vhdx",
                "bs=1000",
                "skip=1",
                "count=3",
                "status=none",
            ],
        ),
        (false, "dd", vec!["if=missing.vdi", "status=none"]),
        (
            false,
            "stat",
            vec![
                "-c",
                "%n %s %F %a %h %Y",
                "plain.bin",
                "text.vhd",
                "short.vdi",
                "fake.vhdx",
                "folder.vhdx",
            ],
        ),
        (false, "stat", vec!["missing.vhdx"]),
        (
            false,
            "ls",
            vec![
                "-l",
                "--time-style=+%s",
                "plain.bin",
                "text.vhd",
                "short.vdi",
                "fake.vhdx",
                "secret.vhd",
                "missing.vhd",
            ],
        ),
        (
            false,
            "md5sum",
            vec!["plain.bin", "text.vhd", "fake.vhdx", "short.vdi"],
        ),
        (
            true,
            "md5sum",
            vec!["secret.vhd", "secret.txt", "folder.vhdx"],
        ),
    ];
    let mut pyargs = vec!["-c", py];
    pyargs.extend(paths);
    cases.push((false, "python3", pyargs.clone()));
    cases.push((true, SYSTEM_PYTHON, pyargs));
    let mut compared = 0;
    for (nobody, program, args) in &cases {
        let a = run_plain(dir, false, *nobody, program, args);
        let b = run_plain(dir, true, *nobody, program, args);
        let show = |o: &Output| {
            format!(
                "{} / {} / {}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert!(
            a.status.code() == b.status.code() && a.stdout == b.stdout && a.stderr == b.stderr,
            "{program} {args:?} (as nobody: {nobody}) differs\nwithout: {}\nwith:    {}",
            show(&a),
            show(&b)
        );
        assert!(
            !String::from_utf8_lossy(&a.stderr).contains("Permission denied")
                || *program != SYSTEM_PYTHON,
            "{program} cannot start as nobody"
        );
        compared += 1;
    }
    // cp of non-images: identical copies.
    for f in ["plain.bin", "text.vhd", "fake.vhdx"] {
        let with = run_plain(dir, true, false, "cp", &[f, &format!("copy-with-{f}")]);
        let without = run_plain(dir, false, false, "cp", &[f, &format!("copy-without-{f}")]);
        assert!(with.status.success() && without.status.success());
        assert_eq!(
            std::fs::read(dir.join(format!("copy-with-{f}"))).unwrap(),
            std::fs::read(dir.join(f)).unwrap()
        );
        compared += 1;
    }
    let a = run_plain(dir, false, false, "cp", &["missing.vhd", "x.vhd"]);
    let b = run_plain(dir, true, false, "cp", &["missing.vhd", "x.vhd"]);
    assert_eq!((a.status.code(), &a.stderr), (b.status.code(), &b.stderr));
    println!(
        "{} program runs identical with and without the library",
        compared + 1
    );
}
