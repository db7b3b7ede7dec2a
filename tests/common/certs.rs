//! Certificates for the TLS tests, made per run with the `openssl` command line tool (installed
//! by `scripts/test`), so that no key material is committed.

use std::path::Path;
use std::process::Command;

/// Runs `openssl` with `args` in `dir`, panicking with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the TLS test needs the `openssl` tool (`apt-get install openssl`)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Makes `<name>-ca.pem` (a self-signed CA) and, signed by it, `<name>-server.pem` and
/// `<name>-server.key` for 127.0.0.1 and localhost, and `<name>-client.pem` and
/// `<name>-client.key` for mutual TLS.
pub fn make_certificates(dir: &Path, name: &str) {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    openssl(dir, &["genrsa", "-out", &ca_key, "2048"]);
    let subject = format!("/CN=streamwise test CA {name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-new", "-key", &ca_key, "-sha256", "-days", "2", "-subj", &subject, "-out", &ca,
        ],
    );
    // clientAuth too: the nodes of a TLS cluster present it to each other.
    let server_ext = "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
    for (role, extensions) in [
        ("server", server_ext),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let key = format!("{name}-{role}.key");
        let csr = format!("{name}-{role}.csr");
        let cert = format!("{name}-{role}.pem");
        let ext = format!("{name}-{role}.ext");
        openssl(dir, &["genrsa", "-out", &key, "2048"]);
        let subject = format!("/CN=streamwise test {role}");
        openssl(
            dir,
            &["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr],
        );
        let extensions =
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{extensions}");
        std::fs::write(dir.join(&ext), extensions).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        );
    }
}
