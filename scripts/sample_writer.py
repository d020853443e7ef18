"""Writes sample data to a source: inserts, then updates and deletes some of them.

Used by scripts/demo.sh: python sample_writer.py URI DATABASE COLLECTION COUNT [FIRST]
"""

import datetime
import sys

from pymongo import MongoClient
from pymongo.errors import PyMongoError


def main() -> int:
    if len(sys.argv) not in (5, 6):
        print("usage: sample_writer.py URI DATABASE COLLECTION COUNT [FIRST]", file=sys.stderr)
        return 2
    uri, db, coll = sys.argv[1:4]
    count = int(sys.argv[4])
    first = int(sys.argv[5]) if len(sys.argv) == 6 else 0
    c = MongoClient(uri, serverSelectionTimeoutMS=5000)[db][coll]
    ids = range(first, first + count)
    c.insert_many(
        [
            {
                "dataId": f"order-{i:06}",
                "customer": f"customer-{i % 97}",
                "amount": i * 1.25,
                "items": [{"sku": "A", "qty": 1 + i % 3}, {"sku": "B", "qty": 2}],
                "createdAt": datetime.datetime.now(datetime.timezone.utc),
            }
            for i in ids
        ]
    )
    updated = deleted = 0
    for i in ids[::10]:
        c.update_one({"dataId": f"order-{i:06}"}, {"$set": {"status": "shipped"}})
        updated += 1
    for i in ids[5::20]:
        c.delete_one({"dataId": f"order-{i:06}"})
        deleted += 1
    print(f"   wrote {count} documents to {db}.{coll}, updated {updated}, deleted {deleted}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PyMongoError as e:
        print(f"error: cannot write the sample data: {e}", file=sys.stderr)
        sys.exit(1)
