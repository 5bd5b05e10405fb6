//! The management web UI: three files (`crates/server/ui/`: the page, its
//! script and its style sheet), embedded in the binary at build time and
//! served at `/` beside the API on the management port, as RabbitMQ serves
//! its UI. The page uses only the public `/api` (see `ui/app.js`); nothing
//! is fetched from elsewhere, and the content security policy says so.

use axum::Router;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

/// Scripts, styles, images and API calls from this origin only; no frames.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
frame-ancestors 'none'; form-action 'none'";

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Always revalidated: a new broker serves a new UI.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The UI's routes (no state; the page authenticates against the API).
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
}

/// A 401 to the page's own requests (marked `X-Requested-With:
/// XMLHttpRequest`, as RabbitMQ's UI marks them) carries no basic-auth
/// challenge, so the browser shows the page's login form rather than its
/// own password prompt. Other clients get the challenge as before.
pub(super) async fn no_challenge_for_the_page(req: Request, next: Next) -> Response {
    let from_page = req
        .headers()
        .get("x-requested-with")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"XMLHttpRequest"));
    let mut response = next.run(req).await;
    if from_page {
        response.headers_mut().remove(header::WWW_AUTHENTICATE);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads what is embedded, and the script builds the DOM from
    /// text: no HTML is parsed from data.
    #[test]
    fn the_page_loads_the_embedded_files_and_the_script_never_parses_html() {
        assert!(INDEX.contains("src=\"ui/app.js\"") && INDEX.contains("href=\"ui/app.css\""));
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "eval(",
            "document.write",
        ] {
            assert!(!SCRIPT.contains(forbidden), "app.js uses {forbidden}");
        }
        assert!(!STYLE.contains("http"), "the style sheet fetches nothing");
    }
}
