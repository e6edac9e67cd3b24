//! The OpenAPI document against a started cloud over real TCP: it is served without a key and is
//! the generated one; every documented operation is routed (never the no-route 404 or a 405),
//! every other method on a documented path is a 405 naming exactly the documented ones, every
//! operation the document marks as needing a key refuses a request without one and the others
//! are open; and every error, wherever it comes from, has the one error shape. The last test
//! keeps what the property-based run of `.ci/schemathesis` found.

use std::collections::BTreeSet;

use devtables_cloud::Cloud;
use serde_json::{json, Value};

use crate::harness::{admin_key, config, exchange, request, schema, Answer, ACCOUNT};

/// Every method a path of the API could be called with.
const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];

/// The documented operations: (path template, method in capitals, needs a key).
fn operations(doc: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            let keyed = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            out.push((path.clone(), method.to_ascii_uppercase(), keyed));
        }
    }
    out
}

/// A concrete path for a template: the account of the tests, a registered device, a model of
/// the example schema, a key id of the right form.
fn concrete(template: &str) -> String {
    template
        .replace("{account}", ACCOUNT)
        .replace("{device}", "dev0")
        .replace("{model}", "Setting")
        .replace("{id}", "0123456789abcdef")
}

/// Asserts `answer` is an error in the API's one shape, of `kind` (any kind when `None`).
fn assert_error_shape(answer: &Answer, kind: Option<&str>, what: &str) {
    let body = answer.json();
    let fields: BTreeSet<&str> = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: the error is not a JSON object: {:?}", answer.body))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, BTreeSet::from(["error", "kind"]), "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {body}"
    );
    assert!(body["kind"].is_string(), "{what}: {body}");
    if let Some(kind) = kind {
        assert_eq!(body["kind"], kind, "{what}: {body}");
    }
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{what}"
    );
}

/// The largest request body of these tests' clouds: small, so that a body over it is still
/// sent whole before the answer (a larger one could meet a closed connection).
const MAX_REQUEST_BYTES: usize = 4096;

async fn started() -> (tempfile::TempDir, Cloud) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_request_bytes = MAX_REQUEST_BYTES;
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    (dir, cloud)
}

