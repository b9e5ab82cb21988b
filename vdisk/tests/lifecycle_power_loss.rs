//! Power loss during `vdisk::resize` and `vdisk::relink` (the format-level
//! steps of `vhdio resize`, `rebase -u` and the end of commit and rebase):
//! every crash state the power-loss harness rebuilds from the recorded
//! writes and syncs opens, and reads either the old or the new disk: resize
//! keeps the data and the old or the new size (new space zeros); a relinked
//! child names the old or the new parent, never something else.

#[path = "common/mod.rs"]
mod common;
#[path = "crashsim/mod.rs"]
mod crashsim;
#[path = "vhd_util/mod.rs"]
mod vhd_util;

use std::path::Path;

use crashsim::{Budget, Fmt, Recorder, Recording, image_path, qemu_create, read_disk, states};

/// `file` opened as a disk (no parents) on an in-memory storage.
fn open_mem(fmt: Fmt, file: Vec<u8>, writable: bool) -> vdisk::Result<vdisk::Disk> {
    let storage = if writable {
        vdisk::MemStorage::new(file)
    } else {
        vdisk::MemStorage::read_only(file)
    };
    vdisk::open_disk(
        Box::new(storage),
        &image_path(fmt),
        vdisk::OpenOptions { writable },
        &vdisk::StdParentOpener,
    )
}

const MIB: u64 = 1 << 20;

/// A qemu-made dynamic image of 8 MiB with data in its first 3 MiB.
fn image_with_data(fmt: Fmt) -> (Vec<u8>, Vec<u8>) {
    let file = qemu_create(fmt, "8M", "");
    let disk = open_mem(fmt, file, true).unwrap();
    let mut rng = common::Rng(11);
    let data: Vec<u8> = (0..3 * MIB).map(|_| rng.next() as u8).collect();
    disk.write_at(&data, 0).unwrap();
    disk.flush().unwrap();
    disk.close().unwrap();
    let layer = &disk.layers()[0];
    let mut file = vec![0u8; layer.storage().len().unwrap() as usize];
    layer.storage().read_exact_at(&mut file, 0).unwrap();
    (file, data)
}

fn recording(name: &str, fmt: Fmt, initial: Vec<u8>, rec: &Recorder) -> Recording {
    Recording {
        name: name.to_string(),
        fmt,
        path: image_path(fmt),
        initial_file: initial,
        initial_virtual: Vec::new(),
        ops: rec.ops(),
        writes: Vec::new(),
        flushes: Vec::new(),
    }
}

/// Every crash state of `rec`, built, to `judge` (which says what is wrong).
fn each_state(rec: &Recording, judge: impl Fn(Vec<u8>) -> Result<(), String>) {
    let all = states::generate(rec, &Budget::from_env(20));
    assert!(!all.is_empty());
    let mut builder = states::Builder::new(rec);
    let mut failed = Vec::new();
    for st in &all {
        let mut file = Vec::new();
        builder.build(st, &mut file);
        if let Err(e) = judge(file) {
            failed.push(format!("{}: {e}", states::describe(rec, st)));
        }
    }
    assert!(
        failed.is_empty(),
        "{}: {} of {} crash states wrong:\n{}",
        rec.name,
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}

#[test]
fn resize_survives_power_loss() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx, Fmt::Vdi] {
        for new_size in [40 * MIB, 4 * MIB] {
            let (file, data) = image_with_data(fmt);
            let rec = Recorder::new(file.clone());
            let old = vdisk::resize::resize(&rec.storage(true), new_size).unwrap();
            assert_eq!(old, 8 * MIB);
            let r = recording(&format!("{fmt:?} resize to {new_size}"), fmt, file, &rec);
            each_state(&r, |file| {
                let disk = open_mem(fmt, file, false).map_err(|e| format!("does not open: {e}"))?;
                let size = disk.size();
                if size != 8 * MIB && size != new_size {
                    return Err(format!("size {size}"));
                }
                let v = read_disk(&disk).map_err(|e| e.to_string())?;
                let kept = (size.min(3 * MIB)) as usize;
                if v[..kept] != data[..kept] {
                    return Err("old data changed".into());
                }
                if v[kept..].iter().any(|&b| b != 0) && size > 3 * MIB {
                    return Err("new space not zeros".into());
                }
                Ok(())
            });
        }
    }
}

