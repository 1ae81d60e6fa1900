//! The RocksDB store passes openraft's own storage conformance suite.

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb};
use thingraft_log::Retention;
use thingraft_log::storage::{LogStore, StateMachine, Store};
use thingraft_log::types::{StorageError, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        // Group 7: not group 0, so key prefixes are exercised.
        let sm = store
            .state_machine(7, Retention::default())
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok((dir, store.log_store(7), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_store_passes_openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("storage suite");
}
