//! VHDX through vdisk, checked against qemu-img (the independent reader, writer
//! checker and log replayer), and against images built here from the spec
//! where qemu has no writer (differencing, 4 KiB sectors, dirty logs).

mod common;

use std::path::{Path, PathBuf};

use common::{Rng, open, pattern, qemu_image_from, qemu_raw, read_all, run};
use vdisk::crc::crc32c;
use vdisk::vhdx::{CreateOptions, ParentInfo, create};
use vdisk::{Disk, Error, Format, MemStorage, OpenOptions};

const MIB: u64 = 1 << 20;
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A dynamic or fixed VHDX made by qemu-img from `data`.
fn qemu_vhdx(data: &[u8], dir: &Path, name: &str, opts: &str) -> PathBuf {
    qemu_image_from(data, dir, name, "vhdx", opts)
}

/// The BAT offset from region table 1.
fn bat_offset(file: &[u8]) -> u64 {
    let t = 192 * 1024;
    let count = le32(file, t + 8) as usize;
    (0..count)
        .map(|i| t + 16 + 32 * i)
        .find(|&e| file[e..e + 16] == BAT_GUID)
        .map(|e| le64(file, e + 16))
        .expect("BAT region")
}

/// Slot (0 or 1) of the current header: the higher sequence number.
fn current_header(file: &[u8]) -> usize {
    if le64(file, 128 * 1024 + 8) > le64(file, 64 * 1024 + 8) {
        1
    } else {
        0
    }
}

/// The two-header update of MS-VHDX 2.2.2.1, done twice, setting the LogGuid.
fn set_log_guid(file: &mut [u8], guid: [u8; 16]) {
    for _ in 0..2 {
        let cur = current_header(file);
        let (from, to) = ((1 + cur) * 65536, (2 - cur) * 65536);
        let mut h = file[from..from + 4096].to_vec();
        let seq = le64(&h, 8) + 1;
        put64(&mut h, 8, seq);
        h[48..64].copy_from_slice(&guid);
        put32(&mut h, 4, 0);
        let crc = crc32c(&h);
        put32(&mut h, 4, crc);
        file[to..to + 4096].copy_from_slice(&h);
    }
}

/// Random unaligned writes applied both through vdisk and to `model`.
fn random_writes(disk: &Disk, model: &mut [u8], seed: u64, count: usize, max_len: usize) {
    let mut rng = Rng(seed | 1);
    for _ in 0..count {
        let len = 1 + rng.next() as usize % max_len;
        let len = len.min(model.len());
        let off = rng.next() as usize % (model.len() - len + 1);
        let fill = rng.next() as u8;
        let buf: Vec<u8> = (0..len)
            .map(|i| fill.wrapping_add((i * 7 % 253) as u8))
            .collect();
        disk.write_at(&buf, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&buf);
    }
}

fn qemu_check(img: &Path) {
    let out = run("qemu-img", &["check", "-f", "vhdx", img.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{out}");
}

#[test]
fn reads_qemu_images() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64)] = &[
        (
            "subformat=dynamic,block_size=1M,log_size=1M",
            9 * MIB + 3 * 512,
        ),
        (
            "subformat=dynamic,block_size=8M,log_size=4M",
            21 * MIB + 512,
        ),
        ("subformat=dynamic,block_size=32M", 40 * MIB - 512),
        ("subformat=fixed,block_size=8M", 13 * MIB + 7 * 512),
        ("subformat=fixed,block_size=1M,log_size=2M", 5 * MIB + 512),
    ];
    for (i, &(opts, size)) in cases.iter().enumerate() {
        let (data, _) = pattern(i as u64 + 1, size as usize);
        let img = qemu_vhdx(&data, tmp.path(), &format!("r{i}.vhdx"), opts);
        let disk = open(&img, false).unwrap();
        assert_eq!(disk.size(), size, "{opts}");
        assert_eq!(disk.logical_sector_size(), 512);
        assert_eq!(disk.format(), Format::Vhdx);
        assert!(read_all(&disk) == data, "{opts}: contents differ");
        assert!(
            qemu_raw(&img, "vhdx") == data,
            "{opts}: qemu disagrees with the source"
        );
    }
}

