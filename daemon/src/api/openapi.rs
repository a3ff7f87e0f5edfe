//! The OpenAPI document of the node API, generated from the handlers' annotations and the
//! protocol types, served at `GET /openapi.json`.

use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::protocol;

#[derive(OpenApi)]
#[openapi(
    info(title = "Kiln node API", description = "Submit ComfyUI workflows to a Kiln node and follow them."),
    paths(
        super::jobs::submit,
        super::jobs::list,
        super::jobs::get_job,
        super::jobs::cancel,
        super::jobs::events,
        super::jobs::output,
        super::jobs::delete_outputs,
        super::cluster::view,
        super::cluster::drain,
        super::usage::usage,
        super::usage::admin_usage,
        super::healthz,
        super::readyz,
        super::metrics,
    ),
    components(schemas(
        protocol::SubmitRequest,
        protocol::JobView,
        protocol::Throttled,
        protocol::OutputsDeleted,
        protocol::DeleteReason,
        protocol::UsageReport,
        protocol::UsageDay,
        protocol::AdminUsageReport,
        protocol::JobList,
        protocol::JobStatus,
        protocol::Tier,
        protocol::Progress,
        protocol::OutputView,
        protocol::JobError,
        protocol::StatusEvent,
        protocol::ErrorBody,
        protocol::ErrorDetail,
        protocol::ErrorCode,
        protocol::cluster::ClusterView,
        protocol::cluster::ClusterMember,
        protocol::cluster::MemberStatus,
        protocol::cluster::GpuStatus,
        protocol::cluster::TierQueue,
        protocol::cluster::Role,
        protocol::cluster::MemberState,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "operator_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(super) async fn document() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}
