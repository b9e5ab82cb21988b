//! Helpers for tests/serve.rs: the built library and plugin, NBD servers
//! killed on drop, clients and the library's view of an image.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const VHDIO: &str = env!("CARGO_BIN_EXE_vhdio");
pub const MIB: u64 = 1 << 20;

/// The release builds of libvhdio.so and the plugin (cargo test does not
/// build cdylib-only packages for another package's tests).
pub fn built() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--lib",
                "-p",
                "vhdio",
                "-p",
                "nbdkit-vhdio",
            ])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"))
            .status()
            .expect("cannot run cargo");
        assert!(
            status.success(),
            "building libvhdio.so and the plugin failed"
        );
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("release");
        let lib = target.join("libvhdio.so");
        let plugin = target.join("libnbdkit_vhdio.so");
        assert!(lib.exists() && plugin.exists());
        (lib, plugin)
    })
}

pub fn library() -> &'static Path {
    &built().0
}
pub fn plugin() -> &'static Path {
    &built().1
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `program args` with libvhdio preloaded.
pub fn preloaded(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LD_PRELOAD", library())
        .output()
        .unwrap()
}

/// The whole disk as the library presents it.
pub fn library_view(image: &Path, out: &Path) -> Vec<u8> {
    let o = preloaded(
        "dd",
        &[
            &format!("if={}", s(image)),
            &format!("of={}", s(out)),
            "bs=1M",
        ],
    );
    assert!(o.status.success(), "dd through the library: {}", text(&o));
    fs::read(out).unwrap()
}

/// Writes `len` bytes of `byte` at `offset` of the image through the library.
pub fn library_write(image: &Path, offset: u64, len: u64, byte: u8) -> Output {
    let src = image.with_extension("pattern");
    fs::write(&src, vec![byte; len as usize]).unwrap();
    preloaded(
        "dd",
        &[
            &format!("if={}", s(&src)),
            &format!("of={}", s(image)),
            "bs=64k",
            &format!("seek={offset}"),
            "oflag=seek_bytes",
            "conv=notrunc",
        ],
    )
}

/// A server process, killed when dropped (also when a test fails).
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `vhdio serve --socket DIR/s.sock ARGS...`, once its socket accepts.
    pub fn vhdio(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join("s.sock");
        let mut c = Command::new(VHDIO);
        c.arg("serve").arg("--socket").arg(&socket).args(args);
        let mut server = Server::start(c, socket);
        // The URI comes first, on stdout.
        use std::io::BufRead;
        let mut line = String::new();
        let stdout = server.child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim_end(), server.uri);
        server
    }

    /// nbdkit with the plugin from the build tree, directly.
    pub fn nbdkit(dir: &Path, params: &[&str]) -> Server {
        let socket = dir.join("s.sock");
        let mut c = Command::new("nbdkit");
        c.args(["--foreground", "--unix"])
            .arg(&socket)
            .arg(plugin())
            .args(params);
        Server::start(c, socket)
    }

    pub fn start(mut c: Command, socket: PathBuf) -> Server {
        built();
        // nbdkit leaves its socket behind when killed.
        let _ = fs::remove_file(&socket);
        let child = c
            .env_remove("LD_PRELOAD")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let mut server = Server { child, socket, uri };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = self.output();
                panic!("server exited with {status} before listening: {out}");
            }
            assert!(Instant::now() < deadline, "server did not listen in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops the server; returns what it printed.
    pub fn output(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        use std::io::Read;
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out
    }
}

/// A server that must fail to start: its status and output.
pub fn failed_start(mut c: Command) -> (i32, String) {
    let o = c.env_remove("LD_PRELOAD").output().unwrap();
    assert!(!o.status.success(), "server started: {}", text(&o));
    (o.status.code().unwrap_or(-1), text(&o))
}

/// The data extents of `nbdinfo --map`, adjacent ones merged: (start, end).
pub fn data_extents(uri: &str) -> Vec<(u64, u64)> {
    let map = ok("nbdinfo", &["--map", uri]);
    let mut data: Vec<(u64, u64)> = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (start, len, kind): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if kind & 1 == 0 {
            match data.last_mut() {
                Some(last) if last.1 == start => last.1 = start + len,
                _ => data.push((start, start + len)),
            }
        }
    }
    data
}

/// A VHDX whose headers name an active log with one entry (as in
/// tests/permissions.rs): vdisk's template with a log entry that allocates
/// block 0 and fills its first sector. Returns the disk after replay.
pub fn dirty_vhdx(path: &Path) -> Vec<u8> {
    use vdisk::vhdx::header::{self, SLOTS};
    let mut file = vdisk::fuzz::vhdx_template();
    let tlen = file.len() as u64;
    let (mut h, _) = header::read_current(&vdisk::MemStorage::read_only(file.clone())).unwrap();
    h.log_guid = vdisk::fuzz::LOG_GUID;
    for (i, slot) in SLOTS.iter().enumerate() {
        h.sequence += i as u64;
        let b = h.encode();
        file[*slot as usize..*slot as usize + b.len()].copy_from_slice(&b);
    }
    let regions =
        vdisk::vhdx::region::read(&vdisk::MemStorage::read_only(file.clone()), tlen).unwrap();
    let bat = regions.bat.offset as usize;
    let mut bat_sector = file[bat..bat + 4096].to_vec();
    bat_sector[..8].copy_from_slice(&(tlen | 6).to_le_bytes());
    let sector = vec![0xC3u8; 4096];
    let mut e =
        vdisk::fuzz::vhdx_log_entry(1, 0, tlen, &[(bat as u64, &bat_sector), (tlen, &sector)]);
    e[56..64].copy_from_slice(&(tlen + (1 << 20)).to_le_bytes());
    e[4..8].fill(0);
    let crc = vdisk::crc::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    let log = h.log_offset as usize;
    file[log..log + e.len()].copy_from_slice(&e);
    fs::write(path, &file).unwrap();
    let mut disk = vec![0u8; 2 << 20];
    disk[..4096].fill(0xC3);
    disk
}
