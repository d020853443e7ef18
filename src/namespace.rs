//! What is replicated: namespaces (database, collection) and the selection of them from the
//! config (`source.database` + `source.collections`, or `source.namespaces`, less
//! `source.exclude`), with glob patterns.
//!
//! A selection is resolved against the source by listing its collections: names that match a
//! pattern and are plain collections (not views, time series or `system.*`) are replicated.
//! Collections named literally are replicated even before they exist on the source.

use std::collections::BTreeSet;
use std::fmt;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::Client;

/// One source collection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ns {
    pub db: String,
    pub coll: String,
}

impl Ns {
    pub fn new(db: impl Into<String>, coll: impl Into<String>) -> Ns {
        Ns {
            db: db.into(),
            coll: coll.into(),
        }
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.db, self.coll)
    }
}

/// A collection-name pattern: a literal name or a glob (`*`, `?`, `[abc]`).
#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    glob: Option<glob::Pattern>,
}

impl Pattern {
    fn new(text: &str) -> Result<Pattern, String> {
        let is_glob = text.contains(['*', '?', '[']);
        let glob = if is_glob {
            Some(
                glob::Pattern::new(text)
                    .map_err(|e| format!("`{text}` is not a valid pattern: {e}"))?,
            )
        } else {
            None
        };
        Ok(Pattern {
            text: text.to_string(),
            glob,
        })
    }

    fn matches(&self, name: &str) -> bool {
        match &self.glob {
            Some(g) => g.matches(name),
            None => self.text == name,
        }
    }

    fn literal(&self) -> Option<&str> {
        self.glob.is_none().then_some(self.text.as_str())
    }
}

/// Collections the replicator never replicates, whatever the patterns say.
pub fn is_system(coll: &str) -> bool {
    coll.starts_with("system.")
}

/// Which source collections are replicated.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Per database, the collection patterns to include.
    include: Vec<(String, Vec<Pattern>)>,
    /// Patterns of collections to leave out, per database (`None`: any database).
    exclude: Vec<(Option<String>, Pattern)>,
    /// The simple form (`source.database`): collections are shown by name alone.
    simple: bool,
}

impl Selection {
    /// The simple form: `database` with `collections` (names or globs), less `exclude`.
    pub fn simple(
        database: &str,
        collections: &[String],
        exclude: &[String],
    ) -> Result<Selection, String> {
        let mut pats = Vec::new();
        for c in collections {
            check_coll_pattern(c)?;
            pats.push(Pattern::new(c)?);
        }
        let mut ex = Vec::new();
        for e in exclude {
            ex.push((Some(database.to_string()), Pattern::new(e)?));
        }
        Ok(Selection {
            include: vec![(database.to_string(), pats)],
            exclude: ex,
            simple: true,
        })
    }

    /// The namespace form: `db.collection` entries (the collection part may be a glob; the
    /// database is a name), less `exclude` entries of the same form.
    pub fn namespaces(namespaces: &[String], exclude: &[String]) -> Result<Selection, String> {
        let mut include: Vec<(String, Vec<Pattern>)> = Vec::new();
        for n in namespaces {
            let (db, coll) = split_ns(n)?;
            check_coll_pattern(coll)?;
            let p = Pattern::new(coll)?;
            match include.iter_mut().find(|(d, _)| d == db) {
                Some((_, pats)) => pats.push(p),
                None => include.push((db.to_string(), vec![p])),
            }
        }
        let mut ex = Vec::new();
        for e in exclude {
            let (db, coll) = split_ns(e)?;
            ex.push((Some(db.to_string()), Pattern::new(coll)?));
        }
        Ok(Selection {
            include,
            exclude: ex,
            simple: false,
        })
    }

    /// The source databases the selection reads.
    pub fn databases(&self) -> Vec<String> {
        self.include.iter().map(|(d, _)| d.clone()).collect()
    }

    /// Whether `ns` is replicated (it need not exist).
    pub fn matches(&self, ns: &Ns) -> bool {
        if is_system(&ns.coll) || ns.coll.contains('$') {
            return false;
        }
        let included = self
            .include
            .iter()
            .any(|(d, pats)| d == &ns.db && pats.iter().any(|p| p.matches(&ns.coll)));
        included
            && !self
                .exclude
                .iter()
                .any(|(d, p)| d.as_deref().is_none_or(|d| d == ns.db) && p.matches(&ns.coll))
    }

    /// Collections named literally (replicated even before they exist), less exclusions.
    pub fn literal(&self) -> Vec<Ns> {
        let mut out = Vec::new();
        for (db, pats) in &self.include {
            for p in pats {
                if let Some(name) = p.literal() {
                    let ns = Ns::new(db.clone(), name);
                    if self.matches(&ns) && !out.contains(&ns) {
                        out.push(ns);
                    }
                }
            }
        }
        out
    }

