//! The SQLite schema of the job store and its migrations.
//!
//! `PRAGMA user_version` holds the number of migrations applied. [`migrate`] applies the missing
//! ones in order, all in one transaction, and refuses a database written by a newer kilnd
//! ([`StoreError::SchemaTooNew`]) rather than guess at it. A migration, once released, is never
//! edited: changes go in a new one appended to [`MIGRATIONS`].

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// The ordered migrations; the schema version is how many of them are applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, history, attempts, outputs, idempotency keys, usage, fairness ring.
    r#"
    CREATE TABLE jobs (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,
        id              TEXT    NOT NULL UNIQUE,
        account         TEXT    NOT NULL,
        tier            INTEGER NOT NULL CHECK (tier BETWEEN 0 AND 3),
        status          TEXT    NOT NULL
                        CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
        workflow        TEXT    NOT NULL,
        webhook         TEXT,
        metadata        TEXT,
        idempotency_key TEXT,
        body_hash       TEXT    NOT NULL,
        created_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER,
        attempts        INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL CHECK (max_attempts >= 1),
        error           TEXT,
        -- The account's ring position when the job was last taken, to requeue it in place.
        ring_pos        INTEGER
    );
    CREATE INDEX jobs_account_seq ON jobs (account, seq DESC);
    CREATE INDEX jobs_active ON jobs (status) WHERE status IN ('queued', 'running');

    CREATE TABLE job_events (
        n       INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id  TEXT    NOT NULL,
        at      INTEGER NOT NULL,
        status  TEXT    NOT NULL,
        detail  TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id, n);

    CREATE TABLE attempts (
        job_id      TEXT    NOT NULL,
        n           INTEGER NOT NULL,
        started_at  INTEGER NOT NULL,
        ended_at    INTEGER,
        outcome     TEXT,
        PRIMARY KEY (job_id, n)
    );
    CREATE INDEX attempts_succeeded ON attempts (ended_at) WHERE outcome = 'succeeded';

    CREATE TABLE outputs (
        job_id        TEXT    NOT NULL,
        idx           INTEGER NOT NULL,
        filename      TEXT    NOT NULL,
        content_type  TEXT    NOT NULL,
        bytes         INTEGER NOT NULL,
        path          TEXT    NOT NULL,
        sha256        TEXT    NOT NULL,
        PRIMARY KEY (job_id, idx)
    );

    CREATE TABLE idempotency_keys (
        account     TEXT    NOT NULL,
        key         TEXT    NOT NULL,
        job_id      TEXT    NOT NULL,
        body_hash   TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (account, key)
    );

    CREATE TABLE usage_daily (
        account    TEXT    NOT NULL,
        day        INTEGER NOT NULL,
        submitted  INTEGER NOT NULL DEFAULT 0,
        refused    INTEGER NOT NULL DEFAULT 0,
        succeeded  INTEGER NOT NULL DEFAULT 0,
        images     INTEGER NOT NULL DEFAULT 0,
        gpu_ms     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, day)
    );

    CREATE TABLE fair_ring (
        tier     INTEGER NOT NULL,
        account  TEXT    NOT NULL,
        pos      INTEGER NOT NULL,
        PRIMARY KEY (tier, account)
    );
    "#,
    // 2: cluster roles. A row is either this node's own job (`owner`) or a copy kept for another
    // member (`replica`, with that member in `owner`), adopted when that member dies. Owner rows
    // name the member holding their replica; running rows name the member running them
    // (`lease_holder`, NULL when this node runs it itself).
    r#"
    ALTER TABLE jobs ADD COLUMN role TEXT NOT NULL DEFAULT 'owner'
        CHECK (role IN ('owner', 'replica'));
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN replica TEXT;
    ALTER TABLE jobs ADD COLUMN lease_holder TEXT;
    CREATE INDEX jobs_replica_owner ON jobs (owner) WHERE role = 'replica';
    "#,
    // 3: whether an output of a watermarked tier got its mark (`applied` or `skipped: <why>`);
    // NULL for tiers without one.
    r#"
    ALTER TABLE outputs ADD COLUMN watermark TEXT;
    "#,
    // 4: premium fair use and usage kept for other owners. `throttled` is why a job was queued
    // at free priority (NULL: its own tier's). `usage_replica` counts the jobs this node holds
    // as replica, per account and day, so that it can take over an owner's counts.
    r#"
    ALTER TABLE jobs ADD COLUMN throttled TEXT;
    CREATE TABLE usage_replica (
        account    TEXT    NOT NULL,
        day        INTEGER NOT NULL,
        submitted  INTEGER NOT NULL DEFAULT 0,
        succeeded  INTEGER NOT NULL DEFAULT 0,
        images     INTEGER NOT NULL DEFAULT 0,
        gpu_ms     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, day)
    );
    "#,
    // 5: the webhook outbox. One row per job with a webhook, written in the transaction that
    // records the job's final status: `due` rows are sent by the delivery worker, `dormant` rows
    // are a replica's copy (due once the job is adopted), `delivered` and `abandoned` rows are
    // kept for a while, then pruned. `event_id` is the `webhook-id` header (stable per job).
    r#"
    CREATE TABLE webhook_outbox (
        job_id      TEXT    PRIMARY KEY,
        event_id    TEXT    NOT NULL,
        url         TEXT    NOT NULL,
        state       TEXT    NOT NULL
                    CHECK (state IN ('due', 'dormant', 'delivered', 'abandoned')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     INTEGER NOT NULL,
        last_error  TEXT,
        created_at  INTEGER NOT NULL,
        done_at     INTEGER
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at) WHERE state = 'due';
    "#,
    // 6: output retention and deletion. `retention_policy` holds how long each tier's outputs
    // are kept (rewritten from the config each time the store opens; a tier without a row keeps
    // them for good). The triggers stamp `outputs_expire_at` (finish time + retention) whenever
    // a row is stored or changes status or finish time, so every path that finishes a job or
    // copies a finished one (owner, replica, adoption) gets it without code of its own.
    // `outputs_deleted_at`/`_reason` record that the files (or objects) are gone.
    r#"
    CREATE TABLE retention_policy (
        tier     INTEGER PRIMARY KEY CHECK (tier BETWEEN 0 AND 3),
        keep_ms  INTEGER NOT NULL CHECK (keep_ms >= 0)
    );
    ALTER TABLE jobs ADD COLUMN outputs_expire_at INTEGER;
    ALTER TABLE jobs ADD COLUMN outputs_deleted_at INTEGER;
    ALTER TABLE jobs ADD COLUMN outputs_deleted_reason TEXT
        CHECK (outputs_deleted_reason IN ('retention', 'user'));
    CREATE INDEX jobs_outputs_expiry ON jobs (outputs_expire_at)
        WHERE outputs_expire_at IS NOT NULL AND outputs_deleted_at IS NULL;
    CREATE TRIGGER jobs_outputs_expiry_insert AFTER INSERT ON jobs
    BEGIN
        UPDATE jobs SET outputs_expire_at = CASE
            WHEN NEW.status = 'succeeded' AND NEW.finished_at IS NOT NULL
            THEN NEW.finished_at + (SELECT keep_ms FROM retention_policy WHERE tier = NEW.tier)
        END
        WHERE seq = NEW.seq;
    END;
    CREATE TRIGGER jobs_outputs_expiry_update AFTER UPDATE OF status, finished_at ON jobs
    BEGIN
        UPDATE jobs SET outputs_expire_at = CASE
            WHEN NEW.status = 'succeeded' AND NEW.finished_at IS NOT NULL
            THEN NEW.finished_at + (SELECT keep_ms FROM retention_policy WHERE tier = NEW.tier)
        END
        WHERE seq = NEW.seq;
    END;
    "#,
    // 7: outputs kept as objects in an S3-compatible bucket: the object's key (NULL for a file
    // in the data dir, whose `path` is then the file's).
    r#"
    ALTER TABLE outputs ADD COLUMN object_key TEXT;
    "#,
    // 8: small outputs kept in the database, written by the commit that records them: the
    // content (NULL for a file at `path`, an object at `object_key`, or content deleted).
    r#"
    ALTER TABLE outputs ADD COLUMN data BLOB;
    "#,
];

