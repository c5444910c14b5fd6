//! A PostgreSQL cluster of a soak's (or a test's) own: made with `initdb` in a temporary directory, served on
//! a spare loopback port, restarted on command and removed at the end. A soak that stops or
//! restarts PostgreSQL does it to this one, never to a server other work shares.
//!
//! Run as root, the cluster's commands run as the `postgres` user (PostgreSQL refuses root).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A running cluster of its own.
pub(crate) struct OwnCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The directory of `initdb` and `pg_ctl`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn bin_dir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL binaries (initdb) found")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().context("no PostgreSQL binaries (initdb) found")
}

impl OwnCluster {
    /// Makes and starts a cluster on a spare port.
    ///
    /// # Errors
    /// No PostgreSQL binaries, or `initdb` or `pg_ctl` failing.
    pub(crate) fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cardswitch-own-pg-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let uid = Command::new("id").arg("-u").output()?;
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let cluster = Self {
            dir,
            bin,
            port,
            as_postgres,
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&cluster.dir)
                .status()?;
            if !status.success() {
                bail!("chown of {} to postgres failed", cluster.dir.display());
            }
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.dir.join("data").display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        )?;
        cluster.pg_ctl(&["start"])?;
        Ok(cluster)
    }

    /// The URL of its `postgres` database.
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it (fast shutdown: sessions are cut, committed work is kept).
    ///
    /// # Errors
    /// `pg_ctl` failing.
    pub(crate) fn stop(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Crashes it (immediate shutdown: no checkpoint; commits made without waiting for the disk
    /// and not yet written out are lost, as in a crash of the server process).
    ///
    /// # Errors
    /// `pg_ctl` failing.
    pub(crate) fn crash(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate"])
    }

    /// Starts it again after [`OwnCluster::stop`].
    ///
    /// # Errors
    /// `pg_ctl` failing.
    pub(crate) fn start_again(&self) -> Result<()> {
        self.pg_ctl(&["start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.dir.join("data").display().to_string();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        let mut all = vec!["-D", &data, "-w", "-l", &log, "-o", &opts];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
