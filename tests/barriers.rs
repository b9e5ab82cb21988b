//! Container syncs as real programs cause them under the library (issue 15),
//! counted by strace on the container file itself (`-y` names each fd's
//! file; the dummy memfd the program holds is not the container).
//!
//! * A later reader's flush makes a dead writer's data durable: `sync FILE`,
//!   fdatasync and BLKFLSBUF on an O_RDONLY fd of an image whose writer
//!   exited must fdatasync/fsync the container (issue 15 item 4: on Linux a
//!   flush on an O_RDONLY fd flushes the file).
//! * Barriers cost: a 256 MiB `dd bs=1M conv=notrunc,fsync` into an empty
//!   image costs at most 8 container syncs in all, and 2000 random
//!   allocating 4 KiB writes with one fsync at the end at most 16.

#[path = "../vdisk/tests/common/mod.rs"]
mod common;
mod preload;

use std::path::Path;

/// One image of each kind the tests use: (name, qemu-img format, -o options).
const IMAGES: [(&str, &str, &str); 5] = [
    ("d32.vhdx", "vhdx", "subformat=dynamic,block_size=32M"),
    ("d8.vhdx", "vhdx", "subformat=dynamic,block_size=8M"),
    ("d.vhd", "vpc", "subformat=dynamic"),
    ("d.vdi", "vdi", "static=off"),
    ("d.vmdk", "vmdk", "subformat=monolithicSparse"),
];

fn create(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            opts,
            img.to_str().unwrap(),
            size,
        ],
    );
    img
}

/// Runs `program args` under the library and strace (tracing only the sync
/// calls, so the program runs at full speed); returns how many
/// fsync/fdatasync calls the tracee made on `container`, and strace's log.
fn container_syncs(dir: &Path, container: &Path, program: &str, args: &[&str]) -> (usize, String) {
    let log = dir.join("strace.log");
    let preload = format!("LD_PRELOAD={}", preload::library().display());
    let mut a = vec![
        "-f",
        "-y",
        "--seccomp-bpf",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        log.to_str().unwrap(),
        "-E",
        &preload,
        program,
    ];
    a.extend(args);
    let out = std::process::Command::new("strace")
        .args(&a)
        .current_dir(dir)
        .env_remove("LIBVHD_IO_DEBUG")
        .output()
        .expect("cannot run strace (install it: see README)");
    assert!(
        out.status.success(),
        "{program} {args:?} under strace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let tag = format!("<{}>", container.canonicalize().unwrap().display());
    // `fsync(5</dir/d.vhdx>) = 0`, or its `<unfinished ...>` half when threads interleave.
    let on_container = |l: &str, call: &str| {
        l.split(call).skip(1).any(|rest| {
            rest.trim_start_matches(|c: char| c.is_ascii_digit())
                .starts_with(&tag)
        })
    };
    let n = text
        .lines()
        .filter(|l| on_container(l, " fsync(") || on_container(l, " fdatasync("))
        .count();
    (n, text)
}

/// A writer under the library allocates a few blocks and exits without any
/// fsync; `flusher` (a program that opens the image read-only and flushes)
/// must then sync the container.
fn reader_flush_syncs(flusher: &str, program: &str, args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut bad = Vec::new();
    for (name, fmt, opts) in IMAGES {
        let img = create(dir, name, fmt, opts, "256M");
        preload::run(
            dir,
            preload::python(),
            &[
                "-c",
                "import os,sys\nfd=os.open(sys.argv[1],os.O_WRONLY)\n\
                 [os.pwrite(fd,bytes([i+1])*65536,i*(40<<20)) for i in range(5)]\nos.close(fd)",
                name,
            ],
        );
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "IMG" { name } else { a })
            .collect();
        let (n, log) = container_syncs(dir, &img, program, &args);
        println!("{flusher} on {name} after the writer exited: {n} container syncs");
        if n == 0 {
            bad.push(format!(
                "{name}: no fsync/fdatasync on the container; strace:\n{log}"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{flusher} on an image opened read-only does not sync the container \
         (issue 15 item 4):\n{}",
        bad.join("\n")
    );
}

#[test]
fn sync_file_syncs_the_container() {
    reader_flush_syncs("sync FILE", "sync", &["IMG"]);
}

#[test]
fn fdatasync_on_read_only_fd_syncs_the_container() {
    reader_flush_syncs(
        "fdatasync on an O_RDONLY fd",
        preload::python(),
        &[
            "-c",
            "import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nos.fdatasync(fd)",
            "IMG",
        ],
    );
}

#[test]
fn blkflsbuf_on_read_only_fd_syncs_the_container() {
    reader_flush_syncs(
        "BLKFLSBUF on an O_RDONLY fd",
        preload::python(),
        &[
            "-c",
            "import os,sys,fcntl\nfd=os.open(sys.argv[1],os.O_RDONLY)\nfcntl.ioctl(fd,0x1261)",
            "IMG",
        ],
    );
}

/// 256 MiB of non-zero data (zeros could be skipped as unallocated).
fn pattern_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("pattern");
    let mut mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut data = Vec::with_capacity(256 << 20);
    for i in 0..256u32 {
        mib[..4].copy_from_slice(&i.to_le_bytes());
        data.extend_from_slice(&mib);
    }
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn dd_256m_costs_at_most_8_container_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pattern = pattern_file(dir);
    let mut counts = Vec::new();
    for (name, fmt, opts) in IMAGES {
        let img = create(dir, name, fmt, opts, "1G");
        let (n, _) = container_syncs(
            dir,
            &img,
            "dd",
            &[
                &format!("if={}", pattern.display()),
                &format!("of={name}"),
                "bs=1M",
                "count=256",
                "conv=notrunc,fsync",
                "status=none",
            ],
        );
        // The data must be there too (a count of 0 from writing nothing proves nothing).
        common::run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                fmt,
                pattern.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&img).unwrap();
        counts.push((name, n));
    }
    println!("container syncs for dd bs=1M count=256 conv=fsync: {counts:?}");
    let total: usize = counts.iter().map(|c| c.1).sum();
    assert!(
        counts.iter().all(|c| c.1 <= 8),
        "dd of 256 MiB: container fsync+fdatasync per image {counts:?} (total {total}); at most 8 each wanted"
    );
}

#[test]
fn random_4k_allocating_writes_cost_a_bounded_number_of_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut counts = Vec::new();
    for (name, fmt, opts) in IMAGES {
        let img = create(dir, name, fmt, opts, "1G");
        let (n, _) = container_syncs(
            dir,
            &img,
            preload::python(),
            &[
                "-c",
                "import os,sys,random\nr=random.Random(15)\nfd=os.open(sys.argv[1],os.O_RDWR)\n\
                 for i in range(2000):\n    os.pwrite(fd,bytes([i%255+1])*4096,r.randrange(0,1<<18)*4096)\n\
                 os.fsync(fd)\nos.close(fd)",
                name,
            ],
        );
        std::fs::remove_file(&img).unwrap();
        counts.push((name, n));
    }
    println!("container syncs for 2000 random 4 KiB writes + 1 fsync: {counts:?}");
    assert!(
        counts.iter().all(|c| c.1 <= 16),
        "2000 random allocating 4 KiB writes, one fsync: container fsync+fdatasync per image {counts:?}; at most 16 each wanted"
    );
}
