//! x86_64 machine setup: memory layout, kernel loading and boot parameters,
//! MP table, CPUID, and the vCPU's 64-bit entry state.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
