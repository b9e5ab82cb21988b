//! VHDX (MS-VHDX 1.0). Not implemented yet: opening one is `Unsupported`.

use std::path::Path;

use crate::{Error, Image, OpenOptions, Result, Storage};

pub fn open(storage: Box<dyn Storage>, path: &Path, opts: OpenOptions) -> Result<Box<dyn Image>> {
    let _ = (storage, path, opts);
    Err(Error::unsupported("VHDX images are not supported yet"))
}
