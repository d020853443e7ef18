//! Turning change events into follower operations: pure logic, no I/O.
//!
//! - insert, update and replace become an [`Op::Upsert`] of the whole (looked-up) document,
//!   matched on the follower by the key field;
//! - a delete event carries only `documentKey` (the source `_id`), so followers keep the
//!   source `_id` on every replicated document and a delete removes the document with that
//!   `_id` (see the README, "How deletes find their document");
//! - an update whose looked-up document is gone (deleted since) is skipped: the delete that
//!   removed it comes later in the same stream, so skipping neither resurrects nor loses data.
//!
//! [`coalesce`] keeps only the last operation per source `_id` within a batch, which is the
//! state at the end of the batch; [`Plan`] then orders deletes before upserts so that a
//! delete and re-insert of one key (even under a new `_id`) ends in source order.

use std::collections::HashMap;

use mongodb::bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};

use crate::checkpoint::token_cluster_time;

use crate::config::MissingKey;

/// What a follower must do for one source document.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace-or-insert the whole document. `key` is the key field's value; `None` means
    /// "match on `_id`" (the `use_id` policy for documents without the key).
    Upsert {
        id: Bson,
        key: Option<Bson>,
        doc: Document,
    },
    /// Remove the follower's document with this source `_id`.
    Delete { id: Bson },
}

impl Op {
    pub fn id(&self) -> &Bson {
        match self {
            Op::Upsert { id, .. } | Op::Delete { id } => id,
        }
    }
}

/// Why a document produced no operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// The document has no key field and `missing_key = "skip"`.
    MissingKey { id: Bson },
    /// The document's key cannot identify one follower document (see [`unusable_key`]) and
    /// `missing_key = "skip"`.
    UnusableKey { id: Bson, reason: &'static str },
    /// An update whose document was deleted before it could be looked up.
    Gone { id: Bson },
}

/// A document without a usable key under `missing_key = "fail"`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("document with _id {id} has {problem} (missing_key = \"fail\")")]
pub struct MissingKeyError {
    pub id: String,
    pub key_field: String,
    /// "no `dataId` field", or why its value cannot serve as a key.
    pub problem: String,
}

/// Why a key value cannot identify exactly one follower document, if it cannot.
///
/// Every filter the replicator builds matches key values with `$eq`, so an operator-shaped
/// value is data, never a query. Some values still match more than the document they came
/// from, or mean something else in `$in` and range filters, and are refused:
/// - a regular expression (`$in` treats it as a pattern);
/// - an array (equality on an array field also matches documents holding it as an element);
/// - a document with a `$`-prefixed field name at any depth (operator-shaped);
/// - `undefined` (deprecated, and not comparable by equality on every server).
pub fn unusable_key(key: &Bson) -> Option<&'static str> {
    fn has_dollar_field(d: &Document) -> bool {
        d.iter().any(|(k, v)| {
            k.starts_with('$')
                || match v {
                    Bson::Document(inner) => has_dollar_field(inner),
                    Bson::Array(items) => items
                        .iter()
                        .any(|i| matches!(i, Bson::Document(inner) if has_dollar_field(inner))),
                    _ => false,
                }
        })
    }
    match key {
        Bson::RegularExpression(_) => Some("a regular expression"),
        Bson::Array(_) => Some("an array"),
        Bson::Undefined => Some("undefined"),
        Bson::Document(d) if has_dollar_field(d) => {
            Some("a document with `$`-prefixed field names")
        }
        _ => None,
    }
}

/// A filter that matches `field` equal to `value`, by value only: `{field: {$eq: value}}`.
pub fn eq(field: &str, value: &Bson) -> Document {
    doc! {field: {"$eq": value.clone()}}
}

/// The follower document whose key field holds `key` itself. Like [`eq`], and also refuses
/// to reach the value through an array: `{k: {$eq: v}}` alone matches a document whose `k`
/// is an array holding `v` (or, for a dotted `a.b`, whose `a` is an array of documents), and
/// such a document (replicated under `missing_key = "use_id"`) is another document.
pub fn key_eq(field: &str, key: &Bson) -> Document {
    let mut d = no_arrays_above(field);
    d.insert(field, doc! {"$eq": key.clone(), "$not": {"$type": "array"}});
    d
}

