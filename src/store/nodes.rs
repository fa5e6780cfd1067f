//! Rows of nodes that join over the network: one-time join tokens, the rewards ledger
//! (`served`) and end-user ratings. The `NodeStore` trait and its SQLite implementation.
//!
//! A join token is consumed by one conditional UPDATE, so two agents racing with one token
//! cannot both join. Only SHA-256 hashes of tokens are stored.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::sqlite::{SqliteStore, int};
use super::{ServedRecord, StoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rating {
    pub pool: String,
    pub handle: u64,
    pub session_started: u64,
    pub node_id: u64,
    pub stars: u8,
    pub comment: String,
    pub created_at: u64,
}

#[async_trait::async_trait]
pub trait NodeStore: Send + Sync {
    async fn add_join_token(&self, hash: &str, created_at: u64, expires_at: u64) -> Result<(), StoreError>;
    /// Use the token up; false if it is unknown, used or expired at `now`.
    async fn consume_join_token(&self, hash: &str, now: u64) -> Result<bool, StoreError>;
    /// Note which node a used token became.
    async fn join_token_used_by(&self, hash: &str, node: u64) -> Result<(), StoreError>;
    /// Ledger rows of `node` that overlap `[from, to)`.
    async fn served(&self, node: u64, from: u64, to: u64) -> Result<Vec<ServedRecord>, StoreError>;
    /// The newest ledger row of a pool's handle (an ended session).
    async fn last_served(&self, pool: &str, handle: u64) -> Result<Option<ServedRecord>, StoreError>;
    /// Record a rating; false if this session was rated already.
    async fn add_rating(&self, r: &Rating) -> Result<bool, StoreError>;
    /// The highest node id ever handed out, removed nodes included (0 if none): ids are never
    /// reused, so a new node never inherits an old one's ledger or ratings.
    async fn max_issued_node_id(&self) -> Result<u64, StoreError>;
    /// Per node: (node id, number of ratings, sum of stars).
    async fn rating_totals(&self) -> Result<Vec<(u64, u64, u64)>, StoreError>;
}

#[async_trait::async_trait]
impl NodeStore for SqliteStore {
    async fn add_join_token(&self, hash: &str, created_at: u64, expires_at: u64) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO join_tokens (hash, created_at, expires_at) VALUES (?, ?, ?)")
            .bind(hash)
            .bind(int(created_at))
            .bind(int(expires_at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn consume_join_token(&self, hash: &str, now: u64) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE join_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ?")
            .bind(int(now))
            .bind(hash)
            .bind(int(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn join_token_used_by(&self, hash: &str, node: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE join_tokens SET used_by = ? WHERE hash = ?").bind(int(node)).bind(hash).execute(&self.pool).await?;
        Ok(())
    }

    async fn served(&self, node: u64, from: u64, to: u64) -> Result<Vec<ServedRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM served WHERE node_id = ? AND ended_at > ? AND started_at < ? ORDER BY id")
            .bind(int(node))
            .bind(int(from))
            .bind(int(to))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(served_from_row).collect::<Result<_, sqlx::Error>>().map_err(StoreError::from)
    }

    async fn last_served(&self, pool: &str, handle: u64) -> Result<Option<ServedRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM served WHERE pool = ? AND handle = ? ORDER BY id DESC LIMIT 1")
            .bind(pool)
            .bind(int(handle))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(served_from_row).transpose()?)
    }

    async fn add_rating(&self, r: &Rating) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO ratings (pool, handle, session_started, node_id, stars, comment, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(r.pool.as_str())
        .bind(int(r.handle))
        .bind(int(r.session_started))
        .bind(int(r.node_id))
        .bind(i64::from(r.stars))
        .bind(r.comment.as_str())
        .bind(int(r.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn max_issued_node_id(&self) -> Result<u64, StoreError> {
        let row = sqlx::query(
            "SELECT MAX(m) AS m FROM (SELECT MAX(used_by) AS m FROM join_tokens UNION ALL SELECT MAX(id) FROM nodes
             UNION ALL SELECT MAX(node_id) FROM served UNION ALL SELECT MAX(node_id) FROM ratings)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<i64>, _>("m")?.unwrap_or(0) as u64)
    }

    async fn rating_totals(&self) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let rows = sqlx::query("SELECT node_id, COUNT(*) AS n, SUM(stars) AS s FROM ratings GROUP BY node_id ORDER BY node_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i64, _>("node_id")? as u64, r.try_get::<i64, _>("n")? as u64, r.try_get::<i64, _>("s")? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

fn served_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<ServedRecord, sqlx::Error> {
    Ok(ServedRecord {
        node_id: r.try_get::<i64, _>("node_id")? as u64,
        pool: r.try_get("pool")?,
        handle: r.try_get::<i64, _>("handle")? as u64,
        vm: r.try_get::<i64, _>("vm")? as u64,
        cores: r.try_get::<i64, _>("cores")? as u32,
        started_at: r.try_get::<i64, _>("started_at")? as u64,
        ended_at: r.try_get::<i64, _>("ended_at")? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Change;
    use crate::store::test_stores::each_store;

    each_store! {
        #[tokio::test]
        async fn a_join_token_is_used_once_and_not_after_expiry(t) {
            let s = t.store.node_rows().expect("both stores hold node rows");
            s.add_join_token("aa", 0, 1_000).await.unwrap();
            s.add_join_token("bb", 0, 1_000).await.unwrap();
            assert!(!s.consume_join_token("zz", 10).await.unwrap(), "unknown");
            assert!(s.consume_join_token("aa", 10).await.unwrap());
            s.join_token_used_by("aa", 10_001).await.unwrap();
            assert!(!s.consume_join_token("aa", 11).await.unwrap(), "used");
            assert!(!s.consume_join_token("bb", 1_000).await.unwrap(), "expired");
            assert_eq!(s.max_issued_node_id().await.unwrap(), 10_001, "the id a used token became counts, node row or not");
        }
    }

    each_store! {
        #[tokio::test]
        async fn ledger_rows_overlapping_a_period_and_ratings_once_per_session(t) {
            let s = t.store.node_rows().expect("both stores hold node rows");
            let row = |h: u64, a: u64, b: u64| ServedRecord {
                node_id: 7,
                pool: "p".into(),
                handle: h,
                vm: h,
                cores: 2,
                started_at: a,
                ended_at: b,
            };
            t.store.apply(&[Change::Served(row(1, 0, 100)), Change::Served(row(2, 200, 300))]).await.unwrap();
            assert_eq!(s.served(7, 50, 150).await.unwrap(), vec![row(1, 0, 100)]);
            assert_eq!(s.served(7, 0, 1_000).await.unwrap().len(), 2);
            assert!(s.served(8, 0, 1_000).await.unwrap().is_empty());
            assert_eq!(s.last_served("p", 2).await.unwrap(), Some(row(2, 200, 300)));
            assert_eq!(s.last_served("p", 3).await.unwrap(), None);
            let r = Rating { pool: "p".into(), handle: 1, session_started: 0, node_id: 7, stars: 4, comment: String::new(), created_at: 5 };
            assert!(s.add_rating(&r).await.unwrap());
            assert!(!s.add_rating(&Rating { stars: 1, ..r.clone() }).await.unwrap(), "a session is rated once");
            assert_eq!(s.rating_totals().await.unwrap(), vec![(7, 1, 4)]);
            assert_eq!(s.max_issued_node_id().await.unwrap(), 7, "ledger and ratings count");
        }
    }
}
