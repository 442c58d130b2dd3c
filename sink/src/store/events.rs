//! The event path: what the ingest hot path asks of storage for every batch (the sink workers
//! and the overflow drainer commit, the materializer folds) and what tells whether it can
//! (`ping`, for `/ready` and `/health`). Nothing here reads tenants, keys or prices: the edge
//! has resolved those from its caches before a row reaches a queue.

use super::{FoldReport, Store, StoreError};
use crate::row::{EventRow, Outcome};

impl Store {
    /// Stores rows in one transaction: new rows are inserted, rows whose dedup key is stored
    /// already are skipped, and the rollups grow by exactly the inserted rows (at once, or
    /// through the pending rows that [`Store::fold_rollups`] folds). Returns one outcome per
    /// row, in order, only after the commit. On error nothing was stored.
    pub async fn commit(&self, rows: &[EventRow]) -> Result<Vec<Outcome>, StoreError> {
        match self {
            Store::Postgres(store) => store.commit_rows(rows).await,
            Store::Sqlite(store) => store.commit_rows(rows).await,
        }
        .map_err(|error| error.doing("commit a batch"))
    }

    /// Folds committed, not yet folded rollup deltas into the rollups, at most `max_entries`
    /// of them in one transaction that also removes them, so none is folded twice or skipped,
    /// even with several processes folding. SQLite grows its rollups in the commit itself and
    /// has nothing to fold.
    pub async fn fold_rollups(&self, max_entries: usize) -> Result<FoldReport, StoreError> {
        match self {
            Store::Postgres(store) => {
                store.fold(max_entries).await.map_err(|error| error.doing("fold rollups"))
            }
            Store::Sqlite(_) => Ok(FoldReport::default()),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(store) => store.ping().await,
            Store::Sqlite(store) => store.ping().await,
        }
        .map_err(|error| error.doing("ping the database"))
    }
}
