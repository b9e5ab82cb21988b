//! Start-up: runs from .init_array when the library is loaded. Every hook also
//! works before this (hooks can be called from other libraries' constructors).

use crate::{config, guard, logger, real};

extern "C" fn init() {
    let _g = guard::Guard::enter();
    config::load();
    logger::install();
    real::resolve_all();
    // The default panic hook may open files for a backtrace and print through
    // our own hooks; report on one line with a raw write instead.
    std::panic::set_hook(Box::new(|info| {
        logger::emit(format_args!("internal error: {info}; the call fails with EIO"));
    }));
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
