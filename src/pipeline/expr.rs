//! `rules:if` expressions: GitLab's small language over CI/CD variables, parsed once per rule.
//!
//! Semantics follow GitLab's `Gitlab::Ci::Pipeline::Expression`: `&&` binds tighter than `||`,
//! `&&`/`||` return one of their operands (Ruby truthiness: only null and false are false), and
//! the statement as a whole is true when its value is "present" (not null, not false, not a
//! blank string). `=~` and `!~` take a `/pattern/flags` literal, or a variable or string holding
//! one; patterns are RE2 upstream, which the `regex` crate follows.

use regex::Regex;

/// A parsed `rules:if` expression.
#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Var(String),
    Str(String),
    Pattern(Regex),
    Null,
    Eq(Box<Expr>, Box<Expr>),
    Ne(Box<Expr>, Box<Expr>),
    Matches(Box<Expr>, Box<Expr>),
    NotMatches(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Var(String),
    Str(String),
    Pattern(String),
    Null,
    Eq,
    Ne,
    Matches,
    NotMatches,
    And,
    Or,
    Open,
    Close,
}

/// The value of a sub-expression while evaluating.
#[derive(Debug, Clone)]
enum Val {
    Null,
    Bool(bool),
    Str(String),
    Pattern(Regex),
}

impl Val {
    /// Ruby truthiness, which `&&` and `||` use: everything but null and false is true.
    fn truthy(&self) -> bool {
        !matches!(self, Val::Null | Val::Bool(false))
    }

    /// Rails' `present?`, which decides the statement: blank strings are false too.
    fn present(&self) -> bool {
        match self {
            Val::Null => false,
            Val::Bool(b) => *b,
            Val::Str(s) => !s.trim().is_empty(),
            Val::Pattern(_) => true,
        }
    }
}

impl Expr {
    /// Parses `source`; the error says what is wrong in words a user can act on.
    pub(crate) fn parse(source: &str) -> Result<Expr, String> {
        let tokens = lex(source)?;
        if tokens.is_empty() {
            return Err("the expression is empty".into());
        }
        let mut parser = Parser { tokens, pos: 0 };
        let expr = parser.or()?;
        if let Some(token) = parser.tokens.get(parser.pos) {
            return Err(format!(
                "unexpected {} after a complete expression",
                describe(token)
            ));
        }
        Ok(expr)
    }

    /// Whether the expression holds, looking variables up with `lookup` (`None` = undefined).
    pub(crate) fn eval(&self, lookup: &dyn Fn(&str) -> Option<String>) -> bool {
        self.value(lookup).present()
    }

    fn value(&self, lookup: &dyn Fn(&str) -> Option<String>) -> Val {
        match self {
            Expr::Var(name) => lookup(name).map_or(Val::Null, Val::Str),
            Expr::Str(s) => Val::Str(s.clone()),
            Expr::Pattern(re) => Val::Pattern(re.clone()),
            Expr::Null => Val::Null,
            Expr::Eq(l, r) => Val::Bool(equal(&l.value(lookup), &r.value(lookup))),
            Expr::Ne(l, r) => Val::Bool(!equal(&l.value(lookup), &r.value(lookup))),
            Expr::Matches(l, r) => {
                let text = l.value(lookup);
                match as_pattern(r.value(lookup)) {
                    Some(re) => Val::Bool(re.is_match(&as_text(&text))),
                    None => Val::Bool(false),
                }
            }
            Expr::NotMatches(l, r) => {
                let text = l.value(lookup);
                match as_pattern(r.value(lookup)) {
                    Some(re) => Val::Bool(!re.is_match(&as_text(&text))),
                    None => Val::Bool(true),
                }
            }
            Expr::And(l, r) => {
                let left = l.value(lookup);
                if left.truthy() { r.value(lookup) } else { left }
            }
            Expr::Or(l, r) => {
                let left = l.value(lookup);
                if left.truthy() { left } else { r.value(lookup) }
            }
        }
    }
}

fn equal(left: &Val, right: &Val) -> bool {
    match (left, right) {
        (Val::Null, Val::Null) => true,
        (Val::Str(a), Val::Str(b)) => a == b,
        (Val::Bool(a), Val::Bool(b)) => a == b,
        (Val::Pattern(a), Val::Pattern(b)) => a.as_str() == b.as_str(),
        _ => false,
    }
}

/// The text side of `=~`: GitLab matches an undefined variable as the empty string.
fn as_text(value: &Val) -> String {
    match value {
        Val::Str(s) => s.clone(),
        Val::Bool(b) => b.to_string(),
        Val::Pattern(re) => re.as_str().to_string(),
        Val::Null => String::new(),
    }
}

/// The pattern side of `=~`: a literal, or a string in `/pattern/flags` form (anything else
/// matches nothing, as in GitLab).
fn as_pattern(value: Val) -> Option<Regex> {
    match value {
        Val::Pattern(re) => Some(re),
        Val::Str(s) => {
            let (body, flags) = split_pattern(&s)?;
            compile(body, flags).ok()
        }
        Val::Null | Val::Bool(_) => None,
    }
}

