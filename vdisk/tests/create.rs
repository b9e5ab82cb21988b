//! Image creation and snapshots (`vdisk::create`, `vdisk::snapshot`): every
//! format, fixed and dynamic, odd sizes and block sizes, written through
//! `Disk::write_at` and checked against a model, `qemu-img check` (VDI, VHDX)
//! and `qemu-img convert` (all three); differencing chains of depth 3 per
//! format read back through the chain, with the parents unchanged by writes
//! to their children. libvhdi (pyvhdi) reads the VHD chains too, where
//! installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, qemu_raw, read_all, run};
use vdisk::{CreateOptions, Disk, Format, Storage};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

fn ext(f: Format) -> &'static str {
    match f {
        Format::Vhd => "vhd",
        Format::Vhdx => "vhdx",
        Format::Vdi => "vdi",
        Format::Raw => "raw",
        Format::Vmdk => "vmdk",
        Format::Qcow2 => "qcow2",
    }
}

/// qemu's name for the format.
fn qemu_fmt(f: Format) -> &'static str {
    match f {
        Format::Vhd => "vpc",
        Format::Vhdx => "vhdx",
        Format::Vdi => "vdi",
        Format::Raw => "raw",
        Format::Vmdk => "vmdk",
        Format::Qcow2 => "qcow2",
    }
}

fn new_file(path: &Path) -> Box<dyn Storage> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    Box::new((f, true))
}

fn ro_file(path: &Path) -> Box<dyn Storage> {
    Box::new((std::fs::File::open(path).unwrap(), false))
}

fn create(path: &Path, opts: CreateOptions) -> vdisk::NewImage {
    let s = new_file(path);
    vdisk::create(s.as_ref(), opts).unwrap_or_else(|e| panic!("create {opts:?}: {e}"))
}

fn snapshot(parent: &Path, child: &Path) -> vdisk::NewImage {
    let p = ro_file(parent);
    let c = new_file(child);
    vdisk::snapshot(parent, p.as_ref(), c.as_ref(), child)
        .unwrap_or_else(|e| panic!("snapshot {}: {e}", parent.display()))
}

