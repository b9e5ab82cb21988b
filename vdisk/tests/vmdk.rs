//! VMDK through vdisk against qemu-img: every subformat qemu-img writes
//! reads byte-exact, writes equal the same writes on a raw model and leave
//! `qemu-img check` clean, snapshots (parentCID chains), the CID line, and
//! the read-only kinds (issue 20).

mod common;
mod vhd_util;

use std::path::Path;

use common::{open, pattern, qemu_child, qemu_create, qemu_image_from, qemu_raw, read_all, run};
use vhd_util::{apply_writes, random_writes};

const MIB: u64 = 1 << 20;
const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn check_clean(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vmdk", s(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors"),
        "{}: {text}",
        img.display()
    );
}

#[test]
fn every_qemu_subformat_reads_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    // Not a whole number of 64 KiB grains.
    let size = 9 * MIB + 5 * 512;
    let (model, _) = pattern(20, size as usize);
    for sub in SUBFORMATS {
        let dir = tmp.path().join(sub);
        std::fs::create_dir(&dir).unwrap();
        let img = qemu_image_from(&model, &dir, "d.vmdk", "vmdk", &format!("subformat={sub}"));
        let disk = open(&img, false).unwrap();
        assert_eq!(disk.size(), size, "{sub}");
        assert_eq!(disk.format(), vdisk::Format::Vmdk);
        assert!(read_all(&disk) == model, "{sub}: data differs");
        assert!(
            qemu_raw(&img, "vmdk") == model,
            "{sub}: qemu disagrees with the model"
        );
    }
}

/// Random unaligned writes equal a raw model as qemu-img reads them back,
/// and qemu-img check is clean.
fn write_case(sub: &str, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let size = 12 * MIB + 3 * 512;
    let (mut model, _) = pattern(seed, size as usize);
    let img = qemu_image_from(
        &model,
        tmp.path(),
        "d.vmdk",
        "vmdk",
        &format!("subformat={sub}"),
    );
    let ops = random_writes(seed, size, 64 << 10, 40);
    apply_writes(&mut model, &ops);
    {
        let disk = open(&img, true).unwrap();
        for (off, d) in &ops {
            disk.write_at(d, *off).unwrap();
        }
        assert!(
            read_all(&disk) == model,
            "{sub}: vdisk reads back other data"
        );
        disk.flush().unwrap();
    }
    assert!(
        qemu_raw(&img, "vmdk") == model,
        "{sub}: qemu reads other data"
    );
    check_clean(&img);
}

#[test]
fn writes_into_sparse_and_flat_kinds_equal_a_raw_model() {
    for (i, sub) in SUBFORMATS[..4].iter().enumerate() {
        write_case(sub, 40 + i as u64);
    }
}

#[test]
fn extents_of_two_gib_split_the_disk_where_qemu_does() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * 1024 * MIB + MIB;
    let boundary = 2048 * MIB;
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let dir = tmp.path().join(sub);
        std::fs::create_dir(&dir).unwrap();
        let img = dir.join("d.vmdk");
        qemu_create(&img, "vmdk", &format!("subformat={sub}"), &size.to_string());
        run(
            "qemu-io",
            &[
                "-c",
                &format!("write -P 0x3c {} 131072", boundary - 65536),
                s(&img),
            ],
        );
        let disk = open(&img, true).unwrap();
        assert_eq!(disk.size(), size);
        let mut b = vec![0u8; 262144];
        disk.read_at(&mut b, boundary - 131072).unwrap();
        assert!(b[..65536].iter().all(|&x| x == 0));
        assert!(b[65536..196608].iter().all(|&x| x == 0x3c), "{sub}");
        assert!(b[196608..].iter().all(|&x| x == 0));
        // A write across the boundary and one into the last extent.
        disk.write_at(&[0x5e; 70000], boundary - 35000).unwrap();
        disk.write_at(&[0x6f; 1000], size - 1000).unwrap();
        drop(disk);
        let verify = |pattern: u8, off: u64, len: u64| {
            let out = std::process::Command::new("qemu-io")
                .args(["-r", "-f", "vmdk", "-c"])
                .arg(format!("read -P {pattern:#x} {off} {len}"))
                .arg(&img)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("verification failed"),
                "{sub}: qemu reads other data at {off}: {text}"
            );
        };
        verify(0x3c, boundary - 65536, 65536 - 35000);
        verify(0x5e, boundary - 35000, 70000);
        verify(0x3c, boundary + 35000, 65536 - 35000);
        verify(0x6f, size - 1000, 1000);
        check_clean(&img);
    }
}

