//! The Redis coordinator, shared by every hive instance on one Redis. Each operation is one
//! command or one Lua script, so it is atomic on the server: a lease is a key set only if absent
//! with a TTL (`hive:lease:<pool>` = `instance|token`), renewed or deleted only if its value is
//! still ours; claims live in one hash per pool (`hive:claims:<pool>`, vm → `handle|token`).
//! Tokens come from `INCR hive:fence:<pool>`, never below Redis's clock in microseconds, so
//! they keep rising even if Redis restarts without its data. Every call is bounded by the op
//! timeout: an unreachable Redis fails fast as `Unavailable`, and the `ConnectionManager`
//! reconnects by itself once Redis is back. The URL (it may hold a password) is never logged.

use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};

use super::{Claim, CoordError, Coordinator, Lease, observe};

/// Issues the pool's next token: one more than the last, and never below the server's clock
/// (µs), so a Redis that lost its data still hands out tokens above every earlier one.
/// `string.format('%d')` because Lua 5.1 prints large numbers in exponent form.
const NEXT_TOKEN: &str = r"
local function next_token(key)
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local t = redis.call('INCR', key)
  if t < floor then
    redis.call('SET', key, string.format('%d', floor))
    t = floor
  end
  return t
end
";

/// KEYS: lease, fence, newest lease token. ARGV: instance, ttl ms. Returns the token, or 0
/// while another instance holds the lease.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local inst, tok = string.match(cur, '^(.*)|(%d+)$')
  if inst == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(tok)
  end
  return 0
end
local t = next_token(KEYS[2])
local ts = string.format('%d', t)
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ts, 'NX', 'PX', ARGV[2])
redis.call('SET', KEYS[3], ts)
return t
";

/// KEYS: lease. ARGV: our value, ttl ms. 1 if renewed, 0 if the lease is not ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// KEYS: lease. ARGV: our value. 1 if deleted, 0 if the lease is not ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// KEYS: claims hash, fence. ARGV: vm, handle. The claim's token, or 0 if another handle has it.
const CLAIM: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local h, tok = string.match(cur, '^(.*)|(%d+)$')
  if h == ARGV[2] then return tonumber(tok) end
  return 0
end
local t = next_token(KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. string.format('%d', t))
return t
";

/// KEYS: claims hash. ARGV: vm, our value. 1 if released, 0 if the claim is not ours.
const UNCLAIM: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
";

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    claim: Script,
    unclaim: Script,
}

pub struct RedisCoordinator {
    conn: ConnectionManager,
    op_timeout: Duration,
    scripts: Scripts,
}

fn lease_key(pool: &str) -> String {
    format!("hive:lease:{pool}")
}
fn fence_key(pool: &str) -> String {
    format!("hive:fence:{pool}")
}
fn newest_lease_key(pool: &str) -> String {
    format!("hive:lease_newest:{pool}")
}
fn claims_key(pool: &str) -> String {
    format!("hive:claims:{pool}")
}

/// `value|token` → (value, token).
fn split_holder(v: &str) -> Result<(String, u64), CoordError> {
    v.rsplit_once('|')
        .and_then(|(who, t)| Some((who.to_string(), t.parse().ok()?)))
        .ok_or_else(|| CoordError::Protocol("malformed holder value".into()))
}

/// Whether the error means Redis could not be reached or cannot serve now (→ 503), rather than
/// a reply we did not expect.
fn classify(e: RedisError) -> CoordError {
    let unreachable = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain | ServerErrorKind::MasterDown | ServerErrorKind::ReadOnly
                )
        );
    if unreachable { CoordError::Unavailable(format!("redis: {e}")) } else { CoordError::Protocol(format!("redis: {e}")) }
}

