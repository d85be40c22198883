//! Startup parameters a client may not set through the gate: settings that would take
//! effect before any statement could be judged. The server reads every startup parameter
//! other than `user`, `database`, `options` and `replication` as a setting, and `options`
//! as command-line switches (`-c name=value`, `--name=value`); both are checked here.
//!
//! Refused: a replication connection; a role (`role`, `session_authorization`: use `SET
//! ROLE`, which the policies judge); a `search_path` that puts a schema before
//! `pg_catalog` (built-in names would run that schema's functions, see
//! [`search_path`](crate::policy::sql::search_path)); libraries loaded into the server
//! process (`session_preload_libraries`, `local_preload_libraries`, with the
//! `dynamic_library_path` and `jit_provider` that say where from), as `LOAD` is; a
//! `client_encoding` whose multibyte characters can end in an ASCII byte (the server
//! converts text before reading it, so it would read statements otherwise).
//!
//! Pure.

use crate::policy::sql::search_path;

/// Settings that load code into the server process when a session starts.
const LIBRARY_SETTINGS: [&str; 4] = [
    "session_preload_libraries",
    "local_preload_libraries",
    "dynamic_library_path",
    "jit_provider",
];

/// Why the startup parameters may not pass, if they may not.
pub fn check(params: &[(String, String)]) -> Result<(), String> {
    for (k, v) in params {
        match k.to_ascii_lowercase().as_str() {
            "replication" => {
                return Err("replication connections are not allowed through Portcullis".into());
            }
            "user" | "database" => {}
            "options" => {
                for (name, value) in option_settings(v) {
                    setting(&name, &value, true)?;
                }
            }
            name => setting(name, v, false)?,
        }
    }
    Ok(())
}

/// `name` lower-cased, as the server compares setting names.
fn setting(name: &str, value: &str, in_options: bool) -> Result<(), String> {
    match name {
        "role" | "session_authorization" if in_options => Err(
            "setting a role in `options` at connection time is not allowed through \
             Portcullis; use SET ROLE, which the policy judges"
                .into(),
        ),
        "role" | "session_authorization" => Err(format!(
            "setting `{name}` at connection time is not allowed through Portcullis; use \
             SET ROLE, which the policy judges"
        )),
        "search_path" if search_path::shadows_catalog(&search_path::parse_list(value)) => {
            Err(format!(
                "a search_path that puts a schema before pg_catalog (`{value}`) is not \
                 allowed through Portcullis: built-in function and operator names would \
                 resolve to that schema's; name pg_catalog first or leave it out"
            ))
        }
        "client_encoding" if crate::policy::sql::lex::swallows_ascii(value) => Err(format!(
            "client_encoding `{value}` is not allowed through Portcullis: its multibyte \
             characters can end in an ASCII byte (a backslash), so the server could read a \
             statement otherwise than the policies did; use UTF8"
        )),
        n if LIBRARY_SETTINGS.contains(&n) => Err(format!(
            "loading libraries at connection time (`{n}`) is not allowed through \
             Portcullis, as LOAD is not"
        )),
        _ => Ok(()),
    }
}

/// The settings an `options` string makes: `-c name=value`, `-cname=value` and
/// `--name=value` (where `-` in the name stands for `_`), split at whitespace with a
/// backslash escaping the next character, as the server reads them.
fn option_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
        .iter()
        .filter_map(|w| {
            let w = w
                .strip_prefix("--")
                .or_else(|| w.strip_prefix("-c"))
                .unwrap_or(w);
            let (name, value) = w.split_once('=')?;
            Some((
                name.to_ascii_lowercase().replace('-', "_"),
                value.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(pairs: &[(&str, &str)]) -> Result<(), String> {
        check(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn options_yield_the_settings_the_server_reads() {
        assert_eq!(
            option_settings(r"-c search_path=evil,pg_catalog --statement-timeout=5"),
            [
                ("search_path".to_owned(), "evil,pg_catalog".to_owned()),
                ("statement_timeout".to_owned(), "5".to_owned())
            ]
        );
        assert_eq!(
            option_settings(r"--search-path=a,\ b -cSEARCH_PATH=c"),
            [
                ("search_path".to_owned(), "a, b".to_owned()),
                ("search_path".to_owned(), "c".to_owned())
            ]
        );
    }

    #[test]
    fn what_would_escape_the_policies_is_refused_wherever_it_is_set() {
        for bad in [
            vec![("replication", "database")],
            vec![("role", "postgres")],
            vec![("options", "-c role=postgres")],
            vec![("options", "--session-authorization=postgres")],
            vec![("search_path", "app, pg_catalog")],
            vec![("options", "-c search_path=app,pg_catalog")],
            vec![("session_preload_libraries", "/tmp/x.so")],
            vec![("options", "-c local_preload_libraries=x")],
            vec![("options", "--dynamic-library-path=/tmp")],
            vec![("client_encoding", "SJIS")],
            vec![("options", "-c client_encoding=GBK")],
        ] {
            assert!(of(&bad).is_err(), "{bad:?}");
        }
        for good in [
            vec![("user", "app"), ("database", "shop")],
            vec![("application_name", "controller")],
            vec![(
                "options",
                "-c application_name=controller -c statement_timeout=5s",
            )],
            vec![("options", "-c search_path=app,public")],
            vec![("search_path", "pg_catalog, app")],
            vec![("client_encoding", "UTF8")],
        ] {
            assert_eq!(of(&good), Ok(()), "{good:?}");
        }
    }
}
