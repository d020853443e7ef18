//! Collection metadata: a collection's options (validator, collation, capped size, ...) and
//! its index definitions. Read from the source, compared with a follower's ([`diff`]), and
//! made to match on the follower ([`apply`]). Used by the consistency check and by the
//! pipeline (initial copy and DDL events).
//!
//! Comparison is on normalised definitions: volatile or cosmetic fields are left out (`uuid`,
//! an index's `v`, `ns` and `background`), defaults are left out (`validationLevel:
//! "strict"`, `unique: false`, ...), numbers compare by value (`1` = `1.0` = `NumberLong(1)`)
//! and documents compare without regard to field order, except an index's key pattern,
//! whose order is its meaning. A collection with a default collation reports that
//! collation on each of its indexes (MongoDB and the test server alike), so both sides are
//! compared as reported, like with like; the `_id_` index's collation is the collection's
//! and is compared through the `collation` option alone.
//!
//! The replicator keeps its own index on the key field of each follower collection
//! ([`crate::follower::key_index_name`], `mongo_replicator_<field>`): [`diff`] ignores
//! follower indexes with that prefix, and [`apply`] never drops them, except the one whose
//! key pattern a source index needs (MongoDB refuses two indexes with the same key pattern
//! under different names).

use std::fmt;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use mongodb::Database;

/// The prefix of the replicator's own indexes on followers.
pub const OWN_INDEX_PREFIX: &str = "mongo_replicator_";

/// Code of `NamespaceNotFound`.
const NAMESPACE_NOT_FOUND: i32 = 26;
/// Code of `IndexNotFound`.
const INDEX_NOT_FOUND: i32 = 27;
/// Code of `NamespaceExists`.
const NAMESPACE_EXISTS: i32 = 48;

/// Options that `collMod` changes in place.
const MODIFIABLE: &[&str] = &[
    "validator",
    "validationLevel",
    "validationAction",
    "changeStreamPreAndPostImages",
];

/// Index options that `collMod` changes in place.
const INDEX_MODIFIABLE: &[&str] = &["hidden", "expireAfterSeconds"];

/// A collection's metadata as read from one deployment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollMeta {
    pub exists: bool,
    /// `listCollections` options, without volatile fields (`uuid`).
    pub options: Document,
    /// `listIndexes` entries, as the server reports them.
    pub indexes: Vec<Document>,
}

impl CollMeta {
    /// The index named `name`.
    pub fn index(&self, name: &str) -> Option<&Document> {
        self.indexes.iter().find(|i| index_name(i) == name)
    }
}

/// One way in which a follower's collection differs from the source's.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaDiff {
    /// The source has the collection, the follower does not.
    MissingCollection,
    /// An index the source has and the follower lacks (by name).
    MissingIndex { name: String, source: Document },
    /// An index only the follower has (never the replicator's own).
    ExtraIndex { name: String, follower: Document },
    /// An index of the same name with another definition.
    DifferentIndex {
        name: String,
        source: Document,
        follower: Document,
    },
    /// A collection option that differs; `None` is "not set".
    DifferentOption {
        name: String,
        source: Option<Bson>,
        follower: Option<Bson>,
    },
}

impl MetaDiff {
    /// `index` or `options` (the collection itself counts with its options).
    pub fn kind(&self) -> &'static str {
        match self {
            MetaDiff::MissingCollection | MetaDiff::DifferentOption { .. } => "options",
            _ => "index",
        }
    }

    /// The index or option named, or `""` for the collection itself.
    pub fn name(&self) -> &str {
        match self {
            MetaDiff::MissingCollection => "",
            MetaDiff::MissingIndex { name, .. }
            | MetaDiff::ExtraIndex { name, .. }
            | MetaDiff::DifferentIndex { name, .. }
            | MetaDiff::DifferentOption { name, .. } => name,
        }
    }
}

