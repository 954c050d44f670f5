//! `cargo xtask tidy`: checks that keep the docs true to the code (rust-analyzer's `tidy.rs` does the
//! same for its docs). Run first by `cargo xtask test`.
//!
//! - Every file or directory ARCHITECTURE.md, docs/formats.md and the README cite in backticks (or
//!   in the bird's-eye view's `[...]`) exists. A name without a directory is looked up in the crate
//!   of the ARCHITECTURE.md section it is in (`### `dir/``), else anywhere in the tree. Paths on a
//!   running system (`/dev/drv0`), placeholders (`STATE/...`, `NAME.img`) and build output
//!   (`target/...`) are not files of the tree and are skipped.
//! - Every decoder of `format/` (`pub fn decode*`) is exercised by a fuzz target in `fuzz/`.
//! - The test suite leaves the tree as it found it ([`Tree`]): tests write into temporary
//!   directories, never into the source tree.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::root;

/// The files of the tree (and the directories holding them), relative to the root.
fn tracked() -> Result<BTreeSet<String>> {
    // Tracked files and new ones not ignored (a file about to be committed counts).
    let out = Command::new("git")
        .args(["ls-files", "--cached", "--others", "--exclude-standard"])
        .current_dir(root())
        .output()
        .context("run git ls-files")?;
    let mut set = BTreeSet::new();
    for f in String::from_utf8_lossy(&out.stdout).lines() {
        let mut p = Path::new(f);
        set.insert(f.to_owned());
        while let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            set.insert(format!("{}/", parent.display()));
            p = parent;
        }
    }
    Ok(set)
}

/// Whether `t` names something in the tree at all (not a system path, placeholder or command).
fn is_tree_path(t: &str) -> bool {
    const EXT: [&str; 8] = [".rs", ".c", ".h", ".md", ".toml", ".sh", ".json", ".lock"];
    if t.starts_with('/')
        || t.starts_with("target/")
        || t.contains(char::is_whitespace)
        || t.contains(['*', '{', '=', '"'])
        // `drv/1`, a protocol name
        || t.rsplit('/').next().is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let placeholder = |seg: &str| {
        let stem = seg.split('.').next().unwrap_or(seg);
        !stem.is_empty() && stem.chars().all(|c| c.is_ascii_uppercase() || c == '_')
    };
    if t.split('/').any(placeholder) {
        return false;
    }
    t.contains('/') || EXT.iter().any(|e| t.ends_with(e))
}

/// The tokens of `text` that cite paths, with the ARCHITECTURE.md section (a crate directory)
/// each stands in.
fn citations(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### `") {
            section = h.split('`').next().filter(|d| d.ends_with('/')).map(str::to_owned);
        } else if line.starts_with("## ") {
            section = None;
        }
        let ticks = line.split('`').skip(1).step_by(2);
        let brackets = line.split('[').skip(1).filter_map(|s| s.split(']').next()).flat_map(|s| s.split(", "));
        for t in ticks.chain(brackets) {
            let t = t.trim().trim_end_matches([',', '.', ':', ')']);
            if is_tree_path(t) {
                out.push((t.to_owned(), section.clone()));
            }
        }
    }
    out
}

fn resolves(t: &str, section: Option<&str>, files: &BTreeSet<String>) -> bool {
    let mut candidates = vec![t.to_owned()];
    if let Some(d) = section {
        candidates.push(format!("{d}{t}"));
        candidates.push(format!("{d}src/{t}"));
        candidates.push(format!("{d}tests/{t}"));
    }
    if candidates.iter().any(|c| files.contains(c)) {
        return true;
    }
    // A bare name outside a crate's section: anywhere in the tree.
    !t.contains('/') && files.iter().any(|f| f.rsplit('/').next() == Some(t))
}

/// Cited paths that do not exist.
fn dead_citations(files: &BTreeSet<String>) -> Result<Vec<String>> {
    let mut dead = Vec::new();
    for doc in ["ARCHITECTURE.md", "docs/formats.md", "README.md"] {
        let text = std::fs::read_to_string(root().join(doc)).with_context(|| format!("read {doc}"))?;
        for (t, section) in citations(&text) {
            if !resolves(&t, section.as_deref(), files) {
                dead.push(format!(
                    "{doc} cites `{t}`{}, which does not exist",
                    section.map(|s| format!(" (in {s})")).unwrap_or_default()
                ));
            }
        }
    }
    Ok(dead)
}

/// Decoders of `format/src` (`pub fn decode...` and the types whose `decode` they are) that no
/// fuzz target names.
fn unfuzzed_decoders() -> Result<Vec<String>> {
    let mut fuzz = String::new();
    for e in std::fs::read_dir(root().join("fuzz/fuzz_targets")).context("read fuzz/fuzz_targets")? {
        fuzz += &std::fs::read_to_string(e?.path())?;
    }
    let mut missing = Vec::new();
    for e in std::fs::read_dir(root().join("format/src"))? {
        let path = e?.path();
        let text = std::fs::read_to_string(&path)?;
        let mut owner: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("impl ") {
                owner = rest.split([' ', '<', '{']).next().map(str::to_owned);
            }
            let Some(rest) = line.trim_start().strip_prefix("pub fn decode") else { continue };
            let name = format!("decode{}", rest.split('(').next().unwrap_or(""));
            let who = if name == "decode" && line.starts_with("    ") { owner.clone() } else { Some(name.clone()) };
            if let Some(w) = who
                && !fuzz.contains(&w)
            {
                missing.push(format!("{}: {w} has no fuzz target in fuzz/fuzz_targets", path.display()));
            }
        }
    }
    Ok(missing)
}

pub fn tidy() -> Result<()> {
    let files = tracked()?;
    let mut problems = dead_citations(&files)?;
    problems.extend(unfuzzed_decoders()?);
    if !problems.is_empty() {
        bail!("tidy: {} problem(s):\n  {}", problems.len(), problems.join("\n  "));
    }
    println!("tidy: every cited path exists, every decoder has a fuzz target");
    Ok(())
}

/// What `git status` says of the tree (untracked files included), to compare before and after the
/// tests.
pub struct Tree(BTreeSet<String>);

impl Tree {
    pub fn now() -> Result<Tree> {
        let out = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=all"])
            .current_dir(root())
            .output()
            .context("run git status")?;
        Ok(Tree(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()))
    }

    /// Fails if anything changed in the tree since `self` (a test wrote into the source tree).
    pub fn unchanged_since(&self) -> Result<()> {
        let now = Tree::now()?;
        let new: Vec<&String> = now.0.difference(&self.0).collect();
        if !new.is_empty() {
            bail!("the tests changed the source tree (write into a temporary directory instead): {new:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn citations_skip_system_paths_and_placeholders_and_find_sections() {
        let text = "### `wrl/` (crate)\n- `core.rs`: x, `/dev/drv0`, `STATE/fuse/volume`, `NAME.img`, `drv attach x`\n\
                    ## Other\n  -> x  [staging/, format/relay.rs]\n";
        let c = citations(text);
        assert_eq!(
            c,
            vec![
                ("wrl/".to_owned(), Some("wrl/".to_owned())),
                ("core.rs".to_owned(), Some("wrl/".to_owned())),
                ("staging/".to_owned(), None),
                ("format/relay.rs".to_owned(), None)
            ]
        );
        let files: BTreeSet<String> = ["wrl/src/core.rs", "staging/"].iter().map(|s| s.to_string()).collect();
        assert!(resolves("core.rs", Some("wrl/"), &files));
        assert!(!resolves("format/relay.rs", None, &files));
    }
}
