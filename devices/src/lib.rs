//! Device models. Devices see guest memory (vm-memory) and interrupt lines
//! (`interrupt::InterruptLine`); they know nothing of KVM.

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod rate_limit;
pub mod sync;
pub mod timer;
pub mod unix_socket;
#[cfg(target_os = "linux")]
pub mod vhost_user;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use interrupt::{EventFdLine, InterruptLine};
