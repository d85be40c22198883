//! Statement kinds and the groups policies can name (`@ddl`, `@privilege`, ...).

use std::fmt;

/// Object types of CREATE / ALTER / DROP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Object {
    Database,
    Schema,
    Table,
    View,
    MaterializedView,
    Index,
    Sequence,
    Function,
    Procedure,
    Trigger,
    Role,
    Extension,
    Type,
    Domain,
    Policy,
    Rule,
    Server,
    ForeignTable,
    ForeignDataWrapper,
    UserMapping,
    Collation,
    Operator,
    Aggregate,
    TextSearch,
    Other,
}

impl Object {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Schema => "schema",
            Self::Table => "table",
            Self::View => "view",
            Self::MaterializedView => "materialized_view",
            Self::Index => "index",
            Self::Sequence => "sequence",
            Self::Function => "function",
            Self::Procedure => "procedure",
            Self::Trigger => "trigger",
            Self::Role => "role",
            Self::Extension => "extension",
            Self::Type => "type",
            Self::Domain => "domain",
            Self::Policy => "policy",
            Self::Rule => "rule",
            Self::Server => "server",
            Self::ForeignTable => "foreign_table",
            Self::ForeignDataWrapper => "foreign_data_wrapper",
            Self::UserMapping => "user_mapping",
            Self::Collation => "collation",
            Self::Operator => "operator",
            Self::Aggregate => "aggregate",
            Self::TextSearch => "text_search",
            Self::Other => "object",
        }
    }
}

/// What a statement does. The string forms (`drop_table`, `copy_program`) are what policy
/// files match, with globs (`drop_*`) and groups (`@ddl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    /// `COPY ... TO STDOUT` (or to a client).
    CopyTo,
    /// `COPY ... FROM STDIN`.
    CopyFrom,
    /// `COPY ... TO/FROM PROGRAM`: runs a shell command on the server.
    CopyProgram,
    /// `COPY ... TO/FROM 'file'`: server file system access.
    CopyFile,
    Create(Object),
    Alter(Object),
    Drop(Object),
    AlterSystem,
    Comment,
    Grant,
    Revoke,
    Set,
    SetRole,
    SetSessionAuthorization,
    Reset,
    Show,
    Discard,
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Release,
    RollbackToSavepoint,
    Prepare,
    Execute,
    Deallocate,
    Do,
    Call,
    Vacuum,
    Analyze,
    Lock,
    Listen,
    Notify,
    Unlisten,
    Explain,
    Refresh,
    Checkpoint,
    Reindex,
    Cluster,
    SecurityLabel,
    Declare,
    Fetch,
    Close,
    Other,
}

impl Kind {
    /// The name policies use.
    pub fn name(self) -> String {
        match self {
            Self::Create(o) => format!("create_{}", o.as_str()),
            Self::Alter(o) => format!("alter_{}", o.as_str()),
            Self::Drop(o) => format!("drop_{}", o.as_str()),
            other => other.simple_name().to_owned(),
        }
    }

