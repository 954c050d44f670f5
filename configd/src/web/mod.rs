//! The web UI, served on a config server's web listener next to the JSON API: pages rendered
//! on the server (maud), live parts over server-sent events, forms for changes. Nothing is
//! built or fetched at run time; the pages work without JavaScript (the script only swaps in
//! the fragments the events carry).
//!
//! Every page asks the same rules as the API ([`crate::auth`]): a user sees the volumes of the
//! sets granted to them, a control is shown only to who may use it, and a form's change goes
//! through the same checks as `/v1/commands` (here and again as it applies). Forms carry the
//! session's CSRF token; every response says `Content-Security-Policy: default-src 'self'`
//! (no inline script or style), `X-Frame-Options: DENY`, `no-referrer`, `nosniff`.
//!
//! | path                    | what                                                         |
//! |-------------------------|--------------------------------------------------------------|
//! | `/login`, `/logout`     | the login form; ending the session                           |
//! | `/`                     | overview: every volume (at risk first, and why), components   |
//! | `/volume/NAME`          | a volume: status, replicas, graphs (`?range=hour|day|week`), recovery commands, its settings, its history |
//! | `/alerts`               | alerts: open, acknowledged, resolved (acknowledge: operators) |
//! | `/activity`, `/history` | this server's activity log; the change history               |
//! | `/config`               | (admins) every entry, with forms to change, add and delete   |
//! | `/events?page=P`        | server-sent events: the live fragments of page P             |
//! | `/ui/set`, `/ui/delete` | the forms' changes                                           |

mod html;
mod pages;

use std::convert::Infallible;

use axum::extract::{ConnectInfo, Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::api::{Api, Peer};
use crate::auth::{LoginRequest, SessionUser, Sight, Who};
use crate::sessions;

pub use html::{Viewer, bytes, secs, utc};
pub use pages::{overview_fragments, overview_page};

/// The largest form a page sends.
pub const FORM_LIMIT: usize = 64 << 10;
/// Live-update streams one server serves at once.
pub const EVENT_STREAMS: usize = 256;

/// A logged-in user on a page, and what they may see.
pub struct PageUser {
    pub user: SessionUser,
    pub sight: Sight,
    /// The session's token (a live stream checks it again at each update).
    pub token: String,
}

impl PageUser {
    fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer { name: &self.user.name, admin: self.sight.is_admin(), csrf: &self.user.session.csrf }
    }

    /// Whether `csrf` (a form's field) is this session's.
    fn csrf_ok(&self, csrf: &str) -> bool {
        sessions::same_secret(csrf, &self.user.session.csrf)
    }
}

/// A page for someone not logged in: to the login form, and back here after.
pub struct ToLogin(Response);

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        self.0
    }
}

fn to_login(parts: &Parts) -> ToLogin {
    let next = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!("/login?next={}", encode(next));
    ToLogin(Redirect::to(&target).into_response())
}

/// Percent-encodes `s` for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl FromRequestParts<Api> for PageUser {
    type Rejection = ToLogin;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<PageUser, ToLogin> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<Peer>>().cloned() else {
            return Err(to_login(parts));
        };
        let token =
            parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(sessions::token_of);
        let Some(token) = token else { return Err(to_login(parts)) };
        let user = crate::auth::session_user(api, token, peer.addr).await.map_err(|_| to_login(parts))?;
        let who = Who::User(user.clone());
        let sight = match who.sight(api) {
            Ok(Some(s)) => s,
            _ => return Err(to_login(parts)),
        };
        Ok(PageUser { user, sight, token: token.to_owned() })
    }
}

/// An error page (a refusal said in words, with the status it is).
fn error_page(status: StatusCode, who: Option<&PageUser>, message: &str) -> Response {
    let body = maud::html! { h1 { (status.canonical_reason().unwrap_or("Error")) } div.msg.error { (message) } };
    (status, html::layout("Error", who.map(|w| w.viewer()).as_ref(), body)).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only a path of this site (no `//host`, no scheme): where a login may send the browser.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._~?=&%-".contains(&b)) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

fn login_page(next: &str, message: Option<&str>) -> maud::Markup {
    let body = maud::html! {
        form.login method="post" action="/login" {
            h1 { "Log in" }
            @if let Some(m) = message { div.msg.error { (m) } }
            input type="hidden" name="next" value=(next);
            label for="user" { "User" }
            input #user type="text" name="user" autocomplete="username" required autofocus;
            label for="password" { "Password" }
            input #password type="password" name="password" autocomplete="current-password" required;
            p { button type="submit" { "Log in" } }
        }
    };
    html::layout("Log in", None, body)
}

async fn login_form(Query(q): Query<LoginQuery>) -> maud::Markup {
    login_page(&safe_next(q.next.as_deref()), None)
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

async fn login(State(api): State<Api>, ConnectInfo(peer): ConnectInfo<Peer>, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    let req = LoginRequest { user: f.user, password: f.password };
    match crate::auth::check_login(&api, &req, peer.addr).await {
        Ok((_, _, token)) => {
            let mut h = HeaderMap::new();
            h.insert(
                header::SET_COOKIE,
                sessions::set_cookie(Some(&token)).parse().expect("a cookie is a header value"),
            );
            (h, Redirect::to(&next)).into_response()
        }
        Err(f) => (f.status, login_page(&next, Some(&f.error.message))).into_response(),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(api): State<Api>, page: PageUser, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if !page.csrf_ok(&f.csrf) {
        return error_page(StatusCode::FORBIDDEN, Some(&page), "the form did not carry this session's CSRF token");
    }
    if let Some(t) = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(sessions::token_of)
        && let Err(e) = api.sessions.end(t)
    {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, Some(&page), &e.to_string());
    }
    api.sessions.record(sessions::Event {
        who: format!("user:{}", page.user.name),
        addr: page.user.addr.to_string(),
        what: "logout",
        detail: String::new(),
    });
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, sessions::set_cookie(None).parse().expect("a cookie is a header value"));
    (h, Redirect::to("/login")).into_response()
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("app.css"))
}

async fn js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("app.js"))
}

/// The headers every response of the web UI carries.
async fn harden(mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

/// The web UI's routes.
pub fn router(api: Api) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/static/app.css", get(css))
        .route("/static/app.js", get(js))
        .route("/", get(pages::overview))
        .route("/volume/{name}", get(pages::volume))
        .route("/activity", get(pages::activity))
        .route("/history", get(pages::history))
        .route("/config", get(pages::config))
        .route("/alerts", get(pages::alerts))
        .route("/ui/ack", post(pages::ack))
        .route("/events", get(pages::events))
        .route("/ui/set", post(pages::set))
        .route("/ui/delete", post(pages::delete))
        .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT))
        .layer(axum::middleware::map_response(harden))
        .with_state(api)
}

type EventResult = Result<axum::response::sse::Event, Infallible>;
