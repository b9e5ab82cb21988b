//! The command lines of the image lifecycle commands (convert, map,
//! compare, commit, rebase, resize) and of info and check: their clap
//! arguments and dispatch.
//! The help text of each command is on its `Command` variant in main.rs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;
use vdisk::Format;

use crate::lock::ReadLocks;
use crate::{
    Failure, Output, check, commit, compare, convert, info, info_json, map, parse_output, rebase,
    resize,
};

/// Formats of convert's -f and -O (raw included).
fn parse_any_format(s: &str) -> Result<Format, String> {
    match s.to_ascii_lowercase().as_str() {
        "raw" => Ok(Format::Raw),
        "vhd" | "vpc" => Ok(Format::Vhd),
        "vhdx" => Ok(Format::Vhdx),
        "vdi" => Ok(Format::Vdi),
        "vmdk" => Ok(Format::Vmdk),
        "qcow2" => Ok(Format::Qcow2),
        _ => Err(format!(
            "unknown format '{s}' (raw, vhd, vhdx, vdi, vmdk or qcow2)"
        )),
    }
}

#[derive(Args, Debug)]
pub struct Convert {
    /// Format of SOURCE (vhd, vhdx, vdi, vmdk, qcow2, raw); default: probed.
    #[arg(short = 'f', value_parser = parse_any_format, value_name = "FMT")]
    source_format: Option<Format>,
    /// Format of DEST.
    #[arg(short = 'O', value_parser = parse_any_format, value_name = "raw|vhd|vhdx|vdi|vmdk|qcow2")]
    output_format: Format,
    /// Options of DEST as for create (dynamic, fixed, block_size=N,
    /// sector_size=N), plus azure (VHD: fixed, size rounded up to a whole
    /// MiB, creator fields Hyper-V writes).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    /// Write DEST as a differencing child of BACKING holding only what
    /// differs from it (BACKING's format; same size as SOURCE).
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<PathBuf>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Read SOURCE (and BACKING) even while another process writes them:
    /// no reader locks (DEST may then be inconsistent), as qemu-img -U.
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The image or raw file to read.
    source: PathBuf,
    /// The file to write (replaced if it exists).
    dest: PathBuf,
}

impl Convert {
    pub fn run(self) -> Result<u8, Failure> {
        convert::convert(convert::ConvertArgs {
            source_format: self.source_format,
            output_format: self.output_format,
            options: self.options.as_deref(),
            backing: self.backing.as_deref(),
            progress: self.progress,
            force_share: self.force_share,
            source: &self.source,
            dest: &self.dest,
        })
    }
}

#[derive(Args, Debug)]
pub struct Map {
    /// human (default) or json.
    #[arg(long, value_parser = parse_output, default_value = "human", value_name = "human|json")]
    output: Output,
    /// Read the image even while another process writes it (no reader locks).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The image file.
    image: PathBuf,
}

impl Map {
    pub fn run(self) -> Result<u8, Failure> {
        map::map(
            &self.image,
            self.output == Output::Json,
            &ReadLocks::unless(self.force_share),
        )
    }
}

#[derive(Args, Debug)]
pub struct Compare {
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Read A and B even while another process writes them (no reader locks).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The first image or raw file.
    a: PathBuf,
    /// The second image or raw file.
    b: PathBuf,
}

impl Compare {
    pub fn run(self) -> Result<u8, Failure> {
        compare::compare(
            &self.a,
            &self.b,
            self.progress,
            &ReadLocks::unless(self.force_share),
        )
    }
}

#[derive(Args, Debug)]
pub struct Commit {
    /// Commit into this image of IMAGE's chain (default: its parent).
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// The differencing image.
    image: PathBuf,
}

impl Commit {
    pub fn run(self) -> Result<u8, Failure> {
        commit::commit(&self.image, self.base.as_deref(), self.progress)
    }
}

#[derive(Args, Debug)]
pub struct Rebase {
    /// The new parent ("" for none).
    #[arg(short = 'b', value_name = "NEW_PARENT")]
    new_parent: OsString,
    /// Rewrite only the parent link.
    #[arg(short = 'u')]
    unsafe_link_only: bool,
    /// With -u: link a parent whose identity differs.
    #[arg(long)]
    force: bool,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// The differencing image.
    image: PathBuf,
}

impl Rebase {
    pub fn run(self) -> Result<u8, Failure> {
        rebase::rebase(rebase::RebaseArgs {
            image: &self.image,
            new_parent: Path::new(&self.new_parent),
            unsafe_link_only: self.unsafe_link_only,
            force: self.force,
            progress: self.progress,
        })
    }
}

#[derive(Args, Debug)]
pub struct Resize {
    /// Allow a smaller size (the data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// The image file.
    image: PathBuf,
    /// New size (suffixes K, M, G, T), or +SIZE / -SIZE.
    #[arg(allow_hyphen_values = true, value_name = "[+|-]SIZE")]
    size: String,
}

impl Resize {
    pub fn run(self) -> Result<u8, Failure> {
        resize::resize(&self.image, &self.size, self.shrink)
    }
}

#[derive(Args, Debug)]
pub struct Info {
    /// human (default) or json (qemu-img info's keys).
    #[arg(long, value_parser = parse_output, default_value = "human", value_name = "human|json")]
    output: Output,
    /// Read the image even while another process writes it (no reader
    /// locks; what is shown may be inconsistent).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The image file.
    image: PathBuf,
}

impl Info {
    pub fn run(self) -> Result<u8, Failure> {
        let locks = ReadLocks::unless(self.force_share);
        match self.output {
            Output::Human => info::info(&self.image, &locks),
            Output::Json => info_json::info_json(&self.image, &locks),
        }
    }
}

#[derive(Args, Debug)]
pub struct Check {
    /// human (default) or json (qemu-img check's keys).
    #[arg(long, value_parser = parse_output, default_value = "human", value_name = "human|json")]
    output: Output,
    /// Read the image even while another process writes it (no reader
    /// locks; a change under way may show as problems).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// The image file.
    image: PathBuf,
}

impl Check {
    pub fn run(self) -> Result<u8, Failure> {
        check::check_output(
            &self.image,
            self.output == Output::Json,
            &ReadLocks::unless(self.force_share),
        )
    }
}
