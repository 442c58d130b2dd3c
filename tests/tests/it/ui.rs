//! The dashboard in a real browser: a live Tally (edge and query service on loopback ports over
//! the embedded database, as `tally` runs them) with known events of two tenants, and Debian's
//! headless Chromium driven through chromedriver. Every view's figures are checked against the
//! JSON API's answers for the same range; another tenant's key sees none of them; a wrong key
//! and a key without the `query` scope are refused; the browser logs no console error; and a
//! screenshot of each view is saved under `target/ui-screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use query::ui::json::Json;
use rust_decimal::Decimal;
use sink::{EventRow, Scope};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::query_hardening::query_state;
use crate::support::{Backend, TestEdge, both_backends, create_key};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Events of the first tenant: more than one page of the listing (50).
const ACME_EVENTS: usize = 64;
/// How long the browser may take to show a page.
const WAIT: Duration = Duration::from_secs(10);

fn at_us(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1000).unwrap_or_default()
}

/// Known events: three services, priced and unpriced, errors, latencies, spread over the last
/// 20 hours (inside every range the dashboard offers).
fn acme_events(now: OffsetDateTime) -> Vec<(wire::Event, Option<Decimal>)> {
    (0..ACME_EVENTS)
        .map(|index| {
            let at = now - time::Duration::minutes(17 * index as i64 + 5);
            let user = format!("acme-user-{}", index % 5);
            let (event, cost) = match index % 3 {
                0 => (
                    wire::Event::new(&user, "llm_service", "openai", "completion")
                        .with_model("gpt-4o")
                        .with_quantity(wire::QuantityKind::InputTokens, 100.0 + index as f64),
                    Some(Decimal::new(1_250 + index as i64, 6)),
                ),
                1 => (
                    wire::Event::new(&user, "ocr_service", "acme-ocr", "page")
                        .with_quantity(wire::QuantityKind::Pages, 2.0),
                    Some(Decimal::new(3, 2)),
                ),
                _ => (
                    wire::Event::new(&user, "custom", "p", "job")
                        .with_quantity(wire::QuantityKind::Requests, 1.0),
                    None,
                ),
            };
            let event = event.at(at_us(at)).with_latency_ms(5.0 + (index * 7 % 90) as f64);
            let event =
                if index % 7 == 0 { event.with_error(Some("upstream_timeout".into())) } else { event };
            (event, cost)
        })
        .collect()
}

async fn commit(
    edge: &TestEdge,
    tenant: uuid::Uuid,
    events: Vec<(wire::Event, Option<Decimal>)>,
) -> Result<()> {
    for (event, cost) in events {
        edge.store.commit(&[EventRow::new(tenant, event, cost)]).await?;
    }
    Ok(())
}

/// chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    process: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Result<Driver> {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            bail!(
                "the browser test needs Debian's Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): \
                 apt-get install -y chromium chromium-driver"
            );
        }
        let port = tests::free_port()?;
        let process = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("failed to start chromedriver")?;
        tests::Service::wait_for_port(format!("127.0.0.1:{port}").parse()?).await?;
        Ok(Driver { process, url: format!("http://127.0.0.1:{port}") })
    }

    async fn browser(&self) -> Result<Client> {
        let capabilities = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1100", "--no-first-run", "--disable-extensions"]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        });
        let serde_json::Value::Object(capabilities) = capabilities else { bail!("capabilities") };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        Ok(ClientBuilder::new(connector).capabilities(capabilities).connect(&self.url).await?)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
    }
}