#[test]
fn relink_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in [Fmt::Vhd, Fmt::Vhdx, Fmt::Vdi] {
        let old_parent = qemu_create(fmt, "8M", "");
        let new_parent = qemu_create(fmt, "8M", "");
        let ext = fmt.ext();
        let (po, pn) = (
            dir.path().join(format!("old.{ext}")),
            dir.path().join(format!("new.{ext}")),
        );
        std::fs::write(&po, &old_parent).unwrap();
        std::fs::write(&pn, &new_parent).unwrap();
        let child_path = dir.path().join(format!("child.{ext}"));
        let child = vdisk::MemStorage::new(Vec::new());
        let po_store = vdisk::MemStorage::read_only(old_parent.clone());
        vdisk::snapshot(&po, &po_store, &child, &child_path).unwrap();
        let initial = child.into_inner();
        let id = |file: &[u8]| {
            let s = vdisk::MemStorage::read_only(file.to_vec());
            let f = vdisk::probe(&s).unwrap().unwrap();
            vdisk::open_image(
                Box::new(s),
                f,
                Path::new("/p"),
                vdisk::OpenOptions::default(),
            )
            .unwrap()
            .link_id()
        };
        let (old_id, new_id) = (id(&old_parent), id(&new_parent));
        let rec = Recorder::new(initial.clone());
        let pn_store = vdisk::MemStorage::read_only(new_parent.clone());
        vdisk::relink::relink(&rec.storage(true), &child_path, Some((&pn, &pn_store))).unwrap();
        let r = recording(&format!("{fmt:?} relink"), fmt, initial, &rec);
        each_state(&r, |file| {
            let s = vdisk::MemStorage::read_only(file);
            let f = vdisk::probe(&s)
                .map_err(|e| e.to_string())?
                .ok_or("not an image")?;
            let img = vdisk::open_image(Box::new(s), f, &child_path, vdisk::OpenOptions::default())
                .map_err(|e| format!("does not open: {e}"))?;
            let link = img.parent_link().ok_or("no parent link")?;
            if link.id != old_id && link.id != new_id {
                return Err("names neither parent".into());
            }
            Ok(())
        });
        // And the end state names the new parent.
        let s = vdisk::MemStorage::read_only(rec.contents());
        let f = vdisk::probe(&s).unwrap().unwrap();
        let img =
            vdisk::open_image(Box::new(s), f, &child_path, vdisk::OpenOptions::default()).unwrap();
        assert_eq!(img.parent_link().unwrap().id, new_id, "{fmt:?}");
    }
}

