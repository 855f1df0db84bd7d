//! A vCPU. Hypervisor.framework binds a vCPU to the thread that creates
//! it, while the VMM creates its vCPUs on one thread and then gives each
//! to its own. So `HvfVcpu` records what the VMM sets before the vCPU
//! runs (power state, boot registers, a restored state) and creates the
//! framework's vCPU on its thread's first `enable_kick_signal` or `run`;
//! all vCPUs then meet at the start gate, whose last arrival applies a
//! restored GIC state (Apple: after every vCPU exists, before any runs).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use applevisor_sys as hv;
use hv::hv_exit_reason_t as Reason;
use hv::hv_reg_t as R;
use hv::hv_sys_reg_t as S;
use vmm_os::EventFd;

use super::regs::{icc_code, sys_code, Regs, GENERAL, ICC, SIMD, SYSTEM};
use super::vm::Shared;
use super::{check, host_ticks, install_kick_handler, set_kick_target, take_kick};
use crate::hvf::esr::{self, class, MmioAccess};
use crate::hvf::mpidr;
use crate::hvf::psci::{code, Action, Power};
use crate::hvf::state::{self, virtual_count, HvfVcpuState};
use crate::hvf::sysreg::Emulated;
use crate::hvf::timer::{self, TimerAction, VtimerLine};
use crate::hvf::wake::wait_readable;
use crate::{Error, Result, SystemEventKind, VcpuExit, VcpuState};

/// PSTATE at entry: EL1h with D, A, I and F masked.
const BOOT_CPSR: u64 = 0x3c5;
/// The virtual timer's private interrupt.
const VTIMER_INTID: u32 = 27;

/// What the VMM set before the vCPU existed.
#[derive(Default)]
struct Setup {
    boot: Option<(u64, u64)>,
    restore: Option<HvfVcpuState>,
}

/// The framework's vCPU, on its thread.
struct Live {
    regs: Regs,
    exit: *const hv::hv_vcpu_exit_t,
    thread: ThreadId,
}

/// What a guest exit asks of `run`'s caller.
enum Step {
    Again,
    Interrupted,
    MmioRead { addr: u64, size: usize },
    MmioWrite { addr: u64, size: usize },
    System(SystemEventKind),
    Other(String),
}

/// A Hypervisor.framework vCPU.
pub struct HvfVcpu {
    id: u32,
    shared: Arc<Shared>,
    doorbell: Arc<EventFd>,
    setup: Mutex<Setup>,
    live: Option<Live>,
    /// A load from MMIO the VMM is answering in `data`: the next `run`
    /// or `complete_pending_io` writes it to the register and moves on.
    pending_read: Option<MmioAccess>,
    data: [u8; 8],
    timer: VtimerLine,
    emulated: Emulated,
}

// SAFETY: the framework's handle and exit pointer (`live`) are used only
// on the thread that created them: every use goes through `live()`,
// which checks the thread. Before creation the struct holds plain data.
unsafe impl Send for HvfVcpu {}

fn wrong_thread() -> Error {
    Error::call(
        "hv_vcpu",
        io::Error::other("a vCPU may only be used on the thread that runs it"),
    )
}

impl HvfVcpu {
    pub(super) fn new(id: u32, shared: Arc<Shared>, doorbell: Arc<EventFd>) -> HvfVcpu {
        HvfVcpu {
            id,
            shared,
            doorbell,
            setup: Mutex::new(Setup::default()),
            live: None,
            pending_read: None,
            data: [0; 8],
            timer: VtimerLine::default(),
            emulated: Emulated::default(),
        }
    }

    fn setup(&self) -> std::sync::MutexGuard<'_, Setup> {
        self.setup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registers of the framework's vCPU, if it exists and this is
    /// its thread.
    fn live(&self) -> Result<Regs> {
        match &self.live {
            Some(live) if live.thread == std::thread::current().id() => Ok(live.regs),
            Some(_) => Err(wrong_thread()),
            None => Err(Error::call(
                "hv_vcpu",
                io::Error::other("the vCPU has not started on its thread yet"),
            )),
        }
    }

