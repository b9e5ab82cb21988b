//! Writing qcow2 images.

use std::path::Path;

use super::Qcow2Image;
use super::header::Header;
use crate::{Error, Result};

pub struct WriteState {}

impl WriteState {
    pub fn load(_img: &Qcow2Image) -> Result<WriteState> {
        Ok(WriteState {})
    }
}

pub fn check_writable(_h: &Header, _path: &Path) -> Result<()> {
    Ok(())
}

pub fn write(
    _img: &Qcow2Image,
    _buf: &[u8],
    _offset: u64,
    _parent: &dyn Fn(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    Err(Error::unsupported("qcow2 writes"))
}

pub fn commit(_img: &Qcow2Image) -> Result<()> {
    Ok(())
}