impl fmt::Display for MetaDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = |d: &Document| short(&Bson::Document(spec_of(d)));
        match self {
            MetaDiff::MissingCollection => write!(f, "collection missing on the follower"),
            MetaDiff::MissingIndex { name, source } => {
                write!(
                    f,
                    "index `{name}` missing on the follower: {}",
                    spec(source)
                )
            }
            MetaDiff::ExtraIndex { name, follower } => {
                write!(f, "index `{name}` only on the follower: {}", spec(follower))
            }
            MetaDiff::DifferentIndex {
                name,
                source,
                follower,
            } => write!(
                f,
                "index `{name}` differs: source {}, follower {}",
                spec(source),
                spec(follower)
            ),
            MetaDiff::DifferentOption {
                name,
                source,
                follower,
            } => {
                let show = |v: &Option<Bson>| v.as_ref().map_or("(not set)".into(), short);
                write!(
                    f,
                    "option `{name}` differs: source {}, follower {}",
                    show(source),
                    show(follower)
                )
            }
        }
    }
}

/// What [`apply`] did, and what it left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// One line per change made, e.g. "created index `a_1`".
    pub changed: Vec<String>,
    /// Differences it could not fix in place (and was not allowed to fix by recreating the
    /// collection).
    pub unfixed: Vec<MetaDiff>,
}

/// Reads the options and indexes of `coll` in `db`. A collection that does not exist reads
/// as `exists: false` with no options or indexes.
pub async fn read(db: &Database, coll: &str) -> mongodb::error::Result<CollMeta> {
    let listed: Vec<Document> = db
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await?
        .try_collect()
        .await?;
    let Some(entry) = listed.into_iter().next() else {
        return Ok(CollMeta::default());
    };
    let mut options = entry.get_document("options").cloned().unwrap_or_default();
    options.remove("uuid");
    let indexes = match db.run_cursor_command(doc! {"listIndexes": coll}).await {
        Ok(cursor) => cursor.try_collect().await?,
        // Dropped between the two reads.
        Err(e) if code_of(&e) == Some(NAMESPACE_NOT_FOUND) => return Ok(CollMeta::default()),
        Err(e) => return Err(e),
    };
    Ok(CollMeta {
        exists: true,
        options,
        indexes,
    })
}

/// The differences of `follower` from `source`. A source collection that does not exist
/// asks for nothing (its documents are the data comparison's business).
pub fn diff(source: &CollMeta, follower: &CollMeta) -> Vec<MetaDiff> {
    let mut out = Vec::new();
    if !source.exists {
        return out;
    }
    if !follower.exists {
        out.push(MetaDiff::MissingCollection);
        for ix in &source.indexes {
            let name = index_name(ix);
            if name != "_id_" {
                out.push(MetaDiff::MissingIndex {
                    name: name.to_string(),
                    source: ix.clone(),
                });
            }
        }
        return out;
    }
    out.extend(option_diffs(&source.options, &follower.options));
    for s in &source.indexes {
        let name = index_name(s);
        match follower.index(name) {
            None => out.push(MetaDiff::MissingIndex {
                name: name.to_string(),
                source: s.clone(),
            }),
            Some(f) if normalise_index(s) != normalise_index(f) => {
                out.push(MetaDiff::DifferentIndex {
                    name: name.to_string(),
                    source: s.clone(),
                    follower: f.clone(),
                })
            }
            Some(_) => {}
        }
    }
    for f in &follower.indexes {
        let name = index_name(f);
        if source.index(name).is_none() && !name.starts_with(OWN_INDEX_PREFIX) {
            out.push(MetaDiff::ExtraIndex {
                name: name.to_string(),
                follower: f.clone(),
            });
        }
    }
    out
}

/// Whether index `ix` (as listed by the source) serves the replicator's lookups by key as
/// well as its own index would: binary collation, every document (no partial filter). Its
/// key pattern is compared by the caller. (A hidden one does not serve, but cannot coexist
/// with ours either: the source's index wins.)
fn serves_binary_lookups(ix: &Document) -> bool {
    crate::change::collated(ix).is_none() && !ix.contains_key("partialFilterExpression")
}