#[test]
fn emptying_a_child_whose_parent_holds_its_data_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in [Fmt::Vhd, Fmt::Vhdx, Fmt::Vdi] {
        let ext = fmt.ext();
        // The parent holds what the child holds (the end of a commit).
        let (parent, data) = image_with_data(fmt);
        let pp = dir.path().join(format!("p.{ext}"));
        std::fs::write(&pp, &parent).unwrap();
        let cp = dir.path().join(format!("c.{ext}"));
        let child = vdisk::MemStorage::new(Vec::new());
        vdisk::snapshot(&pp, &vdisk::MemStorage::read_only(parent), &child, &cp).unwrap();
        std::fs::write(&cp, child.into_inner()).unwrap();
        let disk = common::open(&cp, true).unwrap();
        disk.write_at(&data[..2 * MIB as usize], MIB).unwrap();
        disk.close().unwrap();
        drop(disk);
        let view = read_disk(&common::open(&cp, false).unwrap()).unwrap();
        let mut model = std::fs::read(&pp).unwrap();
        {
            // The parent as the commit left it: the child's view.
            let d = vdisk::open_disk(
                Box::new(vdisk::MemStorage::new(std::mem::take(&mut model))),
                &pp,
                vdisk::OpenOptions { writable: true },
                &vdisk::StdParentOpener,
            )
            .unwrap();
            d.write_at(&view, 0).unwrap();
            d.close().unwrap();
            let s = d.layers()[0].storage();
            model = vec![0u8; s.len().unwrap() as usize];
            s.read_exact_at(&mut model, 0).unwrap();
        }
        std::fs::write(&pp, &model).unwrap();
        // Writing the parent renewed a VHDX DataWriteGuid: link it again.
        let c = vdisk::MemStorage::new(std::fs::read(&cp).unwrap());
        let p = vdisk::MemStorage::read_only(model.clone());
        vdisk::relink::relink(&c, &cp, Some((&pp, &p))).unwrap();
        let initial = c.into_inner();
        std::fs::write(&cp, &initial).unwrap();
        assert!(read_disk(&common::open(&cp, false).unwrap()).unwrap() == view);
        let rec = Recorder::new(initial.clone());
        vdisk::relink::empty(&rec.storage(true)).unwrap();
        let r = recording(&format!("{fmt:?} empty"), fmt, initial, &rec);
        each_state(&r, |file| {
            std::fs::write(&cp, &file).map_err(|e| e.to_string())?;
            let disk = common::open(&cp, false).map_err(|e| format!("does not open: {e}"))?;
            let v = read_disk(&disk).map_err(|e| e.to_string())?;
            if v != view {
                return Err("reads differently".into());
            }
            Ok(())
        });
        // The end state stores nothing.
        std::fs::write(&cp, rec.contents()).unwrap();
        let disk = common::open(&cp, false).unwrap();
        let top = &disk.layers()[0];
        let mut at = 0;
        while at < top.virtual_size() {
            let (m, n) = top.map(at, top.virtual_size() - at).unwrap();
            assert_eq!(m, vdisk::Mapping::Unallocated, "{fmt:?} at {at}");
            at += n;
        }
    }
}

/// A VHDX child of `pp` with PARTIALLY_PRESENT blocks 2 and 3 (a sector
/// bitmap block, garbage in the clear sectors) over a parent reading zeros
/// there, as a safe rebase leaves it before the link goes; and its view.
fn vhdx_child_with_partial_blocks(pp: &Path, cp: &Path) -> Vec<u8> {
    let poke = |at: u64, bytes: &[u8]| {
        let f = std::fs::OpenOptions::new().write(true).open(cp).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
    };
    let linkage = common::open(pp, false).unwrap().layers()[0].link_id();
    let mut opts = vdisk::vhdx::CreateOptions::dynamic(8 * MIB);
    opts.block_size = MIB as u32;
    opts.parent = Some(vdisk::vhdx::ParentInfo {
        data_write_guid: linkage,
        paths: vec![("relative_path".into(), "p.vhdx".into())],
    });
    let c = vdisk::vhdx::create(&(std::fs::File::create_new(cp).unwrap(), true), &opts).unwrap();
    let end = std::fs::metadata(cp).unwrap().len().next_multiple_of(MIB);
    let garbage: Vec<u8> = (0..MIB).map(|i| (i % 241) as u8 | 0x80).collect();
    poke(end, &garbage);
    poke(end + MIB, &garbage);
    // Sectors 0..64 of block 2 and 1000..1024 of block 3 are the child's.
    let mut bits = vec![0u8; 2 * 2048 / 8];
    bits[..8].fill(0xFF);
    bits[2048 / 8 + 125..2048 / 8 + 128].fill(0xFF);
    let sb = end + 2 * MIB;
    poke(sb + 2 * 2048 / 8, &bits);
    poke(sb + MIB - 1, &[0]);
    poke(c.bat_offset + 16, &(end | 7).to_le_bytes());
    poke(c.bat_offset + 24, &((end + MIB) | 7).to_le_bytes());
    poke(
        c.bat_offset + c.layout.bitmap_index(0) * 8,
        &(sb | 6).to_le_bytes(),
    );
    read_disk(&common::open(cp, false).unwrap()).unwrap()
}