/// Like [`key_eq`] for any of `keys` (which must be usable keys).
pub fn key_in(field: &str, keys: &[Bson]) -> Document {
    let mut d = no_arrays_above(field);
    d.insert(
        field,
        doc! {"$in": keys.to_vec(), "$not": {"$type": "array"}},
    );
    d
}

/// `{prefix: {$not: {$type: "array"}}}` for each proper prefix of a dotted path.
fn no_arrays_above(field: &str) -> Document {
    let mut d = Document::new();
    let parts: Vec<&str> = field.split('.').collect();
    for i in 1..parts.len() {
        d.insert(parts[..i].join("."), doc! {"$not": {"$type": "array"}});
    }
    d
}

/// The operation for a document that exists on the source (from a change event's full
/// document, or from the initial copy).
pub fn upsert_for(
    doc: Document,
    key_field: &str,
    policy: MissingKey,
) -> Result<Result<Op, Skip>, MissingKeyError> {
    let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
    let unusable = match lookup_path(&doc, key_field) {
        Some(key) if key != &Bson::Null => match unusable_key(key) {
            None => {
                let key = key.clone();
                return Ok(Ok(Op::Upsert {
                    id,
                    key: Some(key),
                    doc,
                }));
            }
            Some(reason) => Some(reason),
        },
        _ => None,
    };
    match policy {
        MissingKey::Skip => Ok(Err(match unusable {
            None => Skip::MissingKey { id },
            Some(reason) => Skip::UnusableKey { id, reason },
        })),
        MissingKey::UseId => Ok(Ok(Op::Upsert { id, key: None, doc })),
        MissingKey::Fail => Err(MissingKeyError {
            id: id.to_string(),
            key_field: key_field.to_string(),
            problem: match unusable {
                None => format!("no `{key_field}` field"),
                Some(reason) => {
                    format!("a `{key_field}` that cannot serve as a key ({reason})")
                }
            },
        }),
    }
}

/// A dotted path lookup (`a.b`), so the key may be a nested field.
fn lookup_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_document()?.get(p)?;
    }
    Some(cur)
}

/// Byte encoding of a `_id`, usable as a map key (BSON values are not `Hash`).
fn id_key(id: &Bson) -> Vec<u8> {
    mongodb::bson::to_vec(&doc! {"": id.clone()}).unwrap_or_default()
}

/// A batch reduced to the state at its end.
#[derive(Debug, PartialEq)]
pub struct Coalesced {
    pub ops: Vec<Op>,
    /// Keys that two source documents (different `_id`s) held within the batch. The key
    /// field should be unique on the source; the follower keeps the later document.
    pub duplicate_keys: Vec<Bson>,
}

/// Keeps the last operation for each source `_id`, in the order of those last occurrences;
/// of upserts that share a key under different `_id`s, only the last is kept.
pub fn coalesce(ops: Vec<Op>) -> Coalesced {
    let mut last: HashMap<Vec<u8>, usize> = HashMap::with_capacity(ops.len());
    let mut last_key: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        last.insert(id_key(op.id()), i);
    }
    for (i, op) in ops.iter().enumerate() {
        if let Op::Upsert { key: Some(k), .. } = op {
            if last.get(&id_key(op.id())) == Some(&i) {
                last_key.insert(id_key(k), i);
            }
        }
    }
    let mut duplicate_keys = Vec::new();
    let ops = ops
        .into_iter()
        .enumerate()
        .filter(|(i, op)| {
            if last.get(&id_key(op.id())) != Some(i) {
                return false;
            }
            if let Op::Upsert { key: Some(k), .. } = op {
                if last_key.get(&id_key(k)) != Some(i) {
                    duplicate_keys.push(k.clone());
                    return false;
                }
            }
            true
        })
        .map(|(_, op)| op)
        .collect();
    Coalesced {
        ops,
        duplicate_keys,
    }
}