#[test]
fn random_writes_match_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64)] = &[
        ("subformat=dynamic,block_size=1M", 11 * MIB + 512),
        ("subformat=dynamic,block_size=8M,log_size=1M", 30 * MIB),
        ("subformat=dynamic,block_size=32M", 70 * MIB - 1024),
        ("subformat=dynamic,block_size=256M", 20 * MIB),
        ("subformat=fixed,block_size=8M", 17 * MIB + 512),
    ];
    for (i, &(opts, size)) in cases.iter().enumerate() {
        let (mut model, _) = pattern(100 + i as u64, size as usize);
        // Leave holes so that writes allocate blocks.
        let mut rng = Rng(7 + i as u64);
        for chunk in model.chunks_mut(3 * MIB as usize) {
            if rng.next().is_multiple_of(2) {
                chunk.fill(0);
            }
        }
        let img = qemu_vhdx(&model, tmp.path(), &format!("w{i}.vhdx"), opts);
        {
            let disk = open(&img, true).unwrap();
            random_writes(&disk, &mut model, 1000 + i as u64, 40, 3 * MIB as usize);
            // A large write crossing several blocks: one log entry.
            let big: Vec<u8> = (0..(5 * MIB + 1234) as usize)
                .map(|x| (x % 249) as u8)
                .collect();
            let at = (size as usize - big.len()) / 3 + 17;
            disk.write_at(&big, at as u64).unwrap();
            model[at..at + big.len()].copy_from_slice(&big);
            disk.flush().unwrap();
            assert!(read_all(&disk) == model, "{opts}: read back through vdisk");
        }
        qemu_check(&img);
        assert!(
            qemu_raw(&img, "vhdx") == model,
            "{opts}: qemu reads something else"
        );
        let disk = open(&img, false).unwrap();
        assert!(read_all(&disk) == model, "{opts}: after reopening");
    }
}

#[test]
fn own_images_pass_qemu_check() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, fixed) in [false, true].into_iter().enumerate() {
        let path = tmp.path().join(format!("own{i}.vhdx"));
        let file = std::fs::File::create_new(&path).unwrap();
        let mut opts = CreateOptions::dynamic(12 * MIB + 512);
        opts.block_size = 2 << 20;
        opts.fixed = fixed;
        create(&(file, true), &opts).unwrap();
        qemu_check(&path);
        let mut model = vec![0u8; opts.virtual_size as usize];
        {
            let disk = open(&path, true).unwrap();
            random_writes(&disk, &mut model, 55 + i as u64, 30, MIB as usize);
        }
        qemu_check(&path);
        assert!(qemu_raw(&path, "vhdx") == model);
    }
}

#[test]
fn four_k_sectors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("4k.vhdx");
    let file = std::fs::File::create_new(&path).unwrap();
    let mut opts = CreateOptions::dynamic(24 * MIB + 4096);
    opts.block_size = 1 << 20;
    opts.logical_sector_size = 4096;
    create(&(file, true), &opts).unwrap();
    let mut model = vec![0u8; opts.virtual_size as usize];
    {
        let disk = open(&path, true).unwrap();
        assert_eq!(disk.logical_sector_size(), 4096);
        assert_eq!(disk.physical_sector_size(), 4096);
        random_writes(&disk, &mut model, 4096, 60, 2 * MIB as usize);
        assert!(read_all(&disk) == model);
    }
    let disk = open(&path, false).unwrap();
    assert_eq!(disk.logical_sector_size(), 4096);
    assert!(read_all(&disk) == model);
    // qemu 10 refuses 4 KiB logical sectors: nothing more to compare with.
}

