//! Importing an image: its layers applied in order to a staging tree, the
//! tree written as an ext4 image.

use std::path::Path;

use crate::ext4::{self, Built};
use crate::layer;
use crate::source::{self, Image};
use crate::tree::{self, Tree};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] source::Error),
    #[error("layer {index} of {count}: {source}")]
    Layer {
        index: usize,
        count: usize,
        source: layer::Error,
    },
    #[error(transparent)]
    Tree(#[from] tree::Error),
    #[error("cannot write the ext4 image: {0}")]
    Ext4(#[from] ext4::Error),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What an import is doing, for progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Layer `index` (from 1) of `count` is being applied; `size` bytes
    /// stored.
    Layer {
        index: usize,
        count: usize,
        size: u64,
    },
    /// The ext4 image is being written.
    Disk,
}

/// Error for one layer's reading or applying.
enum LayerFailure {
    Source(source::Error),
    Apply(layer::Error),
}

impl From<source::Error> for LayerFailure {
    fn from(e: source::Error) -> Self {
        LayerFailure::Source(e)
    }
}

/// Applies `image`'s layers in `work` (an empty private folder on the same
/// file system as `out`, removed by the caller) and writes the ext4 image
/// to `out`.
pub fn build_disk(
    image: &Image,
    work: &Path,
    out: &Path,
    progress: &mut dyn FnMut(Step),
) -> Result<Built, Error> {
    let mut tree = Tree::create(&work.join("tree"))?;
    let count = image.layers.len();
    for (i, l) in image.layers.iter().enumerate() {
        progress(Step::Layer {
            index: i + 1,
            count,
            size: l.size,
        });
        let applied: Result<(), LayerFailure> = image.read_layer(l, |tar| {
            layer::apply(&mut tree, tar).map_err(LayerFailure::Apply)
        });
        match applied {
            Ok(_) => {}
            Err(LayerFailure::Source(e)) => return Err(e.into()),
            Err(LayerFailure::Apply(source)) => {
                return Err(Error::Layer {
                    index: i + 1,
                    count,
                    source,
                })
            }
        }
    }
    progress(Step::Disk);
    let scratch = work.join("metadata");
    std::fs::create_dir(&scratch).map_err(|source| Error::Io {
        path: scratch.clone(),
        source,
    })?;
    Ok(ext4::build(&tree, out, &scratch)?)
}
