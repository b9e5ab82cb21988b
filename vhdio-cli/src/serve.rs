//! `vhdio serve`: serves an image over NBD with nbdkit and its `vhdio`
//! plugin (nbdkit-vhdio), for what LD_PRELOAD cannot reach: VMs, the kernel
//! (nbd-client), static binaries, other hosts.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{EXIT_CANNOT_EXEC, EXIT_ERROR, EXIT_NOT_FOUND, Failure, fail};

/// The plugin in cargo's target folder.
pub const BUILT_PLUGIN: &str = "libnbdkit_vhdio.so";
/// The plugin as installed in nbdkit's plugindir (`make install`).
pub const INSTALLED_PLUGIN: &str = "nbdkit-vhdio-plugin.so";

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Socket(PathBuf),
    Tcp { port: u16, bind: Option<String> },
}

#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// nbdkit --tls-certificates: a folder with ca-cert.pem, server-cert.pem, server-key.pem.
    pub certificates: Option<PathBuf>,
    /// nbdkit --tls-psk: a PSK file (username:hexkey lines).
    pub psk: Option<PathBuf>,
}

impl Tls {
    fn enabled(&self) -> bool {
        self.certificates.is_some() || self.psk.is_some()
    }
}

pub struct ServeOptions<'a> {
    pub image: &'a Path,
    pub read_only: bool,
    pub partition: Option<u32>,
    pub listen: Listen,
    pub tls: Tls,
    pub plugin: Option<&'a Path>,
    /// nbdkit -v: debug messages of nbdkit and the plugin.
    pub verbose: bool,
    /// The plugin's punch-holes=true: trims punch holes in the image file.
    pub punch_holes: bool,
}

/// Where to look for the plugin, relative to the folder of the vhdio binary:
/// beside it (cargo's target folder), the other cargo profile and the
/// folder above deps/ (test binaries), then `PREFIX/lib/nbdkit/plugins`.
pub fn candidates(exe_dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![exe_dir.join(BUILT_PLUGIN)];
    for profile in ["release", "debug"] {
        v.push(exe_dir.join("..").join(profile).join(BUILT_PLUGIN));
    }
    v.push(exe_dir.join("../lib/nbdkit/plugins").join(INSTALLED_PLUGIN));
    v
}

/// nbdkit's plugindir (`nbdkit --dump-config`), or a clear error naming
/// the package when nbdkit is not installed.
fn nbdkit_plugindir() -> Result<PathBuf, Failure> {
    let out = Command::new("nbdkit")
        .arg("--dump-config")
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                fail(
                    EXIT_NOT_FOUND,
                    "nbdkit is not installed; vhdio serve needs it (Debian/Ubuntu: \
                     apt-get install nbdkit; Fedora: dnf install nbdkit)",
                )
            } else {
                fail(EXIT_CANNOT_EXEC, format!("cannot run nbdkit: {e}"))
            }
        })?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("plugindir="))
        .map(PathBuf::from)
        .ok_or_else(|| fail(EXIT_ERROR, "nbdkit --dump-config prints no plugindir"))
}

/// The plugin to load: `explicit`, one beside the binary or in the build
/// tree, else the one installed in nbdkit's plugindir.
pub fn find_plugin(explicit: Option<&Path>, plugindir: &Path) -> Result<PathBuf, Failure> {
    if let Some(p) = explicit {
        return std::fs::canonicalize(p)
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| fail(EXIT_ERROR, format!("plugin {}: not found", p.display())));
    }
    let exe = std::env::current_exe()
        .map_err(|e| fail(EXIT_ERROR, format!("cannot find the vhdio binary: {e}")))?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut list = candidates(dir);
    list.push(plugindir.join(INSTALLED_PLUGIN));
    if let Some(found) = list.iter().find(|c| c.is_file()) {
        return Ok(std::fs::canonicalize(found).unwrap_or_else(|_| found.clone()));
    }
    let tried: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
    Err(fail(
        EXIT_ERROR,
        format!(
            "the nbdkit plugin is not installed (looked in {}): build it (cargo build --release \
             --workspace), install it (make install), or name it with --plugin",
            tried.join(", ")
        ),
    ))
}

