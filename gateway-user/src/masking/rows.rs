//! Applying a [`ResultPlan`] to the bytes of a result: DataRow bodies, and COPY TO STDOUT
//! data in text and CSV format. One row at a time, into a buffer the caller reuses: memory
//! does not grow with the size of the result.
//!
//! Pure: bytes in, bytes out.

use std::borrow::Cow;

use super::{
    plan::{ColumnPlan, ResultPlan},
    value::Masker,
};
use crate::policy::sql::lineage::CopyFormat;

/// A row that does not fit its description: the session cannot be trusted to be in step.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("result row does not match its description: {0}")]
pub struct RowError(pub String);

/// What one value becomes: `None` = unchanged, `Some(None)` = NULL, `Some(Some(v))`. A
/// column whose replacement does not depend on the value lends its precomputed one.
fn mask_value<'p>(
    plan: &ResultPlan,
    col: &'p ColumnPlan,
    masker: &Masker,
    value: &[u8],
) -> Option<Option<Cow<'p, [u8]>>> {
    if let Some((strategy, label)) = &col.whole {
        crate::metrics::get().masked_by_column.inc();
        return Some(match &col.fixed {
            Some(fixed) => fixed.as_deref().map(Cow::Borrowed),
            None => masker
                .whole(strategy, label, col.class, col.binary, value)
                .map(Cow::Owned),
        });
    }
    let d = plan.detection.as_ref()?;
    masker
        .detect(d, &plan.types, col.class, col.binary, value)
        .map(|v| v.map(Cow::Owned))
}

/// Rewrites a DataRow body (column count, then length-prefixed values) into `out`.
pub fn mask_data_row(
    plan: &ResultPlan,
    masker: &Masker,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RowError> {
    out.clear();
    let n = body
        .get(..2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| RowError("truncated column count".into()))?;
    if n < 0 || n as usize != plan.columns.len() {
        return Err(RowError(format!(
            "{n} columns, {} described",
            plan.columns.len()
        )));
    }
    out.extend_from_slice(&body[..2]);
    let mut at = 2;
    for col in &plan.columns {
        let len = body
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| RowError("truncated value length".into()))?;
        at += 4;
        if len < 0 {
            put_value(out, None)?;
            continue;
        }
        let value = body
            .get(at..at + len as usize)
            .ok_or_else(|| RowError("truncated value".into()))?;
        at += len as usize;
        match mask_value(plan, col, masker, value) {
            None => put_value(out, Some(value))?,
            Some(v) => put_value(out, v.as_deref())?,
        }
    }
    if at != body.len() {
        return Err(RowError("bytes after the last column".into()));
    }
    Ok(())
}

