//! The web UI in a real browser (headless Chromium driven over WebDriver by chromedriver)
//! against a real config server, staging server, two replica servers and two agents on
//! loopback, with a real SMTP server (aiosmtpd, Debian's `python3-aiosmtpd`) receiving the
//! alerts: a viewer sees no change controls and the same change over the API is a 403; an
//! operator of set A pauses, resumes and resyncs A and gets a 403 on set B; an admin adds a
//! replica and the open page shows it syncing, then in sync, without a reload; stopping staging
//! turns the volume's row red and a mail arrives, and another when it is back. Screenshots of
//! every page go to `target/test-artifacts/webui/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drv_tests::free_port;
use fantoccini::{Client, Locator};
use serde_json::{Value, json};

use crate::configsrv::{Proc, Servers, drv, replica_status, run_agent, until};

const VOLUME: usize = 64 << 20;

/// Whether this host can run the test (Chromium, chromedriver, aiosmtpd); CI installs them.
fn tools() -> bool {
    let have = |p: &str| Path::new(p).exists();
    let smtp = Command::new("/usr/bin/python3").args(["-c", "import aiosmtpd"]).status().is_ok_and(|s| s.success());
    let ok = have("/usr/bin/chromium") && have("/usr/bin/chromedriver") && smtp;
    if !ok && std::env::var_os("CI").is_some() {
        panic!("chromium, chromium-driver and python3-aiosmtpd are needed (.ci/run installs them)");
    }
    ok
}

