//! Legacy platform devices: 16550 serial, i8042 reset, the boot timer.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::I8042;
pub use serial::{ConsoleOutput, GuestPanic, SerialDevice};