    fn simple_name(self) -> &'static str {
        match self {
            Self::Select => "select",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Merge => "merge",
            Self::Truncate => "truncate",
            Self::CopyTo => "copy_to",
            Self::CopyFrom => "copy_from",
            Self::CopyProgram => "copy_program",
            Self::CopyFile => "copy_file",
            Self::AlterSystem => "alter_system",
            Self::Comment => "comment",
            Self::Grant => "grant",
            Self::Revoke => "revoke",
            Self::Set => "set",
            Self::SetRole => "set_role",
            Self::SetSessionAuthorization => "set_session_authorization",
            Self::Reset => "reset",
            Self::Show => "show",
            Self::Discard => "discard",
            Self::Begin => "begin",
            Self::Commit => "commit",
            Self::Rollback => "rollback",
            Self::Savepoint => "savepoint",
            Self::Release => "release",
            Self::RollbackToSavepoint => "rollback_to_savepoint",
            Self::Prepare => "prepare",
            Self::Execute => "execute",
            Self::Deallocate => "deallocate",
            Self::Do => "do",
            Self::Call => "call",
            Self::Vacuum => "vacuum",
            Self::Analyze => "analyze",
            Self::Lock => "lock",
            Self::Listen => "listen",
            Self::Notify => "notify",
            Self::Unlisten => "unlisten",
            Self::Explain => "explain",
            Self::Refresh => "refresh",
            Self::Checkpoint => "checkpoint",
            Self::Reindex => "reindex",
            Self::Cluster => "cluster",
            Self::SecurityLabel => "security_label",
            Self::Declare => "declare",
            Self::Fetch => "fetch",
            Self::Close => "close",
            Self::Other => "other",
            Self::Create(_) | Self::Alter(_) | Self::Drop(_) => "ddl",
        }
    }

    /// Whether the kind belongs to a named group.
    pub fn in_group(self, group: &str) -> bool {
        use Kind::*;
        match group {
            "read" => matches!(self, Select | CopyTo | Show | Explain | Fetch),
            "write" => matches!(
                self,
                Insert | Update | Delete | Merge | Truncate | CopyFrom | Refresh
            ),
            "dml" => matches!(self, Insert | Update | Delete | Merge | CopyFrom),
            "ddl" => matches!(
                self,
                Create(_)
                    | Alter(_)
                    | Drop(_)
                    | Truncate
                    | Comment
                    | Refresh
                    | Reindex
                    | Cluster
                    | SecurityLabel
            ),
            "destructive" => matches!(
                self,
                Drop(Object::Database | Object::Schema | Object::Table) | Truncate
            ),
            "privilege" => matches!(
                self,
                Grant
                    | Revoke
                    | Create(Object::Role)
                    | Alter(Object::Role)
                    | Drop(Object::Role)
                    | SetRole
                    | SetSessionAuthorization
            ),
            "transaction" => matches!(
                self,
                Begin | Commit | Rollback | Savepoint | Release | RollbackToSavepoint
            ),
            "session" => matches!(self, Set | Reset | Show | Discard),
            "prepared" => matches!(self, Prepare | Execute | Deallocate),
            "admin" => matches!(
                self,
                Vacuum | Analyze | Checkpoint | Reindex | Cluster | Lock | AlterSystem
            ),
            "copy" => matches!(self, CopyTo | CopyFrom | CopyProgram | CopyFile),
            "pubsub" => matches!(self, Listen | Notify | Unlisten),
            "cursor" => matches!(self, Declare | Fetch | Close),
            _ => false,
        }
    }

    /// Names of the groups, for validation and docs.
    pub const GROUPS: [&'static str; 14] = [
        "read",
        "write",
        "dml",
        "ddl",
        "destructive",
        "privilege",
        "transaction",
        "session",
        "prepared",
        "admin",
        "copy",
        "pubsub",
        "cursor",
        "dynamic",
    ];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// Every kind, for validating policy files and comparing patterns.
pub fn all_kinds() -> Vec<Kind> {
    use Kind::*;
    let objects = [
        Object::Database,
        Object::Schema,
        Object::Table,
        Object::View,
        Object::MaterializedView,
        Object::Index,
        Object::Sequence,
        Object::Function,
        Object::Procedure,
        Object::Trigger,
        Object::Role,
        Object::Extension,
        Object::Type,
        Object::Domain,
        Object::Policy,
        Object::Rule,
        Object::Server,
        Object::ForeignTable,
        Object::ForeignDataWrapper,
        Object::UserMapping,
        Object::Collation,
        Object::Operator,
        Object::Aggregate,
        Object::TextSearch,
        Object::Other,
    ];
    let mut out = vec![
        Select,
        Insert,
        Update,
        Delete,
        Merge,
        Truncate,
        CopyTo,
        CopyFrom,
        CopyProgram,
        CopyFile,
        AlterSystem,
        Comment,
        Grant,
        Revoke,
        Set,
        SetRole,
        SetSessionAuthorization,
        Reset,
        Show,
        Discard,
        Begin,
        Commit,
        Rollback,
        Savepoint,
        Release,
        RollbackToSavepoint,
        Prepare,
        Execute,
        Deallocate,
        Do,
        Call,
        Vacuum,
        Analyze,
        Lock,
        Listen,
        Notify,
        Unlisten,
        Explain,
        Refresh,
        Checkpoint,
        Reindex,
        Cluster,
        SecurityLabel,
        Declare,
        Fetch,
        Close,
        Other,
    ];
    for o in objects {
        out.extend([Create(o), Alter(o), Drop(o)]);
    }
    out
}

/// Every kind name, for validating policy files (a rule naming a kind that does not exist
/// would silently never match).
pub fn all_kind_names() -> Vec<String> {
    all_kinds().into_iter().map(Kind::name).collect()
}
