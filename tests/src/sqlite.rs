//! SQLite: a fresh database file per test, in a private temporary directory that is removed when
//! the handle is dropped. Nothing runs: the store opens the file in-process.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::process;

/// The file name the store creates in the directory, as `tally-edge` does in its data directory.
const FILE_NAME: &str = "tally.db";

/// A database file for one test (not created yet: the store creates and migrates it).
#[derive(Debug)]
pub struct TestSqlite {
    dir: PathBuf,
    path: PathBuf,
}

/// A new private directory holding the path of a database that does not exist yet.
pub fn fresh_sqlite() -> Result<TestSqlite> {
    let dir = process::create_temp_dir("sqlite")?;
    let path = dir.join(FILE_NAME);
    Ok(TestSqlite { dir, path })
}

impl TestSqlite {
    /// The database file; its `-wal` and `-shm` files sit beside it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding the files, as a data directory (`--data-dir`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `sqlite://<path>`.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }
}

impl Drop for TestSqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
