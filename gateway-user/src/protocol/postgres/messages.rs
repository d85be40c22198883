//! The messages the engine reads or writes, decoded from and encoded to [`Frame`]s. Only
//! what enforcement, masking and authentication need is decoded; everything else is relayed
//! as raw frames.
//!
//! Type bytes are direction-dependent (`D` is Describe from the client, DataRow from the
//! server): [`fe`] and [`be`] name them per direction.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{Frame, FrameError, Reader, put_cstr};

/// Frontend (client → server) type bytes.
pub mod fe {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    /// PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse.
    pub const PASSWORD: u8 = b'p';
}

/// Backend (server → client) type bytes.
pub mod be {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const NOTIFICATION: u8 = b'A';
    pub const NEGOTIATE_PROTOCOL: u8 = b'v';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
}

/// A body that is one NUL-terminated string and nothing after it.
fn sole_cstr<'a>(
    body: &'a [u8],
    message: &'static str,
    trailing: &'static str,
) -> Result<&'a str, FrameError> {
    let mut r = Reader::new(body, message);
    let s = r.cstr()?;
    if !r.is_empty() {
        return Err(r.bad(trailing));
    }
    Ok(s)
}

/// `Query`: the SQL text.
pub fn query_text(body: &[u8]) -> Result<&str, FrameError> {
    sole_cstr(body, "Query", "bytes after the query string")
}

/// The text of a PasswordMessage (a password, or a token presented as one).
pub fn password_text(body: &[u8]) -> Result<&str, FrameError> {
    sole_cstr(body, "PasswordMessage", "bytes after the password")
}

pub fn query(sql: &str) -> Frame {
    let mut b = BytesMut::with_capacity(sql.len() + 1);
    put_cstr(&mut b, sql);
    Frame::new(fe::QUERY, b.freeze())
}

/// `Parse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    pub sql: String,
    pub param_types: Vec<u32>,
}

impl Parse {
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body, "Parse");
        let name = r.cstr()?.to_owned();
        let sql = r.cstr()?.to_owned();
        let n = r.count16()?;
        let mut param_types = Vec::with_capacity(n.min(r.remaining() / 4));
        for _ in 0..n {
            param_types.push(r.i32()? as u32);
        }
        Ok(Self {
            name,
            sql,
            param_types,
        })
    }

    pub fn encode(&self) -> Frame {
        let mut b = BytesMut::new();
        put_cstr(&mut b, &self.name);
        put_cstr(&mut b, &self.sql);
        b.put_i16(self.param_types.len() as i16);
        for t in &self.param_types {
            b.put_u32(*t);
        }
        Frame::new(fe::PARSE, b.freeze())
    }
}

/// The parts of `Bind` the engine needs: which statement, which portal, and the result
/// formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// 0 codes: all text; 1 code: applies to all columns; else one per column.
    pub result_formats: Vec<i16>,
}

impl Bind {
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body, "Bind");
        let portal = r.cstr()?.to_owned();
        let statement = r.cstr()?.to_owned();
        let nf = r.count16()?;
        r.bytes(nf * 2)?;
        let np = r.count16()?;
        for _ in 0..np {
            r.value()?;
        }
        let nr = r.count16()?;
        let mut result_formats = Vec::with_capacity(nr.min(r.remaining() / 2));
        for _ in 0..nr {
            result_formats.push(r.i16()?);
        }
        if !r.is_empty() {
            return Err(r.bad("bytes after the result formats"));
        }
        Ok(Self {
            portal,
            statement,
            result_formats,
        })
    }

    /// The parameters of a Bind sent in text format, as text (binary ones, NULLs and
    /// text that is not UTF-8 are left out): what the client itself sent, which an error
    /// may quote back.
    pub fn text_params(body: &[u8]) -> Result<Vec<&str>, FrameError> {
        let mut r = Reader::new(body, "Bind");
        r.cstr()?;
        r.cstr()?;
        let nf = r.count16()?;
        let formats: Vec<i16> = (0..nf).map(|_| r.i16()).collect::<Result<_, _>>()?;
        let np = r.count16()?;
        let mut out = Vec::with_capacity(np.min(r.remaining() / 4));
        for i in 0..np {
            let v = r.value()?;
            if Self::format_of(&formats, i) == 0
                && let Some(text) = v.and_then(|v| std::str::from_utf8(v).ok())
            {
                out.push(text);
            }
        }
        Ok(out)
    }

    /// The format of result column `i` (0 text, 1 binary).
    pub fn format_of(formats: &[i16], i: usize) -> i16 {
        match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(i).copied().unwrap_or(0),
        }
    }
}

