//! SQL classification: what a message of SQL does, for the policy engine.
//!
//! The classifier is the security boundary: an agent will try to hide a destructive
//! statement in comments, odd case, quoting, dollar quotes, CTEs, several statements, DO
//! blocks or functions. So:
//! - text is tokenized as PostgreSQL would and split into statements; each is parsed with
//!   sqlparser's PostgreSQL dialect, and the whole tree is walked (nested queries, CTEs,
//!   RETURNING, subqueries in expressions, PREPARE bodies, EXPLAIN ANALYZE);
//! - a handful of statements sqlparser does not parse are recognised by their leading
//!   keywords (`DO`, `ALTER SYSTEM`, `CHECKPOINT`, `REINDEX`, `CLUSTER`, `SECURITY LABEL`);
//! - anything else that does not parse, or could be read two ways, is an error: the policy
//!   decides what errors get (deny by default).
//!
//! Pure: no I/O, no state; `classify` takes text and lexical options and returns facts.

pub mod builtins;
pub mod functions;
pub mod kind;
pub mod lex;
pub mod lineage;
pub mod predicate;
pub mod quick;
pub mod search_path;
pub mod set_config;
pub mod shapes;

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    ops::ControlFlow,
};

use serde::Serialize;
use sqlparser::{
    ast::{
        AlterSchemaOperation, AlterTableOperation, AlterTableType, AlterViewOperation,
        BinaryOperator, CopySource, CopyTarget, CreateAggregateOption, DropBehavior, Expr,
        FromTable, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, MergeAction, ObjectName,
        ObjectNamePart, ObjectType, OperatorOption, Query, ReferentialAction, SetExpr, Statement,
        TableFactor, TableObject, Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
    tokenizer::Token,
};

pub use self::{
    functions::Danger,
    kind::{Kind, Object},
    lex::LexOptions,
    shapes::ShapeCache,
};

/// Deepest nesting sqlparser may recurse into (parenthesised expressions, subqueries).
/// Measured stack use stays well inside the proxy's worker stacks; see the tests.
pub const RECURSION_LIMIT: usize = 64;

/// Why a message could not be classified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ClassifyError {
    #[error("SQL does not parse: {0}")]
    Syntax(String),
    #[error("SQL is too complex to classify: {0}")]
    TooComplex(String),
    #[error("SQL could be read two ways: {0}")]
    Ambiguous(String),
}

/// A table as named in SQL: unquoted names folded to lower case, quoted ones kept; a
/// database qualifier dropped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// PostgreSQL's identifier rule: unquoted folds to lower case.
pub fn ident_name(i: &Ident) -> String {
    match i.quote_style {
        Some(_) => i.value.clone(),
        None => i.value.to_lowercase(),
    }
}

fn parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => ident_name(i),
            other => other.to_string().to_lowercase(),
        })
        .collect()
}

impl TableName {
    pub fn from_object(name: &ObjectName) -> Self {
        let mut p = parts(name);
        let name = p.pop().unwrap_or_default();
        let schema = p.pop();
        Self { schema, name }
    }
}

/// What one statement does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatementClass {
    /// The statement's own kind.
    pub kind: Kind,
    /// Every kind it performs, including nested ones (a data-modifying CTE, the body of a
    /// PREPARE, the statement under EXPLAIN ANALYZE).
    pub kinds: BTreeSet<Kind>,
    pub tables_read: BTreeSet<TableName>,
    pub tables_written: BTreeSet<TableName>,
    /// Functions called, unqualified, lower case.
    pub functions: BTreeSet<String>,
    /// Functions called that are not PostgreSQL's own (see [`builtins`]), as written
    /// (schema-qualified when they were): a built-in's name qualified with a schema other
    /// than `pg_catalog` is someone else's function.
    pub user_functions: BTreeSet<String>,
    pub dangerous: BTreeSet<(String, Danger)>,
    /// An UPDATE, DELETE or MERGE with no WHERE, or one that is always true.
    pub missing_where: bool,
    /// Runs SQL that is not visible here: DO blocks, function and procedure bodies, rules,
    /// functions that execute text.
    pub dynamic_sql: bool,
    /// Name of the prepared statement a PREPARE creates, an EXECUTE runs or a DEALLOCATE
    /// drops.
    pub prepared: Option<String>,
    /// Names of the cursors a `DECLARE` opens (portals of the session, in the namespace
    /// the extended protocol's Bind uses).
    pub cursors: Vec<String>,
    /// Drops every prepared statement of the session (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub drops_all_prepared: bool,
    /// Makes one relation's rows part of another's (`ALTER TABLE ... ATTACH PARTITION`,
    /// `INHERIT`): where rows written into the parent are stored may change (a foreign
    /// table attached keeps them on another server).
    pub attaches: bool,
    /// The rows it returns and what their columns are computed from (for masking).
    pub shape: lineage::Shape,
    /// Values it stores in tables that are computed from columns (for masking: a copy of
    /// a masked column must land where a mask covers it).
    pub stored: Vec<lineage::Stored>,
}

impl StatementClass {
    /// Whether, after it, an unqualified name of one of `pg_catalog`'s relations
    /// (`pg_class`) may name another relation: it may create or rename one (a temporary
    /// one is searched before `pg_catalog`), sets a search path that puts a schema before
    /// `pg_catalog` (the `config` danger `search_path`), or runs code this classification
    /// does not read (a DO block, a function of the database's), which may do either.
    /// Only statements of kinds that never make a relation are known not to: reads, DML,
    /// transaction control, settings, cursors, prepared statements (a `PREPARE`'s own
    /// statement counts with its kinds), locks, notifications, maintenance, grants. (A
    /// trigger runs code no statement names; as everywhere here, triggers are trusted.)
    pub fn may_shadow_catalog(&self) -> bool {
        use Kind::*;
        self.dynamic_sql
            || !self.user_functions.is_empty()
            || self.dangerous.iter().any(|(name, _)| name == "search_path")
            || !self.kinds.iter().all(|k| {
                matches!(
                    k,
                    Select
                        | Insert
                        | Update
                        | Delete
                        | Merge
                        | Truncate
                        | CopyTo
                        | CopyFrom
                        | Set
                        | SetRole
                        | SetSessionAuthorization
                        | Reset
                        | Show
                        | Discard
                        | Begin
                        | Commit
                        | Rollback
                        | Savepoint
                        | Release
                        | RollbackToSavepoint
                        | Prepare
                        | Execute
                        | Deallocate
                        | Declare
                        | Fetch
                        | Close
                        | Explain
                        | Lock
                        | Listen
                        | Notify
                        | Unlisten
                        | Vacuum
                        | Analyze
                        | Refresh
                        | Reindex
                        | Cluster
                        | Checkpoint
                        | Comment
                        | Grant
                        | Revoke
                        | SecurityLabel
                )
            })
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            kinds: BTreeSet::from([kind]),
            tables_read: BTreeSet::new(),
            tables_written: BTreeSet::new(),
            functions: BTreeSet::new(),
            user_functions: BTreeSet::new(),
            dangerous: BTreeSet::new(),
            missing_where: false,
            dynamic_sql: false,
            prepared: None,
            cursors: Vec::new(),
            drops_all_prepared: false,
            attaches: false,
            shape: lineage::Shape::None,
            stored: Vec::new(),
        }
    }
}

/// What a message does: its statements, or why it cannot be told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub statements: Vec<StatementClass>,
    pub error: Option<ClassifyError>,
}

