//! `vdisk`: virtual disks inside VHD, VHDX and VDI image files.
//!
//! Safe Rust, no globals, no FFI. All I/O on image files goes through the
//! [`Storage`] trait, so the same code runs over raw syscalls in the preload
//! library and over `std::fs::File` in tools and tests. Opening another file (a
//! parent image) goes through [`ParentOpener`], which the caller supplies: the
//! library never opens a path on its own.
//!
//! Layers: a format module (`vhd`, ...) parses and validates its on-disk
//! structures and implements [`Image`], which maps virtual offsets to file
//! extents. [`Disk`] stacks images into a parent chain and runs the generic
//! read and write loops over those mappings.
#![forbid(unsafe_code)]

pub mod bytes;
pub mod copy;
pub mod crc;
pub mod create;
mod disk;
mod disk_map;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod image;
pub mod lock;
#[cfg(feature = "file-lock")]
mod lock_file;
#[cfg(feature = "file-lock")]
pub use lock_file::{
    FileWriterLock, LockingParentOpener, ParentFile, holder_of, lock_reader_on, writer_refusal,
};
mod open;
pub mod part;
mod probe;
pub mod qcow2;
mod raw;
pub mod relink;
mod relocate;
pub mod resize;
mod space;
mod storage;
mod table;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use create::{CreateOptions, NewImage, create, snapshot};
pub use disk::{Disk, MAX_CHAIN_DEPTH};
pub use disk_map::Allocation;
pub use error::{Error, Result};
pub use image::{Format, Geometry, Image, Mapping, ParentLink, Zeroing};
pub use open::{
    OpenOptions, ParentOpener, StdParentOpener, open_disk, open_image, open_image_with,
};
pub use probe::probe;
pub use raw::RawImage;
pub use space::{BlockUsage, block_usage};
pub use storage::{MemStorage, Storage};
