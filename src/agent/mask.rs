//! Streaming secret masking: replaces masked values and prefixed tokens (`glpat-…`) with
//! `[MASKED]`, even when a secret arrives split across several writes.
//!
//! Bytes that could be the start of a secret are held back until the next write (or
//! [`Masker::finish`]) decides, so nothing that leaves the masker can be half a secret.
//!
//! Each secret is also masked in its URL-encoded forms (as gitlab-runner does), which appear
//! whenever a script builds a URL from it; other encodings (base64, …) are not, as in GitLab.

use crate::job_file::Fingerprint;

const MASK: &[u8] = b"[MASKED]";
/// A prefixed token longer than this is cut and masked anyway, so a runaway "token" cannot
/// make the masker hold output back forever.
const MAX_TOKEN_LEN: usize = 512;

/// A streaming masker for one trace.
#[derive(Debug, Default)]
pub(crate) struct Masker {
    secrets: Vec<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
    /// Fingerprinted credentials, with BASE^len for the rolling hash.
    fingerprints: Vec<(Fingerprint, u128)>,
    pending: Vec<u8>,
}

enum Match {
    /// A secret of this length starts here.
    Secret(usize),
    /// A prefixed token: keep the prefix, mask the token; total length.
    Token { prefix: usize, total: usize },
    /// The rest of the input may be the start of a secret: wait for more.
    Undecided,
    /// Nothing here.
    None,
}

