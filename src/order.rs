//! MongoDB's sort order of BSON values, where the replicator needs to follow it: the
//! check merges two key-ordered streams, and a resumed initial copy continues after the last
//! `_id` it copied.

use std::cmp::Ordering;

use mongodb::bson::{doc, Bson, Document};

/// The rank of each type name in MongoDB's sort order (numbers share a rank, as do strings
/// and symbols), as `$type` names them. Every BSON type is here: a type missing from this
/// table would be left out of every type-crossing range, so a resumed copy would skip its
/// documents. The order is the server's canonical type order (`canonicalizeBSONType`):
/// minKey, undefined, null, numbers, strings, objects, arrays, binary, ObjectId, booleans,
/// dates, timestamps, regular expressions, DBPointer, JavaScript code, code with scope,
/// maxKey.
const TYPE_ORDER: &[(u8, &str)] = &[
    (1, "minKey"),
    (2, "undefined"),
    (3, "null"),
    (NUMBERS, "double"),
    (NUMBERS, "int"),
    (NUMBERS, "long"),
    (NUMBERS, "decimal"),
    (5, "string"),
    (5, "symbol"),
    (6, "object"),
    (7, "array"),
    (8, "binData"),
    (9, "objectId"),
    (10, "bool"),
    (11, "date"),
    (12, "timestamp"),
    (13, "regex"),
    (14, "dbPointer"),
    (15, "javascript"),
    (16, "javascriptWithScope"),
    (17, "maxKey"),
];

const NUMBERS: u8 = 4;

/// The rank of a value's type in MongoDB's sort order.
pub fn type_rank(b: &Bson) -> u8 {
    match b {
        Bson::MinKey => 1,
        Bson::Undefined => 2,
        Bson::Null => 3,
        Bson::Double(_) | Bson::Int32(_) | Bson::Int64(_) | Bson::Decimal128(_) => NUMBERS,
        Bson::String(_) | Bson::Symbol(_) => 5,
        Bson::Document(_) => 6,
        Bson::Array(_) => 7,
        Bson::Binary(_) => 8,
        Bson::ObjectId(_) => 9,
        Bson::Boolean(_) => 10,
        Bson::DateTime(_) => 11,
        Bson::Timestamp(_) => 12,
        Bson::RegularExpression(_) => 13,
        Bson::DbPointer(_) => 14,
        Bson::JavaScriptCode(_) => 15,
        Bson::JavaScriptCodeWithScope(_) => 16,
        Bson::MaxKey => 17,
    }
}

