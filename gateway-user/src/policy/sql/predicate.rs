//! Does a WHERE clause restrict anything? An agent told "no DELETE without WHERE" will write
//! `WHERE true`, `WHERE 1=1`, `WHERE id = id` or `... OR 1=1`. This evaluates what can be
//! decided from the text alone: literals, comparisons of literals, an expression compared
//! with itself, boolean connectives, `LIKE '%'`, constant subqueries. Anything that
//! depends on data is "unknown", which counts as a real condition.

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, InTarget, SetExpr, UnaryOperator, Value,
    ValueWithSpan,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tri {
    True,
    False,
    Unknown,
    /// Too deep to evaluate: treated as "always true", so the statement is held rather
    /// than waved through.
    TooDeep,
}

/// Whether a WHERE predicate holds for every row, as far as the text shows. An expression
/// too deep to evaluate counts as holding (the caller then treats the WHERE as missing).
pub fn is_trivially_true(e: &Expr) -> bool {
    matches!(eval(e, 0), Tri::True | Tri::TooDeep)
}

/// A literal's value, for comparisons.
#[derive(Debug, PartialEq, PartialOrd)]
enum Lit {
    Num(f64),
    Str(String),
    Bool(bool),
    Null,
}

fn literal(e: &Expr) -> Option<Lit> {
    match e {
        Expr::Value(ValueWithSpan { value, .. }) => match value {
            Value::Number(n, _) => n.parse().ok().map(Lit::Num),
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. }) => {
                Some(Lit::Str(s.clone()))
            }
            Value::Boolean(b) => Some(Lit::Bool(*b)),
            Value::Null => Some(Lit::Null),
            _ => None,
        },
        Expr::Nested(inner) => literal(inner),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match literal(expr)? {
            Lit::Num(n) => Some(Lit::Num(-n)),
            _ => None,
        },
        Expr::Cast {
            kind: CastKind::DoubleColon | CastKind::Cast,
            expr,
            data_type,
            ..
        } => {
            let l = literal(expr)?;
            match data_type {
                DataType::Boolean | DataType::Bool => Some(match l {
                    Lit::Bool(b) => Lit::Bool(b),
                    Lit::Str(s) => Lit::Bool(text_bool(&s)?),
                    Lit::Num(n) => Lit::Bool(n != 0.0),
                    Lit::Null => Lit::Null,
                }),
                _ => Some(l),
            }
        }
        _ => None,
    }
}

/// PostgreSQL's spellings of boolean input.
fn text_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn not(t: Tri) -> Tri {
    match t {
        Tri::True => Tri::False,
        Tri::False => Tri::True,
        other => other,
    }
}

fn from_bool(b: bool) -> Tri {
    if b { Tri::True } else { Tri::False }
}

/// Recursion depth bound. AND/OR chains are flattened without recursion and the parser
/// bounds the rest (parentheses, NOT), so real input stays far below it; past it the
/// answer is [`Tri::TooDeep`].
const MAX_DEPTH: usize = 4_096;

/// The operands of a chain of one connective (`a AND b AND c`), collected without
/// recursion: a left-deep chain is as deep as it is long.
pub(super) fn operands<'a>(e: &'a Expr, connective: &BinaryOperator) -> Vec<&'a Expr> {
    let mut out = Vec::new();
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        match x {
            Expr::BinaryOp { left, op, right } if op == connective => {
                stack.push(right);
                stack.push(left);
            }
            Expr::Nested(inner) if matches!(inner.as_ref(), Expr::BinaryOp { op, .. } if op == connective) =>
            {
                stack.push(inner);
            }
            other => out.push(other),
        }
    }
    out
}