/// The collation of every statement that finds a document by its key: binary, so a key
/// matches only itself. A follower collection with the source's case-insensitive default
/// collation would otherwise find "Key" for "key", and the upsert of one would overwrite (or
/// the careful plan delete) the other. The replicator's own key index is built with it too
/// ([`crate::follower::Follower::ensure_key_index`]), so these statements use that index.
/// Statements by `_id` are exact or compare as both sides do ([`identity`]).
pub fn binary() -> Document {
    doc! {"locale": "simple"}
}

/// The collation of a collection's `_id` index (its default collation; binary when it has
/// none), as a statement asks for it. Statements by `_id` carry it when the source's and the
/// follower's agree (as `replication.indexes` makes them): each side then holds at most one
/// document per `_id` under it, the statement finds exactly the follower's twin of the
/// source's document, and the follower's `_id` index serves it. Otherwise they are binary
/// (exact): under a follower collation looser than the source's, a statement for "a" must
/// not find "A", which the source holds apart (the follower then refuses "a", and it is
/// quarantined, not "A" lost); under a stricter one, the follower may still hold both "A"
/// and "a" from the collection's earlier life, and a delete of one must not find the other.
pub fn identity(source_options: &Document) -> Document {
    match collated(source_options) {
        Some(c) => {
            let mut c = c.clone();
            // Reported by the server (its ICU version); not part of a collation one asks for.
            c.remove("version");
            c
        }
        None => binary(),
    }
}

/// The collation of a collection's options or of an index definition (both list it as
/// `collation`), unless it is binary (absent, or `locale: "simple"`).
pub fn collated(spec: &Document) -> Option<&Document> {
    spec.get_document("collation")
        .ok()
        .filter(|c| c.get_str("locale").unwrap_or("simple") != "simple")
}

/// [`binary`] for the driver's helpers.
pub fn binary_collation() -> mongodb::options::Collation {
    mongodb::options::Collation::builder()
        .locale("simple")
        .build()
}

/// The statements that carry one coalesced batch to a follower: one `delete` command, then
/// one `update` command.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub deletes: Vec<Document>,
    pub upserts: Vec<Document>,
    /// For each delete statement, the index of the op it belongs to (for a careful plan's
    /// removal of blocking documents, the upsert it makes room for).
    pub delete_ops: Vec<usize>,
    /// For each upsert statement, the index of its op.
    pub upsert_ops: Vec<usize>,
    /// Built by the careful plan.
    pub careful: bool,
}

impl Plan {
    /// `careful` adds, for each keyed upsert, a delete of follower documents that would block
    /// it: one with the same `_id` but another key (the key changed on the source), or one
    /// with the key but another `_id` (a document that did not come from this source, or an
    /// older incarnation of the key). The fast plan is tried first; the careful one only
    /// when the follower reports such a conflict.
    pub fn build(ops: &[Op], key_field: &str, careful: bool, id_collation: &Document) -> Plan {
        let mut plan = Plan {
            careful,
            ..Plan::default()
        };
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Delete { id } => {
                    plan.deletes.push(
                        doc! {"q": eq("_id", id), "limit": 1, "collation": id_collation.clone()},
                    );
                    plan.delete_ops.push(i);
                }
                Op::Upsert { id, key, doc } => {
                    // Values are matched with `$eq`: a key is data, never a query.
                    let (q, by_key) = match key {
                        Some(k) => (key_eq(key_field, k), true),
                        None => (eq("_id", id), false),
                    };
                    if careful {
                        // This `_id` (under whatever key, or none: the upsert below writes
                        // it again). Under a collation both sides share, this also clears a
                        // follower document whose `_id` differs in bytes only ("a" for
                        // "A"), which the upsert would otherwise find and be refused for
                        // (an `_id` cannot change).
                        plan.deletes.push(doc! {
                            "q": eq("_id", id), "limit": 1,
                            "collation": id_collation.clone(),
                        });
                        plan.delete_ops.push(i);
                        if let Some(k) = key {
                            // And this key under another `_id`: each statement on an index
                            // (an `$or` of both, or a `$nor` beside the `_id`, is a scan of
                            // the collection per statement on servers that do not use the
                            // index for them).
                            let mut other_id = key_eq(key_field, k);
                            other_id.insert("_id", doc! {"$ne": id.clone()});
                            plan.deletes
                                .push(doc! {"q": other_id, "limit": 0, "collation": binary()});
                            plan.delete_ops.push(i);
                        }
                    }
                    let collation = if by_key {
                        binary()
                    } else {
                        id_collation.clone()
                    };
                    plan.upserts.push(doc! {
                        "q": q, "u": doc.clone(), "upsert": true, "multi": false,
                        "collation": collation,
                    });
                    plan.upsert_ops.push(i);
                }
            }
        }
        plan
    }
}