/// chromedriver's browser log (`goog:loggingPrefs`), a command fantoccini does not name.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(&self, base_url: &url::Url, session_id: Option<&str>) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or_default()))
    }

    fn method_and_body(&self, _url: &url::Url) -> (axum::http::Method, Option<String>) {
        (axum::http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// The browser log's entries at level SEVERE (console errors, failed loads, CSP violations).
async fn console_errors(browser: &Client) -> Result<Vec<String>> {
    let log = browser.issue_cmd(BrowserLog).await?;
    Ok(log
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["level"] == "SEVERE")
        .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// A live query service (with the dashboard) over the edge's database, on a loopback port.
async fn serve_query(edge: &TestEdge, stop: &CancellationToken) -> Result<SocketAddr> {
    let state = query_state(edge, Duration::from_secs(15)).await?;
    headers_cookie_and_fallback(&state, &edge.key).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve::serve(
        listener,
        query::router(state),
        serve::HttpLimits::default(),
        None,
        "query",
        stop.clone(),
    ));
    Ok(addr)
}

/// What the browser does not show: every page carries the strict Content-Security-Policy, the
/// session cookie is `HttpOnly; SameSite=Strict; Path=/ui`, holds no key and is `Secure` when
/// the request came over HTTPS (or `secure_cookies` is set), `/` leads to the dashboard, and
/// unknown paths still answer the API's JSON 404.
async fn headers_cookie_and_fallback(state: &std::sync::Arc<query::QueryState>, key: &str) -> Result<()> {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use tower::ServiceExt;
    let send = |request: Request<Body>| query::router(state.clone()).oneshot(request);
    let page = send(Request::get("/ui/sign-in").body(Body::empty())?).await?;
    ensure!(page.status() == StatusCode::OK, "sign-in page: {}", page.status());
    let policy = page.headers().get(header::CONTENT_SECURITY_POLICY).context("a CSP")?;
    ensure!(policy == query::ui::CONTENT_SECURITY_POLICY, "{policy:?}");
    let root = send(Request::get("/").body(Body::empty())?).await?;
    ensure!(root.headers().get(header::LOCATION).is_some_and(|to| to == "/ui/"), "/ redirects to /ui/");
    let form = |proto: Option<(&str, &str)>| {
        let mut form =
            Request::post("/ui/sign-in").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some((name, value)) = proto {
            form = form.header(name, value);
        }
        form.body(Body::from(format!("api_key={key}")))
    };
    let cookie_of = |response: axum::response::Response| -> Result<String> {
        Ok(response.headers().get(header::SET_COOKIE).context("a session cookie")?.to_str()?.to_owned())
    };
    let cookie = cookie_of(send(form(None)?).await?)?;
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        ensure!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    ensure!(!cookie.contains(key), "the cookie holds no key");
    ensure!(!cookie.contains("Secure"), "{cookie}: plain HTTP could not send a Secure cookie back");
    for proxy in [("x-forwarded-proto", "https"), ("forwarded", "for=192.0.2.1;proto=https")] {
        let cookie = cookie_of(send(form(Some(proxy))?).await?)?;
        ensure!(cookie.ends_with("; Secure"), "{proxy:?}: {cookie}");
    }
    let cookie = cookie_of(send(form(Some(("x-forwarded-proto", "http")))?).await?)?;
    ensure!(!cookie.contains("Secure"), "{cookie}");
    let always = query::QueryConfig { secure_cookies: true, ..state.config.clone() };
    let always = query::QueryState::with_backend(always, state.backend.clone(), None);
    let cookie = cookie_of(query::router(always).oneshot(form(None)?).await?)?;
    ensure!(cookie.ends_with("; Secure"), "secure_cookies: {cookie}");
    let unknown = send(Request::get("/no/such/path").body(Body::empty())?).await?;
    ensure!(unknown.status() == StatusCode::NOT_FOUND, "unknown path: {}", unknown.status());
    let body = axum::body::to_bytes(unknown.into_body(), 1 << 16).await?;
    ensure!(serde_json::from_slice::<serde_json::Value>(&body)?["error"].is_string(), "a JSON 404");
    Ok(())
}

/// What the test drives: the browser, the query port and the signed-in key.
struct Session<'a> {
    browser: &'a Client,
    addr: SocketAddr,
    key: String,
    screenshots: PathBuf,
}

impl Session<'_> {
    async fn open(&self, path: &str) -> Result<()> {
        self.browser.goto(&format!("http://{}{path}", self.addr)).await?;
        // Every page has a header; wait for it (a navigation still under way has none).
        self.browser.wait().at_most(WAIT).for_element(Locator::Css("body > header")).await?;
        Ok(())
    }

    /// The text of the element with this test id, waiting (up to 10 s) for a page that has it.
    async fn text(&self, test_id: &str) -> Result<String> {
        let locator = format!("[data-testid=\"{test_id}\"]");
        let element = self.browser.wait().at_most(WAIT).for_element(Locator::Css(&locator)).await;
        let element = element.with_context(|| format!("no element {test_id}"))?;
        Ok(element.text().await?.trim().to_owned())
    }

    /// Clicks what `selector` names and waits (up to 10 s) for the browser to arrive at a URL
    /// whose path and query contain `expected`.
    async fn follow(&self, selector: &str, expected: &str) -> Result<()> {
        self.browser.find(Locator::Css(selector)).await?.click().await?;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let url = self.browser.current_url().await?;
            let at = match url.query() {
                Some(query) => format!("{}?{query}", url.path()),
                None => url.path().to_owned(),
            };
            if at.contains(expected) {
                return Ok(());
            }
            ensure!(std::time::Instant::now() < deadline, "{selector} led to {at}, not {expected}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn count(&self, selector: &str) -> Result<usize> {
        Ok(self.browser.find_all(Locator::Css(selector)).await?.len())
    }

    /// The JSON API's answer, with this session's key.
    async fn api(&self, path: &str) -> Result<Json> {
        let answer = tests::http(self.addr, "GET", path, &[("x-api-key", &self.key)], "").await?;
        ensure!(answer.status == 200, "GET {path}: {} {}", answer.status, answer.body);
        Ok(Json::parse(&answer.body)?)
    }

    /// The API parameters of the range the page shows.
    async fn range(&self) -> Result<String> {
        let encode = |text: String| text.replace('+', "%2B");
        Ok(format!(
            "start_date={}&end_date={}",
            encode(self.text("range-start").await?),
            encode(self.text("range-end").await?)
        ))
    }

    async fn screenshot(&self, name: &str) -> Result<()> {
        let png = self.browser.screenshot().await?;
        std::fs::write(self.screenshots.join(format!("{name}.png")), png)?;
        Ok(())
    }

    async fn sign_in(&self, key: &str) -> Result<()> {
        self.open("/ui/sign-in").await?;
        self.browser.find(Locator::Id("api_key")).await?.send_keys(key).await?;
        self.browser.find(Locator::Id("sign-in")).await?.click().await?;
        // The answer: the dashboard, or the form again with the reason.
        let answer = Locator::Css("[data-testid=tenant], [data-testid=sign-in-error]");
        self.browser.wait().at_most(WAIT).for_element(answer).await.context("no answer to the sign-in")?;
        Ok(())
    }

    async fn sign_out(&self) -> Result<()> {
        self.follow("form[action=\"/ui/sign-out\"] button", "/ui/sign-in").await
    }
}

/// A figure as shown equals the API's exact decimal.
fn same_decimal(shown: &str, api: &Json, what: &str) -> Result<()> {
    let expected = api.decimal().with_context(|| format!("{what}: the API has no number"))?.normalize();
    ensure!(shown == expected.to_string(), "{what}: the page shows {shown}, the API answers {expected}");
    Ok(())
}

both_backends!(the_dashboard_shows_the_api_figures_in_a_real_browser);

/// On the embedded database (`tally`'s default) the screenshots go to `target/ui-screenshots/`,
/// on PostgreSQL to `target/ui-screenshots/postgres/`.
async fn the_dashboard_shows_the_api_figures_in_a_real_browser(backend: Backend) -> Result<()> {
    let driver = Driver::start().await?;
    let edge = TestEdge::on(backend).await?;
    let now = OffsetDateTime::now_utc();
    commit(&edge, edge.tenant.id, acme_events(now)).await?;
    let globex = edge.store.create_tenant("globex").await?;
    let globex_key = create_key(&edge.store, &globex, vec![Scope::Query]).await?;
    let globex_events = (0..3)
        .map(|index| {
            let at = now - time::Duration::minutes(30 * index + 3);
            let event = wire::Event::new("globex-user", "search", "bing", "query").at(at_us(at));
            (event.with_quantity(wire::QuantityKind::Requests, 1.0), Some(Decimal::new(7, 1)))
        })
        .collect();
    commit(&edge, globex.id, globex_events).await?;
    let (_, ingest_only_key) = edge.other_tenant("initech").await?;
    let stop = CancellationToken::new();
    let addr = serve_query(&edge, &stop).await?;

    let mut screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    if backend == Backend::Postgres {
        screenshots.push("postgres");
    }
    std::fs::create_dir_all(&screenshots)?;
    let browser = driver.browser().await?;
    let session = Session { browser: &browser, addr, key: edge.key.clone(), screenshots };
    let outcome = drive(&session, &ingest_only_key, &globex_key).await;
    let errors = console_errors(&browser).await;
    browser.close().await?;
    stop.cancel();
    outcome?;
    let errors = errors?;
    ensure!(errors.is_empty(), "the browser logged errors: {errors:#?}");
    Ok(())
}

async fn drive(session: &Session<'_>, ingest_only_key: &str, globex_key: &str) -> Result<()> {
    // `/` leads to the dashboard, which asks for a key first.
    session.open("/").await?;
    let url = session.browser.current_url().await?;
    ensure!(url.path() == "/ui/sign-in", "/ leads to {url}");
    session.sign_in("tly_not_a_key_at_all").await?;
    let refused = session.text("sign-in-error").await?;
    ensure!(refused.contains("not valid"), "a wrong key: {refused}");
    session.screenshot("sign-in-refused").await?;
    session.sign_in(ingest_only_key).await?;
    let refused = session.text("sign-in-error").await?;
    ensure!(refused.contains("query scope"), "a key without the query scope: {refused}");

    session.sign_in(&session.key).await?;
    ensure!(session.text("tenant").await? == "acme", "signed in as acme");
    overview(session).await?;
    breakdown(session).await?;
    reliability(session).await?;
    events(session).await?;
    billing(session).await?;

    // Another tenant's key sees none of the first tenant's data.
    session.sign_out().await?;
    session.open("/ui/").await?;
    ensure!(session.browser.current_url().await?.path() == "/ui/sign-in", "the session ended at sign-out");
    session.sign_in(globex_key).await?;
    for path in [
        "/ui/?range=30d",
        "/ui/breakdown?range=30d",
        "/ui/reliability?range=30d",
        "/ui/events?range=30d",
        "/ui/billing",
    ] {
        session.open(path).await?;
        let source = session.browser.source().await?;
        let start = source.find("<main").unwrap_or(0);
        let shown = source.get(start..(start + 600).min(source.len())).unwrap_or_default();
        ensure!(source.contains("globex"), "{path}: the page names globex: {shown}");
        for acme in ["acme-user", "llm_service", "ocr_service", "acme-ocr"] {
            ensure!(!source.contains(acme), "{path}: globex sees {acme}");
        }
    }
    session.open("/ui/?range=30d").await?;
    ensure!(session.text("overview-events").await? == "3", "globex sees its own 3 events only");
    Ok(())
}

async fn overview(session: &Session<'_>) -> Result<()> {
    for range in ["24h", "7d", "30d", "month"] {
        session.open(&format!("/ui/?range={range}")).await?;
        let period = if range == "24h" { "hour" } else { "day" };
        let api = session
            .api(&format!("/api/v1/usage/aggregate?group_by=none&period={period}&{}", session.range().await?))
            .await?;
        let totals = api.get("total_aggregates");
        ensure!(
            session.text("overview-events").await? == totals.get("event_count").text(),
            "{range}: events"
        );
        same_decimal(&session.text("overview-cost").await?, totals.get("total_cost"), "cost")?;
        ensure!(session.text("overview-users").await? == totals.get("unique_users").text(), "{range}: users");
        ensure!(
            session.text("overview-unpriced").await? == totals.get("unpriced_event_count").text(),
            "{range}: unpriced"
        );
        ensure!(
            session.count("[data-testid=unpriced-callout]").await? == 1,
            "{range}: unpriced events are called out"
        );
        for (index, row) in api.get("aggregates").items().iter().enumerate() {
            let shown = session.text(&format!("period-{index}-events")).await?;
            ensure!(shown == row.get("event_count").text(), "{range}: period {index} events");
            same_decimal(
                &session.text(&format!("period-{index}-cost")).await?,
                row.get("total_cost"),
                "period cost",
            )?;
        }
        if range == "7d" {
            ensure!(
                totals.get("event_count").integer() == Some(ACME_EVENTS as i64),
                "every event is in the last 7 days"
            );
        }
    }
    let bill = session.api("/api/v1/billing/summary").await?;
    same_decimal(&session.text("overview-month-to-date").await?, bill.get("total_cost"), "month to date")?;
    same_decimal(
        &session.text("overview-projection").await?,
        bill.get("projection").get("total_cost"),
        "projection",
    )?;
    session.open("/ui/?range=7d").await?;
    session.screenshot("overview").await?;
    // At phone width the page reflows: nothing wider than the window.
    session.browser.set_window_size(390, 844).await?;
    session.open("/ui/?range=7d").await?;
    session.screenshot("overview-phone").await?;
    let overflow = session.browser.execute("return document.documentElement.scrollWidth;", vec![]).await?;
    ensure!(overflow.as_u64().is_some_and(|width| width <= 390), "wider than a phone: {overflow}");
    session.browser.set_window_size(1280, 1100).await?;
    Ok(())
}

async fn breakdown(session: &Session<'_>) -> Result<()> {
    session.open("/ui/breakdown?range=7d").await?;
    let range = session.range().await?;
    for dimension in ["service_type", "service_provider", "model", "event_type"] {
        let api = session
            .api(&format!("/api/v1/analytics/breakdown?group_by={dimension}&limit=20&{range}"))
            .await?;
        let rows = api.get("rows").items();
        ensure!(!rows.is_empty(), "{dimension}: rows");
        ensure!(
            session
                .count(&format!("[data-testid$=\"-events\"][data-testid^=\"breakdown-{dimension}-\"]"))
                .await?
                == rows.len(),
            "{dimension}: row count"
        );
        for (index, row) in rows.iter().enumerate() {
            let id = |what: &str| format!("breakdown-{dimension}-{index}-{what}");
            let key = row.get("key").get(dimension).text();
            let shown_key = session.text(&id("key")).await?;
            ensure!(
                shown_key == key || (key.is_empty() && shown_key == "none"),
                "{dimension} {index}: {shown_key} vs {key}"
            );
            ensure!(
                session.text(&id("events")).await? == row.get("event_count").text(),
                "{dimension} {index}: events"
            );
            same_decimal(&session.text(&id("cost")).await?, row.get("total_cost"), "breakdown cost")?;
        }
    }
    let users = session.api(&format!("/api/v1/analytics/top-users?by=total_cost&limit=10&{range}")).await?;
    for (index, user) in users.get("users").items().iter().enumerate() {
        ensure!(
            session.text(&format!("top-user-{index}-user")).await? == user.get("user_id").text(),
            "top user {index}"
        );
        same_decimal(
            &session.text(&format!("top-user-{index}-cost")).await?,
            user.get("total_cost"),
            "top user cost",
        )?;
    }
    session.screenshot("breakdown").await
}

async fn reliability(session: &Session<'_>) -> Result<()> {
    session.open("/ui/reliability?range=24h").await?;
    let api = session
        .api(&format!("/api/v1/analytics/errors?group_by=service_type&{}", session.range().await?))
        .await?;
    let rows = api.get("rows").items();
    ensure!(rows.len() == 3, "three services: {}", rows.len());
    for (index, row) in rows.iter().enumerate() {
        let id = |what: &str| format!("reliability-{index}-{what}");
        ensure!(
            session.text(&id("service")).await? == row.get("key").get("service_type").text(),
            "service {index}"
        );
        ensure!(session.text(&id("events")).await? == row.get("event_count").text(), "events {index}");
        ensure!(session.text(&id("errors")).await? == row.get("error_count").text(), "errors {index}");
        ensure!(
            session.text(&id("p95")).await? == format!("{} ms", row.get("latency_p95_ms").text()),
            "p95 {index}"
        );
    }
    ensure!(session.count("svg.chart").await? == 6, "a latency and an error chart per service");
    session.screenshot("reliability").await
}

async fn events(session: &Session<'_>) -> Result<()> {
    session.open("/ui/events?range=7d").await?;
    let range = session.range().await?;
    let api = session.api(&format!("/api/v1/usage?limit=50&{range}")).await?;
    ensure!(session.text("events-total").await? == api.get("total_count").text(), "events total");
    let listed = api.get("events").items();
    ensure!(
        session.count("[data-testid$=\"-link\"][data-testid^=\"event-\"]").await? == listed.len(),
        "a page of events"
    );
    for (index, event) in listed.iter().enumerate().take(5) {
        ensure!(
            session.text(&format!("event-{index}-user")).await? == event.get("user_id").text(),
            "event {index}"
        );
    }
    session.screenshot("events").await?;
    // The next page continues where the first ended.
    session.follow("[data-testid=next-page]", "cursor=").await?;
    let cursor = api.get("next_cursor").text().to_owned();
    let next = session.api(&format!("/api/v1/usage?limit=50&{range}&cursor={cursor}")).await?;
    let first = next.get("events").items().first().context("a second page")?;
    ensure!(session.text("event-0-user").await? == first.get("user_id").text(), "the second page");
    // Filters narrow the listing as the API's do.
    session.open("/ui/events?range=7d&service_type=ocr_service").await?;
    let filtered = session
        .api(&format!("/api/v1/usage?limit=50&service_type=ocr_service&{}", session.range().await?))
        .await?;
    ensure!(session.text("events-total").await? == filtered.get("total_count").text(), "filtered total");
    // One event's detail.
    let first = filtered.get("events").items().first().context("an ocr event")?;
    session.browser.find(Locator::Css("[data-testid=event-0-link]")).await?.click().await?;
    ensure!(session.text("detail-event_id").await? == first.get("event_id").text(), "the event's detail");
    same_decimal(&session.text("detail-total_cost").await?, first.get("total_cost"), "event cost")?;
    session.screenshot("event-detail").await?;
    // The CSV export holds the filtered set.
    session.open("/ui/events?range=7d&service_type=ocr_service").await?;
    let link = session
        .browser
        .find(Locator::Css("[data-testid=csv-link]"))
        .await?
        .attr("href")
        .await?
        .context("href")?;
    ensure!(
        link.starts_with("/ui/events.csv?") && link.contains("service_type=ocr_service"),
        "csv link {link}"
    );
    Ok(())
}

async fn billing(session: &Session<'_>) -> Result<()> {
    session.open("/ui/billing").await?;
    let bill = session.api("/api/v1/billing/summary").await?;
    ensure!(session.text("billing-month").await? == bill.get("month").text(), "month");
    for (id, field) in [
        ("billing-total", "total_cost"),
        ("billing-usage", "usage_cost"),
        ("billing-tiered", "tiered_charges"),
        ("billing-minimums", "minimum_top_ups"),
    ] {
        same_decimal(&session.text(id).await?, bill.get(field), field)?;
    }
    ensure!(session.text("billing-unpriced").await? == bill.get("unpriced_event_count").text(), "unpriced");
    for (index, rule) in bill.get("rules").items().iter().enumerate() {
        same_decimal(
            &session.text(&format!("rule-{index}-total")).await?,
            rule.get("total_cost"),
            "rule total",
        )?;
    }
    session.screenshot("billing").await
}
