//! `drv digest`: the weekly (or daily) digest of the installation from a config server, printed
//! or mailed (`--send`, through a mail server of the configuration). Meant for cron or a systemd
//! timer: `dist/cron/drv-digest`, `dist/systemd/drv-digest.{service,timer}`.

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::configd_cmd::{Remote, block_on};

#[derive(Args)]
pub struct DigestArgs {
    /// The period it covers, ending now: week or day.
    #[arg(long, default_value = "week")]
    period: String,
    /// Mail it to ADDR (repeat for several); needs --send.
    #[arg(long, value_name = "ADDR")]
    to: Vec<String>,
    /// Mail it (text and HTML) through the configuration's mail server.
    #[arg(long, conflicts_with = "dry_run", requires = "to")]
    send: bool,
    /// Print it and send nothing (the default without --send).
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print the HTML part instead of the text.
    #[arg(long)]
    html: bool,
    /// Print the digest as JSON (its figures by volume, and both parts).
    #[arg(long)]
    json: bool,
    /// The mail server entry to send through (default: the only one configured).
    #[arg(long, value_name = "NAME")]
    mail: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

pub fn run(a: DigestArgs) -> Result<()> {
    if drv_configd::digest::period_seconds(&a.period).is_none() {
        bail!("--period {:?}: use week or day", a.period);
    }
    if let Some(bad) = a.to.iter().find(|t| !drv_config::is_mail_address(t)) {
        bail!("--to {bad:?} is not a mail address");
    }
    let client = a.remote.client()?;
    if a.send {
        let req = drv_configd::digest::SendRequest { period: a.period.clone(), to: a.to.clone(), mail: a.mail.clone() };
        let body = serde_json::to_vec(&req)?;
        let b = block_on(client.request(drv_configd::client::Method::POST, "/v1/digest/send", Some(body)))??;
        let sent: drv_configd::digest::Sent = serde_json::from_slice(&b).context("the server's answer")?;
        println!("sent {:?} to {} through {}", sent.subject, sent.to.join(", "), sent.mail_server);
        return Ok(());
    }
    let path = format!("/v1/digest?period={}", a.period);
    let b = block_on(client.request(drv_configd::client::Method::GET, &path, None))??;
    let d: drv_configd::digest::Digest = serde_json::from_slice(&b).context("the server's answer")?;
    match (a.json, a.html) {
        (true, _) => println!("{}", serde_json::to_string_pretty(&d)?),
        (false, true) => println!("{}", d.html),
        (false, false) => print!("{}", d.text),
    }
    Ok(())
}