#[test]
fn making_a_vhdx_with_partial_blocks_standalone_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    // The parent reads zeros wherever the child does not store (what the
    // copy of a safe rebase leaves); its data lies under the child's own
    // sectors of block 2.
    let parent = qemu_create(Fmt::Vhdx, "8M", "block_size=1M");
    let pp = dir.path().join("p.vhdx");
    std::fs::write(&pp, &parent).unwrap();
    {
        let disk = common::open(&pp, true).unwrap();
        disk.write_at(&[0x5a; 32 << 10], 2 * MIB).unwrap();
        disk.close().unwrap();
    }
    let cp = dir.path().join("c.vhdx");
    let view = vhdx_child_with_partial_blocks(&pp, &cp);
    assert!(view[2 * MIB as usize..][..512] != [0u8; 512] && view[3 * MIB as usize] == 0);
    let initial = std::fs::read(&cp).unwrap();
    let rec = Recorder::new(initial.clone());
    vdisk::relink::relink(&rec.storage(true), &cp, None).unwrap();
    let r = recording(
        "Vhdx standalone with partial blocks",
        Fmt::Vhdx,
        initial,
        &rec,
    );
    each_state(&r, |file| {
        std::fs::write(&cp, &file).map_err(|e| e.to_string())?;
        let disk = common::open(&cp, false).map_err(|e| format!("does not open: {e}"))?;
        let v = read_disk(&disk).map_err(|e| e.to_string())?;
        if v != view {
            let at = v.iter().zip(&view).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "reads differently ({} layers) at {at}: {} for {}",
                disk.layers().len(),
                v[at],
                view[at]
            ));
        }
        Ok(())
    });
    // The end state: standalone, every block fully present or not at all.
    std::fs::write(&cp, rec.contents()).unwrap();
    std::fs::rename(&pp, dir.path().join("gone.vhdx")).unwrap();
    let disk = common::open(&cp, false).unwrap();
    assert_eq!(disk.layers().len(), 1);
    assert!(read_disk(&disk).unwrap() == view);
    let out = common::run("qemu-img", &["check", "-f", "vhdx", cp.to_str().unwrap()]);
    assert!(out.contains("No errors"), "{out}");
    assert!(common::qemu_raw(&cp, "vhdx") == view);
}

#[test]
fn making_a_vhd_child_standalone_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    // The parent reads zeros where the child stores nothing (what a safe
    // rebase's copy leaves).
    let pp = dir.path().join("p.vhd");
    std::fs::write(&pp, qemu_create(Fmt::Vhd, "8M", "")).unwrap();
    let cp = dir.path().join("c.vhd");
    let child = vdisk::MemStorage::new(Vec::new());
    let ps = vdisk::MemStorage::read_only(std::fs::read(&pp).unwrap());
    vdisk::snapshot(&pp, &ps, &child, &cp).unwrap();
    std::fs::write(&cp, child.into_inner()).unwrap();
    let at = 2 * MIB + 4096;
    {
        let disk = common::open(&cp, true).unwrap();
        disk.write_at(&[0xA5; 4096], at).unwrap();
        disk.close().unwrap();
    }
    // Other bytes in the sectors the bitmap leaves to the parent.
    let data = match common::open(&cp, false).unwrap().layers()[0]
        .map(at, 1)
        .unwrap()
    {
        (vdisk::Mapping::Data { file_offset }, _) => file_offset - 4096,
        other => panic!("{other:?}"),
    };
    {
        let f = std::fs::OpenOptions::new().write(true).open(&cp).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x77; 4096], data).unwrap();
    }
    let view = read_disk(&common::open(&cp, false).unwrap()).unwrap();
    let initial = std::fs::read(&cp).unwrap();
    let rec = Recorder::new(initial.clone());
    vdisk::relink::relink(&rec.storage(true), &cp, None).unwrap();
    let r = recording("Vhd standalone", Fmt::Vhd, initial, &rec);
    each_state(&r, |file| {
        std::fs::write(&cp, &file).map_err(|e| e.to_string())?;
        let disk = common::open(&cp, false).map_err(|e| format!("does not open: {e}"))?;
        if read_disk(&disk).map_err(|e| e.to_string())? != view {
            return Err(format!(
                "reads differently ({} layers)",
                disk.layers().len()
            ));
        }
        Ok(())
    });
    std::fs::write(&cp, rec.contents()).unwrap();
    std::fs::rename(&pp, dir.path().join("gone.vhd")).unwrap();
    assert!(common::qemu_raw(&cp, "vpc") == view);
}

