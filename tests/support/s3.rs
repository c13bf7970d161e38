//! A real S3 server for the cache tests: `s3s-fs` (crates.io), which stores objects in a
//! directory and verifies every request's SigV4 signature (headers or pre-signed query), with
//! keys generated per test.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `s3s-fs`, stopped on drop.
pub struct S3Server {
    child: Option<Child>,
    root: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub address: String,
    /// The access key id.
    pub access_key: String,
    /// The secret key (random per server).
    pub secret_key: String,
    /// The bucket that exists.
    pub bucket: String,
}

impl S3Server {
    /// Starts a server with one bucket, `ci-cache`.
    pub fn start() -> Self {
        let binary = super::tools::s3s_fs();
        let root = tempfile::tempdir().unwrap();
        let bucket = "ci-cache".to_owned();
        std::fs::create_dir(root.path().join(&bucket)).unwrap();
        let port = super::kiln::free_port();
        let access_key = format!("AK{:016x}", rand::random::<u64>());
        let secret_key = format!("sk-{:032x}", rand::random::<u128>());
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let address = format!("127.0.0.1:{port}");
        wait_listening(&address, "s3s-fs");
        Self {
            child: Some(child),
            root,
            address,
            access_key,
            secret_key,
            bucket,
        }
    }

    /// The `[cache]` section of a kiln config for this server.
    pub fn cache_config(&self, extra: &str) -> String {
        format!(
            "[cache]\ntype = \"s3\"\npath = \"kiln\"\n{extra}\n[cache.s3]\nserver_address = \"{}\"\nbucket_name = \"{}\"\nbucket_location = \"us-east-1\"\naccess_key = \"{}\"\nsecret_key = \"{}\"\ninsecure = true\n",
            self.address, self.bucket, self.access_key, self.secret_key
        )
    }

    /// The bucket's directory.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(&self.bucket)
    }

    /// Stops the server (a cache outage).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every stored object's path relative to the bucket.
    pub fn objects(&self) -> Vec<String> {
        walk(&self.bucket_dir())
    }
}

/// Waits up to 30 s for a test server to accept connections at `address`.
pub fn wait_listening(address: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(address).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {address}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
