//! containerd's runtime v2 shim for vmm microVMs (docs/containerd.md):
//! `ctr run --runtime io.containerd.vmm.v2 ...` runs this binary.

#[cfg(target_os = "linux")]
fn main() {
    vmm::shim::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("containerd-shim-vmm-v2: containerd's shims run on Linux hosts only");
    std::process::exit(1);
}
