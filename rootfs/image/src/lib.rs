//! OCI and Docker images as ext4 root disks: reading image archives and
//! layouts, applying their layers, writing the ext4 image.

pub mod ext4;
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
pub mod import;
pub mod layer;
pub mod pull;
pub mod source;
pub mod tree;
pub mod zstd;

pub use import::{build_disk, Step};
pub use source::Image;

#[cfg(test)]
mod tests;