/// Random unaligned writes (data and zeros) to `disk` and to `model`.
/// With `align`, offsets and lengths are multiples of it (as guest I/O is).
fn random_writes(disk: &Disk, model: &mut [u8], seed: u64, count: usize, align: usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let size = model.len();
    for i in 0..count {
        let off = rng.next() as usize % size / align * align;
        let len = ((1 + rng.next() as usize % (200 * KIB as usize)).next_multiple_of(align))
            .min(size - off);
        let data: Vec<u8> = if i % 4 == 3 {
            vec![0; len]
        } else {
            (0..len).map(|_| rng.next() as u8 | 1).collect()
        };
        disk.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    // The last sector and the first one, always.
    let tail = vec![0xA5u8; 700usize.next_multiple_of(align).min(size)];
    let at = size - tail.len();
    disk.write_at(&tail, at as u64).unwrap();
    model[at..].copy_from_slice(&tail);
    let first = vec![0x5Au8; align.max(5)];
    disk.write_at(&first, 0).unwrap();
    model[..first.len()].copy_from_slice(&first);
    disk.flush().unwrap();
}

fn qemu_check(img: &Path, f: Format) {
    run(
        "qemu-img",
        &["check", "-f", qemu_fmt(f), img.to_str().unwrap()],
    );
}

fn qemu_virtual_size(img: &Path, f: Format) -> u64 {
    let out = run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-f",
            qemu_fmt(f),
            img.to_str().unwrap(),
        ],
    );
    let at = out
        .rfind("\"virtual-size\":")
        .expect("virtual-size in qemu-img info")
        + 15;
    out[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn create_every_format_kind_size_and_block_size() {
    let tmp = tempfile::tempdir().unwrap();
    // (format, block sizes, sector size)
    let cases: &[(Format, &[Option<u32>], u32)] = &[
        (
            Format::Vhd,
            &[None, Some(512 * KIB as u32), Some(4 << 20)],
            512,
        ),
        (Format::Vdi, &[None, Some(256 * KIB as u32)], 512),
        (Format::Vhdx, &[None, Some(MIB as u32)], 512),
        (Format::Vhdx, &[Some(MIB as u32)], 4096),
    ];
    // Odd sizes: not a whole block, not a whole MiB, one not a whole sector.
    let sizes = [3 * MIB + 7 * 512, 9 * MIB + 4096 * 3, 5 * MIB + 100];
    let mut n = 0;
    for &(format, block_sizes, ss) in cases {
        for &fixed in &[false, true] {
            for &bs in block_sizes {
                for &size in &sizes {
                    n += 1;
                    let path = tmp.path().join(format!("i{n}.{}", ext(format)));
                    let opts = CreateOptions {
                        format,
                        size,
                        fixed,
                        block_size: bs,
                        logical_sector_size: ss,
                    };
                    let made = create(&path, opts);
                    let want_size = size.next_multiple_of(ss as u64);
                    assert_eq!(made.size, want_size, "{opts:?}");
                    assert_eq!(made.format, format);
                    let disk =
                        common::open(&path, true).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
                    assert_eq!(disk.size(), want_size, "{opts:?}");
                    assert_eq!(disk.logical_sector_size(), ss, "{opts:?}");
                    assert_eq!(disk.layers()[0].link_id(), made.link_id);
                    let mut model = vec![0u8; want_size as usize];
                    assert!(
                        read_all(&disk).iter().all(|&b| b == 0),
                        "{opts:?}: new image not zero"
                    );
                    random_writes(&disk, &mut model, n, 12, 1);
                    drop(disk);
                    let disk = common::open(&path, false).unwrap();
                    assert!(read_all(&disk) == model, "{opts:?}: read back differs");
                    drop(disk);
                    // QEMU: 1 MiB VDI blocks only, 512-byte VHDX sectors only.
                    let qemu_reads = match format {
                        Format::Vdi => bs.unwrap_or(1 << 20) == 1 << 20,
                        Format::Vhdx => ss == 512,
                        Format::Vhd | Format::Raw | Format::Vmdk | Format::Qcow2 => true,
                    };
                    if qemu_reads {
                        if format != Format::Vhd {
                            qemu_check(&path, format);
                        }
                        assert_eq!(qemu_virtual_size(&path, format), want_size, "{opts:?}");
                        assert!(
                            qemu_raw(&path, qemu_fmt(format)) == model,
                            "{opts:?}: qemu-img reads differently"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = [
        CreateOptions {
            logical_sector_size: 4096,
            ..CreateOptions::new(Format::Vhd, MIB)
        },
        CreateOptions {
            logical_sector_size: 1024,
            ..CreateOptions::new(Format::Vhdx, MIB)
        },
        CreateOptions {
            block_size: Some(3 << 20),
            ..CreateOptions::new(Format::Vhd, MIB)
        },
        CreateOptions {
            block_size: Some(256),
            ..CreateOptions::new(Format::Vdi, MIB)
        },
        CreateOptions {
            block_size: Some(512 << 10),
            ..CreateOptions::new(Format::Vhdx, MIB)
        },
        CreateOptions::new(Format::Vhd, 0),
        CreateOptions::new(Format::Vhd, 3 << 40),
    ];
    for (i, opts) in bad.into_iter().enumerate() {
        let s = new_file(&tmp.path().join(format!("b{i}")));
        assert!(
            vdisk::create(s.as_ref(), opts).is_err(),
            "{opts:?} accepted"
        );
    }
    // Not an empty file.
    let p = tmp.path().join("full.vhd");
    std::fs::write(&p, b"x").unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    assert!(vdisk::create(&(f, true), CreateOptions::new(Format::Vhd, MIB)).is_err());
}

/// Whether libvhdi's Python binding is there (Debian: python3-libvhdi).
fn have_pyvhdi() -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", "import pyvhdi"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The virtual disk of a VHD or VHDX chain as libvhdi reads it (`chain` top first).
fn pyvhdi_read(chain: &[PathBuf]) -> Vec<u8> {
    let script = r#"
import sys, pyvhdi
files = []
for p in sys.argv[1:]:
    f = pyvhdi.file(); f.open(p); files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
top = files[0]
sys.stdout.buffer.write(top.read_buffer(top.get_media_size()))
"#;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(script);
    for p in chain {
        cmd.arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pyvhdi: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A chain: base, then three snapshots in sub-folders, with writes at every
/// level; each level reads its model through the chain, and writing a child
/// never changes a byte of its parents.
///
/// libvhdi (20210425) reads the sectors after a present sector of a 4 KiB
/// group in a differencing VHD as zeros instead of the parent's: it is
/// compared only on chains written in 4 KiB units (`align`), as guests and
/// Windows write.
fn chain(format: Format, base_fixed: bool, sector: u32, block_size: Option<u32>, align: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("chain");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    let e = ext(format);
    let paths = [
        root.join(format!("base.{e}")),
        root.join(format!("a/s1.{e}")),
        root.join(format!("a/s2.{e}")),
        root.join(format!("a/b/s3.{e}")),
    ];
    let size = 11 * MIB + 3 * 4096;
    let opts = CreateOptions {
        format,
        size,
        fixed: base_fixed,
        block_size,
        logical_sector_size: sector,
    };
    create(&paths[0], opts);
    let mut model = vec![0u8; size as usize];
    let mut models = Vec::new();
    for level in 0..paths.len() {
        let path = &paths[level];
        if level > 0 {
            let made = snapshot(&paths[level - 1], path);
            // The parent's identity now (a VHDX renews DataWriteGuid when written).
            let parent_id = common::open(&paths[level - 1], false).unwrap().layers()[0].link_id();
            assert_eq!(made.parent_id, Some(parent_id), "{format} level {level}");
            assert_eq!(made.size, size);
            // Before any write the child is its parent.
            let disk =
                common::open(path, false).unwrap_or_else(|e| panic!("{format} level {level}: {e}"));
            assert_eq!(disk.layers().len(), level + 1);
            assert_eq!(disk.logical_sector_size(), sector);
            assert!(
                read_all(&disk) == model,
                "{format} level {level}: fresh child differs from parent"
            );
        }
        let before: Vec<Vec<u8>> = paths[..level]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let disk = common::open(path, true).unwrap();
        random_writes(&disk, &mut model, 100 + level as u64, 10, align);
        assert!(
            read_all(&disk) == model,
            "{format} level {level}: read back through the chain differs"
        );
        drop(disk);
        for (p, old) in paths[..level].iter().zip(&before) {
            assert!(
                std::fs::read(p).unwrap() == *old,
                "{format}: writing {} changed {}",
                path.display(),
                p.display()
            );
        }
        models.push(model.clone());
    }
    // Every level still reads what it held, through its own chain.
    for (level, path) in paths.iter().enumerate() {
        let disk = common::open(path, false).unwrap();
        assert!(
            read_all(&disk) == models[level],
            "{format} level {level} reread"
        );
    }
    if format != Format::Vhd || base_fixed {
        // VHDX: QEMU refuses children; VDI: QEMU refuses children. The base is checked.
        if format != Format::Vhd
            && sector == 512
            && block_size.is_none_or(|b| format != Format::Vdi || b == 1 << 20)
        {
            qemu_check(&paths[0], format);
        }
    }
    // The locators are relative: the chain moves as a folder.
    let moved = tmp.path().join("moved");
    std::fs::rename(&root, &moved).unwrap();
    let top = moved.join(paths[3].strip_prefix(&root).unwrap());
    let disk = common::open(&top, false).unwrap_or_else(|e| panic!("{format} moved chain: {e}"));
    assert!(read_all(&disk) == models[3], "{format} moved chain");
    drop(disk);
    // libvhdi reads VHD chains written in 4 KiB units (see above) and VHDX
    // chains (whole blocks are copied on write).
    let libvhdi_reads =
        (format == Format::Vhd && align.is_multiple_of(4096)) || format == Format::Vhdx;
    if libvhdi_reads && have_pyvhdi() {
        let chain: Vec<PathBuf> = paths
            .iter()
            .rev()
            .map(|p| moved.join(p.strip_prefix(&root).unwrap()))
            .collect();
        for level in 0..chain.len() {
            let got = pyvhdi_read(&chain[chain.len() - 1 - level..]);
            let at = got.iter().zip(&models[level]).position(|(a, b)| a != b);
            assert!(
                got.len() == models[level].len() && at.is_none(),
                "libvhdi reads level {level} differently at {at:?}"
            );
        }
    } else if libvhdi_reads {
        eprintln!(
            "pyvhdi not installed (python3-libvhdi): {format} chain not checked with libvhdi"
        );
    }
}

#[test]
fn vhd_chain() {
    chain(Format::Vhd, false, 512, None, 1);
}

#[test]
fn vhd_chain_4k_writes_libvhdi() {
    chain(Format::Vhd, false, 512, None, 4096);
}

#[test]
fn vhd_chain_on_fixed_base_small_blocks() {
    chain(Format::Vhd, true, 512, Some(64 * KIB as u32), 4096);
}

#[test]
fn vhdx_chain() {
    chain(Format::Vhdx, false, 512, Some(MIB as u32), 1);
}

#[test]
fn vhdx_chain_4k_fixed_base() {
    chain(Format::Vhdx, true, 4096, Some(2 * MIB as u32), 1);
}

#[test]
fn qcow2_chain() {
    chain(Format::Qcow2, false, 512, Some(4 * KIB as u32), 1);
}

#[test]
fn vdi_chain() {
    chain(Format::Vdi, false, 512, None, 1);
}

#[test]
fn vdi_chain_fixed_base() {
    chain(Format::Vdi, true, 512, Some(512 * KIB as u32), 1);
}

/// The identity links each format defines, read back with the formats' own parsers.
#[test]
fn snapshot_identity_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("kids")).unwrap();

    // VHD: footer type 4, header parent id/time/name, W2ru, W2ku, MacX.
    let p = d.join("p a.vhd");
    create(&p, CreateOptions::new(Format::Vhd, 5 * MIB));
    let c = d.join("kids/c.vhd");
    snapshot(&p, &c);
    let pf = std::fs::read(&p).unwrap();
    let cf = std::fs::read(&c).unwrap();
    let footer = vdisk::vhd::footer::Footer::parse(&cf[cf.len() - 512..]).unwrap();
    assert_eq!(footer.disk_type, vdisk::vhd::footer::DiskType::Differencing);
    assert!(footer.checksum_ok);
    assert_eq!(&cf[..512], &cf[cf.len() - 512..], "footer copy at 0");
    let pfoot = vdisk::vhd::footer::Footer::parse(&pf[pf.len() - 512..]).unwrap();
    let h = vdisk::vhd::dynamic_header::DynamicHeader::parse(&cf[512..1536]).unwrap();
    assert!(h.checksum_ok);
    assert_eq!(h.parent_unique_id, pfoot.unique_id);
    assert_eq!(
        h.parent_timestamp.to_be_bytes(),
        pf[pf.len() - 512 + 24..pf.len() - 512 + 28]
    );
    assert_eq!(h.parent_name, "p a.vhd");
    let locs: Vec<(String, String)> = h
        .locators
        .iter()
        .filter(|l| l.is_used())
        .map(|l| {
            let data = &cf[l.data_offset as usize..(l.data_offset + l.data_length as u64) as usize];
            let text = if &l.platform_code == b"MacX" {
                String::from_utf8(data.to_vec()).unwrap()
            } else {
                String::from_utf16(
                    &data
                        .chunks(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                )
                .unwrap()
            };
            (String::from_utf8_lossy(&l.platform_code).into_owned(), text)
        })
        .collect();
    let abs = p.to_str().unwrap();
    assert_eq!(
        locs,
        vec![
            ("W2ru".into(), r"..\p a.vhd".into()),
            ("W2ku".into(), abs.replace('/', "\\")),
            ("MacX".into(), format!("file://{}", abs.replace(' ', "%20"))),
        ]
    );

    // VHDX: parent_linkage = DataWriteGuid, same page 83 id and sector size.
    let p = d.join("p.vhdx");
    create(
        &p,
        CreateOptions {
            logical_sector_size: 4096,
            ..CreateOptions::new(Format::Vhdx, 5 * MIB)
        },
    );
    let c = d.join("kids/c.vhdx");
    let made = snapshot(&p, &c);
    let read_meta = |path: &Path| {
        let s = ro_file(path);
        let regions = vdisk::vhdx::region::read(s.as_ref(), s.len().unwrap()).unwrap();
        let (h, _) = vdisk::vhdx::header::read_current(s.as_ref()).unwrap();
        (
            h,
            vdisk::vhdx::metadata::read(s.as_ref(), regions.metadata).unwrap(),
        )
    };
    let (ph, pm) = read_meta(&p);
    let (_, cm) = read_meta(&c);
    assert!(cm.has_parent && !pm.has_parent);
    assert_eq!(cm.page83, pm.page83);
    assert_eq!(cm.logical_sector_size, 4096);
    assert_eq!(
        cm.locator("parent_linkage"),
        Some(ph.data_write_guid.to_string().to_ascii_lowercase().as_str())
    );
    assert_eq!(made.parent_id, Some(ph.data_write_guid.0));
    assert_eq!(cm.locator("relative_path"), Some(r"..\p.vhdx"));
    assert_eq!(
        cm.locator("absolute_win32_path"),
        Some(p.to_str().unwrap().replace('/', "\\").as_str())
    );

    // VDI: type 4, uuidLinkage = parent uuidCreate, uuidParentModify = parent uuidModify.
    let p = d.join("p.vdi");
    create(&p, CreateOptions::new(Format::Vdi, 5 * MIB));
    let c = d.join("kids/c.vdi");
    snapshot(&p, &c);
    let hdr = |path: &Path| {
        let b = std::fs::read(path).unwrap();
        let raw: [u8; 512] = b[..512].try_into().unwrap();
        vdisk::vdi::header::Header::parse(&raw, b.len() as u64).unwrap()
    };
    let (ph, ch) = (hdr(&p), hdr(&c));
    assert_eq!(ch.image_type, vdisk::vdi::header::ImageType::Diff);
    assert_eq!(ch.uuid_linkage, ph.uuid_create);
    assert_eq!(ch.uuid_parent_modify, ph.uuid_modify);
    assert_eq!(
        (ch.disk_size, ch.block_size, ch.blocks),
        (ph.disk_size, ph.block_size, ph.blocks)
    );
    // The VDI child in a sub-folder finds its parent in the folder above.
    let disk = common::open(&c, false).unwrap();
    assert_eq!(disk.layers().len(), 2);
}

/// qemu-img reads a VHD child's own blocks (it ignores the parent): what we
/// wrote into the child is where qemu expects it.
#[test]
fn qemu_reads_vhd_child_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.vhd");
    let c = tmp.path().join("c.vhd");
    create(&p, CreateOptions::new(Format::Vhd, 6 * MIB));
    snapshot(&p, &c);
    let disk = common::open(&c, true).unwrap();
    // Whole blocks only: qemu ignores bitmaps, a partial block shows zeros for the parent part.
    let data: Vec<u8> = (0..2 * MIB as usize).map(|i| (i % 253) as u8).collect();
    disk.write_at(&data, 2 * MIB).unwrap();
    drop(disk);
    let raw = qemu_raw(&c, "vpc");
    assert!(raw[2 * MIB as usize..4 * MIB as usize] == data[..]);
}