/// A change event as the replicator reads it: the full document kept as raw BSON.
pub type Event = ChangeStreamEvent<RawDocumentBuf>;

/// The stream filter of one collection in a database stream: its events, a rename into it,
/// and the database's drop.
pub fn collection_filter(coll: &str) -> Document {
    doc! {"$match": {"$or": [
        {"ns.coll": coll},
        {"to.coll": coll},
        {"operationType": "dropDatabase"},
    ]}}
}

/// Whether `ev` concerns collection `coll` (see [`collection_filter`]).
pub fn concerns(ev: &Event, coll: &str) -> bool {
    ev.operation_type == OperationType::DropDatabase
        || ev
            .ns
            .as_ref()
            .and_then(|n| n.coll.as_deref())
            .is_some_and(|c| c == coll)
        || ev
            .to
            .as_ref()
            .and_then(|n| n.coll.as_deref())
            .is_some_and(|c| c == coll)
}

/// The cluster time of an event (from the event, else from its token).
pub fn event_time(ev: &Event) -> Option<Timestamp> {
    ev.cluster_time.or_else(|| token_time(&ev.id))
}

/// The cluster time inside a resume token, when its shape is known.
pub fn token_time(t: &ResumeToken) -> Option<Timestamp> {
    match mongodb::bson::to_bson(t) {
        Ok(mongodb::bson::Bson::Document(d)) => token_cluster_time(&d),
        _ => None,
    }
}

