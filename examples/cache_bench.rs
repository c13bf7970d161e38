//! The cache benchmark: kiln's chunked cache against gitlab-runner's method (one zip with
//! deflate, one PUT; one GET, unzip), both against the same `s3s-fs` S3 server, on a generated
//! dependency tree (`node_modules`-like: many small text files).
//!
//! kiln goes its real way: a coordinator signing endpoint (in this process) hands out
//! pre-signed URLs for a build capability; the saves and the restore are the agent's code.
//!
//! ```text
//! .ci/install-test-tools            # builds s3s-fs into target/test-tools/s3s/bin
//! cargo run --release --example cache_bench -- --files 20000 --megabytes 300
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln::cache::archive;
use kiln::cache::config::{CacheConfig, CacheType, S3Config};
use kiln::cache::format::KnownChunks;
use kiln::cache::remote::Remote;
use kiln::cache::{CacheAccess, CacheService};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

#[derive(Debug, Parser)]
struct Options {
    /// The s3s-fs binary.
    #[arg(long, default_value = "target/test-tools/s3s/bin/s3s-fs")]
    s3s_fs: PathBuf,
    /// Files in the tree.
    #[arg(long, default_value_t = 20_000)]
    files: usize,
    /// Total size of the tree in MB.
    #[arg(long, default_value_t = 300)]
    megabytes: u64,
    /// Percent of the files changed before the second save.
    #[arg(long, default_value_t = 1.0)]
    changed_percent: f64,
}

/// A small deterministic generator (xorshift64*), so every run measures the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const WORDS: &[&str] = &[
    "function",
    "return",
    "const",
    "module",
    "exports",
    "require",
    "this",
    "value",
    "undefined",
    "prototype",
    "object",
    "string",
    "length",
    "options",
    "callback",
    "error",
    "null",
    "true",
    "false",
    "if",
    "else",
    "for",
    "var",
    "let",
    "new",
    "throw",
    "typeof",
    "index",
    "default",
];

/// Source-like text of about `size` bytes: words, identifiers and numbers.
fn text(rng: &mut Rng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    while out.len() < size {
        match rng.below(10) {
            0 => {
                let _ = write!(out, "id{:x} ", rng.next() & 0xFFFF_FFFF);
            }
            1 => {
                let _ = writeln!(out, "{};", rng.below(100_000));
            }
            _ => {
                out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
                out.push(b' ');
            }
        }
    }
    out.truncate(size);
    out
}

/// Writes the tree: packages of a few directories each, file sizes spread log-uniformly.
fn generate(root: &Path, files: usize, total: u64) -> Vec<PathBuf> {
    let mut rng = Rng(0x5eed);
    let average = (total / files as u64).max(1);
    let mut paths = Vec::with_capacity(files);
    for i in 0..files {
        let package = i / 10;
        let dir = root.join(format!(
            "node_modules/pkg-{package}/{}",
            ["lib", "dist", "src"][i % 3]
        ));
        if i % 10 == 0 || i % 10 < 3 {
            std::fs::create_dir_all(&dir).expect("create the tree");
        }
        // Log-uniform from average/8 to average*3, mean close to `average`.
        let spread = (rng.below(1000) as f64 / 1000.0) * (24f64).ln();
        let size = ((average as f64 / 8.0) * spread.exp()) as usize;
        let path = dir.join(format!("f{i}.js"));
        std::fs::write(&path, text(&mut rng, size.max(1))).expect("write the tree");
        paths.push(path.strip_prefix(root).expect("inside").to_owned());
    }
    paths
}

