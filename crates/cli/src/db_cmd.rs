//! `devtables db`: the device database from the command line, JSON in and out.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use devtables_db::{Db, DbOptions, FindOptions};
use devtables_schema::{Item, Schema};

#[derive(Args)]
pub struct DbArgs {
    /// The OneTable schema (JSON5).
    #[arg(long)]
    schema: PathBuf,
    /// The database file (created when missing).
    #[arg(long)]
    db: PathBuf,
    #[command(subcommand)]
    op: DbOp,
}

#[derive(Subcommand)]
enum DbOp {
    /// Print the item its key properties identify (exit 1 when absent).
    Get {
        model: String,
        /// Key properties as a JSON object, or `-` to read it from standard input.
        props: String,
        /// Include hidden fields (keys).
        #[arg(long)]
        hidden: bool,
    },
    /// Print a page of items matching the properties: `{"items": [...], "next": ...}`.
    Find {
        model: String,
        #[arg(default_value = "{}")]
        props: String,
        #[arg(long)]
        index: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[arg(long)]
        next: Option<String>,
        #[arg(long)]
        reverse: bool,
        #[arg(long)]
        hidden: bool,
    },
    /// Create an item (fails when its key exists).
    Create { model: String, item: String },
    /// Change the given fields of an existing item.
    Update { model: String, item: String },
    /// Update the item, or create it when absent.
    Upsert { model: String, item: String },
    /// Remove an item (exit 1 when absent).
    Remove { model: String, props: String },
    /// Write every item as JSON lines to a file or standard output.
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load items written by export from a file or standard input (`-`).
    Import { file: String },
}

pub fn run(args: DbArgs) -> anyhow::Result<()> {
    let schema = Schema::load(&args.schema)
        .with_context(|| format!("cannot load schema {}", args.schema.display()))?;
    let schema = Arc::new(schema);
    // Reads never create a file (a mistyped path is an error, not a new empty database) and
    // never write one: a file the user may only read is read as it is.
    let reads_only = matches!(
        args.op,
        DbOp::Get { .. } | DbOp::Find { .. } | DbOp::Export { .. }
    );
    let db = if reads_only {
        Db::open_read_only(&args.db, schema, DbOptions::default())?
    } else {
        Db::open(&args.db, schema, DbOptions::default())?
    };
    let mut out = std::io::stdout().lock();
    match args.op {
        DbOp::Get {
            model,
            props,
            hidden,
        } => {
            let props = json_object(&props)?;
            match db.read()?.get(&model, &props, hidden)? {
                Some(item) => print(&mut out, &item)?,
                None => bail!("{model} item not found"),
            }
        }
        DbOp::Find {
            model,
            props,
            index,
            limit,
            next,
            reverse,
            hidden,
        } => {
            let options = FindOptions {
                index,
                limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
                next,
                reverse,
                hidden,
            };
            let page = db.find(&model, &json_object(&props)?, &options)?;
            let value = serde_json::json!({"items": page.items, "next": page.next});
            print(&mut out, &value)?;
        }
        DbOp::Create { model, item } => print(&mut out, &db.create(&model, &json_object(&item)?)?)?,
        DbOp::Update { model, item } => print(&mut out, &db.update(&model, &json_object(&item)?)?)?,
        DbOp::Upsert { model, item } => print(&mut out, &db.upsert(&model, &json_object(&item)?)?)?,
        DbOp::Remove { model, props } => match db.remove(&model, &json_object(&props)?)? {
            Some(item) => print(&mut out, &item)?,
            None => bail!("{model} item not found"),
        },
        DbOp::Export { out: file } => {
            let count = match file {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    db.export(&mut w)?
                }
                None => db.export(&mut out)?,
            };
            eprintln!("exported {count} items");
        }
        DbOp::Import { file } => {
            let mut input: Box<dyn BufRead> = if file == "-" {
                Box::new(BufReader::new(std::io::stdin()))
            } else {
                let f =
                    std::fs::File::open(&file).with_context(|| format!("cannot open {file}"))?;
                Box::new(BufReader::new(f))
            };
            let count = db.import(&mut input)?;
            eprintln!("imported {count} items");
        }
    }
    db.close()?;
    Ok(())
}

/// A JSON object from the argument, or from standard input when the argument is `-`.
fn json_object(arg: &str) -> anyhow::Result<Item> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(64 * 1024 * 1024)
            .read_to_string(&mut s)?;
        s
    } else {
        arg.to_string()
    };
    match serde_json::from_str(&text).context("argument is not valid JSON")? {
        serde_json::Value::Object(map) => Ok(map),
        other => bail!("expected a JSON object, got {other}"),
    }
}

fn print(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}
