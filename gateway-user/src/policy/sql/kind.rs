//! Statement kinds and the groups policies can name (`@ddl`, `@privilege`, ...).

use std::fmt;

/// Declares a fieldless enum whose variants each have a fixed name, listed once: the enum,
/// `as_str` and `ALL` (every variant, in declaration order) all come from the one list.
macro_rules! named {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$m])*
        $vis enum $name {
            $($(#[$vm])* $variant,)*
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }
    };
}

named! {
    /// Object types of CREATE / ALTER / DROP.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Object {
        Database = "database",
        Schema = "schema",
        Table = "table",
        View = "view",
        MaterializedView = "materialized_view",
        Index = "index",
        Sequence = "sequence",
        Function = "function",
        Procedure = "procedure",
        Trigger = "trigger",
        Role = "role",
        Extension = "extension",
        Type = "type",
        Domain = "domain",
        Policy = "policy",
        Rule = "rule",
        Server = "server",
        ForeignTable = "foreign_table",
        ForeignDataWrapper = "foreign_data_wrapper",
        UserMapping = "user_mapping",
        Collation = "collation",
        Operator = "operator",
        Aggregate = "aggregate",
        TextSearch = "text_search",
        Other = "object",
    }
}

/// Declares `Kind`: the variants that stand alone, each with the name policies use, around
/// the three that carry an [`Object`]. The list is the only place a kind is spelled out; the
/// enum, `simple_name` and `all_kinds` come from it, and the order is the enum's (`Ord`).
macro_rules! kinds {
    (
        $($(#[$bm:meta])* $before:ident = $btext:literal,)*
        ; Create, Alter, Drop ;
        $($(#[$am:meta])* $after:ident = $atext:literal,)*
    ) => {
        /// What a statement does. The string forms (`drop_table`, `copy_program`) are what
        /// policy files match, with globs (`drop_*`) and groups (`@ddl`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $($(#[$bm])* $before,)*
            Create(Object),
            Alter(Object),
            Drop(Object),
            $($(#[$am])* $after,)*
        }

        impl Kind {
            /// The kinds that carry no object, in declaration order.
            const STANDALONE: &'static [Kind] = &[$(Kind::$before,)* $(Kind::$after,)*];

            fn simple_name(self) -> &'static str {
                match self {
                    $(Self::$before => $btext,)*
                    $(Self::$after => $atext,)*
                    Self::Create(_) | Self::Alter(_) | Self::Drop(_) => "ddl",
                }
            }
        }
    };
}

kinds! {
    Select = "select",
    Insert = "insert",
    Update = "update",
    Delete = "delete",
    Merge = "merge",
    Truncate = "truncate",
    /// `COPY ... TO STDOUT` (or to a client).
    CopyTo = "copy_to",
    /// `COPY ... FROM STDIN`.
    CopyFrom = "copy_from",
    /// `COPY ... TO/FROM PROGRAM`: runs a shell command on the server.
    CopyProgram = "copy_program",
    /// `COPY ... TO/FROM 'file'`: server file system access.
    CopyFile = "copy_file",
    ; Create, Alter, Drop ;
    /// `ALTER TABLE ... DROP COLUMN`: the column's values are gone (beside `alter_table`).
    DropColumn = "drop_column",
    /// A `DROP ... CASCADE` (or `ALTER TABLE ... DROP ... CASCADE`): it also drops whatever
    /// depends on the object, which for a type, domain or extension includes table columns
    /// (beside the statement's own `drop_<object>`).
    DropCascade = "drop_cascade",
    /// `DROP OWNED BY role`: drops every object the role owns, tables included.
    DropOwned = "drop_owned",
    /// `REASSIGN OWNED BY role TO other`: hands a role's objects to another.
    ReassignOwned = "reassign_owned",
    /// `LOAD 'library'`: loads a shared library into the server process.
    Load = "load",
    /// `ALTER TABLE ... ENABLE | DISABLE | FORCE | NO FORCE ROW LEVEL SECURITY`: whether the
    /// table's row security policies decide who sees which rows (beside `alter_table`).
    RowSecurity = "row_security",
    /// `ALTER TABLE | VIEW | MATERIALIZED VIEW | SCHEMA ... OWNER TO`: the new owner may do
    /// anything with the object (beside the statement's own kind).
    AlterOwner = "alter_owner",
    AlterSystem = "alter_system",
    Comment = "comment",
    Grant = "grant",
    Revoke = "revoke",
    Set = "set",
    SetRole = "set_role",
    SetSessionAuthorization = "set_session_authorization",
    Reset = "reset",
    Show = "show",
    Discard = "discard",
    Begin = "begin",
    Commit = "commit",
    Rollback = "rollback",
    Savepoint = "savepoint",
    Release = "release",
    RollbackToSavepoint = "rollback_to_savepoint",
    Prepare = "prepare",
    Execute = "execute",
    Deallocate = "deallocate",
    Do = "do",
    Call = "call",
    Vacuum = "vacuum",
    Analyze = "analyze",
    Lock = "lock",
    Listen = "listen",
    Notify = "notify",
    Unlisten = "unlisten",
    Explain = "explain",
    Refresh = "refresh",
    Checkpoint = "checkpoint",
    Reindex = "reindex",
    Cluster = "cluster",
    SecurityLabel = "security_label",
    Declare = "declare",
    Fetch = "fetch",
    Close = "close",
    Other = "other",
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
                    | DropColumn
                    | DropCascade
                    | DropOwned
                    | ReassignOwned
                    | Truncate
                    | Comment
                    | Refresh
                    | Reindex
                    | Cluster
                    | SecurityLabel
            ),
            "destructive" => matches!(
                self,
                Drop(Object::Database | Object::Schema | Object::Table)
                    | Truncate
                    | DropColumn
                    | DropCascade
                    | DropOwned
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
                    | ReassignOwned
                    | RowSecurity
                    | AlterOwner
                    | Create(Object::Policy)
                    | Alter(Object::Policy)
                    | Drop(Object::Policy)
            ),
            "transaction" => matches!(
                self,
                Begin | Commit | Rollback | Savepoint | Release | RollbackToSavepoint
            ),
            "session" => matches!(self, Set | Reset | Show | Discard),
            "prepared" => matches!(self, Prepare | Execute | Deallocate),
            "admin" => matches!(
                self,
                Vacuum | Analyze | Checkpoint | Reindex | Cluster | Lock | AlterSystem | Load
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
    let mut out = Kind::STANDALONE.to_vec();
    for &o in Object::ALL {
        out.extend([Kind::Create(o), Kind::Alter(o), Kind::Drop(o)]);
    }
    out
}

/// Every kind name, for validating policy files (a rule naming a kind that does not exist
/// would silently never match).
pub fn all_kind_names() -> Vec<String> {
    all_kinds().into_iter().map(Kind::name).collect()
}
