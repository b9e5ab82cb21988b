//! `vhdio convert` to and from VMDK and qcow2 (the formats vdisk gained
//! beside VHD, VHDX and VDI): read back and checked by qemu-img.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
mod vhdio_util;

use common::{qemu_image_from, qemu_raw, run};
use vhdio_util::{ok, s};

const MIB: usize = 1 << 20;

#[test]
fn convert_to_and_from_vmdk_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(17);
    let mut data = vec![0u8; 10 * MIB];
    data[..3 * MIB]
        .iter_mut()
        .for_each(|b| *b = rng.next() as u8);
    data[8 * MIB..9 * MIB]
        .iter_mut()
        .for_each(|b| *b = rng.next() as u8);
    let src = qemu_image_from(&data, dir.path(), "s.vhdx", "vhdx", "");
    for fmt in ["qcow2", "vmdk"] {
        let out = dir.path().join(format!("out.{fmt}"));
        ok(&["convert", "-O", fmt, s(&src), s(&out)]);
        assert!(qemu_raw(&out, fmt) == data, "vhdx -> {fmt}");
        run("qemu-img", &["check", "-f", fmt, s(&out)]);
        let back = dir.path().join(format!("back-{fmt}.vdi"));
        ok(&["convert", "-O", "vdi", s(&out), s(&back)]);
        assert!(qemu_raw(&back, "vdi") == data, "{fmt} -> vdi");
    }
    // A qcow2 child holding only what differs from a qcow2 backing file.
    let base = qemu_image_from(&data, dir.path(), "b.qcow2", "qcow2", "");
    let mut changed = data.clone();
    changed[5 * MIB..5 * MIB + 4096].fill(0x42);
    let raw = dir.path().join("changed.raw");
    std::fs::write(&raw, &changed).unwrap();
    let child = dir.path().join("c.qcow2");
    ok(&["convert", "-O", "qcow2", "-B", s(&base), s(&raw), s(&child)]);
    assert!(qemu_raw(&child, "qcow2") == changed, "qcow2 child");
    let info = run("qemu-img", &["info", "--output=json", s(&child)]);
    assert!(info.contains("backing-filename"), "{info}");
}