impl Masker {
    /// A masker for these values (and their URL-encoded forms) and token prefixes. Empty
    /// values are ignored; longer values are tried first so that a secret containing another
    /// is masked whole.
    pub(crate) fn new(
        secrets: impl IntoIterator<Item = String>,
        prefixes: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .flat_map(|s| {
                let query = url_encoded(&s, "+");
                let path = url_encoded(&s, "%20");
                [s, query, path]
            })
            .map(String::into_bytes)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let prefixes = prefixes
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(String::into_bytes)
            .collect();
        Self {
            secrets,
            prefixes,
            fingerprints: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Also masks the values behind `fingerprints`.
    pub(crate) fn with_fingerprints(mut self, fingerprints: &[Fingerprint]) -> Self {
        self.fingerprints = fingerprints
            .iter()
            .filter(|f| Fingerprint::LENGTHS.contains(&f.len))
            .map(|f| {
                let power =
                    (0..f.len).fold(1u128, |p, _| p * Fingerprint::BASE % Fingerprint::MODULUS);
                (*f, power)
            })
            .collect();
        // Longer first, as for plain secrets.
        self.fingerprints
            .sort_by_key(|f| std::cmp::Reverse(f.0.len));
        self
    }

    /// Masks `input`, returning what can be released now.
    pub(crate) fn push(&mut self, input: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(input);
        self.drain(false)
    }

    /// Releases everything still held back, masking what matches.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    fn drain(&mut self, at_end: bool) -> Vec<u8> {
        let data = std::mem::take(&mut self.pending);
        // Prefix hashes of `data`, for the fingerprints' rolling hash (only when there are any).
        let prefix_hashes = if self.fingerprints.is_empty() {
            Vec::new()
        } else {
            let mut hashes = Vec::with_capacity(data.len() + 1);
            hashes.push(0u128);
            for b in &data {
                let last = hashes.last().copied().unwrap_or(0);
                hashes.push((last * Fingerprint::BASE + u128::from(*b)) % Fingerprint::MODULUS);
            }
            hashes
        };
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let matched = match self.fingerprint_at(&prefix_hashes, i, data.len(), at_end) {
                Match::None => self.match_at(&data[i..], at_end),
                found => found,
            };
            match matched {
                Match::Secret(len) => {
                    out.extend_from_slice(MASK);
                    i += len;
                }
                Match::Token { prefix, total } => {
                    out.extend_from_slice(&data[i..i + prefix]);
                    out.extend_from_slice(MASK);
                    i += total;
                }
                Match::Undecided => {
                    self.pending = data[i..].to_vec();
                    return out;
                }
                Match::None => {
                    out.push(data[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Whether a fingerprinted value starts at `i` of data of `len` bytes whose prefix hashes
    /// are `hashes`.
    fn fingerprint_at(&self, hashes: &[u128], i: usize, len: usize, at_end: bool) -> Match {
        let mut undecided = false;
        for (fingerprint, power) in &self.fingerprints {
            let end = i + fingerprint.len;
            if end > len {
                undecided |= !at_end;
                continue;
            }
            let (Some(start), Some(stop)) = (hashes.get(i), hashes.get(end)) else {
                continue;
            };
            // Both below 2^61, so their product fits in u128.
            let window = (stop + Fingerprint::MODULUS - start * power % Fingerprint::MODULUS)
                % Fingerprint::MODULUS;
            if u64::try_from(window).ok() == Some(fingerprint.hash) {
                return Match::Secret(fingerprint.len);
            }
        }
        if undecided {
            Match::Undecided
        } else {
            Match::None
        }
    }

    fn match_at(&self, rest: &[u8], at_end: bool) -> Match {
        let mut undecided = false;
        for secret in &self.secrets {
            if rest.starts_with(secret) {
                return Match::Secret(secret.len());
            }
            if !at_end && rest.len() < secret.len() && secret.starts_with(rest) {
                undecided = true;
            }
        }
        for prefix in &self.prefixes {
            if rest.starts_with(prefix) {
                let token = rest[prefix.len()..]
                    .iter()
                    .take(MAX_TOKEN_LEN)
                    .take_while(|b| is_token_byte(**b))
                    .count();
                let runs_to_end = prefix.len() + token == rest.len();
                if runs_to_end && !at_end && token < MAX_TOKEN_LEN {
                    undecided = true;
                    continue;
                }
                if token > 0 {
                    return Match::Token {
                        prefix: prefix.len(),
                        total: prefix.len() + token,
                    };
                }
            } else if !at_end && rest.len() < prefix.len() && prefix.starts_with(rest) {
                undecided = true;
            }
        }
        if undecided {
            Match::Undecided
        } else {
            Match::None
        }
    }
}

/// `value` percent-encoded as URL query and path components are (Go's `url.QueryEscape` with
/// `space` = `+`, JavaScript's `encodeURIComponent` with `%20`): everything but letters,
/// digits and `-_.~` as `%XX`, in upper case as both write it.
fn url_encoded(value: &str, space: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b' ' => out.push_str(space),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker() -> Masker {
        Masker::new(
            ["s3cr3t-value".to_string(), "abc".to_string()],
            ["glpat-".to_string()],
        )
    }

    fn run(m: &mut Masker, chunks: &[&str]) -> String {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.push(c.as_bytes()));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn masks_whole_and_split_secrets() {
        assert_eq!(run(&mut masker(), &["x s3cr3t-value y"]), "x [MASKED] y");
        assert_eq!(
            run(&mut masker(), &["x s3cr", "3t-va", "lue y"]),
            "x [MASKED] y"
        );
        assert_eq!(run(&mut masker(), &["ab", "c"]), "[MASKED]");
    }

    #[test]
    fn holds_back_only_a_possible_prefix() {
        let mut m = masker();
        assert_eq!(m.push(b"hello s3c"), b"hello ");
        assert_eq!(m.push(b"ond"), b"s3cond");
    }

    #[test]
    fn masks_prefixed_tokens_split_anywhere() {
        assert_eq!(
            run(&mut masker(), &["token gl", "pat-AbC_12", "3 end"]),
            "token glpat-[MASKED] end"
        );
        assert_eq!(run(&mut masker(), &["glpat-xyz"]), "glpat-[MASKED]");
        assert_eq!(run(&mut masker(), &["glpat- alone"]), "glpat- alone");
    }

    #[test]
    fn url_encoded_secrets_are_masked_even_split_across_writes() {
        let mut m = Masker::new(["Ab+/cd= x".to_string()], Vec::<String>::new());
        assert_eq!(
            run(&mut m, &["curl 'https://h/?t=Ab%2B%2F", "cd%3D+x&next'"]),
            "curl 'https://h/?t=[MASKED]&next'"
        );
        let mut m = Masker::new(["Ab+/cd= x".to_string()], Vec::<String>::new());
        assert_eq!(
            run(&mut m, &["path /Ab%2B", "%2Fcd%3D%20x/ and Ab+/cd= x"]),
            "path /[MASKED]/ and [MASKED]"
        );
    }

    /// A credential the agent never holds, only its fingerprint, is masked however the
    /// output is split, and output that merely resembles it is not.
    #[test]
    fn fingerprinted_credentials_are_masked_without_being_held() {
        let token = "runner-t1_0123456789abcdefXYZ";
        let legacy = "Zq8xv2KpL0mN4rT7";
        let fingerprints = [
            Fingerprint::of(token).unwrap(),
            Fingerprint::of(legacy).unwrap(),
        ];
        let make = || {
            Masker::new(Vec::<String>::new(), Vec::<String>::new()).with_fingerprints(&fingerprints)
        };
        assert_eq!(
            run(&mut make(), &[&format!("token={token}; legacy {legacy}.")]),
            "token=[MASKED]; legacy [MASKED]."
        );
        assert_eq!(
            run(
                &mut make(),
                &["token=runner-t1_012", "3456789ab", "cdefXYZ end"]
            ),
            "token=[MASKED] end"
        );
        let near = "runner-t1_0123456789abcdefXYz";
        assert_eq!(run(&mut make(), &[near]), near);
        // Too short to fingerprint safely; too long to hold output back for.
        assert_eq!(Fingerprint::of("short"), None);
        assert_eq!(Fingerprint::of(&"k".repeat(1700)), None);
    }

    #[test]
    fn a_partial_secret_at_the_end_is_released_unmasked() {
        assert_eq!(run(&mut masker(), &["s3cr"]), "s3cr");
    }
}
