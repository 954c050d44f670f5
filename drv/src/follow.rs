//! A component's configuration from the config servers (`--config-server`): its slice is fetched
//! at start and kept in a local cache (redb), so the component starts and keeps running on the
//! cached copy while every config server is away; then it watches for newer versions (long polls
//! of [`WATCH_WAIT`], a backoff up to [`BACKOFF_MAX`] while no server answers: no polling storm),
//! hands each changed slice to the component, and reports the version it runs, what waits for
//! its restart and, if it has any, its figures (then at least every [`FIGURES_EVERY`]: the
//! watch waits that long at most).
//!
//! The cache (`--config-cache`, one redb file) holds one row per slice: key the API path
//! (`/v1/node/NAME`), value the JSON of `{version, value}`; each fetch replaces it in one
//! transaction, so a crash leaves the previous copy or the new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use drv_configd::api::{Report, Slice};
use drv_configd::client::ApiClient;
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

const SLICES: TableDefinition<&str, &[u8]> = TableDefinition::new("slices");
/// How long one watch waits for a change.
pub const WATCH_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between tries while no config server answers.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a component with figures reports them.
pub const FIGURES_EVERY: Duration = Duration::from_secs(10);
/// What a component says of itself at a report.
pub type FiguresFn = std::sync::Arc<dyn Fn() -> (drv_configd::api::Figures, drv_configd::api::Details) + Send + Sync>;
/// How long a start waits for a config server before it uses the cached copy.
const START_PATIENCE: Duration = Duration::from_secs(5);

/// Where a component's slice comes from and where it is cached.
pub struct Follower {
    client: ApiClient,
    path: String,
    cache: PathBuf,
    /// An agent's volume, for its reports.
    volume: Option<String>,
    figures: Option<FiguresFn>,
}

/// The cache file of one component.
fn open_cache(path: &Path) -> Result<Database> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    Database::create(path).with_context(|| format!("open the configuration cache {}", path.display()))
}

impl Follower {
    /// A staging or replica server's follower.
    pub fn node(client: ApiClient, name: &str, cache: PathBuf) -> Follower {
        let path = format!("/v1/node/{name}");
        Follower { client: client.with_patience(START_PATIENCE), path, cache, volume: None, figures: None }
    }

    /// Reports carry the component's figures (and come at least every [`FIGURES_EVERY`]).
    pub fn with_figures(mut self, f: FiguresFn) -> Follower {
        self.figures = Some(f);
        self
    }

    /// The follower of a volume's agent.
    pub fn volume(client: ApiClient, name: &str, cache: PathBuf) -> Follower {
        let path = format!("/v1/volume/{name}");
        Follower {
            client: client.with_patience(START_PATIENCE),
            path,
            cache,
            volume: Some(name.to_owned()),
            figures: None,
        }
    }

    async fn fetch<T: DeserializeOwned>(&self) -> Result<Slice<T>> {
        let b = self.client.request(drv_configd::client::Method::GET, &self.path, None).await?;
        serde_json::from_slice(&b).with_context(|| format!("decode the configuration at {}", self.path))
    }

