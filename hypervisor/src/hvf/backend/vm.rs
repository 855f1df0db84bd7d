//! The VM: guest memory, the platform GIC, interrupt lines and ioevents,
//! and what its vCPUs share.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use applevisor_sys as hv;
use vmm_os::EventFd;

use super::{check, host_ticks, HvfVcpu, Timebase};
use crate::aarch64::GicLayout;
use crate::hvf::gate::StartGate;
use crate::hvf::ioevent::IoEvents;
use crate::hvf::irq_lines::IrqLines;
use crate::hvf::psci::PowerTable;
use crate::hvf::state::{offset_for, virtual_count, HvfVmState};
use crate::hvf::wake::Doorbells;
use crate::hvf::SPI_BASE;
use crate::{Error, IoEventAddress, MemorySlot, Result, VmState};

/// Each redistributor's size, which the device tree's layout assumes.
const REDISTRIBUTOR_SIZE: usize = 0x2_0000;

/// What a VM's vCPUs share.
pub struct Shared {
    pub power: PowerTable,
    /// Opened once every vCPU exists, by the last to arrive; made by
    /// `create_gic`, which knows how many there are.
    pub gate: OnceLock<Arc<StartGate>>,
    pub doorbells: Arc<Doorbells>,
    pub ioevents: RwLock<IoEvents<EventFd>>,
    /// A restored GIC state, applied when the gate opens.
    pub gic_state: Mutex<Option<Vec<u8>>>,
    /// The vCPUs' common virtual timer offset.
    pub vtimer_offset: AtomicU64,
    pub vcpus: AtomicU32,
    pub timebase: Timebase,
}

impl Shared {
    /// Applies a restored GIC state (Apple: once every vCPU exists,
    /// before any runs).
    pub fn apply_gic_state(&self) -> std::result::Result<(), String> {
        let Some(blob) = self
            .gic_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        // SAFETY: `blob` is live for the call and `blob.len()` long.
        check("hv_gic_set_state", unsafe {
            hv::hv_gic_set_state(blob.as_ptr().cast(), blob.len())
        })
        .map_err(|e| e.to_string())
    }
}

/// A Hypervisor.framework VM (one per process).
pub struct HvfVm {
    shared: Arc<Shared>,
    irq_lines: IrqLines,
    /// slot -> (guest address, size) of mapped memory.
    slots: Mutex<HashMap<u32, (u64, u64)>>,
    max_vcpus: u32,
}

impl HvfVm {
    pub(super) fn new(timebase: Timebase, max_vcpus: u32) -> Result<HvfVm> {
        // SAFETY: a null config asks for the defaults (a 36-bit IPA
        // space, 64 GiB, which the memory layout stays under).
        check("hv_vm_create", unsafe {
            hv::hv_vm_create(std::ptr::null_mut())
        })?;
        let doorbells = Arc::new(Doorbells::default());
        let irq_lines = match IrqLines::start(doorbells.clone(), pulse) {
            Ok(i) => i,
            Err(e) => {
                // SAFETY: the VM just created has nothing in it.
                unsafe { hv::hv_vm_destroy() };
                return Err(e);
            }
        };
        Ok(HvfVm {
            shared: Arc::new(Shared {
                power: PowerTable::default(),
                gate: OnceLock::new(),
                doorbells,
                ioevents: RwLock::new(IoEvents::default()),
                gic_state: Mutex::new(None),
                vtimer_offset: AtomicU64::new(host_ticks()),
                vcpus: AtomicU32::new(0),
                timebase,
            }),
            irq_lines,
            slots: Mutex::new(HashMap::new()),
            max_vcpus,
        })
    }
}

/// Raises and lowers an edge-triggered SPI.
fn pulse(intid: u32) {
    // SAFETY: the GIC exists before a device signals its line (the VMM
    // creates it before the vCPUs run); the framework checks `intid`.
    let rc = unsafe {
        let up = hv::hv_gic_set_spi(intid, true);
        hv::hv_gic_set_spi(intid, false);
        up
    };
    if rc != 0 {
        tracing::warn!(
            "cannot raise interrupt {intid}: {:#x}: {}",
            rc as u32,
            super::super::describe(rc)
        );
    }
}

impl Drop for HvfVm {
    fn drop(&mut self) {
        // No interrupt after the VM is gone.
        self.irq_lines.stop();
        // SAFETY: this process's VM; its vCPUs were destroyed with their
        // threads. A failure (a vCPU still alive) leaves the VM to the
        // process's end.
        let rc = unsafe { hv::hv_vm_destroy() };
        if rc != 0 {
            tracing::warn!("hv_vm_destroy: {}", super::super::describe(rc));
        }
    }
}

fn misaligned(what: &str, value: u64) -> Error {
    Error::call(
        "hv_vm_map",
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {value:#x} is not a multiple of Apple silicon's 16 KiB page; \
                 guest memory sizes and addresses must be multiples of 16 KiB on macOS"
            ),
        ),
    )
}

impl crate::Vm for HvfVm {
    unsafe fn set_memory_slot(&self, slot: MemorySlot) -> Result<()> {
        let page = hv::PAGE_SIZE as u64;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((gpa, size)) = slots.remove(&slot.slot) {
            // SAFETY: unmaps a range this VM mapped.
            check("hv_vm_unmap", unsafe {
                hv::hv_vm_unmap(gpa, size as usize)
            })?;
        }
        if slot.size == 0 {
            return Ok(());
        }
        for (what, value) in [
            ("the guest address", slot.guest_phys_addr),
            ("the size", slot.size),
            ("the host address", slot.host_addr),
        ] {
            if value % page != 0 {
                return Err(misaligned(what, value));
            }
        }
        // SAFETY: the caller keeps the host range mapped while the VM
        // may use it (this function's contract).
        check("hv_vm_map", unsafe {
            hv::hv_vm_map(
                slot.host_addr as *mut std::ffi::c_void,
                slot.guest_phys_addr,
                slot.size as usize,
                hv::HV_MEMORY_READ | hv::HV_MEMORY_WRITE | hv::HV_MEMORY_EXEC,
            )
        })?;
        slots.insert(slot.slot, (slot.guest_phys_addr, slot.size));
        Ok(())
    }

