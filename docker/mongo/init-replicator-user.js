// Runs once, on an empty database, as root (the image's /docker-entrypoint-initdb.d).
// Creates the replicator's user with built-in roles only (see docs/operations.md):
//   source (REPLICATOR_ROLE=source): read on app, readWrite on the lease database;
//   follower:                        readWrite and dbAdmin on app (dbAdmin: collMod, so a
//                                    validator changed on the source follows), readWrite on
//                                    the state database.
const fs = require("fs");
const pwd = fs.readFileSync("/run/secrets/replicator_password", "utf8").trim();
const roles =
  process.env.REPLICATOR_ROLE === "source"
    ? [{ role: "read", db: "app" }, { role: "readWrite", db: "mongo_replicator" }]
    : [
        { role: "readWrite", db: "app" },
        { role: "dbAdmin", db: "app" },
        { role: "readWrite", db: "mongo_replicator" },
      ];
db.getSiblingDB("admin").createUser({ user: "replicator", pwd: pwd, roles: roles });