    fn store<T: Serialize>(&self, s: &Slice<T>) -> Result<()> {
        let db = open_cache(&self.cache)?;
        let tx = db.begin_write()?;
        tx.open_table(SLICES)?.insert(self.path.as_str(), serde_json::to_vec(s)?.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// The slice cached by the last run (or none).
    pub fn cached<T: DeserializeOwned>(&self) -> Result<Option<Slice<T>>> {
        if !self.cache.exists() {
            return Ok(None);
        }
        let db = open_cache(&self.cache)?;
        let tx = db.begin_read()?;
        let t = match tx.open_table(SLICES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(v) = t.get(self.path.as_str())? else { return Ok(None) };
        let s = serde_json::from_slice(v.value())
            .with_context(|| format!("the cached configuration in {} does not decode", self.cache.display()))?;
        Ok(Some(s))
    }

    /// The slice from a config server (cached for later), or, if none answers, the cached copy.
    pub async fn start<T: Serialize + DeserializeOwned>(&self) -> Result<Slice<T>> {
        match self.fetch().await {
            Ok(s) => {
                self.store(&s)?;
                Ok(s)
            }
            Err(e) => {
                let why = crate::report(e.as_ref());
                match self.cached()? {
                    Some(s) => {
                        eprintln!(
                            "no config server answered ({why}); running on the cached configuration (version {}) from {}",
                            s.version,
                            self.cache.display()
                        );
                        Ok(s)
                    }
                    None => bail!("{why}; and there is no cached configuration at {}", self.cache.display()),
                }
            }
        }
    }

    /// Tells a config server what runs (a server that does not hear it now hears the next one).
    async fn report(&self, version: u64, pending: &[String]) {
        let limit = drv_configd::api::REPORT_PENDING_LIMIT;
        let mut pending: Vec<String> = pending.iter().take(limit).map(|p| clip(p)).collect();
        if pending.len() == limit {
            pending[limit - 1] = "(and more: see the component's log)".into();
        }
        let (figures, details) = self.figures.as_ref().map(|f| blocking(|| f())).unwrap_or_default();
        let r = Report { version, volume: self.volume.clone(), pending, figures, details };
        if let Err(e) = self.client.report(&r).await {
            tracing::debug!("{}: report of version {version}: {e}", self.path);
        }
    }

    /// Follows the configuration from `current` on, forever: each newer slice that differs is
    /// given to `apply` (the running one and the new one), which returns what waits for a
    /// restart (nothing: every change is in force). The report names everything that waited for
    /// a restart since the component started (a change set back is still named: it is sure only
    /// after the restart).
    pub async fn follow<T, F>(self, mut current: Slice<T>, mut apply: F)
    where
        T: Serialize + DeserializeOwned + PartialEq + Send,
        F: FnMut(&T, &T) -> Vec<String> + Send,
    {
        let mut pending = Vec::new();
        self.report(current.version, &pending).await;
        let mut backoff = Duration::from_secs(1);
        let mut away = false;
        loop {
            let wait = if self.figures.is_some() { FIGURES_EVERY } else { WATCH_WAIT };
            let newer = match self.client.watch(current.version, wait).await {
                Ok(w) if w.version > current.version => self.fetch::<T>().await,
                Ok(_) => {
                    // Nothing new: say again what runs (a restarted config server forgot).
                    self.report(current.version, &pending).await;
                    continue;
                }
                Err(e) => Err(e.into()),
            };
            match newer {
                // A server behind the one that answered the watch: nothing newer after all.
                Ok(s) if s.version <= current.version => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(s) => {
                    if away {
                        tracing::info!("{}: a config server answers again (version {})", self.path, s.version);
                    }
                    (away, backoff) = (false, Duration::from_secs(1));
                    if s.value != current.value {
                        // What waits for a restart keeps waiting: the next change's diff no
                        // longer shows it (it is against the configuration, not what runs).
                        for p in blocking(|| apply(&current.value, &s.value)) {
                            if !pending.contains(&p) {
                                pending.push(p);
                            }
                        }
                    }
                    if let Err(e) = self.store(&s) {
                        tracing::warn!("{}: {}", self.path, crate::report(e.as_ref()));
                    }
                    current = s;
                    self.report(current.version, &pending).await;
                }
                Err(e) => {
                    if !away {
                        tracing::warn!(
                            "{}: no newer configuration from the config servers ({}); running on version {} until then",
                            self.path,
                            crate::report(e.as_ref()),
                            current.version
                        );
                    }
                    away = true;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Runs `f`, which may do blocking I/O (opening a volume's files, retiring it from a log), without
/// holding up the runtime's other tasks where the runtime allows it.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => f(),
        _ => tokio::task::block_in_place(f),
    }
}

/// `text` cut to what a report carries.
fn clip(text: &str) -> String {
    let limit = drv_configd::api::REPORT_TEXT_LIMIT;
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