async fn served_document(cloud: &Cloud) -> Value {
    let answer = exchange(cloud.api_addr, "GET", "/v1/openapi.json", &[], None).await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).expect("the served document is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_served_without_a_key_and_is_the_generated_one() {
    let (_dir, cloud) = started().await;
    let served = served_document(&cloud).await;
    let version = served["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3."), "not OpenAPI 3.x: {version}");
    let generated =
        serde_json::to_value(devtables_cloud::openapi::document()).expect("serializable");
    assert_eq!(
        served, generated,
        "the served document is not the generated one"
    );

    // The bearer scheme the protected operations name, in the form the keys have.
    let scheme = &served["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    assert_eq!(scheme["bearerFormat"], "dt_<id>_<secret>", "{scheme}");
    // The one error shape, with its closed set of kinds.
    let error = &served["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], json!(["error", "kind"]), "{error}");
    let kinds = &served["components"]["schemas"]["ErrorKind"]["enum"];
    for kind in [
        "unauthorized",
        "forbidden",
        "not_found",
        "no_route",
        "invalid",
    ] {
        assert!(
            kinds.as_array().is_some_and(|k| k.contains(&json!(kind))),
            "{kind} missing from {kinds}"
        );
    }
    // Every operation that needs a key documents the refusals, and every error answer has the
    // error shape.
    for (path, method, keyed) in operations(&served) {
        let op = &served["paths"][&path][method.to_ascii_lowercase()];
        let responses = op["responses"].as_object().expect("responses");
        if keyed {
            for code in ["401", "403"] {
                assert!(responses.contains_key(code), "{method} {path}: no {code}");
            }
        }
        for (code, response) in responses {
            if code.starts_with('2') || path == "/ready" {
                continue;
            }
            assert_eq!(
                response["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path} {code}"
            );
        }
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_every_documented_operation_is_routed_and_only_those_methods() {
    let (_dir, cloud) = started().await;
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let doc = served_document(&cloud).await;
    let auth = format!("Authorization: Bearer {key}");
    // A registered device, so that the device routes find one.
    let (code, body) = request(
        api,
        "POST",
        "/v1/devices",
        Some(&key),
        Some(&json!({"account": ACCOUNT, "device": "dev0"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    let operations = operations(&doc);
    assert!(operations.len() >= 20, "too few operations: {operations:?}");
    let mut documented: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for (path, method, _) in &operations {
        documented
            .entry(path.clone())
            .or_default()
            .insert(method.clone());
    }
    for (template, methods) in &documented {
        let path = concrete(template);
        for method in METHODS {
            let body = (method != "GET").then_some(b"{}".as_slice());
            let headers = [auth.as_str(), "Content-Type: application/json"];
            let answer = exchange(api, method, &path, &headers, body).await;
            let what = format!("{method} {path} (documented: {methods:?})");
            if methods.contains(method) {
                // Served: whatever the handler answers, it is neither a missing route nor a
                // refused method.
                assert_ne!(answer.code, 405, "{what}: {}", answer.body);
                assert!(
                    !(answer.code == 404 && answer.json()["kind"] == "no_route"),
                    "{what}: no route: {}",
                    answer.body
                );
                if answer.code >= 400 {
                    assert_error_shape(&answer, None, &what);
                }
            } else {
                // Not documented, so not served: 405 in the error shape, and `Allow` names
                // exactly the documented methods (HEAD comes with GET).
                assert_eq!(answer.code, 405, "{what}: {}", answer.body);
                assert_error_shape(&answer, Some("method_not_allowed"), &what);
                let allowed: BTreeSet<String> = answer
                    .header("allow")
                    .unwrap_or_else(|| panic!("{what}: no Allow header"))
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .filter(|m| m != "HEAD")
                    .collect();
                assert_eq!(&allowed, methods, "{what}: Allow");
            }
        }
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_security_matches_what_the_routes_demand() {
    let (_dir, cloud) = started().await;
    let api = cloud.api_addr;
    let doc = served_document(&cloud).await;
    let mut open = BTreeSet::new();
    for (template, method, keyed) in operations(&doc) {
        let path = concrete(&template);
        let body = (method != "GET").then_some(b"{}".as_slice());
        let answer = exchange(
            api,
            &method,
            &path,
            &["Content-Type: application/json"],
            body,
        )
        .await;
        let what = format!("{method} {path} without a key");
        if keyed {
            assert_eq!(answer.code, 401, "{what}: {}", answer.body);
            assert_error_shape(&answer, Some("unauthorized"), &what);
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"), "{what}");
        } else {
            assert!(
                answer.code != 401 && answer.code != 403,
                "{what}: the document says it is open: {} {}",
                answer.code,
                answer.body
            );
            open.insert(template);
        }
    }
    // Exactly the routes that hold no data are open.
    let expected: BTreeSet<String> = ["/health", "/ready", "/v1/openapi.json"]
        .map(String::from)
        .into();
    assert_eq!(open, expected);
    cloud.shutdown().await;
}

/// A request that must fail: (what, method, path, header lines, body, status, kind).
type ErrorCase<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<&'a str>,
    Option<&'a [u8]>,
    u16,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_errors_keep_one_shape_wherever_they_come_from() {
    let (_dir, cloud) = started().await;
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let auth = format!("Authorization: Bearer {key}");
    let json_type = "Content-Type: application/json";
    let devices = "/v1/devices";
    let oversized = vec![b' '; 2 * MAX_REQUEST_BYTES];
    let cases: Vec<ErrorCase> = vec![
        (
            "an unknown route",
            "GET",
            "/v2/nothing",
            vec![],
            None,
            404,
            "no_route",
        ),
        (
            "a wrong method",
            "PUT",
            devices,
            vec![],
            None,
            405,
            "method_not_allowed",
        ),
        ("no key", "GET", devices, vec![], None, 401, "unauthorized"),
        (
            "bad JSON",
            "POST",
            devices,
            vec![&auth, json_type],
            Some(b"{not json"),
            400,
            "bad_request",
        ),
        (
            "a body that is not sent as JSON",
            "POST",
            devices,
            vec![&auth],
            Some(br#"{"account":"acme","device":"d"}"#),
            415,
            "bad_request",
        ),
        (
            "JSON of the wrong shape",
            "POST",
            devices,
            vec![&auth, json_type],
            Some(br#"{"account":1}"#),
            422,
            "bad_request",
        ),
        (
            "an integer past 64 bits (it would be rounded)",
            "POST",
            "/v1/accounts/acme/devices/d1/items/Setting",
            vec![&auth, json_type],
            Some(br#"{"deviceId":"d1","name":"n","value":"x","big":123456789012345678901234}"#),
            400,
            "bad_request",
        ),
        (
            "a body over max_request_bytes",
            "POST",
            devices,
            vec![&auth, json_type],
            Some(&oversized),
            413,
            "too_large",
        ),
        (
            "a query string that does not parse",
            "GET",
            "/v1/devices?limit=-1",
            vec![&auth],
            None,
            400,
            "bad_request",
        ),
        (
            "a path segment that is not UTF-8",
            "GET",
            "/v1/devices/acme/%FF%FE",
            vec![&auth],
            None,
            400,
            "bad_request",
        ),
        (
            "a name that breaks the rule",
            "GET",
            "/v1/accounts/acme/devices/a%20b/items/Setting",
            vec![&auth],
            None,
            400,
            "invalid",
        ),
        (
            "an unknown model",
            "GET",
            "/v1/accounts/acme/items/NoSuchModel",
            vec![&auth],
            None,
            404,
            "not_found",
        ),
        (
            "another account",
            "GET",
            "/v1/accounts/globex/keys",
            vec![&auth],
            None,
            403,
            "forbidden",
        ),
    ];
    for (what, method, path, headers, body, status, kind) in cases {
        let answer = exchange(api, method, path, &headers, body).await;
        let what = format!("{what} ({method} {path})");
        assert_eq!(answer.code, status, "{what}: {}", answer.body);
        assert_error_shape(&answer, Some(kind), &what);
        if what.starts_with("an integer past 64 bits") {
            assert!(
                answer.body.contains("123456789012345678901234"),
                "the refusal names the integer: {}",
                answer.body
            );
        }
    }
    cloud.shutdown().await;
}

/// What the property-based run (`.ci/schemathesis`) found, kept as plain regressions: a count
/// past the documented `int64` range is refused (it was taken), a query naming a device or
/// account that breaks the naming rule is refused as the document says (it was answered as an
/// empty page), and a revoked device reads as revoked (nothing told).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_found_counts_and_names_in_queries_are_checked_and_revoked_devices_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // Without keys, so that nothing but the name rule stands in the way.
    config.insecure_no_auth = true;
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    // A count is read in the documented range (int64), and capped to a page.
    let answer = exchange(
        api,
        "GET",
        "/v1/devices?limit=9223372036854775807",
        &[],
        None,
    )
    .await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    for path in [
        "/v1/devices?limit=9223372036854775808",
        "/v1/accounts/acme/conflicts?before=18446744073709551615",
    ] {
        let answer = exchange(api, "GET", path, &[], None).await;
        assert_eq!(answer.code, 400, "GET {path}: {}", answer.body);
        assert_error_shape(&answer, Some("bad_request"), path);
    }
    // limit=0 is refused, as the CLI's `--limit 0` is, and says what to do.
    for path in [
        "/v1/devices?limit=0",
        "/v1/accounts/acme/items/Setting?limit=0",
        "/v1/accounts/acme/conflicts?limit=0",
    ] {
        let answer = exchange(api, "GET", path, &[], None).await;
        assert_eq!(answer.code, 400, "GET {path}: {}", answer.body);
        assert_error_shape(&answer, Some("invalid"), path);
        assert!(
            answer.body.contains("limit must be at least 1"),
            "{}",
            answer.body
        );
    }
    for path in [
        "/v1/accounts/acme/items/Setting?device=",
        "/v1/accounts/acme/items/Setting?device=a%2Fb",
        "/v1/accounts/a%20b/items/Setting",
        "/v1/accounts/a%20b/conflicts",
        "/v1/accounts/a%20b/keys",
        "/v1/devices?account=",
    ] {
        let answer = exchange(api, "GET", path, &[], None).await;
        assert_eq!(answer.code, 400, "GET {path}: {}", answer.body);
        assert_error_shape(&answer, Some("invalid"), path);
    }

    let (code, body) = request(
        api,
        "POST",
        "/v1/devices",
        None,
        Some(&json!({"account": ACCOUNT, "device": "dev0"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let device = format!("/v1/devices/{ACCOUNT}/dev0");
    let (code, body) = request(api, "GET", &device, None, None).await;
    assert_eq!((code, &body["revoked"]), (200, &json!(false)), "{body}");
    let (code, body) = request(api, "DELETE", &device, None, None).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = request(api, "GET", &device, None, None).await;
    assert_eq!((code, &body["revoked"]), (200, &json!(true)), "{body}");
    let (_, list) = request(api, "GET", "/v1/devices", None, None).await;
    assert_eq!(list["devices"][0]["revoked"], true, "{list}");
    // A new secret reinstates it.
    let (code, body) = request(api, "POST", &format!("{device}/secret"), None, None).await;
    assert_eq!(code, 200, "{body}");
    let (_, body) = request(api, "GET", &device, None, None).await;
    assert_eq!(body["revoked"], false, "{body}");
    cloud.shutdown().await;
}
