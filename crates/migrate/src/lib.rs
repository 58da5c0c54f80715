//! The live-migration wire protocol between two faultline processes.
//!
//! Every message is one frame: a 16-byte header (magic `FLMG`, protocol version, message kind,
//! a reserved zero byte, payload length, CRC32 of the header's first 12 bytes and the payload)
//! followed by the payload, all integers little-endian. A reader refuses, with an error naming
//! the problem, a wrong magic or version, an unknown kind, a payload over [`MAX_PAYLOAD`], a
//! frame cut short, a checksum that fails, and a payload that does not parse as its kind; a
//! page outside the VM's memory is refused by [`Message::check`] against the [`Layout`] agreed
//! in the hello. Zero pages travel as ranges, never as pages of zeros.
//!
//! This crate is the protocol only: who sends what when (pre-copy rounds, switch-over, page
//! requests during post-copy, recovery) is the migration engine's business.

mod message;
mod page_set;
mod wire;

pub use message::{Layout, Message, VmIdentity, MAX_REQUEST_PAGES, PAGE_SIZE};
pub use wire::{
    frame, pages_header, read_message, read_message_reusing, write_message, write_pages,
    ProtocolError, MAGIC, MAX_PAYLOAD, PAGES_HEADER_BYTES, VERSION,
};