fn tree_size(root: &Path, files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(root.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

fn zip_tree(root: &Path, files: &[PathBuf]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for file in files {
        writer
            .start_file(file.to_string_lossy(), options)
            .expect("zip entry");
        writer
            .write_all(&std::fs::read(root.join(file)).expect("read"))
            .expect("zip write");
    }
    writer.finish().expect("zip").into_inner()
}

fn unzip(data: &[u8], root: &Path) {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(data)).expect("a zip");
    archive.extract(root).expect("unzip");
}

struct S3s(Child);

impl Drop for S3s {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let options = Options::parse();
    let work = tempfile::tempdir().expect("a temporary directory");
    let storage = work.path().join("s3");
    std::fs::create_dir_all(storage.join("bench")).expect("the bucket");
    let port = free_port();
    let secret = format!("bench-{:032x}", rand::random::<u128>());
    let _s3s = S3s(Command::new(&options.s3s_fs)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "BENCHACCESSKEY", "--secret-key", &secret])
        .arg(&storage)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); run .ci/install-test-tools",
                options.s3s_fs.display()
            )
        }));
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = CacheConfig {
        kind: CacheType::S3,
        path: "kiln".into(),
        s3: Some(S3Config {
            server_address: format!("127.0.0.1:{port}"),
            bucket_name: "bench".into(),
            bucket_location: "us-east-1".into(),
            access_key: "BENCHACCESSKEY".into(),
            secret_key: secret.clone(),
            insecure: true,
        }),
        ..CacheConfig::default()
    };
    // The coordinator's signing endpoint, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let listen = listener.local_addr().expect("address");
    let service = Arc::new(CacheService::new(&config, listen).expect("the cache service"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, kiln::cache::service::router(Arc::clone(&service))).await;
    });
    let grant = CacheService::new(&config, listen)
        .expect("the cache service")
        .grant("bench", "1", "bench/1", Duration::from_secs(3600));
    assert!(matches!(grant.access, CacheAccess::Signed { .. }));
    let remote = Remote::new(grant.access.clone());
    let store = config.storage().expect("the object store").store;

    let source = work.path().join("source");
    eprintln!(
        "generating {} files, about {} MB ...",
        options.files, options.megabytes
    );
    let files = generate(&source, options.files, options.megabytes * 1_000_000);
    let size = tree_size(&source, &files);
    eprintln!("tree: {} files, {}", files.len(), mb(size));

    // gitlab-runner's method.
    let started = Instant::now();
    let zipped = zip_tree(&source, &files);
    let zip_bytes = zipped.len() as u64;
    let zip_path = ObjectPath::from("runner/bench/project/1/deps.zip");
    store
        .put(&zip_path, zipped.into())
        .await
        .expect("PUT the zip");
    let zip_save = started.elapsed();
    let target = work.path().join("zip-restore");
    let started = Instant::now();
    let data = store
        .get(&zip_path)
        .await
        .expect("GET the zip")
        .bytes()
        .await
        .expect("zip body");
    let data_for_unzip = data.clone();
    let target_for_unzip = target.clone();
    tokio::task::spawn_blocking(move || unzip(&data_for_unzip, &target_for_unzip))
        .await
        .expect("unzip");
    let zip_restore = started.elapsed();

    // kiln, cold.
    let started = Instant::now();
    let first = archive::save(
        &remote,
        &source,
        &files,
        "deps",
        &KnownChunks::new(),
        u64::MAX,
    )
    .await
    .expect("first save");
    let kiln_save = started.elapsed();

    // 1 % of the files change (a few bytes each, as an upgraded package's files do), then the
    // job saves again knowing the chunks of the manifest it restored.
    let mut rng = Rng(0xc4a96e);
    let changed = ((files.len() as f64) * options.changed_percent / 100.0).ceil() as usize;
    for _ in 0..changed {
        let file = &files[rng.below(files.len() as u64) as usize];
        let path = source.join(file);
        let mut body = std::fs::read(&path).expect("read");
        let at = rng.below(body.len() as u64) as usize;
        body.splice(at..at, format!("/* v{} */", rng.next()).bytes());
        std::fs::write(&path, body).expect("write");
    }
    let manifest = archive::fetch_manifest(&remote, "deps")
        .await
        .expect("manifest")
        .expect("saved");
    let known: KnownChunks = manifest.known_chunks().collect();
    let started = Instant::now();
    let second = archive::save(&remote, &source, &files, "deps", &known, u64::MAX)
        .await
        .expect("second save");
    let kiln_second_save = started.elapsed();
    let started = Instant::now();
    let zipped_again = zip_tree(&source, &files);
    let zip_again_bytes = zipped_again.len() as u64;
    store
        .put(&zip_path, zipped_again.into())
        .await
        .expect("PUT the zip");
    let zip_second_save = started.elapsed();

    // kiln restore into an empty directory.
    let target = work.path().join("kiln-restore");
    std::fs::create_dir_all(&target).expect("target");
    let started = Instant::now();
    let manifest = archive::fetch_manifest(&remote, "deps")
        .await
        .expect("manifest")
        .expect("saved");
    let restored = archive::restore(&remote, &manifest, &target)
        .await
        .expect("restore");
    let kiln_restore = started.elapsed();
    assert_eq!(restored.entries, files.len());
    for file in files.iter().step_by(97) {
        assert_eq!(
            std::fs::read(target.join(file)).expect("restored file"),
            std::fs::read(source.join(file)).expect("source file"),
            "{}",
            file.display()
        );
    }

    println!(
        "Tree: {} files, {} ({} changed before the second save)\n",
        files.len(),
        mb(size),
        changed
    );
    println!(
        "| step | gitlab-runner (zip, deflate, one PUT/GET) | kiln (chunks in packs, zstd, parallel) |"
    );
    println!("|---|---|---|");
    println!(
        "| first save | {}, {} uploaded | {}, {} uploaded ({} chunks in {} packs) |",
        secs(zip_save),
        mb(zip_bytes),
        secs(kiln_save),
        mb(first.uploaded_bytes),
        first.chunks,
        first.uploaded_packs
    );
    println!(
        "| second save (1 % changed) | {}, {} uploaded | {}, {} uploaded ({} of {} chunks, {} packs) |",
        secs(zip_second_save),
        mb(zip_again_bytes),
        secs(kiln_second_save),
        mb(second.uploaded_bytes),
        second.uploaded_chunks,
        second.chunks,
        second.uploaded_packs
    );
    println!(
        "| restore into an empty dir | {}, {} downloaded | {}, {} downloaded |",
        secs(zip_restore),
        mb(zip_bytes),
        secs(kiln_restore),
        mb(restored.downloaded_bytes)
    );
    let zip_total = zip_save + zip_restore;
    let kiln_total = kiln_save + kiln_restore;
    let zip_warm = zip_second_save + zip_restore;
    let kiln_warm = kiln_second_save + kiln_restore;
    println!(
        "| first save + restore | {} | {} ({:.2}x of zip) |",
        secs(zip_total),
        secs(kiln_total),
        kiln_total.as_secs_f64() / zip_total.as_secs_f64()
    );
    println!(
        "| second save + restore | {} | {} ({:.2}x of zip) |",
        secs(zip_warm),
        secs(kiln_warm),
        kiln_warm.as_secs_f64() / zip_warm.as_secs_f64()
    );
    println!(
        "\nSecond save uploads {:.1} % of the zip method's bytes.",
        100.0 * second.uploaded_bytes as f64 / zip_again_bytes as f64
    );
}