/// Splits `/body/flags` into its parts, or `None` when `s` is not in that form.
fn split_pattern(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix('/')?;
    let end = rest.rfind('/')?;
    let (body, flags) = (&rest[..end], &rest[end + 1..]);
    if flags.chars().all(|c| "ismU".contains(c)) {
        Some((body, flags))
    } else {
        None
    }
}

/// Compiles a GitLab pattern: flags become an inline group, as GitLab hands them to RE2.
pub(crate) fn compile(body: &str, flags: &str) -> Result<Regex, regex::Error> {
    let body = body.replace("\\/", "/");
    if flags.is_empty() {
        Regex::new(&body)
    } else {
        Regex::new(&format!("(?{flags}){body}"))
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Var(name) => format!("variable `${name}`"),
        Token::Str(s) => format!("string \"{s}\""),
        Token::Pattern(p) => format!("pattern `{p}`"),
        Token::Null => "`null`".into(),
        Token::Eq => "`==`".into(),
        Token::Ne => "`!=`".into(),
        Token::Matches => "`=~`".into(),
        Token::NotMatches => "`!~`".into(),
        Token::And => "`&&`".into(),
        Token::Or => "`||`".into(),
        Token::Open => "`(`".into(),
        Token::Close => "`)`".into(),
    }
}

