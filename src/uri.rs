//! Connection strings and their secrets.
//!
//! A [`Uri`] shows itself redacted in `Debug`, `Display` and `Serialize`: only
//! [`Uri::expose`] hands out the real text, for the driver. Every secret a loaded config
//! carries is also registered, so that [`redact`] can scrub any text (a driver error, say)
//! before it reaches a log, a status or a terminal.

use std::fmt;
use std::sync::{OnceLock, RwLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A MongoDB connection string. Its password and secret options never show: not in
/// `{:?}`, not in `{}`, not when serialised.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Uri(String);

impl Uri {
    pub fn new(text: impl Into<String>) -> Uri {
        Uri(text.into())
    }

    /// The real connection string, secrets included: for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// Whether the text itself carries a password or secret option.
    /// (A secret that is only a `${NAME}` reference does not count.)
    pub fn has_inline_secret(&self) -> bool {
        uri_secrets(&self.0).iter().any(|s| {
            let reference = s.starts_with("${") && s.ends_with('}') && s.matches('$').count() == 1;
            !reference
        })
    }
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uri({:?})", redact_uri(&self.0))
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_uri(&self.0))
    }
}

impl Serialize for Uri {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_uri(&self.0))
    }
}

impl<'de> Deserialize<'de> for Uri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Uri, D::Error> {
        String::deserialize(d).map(Uri)
    }
}

/// Replaces every `${NAME}` in `text` with the environment variable `NAME`; `$${` stands for
/// a literal `${`. The error names the first variable that is unset (or not UTF-8), or says
/// what is malformed.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(format!(
                    "has a `${{` at character {} without a closing `}}`; write `$${{` for a literal `${{`",
                    text.len() - tail.len() + 1
                ));
            };
            let name = &after[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                // Not echoed: it may be a piece of a password.
                return Err(format!(
                    "has a `${{` at character {} that is not a variable reference `${{NAME}}` (letters, digits and '_'); write `$${{` for a literal `${{`",
                    text.len() - tail.len() + 1
                ));
            }
            match std::env::var(name) {
                Ok(v) => out.push_str(&v),
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!("environment variable `{name}` is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("environment variable `{name}` is not valid UTF-8"))
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A secret that is not a URI (the HTTP admin token): shown as `***` everywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text` and registers it for [`redact`].
    pub fn new(text: impl Into<String>) -> Secret {
        let s = Secret(text.into());
        register_text(&s.0);
        s
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();

/// Remembers the secrets of `uri`, so that [`redact`] removes them from any text.
pub fn register(uri: &Uri) {
    for secret in uri_secrets(&uri.0) {
        register_text(secret);
    }
}

fn register_text(secret: &str) {
    let secrets = SECRETS.get_or_init(|| RwLock::new(Vec::new()));
    let mut list = secrets.write().unwrap_or_else(|e| e.into_inner());
    {
        // As written, and as the driver decodes it (an escaped password appears decoded in
        // some driver messages).
        let decoded = percent_encoding::percent_decode_str(secret)
            .decode_utf8_lossy()
            .into_owned();
        for s in [secret.to_string(), decoded] {
            if !s.is_empty() && !list.contains(&s) {
                list.push(s);
            }
        }
    }
    // Longest first, so that a secret containing another is replaced whole.
    list.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// URI options whose values are secrets (compared case-insensitively).
const SECRET_OPTIONS: &[&str] = &[
    "password",
    "proxypassword",
    "tlscertificatekeyfilepassword",
    "sslpemkeypassword",
    "sslclientcertificatekeypassword",
    "authmechanismproperties",
];

/// Splits a URI into `scheme://`, the user information (if any), and the rest. The user
/// information ends at the last `@` before the options (`?`), as the driver reads it. When
/// there is none there, users sometimes leave a `?` in a password unescaped, so it ends at the
/// last `@` anywhere: erring that way can only hide more, never show a password.
fn split_userinfo(uri: &str) -> (&str, Option<&str>, &str) {
    let Some(at) = uri.find("://") else {
        return ("", None, uri);
    };
    let (scheme, rest) = uri.split_at(at + 3);
    let before_options = &rest[..rest.find('?').unwrap_or(rest.len())];
    match before_options.rfind('@').or_else(|| rest.rfind('@')) {
        Some(at) => (scheme, Some(&rest[..at]), &rest[at + 1..]),
        None => (scheme, None, rest),
    }
}

/// Every `key=value` item after the first `?` of the whole URI (`&` or `;` between them),
/// wherever the user information was found to end.
fn options(uri: &str) -> impl Iterator<Item = &str> {
    uri.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split(['&', ';', '?'])
}

fn is_secret_option(key: &str) -> bool {
    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
    SECRET_OPTIONS.contains(&key.to_ascii_lowercase().as_str())
}

/// Every secret a URI carries: the password, and the values of secret options.
fn uri_secrets(uri: &str) -> Vec<&str> {
    let (_, userinfo, _) = split_userinfo(uri);
    let mut out: Vec<&str> = userinfo
        .and_then(|u| u.split_once(':'))
        .map(|(_, pass)| pass)
        .into_iter()
        .collect();
    out.extend(
        options(uri)
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| is_secret_option(k))
            .map(|(_, v)| v),
    );
    out.retain(|s| !s.is_empty());
    out
}

/// A URI with its password and the values of its secret options replaced by `***`.
pub fn redact_uri(uri: &str) -> String {
    let (scheme, userinfo, rest) = split_userinfo(uri);
    let mut out = String::from(scheme);
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None => {
                out.push_str(userinfo);
                out.push('@');
            }
        }
    }
    // Secret option values, wherever they sit in what is left (the user information may have
    // swallowed some options; those are already hidden).
    let query = if userinfo.is_some_and(|u| u.contains('?')) {
        // The user information ran into the options: all that is left is options.
        rest
    } else {
        let Some((hosts, query)) = rest.split_once('?') else {
            out.push_str(rest);
            return out;
        };
        out.push_str(hosts);
        out.push('?');
        query
    };
    let push_item = |out: &mut String, item: &str| match item.split_once('=') {
        Some((k, _)) if is_secret_option(k) => {
            out.push_str(k);
            out.push_str("=***");
        }
        _ => out.push_str(item),
    };
    let mut start = 0;
    for (i, c) in query.char_indices() {
        if matches!(c, '&' | ';' | '?') {
            push_item(&mut out, &query[start..i]);
            out.push(c);
            start = i + 1;
        }
    }
    push_item(&mut out, &query[start..]);
    out
}