    /// Whether every pattern is a literal name (no listing of the source is needed).
    pub fn is_literal(&self) -> bool {
        self.include
            .iter()
            .all(|(_, pats)| pats.iter().all(|p| p.literal().is_some()))
    }

    /// The name a collection is shown under: the collection alone in the simple form,
    /// `db.collection` otherwise. Also the key of its checkpoints in the token file.
    pub fn label(&self, ns: &Ns) -> String {
        if self.simple {
            ns.coll.clone()
        } else {
            ns.to_string()
        }
    }

    pub fn is_simple(&self) -> bool {
        self.simple
    }

    /// The source collections replicated now: the literal names, and every plain collection
    /// of the source that matches. Views and time-series collections are not replicated.
    pub async fn resolve(&self, client: &Client) -> mongodb::error::Result<Vec<Ns>> {
        let mut out: BTreeSet<Ns> = self.literal().into_iter().collect();
        if !self.is_literal() {
            for db in self.databases() {
                for name in list_collections(client, &db).await? {
                    let ns = Ns::new(db.clone(), name);
                    if self.matches(&ns) {
                        out.insert(ns);
                    }
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// The plain collections of `db`: not views, time series, or capped collections (writes to
/// those cannot be in the transactions that fence every follower write, and their evictions
/// make no change events).
pub async fn list_collections(client: &Client, db: &str) -> mongodb::error::Result<Vec<String>> {
    let specs: Vec<Document> = client
        .database(db)
        .run_cursor_command(doc! {
            "listCollections": 1,
            "filter": {"type": "collection"},
        })
        .await?
        .try_collect()
        .await?;
    Ok(specs
        .into_iter()
        .filter(|d| {
            !d.get_document("options")
                .is_ok_and(|o| o.get_bool("capped").unwrap_or(false))
        })
        .filter_map(|d| d.get_str("name").ok().map(str::to_string))
        .filter(|n| !is_system(n))
        .collect())
}

fn split_ns(n: &str) -> Result<(&str, &str), String> {
    match n.split_once('.') {
        Some((db, coll)) if !db.is_empty() && !coll.is_empty() => {
            if db.contains(['*', '?', '[']) {
                return Err(format!(
                    "`{n}`: the database part must be a name, not a pattern"
                ));
            }
            Ok((db, coll))
        }
        _ => Err(format!(
            "`{n}` is not `database.collection` (the collection may be a pattern such as `app.*`)"
        )),
    }
}

fn check_coll_pattern(c: &str) -> Result<(), String> {
    if c.is_empty() || is_system(c) || c.contains('$') || c.contains('\0') {
        return Err(format!("`{c}` is not a valid collection name or pattern"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs_and_excludes_select_collections() {
        let s = Selection::simple("app", &names(&["*"]), &names(&["tmp_*", "cache"])).unwrap();
        assert!(s.matches(&Ns::new("app", "orders")));
        assert!(!s.matches(&Ns::new("app", "tmp_1")));
        assert!(!s.matches(&Ns::new("app", "cache")));
        assert!(!s.matches(&Ns::new("app", "system.views")));
        assert!(!s.matches(&Ns::new("other", "orders")));
        assert!(!s.is_literal());
        assert_eq!(s.label(&Ns::new("app", "orders")), "orders");
    }

    #[test]
    fn literal_names_are_replicated_before_they_exist() {
        let s = Selection::simple("app", &names(&["data", "orders"]), &[]).unwrap();
        assert!(s.is_literal());
        assert_eq!(
            s.literal(),
            vec![Ns::new("app", "data"), Ns::new("app", "orders")]
        );
    }

    #[test]
    fn namespaces_span_databases() {
        let s = Selection::namespaces(
            &names(&["app.*", "billing.invoices"]),
            &names(&["app.audit*"]),
        )
        .unwrap();
        assert_eq!(s.databases(), names(&["app", "billing"]));
        assert!(s.matches(&Ns::new("app", "x")));
        assert!(!s.matches(&Ns::new("app", "audit_log")));
        assert!(s.matches(&Ns::new("billing", "invoices")));
        assert!(!s.matches(&Ns::new("billing", "other")));
        assert_eq!(s.label(&Ns::new("app", "x")), "app.x");
        assert_eq!(s.literal(), vec![Ns::new("billing", "invoices")]);
    }

    #[test]
    fn bad_patterns_are_named() {
        assert!(Selection::namespaces(&names(&["noDot"]), &[])
            .unwrap_err()
            .contains("`noDot`"));
        assert!(Selection::namespaces(&names(&["a*.x"]), &[])
            .unwrap_err()
            .contains("database part"));
        assert!(Selection::simple("app", &names(&["[x"]), &[])
            .unwrap_err()
            .contains("not a valid pattern"));
        assert!(Selection::simple("app", &names(&["system.js"]), &[]).is_err());
    }
}
