//! The image lifecycle commands of `vhdio`: convert, map, compare, JSON
//! output. Images are made by qemu-img and read back by qemu-img.

#[path = "../../vdisk/tests/common/mod.rs"]
mod common;
mod vhdio_util;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{qemu_image_from, qemu_raw, run, vdisk_view, write_with_vdisk};
use vhdio_util::{VHDIO, ok, s, vhdio};

const MIB: usize = 1 << 20;

/// 10 MiB: random data, an explicit zero block, a hole, zero pages inside
/// data, data in the last sector.
fn test_disk() -> Vec<u8> {
    let mut rng = common::Rng(0x5eed);
    let mut d = vec![0u8; 10 * MIB];
    let mut fill = |d: &mut [u8]| d.iter_mut().for_each(|b| *b = rng.next() as u8);
    fill(&mut d[..MIB + 12345]);
    fill(&mut d[4 * MIB..7 * MIB]);
    // Zero pages inside data: a raw DEST leaves them out.
    d[5 * MIB..5 * MIB + 8192].fill(0);
    d[5 * MIB + 65536..5 * MIB + 3 * 65536].fill(0);
    fill(&mut d[10 * MIB - 512..]);
    d
}

/// The seven source kinds, made by qemu-img: (name, qemu format, options).
const KINDS: [(&str, &str, &str); 7] = [
    ("raw", "raw", ""),
    ("vhd-dynamic", "vpc", "subformat=dynamic,force_size=on"),
    ("vhd-fixed", "vpc", "subformat=fixed,force_size=on"),
    ("vhdx-dynamic", "vhdx", "subformat=dynamic"),
    ("vhdx-fixed", "vhdx", "subformat=fixed"),
    ("vdi-dynamic", "vdi", ""),
    ("vdi-static", "vdi", "static=on"),
];

/// What `vhdio convert` writes: (name, -O, -o, qemu format).
const OUTPUTS: [(&str, &str, &str, &str); 7] = [
    ("raw", "raw", "", "raw"),
    ("vhd-dynamic", "vhd", "dynamic", "vpc"),
    ("vhd-fixed", "vhd", "fixed", "vpc"),
    ("vhdx-dynamic", "vhdx", "", "vhdx"),
    ("vhdx-fixed", "vhdx", "fixed", "vhdx"),
    ("vdi-dynamic", "vdi", "", "vdi"),
    ("vdi-static", "vdi", "fixed", "vdi"),
];

/// Bytes a raw file of `data` needs at 4 KiB granularity.
fn nonzero_pages(data: &[u8]) -> u64 {
    data.chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
        * 4096
}

/// The structure checkers: qemu-img check for VHDX and VDI, vhdio check for
/// VHD (qemu-img has no check for vpc).
fn check_image(img: &Path, qemu_fmt: &str) {
    match qemu_fmt {
        "vpc" => {
            let out = ok(&["check", s(img)]);
            assert!(out.contains("No problems found"), "{out}");
        }
        "raw" => {}
        f => {
            run("qemu-img", &["check", "-f", f, s(img)]);
        }
    }
}

#[test]
fn convert_every_pair_reads_back_equal_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_disk();
    for (kind, fmt, opts) in KINDS {
        let src = if fmt == "raw" {
            let p = dir.path().join("src.raw");
            std::fs::write(&p, &data).unwrap();
            p
        } else {
            qemu_image_from(&data, dir.path(), &format!("src-{kind}"), fmt, opts)
        };
        for (out, o_fmt, o_opts, q_fmt) in OUTPUTS {
            let dest = dir.path().join(format!("{kind}-to-{out}.img"));
            let mut args = vec!["convert", "-O", o_fmt];
            if !o_opts.is_empty() {
                args.extend(["-o", o_opts]);
            }
            args.extend([s(&src), s(&dest)]);
            ok(&args);
            let back = qemu_raw(&dest, q_fmt);
            assert_eq!(back.len(), data.len(), "{kind} -> {out}: size");
            assert!(back == data, "{kind} -> {out}: content differs");
            check_image(&dest, q_fmt);
            if o_fmt == "raw" {
                let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
                let needed = nonzero_pages(&data);
                assert!(
                    allocated <= needed + (64 << 10),
                    "{kind} -> raw: {allocated} bytes allocated for {needed} of data"
                );
            }
            std::fs::remove_file(&dest).unwrap();
        }
    }
    // No temporary file left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("vhdio-convert"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// base <- mid <- top, each written by the library; returns the top.
