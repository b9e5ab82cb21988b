//! The compatibility matrix: the programs people run on disk images, run for
//! real under LD_PRELOAD on images made by `qemu-img`, one row per scenario and
//! one column per image format. Every result is checked with stock tools on
//! the raw disk that `qemu-img convert -O raw` extracts independently (never
//! only through the library), and `qemu-img check` after writes where the
//! format supports it.
//!
//! One test, `compat_matrix`, runs every cell on a small thread pool, prints
//! the matrix and fails with the list of failing cells. Cells are independent
//! (each has its own temporary directory and image).
//!
//! Environment:
//! - `COMPAT_FILTER=a,b`: run only cells whose `scenario/format` contains one
//!   of the substrings (e.g. `ext4`, `/vdi`, `fdisk/vhd-fixed`);
//! - `COMPAT_JOBS=N`: worker threads (default: available parallelism);
//! - `COMPAT_KEEP=1`: keep the directory of a failing cell (path in the report).
//!
//! Tools: qemu-utils fdisk e2fsprogs ntfs-3g dosfstools mtools parted gdisk
//! xxd fio (README), plus strace (the escape oracle), sleuthkit (mmls, fls), a C
//! compiler (`cc`, for tests/compat/fdcheck.c) and python3. A missing tool
//! fails its cells.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Rng, partx_show, pattern, sfdisk_dump, sfdisk_raw};

/// One column of the matrix: an image format as qemu-img creates it.
struct Format {
    label: &'static str,
    /// qemu-img's name for the format.
    qemu: &'static str,
    ext: &'static str,
    /// `qemu-img -o` options.
    opts: &'static str,
    /// Whether `qemu-img check` supports the format (vpc does not).
    checkable: bool,
}

/// THE list of formats under test. Every row runs on each; a format the
/// build does not support yet FAILS its cells (it is never skipped). Remove a
/// column here only to see the rest of the matrix green, never to hide it.
const FORMATS: &[Format] = &[
    Format {
        label: "vhd-dynamic",
        qemu: "vpc",
        ext: "vhd",
        opts: "subformat=dynamic",
        checkable: false,
    },
    Format {
        label: "vhd-fixed",
        qemu: "vpc",
        ext: "vhd",
        opts: "subformat=fixed",
        checkable: false,
    },
    Format {
        label: "vhdx",
        qemu: "vhdx",
        ext: "vhdx",
        opts: "subformat=dynamic",
        checkable: true,
    },
    Format {
        label: "vhdx-fixed",
        qemu: "vhdx",
        ext: "vhdx",
        opts: "subformat=fixed",
        checkable: true,
    },
    Format {
        label: "vdi",
        qemu: "vdi",
        ext: "vdi",
        opts: "",
        checkable: true,
    },
    Format {
        label: "vdi-static",
        qemu: "vdi",
        ext: "vdi",
        opts: "static=on",
        checkable: true,
    },
    Format {
        label: "vmdk",
        qemu: "vmdk",
        ext: "vmdk",
        opts: "subformat=monolithicSparse",
        checkable: true,
    },
    Format {
        label: "vmdk-flat",
        qemu: "vmdk",
        ext: "vmdk",
        opts: "subformat=monolithicFlat",
        checkable: true,
    },
    Format {
        label: "qcow2",
        qemu: "qcow2",
        ext: "qcow2",
        opts: "",
        checkable: true,
    },
];

/// Virtual size of every image (qemu rounds VHDs up to a CHS geometry: the
/// reference is always qemu-img's raw conversion, never this number).
const SIZE: usize = 32 << 20;

/// Per-command time limit: a program that hangs under the library fails its
/// cell instead of the whole run.
const TIMEOUT: Duration = Duration::from_secs(90);

type Scenario = fn(&Cell);

/// The rows, in display order.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("stat+blockdev", scenario_stat_blockdev),
    ("md5sum/sha256sum", scenario_hash),
    ("od/hexdump/xxd/tail", scenario_dump),
    ("cat/cp/cmp read", scenario_cat_cp_cmp),
    ("tar (as-file)", scenario_tar_as_file),
    ("dd read", scenario_dd_read),
    ("dd write", scenario_dd_write),
    ("cp/cat > write", scenario_cp_write),
    ("python3", scenario_python),
    ("fio libaio/posixaio", scenario_fio_aio),
    ("shared offset", scenario_shared_offset),
    ("exec 3<> fd", scenario_exec_fd),
    ("fd lifecycle (C)", scenario_fd_lifecycle),
    ("open: lowest fd", scenario_open_lowest),
    ("BLKROGET", scenario_blkroget),
    ("blockdev --report", scenario_blockdev_report),
    ("python3 mmap", scenario_python_mmap),
    ("fdisk", scenario_fdisk),
    ("sfdisk", scenario_sfdisk),
    ("sgdisk", scenario_sgdisk),
    ("parted", scenario_parted),
    ("ext4 whole disk", scenario_ext4_disk),
    ("ext4 partition", scenario_ext4_partition),
    ("ntfs", scenario_ntfs),
    ("ntfs-3g mount (as-file)", scenario_ntfs3g),
    ("vfat+mtools", scenario_vfat),
    ("mmls/fls", scenario_sleuthkit),
    ("strace readers", scenario_strace_readers),
    ("strace writers", scenario_strace_writers),
];

// ---------------------------------------------------------------------------
// Running programs

struct Out {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    what: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn must(self) -> Out {
        assert!(
            self.status.success(),
            "{} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.status,
            tail(&self.text()),
            tail(&self.err())
        );
        self
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(40);
    lines[from..].join("\n")
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs `cmd` with `input` on stdin (or /dev/null), stdout and stderr to
/// files (no pipe deadlocks), in its own process group, killed on timeout.
fn exec(mut cmd: Command, input: Option<&[u8]>, dir: &Path) -> Out {
    use std::os::unix::process::CommandExt;
    let what = format!("{:?}", cmd).replace('"', "");
    let id = SEQ.fetch_add(1, Ordering::Relaxed);
    let (o, e, i) = (
        dir.join(format!(".o{id}")),
        dir.join(format!(".e{id}")),
        dir.join(format!(".i{id}")),
    );
    cmd.stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap());
    match input {
        Some(data) => {
            fs::write(&i, data).unwrap();
            cmd.stdin(fs::File::open(&i).unwrap());
        }
        None => {
            cmd.stdin(Stdio::null());
        }
    }
    cmd.process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what} (install it: see tests/compat.rs): {e}"));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            child.wait().ok();
            panic!(
                "{what}: still running after {TIMEOUT:?}, killed; stderr:\n{}",
                tail(&String::from_utf8_lossy(&fs::read(&e).unwrap_or_default()))
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = Out {
        status,
        stdout: fs::read(&o).unwrap(),
        stderr: fs::read(&e).unwrap(),
        what,
    };
    for f in [o, e, i] {
        fs::remove_file(f).ok();
    }
    out
}

/// One cell: a scenario on one format, in its own directory.
struct Cell {
    fmt: &'static Format,
    dir: PathBuf,
}

impl Cell {
    /// The image's file name, e.g. `disk.vhd`.
    fn name(&self) -> String {
        format!("disk.{}", self.fmt.ext)
    }
    fn path(&self) -> PathBuf {
        self.dir.join(self.name())
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn base(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args).current_dir(&self.dir);
        c.env_remove("LD_PRELOAD");
        c.env_remove("LIBVHD_IO_DEBUG")
            .env_remove("LIBVHD_IO_DUMP")
            .env_remove("LIBVHD_IO_PROBE_ALL");
        // mtools refuses odd geometries (CHS-rounded VHDs) otherwise; the
        // same for the library run and the raw check.
        c.env("MTOOLS_SKIP_CHECK", "1")
            .env("LC_ALL", "C")
            .env("PAGER", "cat");
        c
    }
    /// A command under the library.
    fn lib_cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = self.base(program, args);
        c.env("LD_PRELOAD", preload::library());
        c
    }
    /// Under the library; may fail. The library must stay silent on these
    /// fresh, undamaged images: any `libvhdio[pid]:` warning fails the cell.
    fn lib_try(&self, program: &str, args: &[&str], input: Option<&[u8]>) -> Out {
        let out = exec(self.lib_cmd(program, args), input, &self.dir);
        assert!(
            !out.err().contains("libvhdio["),
            "{}: the library warned:\n{}",
            out.what,
            tail(&out.err())
        );
        out
    }
    /// Under the library; must succeed.
    fn lib(&self, program: &str, args: &[&str]) -> Out {
        self.lib_try(program, args, None).must()
    }
    fn lib_in(&self, program: &str, args: &[&str], input: &[u8]) -> Out {
        self.lib_try(program, args, Some(input)).must()
    }
    /// `sh -c script` with the library in the shell and its children.
    fn lib_sh(&self, script: &str) -> Out {
        self.lib("sh", &["-c", script])
    }
    /// Without the library (stock tools on raw files); may fail.
    fn plain_try(&self, program: &str, args: &[&str]) -> Out {
        exec(self.base(program, args), None, &self.dir)
    }
    fn plain(&self, program: &str, args: &[&str]) -> Out {
        self.plain_try(program, args).must()
    }
    /// `sh -c script` with no library in the shell (the script may set
    /// LD_PRELOAD=$LIB for single commands).
    fn plain_sh(&self, script: &str) -> Out {
        let mut c = self.base("sh", &["-c", script]);
        c.env("LIB", preload::library());
        exec(c, None, &self.dir).must()
    }

