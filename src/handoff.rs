//! The hand-off of a job to a warm pod: the contract between the executor that took the pod
//! (it seals the job's files and posts them to the pod) and the waiting agent inside it (it
//! opens them). A warm pod is made before its job, so it holds no job token; its own Secret
//! holds a random key and nothing else, and only what is sealed with that key reaches the
//! pod's agent: a sender without the key cannot give it work, an onlooker on the pod network
//! cannot read the job token, and the sealed files are bound to the pod by name.

use std::collections::BTreeMap;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::build::{JOB_FILE, START_FILE, START_NOTES_FILE};

/// The TCP port a warm pod's agent takes its job on (at the pod's IP).
pub const PORT: u16 = 9797;
/// The path it takes the job at (`POST`).
pub const PATH: &str = "/v1/handoff";
/// The key of the hand-off key in a warm pod's Secret (and its file name in the pod).
pub const KEY_FILE: &str = "handoff.key";
/// The largest hand-off body the agent reads (a job file with many variables is a few
/// hundred KiB; more is refused unread).
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// The files a hand-off may carry: the agent's job file and the notes beside it.
pub const FILES: &[&str] = &[JOB_FILE, START_FILE, START_NOTES_FILE];
/// The length of a hand-off key in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// What the executor hands a warm pod's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// The work it is for (the build's key as text): the same work handed again is accepted,
    /// other work refused.
    pub build: String,
    /// The files to write beside each other (names from [`FILES`]), base64.
    pub files: BTreeMap<String, String>,
}

impl Handoff {
    /// The hand-off of `build`'s `files` (those not in [`FILES`] are left out).
    pub fn new<'a>(build: &str, files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let engine = base64::engine::general_purpose::STANDARD;
        Self {
            build: build.to_owned(),
            files: files
                .into_iter()
                .filter(|(name, _)| FILES.contains(name))
                .map(|(name, bytes)| (name.to_owned(), engine.encode(bytes)))
                .collect(),
        }
    }

    /// The files, decoded.
    ///
    /// # Errors
    /// A file not in [`FILES`] or not base64.
    pub fn decoded(&self) -> Result<BTreeMap<String, Vec<u8>>, HandoffError> {
        let engine = base64::engine::general_purpose::STANDARD;
        self.files
            .iter()
            .map(|(name, text)| {
                if !FILES.contains(&name.as_str()) {
                    return Err(HandoffError::Invalid(format!(
                        "file `{name}` is not one a hand-off carries"
                    )));
                }
                let bytes = engine
                    .decode(text)
                    .map_err(|_| HandoffError::Invalid(format!("file `{name}` is not base64")))?;
                Ok((name.clone(), bytes))
            })
            .collect()
    }
}

/// Why a hand-off body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    /// The key is not a hand-off key.
    #[error("the hand-off key is not {KEY_LEN} bytes")]
    Key,
    /// The body was not sealed with this pod's key for this pod (or was changed).
    #[error("the hand-off is not sealed with this pod's key")]
    Seal,
    /// It opened but is not a hand-off.
    #[error("the hand-off is not valid: {0}")]
    Invalid(String),
}

/// A new random hand-off key.
#[must_use]
pub fn new_key() -> Vec<u8> {
    rand::random::<[u8; KEY_LEN]>().to_vec()
}

fn key_of(key: &[u8]) -> Result<LessSafeKey, HandoffError> {
    if key.len() != KEY_LEN {
        return Err(HandoffError::Key);
    }
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| HandoffError::Key)
}

/// `handoff` sealed for pod `pod` with `key` (AES-256-GCM, a random nonce in front, the pod's
/// name as associated data).
///
/// # Errors
/// The key is not a hand-off key.
pub fn seal(key: &[u8], pod: &str, handoff: &Handoff) -> Result<Vec<u8>, HandoffError> {
    let key = key_of(key)?;
    let nonce_bytes = rand::random::<[u8; NONCE_LEN]>();
    // Serializing plain data cannot fail.
    let mut sealed = serde_json::to_vec(handoff).unwrap_or_default();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(pod.as_bytes()),
        &mut sealed,
    )
    .map_err(|_| HandoffError::Seal)?;
    let mut body = nonce_bytes.to_vec();
    body.append(&mut sealed);
    Ok(body)
}

/// Opens a body sealed by [`seal`] for pod `pod` with `key`.
///
/// # Errors
/// [`HandoffError::Seal`] for anything not sealed with that key for that pod, and
/// [`HandoffError::Invalid`] for a sealed body that is not a hand-off.
pub fn open(key: &[u8], pod: &str, body: &[u8]) -> Result<Handoff, HandoffError> {
    let key = key_of(key)?;
    if body.len() < NONCE_LEN {
        return Err(HandoffError::Seal);
    }
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| HandoffError::Seal)?;
    let mut in_out = sealed.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(pod.as_bytes()), &mut in_out)
        .map_err(|_| HandoffError::Seal)?;
    serde_json::from_slice(plain).map_err(|e| HandoffError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Handoff {
        Handoff::new(
            "gl:runner#7",
            [
                (JOB_FILE, b"{\"job\":1}".as_slice()),
                ("../../etc/passwd", b"x".as_slice()),
            ],
        )
    }

    #[test]
    fn a_sealed_hand_off_opens_with_its_key_for_its_pod_only() {
        let key = new_key();
        let body = seal(&key, "kiln-warm-a", &handoff()).unwrap();
        let opened = open(&key, "kiln-warm-a", &body).unwrap();
        assert_eq!(opened, handoff());
        assert_eq!(
            opened.decoded().unwrap(),
            BTreeMap::from([(JOB_FILE.to_owned(), b"{\"job\":1}".to_vec())])
        );
        assert_eq!(
            open(&key, "kiln-warm-b", &body),
            Err(HandoffError::Seal),
            "bound to the pod"
        );
        assert_eq!(
            open(&new_key(), "kiln-warm-a", &body),
            Err(HandoffError::Seal)
        );
        let mut changed = body.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_eq!(open(&key, "kiln-warm-a", &changed), Err(HandoffError::Seal));
        assert_eq!(open(&key, "kiln-warm-a", b"short"), Err(HandoffError::Seal));
        assert_eq!(
            open(b"short key", "kiln-warm-a", &body),
            Err(HandoffError::Key)
        );
    }

    #[test]
    fn a_sealed_body_that_is_not_a_hand_off_or_names_other_files_is_invalid() {
        let key = new_key();
        let lie = Handoff {
            build: "x".into(),
            files: BTreeMap::from([("../job.json".to_owned(), "eA==".to_owned())]),
        };
        let body = seal(&key, "p", &lie).unwrap();
        assert!(matches!(
            open(&key, "p", &body).unwrap().decoded(),
            Err(HandoffError::Invalid(_))
        ));
    }
}
