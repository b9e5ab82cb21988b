//! `vhdio`: runs programs with libvhdio preloaded, and inspects, checks,
//! creates and snapshots VHD, VHDX and VDI images (through `vdisk`).
//!
//! This binary is not the preload library: it uses std, clap and env_logger
//! freely, and contains no `unsafe` (`run` replaces the process with
//! `CommandExt::exec`).
#![forbid(unsafe_code)]

mod chain;
mod check;
mod commit;
mod compact;
mod compare;
mod convert;
mod create_vmdk;
mod info;
mod info_json;
mod inspect;
mod json;
mod lifecycle_cli;
mod lock;
mod map;
mod progress;
mod rebase;
mod resize;
mod run;
mod serve;
mod units;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vdisk::{CreateOptions, Format};

/// Exit status: success; `check`: no problem found.
pub const EXIT_OK: u8 = 0;
/// Exit status of `check`: the image has problems.
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit status: bad command line, or the image (or library) cannot be read,
/// is not an image, or cannot be created.
pub const EXIT_ERROR: u8 = 2;
/// Exit status of `run`: the command was found but could not be executed.
pub const EXIT_CANNOT_EXEC: u8 = 126;
/// Exit status of `run`: the command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
Exit status: 0 success (check: no problem found), 1 check found problems
(compare: the disks differ), 2 error (bad command line; image unreadable, not an image, cannot be created;
an image file locked by another process that writes it, or reads it refusing writers; library not found), 126 the command of 'run' cannot be executed, 127 it was
not found. Otherwise 'run' exits with the command's status, and 'serve' with
nbdkit's (127: nbdkit is not installed).

Examples:
  vhdio create -f vhdx disk.vhdx 1G
  vhdio run mkfs.ext4 -q disk.vhdx
  vhdio snapshot disk.vhdx disk-snap.vhdx
  vhdio run dd if=disk-snap.vhdx of=disk.raw bs=1M
  vhdio info disk-snap.vhdx
  vhdio serve --socket /tmp/disk.sock disk-snap.vhdx
  vhdio check disk.vhdx
  vhdio convert -O vdi disk-snap.vhdx flat.vdi
  vhdio commit disk-snap.vhdx
  vhdio resize disk.vhdx +1G";

