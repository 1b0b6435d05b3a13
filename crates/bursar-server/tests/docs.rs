//! Keeps the published contract deliberate: the OpenAPI document is compared with the
//! committed `docs/openapi.json`, and `docs/API.md` must list every error code.
//! After an intended change: `BURSAR_UPDATE_SNAPSHOTS=1 cargo test -p bursar-server --test docs`.

use std::path::PathBuf;

fn docs(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(file)
}

#[test]
fn openapi_document_matches_the_snapshot() {
    let doc = bursar_server::http::openapi::document();
    let json = doc.to_pretty_json().unwrap() + "\n";
    assert!(json.contains("\"openapi\": \"3.1"), "OpenAPI 3.1");
    let path = docs("openapi.json");
    if std::env::var_os("BURSAR_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &json).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == json,
        "the OpenAPI document changed; review the diff and re-run with BURSAR_UPDATE_SNAPSHOTS=1"
    );
}

#[test]
fn api_md_lists_every_error_code() {
    let text = std::fs::read_to_string(docs("API.md")).unwrap();
    for code in bursar_api::ErrorCode::ALL {
        let row = format!("| `{}` | {} |", code.as_str(), code.http_status());
        assert!(text.contains(&row), "docs/API.md lacks the row {row}");
    }
}
