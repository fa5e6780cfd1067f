//! The file a fetch assembles, and its whole-file check. Pieces are written at their offsets in
//! any order; the verifier hashes the file in order, advancing over each run of pieces as soon as
//! it is complete (reading back what was just written, so the hashing overlaps the download and
//! little is left for the end), and yields the SHA-256 once every piece has been written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::manifest::Manifest;
use super::swarm::FetchError;

/// Read-back size while hashing.
const HASH_BUF: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub(super) struct Output {
    file: Arc<File>,
    path: Arc<PathBuf>,
}

impl Output {
    /// Create (or truncate) `path` at `size` bytes.
    pub(super) async fn create(path: &Path, size: u64) -> Result<Output, FetchError> {
        let p = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || {
            let f = File::options().read(true).write(true).create(true).truncate(true).open(&p)?;
            f.set_len(size)?;
            Ok::<_, io::Error>(f)
        })
        .await
        .map_err(|e| FetchError::Task(e.to_string()))?
        .map_err(|source| FetchError::Output { path: path.to_path_buf(), source })?;
        Ok(Output { file: Arc::new(file), path: Arc::new(path.to_path_buf()) })
    }

    pub(super) async fn write(&self, offset: u64, bytes: Bytes) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset)).await.map_err(io::Error::other)?
    }

    /// Feed bytes `start..end` of the file to `hasher`. Blocking.
    fn hash_range(&self, hasher: &mut Sha256, start: u64, end: u64) -> io::Result<()> {
        let mut buf = vec![0u8; HASH_BUF.min((end - start) as usize)];
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            self.file.read_exact_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    }
}

/// Hashes the output in order as pieces are written.
pub(super) struct Verifier {
    tx: mpsc::UnboundedSender<usize>,
    task: JoinHandle<Result<String, FetchError>>,
}

impl Verifier {
    pub(super) fn spawn(output: Output, manifest: Manifest) -> Verifier {
        let (tx, rx) = mpsc::unbounded_channel();
        Verifier { tx, task: tokio::spawn(verify(output, manifest, rx)) }
    }

    /// Piece `index` is in the file.
    pub(super) fn piece_written(&self, index: usize) {
        // The task only stops early on an error, which `finish` reports.
        let _ = self.tx.send(index);
    }

    /// The whole file's SHA-256 in hex, once every piece has been reported written.
    pub(super) async fn finish(self) -> Result<String, FetchError> {
        drop(self.tx);
        self.task.await.map_err(|e| FetchError::Task(e.to_string()))?
    }
}

async fn verify(output: Output, m: Manifest, mut rx: mpsc::UnboundedReceiver<usize>) -> Result<String, FetchError> {
    let n = m.piece_count();
    let mut written = vec![false; n];
    let mut next = 0;
    let mut hasher = Sha256::new();
    while next < n {
        let Some(i) = rx.recv().await else { return Err(FetchError::Task("the fetch ended before every piece was written".into())) };
        written[i] = true;
        while let Ok(i) = rx.try_recv() {
            written[i] = true;
        }
        let first = next;
        while next < n && written[next] {
            next += 1;
        }
        if next > first {
            let (start, end) = (m.piece_range(first)?.start, m.piece_range(next - 1)?.end);
            let out = output.clone();
            let mut h = hasher;
            hasher = tokio::task::spawn_blocking(move || out.hash_range(&mut h, start, end).map(|()| h))
                .await
                .map_err(|e| FetchError::Task(e.to_string()))?
                .map_err(|source| FetchError::Output { path: output.path.to_path_buf(), source })?;
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_written_in_any_order_hash_to_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let m = Manifest::from_reader(&data[..], 1000).unwrap();
        let out = Output::create(&dir.path().join("f"), m.size).await.unwrap();
        let verifier = Verifier::spawn(out.clone(), m.clone());
        for i in [3, 9, 0, 1, 2, 8, 7, 4, 6, 5] {
            let r = m.piece_range(i).unwrap();
            out.write(r.start, Bytes::copy_from_slice(&data[r.start as usize..r.end as usize])).await.unwrap();
            verifier.piece_written(i);
        }
        assert_eq!(verifier.finish().await.unwrap(), m.sha256);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), data);
    }

    #[tokio::test]
    async fn a_fetch_that_stops_early_has_no_hash() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::from_reader(&[7u8; 3000][..], 1000).unwrap();
        let out = Output::create(&dir.path().join("f"), m.size).await.unwrap();
        let verifier = Verifier::spawn(out, m);
        verifier.piece_written(0);
        assert!(matches!(verifier.finish().await, Err(FetchError::Task(_))));
    }

    #[tokio::test]
    async fn wrong_bytes_give_a_different_hash() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::from_reader(&[7u8; 2000][..], 1000).unwrap();
        let out = Output::create(&dir.path().join("f"), m.size).await.unwrap();
        let verifier = Verifier::spawn(out.clone(), m.clone());
        out.write(0, Bytes::from(vec![7u8; 1000])).await.unwrap();
        out.write(1000, Bytes::from(vec![8u8; 1000])).await.unwrap();
        verifier.piece_written(0);
        verifier.piece_written(1);
        assert_ne!(verifier.finish().await.unwrap(), m.sha256);
    }
}