/// How the default collations of two existing collections differ, if they do.
pub fn collation_diff(source: &CollMeta, follower: &CollMeta) -> Option<MetaDiff> {
    option_diffs(&source.options, &follower.options)
        .into_iter()
        .find(|d| d.name() == "collation")
}

/// Makes the follower collection `coll` in `follower_db` match `source`: creates it with the
/// source's options when missing; `collMod` for the options it can change in place
/// (validator, validationLevel, validationAction, changeStreamPreAndPostImages, and a capped
/// collection's size and maximum on MongoDB 6.0+); creates missing indexes with all their
/// options; drops extra indexes; changes an index's `hidden` or `expireAfterSeconds` in
/// place, and drops and recreates an index whose definition differs otherwise. Options
/// that cannot change in place (capped, collation, clustering, ...): when `recreate` is
/// true (an initial copy is starting and copies every document again) the follower
/// collection is dropped and created anew with the source's options; when false they are
/// left, and returned in [`Applied::unfixed`].
///
/// The replicator's own index on `key_field` is kept, except when a source index has
/// exactly its key pattern `{<key_field>: 1}`: it is dropped first so that the source's can
/// be created. Every DDL asks for write concern majority. An index the follower cannot
/// build (say a unique index over duplicate follower data) does not stop the rest: the
/// other changes are made, then the error is returned, its message naming the index(es).
pub async fn apply(
    source: &CollMeta,
    follower_db: &Database,
    coll: &str,
    key_field: &str,
    recreate: bool,
) -> mongodb::error::Result<Applied> {
    let mut applied = Applied::default();
    if !source.exists {
        return Ok(applied);
    }
    let mut follower = read(follower_db, coll).await?;
    if follower.exists {
        let (in_place, at_creation): (Vec<_>, Vec<_>) =
            option_diffs(&source.options, &follower.options)
                .into_iter()
                .partition(|d| modifiable(d, source));
        if !at_creation.is_empty() {
            if recreate {
                match run(follower_db, doc! {"drop": coll}).await {
                    Err(e) if code_of(&e) != Some(NAMESPACE_NOT_FOUND) => return Err(e),
                    _ => {}
                }
                applied.changed.push(format!(
                    "dropped the collection to create it with the source's options ({})",
                    names(&at_creation)
                ));
                follower = CollMeta::default();
            } else {
                applied.unfixed.extend(at_creation);
            }
        }
        if follower.exists && !in_place.is_empty() {
            let mut cmd = doc! {"collMod": coll};
            for d in &in_place {
                if let MetaDiff::DifferentOption { name, source, .. } = d {
                    let (field, value) = coll_mod_field(name, source.as_ref());
                    cmd.insert(field, value);
                }
            }
            match run(follower_db, cmd).await {
                Ok(()) => applied
                    .changed
                    .push(format!("changed option(s) {} (collMod)", names(&in_place))),
                // Servers before MongoDB 6.0 cannot change a capped size in place.
                Err(e) if in_place.iter().any(is_capped_size) => {
                    tracing::warn!(collection = coll, error = %crate::source::describe(&e), "collMod refused");
                    applied.unfixed.extend(in_place);
                }
                Err(e) => return Err(e),
            }
        }
    }
    if !follower.exists {
        let mut cmd = doc! {"create": coll};
        cmd.extend(source.options.clone());
        match run(follower_db, cmd).await {
            Ok(()) => applied
                .changed
                .push("created the collection with the source's options".into()),
            // Created meanwhile (by a write, say): its options are compared next time.
            Err(e) if code_of(&e) == Some(NAMESPACE_EXISTS) => {}
            Err(e) => return Err(e),
        }
    }
    let follower = read(follower_db, coll).await?;
    let default_collation = follower.options.get_document("collation").is_ok();

    // Extra indexes first: they may hold a name or a key pattern a source index needs.
    for f in &follower.indexes {
        let name = index_name(f);
        if name != "_id_" && !name.starts_with(OWN_INDEX_PREFIX) && source.index(name).is_none() {
            drop_index(follower_db, coll, name).await?;
            applied.changed.push(format!("dropped index `{name}`"));
        }
    }
    let own_key = normalise(&Bson::Document(doc! {key_field: 1}));
    let mut failures: Vec<(String, mongodb::error::Error)> = Vec::new();
    for s in &source.indexes {
        let name = index_name(s);
        let existing = follower.index(name);
        if let Some(f) = existing {
            if normalise_index(s) == normalise_index(f) {
                continue;
            }
            if name == "_id_" {
                applied.unfixed.push(MetaDiff::DifferentIndex {
                    name: name.into(),
                    source: s.clone(),
                    follower: f.clone(),
                });
                continue;
            }
            if let Some(cmd) = index_coll_mod(coll, s, f) {
                if run(follower_db, cmd).await.is_ok() {
                    applied
                        .changed
                        .push(format!("changed index `{name}` in place (collMod)"));
                    continue;
                }
            }
            drop_index(follower_db, coll, name).await?;
        }
        let key = s.get("key").map(normalise);
        // MongoDB refuses a second index with one key pattern, collation and partial filter.
        // One that differs from ours in either coexists with ours, which must stay: the
        // replicator's lookups by key compare binary and need every document indexed.
        if key.as_ref() == Some(&own_key) && serves_binary_lookups(s) {
            for f in &follower.indexes {
                let own = index_name(f);
                if own.starts_with(OWN_INDEX_PREFIX)
                    && own != name
                    && f.get("key").map(normalise) == key
                {
                    drop_index(follower_db, coll, own).await?;
                    applied.changed.push(format!(
                        "dropped the replicator's index `{own}` for the source's `{name}` on the same key"
                    ));
                }
            }
        }
        let mut spec = creatable(s);
        if default_collation && !spec.contains_key("collation") {
            // Without a collation on the source, the index compares simply; here it would
            // inherit the follower collection's default.
            spec.insert("collation", doc! {"locale": "simple"});
        }
        match run(follower_db, doc! {"createIndexes": coll, "indexes": [spec]}).await {
            Ok(()) => applied.changed.push(match existing {
                Some(_) => format!("recreated index `{name}` (it differed)"),
                None => format!("created index `{name}`"),
            }),
            Err(e) => failures.push((name.to_string(), e)),
        }
    }
    if failures.is_empty() {
        return Ok(applied);
    }
    for (name, e) in &failures {
        tracing::warn!(collection = coll, index = %name, error = %crate::source::describe(e), "cannot build index on the follower");
    }
    let names: Vec<String> = failures.iter().map(|(n, _)| format!("`{n}`")).collect();
    let prefix = format!(
        "building index{} {} on the follower's {}.{coll}",
        if names.len() > 1 { "es" } else { "" },
        names.join(", "),
        follower_db.name()
    );
    let mut e = failures.swap_remove(0).1;
    name_in_error(&mut e, &prefix);
    Err(e)
}

