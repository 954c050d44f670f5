//! Mail from the config servers (alerts, digests) through an SMTP server of the configuration
//! ([`drv_config::MailServer`]): plain, STARTTLS or TLS, optional login, at most `per_hour`
//! mails an hour from one server (all rules together: a storm of alerts does not become a storm
//! of mail; what is held back is said in the activity log).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use drv_config::{MailSecurity, MailServer};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// How long one delivery may take.
const SEND_DEADLINE: Duration = Duration::from_secs(30);

/// A mail to send.
#[derive(Clone, Debug)]
pub struct Mail {
    pub to: Vec<String>,
    pub subject: String,
    pub text: String,
    /// An HTML part besides the text, if any.
    pub html: Option<String>,
}

/// Why a mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("mail server {server}: {what}")]
    Config { server: String, what: String },
    #[error("mail server {server}: {what}")]
    Send { server: String, what: String },
    #[error("mail server {server}: {per_hour} mails sent in the last hour already; this one is held back")]
    Limited { server: String, per_hour: u32 },
}

/// Mails sent per server name in the last hour (times, ms).
#[derive(Default)]
pub struct Budget(Mutex<std::collections::HashMap<String, VecDeque<u64>>>);

impl Budget {
    /// Takes one mail of `per_hour` from `server`'s budget, if any is left.
    fn take(&self, server: &str, per_hour: u32, now_ms: u64) -> bool {
        let mut m = self.0.lock().expect("budget");
        let q = m.entry(server.to_owned()).or_default();
        while q.front().is_some_and(|t| now_ms.saturating_sub(*t) >= 3_600_000) {
            q.pop_front();
        }
        if q.len() >= per_hour as usize {
            return false;
        }
        q.push_back(now_ms);
        true
    }
}

fn message(server: &MailServer, mail: &Mail, name: &str) -> Result<Message, MailError> {
    let bad = |what: String| MailError::Config { server: name.to_owned(), what };
    let from: Mailbox = server.from.parse().map_err(|e| bad(format!("from {:?}: {e}", server.from)))?;
    let mut b = Message::builder().from(from).subject(&mail.subject);
    for to in &mail.to {
        b = b.to(to.parse().map_err(|e| bad(format!("recipient {to:?}: {e}")))?);
    }
    let built = match &mail.html {
        Some(h) => b.multipart(MultiPart::alternative_plain_html(mail.text.clone(), h.clone())),
        None => b.body(mail.text.clone()),
    };
    built.map_err(|e| bad(e.to_string()))
}

fn transport(server: &MailServer, name: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, MailError> {
    let bad = |what: String| MailError::Config { server: name.to_owned(), what };
    let (host, port) = server.address.rsplit_once(':').ok_or_else(|| bad("address is not HOST:PORT".into()))?;
    let port: u16 = port.parse().map_err(|e| bad(format!("port {port:?}: {e}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).port(port).timeout(Some(SEND_DEADLINE));
    let tls = || -> Result<TlsParameters, MailError> {
        let mut p = TlsParameters::builder(host.to_owned());
        if let Some(f) = &server.ca_file {
            let pem = std::fs::read(f).map_err(|e| bad(format!("ca_file {f}: {e}")))?;
            p = p.add_root_certificate(Certificate::from_pem(&pem).map_err(|e| bad(format!("ca_file {f}: {e}")))?);
        }
        p.build_rustls().map_err(|e| bad(e.to_string()))
    };
    b = match server.security {
        MailSecurity::None => b,
        MailSecurity::Starttls => b.tls(Tls::Required(tls()?)),
        MailSecurity::Tls => b.tls(Tls::Wrapper(tls()?)),
    };
    if let (Some(user), Some(file)) = (&server.user, &server.password_file) {
        let pw = std::fs::read_to_string(file).map_err(|e| bad(format!("password_file {file}: {e}")))?;
        b = b.credentials(Credentials::new(user.clone(), pw.trim_end_matches(['\r', '\n']).to_owned()));
    }
    Ok(b.build())
}

/// Sends `mail` through the mail server `name`, within its hourly budget.
pub async fn send(server: &MailServer, name: &str, budget: &Budget, mail: &Mail) -> Result<(), MailError> {
    let msg = message(server, mail, name)?;
    if !budget.take(name, server.per_hour, drv_config::now_unix_ms()) {
        return Err(MailError::Limited { server: name.to_owned(), per_hour: server.per_hour });
    }
    let t = transport(server, name)?;
    let sent = tokio::time::timeout(SEND_DEADLINE, t.send(msg)).await;
    match sent {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(MailError::Send { server: name.to_owned(), what: e.to_string() }),
        Err(_) => Err(MailError::Send { server: name.to_owned(), what: format!("no answer within {SEND_DEADLINE:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hourly_budget_holds() {
        let b = Budget::default();
        let t = 1_000_000_000;
        assert!(b.take("s", 2, t) && b.take("s", 2, t + 1));
        assert!(!b.take("s", 2, t + 2), "the third in an hour is held back");
        assert!(b.take("other", 2, t + 2), "per server");
        assert!(b.take("s", 2, t + 3_600_000), "an hour later");
    }

    #[test]
    fn messages_are_built_or_refused_with_a_reason() {
        let server = MailServer {
            address: "127.0.0.1:25".into(),
            security: MailSecurity::None,
            from: "drv <drv@localhost>".into(),
            user: None,
            password_file: None,
            ca_file: None,
            per_hour: 60,
        };
        let mail = Mail {
            to: vec!["ops@example.com".into()],
            subject: "[drv] FIRING".into(),
            text: "lag".into(),
            html: Some("<p>lag</p>".into()),
        };
        let m = message(&server, &mail, "smtp").unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("Subject: [drv] FIRING") && raw.contains("multipart/alternative"), "{raw}");
        let bad = Mail { to: vec!["not an address".into()], ..mail };
        assert!(message(&server, &bad, "smtp").unwrap_err().to_string().contains("recipient"));
    }
}