    /// An empty image of SIZE bytes.
    fn create_empty(&self) {
        let mut args = vec!["create", "-q", "-f", self.fmt.qemu];
        if !self.fmt.opts.is_empty() {
            args.extend(["-o", self.fmt.opts]);
        }
        let name = self.name();
        let size = SIZE.to_string();
        args.extend([name.as_str(), size.as_str()]);
        self.plain("qemu-img", &args);
    }
    /// An image holding `data` (qemu-img convert from a raw file).
    fn create_from(&self, data: &[u8]) {
        let src = self.file("source.raw");
        fs::write(&src, data).unwrap();
        self.create_from_raw(&src);
        fs::remove_file(src).ok();
    }
    fn create_from_raw(&self, src: &Path) {
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", self.fmt.qemu];
        if !self.fmt.opts.is_empty() {
            args.extend(["-o", self.fmt.opts]);
        }
        let (s, name) = (src.to_str().unwrap().to_string(), self.name());
        args.extend([s.as_str(), name.as_str()]);
        self.plain("qemu-img", &args);
    }
    /// The virtual disk extracted by qemu-img (no library): `disk.raw`.
    fn raw(&self) -> PathBuf {
        let raw = self.file("disk.raw");
        fs::remove_file(&raw).ok();
        self.plain(
            "qemu-img",
            &[
                "convert",
                "-f",
                self.fmt.qemu,
                "-O",
                "raw",
                &self.name(),
                "disk.raw",
            ],
        );
        raw
    }
    fn raw_bytes(&self) -> Vec<u8> {
        let raw = self.raw();
        let data = fs::read(&raw).unwrap();
        fs::remove_file(raw).ok();
        data
    }
    /// `qemu-img check` where the format has one: metadata still consistent.
    fn check(&self) {
        if self.fmt.checkable {
            let out = self.plain_try("qemu-img", &["check", "-f", self.fmt.qemu, &self.name()]);
            assert!(
                out.status.success(),
                "qemu-img check after writes: {}\n{}{}",
                out.status,
                out.text(),
                out.err()
            );
        }
    }
    /// `tool` (md5sum, sha256sum) of `data`, by the stock tool on a file.
    fn digest(&self, tool: &str, data: &[u8]) -> String {
        let f = self.file(&format!("digest.{}", SEQ.fetch_add(1, Ordering::Relaxed)));
        fs::write(&f, data).unwrap();
        let out = self.plain(tool, &[f.to_str().unwrap()]).text();
        fs::remove_file(f).ok();
        first_word(&out)
    }
    /// Writes a helper file in the cell directory.
    fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.file(name);
        fs::write(&p, data).unwrap();
        p
    }
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Asserts equality of two byte strings with a useful message (first
/// difference, lengths) instead of dumping megabytes.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let show = |b: &[u8]| hex(&b[first.min(b.len())..(first + 16).min(b.len())]);
        panic!(
            "{what}: differs (got {} bytes, want {}); first difference at byte {first}: got {} want {}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// Deterministic disk contents: `pattern` (random runs, zeros, holes), with
/// the first and last MiB and a few spots forced to random bytes so that
/// every probe reads something distinctive.
fn disk_data(seed: u64) -> Vec<u8> {
    let (mut data, _) = pattern(seed, SIZE);
    let mut rng = Rng(seed ^ 0xD15C);
    let mut fill = |r: std::ops::Range<usize>, data: &mut Vec<u8>| {
        for b in &mut data[r] {
            *b = rng.next() as u8 | 1;
        }
    };
    fill(0..1 << 20, &mut data);
    fill(SIZE - (1 << 20)..SIZE, &mut data);
    fill(5_000_000..5_100_000, &mut data);
    fill(17_000_000..17_100_000, &mut data);
    data
}

/// A file to store in file systems: binary, several blocks long.
fn payload() -> Vec<u8> {
    let mut rng = Rng(42);
    (0..150_000).map(|_| rng.next() as u8).collect()
}

/// The reference disk of a cell made from `disk_data(seed)`.
fn with_data(cell: &Cell, seed: u64) -> Vec<u8> {
    let data = disk_data(seed);
    cell.create_from(&data);
    let reference = cell.raw_bytes();
    assert!(
        reference.len() >= data.len(),
        "qemu-img's raw is shorter than the source"
    );
    same(
        &reference[..data.len()],
        &data,
        "qemu-img convert round trip (test set-up)",
    );
    reference
}

/// Output with the image name and the raw name replaced by `DISK`, to
/// compare a program's output on the image with the same on the raw file.
fn norm(s: &str, name: &str) -> String {
    let s = s.replace(name, "DISK");
    // Partitions of a name ending in a digit are listed as `<name>p1`.
    if name.ends_with(|c: char| c.is_ascii_digit()) {
        s.replace("DISKp", "DISK")
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// Scenarios: readers

fn scenario_stat_blockdev(c: &Cell) {
    let reference = with_data(c, 1);
    let size = reference.len() as u64;
    let n = c.name();
    assert_eq!(
        c.lib("stat", &["-c", "%F|%s", &n]).text().trim(),
        "block special file|0",
        "stat -c '%F|%s'"
    );
    assert_eq!(
        c.lib("stat", &["-L", "-c", "%F", &n]).text().trim(),
        "block special file",
        "stat -L"
    );
    assert_eq!(
        c.lib("blockdev", &["--getsize64", &n]).text().trim(),
        size.to_string(),
        "blockdev --getsize64"
    );
    assert_eq!(
        c.lib("blockdev", &["--getsize", &n]).text().trim(),
        (size / 512).to_string(),
        "blockdev --getsize (512-byte sectors)"
    );
    assert_eq!(
        c.lib("blockdev", &["--getsz", &n]).text().trim(),
        (size / 512).to_string(),
        "blockdev --getsz"
    );
    assert_eq!(
        c.lib("blockdev", &["--getss", &n]).text().trim(),
        "512",
        "blockdev --getss"
    );
    let ls = c.lib("ls", &["-l", &n]).text();
    assert!(
        ls.starts_with('b'),
        "ls -l does not show a block device: {ls}"
    );
    assert_eq!(
        c.lib_sh(&format!("test -b {n} && echo blk")).text().trim(),
        "blk",
        "sh test -b"
    );
    // The container itself is untouched by all that.
    same(&c.raw_bytes(), &reference, "disk after stat/blockdev");
}

fn scenario_blkroget(c: &Cell) {
    c.create_empty();
    let n = c.name();
    // BLKROGET is the device's read-only flag, not the open mode: the
    // container is writable, so 0 even though blockdev opens O_RDONLY (as
    // `blockdev --getro /dev/sda` says 0 for a writable disk).
    assert_eq!(
        c.lib("blockdev", &["--getro", &n]).text().trim(),
        "0",
        "blockdev --getro (BLKROGET on an O_RDONLY fd of a writable image)"
    );
    // A container the user cannot write is a read-only device.
    fs::set_permissions(
        c.path(),
        <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o444),
    )
    .unwrap();
    let ro = c.lib_try("sh", &["-c", &format!("blockdev --getro {n}; id -u")], None);
    if ro.text().lines().nth(1) != Some("0") {
        // (root ignores file modes: only checked for other users)
        assert_eq!(
            ro.text().lines().next(),
            Some("1"),
            "blockdev --getro on a read-only container"
        );
    }
}

fn scenario_blockdev_report(c: &Cell) {
    let reference = with_data(c, 21);
    let n = c.name();
    let rows: Vec<String> = c
        .lib("blockdev", &["--report", &n])
        .text()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        rows,
        [
            "RO RA SSZ BSZ StartSec Size Device".to_string(),
            format!("rw 256 512 4096 0 {} {n}", reference.len()),
        ],
        "blockdev --report"
    );
    let args = [
        "--getra",
        "--getmaxsect",
        "--getioopt",
        "--getalignoff",
        "--setra",
        "1024",
        "--getra",
        "--getiomin",
        "--getpbsz",
        &n,
    ];
    let out = c.lib("blockdev", &args).text();
    let v: Vec<&str> = out.lines().collect();
    assert_eq!(
        v[..5],
        ["256", "2048", "0", "0", "1024"],
        "blockdev {args:?}"
    );
    assert_eq!(v[5], v[6], "BLKIOMIN is the physical sector size");
    same(&c.raw_bytes(), &reference, "disk after blockdev");
}

const PY_MMAP: &str = r#"
import hashlib, mmap, os, sys
p, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(p, os.O_RDONLY)
size = os.lseek(fd, 0, os.SEEK_END)
with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
    print(size, hashlib.sha256(m).hexdigest())
with mmap.mmap(fd, n, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=off) as m:
    print(m[:32].hex())
    m[:8] = b'PRIVATE!'
os.close(fd)
"#;

fn scenario_python_mmap(c: &Cell) {
    let reference = with_data(c, 22);
    let (off, n) = (17_000_000usize & !4095, 100_000usize);
    let out = c
        .lib(
            "/usr/bin/python3",
            &["-c", PY_MMAP, &c.name(), &off.to_string(), &n.to_string()],
        )
        .text();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{} {}", reference.len(), common::sha256_hex(&reference)).as_str(),
            hex(&reference[off..off + 32]).as_str(),
        ],
        "python3 mmap.mmap (read-only whole disk; MAP_PRIVATE at an offset)"
    );
    same(&c.raw_bytes(), &reference, "disk after a MAP_PRIVATE write");
}