impl Classification {
    /// Every kind in the message.
    pub fn kinds(&self) -> BTreeSet<Kind> {
        self.statements
            .iter()
            .flat_map(|s| s.kinds.iter().copied())
            .collect()
    }
}

/// Classifies a message (one or more statements).
pub fn classify(sql: &str, opts: LexOptions) -> Classification {
    classify_with(sql, opts, None)
}

/// Classifies a message, reusing the classification of a single statement of the same
/// shape when `shapes` holds one and that is safe (see [`shapes`]).
pub fn classify_with(sql: &str, opts: LexOptions, shapes: Option<&ShapeCache>) -> Classification {
    let quick = shapes.and_then(|_| quick::read(sql, opts.standard_conforming_strings));
    classify_read(sql, opts, shapes, quick.as_ref())
}

/// [`classify_with`] for a caller that has already read `sql` with the quick lexer.
pub fn classify_read(
    sql: &str,
    opts: LexOptions,
    shapes: Option<&ShapeCache>,
    quick: Option<&quick::Quick<'_>>,
) -> Classification {
    // A known shape needs no full tokenization when the quick lexer reads the text (and
    // the session's encoding reads it as the server does: see `LexOptions`).
    if !opts.may_misread(sql)
        && let (Some(cache), Some(q)) = (shapes, quick)
        && let Some(c) = cache.get(&q.key)
    {
        return Classification {
            statements: vec![(*c).clone()],
            error: None,
        };
    }
    let statements = match lex::split(sql, opts) {
        Ok(s) => s,
        Err(e) => {
            return Classification {
                statements: Vec::new(),
                error: Some(e),
            };
        }
    };
    if let (Some(cache), [tokens]) = (shapes, statements.as_slice())
        && let Some(key) = shapes::key(tokens, opts.standard_conforming_strings)
    {
        // The quick key is stored too only where both lexers read the same pieces.
        let quick_key = quick
            .filter(|q| quick::agrees(&q.pieces, tokens))
            .map(|q| q.key.clone());
        return classify_shape(cache, key, quick_key, statements);
    }
    let mut out = Vec::with_capacity(statements.len());
    for tokens in statements {
        match classify_tokens(tokens) {
            Ok(c) => out.push(c),
            Err(e) => {
                return Classification {
                    statements: out,
                    error: Some(e),
                };
            }
        }
    }
    Classification {
        statements: out,
        error: None,
    }
}

/// One statement with literals, through the shape cache.
fn classify_shape(
    cache: &ShapeCache,
    key: String,
    quick_key: Option<String>,
    statements: Vec<lex::StatementTokens>,
) -> Classification {
    let one = |r: Result<StatementClass, ClassifyError>| match r {
        Ok(c) => Classification {
            statements: vec![c],
            error: None,
        },
        Err(e) => Classification {
            statements: Vec::new(),
            error: Some(e),
        },
    };
    if let Some(c) = cache.get(&key) {
        if let Some(q) = quick_key {
            cache.put_shared(q, c.clone());
        }
        return one(Ok((*c).clone()));
    }
    let Some(tokens) = statements.into_iter().next() else {
        return one(Err(ClassifyError::Syntax("no statement".into())));
    };
    let same = tokens.clone();
    let c = classify_tokens(tokens);
    if let Ok(c) = &c
        && shapes::reusable(c)
        && [false, true]
            .into_iter()
            .all(|v| matches!(classify_tokens(shapes::substitute(&same, v)), Ok(o) if o == *c))
    {
        let shared = cache.put(key, c.clone());
        if let Some(q) = quick_key {
            cache.put_shared(q, shared);
        }
    }
    one(c)
}

fn classify_tokens(tokens: lex::StatementTokens) -> Result<StatementClass, ClassifyError> {
    // Read once for the keyword forms, the fallback and the error below (`TABLE t`, which
    // the rewrite changes, is none of them).
    let words = lex::leading_words(&tokens, 4);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    if let Some(c) = by_keyword(&words) {
        return Ok(c);
    }
    // Only an `ALTER` has a fallback that needs more than its first words.
    let outline = if words.first() == Some(&"ALTER") {
        outline(&tokens)
    } else {
        Outline::default()
    };
    let tokens = rewrite_identity_options(rewrite_create_options(rewrite_catalog_operators(
        rewrite_table_statement(tokens),
    )));
    let fallback = after_parse_failure(&words, outline.expression_free).map(|mut c| {
        // What `ALTER ... OWNER TO` implies when it parses ([`implied_kinds`]).
        if outline.owner_to {
            c.kinds.insert(Kind::AlterOwner);
        }
        c
    });
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(tokens);
    let parsed = parser
        .parse_statement()
        .map_err(|e| ClassifyError::Syntax(e.to_string()))
        .and_then(|stmt| {
            // One statement per split: anything left over was not understood.
            let next = parser.peek_token();
            if matches!(next.token, Token::EOF) {
                Ok(stmt)
            } else {
                Err(ClassifyError::Syntax(format!(
                    "unexpected {} after the statement",
                    next.token
                )))
            }
        });
    match (parsed, fallback) {
        (Ok(stmt), _) => {
            let c = classify_statement(&stmt);
            // The parser reads other dialects' statements too (`USE db`, `PRAGMA x`, and
            // once `LOAD`, which PostgreSQL has): a statement of no kind known here is not
            // one that may pass unexamined.
            if c.kinds.contains(&Kind::Other) {
                return Err(ClassifyError::Syntax(format!(
                    "`{}` is read as a statement of no kind known here",
                    words.join(" ")
                )));
            }
            Ok(c)
        }
        (Err(_), Some(c)) => Ok(c),
        (Err(e), None) => Err(e),
    }
}

/// Whether a token is the unquoted word `w` (keywords are matched without case).
fn is_word(t: &Token, w: &str) -> bool {
    matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w))
}

/// `TABLE name` is `SELECT * FROM name`; sqlparser does not parse the short form.
fn rewrite_table_statement(mut tokens: lex::StatementTokens) -> lex::StatementTokens {
    use sqlparser::{keywords::Keyword, tokenizer::Word};
    let Some(first) = tokens.iter().position(|t| !lex::is_trivia(&t.token)) else {
        return tokens;
    };
    let is_table = is_word(&tokens[first].token, "table");
    if !is_table {
        return tokens;
    }
    let span = tokens[first].span;
    let word = |v: &str, k: Keyword| {
        sqlparser::tokenizer::TokenWithSpan::new(
            Token::Word(Word {
                value: v.into(),
                quote_style: None,
                keyword: k,
            }),
            span,
        )
    };
    let space = sqlparser::tokenizer::TokenWithSpan::new(
        Token::Whitespace(sqlparser::tokenizer::Whitespace::Space),
        span,
    );
    let replacement = vec![
        word("SELECT", Keyword::SELECT),
        space.clone(),
        sqlparser::tokenizer::TokenWithSpan::new(Token::Mul, span),
        space.clone(),
        word("FROM", Keyword::FROM),
    ];
    tokens.splice(first..=first, replacement);
    tokens
}