    /// Creates the framework's vCPU on this thread (once) and waits at
    /// the start gate for the others.
    fn ensure_live(&mut self) -> Result<Regs> {
        if self.live.is_some() {
            return self.live();
        }
        let gate = self.shared.gate.get().cloned().ok_or_else(|| {
            Error::call(
                "hv_vcpu_create",
                io::Error::other("create the GIC before running a vCPU"),
            )
        })?;
        let icc = match self.create() {
            Ok(icc) => icc,
            Err(e) => {
                gate.fail(format!("vCPU {} could not start: {e}", self.id));
                return Err(e);
            }
        };
        let shared = self.shared.clone();
        gate.arrive(|| shared.apply_gic_state())
            .map_err(|why| Error::call("start the vCPUs", io::Error::other(why)))?;
        let regs = self.live()?;
        // The CPU interface after the GIC's own state.
        for (code, value) in icc {
            let reg = ICC
                .iter()
                .find(|&&r| icc_code(r) == code)
                .ok_or(state::Error::UnknownRegister(code))
                .map_err(|e| Error::call("restore the vCPU state", io::Error::other(e)))?;
            regs.set_icc(*reg, value)?;
        }
        Ok(regs)
    }

    /// Creates the vCPU and applies what was set before; returns the GIC
    /// CPU interface registers to restore once the GIC state is in.
    fn create(&mut self) -> Result<Vec<(u16, u64)>> {
        let mut handle: hv::hv_vcpu_t = 0;
        let mut exit: *const hv::hv_vcpu_exit_t = std::ptr::null();
        // SAFETY: creates this thread's vCPU with the default config; the
        // framework fills both outputs.
        check("hv_vcpu_create", unsafe {
            hv::hv_vcpu_create(&mut handle, &mut exit, std::ptr::null_mut())
        })?;
        let regs = Regs(handle);
        self.live = Some(Live {
            regs,
            exit,
            thread: std::thread::current().id(),
        });
        regs.set_sys(S::MPIDR_EL1, mpidr(self.id))?;
        regs.set_vtimer_offset(self.shared.vtimer_offset.load(Ordering::SeqCst))?;
        let setup = std::mem::take(&mut *self.setup());
        if let Some(state) = setup.restore {
            self.apply(regs, &state)?;
            return Ok(state.icc);
        }
        regs.set(R::CPSR, BOOT_CPSR)?;
        if let Some((entry, fdt)) = setup.boot {
            regs.set(R::PC, entry)?;
            regs.set(R::X0, fdt)?;
        }
        Ok(Vec::new())
    }

    /// Writes a saved state (all but the GIC CPU interface).
    fn apply(&mut self, regs: Regs, state: &HvfVcpuState) -> Result<()> {
        for (reg, &value) in GENERAL.iter().zip(&state.x) {
            regs.set(*reg, value)?;
        }
        regs.set(R::PC, state.pc)?;
        regs.set(R::CPSR, state.cpsr)?;
        regs.set(R::FPCR, state.fpcr)?;
        regs.set(R::FPSR, state.fpsr)?;
        for (n, reg) in SIMD.iter().enumerate() {
            regs.set_simd(*reg, state.q_value(n))?;
        }
        for &(code, value) in &state.sys_regs {
            let reg = SYSTEM
                .iter()
                .find(|&&r| sys_code(r) == code)
                .ok_or(state::Error::UnknownRegister(code))
                .map_err(|e| Error::call("restore the vCPU state", io::Error::other(e)))?;
            regs.set_sys(*reg, value)?;
        }
        regs.set_vtimer_masked(state.vtimer_masked)?;
        if state.vtimer_masked {
            self.timer.activated();
        }
        self.shared.power.set(self.id, state.power);
        self.emulated = state.emulated;
        Ok(())
    }

