//! A `log::Log` that formats into a stack buffer and writes to fd 2 with the
//! raw write syscall: no allocation, no lock, never re-enters our `write` hook.

use std::fmt::Write as _;

use crate::{config, sys};

struct RawLogger;

static LOGGER: RawLogger = RawLogger;

/// A fixed buffer; text beyond its end is cut off.
pub struct StackBuf {
    buf: [u8; 1024],
    len: usize,
}

impl StackBuf {
    pub fn new() -> StackBuf {
        StackBuf {
            buf: [0; 1024],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Writes one line to stderr, whatever the log level.
pub fn emit(args: std::fmt::Arguments<'_>) {
    let saved = errno();
    let mut line = StackBuf::new();
    let _ = write!(line, "libvhdio[{}]: {args}", sys::getpid());
    if line.len == line.buf.len() {
        line.len -= 1;
    }
    let _ = line.write_str("\n");
    let _ = sys::write(config::log_fd(), line.as_bytes());
    set_errno(saved);
}

impl log::Log for RawLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            emit(format_args!("{level}{}", record.args()));
        }
    }
    fn flush(&self) {}
}

/// Installs the logger: warnings always, everything with LIBVHD_IO_DEBUG.
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if config::debug() {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Warn
        });
    }
}

/// Hex dump of data for LIBVHD_IO_DUMP, 16 bytes a line, at most 64 KiB.
pub fn dump(what: &str, offset: u64, data: &[u8]) {
    emit(format_args!("{what} {} bytes at {offset}", data.len()));
    for (i, chunk) in data.chunks(16).take(4096).enumerate() {
        let mut line = StackBuf::new();
        let _ = write!(line, "  {:012x}:", offset + i as u64 * 16);
        for b in chunk {
            let _ = write!(line, " {b:02x}");
        }
        emit(format_args!(
            "{}",
            std::str::from_utf8(line.as_bytes()).unwrap_or("")
        ));
    }
}

pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(v: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v };
}
