//! bench helper.
//!
//! mkchain vhdx DIR SIZE BLOCK DEPTH   -> DIR/l0.vhdx (base) .. l{DEPTH-1}.vhdx (top); prints the top path
//! mkchain vhd  DIR BASE.vhd DEPTH     -> children l1.vhd .. l{DEPTH-1}.vhd of BASE (a dynamic VHD, e.g.
//!                                        from qemu-img), built by hand; prints the top path
//! mkchain open PATH N                 -> opens PATH (and its chain) with vdisk N times, prints the
//!                                        median ns and the chain depth

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vdisk::vhd::dynamic_header::{DynamicHeader, HEADER_SIZE};
use vdisk::vhd::footer::{Footer, FOOTER_SIZE};
use vdisk::vhdx::{create, CreateOptions, ParentInfo};
use vdisk::StdParentOpener;

fn open(path: &Path) -> vdisk::Disk {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    vdisk::open_disk(Box::new((f, false)), path, vdisk::OpenOptions::default(), &StdParentOpener)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn uniq(seed: u64) -> [u8; 16] {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = t ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (std::process::id() as u64) << 32;
    let mut out = [0u8; 16];
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn vhdx_chain(dir: &Path, size: u64, block: u32, depth: usize) -> PathBuf {
    let mut prev: Option<PathBuf> = None;
    for i in 0..depth {
        let path = dir.join(format!("l{i}.vhdx"));
        let _ = std::fs::remove_file(&path);
        let file = File::create_new(&path).unwrap();
        let mut opts = CreateOptions::dynamic(size);
        opts.block_size = block;
        if let Some(p) = &prev {
            let link = open(p).layers()[0].link_id();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            opts.parent = Some(ParentInfo { data_write_guid: link, paths: vec![("relative_path".into(), format!(".\\{name}"))] });
        }
        create(&(file, true), &opts).unwrap();
        prev = Some(path);
    }
    prev.unwrap()
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A differencing VHD child of `parent`: [footer copy][header][BAT, all free][W2ru locator][footer].
fn vhd_child(parent: &Path, child: &Path, seed: u64) {
    let p = File::open(parent).unwrap();
    let len = p.metadata().unwrap().len();
    let mut fb = [0u8; FOOTER_SIZE];
    p.read_exact_at(&mut fb, len - FOOTER_SIZE as u64).unwrap();
    let pf = Footer::parse(&fb).unwrap();
    let mut hb = [0u8; HEADER_SIZE];
    p.read_exact_at(&mut hb, pf.data_offset).unwrap();
    let ph = DynamicHeader::parse(&hb).unwrap();

    let entries = ph.max_table_entries as u64;
    let table = 512 + HEADER_SIZE as u64;
    let bat_len = (entries * 4).next_multiple_of(512);
    let loc_at = table + bat_len;
    let footer_at = loc_at + 512;

    let mut f = pf.clone();
    put_be64(&mut f.raw, 16, 512);
    put_be32(&mut f.raw, 60, 4);
    f.raw[68..84].copy_from_slice(&uniq(seed));
    let footer = f.encode();

    let name = parent.file_name().unwrap().to_string_lossy().into_owned();
    let mut h = ph.clone();
    put_be64(&mut h.raw, 16, table);
    h.raw[40..56].copy_from_slice(&pf.unique_id);
    h.raw[64..576].fill(0);
    for (i, u) in name.encode_utf16().take(255).enumerate() {
        h.raw[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
    }
    h.raw[576..576 + 24 * 8].fill(0);
    let rel: Vec<u8> = format!(".\\{name}").encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    h.raw[576..580].copy_from_slice(b"W2ru");
    put_be32(&mut h.raw, 580, 512);
    put_be32(&mut h.raw, 584, rel.len() as u32);
    put_be64(&mut h.raw, 592, loc_at);
    let header = h.encode();

    let _ = std::fs::remove_file(child);
    let c = OpenOptions::new().write(true).create_new(true).open(child).unwrap();
    c.write_all_at(&footer, 0).unwrap();
    c.write_all_at(&header, 512).unwrap();
    c.write_all_at(&vec![0xFF; bat_len as usize], table).unwrap();
    let mut loc = [0u8; 512];
    loc[..rel.len()].copy_from_slice(&rel);
    c.write_all_at(&loc, loc_at).unwrap();
    c.write_all_at(&footer, footer_at).unwrap();
}

fn vhd_chain(dir: &Path, base: &Path, depth: usize) -> PathBuf {
    let mut prev = base.to_path_buf();
    for i in 1..depth {
        let child = dir.join(format!("l{i}.vhd"));
        vhd_child(&prev, &child, i as u64);
        prev = child;
    }
    prev
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).unwrap_or_else(|| panic!("usage: see the source"));
    match arg(1).as_str() {
        "vhdx" => {
            let top = vhdx_chain(Path::new(arg(2)), arg(3).parse().unwrap(), arg(4).parse().unwrap(), arg(5).parse().unwrap());
            println!("{}", top.display());
        }
        "vhd" => {
            let top = vhd_chain(Path::new(arg(2)), Path::new(arg(3)), arg(4).parse().unwrap());
            println!("{}", top.display());
        }
        "open" => {
            let path = Path::new(arg(2));
            let n: usize = arg(3).parse().unwrap();
            let mut times = Vec::new();
            let mut depth = 0;
            for _ in 0..n {
                let t = Instant::now();
                let d = open(path);
                times.push(t.elapsed().as_nanos() as u64);
                depth = d.layers().len();
            }
            times.sort();
            println!("{} {depth}", times[n / 2]);
        }
        other => panic!("unknown command {other}"),
    }
}