fn vhdx_chain(dir: &Path, data: &[u8]) -> PathBuf {
    // 1 MiB blocks: a write into a child allocates (copies) a whole block.
    let base = qemu_image_from(data, dir, "base.vhdx", "vhdx", "block_size=1M");
    let mid = dir.join("mid.vhdx");
    let top = dir.join("top.vhdx");
    ok(&["snapshot", s(&base), s(&mid)]);
    write_with_vdisk(
        &mid,
        &[(0, vec![0xAA; 4096]), (3 * MIB as u64, vec![0xBB; MIB])],
    );
    ok(&["snapshot", s(&mid), s(&top)]);
    write_with_vdisk(
        &top,
        &[
            (4096, vec![0xCC; 512]),
            // Zeros over the parent's data: the flattened disk must keep them.
            (4 * MIB as u64, vec![0; 2 * MIB]),
            (9 * MIB as u64, vec![0xDD; 8192]),
        ],
    );
    top
}

#[test]
fn convert_flattens_a_differencing_vhdx_chain() {
    let dir = tempfile::tempdir().unwrap();
    let top = vhdx_chain(dir.path(), &test_disk());
    let view = vdisk_view(&top);
    for (out, o_fmt, _, q_fmt) in [OUTPUTS[0], OUTPUTS[1], OUTPUTS[3], OUTPUTS[5]] {
        let dest = dir.path().join(format!("flat-{out}"));
        ok(&["convert", "-p", "-O", o_fmt, s(&top), s(&dest)]);
        assert!(qemu_raw(&dest, q_fmt) == view, "chain -> {out} differs");
        check_image(&dest, q_fmt);
    }
}

#[test]
fn convert_with_backing_writes_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_disk();
    for (fmt, q_fmt) in [("vhd", "vpc"), ("vhdx", "vhdx"), ("vdi", "vdi")] {
        // The child allocates whole blocks: 2 MiB for qemu's VHD, 1 MiB
        // for the others.
        let (opts, block) = match q_fmt {
            "vpc" => ("force_size=on", 2 * MIB as u64),
            "vhdx" => ("block_size=1M", MIB as u64),
            _ => ("", MIB as u64),
        };
        let base = qemu_image_from(&data, dir.path(), &format!("b.{fmt}"), q_fmt, opts);
        let mut changed = data.clone();
        changed[2 * MIB..2 * MIB + 4096].fill(0x77);
        changed[6 * MIB..6 * MIB + 4096].fill(0); // zeros over data
        let src = dir.path().join(format!("changed-{fmt}.raw"));
        std::fs::write(&src, &changed).unwrap();
        let child = dir.path().join(format!("child.{fmt}"));
        ok(&["convert", "-O", fmt, "-B", s(&base), s(&src), s(&child)]);
        assert!(vdisk_view(&child) == changed, "{fmt}: child's view");
        // Only the two blocks with changed pages are stored.
        let stored = top_layer_data(&child);
        assert!(stored <= 2 * block, "{fmt}: child holds {stored}");
        let json = ok(&["info", s(&child)]);
        assert!(json.contains("chain (2 images"), "{json}");
    }
}

/// Bytes the top layer of `path` stores itself.
fn top_layer_data(path: &Path) -> u64 {
    let disk = common::open(path, false).unwrap();
    let top = &disk.layers()[0];
    let (mut off, mut data) = (0u64, 0u64);
    while off < top.virtual_size() {
        let (m, n) = top.map(off, top.virtual_size() - off).unwrap();
        if matches!(m, vdisk::Mapping::Data { .. }) {
            data += n;
        }
        off += n;
    }
    data
}

/// The footer of a VHD file: its last 512 bytes.
fn vhd_footer(path: &Path) -> Vec<u8> {
    let d = std::fs::read(path).unwrap();
    d[d.len() - 512..].to_vec()
}

