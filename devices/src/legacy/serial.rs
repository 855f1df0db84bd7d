//! A 16550 UART (vm-superio) on the port-I/O bus, with an output sink that
//! notices guest kernel panics.

use crate::sync::Locked;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::interrupt::EventFdLine;

/// The line the Linux kernel prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Longest console line kept for panic detection; longer lines are cut.
const MAX_LINE: usize = 512;

/// The panic message, once the guest printed one.
pub type GuestPanic = Arc<Mutex<Option<String>>>;

/// Where guest console output goes: a writer (stdout, a file), plus a scan
/// for kernel panic lines so the VMM can report a crash instead of a reboot.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panic: GuestPanic,
}

impl ConsoleOutput {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOutput {
            out,
            line: Vec::with_capacity(MAX_LINE),
            panic: Arc::default(),
        }
    }

    /// Shared handle to the panic message (None while the guest has not panicked).
    pub fn panic_handle(&self) -> GuestPanic {
        self.panic.clone()
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        if let Some(pos) = self
            .line
            .windows(PANIC_MARKER.len())
            .position(|w| w == PANIC_MARKER)
        {
            let msg = String::from_utf8_lossy(&self.line[pos..])
                .trim_end()
                .to_string();
            let mut slot = self.panic.locked();
            slot.get_or_insert(msg);
        }
        self.line.clear();
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // Console output is best effort: a closed stdout must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART's saved registers and unread input.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The serial port as a bus device (8 registers).
pub struct SerialDevice {
    serial: Serial<EventFdLine, NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    /// Port range length of a 16550.
    pub const LEN: u64 = 8;

    pub fn new(interrupt: EventFdLine, out: ConsoleOutput) -> Self {
        SerialDevice {
            serial: Serial::new(interrupt, out),
        }
    }

    /// A port restored from `saved`. Fails when the saved input buffer is
    /// larger than the FIFO.
    pub fn restored(
        interrupt: EventFdLine,
        out: ConsoleOutput,
        saved: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, interrupt, NoEvents, out)
            .map(|serial| SerialDevice { serial })
            .map_err(|e| format!("{e:?}"))
    }

    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues bytes for the guest to read (console input). Returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.serial.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(off, *byte) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_os::EventFd;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_writes_reach_the_sink_and_raise_the_interrupt() {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(vmm_os::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdLine(irq.try_clone().unwrap()),
            ConsoleOutput::new(Box::new(Shared(sink.clone()))),
        );
        dev.write(1, &[0x02]); // IER: THR-empty interrupt on.
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        // IER reads back what the guest wrote.
        let mut ier = [0u8];
        dev.read(1, &mut ier);
        assert_eq!(ier[0], 0x02);
        // Wider accesses are not 16550 accesses: ignored, read as ones.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn saved_state_comes_back() {
        let irq = || EventFdLine(EventFd::new(vmm_os::EFD_NONBLOCK).unwrap());
        let mut dev = SerialDevice::new(irq(), ConsoleOutput::new(Box::new(io::sink())));
        dev.write(1, &[0x02]);
        dev.write(7, &[0x5a]);
        dev.enqueue_input(b"ab");
        let saved = dev.save();
        let mut back =
            SerialDevice::restored(irq(), ConsoleOutput::new(Box::new(io::sink())), &saved)
                .unwrap();
        let mut b = [0u8];
        back.read(1, &mut b);
        assert_eq!(b[0], 0x02);
        back.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        back.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let mut huge = saved;
        huge.in_buffer = vec![0; 1000];
        assert!(
            SerialDevice::restored(irq(), ConsoleOutput::new(Box::new(io::sink())), &huge).is_err()
        );
    }

    #[test]
    fn console_notices_a_kernel_panic() {
        let mut out = ConsoleOutput::new(Box::new(io::sink()));
        let panic = out.panic_handle();
        out.write_all(b"[    1.0] Run /init as init process\n")
            .unwrap();
        assert!(panic.lock().unwrap().is_none());
        out.write_all(b"[    1.2] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert_eq!(
            panic.lock().unwrap().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
    }
}
