//! The re-entrancy guard: while library code runs on a thread, every hook on
//! that thread goes straight to libc. Rust std (and anything vdisk calls) uses
//! open64, statx, read, write and close, which are our own exported symbols.

use std::cell::Cell;

thread_local! {
    // const-initialised and without Drop: no lazy registration, no allocation,
    // usable during thread teardown.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is already inside the library.
#[inline]
pub fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Marks the thread as inside the library until dropped.
pub struct Guard {
    was: bool,
}

impl Guard {
    pub fn enter() -> Guard {
        Guard {
            was: INSIDE.with(|c| c.replace(true)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let was = self.was;
        INSIDE.with(|c| c.set(was));
    }
}
