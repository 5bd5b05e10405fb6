//! Entry points that feed arbitrary bytes through every decoder, shared by the
//! cargo-fuzz targets in `fuzz/`, the no-panic property tests and the test that
//! replays the committed fuzz corpus. They return nothing: the property is that
//! they return at all (no panic, no runaway allocation).

use bytes::{Bytes, BytesMut};

use crate::{CommandAssembler, ContentHeader, FieldTable, Frame, decode_method, split_frame};

/// Runs a read buffer through what a broker runs on it: split frames with
/// `frame_max`, decode each, feed channel frames to a command assembler, and
/// stop at the first connection error.
pub fn decode_stream(input: &[u8], frame_max: u32) {
    let mut buf = BytesMut::from(input);
    let mut assembler = CommandAssembler::new(1 << 16);
    loop {
        let raw = match split_frame(&mut buf, frame_max) {
            Ok(Some(raw)) => raw,
            Ok(None) => return,
            Err(e) => {
                let _ = (e.reply_code(), e.to_string());
                return;
            }
        };
        match Frame::decode(raw) {
            Ok(Frame::Heartbeat) => {}
            Ok(frame) => {
                if let Ok(Some(command)) = assembler.push(frame) {
                    if let Some(content) = command.content {
                        let _ = content.header.properties.decode();
                    }
                }
            }
            Err(e) => {
                let _ = (e.reply_code(), e.to_string());
                return;
            }
        }
    }
}

/// Decodes `input` as a method payload, a content header payload and a field table.
pub fn decode_payloads(input: &[u8]) {
    let bytes = Bytes::copy_from_slice(input);
    let _ = decode_method(&bytes);
    if let Ok(header) = ContentHeader::decode(&bytes) {
        let _ = header.properties.decode();
        let _ = header.properties.expiration();
    }
    let _ = FieldTable::decode(&bytes);
}
