//! Shell-style patterns for names in policies: `*` (any run, also empty) and `?` (one
//! character). Nothing else is special. Matching is linear in practice (iterative with one
//! backtrack point), so patterns from policy files cannot blow up.

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
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
    while pi < p.len() && p[pi] == '*' {
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
    }
}
