//! The OpenAPI document of the HTTP API, and the route that serves it (`GET /v1/openapi.json`).
//!
//! Why it is generated: the document is derived from the code that serves the API. Each handler
//! in `api.rs` carries its `#[utoipa::path]` (path, parameters, body, answers), and
//! `api::routes` registers every handler through `utoipa_axum::routes!`, which builds the axum
//! route and the document's operation from the same item; the parameter and answer schemas are
//! derived from the very structs the handlers deserialize and serialize. So a route cannot be
//! served without being documented, and a changed answer changes its schema.
//!
//! This module holds what the handlers share: the document's header, the bearer-key security
//! scheme, the schema of account and device names, and the error answers every route may give
//! (all in the one shape, `api::ErrorBody`). The document is built once and served
//! as it is, without a key: it holds no data.

use std::sync::OnceLock;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::api::{ErrorBody, ErrorKind};

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/v1/openapi.json";

/// The name of the security scheme: `Authorization: Bearer dt_<id>_<secret>`.
pub const SECURITY_SCHEME: &str = "api_key";

/// The document of the HTTP API, as served at [`DOCUMENT_PATH`].
pub fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(|| crate::api::routes().into_openapi())
}

/// The document's header: what the API is, its security scheme, the shared schemas. The
/// operations are added by `api::routes`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "devtables cloud HTTP API",
        description = "Devices, their items, the conflict log, the change log and its webhooks, \
                       and the API keys of a devtables cloud. Every route but /health, /ready and /v1/openapi.json needs \
                       `Authorization: Bearer dt_<id>_<secret>`. Every error answer is \
                       `{\"error\": \"<sentence>\", \"kind\": \"<stable code>\"}`.",
    ),
    modifiers(&BearerKey),
    components(schemas(ErrorBody, ErrorKind, Name)),
    tags(
        (name = "health", description = "Liveness, readiness, the service's numbers and this document"),
        (name = "devices", description = "The device registry"),
        (name = "items", description = "Items of devices and of accounts, and the conflict log"),
        (name = "keys", description = "API keys"),
        (name = "changes", description = "React to changes: the account's change log (long poll or server-sent events) and its webhooks"),
    ),
)]
struct Header;

pub(crate) fn header() -> Document {
    Header::openapi()
}

/// Adds the bearer-key scheme that the protected operations name.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut Document) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("dt_<id>_<secret>")
            .description(Some(
                "An API key of one account with a scope (read, write, admin). The first admin \
                 key is made with `devtables keys create --data DIR --account A --scope admin`; \
                 later ones with POST /v1/accounts/{account}/keys.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(SECURITY_SCHEME, SecurityScheme::Http(scheme));
    }
}

/// An account or device name: 1 to 64 of `A-Z a-z 0-9 _ . -` (the rule of
/// `devtables_sync::identity::DeviceId`; `_all` is reserved for broadcasts and refused as a
/// device name).
#[derive(ToSchema)]
#[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
#[allow(dead_code)] // A schema only: the handlers take names as strings and validate them.
pub(crate) struct Name(String);

/// Serves the OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "health",
    responses((status = 200, body = Object, description = "The OpenAPI 3.1 document of this API")),
)]
pub(crate) async fn serve_document() -> Json<&'static Document> {
    Json(document())
}

/// The answers every route that takes a key may give.
#[derive(IntoResponses)]
#[allow(dead_code)] // Answers only described: `ApiError` produces them.
pub(crate) enum KeyedErrors {
    /// No valid key: none, malformed, unknown, wrong secret or revoked (`unauthorized`).
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "`Bearer`"))
    )]
    Unauthorized(ErrorBody),
    /// The key may not do this: another account or a lower scope (`forbidden`), answered before
    /// anything is looked up; for an item write, also a model the cloud may not write
    /// (`not_writable`) or an item of another owner (`ownership`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The key is over its request rate (`rate_limited`): retry after `Retry-After` seconds.
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    RateLimited(ErrorBody),
    /// The store failed (`store`), or the device CA could not issue (`ca`).
    #[response(status = 500)]
    Failed(ErrorBody),
    /// The service is stopping (`stopping`), its clock cannot stamp a write now (`clock`), or
    /// too many readers of the change log wait (`busy`, with `Retry-After`).
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// A parameter or a body field breaks a rule (`invalid`), or the request could not be read
/// (`bad_request`).
#[derive(IntoResponses)]
#[response(status = 400)]
#[allow(dead_code)]
pub(crate) struct Invalid(ErrorBody);

/// No such device, model, item or key (`not_found`).
#[derive(IntoResponses)]
#[response(status = 404)]
#[allow(dead_code)]
pub(crate) struct NotFound(ErrorBody);

/// The device or item exists already (`exists`), the device is revoked (`revoked`), the key
/// is held by an item of another model (`wrong_model`), or the account holds the most webhooks
/// allowed (`limit_reached`).
#[derive(IntoResponses)]
#[response(status = 409)]
#[allow(dead_code)]
pub(crate) struct Conflict(ErrorBody);

/// Retention removed changes after the cursor (`cursor_expired`): re-read the items, then read
/// the changes from the head.
#[derive(IntoResponses)]
#[response(status = 410)]
#[allow(dead_code)]
pub(crate) struct Expired(ErrorBody);

/// Answers about a JSON body that could not be taken.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(crate) enum BodyErrors {
    /// The body, or the item it makes, is larger than allowed (`too_large`).
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The body is not sent as `Content-Type: application/json` (`bad_request`).
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// The body is JSON but not of the expected shape (`bad_request`).
    #[response(status = 422)]
    WrongShape(ErrorBody),
}
