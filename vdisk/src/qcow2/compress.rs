//! Decompressing one qcow2 compressed cluster: raw deflate (no zlib header)
//! as qemu writes it, or one zstd frame. The input may run past the end of
//! the stream (it is rounded to 512-byte sectors); decompression stops when
//! the cluster is full.

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use super::header::Compression;
use crate::{Error, Result};

/// Fills `out` (one cluster) from `input`.
pub fn decompress_cluster(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<()> {
    let bad = |d: String| Error::corrupt("qcow2 compressed cluster", d);
    match kind {
        Compression::Zlib => {
            let mut r = Box::<DecompressorOxide>::default();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _, written) = decompress(&mut r, input, out, 0, flags);
            match status {
                TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
                s => Err(bad(format!(
                    "deflate stream gave {written} of {} bytes ({s:?})",
                    out.len()
                ))),
            }
        }
        Compression::Zstd => zstd(input, out).map_err(bad),
    }
}

fn zstd(mut input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    use std::io::Read;
    let mut dec = FrameDecoder::new();
    // A cluster is at most 2 MiB: no larger window is legitimate.
    dec.set_max_window_size(4 << 20);
    dec.init(&mut input)
        .map_err(|e| format!("zstd frame header: {e}"))?;
    let mut done = 0usize;
    while done < out.len() {
        let before = (input.len(), done);
        dec.decode_blocks(
            &mut input,
            BlockDecodingStrategy::UptoBytes(out.len() - done),
        )
        .map_err(|e| format!("zstd block: {e}"))?;
        done += dec
            .read(&mut out[done..])
            .map_err(|e| format!("zstd: {e}"))?;
        if dec.is_finished() && dec.can_collect() == 0 {
            break;
        }
        if (input.len(), done) == before {
            break;
        }
    }
    if done != out.len() {
        return Err(format!("zstd frame gave {done} of {} bytes", out.len()));
    }
    Ok(())
}
