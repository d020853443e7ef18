//! Writes sample data to a source: inserts, then updates and deletes some of them.
//! Used by `scripts/demo.sh`:
//! `cargo run --example sample_writer -- URI DATABASE COLLECTION COUNT [FIRST]`

use mongodb::bson::{doc, DateTime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (uri, db, coll, count, first) = match args.as_slice() {
        [_, uri, db, coll, count] => (uri, db, coll, count, "0"),
        [_, uri, db, coll, count, first] => (uri, db, coll, count, first.as_str()),
        _ => anyhow::bail!("usage: sample_writer URI DATABASE COLLECTION COUNT [FIRST]"),
    };
    let count: u32 = count.parse()?;
    let first: u32 = first.parse()?;
    let client = mongodb::Client::with_uri_str(uri).await?;
    let c = client
        .database(db)
        .collection::<mongodb::bson::Document>(coll);
    let range = first..first + count;
    let docs: Vec<_> = range
        .clone()
        .map(|i| {
            doc! {
                "dataId": format!("order-{i:06}"),
                "customer": format!("customer-{}", i % 97),
                "amount": (i as f64) * 1.25,
                "items": [{"sku": "A", "qty": 1 + i % 3}, {"sku": "B", "qty": 2}],
                "createdAt": DateTime::now(),
            }
        })
        .collect();
    c.insert_many(docs).await?;
    let mut updated = 0;
    let mut deleted = 0;
    for i in range.clone().step_by(10) {
        c.update_one(
            doc! {"dataId": format!("order-{i:06}")},
            doc! {"$set": {"status": "shipped"}},
        )
        .await?;
        updated += 1;
    }
    for i in range.skip(5).step_by(20) {
        c.delete_one(doc! {"dataId": format!("order-{i:06}")})
            .await?;
        deleted += 1;
    }
    println!("wrote {count} documents to {db}.{coll}, updated {updated}, deleted {deleted}");
    Ok(())
}