fn scenario_hash(c: &Cell) {
    let reference = with_data(c, 2);
    let n = c.name();
    c.put("ref.raw", &reference);
    let md5 = first_word(&c.plain("md5sum", &["ref.raw"]).text());
    let sha = first_word(&c.plain("sha256sum", &["ref.raw"]).text());
    assert_eq!(
        first_word(&c.lib("md5sum", &[&n]).text()),
        md5,
        "md5sum PATH"
    );
    assert_eq!(
        first_word(&c.lib("sha256sum", &[&n]).text()),
        sha,
        "sha256sum PATH"
    );
    assert_eq!(
        first_word(&c.lib_sh(&format!("md5sum < {n}")).text()),
        md5,
        "md5sum < image (shell with the library)"
    );
    assert_eq!(
        first_word(&c.lib_sh(&format!("md5sum /dev/stdin < {n}")).text()),
        md5,
        "md5sum /dev/stdin < image (shell with the library)"
    );
    assert_eq!(
        first_word(&c.lib_sh(&format!("cat {n} | sha256sum")).text()),
        sha,
        "cat image | sha256sum"
    );
    assert_eq!(
        first_word(&c.plain_sh(&format!("LD_PRELOAD=$LIB md5sum < {n}")).text()),
        md5,
        "LD_PRELOAD=lib md5sum < image (shell WITHOUT the library: fd 0 adopted)"
    );
    assert_eq!(
        first_word(
            &c.plain_sh(&format!("LD_PRELOAD=$LIB sha256sum /dev/stdin < {n}"))
                .text()
        ),
        sha,
        "LD_PRELOAD=lib sha256sum /dev/stdin < image (shell WITHOUT the library)"
    );
}

fn scenario_dump(c: &Cell) {
    let reference = with_data(c, 3);
    c.put("ref.raw", &reference);
    let n = c.name();
    for (off, len) in [
        (0u64, 64u64),
        (5_000_123, 200),
        (17_000_001, 33),
        (reference.len() as u64 - 100, 100),
    ] {
        let (o, l) = (off.to_string(), len.to_string());
        for (prog, args) in [
            ("od", vec!["-A", "d", "-t", "x1z", "-j", &o, "-N", &l]),
            ("hexdump", vec!["-C", "-s", &o, "-n", &l]),
            ("xxd", vec!["-s", &o, "-l", &l]),
        ] {
            let mut a = args.clone();
            a.push(&n);
            let got = c.lib(prog, &a).text();
            let mut a = args.clone();
            a.push("ref.raw");
            let want = c.plain(prog, &a).text();
            assert_eq!(
                got, want,
                "{prog} {args:?} on the image vs on qemu-img's raw"
            );
            assert!(!got.trim().is_empty(), "{prog} printed nothing");
        }
    }
    // Seeks relative to the end (stdio fseek SEEK_END on a block device).
    let got = c.lib("xxd", &["-s", "-512", "-l", "64", &n]).text();
    let want = c
        .plain("xxd", &["-s", "-512", "-l", "64", "ref.raw"])
        .text();
    assert_eq!(got, want, "xxd -s -512 (from the end)");
    let got = c.lib("tail", &["-c", "4096", &n]).stdout;
    same(&got, &reference[reference.len() - 4096..], "tail -c 4096");
    let got = c.lib("head", &["-c", "1000000", &n]).stdout;
    same(&got, &reference[..1_000_000], "head -c 1000000");
}

fn scenario_cat_cp_cmp(c: &Cell) {
    let reference = with_data(c, 4);
    c.put("ref.raw", &reference);
    let n = c.name();
    same(&c.lib("cat", &[&n]).stdout, &reference, "cat image");
    same(
        &c.lib_sh(&format!("cat < {n}")).stdout,
        &reference,
        "sh -c 'cat < image'",
    );
    c.lib("cp", &[&n, "out.raw"]);
    same(
        &fs::read(c.file("out.raw")).unwrap(),
        &reference,
        "cp image out.raw",
    );
    // cp into a directory (O_PATH|O_DIRECTORY probes on the image pass through).
    fs::create_dir(c.file("sub")).unwrap();
    c.lib("cp", &[&n, "sub/"]);
    same(
        &fs::read(c.file(&format!("sub/{n}"))).unwrap(),
        &reference,
        "cp image sub/",
    );
    c.lib("cmp", &[&n, "ref.raw"]);
    let mut alt = reference.clone();
    alt[7_777_777] ^= 0x55;
    c.put("alt.raw", &alt);
    let got = c.lib_try("cmp", &[&n, "alt.raw"], None);
    let want = c.plain_try("cmp", &["ref.raw", "alt.raw"]);
    assert_eq!(
        got.status.code(),
        Some(1),
        "cmp image alt.raw should find a difference: {}",
        got.err()
    );
    assert_eq!(
        norm(&got.text(), &n),
        norm(&want.text(), "ref.raw"),
        "cmp output"
    );
    // The container is unchanged by reading.
    same(&c.raw_bytes(), &reference, "disk after reads");
}

/// tar of a folder holding the image in regular-file mode (LIBVHD_IO_AS_FILE):
/// the member is a regular file holding the virtual disk.
fn scenario_tar_as_file(c: &Cell) {
    let reference = with_data(c, 15);
    fs::create_dir(c.file("d")).unwrap();
    fs::rename(c.path(), c.file("d").join(c.name())).unwrap();
    // A VMDK descriptor's extent files (`disk-flat.vmdk`) go with it.
    let name = c.name();
    let stem = name
        .rsplit_once('.')
        .map_or(name.as_str(), |(s, _)| s)
        .to_string();
    for e in fs::read_dir(&c.dir).unwrap().filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("{stem}-")) && name.ends_with(".vmdk") {
            fs::rename(e.path(), c.file("d").join(&name)).unwrap();
        }
    }
    let mut tar = c.lib_cmd("tar", &["-cf", "a.tar", "d"]);
    tar.env("LIBVHD_IO_AS_FILE", "1");
    let out = exec(tar, None, &c.dir).must();
    assert!(
        !out.err().contains("libvhdio["),
        "the library warned: {}",
        out.err()
    );
    let member = format!("d/{}", c.name());
    let list = c.plain("tar", &["-tvf", "a.tar", &member]).text();
    assert!(
        list.starts_with('-'),
        "the member is not a regular file: {list}"
    );
    let bytes = c.plain("tar", &["-xOf", "a.tar", &member]).stdout;
    same(&bytes, &reference, "tar member vs qemu-img's raw");
}