/// `x OPERATOR(pg_catalog.=) ANY (...)` is `x = ANY (...)` with the operator spelled out
/// (pg_dump and psql write their catalog queries so, against a search path that could
/// shadow `=`); sqlparser reads `OPERATOR(...)` as a binary operator but not before
/// `ANY`, `ALL` or `SOME`. The explicitly built-in operator becomes its bare token there,
/// which the classifier takes for the built-in anyway. Other schemas' operators are left
/// alone (the parser reads them elsewhere, and they are user functions).
fn rewrite_catalog_operators(mut tokens: lex::StatementTokens) -> lex::StatementTokens {
    let mut k = 0;
    while k < tokens.len() {
        if !is_word(&tokens[k].token, "operator") {
            k += 1;
            continue;
        }
        // The positions of the next six tokens that are not trivia: `(`, `pg_catalog`,
        // `.`, the operator, `)`, and the quantifier.
        let at: Vec<usize> = (k + 1..tokens.len())
            .filter(|&i| !lex::is_trivia(&tokens[i].token))
            .take(6)
            .collect();
        let shaped = |at: &[usize]| -> Option<Token> {
            let [open, schema, dot, op, close, quant] = at else {
                return None;
            };
            let catalog = match &tokens[*schema].token {
                Token::Word(w) => match w.quote_style {
                    None => w.value.eq_ignore_ascii_case("pg_catalog"),
                    Some(_) => w.value == "pg_catalog",
                },
                _ => false,
            };
            let quantified = ["any", "all", "some"]
                .iter()
                .any(|q| is_word(&tokens[*quant].token, q));
            let op = &tokens[*op].token;
            (matches!(tokens[*open].token, Token::LParen)
                && catalog
                && matches!(tokens[*dot].token, Token::Period)
                && !matches!(op, Token::Word(_) | Token::LParen | Token::RParen)
                && builtins::is_builtin_operator(&op.to_string())
                && matches!(tokens[*close].token, Token::RParen)
                && quantified)
                .then(|| op.clone())
        };
        match shaped(&at) {
            Some(op) => {
                let span = tokens[k].span;
                tokens.splice(
                    k..=at[4],
                    [sqlparser::tokenizer::TokenWithSpan::new(op, span)],
                );
                k += 1;
            }
            None => k += 1,
        }
    }
    tokens
}

/// What the fallback classification needs from a statement's whole text (its unquoted
/// words and punctuation; strings and quoted names are single tokens). The default, for
/// statements not looked at: neither.
#[derive(Default)]
struct Outline {
    /// The words `OWNER TO`.
    owner_to: bool,
    /// No parenthesis and no `DEFAULT`: nowhere an expression could be.
    expression_free: bool,
}

fn outline(tokens: &[sqlparser::tokenizer::TokenWithSpan]) -> Outline {
    let mut o = Outline {
        owner_to: false,
        expression_free: true,
    };
    let mut owner = false;
    for t in tokens.iter().filter(|t| !lex::is_trivia(&t.token)) {
        o.owner_to |= owner && is_word(&t.token, "to");
        owner = is_word(&t.token, "owner");
        if matches!(t.token, Token::LParen) || is_word(&t.token, "default") {
            o.expression_free = false;
        }
    }
    o
}

/// `GENERATED ... AS IDENTITY (SEQUENCE NAME s ...)`, as pg_dump writes identity columns:
/// the name of the sequence behind the column, which sqlparser does not read among the
/// options, is taken out (only there: inside the parentheses after `IDENTITY`).
fn rewrite_identity_options(tokens: lex::StatementTokens) -> lex::StatementTokens {
    if !tokens.iter().any(|t| is_word(&t.token, "identity")) {
        return tokens;
    }
    let at: Vec<usize> = (0..tokens.len())
        .filter(|&i| !lex::is_trivia(&tokens[i].token))
        .collect();
    let mut drop = Vec::new();
    let mut k = 0;
    while k + 1 < at.len() {
        if !(is_word(&tokens[at[k]].token, "identity")
            && matches!(tokens[at[k + 1]].token, Token::LParen))
        {
            k += 1;
            continue;
        }
        let mut j = k + 2;
        while j < at.len() && !matches!(tokens[at[j]].token, Token::RParen | Token::LParen) {
            if j + 1 < at.len()
                && is_word(&tokens[at[j]].token, "sequence")
                && is_word(&tokens[at[j + 1]].token, "name")
                && let Some(e) = dotted_name_end(&tokens, &at, j + 2)
            {
                drop.extend(at[j..e].iter().copied());
                j = e;
            } else {
                j += 1;
            }
        }
        k = j;
    }
    without(tokens, drop)
}

/// Where a name written as words joined by periods (`public.users`) that starts at
/// `at[start]` ends (the index in `at` after it); `None` if no word starts there. `at`:
/// the positions of the tokens that are not trivia.
fn dotted_name_end(
    tokens: &[sqlparser::tokenizer::TokenWithSpan],
    at: &[usize],
    start: usize,
) -> Option<usize> {
    let word = |i: usize| {
        at.get(i)
            .is_some_and(|&p| matches!(tokens[p].token, Token::Word(_)))
    };
    if !word(start) {
        return None;
    }
    let mut end = start + 1;
    while at
        .get(end)
        .is_some_and(|&p| matches!(tokens[p].token, Token::Period))
        && word(end + 1)
    {
        end += 2;
    }
    Some(end)
}

/// The tokens without those at positions `drop`.
fn without(mut tokens: lex::StatementTokens, mut drop: Vec<usize>) -> lex::StatementTokens {
    if drop.is_empty() {
        return tokens;
    }
    drop.sort_unstable();
    let mut i = 0;
    tokens.retain(|_| {
        let keep = drop.binary_search(&i).is_err();
        i += 1;
        keep
    });
    tokens
}

/// Clauses of `CREATE TABLE` and `CREATE MATERIALIZED VIEW` that sqlparser does not read
/// and that neither embed an expression nor change what the statement reads or stores,
/// removed before parsing: `LIKE t INCLUDING ALL` / `EXCLUDING ...` options (which parts
/// of `t`'s definition to copy; `LIKE t` itself parses) and a trailing `WITH [NO] DATA`
/// (whether the query runs now or at the first refresh; judged as if now).
fn rewrite_create_options(tokens: lex::StatementTokens) -> lex::StatementTokens {
    let mut lead = tokens.iter().filter(|t| !lex::is_trivia(&t.token)).take(6);
    let create_table = lead.next().is_some_and(|t| is_word(&t.token, "create"))
        && lead.any(|t| is_word(&t.token, "table") || is_word(&t.token, "materialized"));
    if !create_table {
        return tokens;
    }
    let at: Vec<usize> = (0..tokens.len())
        .filter(|&i| !lex::is_trivia(&tokens[i].token))
        .collect();
    let mut drop = Vec::new();
    // `WITH DATA` / `WITH NO DATA` at the end (a `;` may follow).
    let mut end = at.len();
    if end > 0 && matches!(tokens[at[end - 1]].token, Token::SemiColon) {
        end -= 1;
    }
    let tail: Vec<usize> = at[..end].iter().rev().take(3).rev().copied().collect();
    match tail.as_slice() {
        [.., w, n, d]
            if is_word(&tokens[*w].token, "with")
                && is_word(&tokens[*n].token, "no")
                && is_word(&tokens[*d].token, "data") =>
        {
            drop.extend([*w, *n, *d]);
        }
        [.., w, d] if is_word(&tokens[*w].token, "with") && is_word(&tokens[*d].token, "data") => {
            drop.extend([*w, *d]);
        }
        _ => {}
    }
    // `LIKE t INCLUDING x EXCLUDING y` as a table element: after `(` or `,`, a name,
    // option pairs, then `,` or `)`. Nothing else is touched.
    let mut k = 1;
    while k < at.len() {
        let starts = is_word(&tokens[at[k]].token, "like")
            && matches!(tokens[at[k - 1]].token, Token::LParen | Token::Comma);
        if !starts {
            k += 1;
            continue;
        }
        let Some(mut j) = dotted_name_end(&tokens, &at, k + 1) else {
            k += 1;
            continue;
        };
        let mut options = Vec::new();
        while j + 1 < at.len()
            && (is_word(&tokens[at[j]].token, "including")
                || is_word(&tokens[at[j]].token, "excluding"))
            && matches!(tokens[at[j + 1]].token, Token::Word(_))
        {
            options.extend([at[j], at[j + 1]]);
            j += 2;
        }
        if j < at.len() && matches!(tokens[at[j]].token, Token::Comma | Token::RParen) {
            drop.extend(options);
        }
        k = j.max(k + 1);
    }
    without(tokens, drop)
}