    fn create_platform_devices(&self) -> Result<()> {
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn crate::Vcpu>> {
        if id >= self.max_vcpus {
            return Err(Error::VcpuId {
                id,
                max: self.max_vcpus,
            });
        }
        if self.shared.gate.get().is_some() {
            return Err(Error::call(
                "hv_vcpu_create",
                io::Error::other("vCPUs must all be created before the GIC"),
            ));
        }
        self.shared.vcpus.fetch_add(1, Ordering::SeqCst);
        let doorbell = self.shared.doorbells.get(id)?;
        Ok(Box::new(HvfVcpu::new(id, self.shared.clone(), doorbell)))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.irq_lines.add(fd, SPI_BASE + gsi)
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let IoEventAddress::Mmio(addr) = addr else {
            return Err(Error::Unsupported("port I/O (arm64 has none)"));
        };
        let fd = fd
            .try_clone()
            .map_err(|e| Error::call("clone an ioevent", e))?;
        self.shared
            .ioevents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .add(addr, datamatch, fd);
        Ok(())
    }

    fn save_state(&self) -> Result<VmState> {
        // SAFETY: the GIC exists; the object is released below.
        let state = unsafe { hv::hv_gic_state_create() };
        if state.is_null() {
            return Err(Error::call(
                "hv_gic_state_create",
                io::Error::other("the framework returned no state (is the GIC created?)"),
            ));
        }
        let mut size = 0usize;
        // SAFETY: `state` is live; `size` a live usize.
        let blob = check("hv_gic_state_get_size", unsafe {
            hv::hv_gic_state_get_size(state, &mut size)
        })
        .and_then(|()| {
            let mut blob = vec![0u8; size];
            // SAFETY: `blob` has the `size` bytes the framework asked for.
            check("hv_gic_state_get_data", unsafe {
                hv::hv_gic_state_get_data(state, blob.as_mut_ptr().cast())
            })
            .map(|()| blob)
        });
        // SAFETY: releases the object created above, once.
        unsafe { hv::os_release(state) };
        let offset = self.shared.vtimer_offset.load(Ordering::SeqCst);
        Ok(VmState::HvfAarch64(Box::new(HvfVmState {
            gic: blob?,
            virtual_count: virtual_count(host_ticks(), offset),
        })))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        let VmState::HvfAarch64(state) = state;
        *self
            .shared
            .gic_state
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(state.gic.clone());
        self.shared.vtimer_offset.store(
            offset_for(host_ticks(), state.virtual_count),
            Ordering::SeqCst,
        );
        Ok(())
    }
}

impl crate::VmArch for HvfVm {
    fn create_gic(&self, layout: &GicLayout) -> Result<()> {
        // SAFETY: creates a config object, released below.
        let config = unsafe { hv::hv_gic_config_create() };
        if config.is_null() {
            return Err(Error::call(
                "hv_gic_config_create",
                io::Error::other("the platform GIC needs macOS 15 or later"),
            ));
        }
        // SAFETY: `config` is live until released at the end.
        let created = unsafe {
            check(
                "hv_gic_config_set_distributor_base",
                hv::hv_gic_config_set_distributor_base(config, layout.distributor),
            )
            .and_then(|()| {
                check(
                    "hv_gic_config_set_redistributor_base",
                    hv::hv_gic_config_set_redistributor_base(config, layout.redistributors),
                )
            })
            .and_then(|()| check("hv_gic_create", hv::hv_gic_create(config)))
        };
        // SAFETY: releases the config created above, once.
        unsafe { hv::os_release(config) };
        created?;
        check_layout(layout)?;
        let vcpus = self.shared.vcpus.load(Ordering::SeqCst);
        self.shared
            .gate
            .set(Arc::new(StartGate::new(vcpus)))
            .map_err(|_| Error::call("hv_gic_create", io::Error::other("the GIC exists")))
    }
}

/// Checks the platform GIC against the layout the device tree describes.
fn check_layout(layout: &GicLayout) -> Result<()> {
    let (mut base, mut count, mut redistributor) = (0u32, 0u32, 0usize);
    // SAFETY: each call writes one live integer.
    unsafe {
        check(
            "hv_gic_get_spi_interrupt_range",
            hv::hv_gic_get_spi_interrupt_range(&mut base, &mut count),
        )?;
        check(
            "hv_gic_get_redistributor_size",
            hv::hv_gic_get_redistributor_size(&mut redistributor),
        )?;
    }
    if base > SPI_BASE || base + count < layout.lines {
        return Err(Error::call(
            "hv_gic_create",
            io::Error::other(format!(
                "the platform GIC's shared interrupts are INTIDs {base}..{}, the machine uses \
                 {SPI_BASE}..{}",
                base + count,
                layout.lines
            )),
        ));
    }
    if redistributor != REDISTRIBUTOR_SIZE {
        return Err(Error::call(
            "hv_gic_create",
            io::Error::other(format!(
                "the platform GIC's redistributors are {redistributor:#x} bytes each, the \
                 device tree says {REDISTRIBUTOR_SIZE:#x}"
            )),
        ));
    }
    Ok(())
}