/// The schema version this code writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Prepared statements each connection keeps. rusqlite keeps 16 by default, fewer than the
/// writer's distinct statements (over 40), so the least recently used ones were compiled again
/// on every job.
pub const STATEMENT_CACHE: usize = 128;

/// Sets the connection options every connection of the store uses.
pub fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(StoreError::sqlite("setting the busy timeout"))?;
    // WAL: readers run beside the writer. synchronous=FULL: every commit is fsync'd before it
    // returns, so a job that got its 202 survives a power loss, not only a process crash.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
        .map_err(|e| corrupt_or(path, e, "enabling WAL mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("cannot use WAL journal mode (got {mode:?})"),
        });
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| corrupt_or(path, e, "setting pragmas"))?;
    Ok(())
}

/// Maps "not a database" and "corrupt" to [`StoreError::Corrupt`] naming the file.
pub fn corrupt_or(path: &Path, e: rusqlite::Error, context: &str) -> StoreError {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("{context}: {e} (not a kilnd job store, or damaged)"),
        },
        _ => StoreError::Sqlite {
            context: format!("{context} ({})", path.display()),
            source: e,
        },
    }
}

/// Applies the missing migrations in one transaction. Returns (version before, version after).
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(i64, i64), StoreError> {
    use crate::sqlite::MigrationFailure;
    crate::sqlite::apply_migrations(conn, MIGRATIONS).map_err(|failure| match failure {
        MigrationFailure::TooNew { found, supported } => {
            StoreError::SchemaTooNew { found, supported }
        }
        MigrationFailure::Negative(found) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("negative schema version {found}"),
        },
        MigrationFailure::Sqlite { context, error } => corrupt_or(path, error, &context),
    })
}
