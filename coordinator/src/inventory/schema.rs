//! The inventory's SQLite schema and its migrations.
//!
//! `PRAGMA user_version` holds the number of migrations applied; [`migrate`] applies the missing
//! ones in one transaction and refuses a file written by a newer `kiln`
//! ([`InventoryError::SchemaTooNew`]) rather than guess at it. A released migration is never
//! edited: changes go in a new one appended to [`MIGRATIONS`].

use std::path::Path;

use rusqlite::Connection;

use super::InventoryError;

/// The ordered migrations; the schema version is how many of them are applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: hosts, their state history, the cost ledger, the control loop's actions, prices seen.
    r#"
    CREATE TABLE hosts (
        name                  TEXT PRIMARY KEY,
        provider              TEXT NOT NULL,
        provider_id           TEXT,
        label                 TEXT NOT NULL,
        state                 TEXT NOT NULL,
        state_since_ms        INTEGER NOT NULL,
        billed_since_ms       INTEGER NOT NULL,
        rented_at_ms          INTEGER NOT NULL,
        ready_at_ms           INTEGER,
        released_at_ms        INTEGER,
        is_primary            INTEGER NOT NULL DEFAULT 0,
        spot                  INTEGER NOT NULL DEFAULT 0,
        price_per_hour        REAL NOT NULL,
        stopped_price_per_hour REAL NOT NULL,
        disk_gb               INTEGER NOT NULL,
        storage_per_gb_month  REAL,
        address               TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX hosts_by_provider_id ON hosts(provider, provider_id);

    CREATE TABLE history (
        id          INTEGER PRIMARY KEY,
        host        TEXT NOT NULL REFERENCES hosts(name),
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        at_ms       INTEGER NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX history_by_host ON history(host, id);

    -- One row per closed billing interval [start_ms, end_ms) at the rates of `state`, plus
    -- lump sums (extra_usd, start_ms = end_ms) such as Lambda's rounding to whole minutes.
    CREATE TABLE ledger (
        id                INTEGER PRIMARY KEY,
        host              TEXT NOT NULL REFERENCES hosts(name),
        state             TEXT NOT NULL,
        start_ms          INTEGER NOT NULL,
        end_ms            INTEGER NOT NULL,
        gpu_per_hour      REAL NOT NULL,
        storage_per_hour  REAL NOT NULL,
        extra_usd         REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX ledger_by_end ON ledger(end_ms);

    CREATE TABLE actions (
        id       INTEGER PRIMARY KEY,
        at_ms    INTEGER NOT NULL,
        action   TEXT NOT NULL,
        host     TEXT,
        reason   TEXT NOT NULL,
        outcome  TEXT NOT NULL
    );

    CREATE TABLE prices (
        id                    INTEGER PRIMARY KEY,
        at_ms                 INTEGER NOT NULL,
        provider              TEXT NOT NULL,
        offer_id              TEXT NOT NULL,
        gpu_name              TEXT NOT NULL,
        num_gpus              INTEGER NOT NULL,
        price_per_hour        REAL NOT NULL,
        storage_per_gb_month  REAL,
        reliability           REAL,
        location              TEXT,
        spot                  INTEGER NOT NULL
    );
    CREATE INDEX prices_by_provider ON prices(provider, at_ms);
    "#,
    // 2: small named values the control loop keeps between runs (policy and alert state).
    r#"
    CREATE TABLE kv (
        key    TEXT PRIMARY KEY,
        value  TEXT NOT NULL,
        at_ms  INTEGER NOT NULL
    );
    "#,
];

/// The schema version this code writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// WAL (readers beside a writer: `kiln status` while `kiln run` works), `synchronous=FULL` (a
/// rent that returned is on disk), foreign keys, and a busy timeout for a second `kiln`.
pub fn configure(conn: &Connection, path: &Path) -> Result<(), InventoryError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| corrupt_or(path, e, "setting the busy timeout"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
        .map_err(|e| corrupt_or(path, e, "enabling WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(InventoryError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("cannot use WAL journal mode (got {mode:?})"),
        });
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| corrupt_or(path, e, "setting pragmas"))?;
    Ok(())
}

/// Maps "not a database" and "corrupt" to [`InventoryError::Corrupt`] naming the file.
pub fn corrupt_or(path: &Path, e: rusqlite::Error, context: &str) -> InventoryError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            InventoryError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("{context}: {e} (not a kiln inventory, or damaged)"),
            }
        }
        _ => InventoryError::Sqlite {
            context: format!("{context} ({})", path.display()),
            source: e,
        },
    }
}

/// Applies the missing migrations in one transaction. Returns (version before, version after).
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(i64, i64), InventoryError> {
    use kiln_daemon::sqlite::MigrationFailure;
    kiln_daemon::sqlite::apply_migrations(conn, MIGRATIONS).map_err(|failure| match failure {
        MigrationFailure::TooNew { found, supported } => {
            InventoryError::SchemaTooNew { found, supported }
        }
        MigrationFailure::Negative(found) => InventoryError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("negative schema version {found}"),
        },
        MigrationFailure::Sqlite { context, error } => corrupt_or(path, error, &context),
    })
}
