//! FUSE file systems (ntfs-3g, fuse2fs) mounted on images by a daemon that
//! runs in the foreground under the library.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why this machine cannot mount FUSE file systems, if it cannot tell before
/// trying (a refused mount is found by [`Mount::start`]).
pub fn no_fuse() -> Option<&'static str> {
    (!Path::new("/dev/fuse").exists()).then_some("/dev/fuse is missing")
}

pub struct Mount {
    child: Option<Child>,
    point: PathBuf,
    err: PathBuf,
}

impl Mount {
    /// Starts `cmd` (a daemon in the foreground that mounts on `point`, its
    /// output going to files in `dir`) and waits for the mount. `Err` is the
    /// reason to skip: mounting is not permitted here (a container).
    pub fn start(mut cmd: Command, dir: &Path, point: &Path) -> Result<Mount, String> {
        let point = fs::canonicalize(point).unwrap();
        let what = format!("{cmd:?}");
        let (out, err) = (dir.join("fuse-daemon.out"), dir.join("fuse-daemon.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what} (install it): {e}"));
        let mut m = Mount {
            child: Some(child),
            point,
            err,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.source().is_none() {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                let err = fs::read_to_string(&m.err).unwrap_or_default();
                if err.contains("Operation not permitted") || err.contains("Permission denied") {
                    return Err(format!("FUSE cannot mount here: {}", err.trim()));
                }
                let out = fs::read_to_string(&out).unwrap_or_default();
                panic!("{what} exited ({st}) without mounting:\n{out}{err}");
            }
            assert!(Instant::now() < deadline, "{what}: no mount after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// The mount's source field in /proc/self/mountinfo, if mounted.
    pub fn source(&self) -> Option<String> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let point = self.point.to_str().unwrap();
        info.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|&x| x == "-")?;
            (f.get(4) == Some(&point)).then(|| f.get(sep + 2).unwrap_or(&"").to_string())
        })
    }

    /// umount, then the daemon must exit cleanly (it has closed the image).
    pub fn finish(mut self) {
        let st = Command::new("umount").arg(&self.point).status().unwrap();
        assert!(st.success(), "umount {}: {st}", self.point.display());
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "FUSE daemon still running 30 s after umount"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = fs::read_to_string(&self.err).unwrap_or_default();
        assert!(st.success(), "FUSE daemon exited with {st}:\n{err}");
        assert!(
            !err.contains("libvhdio["),
            "the library warned in the FUSE daemon:\n{err}"
        );
    }
}

impl Drop for Mount {
    /// A failed test leaves no mount behind.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.point)
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Unwraps a mount, or prints why FUSE is unavailable and gives `None`.
pub fn or_skip(r: Result<Mount, String>) -> Option<Mount> {
    match r {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}