#[derive(Parser, Debug)]
#[command(
    name = "vhdio",
    version,
    about = "Run programs on VHD, VHDX and VDI disk images with libvhdio; inspect, check, create and snapshot images",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Print debug messages of the image code to stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run COMMAND with libvhdio.so preloaded (added to LD_PRELOAD).
    ///
    /// The library is looked for next to the vhdio binary, then in ../lib and
    /// ../lib/libvhdio relative to it, then in the cargo target folders
    /// (release, debug) beside it.
    Run {
        /// Use this library instead of searching for libvhdio.so.
        #[arg(long, value_name = "PATH")]
        library: Option<PathBuf>,
        /// Run COMMAND even if the library cannot reach it (a static binary,
        /// a Go program, set-user-ID or set-group-ID to someone else).
        #[arg(long)]
        force: bool,
        /// Images read as regular files of their virtual size, not block
        /// devices (LIBVHD_IO_AS_FILE=1): tar, cp -a and rsync -a then store
        /// the virtual disk, and ntfs-3g can mount an image.
        #[arg(long)]
        as_file: bool,
        /// The command and its arguments (put `--` before a command that starts with `-`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<OsString>,
    },
    /// Serve IMAGE over NBD with nbdkit (its vhdio plugin), in the foreground.
    ///
    /// For what LD_PRELOAD cannot reach: a VM (qemu -drive
    /// file=nbd+unix:///?socket=PATH), the kernel (nbd-client), static
    /// binaries, other hosts. Prints the NBD URI, then runs nbdkit, whose exit
    /// status is vhdio's. Read-write, the image is locked against other
    /// writers (the library, qemu) from startup. The plugin is looked for
    /// beside the vhdio binary, in the cargo target folders, then in nbdkit's
    /// plugindir.
    Serve {
        /// Serve read-only (nbdkit -r): writes fail, no writer lock.
        #[arg(short = 'r', long)]
        read_only: bool,
        /// Listen on this Unix socket (default: vhdio-PID.sock in
        /// $XDG_RUNTIME_DIR or /tmp).
        #[arg(long, value_name = "PATH", conflicts_with = "port")]
        socket: Option<PathBuf>,
        /// Listen on this TCP port.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// With --port: the address to listen on (default: all).
        #[arg(long, value_name = "ADDR", requires = "port")]
        bind: Option<String>,
        /// Require TLS with X.509 certificates from DIR (ca-cert.pem,
        /// server-cert.pem, server-key.pem; see nbdkit-tls(1)).
        #[arg(long, value_name = "DIR")]
        tls_certificates: Option<PathBuf>,
        /// Require TLS with the pre-shared keys in FILE (username:hexkey lines).
        #[arg(long, value_name = "FILE")]
        tls_psk: Option<PathBuf>,
        /// Serve partition N of the image (or name a partition link, disk.vhdx2).
        #[arg(long, value_name = "N")]
        partition: Option<u32>,
        /// Use this plugin instead of searching for it.
        #[arg(long, value_name = "PATH")]
        plugin: Option<PathBuf>,
        /// Trims and zeroing punch holes in the image file where data stays
        /// in place (fixed images, parts of blocks) instead of writing
        /// zeros. The file becomes sparse: Windows refuses sparse VHDX files.
        #[arg(long)]
        punch_holes: bool,
        /// The image file.
        image: PathBuf,
    },
    /// Show format, virtual size, block size, allocation, the parent chain and partitions.
    Info(lifecycle_cli::Info),
    /// Check the structure of an image and its parent chain.
    ///
    /// For VHD also what qemu-img check does not check: footer and header
    /// checksums, the footer copy, BAT entries inside the file, overlapping
    /// blocks and locators, the sector bitmaps. Exit 0: clean; 1: problems
    /// found; 2: the image cannot be read at all.
    Check(lifecycle_cli::Check),
    /// Create an image of SIZE bytes (suffixes K, M, G, T: powers of 1024).
    Create {
        /// Image format.
        #[arg(short = 'f', long = "format", value_parser = parse_format, value_name = "vhd|vhdx|vdi|vmdk|qcow2")]
        format: Format,
        /// Comma-separated options: dynamic (default) or fixed, block_size=N
        /// or cluster_size=N (suffixes allowed), sector_size=512|4096 (VHDX
        /// only), compat=0.10|1.1 (qcow2 only). VMDK:
        /// subformat=monolithicSparse (default), monolithicFlat,
        /// twoGbMaxExtentSparse or twoGbMaxExtentFlat, grain_size=N.
        #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
        options: Option<String>,
        /// The new image file (must not exist).
        image: PathBuf,
        /// Virtual disk size; rounded up to a whole sector.
        #[arg(value_parser = units::parse_size)]
        size: u64,
    },
    /// Create CHILD, a differencing image of IMAGE in IMAGE's format.
    ///
    /// The child records IMAGE's identity and its path (relative and
    /// absolute). Do not write IMAGE afterwards: the child would change (and a
    /// VHDX child would lose its parent).
    Snapshot {
        /// The parent image.
        image: PathBuf,
        /// The new differencing image (must not exist).
        child: PathBuf,
    },
    /// Copy the disk of SOURCE (its whole chain, or a raw file) into DEST.
    ///
    /// SOURCE is probed: a file that is not an image is a raw disk (-f
    /// forces a format). DEST is sparse: blocks that read as zeros are not
    /// written (a raw DEST gets holes). DEST is written under a temporary
    /// name in its folder and renamed at the end, replacing DEST.
    Convert(lifecycle_cli::Convert),
    /// Show the allocation map of IMAGE through its chain (as qemu-img map).
    ///
    /// human: the data extents (offset, length, offset in the file, file).
    /// json: every extent with start, length, depth (0 = IMAGE, 1 its
    /// parent...), present, zero, data, and for data offset and file.
    /// Adjacent extents of the same kind are merged.
    Map(lifecycle_cli::Map),
    /// Compare the disks of A and B (images with their chains, or raw files).
    ///
    /// Exit 0: the same; 1: they differ (the first differing offset is
    /// printed); 2: error. A larger disk that reads zeros past the end of
    /// the smaller one is the same (with a warning).
    Compare(lifecycle_cli::Compare),
    /// Write IMAGE's data into its parent (or BASE), leaving IMAGE empty.
    ///
    /// What IMAGE stores is written into its parent (or BASE further down),
    /// then IMAGE becomes an empty child of it: both read the disk IMAGE
    /// showed; it keeps its identity. An interrupted commit leaves IMAGE
    /// reading as before. Images between IMAGE and BASE no longer read as
    /// before.
    Commit(lifecycle_cli::Commit),
    /// Make NEW_PARENT the parent of IMAGE (-b "": standalone).
    ///
    /// Safe (default): first copies into IMAGE every range it does not store
    /// where the old and the new parent read differently, so IMAGE reads as
    /// before. -u: rewrites only the link (after the parent was moved or
    /// renamed; VHD locators, VHDX locator entries, VDI parent UUID), and
    /// refuses a parent whose identity is not the one IMAGE records unless
    /// --force.
    Rebase(lifecycle_cli::Rebase),
    /// Change the virtual size of IMAGE to SIZE, or by +SIZE / -SIZE.
    ///
    /// Any format and kind (VHD fixed: the footer moves; VHD dynamic:
    /// within the room of its BAT; VHDX: through its log; VDI: the block map
    /// grows in place). New space reads zeros. Shrinking needs --shrink and
    /// frees the blocks past the new end.
    Resize(lifecycle_cli::Resize),
    /// Print the shell completion script of vhdio for SHELL.
    ///
    /// bash, zsh, fish, elvish or powershell, to stdout; `make install`
    /// installs the bash, zsh and fish ones.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Give space back: unmap blocks holding only zeros, move the others
    /// down into the holes, cut the file.
    ///
    /// Offline: refused while another process (qemu, the library, vhdio
    /// serve) writes the image. Crash-safe: a kill at any point leaves an
    /// image that reads the same disk. Zero blocks of a VHD child stay (VHD
    /// has no zero state: unmapping would show the parent).
    Compact {
        /// Only report what would be freed.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Show progress on a terminal.
        #[arg(short = 'p', long)]
        progress: bool,
        /// The image file.
        image: PathBuf,
    },
}