/// What an event holds in memory, roughly: its document, plus its document key twice (the
/// key itself, and the resume token, which on MongoDB embeds it).
pub fn event_bytes(ev: &Event) -> usize {
    let doc = ev.full_document.as_ref().map_or(0, |d| d.as_bytes().len());
    let key = ev
        .document_key
        .as_ref()
        .and_then(|k| mongodb::bson::to_vec(k).ok())
        .map_or(0, |v| v.len());
    doc + 2 * key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(id: i32, key: &str, v: i32) -> Op {
        Op::Upsert {
            id: Bson::Int32(id),
            key: Some(Bson::String(key.into())),
            doc: doc! {"_id": id, "dataId": key, "v": v},
        }
    }

    #[test]
    fn coalesce_keeps_the_last_op_per_id() {
        let ops = vec![
            up(1, "a", 1),
            up(2, "b", 1),
            up(1, "a", 2),
            Op::Delete { id: Bson::Int32(2) },
        ];
        assert_eq!(
            coalesce(ops).ops,
            vec![up(1, "a", 2), Op::Delete { id: Bson::Int32(2) }]
        );
    }

    #[test]
    fn delete_then_reinsert_of_a_key_under_a_new_id_deletes_first() {
        // dataId "a" lived under _id 1, was deleted, and re-inserted under _id 2.
        let ops = coalesce(vec![
            up(1, "a", 1),
            Op::Delete { id: Bson::Int32(1) },
            up(2, "a", 2),
        ]);
        let plan = Plan::build(&ops.ops, "dataId", false, &binary());
        assert_eq!(
            plan.deletes,
            vec![doc! {"q": {"_id": {"$eq": 1}}, "limit": 1, "collation": {"locale": "simple"}}]
        );
        assert_eq!(plan.upserts.len(), 1);
        assert_eq!(
            plan.upserts[0]
                .get_document("u")
                .unwrap()
                .get_i32("_id")
                .unwrap(),
            2
        );
    }

    #[test]
    fn two_source_documents_with_one_key_keep_the_later() {
        let c = coalesce(vec![up(1, "a", 1), up(2, "a", 2)]);
        assert_eq!(c.ops, vec![up(2, "a", 2)]);
        assert_eq!(c.duplicate_keys, vec![Bson::String("a".into())]);
    }

    #[test]
    fn missing_key_follows_the_policy() {
        let d = doc! {"_id": 7, "x": 1};
        assert_eq!(
            upsert_for(d.clone(), "dataId", MissingKey::Skip).unwrap(),
            Err(Skip::MissingKey { id: Bson::Int32(7) })
        );
        let op = upsert_for(d.clone(), "dataId", MissingKey::UseId)
            .unwrap()
            .unwrap();
        let plan = Plan::build(&[op], "dataId", true, &binary());
        assert_eq!(
            plan.upserts[0].get_document("q").unwrap(),
            &doc! {"_id": {"$eq": 7}}
        );
        // The careful plan clears this `_id` first (a follower variant of it under a shared
        // collation would refuse the upsert), as for a keyed document.
        assert_eq!(
            plan.deletes,
            vec![doc! {"q": {"_id": {"$eq": 7}}, "limit": 1, "collation": {"locale": "simple"}}]
        );
        let e = upsert_for(d, "dataId", MissingKey::Fail).unwrap_err();
        assert!(e.to_string().contains("no `dataId` field"));
    }

    #[test]
    fn null_key_counts_as_missing() {
        let d = doc! {"_id": 7, "dataId": Bson::Null};
        assert!(upsert_for(d, "dataId", MissingKey::Skip).unwrap().is_err());
    }

    #[test]
    fn nested_key_fields_are_found() {
        let d = doc! {"_id": 1, "meta": {"id": "k"}};
        let op = upsert_for(d, "meta.id", MissingKey::Fail).unwrap().unwrap();
        assert!(matches!(op, Op::Upsert { key: Some(Bson::String(ref k)), .. } if k == "k"));
    }

    #[test]
    fn operator_shaped_keys_are_unusable_and_follow_the_policy() {
        let bad = [
            Bson::Document(doc! {"$exists": true}),
            Bson::Document(doc! {"a": {"$gt": 1}}),
            Bson::RegularExpression(mongodb::bson::Regex {
                pattern: ".*".into(),
                options: String::new(),
            }),
            Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]),
            Bson::Undefined,
        ];
        for key in bad {
            let d = doc! {"_id": 3, "dataId": key.clone()};
            assert!(
                matches!(
                    upsert_for(d.clone(), "dataId", MissingKey::Skip).unwrap(),
                    Err(Skip::UnusableKey { .. })
                ),
                "{key} must be unusable"
            );
            let e = upsert_for(d.clone(), "dataId", MissingKey::Fail).unwrap_err();
            assert!(e.to_string().contains("cannot serve as a key"), "{e}");
            // use_id matches on _id, by value.
            let op = upsert_for(d, "dataId", MissingKey::UseId).unwrap().unwrap();
            let plan = Plan::build(&[op], "dataId", true, &binary());
            assert_eq!(
                plan.upserts[0].get_document("q").unwrap(),
                &doc! {"_id": {"$eq": 3}}
            );
        }
        // Plain values, including documents without `$` fields, are keys.
        for key in [
            Bson::Document(doc! {"a": 1, "b": {"c": "x"}}),
            Bson::Int64(5),
            Bson::String("$notAnOperatorAsAValue".into()),
        ] {
            let d = doc! {"_id": 3, "dataId": key.clone()};
            let op = upsert_for(d, "dataId", MissingKey::Fail).unwrap().unwrap();
            let plan = Plan::build(&[op], "dataId", false, &binary());
            assert_eq!(
                plan.upserts[0].get_document("q").unwrap(),
                &doc! {"dataId": {"$eq": key, "$not": {"$type": "array"}}}
            );
        }
    }

    #[test]
    fn key_filters_never_reach_through_arrays() {
        assert_eq!(
            key_eq("a.b.c", &Bson::Int32(1)),
            doc! {
                "a": {"$not": {"$type": "array"}},
                "a.b": {"$not": {"$type": "array"}},
                "a.b.c": {"$eq": 1, "$not": {"$type": "array"}},
            }
        );
        assert_eq!(
            key_in("k", &[Bson::Int32(1)]),
            doc! {"k": {"$in": [1], "$not": {"$type": "array"}}}
        );
    }

    #[test]
    fn careful_plan_matches_by_value() {
        let op = Op::Upsert {
            id: Bson::Document(doc! {"x": 1}),
            key: Some(Bson::Document(doc! {"k": 1})),
            doc: doc! {"_id": {"x": 1}, "dataId": {"k": 1}},
        };
        let plan = Plan::build(&[op], "dataId", true, &binary());
        for d in &plan.deletes {
            let q = d.get_document("q").unwrap().to_string();
            assert!(q.contains("\"$eq\""), "{q}");
        }
    }

    /// Perf bench: one `$or` (or a `$nor` beside the `_id`) per statement made the test
    /// server scan the collection for each, so a careful batch of a few hundred ops on 50k
    /// documents outlived write_timeout on every retry. Each statement now has one indexed
    /// equality at its top: the `_id`, or the key.
    #[test]
    fn careful_plan_clears_blocking_documents_with_indexed_statements() {
        let plan = Plan::build(&[up(1, "a", 1)], "dataId", true, &binary());
        assert_eq!(plan.deletes.len(), 2);
        assert_eq!(plan.delete_ops, vec![0, 0]);
        assert_eq!(
            plan.deletes[0],
            doc! {"q": {"_id": {"$eq": 1}}, "limit": 1, "collation": {"locale": "simple"}}
        );
        let other = plan.deletes[1].get_document("q").unwrap();
        assert_eq!(
            other
                .get_document("dataId")
                .unwrap()
                .get_str("$eq")
                .unwrap(),
            "a"
        );
        assert_eq!(other.get_document("_id").unwrap(), &doc! {"$ne": 1});
        assert_eq!(plan.deletes[1].get_i32("limit").unwrap(), 0);
        for d in &plan.deletes {
            let q = d.get_document("q").unwrap();
            assert!(!q.contains_key("$or") && !q.contains_key("$nor"), "{q}");
        }
    }
    /// Under a follower collection's case-insensitive default collation, "key" would find
    /// "Key": every statement that finds by key compares binary; those by `_id` compare as
    /// the source does.
    #[test]
    fn statements_by_key_compare_binary_and_those_by_id_as_the_source() {
        let ci = doc! {"locale": "en", "strength": 2};
        let ops = vec![
            up(1, "a", 1),
            Op::Delete { id: Bson::Int32(2) },
            Op::Upsert {
                id: Bson::Int32(3),
                key: None,
                doc: doc! {"_id": 3},
            },
        ];
        let plan = Plan::build(&ops, "dataId", true, &ci);
        let by_key = |d: &Document| d.get_document("q").unwrap().contains_key("dataId");
        for d in plan.deletes.iter().chain(&plan.upserts) {
            let want = if by_key(d) { binary() } else { ci.clone() };
            assert_eq!(d.get_document("collation").ok(), Some(&want), "{d}");
        }
        assert_eq!(plan.upserts.iter().filter(|d| by_key(d)).count(), 1);
        assert_eq!(plan.deletes.iter().filter(|d| by_key(d)).count(), 1);
    }

    #[test]
    fn identity_is_the_source_collation_without_its_version_or_binary() {
        assert_eq!(identity(&doc! {}), binary());
        assert_eq!(
            identity(&doc! {"collation": {"locale": "simple"}}),
            binary()
        );
        assert_eq!(
            identity(&doc! {"collation": {"locale": "en", "strength": 2, "version": "57.1"}}),
            doc! {"locale": "en", "strength": 2}
        );
    }
}