/// Classification by leading keywords for statements sqlparser cannot always parse, used
/// only when parsing failed. Limited to statements whose grammar embeds no expressions or
/// queries (so nothing else can run inside them) or whose class is already restrictive
/// (held or denied by the shipped policies): a parse failure never makes a statement look
/// more harmless than its first words say.
fn after_parse_failure(w: &[&str], expression_free: bool) -> Option<StatementClass> {
    let dynamic = |k: Kind| {
        let mut c = StatementClass::new(k);
        c.dynamic_sql = true;
        Some(c)
    };
    let kind = match w {
        ["DROP", "DATABASE", ..] => Kind::Drop(Object::Database),
        ["DROP", "SCHEMA", ..] => Kind::Drop(Object::Schema),
        ["DROP", "TABLE", ..] => Kind::Drop(Object::Table),
        ["DROP", "OWNED", ..] => Kind::DropOwned,
        ["REASSIGN", "OWNED", ..] => Kind::ReassignOwned,
        ["TRUNCATE", ..] => Kind::Truncate,
        // Before `ALTER USER`: a user mapping holds the credentials a foreign server is
        // reached with, not a role.
        ["ALTER", "USER", "MAPPING", ..] => Kind::Alter(Object::UserMapping),
        ["DROP", "USER", "MAPPING", ..] => Kind::Drop(Object::UserMapping),
        ["ALTER", "SERVER", ..] => Kind::Alter(Object::Server),
        ["ALTER", "FOREIGN", "DATA", "WRAPPER", ..] => Kind::Alter(Object::ForeignDataWrapper),
        // Options, a new name or schema, an owner: no expression (`RESTART WITH 1`,
        // `OWNED BY t.id`).
        ["ALTER", "SEQUENCE", ..] => Kind::Alter(Object::Sequence),
        // Only the forms with nothing in parentheses and no default: a new owner, name or
        // schema, a renamed or added enum value or attribute of a plain type, a constraint
        // dropped or validated (`SET (RECEIVE = f)`, `SET DEFAULT`, `ADD CHECK (...)` are
        // left refused).
        ["ALTER", "TYPE", ..] if expression_free => Kind::Alter(Object::Type),
        ["ALTER", "DOMAIN", ..] if expression_free => Kind::Alter(Object::Domain),
        // Creates a foreign table for every table of a remote schema.
        ["IMPORT", "FOREIGN", "SCHEMA", ..] => Kind::Create(Object::ForeignTable),
        ["CREATE", "ROLE" | "USER" | "GROUP", ..] => Kind::Create(Object::Role),
        ["ALTER", "ROLE" | "USER" | "GROUP", ..] => Kind::Alter(Object::Role),
        ["DROP", "ROLE" | "USER" | "GROUP", ..] => Kind::Drop(Object::Role),
        ["CREATE", "FUNCTION", ..] | ["CREATE", "OR", "REPLACE", "FUNCTION"] => {
            return dynamic(Kind::Create(Object::Function));
        }
        ["CREATE", "PROCEDURE", ..] | ["CREATE", "OR", "REPLACE", "PROCEDURE"] => {
            return dynamic(Kind::Create(Object::Procedure));
        }
        ["CREATE", "RULE", ..] | ["CREATE", "OR", "REPLACE", "RULE"] => {
            return dynamic(Kind::Create(Object::Rule));
        }
        ["VACUUM", ..] => Kind::Vacuum,
        ["ANALYZE" | "ANALYSE", ..] => Kind::Analyze,
        _ => return None,
    };
    Some(StatementClass::new(kind))
}

/// Statements sqlparser does not parse, known by their first words. Their bodies are not
/// needed: the kind is the fact policies act on.
fn by_keyword(w: &[&str]) -> Option<StatementClass> {
    let kind = match w {
        ["DO", ..] => {
            let mut c = StatementClass::new(Kind::Do);
            c.dynamic_sql = true;
            return Some(c);
        }
        ["ALTER", "SYSTEM", ..] => Kind::AlterSystem,
        // sqlparser reads `LOAD DATA ...` (Hive) too; in PostgreSQL it is only a library.
        ["LOAD", ..] => Kind::Load,
        ["CHECKPOINT", ..] => Kind::Checkpoint,
        ["REINDEX", ..] => Kind::Reindex,
        ["CLUSTER", ..] => Kind::Cluster,
        ["SECURITY", "LABEL", ..] => Kind::SecurityLabel,
        _ => return None,
    };
    Some(StatementClass::new(kind))
}

fn object_of(t: &ObjectType) -> Object {
    match t {
        ObjectType::Table => Object::Table,
        ObjectType::View => Object::View,
        ObjectType::MaterializedView => Object::MaterializedView,
        ObjectType::Index => Object::Index,
        ObjectType::Schema => Object::Schema,
        ObjectType::Database => Object::Database,
        ObjectType::Role | ObjectType::User | ObjectType::Group => Object::Role,
        ObjectType::Sequence => Object::Sequence,
        ObjectType::Type => Object::Type,
        ObjectType::Collation => Object::Collation,
        ObjectType::ForeignTable => Object::ForeignTable,
        _ => Object::Other,
    }
}