fn as_f64(b: &Bson) -> Option<f64> {
    match b {
        Bson::Double(v) => Some(*v),
        Bson::Int32(v) => Some(*v as f64),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// Compares two keys as MongoDB sorts them (for the types keys are made of; other types
/// compare by their encoding, consistently on both sides).
pub fn cmp_bson(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::String(x), Bson::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        (Bson::JavaScriptCode(x), Bson::JavaScriptCode(y)) => x.as_bytes().cmp(y.as_bytes()),
        _ if ra == NUMBERS => as_f64(a)
            .zip(as_f64(b))
            .and_then(|(x, y)| x.partial_cmp(&y))
            .unwrap_or(Ordering::Equal),
        (Bson::Binary(x), Bson::Binary(y)) => (x.bytes.len(), u8::from(x.subtype), &x.bytes)
            .cmp(&(y.bytes.len(), u8::from(y.subtype), &y.bytes)),
        _ => {
            let ea = mongodb::bson::to_vec(&doc! {"": a.clone()}).unwrap_or_default();
            let eb = mongodb::bson::to_vec(&doc! {"": b.clone()}).unwrap_or_default();
            ea.cmp(&eb)
        }
    }
}

/// `$type` names of the types that sort strictly after (`later`) or before a value's type.
fn other_types(v: &Bson, later: bool) -> Vec<Bson> {
    let rank = type_rank(v);
    TYPE_ORDER
        .iter()
        .filter(|(r, _)| if later { *r > rank } else { *r < rank })
        .map(|(_, n)| Bson::String((*n).to_string()))
        .collect()
}

/// Documents whose `field` sorts after `lo` (exclusive) and up to `hi` (inclusive), in
/// MongoDB's sort order across types. Query comparisons only match values of the same type
/// (`{$gt: 5}` matches no string), so values of types that sort between the bounds' types
/// are added by `$type`. `None` leaves that side open.
///
/// A range whose bounds share a type is a plain `$gt`/`$lte` range, which an index on the
/// field serves; only open and type-crossing ranges need the `$type` terms.
pub fn range_filter(field: &str, lo: Option<&Bson>, hi: Option<&Bson>) -> Document {
    if let (Some(lo), Some(hi)) = (lo, hi) {
        if type_rank(lo) == type_rank(hi) {
            return doc! {field: {"$gt": lo.clone(), "$lte": hi.clone()}};
        }
    }
    let mut parts = Vec::new();
    if let Some(lo) = lo {
        parts.push(Bson::Document(doc! {"$or": [
            {field: {"$gt": lo.clone()}},
            {field: {"$type": other_types(lo, true)}},
        ]}));
    }
    if let Some(hi) = hi {
        parts.push(Bson::Document(doc! {"$or": [
            {field: {"$lte": hi.clone()}},
            {field: {"$type": other_types(hi, false)}},
        ]}));
    }
    match parts.len() {
        0 => doc! {},
        1 => match parts.pop() {
            Some(Bson::Document(d)) => d,
            _ => doc! {},
        },
        _ => doc! {"$and": parts},
    }
}

/// Documents whose `field` equals one of `values`, by value only. `$in` takes its values
/// literally except regular expressions (which it matches as patterns) and arrays (which
/// also match as elements); those are matched with `$eq` each instead.
pub fn in_filter(field: &str, values: &[Bson]) -> Document {
    let (plain, special): (Vec<&Bson>, Vec<&Bson>) = values
        .iter()
        .partition(|v| !matches!(v, Bson::RegularExpression(_) | Bson::Array(_)));
    let plain: Vec<Bson> = plain.into_iter().cloned().collect();
    if special.is_empty() {
        return doc! {field: {"$in": plain}};
    }
    let mut or: Vec<Bson> = special
        .into_iter()
        .map(|v| Bson::Document(doc! {field: {"$eq": v.clone()}}))
        .collect();
    if !plain.is_empty() {
        or.push(Bson::Document(doc! {field: {"$in": plain}}));
    }
    doc! {"$or": or}
}

/// Documents whose `_id` sorts after `after` (to resume a copy in `_id` order).
pub fn after_filter(after: &Bson) -> Document {
    range_filter("_id", Some(after), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_filters_take_patterns_and_arrays_literally() {
        let re = Bson::RegularExpression(mongodb::bson::Regex {
            pattern: "a".into(),
            options: String::new(),
        });
        assert_eq!(in_filter("k", &[Bson::Int32(1)]), doc! {"k": {"$in": [1]}});
        assert_eq!(
            in_filter("k", &[Bson::Int32(1), re.clone()]),
            doc! {"$or": [{"k": {"$eq": re}}, {"k": {"$in": [1]}}]}
        );
    }

    #[test]
    fn keys_compare_as_mongodb_sorts_them() {
        assert_eq!(cmp_bson(&Bson::Int32(2), &Bson::Int64(10)), Ordering::Less);
        assert_eq!(
            cmp_bson(&Bson::Int32(2), &Bson::Double(2.0)),
            Ordering::Equal
        );
        assert_eq!(
            cmp_bson(&Bson::Int64(5), &Bson::String("a".into())),
            Ordering::Less
        );
        assert_eq!(
            cmp_bson(&Bson::String("b".into()), &Bson::String("ab".into())),
            Ordering::Greater
        );
    }

    #[test]
    fn after_filter_includes_later_types() {
        let f = after_filter(&Bson::Int32(5));
        let or = f.get_array("$or").unwrap();
        assert_eq!(or[0].as_document().unwrap(), &doc! {"_id": {"$gt": 5}});
        let types = or[1]
            .as_document()
            .unwrap()
            .get_document("_id")
            .unwrap()
            .get_array("$type")
            .unwrap();
        assert!(types.contains(&Bson::String("objectId".into())));
        assert!(types.contains(&Bson::String("string".into())));
        assert!(!types.contains(&Bson::String("int".into())));
    }

    #[test]
    fn a_range_across_types_includes_the_types_between() {
        let f = range_filter("k", Some(&Bson::Int32(5)), Some(&Bson::String("b".into())));
        let and = f.get_array("$and").unwrap();
        assert_eq!(and.len(), 2);
        let upto = and[1].as_document().unwrap().get_array("$or").unwrap();
        let earlier = upto[1]
            .as_document()
            .unwrap()
            .get_document("k")
            .unwrap()
            .get_array("$type")
            .unwrap();
        assert!(earlier.contains(&Bson::String("int".into())));
        assert!(!earlier.contains(&Bson::String("string".into())));
    }

    #[test]
    fn a_range_within_one_type_is_a_plain_range() {
        let f = range_filter("k", Some(&Bson::Int32(5)), Some(&Bson::Int64(9)));
        assert_eq!(f, doc! {"k": {"$gt": 5, "$lte": 9_i64}});
    }

    #[test]
    fn type_names_and_ranks_agree() {
        for (v, name) in [
            (Bson::Null, "null"),
            (Bson::Int64(1), "long"),
            (Bson::String("s".into()), "string"),
            (
                Bson::ObjectId(mongodb::bson::oid::ObjectId::new()),
                "objectId",
            ),
            (Bson::Boolean(true), "bool"),
            (Bson::JavaScriptCode("f".into()), "javascript"),
            (Bson::MaxKey, "maxKey"),
            (Bson::Undefined, "undefined"),
        ] {
            let rank = TYPE_ORDER.iter().find(|(_, n)| *n == name).unwrap().0;
            assert_eq!(type_rank(&v), rank, "{name}");
        }
    }

    #[test]
    fn every_rank_has_a_type_name() {
        // A rank without a `$type` name would fall out of every type-crossing range.
        for rank in 1..=17u8 {
            assert!(
                TYPE_ORDER.iter().any(|(r, _)| *r == rank),
                "rank {rank} has no $type name"
            );
        }
        let after_oid = other_types(&Bson::ObjectId(mongodb::bson::oid::ObjectId::new()), true);
        for name in ["javascript", "javascriptWithScope", "dbPointer", "maxKey"] {
            assert!(after_oid.contains(&Bson::String(name.into())), "{name}");
        }
    }
}
