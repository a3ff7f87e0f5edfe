//! What the node's job store and the coordinator's inventory share about SQLite: applying
//! numbered migrations, tracked in `PRAGMA user_version`. Each store turns a
//! [`MigrationFailure`] into its own error (naming its file and what kind of database it is).

use rusqlite::Connection;

/// Why migrations could not be applied.
#[derive(Debug)]
pub enum MigrationFailure {
    /// The file was written by a newer version, with more migrations than this code knows.
    TooNew { found: i64, supported: i64 },
    /// `user_version` is negative: not a file this code wrote.
    Negative(i64),
    /// SQLite failed while doing `context`.
    Sqlite {
        context: String,
        error: rusqlite::Error,
    },
}

/// Applies `migrations[user_version..]` in one exclusive transaction and sets `user_version` to
/// their count; a file from a newer version is refused rather than guessed at. Returns (version
/// before, version after).
pub fn apply_migrations(
    conn: &mut Connection,
    migrations: &[&str],
) -> Result<(i64, i64), MigrationFailure> {
    let failed = |context: &str| {
        let context = context.to_string();
        move |error| MigrationFailure::Sqlite { context, error }
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .map_err(failed("starting the migration"))?;
    let found: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(failed("reading the schema version"))?;
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    if found > supported {
        return Err(MigrationFailure::TooNew { found, supported });
    }
    if found < 0 {
        return Err(MigrationFailure::Negative(found));
    }
    for (i, sql) in migrations.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)
            .map_err(failed(&format!("applying migration {}", i + 1)))?;
    }
    tx.execute_batch(&format!("PRAGMA user_version = {supported}"))
        .map_err(failed("writing the schema version"))?;
    tx.commit().map_err(failed("committing the migration"))?;
    Ok((found, supported))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[&str] = &[
        "CREATE TABLE a (x INTEGER);",
        "ALTER TABLE a ADD COLUMN y TEXT;",
    ];

    #[test]
    fn migrations_apply_once_in_order_and_newer_files_are_refused() {
        let mut conn = Connection::open_in_memory().expect("open");
        assert_eq!(
            apply_migrations(&mut conn, &MIGRATIONS[..1]).expect("first"),
            (0, 1)
        );
        assert_eq!(
            apply_migrations(&mut conn, MIGRATIONS).expect("second"),
            (1, 2)
        );
        assert_eq!(
            apply_migrations(&mut conn, MIGRATIONS).expect("again"),
            (2, 2)
        );
        conn.execute("INSERT INTO a (x, y) VALUES (1, 'one')", [])
            .expect("both columns");
        assert!(matches!(
            apply_migrations(&mut conn, &MIGRATIONS[..1]),
            Err(MigrationFailure::TooNew {
                found: 2,
                supported: 1
            })
        ));
        conn.execute_batch("PRAGMA user_version = -3")
            .expect("pragma");
        assert!(matches!(
            apply_migrations(&mut conn, MIGRATIONS),
            Err(MigrationFailure::Negative(-3))
        ));
    }

    #[test]
    fn a_failing_migration_changes_nothing() {
        let mut conn = Connection::open_in_memory().expect("open");
        let broken: &[&str] = &["CREATE TABLE b (x INTEGER);", "THIS IS NOT SQL;"];
        match apply_migrations(&mut conn, broken) {
            Err(MigrationFailure::Sqlite { context, .. }) => {
                assert_eq!(context, "applying migration 2");
            }
            other => panic!("{other:?}"),
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, 0);
        assert!(conn.execute("INSERT INTO b (x) VALUES (1)", []).is_err());
    }
}
