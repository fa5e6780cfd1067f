//! The node's ready stock: for every image it holds, a few prepared copies (default 2) wait in
//! `data_dir/stock/<sha256>/`, so that a VM created from the image gets its disk at once instead
//! of after a copy. Taking a copy starts replenishing. A copy is written as `<n>.part` and
//! renamed when complete, so a crash never leaves a half copy counted as ready.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Default)]
struct State {
    ready: BTreeMap<String, Vec<PathBuf>>,
    preparing: BTreeSet<String>,
    next: u64,
}

#[derive(Clone)]
pub struct Stock {
    dir: PathBuf,
    images: PathBuf,
    target: usize,
    state: Arc<Mutex<State>>,
}

impl Stock {
    /// Take in the complete copies left from an earlier run; drop half-written ones.
    pub fn open(data_dir: &Path, target: usize) -> std::io::Result<Stock> {
        let dir = data_dir.join("stock");
        std::fs::create_dir_all(&dir)?;
        let mut st = State::default();
        for image in std::fs::read_dir(&dir)?.flatten() {
            let sha = image.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(image.path())?.flatten() {
                let p = f.path();
                if p.extension().is_some_and(|e| e == "img") {
                    st.ready.entry(sha.clone()).or_default().push(p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        // New copies are numbered above every file left from earlier runs.
        let stem = |p: &PathBuf| p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        st.next = st.ready.values().flatten().map(stem).max().unwrap_or(0);
        Ok(Stock { dir, images: data_dir.join("images"), target, state: Arc::new(Mutex::new(st)) })
    }

    /// Ready copies per image.
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.state.lock().ready.iter().map(|(k, v)| (k.clone(), v.len() as u32)).collect()
    }

    /// Top the image's stock up to the target, in the background (one filler per image).
    pub fn replenish(&self, sha: &str) {
        if !self.state.lock().preparing.insert(sha.to_string()) {
            return;
        }
        let (me, sha) = (self.clone(), sha.to_string());
        tokio::task::spawn_blocking(move || {
            loop {
                let r = me.fill(&sha);
                let mut st = me.state.lock();
                // A take that raced the end of the fill found `preparing` still set: go on.
                if r.is_ok() && st.ready.get(&sha).map_or(0, Vec::len) < me.target {
                    continue;
                }
                st.preparing.remove(&sha);
                drop(st);
                if let Err(e) = r {
                    tracing::warn!(image = %sha, error = %e, "cannot prepare ready copies");
                }
                break;
            }
        });
    }

    fn fill(&self, sha: &str) -> std::io::Result<()> {
        let source = self.images.join(sha);
        let dir = self.dir.join(sha);
        std::fs::create_dir_all(&dir)?;
        loop {
            let n = {
                let mut st = self.state.lock();
                if st.ready.get(sha).map_or(0, Vec::len) >= self.target {
                    return Ok(());
                }
                st.next += 1;
                st.next
            };
            let part = dir.join(format!("{n}.part"));
            std::fs::copy(&source, &part)?;
            std::fs::File::open(&part)?.sync_all()?;
            let done = dir.join(format!("{n}.img"));
            std::fs::rename(&part, &done)?;
            self.state.lock().ready.entry(sha.to_string()).or_default().push(done);
        }
    }

    /// Use a ready copy as the disk at `to`; the stock is replenished behind it. False when
    /// none was ready (the caller copies the image itself).
    pub fn take(&self, sha: &str, to: &Path) -> std::io::Result<bool> {
        let copy = self.state.lock().ready.get_mut(sha).and_then(Vec::pop);
        // A copy that cannot be moved (gone under us) is no copy: the caller copies the image.
        let used = copy.is_some_and(|p| std::fs::rename(&p, to).is_ok());
        self.replenish(sha);
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_count(s: &Stock, sha: &str, n: u32) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.counts().get(sha).copied().unwrap_or(0) != n || !s.state.lock().preparing.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "stock of {sha} never reached {n}: {:?}", s.counts());
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn keeps_two_copies_and_replenishes_what_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let sha = "a".repeat(64);
        std::fs::write(dir.path().join("images").join(&sha), b"disk image bytes").unwrap();
        let s = Stock::open(dir.path(), 2).unwrap();
        s.replenish(&sha);
        until_count(&s, &sha, 2).await;
        let disk = dir.path().join("vm-disk.img");
        assert!(s.take(&sha, &disk).unwrap());
        assert_eq!(std::fs::read(&disk).unwrap(), b"disk image bytes");
        until_count(&s, &sha, 2).await;
        // A restart numbers new copies above the files it finds (no copy overwrites another).
        let restarted = Stock::open(dir.path(), 2).unwrap();
        assert!(restarted.take(&sha, &dir.path().join("vm2.img")).unwrap());
        until_count(&restarted, &sha, 2).await;
        let files = std::fs::read_dir(dir.path().join("stock").join(&sha)).unwrap().count();
        assert_eq!(files, 2, "two distinct copies on disk");
        // A restart finds the complete copies and forgets half-written ones.
        std::fs::write(dir.path().join("stock").join(&sha).join("99.part"), b"half").unwrap();
        let again = Stock::open(dir.path(), 2).unwrap();
        assert_eq!(again.counts().get(&sha), Some(&2));
        assert!(!dir.path().join("stock").join(&sha).join("99.part").exists());
        assert!(!Stock::open(dir.path(), 2).unwrap().take(&"b".repeat(64), &dir.path().join("x")).unwrap(), "no stock of an unknown image");
    }
}