/// Runs a DDL command with write concern majority.
async fn run(db: &Database, mut cmd: Document) -> mongodb::error::Result<()> {
    cmd.insert("writeConcern", doc! {"w": "majority"});
    db.run_command(cmd).await.map(|_| ())
}

async fn drop_index(db: &Database, coll: &str, name: &str) -> mongodb::error::Result<()> {
    match run(db, doc! {"dropIndexes": coll, "index": name}).await {
        Err(e) if code_of(&e) == Some(INDEX_NOT_FOUND) => Ok(()),
        other => other,
    }
}

/// Puts `prefix` in front of the server's message, keeping the error's kind and code.
fn name_in_error(e: &mut mongodb::error::Error, prefix: &str) {
    use mongodb::error::WriteFailure;
    match e.kind.as_mut() {
        ErrorKind::Command(c) => c.message = format!("{prefix}: {}", c.message),
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            w.message = format!("{prefix}: {}", w.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            w.message = format!("{prefix}: {}", w.message)
        }
        _ => {
            *e = mongodb::error::Error::custom(format!("{prefix}: {}", crate::source::describe(e)))
        }
    }
}

/// The server's error code, if it answered with one.
fn code_of(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

fn index_name(ix: &Document) -> &str {
    ix.get_str("name").unwrap_or("")
}

fn names(diffs: &[MetaDiff]) -> String {
    diffs
        .iter()
        .map(|d| format!("`{}`", d.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether this option difference can be fixed by `collMod`.
fn modifiable(d: &MetaDiff, source: &CollMeta) -> bool {
    match d {
        MetaDiff::DifferentOption { name, .. } if MODIFIABLE.contains(&name.as_str()) => true,
        // A capped collection's size and maximum, when both sides are capped (a difference
        // in `capped` itself is not modifiable, and then the collection is recreated).
        MetaDiff::DifferentOption { .. } if is_capped_size(d) => {
            source.options.get_bool("capped").unwrap_or(false)
        }
        _ => false,
    }
}

fn is_capped_size(d: &MetaDiff) -> bool {
    matches!(d, MetaDiff::DifferentOption { name, .. } if name == "size" || name == "max")
}

/// The `collMod` field and value that set option `name` to `value` (`None`: back to the
/// default).
fn coll_mod_field(name: &str, value: Option<&Bson>) -> (&'static str, Bson) {
    let or = |default: Bson| value.cloned().unwrap_or(default);
    match name {
        "validator" => ("validator", or(Bson::Document(doc! {}))),
        "validationLevel" => ("validationLevel", or("strict".into())),
        "validationAction" => ("validationAction", or("error".into())),
        "changeStreamPreAndPostImages" => (
            "changeStreamPreAndPostImages",
            or(Bson::Document(doc! {"enabled": false})),
        ),
        "size" => ("cappedSize", or(Bson::Int64(0))),
        // 0: no maximum.
        _ => ("cappedMax", or(Bson::Int64(0))),
    }
}

/// A `collMod` that changes index `s`'s `hidden` / `expireAfterSeconds` on the follower,
/// when nothing else differs from `f`.
fn index_coll_mod(coll: &str, s: &Document, f: &Document) -> Option<Document> {
    let strip = |d: &Document| {
        let mut n = normalise_index(d);
        for k in INDEX_MODIFIABLE {
            n.remove(*k);
        }
        n
    };
    // A TTL can be changed in place, not added or removed.
    if strip(s) != strip(f)
        || s.contains_key("expireAfterSeconds") != f.contains_key("expireAfterSeconds")
    {
        return None;
    }
    let mut index = doc! {"name": index_name(s), "hidden": s.get_bool("hidden").unwrap_or(false)};
    if let Some(v) = s.get("expireAfterSeconds") {
        index.insert("expireAfterSeconds", v.clone());
    }
    Some(doc! {"collMod": coll, "index": index})
}

/// The options that differ, in source order then the follower's own.
fn option_diffs(source: &Document, follower: &Document) -> Vec<MetaDiff> {
    let (s, f) = (normalise_options(source), normalise_options(follower));
    let mut out = Vec::new();
    for (k, v) in &s {
        if f.get(k) != Some(v) {
            out.push(MetaDiff::DifferentOption {
                name: k.clone(),
                source: source.get(k).cloned(),
                follower: follower.get(k).cloned(),
            });
        }
    }
    for k in f.keys().filter(|k| !s.contains_key(*k)) {
        out.push(MetaDiff::DifferentOption {
            name: k.clone(),
            source: source.get(k).cloned(),
            follower: follower.get(k).cloned(),
        });
    }
    out
}

/// Options without volatile fields and defaults, in canonical form.
fn normalise_options(o: &Document) -> Document {
    let mut out = Document::new();
    for (k, v) in o {
        let default = match (k.as_str(), v) {
            ("uuid", _) => true,
            ("validationLevel", Bson::String(s)) => s == "strict",
            ("validationAction", Bson::String(s)) => s == "error",
            ("validator", Bson::Document(d)) => d.is_empty(),
            ("changeStreamPreAndPostImages", Bson::Document(d)) => {
                !d.get_bool("enabled").unwrap_or(false)
            }
            ("capped", Bson::Boolean(b)) => !b,
            _ => false,
        };
        if !default {
            out.insert(k.clone(), normalise(v));
        }
    }
    out
}

/// An index definition in canonical form, for comparison: without `v`, `ns`,
/// `background` and `false` flags; the key pattern in its own order, numbers by value;
/// `_id_` without its collation (the collection's, compared as an option).
fn normalise_index(ix: &Document) -> Document {
    let mut out = Document::new();
    let id = index_name(ix) == "_id_";
    for (k, v) in ix {
        match (k.as_str(), v) {
            ("v" | "ns" | "background", _) => {}
            ("unique" | "sparse" | "hidden", Bson::Boolean(false)) => {}
            ("collation", _) if id => {}
            // Documents compare as maps (field order aside): the pattern's order is kept
            // as a list of pairs.
            ("key", Bson::Document(key)) => {
                let ordered: Vec<Bson> = key
                    .iter()
                    .map(|(f, d)| Bson::Array(vec![Bson::String(f.clone()), normalise(d)]))
                    .collect();
                out.insert("key", ordered);
            }
            _ => {
                out.insert(k.clone(), normalise(v));
            }
        }
    }
    sort_fields(out)
}

/// What `createIndexes` takes for an index the server listed.
fn creatable(ix: &Document) -> Document {
    let mut spec = ix.clone();
    for k in ["v", "ns", "background"] {
        spec.remove(k);
    }
    spec
}

/// The index definition shown in reports: without `name`, `v`, `ns`.
fn spec_of(ix: &Document) -> Document {
    let mut spec = creatable(ix);
    spec.remove("name");
    spec
}

/// A value in canonical form: numbers as doubles, document fields sorted (recursively).
/// `Document`'s equality ignores field order already; sorting also makes the order of what
/// is shown stable.
fn normalise(v: &Bson) -> Bson {
    match v {
        Bson::Int32(i) => Bson::Double(*i as f64),
        Bson::Int64(i) => Bson::Double(*i as f64),
        Bson::Document(d) => Bson::Document(sort_fields(
            d.iter().map(|(k, v)| (k.clone(), normalise(v))).collect(),
        )),
        Bson::Array(a) => Bson::Array(a.iter().map(normalise).collect()),
        other => other.clone(),
    }
}

fn sort_fields(d: Document) -> Document {
    let mut fields: Vec<(String, Bson)> = d.into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields.into_iter().collect()
}

/// A value for a one-line report, bounded.
fn short(v: &Bson) -> String {
    const MAX: usize = 300;
    let s = v.to_string();
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_binary_index_over_every_document_replaces_the_key_index() {
        assert!(serves_binary_lookups(
            &doc! {"key": {"k": 1}, "name": "k_1"}
        ));
        assert!(serves_binary_lookups(
            &doc! {"key": {"k": 1}, "name": "k_1", "collation": {"locale": "simple"}}
        ));
        assert!(serves_binary_lookups(
            &doc! {"key": {"k": 1}, "name": "k_1", "unique": true, "sparse": true}
        ));
        assert!(!serves_binary_lookups(
            &doc! {"key": {"k": 1}, "name": "k_1", "collation": {"locale": "en", "strength": 2}}
        ));
        assert!(!serves_binary_lookups(
            &doc! {"key": {"k": 1}, "name": "k_1", "partialFilterExpression": {"a": {"$gt": 1}}}
        ));
    }

    fn meta(options: Document, indexes: Vec<Document>) -> CollMeta {
        CollMeta {
            exists: true,
            options,
            indexes,
        }
    }
    fn id() -> Document {
        doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"}
    }

    #[test]
    fn equal_definitions_in_other_spellings_do_not_differ() {
        let s = meta(
            doc! {"validator": {"a": {"$type": "int"}, "b": {"$exists": true}}, "collation": {"locale": "fr", "strength": 2}},
            vec![
                id(),
                doc! {"v": 2, "key": {"a": 1, "b": -1}, "name": "ab", "unique": true, "expireAfterSeconds": 60},
            ],
        );
        let f = meta(
            doc! {"collation": {"strength": 2_i64, "locale": "fr"}, "validator": {"b": {"$exists": true}, "a": {"$type": "int"}}, "validationLevel": "strict", "uuid": "x"},
            vec![
                doc! {"v": 2, "key": {"_id": 1}, "name": "_id_", "collation": {"locale": "fr"}},
                doc! {"v": 1, "name": "ab", "key": {"a": 1.0, "b": -1_i64}, "expireAfterSeconds": 60_i64, "unique": true, "background": true, "sparse": false},
                doc! {"v": 2, "key": {"dataId": 1}, "name": "mongo_replicator_dataId"},
            ],
        );
        assert_eq!(diff(&s, &f), vec![]);
    }

    #[test]
    fn key_order_options_and_extra_indexes_differ() {
        let s = meta(
            doc! {"validator": {"a": {"$exists": true}}},
            vec![
                id(),
                doc! {"key": {"a": 1, "b": 1}, "name": "ab"},
                doc! {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 5},
            ],
        );
        let f = meta(
            doc! {"capped": true, "size": 4096},
            vec![
                id(),
                doc! {"key": {"b": 1, "a": 1}, "name": "ab"},
                doc! {"key": {"x": 1}, "name": "x"},
            ],
        );
        let d = diff(&s, &f);
        let lines: Vec<String> = d.iter().map(|d| d.to_string()).collect();
        assert_eq!(d.len(), 6, "{lines:#?}");
        assert!(
            matches!(&d[0], MetaDiff::DifferentOption { name, follower: None, .. } if name == "validator")
        );
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        assert!(
            has("option `capped` differs: source (not set)"),
            "{lines:#?}"
        );
        assert!(has("index `ab` differs"), "{lines:#?}");
        assert!(has("index `t` missing on the follower: {"), "{lines:#?}");
        assert!(has("index `x` only on the follower"), "{lines:#?}");
        assert_eq!(d.iter().filter(|d| d.kind() == "index").count(), 3);
    }

    #[test]
    fn a_missing_collection_names_its_indexes_and_a_missing_source_asks_nothing() {
        let s = meta(doc! {}, vec![id(), doc! {"key": {"a": 1}, "name": "a_1"}]);
        let d = diff(&s, &CollMeta::default());
        assert_eq!(d.len(), 2);
        assert_eq!(d[0], MetaDiff::MissingCollection);
        assert_eq!(d[1].name(), "a_1");
        assert!(diff(&CollMeta::default(), &s).is_empty());
    }

    #[test]
    fn only_hidden_or_ttl_changes_go_through_coll_mod() {
        let s = doc! {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 5, "hidden": true};
        let f = doc! {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 60_i64};
        assert_eq!(
            index_coll_mod("c", &s, &f),
            Some(
                doc! {"collMod": "c", "index": {"name": "t", "hidden": true, "expireAfterSeconds": 5}}
            )
        );
        let other = doc! {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 5, "unique": true};
        assert_eq!(index_coll_mod("c", &other, &f), None);
        let no_ttl = doc! {"key": {"t": 1}, "name": "t"};
        assert_eq!(index_coll_mod("c", &no_ttl, &f), None);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let s = short(&Bson::String("é".repeat(400)));
        assert!(s.ends_with('…') && s.len() < 310, "{s}");
    }
}
