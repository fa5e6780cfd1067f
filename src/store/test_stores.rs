//! Stores for tests, one of each kind: SQLite on a file in a temporary directory, Postgres on a
//! fresh database (`hive_t_<random>`) of the machine's server, dropped when the test ends.
//! `each_store!` turns one test body into a `sqlite` and a `postgres` test, so the whole store
//! suite runs against both. A Postgres that cannot be reached fails the test, naming
//! `scripts/test-deps.sh`; nothing is skipped.

use std::sync::Arc;

use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

use super::{Store, open};

/// The server `scripts/test-deps.sh` installs and starts (trust auth on 127.0.0.1).
pub(crate) const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// An open store and what keeps its data alive for the test.
pub(crate) struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    pub backend: Backend,
    _keep: Keep,
}

enum Keep {
    Dir(#[allow(dead_code)] TempDir),
    Db(#[allow(dead_code)] PgTestDb),
}

impl TestStore {
    pub(crate) async fn new(backend: Backend) -> TestStore {
        let (url, keep) = match backend {
            Backend::Sqlite => {
                let dir = TempDir::new().expect("tempdir");
                (format!("sqlite://{}", dir.path().join("hive.db").display()), Keep::Dir(dir))
            }
            Backend::Postgres => {
                let db = PgTestDb::create().await;
                (db.url.clone(), Keep::Db(db))
            }
        };
        let store = open(&url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
        TestStore { store, url, backend, _keep: keep }
    }
}

/// A database of its own on the local server; dropped (connections and all) on drop.
pub(crate) struct PgTestDb {
    pub url: String,
    name: String,
}

impl PgTestDb {
    pub(crate) async fn create() -> PgTestDb {
        let name = format!("hive_t_{:016x}", rand::random::<u64>());
        let mut admin = PgConnection::connect(PG_ADMIN_URL)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {PG_ADMIN_URL} ({e}); run scripts/test-deps.sh to install and start it"));
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        PgTestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }
}

impl Drop for PgTestDb {
    /// Async work cannot run in `drop`; a thread with its own small runtime does it, so this
    /// works from inside any test runtime.
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let mut admin = PgConnection::connect(PG_ADMIN_URL).await?;
                admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("test database {} was not dropped: {dropped:?}", self.name);
        }
    }
}

/// `each_store!(#[tokio::test] async fn name(s) { … })` defines `name::sqlite` and
/// `name::postgres`, each running the body with `s: TestStore` of that kind.
macro_rules! each_store {
    ($(#[$attr:meta])+ async fn $name:ident($s:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])+
            async fn sqlite() {
                let $s = $crate::store::test_stores::TestStore::new($crate::store::test_stores::Backend::Sqlite).await;
                $body
            }

            $(#[$attr])+
            async fn postgres() {
                let $s = $crate::store::test_stores::TestStore::new($crate::store::test_stores::Backend::Postgres).await;
                $body
            }
        }
    };
}
pub(crate) use each_store;