/// Any text (an error from the driver, say) with every registered secret replaced by `***`.
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(secrets) = SECRETS.get() {
        for s in secrets.read().unwrap_or_else(|e| e.into_inner()).iter() {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_uri_shape_hides_its_secrets() {
        for (uri, secret, shown) in [
            ("mongodb://bob:pw@h:1/x", "pw", "mongodb://bob:***@h:1/x"),
            ("mongodb://bob:s3cr/et@h:1/?x=1", "s3cr/et", "mongodb://bob:***@h:1/?x=1"),
            ("mongodb://bob:s3cr?et@h:1/db", "s3cr?et", "mongodb://bob:***@h:1/db"),
            ("mongodb://bob:s3#cr@h:1/db", "s3#cr", "mongodb://bob:***@h:1/db"),
            ("mongodb://bob:s3cr@et@h:1,h2:2/db", "s3cr@et", "mongodb://bob:***@h:1,h2:2/db"),
            ("mongodb+srv://bob:pa:ss@cluster.example/db", "pa:ss", "mongodb+srv://bob:***@cluster.example/db"),
            ("mongodb://bob:p%40ss@h:1/", "p%40ss", "mongodb://bob:***@h:1/"),
            ("mongodb://bob:1@h:1/", "bob:1@", "mongodb://bob:***@h:1/"),
            ("mongodb://h:1/?proxyHost=p&proxyPassword=pr0xy&x=1", "pr0xy", "mongodb://h:1/?proxyHost=p&proxyPassword=***&x=1"),
            ("mongodb://h:1/?x=1;PROXYPASSWORD=pr0xy", "pr0xy", "mongodb://h:1/?x=1;PROXYPASSWORD=***"),
            ("mongodb://h:1/?tlsCertificateKeyFilePassword=k3y", "k3y", "mongodb://h:1/?tlsCertificateKeyFilePassword=***"),
            ("mongodb://h:1/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:t0k", "t0k", "mongodb://h:1/?authMechanism=MONGODB-AWS&authMechanismProperties=***"),
            ("mongodb://h:1/?appName=a", "\u{0}", "mongodb://h:1/?appName=a"),
        ] {
            let r = redact_uri(uri);
            assert!(!r.contains(secret), "{uri} -> {r}");
            assert_eq!(r, shown, "{uri}");
            let u = Uri::new(uri);
            for text in [
                format!("{u}"),
                format!("{u:?}"),
                serde_json::to_string(&u).unwrap(),
            ] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    /// Review: an `@` in an option value made the user information swallow the options, so
    /// secret options after it were neither hidden nor registered.
    #[test]
    fn an_at_sign_in_an_option_value_hides_no_less() {
        for uri in [
            "mongodb://bob:pw@h:1/?appName=ops@box&tlsCertificateKeyFilePassword=K3yLeak",
            "mongodb://h:1/?appName=ops@box&proxyPassword=K3yLeak",
            "mongodb://h:1/?proxyPassword=K3yLeak&appName=ops@box",
        ] {
            let u = Uri::new(uri);
            for text in [
                format!("{u}"),
                format!("{u:?}"),
                serde_json::to_string(&u).unwrap(),
            ] {
                assert!(!text.contains("K3yLeak"), "{text}");
                assert!(!text.contains("pw@"), "{text}");
            }
            assert!(uri_secrets(uri).contains(&"K3yLeak"), "{uri}");
        }
    }

    #[test]
    fn registered_secrets_are_scrubbed_from_any_text_as_written_and_decoded() {
        register(&Uri::new("mongodb://bob:zq%40x9@h:1/?proxyPassword=prx77"));
        let r = redact("auth failed for zq%40x9 / zq@x9 via prx77");
        assert_eq!(r, "auth failed for *** / *** via ***");
    }

    #[test]
    fn env_references_expand_and_an_unset_one_is_named() {
        std::env::set_var("MR_URI_TEST_PW", "s3cret");
        assert_eq!(
            expand_env("mongodb://u:${MR_URI_TEST_PW}@h/").unwrap(),
            "mongodb://u:s3cret@h/"
        );
        assert_eq!(expand_env("a$b$${x}$").unwrap(), "a$b${x}$");
        let e = expand_env("mongodb://u:${MR_URI_TEST_UNSET_XYZ}@h/").unwrap_err();
        assert!(e.contains("MR_URI_TEST_UNSET_XYZ"), "{e}");
        assert!(expand_env("${oops").unwrap_err().contains("closing"));
        assert!(expand_env("${1x}").is_err());
    }
}