    /// Finishes an MMIO load the VMM has answered.
    fn finish_read(&mut self, regs: Regs) -> Result<()> {
        if let Some(access) = self.pending_read.take() {
            regs.set_x(access.register, access.loaded_value(&self.data))?;
            regs.skip_instruction()?;
        }
        Ok(())
    }

    /// Waits while the vCPU is powered off; starts it when the guest's
    /// PSCI CPU_ON has turned it on. `false`: a kick came first.
    fn wait_power_on(&mut self, regs: Regs) -> Result<bool> {
        loop {
            match self.shared.power.get(self.id) {
                Some(Power::Off) => {}
                Some(Power::OnPending { .. }) => {
                    if let Some((entry, context)) = self.shared.power.take_start(self.id) {
                        regs.set(R::PC, entry)?;
                        regs.set(R::X0, context)?;
                        regs.set(R::CPSR, BOOT_CPSR)?;
                    }
                    return Ok(true);
                }
                Some(Power::On) | None => return Ok(true),
            }
            if take_kick() {
                return Ok(false);
            }
            if wait_readable(self.doorbell.as_raw_fd(), None)? {
                let _ = self.doorbell.read();
            }
        }
    }

    /// A WFI: sleeps until the virtual timer is due, an interrupt may be
    /// pending (the doorbell, or a private interrupt another vCPU sent)
    /// or a kick.
    fn sleep(&self, regs: Regs) -> Result<()> {
        let timebase = self.shared.timebase;
        let vcpus = self.shared.vcpus.load(Ordering::SeqCst);
        let offset = self.shared.vtimer_offset.load(Ordering::SeqCst);
        loop {
            let ctl = regs.sys(S::CNTV_CTL_EL0)?;
            let cval = regs.sys(S::CNTV_CVAL_EL0)?;
            let now = virtual_count(host_ticks(), offset);
            let wait = timer::wfi_wait(ctl, cval, now, timebase.numer, timebase.denom);
            let slice = timer::sleep_slice(wait, vcpus);
            if slice == Some(Duration::ZERO) {
                return Ok(());
            }
            if wait_readable(self.doorbell.as_raw_fd(), slice)? {
                let _ = self.doorbell.read();
                return Ok(());
            }
            let pending = regs.redistributor(hv::hv_gic_redistributor_reg_t::ISPENDR0)?;
            let enabled = regs.redistributor(hv::hv_gic_redistributor_reg_t::ISENABLER0)?;
            if timer::private_pending(pending, enabled) {
                return Ok(());
            }
        }
    }

    /// Handles an exception exit.
    fn exception(&mut self, regs: Regs, syndrome: u64, address: u64) -> Result<Step> {
        match esr::exception_class(syndrome) {
            class::DATA_ABORT_LOWER => {
                let access = esr::decode_data_abort(syndrome)
                    .map_err(|e| Error::call("decode an MMIO access", io::Error::other(e)))?;
                if !access.write {
                    self.pending_read = Some(access);
                    self.data = [0; 8];
                    return Ok(Step::MmioRead {
                        addr: address,
                        size: access.size,
                    });
                }
                self.data = access.stored_bytes(regs.x(access.register)?);
                regs.skip_instruction()?;
                let events = self
                    .shared
                    .ioevents
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(event) = events.find(address, &self.data[..access.size]) {
                    event
                        .write(1)
                        .map_err(|e| Error::call("signal an ioevent", e))?;
                    return Ok(Step::Again);
                }
                Ok(Step::MmioWrite {
                    addr: address,
                    size: access.size,
                })
            }
            // The HVC's return address is already the next instruction.
            class::HVC64 => self.psci(regs),
            class::SMC64 => {
                regs.set(R::X0, code::NOT_SUPPORTED as u64)?;
                regs.skip_instruction()?;
                Ok(Step::Again)
            }
            class::SYS64 => {
                let access = esr::decode_sys_reg(syndrome)
                    .map_err(|e| Error::call("decode a system register", io::Error::other(e)))?;
                let written = if access.read {
                    0
                } else {
                    regs.x(access.register)?
                };
                let (value, kind) = self.emulated.access(&access, written);
                if let Some(value) = value {
                    regs.set_x(access.register, value)?;
                }
                tracing::trace!("vCPU {}: {} ({kind:?}) emulated", self.id, access.reg);
                regs.skip_instruction()?;
                Ok(Step::Again)
            }
            class::WFX => {
                regs.skip_instruction()?;
                if esr::is_wfi(syndrome) {
                    self.sleep(regs)?;
                }
                Ok(Step::Again)
            }
            other => Ok(Step::Other(format!(
                "exception class {other:#x} (syndrome {syndrome:#x}, address {address:#x}) at PC \
                 {:#x}",
                regs.get(R::PC)?
            ))),
        }
    }

