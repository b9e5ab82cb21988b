#![no_main]
//! Fuzz target `open_qcow2`: see `vdisk::fuzz` (inputs are sparse files).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vdisk::fuzz::run_target("open_qcow2", data);
});
