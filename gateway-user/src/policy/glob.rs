//! Shell-style patterns for names in policies: `*` (any run, also empty) and `?` (one
//! character). Nothing else is special. Matching is linear in practice (iterative with one
//! backtrack point), so patterns from policy files cannot blow up.

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    // On the hot path (every column of every masked result is checked): no allocation
    // when both are ASCII, where a byte is a character.
    if pattern.is_ascii() && text.is_ascii() {
        return match_units(pattern.as_bytes(), text.as_bytes(), b'*', b'?');
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    match_units(&p, &t, '*', '?')
}

/// Iterative matching with one backtrack point: linear in practice.
fn match_units<T: PartialEq + Copy>(p: &[T], t: &[T], any: T, one: T) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == one || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == any {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == any {
        pi += 1;
    }
    pi == p.len()
}

pub fn has_wildcards(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether every text `b` matches is also matched by `a` (conservatively: `false` when not
/// sure). Used to find shadowed rules.
pub fn covers(a: &str, b: &str) -> bool {
    a == "*" || a == b || (!has_wildcards(b) && matches(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("*", ""));
        assert!(matches("drop_*", "drop_table"));
        assert!(!matches("drop_*", "create_table"));
        assert!(matches("*.users", "public.users"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("*a*b*c*", "xxaxxbxxcxx"));
        assert!(!matches("*a*b*c*", "xxaxxcxxbxx"));
        let long = "a".repeat(10_000);
        assert!(!matches(&format!("{}b", "*a".repeat(50)), &long));
        assert!(covers("drop_*", "drop_table"));
        assert!(!covers("drop_table", "drop_*"));
        assert!(covers("*", "drop_*"));
        // Non-ASCII: `?` is one character, not one byte.
        assert!(matches("caf?", "café"));
        assert!(matches("*é", "thé"));
        assert!(!matches("caf??", "café"));
    }
}
