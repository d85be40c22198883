//! Server errors and notices that could carry what a mask hides. A statement whose result
//! is masked can still make the server quote a value in an error (`SELECT email::int`:
//! `invalid input syntax for type integer: "alice@example.com"`; a unique or check
//! violation's DETAIL lists the row) or have a function print one (`RAISE NOTICE`). While
//! such a statement runs, the engine relays an error only when every quoted or
//! parenthesised piece of its text already appears in what the client sent (the
//! statement, and the text parameters of its Bind: so it names the client's own
//! identifiers, literals and values: `column "emial" does not exist` passes); otherwise, and for notices and the classes whose text is free-form (raised by
//! functions or the server's internals), it sends the same error with its text withheld:
//! severity, SQLSTATE, position and the names of the schema, table, column, type and
//! constraint stay. Pure: no I/O.

use bytes::{BufMut as _, BytesMut};

use super::{
    codec::{Frame, put_cstr},
    messages::{self, be},
};

/// SQLSTATE classes whose message is text a function or the server made up, not a
/// template around the client's names: PL/pgSQL `RAISE` (P0), external routines (38, 39),
/// SQL routines (2F), internal errors (XX).
const FREE_FORM: [&str; 5] = ["P0", "38", "39", "2F", "XX"];

/// Fields whose text may quote values.
const TEXT: [u8; 4] = [b'M', b'D', b'H', b'W'];

/// Fields kept when the text is withheld: severity (localized and not), SQLSTATE, position,
/// schema, table, column, data type and constraint names, and the server's source
/// location.
const KEPT: [u8; 12] = [
    b'S', b'V', b'C', b'P', b's', b't', b'c', b'd', b'n', b'F', b'L', b'R',
];

