//! Functions with effects beyond the data an agent should touch: the shipped catalogue
//! behind the `dangerous_functions` matcher, by category.
//!
//! Names are matched without schema (`pg_catalog.pg_read_file` and `pg_read_file` are the
//! same function; a user function of the same name in another schema is flagged too, which
//! errs on the safe side).

use serde::Serialize;

/// Why a function is dangerous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Danger {
    /// Reads or writes server files, lists server directories.
    File,
    /// Server-side large-object import/export (files), writing values into large
    /// objects: a value copied there (`lo_from_bytea(0, convert_to(email, 'UTF8'))`) is
    /// read back with `lo_get`, out from under its mask; and cutting or removing their
    /// contents (`lo_truncate`, `lo_unlink`: data gone, as with `TRUNCATE` or `DROP TABLE`).
    LargeObject,
    /// Connects out from the server (dblink), possibly back to the same database.
    Remote,
    /// Cancels or terminates other sessions.
    Backend,
    /// Changes server configuration or reloads it; also a `SET search_path` that puts a
    /// schema before `pg_catalog` (built-in names would then resolve to that schema's
    /// functions and operators).
    Config,
    /// Replication slots, WAL, backups, promotion.
    Replication,
    /// Statistics resets, advisory locks on others' behalf and other administration.
    Admin,
    /// Runs SQL given as text (dynamic SQL in disguise), or reads rows the statement does
    /// not name as relations: every row of a table, schema, database or open cursor named
    /// by a string argument (`table_to_xml('users', ...)`), which no column mask follows.
    DynamicSql,
    /// Holds a backend for a chosen time (denial of service).
    Sleep,
    /// Sends a computed payload to listening sessions (`pg_notify`): rows read under a
    /// mask would reach a listener, the caller included, unmasked.
    Notify,
    /// Keeps a value computed from rows where any session reads it back, past every mask:
    /// a sequence's value (`setval`, then `currval` or `last_value`), an advisory lock's key
    /// (`pg_locks.classid/objid`), a large object's OID (`lo_create`), length
    /// (`lo_truncate`) or descriptor position (`lo_lseek`, then `lo_tell`), the random seed
    /// (`setseed`, then `random()`). Only calls with an argument computed from rows (a
    /// column, a whole row, a subquery): with literals and parameters the caller knows the
    /// value already.
    SideChannel,
}

