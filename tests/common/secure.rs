//! Authentication and TLS for test servers: a certificate authority made at test time
//! (openssl), server and client certificates, and users with given roles.

use std::path::{Path, PathBuf};
use std::process::Command;

use mongodb::bson::{doc, Bson};
use mongodb::Client;

/// The password of the `root` user the harness creates on a server with auth.
pub const ROOT_PASSWORD: &str = "r00t-Harness-pw";

/// A certificate authority with one server certificate (for 127.0.0.1 and localhost) and
/// one client certificate, in a directory of its own.
pub struct TestCa {
    pub dir: tempfile::TempDir,
}

impl TestCa {
    /// Generates the CA and certificates (EC P-256 keys, version 3 certificates).
    pub fn generate() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("mr-ca-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl is installed (Debian package `openssl`)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = |name: &str| {
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ])
        };
        key("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "30",
            "-subj",
            "/CN=mongo-replicator test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.pem",
        ]);
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "mongo-replicator",
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            key(&format!("{name}.key"));
            openssl(&[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ]);
            std::fs::write(d.join(format!("{name}.ext")), ext).expect("ext");
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-sha256",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
            // Certificate and key in one file, as drivers take a client certificate.
            let cert = std::fs::read_to_string(d.join(format!("{name}.pem"))).expect("cert");
            let k = std::fs::read_to_string(d.join(format!("{name}.key"))).expect("key");
            std::fs::write(d.join(format!("{name}-combined.pem")), cert + &k).expect("pem");
        }
        TestCa { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// TLS for a server signed by this CA; with `require_client_cert`, clients must present
    /// a certificate from it too.
    pub fn server_tls(&self, require_client_cert: bool) -> ServerTls {
        ServerTls {
            ca: self.path("ca.pem"),
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client: self.path("client-combined.pem"),
            require_client_cert,
        }
    }
}

/// How a test server serves TLS, and what a client needs to reach it.
#[derive(Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The client certificate and key (one PEM) signed by the same CA.
    pub client: PathBuf,
    pub require_client_cert: bool,
}

impl ServerTls {
    pub fn add_args(&self, cmd: &mut Command) {
        cmd.arg("--tls-cert-file")
            .arg(&self.cert)
            .arg("--tls-key-file")
            .arg(&self.key);
        if self.require_client_cert {
            cmd.arg("--tls-ca-file")
                .arg(&self.ca)
                .arg("--tls-require-client-cert");
        }
    }

    /// The URI options a client needs (`&tls=true&tlsCAFile=...`, and the client
    /// certificate when the server requires one).
    pub fn client_options(&self) -> String {
        let mut s = format!("&tls=true&tlsCAFile={}", self.ca.display());
        if self.require_client_cert {
            s.push_str(&format!("&tlsCertificateKeyFile={}", self.client.display()));
        }
        s
    }
}

/// Creates the `root` user through the localhost exception (no user exists yet), or does
/// nothing when it exists (a restart).
pub async fn create_root(unauthenticated: &Client) {
    let r = unauthenticated
        .database("admin")
        .run_command(doc! {
            "createUser": "root",
            "pwd": ROOT_PASSWORD,
            "roles": [{"role": "root", "db": "admin"}],
        })
        .await;
    if let Err(e) = r {
        let text = e.to_string();
        assert!(
            text.contains("requires authentication") || text.contains("already exists"),
            "cannot create the root user: {text}"
        );
    }
}

/// Creates `user` in `admin` with the built-in `roles` given as `(role, db)` pairs.
pub async fn create_user(root: &Client, user: &str, password: &str, roles: &[(&str, &str)]) {
    let roles: Vec<Bson> = roles
        .iter()
        .map(|(role, db)| Bson::Document(doc! {"role": *role, "db": *db}))
        .collect();
    root.database("admin")
        .run_command(doc! {"createUser": user, "pwd": password, "roles": roles})
        .await
        .unwrap_or_else(|e| panic!("createUser {user}: {e}"));
}

/// Every file under `dir` whose contents contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if let Ok(bytes) = std::fs::read(&p) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                out.push(p);
            }
        }
    }
    out
}
