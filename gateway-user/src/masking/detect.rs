//! Value detectors: find personal data and secrets inside text, whatever column it is in.
//!
//! Each detector is a pattern plus, where one exists, a check that rules out look-alikes
//! (Luhn for card numbers, ISO 13616 mod-97 for IBANs, the SSA's rules for SSNs, a JSON
//! header for JWTs). A `RegexSet` over all patterns is the prefilter: a value no pattern
//! matches costs one pass of one automaton.

use std::ops::Range;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use regex::{Regex, RegexSet};

/// One match: where, and which detector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub range: Range<usize>,
    pub detector: &'static str,
}

struct Detector {
    name: &'static str,
    re: Regex,
    check: fn(&str, &str, usize) -> bool,
}

fn always(_: &str, _: &str, _: usize) -> bool {
    true
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// Luhn checksum and an issuer prefix (Visa, Mastercard, Amex, Discover, Diners, JCB,
/// UnionPay), which cuts most random digit runs.
fn credit_card(m: &str, _: &str, _: usize) -> bool {
    let d = digits(m);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    if !sum.is_multiple_of(10) {
        return false;
    }
    let p2 = d[0] * 10 + d[1];
    let p4 = p2 * 100 + d[2] * 10 + d[3];
    d[0] == 4
        || (51..=55).contains(&p2)
        || (2221..=2720).contains(&p4)
        || p2 == 34
        || p2 == 37
        || p4 == 6011
        || p2 == 65
        || (36..=39).contains(&p2)
        || p2 == 30
        || p2 == 35
        || p2 == 62
}

/// Area 001-899 except 666, group 01-99, serial 0001-9999.
fn us_ssn(m: &str, _: &str, _: usize) -> bool {
    let d = digits(m);
    if d.len() != 9 {
        return false;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// ISO 13616: move the first four characters to the end, letters to numbers, mod 97 = 1.
fn iban(m: &str, _: &str, _: usize) -> bool {
    let s: String = m.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let rearranged = format!("{}{}", &s[4..], &s[..4]);
    let mut rem: u64 = 0;
    for c in rearranged.chars() {
        let v = match c {
            '0'..='9' => u64::from(c as u8 - b'0'),
            'A'..='Z' => u64::from(c as u8 - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// A JWT's first part is a JSON header naming an algorithm.
fn jwt(m: &str, _: &str, _: usize) -> bool {
    let header = m.split('.').next().unwrap_or("");
    URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|h| String::from_utf8(h).ok())
        .is_some_and(|h| h.contains("\"alg\""))
}

fn phone(m: &str, _: &str, _: usize) -> bool {
    let n = digits(m).len();
    (7..=15).contains(&n)
}

fn ip(m: &str, _: &str, _: usize) -> bool {
    m.parse::<std::net::IpAddr>().is_ok()
}

/// 40 characters of base64 are also what many IDs look like: require a `/` or `+` in the
/// key, or a word like `secret` or `aws` shortly before it. Hex (SHA-1) is not a key.
fn aws_secret(m: &str, text: &str, start: usize) -> bool {
    if m.chars().all(|c| c.is_ascii_hexdigit()) {
        return false;
    }
    let has_mixed = m.chars().any(|c| c.is_ascii_uppercase())
        && m.chars().any(|c| c.is_ascii_lowercase())
        && m.chars().any(|c| c.is_ascii_digit());
    if !has_mixed {
        return false;
    }
    if m.contains(['/', '+']) {
        return true;
    }
    let from = start.saturating_sub(48);
    let before = text.get(from..start).unwrap_or("").to_ascii_lowercase();
    before.contains("secret") || before.contains("aws")
}

/// Names of the detectors, as policies spell them.
pub const NAMES: [&str; 13] = crate::policy::model::DETECTORS;

fn detectors() -> Vec<Detector> {
    let d = |name, pat: &str, check| Detector {
        name,
        re: Regex::new(pat).unwrap_or_else(|e| panic!("detector {name}: {e}")),
        check,
    };
    vec![
        d(
            "pem_private_key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|$)",
            always,
        ),
        d(
            "jwt",
            r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}",
            jwt,
        ),
        d(
            "aws_access_key",
            r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
            always,
        ),
        d(
            "aws_secret_key",
            r"(?:^|[^A-Za-z0-9/+])([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+=])",
            aws_secret,
        ),
        d(
            "github_token",
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{60,90})\b",
            always,
        ),
        d(
            "slack_token",
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]+",
            always,
        ),
        d(
            "stripe_key",
            r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b",
            always,
        ),
        d(
            "email",
            r"[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}",
            always,
        ),
        d("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", iban),
        d("credit_card", r"\b\d(?:[ -]?\d){12,18}\b", credit_card),
        d("us_ssn", r"\b\d{3}[- ]\d{2}[- ]\d{4}\b", us_ssn),
        d(
            "phone",
            r"\+\d{1,3}(?:[ .-]\d{1,4}){2,6}\b|(?:\+\d{1,3}[ .-]?)?\(?\b\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,4}\b|\+\d{8,15}\b",
            phone,
        ),
        d(
            "ip_address",
            // IPv4 by pattern; IPv6 as a maximal run of hex digits and colons that the
            // standard parser accepts.
            r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b|(?:^|[^0-9A-Fa-f:])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})",
            ip,
        ),
    ]
}

/// A compiled set of detectors (those a mask names).
pub struct Detectors {
    set: RegexSet,
    list: Vec<Detector>,
}

impl Detectors {
    /// The detectors named in `wanted` (unknown names are ignored: policy validation
    /// rejects them).
    pub fn new(wanted: &[&str]) -> Self {
        let list: Vec<Detector> = detectors()
            .into_iter()
            .filter(|d| wanted.contains(&d.name))
            .collect();
        let set = RegexSet::new(list.iter().map(|d| d.re.as_str()))
            .unwrap_or_else(|e| panic!("detector set: {e}"));
        Self { set, list }
    }

    pub fn all() -> Self {
        Self::new(&NAMES)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Non-overlapping matches, leftmost first; earlier detectors win overlaps (a card
    /// number inside a PEM block is part of the block).
    pub fn find(&self, text: &str) -> Vec<Found> {
        let hits = self.set.matches(text);
        if !hits.matched_any() {
            return Vec::new();
        }
        let mut out: Vec<Found> = Vec::new();
        for i in hits.iter() {
            let d = &self.list[i];
            for caps in d.re.captures_iter(text) {
                // Patterns with a group mark the value inside surrounding context.
                let Some(m) = caps.get(1).or_else(|| caps.get(0)) else {
                    continue;
                };
                let r = m.start()..m.end();
                if r.is_empty() || !(d.check)(m.as_str(), text, m.start()) {
                    continue;
                }
                if out
                    .iter()
                    .any(|f| f.range.start < r.end && r.start < f.range.end)
                {
                    continue;
                }
                out.push(Found {
                    range: r,
                    detector: d.name,
                });
            }
        }
        out.sort_by_key(|f| f.range.start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(name: &str, text: &str) -> Vec<String> {
        Detectors::new(&[name])
            .find(text)
            .into_iter()
            .map(|f| text[f.range].to_owned())
            .collect()
    }

    /// Each detector: values it must find (`context|value` when the value needs words
    /// around it), and look-alikes it must leave alone.
    #[test]
    fn corpus() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "email",
                &[
                    "alice@example.com",
                    "bob.smith+tag@mail.co.uk",
                    "x_y@sub-domain.example.org",
                ],
                &[
                    "@example",
                    "alice@",
                    "not an email",
                    "a@b",
                    "user@localhost",
                    "1.5@2",
                ],
            ),
            (
                "credit_card",
                &[
                    "4111111111111111",
                    "4111 1111 1111 1111",
                    "5500-0000-0000-0004",
                    "378282246310005",
                    "6011111111111117",
                ],
                &[
                    "4111111111111112",
                    "1234567890123456",
                    "0000000000000000",
                    "2024-01-15",
                    "12345",
                ],
            ),
            (
                "us_ssn",
                &["123-45-6789", "078-05-1120", "123 45 6789"],
                &[
                    "000-12-3456",
                    "666-12-3456",
                    "900-12-3456",
                    "123-00-4567",
                    "123-45-0000",
                    "2024-01-1500",
                ],
            ),
            (
                "iban",
                &[
                    "DE89370400440532013000",
                    "GB82WEST12345698765432",
                    "FR1420041010050500013M02606",
                    "GB82 WEST 1234 5698 7654 32",
                ],
                &["DE89370400440532013001", "GB00WEST12345698765432", "XX12"],
            ),
            (
                "phone",
                &[
                    "+1 415 555 2671",
                    "(415) 555-2671",
                    "415-555-2671",
                    "+442071838750",
                    "+33 1 42 68 53 00",
                ],
                &["2024-01-15", "12:30:45", "version 1.2.3", "42"],
            ),
            (
                "ip_address",
                &[
                    "192.168.1.20",
                    "10.0.0.1",
                    "2001:db8::1",
                    "fe80::1ff:fe23:4567:890a",
                ],
                &["999.1.1.1", "1.2.3", "12:30:45", "abc"],
            ),
            (
                "jwt",
                &[
                    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                ],
                &[
                    "eyJub3RoaW5nIjoxfQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
                    "eyJ.eyJ.x",
                ],
            ),
            (
                "aws_access_key",
                &["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
                &["AKIAshort", "XKIAIOSFODNN7EXAMPLE"],
            ),
            (
                "aws_secret_key",
                &[
                    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    "aws_secret_access_key=|AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCd",
                ],
                &[
                    "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                    "an id AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCd",
                ],
            ),
            (
                "github_token",
                &[
                    "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
                    "gho_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
                ],
                &["ghp_short", "ghx_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"],
            ),
            (
                "slack_token",
                &[
                    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
                    "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
                ],
                &["xoxz-123", "slack is nice"],
            ),
            (
                "stripe_key",
                &[
                    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
                    "rk_test_4eC39HqLyjWDarjtT1zdp7dc",
                ],
                &["pk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_short"],
            ),
            (
                "pem_private_key",
                &[
                    "-----BEGIN RSA PRIVATE KEY-----\nMIIEow==\n-----END RSA PRIVATE KEY-----",
                    "-----BEGIN EC PRIVATE KEY-----\nMHc=\n-----END EC PRIVATE KEY-----",
                ],
                &[
                    "-----BEGIN CERTIFICATE-----\nMIID\n-----END CERTIFICATE-----",
                    "-----BEGIN PUBLIC KEY-----",
                ],
            ),
        ];
        for (name, yes, no) in cases {
            for y in *yes {
                let (context, value) = y.split_once('|').unwrap_or(("", y));
                let got = hits(name, &format!("before {context}{value} after"));
                assert_eq!(got, vec![value.to_string()], "{name} must find {y:?}");
            }
            for n in *no {
                assert!(
                    hits(name, n).is_empty(),
                    "{name} must not flag {n:?}: {:?}",
                    hits(name, n)
                );
            }
        }
    }

    #[test]
    fn a_truncated_private_key_is_masked_to_the_end() {
        let text = "key: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg";
        assert_eq!(hits("pem_private_key", text), vec![text[5..].to_owned()]);
    }

    #[test]
    fn several_findings_in_one_value() {
        let d = Detectors::all();
        let text = "mail alice@example.com or call +1 415 555 2671, card 4111111111111111";
        let f = d.find(text);
        let kinds: Vec<&str> = f.iter().map(|x| x.detector).collect();
        assert_eq!(kinds, ["email", "phone", "credit_card"], "{f:?}");
        assert!(
            d.find("a perfectly ordinary sentence, 42 and 2024-01-15")
                .is_empty()
        );
    }
}