/// One log entry, encoded from MS-VHDX 2.3.1 (independently of vdisk's writer).
/// `data`: (file offset, 4096 bytes); `zeros`: (file offset, length).
fn log_entry(
    guid: [u8; 16],
    seq: u64,
    tail: u32,
    file_len: u64,
    data: &[(u64, Vec<u8>)],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = data.len() + zeros.len();
    let desc_sectors = (count + 2).div_ceil(128);
    let len = (desc_sectors + data.len()) * 4096;
    let mut e = vec![0u8; len];
    e[..4].copy_from_slice(b"loge");
    put32(&mut e, 8, len as u32);
    put32(&mut e, 12, tail);
    put64(&mut e, 16, seq);
    put32(&mut e, 24, count as u32);
    e[32..48].copy_from_slice(&guid);
    put64(&mut e, 48, file_len);
    put64(&mut e, 56, file_len);
    let mut d = 64;
    for &(off, n) in zeros {
        e[d..d + 4].copy_from_slice(b"zero");
        put64(&mut e, d + 8, n);
        put64(&mut e, d + 16, off);
        put64(&mut e, d + 24, seq);
        d += 32;
    }
    for (i, (off, sector)) in data.iter().enumerate() {
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&sector[4092..]);
        e[d + 8..d + 16].copy_from_slice(&sector[..8]);
        put64(&mut e, d + 16, *off);
        put64(&mut e, d + 24, seq);
        d += 32;
        let s = (desc_sectors + i) * 4096;
        e[s..s + 4].copy_from_slice(b"data");
        put32(&mut e, s + 4, (seq >> 32) as u32);
        e[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
        put32(&mut e, s + 4092, seq as u32);
    }
    let crc = crc32c(&e);
    put32(&mut e, 4, crc);
    e
}

/// A qemu image with a log of two entries that were written but never
/// applied: a BAT update mapping a new block, then a data and a zero
/// descriptor over an existing block's payload. Returns (file, expected disk).
fn dirty_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let size = 8 * MIB;
    let (mut model, _) = pattern(77, size as usize);
    model[5 * MIB as usize..6 * MIB as usize].fill(0); // block 5 unallocated
    model[MIB as usize..2 * MIB as usize].fill(0x11); // block 1 allocated
    let img = qemu_vhdx(
        &model,
        dir,
        "dirty.vhdx",
        "subformat=dynamic,block_size=1M,log_size=1M",
    );
    let mut file = std::fs::read(&img).unwrap();
    let bat = bat_offset(&file);
    let e5 = le64(&file, (bat + 5 * 8) as usize);
    assert!(e5 & 7 < 6, "block 5 must be unallocated, entry {e5:#x}");
    let block1 = le64(&file, (bat + 8) as usize) & !0xFFFFF;
    assert_ne!(block1, 0);

    // The payload of the new block is written before the log entry, as a writer does.
    let new_block = (file.len() as u64).next_multiple_of(MIB);
    file.resize((new_block + MIB) as usize, 0);
    for (i, b) in file[new_block as usize..].iter_mut().enumerate() {
        *b = (i % 241) as u8 ^ 0x5A;
    }
    model[5 * MIB as usize..6 * MIB as usize]
        .copy_from_slice(&file[new_block as usize..(new_block + MIB) as usize]);
    let mut bat_sector = file[bat as usize..bat as usize + 4096].to_vec();
    put64(&mut bat_sector, 5 * 8, new_block | 6);

    let sector: Vec<u8> = (0..4096).map(|i| (i * 13 % 256) as u8).collect();
    let guid: [u8; 16] = *b"pending-log-GUID";
    let len = file.len() as u64;
    let e1 = log_entry(guid, 40, 0, len, &[(bat, bat_sector)], &[]);
    let e2 = log_entry(
        guid,
        41,
        0,
        len,
        &[(block1 + 64 * 1024, sector.clone())],
        &[(block1 + 8192, 3 * 4096)],
    );
    let log = MIB as usize;
    file[log..log + e1.len()].copy_from_slice(&e1);
    file[log + e1.len()..log + e1.len() + e2.len()].copy_from_slice(&e2);
    set_log_guid(&mut file, guid);
    std::fs::write(&img, &file).unwrap();

    model[(MIB + 8192) as usize..(MIB + 8192 + 3 * 4096) as usize].fill(0);
    model[(MIB + 65536) as usize..(MIB + 65536 + 4096) as usize].copy_from_slice(&sector);
    (img, model)
}