/// What the text of a field quotes: the pieces between double quotes and between
/// parentheses (innermost).
fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('"') {
        let after = &rest[i + 1..];
        let Some(j) = after.find('"') else {
            // An unclosed quote: the remainder is the piece.
            out.push(after);
            break;
        };
        out.push(&after[..j]);
        rest = &after[j + 1..];
    }
    let mut open = None;
    for (i, ch) in text.char_indices() {
        match ch {
            '(' => open = Some(i + 1),
            ')' => {
                if let Some(o) = open.take() {
                    out.push(&text[o..i]);
                }
            }
            _ => {}
        }
    }
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The names the server puts in fields of their own (schema, table, column, data type,
/// constraint): catalog names, not values, wherever the text quotes them.
const NAMES: [u8; 5] = [b's', b't', b'c', b'd', b'n'];

fn code_of(fields: &[(u8, String)]) -> &str {
    fields
        .iter()
        .find(|(k, _)| *k == b'C')
        .map_or("", |(_, v)| v.as_str())
}

/// Whether the text of field `k` quotes only what the client wrote (`sql`, lower case) or
/// catalog names.
fn field_known(k: u8, text: &str, code: &str, sql: &str, names: &[&str]) -> bool {
    // A syntax or access error's hint suggests catalog names ("Perhaps you meant to
    // reference the column \"people.email\"."), not values.
    if k == b'H' && code.starts_with("42") {
        return true;
    }
    pieces(text)
        .iter()
        .all(|p| names.contains(p) || sql.contains(&p.to_lowercase()))
}

/// The codes of the text fields that may quote a masked value; `None` when all text goes
/// (a notice, or a class whose text is free-form).
fn unknown_text(tag: u8, fields: &[(u8, String)], sql: &str) -> Option<Vec<u8>> {
    let code = code_of(fields);
    if tag != be::ERROR_RESPONSE || FREE_FORM.iter().any(|c| code.starts_with(c)) {
        return None;
    }
    let sql = sql.to_lowercase();
    let names = names_in(fields);
    Some(
        fields
            .iter()
            .filter(|(k, v)| TEXT.contains(k) && !field_known(*k, v, code, &sql, &names))
            .map(|(k, _)| *k)
            .collect(),
    )
}

/// Whether an error or notice raised while a masked statement ran may reach the client
/// as it is.
pub fn may_relay(tag: u8, fields: &[(u8, String)], sql: &str) -> bool {
    unknown_text(tag, fields, sql).is_some_and(|u| u.is_empty())
}

fn names_in(fields: &[(u8, String)]) -> Vec<&str> {
    fields
        .iter()
        .filter(|(k, _)| NAMES.contains(k))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn generic(tag: u8, code: &str) -> String {
    let what = if tag == be::ERROR_RESPONSE {
        "error"
    } else {
        "notice"
    };
    format!(
        "portcullis: the server's {what} text (SQLSTATE {code}) was withheld: the \
         statement's results are masked, and the text may quote a masked value"
    )
}

fn put_field(b: &mut BytesMut, k: u8, v: &str) {
    b.put_u8(k);
    put_cstr(b, v);
}

/// The error or notice with all its text withheld.
pub fn withheld(tag: u8, fields: &[(u8, String)]) -> Frame {
    let mut b = BytesMut::new();
    for (k, v) in fields.iter().filter(|(k, _)| KEPT.contains(k)) {
        put_field(&mut b, *k, v);
    }
    put_field(&mut b, b'M', &generic(tag, code_of(fields)));
    b.put_u8(0);
    Frame::new(tag, b.freeze())
}

/// The error with the `unknown` text fields withheld: the message replaced, a detail,
/// hint or context left out.
fn partly_withheld(fields: &[(u8, String)], unknown: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    let mut left_out = false;
    for (k, v) in fields {
        if !unknown.contains(k) {
            if TEXT.contains(k) || KEPT.contains(k) {
                put_field(&mut b, *k, v);
            }
        } else if *k == b'M' {
            put_field(&mut b, b'M', &generic(be::ERROR_RESPONSE, code_of(fields)));
        } else {
            left_out = true;
        }
    }
    if left_out {
        put_field(
            &mut b,
            b'D',
            "portcullis: the server's detail was withheld: the statement's results are \
             masked, and it may quote a masked value",
        );
    }
    b.put_u8(0);
    Frame::new(be::ERROR_RESPONSE, b.freeze())
}

/// `f` as the client may see it while a masked statement `sql` runs.
pub fn relay(f: Frame, sql: &str) -> Frame {
    let Ok(fields) = messages::error_fields(&f.body) else {
        // Unreadable: nothing of it is relayed.
        return withheld(f.tag, &[]);
    };
    match unknown_text(f.tag, &fields, sql) {
        None => withheld(f.tag, &fields),
        Some(unknown) if unknown.is_empty() => f,
        Some(unknown) => partly_withheld(&fields, &unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(code: &str, message: &str, detail: Option<&str>) -> Vec<(u8, String)> {
        let mut v = vec![
            (b'S', "ERROR".to_owned()),
            (b'C', code.to_owned()),
            (b'M', message.to_owned()),
        ];
        if let Some(d) = detail {
            v.push((b'D', d.to_owned()));
        }
        v
    }

    #[test]
    fn quoted_and_parenthesised_pieces() {
        assert_eq!(
            pieces(r#"invalid input syntax for type integer: "alice@example.com""#),
            ["alice@example.com"]
        );
        assert_eq!(
            pieces("Key (email)=(bob@example.com) already exists."),
            ["email", "bob@example.com"]
        );
        assert_eq!(pieces(r#"unclosed "rest of it"#), ["rest of it"]);
        assert!(pieces("division by zero").is_empty());
    }

    #[test]
    fn errors_that_quote_only_what_the_client_sent_pass() {
        let sql = r#"SELECT emial FROM "People" WHERE id = 'x1'"#;
        let e = be::ERROR_RESPONSE;
        assert!(may_relay(
            e,
            &fields("42703", r#"column "emial" does not exist"#, None),
            sql
        ));
        assert!(may_relay(
            e,
            &fields("42P01", r#"relation "people" does not exist"#, None),
            sql
        ));
        assert!(may_relay(
            e,
            &fields(
                "22P02",
                r#"invalid input syntax for type integer: "x1""#,
                None
            ),
            sql
        ));
        assert!(may_relay(
            e,
            &fields("22012", "division by zero", None),
            sql
        ));
    }

    #[test]
    fn the_hint_of_a_mistyped_column_names_the_catalogs_column() {
        let mut typo = fields("42703", r#"column "emial" does not exist"#, None);
        typo.push((
            b'H',
            r#"Perhaps you meant to reference the column "people.email"."#.into(),
        ));
        assert!(may_relay(
            be::ERROR_RESPONSE,
            &typo,
            "SELECT emial FROM people"
        ));
        // Elsewhere a hint is text like any other.
        typo[1].1 = "22P02".into();
        assert!(!may_relay(
            be::ERROR_RESPONSE,
            &typo,
            "SELECT emial FROM people"
        ));
    }

    #[test]
    fn errors_that_quote_data_notices_and_free_form_classes_are_withheld() {
        let sql = "SELECT email::int FROM people";
        let e = be::ERROR_RESPONSE;
        let cast = fields(
            "22P02",
            r#"invalid input syntax for type integer: "alice@example.com""#,
            None,
        );
        assert!(!may_relay(e, &cast, sql));
        let unique = fields(
            "23505",
            r#"duplicate key value violates unique constraint "people_email_key""#,
            Some("Key (email)=(alice@example.com) already exists."),
        );
        assert!(!may_relay(
            e,
            &unique,
            "UPDATE people SET email = lower(email)"
        ));
        // A regclass cast names a value as a relation.
        let reg = fields(
            "42P01",
            r#"relation "alice@example.com" does not exist"#,
            None,
        );
        assert!(!may_relay(e, &reg, "SELECT email::regclass FROM people"));
        // RAISE text is free-form, quoted or not.
        assert!(!may_relay(
            e,
            &fields("P0001", "alice@example.com", None),
            sql
        ));
        assert!(!may_relay(
            be::NOTICE_RESPONSE,
            &fields("00000", "hello", None),
            sql
        ));

        let mut with_names = unique.clone();
        with_names.push((b'n', "people_email_key".into()));
        with_names.push((b'W', "SQL statement \"...\"".into()));
        let f = withheld(e, &with_names);
        let got = messages::error_fields(&f.body).expect("well formed");
        let text: String = got.iter().map(|(_, v)| v.as_str()).collect();
        assert!(!text.contains("alice"), "{got:?}");
        let keys: Vec<u8> = got.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [b'S', b'C', b'n', b'M'], "{got:?}");
        assert!(text.contains("SQLSTATE 23505"), "{got:?}");
    }

    #[test]
    fn a_message_naming_only_catalog_names_stays_while_a_detail_with_data_goes() {
        let mut unique = fields(
            "23505",
            r#"duplicate key value violates unique constraint "people_email_key""#,
            Some("Key (email)=(alice@example.com) already exists."),
        );
        unique.push((b'n', "people_email_key".into()));
        let body = relay(
            Frame::new(be::ERROR_RESPONSE, encode(&unique)),
            "UPDATE people SET email = lower(email)",
        );
        let got = messages::error_fields(&body.body).expect("well formed");
        let get = |k: u8| got.iter().find(|(c, _)| *c == k).map(|(_, v)| v.as_str());
        assert_eq!(get(b'M'), Some(unique[2].1.as_str()), "{got:?}");
        assert!(get(b'D').is_some_and(|d| d.contains("withheld") && !d.contains("alice")));
        assert_eq!(get(b'n'), Some("people_email_key"));
        // A not-null violation names the table and column in fields of their own.
        let mut not_null = fields(
            "23502",
            r#"null value in column "email" of relation "people" violates not-null constraint"#,
            Some("Failing row contains (1, null)."),
        );
        not_null.push((b't', "people".into()));
        not_null.push((b'c', "email".into()));
        let body = relay(
            Frame::new(be::ERROR_RESPONSE, encode(&not_null)),
            "INSERT INTO people (id) VALUES (1)",
        );
        let got = messages::error_fields(&body.body).expect("well formed");
        assert_eq!(
            got.iter()
                .find(|(c, _)| *c == b'M')
                .map(|(_, v)| v.as_str()),
            Some(not_null[2].1.as_str())
        );
    }

    fn encode(fields: &[(u8, String)]) -> bytes::Bytes {
        let mut b = BytesMut::new();
        for (k, v) in fields {
            put_field(&mut b, *k, v);
        }
        b.put_u8(0);
        b.freeze()
    }

    #[test]
    fn an_unreadable_message_relays_nothing_of_it() {
        let f = relay(
            Frame::new(be::ERROR_RESPONSE, bytes::Bytes::from_static(b"Mno end")),
            "x",
        );
        let got = messages::error_fields(&f.body).expect("well formed");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].1.contains("withheld"));
    }
}
