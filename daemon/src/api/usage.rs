//! Usage routes: `GET /v1/usage` (an account's own usage per day, as its owner counts it) and
//! `GET /v1/admin/usage` (every account's usage in a month, merged over the members' owner
//! counts; operator token).

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::cluster::authenticate_operator;
use super::{ApiError, AppState, authenticate};
use crate::protocol::{AdminUsageReport, ErrorCode, Tier, UsageDay, UsageReport};
use crate::queue::{
    Usage, format_utc_day, format_utc_month, parse_utc_day, parse_utc_month, utc_day,
    utc_month_bounds,
};

/// The longest range `GET /v1/usage` answers, in days.
const MAX_RANGE_DAYS: i64 = 366;

type RawQuery = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn bad_param(name: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidRequest,
        format!("query parameter {name:?}: {message}"),
    )
    .details(serde_json::json!({ "parameter": name }))
}

/// The query's parameters, refusing any not in `allowed`.
fn params(query: RawQuery, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the query string does not parse: {e}"),
        )
    })?;
    if let Some(unknown) = query.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad_param(
            unknown,
            format!("unknown parameter (allowed: {})", allowed.join(", ")),
        ));
    }
    Ok(query)
}

fn day_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    query
        .get(name)
        .map(|text| {
            parse_utc_day(text)
                .ok_or_else(|| bad_param(name, format!("{text:?} is not a date (YYYY-MM-DD)")))
        })
        .transpose()
}

fn usage_day(usage: &Usage, account: Option<&str>, tier: Option<Tier>) -> UsageDay {
    UsageDay {
        day: format_utc_day(usage.day),
        account: account.map(str::to_string),
        tier,
        submitted: usage.submitted,
        succeeded: usage.succeeded,
        images: usage.images,
        gpu_seconds: usage.gpu_ms as f64 / 1000.0,
        refused: usage.refused,
    }
}

/// `GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`: the account's usage per UTC day (both ends
/// included; default: this month), as the account's owner counts it.
#[utoipa::path(get, path = "/v1/usage", tag = "usage",
    params(("from" = Option<String>, Query, description = "first day, YYYY-MM-DD (default: the 1st of this month)"),
           ("to" = Option<String>, Query, description = "last day, YYYY-MM-DD (default: the last day of this month)")),
    responses((status = 200, description = "usage per day", body = UsageReport),
              (status = 400, description = "invalid_request naming the parameter", body = crate::protocol::ErrorBody),
              (status = 401, description = "unauthorized", body = crate::protocol::ErrorBody)))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: RawQuery,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let query = params(query, &["from", "to"])?;
    let (month_start, month_end) = utc_month_bounds(utc_day(crate::node::unix_ms()));
    let from = day_param(&query, "from")?.unwrap_or(month_start);
    let to = day_param(&query, "to")?.unwrap_or(month_end - 1);
    if to < from {
        return Err(bad_param("to", "is before from"));
    }
    if to - from >= MAX_RANGE_DAYS {
        return Err(bad_param(
            "to",
            format!("the range is over {MAX_RANGE_DAYS} days"),
        ));
    }
    let days = state.jobs.usage(&account.id, from, to + 1).await?;
    Ok(axum::Json(UsageReport {
        account: account.id.clone(),
        tier: account.tier,
        from: format_utc_day(from),
        to: format_utc_day(to),
        days: days.iter().map(|u| usage_day(u, None, None)).collect(),
    })
    .into_response())
}

/// `GET /v1/admin/usage?month=YYYY-MM`: every account's usage per UTC day in the month
/// (default: this month), summed over the owner counts of every member that answers.
/// Operator token required.
#[utoipa::path(get, path = "/v1/admin/usage", tag = "operator",
    security(("operator_token" = [])),
    params(("month" = Option<String>, Query, description = "YYYY-MM (default: this month)")),
    responses((status = 200, description = "usage per account and day", body = AdminUsageReport),
              (status = 400, description = "invalid_request naming the parameter", body = crate::protocol::ErrorBody),
              (status = 401, description = "missing or wrong operator token", body = crate::protocol::ErrorBody)))]
pub(crate) async fn admin_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: RawQuery,
) -> Result<Response, ApiError> {
    authenticate_operator(&state, &headers)?;
    let query = params(query, &["month"])?;
    let (from, to) = match query.get("month") {
        Some(text) => parse_utc_month(text)
            .ok_or_else(|| bad_param("month", format!("{text:?} is not a month (YYYY-MM)")))?,
        None => utc_month_bounds(utc_day(crate::node::unix_ms())),
    };
    let (rows, members, missing) = state.jobs.cluster_usage(from, to).await?;
    Ok(axum::Json(AdminUsageReport {
        month: format_utc_month(from),
        members,
        missing,
        rows: rows
            .iter()
            .map(|r| usage_day(&r.usage, Some(&r.account), state.keys.tier_of(&r.account)))
            .collect(),
    })
    .into_response())
}