#[test]
fn dirty_log_read_only_replays_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, model) = dirty_image(tmp.path());
    let before = std::fs::read(&img).unwrap();
    {
        let disk = open(&img, false).unwrap();
        let got = read_all(&disk);
        if got != model {
            let diff: Vec<usize> = (0..model.len()).filter(|&i| got[i] != model[i]).collect();
            panic!(
                "differ at {} bytes, first {:?} last {:?}",
                diff.len(),
                diff.first(),
                diff.last()
            );
        }
        assert!(matches!(disk.write_at(&[1], 0), Err(Error::ReadOnly)));
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open changed the file"
    );

    // qemu as the independent replayer agrees.
    let copy = tmp.path().join("qemu-replayed.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    let out = run(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", copy.to_str().unwrap()],
    );
    assert!(
        out.contains("1 errors") || out.contains("corruptions"),
        "{out}"
    );
    assert!(qemu_raw(&copy, "vhdx") == model, "qemu's replay differs");
}

#[test]
fn dirty_log_read_write_replays_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, model) = dirty_image(tmp.path());
    {
        let disk = open(&img, true).unwrap();
        assert!(read_all(&disk) == model);
    }
    let file = std::fs::read(&img).unwrap();
    let cur = current_header(&file);
    assert_eq!(
        file[(cur + 1) * 65536 + 48..(cur + 1) * 65536 + 64],
        [0u8; 16],
        "LogGuid not cleared"
    );
    qemu_check(&img);
    // qemu-img convert opens read-only: it refuses files with a pending log.
    assert!(qemu_raw(&img, "vhdx") == model);
}

#[test]
fn damaged_log_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, _) = dirty_image(tmp.path());
    let mut file = std::fs::read(&img).unwrap();
    file[MIB as usize + 4096 + 10] ^= 0xFF; // data sector of entry 1
    // Entry 2 alone is still a valid sequence only if its tail points at itself;
    // it names entry 1 as the tail, so nothing valid remains.
    std::fs::write(&img, &file).unwrap();
    match open(&img, false) {
        Err(Error::Corrupt { what, .. }) => assert_eq!(what, "VHDX log"),
        other => panic!("expected a corrupt log, got {other:?}"),
    }
}

/// Puts raw BAT entries and block contents into a file made by `create`.
fn poke(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
}