/// A qemu-made image of 8 MiB (`opts`) with 3 MiB of data at its start.
fn image_with_data_opts(fmt: Fmt, opts: &str) -> (Vec<u8>, Vec<u8>) {
    let file = qemu_create(fmt, "8M", opts);
    let disk = open_mem(fmt, file, true).unwrap();
    let mut rng = common::Rng(12);
    let data: Vec<u8> = (0..3 * MIB).map(|_| rng.next() as u8).collect();
    disk.write_at(&data, 0).unwrap();
    disk.write_at(&data[..MIB as usize], 7 * MIB).unwrap();
    disk.close().unwrap();
    let layer = &disk.layers()[0];
    let mut file = vec![0u8; layer.storage().len().unwrap() as usize];
    layer.storage().read_exact_at(&mut file, 0).unwrap();
    (file, data)
}

/// The disk reads the 8 MiB `old` at its start and zeros after it, up to a
/// size of 8 MiB or `new_size`. Past 8 MiB only what the top layer stores
/// is read (a grown disk may be far too large to read whole).
fn reads_old_or_grown(disk: &vdisk::Disk, old: &[u8], new_size: u64) -> Result<(), String> {
    let size = disk.size();
    if size != 8 * MIB && size != new_size {
        return Err(format!("size {size}"));
    }
    let mut v = vec![0u8; old.len()];
    disk.read_at(&mut v, 0).map_err(|e| e.to_string())?;
    if v != old {
        return Err("old data changed".into());
    }
    let top = &disk.layers()[0];
    let mut at = old.len() as u64;
    let mut buf = Vec::new();
    while at < size {
        let (m, n) = top.map(at, size - at).map_err(|e| e.to_string())?;
        if let vdisk::Mapping::Data { .. } = m {
            let n = n.min(MIB);
            buf.resize(n as usize, 0);
            disk.read_at(&mut buf, at).map_err(|e| e.to_string())?;
            if buf.iter().any(|&b| b != 0) {
                return Err(format!("new space at {at} not zeros"));
            }
            at += n;
        } else {
            at += n;
        }
    }
    Ok(())
}

/// Grows that need a new VHDX BAT region (1 MiB blocks: 128 Ki entries fit
/// the 1 MiB region qemu-img writes), VHD blocks moved out of the way of the
/// BAT, or a VDI block map moved into the data area (qemu-img leaves room
/// for 128 entries): every crash state reads the old disk or the grown one.
#[test]
fn resize_moving_the_bat_or_map_survives_power_loss() {
    for (fmt, opts, new_size) in [
        (Fmt::Vhdx, "block_size=1M", 130 << 30),
        // 2 MiB blocks; the first block (written by vdisk: data 4 KiB
        // aligned) starts 2 KiB after the BAT, so 1024 entries move it.
        (Fmt::Vhd, "", 2 << 30),
        (Fmt::Vdi, "", 130 * MIB),
        (Fmt::Vdi, "static=on", 130 * MIB),
    ] {
        let (file, data) = image_with_data_opts(fmt, opts);
        let old = {
            let d = open_mem(fmt, file.clone(), false).unwrap();
            read_disk(&d).unwrap()
        };
        assert!(old[..3 * MIB as usize] == data[..]);
        let rec = Recorder::new(file.clone());
        assert_eq!(
            vdisk::resize::resize(&rec.storage(true), new_size).unwrap(),
            8 * MIB
        );
        let end = open_mem(fmt, rec.contents(), false).unwrap();
        assert_eq!(end.size(), new_size, "{fmt:?} {opts}");
        let r = recording(
            &format!("{fmt:?} {opts} grow to {new_size}, moving the BAT, blocks or map"),
            fmt,
            file,
            &rec,
        );
        let fresh: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
        each_state(&r, |file| {
            let disk =
                open_mem(fmt, file.clone(), false).map_err(|e| format!("does not open: {e}"))?;
            reads_old_or_grown(&disk, &old, new_size)?;
            // A writer after the crash: a new block (in a VDI, in a slot the
            // interrupted move left unused) lands and leaves the rest as it was.
            let disk = open_mem(fmt, file, true).map_err(|e| format!("no writable open: {e}"))?;
            disk.write_at(&fresh, 5 * MIB).map_err(|e| e.to_string())?;
            disk.close().map_err(|e| e.to_string())?;
            let mut expect = old.clone();
            expect[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&fresh);
            reads_old_or_grown(&disk, &expect, new_size)
        });
    }
}

