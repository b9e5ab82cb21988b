//! Registration with nbdkit: the `nbdkit` crate's plugin table, extended with
//! the `block_size` callback (nbdkit >= 1.30) that the crate does not offer.

use std::ffi::{c_int, c_void};

use crate::Vhdio;

type Unused = Option<extern "C" fn()>;
type BlockSize = extern "C" fn(*mut c_void, *mut u32, *mut u32, *mut u32) -> c_int;

/// `struct nbdkit_plugin` up to `block_size`: the crate's part, then the
/// fields nbdkit added after `after_fork`, in its order.
#[repr(C)]
struct PluginTable {
    base: nbdkit::Plugin,
    list_exports: Unused,
    default_export: Unused,
    export_description: Unused,
    cleanup: Option<extern "C" fn()>,
    block_size: Option<BlockSize>,
}

/// Block size constraints: the logical sector is the smallest write that needs
/// no read-modify-write of the image; 4 KiB (or the physical sector) is what
/// clients should prefer.
extern "C" fn block_size(
    _handle: *mut c_void,
    minimum: *mut u32,
    preferred: *mut u32,
    maximum: *mut u32,
) -> c_int {
    let sizes = std::panic::catch_unwind(|| {
        crate::export::get(false).ok().map(|e| {
            let logical = e.disk.logical_sector_size();
            (
                logical,
                e.disk.physical_sector_size().max(4096).max(logical),
            )
        })
    });
    let Ok(Some((min, pref))) = sizes else {
        return -1;
    };
    // SAFETY: nbdkit passes three valid pointers to u32.
    unsafe {
        *minimum = min;
        *preferred = pref;
        *maximum = u32::MAX;
    }
    0
}

/// After the last connection, before nbdkit exits: the image commits the
/// table updates it keeps in memory (a client may disconnect without a
/// flush) and gives back reserved space, as the last close of a disk does.
extern "C" fn cleanup() {
    let _ = std::panic::catch_unwind(crate::export::close);
}

/// nbdkit's entry point.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_init() -> *const nbdkit::Plugin {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    let mut b = nbdkit::Builder::new();
    for flag in [
        &mut b.config,
        &mut b.config_complete,
        &mut b.config_help,
        &mut b.get_ready,
        &mut b.write_at,
        &mut b.can_write,
        &mut b.flush,
        &mut b.can_flush,
        &mut b.can_fua,
        &mut b.can_multi_conn,
        &mut b.can_cache,
        &mut b.zero,
        &mut b.can_zero,
        &mut b.can_fast_zero,
        &mut b.can_trim,
        &mut b.trim,
        &mut b.extents,
        &mut b.can_extents,
    ] {
        *flag = true;
    }
    let base = b.into_ptr::<Vhdio>();
    // SAFETY: `into_ptr` leaks a Box<Plugin> to hand to nbdkit; we take it
    // back (once: nbdkit calls plugin_init once) and leak a larger table.
    let base = unsafe { *Box::from_raw(base as *mut nbdkit::Plugin) };
    let mut table = Box::new(PluginTable {
        base,
        list_exports: None,
        default_export: None,
        export_description: None,
        cleanup: Some(cleanup),
        block_size: Some(block_size),
    });
    table.base._struct_size = std::mem::size_of::<PluginTable>() as u64;
    Box::into_raw(table) as *const nbdkit::Plugin
}

unsafe extern "C" {
    /// nbdkit's error log (stderr, or syslog when nbdkit runs in the background).
    fn nbdkit_error(fmt: *const std::ffi::c_char, ...);
}

/// vdisk's log messages into nbdkit's log: warnings (a damaged checksum read
/// anyway, a VHDX log replayed) always, debug messages with `nbdkit -v`.
struct NbdkitLogger;

impl log::Log for NbdkitLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let text = format!(
            "{}: {}",
            record.level().as_str().to_lowercase(),
            record.args()
        );
        if record.level() <= log::Level::Warn {
            let Ok(msg) = std::ffi::CString::new(text.replace('\0', " ")) else {
                return;
            };
            // SAFETY: a printf format taking one NUL-terminated string.
            unsafe { nbdkit_error(c"%s".as_ptr(), msg.as_ptr()) };
        } else {
            nbdkit::debug!("{text}");
        }
    }
    fn flush(&self) {}
}

static LOGGER: NbdkitLogger = NbdkitLogger;
