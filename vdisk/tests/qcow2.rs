//! qcow2: images made by qemu-img (every variant it writes), chains over
//! qcow2, raw and VHDX, read through vdisk and compared with what qemu-img
//! reads; writes through vdisk checked with qemu-img check and read back by
//! qemu-img.

mod common;

use std::path::{Path, PathBuf};

use common::{Rng, open, pattern, qemu_image_from, qemu_raw, read_all, run};

const MIB: usize = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs qemu-io commands (`-c` each) on `img` of format `fmt`.
fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

/// Random qemu-io writes: data, zeros (`write -z`), discards, some unaligned.
fn scribble(img: &Path, fmt: &str, size: usize, seed: u64, count: usize) {
    let mut rng = Rng(seed | 1);
    let mut cmds = Vec::new();
    for _ in 0..count {
        let len = 512 * (1 + rng.next() as usize % 300);
        let off = (rng.next() as usize % (size - len)) / 512 * 512;
        let pat = rng.next() % 250 + 1;
        cmds.push(match rng.next() % 6 {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {pat} {off} {len}"),
        });
    }
    qemu_io(img, fmt, &cmds);
}

fn assert_reads_like_qemu(img: &Path, what: &str) {
    let want = qemu_raw(img, "qcow2");
    let disk = open(img, false).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    assert_eq!(disk.size() as usize, want.len(), "{what}: size");
    let got = read_all(&disk);
    assert!(got == want, "{what}: contents differ from qemu-img's");
}

fn qemu_check(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        img.display()
    );
}

#[test]
fn qemu_variants_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 4096;
    let variants = [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "preallocation=metadata",
        "compat=0.10,cluster_size=4k",
    ];
    for (i, opts) in variants.iter().enumerate() {
        let (data, _) = pattern(i as u64 + 1, size);
        let img = qemu_image_from(&data, tmp.path(), &format!("v{i}.qcow2"), "qcow2", opts);
        assert_reads_like_qemu(&img, opts);
        // Zero clusters (v3 flag or subcluster bits), discards, partial writes.
        scribble(&img, "qcow2", size, i as u64 + 7, 40);
        assert_reads_like_qemu(&img, &format!("{opts} after qemu-io writes"));
    }
}

#[test]
fn compressed_images_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 6 * MIB;
    let (mut data, _) = pattern(11, size);
    // Compressible stretches too.
    for (i, b) in data[MIB..2 * MIB].iter_mut().enumerate() {
        *b = (i / 1000) as u8;
    }
    let raw = tmp.path().join("c.raw");
    std::fs::write(&raw, &data).unwrap();
    for (i, opts) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=512",
        "compression_type=zstd,cluster_size=2M",
        "compat=0.10",
        "compression_type=zstd,extended_l2=on",
    ]
    .iter()
    .enumerate()
    {
        let img = tmp.path().join(format!("c{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                s(&raw),
                s(&img),
            ],
        );
        assert_reads_like_qemu(&img, opts);
        assert_eq!(qemu_raw(&img, "qcow2"), data, "{opts}: qemu-img itself");
        // Partial overwrites of compressed clusters, by qemu.
        scribble(&img, "qcow2", size, i as u64 + 3, 20);
        assert_reads_like_qemu(&img, &format!("{opts} after qemu-io writes"));
    }
}

/// qcow2 over qcow2 over raw, with a larger top; qcow2 over VHDX; extended
/// L2 over a backing file (partly allocated clusters).
#[test]
fn chains_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 8 * MIB;
    let (data, _) = pattern(5, size);
    let base = d.join("base.raw");
    std::fs::write(&base, &data).unwrap();
    let mid = d.join("mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    scribble(&mid, "qcow2", size, 21, 30);
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "12M",
        ],
    );
    scribble(&top, "qcow2", 12 * MIB, 22, 30);
    assert_reads_like_qemu(&top, "qcow2/qcow2/raw");
    let disk = open(&top, false).unwrap();
    assert_eq!(disk.layers().len(), 3);

    let vhdx = d.join("base.vhdx");
    run("qemu-img", &["create", "-f", "vhdx", s(&vhdx), "8M"]);
    scribble(&vhdx, "vhdx", size, 23, 20);
    let over = d.join("over vhdx.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.vhdx",
            "-F",
            "vhdx",
            s(&over),
        ],
    );
    scribble(&over, "qcow2", size, 24, 20);
    assert_reads_like_qemu(&over, "qcow2 over vhdx");

    // No backing format recorded: probed (vhdx), or raw if not an image.
    let probed = d.join("probed.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&probed),
        ],
    );
    // qemu-img no longer writes images without one: hide the extension.
    let mut bytes = std::fs::read(&probed).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    bytes[at] = 0x12;
    std::fs::write(&probed, &bytes).unwrap();
    let disk = open(&probed, false).unwrap();
    assert!(read_all(&disk) == data, "raw backing without a format");
}