/// The VHDX BAT move as QEMU sees it: at every kill point (each prefix of
/// the recorded writes on disk), QEMU opens the file (replaying a pending
/// log, which writes the region tables below 1 MiB), reads the old data,
/// reports the old or the new size, and `qemu-img check` finds no errors.
#[test]
fn qemu_replays_a_vhdx_bat_move_at_every_kill_point() {
    let dir = tempfile::tempdir().unwrap();
    let file = qemu_create(Fmt::Vhdx, "8M", "block_size=1M");
    let img = dir.path().join("k.vhdx");
    std::fs::write(&img, &file).unwrap();
    let path = img.to_str().unwrap();
    common::run("qemu-io", &["-f", "vhdx", "-c", "write -P 0x5a 0 3M", path]);
    let initial = std::fs::read(&img).unwrap();
    let new_size: u64 = 130 << 30;
    let rec = Recorder::new(initial.clone());
    vdisk::resize::resize(&rec.storage(true), new_size).unwrap();
    let ops = rec.ops();
    let mut state = initial;
    let mut seen_pending_log = false;
    for (i, op) in ops.iter().enumerate() {
        crashsim::apply(&mut state, op);
        std::fs::write(&img, &state).unwrap();
        let (h, _) =
            vdisk::vhdx::header::read_current(&vdisk::MemStorage::read_only(state.clone()))
                .unwrap();
        seen_pending_log |= !h.log_guid.is_zero();
        // A read-write open replays the log.
        let out = common::run(
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "read -P 0x5a 0 3M",
                "-c",
                "read -P 0 3M 5M",
                path,
            ],
        );
        assert!(!out.contains("failed"), "after op {i}: {out}");
        let info = common::run("qemu-img", &["info", "--output=json", path]);
        let at = info.rfind("\"virtual-size\":").unwrap() + 15;
        let size: u64 = info[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(size == 8 * MIB || size == new_size, "after op {i}: {size}");
        common::run("qemu-img", &["check", "-f", "vhdx", path]);
    }
    assert!(
        seen_pending_log,
        "no kill point left a log for QEMU to replay"
    );
}

/// A VHD child grown past its BAT room: its parent locators follow the BAT,
/// so the BAT moves to the end of the file. Every crash state reads the
/// child's old view (parent data under its own) or the grown one.
#[test]
fn vhd_child_bat_move_survives_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, _) = image_with_data(Fmt::Vhd);
    let pp = dir.path().join("p.vhd");
    std::fs::write(&pp, &parent).unwrap();
    let cp = dir.path().join("c.vhd");
    let child = vdisk::MemStorage::new(Vec::new());
    vdisk::snapshot(&pp, &vdisk::MemStorage::read_only(parent), &child, &cp).unwrap();
    std::fs::write(&cp, child.into_inner()).unwrap();
    let disk = common::open(&cp, true).unwrap();
    disk.write_at(&vec![0x5Au8; 2 * MIB as usize], 5 * MIB)
        .unwrap();
    disk.close().unwrap();
    drop(disk);
    let view = read_disk(&common::open(&cp, false).unwrap()).unwrap();
    let initial = std::fs::read(&cp).unwrap();
    let new_size: u64 = 1 << 30;
    let rec = Recorder::new(initial.clone());
    vdisk::resize::resize(&rec.storage(true), new_size).unwrap();
    let r = recording("Vhd child grow, moving the BAT", Fmt::Vhd, initial, &rec);
    each_state(&r, |file| {
        std::fs::write(&cp, &file).map_err(|e| e.to_string())?;
        let disk = common::open(&cp, false).map_err(|e| format!("does not open: {e}"))?;
        reads_old_or_grown(&disk, &view, new_size)
    });
    std::fs::write(&cp, rec.contents()).unwrap();
    assert_eq!(common::open(&cp, false).unwrap().size(), new_size);
}