#[test]
fn convert_azure_fixed_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let len = 7 * MIB + 12345;
    let mut rng = common::Rng(7);
    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let src = dir.path().join("azure.raw");
    std::fs::write(&src, &data).unwrap();
    let dest = dir.path().join("azure.vhd");
    ok(&[
        "convert",
        "-O",
        "vhd",
        "-o",
        "fixed,azure",
        s(&src),
        s(&dest),
    ]);
    let file_len = std::fs::metadata(&dest).unwrap().len();
    assert_eq!((file_len - 512) % MIB as u64, 0, "file size {file_len}");
    assert_eq!(file_len - 512, 8 * MIB as u64);
    let f = vhd_footer(&dest);
    let current = u64::from_be_bytes(f[48..56].try_into().unwrap());
    let original = u64::from_be_bytes(f[40..48].try_into().unwrap());
    assert_eq!(current, file_len - 512);
    assert_eq!(original, current);
    assert_eq!(
        u32::from_be_bytes(f[60..64].try_into().unwrap()),
        2,
        "fixed"
    );
    let sum = !f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    assert_eq!(u32::from_be_bytes(f[64..68].try_into().unwrap()), sum);
    // Probed again without -f (qemu-img needs -f vpc for its own).
    assert!(ok(&["info", s(&dest)]).contains("format: vhd fixed"));
    let back = qemu_raw(&dest, "vpc");
    assert_eq!(back.len(), 8 * MIB);
    assert!(back[..len] == data[..], "source bytes");
    assert!(back[len..].iter().all(|&b| b == 0), "zeros after");
    check_image(&dest, "vpc");
}

#[test]
fn convert_errors_leave_no_dest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("e.raw");
    std::fs::write(&src, vec![1u8; MIB]).unwrap();
    let dest = dir.path().join("e.vhd");
    // Bad options, a source of another format than -f says, dest = source.
    for args in [
        vec![
            "convert",
            "-O",
            "vhd",
            "-o",
            "block_size=3",
            s(&src),
            s(&dest),
        ],
        vec!["convert", "-O", "vdi", "-o", "azure", s(&src), s(&dest)],
        vec!["convert", "-f", "vhdx", "-O", "vhd", s(&src), s(&dest)],
        vec!["convert", "-O", "raw", s(&src), s(&src)],
    ] {
        let o = vhdio(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("vhdio: "), "{err}");
        assert!(!dest.exists(), "{args:?}");
    }
    assert_eq!(std::fs::read(&src).unwrap(), vec![1u8; MIB]);
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 1, "temporary files left");
}

#[test]
fn convert_killed_leaves_no_half_written_dest() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng(99);
    let data: Vec<u8> = (0..64 * MIB).map(|_| rng.next() as u8).collect();
    let src = dir.path().join("big.raw");
    std::fs::write(&src, &data).unwrap();
    let dest = dir.path().join("big.vdi");
    let mut child = Command::new(VHDIO)
        .args(["convert", "-O", "vdi", s(&src), s(&dest)])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(60));
    child.kill().unwrap();
    child.wait().unwrap();
    // Either the convert finished (DEST complete) or DEST does not exist.
    if dest.exists() {
        assert!(qemu_raw(&dest, "vdi") == data);
    } else {
        let o = vhdio(&["convert", "-O", "vdi", s(&src), s(&dest)]);
        assert_eq!(o.status.code(), Some(0));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("interrupted convert"), "{err}");
        assert!(qemu_raw(&dest, "vdi") == data);
    }
    assert!(std::fs::read(&src).unwrap() == data, "source changed");
}

/// A number field of a one-line JSON object (`"key": N`).
fn field(line: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\": ");
    let at = line.find(&pat)? + pat.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// (start, length, offset) of the data extents of a map in JSON lines.
fn data_extents(json: &str) -> Vec<(u64, u64, u64)> {
    json.lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| {
            (
                field(l, "start").unwrap(),
                field(l, "length").unwrap(),
                field(l, "offset").unwrap(),
            )
        })
        .collect()
}