#[test]
fn data_file_and_internal_snapshots_read_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 4 * MIB;
    let img = d.join("df.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&d.join("df.data"))),
            s(&img),
            "4M",
        ],
    );
    scribble(&img, "qcow2", size, 31, 30);
    assert_reads_like_qemu(&img, "external data file");

    let (data, _) = pattern(9, size);
    let snap = qemu_image_from(&data, d, "snap.qcow2", "qcow2", "");
    run("qemu-img", &["snapshot", "-c", "s1", s(&snap)]);
    scribble(&snap, "qcow2", size, 32, 30);
    run("qemu-img", &["snapshot", "-c", "s2", s(&snap)]);
    scribble(&snap, "qcow2", size, 33, 30);
    assert_reads_like_qemu(&snap, "internal snapshots");
}

#[test]
fn encrypted_and_unknown_features_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let luks = d.join("luks.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "--object",
            "secret,id=sec0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            s(&luks),
            "4M",
        ],
    );
    let e = open(&luks, false).unwrap_err().to_string();
    assert!(e.contains("encryption") && e.contains("LUKS"), "{e}");

    let img = qemu_image_from(&vec![1u8; MIB], d, "f.qcow2", "qcow2", "");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[72 + 7] |= 1 << 6; // incompatible bit 6: unknown
    std::fs::write(&img, &bytes).unwrap();
    let e = open(&img, false).unwrap_err().to_string();
    assert!(e.contains("incompatible") && e.contains("bit 6"), "{e}");
}

pub fn dir_of(p: &Path) -> PathBuf {
    p.parent().unwrap().to_path_buf()
}

/// Random unaligned writes through vdisk, mirrored in `model`; flushes now
/// and then.
fn random_writes(disk: &vdisk::Disk, model: &mut [u8], seed: u64, count: usize) {
    let mut rng = Rng(seed | 1);
    let size = model.len();
    for k in 0..count {
        let len = match rng.next() % 4 {
            0 => 1 + rng.next() as usize % 700,
            1 => 1 + rng.next() as usize % 70_000,
            2 => 4096,
            _ => 1 + rng.next() as usize % 300_000,
        }
        .min(size);
        let off = rng.next() as usize % (size - len + 1);
        let zero = rng.next().is_multiple_of(5);
        let data: Vec<u8> = (0..len)
            .map(|i| {
                if zero {
                    0
                } else {
                    (rng.next() as u8) | (i as u8 & 1)
                }
            })
            .collect();
        disk.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
        if k % 17 == 16 {
            disk.flush().unwrap();
        }
    }
}

fn write_and_verify(img: &Path, what: &str, seed: u64) {
    let mut model = qemu_raw(img, "qcow2");
    {
        let disk = open(img, true).unwrap_or_else(|e| panic!("{what}: open rw: {e}"));
        random_writes(&disk, &mut model, seed, 60);
        assert!(
            read_all(&disk) == model,
            "{what}: vdisk reads back differently"
        );
    }
    qemu_check(img);
    assert!(
        qemu_raw(img, "qcow2") == model,
        "{what}: qemu-img reads differently"
    );
    let f = std::fs::File::open(img).unwrap();
    let report = vdisk::qcow2::check::check(&(f, false)).unwrap();
    assert!(
        report.errors.is_empty() && report.leaks == 0,
        "{what}: {report:?}"
    );
}

#[test]
fn random_writes_match_qemu_in_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 7 * MIB + 512;
    for (i, opts) in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "lazy_refcounts=on",
        "refcount_bits=1",
        "refcount_bits=64",
        "preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let (data, _) = pattern(i as u64 + 40, size);
        let img = qemu_image_from(&data, tmp.path(), &format!("w{i}.qcow2"), "qcow2", opts);
        scribble(&img, "qcow2", size, i as u64 + 50, 20);
        write_and_verify(&img, opts, i as u64 + 60);
    }
    // Compressed clusters rewritten partly and wholly.
    let (data, _) = pattern(77, 5 * MIB);
    let raw = tmp.path().join("c.raw");
    std::fs::write(&raw, &data).unwrap();
    for (i, opts) in [
        "compression_type=zlib",
        "compression_type=zstd,cluster_size=16k",
    ]
    .iter()
    .enumerate()
    {
        let img = tmp.path().join(format!("wc{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                s(&raw),
                s(&img),
            ],
        );
        write_and_verify(&img, opts, i as u64 + 70);
    }
}

fn digest(p: &Path) -> String {
    common::sha256_hex(&std::fs::read(p).unwrap())
}

