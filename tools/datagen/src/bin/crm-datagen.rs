//! Writes generated data as CSV files (customers, transactions, interactions),
//! e.g. for PostgreSQL `COPY` baselines in benchmarks.
//!
//! ```text
//! crm-datagen --customers 100000 --seed 42 --out target/data
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use crm_datagen::{Config, Generator};

fn main() -> ExitCode {
    match run() {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crm-datagen: {e}\nusage: crm-datagen [--customers N] [--seed S] [--out DIR]");
            ExitCode::from(2)
        }
    }
}

fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn run() -> Result<String, String> {
    let mut config = Config::default();
    let mut out = PathBuf::from("target/data");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--customers" => config.customers = value()?.parse().map_err(|_| "bad --customers")?,
            "--seed" => config.seed = value()?.parse().map_err(|_| "bad --seed")?,
            "--out" => out = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let open = |name: &str| File::create(out.join(name)).map(BufWriter::new).map_err(|e| format!("{name}: {e}"));
    let (mut c, mut t, mut i) = (open("customers.csv")?, open("transactions.csv")?, open("interactions.csv")?);
    let w = |r: std::io::Result<()>| r.map_err(|e| e.to_string());
    w(writeln!(c, "external_id,name,phone,email,birthday,region,timezone,registered_at,tags"))?;
    w(writeln!(t, "transaction_id,external_id,kind,amount_minor,currency,occurred_at,category,product_id"))?;
    w(writeln!(i, "interaction_id,external_id,kind,channel,occurred_at"))?;
    let (mut nc, mut nt, mut ni) = (0, 0, 0);
    for g in Generator::new(config) {
        let cu = &g.customer;
        let b = cu.birthday.as_ref().map(|d| format!("{:04}-{:02}-{:02}", d.year, d.month, d.day)).unwrap_or_default();
        let reg = cu.registered_at.as_ref().map(|t| t.seconds).unwrap_or(0);
        w(writeln!(
            c,
            "{},{},{},{},{},{},{},{},{}",
            g.index,
            csv(&cu.name),
            cu.phone,
            cu.email,
            b,
            cu.region,
            cu.timezone,
            reg,
            csv(&cu.tags.join(";"))
        ))?;
        nc += 1;
        for x in &g.transactions {
            let m = x.amount.as_ref();
            w(writeln!(
                t,
                "{},{},{},{},{},{},{},{}",
                x.transaction_id,
                g.index,
                x.kind,
                m.map(|m| m.amount_minor).unwrap_or(0),
                m.map(|m| m.currency.as_str()).unwrap_or(""),
                x.occurred_at.as_ref().map(|t| t.seconds).unwrap_or(0),
                x.category,
                x.product_id
            ))?;
            nt += 1;
        }
        for x in &g.interactions {
            w(writeln!(
                i,
                "{},{},{},{},{}",
                x.interaction_id,
                g.index,
                x.kind,
                x.channel,
                x.occurred_at.as_ref().map(|t| t.seconds).unwrap_or(0)
            ))?;
            ni += 1;
        }
    }
    for f in [&mut c, &mut t, &mut i] {
        w(f.flush())?;
    }
    Ok(format!("wrote {nc} customers, {nt} transactions, {ni} interactions to {}", out.display()))
}