    /// Answers a PSCI call.
    fn psci(&mut self, regs: Regs) -> Result<Step> {
        let args = [regs.x(0)?, regs.x(1)?, regs.x(2)?, regs.x(3)?];
        match self.shared.power.handle(self.id, args) {
            Action::Return(value) => regs.set(R::X0, value)?,
            Action::Started { id } => {
                regs.set(R::X0, code::SUCCESS as u64)?;
                self.shared.doorbells.ring(id);
            }
            Action::PowerOff => {}
            Action::SystemOff => return Ok(Step::System(SystemEventKind::Shutdown)),
            Action::SystemReset => return Ok(Step::System(SystemEventKind::Reset)),
        }
        Ok(Step::Again)
    }

    /// The timer's injection, when the framework reports it firing.
    fn timer_action(&mut self, regs: Regs, action: TimerAction) -> Result<()> {
        match action {
            TimerAction::Nothing => Ok(()),
            // SAFETY: sets this thread's vCPU's PPI pending in the GIC.
            TimerAction::Inject => check("hv_gic_set_redistributor_reg", unsafe {
                hv::hv_gic_set_redistributor_reg(
                    regs.0,
                    hv::hv_gic_redistributor_reg_t::ISPENDR0,
                    1 << VTIMER_INTID,
                )
            }),
            TimerAction::Unmask => regs.set_vtimer_masked(false),
        }
    }

    /// Runs the guest until an exit the VMM must see.
    fn step(&mut self, regs: Regs) -> Result<Step> {
        if take_kick() || !self.wait_power_on(regs)? {
            return Ok(Step::Interrupted);
        }
        // SAFETY: runs this thread's vCPU.
        check("hv_vcpu_run", unsafe { hv::hv_vcpu_run(regs.0) })?;
        let exit = match &self.live {
            // SAFETY: the framework's exit record for this vCPU, valid
            // while it exists, filled by the run that just returned.
            Some(live) => unsafe { *live.exit },
            None => return Err(wrong_thread()),
        };
        if self.timer.waiting() {
            let action = self.timer.after_exit(regs.sys(S::CNTV_CTL_EL0)?);
            self.timer_action(regs, action)?;
        }
        match exit.reason {
            Reason::CANCELED => Ok(if take_kick() {
                Step::Interrupted
            } else {
                Step::Again
            }),
            Reason::VTIMER_ACTIVATED => {
                let action = self.timer.activated();
                self.timer_action(regs, action)?;
                Ok(Step::Again)
            }
            Reason::EXCEPTION => self.exception(
                regs,
                exit.exception.syndrome,
                exit.exception.physical_address,
            ),
            Reason::UNKNOWN => Ok(Step::Other("an unknown exit".into())),
        }
    }
}

impl Drop for HvfVcpu {
    fn drop(&mut self) {
        if let Ok(regs) = self.live() {
            set_kick_target(None);
            // SAFETY: this thread's vCPU, destroyed once.
            unsafe { hv::hv_vcpu_destroy(regs.0) };
        }
    }
}