fn scenario_dd_read(c: &Cell) {
    let reference = with_data(c, 5);
    let n = c.name();
    let if_ = format!("if={n}");
    c.lib("dd", &[&if_, "of=o1", "bs=1M", "status=none"]);
    same(&fs::read(c.file("o1")).unwrap(), &reference, "dd bs=1M");
    c.lib(
        "dd",
        &[
            &if_,
            "of=o2",
            "bs=1",
            "skip=5000123",
            "count=3000",
            "status=none",
        ],
    );
    same(
        &fs::read(c.file("o2")).unwrap(),
        &reference[5_000_123..5_003_123],
        "dd bs=1 skip=5000123 count=3000",
    );
    c.lib(
        "dd",
        &[
            &if_,
            "of=o3",
            "bs=4096",
            "skip=100",
            "count=50",
            "iflag=direct",
            "status=none",
        ],
    );
    same(
        &fs::read(c.file("o3")).unwrap(),
        &reference[409_600..409_600 + 50 * 4096],
        "dd iflag=direct bs=4096 skip=100 count=50",
    );
    let k = reference.len() / 512 - 777;
    c.lib(
        "dd",
        &[&if_, "of=o4", "bs=512", &format!("skip={k}"), "status=none"],
    );
    same(
        &fs::read(c.file("o4")).unwrap(),
        &reference[k * 512..],
        "dd bs=512 skip to the end",
    );
    c.lib("dd", &[&if_, "of=o5", "bs=3333", "status=none"]);
    same(&fs::read(c.file("o5")).unwrap(), &reference, "dd bs=3333");
    let out = c
        .lib_sh(&format!(
            "dd {if_} bs=64k skip=10 count=3 status=none | od -An -v -tx1 | tr -d ' \\n'"
        ))
        .text();
    assert_eq!(
        out,
        hex(&reference[655_360..655_360 + 3 * 65536]),
        "dd skip=10 | od"
    );
}

fn scenario_dd_write(c: &Cell) {
    let mut expect = with_data(c, 6);
    let size = expect.len();
    let n = c.name();
    let of = format!("of={n}");
    let mut rng = Rng(66);
    let patch: Vec<u8> = (0..(5 << 20) / 2).map(|_| rng.next() as u8).collect();
    c.put("patch.raw", &patch);
    // Whole MiBs, crossing blocks of every format.
    c.lib(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=1M",
            "seek=3",
            "conv=notrunc",
            "status=none",
        ],
    );
    expect[3 << 20..(3 << 20) + patch.len()].copy_from_slice(&patch);
    // Byte-granular, unaligned.
    c.lib(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=1",
            "seek=9000001",
            "count=3000",
            "conv=notrunc",
            "status=none",
        ],
    );
    expect[9_000_001..9_003_001].copy_from_slice(&patch[..3000]);
    // No conv=notrunc: a block device is not truncated (ftruncate is ignored).
    c.lib(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=4k",
            "seek=4000",
            "count=10",
            "status=none",
        ],
    );
    expect[4000 * 4096..4010 * 4096].copy_from_slice(&patch[..40960]);
    // O_DIRECT writes.
    c.lib(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=64k",
            "seek=300",
            "count=4",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
    );
    expect[300 * 65536..304 * 65536].copy_from_slice(&patch[..4 * 65536]);
    // Into a hole near the end (a new block in dynamic formats).
    c.lib(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=512",
            &format!("seek={}", size / 512 - 3),
            "count=3",
            "conv=notrunc",
            "status=none",
        ],
    );
    expect[size - 1536..].copy_from_slice(&patch[..1536]);
    same(&c.raw_bytes(), &expect, "qemu-img's raw after dd writes");
    c.check();
    // Past the end: ENOSPC after the part that fits.
    let mib = size / (1 << 20);
    let out = c.lib_try(
        "dd",
        &[
            "if=patch.raw",
            &of,
            "bs=1M",
            &format!("seek={}", mib - 1),
            "count=2",
            "conv=notrunc",
        ],
        None,
    );
    assert!(!out.status.success(), "dd past the end succeeded");
    assert!(
        out.err().contains("No space left"),
        "dd past the end: want ENOSPC, got: {}",
        out.err()
    );
    let fits = size - (mib - 1) * (1 << 20);
    expect[(mib - 1) << 20..].copy_from_slice(&patch[..fits]);
    same(
        &c.raw_bytes(),
        &expect,
        "qemu-img's raw after dd past the end",
    );
    c.check();
}

fn scenario_cp_write(c: &Cell) {
    let old = with_data(c, 7);
    let size = old.len();
    let n = c.name();
    // A sparse source: holes where the old disk has data must become zeros.
    let new = {
        let (mut d, _) = pattern(77, size);
        d[..4096].fill(0xA5);
        d
    };
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(c.file("new.raw")).unwrap();
        f.set_len(size as u64).unwrap();
        for (i, chunk) in new.chunks(65536).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                f.seek(SeekFrom::Start((i * 65536) as u64)).unwrap();
                f.write_all(chunk).unwrap();
            }
        }
    }
    c.lib("cp", &["new.raw", &n]);
    same(
        &c.raw_bytes(),
        &new,
        "qemu-img's raw after cp new.raw image (sparse source)",
    );
    c.check();
    // Shell redirection: O_TRUNC on an image is ignored, the disk is written.
    c.put("old.raw", &old);
    c.lib_sh(&format!("cat old.raw > {n}"));
    same(
        &c.raw_bytes(),
        &old,
        "qemu-img's raw after cat old.raw > image",
    );
    c.check();
    assert!(
        fs::metadata(c.path()).unwrap().len() > 0,
        "the container was truncated"
    );
}

const PY: &str = r#"
import os, sys, hashlib, stat
p, off = sys.argv[1], int(sys.argv[2])
d = open(p, 'rb').read()
print(len(d), hashlib.sha256(d).hexdigest())
fd = os.open(p, os.O_RDONLY)
print(os.pread(fd, 32, off).hex())
print(os.lseek(fd, 0, os.SEEK_END))
os.close(fd)
with open(p, 'rb') as f:
    f.seek(off)
    print(f.read(32).hex())
with open(p, 'r+b') as f:
    f.seek(off)
    f.write(b'PYTHON-WAS-HERE!')
fd = os.open(p, os.O_RDWR)
os.pwrite(fd, b'PWRITE', off + 100)
os.fsync(fd)
os.close(fd)
print(stat.S_ISBLK(os.stat(p).st_mode))
"#;

fn scenario_python(c: &Cell) {
    let mut reference = with_data(c, 8);
    let off = 5_000_017usize;
    let out = c
        .lib("/usr/bin/python3", &["-c", PY, &c.name(), &off.to_string()])
        .text();
    let lines: Vec<&str> = out.lines().collect();
    let want = [
        format!("{} {}", reference.len(), common::sha256_hex(&reference)),
        hex(&reference[off..off + 32]),
        reference.len().to_string(),
        hex(&reference[off..off + 32]),
        "True".to_string(),
    ];
    assert_eq!(
        lines,
        want.iter().map(String::as_str).collect::<Vec<_>>(),
        "python3 open().read(), os.pread, lseek, seek+read, S_ISBLK"
    );
    reference[off..off + 16].copy_from_slice(b"PYTHON-WAS-HERE!");
    reference[off + 100..off + 106].copy_from_slice(b"PWRITE");
    same(
        &c.raw_bytes(),
        &reference,
        "qemu-img's raw after python3 writes",
    );
    c.check();
}

