//! qcow2 writes through vdisk into qemu-img's images (every variant,
//! compressed, chains, beside internal snapshots), checked with qemu-img
//! check and read back by qemu-img; created images; dirty-bit repair;
//! subcluster allocation.

mod common;
#[path = "qcow2_util/mod.rs"]
mod qcow2_util;

use common::{open, pattern, qemu_child, qemu_image_from, qemu_raw, run};
use qcow2_util::*;

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
        compressed_copy(&raw, &img, opts);
        write_and_verify(&img, opts, i as u64 + 70);
    }
}

#[test]
fn chain_writes_leave_backing_files_and_snapshots_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 6 * MIB;
    let (data, _) = pattern(3, size);
    let (base, mid, top) = qcow2_qcow2_raw_chain(d, &data, 8, (81, 82));
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
    qemu_child(&over, "qcow2", "", "base.vhdx", "vhdx", None);
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
    qemu_child(&top, "qcow2", "extended_l2=on", "b.raw", "raw", None);
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
