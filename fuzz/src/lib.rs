//! What the fuzz targets share: a virtio driver the input steers, and
//! scratch folders.

pub mod block;
pub mod driver;
pub mod scratch;