impl Danger {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::LargeObject => "large_object",
            Self::Remote => "remote",
            Self::Backend => "backend",
            Self::Config => "config",
            Self::Replication => "replication",
            Self::Admin => "admin",
            Self::DynamicSql => "dynamic_sql",
            Self::Sleep => "sleep",
            Self::Notify => "notify",
            Self::SideChannel => "side_channel",
        }
    }

    pub const ALL: [Danger; 11] = [
        Self::File,
        Self::LargeObject,
        Self::Remote,
        Self::Backend,
        Self::Config,
        Self::Replication,
        Self::Admin,
        Self::DynamicSql,
        Self::Sleep,
        Self::Notify,
        Self::SideChannel,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

const CATALOGUE: &[(&str, Danger)] = &[
    ("pg_read_file", Danger::File),
    ("pg_read_binary_file", Danger::File),
    // PostgreSQL 15's name for the three-argument form that pre-dates `missing_ok`.
    ("pg_read_file_old", Danger::File),
    ("pg_stat_file", Danger::File),
    ("pg_ls_dir", Danger::File),
    ("pg_ls_logdir", Danger::File),
    ("pg_ls_waldir", Danger::File),
    ("pg_ls_tmpdir", Danger::File),
    ("pg_ls_archive_statusdir", Danger::File),
    ("pg_ls_logicalsnapdir", Danger::File),
    ("pg_ls_logicalmapdir", Danger::File),
    ("pg_ls_replslotdir", Danger::File),
    ("pg_file_write", Danger::File),
    ("pg_file_rename", Danger::File),
    ("pg_file_unlink", Danger::File),
    ("pg_file_sync", Danger::File),
    ("pg_logdir_ls", Danger::File),
    ("pg_current_logfile", Danger::File),
    ("lo_import", Danger::LargeObject),
    ("lo_export", Danger::LargeObject),
    ("lo_from_bytea", Danger::LargeObject),
    ("lo_put", Danger::LargeObject),
    ("lowrite", Danger::LargeObject),
    ("lo_truncate", Danger::LargeObject),
    ("lo_truncate64", Danger::LargeObject),
    ("lo_unlink", Danger::LargeObject),
    ("dblink", Danger::Remote),
    ("dblink_exec", Danger::Remote),
    ("dblink_connect", Danger::Remote),
    ("dblink_connect_u", Danger::Remote),
    ("dblink_send_query", Danger::Remote),
    ("dblink_open", Danger::Remote),
    ("dblink_fetch", Danger::Remote),
    ("pg_terminate_backend", Danger::Backend),
    ("pg_cancel_backend", Danger::Backend),
    ("set_config", Danger::Config),
    ("pg_reload_conf", Danger::Config),
    ("pg_rotate_logfile", Danger::Config),
    ("pg_rotate_logfile_old", Danger::Config),
    ("pg_log_backend_memory_contexts", Danger::Config),
    ("pg_promote", Danger::Replication),
    ("pg_switch_wal", Danger::Replication),
    ("pg_create_restore_point", Danger::Replication),
    ("pg_backup_start", Danger::Replication),
    ("pg_backup_stop", Danger::Replication),
    ("pg_start_backup", Danger::Replication),
    ("pg_stop_backup", Danger::Replication),
    ("pg_create_physical_replication_slot", Danger::Replication),
    ("pg_create_logical_replication_slot", Danger::Replication),
    ("pg_drop_replication_slot", Danger::Replication),
    ("pg_copy_physical_replication_slot", Danger::Replication),
    ("pg_copy_logical_replication_slot", Danger::Replication),
    ("pg_replication_slot_advance", Danger::Replication),
    ("pg_logical_slot_get_changes", Danger::Replication),
    ("pg_logical_slot_peek_changes", Danger::Replication),
    // Decoded WAL: every change of every table, masked columns in the clear.
    ("pg_logical_slot_get_binary_changes", Danger::Replication),
    ("pg_logical_slot_peek_binary_changes", Danger::Replication),
    ("pg_replication_origin_create", Danger::Replication),
    ("pg_replication_origin_drop", Danger::Replication),
    ("pg_replication_origin_advance", Danger::Replication),
    ("pg_replication_origin_session_setup", Danger::Replication),
    ("pg_replication_origin_session_reset", Danger::Replication),
    ("pg_replication_origin_xact_setup", Danger::Replication),
    ("pg_replication_origin_xact_reset", Danger::Replication),
    ("pg_logical_emit_message", Danger::Replication),
    ("pg_wal_replay_pause", Danger::Replication),
    ("pg_wal_replay_resume", Danger::Replication),
    ("pg_stat_reset", Danger::Admin),
    ("pg_stat_reset_shared", Danger::Admin),
    ("pg_stat_reset_single_table_counters", Danger::Admin),
    ("pg_stat_reset_single_function_counters", Danger::Admin),
    ("pg_stat_reset_slru", Danger::Admin),
    ("pg_import_system_collations", Danger::Admin),
    ("pg_truncate_visibility_map", Danger::Admin),
    ("pg_stat_reset_replication_slot", Danger::Admin),
    ("pg_stat_reset_subscription_stats", Danger::Admin),
    ("pg_stop_making_pinned_objects", Danger::Admin),
    ("query_to_xml", Danger::DynamicSql),
    ("query_to_xmlschema", Danger::DynamicSql),
    ("query_to_xml_and_xmlschema", Danger::DynamicSql),
    ("table_to_xml", Danger::DynamicSql),
    ("table_to_xml_and_xmlschema", Danger::DynamicSql),
    ("schema_to_xml", Danger::DynamicSql),
    ("schema_to_xml_and_xmlschema", Danger::DynamicSql),
    ("database_to_xml", Danger::DynamicSql),
    ("database_to_xml_and_xmlschema", Danger::DynamicSql),
    ("cursor_to_xml", Danger::DynamicSql),
    // Their query argument is SQL text: `ts_stat('SELECT to_tsvector(email) FROM users')`
    // returns the words of every e-mail address.
    ("ts_stat", Danger::DynamicSql),
    ("ts_rewrite", Danger::DynamicSql),
    ("pg_sleep", Danger::Sleep),
    ("pg_sleep_for", Danger::Sleep),
    ("pg_sleep_until", Danger::Sleep),
    ("pg_notify", Danger::Notify),
];

/// The danger of a function by its unqualified, lower-cased name.
pub fn danger_of(name: &str) -> Option<Danger> {
    if name.starts_with("binary_upgrade_") {
        // pg_upgrade's: object identities and catalog rows set by hand.
        return Some(Danger::Admin);
    }
    CATALOGUE.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

/// Functions that keep their arguments where other statements read them back
/// ([`Danger::SideChannel`] when one is computed from rows).
pub fn keeps_arguments(name: &str) -> bool {
    matches!(
        name,
        "setval"
            | "lo_create"
            // A large object's length, and a descriptor's position (`lo_tell`).
            | "lo_truncate"
            | "lo_truncate64"
            | "lo_lseek"
            | "lo_lseek64"
            | "setseed"
            | "pg_advisory_lock"
            | "pg_advisory_lock_shared"
            | "pg_advisory_xact_lock"
            | "pg_advisory_xact_lock_shared"
            | "pg_try_advisory_lock"
            | "pg_try_advisory_lock_shared"
            | "pg_try_advisory_xact_lock"
            | "pg_try_advisory_xact_lock_shared"
    )
}

/// Functions that execute SQL given as text, making the statement dynamic SQL.
pub fn runs_sql_text(name: &str) -> bool {
    matches!(
        name,
        "dblink" | "dblink_exec" | "dblink_send_query" | "dblink_open"
    ) || danger_of(name) == Some(Danger::DynamicSql)
}
