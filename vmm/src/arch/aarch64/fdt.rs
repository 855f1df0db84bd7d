//! The flattened device tree an arm64 kernel reads at entry (its address in
//! X0): memory, CPUs by MPIDR, PSCI through HVC, the GICv3, the arch
//! timer, the console UART, every virtio-mmio device, and `chosen` (the
//! command line, the initramfs, a random seed).
//!
//! Plain data in, bytes out: nothing here touches a hypervisor, so the
//! unit tests run (and parse the tree back) on any host.

use vm_fdt::FdtWriter;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the device tree: {0}")]
    Build(#[from] vm_fdt::Error),
    #[error("the device tree is {size} bytes; the most is {max}: fewer devices or a shorter \"cmdline\"")]
    TooBig { size: usize, max: usize },
}

/// The GIC's phandle, which every interrupt names as its parent.
const GIC_PHANDLE: u32 = 1;

/// Interrupt specifier cells (`#interrupt-cells` = 3): kind, number, flags.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// Edge rising: an irqfd is a pulse, not a level a device holds.
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;

/// The arch timer's private interrupts (secure and non-secure physical,
/// virtual, hypervisor), as Linux and QEMU's `virt` number them.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC's own maintenance interrupt.
const GIC_MAINTENANCE_PPI: u32 = 9;

/// The 16550's input clock: the standard 1.8432 MHz.
const UART_CLOCK_HZ: u32 = 1_843_200;

/// A device at an MMIO address with one shared interrupt (SPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub spi: u32,
}

/// Everything the tree describes.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    /// RAM: guest address and size.
    pub memory: (u64, u64),
    /// Each vCPU's MPIDR_EL1, in vCPU order.
    pub mpidrs: &'a [u64],
    /// The GICv3: the distributor's and the redistributors' (address, size).
    pub gic_distributor: (u64, u64),
    pub gic_redistributors: (u64, u64),
    pub uart: MmioDevice,
    pub virtio: &'a [MmioDevice],
    pub cmdline: &'a str,
    /// The initramfs: guest address and size.
    pub initrd: Option<(u64, u64)>,
    /// Credited to the guest's random generator at boot (`rng-seed`).
    pub rng_seed: &'a [u8],
}

/// The affinity fields of an MPIDR_EL1 (Aff3, Aff2, Aff1, Aff0): a cpu
/// node's `reg`.
pub fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

/// Builds the tree; it must fit in `max` bytes.
pub fn build(m: &Machine, max: usize) -> Result<Vec<u8>, Error> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", m.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{:x}", m.uart.base))?;
    if let Some((start, size)) = m.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.property("rng-seed", m.rng_seed)?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&format!("memory@{:x}", m.memory.0))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[m.memory.0, m.memory.1])?;
    fdt.end_node(memory)?;

    cpus(&mut fdt, m.mpidrs)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-0.2".into(), "arm,psci".into()])?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let (dist, redist) = (m.gic_distributor, m.gic_redistributors);
    let gic = fdt.begin_node(&format!("intc@{:x}", dist.0))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_array_u64("reg", &[dist.0, dist.1, redist.0, redist.1])?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_LEVEL_HIGH],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.property_null("always-on")?;
    fdt.end_node(timer)?;

    let uart = fdt.begin_node(&format!("uart@{:x}", m.uart.base))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[m.uart.base, m.uart.len])?;
    fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, m.uart.spi, IRQ_EDGE_RISING])?;
    fdt.end_node(uart)?;

    for dev in m.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.base, dev.len])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, dev.spi, IRQ_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    fdt.end_node(root)?;
    let bytes = fdt.finish()?;
    if bytes.len() > max {
        return Err(Error::TooBig {
            size: bytes.len(),
            max,
        });
    }
    Ok(bytes)
}

