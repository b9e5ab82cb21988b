//! Random unaligned pwrites through the library into VHDX and VDI images made
//! by qemu-img equal the same writes on a raw copy, as qemu-img reads them
//! back, and qemu-img check finds no error (issues 5 and 6).

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;
#[path = "../vdisk/tests/vhd_util/mod.rs"]
#[allow(dead_code)]
mod vhd_util;

use common::{pattern, qemu_image_from, qemu_raw, run as tool};
use vhd_util::{apply_writes, random_writes};

const MIB: u64 = 1 << 20;

fn case(fmt: &str, name: &str, opts: &str, size: u64, block: u64, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Existing content (random, zero and never-written runs) under the writes.
    let (mut model, _) = pattern(seed, size as usize);
    let img = qemu_image_from(&model, dir, name, fmt, opts);
    let ops = random_writes(seed, size, block, 14);
    apply_writes(&mut model, &ops);
    preload::pwrite_through_library(dir, &img, &ops);
    let back = qemu_raw(&img, fmt);
    assert_eq!(back.len() as u64, size, "{name} ({opts}): size changed");
    if back != model {
        let at = back.iter().zip(&model).position(|(a, b)| a != b).unwrap();
        panic!("{name} ({opts}): qemu-img reads different data from byte {at}");
    }
    let check = tool("qemu-img", &["check", "-f", fmt, img.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{name} ({opts}): {check}");
    // And the library reads back what qemu reads.
    let cat = preload::run(dir, "cat", &[name]);
    assert!(
        cat.stdout == model,
        "{name} ({opts}): the library reads different data"
    );
}

#[test]
fn vhdx_dynamic_every_block_size_and_fixed() {
    let size = 40 * MIB + 3 * 512;
    for (i, bs) in [1, 8, 32, 256].into_iter().enumerate() {
        case(
            "vhdx",
            "d.vhdx",
            &format!("subformat=dynamic,block_size={bs}M"),
            size,
            bs * MIB,
            30 + i as u64,
        );
    }
    case(
        "vhdx",
        "f.vhdx",
        "subformat=fixed,block_size=8M",
        24 * MIB + 512,
        8 * MIB,
        40,
    );
}

#[test]
fn vdi_dynamic_static_and_partial_last_block() {
    case("vdi", "d.vdi", "", 24 * MIB, MIB, 50);
    case("vdi", "s.vdi", "static=on", 16 * MIB, MIB, 51);
    // Not a whole number of 1 MiB blocks.
    case("vdi", "o.vdi", "", 10 * MIB + 7 * 512, MIB, 52);
}