/// `--output` of info, check and map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

pub fn parse_output(s: &str) -> Result<Output, String> {
    match s {
        "human" => Ok(Output::Human),
        "json" => Ok(Output::Json),
        _ => Err(format!("unknown output '{s}' (human or json)")),
    }
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s.to_ascii_lowercase().as_str() {
        "vhd" | "vpc" => Ok(Format::Vhd),
        "vhdx" => Ok(Format::Vhdx),
        "vdi" => Ok(Format::Vdi),
        "vmdk" => Ok(Format::Vmdk),
        "qcow2" => Ok(Format::Qcow2),
        _ => Err(format!(
            "unknown format '{s}' (vhd, vhdx, vdi, vmdk or qcow2)"
        )),
    }
}

/// Why a command failed: the message (without the `vhdio:` prefix) and the status.
#[derive(Debug)]
pub struct Failure {
    pub status: u8,
    pub message: String,
}

pub fn fail(status: u8, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors
            // exit 2, with clap's "error:" replaced by the program name.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(EXIT_OK);
            }
            let text = e.render().to_string();
            eprint!("vhdio: {}", text.strip_prefix("error: ").unwrap_or(&text));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run {
            library,
            force,
            as_file,
            command,
        } => run::run(library.as_deref(), force, as_file, &command),
        Command::Serve {
            read_only,
            socket,
            port,
            bind,
            tls_certificates,
            tls_psk,
            partition,
            plugin,
            punch_holes,
            image,
        } => {
            let listen = match port {
                Some(port) => serve::Listen::Tcp { port, bind },
                None => serve::Listen::Socket(socket.unwrap_or_else(serve::default_socket)),
            };
            serve::serve(serve::ServeOptions {
                image: &image,
                read_only,
                partition,
                listen,
                tls: serve::Tls {
                    certificates: tls_certificates,
                    psk: tls_psk,
                },
                plugin: plugin.as_deref(),
                verbose: cli.verbose,
                punch_holes,
            })
        }
        Command::Info(c) => c.run(),
        Command::Check(c) => c.run(),
        Command::Create {
            format,
            options,
            image,
            size,
        } => create(format, options.as_deref(), &image, size),
        Command::Snapshot { image, child } => snapshot(&image, &child),
        Command::Convert(c) => c.run(),
        Command::Map(c) => c.run(),
        Command::Compare(c) => c.run(),
        Command::Commit(c) => c.run(),
        Command::Rebase(c) => c.run(),
        Command::Resize(c) => c.run(),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "vhdio", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Compact {
            dry_run,
            progress,
            image,
        } => compact::compact(compact::CompactOptions {
            image: &image,
            dry_run,
            progress,
        }),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(f) => {
            eprintln!("vhdio: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

/// Warnings of the image code always reach stderr; `-v` adds debug messages.
/// `RUST_LOG` overrides.
fn init_logging(verbose: bool) {
    let level = if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_default_env()
        .format(|buf, record| {
            writeln!(
                buf,
                "vhdio: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

/// Creates `path`, which must not exist; removes it again if `fill` fails.
fn with_new_file(
    path: &Path,
    fill: impl FnOnce(&dyn vdisk::Storage) -> vdisk::Result<vdisk::NewImage>,
) -> Result<vdisk::NewImage, Failure> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?;
    let storage = (file, true);
    match fill(&storage) {
        Ok(made) => Ok(made),
        Err(e) => {
            drop(storage);
            let _ = std::fs::remove_file(path);
            Err(fail(EXIT_ERROR, format!("{shown}: {e}")))
        }
    }
}

/// Parses `-o` options into `opts`.
fn apply_options(opts: &mut CreateOptions, text: &str) -> Result<(), String> {
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (item, None),
        };
        let number = |v: Option<&str>| -> Result<u64, String> {
            let v = v.ok_or_else(|| format!("option '{key}' needs a value ({key}=N)"))?;
            units::parse_size(v)
        };
        match key {
            "dynamic" if value.is_none() => opts.fixed = false,
            "fixed" if value.is_none() => opts.fixed = true,
            "subformat" | "type" => match value {
                Some("dynamic") => opts.fixed = false,
                Some("fixed") => opts.fixed = true,
                _ => return Err(format!("option '{item}': dynamic or fixed")),
            },
            "block_size" | "cluster_size" => {
                let n = number(value)?;
                opts.block_size =
                    Some(u32::try_from(n).map_err(|_| format!("block size {n} too large"))?);
            }
            "sector_size" | "logical_sector_size" => {
                let n = number(value)?;
                opts.logical_sector_size =
                    u32::try_from(n).map_err(|_| format!("sector size {n}"))?;
            }
            _ => {
                return Err(format!(
                    "unknown option '{item}' (dynamic, fixed, block_size=N, sector_size=N)"
                ));
            }
        }
    }
    Ok(())
}

fn create(format: Format, options: Option<&str>, image: &Path, size: u64) -> Result<u8, Failure> {
    if format == Format::Vmdk {
        return create_vmdk::create(options, image, size);
    }
    let mut opts = CreateOptions::new(format, size);
    // qcow2 only: compat=0.10 (version 2) or compat=1.1 (version 3, the default).
    let mut v2 = false;
    let mut rest = Vec::new();
    for item in options.unwrap_or("").split(',') {
        match item.trim().strip_prefix("compat=") {
            Some(v) if format == Format::Qcow2 => match v {
                "0.10" | "v2" => v2 = true,
                "1.1" | "v3" => v2 = false,
                _ => return Err(fail(EXIT_ERROR, format!("option '{item}': 0.10 or 1.1"))),
            },
            _ => rest.push(item),
        }
    }
    apply_options(&mut opts, &rest.join(",")).map_err(|e| fail(EXIT_ERROR, e))?;
    let made = with_new_file(image, |s| {
        let made = vdisk::create(s, opts)?;
        if v2 {
            // Rewritten as version 2 with the same geometry.
            s.set_len(0)?;
            let o = vdisk::qcow2::create::Qcow2Options {
                v2: true,
                ..Default::default()
            };
            let cs = made.block_size.unwrap_or(64 << 10);
            vdisk::qcow2::create::create(s, made.size, cs, &o)?;
        }
        Ok(made)
    })?;
    let kind = if made.fixed { "fixed" } else { "dynamic" };
    let block = made
        .block_size
        .map(|b| format!(", {} blocks", units::human(b as u64)))
        .unwrap_or_default();
    let sector = if made.logical_sector_size != 512 {
        format!(", {}-byte sectors", made.logical_sector_size)
    } else {
        String::new()
    };
    println!(
        "Created {} ({} {kind}, {} = {} bytes{block}{sector})",
        image.display(),
        made.format,
        units::human(made.size),
        made.size
    );
    if made.size != size {
        eprintln!(
            "vhdio: size rounded up from {size} to {} bytes (whole sectors)",
            made.size
        );
    }
    Ok(EXIT_OK)
}

fn snapshot(parent: &Path, child: &Path) -> Result<u8, Failure> {
    let shown = parent.display();
    // Check the parent opens (with its own parents) before linking to it.
    chain::open_chain(parent, &lock::ReadLocks::Skip)?;
    let parent_abs =
        std::fs::canonicalize(parent).map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?;
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let child_name = child
        .file_name()
        .ok_or_else(|| fail(EXIT_ERROR, format!("{}: not a file name", child.display())))?;
    let child_abs = std::fs::canonicalize(&child_dir)
        .map_err(|e| fail(EXIT_ERROR, format!("{}: {e}", child_dir.display())))?
        .join(child_name);
    let file =
        std::fs::File::open(&parent_abs).map_err(|e| fail(EXIT_ERROR, format!("{shown}: {e}")))?;
    let parent_storage = (file, false);
    let made = with_new_file(child, |s| {
        vdisk::snapshot(&parent_abs, &parent_storage, s, &child_abs)
    })?;
    println!(
        "Created {} ({} differencing, {} = {} bytes), parent {}",
        child.display(),
        made.format,
        units::human(made.size),
        made.size,
        parent_abs.display()
    );
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let mut o = CreateOptions::new(Format::Vhdx, 1);
        apply_options(&mut o, "fixed,block_size=2M,sector_size=4096").unwrap();
        assert!(o.fixed);
        assert_eq!(o.block_size, Some(2 << 20));
        assert_eq!(o.logical_sector_size, 4096);
        apply_options(&mut o, "subformat=dynamic").unwrap();
        assert!(!o.fixed);
        assert!(apply_options(&mut o, "bogus").is_err());
        assert!(apply_options(&mut o, "block_size").is_err());
        assert!(apply_options(&mut o, "fixed=1").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
