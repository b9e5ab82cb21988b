//! Replays the fuzz corpora without cargo-fuzz: every file under
//! `tests/fuzz_regressions/<target>/` (inputs that once crashed or hung a
//! target) and the committed seeds under `../fuzz/corpus-seed/<target>/`
//! go through the same entry point as the fuzz target (`vdisk::fuzz`), each
//! under `catch_unwind` and a time limit.
//!
//! `cargo test -p vdisk --test fuzz_regressions -- --ignored generate_seed_corpus`
//! rebuilds the seed corpus from qemu-img images (patterned raw disks with
//! MBR and GPT tables made by sfdisk, converted to vpc, vhdx and vdi).

#[path = "common/mod.rs"]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TARGETS: [&str; 8] = [
    "open_vhd",
    "open_vhdx",
    "open_vdi",
    "open_qcow2",
    "open_any",
    "vhdx_log",
    "partitions",
    "open_vmdk",
];

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs every input of `root/<target>/`; returns how many ran.
fn replay(root: &Path) -> usize {
    let mut failures = Vec::new();
    let mut count = 0;
    for target in TARGETS {
        for file in files(&root.join(target)) {
            let data = std::fs::read(&file).unwrap();
            let t = Instant::now();
            let r = catch_unwind(AssertUnwindSafe(|| vdisk::fuzz::run_target(target, &data)));
            let took = t.elapsed();
            count += 1;
            match r {
                Err(_) => failures.push(format!("{}: panicked", file.display())),
                Ok(None) => failures.push(format!("{}: unknown target", file.display())),
                Ok(Some(_)) if took > Duration::from_secs(2) => {
                    failures.push(format!("{}: took {took:?}", file.display()))
                }
                Ok(Some(_)) => {}
            }
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz inputs failing:\n{}",
        failures.join("\n")
    );
    count
}

#[test]
fn regression_corpus() {
    let n = replay(&manifest().join("tests/fuzz_regressions"));
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn seed_corpus() {
    let n = replay(&manifest().join("../fuzz/corpus-seed"));
    assert!(n > 0, "no seed corpus under fuzz/corpus-seed");
    eprintln!("replayed {n} seed inputs");
}

/// The seeds must be real images: the open targets accept them.
#[test]
fn seeds_open() {
    let root = manifest().join("../fuzz/corpus-seed");
    for target in [
        "open_vhd",
        "open_vhdx",
        "open_vdi",
        "open_qcow2",
        "open_any",
        "open_vmdk",
    ] {
        for f in files(&root.join(target)) {
            let data = std::fs::read(&f).unwrap();
            assert_eq!(
                vdisk::fuzz::run_target(target, &data),
                Some(true),
                "{}",
                f.display()
            );
        }
    }
    for f in files(&root.join("vhdx_log")) {
        let data = std::fs::read(&f).unwrap();
        if let Err(e) = vdisk::fuzz::vhdx_log(&data) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn sparse_round_trip() {
    let mut file = vec![0u8; 300_000];
    file[5] = 1;
    file[100_000..170_000].fill(7);
    file[299_999] = 9;
    let enc = vdisk::fuzz::encode_sparse(&file, true);
    let (dec, big) = vdisk::fuzz::decode_sparse(&enc);
    assert!(big);
    assert_eq!(dec.len(), 300_032);
    assert_eq!(&dec[..300_000], &file[..]);
    assert!(enc.len() < 80_000);
    // Garbage decodes to something bounded.
    let (dec, _) = vdisk::fuzz::decode_sparse(&[0xFF; 64]);
    assert!(dec.len() as u64 <= vdisk::fuzz::MAX_FILE);
}

fn put(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), data).unwrap();
}

/// A raw disk of `size` bytes partitioned by `script`, with a 4 KiB pattern
/// at the start of every partition and at the end of the disk.
fn patterned_raw(dir: &Path, name: &str, size: u64, script: &str) -> Vec<u8> {
    let raw = common::sfdisk_raw(dir, name, size, script);
    let mut data = std::fs::read(&raw).unwrap();
    for p in common::sfdisk_dump(&raw) {
        let o = (p.start * 512) as usize;
        if o + 4096 <= data.len() && p.size > 16 {
            for (i, b) in data[o..o + 4096].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(p.number as u8 * 2 + 1) ^ 0x5A;
            }
        }
    }
    let n = data.len();
    data[n - 8192..n - 4096].fill(0xA5);
    data
}

#[test]
#[ignore = "rebuilds fuzz/corpus-seed; needs qemu-img and sfdisk"]
fn generate_seed_corpus() {
    let out = manifest().join("../fuzz/corpus-seed");
    let _ = std::fs::remove_dir_all(&out);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let disks = [
        (
            "mbr",
            patterned_raw(
                dir,
                "mbr.raw",
                4 << 20,
                "label: dos\n,1M,L\n,1M,E\n,512K,L\n,,L\n",
            ),
        ),
        (
            "gpt",
            patterned_raw(dir, "gpt.raw", 4 << 20, "label: gpt\n,1M,L\n,1M\n,,\n"),
        ),
        ("plain", {
            let mut d = vec![0u8; 2 << 20];
            d[..512].fill(0x11);
            d[(1 << 20)..(1 << 20) + 4096].fill(0x22);
            d
        }),
    ];
    for (name, data) in &disks {
        put(
            &out,
            "partitions",
            &format!("{name}.sparse"),
            &vdisk::fuzz::encode_sparse(data, false),
        );
        let raw = dir.join(format!("{name}.src"));
        std::fs::write(&raw, data).unwrap();
        for (target, fmt, opts, ext) in [
            (
                "open_vhd",
                "vpc",
                "subformat=dynamic,force_size=on",
                "dyn.vhd",
            ),
            (
                "open_vhd",
                "vpc",
                "subformat=fixed,force_size=on",
                "fixed.vhd",
            ),
            ("open_vhdx", "vhdx", "block_size=1M,log_size=1M", "vhdx"),
            ("open_vdi", "vdi", "", "vdi"),
            ("open_vdi", "vdi", "static=on", "static.vdi"),
        ] {
            if name == &"plain" && ext.contains("fixed") {
                continue;
            }
            let img = dir.join(format!("{name}.{ext}"));
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
            common::run("qemu-img", &args);
            let enc = vdisk::fuzz::encode_sparse(&std::fs::read(&img).unwrap(), false);
            put(&out, target, &format!("{name}.{ext}.sparse"), &enc);
            if *name == "mbr" {
                put(&out, "open_any", &format!("{name}.{ext}.sparse"), &enc);
            }
        }
    }
    // A 4 KiB-sector raw disk for the partition parser.
    let mut big = vec![0u8; 4 << 20];
    big[510] = 0x55;
    big[511] = 0xAA;
    let e = 446;
    big[e + 4] = 0x83;
    big[e + 8..e + 12].copy_from_slice(&1u32.to_le_bytes());
    big[e + 12..e + 16].copy_from_slice(&100u32.to_le_bytes());
    put(
        &out,
        "partitions",
        "mbr4k.sparse",
        &vdisk::fuzz::encode_sparse(&big, true),
    );

    // VHDX made by vdisk: 4 KiB sectors, and a differencing file (parent refused).
    use vdisk::vhdx::create::{CreateOptions, ParentInfo, create};
    let mut o = CreateOptions::dynamic(2 << 20);
    o.block_size = 1 << 20;
    o.logical_sector_size = 4096;
    let s = vdisk::MemStorage::new(Vec::new());
    create(&s, &o).unwrap();
    put(
        &out,
        "open_vhdx",
        "vdisk-4k.vhdx.sparse",
        &vdisk::fuzz::encode_sparse(&s.into_inner(), false),
    );
    let mut o = CreateOptions::dynamic(2 << 20);
    o.block_size = 1 << 20;
    o.parent = Some(ParentInfo {
        data_write_guid: [7; 16],
        paths: vec![("relative_path".into(), r".\parent.vhdx".into())],
    });
    let s = vdisk::MemStorage::new(Vec::new());
    create(&s, &o).unwrap();
    put(
        &out,
        "open_vhdx",
        "vdisk-diff.vhdx.sparse",
        &vdisk::fuzz::encode_sparse(&s.into_inner(), false),
    );

    // Log seeds: entries for the template of vdisk::fuzz::vhdx_log.
    let t = vdisk::fuzz::vhdx_template();
    let tlen = t.len() as u64;
    let regions =
        vdisk::vhdx::region::read(&vdisk::MemStorage::read_only(t.clone()), tlen).unwrap();
    let bat = regions.bat.offset;
    let mut bat_sector = t[bat as usize..bat as usize + 4096].to_vec();
    // Block 0 fully present at the (new) end of the file.
    bat_sector[..8].copy_from_slice(&(tlen | 6).to_le_bytes());
    let data = vec![0xC3u8; 4096];
    let grown = tlen + (1 << 20);
    // Flushed file offset: the file as it is; last file offset: grown by a block.
    let grow = |mut e: Vec<u8>| {
        e[56..64].copy_from_slice(&grown.to_le_bytes());
        e[4..8].fill(0);
        let crc = vdisk::crc::crc32c(&e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        e
    };
    let one = grow(vdisk::fuzz::vhdx_log_entry(
        1,
        0,
        tlen,
        &[(bat, &bat_sector), (tlen, &data)],
    ));
    put(&out, "vhdx_log", "one-entry", &one);
    // Two entries in sequence, the second's tail pointing at the first.
    let mut two = vdisk::fuzz::vhdx_log_entry(5, 0, tlen, &[(bat + 4096, &[0u8; 4096])]);
    let second = grow(vdisk::fuzz::vhdx_log_entry(
        6,
        0,
        tlen,
        &[(bat, &bat_sector), (tlen + 8192, &data)],
    ));
    two.extend_from_slice(&second);
    put(&out, "vhdx_log", "two-entries", &two);
    // A zero descriptor.
    let mut z = vdisk::fuzz::vhdx_log_entry(3, 0, tlen, &[]);
    {
        // Turn the entry into one with a single zero descriptor: count 1,
        // descriptor "zero" of 1 MiB at the end of the file, CRC redone.
        z[24..28].copy_from_slice(&1u32.to_le_bytes());
        z[64..68].copy_from_slice(b"zero");
        z[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
        z[80..88].copy_from_slice(&tlen.to_le_bytes());
        z[88..96].copy_from_slice(&3u64.to_le_bytes());
        z[48..56].copy_from_slice(&tlen.to_le_bytes());
        z[56..64].copy_from_slice(&(tlen + (1 << 20)).to_le_bytes());
        z[4..8].fill(0);
        let crc = vdisk::crc::crc32c(&z);
        z[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    put(&out, "vhdx_log", "zero-descriptor", &z);
    let total: u64 = TARGETS
        .iter()
        .flat_map(|t| files(&out.join(t)))
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    eprintln!("seed corpus: {total} bytes");
    assert!(total < 2 << 20, "seed corpus too big: {total}");
}

/// Rebuilds `fuzz/corpus-seed/open_vmdk` only: qemu-img's VMDK subformats
/// of a patterned disk (flat and multi-extent ones as the target's
/// descriptor + extent input).
#[test]
#[ignore = "rebuilds fuzz/corpus-seed/open_vmdk; needs qemu-img"]
fn generate_vmdk_seed_corpus() {
    let out = manifest().join("../fuzz/corpus-seed");
    let _ = std::fs::remove_dir_all(out.join("open_vmdk"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut data = vec![0u8; 2 << 20];
    data[..512].fill(0x11);
    data[(1 << 20)..(1 << 20) + 70000].fill(0x22);
    let raw = dir.join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
    ] {
        let d = dir.join(sub);
        std::fs::create_dir(&d).unwrap();
        let img = d.join("d.vmdk");
        common::run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        let mut file = std::fs::read(&img).unwrap();
        let extent = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p != &img);
        if let Some(x) = extent {
            file.resize(file.len().div_ceil(512) * 512, 0);
            file.extend_from_slice(&std::fs::read(x).unwrap());
        }
        put(
            &out,
            "open_vmdk",
            &format!("{sub}.vmdk.sparse"),
            &vdisk::fuzz::encode_sparse(&file, false),
        );
    }
}

/// `cargo test -p vdisk --test fuzz_regressions -- --ignored generate_qcow2_seeds`
/// writes the qcow2 seeds: qemu-img images of a patterned 3 MiB disk with
/// an MBR (plain, 4 KiB and 512-byte clusters, version 2, extended L2,
/// zlib and zstd compressed, an overlay naming a backing file).
#[test]
#[ignore]
fn generate_qcow2_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = manifest().join("../fuzz/corpus-seed");
    let raw_data = patterned_raw(dir, "q.raw", 3 << 20, "label: dos\n,1M,83\n,,83\n");
    let raw = dir.join("q.raw");
    std::fs::write(&raw, &raw_data).unwrap();
    let r = raw.to_str().unwrap();
    for (name, args) in [
        ("plain.qcow2", &["-o", "cluster_size=4k"][..]),
        ("c512.qcow2", &["-o", "cluster_size=512"]),
        ("v2.qcow2", &["-o", "compat=0.10,cluster_size=16k"]),
        ("extl2.qcow2", &["-o", "extended_l2=on,cluster_size=16k"]),
        ("zlib.qcow2", &["-c", "-o", "cluster_size=4k"]),
        (
            "zstd.qcow2",
            &["-c", "-o", "compression_type=zstd,cluster_size=4k"],
        ),
    ] {
        let img = dir.join(name);
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        a.extend_from_slice(args);
        a.extend([r, img.to_str().unwrap()]);
        common::run("qemu-img", &a);
        let enc = vdisk::fuzz::encode_sparse(&std::fs::read(&img).unwrap(), false);
        put(&out, "open_qcow2", &format!("{name}.sparse"), &enc);
    }
    let over = dir.join("over.qcow2");
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            r,
            "-F",
            "raw",
            over.to_str().unwrap(),
        ],
    );
    common::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 1M 64k",
            "-c",
            "write -z 2M 64k",
            over.to_str().unwrap(),
        ],
    );
    let enc = vdisk::fuzz::encode_sparse(&std::fs::read(&over).unwrap(), false);
    put(&out, "open_qcow2", "over.qcow2.sparse", &enc);
}
