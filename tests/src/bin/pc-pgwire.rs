//! Raw PostgreSQL wire client for tests: sends scripted messages and prints every server
//! message it gets, so DataRows can be compared byte for byte and malformed input sent on
//! purpose.
//!
//! ```text
//! pc-pgwire HOST:PORT USER PASSWORD DB < script
//! ```
//! Script lines (one message each; `\n` in SQL written as `\n`):
//! `Q sql` · `P name sql` · `B portal stmt [0|1 result format]` · `BP portal stmt value...` (text parameters, `\N` NULL) · `D S|P name` ·
//! `E portal [maxrows]` · `C S|P name` · `S` (Sync) · `H` (Flush) · `F oid` (FunctionCall) ·
//! `d text` (CopyData) · `c` (CopyDone) · `RAW hex` · `WAIT n` (read until n ReadyForQuery) ·
//! `DIGEST` (from now on print DataRows as a running digest) · `READ_TO_END` (until the
//! connection closes, at most 10 s) · `UNTIL path` (print `{"until": path}`, then wait for
//! the file to exist, at most 30 s: the test does something meanwhile) · `X` (Terminate).
//! Output: one JSON line per server message, then a summary line.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use bytes::{BufMut, BytesMut};
use portcullis::digest::hex;
use portcullis::protocol::postgres::{
    auth::Scram,
    codec::{Frame, PROTOCOL_3_0, Startup, decode, put_cstr},
    messages::{self, auth_codes, be, fe},
};
use serde_json::json;
use sha2::{Digest, Sha256};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

