//! PostgreSQL wire framing (protocol 3.x), sans-IO.
//!
//! [`decode_startup`] reads the untagged first message of a connection; [`decode`] reads a
//! tagged message. Both take a `BytesMut` that the caller fills from a socket, never panic,
//! and return `Ok(None)` when more bytes are needed. They are cancellation-safe: a message
//! is only removed from the buffer once complete.
//!
//! Every length is checked before it is used: lengths below the header size are errors,
//! and lengths above the configured maximum are refused before any allocation, so a peer
//! announcing a 2 GB message costs nothing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;
/// Default cap on one message (configurable per target). PostgreSQL's own hard limit for
/// most messages is 1 GB; 64 MiB covers real rows and COPY chunks with a bounded buffer.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub const PROTOCOL_3_0: i32 = 0x0003_0000;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message length {len} is below the minimum of {min}")]
    TooShort { len: i64, min: usize },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

/// A tagged message: its type byte and its body (without tag and length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn new(tag: u8, body: impl Into<Bytes>) -> Self {
        Self {
            tag,
            body: body.into(),
        }
    }

    /// The message as it goes on the wire.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_i32((self.body.len() + 4) as i32);
        out.extend_from_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + self.body.len());
        self.encode(&mut b);
        b.freeze()
    }

    /// Bytes on the wire.
    pub fn wire_len(&self) -> usize {
        5 + self.body.len()
    }
}

/// Decodes one tagged message if complete.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::TooShort {
            len: len.into(),
            min: 4,
        });
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let total = 1 + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total);
    let tag = msg[0];
    msg.advance(5);
    Ok(Some(Frame {
        tag,
        body: msg.freeze(),
    }))
}

/// The first message of a connection (no type byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    /// `CancelRequest`: backend pid and secret key (4 bytes in 3.0, longer from 3.2).
    Cancel {
        pid: i32,
        key: Bytes,
    },
    /// `StartupMessage`: protocol version and parameters, in order.
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
}

/// Decodes the untagged first message if complete.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::TooShort {
            len: len.into(),
            min: 8,
        });
    }
    let len = len as usize;
    if len > MAX_STARTUP {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_STARTUP,
        });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let msg = buf.split_to(len).freeze();
    let mut r = Reader::new(&msg[4..], "startup packet");
    let code = r.i32()?;
    let s = match code {
        SSL_REQUEST if len == 8 => Startup::SslRequest,
        GSSENC_REQUEST if len == 8 => Startup::GssEncRequest,
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let key = r.rest();
            if key.len() < 4 || key.len() > 256 {
                return Err(r.bad("cancel key must be 4 to 256 bytes"));
            }
            Startup::Cancel {
                pid,
                key: Bytes::copy_from_slice(key),
            }
        }
        v if (v >> 16) == 3 => {
            let mut params = Vec::new();
            loop {
                let k = r.cstr()?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr()?;
                params.push((k.to_owned(), v.to_owned()));
            }
            if !r.is_empty() {
                return Err(r.bad("bytes after the parameter list"));
            }
            Startup::Startup { version: v, params }
        }
        other => {
            return Err(FrameError::Malformed {
                what: "startup packet",
                why: format!("unsupported protocol version or request code {other}"),
            });
        }
    };
    Ok(Some(s))
}

impl Startup {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i32(0);
        match self {
            Self::SslRequest => b.put_i32(SSL_REQUEST),
            Self::GssEncRequest => b.put_i32(GSSENC_REQUEST),
            Self::Cancel { pid, key } => {
                b.put_i32(CANCEL_REQUEST);
                b.put_i32(*pid);
                b.extend_from_slice(key);
            }
            Self::Startup { version, params } => {
                b.put_i32(*version);
                for (k, v) in params {
                    put_cstr(&mut b, k);
                    put_cstr(&mut b, v);
                }
                b.put_u8(0);
            }
        }
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }
}

/// Writes a NUL-terminated string. NUL bytes inside `s` are dropped: they would cut it.
pub fn put_cstr(b: &mut BytesMut, s: &str) {
    for &c in s.as_bytes() {
        if c != 0 {
            b.put_u8(c);
        }
    }
    b.put_u8(0);
}

/// Checked reads over a message body: every read says what it needs, nothing panics.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub fn bad(&self, why: impl Into<String>) -> FrameError {
        FrameError::Malformed {
            what: self.what,
            why: why.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| self.bad("truncated"))?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, FrameError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, FrameError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count that must not be negative.
    pub fn count16(&mut self) -> Result<usize, FrameError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.bad(format!("negative count {n}")))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.bad(format!("needs {n} bytes, {} left", self.buf.len())));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub fn cstr(&mut self) -> Result<&'a str, FrameError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.bad("string without terminator"))?;
        let s =
            std::str::from_utf8(&self.buf[..end]).map_err(|_| self.bad("string is not UTF-8"))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A length-prefixed value: `None` for SQL NULL (-1).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, FrameError> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| self.bad(format!("value length {len}")))?;
        self.bytes(len).map(Some)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        Frame::new(tag, Bytes::copy_from_slice(body)).encode(&mut b);
        b
    }

    #[test]
    fn decodes_split_and_pipelined_frames() {
        let mut all = frame(b'Q', b"SELECT 1\0");
        all.extend_from_slice(&frame(b'S', b""));
        let whole = all.clone();
        // Byte by byte: nothing until complete, then exactly the frames.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in whole.iter() {
            buf.put_u8(b);
            while let Some(f) = decode(&mut buf, 1024).expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].tag, b'Q');
        assert_eq!(&got[0].body[..], b"SELECT 1\0");
        assert_eq!(got[1], Frame::new(b'S', Bytes::new()));
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_bad_lengths_before_allocating() {
        for len in [0i32, 3, -1, i32::MIN] {
            let mut b = BytesMut::from(&[b'Q'][..]);
            b.put_i32(len);
            assert!(
                matches!(decode(&mut b, 1024), Err(FrameError::TooShort { .. })),
                "{len}"
            );
        }
        let mut b = BytesMut::from(&[b'D'][..]);
        b.put_i32(i32::MAX);
        let cap = b.capacity();
        assert!(matches!(
            decode(&mut b, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(b.capacity(), cap, "no reservation for a refused length");
    }

    #[test]
    fn startup_packets() {
        let s = Startup::Startup {
            version: PROTOCOL_3_0,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "shop".into()),
            ],
        };
        let mut b = BytesMut::from(&s.encode()[..]);
        assert_eq!(decode_startup(&mut b).expect("valid"), Some(s));
        let mut b = BytesMut::from(&Startup::SslRequest.encode()[..]);
        assert_eq!(
            decode_startup(&mut b).expect("valid"),
            Some(Startup::SslRequest)
        );
        let c = Startup::Cancel {
            pid: 42,
            key: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let mut b = BytesMut::from(&c.encode()[..]);
        assert_eq!(decode_startup(&mut b).expect("valid"), Some(c));
        // Garbage before startup: a bogus version.
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(decode_startup(&mut b).is_err());
        // Huge announced length.
        let mut b = BytesMut::new();
        b.put_i32(100_000);
        assert!(matches!(
            decode_startup(&mut b),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[0, 1], "test");
        assert!(r.i32().is_err());
        let mut r = Reader::new(b"abc", "test");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xfe], "test");
        assert!(r.value().is_err(), "negative length other than -1");
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff], "test");
        assert_eq!(r.value().expect("null"), None);
        let mut r = Reader::new(&[0xff, 0xff], "test");
        assert!(r.count16().is_err());
    }
}