/// An SMTP server that keeps what it receives in a Maildir.
struct Smtp {
    _p: Proc,
    dir: PathBuf,
    addr: String,
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let port = free_port();
        let maildir = dir.join("maildir");
        let log = std::fs::File::create(dir.join("smtp.log")).unwrap();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run aiosmtpd");
        let addr = format!("127.0.0.1:{port}");
        until("the SMTP server", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).is_ok());
        Smtp { _p: Proc(child), dir: maildir, addr }
    }

    /// Every mail received: (subject, whole text).
    fn mails(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(rd) = std::fs::read_dir(self.dir.join(sub)) else { continue };
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let subject = text.lines().find_map(|l| l.strip_prefix("Subject: ")).unwrap_or("").to_owned();
                out.push((subject, text));
            }
        }
        out
    }

    fn wait_for(&self, subject: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some((_, text)) = self.mails().into_iter().find(|(s, _)| s.contains(subject)) {
                return text;
            }
            let got: Vec<String> = self.mails().into_iter().map(|m| m.0).collect();
            assert!(start.elapsed() < limit, "no mail {subject:?} within {limit:?} (got {got:?})");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// chromedriver and the browser session it drives.
struct Browser {
    _driver: Proc,
    c: Client,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn start(dir: &Path, base: &str) -> Browser {
        let port = free_port();
        let log = std::fs::File::create(dir.join("chromedriver.log")).unwrap();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run chromedriver");
        let driver = Proc(child);
        let addr = format!("127.0.0.1:{port}");
        until("chromedriver", Duration::from_secs(30), || std::net::TcpStream::connect(&addr).is_ok());
        let mut caps = serde_json::Map::new();
        // The config server's certificate is of the installation's own CA, named for the
        // server (NAME.config.drv), not for 127.0.0.1.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--ignore-certificate-errors",
            "--window-size=1400,1000",
        ];
        caps.insert("goog:chromeOptions".into(), json!({ "binary": "/usr/bin/chromium", "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let c = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
            .expect("a WebDriver session");
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/webui");
        std::fs::create_dir_all(&shots).unwrap();
        Browser { _driver: driver, c, base: base.to_owned(), shots }
    }

    async fn goto(&self, path: &str) {
        self.c.goto(&format!("{}{path}", self.base)).await.unwrap();
    }

    async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    async fn login(&self, user: &str) {
        self.c.delete_all_cookies().await.ok();
        self.goto("/login").await;
        self.c.find(Locator::Css("input[name=user]")).await.unwrap().send_keys(user).await.unwrap();
        self.c.find(Locator::Css("input[name=password]")).await.unwrap().send_keys("correct horse").await.unwrap();
        self.c.find(Locator::Css("form.login button")).await.unwrap().click().await.unwrap();
        self.wait_page("<h1>Overview</h1>", &format!("{user} logging in")).await;
    }

    async fn source(&self) -> String {
        self.c.source().await.unwrap()
    }

    async fn text_of(&self, id: &str) -> String {
        self.c.find(Locator::Id(id)).await.unwrap().text().await.unwrap()
    }

    /// Waits (the page is not reloaded) until the element `id` says `what`.
    async fn wait_text(&self, id: &str, what: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let t = self.text_of(id).await;
            if t.contains(what) {
                return t;
            }
            assert!(start.elapsed() < limit, "#{id} never said {what:?} within {limit:?}; it says {t:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The same change as a form would make, sent from this session to the JSON API: its status.
    async fn api_set(&self, volume: &str, assignment: &str) -> u64 {
        let script = r#"
            const [volume, assignment, done] = arguments;
            fetch('/v1/whoami').then(r => r.json()).then(w => fetch('/v1/commands', {
                method: 'POST',
                headers: {'content-type': 'application/json', 'x-csrf-token': w.csrf},
                body: JSON.stringify({ops: [{op: 'set', kind: 'volume', name: volume, assignments: [assignment]}]}),
            })).then(r => done(r.status)).catch(e => done(String(e)));
        "#;
        let v = self.c.execute_async(script, vec![json!(volume), json!(assignment)]).await.unwrap();
        v.as_u64().unwrap_or_else(|| panic!("the API call: {v}"))
    }

    /// Clicks the button labelled `label`.
    async fn click(&self, label: &str) {
        let xpath = format!("//button[normalize-space(.)='{label}']");
        self.c.find(Locator::XPath(&xpath)).await.unwrap().click().await.unwrap();
        self.wait_page("Done: configuration version", label).await;
    }

    /// Waits for the page a form's submission loads to say `what`.
    async fn wait_page(&self, what: &str, after: &str) {
        let start = Instant::now();
        loop {
            let page = self.source().await;
            if page.contains(what) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{after}: the page never said {what:?}: {page}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A mail's quoted-printable text as it was (soft line breaks joined, `=XX` decoded).
fn unquote(qp: &str) -> String {
    let joined = qp.replace("=\r\n", "").replace("=\n", "");
    let b = joined.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b[i], hex) {
            (b'=', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn staging_volume(s: &Servers, addr: &str, volume: &str) -> Value {
    let c = s.certs.to_str().unwrap();
    let out = drv(&["status", "--role", "staging", "--server", addr, "--certs", c, "--json"], &s.dir, &[]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    v["volumes"].as_array().and_then(|a| a.iter().find(|x| x["name"] == volume).cloned()).unwrap_or_default()
}

#[test]
fn the_web_ui_in_a_browser_shows_each_role_its_volumes_and_tells_of_trouble_by_mail() {
    if !tools() {
        eprintln!("skipped: chromium, chromedriver or aiosmtpd missing here (CI installs them)");
        return;
    }
    let s = Servers::new(1);
    until("a leader", Duration::from_secs(30), || s.status(0).is_some_and(|v| v["leader"].is_string()));
    let d = s.dir.clone();
    for (role, name) in [("staging", "stg1"), ("replica", "rep1"), ("replica", "rep2"), ("agent", "host1")] {
        s.issue(role, name);
    }
    let smtp = Smtp::start(&d);
    let key = d.join("k.key");
    assert!(drv(&["key", "generate", key.to_str().unwrap()], &d, &[]).ok);
    let (stg, rep1, rep2) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    s.set(&["endpoint", "stg1", "role=staging", &format!("address={stg}")]);
    for (n, a) in [("rep1", &rep1), ("rep2", &rep2)] {
        let data = format!("data_dir={}", d.join(n).display());
        s.set(&["endpoint", n, "role=replica", &format!("address={a}"), &data, "drlog_bytes=64M"]);
    }
    s.set(&["key", "k1", &format!("path={}", key.display())]);
    let wrl = format!("devices=[\"{}\"]", d.join("stg1/wrl0").display());
    s.set(&["wrl", "w0", "staging=stg1", &wrl, "segment_bytes=4M", "device_bytes=128M"]);
    for v in ["vol1", "vol2"] {
        s.set(&["volume", v, &format!("size_bytes={VOLUME}"), "wrl=w0", "replicas=[\"rep1\"]", "key=k1"]);
    }
    s.set(&["set", "a", "volumes=[\"vol1\"]", "description=<b>set A</b>"]);
    s.set(&["set", "b", "volumes=[\"vol2\"]"]);
    let pw = "password=correct horse";
    s.set(&["user", "root", pw, "admin=true"]);
    s.set(&["user", "opa", pw, "grants={\"a\":\"operator\",\"b\":\"viewer\"}"]);
    s.set(&["user", "viewa", pw, "grants={\"a\":\"viewer\"}"]);
    s.set(&["mail", "smtp", &format!("address={}", smtp.addr), "security=none", "from=drv <drv@localhost>"]);
    s.set(&[
        "alert",
        "silent",
        "when=silent_seconds",
        "over=20",
        "volumes=[\"vol1\"]",
        "email=[\"ops@example.com\"]",
        "mail_every=1h",
    ]);
    std::fs::create_dir_all(d.join("stg1")).unwrap();
    let cache = |n: &str| d.join(n).join("config-cache.redb").display().to_string();
    let run_args = |role: &'static str, name: &'static str| {
        vec![role.to_owned(), "run".into(), "--name".into(), name.into(), "--config-cache".into(), cache(name)]
    };
    let start = |args: &[String], log: &str| s.component(&args.iter().map(String::as_str).collect::<Vec<_>>(), log);
    let stg_args = run_args("staging", "stg1");
    let mut staging = Some(start(&stg_args, "stg1"));
    let _rep1 = start(&run_args("replica", "rep1"), "rep1");
    let _rep2 = start(&run_args("replica", "rep2"), "rep2");
    let mut agents = Vec::new();
    for (i, v) in ["vol1", "vol2"].iter().enumerate() {
        let source = d.join(format!("{v}.img"));
        std::fs::write(&source, drv_format::pattern(0x60 + i as u64, VOLUME)).unwrap();
        let run = d.join(format!("run-{v}"));
        agents.push(run_agent(&s, v, &source, &run));
        let out = drv(&["sync", "start", v, "--run-dir", run.to_str().unwrap()], &d, &[]);
        assert!(out.ok && out.stdout.contains("\"done\":true"), "{}{}", out.stdout, out.stderr);
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let b = Browser::start(&d, &format!("https://{}", s.web[0])).await;

        // A viewer of set A: vol1 only, no controls; the same change over the API is a 403.
        b.login("viewa").await;
        let rows = b.wait_text("volumes", "vol1", Duration::from_secs(30)).await;
        assert!(!rows.contains("vol2"), "{rows}");
        b.shot("overview-viewer").await;
        b.goto("/volume/vol1").await;
        let page = b.source().await;
        assert!(!page.contains("Pause replication") && !page.contains("Save settings"), "no controls: {page}");
        assert!(page.contains("may view this volume"));
        b.shot("volume-viewer").await;
        assert_eq!(b.api_set("vol1", "paused=true").await, 403, "a hidden button is a 403 too");
        b.goto("/volume/vol2").await;
        assert!(b.source().await.contains("no volume named"), "another set's volume does not exist for them");

        // An operator of set A: pause, resume, resync A; a 403 on B.
        b.login("opa").await;
        b.goto("/volume/vol1").await;
        b.shot("volume-operator").await;
        b.click("Pause replication").await;
        until("staging to pause vol1", Duration::from_secs(30), || staging_volume(&s, &stg, "vol1")["paused"] == true);
        b.goto("/volume/vol1").await;
        b.click("Resume replication").await;
        until("staging to resume vol1", Duration::from_secs(30), || {
            staging_volume(&s, &stg, "vol1")["paused"] == false
        });
        b.goto("/volume/vol1").await;
        b.click("Resync the whole volume").await;
        until("the agent to resync vol1", Duration::from_secs(30), || {
            std::fs::read_to_string(d.join("agent-vol1.log"))
                .unwrap_or_default()
                .contains("a full resync was asked for")
        });
        assert_eq!(b.api_set("vol2", "paused=true").await, 403, "set B is not theirs to change");
        assert_eq!(b.api_set("vol1", "bwlimit=3M").await, 200);

        // An admin adds rep2 to vol1; the open page shows it syncing, then in sync.
        b.login("root").await;
        b.goto("/config").await;
        b.shot("config").await;
        let area = b.c.find(Locator::Css("textarea[aria-label='fields of volume vol1']")).await.unwrap();
        let fields = area.prop("value").await.unwrap().unwrap_or_default();
        let fields = fields.replace("replicas=[\"rep1\"]", "replicas=[\"rep1\",\"rep2\"]");
        assert!(fields.contains("rep2"), "{fields}");
        area.clear().await.unwrap();
        area.send_keys(&fields).await.unwrap();
        let form = b.c.find(Locator::XPath("//textarea[@aria-label='fields of volume vol1']/..")).await.unwrap();
        form.find(Locator::Css("button")).await.unwrap().click().await.unwrap();
        b.wait_page("Done: configuration version", "adding rep2").await;
        b.goto("/volume/vol1").await;
        b.wait_text("status", "rep2: resyncing", Duration::from_secs(60)).await;
        b.shot("volume-adding-replica").await;
        b.wait_text("status", "rep2: replicating", Duration::from_secs(120)).await;
        let status = replica_status(&s, &rep2);
        assert!(status["volumes"][0]["name"] == "vol1", "{status}");
        b.shot("volume-admin").await;
        // A snapshot taken on rep1 shows on the volume's page with the replica's next report.
        let c = s.certs.to_str().unwrap();
        let out = drv(&["snapshot", "create", "vol1", "before-upgrade", "--server", &rep1, "--certs", c], &d, &[]);
        assert!(out.ok, "{}", out.stderr);
        let begun = Instant::now();
        loop {
            b.goto("/volume/vol1").await;
            let page = b.source().await;
            if page.contains("before-upgrade") && page.contains("not checked") {
                break;
            }
            assert!(begun.elapsed() < Duration::from_secs(40), "the snapshot never showed: {page}");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        b.shot("volume-snapshots").await;

        // Staging stops: the row turns red (the page is not reloaded) and a mail arrives.
        b.goto("/").await;
        drop(staging.take());
        let rows = b.wait_text("volumes", "staging stg1 not heard from", Duration::from_secs(90)).await;
        let row = b.c.find(Locator::XPath("//tbody[@id='volumes']/tr[.//a[text()='vol1']]")).await.unwrap();
        assert_eq!(row.attr("class").await.unwrap().as_deref(), Some("bad"), "{rows}");
        b.shot("overview-staging-down").await;
        let fired = smtp.wait_for("FIRING: volume vol1 - silent", Duration::from_secs(90));
        assert!(fired.contains("not heard from for") && fired.contains("ops@example.com"), "{fired}");
        b.goto("/alerts").await;
        assert!(b.source().await.contains("Acknowledge"), "an open alert, and the admin may acknowledge it");
        b.shot("alerts").await;
        b.c.find(Locator::XPath("//button[normalize-space(.)='Acknowledge']")).await.unwrap().click().await.unwrap();
        b.wait_page("Acknowledged.", "acknowledging").await;

        // Staging back: the alert resolves, and that is mailed too.
        staging = Some(start(&stg_args, "stg1"));
        let resolved = smtp.wait_for("RESOLVED: volume vol1 - silent", Duration::from_secs(120));
        assert!(resolved.contains("resolved:"), "{resolved}");
        b.goto("/").await;
        b.wait_text("volumes", "vol1", Duration::from_secs(10)).await;
        b.shot("overview-admin").await;
        for page in ["activity", "history", "alerts"] {
            b.goto(&format!("/{page}")).await;
            b.shot(page).await;
        }
        let activity = b.source().await;
        assert!(activity.contains("Alerts"));
        b.goto("/activity").await;
        let act = b.source().await;
        assert!(act.contains("alert_fired") && act.contains("alert_acked") && act.contains("mail_sent"), "{act}");
        assert!(act.contains("login_failed") || act.contains("login"), "{act}");
        b.c.clone().close().await.ok();
    });

    // The digest: printed, then mailed (text and HTML) and read back from the mailbox.
    let out = s.cli(&["digest", "--period", "day"], &s.all());
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("USAGE") && out.stdout.contains("vol1") && out.stdout.contains("vol2"),
        "{}",
        out.stdout
    );
    let out = s.cli(&["digest", "--period", "week", "--send", "--to", "ops@example.com"], &s.all());
    assert!(out.ok && out.stdout.contains("sent"), "{}{}", out.stdout, out.stderr);
    let digest = unquote(&smtp.wait_for("weekly digest", Duration::from_secs(30)));
    assert!(digest.contains("multipart/alternative") && digest.contains("text/html"), "{digest}");
    let usage =
        digest.lines().find(|l| l.starts_with("vol1 ") && l.contains("iB")).unwrap_or_else(|| panic!("{digest}"));
    // vol1 was written whole twice (the initial sync, the resync) and copied to rep2.
    let written = usage.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap();
    assert!(usage.contains("MiB") && written >= 64.0, "bytes written: {usage}");
    assert!(digest.contains("ALERTS") && digest.contains("silent"), "the week's alerts: {digest}");
    assert!(digest.contains("mail_sent"), "the activity: {digest}");
    let out = s.cli(&["digest", "--period", "month"], &s.all());
    assert!(!out.ok && out.stderr.contains("use week or day"), "{}", out.stderr);
    let out = s.cli(&["digest", "--send", "--to", "not an address"], &s.all());
    assert!(!out.ok && out.stderr.contains("not a mail address"), "{}", out.stderr);
    drop(staging);
    drop(agents);
    let _ = std::fs::remove_dir_all(&s.dir);
}