fn eval(e: &Expr, depth: usize) -> Tri {
    if depth > MAX_DEPTH {
        return Tri::TooDeep;
    }
    let d = depth + 1;
    match e {
        Expr::Nested(inner) => eval(inner, d),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => not(eval(expr, d)),
        Expr::BinaryOp {
            op: op @ BinaryOperator::And,
            ..
        } => {
            let mut acc = Tri::True;
            for x in operands(e, op) {
                match eval(x, d) {
                    Tri::False => return Tri::False,
                    Tri::TooDeep => acc = Tri::TooDeep,
                    Tri::Unknown if acc == Tri::True => acc = Tri::Unknown,
                    _ => {}
                }
            }
            acc
        }
        Expr::BinaryOp {
            op: op @ BinaryOperator::Or,
            ..
        } => {
            let mut acc = Tri::False;
            for x in operands(e, op) {
                match eval(x, d) {
                    Tri::True => return Tri::True,
                    Tri::TooDeep => acc = Tri::TooDeep,
                    Tri::Unknown if acc == Tri::False => acc = Tri::Unknown,
                    _ => {}
                }
            }
            acc
        }
        Expr::BinaryOp { left, op, right } => compare(left, op, right),
        Expr::IsTrue(inner) | Expr::IsNotFalse(inner) => eval(inner, d),
        Expr::IsFalse(inner) | Expr::IsNotTrue(inner) => not(eval(inner, d)),
        Expr::IsNull(inner) => match literal(inner) {
            Some(Lit::Null) => Tri::True,
            Some(_) => Tri::False,
            None => Tri::Unknown,
        },
        Expr::IsNotNull(inner) => match literal(inner) {
            Some(Lit::Null) => Tri::False,
            Some(_) => Tri::True,
            None => Tri::Unknown,
        },
        Expr::Like {
            negated: false,
            pattern,
            ..
        }
        | Expr::ILike {
            negated: false,
            pattern,
            ..
        } => match literal(pattern) {
            // `x LIKE '%'` holds for every non-null x: no restriction worth the name.
            Some(Lit::Str(p)) if !p.is_empty() && p.chars().all(|c| c == '%') => Tri::True,
            _ => Tri::Unknown,
        },
        Expr::In {
            expr,
            target: InTarget::List(list),
            negated,
            ..
        } => {
            let hit = list.iter().any(|item| same(expr, item));
            match (hit, negated) {
                (true, false) => Tri::True,
                (true, true) => Tri::False,
                _ => Tri::Unknown,
            }
        }
        Expr::Between {
            expr,
            negated: false,
            low,
            high,
        } => match (literal(expr), literal(low), literal(high)) {
            (Some(v), Some(l), Some(h)) if !matches!(v, Lit::Null) => from_bool(l <= v && v <= h),
            _ => Tri::Unknown,
        },
        Expr::Exists { subquery, negated } => {
            // EXISTS (SELECT 1) without FROM or WHERE is true.
            let constant = match subquery.body.as_ref() {
                SetExpr::Select(s) => {
                    s.from.is_empty() && s.selection.is_none() && s.having.is_none()
                }
                _ => false,
            };
            match (constant, negated) {
                (true, false) => Tri::True,
                (true, true) => Tri::False,
                _ => Tri::Unknown,
            }
        }
        Expr::Subquery(q) => match q.body.as_ref() {
            SetExpr::Select(s)
                if s.from.is_empty() && s.selection.is_none() && s.projection.len() == 1 =>
            {
                match &s.projection[0] {
                    sqlparser::ast::SelectItem::UnnamedExpr(e)
                    | sqlparser::ast::SelectItem::ExprWithAlias { expr: e, .. } => eval(e, d),
                    _ => Tri::Unknown,
                }
            }
            _ => Tri::Unknown,
        },
        other => match literal(other) {
            Some(Lit::Bool(b)) => from_bool(b),
            Some(Lit::Str(s)) => text_bool(&s).map_or(Tri::Unknown, from_bool),
            _ => Tri::Unknown,
        },
    }
}

/// Two expressions that are the same text (after parsing).
fn same(a: &Expr, b: &Expr) -> bool {
    strip(a) == strip(b)
}

/// An expression without the parentheses around it.
pub(super) fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}

fn compare(left: &Expr, op: &BinaryOperator, right: &Expr) -> Tri {
    use BinaryOperator as B;
    if same(left, right) {
        // x = x holds for every non-null x: as good as no condition.
        return match op {
            B::Eq | B::LtEq | B::GtEq => Tri::True,
            B::NotEq | B::Lt | B::Gt => Tri::False,
            _ => Tri::Unknown,
        };
    }
    let (Some(l), Some(r)) = (literal(left), literal(right)) else {
        return Tri::Unknown;
    };
    if matches!(l, Lit::Null) || matches!(r, Lit::Null) {
        return Tri::Unknown;
    }
    // Compare like with like; a number against a string is left to the server.
    let ordering = match (&l, &r) {
        (Lit::Num(a), Lit::Num(b)) => a.partial_cmp(b),
        (Lit::Str(a), Lit::Str(b)) => Some(a.cmp(b)),
        (Lit::Bool(a), Lit::Bool(b)) => Some(a.cmp(b)),
        (Lit::Str(s), Lit::Num(n)) | (Lit::Num(n), Lit::Str(s)) => {
            s.trim().parse::<f64>().ok().and_then(|v| {
                if matches!(l, Lit::Str(_)) {
                    v.partial_cmp(n)
                } else {
                    n.partial_cmp(&v)
                }
            })
        }
        _ => None,
    };
    let Some(o) = ordering else {
        return Tri::Unknown;
    };
    use std::cmp::Ordering::*;
    match op {
        B::Eq => from_bool(o == Equal),
        B::NotEq => from_bool(o != Equal),
        B::Lt => from_bool(o == Less),
        B::LtEq => from_bool(o != Greater),
        B::Gt => from_bool(o == Greater),
        B::GtEq => from_bool(o != Less),
        _ => Tri::Unknown,
    }
}
