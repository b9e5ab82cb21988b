//! `vhdio rebase -b ""` of a VHDX child with PARTIALLY_PRESENT blocks and a
//! sector bitmap, as Hyper-V writes differencing disks (vdisk itself never
//! writes them: it copies whole blocks). The parent is made by qemu-img; the
//! child is built from the spec with vdisk's creator and bytes poked in.
//! After the rebase the child alone, read by qemu-img, is the former chain
//! view, and qemu-img check finds nothing.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
mod vhdio_util;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{qemu_image_from, qemu_raw, run};
use vdisk::vhdx::{CreateOptions, ParentInfo, create};
use vhdio_util::{s, vhdio};

const MIB: u64 = 1 << 20;
const SECTORS: usize = (MIB / 512) as usize;

fn poke(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn fill(seed: u64) -> Vec<u8> {
    (0..MIB).map(|i| (i * seed % 251) as u8 | 1).collect()
}
fn present2(s: usize) -> bool {
    s < 7 || (100..300).contains(&s) || s == SECTORS - 1
}
fn present3(s: usize) -> bool {
    (8..16).contains(&s) || (1000..1024).contains(&s)
}

/// What the child shows over a parent reading `base`: block 0 its own,
/// blocks 2 and 3 their present sectors.
fn child_view(base: &[u8]) -> Vec<u8> {
    let mut view = base.to_vec();
    let m = MIB as usize;
    view[..m].copy_from_slice(&fill(7));
    for (block, data, present) in [
        (2, fill(13), present2 as fn(usize) -> bool),
        (3, fill(29), present3),
    ] {
        for s in (0..SECTORS).filter(|&s| present(s)) {
            let o = block * m + s * 512;
            view[o..o + 512].copy_from_slice(&data[s * 512..s * 512 + 512]);
        }
    }
    view
}

/// A child of `parent` (8 MiB, 1 MiB blocks): block 0 fully present, blocks
/// 2 and 3 partially present, one sector bitmap block, the rest not present.
fn hyperv_like_child(parent: &Path, child: &Path) {
    let linkage = common::open(parent, false).unwrap().layers()[0].link_id();
    let mut opts = CreateOptions::dynamic(8 * MIB);
    opts.block_size = MIB as u32;
    opts.parent = Some(ParentInfo {
        data_write_guid: linkage,
        paths: vec![("relative_path".into(), r".\parent.vhdx".into())],
    });
    let file = std::fs::File::create_new(child).unwrap();
    let c = create(&(file, true), &opts).unwrap();
    let end = std::fs::metadata(child)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    let (b0, b2, b3, sb) = (end, end + MIB, end + 2 * MIB, end + 3 * MIB);
    // Whole blocks: the sectors the bitmap leaves clear hold garbage that
    // must never show.
    poke(child, b0, &fill(7));
    poke(child, b2, &fill(13));
    poke(child, b3, &fill(29));
    let mut bits = vec![0u8; 2 * SECTORS / 8];
    for s in 0..SECTORS {
        if present2(s) {
            bits[s / 8] |= 1 << (s % 8);
        }
        if present3(s) {
            bits[(SECTORS + s) / 8] |= 1 << (s % 8);
        }
    }
    // Block k's bits start at sector k * SECTORS of the chunk.
    poke(child, sb + 2 * SECTORS as u64 / 8, &bits);
    poke(child, sb + MIB - 1, &[0]);
    poke(child, c.bat_offset, &(b0 | 6).to_le_bytes());
    poke(child, c.bat_offset + 16, &(b2 | 7).to_le_bytes());
    poke(child, c.bat_offset + 24, &(b3 | 7).to_le_bytes());
    poke(
        child,
        c.bat_offset + c.layout.bitmap_index(0) * 8,
        &(sb | 6).to_le_bytes(),
    );
}

#[test]
fn rebase_standalone_fills_partially_present_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Parent data in blocks 0-2 and 4-7; block 3 a hole (reads zeros).
    let mut data = vec![0u8; 8 * MIB as usize];
    let mut rng = common::Rng(5);
    for (i, b) in data.iter_mut().enumerate() {
        if !(3 * MIB as usize..4 * MIB as usize).contains(&i) {
            *b = rng.next() as u8;
        }
    }
    let parent = qemu_image_from(&data, d, "parent.vhdx", "vhdx", "block_size=1M");
    let parent_bytes = std::fs::read(&parent).unwrap();
    let child = d.join("child.vhdx");
    hyperv_like_child(&parent, &child);
    let view = child_view(&data);
    // The library reads the chain as the spec says.
    let before = common::read_all(&common::open(&child, false).unwrap());
    assert!(before == view, "chain view before the rebase");

    let o = vhdio(&["rebase", "-b", "", s(&child)]);
    assert!(
        o.status.success(),
        "rebase: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::read(&parent).unwrap() == parent_bytes,
        "parent changed"
    );
    // Standalone: qemu-img reads it alone, as the chain read.
    let info = run("qemu-img", &["info", "--output=json", s(&child)]);
    assert!(!info.contains("backing"), "{info}");
    assert!(
        qemu_raw(&child, "vhdx") == view,
        "child alone differs from the former chain"
    );
    run("qemu-img", &["check", "-f", "vhdx", s(&child)]);
    let ours = vhdio(&["check", s(&child)]);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stdout)
    );
    let shown = String::from_utf8_lossy(&vhdio(&["info", s(&child)]).stdout).into_owned();
    assert!(shown.contains("format: vhdx dynamic"), "{shown}");
    // Moving the parent away changes nothing.
    std::fs::rename(&parent, d.join("gone.vhdx")).unwrap();
    assert!(qemu_raw(&child, "vhdx") == view);
}