#[test]
fn differencing_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let kids = tmp.path().join("kids");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&kids).unwrap();
    let size = 10 * MIB;
    let (parent_data, _) = pattern(9, size as usize);
    let parent = qemu_vhdx(
        &parent_data,
        &base,
        "parent.vhdx",
        "subformat=dynamic,block_size=1M",
    );
    let parent_bytes = std::fs::read(&parent).unwrap();
    let linkage = open(&parent, false).unwrap().layers()[0].link_id();

    for (name, key, value) in [
        ("rel.vhdx", "relative_path", r"..\base\parent.vhdx"),
        ("abs.vhdx", "absolute_win32_path", r"\\?\C:\VMs\parent.vhdx"),
    ] {
        let child = if key == "relative_path" {
            kids.join(name)
        } else {
            base.join(name)
        };
        let file = std::fs::File::create_new(&child).unwrap();
        let mut opts = CreateOptions::dynamic(size);
        opts.block_size = 1 << 20;
        opts.parent = Some(ParentInfo {
            data_write_guid: linkage,
            paths: vec![(key.into(), value.into())],
        });
        let c = create(&(file, true), &opts).unwrap();
        let mut model = parent_data.clone();

        // Block 0 fully present, block 1 zero, block 2 partially present, rest not present.
        let end = std::fs::metadata(&child)
            .unwrap()
            .len()
            .next_multiple_of(MIB);
        let (b0, b2, sb) = (end, end + MIB, end + 2 * MIB);
        let x: Vec<u8> = (0..MIB).map(|i| (i % 233) as u8 | 1).collect();
        let y: Vec<u8> = (0..MIB).map(|i| (i % 199) as u8 ^ 0xC3).collect();
        poke(&child, b0, &x);
        poke(&child, b2, &y);
        let mut bits = vec![0u8; (MIB / 512 / 8) as usize];
        let present = |s: usize| s < 7 || (100..300).contains(&s) || s == 2047;
        for s in 0..2048 {
            if present(s) {
                bits[s / 8] |= 1 << (s % 8);
            }
        }
        // Block 2's bits start at sector 2 * 2048 of the chunk.
        poke(&child, sb + 2 * 2048 / 8, &bits);
        poke(&child, sb + MIB - 1, &[0]);
        poke(&child, c.bat_offset, &(b0 | 6).to_le_bytes());
        poke(&child, c.bat_offset + 8, &2u64.to_le_bytes());
        poke(&child, c.bat_offset + 16, &(b2 | 7).to_le_bytes());
        poke(
            &child,
            c.bat_offset + c.layout.bitmap_index(0) * 8,
            &(sb | 6).to_le_bytes(),
        );
        model[..MIB as usize].copy_from_slice(&x);
        model[MIB as usize..2 * MIB as usize].fill(0);
        for s in (0..2048).filter(|&s| present(s)) {
            let o = 2 * MIB as usize + s * 512;
            model[o..o + 512].copy_from_slice(&y[s * 512..s * 512 + 512]);
        }

        {
            let disk = open(&child, false).unwrap();
            assert_eq!(disk.layers().len(), 2, "{name}");
            assert!(read_all(&disk) == model, "{name}: chain read");
        }
        {
            let disk = open(&child, true).unwrap();
            random_writes(&disk, &mut model, 31, 25, (MIB + MIB / 2) as usize);
            // A write into the partially present block, and one into the zero block.
            disk.write_at(&[0xEE; 700], 2 * MIB + 5 * 512 + 3).unwrap();
            model[(2 * MIB + 5 * 512 + 3) as usize..][..700].fill(0xEE);
            disk.write_at(&[0xDD; 512], MIB + 4096).unwrap();
            model[(MIB + 4096) as usize..][..512].fill(0xDD);
            assert!(read_all(&disk) == model, "{name}: after writes");
        }
        let disk = open(&child, false).unwrap();
        assert!(read_all(&disk) == model, "{name}: reopened");
        assert!(
            std::fs::read(&parent).unwrap() == parent_bytes,
            "parent changed"
        );
    }

    // A child whose linkage names another DataWriteGuid finds no parent.
    let bad = base.join("bad.vhdx");
    let mut opts = CreateOptions::dynamic(size);
    opts.parent = Some(ParentInfo {
        data_write_guid: [9; 16],
        paths: vec![("relative_path".into(), "parent.vhdx".into())],
    });
    create(&(std::fs::File::create_new(&bad).unwrap(), true), &opts).unwrap();
    match open(&bad, false) {
        Err(Error::ParentNotFound(msg)) => assert!(msg.contains("identity differs"), "{msg}"),
        other => panic!("expected ParentNotFound, got {other:?}"),
    }

    // A partially present block without a sector bitmap is corrupt.
    let c = vdisk::vhdx::create(
        &(
            std::fs::File::create_new(base.join("nobitmap.vhdx")).unwrap(),
            true,
        ),
        &{
            let mut o = CreateOptions::dynamic(size);
            o.parent = Some(ParentInfo {
                data_write_guid: linkage,
                paths: vec![("relative_path".into(), "parent.vhdx".into())],
            });
            o
        },
    )
    .unwrap();
    let end = std::fs::metadata(base.join("nobitmap.vhdx")).unwrap().len();
    poke(&base.join("nobitmap.vhdx"), end + 32 * MIB - 1, &[0]);
    poke(
        &base.join("nobitmap.vhdx"),
        c.bat_offset,
        &(end | 7).to_le_bytes(),
    );
    assert!(matches!(
        open(&base.join("nobitmap.vhdx"), false),
        Err(Error::Corrupt { .. })
    ));
}

/// Opens bytes in memory as a VHDX and reads all of it.
fn open_mem(bytes: Vec<u8>, writable: bool) -> vdisk::Result<Vec<u8>> {
    let img = vdisk::open_image(
        Box::new(MemStorage::new(bytes)),
        Format::Vhdx,
        Path::new("/m.vhdx"),
        OpenOptions { writable },
    )?;
    let disk = Disk::new(vec![img])?;
    // Damaged metadata may claim a huge disk: read at most 64 MiB of it.
    let mut out = vec![0u8; disk.size().min(64 * MIB) as usize];
    disk.read_at(&mut out, 0)?;
    Ok(out)
}