/// `Describe`, `Close`: `S`tatement or `P`ortal, and a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: u8,
    pub name: String,
}

impl Target {
    pub fn decode(body: &[u8], what: &'static str) -> Result<Self, FrameError> {
        let mut r = Reader::new(body, what);
        let kind = r.u8()?;
        if kind != b'S' && kind != b'P' {
            return Err(r.bad(format!("kind {kind:#x} is neither S nor P")));
        }
        let name = r.cstr()?.to_owned();
        Ok(Self { kind, name })
    }
}

/// `Describe` of a statement (`S`) or portal (`P`).
/// A Bind the server refuses as soon as it reads its counts: two parameter format codes
/// for three parameters ("bind message has 2 parameter formats but 3 parameters"). The
/// server raises that error (or, first, that the statement does not exist) before it
/// creates a portal, so the refusal leaves no trace but the error: in a transaction block
/// the transaction is aborted, in a pipeline the server skips to the next Sync, exactly as
/// if it had refused the client's own Bind.
pub fn unreadable_bind(portal: &str, statement: &str) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + statement.len() + 24);
    put_cstr(&mut b, portal);
    put_cstr(&mut b, statement);
    b.put_i16(2);
    b.put_i16(0);
    b.put_i16(0);
    b.put_i16(3);
    for _ in 0..3 {
        b.put_i32(-1);
    }
    b.put_i16(0);
    Frame::new(fe::BIND, b.freeze())
}

/// `Bind` of a statement without parameters to a portal, results as text.
pub fn bind_plain(portal: &str, statement: &str) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + statement.len() + 8);
    put_cstr(&mut b, portal);
    put_cstr(&mut b, statement);
    b.put_i16(0);
    b.put_i16(0);
    b.put_i16(0);
    Frame::new(fe::BIND, b.freeze())
}

/// `Execute` of a portal, every row.
pub fn execute(portal: &str) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + 5);
    put_cstr(&mut b, portal);
    b.put_i32(0);
    Frame::new(fe::EXECUTE, b.freeze())
}

/// `Close` of a statement (`S`) or portal (`P`).
pub fn close(kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + 2);
    b.put_u8(kind);
    put_cstr(&mut b, name);
    Frame::new(fe::CLOSE, b.freeze())
}

pub fn sync() -> Frame {
    Frame::new(fe::SYNC, Bytes::new())
}

pub fn describe(kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + 2);
    b.put_u8(kind);
    put_cstr(&mut b, name);
    Frame::new(fe::DESCRIBE, b.freeze())
}

/// `Execute`: the portal.
pub fn execute_portal(body: &[u8]) -> Result<String, FrameError> {
    let mut r = Reader::new(body, "Execute");
    let p = r.cstr()?.to_owned();
    r.i32()?;
    Ok(p)
}

/// One column of a `RowDescription`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// Table the column comes from (0 when it is an expression).
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    pub format: i16,
}

pub fn row_description(body: &[u8]) -> Result<Vec<Field>, FrameError> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.count16()?;
    let mut out = Vec::with_capacity(n.min(r.remaining() / 19));
    for _ in 0..n {
        out.push(Field {
            name: r.cstr()?.to_owned(),
            table_oid: r.i32()? as u32,
            column: r.i16()?,
            type_oid: r.i32()? as u32,
            type_len: r.i16()?,
            type_mod: r.i32()?,
            format: r.i16()?,
        });
    }
    Ok(out)
}

/// The values of a `DataRow` (`None` = NULL), borrowed from its body.
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, FrameError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.count16()?;
    let mut out = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        out.push(r.value()?);
    }
    if !r.is_empty() {
        return Err(r.bad("bytes after the last column"));
    }
    Ok(out)
}

/// Encodes a `DataRow`; lengths are written from the values, so replaced values of any
/// size keep the message valid.
pub fn encode_data_row<'a>(values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            None => b.put_i32(-1),
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.extend_from_slice(v);
            }
        }
    }
    Frame::new(be::DATA_ROW, b.freeze())
}

/// `ReadyForQuery` status: `I` idle, `T` in a transaction block, `E` in a failed one.
pub fn ready_status(body: &[u8]) -> Result<u8, FrameError> {
    let mut r = Reader::new(body, "ReadyForQuery");
    let s = r.u8()?;
    if !matches!(s, b'I' | b'T' | b'E') {
        return Err(r.bad(format!("status {s:#x}")));
    }
    Ok(s)
}

pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(be::READY_FOR_QUERY, Bytes::copy_from_slice(&[status]))
}

/// `ParameterStatus`.
pub fn parameter_status(body: &[u8]) -> Result<(String, String), FrameError> {
    let mut r = Reader::new(body, "ParameterStatus");
    Ok((r.cstr()?.to_owned(), r.cstr()?.to_owned()))
}

/// Fields of an `ErrorResponse` or `NoticeResponse`, by code (`S`everity, `C`ode, `M`essage,
/// `D`etail, `H`int, ...).
pub fn error_fields(body: &[u8]) -> Result<Vec<(u8, String)>, FrameError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut out = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        out.push((code, r.cstr()?.to_owned()));
    }
    Ok(out)
}

/// An error or notice from its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl Notice {
    fn encode(&self, tag: u8) -> Frame {
        let mut b = BytesMut::new();
        for (code, v) in [
            (b'S', self.severity),
            (b'V', self.severity),
            (b'C', self.code),
        ] {
            b.put_u8(code);
            put_cstr(&mut b, v);
        }
        b.put_u8(b'M');
        put_cstr(&mut b, &self.message);
        if let Some(d) = &self.detail {
            b.put_u8(b'D');
            put_cstr(&mut b, d);
        }
        if let Some(h) = &self.hint {
            b.put_u8(b'H');
            put_cstr(&mut b, h);
        }
        b.put_u8(0);
        Frame::new(tag, b.freeze())
    }

    pub fn error(&self) -> Frame {
        self.encode(be::ERROR_RESPONSE)
    }

    pub fn notice(&self) -> Frame {
        self.encode(be::NOTICE_RESPONSE)
    }
}

/// `BackendKeyData`: pid and secret key.
pub fn backend_key(body: &[u8]) -> Result<(i32, Bytes), FrameError> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.i32()?;
    let key = r.rest();
    if key.len() < 4 || key.len() > 256 {
        return Err(r.bad("key must be 4 to 256 bytes"));
    }
    Ok((pid, Bytes::copy_from_slice(key)))
}

pub fn backend_key_data(pid: i32, key: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(4 + key.len());
    b.put_i32(pid);
    b.extend_from_slice(key);
    Frame::new(be::BACKEND_KEY_DATA, b.freeze())
}

/// `Authentication*`: the code and what follows.
pub fn auth_code(body: &[u8]) -> Result<(i32, &[u8]), FrameError> {
    let mut r = Reader::new(body, "Authentication");
    let code = r.i32()?;
    Ok((code, r.rest()))
}

pub fn auth(code: i32, data: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(4 + data.len());
    b.put_i32(code);
    b.extend_from_slice(data);
    Frame::new(be::AUTHENTICATION, b.freeze())
}

pub mod auth_codes {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

pub fn parameter_status_frame(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, name);
    put_cstr(&mut b, value);
    Frame::new(be::PARAMETER_STATUS, b.freeze())
}

/// `NotificationResponse`: the notifying backend's pid, the channel and the payload.
pub fn notification(body: &[u8]) -> Result<(i32, &str, &str), FrameError> {
    let mut r = Reader::new(body, "NotificationResponse");
    let pid = r.i32()?;
    let channel = r.cstr()?;
    let payload = r.cstr()?;
    if !r.is_empty() {
        return Err(r.bad("bytes after the payload"));
    }
    Ok((pid, channel, payload))
}

pub fn notification_frame(pid: i32, channel: &str, payload: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    put_cstr(&mut b, channel);
    put_cstr(&mut b, payload);
    Frame::new(be::NOTIFICATION, b.freeze())
}

/// `CopyInResponse` / `CopyOutResponse`: the overall format and per-column formats.
pub fn copy_response(body: &[u8]) -> Result<(i8, Vec<i16>), FrameError> {
    let mut r = Reader::new(body, "CopyResponse");
    let overall = r.u8()? as i8;
    let n = r.count16()?;
    let mut f = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        f.push(r.i16()?);
    }
    Ok((overall, f))
}

