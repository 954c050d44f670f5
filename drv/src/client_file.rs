//! The command line's client file, `/etc/drv/drv.toml` (another with `DRV_CLIENT_FILE`): where
//! `drv config` and `drv config-server` find the config servers and the certificate to present
//! when neither a flag nor an environment variable says.
//!
//! ```toml
//! config_server = "10.0.0.2:7400,10.0.0.3:7400,10.0.0.4:7400"
//! certs = "/etc/drv/certs"
//! cert_name = "admin"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

/// The default place of the client file.
pub const DEFAULT: &str = "/etc/drv/drv.toml";

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub config_server: Option<String>,
    pub certs: Option<PathBuf>,
    pub cert_name: Option<String>,
}

/// The client file, if there is one; a file that does not parse is an error naming it.
pub fn load() -> Result<ClientFile> {
    let path = std::env::var_os("DRV_CLIENT_FILE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT));
    read(&path)
}

fn read(path: &Path) -> Result<ClientFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ClientFile::default()),
        Err(e) => return Err(e).with_context(|| format!("read the client file {}", path.display())),
    };
    toml::from_str(&text).with_context(|| format!("the client file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_file_names_servers_and_certificate_or_is_refused_naming_what_is_wrong() {
        let d = std::env::temp_dir().join(format!("drv-client-file-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("drv.toml");
        assert_eq!(read(&p).unwrap(), ClientFile::default(), "no file: nothing from it");
        std::fs::write(&p, "config_server = \"a:1,b:2\"\ncerts = \"/c\"\n").unwrap();
        let f = read(&p).unwrap();
        assert_eq!(f.config_server.as_deref(), Some("a:1,b:2"));
        assert_eq!(f.certs.as_deref(), Some(Path::new("/c")));
        std::fs::write(&p, "config_servr = \"a:1\"\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("drv.toml") && e.contains("config_servr"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