/// The kind a statement has by itself.
fn own_kind(s: &Statement) -> Kind {
    use Statement as S;
    match s {
        S::Query(q) => match q.body.as_ref() {
            SetExpr::Select(sel) if sel.into.is_some() => Kind::Create(Object::Table),
            // `WITH ... INSERT/UPDATE/DELETE/MERGE` is a query wrapping the statement.
            SetExpr::Insert(inner)
            | SetExpr::Update(inner)
            | SetExpr::Delete(inner)
            | SetExpr::Merge(inner) => own_kind(inner),
            _ => Kind::Select,
        },
        S::Insert(_) => Kind::Insert,
        S::Update(_) => Kind::Update,
        S::Delete(_) => Kind::Delete,
        S::Merge(_) => Kind::Merge,
        S::Truncate(_) => Kind::Truncate,
        S::Copy { to, target, .. } => {
            // `target` is the outside end in both directions: STDIN/STDOUT, a file or a
            // program.
            let program = matches!(target, CopyTarget::Program { .. });
            let file = matches!(target, CopyTarget::File { .. });
            if program {
                Kind::CopyProgram
            } else if file {
                Kind::CopyFile
            } else if *to {
                Kind::CopyTo
            } else {
                Kind::CopyFrom
            }
        }
        S::CreateTable(_) => Kind::Create(Object::Table),
        S::CreateVirtualTable { .. } => Kind::Create(Object::Table),
        S::CreateView(v) => {
            if v.materialized {
                Kind::Create(Object::MaterializedView)
            } else {
                Kind::Create(Object::View)
            }
        }
        S::CreateIndex(_) => Kind::Create(Object::Index),
        S::CreateRole(_) | S::CreateUser(_) => Kind::Create(Object::Role),
        S::CreateSchema { .. } => Kind::Create(Object::Schema),
        S::CreateDatabase { .. } => Kind::Create(Object::Database),
        S::CreateFunction(_) => Kind::Create(Object::Function),
        S::CreateProcedure { .. } => Kind::Create(Object::Procedure),
        S::CreateTrigger(_) => Kind::Create(Object::Trigger),
        S::CreateExtension(_) => Kind::Create(Object::Extension),
        S::CreateSequence { .. } => Kind::Create(Object::Sequence),
        S::CreateType { .. } => Kind::Create(Object::Type),
        S::CreateDomain(_) => Kind::Create(Object::Domain),
        S::CreatePolicy(_) => Kind::Create(Object::Policy),
        S::CreateRule(_) => Kind::Create(Object::Rule),
        S::CreateServer(_) => Kind::Create(Object::Server),
        S::CreateForeignTable(_) => Kind::Create(Object::ForeignTable),
        S::CreateForeignDataWrapper(_) => Kind::Create(Object::ForeignDataWrapper),
        S::CreateUserMapping(_) => Kind::Create(Object::UserMapping),
        S::CreateCollation(_) => Kind::Create(Object::Collation),
        S::CreateOperator(_) | S::CreateOperatorFamily(_) | S::CreateOperatorClass(_) => {
            Kind::Create(Object::Operator)
        }
        S::CreateTextSearch(_) => Kind::Create(Object::TextSearch),
        S::CreateAggregate(_) => Kind::Create(Object::Aggregate),
        S::AlterTable(at) if at.table_type == Some(AlterTableType::Foreign) => {
            Kind::Alter(Object::ForeignTable)
        }
        S::AlterTable(_) => Kind::Alter(Object::Table),
        S::AlterSchema(_) => Kind::Alter(Object::Schema),
        S::AlterIndex { .. } => Kind::Alter(Object::Index),
        S::AlterView(v) if v.materialized => Kind::Alter(Object::MaterializedView),
        S::AlterView(_) => Kind::Alter(Object::View),
        S::AlterFunction(_) => Kind::Alter(Object::Function),
        S::AlterType(_) => Kind::Alter(Object::Type),
        S::AlterCollation(_) => Kind::Alter(Object::Collation),
        S::AlterOperator(_) | S::AlterOperatorFamily(_) | S::AlterOperatorClass(_) => {
            Kind::Alter(Object::Operator)
        }
        S::AlterTextSearch(_) => Kind::Alter(Object::TextSearch),
        S::AlterRole { .. } | S::AlterUser(_) => Kind::Alter(Object::Role),
        S::AlterPolicy(_) => Kind::Alter(Object::Policy),
        S::AlterTrigger(_) => Kind::Alter(Object::Trigger),
        S::AlterDefaultPrivileges(_) => Kind::Grant,
        S::RenameTable(_) => Kind::Alter(Object::Table),
        S::Drop { object_type, .. } => Kind::Drop(object_of(object_type)),
        S::DropFunction(_) => Kind::Drop(Object::Function),
        S::DropProcedure { .. } => Kind::Drop(Object::Procedure),
        S::DropTrigger(_) => Kind::Drop(Object::Trigger),
        S::DropDomain(_) => Kind::Drop(Object::Domain),
        S::DropPolicy(_) => Kind::Drop(Object::Policy),
        S::DropRule(_) => Kind::Drop(Object::Rule),
        S::DropExtension(_) => Kind::Drop(Object::Extension),
        S::DropOperator(_) | S::DropOperatorFamily(_) | S::DropOperatorClass(_) => {
            Kind::Drop(Object::Operator)
        }
        S::Comment { .. } => Kind::Comment,
        S::Grant(_) | S::GrantRole(_) => Kind::Grant,
        S::Revoke(_) | S::RevokeRole(_) | S::Deny(_) => Kind::Revoke,
        S::Set(set) => match set {
            sqlparser::ast::Set::SetRole { .. } => Kind::SetRole,
            sqlparser::ast::Set::SetSessionAuthorization(_) => Kind::SetSessionAuthorization,
            sqlparser::ast::Set::SingleAssignment { variable, .. } => {
                set_kind(&parts(variable).join("."))
            }
            _ => Kind::Set,
        },
        S::Reset(_) => Kind::Reset,
        S::ShowVariable { .. }
        | S::ShowVariables { .. }
        | S::ShowStatus { .. }
        | S::ShowCreate { .. }
        | S::ShowColumns { .. }
        | S::ShowTables { .. }
        | S::ShowFunctions { .. }
        | S::ShowSchemas { .. }
        | S::ShowDatabases { .. }
        | S::ShowCollation { .. }
        | S::ShowViews { .. }
        | S::ShowObjects(_)
        | S::ShowCharset(_)
        | S::ShowCatalogs { .. }
        | S::ShowProcessList { .. } => Kind::Show,
        S::Discard { .. } => Kind::Discard,
        S::StartTransaction { .. } => Kind::Begin,
        S::Commit { .. } => Kind::Commit,
        S::Rollback { savepoint, .. } => {
            if savepoint.is_some() {
                Kind::RollbackToSavepoint
            } else {
                Kind::Rollback
            }
        }
        S::Savepoint { .. } => Kind::Savepoint,
        S::ReleaseSavepoint { .. } => Kind::Release,
        S::Prepare { .. } => Kind::Prepare,
        S::Execute { .. } => Kind::Execute,
        S::Deallocate { .. } => Kind::Deallocate,
        S::Call(_) => Kind::Call,
        S::Vacuum(_) => Kind::Vacuum,
        S::Analyze(_) => Kind::Analyze,
        S::Lock(_) | S::LockTables { .. } => Kind::Lock,
        S::Load { .. } => Kind::Load,
        S::LISTEN { .. } => Kind::Listen,
        S::NOTIFY { .. } => Kind::Notify,
        S::UNLISTEN { .. } => Kind::Unlisten,
        S::Explain { .. } | S::ExplainTable { .. } => Kind::Explain,
        S::RefreshMaterializedView(_) => Kind::Refresh,
        S::Declare { .. } => Kind::Declare,
        S::Fetch { .. } => Kind::Fetch,
        S::Close { .. } => Kind::Close,
        _ => Kind::Other,
    }
}

/// Walks one statement with sqlparser's visitor. CTE names are scoped the way PostgreSQL
/// scopes them: a CTE's own body does not see itself (unless RECURSIVE), later CTEs and the
/// main query do. A relation named like a visible CTE is that CTE, not a table.
struct Collector<'a> {
    c: &'a mut StatementClass,
    frames: Vec<CteFrame>,
    /// Write targets whose relation visit is still to come (not counted as reads).
    pending_targets: HashMap<TableName, usize>,
    /// Table functions (`FROM dblink(...)`) whose name is about to be visited as a relation.
    skip_relations: usize,
    /// Inside EXPLAIN without ANALYZE: nested statements are planned, not run.
    plan_only: usize,
    /// Calls that keep an argument computed from rows ([`Danger::SideChannel`]), by the
    /// address of their name in the statement's tree.
    side_channel_calls: Vec<usize>,
    /// `set_config(name, ...)` calls over `pg_settings` whose `name` the query's `WHERE`
    /// fixes, by the address of the call: that name ([`set_config::pinned_name`]).
    pinned_settings: HashMap<usize, String>,
    /// `RANGE (...)`, `LIST (...)`, `HASH (...)` of `CREATE TABLE ... PARTITION BY`: the
    /// parser reads the strategy as a call, by the address of its node; a keyword, not a
    /// function (the key's own expressions are calls as anywhere).
    partition_strategies: Vec<usize>,
}

