//! libvhdio: an LD_PRELOAD library that serves VHD, VHDX and VDI images as
//! block devices to unmodified programs.
//!
//! This crate is the FFI boundary only: the exported hooks, the table of real
//! libc functions, the fd table and the errno mapping. The formats live in the
//! safe `vdisk` crate. Data path: fd -> `fdtable::OpenFile` (fd context, shared
//! by dup'ed fds) -> window (partition or whole disk) -> `images::ImageObject`
//! (one per container inode, refcounted) -> `vdisk::Disk` (image and parents).
//!
//! Dependencies, decided (see README "Design decisions"): `libc`; `log` as the
//! facade with our own raw-write logger (env_logger would lock, allocate and
//! write through our own `write` hook); std's `Mutex`/`RwLock` instead of
//! parking_lot (a futex word, no global allocation on contention); atomics
//! instead of once_cell for the real-function table (a lazy cell can deadlock
//! on re-entry); CRC tables are in vdisk (GPT needs IEEE CRC-32 beside CRC-32C).

mod config;
mod errno;
mod fdtable;
mod guard;
mod hooks;
mod images;
mod init;
mod lock;
mod logger;
mod real;
mod shard_lock;
mod snapshot;
mod storage;
mod sys;
