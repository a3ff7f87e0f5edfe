//! The webhook outbox: one row per job with a webhook, written by the writer in the same
//! transaction that records the job's final status, so a final status is never committed
//! without its webhook (and survives `kill -9` with it).
//!
//! Owner rows start `due`; a replica's copy of a final job starts `dormant` and becomes `due`
//! when the replica adopts the job ([`JobStore::adopt`]). The delivery worker
//! (`crate::webhooks`) reads due rows and records each attempt here through the writer. Rows
//! that are `delivered` or `abandoned` (attempts used up, or a target refused) are pruned after
//! a while. This module never sends anything.

use rusqlite::{Connection, params};

use super::StoreError;
use super::store::JobStore;
use super::writer::Request;

/// Where an outbox row is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Waiting to be sent at `next_at`.
    Due,
    /// A replica's copy: sent only if this node adopts the job.
    Dormant,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: attempts used up, or the target is refused.
    Abandoned,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Due => "due",
            OutboxState::Dormant => "dormant",
            OutboxState::Delivered => "delivered",
            OutboxState::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> Option<OutboxState> {
        Some(match s {
            "due" => OutboxState::Due,
            "dormant" => OutboxState::Dormant,
            "delivered" => OutboxState::Delivered,
            "abandoned" => OutboxState::Abandoned,
            _ => return None,
        })
    }
}

/// One webhook to send (or sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub job_id: String,
    /// The `webhook-id` header: the same for every attempt, on every node.
    pub event_id: String,
    pub url: String,
    pub state: OutboxState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Unix ms of the next attempt (due rows).
    pub next_at_ms: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    /// Unix ms when it was delivered or abandoned.
    pub done_at_ms: Option<i64>,
}

/// What one delivery attempt did, recorded with [`JobStore::outbox_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed; try again at `next_at_ms`.
    Retry { error: String, next_at_ms: i64 },
    /// It failed for good (attempts used up, or a refused target).
    Abandon { error: String },
}

/// Outbox writes, applied by the writer thread.
#[derive(Debug)]
pub(crate) enum OutboxOp {
    Record {
        job_id: String,
        attempted: Attempted,
    },
    /// Deletes delivered and abandoned rows finished before, and dormant rows created before,
    /// the given unix ms.
    Prune { before_ms: i64 },
}

/// Writes the outbox row of a job that just got its final status (inside the writer's
/// transaction). Nothing for a job without a webhook, and nothing when the job already has one
/// (first final result wins, and repeating a replica copy adds nothing).
pub(crate) fn enqueue(
    tx: &Connection,
    job_id: &str,
    now: i64,
    state: OutboxState,
) -> Result<bool, StoreError> {
    let written = tx
        .prepare_cached(
            "INSERT INTO webhook_outbox (job_id, event_id, url, state, next_at, created_at)
             SELECT id, 'msg_' || id || '_' || status, webhook, ?2, ?3, ?3 FROM jobs
             WHERE id = ?1 AND webhook IS NOT NULL
                 AND status IN ('succeeded', 'failed', 'cancelled')
             ON CONFLICT (job_id) DO NOTHING",
        )
        .and_then(|mut st| st.execute(params![job_id, state.as_str(), now]))
        .map_err(StoreError::sqlite("writing the webhook outbox"))?;
    Ok(written > 0)
}

/// Makes a dormant row due (the job was adopted here).
pub(crate) fn wake(tx: &Connection, job_id: &str, now: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE webhook_outbox SET state = 'due', next_at = ?2
         WHERE job_id = ?1 AND state = 'dormant'",
    )
    .and_then(|mut st| st.execute(params![job_id, now]))
    .map_err(StoreError::sqlite("waking the webhook outbox"))?;
    Ok(())
}