#[test]
fn child_reads_through_parent_and_writes_leave_it_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 6 * MIB;
    let (mut model, _) = pattern(60, size as usize);
    let base = qemu_image_from(&model, dir, "base.vmdk", "vmdk", "");
    let child = dir.join("child.vmdk");
    qemu_child(&child, "vmdk", "", "base.vmdk", "vmdk", None);
    run("qemu-io", &["-c", "write -P 0x77 1M 100k", s(&child)]);
    model[MIB as usize..MIB as usize + 102400].fill(0x77);
    let before = std::fs::read(&base).unwrap();
    {
        let disk = open(&child, false).unwrap();
        assert_eq!(disk.layers().len(), 2);
        assert!(read_all(&disk) == model);
    }
    let ops = random_writes(61, size, 64 << 10, 30);
    apply_writes(&mut model, &ops);
    {
        let disk = open(&child, true).unwrap();
        for (off, d) in &ops {
            disk.write_at(d, *off).unwrap();
        }
    }
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the parent was written"
    );
    assert!(qemu_raw(&child, "vmdk") == model);
    check_clean(&child);
}

#[test]
fn child_of_a_changed_parent_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("base.vmdk");
    qemu_create(&base, "vmdk", "", "4M");
    let child = dir.join("child.vmdk");
    qemu_child(&child, "vmdk", "", "base.vmdk", "vmdk", None);
    // Written after the snapshot: the parent gets a new CID.
    {
        let disk = open(&base, true).unwrap();
        disk.write_at(&[1u8; 512], 0).unwrap();
    }
    let e = open(&child, false).unwrap_err().to_string();
    assert!(
        e.contains("parentCID is") && e.contains("base.vmdk has CID"),
        "{e}"
    );
    std::fs::remove_file(&base).unwrap();
    let e = open(&child, false).unwrap_err().to_string();
    assert!(e.contains("base.vmdk"), "{e}");
}

#[test]
fn first_write_changes_only_the_cid_line() {
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["monolithicFlat", "monolithicSparse"] {
        let img = tmp.path().join(format!("{sub}.vmdk"));
        qemu_create(&img, "vmdk", &format!("subformat={sub}"), "2M");
        let text = |p: &Path| {
            let b = std::fs::read(p).unwrap();
            let at = if sub == "monolithicSparse" { 512 } else { 0 };
            String::from_utf8_lossy(&b[at..(at + 2048).min(b.len())])
                .trim_end_matches('\0')
                .to_string()
        };
        let before = text(&img);
        let disk = open(&img, true).unwrap();
        let mut b = vec![0u8; 4096];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(text(&img), before, "{sub}: a read changed the descriptor");
        disk.write_at(&[9u8; 4096], 8192).unwrap();
        drop(disk);
        let after = text(&img);
        let changed: Vec<_> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1, "{sub}: {changed:?}");
        assert!(changed[0].0.starts_with("CID=") && changed[0].1.starts_with("CID="));
        assert_eq!(before.len(), after.len());
        check_clean(&img);
    }
}

#[test]
fn stream_optimized_refuses_writes_and_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = pattern(70, 3 * MIB as usize);
    let img = qemu_image_from(
        &model,
        tmp.path(),
        "s.vmdk",
        "vmdk",
        "subformat=streamOptimized",
    );
    let before = std::fs::read(&img).unwrap();
    let disk = open(&img, true).unwrap();
    assert!(!disk.is_writable());
    for off in [0, 65536, 2 * MIB] {
        let e = disk.write_at(&[1u8; 4096], off).unwrap_err();
        assert!(matches!(e, vdisk::Error::ReadOnly), "{e}");
    }
    assert!(read_all(&disk) == model);
    drop(disk);
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn missing_extent_and_corrupt_tables_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = dir.join("f.vmdk");
    qemu_create(&img, "vmdk", "subformat=monolithicFlat", "1M");
    std::fs::remove_file(dir.join("f-flat.vmdk")).unwrap();
    let e = open(&img, false).unwrap_err().to_string();
    assert!(e.contains("f-flat.vmdk"), "{e}");
    // A grain table entry past the end of the file.
    let sp = dir.join("s.vmdk");
    qemu_create(&sp, "vmdk", "", "1M");
    run("qemu-io", &["-c", "write -P 1 0 64k", s(&sp)]);
    let mut b = std::fs::read(&sp).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    b[gt..gt + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    std::fs::write(&sp, &b).unwrap();
    let disk = open(&sp, false).unwrap();
    let e = disk.read_at(&mut [0u8; 512], 0).unwrap_err().to_string();
    assert!(e.contains("outside the file"), "{e}");
}