impl RedisCoordinator {
    /// Set up the connection without connecting: the first call connects, and a Redis that is
    /// down makes calls fail with `Unavailable` rather than the hive fail to start.
    /// Call inside a Tokio runtime (the manager spawns its reconnect task there).
    pub fn new(url: &str, op_timeout: Duration) -> Result<Self, CoordError> {
        if !url.starts_with("redis://") {
            return Err(CoordError::Config("coord.redis_url must start with redis://".into()));
        }
        // The parse error could echo the URL, password and all: say only that it is bad.
        let client = redis::Client::open(url).map_err(|_| CoordError::Config("coord.redis_url is not a valid redis:// URL".into()))?;
        // A short, bounded reconnect: a call waits on a reconnect at most `op_timeout`, and the
        // next call after a failed reconnect starts a fresh one, so service resumes by itself.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| CoordError::Config(format!("redis: {e}")))?;
        let script = |body: &str| Script::new(&format!("{NEXT_TOKEN}{body}"));
        let scripts = Scripts {
            acquire: script(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            claim: script(CLAIM),
            unclaim: Script::new(UNCLAIM),
        };
        Ok(RedisCoordinator { conn, op_timeout, scripts })
    }

    /// One bounded call to Redis.
    async fn call<T, F>(&self, f: impl FnOnce(ConnectionManager) -> F) -> Result<T, CoordError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.op_timeout, f(self.conn.clone())).await {
            Err(_) => Err(CoordError::Unavailable(format!("redis did not answer within {} ms", self.op_timeout.as_millis()))),
            Ok(r) => r.map_err(classify),
        }
    }

    async fn acquire(&self, pool: &str, instance: &str, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        let mut inv = self.scripts.acquire.prepare_invoke();
        inv.key(lease_key(pool)).key(fence_key(pool)).key(newest_lease_key(pool)).arg(instance).arg(ttl_ms(ttl));
        let token: u64 = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await?;
        Ok((token > 0).then(|| Lease { pool: pool.into(), instance: instance.into(), token }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError> {
        let mut inv = self.scripts.renew.prepare_invoke();
        inv.key(lease_key(&lease.pool)).arg(format!("{}|{}", lease.instance, lease.token)).arg(ttl_ms(ttl));
        let done: u8 = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await?;
        if done == 1 { Ok(()) } else { Err(CoordError::Lost) }
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordError> {
        let mut inv = self.scripts.release.prepare_invoke();
        inv.key(lease_key(&lease.pool)).arg(format!("{}|{}", lease.instance, lease.token));
        let done: u8 = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await?;
        if done == 1 { Ok(()) } else { Err(CoordError::Lost) }
    }

    async fn claim(&self, pool: &str, vm: &str, handle: &str) -> Result<Claim, CoordError> {
        let mut inv = self.scripts.claim.prepare_invoke();
        inv.key(claims_key(pool)).key(fence_key(pool)).arg(vm).arg(handle);
        let token: u64 = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await?;
        if token == 0 {
            return Err(CoordError::Taken);
        }
        Ok(Claim { pool: pool.into(), vm: vm.into(), handle: handle.into(), token })
    }

    async fn unclaim(&self, claim: &Claim) -> Result<(), CoordError> {
        let mut inv = self.scripts.unclaim.prepare_invoke();
        inv.key(claims_key(&claim.pool)).arg(&claim.vm).arg(format!("{}|{}", claim.handle, claim.token));
        let done: u8 = self.call(|mut c| async move { inv.invoke_async(&mut c).await }).await?;
        if done == 1 { Ok(()) } else { Err(CoordError::Lost) }
    }
}

/// At least 1 ms: Redis refuses a zero expiry.
fn ttl_ms(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn acquire_lease(&self, pool: &str, instance: &str, ttl: Duration) -> Result<Option<Lease>, CoordError> {
        let started = Instant::now();
        let r = self.acquire(pool, instance, ttl).await;
        observe("acquire_lease", started, &r, matches!(r, Ok(None)));
        r
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.renew(lease, ttl).await;
        observe("renew_lease", started, &r, false);
        r
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.release(lease).await;
        observe("release_lease", started, &r, false);
        r
    }

    async fn lease_holder(&self, pool: &str) -> Result<Option<(String, u64)>, CoordError> {
        let key = lease_key(pool);
        let v: Option<String> = self.call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await }).await?;
        v.as_deref().map(split_holder).transpose()
    }

    async fn check_fence(&self, pool: &str, token: u64) -> Result<(), CoordError> {
        let started = Instant::now();
        let key = newest_lease_key(pool);
        let r = async {
            let newest: Option<u64> = self.call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await }).await?;
            if token >= newest.unwrap_or(0) { Ok(()) } else { Err(CoordError::Lost) }
        }
        .await;
        observe("check_fence", started, &r, false);
        r
    }

    async fn claim_vm(&self, pool: &str, vm: &str, handle: &str) -> Result<Claim, CoordError> {
        let started = Instant::now();
        let r = self.claim(pool, vm, handle).await;
        observe("claim_vm", started, &r, false);
        r
    }

    async fn release_vm(&self, claim: &Claim) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.unclaim(claim).await;
        observe("release_vm", started, &r, false);
        r
    }

    async fn vm_holder(&self, pool: &str, vm: &str) -> Result<Option<(String, u64)>, CoordError> {
        let (key, vm) = (claims_key(pool), vm.to_string());
        let v: Option<String> = self.call(|mut c| async move { redis::cmd("HGET").arg(key).arg(vm).query_async(&mut c).await }).await?;
        v.as_deref().map(split_holder).transpose()
    }

    async fn ping(&self) -> Result<(), CoordError> {
        let started = Instant::now();
        let r = self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await }).await.map(drop);
        observe("ping", started, &r, false);
        r
    }
}