#[test]
fn map_json_data_extents_equal_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    // qemu's vhdx driver reports no block status (all data): VHD and VDI.
    for (fmt, name) in [("vpc", "m.vhd"), ("vdi", "m.vdi")] {
        let img = dir.path().join(name);
        run("qemu-img", &["create", "-f", fmt, s(&img), "16M"]);
        run(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 1 0 64k",
                "-c",
                "write -P 2 3M 1M",
                "-c",
                "write -P 3 4M 3M",
                "-c",
                "write -P 4 12M 4k",
                s(&img),
            ],
        );
        let ours = ok(&["map", "--output=json", s(&img)]);
        let theirs = run("qemu-img", &["map", "--output=json", "-f", fmt, s(&img)]);
        let (a, b) = (data_extents(&ours), data_extents(&theirs));
        assert!(!a.is_empty(), "{fmt}: {ours}");
        assert_eq!(a, b, "{fmt}:\n{ours}\n{theirs}");
        // Every byte is in exactly one extent, in order.
        let mut next = 0;
        for l in ours.lines() {
            assert_eq!(field(l, "start"), Some(next), "{l}");
            next += field(l, "length").unwrap();
        }
        let human = ok(&["map", s(&img)]);
        assert_eq!(human.lines().count(), a.len() + 1, "{human}");
    }
}

#[test]
fn map_of_a_chain_names_the_depth() {
    let dir = tempfile::tempdir().unwrap();
    let top = vhdx_chain(dir.path(), &test_disk());
    let json = ok(&["map", "--output=json", s(&top)]);
    let depths: Vec<u64> = json.lines().map(|l| field(l, "depth").unwrap()).collect();
    assert!(
        depths.contains(&0) && depths.contains(&1) && depths.contains(&2),
        "{json}"
    );
    assert!(
        json.contains("top.vhdx") && json.contains("base.vhdx"),
        "{json}"
    );
}

#[test]
fn compare_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_disk();
    let raw = dir.path().join("c.raw");
    std::fs::write(&raw, &data).unwrap();
    let vhdx = qemu_image_from(&data, dir.path(), "c.vhdx", "vhdx", "");
    let vdi = qemu_image_from(&data, dir.path(), "c.vdi", "vdi", "");
    let o = vhdio(&["compare", s(&raw), s(&vhdx)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("identical"));
    assert_eq!(
        vhdio(&["compare", "-p", s(&vdi), s(&vhdx)]).status.code(),
        Some(0)
    );
    let mut changed = data.clone();
    changed[7 * MIB + 4321] ^= 0x40;
    let raw2 = dir.path().join("c2.raw");
    std::fs::write(&raw2, &changed).unwrap();
    let o = vhdio(&["compare", s(&vdi), s(&raw2)]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("offset {}", 7 * MIB + 4321)), "{out}");
    // A larger disk with zeros past the end is the same; data there is not.
    let mut longer = data.clone();
    longer.extend(vec![0u8; MIB]);
    std::fs::write(&raw2, &longer).unwrap();
    assert_eq!(
        vhdio(&["compare", s(&vhdx), s(&raw2)]).status.code(),
        Some(0)
    );
    longer[10 * MIB + 5] = 1;
    std::fs::write(&raw2, &longer).unwrap();
    assert_eq!(
        vhdio(&["compare", s(&vhdx), s(&raw2)]).status.code(),
        Some(1)
    );
    let missing = dir.path().join("none");
    assert_eq!(
        vhdio(&["compare", s(&vhdx), s(&missing)]).status.code(),
        Some(2)
    );
}

