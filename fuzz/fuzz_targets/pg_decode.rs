//! Untrusted bytes into the PostgreSQL decoders: framing (startup and tagged) and every
//! message parser the engine uses must return errors, never panic or over-allocate.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::protocol::postgres::{codec, messages};

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_startup(&mut BytesMut::from(data));
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = codec::decode(&mut buf, 1 << 20) {
        let b = &f.body[..];
        let _ = messages::query_text(b);
        let _ = messages::Parse::decode(b);
        let _ = messages::Bind::decode(b);
        let _ = messages::Bind::text_params(b);
        let _ = messages::Target::decode(b, "fuzz");
        let _ = messages::execute_portal(b);
        let _ = messages::row_description(b);
        let _ = messages::data_row(b);
        let _ = messages::ready_status(b);
        let _ = messages::parameter_status(b);
        let _ = messages::error_fields(b);
        let _ = messages::backend_key(b);
        let _ = messages::auth_code(b);
        let _ = messages::copy_response(b);
        let _ = messages::command_tag(b);
        let _ = messages::notification(b);
    }
});