#[test]
fn unsafe_rebase_standalone_drops_the_parent_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = common::Rng(9);
    let data: Vec<u8> = (0..8 * MIB).map(|_| rng.next() as u8).collect();
    let parent = qemu_image_from(&data, d, "parent.vhdx", "vhdx", "block_size=1M");
    let child = d.join("child.vhdx");
    hyperv_like_child(&parent, &child);
    // -u: only what the child stores stays; the rest reads zeros.
    let ours = child_view(&vec![0u8; data.len()]);
    let o = vhdio(&["rebase", "-u", "-b", "", s(&child)]);
    assert!(
        o.status.success(),
        "rebase -u: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        qemu_raw(&child, "vhdx") == ours,
        "child alone after rebase -u"
    );
    run("qemu-img", &["check", "-f", "vhdx", s(&child)]);
}

/// The VHD counterpart: a child block whose bitmap leaves sectors to the
/// parent (where it reads zeros), with other bytes in the file there (as
/// Windows or reused space may leave): standalone, qemu-img (which reads the
/// block, not the bitmap) reads the former view.
#[test]
fn rebase_standalone_vhd_zeroes_the_sectors_its_bitmaps_left_to_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Parent data in the first 2 MiB block only.
    let mut data = vec![0u8; 8 * MIB as usize];
    let mut rng = common::Rng(3);
    for b in data[..2 * MIB as usize].iter_mut() {
        *b = rng.next() as u8;
    }
    let parent = qemu_image_from(
        &data,
        d,
        "parent.vhd",
        "vpc",
        "subformat=dynamic,force_size=on",
    );
    let child = d.join("child.vhd");
    let o = vhdio(&["snapshot", s(&parent), s(&child)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 4 KiB written into block 2 (over parent zeros): the rest of the block
    // is the parent's by the bitmap.
    let at = 4 * MIB + 8192;
    {
        let disk = common::open(&child, true).unwrap();
        disk.write_at(&[0xA5; 4096], at).unwrap();
        disk.close().unwrap();
    }
    let view = common::read_all(&common::open(&child, false).unwrap());
    let block_data = {
        let disk = common::open(&child, false).unwrap();
        match disk.layers()[0].map(at, 4096).unwrap() {
            (vdisk::Mapping::Data { file_offset }, _) => file_offset - 8192,
            other => panic!("{other:?}"),
        }
    };
    poke(&child, block_data, &[0x77; 8192]);
    poke(
        &child,
        block_data + 12288,
        &vec![0x77; 2 * MIB as usize - 12288],
    );
    assert!(common::read_all(&common::open(&child, false).unwrap()) == view);

    let o = vhdio(&["rebase", "-b", "", s(&child)]);
    assert!(
        o.status.success(),
        "rebase: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&parent, d.join("gone.vhd")).unwrap();
    assert!(
        qemu_raw(&child, "vpc") == view,
        "qemu-img reads the child alone differently"
    );
    assert!(common::read_all(&common::open(&child, false).unwrap()) == view);
    let ours = vhdio(&["check", s(&child)]);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stdout)
    );
}