#[test]
fn info_and_check_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = test_disk();
    for (fmt, name) in [("vpc", "j.vhd"), ("vhdx", "j.vhdx"), ("vdi", "j.vdi")] {
        let opts = if fmt == "vpc" { "force_size=on" } else { "" };
        let img = qemu_image_from(&data, dir.path(), name, fmt, opts);
        let ours = ok(&["info", "--output=json", s(&img)]);
        let theirs = run("qemu-img", &["info", "--output=json", "-f", fmt, s(&img)]);
        // qemu-img's outermost virtual-size is the last one it prints.
        let qsize: u64 = field(
            &theirs[theirs.rfind("\"virtual-size\"").unwrap()..],
            "virtual-size",
        )
        .unwrap();
        assert_eq!(field(&ours, "virtual-size"), Some(qsize), "{fmt}");
        assert!(ours.contains(&format!("\"format\": \"{fmt}\"")), "{ours}");
        let check = ok(&["check", "--output=json", s(&img)]);
        assert_eq!(field(&check, "check-errors"), Some(0), "{check}");
    }
    // A chain: backing-image nested, backing-filename set.
    let top = vhdx_chain(dir.path(), &data);
    let json = ok(&["info", "--output=json", s(&top)]);
    assert_eq!(json.matches("\"backing-image\"").count(), 2, "{json}");
    assert!(json.contains("\"full-backing-filename\""), "{json}");
    // A damaged VHD: check-errors counted, exit 1.
    let vhd = dir.path().join("j.vhd");
    let mut bytes = std::fs::read(&vhd).unwrap();
    bytes[600] ^= 0xFF; // dynamic header checksum
    std::fs::write(&vhd, &bytes).unwrap();
    let o = vhdio(&["check", "--output=json", s(&vhd)]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(field(&out, "check-errors").unwrap() >= 1, "{out}");
}

#[test]
fn info_of_a_child_whose_parent_is_missing_shows_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let top = vhdx_chain(dir.path(), &test_disk());
    std::fs::rename(dir.path().join("mid.vhdx"), dir.path().join("moved.vhdx")).unwrap();
    let o = vhdio(&["info", s(&top)]);
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("format: vhdx differencing"), "{out}");
    assert!(out.contains("virtual size: 10 MiB"), "{out}");
    assert!(out.contains("identity: {"), "{out}");
    assert!(
        out.contains("parent: VHDX parent") && out.contains("mid.vhdx"),
        "{out}"
    );
    assert!(err.contains("parent not found"), "{err}");
    let o = vhdio(&["info", "--output=json", s(&top)]);
    assert_eq!(o.status.code(), Some(2));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("\"error\": ") && out.contains("\"virtual-size\": 10485760"),
        "{out}"
    );
}

/// Leaves a one-entry log in the VHDX at `path` that was never applied (a
/// writer killed between writing its log and the metadata): the entry
/// rewrites the first BAT sector with what it holds.
fn leave_pending_log(path: &Path) {
    use vdisk::Storage;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let st = (f, true);
    let (mut h, slot) = vdisk::vhdx::header::read_current(&st).unwrap();
    let regions = vdisk::vhdx::region::read(&st, st.len().unwrap()).unwrap();
    let mut sector = vec![0u8; 4096];
    st.read_exact_at(&mut sector, regions.bat.offset).unwrap();
    let guid = vdisk::vhdx::guid::Guid::random().unwrap();
    let entry = vdisk::vhdx::log::encode_entry(
        guid,
        7,
        0,
        st.len().unwrap(),
        &[(regions.bat.offset, &sector)],
    );
    st.write_all_at(&entry, h.log_offset).unwrap();
    h.sequence += 1;
    h.log_guid = guid;
    st.write_all_at(&h.encode(), vdisk::vhdx::header::SLOTS[1 - slot])
        .unwrap();
    st.sync().unwrap();
}

#[test]
fn dirty_flag_of_a_vhdx_with_a_pending_log() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    ok(&["create", "-f", "vhdx", s(&img), "8M"]);
    assert!(ok(&["info", "--output=json", s(&img)]).contains("\"dirty-flag\": false"));
    leave_pending_log(&img);
    let json = ok(&["info", "--output=json", s(&img)]);
    assert!(json.contains("\"dirty-flag\": true"), "{json}");
    // Resize replays the log first, as a writer does.
    ok(&["resize", s(&img), "+1M"]);
    let json = ok(&["info", "--output=json", s(&img)]);
    assert!(json.contains("\"dirty-flag\": false"), "{json}");
    assert_eq!(field(&json, "virtual-size"), Some(9 << 20));
    run("qemu-img", &["check", "-f", "vhdx", s(&img)]);
}