impl crate::Vcpu for HvfVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let regs = self.ensure_live()?;
        self.finish_read(regs)?;
        let step = loop {
            match self.step(regs)? {
                Step::Again => continue,
                step => break step,
            }
        };
        Ok(match step {
            Step::Again | Step::Interrupted => VcpuExit::Interrupted,
            Step::MmioRead { addr, size } => VcpuExit::MmioRead {
                addr,
                data: &mut self.data[..size],
            },
            Step::MmioWrite { addr, size } => VcpuExit::MmioWrite {
                addr,
                data: &self.data[..size],
            },
            Step::System(kind) => VcpuExit::SystemEvent { kind },
            Step::Other(what) => VcpuExit::Other(what),
        })
    }

    fn enable_kick_signal(&mut self, signal: i32) -> Result<()> {
        install_kick_handler(signal)?;
        let regs = self.ensure_live()?;
        set_kick_target(Some((regs.0, self.doorbell.write_fd())));
        Ok(())
    }

    fn complete_pending_io(&mut self) -> Result<()> {
        match self.pending_read {
            Some(_) => {
                let regs = self.live()?;
                self.finish_read(regs)
            }
            None => Ok(()),
        }
    }

    fn save_state(&self) -> Result<VcpuState> {
        let regs = self.live()?;
        let state = HvfVcpuState {
            x: GENERAL
                .iter()
                .map(|&r| regs.get(r))
                .collect::<Result<_>>()?,
            pc: regs.get(R::PC)?,
            cpsr: regs.get(R::CPSR)?,
            fpcr: regs.get(R::FPCR)?,
            fpsr: regs.get(R::FPSR)?,
            q: SIMD
                .iter()
                .map(|&r| regs.simd(r).map(HvfVcpuState::q_halves))
                .collect::<Result<_>>()?,
            sys_regs: SYSTEM
                .iter()
                .map(|&r| Ok((sys_code(r), regs.sys(r)?)))
                .collect::<Result<_>>()?,
            icc: ICC
                .iter()
                .map(|&r| Ok((icc_code(r), regs.icc(r)?)))
                .collect::<Result<_>>()?,
            vtimer_masked: regs.vtimer_masked()?,
            power: self.shared.power.get(self.id).unwrap_or(Power::On),
            emulated: self.emulated,
        };
        Ok(VcpuState::HvfAarch64(Box::new(state)))
    }

    fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let VcpuState::HvfAarch64(state) = state;
        state
            .validate()
            .map_err(|e| Error::call("restore the vCPU state", io::Error::other(e)))?;
        if self.live.is_some() {
            return Err(Error::call(
                "restore the vCPU state",
                io::Error::other("restore into a fresh vCPU, before it runs"),
            ));
        }
        self.setup().restore = Some((**state).clone());
        Ok(())
    }
}

impl crate::VcpuArch for HvfVcpu {
    fn init(&self, powered_off: bool) -> Result<()> {
        let power = if powered_off { Power::Off } else { Power::On };
        self.shared.power.add(self.id, mpidr(self.id), power);
        Ok(())
    }

    fn set_boot_regs(&self, entry: u64, fdt: u64) -> Result<()> {
        if self.live.is_some() {
            let regs = self.live()?;
            regs.set(R::PC, entry)?;
            regs.set(R::X0, fdt)?;
            return regs.set(R::CPSR, BOOT_CPSR);
        }
        self.setup().boot = Some((entry, fdt));
        Ok(())
    }

    fn mpidr(&self) -> Result<u64> {
        Ok(mpidr(self.id))
    }

    fn program_counter(&self) -> Result<u64> {
        if self.live.is_some() {
            return self.live()?.get(R::PC);
        }
        let setup = self.setup();
        setup
            .restore
            .as_ref()
            .map(|s| s.pc)
            .or(setup.boot.map(|(entry, _)| entry))
            .ok_or_else(|| {
                Error::call(
                    "hv_vcpu_get_reg",
                    io::Error::other("the vCPU has no registers yet"),
                )
            })
    }
}
