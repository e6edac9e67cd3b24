//! `devtables db`: the device database from the command line, JSON in and out.
//!
//! Every argument that takes JSON or a file also takes `-` for standard input (one per command:
//! there is one standard input). JSON arguments are read exactly ([`parse_json_exact`]): an
//! integer past 64 bits is refused, not rounded. `get`, `find` and `export` print JSON (today's
//! default), JSON lines for pipes, or an aligned table for a person (`--output`).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use devtables_db::{Db, DbOptions, FindOptions};
use devtables_schema::{parse_json_exact, ExactJsonError, Item, Model, Schema};
use serde_json::Value;

/// The most bytes read from standard input for one JSON argument or schema.
const MAX_STDIN_BYTES: u64 = 64 * 1024 * 1024;

/// Widest table cell, in characters; longer values are cut with `…`.
const MAX_CELL_CHARS: usize = 40;

/// What `find --help` says about properties, operators and pages (crates/schema/src/query.rs is
/// what it describes).
const FIND_HELP: &str = "\
Properties (PROPS) select the items, as a JSON object of field names:
  {\"deviceId\": \"d1\"}                          a plain value: equal
  {\"value\": {\">\": 20}}                        one operator: =  !=  <>  <  <=  >  >=
  {\"name\": {\"begins\": \"temp\"}}                begins (or begins_with): a string prefix
  {\"value\": {\"between\": [10, 20]}}            between [low, high], both included
  {\"severity\": {\"in\": [\"warn\", \"critical\"]}}  in: one of a list
Values are cast to the field's type first (a date as an ISO string or ms). Properties that
give the index's hash key, directly or through its value template (deviceId fills
'device#${deviceId}'), read one partition; the sort key takes =, <, <=, >, >=, begins or
between, or the prefix its template resolves to. Every other property filters what is read.
Without the hash key the whole model is read.

Pages: --limit N returns at most N items; when more remain the page has a \"next\" token
(on stderr with --output jsonl or table): pass it back with --next to read on. --reverse
reads in descending sort-key order. --index NAME queries a secondary index by its own hash and
sort attributes.

Examples:
  devtables db --schema s.json5 --db dev.db find Fault '{\"deviceId\": \"d1\"}' --limit 10
  devtables db --schema s.json5 --db dev.db find Fault '{\"gs1pk\": \"fault#warn\"}' --index gs1
  echo '{\"severity\": {\"in\": [\"warn\", \"critical\"]}}' | devtables db ... find Fault - --output table";

#[derive(Args)]
pub struct DbArgs {
    /// The OneTable schema (JSON5), or `-` to read it from standard input (a schema read so
    /// cannot `blend` other files).
    #[arg(long)]
    schema: PathBuf,
    /// The database file. The writing commands create it when missing; get, find and export
    /// never create it and only read it (a read-only file is fine).
    #[arg(long)]
    db: PathBuf,
    /// Open the file even when this schema differs from the one it was written with in ways
    /// its items may not survive (a removed field, a changed type...); the change is recorded,
    /// and stored items that no longer validate stay as they are. Without it such a file is
    /// refused with every difference named (docs/schema.md, "A database file and its schema").
    #[arg(long)]
    schema_change: bool,
    #[command(subcommand)]
    op: DbOp,
}

/// How `get`, `find` print items.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Indented JSON: the item, or find's `{"items": [...], "next": ...}`.
    #[default]
    Json,
    /// One item per line, compact (for pipes: jq, grep, `db import`); find's `next` token goes
    /// to standard error.
    Jsonl,
    /// Aligned columns of the model's fields, long cells cut (for a person).
    Table,
}

/// How `export` writes items.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum ExportOutput {
    /// One item per line: what `import` reads.
    #[default]
    Jsonl,
    /// One JSON array of all items.
    Json,
}

#[derive(Subcommand)]
enum DbOp {
    /// Print the item its key properties identify (exit 1 when absent).
    Get {
        /// The model (e.g. Fault).
        model: String,
        /// The key properties as a JSON object (e.g. '{"deviceId":"d1","id":"01J..."}'), or `-`
        /// to read it from standard input.
        props: String,
        /// Include hidden fields (keys, index attributes).
        #[arg(long)]
        hidden: bool,
        /// How to print the item.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Print only this field's value (a string without quotes, anything else as JSON).
        #[arg(long, value_name = "NAME", conflicts_with = "output")]
        field: Option<String>,
    },
    /// Print a page of items matching the properties: `{"items": [...], "next": ...}`.
    #[command(after_help = FIND_HELP)]
    Find {
        /// The model (e.g. Fault).
        model: String,
        /// Properties to match, as a JSON object (see below), or `-` to read them from standard
        /// input. Default `{}`: every item of the model.
        #[arg(default_value = "{}")]
        props: String,
        /// Query this secondary index (e.g. gs1) instead of the primary key.
        #[arg(long, value_name = "NAME")]
        index: Option<String>,
        /// Return at most this many items (1 or more; default: all).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// The `next` token of the previous page: read the page after it.
        #[arg(long, value_name = "TOKEN")]
        next: Option<String>,
        /// Read in descending sort-key order.
        #[arg(long)]
        reverse: bool,
        /// Include hidden fields (keys, index attributes).
        #[arg(long)]
        hidden: bool,
        /// How to print the page.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Create an item (fails when its key exists); prints it.
    Create {
        /// The model (e.g. Fault).
        model: String,
        /// The item as a JSON object, or `-` to read it from standard input.
        item: String,
        /// Print only this field of the created item (e.g. `--field id` for a generated id).
        #[arg(long, value_name = "NAME")]
        field: Option<String>,
    },
    /// Change the given fields of an existing item (its key properties find it); prints it.
    Update {
        /// The model (e.g. Fault).
        model: String,
        /// The key properties and the fields to change, as a JSON object, or `-` to read it
        /// from standard input.
        item: String,
        /// Print only this field of the updated item.
        #[arg(long, value_name = "NAME")]
        field: Option<String>,
    },
    /// Update the item, or create it when absent; prints it.
    Upsert {
        /// The model (e.g. Setting).
        model: String,
        /// The item as a JSON object, or `-` to read it from standard input.
        item: String,
        /// Print only this field of the item.
        #[arg(long, value_name = "NAME")]
        field: Option<String>,
    },
    /// Remove an item (exit 1 when absent); prints what it held.
    Remove {
        /// The model (e.g. Fault).
        model: String,
        /// The key properties as a JSON object, or `-` to read it from standard input.
        props: String,
    },
    /// Write every item (hidden fields included) to a file or standard output.
    Export {
        /// The file to write (`-` or none: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// JSON lines (what import reads) or one JSON array.
        #[arg(long, value_enum, default_value_t)]
        output: ExportOutput,
    },
    /// Load items written by export (JSON lines) from a file, or standard input with `-`.
    Import {
        /// The file to read, or `-` for standard input.
        file: String,
    },
}

impl DbOp {
    /// The name of this command's argument that reads standard input, if one is `-`.
    fn stdin_argument(&self) -> Option<&'static str> {
        let (name, value) = match self {
            DbOp::Get { props, .. } | DbOp::Find { props, .. } | DbOp::Remove { props, .. } => {
                ("PROPS", props)
            }
            DbOp::Create { item, .. } | DbOp::Update { item, .. } | DbOp::Upsert { item, .. } => {
                ("ITEM", item)
            }
            DbOp::Import { file } => ("FILE", file),
            DbOp::Export { .. } => return None,
        };
        (value == "-").then_some(name)
    }
}

pub fn run(args: DbArgs) -> anyhow::Result<()> {
    let schema_from_stdin = args.schema == Path::new("-");
    if let (true, Some(other)) = (schema_from_stdin, args.op.stdin_argument()) {
        bail!(
            "only one argument may be `-` (there is one standard input): --schema and {other} \
             both are; give one of them as a file or inline"
        );
    }
    let schema = if schema_from_stdin {
        let text = read_stdin().context("cannot read the schema from standard input")?;
        Schema::from_json5(&text).context("cannot load the schema from standard input")?
    } else {
        Schema::load(&args.schema)
            .with_context(|| format!("cannot load schema {}", args.schema.display()))?
    };
    let schema = Arc::new(schema);
    // Reads never create a file (a mistyped path is an error, not a new empty database) and
    // never write one: a file the user may only read is read as it is.
    let reads_only = matches!(
        args.op,
        DbOp::Get { .. } | DbOp::Find { .. } | DbOp::Export { .. }
    );
    let options = DbOptions {
        allow_schema_change: args.schema_change,
        ..DbOptions::default()
    };
    let db = if reads_only {
        Db::open_read_only(&args.db, schema.clone(), options)?
    } else {
        Db::open(&args.db, schema.clone(), options)?
    };
    let mut out = std::io::stdout().lock();
    match args.op {
        DbOp::Get {
            model,
            props,
            hidden,
            output,
            field,
        } => {
            let props = json_object("PROPS", &props)?;
            let Some(item) = db.read()?.get(&model, &props, hidden)? else {
                bail!("{model} item not found");
            };
            match field {
                Some(name) => print_field(&mut out, &item, &name)?,
                None => print_items(&mut out, &schema, &model, &[item], output, hidden)?,
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
            output,
        } => {
            let options = FindOptions {
                index,
                limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
                next,
                reverse,
                hidden,
            };
            let page = db.find(&model, &json_object("PROPS", &props)?, &options)?;
            if output == Output::Json {
                let value = serde_json::json!({"items": page.items, "next": page.next});
                print_pretty(&mut out, &value)?;
            } else {
                print_items(&mut out, &schema, &model, &page.items, output, hidden)?;
                if let Some(next) = &page.next {
                    eprintln!("more items: pass --next {next}");
                }
            }
        }
        DbOp::Create { model, item, field } => {
            let created = db.create(&model, &json_object("ITEM", &item)?)?;
            print_written(&mut out, &created, field.as_deref())?;
        }
        DbOp::Update { model, item, field } => {
            let updated = db.update(&model, &json_object("ITEM", &item)?)?;
            print_written(&mut out, &updated, field.as_deref())?;
        }
        DbOp::Upsert { model, item, field } => {
            let written = db.upsert(&model, &json_object("ITEM", &item)?)?;
            print_written(&mut out, &written, field.as_deref())?;
        }
        DbOp::Remove { model, props } => match db.remove(&model, &json_object("PROPS", &props)?)? {
            Some(item) => print_pretty(&mut out, &item)?,
            None => bail!("{model} item not found"),
        },
        DbOp::Export { out: file, output } => {
            let count = match file.filter(|f| f != Path::new("-")) {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    export(&db, std::io::BufWriter::new(f), output)?
                }
                None => export(&db, &mut out, output)?,
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

/// All of standard input (at most [`MAX_STDIN_BYTES`]).
fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    let read = std::io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_string(&mut text)?;
    if read as u64 > MAX_STDIN_BYTES {
        bail!("standard input holds more than {MAX_STDIN_BYTES} bytes");
    }
    Ok(text)
}

/// The JSON object of the argument `name`, or of standard input when it is `-`; integers past
/// 64 bits are refused, not rounded.
fn json_object(name: &str, arg: &str) -> anyhow::Result<Item> {
    let (text, source) = if arg == "-" {
        (read_stdin()?, format!("{name} (standard input)"))
    } else {
        (arg.to_string(), name.to_string())
    };
    match parse_json_exact(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => bail!(
            "{source} must be a JSON object, not {}",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        ),
        Err(ExactJsonError::Syntax(e)) => bail!("{source} is not valid JSON: {e}"),
        Err(e) => bail!("{source}: {e}"),
    }
}

fn print_pretty(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A written item, or only one of its fields.
fn print_written(out: &mut impl Write, item: &Item, field: Option<&str>) -> anyhow::Result<()> {
    match field {
        Some(name) => print_field(out, item, name),
        None => print_pretty(out, item),
    }
}

/// One field's value: a string as it is (for a shell variable), anything else as JSON.
fn print_field(out: &mut impl Write, item: &Item, name: &str) -> anyhow::Result<()> {
    match item.get(name) {
        Some(Value::String(s)) => writeln!(out, "{s}")?,
        Some(other) => writeln!(out, "{other}")?,
        None => {
            let fields: Vec<&str> = item.keys().map(String::as_str).collect();
            bail!(
                "the item has no field {name:?} (it has: {})",
                fields.join(", ")
            )
        }
    }
    Ok(())
}

/// Items as `output` says: indented JSON (one item alone, several in an array), JSON lines or
/// a table of `model`'s fields.
fn print_items(
    out: &mut impl Write,
    schema: &Schema,
    model: &str,
    items: &[Item],
    output: Output,
    hidden: bool,
) -> anyhow::Result<()> {
    match output {
        Output::Json => match items {
            [one] => print_pretty(out, one)?,
            many => print_pretty(out, &many)?,
        },
        Output::Jsonl => {
            for item in items {
                serde_json::to_writer(&mut *out, item)?;
                writeln!(out)?;
            }
        }
        Output::Table => out.write_all(table(schema.model(model), items, hidden).as_bytes())?,
    }
    Ok(())
}

/// Aligned columns: the model's fields as the schema lists them (hidden ones only with
/// `hidden`) that any item holds, then the other attributes the items hold (timestamps, the type field), in
/// the order met. Strings are shown as they are, other values as JSON; cells longer than
/// [`MAX_CELL_CHARS`] are cut.
fn table(model: Option<&Model>, items: &[Item], hidden: bool) -> String {
    let mut columns: Vec<String> = model
        .map(|m| {
            m.fields()
                .iter()
                .filter(|f| hidden || !f.hidden())
                .map(|f| f.name().to_string())
                .filter(|name| items.iter().any(|i| i.contains_key(name)))
                .collect()
        })
        .unwrap_or_default();
    for item in items {
        for key in item.keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
    }
    let cell = |item: &Item, column: &str| -> String {
        let text = match item.get(column) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        // One line per row: a newline in a value would break the columns.
        let text = text.replace(['\n', '\r', '\t'], " ");
        match text.char_indices().nth(MAX_CELL_CHARS - 1) {
            Some((at, _)) if text.chars().count() > MAX_CELL_CHARS => format!("{}…", &text[..at]),
            _ => text,
        }
    };
    let rows: Vec<Vec<String>> = std::iter::once(columns.clone())
        .chain(
            items
                .iter()
                .map(|item| columns.iter().map(|c| cell(item, c)).collect()),
        )
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, value) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(value);
            line.extend(std::iter::repeat_n(' ', widths[c] - value.chars().count()));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Every item to `out` as JSON lines or as one JSON array; the count.
fn export(db: &Db, mut out: impl Write, output: ExportOutput) -> anyhow::Result<u64> {
    let count = match output {
        ExportOutput::Jsonl => db.export(&mut out)?,
        ExportOutput::Json => {
            let mut array = JsonArrayWriter::new(&mut out);
            let count = db.export(&mut array)?;
            array.finish()?;
            count
        }
    };
    out.flush()?;
    Ok(count)
}

/// Turns JSON lines into one JSON array as they stream through (items hold no raw newline:
/// JSON escapes it in strings), so an export of any size needs no memory for all of it.
struct JsonArrayWriter<W: Write> {
    inner: W,
    /// Lines begun so far.
    lines: u64,
    /// The next byte starts a line.
    at_line_start: bool,
}

impl<W: Write> JsonArrayWriter<W> {
    fn new(inner: W) -> Self {
        JsonArrayWriter {
            inner,
            lines: 0,
            at_line_start: true,
        }
    }

    fn finish(mut self) -> std::io::Result<()> {
        let end: &[u8] = if self.lines == 0 { b"[]\n" } else { b"\n]\n" };
        self.inner.write_all(end)
    }
}

impl<W: Write> Write for JsonArrayWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                let start: &[u8] = if self.lines == 0 { b"[\n" } else { b",\n" };
                self.inner.write_all(start)?;
                self.lines += 1;
            }
            let body = line.strip_suffix(b"\n");
            self.inner.write_all(body.unwrap_or(line))?;
            self.at_line_start = body.is_some();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(v: Value) -> Item {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn json_lines_become_one_array_whatever_the_write_boundaries() {
        let lines = b"{\"a\":1}\n{\"b\":\"x\\ny\"}\n{\"c\":[]}\n";
        for chunk in 1..lines.len() {
            let mut out = Vec::new();
            let mut w = JsonArrayWriter::new(&mut out);
            for piece in lines.chunks(chunk) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap();
            let value: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                value,
                json!([{"a": 1}, {"b": "x\ny"}, {"c": []}]),
                "{chunk}"
            );
        }
        let mut out = Vec::new();
        JsonArrayWriter::new(&mut out).finish().unwrap();
        assert_eq!(out, b"[]\n");
    }

    #[test]
    fn a_table_aligns_the_model_s_fields_and_cuts_long_cells() {
        let schema = Schema::from_json5(include_str!("../../../examples/schema.json5")).unwrap();
        let long = "x".repeat(100);
        let items = [
            item(json!({"message": "short", "severity": "warn", "deviceId": "d1", "count": 3})),
            item(json!({"severity": "info", "deviceId": "device-2", "message": long})),
        ];
        let text = table(schema.model("Fault"), &items, false);
        let lines: Vec<&str> = text.lines().collect();
        // The model's fields as the schema lists them, then what the schema does not declare.
        assert_eq!(
            lines[0],
            format!("deviceId  message{}  severity  count", " ".repeat(33))
        );
        assert_eq!(
            lines[1],
            format!("d1        short{}  warn      3", " ".repeat(35))
        );
        assert_eq!(lines[2], format!("device-2  {}…  info", "x".repeat(39)));
        assert_eq!(lines.len(), 3);
    }
}
