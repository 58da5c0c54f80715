//! Test certificates: a CA and leaf certificates under it, made with the openssl command (the
//! real tool, as an operator would use it).

use std::path::Path;
use std::process::Command;

use super::text;

/// A CA and, under it, certificates for `sides` (each in a directory of its own with
/// `ca.pem`, `cert.pem`, `key.pem`, for 127.0.0.1), made with the openssl command.
pub fn make_pki(dir: &Path, ca: &str, sides: &[&str]) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let ca_key = format!("{ca}.key");
    let ca_pem = format!("{ca}.pem");
    // A new P-256 key into `key`, unencrypted.
    let new_key = |key: &str| -> Vec<String> {
        [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
        ]
        .map(String::from)
        .to_vec()
    };
    let ca_subject = format!("/CN={ca}");
    let mut args = vec!["req".to_string(), "-x509".into()];
    args.extend(new_key(&ca_key));
    args.extend(
        [
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            &ca_subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
        .map(String::from),
    );
    openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    for side in sides {
        std::fs::create_dir_all(dir.join(side)).unwrap();
        let key = format!("{side}/key.pem");
        let csr = format!("{side}.csr");
        let subject = format!("/CN={side}");
        let mut args = vec!["req".to_string()];
        args.extend(new_key(&key));
        args.extend(["-out", &csr, "-subj", &subject].map(String::from));
        openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &format!("{side}/cert.pem"),
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        std::fs::copy(dir.join(&ca_pem), dir.join(side).join("ca.pem")).unwrap();
    }
}