#[test]
fn chain_writes_leave_backing_files_and_snapshots_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 6 * MIB;
    let (data, _) = pattern(3, size);
    let base = d.join("base.raw");
    std::fs::write(&base, &data).unwrap();
    let mid = d.join("mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    scribble(&mid, "qcow2", size, 81, 30);
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "8M",
        ],
    );
    scribble(&top, "qcow2", 8 * MIB, 82, 30);
    let before = (digest(&base), digest(&mid));
    write_and_verify(&top, "qcow2/qcow2/raw", 83);
    assert_eq!(
        (digest(&base), digest(&mid)),
        before,
        "a backing file changed"
    );

    let vhdx = d.join("base.vhdx");
    run("qemu-img", &["create", "-f", "vhdx", s(&vhdx), "6M"]);
    scribble(&vhdx, "vhdx", size, 84, 20);
    let over = d.join("over.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.vhdx",
            "-F",
            "vhdx",
            s(&over),
        ],
    );
    let before = digest(&vhdx);
    write_and_verify(&over, "qcow2 over vhdx", 85);
    assert_eq!(digest(&vhdx), before, "the VHDX base changed");

    // Internal snapshot: writes beside it leave it as it was.
    let (data, _) = pattern(4, size);
    let snap = qemu_image_from(&data, d, "snap.qcow2", "qcow2", "cluster_size=4k");
    run("qemu-img", &["snapshot", "-c", "s1", s(&snap)]);
    write_and_verify(&snap, "beside a snapshot", 86);
    let out = d.join("s1.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=s1",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&snap),
            s(&out),
        ],
    );
    assert!(std::fs::read(&out).unwrap() == data, "snapshot s1 changed");
}

#[test]
fn created_images_pass_qemu_check_and_grow_refcounts() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (cs, size)) in [(65536u32, 20 * MIB), (512, 3 * MIB), (2 << 20, 9 * MIB)]
        .iter()
        .enumerate()
    {
        let img = tmp.path().join(format!("n{i}.qcow2"));
        {
            let f = std::fs::File::create_new(&img).unwrap();
            vdisk::qcow2::create::create(&(f, true), *size as u64, *cs, &Default::default())
                .unwrap();
        }
        qemu_check(&img);
        assert_eq!(qemu_raw(&img, "qcow2"), vec![0u8; *size]);
        // Whole clusters of zeros allocate nothing.
        let len = std::fs::metadata(&img).unwrap().len();
        open(&img, true)
            .unwrap()
            .write_at(&vec![0u8; 2 * MIB], 0)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&img).unwrap().len(),
            len,
            "zeros allocated"
        );
        // 512-byte clusters: the refcount table (one cluster) must grow.
        write_and_verify(&img, &format!("created, {cs}-byte clusters"), i as u64 + 90);
    }
}

/// qemu killed while writing with lazy refcounts leaves the dirty bit and
/// stale refcounts: vdisk's check sees them; opening for writing repairs
/// them first (qemu-img check clean after), opening read-only reads.
#[test]
fn dirty_lazy_refcounts_are_repaired_on_writable_open() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("lz.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(&img),
            "8M",
        ],
    );
    let killed = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 1M",
            "-c",
            "write -P 8 3M 64k",
        ])
        .args(["-c", "sigraise 9", s(&img)])
        .output()
        .unwrap();
    assert!(!killed.status.success());
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[79] & 1, 1, "qemu left no dirty bit");
    let f = std::fs::File::open(&img).unwrap();
    let report = vdisk::qcow2::check::check(&(f, false)).unwrap();
    assert!(!report.errors.is_empty(), "stale refcounts not seen");
    assert_reads_like_qemu(&img, "dirty, read-only");
    write_and_verify(&img, "dirty, repaired", 5);
    assert_eq!(
        std::fs::read(&img).unwrap()[79] & 1,
        0,
        "dirty bit still set"
    );
    let f = std::fs::File::open(&img).unwrap();
    let report = vdisk::qcow2::check::check(&(f, false)).unwrap();
    assert!(report.errors.is_empty() && report.leaks == 0, "{report:?}");
}

/// Extended L2 over a backing file: a 4 KiB write allocates two 2 KiB
/// subclusters of the 64 KiB cluster; the rest still comes from the
/// backing file (as qemu-img map reports), nothing is copied up.
#[test]
fn subcluster_writes_copy_nothing_up() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (data, _) = pattern(12, 4 * MIB);
    let base = d.join("b.raw");
    std::fs::write(&base, &data).unwrap();
    let top = d.join("t.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "b.raw",
            "-F",
            "raw",
            s(&top),
        ],
    );
    let mut model = data.clone();
    {
        let disk = open(&top, true).unwrap();
        let w: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        disk.write_at(&w, 65536 + 6144).unwrap();
        model[65536 + 6144..65536 + 6144 + 4096].copy_from_slice(&w);
        disk.write_at(&w[..100], 65536 + 2048 + 7).unwrap();
        model[65536 + 2048 + 7..65536 + 2048 + 107].copy_from_slice(&w[..100]);
    }
    qemu_check(&top);
    assert!(qemu_raw(&top, "qcow2") == model);
    let map = run("qemu-img", &["map", "--output=json", s(&top)]);
    // Subclusters 1 (partly written, completed from the base), 3, 4, 5
    // (6144..10240 touches 3 and 4) are in the top; 2 is not.
    let top_ranges: Vec<(u64, u64)> = map
        .lines()
        .filter(|l| l.contains("\"depth\": 0") && l.contains("\"data\": true"))
        .map(|l| {
            let num = |k: &str| -> u64 {
                let at = l.find(k).unwrap() + k.len();
                l[at..]
                    .trim_start_matches([':', ' '])
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (num("\"start\""), num("\"length\""))
        })
        .collect();
    assert_eq!(
        top_ranges,
        vec![(65536 + 2048, 2048), (65536 + 6144, 4096)],
        "{map}"
    );
}