struct CteFrame {
    owner: *const Query,
    names: Vec<String>,
    bodies: Vec<*const Query>,
    recursive: bool,
    visible: usize,
}

impl Collector<'_> {
    fn is_cte(&self, t: &TableName) -> bool {
        t.schema.is_none()
            && self
                .frames
                .iter()
                .any(|f| f.names[..f.visible.min(f.names.len())].contains(&t.name))
    }

    fn write_target(&mut self, name: &ObjectName, visited_as_relation: bool) {
        let t = TableName::from_object(name);
        if visited_as_relation {
            *self.pending_targets.entry(t.clone()).or_default() += 1;
        }
        self.c.tables_written.insert(t);
    }

    fn add_kind(&mut self, k: Kind) {
        if self.plan_only == 0 {
            self.c.kinds.insert(k);
        }
    }

    /// A call, and whether it keeps an argument computed from rows (`from_rows`).
    fn call(&mut self, name: &ObjectName, from_rows: bool) {
        self.function(name);
        let f = parts(name).pop().unwrap_or_default();
        if from_rows && functions::keeps_arguments(&f) {
            self.c.dangerous.insert((f, Danger::SideChannel));
            self.side_channel_calls
                .push(std::ptr::from_ref(name) as usize);
        }
    }

    fn function(&mut self, name: &ObjectName) {
        let p = parts(name);
        let f = p.last().cloned().unwrap_or_default();
        let schema = p.len().checked_sub(2).map(|i| p[i].as_str());
        if !(builtins::is_builtin(&f) && schema.is_none_or(|s| s == "pg_catalog")) {
            self.c.user_functions.insert(p.join("."));
        }
        if let Some(d) = functions::danger_of(&f) {
            self.c.dangerous.insert((f.clone(), d));
        }
        if functions::runs_sql_text(&f) {
            self.c.dynamic_sql = true;
        }
        self.c.functions.insert(f);
    }

    /// An operator by its name (`~~~`, `<=>`): one PostgreSQL does not define runs the
    /// function some schema defines under it. Keyword operators (`AND`, `LIKE`) are
    /// PostgreSQL's grammar, not names.
    fn operator(&mut self, op: &str) {
        if !op.is_empty()
            && op.bytes().all(quick::is_operator)
            && !builtins::is_builtin_operator(op)
        {
            self.c.user_functions.insert(op.to_owned());
        }
    }

    /// What setting a parameter (by `SET` or `set_config`) may do beyond its kind:
    /// `values` as PostgreSQL reads them (a path's schemas one by one).
    fn setting(&mut self, name: &str, values: &[String]) {
        let danger = match name {
            // Unqualified built-in names would resolve to another schema's functions and
            // operators.
            "search_path" => search_path::shadows_catalog(values),
            // The server would read the session's text otherwise than the classifier.
            "client_encoding" => values.first().is_some_and(|e| lex::swallows_ascii(e)),
            _ => false,
        };
        if danger {
            self.c
                .dangerous
                .insert((name.to_owned(), functions::Danger::Config));
        }
    }

    fn returning_reads(&mut self, target: &ObjectName, returning: bool) {
        if returning {
            self.c.tables_read.insert(TableName::from_object(target));
        }
    }
}

/// Whether the parser's "call" is one of the keywords `words` before parentheses: a
/// single unquoted name (a quoted one is a function's name).
fn is_keyword_call(f: &sqlparser::ast::Function, words: &[&str]) -> bool {
    matches!(f.name.0.as_slice(), [ObjectNamePart::Identifier(i)]
        if i.quote_style.is_none() && words.iter().any(|w| i.value.eq_ignore_ascii_case(w)))
}

/// `ARRAY(subquery)`: the keyword (a quoted `"array"` is a name, and takes no subquery in
/// PostgreSQL's grammar) before a parenthesised query.
fn is_array_constructor(f: &sqlparser::ast::Function) -> bool {
    matches!(f.args, FunctionArguments::Subquery(_)) && is_keyword_call(f, &["array"])
}

