//! Helpers shared by vdisk's integration tests.
#![allow(dead_code)]

/// SHA-256, so tests compare with published digests without a dependency.
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                chunk[4 * i],
                chunk[4 * i + 1],
                chunk[4 * i + 2],
                chunk[4 * i + 3],
            ]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for i in 0..8 {
            h[i] = h[i].wrapping_add(v[i]);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_known_answer() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

use std::path::Path;
use std::process::Command;

/// Runs a command that must succeed (qemu-img, qemu-io, sfdisk...), returning
/// stdout. A missing tool fails the test: CI installs every tool the README names.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install it: see README): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `len` seeded pseudo-random bytes, none of them zero (so that a range that
/// reads zeros afterwards was zeroed, not left as written).
pub fn nonzero_data(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| rng.next() as u8 | 1).collect()
}

/// Asserts `actual == expected`, naming the first differing byte (not a
/// dump of megabytes).
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs first at byte {i}: {} != {}",
            actual[i], expected[i]
        );
    }
}

/// Deterministic test data of `len` bytes: runs of pseudo-random bytes, zeros
/// and untouched holes (the caller decides what a hole is), chosen by `seed`.
/// Returns the data and the (offset, len) list of non-hole runs.
pub fn pattern(seed: u64, len: usize) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut data = vec![0u8; len];
    let mut runs = Vec::new();
    let mut off = 0usize;
    while off < len {
        let n = (1 + rng.next() as usize % (3 << 20)).min(len - off);
        match rng.next() % 3 {
            0 => {
                for b in &mut data[off..off + n] {
                    *b = rng.next() as u8;
                }
                runs.push((off, n));
            }
            1 => runs.push((off, n)), // explicit zeros
            _ => {}                   // hole: never written
        }
        off += n;
    }
    (data, runs)
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Writes `data` as a raw file and converts it with qemu-img into `fmt` with
/// `opts` (e.g. "subformat=dynamic,force_size=on").
pub fn qemu_image_from(
    data: &[u8],
    dir: &Path,
    name: &str,
    fmt: &str,
    opts: &str,
) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.src.raw"));
    std::fs::write(&raw, data).unwrap();
    let img = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let (r, i) = (
        raw.to_str().unwrap().to_string(),
        img.to_str().unwrap().to_string(),
    );
    args.push(&r);
    args.push(&i);
    run("qemu-img", &args);
    img
}

/// `qemu-img create`: an empty `img` of format `fmt` with the creation
/// options `opts` (none if empty) and the size `size`.
pub fn qemu_create(img: &Path, fmt: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().unwrap(), size]);
    run("qemu-img", &args);
}

/// `qemu-img create`: `img` of format `fmt` over `backing` (a name relative
/// to `img`'s folder, as qemu-img stores it) of format `backing_fmt`, with
/// the creation options `opts` (none if empty) and the size `size` (the
/// backing file's if `None`).
pub fn qemu_child(
    img: &Path,
    fmt: &str,
    opts: &str,
    backing: &str,
    backing_fmt: &str,
    size: Option<&str>,
) {
    let mut args = vec!["create", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["-b", backing, "-F", backing_fmt, img.to_str().unwrap()]);
    args.extend(size);
    run("qemu-img", &args);
}

/// The virtual disk of `img` as qemu-img reads it (the independent reader).
pub fn qemu_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let out = img.with_extension("qemu.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// Opens `path` with vdisk (std files, std parent opener).
pub fn open(path: &Path, writable: bool) -> vdisk::Result<vdisk::Disk> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap();
    vdisk::open_disk(
        Box::new((file, writable)),
        path,
        vdisk::OpenOptions { writable },
        &vdisk::StdParentOpener,
    )
}

/// Opens `path` writable with vdisk, writes the `(offset, bytes)` pairs and
/// closes it (a close error fails the test).
pub fn write_with_vdisk(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let disk = open(path, true).unwrap();
    for (off, b) in writes {
        disk.write_at(b, *off).unwrap();
    }
    disk.close().unwrap();
}

/// The whole disk of `path` as vdisk reads it, in one read.
pub fn vdisk_view(path: &Path) -> Vec<u8> {
    let disk = open(path, false).unwrap();
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(&mut v, 0).unwrap();
    v
}

/// Reads the whole disk in odd-sized pieces that cross sectors and blocks.
pub fn read_all(disk: &vdisk::Disk) -> Vec<u8> {
    let mut data = vec![0u8; disk.size() as usize];
    let mut off = 0usize;
    let mut step = 1usize;
    while off < data.len() {
        let n = step.min(data.len() - off);
        disk.read_at(&mut data[off..off + n], off as u64).unwrap();
        off += n;
        step = step * 7 % 300_007 + 1;
    }
    data
}

/// Creates a raw disk file of `size` bytes in `dir` and partitions it by piping
/// `script` into `sfdisk`. Script lines may name partitions `NAME<N> : ...`
/// (with NAME the file name) to choose the slot or entry number.
pub fn sfdisk_raw(dir: &Path, name: &str, size: u64, script: &str) -> std::path::PathBuf {
    use std::io::Write;
    let raw = dir.join(name);
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .args([
            "-q",
            "--no-reread",
            "--no-tell-kernel",
            raw.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sfdisk (install util-linux): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    raw
}

/// One partition as `sfdisk -d` reports it on a raw disk file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SfdiskPart {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// `83` style hex for dos, the upper-case type GUID for gpt.
    pub kind: String,
    /// GPT name (empty for dos).
    pub name: String,
}

/// Parses `sfdisk -d RAW` (the oracle for partition numbers, starts and sizes).
pub fn sfdisk_dump(raw: &Path) -> Vec<SfdiskPart> {
    let file_name = raw.file_name().unwrap().to_str().unwrap().to_string();
    let out = run("sfdisk", &["-d", raw.to_str().unwrap()]);
    let mut parts = Vec::new();
    for line in out.lines() {
        let Some((dev, fields)) = line.split_once(" : ") else {
            continue;
        };
        let dev = dev.trim();
        let Some(number) = dev
            .rsplit('/')
            .next()
            .and_then(|d| d.strip_prefix(file_name.as_str()))
        else {
            continue;
        };
        let mut p = SfdiskPart {
            number: number.parse().unwrap(),
            start: 0,
            size: 0,
            kind: String::new(),
            name: String::new(),
        };
        // `name="..."` may contain commas: take it out first.
        let fields = match fields.split_once("name=\"") {
            Some((before, name)) => {
                p.name = name.trim_end().trim_end_matches('"').to_string();
                before
            }
            None => fields,
        };
        for field in fields.split(',') {
            let Some((k, v)) = field.trim().split_once('=') else {
                continue;
            };
            match k {
                "start" => p.start = v.trim().parse().unwrap(),
                "size" => p.size = v.trim().parse().unwrap(),
                "type" => p.kind = v.trim().to_uppercase(),
                _ => {}
            }
        }
        parts.push(p);
    }
    parts
}

/// `partx --show -o NR,START,SECTORS` on a raw disk file (libblkid: the second oracle).
pub fn partx_show(raw: &Path) -> Vec<(u32, u64, u64)> {
    run(
        "partx",
        &[
            "--show",
            "-g",
            "-o",
            "NR,START,SECTORS",
            raw.to_str().unwrap(),
        ],
    )
    .lines()
    .map(|l| {
        let v: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (v[0] as u32, v[1], v[2])
    })
    .collect()
}
