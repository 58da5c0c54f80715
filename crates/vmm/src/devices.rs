//! The legacy devices on the I/O port bus: a 16550 UART on COM1 and an i8042 whose reset line
//! stops the VM. (The micro-guests' test device is per vCPU and lives in [`crate::vcpu`].)

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{RunControl, StopReason};
use crate::state::{DeviceState, SerialState};

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042's data port.
pub const I8042_DATA: u16 = 0x60;
/// The i8042's command/status port.
pub const I8042_COMMAND: u16 = 0x64;

/// Where the serial console's output goes.
#[derive(Debug, Clone, Default)]
pub struct ConsoleSink {
    /// Copy guest output to this process's stdout.
    pub to_stdout: bool,
    /// Keep guest output in memory (tests read it).
    pub capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl ConsoleSink {
    /// Output to stdout only.
    pub fn stdout() -> Self {
        ConsoleSink {
            to_stdout: true,
            capture: None,
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.to_stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        if let Some(capture) = &self.capture {
            capture
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Raises the serial interrupt through an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's CPU-reset line.
pub struct ResetLine(Arc<RunControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopReason::Reset);
        Ok(())
    }
}

/// The devices every VM has.
pub struct LegacyDevices {
    serial: Mutex<Serial<IrqLine, NoEvents, ConsoleSink>>,
    i8042: Mutex<I8042Device<ResetLine>>,
    /// What a restored serial port is rebuilt with.
    serial_irq: EventFd,
    console: ConsoleSink,
}

impl LegacyDevices {
    /// `serial_irq` is an eventfd the caller has registered as the irqfd of [`COM1_IRQ`].
    pub fn new(
        serial_irq: EventFd,
        console: ConsoleSink,
        control: Arc<RunControl>,
    ) -> std::io::Result<Self> {
        Ok(LegacyDevices {
            serial: Mutex::new(Serial::new(
                IrqLine(serial_irq.try_clone()?),
                console.clone(),
            )),
            i8042: Mutex::new(I8042Device::new(ResetLine(control))),
            serial_irq,
            console,
        })
    }

    /// The devices' state, for a snapshot.
    pub fn state(&self) -> DeviceState {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let s = serial.state();
        DeviceState {
            serial: SerialState {
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
            },
        }
    }

    /// Puts saved device state back (before the vCPUs run).
    pub fn restore(&self, state: &DeviceState) -> std::io::Result<()> {
        let s = &state.serial;
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &saved,
            IrqLine(self.serial_irq.try_clone()?),
            NoEvents,
            self.console.clone(),
        )
        .map_err(|e| std::io::Error::other(format!("invalid serial state: {e:?}")))?;
        *self.serial.lock().unwrap_or_else(|e| e.into_inner()) = serial;
        Ok(())
    }

    /// Handles a guest write to `port`; returns false if no device is there.
    pub fn io_out(&self, port: u16, data: &[u8]) -> bool {
        match port {
            COM1_BASE..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                for byte in data {
                    if let Err(e) = serial.write((port - COM1_BASE) as u8, *byte) {
                        tracing::warn!("serial write failed: {e:?}");
                    }
                }
                true
            }
            I8042_DATA | I8042_COMMAND => {
                let mut i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(byte) = data.first() {
                    let _ = i8042.write((port - I8042_DATA) as u8, *byte);
                }
                true
            }
            _ => false,
        }
    }

    /// Handles a guest read from `port`; returns false if no device is there.
    pub fn io_in(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            COM1_BASE..=0x3ff => {
                // A string read (`rep insb`) comes as one exit with a byte per iteration:
                // each is a read of its own (the receive buffer gives its next byte).
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                for byte in data.iter_mut() {
                    *byte = serial.read((port - COM1_BASE) as u8);
                }
                true
            }
            I8042_DATA | I8042_COMMAND => {
                let mut i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data.fill(i8042.read((port - I8042_DATA) as u8));
                true
            }
            _ => false,
        }
    }

    /// Queues host input (a terminal's keystrokes) for the guest's serial console.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (LegacyDevices, Arc<Mutex<Vec<u8>>>, Arc<RunControl>) {
        let capture = Arc::new(Mutex::new(Vec::new()));
        let control = Arc::new(RunControl::default());
        let sink = ConsoleSink {
            to_stdout: false,
            capture: Some(Arc::clone(&capture)),
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            LegacyDevices::new(evt, sink, Arc::clone(&control)).unwrap(),
            capture,
            control,
        )
    }

    #[test]
    fn serial_output_reaches_the_console() {
        let (devices, capture, _) = devices();
        for byte in b"hi\n" {
            assert!(devices.io_out(COM1_BASE, &[*byte]));
        }
        assert_eq!(capture.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn i8042_reset_stops_the_vm() {
        let (devices, _, control) = devices();
        assert!(devices.io_out(I8042_COMMAND, &[0xfe]));
        assert_eq!(control.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn unknown_ports_are_not_claimed() {
        let (devices, _, _) = devices();
        assert!(!devices.io_out(0x80, &[1]));
        let mut data = [0u8; 1];
        assert!(!devices.io_in(0x61, &mut data));
    }

    #[test]
    fn serial_state_round_trips() {
        let (source, _, _) = devices();
        let devices = source;
        // Program the line control and scratch registers, queue input.
        assert!(devices.io_out(COM1_BASE + 3, &[0x03]));
        assert!(devices.io_out(COM1_BASE + 7, &[0x5a]));
        devices.serial_input(b"ab");
        let saved = devices.state();
        let (other, _, _) = self::devices();
        assert_eq!(saved.serial.line_control, 0x03);
        assert_eq!(saved.serial.scratch, 0x5a);
        assert_eq!(saved.serial.in_buffer, b"ab");
        other.restore(&saved).unwrap();
        assert_eq!(other.state(), saved);
        let mut data = [0u8; 1];
        assert!(other.io_in(COM1_BASE, &mut data));
        assert_eq!(data[0], b'a');
    }

    #[test]
    fn a_string_read_of_the_serial_port_takes_a_byte_per_iteration() {
        let (devices, _, _) = devices();
        assert_eq!(devices.serial_input(b"abc"), 3);
        let mut data = [0u8; 3];
        assert!(devices.io_in(COM1_BASE, &mut data));
        assert_eq!(&data, b"abc");
    }

    #[test]
    fn serial_input_is_readable_by_the_guest() {
        let (devices, _, _) = devices();
        assert_eq!(devices.serial_input(b"x"), 1);
        let mut data = [0u8; 1];
        assert!(devices.io_in(COM1_BASE, &mut data));
        assert_eq!(data[0], b'x');
    }
}