/// fio's asynchronous engines, each on its own 4 MiB of the disk: fio
/// verifies through the library, then again without it on qemu-img's raw
/// conversion; the rest of the disk is unchanged.
fn scenario_fio_aio(c: &Cell) {
    let mut expect = with_data(c, 12);
    let n = c.name();
    for (engine, mib, direct) in [("libaio", 4usize, "1"), ("posixaio", 12, "0")] {
        let job = |file: &str| {
            vec![
                format!("--filename={file}"),
                format!("--ioengine={engine}"),
                format!("--direct={direct}"),
                format!("--offset={mib}M"),
                "--name=aio".to_string(),
                "--rw=randwrite".to_string(),
                "--bs=16k".to_string(),
                "--size=4M".to_string(),
                "--iodepth=8".to_string(),
                "--verify=crc32c".to_string(),
                "--verify_fatal=1".to_string(),
                "--thread".to_string(),
                "--minimal".to_string(),
            ]
        };
        let args = job(&n);
        c.lib("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let raw = c.raw();
        let mut args = job("disk.raw");
        args[1] = "--ioengine=psync".to_string();
        args[2] = "--direct=0".to_string();
        args.push("--verify_only".to_string());
        c.plain("fio", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let got = fs::read(raw).unwrap();
        let window = mib << 20..(mib + 4) << 20;
        expect[window.clone()].copy_from_slice(&got[window]);
    }
    same(
        &c.raw_bytes(),
        &expect,
        "qemu-img's raw after fio (outside fio's windows)",
    );
    c.check();
}

fn scenario_shared_offset(c: &Cell) {
    let reference = with_data(c, 9);
    let n = c.name();
    let md5_rest = c.digest("md5sum", &reference[512..]);
    let out = c.lib_sh(&format!("(head -c 512; md5sum) < {n}")).stdout;
    let mut want = reference[..512].to_vec();
    want.extend_from_slice(format!("{md5_rest}  -\n").as_bytes());
    same(
        &out,
        &want,
        "(head -c 512; md5sum) < image (offset shared across processes)",
    );
    let out = c
        .lib_sh(&format!(
            "(dd bs=1000 count=1 status=none of=/dev/null; head -c 100) < {n}"
        ))
        .stdout;
    same(
        &out,
        &reference[1000..1100],
        "(dd bs=1000 count=1; head -c 100) < image",
    );
    // A chain of shells, each exec'ing the next, with the image on fd 0.
    let out = c
        .lib_sh(&format!(
            "exec sh -c 'exec sh -c \"head -c 100 >/dev/null; exec head -c 50\"' < {n}"
        ))
        .stdout;
    same(&out, &reference[100..150], "exec chain sharing fd 0");
}

fn scenario_exec_fd(c: &Cell) {
    let mut reference = with_data(c, 10);
    let n = c.name();
    c.lib_sh(&format!(
        "exec 3<>{n}; head -c 4096 <&3 > a.bin; head -c 4096 <&3 > b.bin; /usr/bin/printf HELLO-FD3 >&3; \
         dd bs=512 count=1 status=none <&3 > c.bin; dd if=/dev/fd/3 bs=4096 count=1 status=none > d.bin; exec 3>&-"
    ));
    same(
        &fs::read(c.file("a.bin")).unwrap(),
        &reference[..4096],
        "head -c 4096 <&3 (first)",
    );
    same(
        &fs::read(c.file("b.bin")).unwrap(),
        &reference[4096..8192],
        "head -c 4096 <&3 (second: offset shared)",
    );
    same(
        &fs::read(c.file("c.bin")).unwrap(),
        &reference[8201..8713],
        "dd <&3 after the write",
    );
    reference[8192..8201].copy_from_slice(b"HELLO-FD3");
    let d = fs::read(c.file("d.bin")).unwrap();
    same(
        &d,
        &reference[..4096],
        "dd if=/dev/fd/3 (a new open of the same disk starts at 0)",
    );
    same(
        &c.raw_bytes(),
        &reference,
        "qemu-img's raw after printf >&3",
    );
    c.check();
}

/// tests/compat/fdcheck.c, compiled once per run with `cc`.
fn fdcheck() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/fdcheck.c");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("compat-fdcheck-{}", std::process::id()));
        let out = Command::new("cc")
            .args(["-O1", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src)
            .env_remove("LD_PRELOAD")
            .output()
            .unwrap_or_else(|e| panic!("cannot run cc (install gcc): {e}"));
        assert!(
            out.status.success(),
            "cc fdcheck.c: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

/// Runs fdcheck on the cell's image; returns its `key=value` lines.
fn run_fdcheck(c: &Cell, off: usize, woff: usize) -> (String, Vec<(String, String)>) {
    c.put("plain.txt", PLAIN);
    let out = c
        .lib(
            fdcheck().to_str().unwrap(),
            &[&c.name(), "plain.txt", &off.to_string(), &woff.to_string()],
        )
        .text();
    let got = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (out, got)
}

const PLAIN: &[u8] = b"PLAIN-FILE-BYTES-0123456789";

/// open() returns the lowest free fd number (POSIX), for an image as for
/// any file: code that does `close(0); open(image)` relies on it.
fn scenario_open_lowest(c: &Cell) {
    with_data(c, 14);
    let (_, got) = run_fdcheck(c, 0, 0);
    let g = got
        .iter()
        .find(|(k, _)| k == "open_lowest")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        g,
        Some("1"),
        "open(image) did not return the lowest free fd (fdcheck.c: open /dev/null, close it, open the image: want the same number)"
    );
}

fn scenario_fd_lifecycle(c: &Cell) {
    let mut reference = with_data(c, 11);
    let plain = PLAIN;
    let (off, woff) = (17_000_003usize, 12_345_678usize);
    let (out, got) = run_fdcheck(c, off, woff);
    let r = |a: usize| hex(&reference[a..a + 16]);
    let p = hex(&plain[..16]);
    let want: Vec<(&str, String)> = vec![
        ("fdopen_img", r(0)),
        ("fdopen_reused", "1".into()),
        ("fdopen_reuse", p.clone()),
        ("fopen_img", r(0)),
        ("fopen_reused", "1".into()),
        ("fopen_reuse", p.clone()),
        ("closefrom_img", r(0)),
        ("closefrom_reused", "1".into()),
        ("closefrom_reuse", p.clone()),
        ("close_range_img", r(0)),
        ("close_range_reused", "1".into()),
        ("close_range_reuse", p.clone()),
        ("raw_close_img", r(0)),
        ("raw_close_reused", "1".into()),
        ("raw_close_reuse_pread", p.clone()),
        ("raw_close_reuse", p.clone()),
        ("raw_close_fstat_reg", "1".into()),
        ("raw_dup3_write", "16".into()),
        ("raw_dup3_pipe", hex(b"PIPE-WRITE-BYTES")),
        ("survive_closefrom", r(off)),
        ("survive_close_range", r(off)),
        ("survive_close_loop", r(off)),
        ("survive_dup2_over", r(off)),
        ("survive_dup2_closed", r(off)),
        ("survive_write", "16".into()),
        ("survive_fsync", "0".into()),
        ("dup_a", r(0)),
        ("dup_b", r(16)),
        ("dup_end", reference.len().to_string()),
        ("getfl_ro", "0".into()),
        ("getfl_rw", "2".into()),
        ("mmap", r(4096)),
        ("cloexec_flag", "1".into()),
        ("cloexec_child", "closed".into()),
        ("inherit_child", r(4096)),
        ("inherit_offset_after", "4112".into()),
        ("done", "1".into()),
    ];
    let mut bad = String::new();
    for (k, v) in &want {
        let g = got
            .iter()
            .find(|(gk, _)| gk == k)
            .map(|(_, gv)| gv.as_str());
        if g != Some(v.as_str()) {
            writeln!(bad, "  {k}: got {g:?}, want {v:?}").unwrap();
        }
    }
    assert!(
        bad.is_empty(),
        "fdcheck (tests/compat/fdcheck.c) disagrees:\n{bad}full output:\n{out}"
    );
    reference[woff..woff + 16].copy_from_slice(b"SURVIVOR-WRITE!!");
    same(
        &c.raw_bytes(),
        &reference,
        "qemu-img's raw after fdcheck's write",
    );
    c.check();
}

// ---------------------------------------------------------------------------
// Scenarios: partitioning

/// The partitions on qemu-img's raw disk, by sfdisk -d and by partx (libblkid).
fn raw_parts(c: &Cell) -> (PathBuf, Vec<common::SfdiskPart>) {
    let raw = c.raw();
    let parts = sfdisk_dump(&raw);
    let px = partx_show(&raw);
    let from_sfdisk: Vec<(u32, u64, u64)> =
        parts.iter().map(|p| (p.number, p.start, p.size)).collect();
    assert_eq!(
        px, from_sfdisk,
        "partx --show and sfdisk -d disagree on the raw disk"
    );
    (raw, parts)
}

fn sectors(c: &Cell) -> u64 {
    fs::metadata(c.raw()).unwrap().len() / 512
}

fn scenario_fdisk(c: &Cell) {
    c.create_empty();
    let n = c.name();
    let out = c.lib_in(
        "fdisk",
        &[&n],
        b"o\nn\np\n1\n2048\n+8M\nn\np\n2\n\n\nt\n2\n83\nw\n",
    );
    assert!(
        out.text().contains("The partition table has been altered"),
        "fdisk did not write: {}",
        out.text()
    );
    let total = sectors(c);
    let (_, parts) = raw_parts(c);
    let got: Vec<(u32, u64, u64, &str)> = parts
        .iter()
        .map(|p| (p.number, p.start, p.size, p.kind.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![(1, 2048, 16384, "83"), (2, 18432, total - 18432, "83")],
        "partitions on the raw disk after fdisk"
    );
    // fdisk -l through the library = fdisk -l on the raw file.
    let got = c.lib("fdisk", &["-l", &n]).text();
    let want = c.plain("fdisk", &["-l", "disk.raw"]).text();
    let rows = |s: &str, name: &str| {
        norm(s, name)
            .lines()
            .filter(|l| l.starts_with("DISK"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rows(&got, &n),
        rows(&want, "disk.raw"),
        "fdisk -l on the image vs on the raw"
    );
    c.check();
}

fn scenario_sfdisk(c: &Cell) {
    c.create_empty();
    let n = c.name();
    c.lib_in("sfdisk", &[&n], b"label: gpt\n,8M,L\n,4M,S\n,,L\n");
    let (_, parts) = raw_parts(c);
    let got: Vec<(u32, u64, u64)> = parts.iter().map(|p| (p.number, p.start, p.size)).collect();
    assert_eq!(
        got[..2],
        [(1, 2048, 16384), (2, 18432, 8192)],
        "partitions on the raw disk after sfdisk"
    );
    assert_eq!(got.len(), 3, "{got:?}");
    let got = c.lib("sfdisk", &["-d", &n]).text();
    let want = c.plain("sfdisk", &["-d", "disk.raw"]).text();
    assert_eq!(
        norm(&got, &n),
        norm(&want, "disk.raw"),
        "sfdisk -d on the image vs on the raw"
    );
    c.lib("sfdisk", &["--verify", &n]);
    c.plain("sfdisk", &["--verify", "disk.raw"]);
    c.check();
}

fn scenario_sgdisk(c: &Cell) {
    c.create_empty();
    let n = c.name();
    c.lib(
        "sgdisk",
        &[
            "-o",
            "-n",
            "1:2048:+4M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            "-c",
            "2:data",
            &n,
        ],
    );
    let v = c.lib("sgdisk", &["-v", &n]).text();
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    let (_, parts) = raw_parts(c);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!((parts[0].start, parts[0].size), (2048, 8192));
    assert_eq!(parts[0].kind, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    assert_eq!((parts[1].start, parts[1].name.as_str()), (10240, "data"));
    assert_eq!(parts[1].kind, "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    // The sector-size line legitimately differs: only a block device has a
    // physical sector size.
    let strip = |s: String, name: &str| {
        norm(&s, name)
            .lines()
            .filter(|l| !l.starts_with("Sector size"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let got = strip(c.lib("sgdisk", &["-p", &n]).text(), &n);
    let want = strip(c.plain("sgdisk", &["-p", "disk.raw"]).text(), "disk.raw");
    assert_eq!(got, want, "sgdisk -p on the image vs on the raw");
    let v = c.plain("sgdisk", &["-v", "disk.raw"]).text();
    assert!(v.contains("No problems found"), "sgdisk -v on the raw: {v}");
    c.check();
}

fn scenario_parted(c: &Cell) {
    c.create_empty();
    let n = c.name();
    c.lib(
        "parted",
        &[
            "-s", &n, "mklabel", "gpt", "mkpart", "alpha", "ext4", "1MiB", "9MiB", "mkpart",
            "beta", "9MiB", "100%",
        ],
    );
    let total = sectors(c);
    let (_, parts) = raw_parts(c);
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(
        (parts[0].start, parts[0].size, parts[0].name.as_str()),
        (2048, 16384, "alpha")
    );
    assert_eq!((parts[1].start, parts[1].name.as_str()), (18432, "beta"));
    let end = parts[1].start + parts[1].size;
    assert!(
        end <= total - 33 && end + 2048 >= total - 33,
        "partition 2 ends at {end}, disk has {total} sectors"
    );
    let rows = |s: String| {
        s.lines()
            .filter(|l| l.starts_with(' '))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let got = rows(c.lib("parted", &["-s", &n, "unit", "s", "print"]).text());
    let want = rows(
        c.plain("parted", &["-s", "disk.raw", "unit", "s", "print"])
            .text(),
    );
    assert_eq!(got, want, "parted print on the image vs on the raw");
    assert_eq!(got.len(), 2, "{got:?}");
    c.check();
}

// ---------------------------------------------------------------------------
// Scenarios: file systems

/// Checks an ext4 file system through the library: fsck, write, read back.
fn ext4_through_library(c: &Cell, dev: &str) {
    c.put("payload.bin", &payload());
    c.lib("e2fsck", &["-fn", dev]);
    c.lib("debugfs", &["-w", "-R", "write payload.bin f", dev]);
    let cat = c.lib("debugfs", &["-R", "cat /f", dev]).stdout;
    same(&cat, &payload(), "debugfs cat /f through the library");
    c.lib("e2fsck", &["-fn", dev]);
}

/// The same checks with stock tools on a raw file system image.
fn ext4_on_raw(c: &Cell, raw: &str) {
    c.plain("e2fsck", &["-fn", raw]);
    let cat = c.plain("debugfs", &["-R", "cat /f", raw]).stdout;
    same(&cat, &payload(), "debugfs cat /f on qemu-img's raw");
}

fn blkid_tags(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("TYPE=") || l.starts_with("UUID="))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn scenario_ext4_disk(c: &Cell) {
    c.create_empty();
    let n = c.name();
    c.lib("mkfs.ext4", &["-q", &n]);
    ext4_through_library(c, &n);
    c.raw();
    ext4_on_raw(c, "disk.raw");
    let got = blkid_tags(&c.lib("blkid", &["-p", "-o", "export", &n]).text());
    let want = blkid_tags(&c.plain("blkid", &["-p", "-o", "export", "disk.raw"]).text());
    assert_eq!(got, want, "blkid -p on the image vs on the raw");
    assert!(got.contains(&"TYPE=ext4".to_string()), "{got:?}");
    c.check();
}

fn scenario_ext4_partition(c: &Cell) {
    // A dos table made by stock sfdisk on a raw file; partition 1 full of data.
    let src = sfdisk_raw(&c.dir, "src.raw", SIZE as u64, "label: dos\n,4M,83\n,,83\n");
    let mut before = fs::read(&src).unwrap();
    let p1 = 2048 * 512..(2048 + 8192) * 512;
    before[p1.clone()].copy_from_slice(&disk_data(12)[..p1.len()]);
    fs::write(&src, &before).unwrap();
    c.create_from_raw(&src);
    let n = c.name();
    let part = format!("{n}2");
    std::os::unix::fs::symlink(&n, c.file(&part)).unwrap();
    let (_, parts) = raw_parts(c);
    let p2 = &parts[1];
    let size = c.lib("blockdev", &["--getsize64", &part]).text();
    assert_eq!(
        size.trim(),
        (p2.size * 512).to_string(),
        "blockdev --getsize64 on the partition symlink"
    );
    c.lib("mkfs.ext4", &["-q", &part]);
    ext4_through_library(c, &part);
    let raw = c.raw_bytes();
    let (s, e) = (
        (p2.start * 512) as usize,
        ((p2.start + p2.size) * 512) as usize,
    );
    same(
        &raw[..s],
        &before[..s],
        "everything before partition 2 (table, partition 1) after mkfs on partition 2",
    );
    let mut after = before.get(e..).unwrap_or(&[]).to_vec();
    after.resize(raw.len() - e, 0); // qemu's CHS rounding adds zeros
    same(&raw[e..], &after, "everything after partition 2");
    c.put("part.raw", &raw[s..e]);
    ext4_on_raw(c, "part.raw");
    c.check();
}

fn scenario_ntfs(c: &Cell) {
    c.create_empty();
    let n = c.name();
    // No -F: mkntfs must see a block device.
    c.lib("mkntfs", &["-Q", &n]);
    c.put("payload.bin", &payload());
    c.lib("ntfscp", &[&n, "payload.bin", "f.bin"]);
    let ls = c.lib("ntfsls", &[&n]).text();
    assert!(
        ls.lines().any(|l| l.trim() == "f.bin"),
        "ntfsls through the library: {ls}"
    );
    same(
        &c.lib("ntfscat", &[&n, "f.bin"]).stdout,
        &payload(),
        "ntfscat through the library",
    );
    c.raw();
    let ls = c.plain("ntfsls", &["disk.raw"]).text();
    assert!(
        ls.lines().any(|l| l.trim() == "f.bin"),
        "ntfsls on the raw: {ls}"
    );
    same(
        &c.plain("ntfscat", &["disk.raw", "f.bin"]).stdout,
        &payload(),
        "ntfscat on the raw",
    );
    let fix = c.plain("ntfsfix", &["-n", "disk.raw"]).text();
    assert!(!fix.contains("FAILED"), "ntfsfix -n on the raw: {fix}");
    let got = blkid_tags(&c.lib("blkid", &["-p", "-o", "export", &n]).text());
    let want = blkid_tags(&c.plain("blkid", &["-p", "-o", "export", "disk.raw"]).text());
    assert_eq!(got, want, "blkid -p on the image vs on the raw");
    c.check();
}

/// ntfs-3g mounts the image in regular-file mode (root, FUSE; the cell
/// passes with a note where FUSE cannot mount): ls shows a file put by
/// ntfscp, a file copied in through the mount reads back with ntfscat through
/// the library and on qemu-img's raw.
fn scenario_ntfs3g(c: &Cell) {
    if let Some(why) = preload::fuse::no_fuse() {
        eprintln!("compat: ntfs-3g mount: skipped: {why}");
        return;
    }
    c.create_empty();
    let n = c.name();
    c.lib("mkntfs", &["-Q", &n]);
    c.put("payload.bin", &payload());
    c.lib("ntfscp", &[&n, "payload.bin", "f.bin"]);
    let g: Vec<u8> = payload().iter().rev().map(|b| b ^ 0x5A).collect();
    c.put("g.bin", &g);
    fs::create_dir(c.file("mnt")).unwrap();
    let mut ntfs3g = c.lib_cmd("ntfs-3g", &["-o", "no_detach", &n, "mnt"]);
    ntfs3g.env("LIBVHD_IO_AS_FILE", "1");
    let Some(m) =
        preload::fuse::or_skip(preload::fuse::Mount::start(ntfs3g, &c.dir, &c.file("mnt")))
    else {
        return;
    };
    let ls = c.plain("ls", &["mnt"]).text();
    assert!(ls.lines().any(|l| l == "f.bin"), "ls of the mount: {ls}");
    same(
        &fs::read(c.file("mnt/f.bin")).unwrap(),
        &payload(),
        "f.bin read through the mount",
    );
    c.plain("cp", &["g.bin", "mnt/g.bin"]);
    m.finish();
    same(
        &c.lib("ntfscat", &[&n, "g.bin"]).stdout,
        &g,
        "ntfscat of the file written through the mount, through the library",
    );
    c.raw();
    same(
        &c.plain("ntfscat", &["disk.raw", "g.bin"]).stdout,
        &g,
        "ntfscat of the file written through the mount, on the raw",
    );
    c.check();
}

fn scenario_vfat(c: &Cell) {
    c.create_empty();
    let n = c.name();
    c.lib("mkfs.vfat", &[&n]);
    c.put("payload.bin", &payload());
    c.lib("mcopy", &["-i", &n, "payload.bin", "::F.BIN"]);
    let dir = c.lib("mdir", &["-i", &n, "::"]).text();
    assert!(
        dir.contains("F        BIN"),
        "mdir through the library: {dir}"
    );
    same(
        &c.lib("mtype", &["-i", &n, "::F.BIN"]).stdout,
        &payload(),
        "mtype through the library",
    );
    c.lib("fsck.vfat", &["-n", &n]);
    c.raw();
    c.plain("fsck.vfat", &["-n", "disk.raw"]);
    c.plain("mcopy", &["-i", "disk.raw", "::F.BIN", "back.bin"]);
    same(
        &fs::read(c.file("back.bin")).unwrap(),
        &payload(),
        "mcopy from the raw",
    );
    let got = blkid_tags(&c.lib("blkid", &["-p", "-o", "export", &n]).text());
    let want = blkid_tags(&c.plain("blkid", &["-p", "-o", "export", "disk.raw"]).text());
    assert_eq!(got, want, "blkid -p on the image vs on the raw");
    c.check();
}

fn scenario_sleuthkit(c: &Cell) {
    // Made with stock tools: a dos table, ext4 with files in partition 2.
    let src = sfdisk_raw(&c.dir, "src.raw", SIZE as u64, "label: dos\n,4M,83\n,,83\n");
    let parts = sfdisk_dump(&src);
    fs::create_dir_all(c.file("tree/sub")).unwrap();
    c.put("tree/a.txt", b"alpha\n");
    c.put("tree/sub/b.bin", &payload());
    let fsimg = c.file("fs.raw");
    fs::File::create(&fsimg)
        .unwrap()
        .set_len(parts[1].size * 512)
        .unwrap();
    c.plain("mkfs.ext4", &["-q", "-d", "tree", "fs.raw"]);
    let mut data = fs::read(&src).unwrap();
    let s = (parts[1].start * 512) as usize;
    data[s..s + fs::metadata(&fsimg).unwrap().len() as usize]
        .copy_from_slice(&fs::read(&fsimg).unwrap());
    c.create_from(&data);
    c.raw();
    let n = c.name();
    let got = c.lib("mmls", &["-i", "raw", &n]).text();
    let want = c.plain("mmls", &["-i", "raw", "disk.raw"]).text();
    assert_eq!(got, want, "mmls on the image vs on the raw");
    assert!(got.contains("Linux (0x83)"), "{got}");
    let off = parts[1].start.to_string();
    let got = c.lib("fls", &["-r", "-o", &off, "-i", "raw", &n]).text();
    let want = c
        .plain("fls", &["-r", "-o", &off, "-i", "raw", "disk.raw"])
        .text();
    assert_eq!(got, want, "fls -r on the image vs on the raw");
    assert!(got.contains("b.bin"), "{got}");
}

// ---------------------------------------------------------------------------
// The escape oracle

const TRACED: &str = "trace=read,write,pread64,pwrite64,readv,writev,preadv,pwritev,preadv2,pwritev2,lseek,copy_file_range,sendfile,splice,mmap,ftruncate,fallocate";

/// Runs `program` under `strace -f -y` with the library in the tracee only,
/// and returns its output and the lines of the trace that act on a dummy.
/// The library keeps the virtual offset in the memfd with lseek SEEK_SET /
/// SEEK_CUR: those are its own; any other traced call on a
/// `</memfd:vhdio:...>` fd means data or a seek went to the dummy.
fn traced(c: &Cell, program: &str, args: &[&str], input: Option<&[u8]>) -> (Out, Vec<String>) {
    let trace = c.file(&format!("trace.{}", SEQ.fetch_add(1, Ordering::Relaxed)));
    let lib = format!("LD_PRELOAD={}", preload::library().display());
    let mut a = vec![
        "-f",
        "-qq",
        "-y",
        "-s",
        "0",
        "-e",
        TRACED,
        "-o",
        trace.to_str().unwrap(),
        "-E",
        &lib,
        program,
    ];
    a.extend_from_slice(args);
    let out = exec(c.base("strace", &a), input, &c.dir);
    let text = fs::read_to_string(&trace).unwrap_or_default();
    fs::remove_file(&trace).ok();
    let bad = text
        .lines()
        .filter(|l| l.contains("</memfd:vhdio:"))
        .filter(|l| {
            let call = l.trim_start_matches(|ch: char| ch.is_ascii_digit() || ch == ' ');
            !(call.starts_with("lseek(") && (l.contains("SEEK_SET") || l.contains("SEEK_CUR")))
        })
        .map(|l| format!("{program}: {l}"))
        .collect();
    (out, bad)
}

fn report_escapes(bad: Vec<String>) {
    if !bad.is_empty() {
        let n = bad.len();
        let shown: Vec<&String> = bad.iter().take(12).collect();
        panic!(
            "{n} traced call(s) reached a dummy memfd instead of the image, e.g.:\n{}",
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

fn scenario_strace_readers(c: &Cell) {
    let reference = with_data(c, 13);
    c.put("ref.raw", &reference);
    let md5 = c.digest("md5sum", &reference);
    let md5_rest = c.digest("md5sum", &reference[512..]);
    let n = c.name();
    let mut bad = Vec::new();
    let mut run = |program: &str, args: &[&str], ok_codes: &[i32]| -> Out {
        let (out, b) = traced(c, program, args, None);
        bad.extend(b);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            ok_codes.contains(&code),
            "{} (under strace) exited {code}: {}",
            out.what,
            tail(&out.err())
        );
        out
    };
    same(
        &run("cat", &[&n], &[0]).stdout,
        &reference,
        "cat under strace",
    );
    assert_eq!(
        first_word(&run("md5sum", &[&n], &[0]).text()),
        md5,
        "md5sum under strace"
    );
    run(
        "dd",
        &[&format!("if={n}"), "of=o.raw", "bs=1M", "status=none"],
        &[0],
    );
    same(
        &fs::read(c.file("o.raw")).unwrap(),
        &reference,
        "dd under strace",
    );
    run("cp", &[&n, "o2.raw"], &[0]);
    same(
        &fs::read(c.file("o2.raw")).unwrap(),
        &reference,
        "cp under strace",
    );
    run("cmp", &[&n, "ref.raw"], &[0]);
    run(
        "od",
        &["-A", "d", "-t", "x1", "-j", "5000123", "-N", "64", &n],
        &[0],
    );
    run("hexdump", &["-C", "-s", "5000123", "-n", "64", &n], &[0]);
    run("xxd", &["-s", "5000123", "-l", "64", &n], &[0]);
    run("tail", &["-c", "1000", &n], &[0]);
    let out = run(
        "sh",
        &["-c", &format!("(head -c 512 >/dev/null; md5sum) < {n}")],
        &[0],
    );
    assert_eq!(
        first_word(&out.text()),
        md5_rest,
        "(head -c 512; md5sum) < image under strace"
    );
    let out = run("sh", &["-c", &format!("md5sum /dev/stdin < {n}")], &[0]);
    assert_eq!(
        first_word(&out.text()),
        md5,
        "md5sum /dev/stdin under strace"
    );
    run(
        "/usr/bin/python3",
        &[
            "-c",
            &format!(
                "import os; f=open('{n}','rb'); f.read(); fd=os.open('{n}', os.O_RDONLY); os.pread(fd, 10, 12345)"
            ),
        ],
        &[0],
    );
    run("blkid", &["-p", &n], &[0, 2]);
    run("fdisk", &["-l", &n], &[0]);
    run("blockdev", &["--getsize64", &n], &[0]);
    report_escapes(bad);
    // Positive control: a raw read(2) syscall on the image fd bypasses the
    // library and must be caught by the oracle (or the oracle is blind).
    let (_, control) = traced(
        c,
        "/usr/bin/python3",
        &[
            "-c",
            &format!(
                "import os, ctypes; fd = os.open('{n}', os.O_RDONLY); b = ctypes.create_string_buffer(16); ctypes.CDLL(None).syscall(0, fd, b, 16)"
            ),
        ],
        None,
    );
    assert!(
        control.iter().any(|l| l.contains(" read(")),
        "the escape oracle missed a deliberate raw read(2) on the dummy: {control:?}"
    );
}

fn scenario_strace_writers(c: &Cell) {
    c.create_empty();
    let n = c.name();
    let mut bad = Vec::new();
    c.put("payload.bin", &payload());
    let mut run = |program: &str, args: &[&str], input: Option<&[u8]>| -> Out {
        let (out, b) = traced(c, program, args, input);
        bad.extend(b);
        assert!(
            out.status.success(),
            "{} (under strace) failed: {}",
            out.what,
            tail(&out.err())
        );
        out
    };
    run("sfdisk", &[&n], Some(b"label: dos\n,8M,83\n,,83\n"));
    run("fdisk", &["-l", &n], None);
    run(
        "parted",
        &["-s", &n, "mklabel", "gpt", "mkpart", "a", "1MiB", "9MiB"],
        None,
    );
    run("sgdisk", &["-n", "2:0:0", &n], None);
    run("mkfs.ext4", &["-q", "-F", &n], None);
    run("e2fsck", &["-fn", &n], None);
    run("debugfs", &["-w", "-R", "write payload.bin f", &n], None);
    run("debugfs", &["-R", "cat /f", &n], None);
    run("mkfs.vfat", &["-I", &n], None);
    run("mcopy", &["-i", &n, "payload.bin", "::F.BIN"], None);
    run("mdir", &["-i", &n, "::"], None);
    run("fsck.vfat", &["-n", &n], None);
    run("mkntfs", &["-Q", &n], None);
    run("ntfscp", &[&n, "payload.bin", "f.bin"], None);
    run("ntfsls", &[&n], None);
    run(
        "dd",
        &[
            "if=payload.bin",
            &format!("of={n}"),
            "bs=1M",
            "seek=20",
            "conv=notrunc",
            "status=none",
        ],
        None,
    );
    run(
        "sh",
        &[
            "-c",
            &format!("exec 3<>{n}; printf XYZ >&3; head -c 10 <&3 > /dev/null"),
        ],
        None,
    );
    report_escapes(bad);
    // And the data went where it should.
    c.raw();
    same(
        &c.plain("ntfscat", &["disk.raw", "f.bin"]).stdout,
        &payload(),
        "ntfscat on the raw after the strace runs",
    );
    let raw = fs::read(c.file("disk.raw")).unwrap();
    same(
        &raw[20 << 20..(20 << 20) + payload().len()],
        &payload(),
        "dd under strace, on the raw",
    );
    c.check();
}

// ---------------------------------------------------------------------------
// The matrix

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panic".to_string()
    }
}

#[test]
fn compat_matrix() {
    preload::library();
    // One line per failure (the report at the end has the details).
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_message(info.payload());
        let first = msg.lines().next().unwrap_or("");
        eprintln!(
            "panic at {}: {first}",
            info.location().map(|l| l.to_string()).unwrap_or_default()
        );
    }));
    let filters: Vec<String> = std::env::var("COMPAT_FILTER")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let keep = std::env::var_os("COMPAT_KEEP").is_some();
    let mut cells = Vec::new();
    for (si, (scen, _)) in SCENARIOS.iter().enumerate() {
        for (fi, fmt) in FORMATS.iter().enumerate() {
            let id = format!("{scen}/{}", fmt.label);
            if filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str())) {
                cells.push((si, fi));
            }
        }
    }
    if cells
        .iter()
        .any(|&(si, _)| SCENARIOS[si].0 == "fd lifecycle (C)")
    {
        fdcheck();
    }
    let jobs = std::env::var("COMPAT_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
    // Longest cells first: the file-system and strace rows.
    cells.sort_by_key(|&(si, _)| {
        std::cmp::Reverse(matches!(
            SCENARIOS[si].0,
            "strace writers"
                | "strace readers"
                | "ext4 partition"
                | "ntfs"
                | "ntfs-3g mount (as-file)"
        ) as u8)
    });
    let results: Mutex<Vec<Option<Result<Duration, String>>>> =
        Mutex::new(vec![None; SCENARIOS.len() * FORMATS.len()]);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(si, fi)) = cells.get(i) else { break };
                    let (scen, f) = SCENARIOS[si];
                    let fmt = &FORMATS[fi];
                    let tmp = tempfile::Builder::new()
                        .prefix(&format!("compat-{}-", fmt.label))
                        .tempdir()
                        .unwrap();
                    let cell = Cell {
                        fmt,
                        dir: tmp.path().to_path_buf(),
                    };
                    let t = Instant::now();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&cell)));
                    let r = match r {
                        Ok(()) => Ok(t.elapsed()),
                        Err(e) => {
                            let mut msg = panic_message(&*e);
                            if keep {
                                let _ = write!(msg, "\n  (kept: {})", tmp.keep().display());
                            }
                            Err(msg)
                        }
                    };
                    eprintln!(
                        "compat: {scen}/{}: {} ({:.1}s)",
                        fmt.label,
                        if r.is_ok() { "pass" } else { "FAIL" },
                        t.elapsed().as_secs_f64()
                    );
                    results.lock().unwrap()[si * FORMATS.len() + fi] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut table = String::new();
    let w = SCENARIOS.iter().map(|(s, _)| s.len()).max().unwrap();
    write!(table, "\n{:w$}", "scenario \\ format").unwrap();
    for f in FORMATS {
        write!(table, " | {:11}", f.label).unwrap();
    }
    table.push('\n');
    let mut failures = String::new();
    let (mut pass, mut fail) = (0, 0);
    for (si, (scen, _)) in SCENARIOS.iter().enumerate() {
        write!(table, "{scen:w$}").unwrap();
        for (fi, f) in FORMATS.iter().enumerate() {
            let cell = match &results[si * FORMATS.len() + fi] {
                None => "-".to_string(),
                Some(Ok(_)) => {
                    pass += 1;
                    "pass".to_string()
                }
                Some(Err(msg)) => {
                    fail += 1;
                    writeln!(failures, "\n=== {scen} / {}:\n{msg}", f.label).unwrap();
                    "FAIL".to_string()
                }
            };
            write!(table, " | {cell:11}").unwrap();
        }
        table.push('\n');
    }
    writeln!(
        table,
        "{pass} passed, {fail} failed in {:.0}s",
        started.elapsed().as_secs_f64()
    )
    .unwrap();
    // Straight to stderr, past the test harness's capture: the matrix is
    // shown on success too.
    use std::io::Write as _;
    std::io::stderr()
        .write_all(format!("{failures}{table}").as_bytes())
        .ok();
    assert!(
        fail == 0,
        "compatibility matrix: {fail} cell(s) failed (details above)"
    );
}
