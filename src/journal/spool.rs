//! The journal's local spool: changes that could not be committed (the database unreachable,
//! or a commit whose outcome is unknown), kept in a file on the switch's own disk until they
//! are. It mirrors the writer's backlog: a change is appended (and the file flushed to disk)
//! before its terminal is answered, and the file is emptied once the backlog is written. At
//! start the spool is written to the database before anything else runs.
//!
//! One JSON document per line. Changes carry no card data in clear (rows are masked, queued
//! messages and stored replies sealed); the file is created readable by its owner only.
//! A change is never evicted: when the file reaches its size cap, the writer reports the spool
//! full and the switch stops forwarding (see [`super::Breaker`]); what arrives then is still
//! kept, in memory.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::change::Change;

/// The spool file.
#[derive(Debug)]
pub(super) struct Spool {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    cap: u64,
}

impl Spool {
    /// The spool of node `node` in `dir`, created when missing; `cap`: most bytes it holds.
    pub(super) fn open(dir: &Path, node: &str, cap: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("journal.spool_dir {}", dir.display()))?;
        let name: String = node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{name}.spool"));
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        Ok(Self {
            path,
            file: None,
            len,
            cap,
        })
    }

    /// Where it is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes it holds.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The changes it holds, in order. A last line cut short by a crash mid-write is skipped
    /// (its change was not yet acknowledged to anyone).
    pub(super) fn load(&self) -> Result<Vec<Change>> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("{}", self.path.display())),
        };
        let mut out = Vec::new();
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}", self.path.display()))?;
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Change>(line) {
                Ok(c) => out.push(c),
                Err(_) if i == last => break,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "{} line {}: not a journal change",
                            self.path.display(),
                            i + 1
                        )
                    })
                }
            }
        }
        Ok(out)
    }

    /// Appends `changes` and flushes them to disk; `Err` when they could not be written or
    /// the cap is reached (they are then not in the file).
    pub(super) fn append<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        for c in changes {
            serde_json::to_writer(&mut buf, c)?;
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok(());
        }
        if self.len + buf.len() as u64 > self.cap {
            anyhow::bail!("journal spool full ({} bytes, cap {})", self.len, self.cap);
        }
        if self.file.is_none() {
            let mut o = OpenOptions::new();
            o.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            self.file = Some(
                o.open(&self.path)
                    .with_context(|| format!("{}", self.path.display()))?,
            );
        }
        let file = self.file.as_mut().context("spool not open")?;
        // A write cut short leaves a partial last line, which `load` skips.
        file.write_all(&buf)?;
        file.sync_data()?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties it, once everything in it is committed.
    pub(super) fn clear(&mut self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .open(&self.path)?;
        file.sync_all()?;
        self.file = None;
        self.len = 0;
        Ok(())
    }
}
