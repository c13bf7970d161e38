//! Microsoft's Azure Storage emulator (Azurite, npm) for the cache tests: one account with a
//! key generated per test, and one container created with a Shared Key request.
#![allow(dead_code, unreachable_pub)]

use std::process::{Child, Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A running Azurite blob service, stopped on drop.
pub struct AzureServer {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub address: String,
    /// The account.
    pub account: String,
    /// Its key (base64, random per server).
    pub key: String,
    /// The container that exists.
    pub container: String,
}

impl AzureServer {
    /// Starts Azurite with account `kilntest` and container `ci-cache`.
    pub async fn start() -> Self {
        let binary = super::tools::azurite_blob();
        let dir = tempfile::tempdir().unwrap();
        let port = super::kiln::free_port();
        let account = "kilntest".to_owned();
        let key = STANDARD.encode(rand::random::<[u8; 32]>());
        let child = Command::new(binary)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args([
                "--silent",
                "--skipApiVersionCheck",
                "--disableProductStyleUrl",
            ])
            .env("AZURITE_ACCOUNTS", format!("{account}:{key}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let address = format!("127.0.0.1:{port}");
        super::s3::wait_listening(&address, "azurite");
        let server = Self {
            child: Some(child),
            _dir: dir,
            address,
            account,
            key,
            container: "ci-cache".into(),
        };
        server.create_container().await;
        server
    }

    /// `PUT ?restype=container`, signed with Shared Key.
    async fn create_container(&self) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        let path = format!("/{}/{}", self.account, self.container);
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{}{path}\nrestype:container",
            self.account
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&STANDARD.decode(&self.key).unwrap()).unwrap();
        mac.update(string_to_sign.as_bytes());
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        let response = reqwest::Client::new()
            .put(format!("http://{}{path}?restype=container", self.address))
            .header("x-ms-date", &date)
            .header("x-ms-version", version)
            .header(
                "Authorization",
                format!("SharedKey {}:{signature}", self.account),
            )
            .header("Content-Length", "0")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "create container: {status} {body}");
    }

    /// The `[cache]` section of a kiln config for this server.
    pub fn cache_config(&self) -> String {
        format!(
            "[cache]\ntype = \"azure\"\npath = \"kiln\"\n[cache.azure]\naccount_name = \"{}\"\naccount_key = \"{}\"\ncontainer_name = \"{}\"\nstorage_domain = \"http://{}/{}\"\n",
            self.account, self.key, self.container, self.address, self.account
        )
    }
}

impl Drop for AzureServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
