//! The JSON log line: `{"timestamp":…,"level":…,<the event's fields>,"target":…}`, the
//! shape `tracing-subscriber`'s JSON format gives with flattened fields and no spans (the
//! daemon has none), written straight into the line buffer.
//!
//! Why not that format itself: it goes through `serde_json` over an `io::Write` adapter, so
//! every field is checked for UTF-8 again, the timestamp is formatted into a string of its
//! own and then escaped, and each value is escaped through another adapter. One such line
//! per connection and per statement made it a visible share of the daemon's CPU. Values are
//! written as that format writes them: 64-bit integers and booleans as JSON numbers and
//! booleans, floats as numbers (shortest round-trip form, by `zmij` as `serde_json` does;
//! `null` when not finite), everything else (strings, 128-bit integers, `%` and `?` fields,
//! errors) as escaped strings. The unit tests compare the two formats' lines byte for byte.

use std::fmt::{self, Write as _};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// The formatter (see the module documentation).
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        w.write_str("{\"timestamp\":\"")?;
        rfc3339_micros(&mut w, std::time::SystemTime::now())?;
        write!(w, "\",\"level\":\"{}\"", event.metadata().level())?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        string(&mut w, event.metadata().target())?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.w.write_char(',')?;
                string(self.w, field.name())?;
                self.w.write_char(':')?;
                value(self.w)
            })();
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |w| {
            if value.is_finite() {
                w.write_str(zmij::Buffer::new().format_finite(value))
            } else {
                w.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| write!(w, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| string(w, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.entry(field, |w| quoted(w, format_args!("{value}")));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| quoted(w, format_args!("{value:?}")));
    }
}

/// `s` as a JSON string.
fn string(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// Formatted text as a JSON string, escaped as it is produced.
fn quoted(w: &mut impl fmt::Write, args: fmt::Arguments<'_>) -> fmt::Result {
    w.write_char('"')?;
    Escaped(&mut *w).write_fmt(args)?;
    w.write_char('"')
}

/// Escapes what passes through as JSON string content: `"`, `\` and control characters,
/// nothing else (as `serde_json` does).
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut plain = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Everything before `i` is ASCII-delimited: `s[plain..i]` is on char boundaries.
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// `2026-11-26T19:39:00.894973Z`.
fn rfc3339_micros(w: &mut impl fmt::Write, t: std::time::SystemTime) -> fmt::Result {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = crate::utc::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    write!(
        w,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::{fmt::MakeWriter, prelude::*};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Odd {
        _text: &'static str,
    }

    /// The events the daemon writes, in every kind of field, with text that needs escaping.
    fn emit() {
        let err = std::io::Error::other("disk \"full\"\n");
        let cmdline = vec!["psql".to_string(), "-c".into(), "select '\t\u{1}é'".into()];
        let addr: std::net::SocketAddr = "[::1]:5432".parse().expect("addr");
        tracing::info!(
            target: "portcullis::audit",
            protocol = "postgres",
            conn.id = 42u64,
            delta = -7i64,
            big = u128::MAX,
            small = i128::MIN,
            ok = true,
            duration_ms = 0.208_209_f64,
            whole = 3.0_f64,
            inf = f64::INFINITY,
            src.cmdline = ?cmdline,
            client.addr = %addr,
            odd = ?Odd { _text: "a\\b" },
            error = &err as &(dyn std::error::Error + 'static),
            statement = "SELECT \"x\" FROM t WHERE a = '\r\n\u{7f}\u{2028}'",
            "decision"
        );
        tracing::warn!("plain message with {} and {:?}", "args", "quotes\"");
        tracing::error!(empty = "", "");
    }

    fn lines(layer_json: bool) -> Vec<String> {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer().with_writer(buf.clone());
        if layer_json {
            let sub = tracing_subscriber::registry().with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            );
            tracing::subscriber::with_default(sub, emit);
        } else {
            let sub = tracing_subscriber::registry().with(layer.event_format(JsonLine));
            tracing::subscriber::with_default(sub, emit);
        }
        let text = String::from_utf8(buf.0.lock().expect("buf").clone()).expect("utf8");
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn lines_are_the_tracing_json_format_byte_for_byte() {
        let (ours, theirs) = (lines(false), lines(true));
        assert_eq!(ours.len(), 3);
        assert_eq!(ours.len(), theirs.len());
        let without_time = |l: &str| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let ts = v["timestamp"].as_str().expect("timestamp").to_owned();
            assert_eq!(ts.len(), "2026-11-26T19:39:00.894973Z".len(), "{ts}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
            l.replacen(&ts, "", 1)
        };
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(without_time(o), without_time(t));
        }
    }

    #[test]
    fn timestamps_are_utc_rfc3339_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(secs)
                + std::time::Duration::from_micros(u64::from(micros));
            rfc3339_micros(&mut s, t).expect("format");
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_795_721_940, 894_973), "2026-11-26T19:39:00.894973Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }
}
