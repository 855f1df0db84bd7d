//! An image layer from outside (an archive a user imports, a registry's
//! blob): the input is the uncompressed tar stream, applied to a fresh
//! staging tree as `vmm image import` applies each layer. Whatever it
//! holds (absolute paths, `..`, links through links, whiteouts of what is
//! not there, hard links to folders or outside), nothing may appear
//! beside the tree, and nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_fuzz::scratch::Scratch;
use vmm_image::layer;
use vmm_image::tree::Tree;

fuzz_target!(|data: &[u8]| {
    let dir = Scratch::new("layer");
    let mut tree = Tree::create(&dir.path().join("tree")).expect("the staging tree");
    // Twice: the second pass meets what the first one made.
    let _ = layer::apply(&mut tree, data);
    let _ = layer::apply(&mut tree, data);
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["tree"], "a layer wrote beside the staging tree");
});