fn lex(source: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let two = |i: usize| -> String { chars[i..(i + 2).min(chars.len())].iter().collect() };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let operator = match two(i).as_str() {
            "==" => Some(Token::Eq),
            "!=" => Some(Token::Ne),
            "=~" => Some(Token::Matches),
            "!~" => Some(Token::NotMatches),
            "&&" => Some(Token::And),
            "||" => Some(Token::Or),
            _ => None,
        };
        if let Some(token) = operator {
            tokens.push(token);
            i += 2;
            continue;
        }
        match c {
            '(' | ')' => {
                tokens.push(if c == '(' { Token::Open } else { Token::Close });
                i += 1;
            }
            '$' => {
                let braced = chars.get(i + 1) == Some(&'{');
                let start = if braced { i + 2 } else { i + 1 };
                let mut end = start;
                while end < chars.len() && (chars[end].is_alphanumeric() || chars[end] == '_') {
                    end += 1;
                }
                if end == start {
                    return Err(format!(
                        "`$` at offset {i} is not followed by a variable name"
                    ));
                }
                let name: String = chars[start..end].iter().collect();
                if braced {
                    if chars.get(end) != Some(&'}') {
                        return Err(format!("`${{{name}` is missing its closing `}}`"));
                    }
                    end += 1;
                }
                tokens.push(Token::Var(name));
                i = end;
            }
            '"' | '\'' => {
                let close = chars[i + 1..].iter().position(|&x| x == c).ok_or_else(|| {
                    format!("the string starting at offset {i} has no closing {c}")
                })?;
                tokens.push(Token::Str(chars[i + 1..i + 1 + close].iter().collect()));
                i += close + 2;
            }
            '/' => {
                let mut end = i + 1;
                while end < chars.len() && chars[end] != '/' {
                    end += if chars[end] == '\\' { 2 } else { 1 };
                }
                if end >= chars.len() {
                    return Err(format!(
                        "the pattern starting at offset {i} has no closing `/`"
                    ));
                }
                end += 1;
                while end < chars.len() && "ismU".contains(chars[end]) {
                    end += 1;
                }
                tokens.push(Token::Pattern(chars[i..end].iter().collect()));
                i = end;
            }
            _ if c.is_alphabetic() => {
                let mut end = i;
                while end < chars.len() && (chars[end].is_alphanumeric() || chars[end] == '_') {
                    end += 1;
                }
                let word: String = chars[i..end].iter().collect();
                if word != "null" {
                    return Err(format!(
                        "unknown word `{word}`; variables start with `$` and strings need quotes"
                    ));
                }
                tokens.push(Token::Null);
                i = end;
            }
            _ => return Err(format!("unexpected character `{c}` at offset {i}")),
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.comparison()?;
        while self.peek() == Some(&Token::And) {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.comparison()?));
        }
        Ok(left)
    }

    fn comparison(&mut self) -> Result<Expr, String> {
        let left = self.primary()?;
        let make: fn(Box<Expr>, Box<Expr>) -> Expr = match self.peek() {
            Some(Token::Eq) => Expr::Eq,
            Some(Token::Ne) => Expr::Ne,
            Some(Token::Matches) => Expr::Matches,
            Some(Token::NotMatches) => Expr::NotMatches,
            _ => return Ok(left),
        };
        self.pos += 1;
        let right = self.primary()?;
        if matches!(
            self.peek(),
            Some(Token::Eq | Token::Ne | Token::Matches | Token::NotMatches)
        ) {
            return Err("comparisons cannot be chained; join them with `&&` or `||`".into());
        }
        Ok(make(Box::new(left), Box::new(right)))
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some(token) = self.tokens.get(self.pos).cloned() else {
            return Err("the expression ends where a value was expected".into());
        };
        self.pos += 1;
        match token {
            Token::Var(name) => Ok(Expr::Var(name)),
            Token::Str(s) => Ok(Expr::Str(s)),
            Token::Null => Ok(Expr::Null),
            Token::Pattern(p) => {
                let (body, flags) =
                    split_pattern(&p).ok_or_else(|| format!("bad pattern `{p}`"))?;
                compile(body, flags)
                    .map(Expr::Pattern)
                    .map_err(|e| format!("pattern `{p}` is not a valid regular expression: {e}"))
            }
            Token::Open => {
                let inner = self.or()?;
                if self.peek() != Some(&Token::Close) {
                    return Err("a `(` has no matching `)`".into());
                }
                self.pos += 1;
                Ok(inner)
            }
            other => Err(format!("expected a value but found {}", describe(&other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn eval(source: &str, vars: &[(&str, &str)]) -> bool {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Expr::parse(source)
            .unwrap()
            .eval(&|name| map.get(name).cloned())
    }

    #[test]
    fn equality_against_strings_variables_and_null() {
        let vars = [
            ("CI_COMMIT_BRANCH", "main"),
            ("OTHER", "main"),
            ("EMPTY", ""),
        ];
        assert!(eval(r#"$CI_COMMIT_BRANCH == "main""#, &vars));
        assert!(eval("$CI_COMMIT_BRANCH == 'main'", &vars));
        assert!(!eval(r#"$CI_COMMIT_BRANCH != "main""#, &vars));
        assert!(eval("$CI_COMMIT_BRANCH == $OTHER", &vars));
        assert!(eval("${CI_COMMIT_BRANCH} == $OTHER", &vars));
        assert!(eval("$UNDEFINED == null", &vars));
        assert!(
            !eval("$EMPTY == null", &vars),
            "an empty variable is defined"
        );
        assert!(eval(r#"$EMPTY == """#, &vars));
        assert!(!eval(r#"$UNDEFINED == """#, &vars));
    }

    #[test]
    fn presence_of_a_variable() {
        let vars = [("SET", "yes"), ("EMPTY", ""), ("BLANK", "  ")];
        assert!(eval("$SET", &vars));
        assert!(!eval("$EMPTY", &vars));
        assert!(
            !eval("$BLANK", &vars),
            "Rails' present? treats whitespace as blank"
        );
        assert!(!eval("$UNDEFINED", &vars));
    }

    #[test]
    fn regex_matching_with_flags_and_variables_holding_patterns() {
        let vars = [
            ("CI_COMMIT_TAG", "v1.2.3"),
            ("RE", "/^V1/i"),
            ("PLAIN", "v1"),
        ];
        assert!(eval(r"$CI_COMMIT_TAG =~ /^v\d+\.\d+\.\d+$/", &vars));
        assert!(!eval("$CI_COMMIT_TAG =~ /^V1/", &vars));
        assert!(eval("$CI_COMMIT_TAG =~ /^V1/i", &vars));
        assert!(eval("$CI_COMMIT_TAG =~ $RE", &vars));
        assert!(
            !eval("$CI_COMMIT_TAG =~ $PLAIN", &vars),
            "a plain string is not a pattern"
        );
        assert!(eval("$CI_COMMIT_TAG !~ /^release/", &vars));
        assert!(
            eval("$UNDEFINED =~ /^$/", &vars),
            "undefined matches as the empty string"
        );
        assert!(eval(r"$CI_COMMIT_TAG =~ /v1\/?/", &vars), "escaped slashes");
    }

    #[test]
    fn and_binds_tighter_than_or_and_parentheses_regroup() {
        let vars = [("A", "1")];
        // true || (false && false) = true; (true || false) && false = false
        assert!(eval("$A || $B && $C", &vars));
        assert!(!eval("($A || $B) && $C", &vars));
        assert!(eval(r#"($A == "1" || $B) && ($C == null)"#, &vars));
    }

    #[test]
    fn and_or_return_operands_like_ruby() {
        // "" is truthy for `||` in Ruby, so `$EMPTY || "x"` is "" and the statement is false.
        let vars = [("EMPTY", "")];
        assert!(!eval(r#"$EMPTY || "x""#, &vars));
        assert!(eval(r#"$UNDEFINED || "x""#, &vars));
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        let err = |s: &str| Expr::parse(s).unwrap_err();
        assert!(err("$A ==").contains("ends where a value was expected"));
        assert!(err("$A == main").contains("unknown word `main`"));
        assert!(err(r#"$A == "main"#).contains("no closing"));
        assert!(err("($A == '1'").contains("no matching `)`"));
        assert!(err("$A =~ /[/").contains("not a valid regular expression"));
        assert!(err("$A == $B == $C").contains("cannot be chained"));
        assert!(err("").contains("empty"));
        assert!(err("$A $B").contains("unexpected variable `$B`"));
    }
}