/// A value with its length prefix; `None` is SQL NULL (length -1).
fn put_value(out: &mut Vec<u8>, v: Option<&[u8]>) -> Result<(), RowError> {
    match v {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            let l = i32::try_from(v.len()).map_err(|_| RowError("value too long".into()))?;
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    Ok(())
}

/// COPY TO STDOUT in text or CSV format, masked line by line. The server sends one row per
/// CopyData; a row split across messages is still handled (the tail is carried over).
pub struct CopyMasker {
    plan: ResultPlan,
    format: CopyFormat,
    header_pending: bool,
    carry: Vec<u8>,
}

/// Longest row carried across CopyData messages before the copy is refused.
pub const MAX_COPY_ROW: usize = 64 << 20;

impl CopyMasker {
    pub fn new(plan: ResultPlan, format: CopyFormat) -> Result<Self, RowError> {
        if !format.delimiter.is_ascii() || !format.quote.is_ascii() || !format.escape.is_ascii() {
            return Err(RowError("non-ASCII COPY delimiter, quote or escape".into()));
        }
        Ok(Self {
            header_pending: format.header && format.csv,
            plan,
            format,
            carry: Vec::new(),
        })
    }

    /// Masks the complete rows in `data`; what is left of a row waits for the next call.
    pub fn feed(
        &mut self,
        masker: &Masker,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RowError> {
        out.clear();
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = self.row_end(&buf[start..]) {
            let row = &buf[start..start + end];
            if self.header_pending {
                self.header_pending = false;
                out.extend_from_slice(row);
                out.push(b'\n');
            } else if self.format.csv {
                self.csv_row(masker, row, out)?;
            } else {
                self.text_row(masker, row, out)?;
            }
            start += end + 1;
        }
        if buf.len() - start > MAX_COPY_ROW {
            return Err(RowError("a COPY row longer than 64 MiB".into()));
        }
        buf.drain(..start);
        self.carry = buf;
        Ok(())
    }

    /// Whether the copy ended on a row boundary.
    pub fn finish(&self) -> Result<(), RowError> {
        if self.carry.is_empty() {
            Ok(())
        } else {
            Err(RowError("COPY data ended inside a row".into()))
        }
    }

    /// The end of the first complete row (its `\n`), honouring CSV quotes.
    fn row_end(&self, b: &[u8]) -> Option<usize> {
        if !self.format.csv {
            return memchr(b'\n', b);
        }
        let (q, e) = (self.format.quote as u8, self.format.escape as u8);
        let mut quoted = false;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if quoted {
                if c == e && e != q && b.get(i + 1) == Some(&q) {
                    i += 2;
                    continue;
                }
                if c == q {
                    if e == q && b.get(i + 1) == Some(&q) {
                        i += 2;
                        continue;
                    }
                    quoted = false;
                }
            } else if c == q {
                quoted = true;
            } else if c == b'\n' {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn text_row(&self, masker: &Masker, row: &[u8], out: &mut Vec<u8>) -> Result<(), RowError> {
        let d = self.format.delimiter as u8;
        let fields: Vec<&[u8]> = row.split(|&c| c == d).collect();
        self.check_width(fields.len())?;
        for (k, (raw, col)) in fields.iter().zip(&self.plan.columns).enumerate() {
            if k > 0 {
                out.push(d);
            }
            if *raw == self.format.null.as_bytes() {
                out.extend_from_slice(raw);
                continue;
            }
            let value = text_unescape(raw);
            match mask_value(&self.plan, col, masker, &value) {
                None => out.extend_from_slice(raw),
                Some(None) => out.extend_from_slice(self.format.null.as_bytes()),
                Some(Some(v)) => text_escape(&v, d, out),
            }
        }
        out.push(b'\n');
        Ok(())
    }

    fn csv_row(&self, masker: &Masker, row: &[u8], out: &mut Vec<u8>) -> Result<(), RowError> {
        let f = &self.format;
        let (d, q, e) = (f.delimiter as u8, f.quote as u8, f.escape as u8);
        let fields = csv_split(row, d, q, e)?;
        self.check_width(fields.len())?;
        for (k, ((value, quoted), col)) in fields.iter().zip(&self.plan.columns).enumerate() {
            if k > 0 {
                out.push(d);
            }
            // Unquoted text equal to the NULL string is NULL.
            if !quoted && value.as_slice() == f.null.as_bytes() {
                out.extend_from_slice(value);
                continue;
            }
            match mask_value(&self.plan, col, masker, value) {
                None => csv_write(value, *quoted, d, q, e, f.null.as_bytes(), out),
                Some(None) => out.extend_from_slice(f.null.as_bytes()),
                Some(Some(v)) => csv_write(&v, false, d, q, e, f.null.as_bytes(), out),
            }
        }
        out.push(b'\n');
        Ok(())
    }

    fn check_width(&self, n: usize) -> Result<(), RowError> {
        if n == self.plan.columns.len() {
            Ok(())
        } else {
            Err(RowError(format!(
                "COPY row with {n} fields, {} expected",
                self.plan.columns.len()
            )))
        }
    }
}

fn memchr(c: u8, b: &[u8]) -> Option<usize> {
    b.iter().position(|&x| x == c)
}

/// COPY text format: backslash escapes to bytes.
fn text_unescape(raw: &[u8]) -> Vec<u8> {
    if !raw.contains(&b'\\') {
        return raw.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c != b'\\' || i + 1 == raw.len() {
            out.push(c);
            i += 1;
            continue;
        }
        let n = raw[i + 1];
        i += 2;
        match n {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(n - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'x' => {
                let mut v = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match raw.get(i).and_then(|c| (*c as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(v as u8);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// COPY text format: bytes to their escaped form.
fn text_escape(v: &[u8], delimiter: u8, out: &mut Vec<u8>) {
    for &c in v {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' if delimiter == b'\t' => out.extend_from_slice(b"\\t"),
            c if c == delimiter => {
                out.push(b'\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

/// CSV fields with their unquoted values, and whether each was quoted.
fn csv_split(row: &[u8], d: u8, q: u8, e: u8) -> Result<Vec<(Vec<u8>, bool)>, RowError> {
    let mut fields = Vec::new();
    let mut cur = Vec::new();
    let mut quoted_field = false;
    let mut in_quotes = false;
    let mut i = 0;
    while i < row.len() {
        let c = row[i];
        if in_quotes {
            // An escaped quote (doubled, by default), or an escaped escape.
            if c == e && (row.get(i + 1) == Some(&q) || (e != q && row.get(i + 1) == Some(&e))) {
                cur.push(row[i + 1]);
                i += 2;
                continue;
            }
            if c == q {
                in_quotes = false;
            } else {
                cur.push(c);
            }
        } else if c == q {
            in_quotes = true;
            quoted_field = true;
        } else if c == d {
            fields.push((std::mem::take(&mut cur), quoted_field));
            quoted_field = false;
        } else {
            cur.push(c);
        }
        i += 1;
    }
    if in_quotes {
        return Err(RowError("unterminated CSV quote".into()));
    }
    fields.push((cur, quoted_field));
    Ok(fields)
}

fn csv_write(v: &[u8], was_quoted: bool, d: u8, q: u8, e: u8, null: &[u8], out: &mut Vec<u8>) {
    let needs = was_quoted
        || v == null
        || v.iter()
            .any(|&c| c == d || c == q || c == e || c == b'\n' || c == b'\r');
    if !needs {
        out.extend_from_slice(v);
        return;
    }
    out.push(q);
    for &c in v {
        if c == q || c == e {
            out.push(e);
        }
        out.push(c);
    }
    out.push(q);
}

/// A notification's payload under the masks of the session's `LISTEN`s. It is not a
/// result of any statement, so a column rule cannot tell where it comes from: the payload
/// is masked whole (whatever the rule's `unresolved`: a notification cannot be refused,
/// only withheld); detectors mask what they find. `None`: unchanged.
pub fn mask_payload(
    masks: &[std::sync::Arc<crate::policy::model::MaskSpec>],
    masker: &Masker,
    payload: &str,
) -> Option<String> {
    if let Some(m) = masks.iter().find(|m| !m.columns.is_empty()) {
        crate::metrics::get().masked_by_column.inc();
        return Some(
            masker
                .replace(&m.strategy, "notification", payload)
                .unwrap_or_default(),
        );
    }
    let detection = super::plan::detection(masks)?;
    match masker.detect(
        &detection,
        &super::types::Types::default(),
        super::value::TypeClass::Text,
        false,
        payload.as_bytes(),
    )? {
        // A NULL has no place in a notification: the payload goes.
        None => Some(String::new()),
        Some(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        masking::{
            plan::{ColumnPlan, Detection},
            value::TypeClass,
        },
        policy::model::Strategy,
    };

    fn masker() -> Masker {
        Masker::new([1u8; 32])
    }

    fn col(class: TypeClass, binary: bool, whole: Option<Strategy>) -> ColumnPlan {
        ColumnPlan::new(class, binary, whole.map(|s| (s, Arc::from("email"))))
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    fn redact() -> Option<Strategy> {
        Some(Strategy::Redact { text: None })
    }

    #[test]
    fn data_rows_keep_lengths_valid() {
        let plan = ResultPlan {
            columns: vec![
                col(TypeClass::Opaque, true, None),
                col(TypeClass::Text, false, redact()),
                col(TypeClass::Opaque, false, redact()),
                col(TypeClass::Text, false, None),
            ],
            detection: Some(Arc::new(Detection {
                detectors: vec![("email".into(), Strategy::Redact { text: None })],
            })),
            types: Default::default(),
        };
        let mut out = Vec::new();
        let body = row(&[
            Some(&[0, 0, 0, 7]),
            Some(b"a@b.co"),
            Some(b"42"),
            Some(b"x carol@example.org"),
        ]);
        mask_data_row(&plan, &masker(), &body, &mut out).expect("in test");
        assert_eq!(
            out,
            row(&[
                Some(&[0, 0, 0, 7]),
                Some(b"[REDACTED:email]"),
                None,
                Some(b"x [REDACTED:email]")
            ])
        );
        // NULLs stay NULL.
        let body = row(&[None, None, None, None]);
        mask_data_row(&plan, &masker(), &body, &mut out).expect("in test");
        assert_eq!(out, body);
    }

    #[test]
    fn malformed_rows_are_errors() {
        let plan = ResultPlan {
            columns: vec![col(TypeClass::Text, false, redact())],
            detection: None,
            types: Default::default(),
        };
        let mut out = Vec::new();
        for bad in [
            vec![0u8],
            row(&[Some(b"a"), Some(b"b")]),
            vec![0, 1, 0, 0, 0, 9, b'a'],
            vec![0, 1, 0, 0, 0, 1, b'a', b'z'],
        ] {
            assert!(
                mask_data_row(&plan, &masker(), &bad, &mut out).is_err(),
                "{bad:?}"
            );
        }
    }

    fn copy(csv: bool, header: bool) -> CopyMasker {
        CopyMasker::new(
            ResultPlan {
                columns: vec![
                    col(TypeClass::Text, false, None),
                    col(TypeClass::Text, false, redact()),
                ],
                detection: Some(Arc::new(Detection {
                    detectors: vec![("email".into(), Strategy::Redact { text: None })],
                })),
                types: Default::default(),
            },
            CopyFormat {
                csv,
                delimiter: if csv { ',' } else { '\t' },
                null: if csv { String::new() } else { "\\N".into() },
                quote: '"',
                escape: '"',
                header,
            },
        )
        .expect("in test")
    }

    #[test]
    fn copy_text_rows() {
        let mut c = copy(false, false);
        let mut out = Vec::new();
        c.feed(&masker(), b"1\ta@b.co\n2\t\\N\n", &mut out)
            .expect("in test");
        assert_eq!(out, b"1\t[REDACTED:email]\n2\t\\N\n");
        // Escapes are decoded before detection and kept elsewhere.
        c.feed(&masker(), b"x\\tcarol@example.org\\n\tq\n", &mut out)
            .expect("in test");
        assert_eq!(out, b"x\\t[REDACTED:email]\\n\t[REDACTED:email]\n");
        // A row split across messages.
        c.feed(&masker(), b"3\tdan", &mut out).expect("in test");
        assert!(out.is_empty());
        assert!(c.finish().is_err());
        c.feed(&masker(), b"@example.org\n", &mut out)
            .expect("in test");
        assert_eq!(out, b"3\t[REDACTED:email]\n");
        c.finish().expect("in test");
        assert!(c.feed(&masker(), b"only-one-field\n", &mut out).is_err());
    }

    #[test]
    fn copy_csv_rows() {
        let mut c = copy(true, true);
        let mut out = Vec::new();
        c.feed(&masker(), b"id,email\n", &mut out).expect("in test");
        assert_eq!(out, b"id,email\n", "header passes");
        c.feed(
            &masker(),
            b"1,a@b.co\n\"x, carol@example.org\",\n",
            &mut out,
        )
        .expect("in test");
        assert_eq!(out, b"1,[REDACTED:email]\n\"x, [REDACTED:email]\",\n");
        // A quoted field with a newline and doubled quotes stays one row.
        c.feed(&masker(), b"\"a\"\"b\nc\",\"\"\n", &mut out)
            .expect("in test");
        assert_eq!(out, b"\"a\"\"b\nc\",[REDACTED:email]\n");
    }

    #[test]
    fn notification_payloads_are_masked_by_detectors_or_whole() {
        use std::sync::Arc;

        use crate::policy::model::{MaskSpec, Strategy, Unresolved};
        let spec = |columns: &[&str], detectors: &[&str]| {
            Arc::new(MaskSpec {
                rule: "r".into(),
                columns: columns.iter().map(|c| (*c).into()).collect(),
                detectors: detectors.iter().map(|d| (*d).into()).collect(),
                strategy: Strategy::Redact { text: None },
                unresolved: Unresolved::MaskAll,
            })
        };
        let m = masker();
        let detectors = [spec(&[], &["email"])];
        assert_eq!(
            mask_payload(&detectors, &m, "new user alice@example.com").as_deref(),
            Some("new user [REDACTED:email]")
        );
        assert_eq!(mask_payload(&detectors, &m, "job 42 done"), None);
        let columns = [spec(&["*.email"], &[])];
        assert_eq!(
            mask_payload(&columns, &m, "job 42 done").as_deref(),
            Some("[REDACTED:notification]")
        );
        assert_eq!(mask_payload(&[], &m, "alice@example.com"), None);
    }
}