/// Applies an outbox write; returns the rows changed.
pub(crate) fn apply(tx: &Connection, op: OutboxOp, now: i64) -> Result<usize, StoreError> {
    let changed = match op {
        OutboxOp::Record {
            job_id,
            attempted: Attempted::Delivered,
        } => tx
            .prepare_cached(
                "UPDATE webhook_outbox SET state = 'delivered', attempts = attempts + 1,
                     last_error = NULL, done_at = ?2
                 WHERE job_id = ?1 AND state = 'due'",
            )
            .and_then(|mut st| st.execute(params![job_id, now])),
        OutboxOp::Record {
            job_id,
            attempted: Attempted::Retry { error, next_at_ms },
        } => tx
            .prepare_cached(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?2, next_at = ?3
                 WHERE job_id = ?1 AND state = 'due'",
            )
            .and_then(|mut st| st.execute(params![job_id, error, next_at_ms])),
        OutboxOp::Record {
            job_id,
            attempted: Attempted::Abandon { error },
        } => tx
            .prepare_cached(
                "UPDATE webhook_outbox SET state = 'abandoned', attempts = attempts + 1,
                     last_error = ?2, done_at = ?3
                 WHERE job_id = ?1 AND state = 'due'",
            )
            .and_then(|mut st| st.execute(params![job_id, error, now])),
        OutboxOp::Prune { before_ms } => tx
            .prepare_cached(
                "DELETE FROM webhook_outbox
                 WHERE (state IN ('delivered', 'abandoned') AND done_at < ?1)
                    OR (state = 'dormant' AND created_at < ?1)",
            )
            .and_then(|mut st| st.execute(params![before_ms])),
    };
    changed.map_err(StoreError::sqlite("updating the webhook outbox"))
}

const COLUMNS: &str =
    "job_id, event_id, url, state, attempts, next_at, last_error, created_at, done_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(OutboxRow, String)> {
    let state: String = r.get(3)?;
    Ok((
        OutboxRow {
            job_id: r.get(0)?,
            event_id: r.get(1)?,
            url: r.get(2)?,
            state: OutboxState::Due,
            attempts: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(u32::MAX),
            next_at_ms: r.get(5)?,
            last_error: r.get(6)?,
            created_at_ms: r.get(7)?,
            done_at_ms: r.get(8)?,
        },
        state,
    ))
}

fn rows(
    conn: &Connection,
    path: &std::path::Path,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<OutboxRow>, StoreError> {
    let mut st = conn
        .prepare_cached(sql)
        .map_err(StoreError::sqlite("reading the webhook outbox"))?;
    let found = st
        .query_map(args, row)
        .map_err(StoreError::sqlite("reading the webhook outbox"))?;
    let mut out = Vec::new();
    for item in found {
        let (mut r, state) = item.map_err(StoreError::sqlite("reading the webhook outbox"))?;
        r.state = OutboxState::parse(&state).ok_or_else(|| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("webhook outbox row {} has state {state:?}", r.job_id),
        })?;
        out.push(r);
    }
    Ok(out)
}

impl JobStore {
    /// Due rows whose time has come (`next_at <= now_ms`), earliest first, at most `limit`.
    pub async fn outbox_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn, path| {
            let sql = format!(
                "SELECT {COLUMNS} FROM webhook_outbox WHERE state = 'due' AND next_at <= ?1
                 ORDER BY next_at, job_id LIMIT ?2"
            );
            rows(conn, path, &sql, params![now_ms, limit])
        })
        .await
    }

    /// When the earliest due row is due (unix ms), and how many rows are due.
    pub async fn outbox_pending(&self) -> Result<(Option<i64>, u64), StoreError> {
        self.read(|conn, _| {
            conn.prepare_cached(
                "SELECT MIN(next_at), COUNT(*) FROM webhook_outbox WHERE state = 'due'",
            )
            .and_then(|mut st| {
                st.query_row([], |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?,
                        u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    ))
                })
            })
            .map_err(StoreError::sqlite("reading the webhook outbox"))
        })
        .await
    }

    /// A job's outbox row, if it has one.
    pub async fn outbox_row(&self, job_id: &str) -> Result<Option<OutboxRow>, StoreError> {
        let job_id = job_id.to_string();
        self.read(move |conn, path| {
            let sql = format!("SELECT {COLUMNS} FROM webhook_outbox WHERE job_id = ?1");
            Ok(rows(conn, path, &sql, [job_id])?.into_iter().next())
        })
        .await
    }

    /// Records what a delivery attempt did. Only a due row changes (a row delivered or
    /// abandoned meanwhile stays as it is); returns whether it changed.
    pub async fn outbox_record(
        &self,
        job_id: &str,
        attempted: Attempted,
    ) -> Result<bool, StoreError> {
        let op = OutboxOp::Record {
            job_id: job_id.to_string(),
            attempted,
        };
        let changed = self.request(|reply| Request::Outbox { op, reply }).await?;
        Ok(changed > 0)
    }

    /// Deletes rows delivered or abandoned before `before_ms`, and dormant copies created
    /// before it. Returns how many went.
    pub async fn outbox_prune(&self, before_ms: i64) -> Result<usize, StoreError> {
        let op = OutboxOp::Prune { before_ms };
        self.request(|reply| Request::Outbox { op, reply }).await
    }
}