struct Conn {
    s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn read(&mut self) -> Option<Frame> {
        loop {
            match decode(&mut self.buf, 1 << 30) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => {
                    println!("{}", json!({"decode_error": e.to_string()}));
                    return None;
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn send(&mut self, f: &Frame) {
        let _ = self.s.write_all(&f.to_bytes());
    }
}

fn describe(f: &Frame) -> serde_json::Value {
    let t = f.tag as char;
    match f.tag {
        be::ERROR_RESPONSE | be::NOTICE_RESPONSE => {
            let fields = messages::error_fields(&f.body).unwrap_or_default();
            let get = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
            json!({"t": t.to_string(), "code": get(b'C'), "message": get(b'M'), "detail": get(b'D')})
        }
        be::READY_FOR_QUERY => json!({"t": "Z", "status": (f.body[0] as char).to_string()}),
        be::DATA_ROW => json!({"t": "D", "hex": hex(&f.body)}),
        be::COMMAND_COMPLETE => {
            json!({"t": "C", "tag": messages::command_tag(&f.body).unwrap_or("")})
        }
        be::ROW_DESCRIPTION => {
            let fields = messages::row_description(&f.body).unwrap_or_default();
            json!({"t": "T", "names": fields.iter().map(|x| x.name.clone()).collect::<Vec<_>>()})
        }
        be::COPY_DATA => json!({"t": "d", "text": String::from_utf8_lossy(&f.body)}),
        be::PARAMETER_STATUS | be::BACKEND_KEY_DATA => json!({"t": t.to_string()}),
        _ => json!({"t": t.to_string(), "hex": hex(&f.body)}),
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let addr: std::net::SocketAddr = a[0].parse().expect("HOST:PORT");
    assert!(addr.ip().is_loopback(), "pc-pgwire only talks to loopback");
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut c = Conn {
        s,
        buf: BytesMut::new(),
    };
    let mut script = String::new();
    std::io::stdin()
        .read_to_string(&mut script)
        .expect("script");
    // Raw prelude before startup, for garbage tests.
    let mut lines = script.lines().peekable();
    if let Some(first) = lines.peek()
        && let Some(h) = first.strip_prefix("PRESTARTUP ")
    {
        let _ = c.s.write_all(&unhex(h));
        lines.next();
        let mut rest = Vec::new();
        let _ = c.s.read_to_end(&mut rest);
        println!("{}", json!({"prestartup_reply_hex": hex(&rest)}));
        return;
    }
    let startup = Startup::Startup {
        version: PROTOCOL_3_0,
        params: vec![
            ("user".into(), a[1].clone()),
            ("database".into(), a[3].clone()),
        ],
    };
    let _ = c.s.write_all(&startup.encode());
    // Authenticate (SCRAM, MD5 or cleartext), then wait for the first ReadyForQuery.
    let mut scram: Option<Scram> = None;
    loop {
        let Some(f) = c.read() else {
            println!("{}", json!({"startup": "connection closed"}));
            return;
        };
        match f.tag {
            be::AUTHENTICATION => {
                let (code, data) = messages::auth_code(&f.body).expect("auth");
                match code {
                    auth_codes::OK => {}
                    auth_codes::SASL => {
                        let s = Scram::new(&a[2]);
                        c.send(&s.initial());
                        scram = Some(s);
                    }
                    auth_codes::SASL_CONTINUE => {
                        let r = scram.as_mut().expect("scram").respond(data).expect("scram");
                        c.send(&r);
                    }
                    auth_codes::SASL_FINAL => {}
                    auth_codes::CLEARTEXT => c.send(
                        &portcullis::protocol::postgres::auth::password_message(&a[2]),
                    ),
                    other => panic!("auth {other}"),
                }
            }
            be::ERROR_RESPONSE => {
                println!("{}", describe(&f));
                return;
            }
            be::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    let mut digest: Option<(Sha256, u64)> = None;
    let print = |f: &Frame, digest: &mut Option<(Sha256, u64)>| {
        if f.tag == be::DATA_ROW
            && let Some((h, n)) = digest.as_mut()
        {
            h.update(&f.body);
            *n += 1;
            return;
        }
        println!("{}", describe(f));
    };
    for line in lines {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.replace("\\n", "\n");
        let mut b = BytesMut::new();
        let frame = match cmd {
            "Q" => Some(messages::query(&rest)),
            "P" => {
                let (name, sql) = rest.split_once(' ').unwrap_or(("", &rest));
                let name = if name == "-" { "" } else { name };
                Some(
                    messages::Parse {
                        name: name.into(),
                        sql: sql.into(),
                        param_types: vec![],
                    }
                    .encode(),
                )
            }
            "B" => {
                let p: Vec<&str> = rest.split(' ').collect();
                let dash = |s: &str| {
                    if s == "-" {
                        String::new()
                    } else {
                        s.to_owned()
                    }
                };
                put_cstr(&mut b, &dash(p[0]));
                put_cstr(&mut b, &dash(p[1]));
                b.put_i16(0);
                b.put_i16(0);
                match p.get(2) {
                    Some(fmt) => {
                        b.put_i16(1);
                        b.put_i16(fmt.parse().expect("format"));
                    }
                    None => b.put_i16(0),
                }
                Some(Frame::new(fe::BIND, b.freeze()))
            }
            // `BP portal statement value...`: text parameters (no spaces; `\N` is NULL),
            // text results.
            "BP" => {
                let p: Vec<&str> = rest.split(' ').collect();
                for name in &p[..2] {
                    put_cstr(&mut b, if *name == "-" { "" } else { name });
                }
                b.put_i16(0);
                b.put_i16((p.len() - 2) as i16);
                for v in &p[2..] {
                    if *v == "\\N" {
                        b.put_i32(-1);
                    } else {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v.as_bytes());
                    }
                }
                b.put_i16(0);
                Some(Frame::new(fe::BIND, b.freeze()))
            }
            "D" | "C" => {
                let (kind, name) = rest.split_once(' ').unwrap_or((&rest, ""));
                b.put_u8(kind.as_bytes()[0]);
                put_cstr(&mut b, if name == "-" { "" } else { name });
                Some(Frame::new(
                    if cmd == "D" { fe::DESCRIBE } else { fe::CLOSE },
                    b.freeze(),
                ))
            }
            "E" => {
                let (portal, max) = rest.split_once(' ').unwrap_or((&rest, "0"));
                put_cstr(&mut b, if portal == "-" { "" } else { portal });
                b.put_i32(max.parse().expect("maxrows"));
                Some(Frame::new(fe::EXECUTE, b.freeze()))
            }
            "S" => Some(Frame::new(fe::SYNC, bytes::Bytes::new())),
            "H" => Some(Frame::new(fe::FLUSH, bytes::Bytes::new())),
            "F" => {
                b.put_i32(rest.parse().expect("oid"));
                b.put_i16(0);
                b.put_i16(0);
                b.put_i16(0);
                Some(Frame::new(fe::FUNCTION_CALL, b.freeze()))
            }
            "d" => Some(Frame::new(
                fe::COPY_DATA,
                bytes::Bytes::from(rest.clone().into_bytes()),
            )),
            "c" => Some(Frame::new(fe::COPY_DONE, bytes::Bytes::new())),
            "X" => Some(Frame::new(fe::TERMINATE, bytes::Bytes::new())),
            "RAW" => {
                let _ = c.s.write_all(&unhex(&rest));
                None
            }
            "READ_TO_END" => {
                // Until the server side closes (at most 10 s).
                c.s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                while let Some(f) = c.read() {
                    print(&f, &mut digest);
                }
                None
            }
            "DIGEST" => {
                digest = Some((Sha256::new(), 0));
                None
            }
            "UNTIL" => {
                println!("{}", json!({ "until": rest }));
                let _ = std::io::Write::flush(&mut std::io::stdout());
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !std::path::Path::new(&rest).exists() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{rest} never appeared"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            }
            "WAIT" => {
                let n: usize = rest.parse().expect("count");
                let mut seen = 0;
                while seen < n {
                    let Some(f) = c.read() else {
                        println!("{}", json!({"closed": true}));
                        break;
                    };
                    if f.tag == be::READY_FOR_QUERY {
                        seen += 1;
                    }
                    print(&f, &mut digest);
                }
                None
            }
            "" => None,
            other => panic!("unknown script command {other}"),
        };
        if let Some(f) = frame {
            c.send(&f);
        }
    }
    // Whatever else arrives before the server closes or goes quiet.
    c.s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    while let Some(f) = c.read() {
        print(&f, &mut digest);
    }
    if let Some((h, n)) = digest {
        println!(
            "{}",
            json!({"data_rows": n, "sha256": format!("{:x}", h.finalize())})
        );
    }
    let _ = std::io::stdout().lock().flush();
    let _ = std::io::BufReader::new(std::io::empty()).lines();
}