/// Whether a call's argument is computed from rows: it mentions a column, a whole row or a
/// subquery (literals, parameters and functions of them are not).
fn argument_reads_rows(a: &FunctionArg) -> bool {
    struct V(bool);
    impl Visitor for V {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.0 = true;
            ControlFlow::Break(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if matches!(
                e,
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) | Expr::QualifiedWildcard(..)
            ) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let (FunctionArg::Unnamed(e)
    | FunctionArg::Named { arg: e, .. }
    | FunctionArg::ExprNamed { arg: e, .. }) = a;
    match e {
        FunctionArgExpr::Expr(e) => {
            let mut v = V(false);
            let _ = e.visit(&mut v);
            v.0
        }
        FunctionArgExpr::QualifiedWildcard(_)
        | FunctionArgExpr::Wildcard
        | FunctionArgExpr::WildcardWithOptions(_) => true,
    }
}

/// Whether an EXPLAIN executes its statement: `EXPLAIN ANALYZE` or `EXPLAIN (ANALYZE [on])`.
fn explain_runs(s: &Statement) -> bool {
    let Statement::Explain {
        analyze, options, ..
    } = s
    else {
        return false;
    };
    *analyze
        || options.iter().flatten().any(|o| {
            let name = o.name.value.to_ascii_lowercase();
            (name == "analyze" || name == "analyse")
                && o.arg.as_ref().is_none_or(|a| {
                    !matches!(
                        a.to_string().to_ascii_lowercase().trim_matches('\''),
                        "false" | "off" | "0" | "no"
                    )
                })
        })
}

/// `SELECT ... INTO t` names its new table as an expression.
fn expr_object_name(e: &Expr) -> Option<ObjectName> {
    match e {
        Expr::Identifier(i) => Some(ObjectName::from(vec![i.clone()])),
        Expr::CompoundIdentifier(ids) => Some(ObjectName::from(ids.clone())),
        _ => None,
    }
}

fn missing_where(selection: Option<&Expr>) -> bool {
    selection.is_none_or(predicate::is_trivially_true)
}

fn table_factor_name(tf: &TableFactor) -> Option<&ObjectName> {
    match tf {
        TableFactor::Table {
            name, args: None, ..
        } => Some(name),
        _ => None,
    }
}

impl Visitor for Collector<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        let ptr: *const Query = q;
        if let Some(top) = self.frames.last_mut()
            && let Some(i) = top.bodies.iter().position(|b| std::ptr::eq(*b, ptr))
            && !top.recursive
        {
            top.visible = i;
        }
        if let Some(with) = &q.with {
            let names: Vec<String> = with
                .cte_tables
                .iter()
                .map(|c| ident_name(&c.alias.name))
                .collect();
            let n = names.len();
            self.frames.push(CteFrame {
                owner: ptr,
                bodies: with
                    .cte_tables
                    .iter()
                    .map(|c| std::ptr::from_ref(c.query.as_ref()))
                    .collect(),
                names,
                recursive: with.recursive,
                // WITH RECURSIVE: every CTE sees every name.
                visible: if with.recursive { n } else { 0 },
            });
        }
        if let Some(name) = set_config::pinned_name(q, |t| self.is_cte(t)) {
            for f in set_config::select_list_calls(q) {
                self.pinned_settings
                    .insert(std::ptr::from_ref(f) as usize, name.clone());
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        let ptr: *const Query = q;
        if self
            .frames
            .last()
            .is_some_and(|f| std::ptr::eq(f.owner, ptr))
        {
            self.frames.pop();
        }
        if let Some(top) = self.frames.last_mut()
            && let Some(i) = top.bodies.iter().position(|b| std::ptr::eq(*b, ptr))
        {
            top.visible = top.visible.max(i + 1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.skip_relations > 0 {
            self.skip_relations -= 1;
            return ControlFlow::Continue(());
        }
        let t = TableName::from_object(relation);
        if let Some(n) = self.pending_targets.get_mut(&t)
            && *n > 0
        {
            *n -= 1;
            return ControlFlow::Continue(());
        }
        if !self.is_cte(&t) {
            self.c.tables_read.insert(t);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table {
                name,
                args: Some(a),
                ..
            } => {
                // `FROM f(...)` is a function call whose name the visitor reports as a
                // relation next.
                self.call(name, a.args.iter().any(argument_reads_rows));
                self.skip_relations += 1;
            }
            TableFactor::Function { name, args, .. } => {
                self.call(name, args.iter().any(argument_reads_rows))
            }
            TableFactor::UNNEST { .. } => {
                self.c.functions.insert("unnest".to_owned());
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            // `ARRAY(SELECT ...)` is PostgreSQL's array constructor, which the parser
            // reports as a call of a function named `array`; no function runs (the query
            // inside is visited like any other).
            Expr::Function(f) if is_array_constructor(f) => {}
            Expr::Function(f)
                if self
                    .partition_strategies
                    .contains(&(std::ptr::from_ref(f) as usize)) => {}
            // A `SET` written as a call: judged as that `SET`.
            Expr::Function(f)
                if let Some(set) = set_config::setting(
                    f,
                    self.pinned_settings
                        .get(&(std::ptr::from_ref(f) as usize))
                        .map(String::as_str),
                ) =>
            {
                self.c.functions.insert("set_config".to_owned());
                self.add_kind(set_kind(&set.name));
                let values = if set.name == "search_path" {
                    search_path::parse_list(&set.value)
                } else {
                    vec![set.value]
                };
                self.setting(&set.name, &values);
            }
            Expr::Function(f) => {
                let from_rows = match &f.args {
                    FunctionArguments::List(l) => l.args.iter().any(argument_reads_rows),
                    // `f(SELECT ...)`
                    FunctionArguments::Subquery(_) => true,
                    FunctionArguments::None => false,
                };
                self.call(&f.name, from_rows);
            }
            // `a OPERATOR(app.===) b` calls the function behind another schema's operator;
            // `OPERATOR(~~~)` that of whichever schema defines the name.
            Expr::BinaryOp {
                op: BinaryOperator::PGCustomBinaryOperator(name),
                ..
            } => match name.as_slice() {
                [op] => self.operator(op),
                [schema, .., _] if !schema.eq_ignore_ascii_case("pg_catalog") => {
                    self.c.user_functions.insert(name.join("."));
                }
                _ => {}
            },
            Expr::BinaryOp { op, .. } => self.operator(&op.to_string()),
            Expr::UnaryOp { op, .. } => self.operator(&op.to_string()),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        use Statement as S;
        self.add_kind(own_kind(s));
        for k in implied_kinds(s) {
            self.add_kind(k);
        }
        if let Some((name, values)) = set_assignment(s) {
            self.setting(&name, &values);
        }
        match s {
            S::Query(q) => {
                if let SetExpr::Select(sel) = q.body.as_ref()
                    && let Some(into) = &sel.into
                {
                    for t in &into.targets {
                        if let Some(name) = expr_object_name(t) {
                            self.write_target(&name, false);
                        }
                    }
                }
            }
            S::Insert(i) => {
                if let TableObject::TableName(name) = &i.table {
                    self.write_target(name, true);
                    self.returning_reads(name, i.returning.is_some());
                }
            }
            S::Update(u) => {
                if self.plan_only == 0 && missing_where(u.selection.as_ref()) {
                    self.c.missing_where = true;
                }
                if let Some(name) = table_factor_name(&u.table.relation) {
                    self.write_target(name, true);
                    self.returning_reads(name, u.returning.is_some());
                }
            }
            S::Delete(d) => {
                if self.plan_only == 0 && missing_where(d.selection.as_ref()) {
                    self.c.missing_where = true;
                }
                let from = match &d.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
                };
                let targets: Vec<&ObjectName> = if d.tables.is_empty() {
                    from.iter()
                        .filter_map(|t| table_factor_name(&t.relation))
                        .collect()
                } else {
                    d.tables.iter().collect()
                };
                for name in targets {
                    self.write_target(name, true);
                    self.returning_reads(name, d.returning.is_some());
                }
            }
            S::Merge(m) => {
                if self.plan_only == 0 && predicate::is_trivially_true(&m.on) {
                    self.c.missing_where = true;
                }
                if let Some(name) = table_factor_name(&m.table) {
                    self.write_target(name, true);
                }
                for clause in &m.clauses {
                    match &clause.action {
                        MergeAction::Insert(_) => self.add_kind(Kind::Insert),
                        MergeAction::Update(_) => self.add_kind(Kind::Update),
                        MergeAction::Delete { .. } => self.add_kind(Kind::Delete),
                        _ => {}
                    }
                }
            }
            S::Truncate(t) => {
                for target in &t.table_names {
                    self.write_target(&target.name, false);
                }
            }
            S::Copy {
                source, to, target, ..
            } => {
                if let CopySource::Table { table_name, .. } = source {
                    if *to {
                        self.c
                            .tables_read
                            .insert(TableName::from_object(table_name));
                    } else {
                        self.write_target(table_name, false);
                    }
                }
                // A program or file on either side is named by the target field.
                if matches!(target, CopyTarget::Program { .. }) {
                    self.add_kind(Kind::CopyProgram);
                }
            }
            S::CreateTable(ct) => {
                self.write_target(&ct.name, true);
                if let Some(Expr::Function(f)) = ct.partition_by.as_deref()
                    && is_keyword_call(f, &["range", "list", "hash"])
                {
                    self.partition_strategies
                        .push(std::ptr::from_ref(f) as usize);
                }
            }
            S::CreateForeignTable(ft) => self.write_target(&ft.name, true),
            S::CreateView(v) => self.write_target(&v.name, true),
            S::AlterTable(at) => {
                self.write_target(&at.name, true);
                // A child added to or taken from a parent changes which rows the parent
                // holds, and where rows written into it may be stored.
                for op in &at.operations {
                    match op {
                        AlterTableOperation::Inherit { parent } => {
                            self.write_target(parent, false);
                            self.c.attaches = true;
                        }
                        AlterTableOperation::NoInherit { parent } => {
                            self.write_target(parent, false);
                        }
                        AlterTableOperation::AttachPartitionOf { .. } => self.c.attaches = true,
                        _ => {}
                    }
                }
            }
            S::Drop {
                object_type, names, ..
            } => {
                if matches!(
                    object_type,
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView
                ) {
                    for n in names {
                        self.write_target(n, false);
                    }
                }
            }
            // An operator or aggregate runs the functions it names wherever it is used
            // later, under a name that shows none of them: they count as called here.
            S::CreateOperator(op) => {
                self.function(&op.function);
                for o in &op.options {
                    if let OperatorOption::Restrict(Some(f)) | OperatorOption::Join(Some(f)) = o {
                        self.function(f);
                    }
                }
            }
            S::CreateAggregate(a) => {
                for o in &a.options {
                    use CreateAggregateOption as A;
                    if let A::StateTransitionFunction(f)
                    | A::FinalFunction(f)
                    | A::CombineFunction(f)
                    | A::SerialFunction(f)
                    | A::DeserialFunction(f)
                    | A::MovingStateTransitionFunction(f)
                    | A::MovingInverseTransitionFunction(f)
                    | A::MovingFinalFunction(f) = o
                    {
                        self.function(f);
                    }
                }
            }
            S::CreateFunction(_) | S::CreateProcedure { .. } | S::CreateRule(_) => {
                // Bodies are SQL (or PL/pgSQL) run later, out of sight.
                self.c.dynamic_sql = true;
            }
            S::Call(f) => self.function(&f.name),
            S::Prepare { name, .. } => self.c.prepared = Some(ident_name(name)),
            S::Declare { stmts, .. } => self
                .c
                .cursors
                .extend(stmts.iter().flat_map(|d| d.names.iter().map(ident_name))),
            // `ALL` is a keyword there; `"ALL"` names a statement.
            S::Deallocate { name, .. } => {
                if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") {
                    self.c.drops_all_prepared = true;
                } else {
                    self.c.prepared = Some(ident_name(name));
                }
            }
            S::Discard {
                object_type: sqlparser::ast::DiscardObject::ALL,
            } => self.c.drops_all_prepared = true,
            S::Execute {
                name: Some(name), ..
            } => {
                self.c.prepared = parts(name).pop();
            }
            S::Explain { .. } if !explain_runs(s) => self.plan_only += 1,
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        if matches!(s, Statement::Explain { .. }) && !explain_runs(s) {
            self.plan_only -= 1;
        }
        ControlFlow::Continue(())
    }
}

/// The parameter a `SET [SESSION | LOCAL] name = ...` (or `SET NAMES`) sets and the values
/// it gives, as PostgreSQL reads them: names folded as identifiers are, a string literal
/// as written.
fn set_assignment(s: &Statement) -> Option<(String, Vec<String>)> {
    match s {
        Statement::Set(sqlparser::ast::Set::SetNames { charset_name, .. }) => Some((
            "client_encoding".to_owned(),
            vec![charset_name.value.clone()],
        )),
        Statement::Set(sqlparser::ast::Set::SingleAssignment {
            variable, values, ..
        }) => {
            let values = values
                .iter()
                .map(|v| match v {
                    Expr::Identifier(i) => ident_name(i),
                    Expr::Value(v) => match &v.value {
                        sqlparser::ast::Value::SingleQuotedString(t) => t.clone(),
                        other => other.to_string(),
                    },
                    other => other.to_string().to_lowercase(),
                })
                .collect();
            Some((parts(variable).join("."), values))
        }
        _ => None,
    }
}

/// The kind of setting a parameter: `role` and `session_authorization` change who the
/// session is.
fn set_kind(name: &str) -> Kind {
    match name {
        "role" => Kind::SetRole,
        "session_authorization" => Kind::SetSessionAuthorization,
        _ => Kind::Set,
    }
}

/// The kinds a statement has beside its own: what its `ALTER TABLE` operations do
/// (`drop_column`, `row_security`, `alter_owner`, `alter_trigger` for enabling or disabling
/// one), `alter_owner` for the other `OWNER TO`s, and `drop_cascade` for a DROP that says
/// CASCADE (it then drops what depends on its objects too).
fn implied_kinds(s: &Statement) -> Vec<Kind> {
    use Statement as S;
    let cascade = |b: &Option<DropBehavior>| matches!(b, Some(DropBehavior::Cascade));
    let action = |a: &Option<ReferentialAction>| matches!(a, Some(ReferentialAction::Cascade));
    let mut out = Vec::new();
    let mut cascades = false;
    match s {
        S::AlterTable(at) => {
            for op in &at.operations {
                use AlterTableOperation as O;
                match op {
                    O::DropColumn { drop_behavior, .. } => {
                        out.push(Kind::DropColumn);
                        cascades |= cascade(drop_behavior);
                    }
                    O::DropConstraint { drop_behavior, .. }
                    | O::DropPrimaryKey { drop_behavior }
                    | O::DropForeignKey { drop_behavior, .. } => {
                        cascades |= cascade(drop_behavior);
                    }
                    O::OwnerTo { .. } => out.push(Kind::AlterOwner),
                    O::EnableRowLevelSecurity
                    | O::DisableRowLevelSecurity
                    | O::ForceRowLevelSecurity
                    | O::NoForceRowLevelSecurity => out.push(Kind::RowSecurity),
                    // Turning a trigger off or on changes what runs on every row written.
                    O::EnableTrigger { .. }
                    | O::DisableTrigger { .. }
                    | O::EnableAlwaysTrigger { .. }
                    | O::EnableReplicaTrigger { .. } => out.push(Kind::Alter(Object::Trigger)),
                    // So does turning a rule off or on (what a write is rewritten into).
                    O::DisableRule { .. }
                    | O::EnableRule { .. }
                    | O::EnableAlwaysRule { .. }
                    | O::EnableReplicaRule { .. } => out.push(Kind::Alter(Object::Rule)),
                    _ => {}
                }
            }
        }
        S::AlterView(v) if matches!(v.operation, AlterViewOperation::OwnerTo(_)) => {
            out.push(Kind::AlterOwner);
        }
        S::AlterSchema(a)
            if a.operations
                .iter()
                .any(|o| matches!(o, AlterSchemaOperation::OwnerTo { .. })) =>
        {
            out.push(Kind::AlterOwner);
        }
        S::Drop { cascade: c, .. } => cascades = *c,
        S::DropFunction(d) => cascades = cascade(&d.drop_behavior),
        S::DropProcedure { drop_behavior, .. } => cascades = cascade(drop_behavior),
        S::DropDomain(d) => cascades = cascade(&d.drop_behavior),
        S::DropPolicy(d) => cascades = cascade(&d.drop_behavior),
        S::DropRule(d) => cascades = cascade(&d.drop_behavior),
        S::DropOperator(d) => cascades = cascade(&d.drop_behavior),
        S::DropOperatorFamily(d) => cascades = cascade(&d.drop_behavior),
        S::DropOperatorClass(d) => cascades = cascade(&d.drop_behavior),
        S::DropExtension(d) => cascades = action(&d.cascade_or_restrict),
        S::DropTrigger(d) => cascades = action(&d.option),
        _ => {}
    }
    if cascades {
        out.push(Kind::DropCascade);
    }
    out
}

fn classify_statement(s: &Statement) -> StatementClass {
    let mut c = StatementClass::new(own_kind(s));
    let mut v = Collector {
        c: &mut c,
        frames: Vec::new(),
        pending_targets: HashMap::new(),
        skip_relations: 0,
        plan_only: 0,
        side_channel_calls: Vec::new(),
        pinned_settings: HashMap::new(),
        partition_strategies: Vec::new(),
    };
    let _ = s.visit(&mut v);
    let side_channel_calls = v.side_channel_calls;
    c.shape = lineage::shape(s);
    c.stored = lineage::stored(s);
    // Calls that keep values computed from rows are traced to the columns they keep, for
    // the copy check to judge against the masks; only when every such call is (the same
    // nodes of this tree), the statement is no danger.
    if !side_channel_calls.is_empty() {
        let kept = lineage::kept(s);
        if side_channel_calls.iter().all(|a| kept.calls.contains(a)) {
            c.dangerous.retain(|(_, d)| *d != Danger::SideChannel);
        }
        c.stored.extend(kept.stored);
    }
    c
}

#[cfg(test)]
mod tests;
