//! Secrets in a process's command line, blanked before the command line is recorded.
//!
//! The identity of a connection includes the agent's command line, and that lands in the
//! audit store, the journal and approval webhooks, where auditors and approvers read it.
//! Command lines carry credentials often enough (`psql postgresql://app:pw@db/shop`,
//! `--password=...`, `env PGPASSWORD=... psql`, `mysql -ppw`) that recording them as they
//! are would copy the very secrets Portcullis exists to keep away from people and agents.
//! So the value of anything that looks like a credential becomes [`MASK`]:
//!
//! - the password of a URL (`scheme://user:PASSWORD@host`), anywhere in an argument;
//! - `name=VALUE` (an option `--name=VALUE`, an environment assignment, a libpq conninfo
//!   keyword) and `--name VALUE` when the name says password, secret, token or key;
//! - MySQL's glued `-pPASSWORD` when the program is a MySQL or MariaDB client.
//!
//! Pure and conservative: it blanks too much rather than too little, and never changes the
//! number of arguments, so the command stays readable.

/// What a blanked value becomes.
pub const MASK: &str = "***";

/// Whether an option or variable name names a credential.
fn secret_name(name: &str) -> bool {
    let n = name.trim_start_matches('-').to_ascii_lowercase();
    [
        "password", "passwd", "pwd", "secret", "token", "apikey", "api-key", "api_key",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n == "key"
        || n.ends_with("-key")
        || n.ends_with("_key")
}

/// Blanks the password of every `scheme://user:password@` in `arg`.
fn url_passwords(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?' or '#'; its userinfo at the last '@'.
        let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Blanks the value of each `name=value` word whose name is a credential's (one argument
/// may hold several, like a libpq conninfo string: `host=db password=pw`).
fn assignments(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    for (i, word) in arg.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match word.split_once('=') {
            Some((name, value)) if !value.is_empty() && secret_name(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(MASK);
            }
            _ => out.push_str(word),
        }
    }
    out
}

fn is_mysql(program: &str) -> bool {
    let base = program.rsplit('/').next().unwrap_or(program);
    base.starts_with("mysql") || base.starts_with("mariadb")
}

/// The command line with credentials blanked.
pub fn redact(args: Vec<String>) -> Vec<String> {
    let mysql = args.first().is_some_and(|p| is_mysql(p));
    let mut out = Vec::with_capacity(args.len());
    let mut value_next = false;
    for (i, arg) in args.into_iter().enumerate() {
        if value_next {
            value_next = false;
            out.push(MASK.to_owned());
            continue;
        }
        if i > 0 && arg.starts_with("--") && !arg.contains('=') && secret_name(&arg) {
            // `--password VALUE`; `--password` alone at the end stays as it is.
            value_next = true;
            out.push(arg);
            continue;
        }
        if i > 0 && mysql && arg.len() > 2 && arg.starts_with("-p") && !arg.starts_with("--") {
            out.push(format!("-p{MASK}"));
            continue;
        }
        let arg = if arg.contains("://") {
            url_passwords(&arg)
        } else {
            arg
        };
        out.push(if arg.contains('=') {
            assignments(&arg)
        } else {
            arg
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(args: &[&str]) -> Vec<String> {
        redact(args.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn blanks_credentials_in_their_usual_places() {
        assert_eq!(
            r(&[
                "psql",
                "postgresql://app:s3cret@db:5432/shop?sslmode=require"
            ]),
            ["psql", "postgresql://app:***@db:5432/shop?sslmode=require"]
        );
        assert_eq!(
            r(&[
                "agent",
                "--db=postgres://u:p@h/d",
                "--redis",
                "redis://:pw@cache:6379/0"
            ]),
            [
                "agent",
                "--db=postgres://u:***@h/d",
                "--redis",
                "redis://:***@cache:6379/0"
            ]
        );
        assert_eq!(
            r(&["psql", "host=db user=app password=s3cret dbname=shop"]),
            ["psql", "host=db user=app password=*** dbname=shop"]
        );
        assert_eq!(
            r(&[
                "env",
                "PGPASSWORD=s3cret",
                "GITHUB_TOKEN=ghp_x",
                "HOME=/root",
                "psql"
            ]),
            [
                "env",
                "PGPASSWORD=***",
                "GITHUB_TOKEN=***",
                "HOME=/root",
                "psql"
            ]
        );
        assert_eq!(
            r(&[
                "tool",
                "--password",
                "s3cret",
                "--api-key",
                "k",
                "--user",
                "app"
            ]),
            [
                "tool",
                "--password",
                "***",
                "--api-key",
                "***",
                "--user",
                "app"
            ]
        );
        assert_eq!(r(&["tool", "--token=abc"]), ["tool", "--token=***"]);
        assert_eq!(
            r(&["/usr/bin/mysql", "-uroot", "-ps3cret", "shop"]),
            ["/usr/bin/mysql", "-uroot", "-p***", "shop"]
        );
    }

    #[test]
    fn leaves_ordinary_arguments_alone() {
        for args in [
            &["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "app", "shop"][..],
            &["psql", "-p5432", "-c", "SELECT a = 1"],
            &["curl", "https://example.com/path?q=1"],
            &["curl", "https://user@example.com/"],
            &["python3", "agent.py", "--model=large", "--keyboard"],
            &["sh", "-c", "x=1 y=2"],
            &["tool", "--password"],
        ] {
            assert_eq!(r(args), args, "{args:?}");
        }
    }

    #[test]
    fn odd_input_never_panics() {
        for a in [
            "://",
            "a://@",
            "x://:@",
            "=",
            "==",
            "://:/@@",
            "é://ü:ö@ß",
            "password=",
        ] {
            let out = r(&["p", a]);
            assert_eq!(out.len(), 2, "{a:?}");
        }
        assert!(r(&[]).is_empty());
    }
}