fn cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), Error> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        let affinity = mpidr_affinity(mpidr);
        let cpu = fdt.begin_node(&format!("cpu@{affinity:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", affinity)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Every node's path with its properties' raw values.
    fn parse(bytes: &[u8]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        let tree = fdt::Fdt::new(bytes).expect("a valid device tree");
        let mut out = BTreeMap::new();
        fn walk(
            node: fdt::node::FdtNode,
            path: String,
            out: &mut BTreeMap<String, BTreeMap<String, Vec<u8>>>,
        ) {
            let props = node
                .properties()
                .map(|p| (p.name.to_string(), p.value.to_vec()))
                .collect();
            out.insert(path.clone(), props);
            for child in node.children() {
                let child_path = format!("{}/{}", path.trim_end_matches('/'), child.name);
                walk(child, child_path, out);
            }
        }
        walk(tree.find_node("/").unwrap(), "/".into(), &mut out);
        out
    }

    fn u32s(cells: &[u32]) -> Vec<u8> {
        cells.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    fn u64s(cells: &[u64]) -> Vec<u8> {
        cells.iter().flat_map(|c| c.to_be_bytes()).collect()
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    const SEED: [u8; 32] = [7; 32];

    fn machine<'a>(mpidrs: &'a [u64], virtio: &'a [MmioDevice]) -> Machine<'a> {
        Machine {
            memory: (0x8000_0000, 256 << 20),
            mpidrs,
            gic_distributor: (0x0800_0000, 0x1_0000),
            gic_redistributors: (0x080a_0000, 0x4_0000),
            uart: MmioDevice {
                base: 0x0100_0000,
                len: 0x1000,
                spi: 1,
            },
            virtio,
            cmdline: "console=ttyS0 quiet",
            initrd: Some((0x8f00_0000, 0x12345)),
            rng_seed: &SEED,
        }
    }

    #[test]
    fn every_node_and_property_is_what_the_kernel_reads() {
        // MPIDRs as KVM reports them: bit 31 (RES1) set, which a cpu's
        // `reg` leaves out.
        let mpidrs = [0x8000_0000, 0x8000_0001];
        let virtio = [
            MmioDevice {
                base: 0x0a00_0000,
                len: 0x1000,
                spi: 16,
            },
            MmioDevice {
                base: 0x0a00_1000,
                len: 0x1000,
                spi: 17,
            },
        ];
        let tree = parse(&build(&machine(&mpidrs, &virtio), 1 << 20).unwrap());

        let mut want: BTreeMap<String, Vec<(&str, Vec<u8>)>> = BTreeMap::new();
        want.insert(
            "/".into(),
            vec![
                ("compatible", string("linux,dummy-virt")),
                ("#address-cells", u32s(&[2])),
                ("#size-cells", u32s(&[2])),
                ("interrupt-parent", u32s(&[1])),
            ],
        );
        want.insert(
            "/chosen".into(),
            vec![
                ("bootargs", string("console=ttyS0 quiet")),
                ("stdout-path", string("/uart@1000000")),
                ("linux,initrd-start", u64s(&[0x8f00_0000])),
                ("linux,initrd-end", u64s(&[0x8f01_2345])),
                ("rng-seed", SEED.to_vec()),
            ],
        );
        want.insert(
            "/memory@80000000".into(),
            vec![
                ("device_type", string("memory")),
                ("reg", u64s(&[0x8000_0000, 256 << 20])),
            ],
        );
        want.insert(
            "/cpus".into(),
            vec![("#address-cells", u32s(&[2])), ("#size-cells", u32s(&[0]))],
        );
        for n in 0..2u64 {
            want.insert(
                format!("/cpus/cpu@{n:x}"),
                vec![
                    ("device_type", string("cpu")),
                    ("compatible", string("arm,arm-v8")),
                    ("enable-method", string("psci")),
                    ("reg", u64s(&[n])),
                ],
            );
        }
        want.insert(
            "/psci".into(),
            vec![
                ("compatible", b"arm,psci-0.2\0arm,psci\0".to_vec()),
                ("method", string("hvc")),
            ],
        );
        want.insert(
            "/intc@8000000".into(),
            vec![
                ("compatible", string("arm,gic-v3")),
                ("#interrupt-cells", u32s(&[3])),
                ("interrupt-controller", vec![]),
                ("reg", u64s(&[0x0800_0000, 0x1_0000, 0x080a_0000, 0x4_0000])),
                ("interrupts", u32s(&[1, 9, 4])),
                ("phandle", u32s(&[1])),
            ],
        );
        want.insert(
            "/timer".into(),
            vec![
                ("compatible", string("arm,armv8-timer")),
                (
                    "interrupts",
                    u32s(&[1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]),
                ),
                ("always-on", vec![]),
            ],
        );
        want.insert(
            "/uart@1000000".into(),
            vec![
                ("compatible", string("ns16550a")),
                ("reg", u64s(&[0x0100_0000, 0x1000])),
                ("clock-frequency", u32s(&[1_843_200])),
                ("interrupts", u32s(&[0, 1, 1])),
            ],
        );
        for (path, spi) in [("/virtio_mmio@a000000", 16), ("/virtio_mmio@a001000", 17)] {
            let base = if spi == 16 { 0x0a00_0000 } else { 0x0a00_1000 };
            want.insert(
                path.into(),
                vec![
                    ("compatible", string("virtio,mmio")),
                    ("reg", u64s(&[base, 0x1000])),
                    ("interrupts", u32s(&[0, spi, 1])),
                    ("dma-coherent", vec![]),
                ],
            );
        }

        let got_paths: Vec<&str> = tree.keys().map(String::as_str).collect();
        let want_paths: Vec<&str> = want.keys().map(String::as_str).collect();
        assert_eq!(got_paths, want_paths, "the tree's nodes");
        for (path, props) in want {
            let got = &tree[&path];
            let want: BTreeMap<String, Vec<u8>> =
                props.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(got, &want, "the properties of {path}");
        }
    }

    #[test]
    fn no_initramfs_means_no_initrd_properties() {
        let mut m = machine(&[0x8000_0000], &[]);
        m.initrd = None;
        let tree = parse(&build(&m, 1 << 20).unwrap());
        assert!(!tree["/chosen"].contains_key("linux,initrd-start"));
        assert!(!tree["/chosen"].contains_key("linux,initrd-end"));
        assert!(!tree.keys().any(|p| p.starts_with("/virtio_mmio")));
    }

    #[test]
    fn a_tree_over_the_limit_is_an_error_that_says_so() {
        let long = "x".repeat(4096);
        let mut m = machine(&[0x8000_0000], &[]);
        m.cmdline = &long;
        let err = build(&m, 2048).unwrap_err();
        assert!(matches!(err, Error::TooBig { max: 2048, .. }), "{err}");
    }

    #[test]
    fn a_cpu_reg_is_the_mpidr_affinity() {
        assert_eq!(mpidr_affinity(0x8000_0000), 0);
        assert_eq!(mpidr_affinity(0x81_8003_0201), 0x81_0003_0201);
    }
}