/// A seSparse extent built from the layout qemu reads (ESXi writes them;
/// qemu-img cannot): qemu and vdisk must read the same disk.
#[test]
fn se_sparse_reads_like_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let put = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let sectors = 81920u64; // 40 MiB: 3 directory entries of 16 MiB
    let (tables, grains) = (3u64, 3 + 3 * 64);
    let mut f = vec![0u8; (grains as usize + 4098 * 8) * 512];
    for (at, v) in [
        (0, 0xcafe_babe),
        (8, 0x0000_0002_0000_0001),
        (16, sectors),
        (24, 8),
        (32, 64),
        (80, 1),
        (88, 1),
        (128, 2),
        (136, 1),
        (144, tables),
        (152, 3 * 64),
        (192, grains),
        (200, 4098 * 8),
    ] {
        put(&mut f, at, v);
    }
    put(&mut f, 512, 0xcafe_cafe);
    // Directory: table 0 for grains 0..4096, table 1 for grains 8192..
    put(&mut f, 1024, 0x1000_0000_0000_0000);
    put(&mut f, 1024 + 16, 0x1000_0000_0000_0001);
    let enc = |index: u64| 0x3000_0000_0000_0000 | ((index & 0xfff) << 48) | (index >> 12);
    let table = |t: u64, g: u64| ((tables + t * 64) * 512 + g * 8) as usize;
    put(&mut f, table(0, 0), enc(0));
    put(&mut f, table(0, 1), 0x2000_0000_0000_0000);
    put(&mut f, table(0, 3), enc(1));
    put(&mut f, table(1, 7), enc(4097));
    let grain = |i: u64| (grains * 512 + i * 4096) as usize;
    for (i, b) in [(0u64, 0x10u8), (1, 0x31), (4097, 0x47)] {
        f[grain(i)..grain(i) + 4096].fill(b);
    }
    std::fs::write(tmp.path().join("s-sesparse.vmdk"), &f).unwrap();
    let desc = tmp.path().join("s.vmdk");
    std::fs::write(
        &desc,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=11111111\nparentCID=ffffffff\n\
             createType=\"seSparse\"\n\n# Extent description\nRW {sectors} SESPARSE \"s-sesparse.vmdk\"\n\n\
             # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n"
        ),
    )
    .unwrap();
    let want = qemu_raw(&desc, "vmdk");
    assert_eq!(want.len() as u64, sectors * 512);
    assert!(
        want[..4096].iter().all(|&b| b == 0x10),
        "qemu reads the layout otherwise"
    );
    assert!(want[3 * 4096..4 * 4096].iter().all(|&b| b == 0x31));
    let at = (8192 + 7) * 4096;
    assert!(want[at..at + 4096].iter().all(|&b| b == 0x47));
    let disk = open(&desc, true).unwrap();
    assert!(!disk.is_writable(), "seSparse is read-only here");
    assert!(read_all(&disk) == want);
}

/// With qemu's zeroed_grain=on, zeros written over a whole unallocated grain
/// of a child become a zeroed-grain entry: no grain is stored, the parent is
/// hidden, qemu reads zeros.
#[test]
fn zeros_over_a_parent_grain_use_a_zeroed_grain_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, _) = pattern(120, 4 * MIB as usize);
    qemu_image_from(&model, dir, "base.vmdk", "vmdk", "");
    let child = dir.join("child.vmdk");
    qemu_child(&child, "vmdk", "zeroed_grain=on", "base.vmdk", "vmdk", None);
    let before = std::fs::metadata(&child).unwrap().len();
    {
        let disk = open(&child, true).unwrap();
        disk.write_at(&vec![0u8; 3 * 65536], MIB).unwrap();
    }
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        before,
        "grains were stored"
    );
    let mut want = model.clone();
    want[MIB as usize..MIB as usize + 3 * 65536].fill(0);
    assert!(qemu_raw(&child, "vmdk") == want);
    check_clean(&child);
}
