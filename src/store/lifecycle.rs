//! Users and lifecycle objects: the `LifecycleStore` trait and its SQLite implementation.
//!
//! Every method is one statement (one transaction) and durable when it returns, so the
//! lifecycle service can persist a change before it tells anyone. Object ids come from
//! AUTOINCREMENT and are never reused (snapshot names carry them). Only SHA-256 hashes of user
//! tokens are stored.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use super::sqlite::{SqliteStore, int, json};
use crate::domain::lifecycle::{Kind, Object, Phase};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub token_hash: String,
    pub max_environments: u32,
    pub created_at: u64,
}

#[async_trait::async_trait]
pub trait LifecycleStore: Send + Sync {
    /// False (and nothing written) if the name is taken.
    async fn add_user(&self, user: &UserRecord) -> Result<bool, StoreError>;
    /// False if there is no such user.
    async fn set_max_environments(&self, name: &str, max: u32) -> Result<bool, StoreError>;
    async fn users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Insert `obj` (its `id` is ignored); answers the id it was given.
    async fn insert_object(&self, obj: &Object) -> Result<u64, StoreError>;
    /// Rewrite object `obj.id`; false if there is no such row.
    async fn update_object(&self, obj: &Object) -> Result<bool, StoreError>;
    async fn delete_object(&self, id: u64) -> Result<bool, StoreError>;
    /// Every object, by id.
    async fn objects(&self) -> Result<Vec<Object>, StoreError>;
}

#[async_trait::async_trait]
impl LifecycleStore for SqliteStore {
    async fn add_user(&self, u: &UserRecord) -> Result<bool, StoreError> {
        let r =
            sqlx::query("INSERT INTO users (name, token_hash, max_environments, created_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
                .bind(u.name.as_str())
                .bind(u.token_hash.as_str())
                .bind(i64::from(u.max_environments))
                .bind(int(u.created_at))
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_max_environments(&self, name: &str, max: u32) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE users SET max_environments = ? WHERE name = ?").bind(i64::from(max)).bind(name).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UserRecord {
                    name: r.try_get("name")?,
                    token_hash: r.try_get("token_hash")?,
                    max_environments: r.try_get::<i64, _>("max_environments")?.clamp(0, i64::from(u32::MAX)) as u32,
                    created_at: r.try_get::<i64, _>("created_at")? as u64,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn insert_object(&self, o: &Object) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "INSERT INTO lifecycle_objects (kind, name, owner, parent, traits, phase, reason, spec, runtime, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(o.kind.name())
        .bind(o.name.as_str())
        .bind(o.owner.as_str())
        .bind(o.parent.map(int))
        .bind(json(&o.traits)?)
        .bind(o.phase.name())
        .bind(o.reason.as_deref())
        .bind(json(&o.spec)?)
        .bind(json(&o.runtime)?)
        .bind(int(o.created_at))
        .bind(int(o.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(r.last_insert_rowid() as u64)
    }

    async fn update_object(&self, o: &Object) -> Result<bool, StoreError> {
        // Kind, owner and parent never change after creation.
        let r = sqlx::query("UPDATE lifecycle_objects SET phase = ?, reason = ?, runtime = ?, updated_at = ? WHERE id = ?")
            .bind(o.phase.name())
            .bind(o.reason.as_deref())
            .bind(json(&o.runtime)?)
            .bind(int(o.updated_at))
            .bind(int(o.id))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn delete_object(&self, id: u64) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM lifecycle_objects WHERE id = ?").bind(int(id)).execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn objects(&self) -> Result<Vec<Object>, StoreError> {
        let rows = sqlx::query("SELECT * FROM lifecycle_objects ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter().map(object_from_row).collect()
    }
}

fn object_from_row(r: &SqliteRow) -> Result<Object, StoreError> {
    let bad = |col: &str, v: String| StoreError::Query(format!("lifecycle_objects.{col}: unknown value {v:?}"));
    let kind: String = r.try_get("kind")?;
    let phase: String = r.try_get("phase")?;
    Ok(Object {
        id: r.try_get::<i64, _>("id")? as u64,
        kind: Kind::parse(&kind).ok_or_else(|| bad("kind", kind.clone()))?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        parent: r.try_get::<Option<i64>, _>("parent")?.map(|p| p as u64),
        traits: from_json(r, "traits")?,
        phase: Phase::parse(&phase).ok_or_else(|| bad("phase", phase.clone()))?,
        reason: r.try_get("reason")?,
        spec: from_json(r, "spec")?,
        runtime: from_json(r, "runtime")?,
        created_at: r.try_get::<i64, _>("created_at")? as u64,
        updated_at: r.try_get::<i64, _>("updated_at")? as u64,
    })
}

fn from_json<T: serde::de::DeserializeOwned>(r: &SqliteRow, col: &str) -> Result<T, StoreError> {
    let text: String = r.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Query(format!("lifecycle_objects.{col}: bad json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lifecycle::{Backend, OsFamily, Protocol, Runtime, Spec, Traits};
    use crate::store::test_stores::each_store;

    each_store! {
        #[tokio::test]
        async fn users_and_objects_round_trip(t) {
            let s = t.store.lifecycle().expect("both stores hold lifecycle rows");
            let u = UserRecord { name: "alice".into(), token_hash: "h1".into(), max_environments: 1, created_at: 5 };
            assert!(s.add_user(&u).await.unwrap());
            assert!(!s.add_user(&UserRecord { token_hash: "h2".into(), ..u.clone() }).await.unwrap(), "names are unique");
            assert!(s.set_max_environments("alice", 3).await.unwrap());
            assert!(!s.set_max_environments("bob", 3).await.unwrap());
            assert_eq!(s.users().await.unwrap(), vec![UserRecord { max_environments: 3, ..u }]);

            let traits = Traits { backend: Backend::Vm, os: OsFamily::Windows, protocol: Protocol::Rdp };
            let mut o = Object {
                id: 0,
                kind: Kind::Baseimage,
                name: "win".into(),
                owner: "admin".into(),
                parent: None,
                traits,
                phase: Phase::Create,
                reason: None,
                spec: Spec { template: Some("win11".into()), ..Spec::default() },
                runtime: Runtime::default(),
                created_at: 1,
                updated_at: 1,
            };
            o.id = s.insert_object(&o).await.unwrap();
            let child = Object { kind: Kind::Environment, parent: Some(o.id), owner: "alice".into(), ..o.clone() };
            let child_id = s.insert_object(&child).await.unwrap();
            assert!(child_id > o.id);
            o.phase = Phase::Failed;
            o.reason = Some("boom".into());
            o.runtime.node = Some(3);
            assert!(s.update_object(&o).await.unwrap());
            let all = s.objects().await.unwrap();
            assert_eq!(all[0], o);
            assert_eq!(all[1].parent, Some(o.id));
            assert!(s.delete_object(child_id).await.unwrap());
            assert!(!s.delete_object(child_id).await.unwrap());
            let again = s.insert_object(&child).await.unwrap();
            assert!(again > child_id, "ids are never reused");
        }
    }
}
