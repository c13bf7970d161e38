//! Where a keyword sits in the file, for the reader's errors and warnings.

use super::{PipelineError, Warning};

/// Where a keyword sits, for error and warning messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Context<'a> {
    /// Inside job `name`.
    Job(&'a str),
    /// Inside a global keyword such as `default` or `workflow`.
    Keyword(&'a str),
    /// At the top level of the file.
    Global,
}

impl Context<'_> {
    fn key(&self, key: &str) -> String {
        match self {
            Context::Keyword(prefix) => format!("{prefix}:{key}"),
            Context::Job(_) | Context::Global => key.to_string(),
        }
    }

    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> PipelineError {
        match self {
            Context::Job(job) => PipelineError::Job {
                job: job.to_string(),
                key: key.into(),
                message: message.into(),
            },
            _ => PipelineError::Config {
                key: self.key(key),
                message: message.into(),
            },
        }
    }

    pub(crate) fn bad_rule(&self, expression: &str, reason: String) -> PipelineError {
        match self {
            Context::Job(job) => PipelineError::BadRule {
                job: job.to_string(),
                expression: expression.into(),
                reason,
            },
            _ => PipelineError::Config {
                key: self.key("rules:if"),
                message: format!("`{expression}` is not a valid expression: {reason}"),
            },
        }
    }

    /// The error for `key`, which GitLab does not know, under `section` (`["artifacts"]`,
    /// `["rules", "*"]` for any rule; `[]` for the context's own keys), with the nearest of
    /// the `known` keys as a suggestion. The position in the file is filled in by the reader,
    /// which has the sources.
    pub(crate) fn unknown(&self, section: &[&str], key: &str, known: &[&str]) -> PipelineError {
        let mut keys: Vec<String> = match self {
            Context::Job(job) => vec![job.to_string()],
            Context::Keyword(keyword) => vec![keyword.to_string()],
            Context::Global => Vec::new(),
        };
        keys.extend(section.iter().map(|s| s.to_string()));
        keys.push(key.to_string());
        let named: Vec<&str> = section
            .iter()
            .copied()
            .filter(|s| *s != "*")
            .chain([key])
            .collect();
        PipelineError::UnknownKey {
            file: String::new(),
            line: 0,
            column: 0,
            place: match self {
                Context::Job(job) => format!("job `{job}`"),
                Context::Keyword(keyword) => format!("`{keyword}`"),
                Context::Global => "the top level".into(),
            },
            key: named.join(":"),
            suggestion: nearest(key, known).map(str::to_string),
            keys: keys.into(),
        }
    }

    pub(crate) fn warning(&self, key: &str, message: impl Into<String>) -> Warning {
        Warning {
            job: match self {
                Context::Job(job) => Some(job.to_string()),
                _ => None,
            },
            key: self.key(key),
            message: message.into(),
        }
    }
}

/// The known key closest to `key` by edit distance (a swap of two neighbours counting as one
/// edit), if it is close enough to be a typo of it.
pub(crate) fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        // On a tie, the one as long as `key`: a swap is likelier than a missing letter.
        .min_by_key(|(d, k)| (*d, k.len().abs_diff(key.len())))
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// adjacent characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_the_keyword_they_miss() {
        let known = ["script", "stage", "stages", "services", "variables"];
        assert_eq!(nearest("scrpit", &known), Some("script"));
        assert_eq!(nearest("stgae", &known), Some("stage"));
        assert_eq!(nearest("varaibles", &known), Some("variables"));
        assert_eq!(nearest("stagse", &known), Some("stages"));
        assert_eq!(nearest("deploy_to", &known), None, "not a typo of anything");
    }
}
