#![no_main]
//! Fuzz target `open_vmdk`: see `vdisk::fuzz` (inputs are sparse files, except
//! for vhdx_log, whose input is the log region).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzz::run_target("open_vmdk", data);
});