/// `CommandComplete`: the tag (`SELECT 3`, `CREATE TABLE`, ...).
pub fn command_tag(body: &[u8]) -> Result<&str, FrameError> {
    Reader::new(body, "CommandComplete").cstr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_bind_names_the_clients_portal_and_statement_with_counts_that_disagree() {
        let f = unreadable_bind("p1", "s1");
        assert_eq!(f.tag, fe::BIND);
        let mut want = b"p1\0s1\0".to_vec();
        // Two parameter format codes, then three parameters: the server stops there.
        want.extend([0, 2, 0, 0, 0, 0, 0, 3]);
        assert!(f.body.starts_with(&want), "{:?}", f.body);
        assert_eq!(
            f.body.len(),
            want.len() + 3 * 4 + 2,
            "three NULLs, no result formats"
        );
    }

    #[test]
    fn parse_round_trip() {
        let p = Parse {
            name: "s1".into(),
            sql: "SELECT $1".into(),
            param_types: vec![23],
        };
        let f = p.encode();
        assert_eq!(Parse::decode(&f.body).expect("valid"), p);
        // A huge parameter count with no data is an error, not a huge allocation.
        let mut b = BytesMut::new();
        put_cstr(&mut b, "");
        put_cstr(&mut b, "x");
        b.put_i16(i16::MAX);
        assert!(Parse::decode(&b).is_err());
    }

    #[test]
    fn bind_formats_and_bad_values() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "p");
        put_cstr(&mut b, "s");
        b.put_i16(1);
        b.put_i16(1);
        b.put_i16(2);
        b.put_i32(3);
        b.extend_from_slice(b"abc");
        b.put_i32(-1);
        b.put_i16(1);
        b.put_i16(1);
        let bind = Bind::decode(&b).expect("valid");
        assert_eq!(bind.portal, "p");
        assert_eq!(bind.statement, "s");
        assert_eq!(Bind::format_of(&bind.result_formats, 5), 1);
        let mut bad = BytesMut::new();
        put_cstr(&mut bad, "");
        put_cstr(&mut bad, "");
        bad.put_i16(0);
        bad.put_i16(1);
        bad.put_i32(1_000_000);
        assert!(Bind::decode(&bad).is_err(), "value longer than the message");
        assert!(
            Bind::text_params(&bad).is_err(),
            "value longer than the message"
        );
    }

    #[test]
    fn bind_text_parameters_leave_out_binary_null_and_non_utf8_ones() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "");
        put_cstr(&mut b, "s");
        // Formats per parameter: text, binary, text, text.
        b.put_i16(4);
        for f in [0, 1, 0, 0] {
            b.put_i16(f);
        }
        b.put_i16(4);
        for v in [&b"alice@example.com"[..], &[0, 0, 0, 7], &[0xff, 0xfe]] {
            b.put_i32(v.len() as i32);
            b.extend_from_slice(v);
        }
        b.put_i32(-1);
        b.put_i16(0);
        assert_eq!(Bind::text_params(&b).expect("valid"), ["alice@example.com"]);
        // No format codes: every parameter is text.
        let mut b = BytesMut::new();
        put_cstr(&mut b, "");
        put_cstr(&mut b, "");
        b.put_i16(0);
        b.put_i16(2);
        for v in ["1", "x"] {
            b.put_i32(v.len() as i32);
            b.extend_from_slice(v.as_bytes());
        }
        b.put_i16(0);
        assert_eq!(Bind::text_params(&b).expect("valid"), ["1", "x"]);
    }

    #[test]
    fn notifications_round_trip_and_bad_ones_are_errors() {
        let f = notification_frame(42, "jobs", "alice@example.com");
        assert_eq!(f.tag, be::NOTIFICATION);
        assert_eq!(
            notification(&f.body).expect("valid"),
            (42, "jobs", "alice@example.com")
        );
        assert!(
            notification(&f.body[..f.body.len() - 1]).is_err(),
            "truncated"
        );
        let mut extra = f.body.to_vec();
        extra.push(b'x');
        assert!(notification(&extra).is_err(), "trailing bytes");
    }

    #[test]
    fn data_rows_rewrite_with_new_lengths() {
        let f = encode_data_row([Some(&b"alice@example.com"[..]), None].into_iter());
        let v = data_row(&f.body).expect("valid");
        assert_eq!(v, vec![Some(&b"alice@example.com"[..]), None]);
        let masked = encode_data_row([Some(&b"[REDACTED:email]"[..]), None].into_iter());
        assert_eq!(
            data_row(&masked.body).expect("valid")[0],
            Some(&b"[REDACTED:email]"[..])
        );
        assert!(data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
    }

    #[test]
    fn errors_round_trip() {
        let n = Notice {
            severity: "ERROR",
            code: "42501",
            message: "denied".into(),
            detail: Some("rule x".into()),
            hint: None,
        };
        let f = n.error();
        let fields = error_fields(&f.body).expect("valid");
        assert!(fields.contains(&(b'C', "42501".into())));
        assert!(fields.contains(&(b'D', "rule x".into())));
    }
}