#[test]
fn corrupt_images_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = pattern(5, 6 * MIB as usize);
    let img = qemu_vhdx(
        &data,
        tmp.path(),
        "c.vhdx",
        "subformat=dynamic,block_size=1M",
    );
    let good = std::fs::read(&img).unwrap();
    assert!(open_mem(good.clone(), false).unwrap() == data);
    let bat = bat_offset(&good) as usize;
    let corrupt = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        open_mem(b, false)
    };
    // Region table 1 damaged: table 2 is used.
    assert!(corrupt(&|b| b[192 * 1024 + 100] ^= 1).unwrap() == data);
    assert!(
        corrupt(&|b| {
            b[192 * 1024 + 100] ^= 1;
            b[256 * 1024 + 100] ^= 1;
        })
        .is_err()
    );
    // One header damaged: the other is used; both: error.
    assert!(corrupt(&|b| b[65536 + 200] ^= 1).is_ok());
    assert!(
        corrupt(&|b| {
            b[65536 + 200] ^= 1;
            b[131072 + 200] ^= 1;
        })
        .is_err()
    );
    assert!(matches!(corrupt(&|b| b[0] = b'X'), Err(Error::NotAnImage)));
    // BAT entries: past the end of the file, inside the BAT, an unknown state.
    let last = good.len() as u64;
    assert!(corrupt(&|b| put64(b, bat, last | 6)).is_err());
    assert!(corrupt(&|b| put64(b, bat, bat as u64 | 6)).is_err());
    assert!(corrupt(&|b| put64(b, bat, 4)).is_err());
    assert!(
        corrupt(&|b| put64(b, bat, 7)).is_err(),
        "partially present in a base image"
    );
    // Truncated file.
    assert!(corrupt(&|b| b.truncate(b.len() - 4096)).is_err());
    assert!(corrupt(&|b| b.truncate(300 * 1024)).is_err());

    // Random damage in the structures never panics.
    let mut rng = Rng(99);
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..1 + rng.next() % 8 {
            let region =
                [0usize, 64 * 1024, 192 * 1024, bat, bat + MIB as usize][(rng.next() % 5) as usize];
            let at = (region + (rng.next() % 4096) as usize).min(b.len() - 1);
            b[at] = rng.next() as u8;
        }
        let _ = open_mem(b, rng.next().is_multiple_of(2));
    }
}

/// A storage that fails every write from the `budget`-th on, as if the
/// process were killed there: what was written before stays (page cache).
struct Killed {
    inner: MemStorage,
    budget: std::sync::atomic::AtomicI64,
}

impl Killed {
    fn spend(&self) -> std::io::Result<()> {
        if self
            .budget
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            <= 0
        {
            return Err(std::io::Error::other("killed"));
        }
        Ok(())
    }
}

impl vdisk::Storage for Killed {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        self.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.spend()?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn is_writable(&self) -> bool {
        true
    }
}

