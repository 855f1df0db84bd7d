//! The part of the i8042 keyboard controller a Linux guest uses to reset the
//! machine (`reboot=k`): command 0xfe on port 0x64 pulses the CPU reset line.

use vmm_os::EventFd;

use crate::bus::BusDevice;

/// Command/status port offset (0x64) from the base (0x60, the data port).
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 at ports 0x60..0x65.
pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    /// `reset` is written when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        I8042 { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0 (output and input buffers empty, so the guest's `kb_wait()`
        // loop ends at once); the data port reads 0 too.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset.write(1) {
                tracing::error!("cannot signal the guest's reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let evt = EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]); // the data port
        dev.write(COMMAND, &[0xd1]);
        assert!(evt.read().is_err(), "no reset expected yet");
        let mut status = [0xffu8];
        dev.read(COMMAND, &mut status);
        assert_eq!(status[0], 0);
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