/// The NBD URI clients use.
pub fn uri(listen: &Listen, tls: bool) -> String {
    let s = if tls { "s" } else { "" };
    match listen {
        Listen::Socket(p) => format!("nbd{s}+unix:///?socket={}", p.display()),
        Listen::Tcp { port, bind } => {
            let host = match bind.as_deref() {
                Some(b) if b.contains(':') => format!("[{b}]"),
                Some(b) => b.to_string(),
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "localhost".into()),
            };
            format!("nbd{s}://{host}:{port}")
        }
    }
}

/// nbdkit's arguments, foreground, with the plugin and its parameters.
pub fn nbdkit_args(o: &ServeOptions, plugin: &Path, image: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--foreground".into()];
    if o.verbose {
        a.push("--verbose".into());
    }
    match &o.listen {
        Listen::Socket(p) => {
            a.push("--unix".into());
            a.push(p.into());
        }
        Listen::Tcp { port, bind } => {
            a.push("--port".into());
            a.push(port.to_string().into());
            if let Some(b) = bind {
                a.push("--ipaddr".into());
                a.push(b.into());
            }
        }
    }
    if o.tls.enabled() {
        a.push("--tls=require".into());
    }
    if let Some(c) = &o.tls.certificates {
        a.push(format!("--tls-certificates={}", c.display()).into());
    }
    if let Some(p) = &o.tls.psk {
        a.push(format!("--tls-psk={}", p.display()).into());
    }
    if o.read_only {
        a.push("--readonly".into());
    }
    a.push(plugin.into());
    let mut file = OsString::from("file=");
    file.push(image);
    a.push(file);
    if let Some(n) = o.partition {
        a.push(format!("partition={n}").into());
    }
    // Read-write: the writer lock is taken at startup, so that nbdkit refuses
    // to start on an image another process writes.
    a.push(format!("readonly={}", o.read_only).into());
    if o.punch_holes {
        a.push("punch-holes=true".into());
    }
    a
}

pub fn serve(o: ServeOptions) -> Result<u8, Failure> {
    let plugindir = nbdkit_plugindir()?;
    let plugin = find_plugin(o.plugin, &plugindir)?;
    // nbdkit resolves the path itself; absolute so that the messages name it.
    let image = std::path::absolute(o.image)
        .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", o.image.display())))?;
    if !image.exists() {
        return Err(fail(
            EXIT_ERROR,
            format!("{}: no such file", image.display()),
        ));
    }
    let mut o = o;
    if let Listen::Socket(p) = &o.listen {
        // The URI must work from the client's folder too.
        let abs = std::path::absolute(p)
            .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", p.display())))?;
        o.listen = Listen::Socket(abs);
    }
    let args = nbdkit_args(&o, &plugin, &image);
    log::debug!("nbdkit {args:?}");
    println!("{}", uri(&o.listen, o.tls.enabled()));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // exec only returns on failure; nbdkit's exit status is then ours.
    let e = Command::new("nbdkit").args(&args).exec();
    Err(fail(EXIT_CANNOT_EXEC, format!("cannot run nbdkit: {e}")))
}

/// The default socket when neither --socket nor --port is given.
pub fn default_socket() -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("vhdio-{}.sock", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let sock = Listen::Socket("/run/a.sock".into());
        assert_eq!(uri(&sock, false), "nbd+unix:///?socket=/run/a.sock");
        assert_eq!(uri(&sock, true), "nbds+unix:///?socket=/run/a.sock");
        let tcp = Listen::Tcp {
            port: 10809,
            bind: Some("::1".into()),
        };
        assert_eq!(uri(&tcp, false), "nbd://[::1]:10809");
        let tcp = Listen::Tcp {
            port: 10810,
            bind: Some("127.0.0.1".into()),
        };
        assert_eq!(uri(&tcp, true), "nbds://127.0.0.1:10810");
    }

    #[test]
    fn args_read_only() {
        let o = ServeOptions {
            image: Path::new("/i/d.vhdx"),
            read_only: true,
            partition: Some(2),
            listen: Listen::Socket("/s".into()),
            tls: Tls::default(),
            plugin: None,
            verbose: false,
            punch_holes: false,
        };
        let a = nbdkit_args(&o, Path::new("/p.so"), Path::new("/i/d.vhdx"));
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            a,
            [
                "--foreground",
                "--unix",
                "/s",
                "--readonly",
                "/p.so",
                "file=/i/d.vhdx",
                "partition=2",
                "readonly=true"
            ]
        );
    }
}