/// Runs the write workload on `image` until the storage is killed after
/// `budget` writes. Returns the file, the disk before the interrupted write
/// and the range and data of that write (None if all completed).
fn workload(image: &[u8], budget: i64, model: &mut Vec<u8>) -> (Vec<u8>, Option<(usize, Vec<u8>)>) {
    let storage = std::sync::Arc::new(Killed {
        inner: MemStorage::new(image.to_vec()),
        budget: std::sync::atomic::AtomicI64::new(budget),
    });
    struct Shared(std::sync::Arc<Killed>);
    impl vdisk::Storage for Shared {
        fn read_at(&self, b: &mut [u8], o: u64) -> std::io::Result<usize> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> std::io::Result<usize> {
            self.0.write_at(b, o)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, l: u64) -> std::io::Result<()> {
            self.0.set_len(l)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
        fn is_writable(&self) -> bool {
            true
        }
    }
    let img = vdisk::open_image(
        Box::new(Shared(storage.clone())),
        Format::Vhdx,
        Path::new("/k.vhdx"),
        OpenOptions { writable: true },
    );
    let mut interrupted = None;
    if let Ok(img) = img {
        let disk = Disk::new(vec![img]).unwrap();
        let mut rng = Rng(4242);
        for _ in 0..10 {
            let len = 1 + rng.next() as usize % (2 * MIB as usize + MIB as usize / 2);
            let off = rng.next() as usize % (model.len() - len + 1);
            let buf: Vec<u8> = (0..len).map(|i| (i % 247) as u8 ^ rng.0 as u8).collect();
            // Acknowledged once flushed: allocations commit at the flush.
            if disk.write_at(&buf, off as u64).is_err() || disk.flush().is_err() {
                interrupted = Some((off, buf));
                break;
            }
            model[off..off + len].copy_from_slice(&buf);
        }
    }
    let bytes = storage.inner.contents();
    (bytes, interrupted)
}

#[test]
fn killed_at_any_write_leaves_a_consistent_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, _) = pattern(3, 7 * MIB as usize);
    let img = qemu_vhdx(
        &data,
        tmp.path(),
        "kill.vhdx",
        "subformat=dynamic,block_size=1M",
    );
    let image = std::fs::read(&img).unwrap();
    let total = {
        // Count the writes of a complete run.
        let mut n = 0;
        loop {
            let mut m = data.clone();
            if workload(&image, n, &mut m).1.is_none() {
                break n;
            }
            n += 1;
        }
    };
    let path = tmp.path().join("killed.vhdx");
    let (mut budget, mut runs, mut pending) = (0, 0, 0);
    while budget <= total {
        let mut model = data.clone();
        let (bytes, interrupted) = workload(&image, budget, &mut model);
        // vdisk reads it (replaying a pending log in memory).
        let got = open_mem(bytes.clone(), false).unwrap_or_else(|e| panic!("budget {budget}: {e}"));
        let cur = current_header(&bytes);
        if bytes[(cur + 1) * 65536 + 48..(cur + 1) * 65536 + 64] != [0u8; 16] {
            pending += 1;
            assert!(
                open_mem(bytes.clone(), true).unwrap() == got,
                "budget {budget}: replay on disk differs"
            );
        }
        runs += 1;
        // Every completed write is there; the interrupted one is old or new data.
        let (lo, hi, new) = match &interrupted {
            Some((o, b)) => (*o, o + b.len(), b.as_slice()),
            None => (0, 0, &[][..]),
        };
        assert!(
            got[..lo] == model[..lo] && got[hi..] == model[hi..],
            "budget {budget}: completed writes lost"
        );
        if got[lo..hi] != model[lo..hi] {
            for i in lo..hi {
                assert!(
                    got[i] == model[i] || got[i] == new[i - lo],
                    "budget {budget}: byte {i} is garbage"
                );
            }
        }
        // qemu-img check -r all repairs at most the log, and then reads the same.
        std::fs::write(&path, &bytes).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "budget {budget}: {text}"
        );
        assert!(
            qemu_raw(&path, "vhdx") == got,
            "budget {budget}: qemu reads other data"
        );
        budget += 1;
    }
    eprintln!("{runs} kills in {total} writes, {pending} with a pending log");
    assert!(pending > 0, "no kill hit a pending log");
}

/// parent_linkage2 (written during merges): a parent whose DataWriteGuid
/// matches it, and not parent_linkage, is accepted; one matching neither is not.
#[test]
fn parent_linkage2_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let parent_path = dir.join("p.vhdx");
    let p = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&parent_path)
        .unwrap();
    create(&(p, true), &CreateOptions::dynamic(8 << 20)).unwrap();
    let guid = open(&parent_path, false).unwrap().layers()[0].link_id();
    let text = vdisk::vhdx::guid::Guid(guid).to_string();
    for (name, alternate, opens) in [
        ("c1.vhdx", text.clone(), true),
        (
            "c2.vhdx",
            "{01234567-89ab-cdef-0123-456789abcdef}".to_string(),
            false,
        ),
    ] {
        let path = dir.join(name);
        let c = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut opts = CreateOptions::dynamic(8 << 20);
        opts.parent = Some(ParentInfo {
            data_write_guid: [0x42; 16], // not the parent's
            paths: vec![
                ("parent_linkage2".into(), alternate),
                ("relative_path".into(), r".\p.vhdx".into()),
            ],
        });
        create(&(c, true), &opts).unwrap();
        match open(&path, false) {
            Ok(_) => assert!(
                opens,
                "{name} opened with a parent matching neither linkage"
            ),
            Err(Error::ParentNotFound(m)) => assert!(!opens, "{name}: {m}"),
            Err(e) => panic!("{name}: {e}"),
        }
    }
}
