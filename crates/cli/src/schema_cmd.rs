//! `devtables schema`: load a OneTable schema file the way the agent and the cloud do and say
//! what devtables makes of it.
//!
//! It exists for the user who arrives with a schema written for the original product: `check`
//! loads it (with `blend`), prints every model with where its items live and how they
//! replicate, the indexes, and every key kept but ignored (with its dotted path and why), or
//! the one error that refuses it; `show` lists one model's fields with everything the schema
//! says about each; `diff` says, before a rollout, how a new version differs from the one a
//! fleet runs and whether the two may live side by side (docs/schema.md, "Changing a schema in
//! a live fleet"). Nothing is written anywhere.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use devtables_schema::{
    compare_shapes, Enable, Field, Generate, Model, Process, Schema, SchemaChanges, SyncDirection,
};

#[derive(clap::Args, Debug)]
pub struct SchemaArgs {
    #[command(subcommand)]
    command: SchemaCommand,
}

#[derive(clap::Subcommand, Debug)]
enum SchemaCommand {
    /// Load a schema file (and the files it blends): its models, their replication, its indexes
    /// and every key kept but ignored. Exit code 1 when devtables refuses the schema.
    Check {
        /// The schema file (JSON5), or `-` to read it from standard input (then it cannot
        /// `blend` other files).
        file: PathBuf,
    },
    /// One model's fields: type, required, templates, defaults, validation, generated ids, ...
    Show {
        /// The schema file (JSON5), or `-` to read it from standard input.
        file: PathBuf,
        /// The model to show.
        #[arg(long)]
        model: String,
    },
    /// How NEW differs from OLD, each difference marked compatible or not: whether a cloud and
    /// devices on the two versions exchange items without refusals, and a device database
    /// opens under NEW without `--schema-change`. Exit code 1 when a difference is incompatible.
    Diff {
        /// The schema the fleet runs now (`-` for standard input).
        old: PathBuf,
        /// The schema to roll out (`-` for standard input; not both).
        new: PathBuf,
    },
}

pub fn run(args: SchemaArgs) -> anyhow::Result<()> {
    match args.command {
        SchemaCommand::Check { file } => {
            let schema = load(&file)?;
            print!("{}", check_report(&schema));
            Ok(())
        }
        SchemaCommand::Show { file, model } => {
            let schema = load(&file)?;
            let Some(m) = schema.model(&model) else {
                let names: Vec<&str> = schema.models().map(Model::name).collect();
                let source = if file == Path::new("-") {
                    "the schema on standard input".to_string()
                } else {
                    file.display().to_string()
                };
                anyhow::bail!(
                    "{source} has no model {model:?} (its models: {})",
                    names.join(", ")
                );
            };
            print!("{}", model_report(&schema, m));
            Ok(())
        }
        SchemaCommand::Diff { old, new } => {
            if old == Path::new("-") && new == Path::new("-") {
                anyhow::bail!("only one of OLD and NEW can be `-` (standard input)");
            }
            let (old, new) = (load(&old)?, load(&new)?);
            let changes = compare_shapes(&old.shape(), &new.shape());
            print!("{}", diff_report(&old, &new, &changes));
            if !changes.is_compatible() {
                anyhow::bail!(
                    "the new schema is not compatible with the old one (see above): devices \
                     and a cloud on the two versions would refuse each other's items, and a \
                     device database opens under it only with --schema-change"
                );
            }
            Ok(())
        }
    }
}

/// `diff`'s text: both version tags, then one line per difference.
fn diff_report(old: &Schema, new: &Schema, changes: &SchemaChanges) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "old: {}", old.tag());
    let _ = writeln!(out, "new: {}", new.tag());
    if changes.is_empty() {
        let _ = writeln!(out, "no difference that matters to stored items");
        return out;
    }
    let incompatible = changes.incompatible().count();
    let _ = writeln!(
        out,
        "{} difference(s), {incompatible} incompatible:",
        changes.changes.len()
    );
    for change in changes.iter() {
        let _ = writeln!(out, "  {change}");
    }
    out
}

fn load(file: &Path) -> anyhow::Result<Schema> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the schema from standard input")?;
        return Schema::from_json5(&text)
            .context("devtables cannot use the schema from standard input");
    }
    Schema::load(file)
        .with_context(|| format!("devtables cannot use the schema {}", file.display()))
}

/// `check`'s text: a header, the indexes, one line per model, then the warnings.
fn check_report(schema: &Schema) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "schema {}version {} ({}): {} models, {} warnings",
        schema.name().map(|n| format!("{n} ")).unwrap_or_default(),
        schema.version(),
        schema.format(),
        schema.models().count(),
        schema.warnings().len()
    );
    let _ = writeln!(out, "\nindexes");
    for index in std::iter::once(schema.primary_index()).chain(schema.secondary_indexes()) {
        let _ = writeln!(
            out,
            "  {:<12} hash {}{}",
            index.name,
            index.hash,
            index
                .sort
                .as_ref()
                .map(|s| format!(", sort {s}"))
                .unwrap_or_default()
        );
    }
    let mut rows = vec![[
        "model".to_string(),
        "fields".into(),
        "lives on".into(),
        "sync".into(),
        "key".into(),
    ]];
    let mut models: Vec<&Model> = schema.models().collect();
    models.sort_by_key(|m| m.name());
    let primary = schema.primary_index();
    for m in models {
        let template = |attr: &str| {
            m.field(attr)
                .and_then(Field::value_template)
                .unwrap_or("-")
                .to_string()
        };
        let key = match &primary.sort {
            Some(sort) => format!("{} / {}", template(&primary.hash), template(sort)),
            None => template(&primary.hash),
        };
        rows.push([
            m.name().to_string(),
            m.fields().len().to_string(),
            lives_on(m.process()).into(),
            sync(m.process()),
            key,
        ]);
    }
    let _ = writeln!(out, "\nmodels");
    out.push_str(&columns(&rows));
    if !schema.warnings().is_empty() {
        let _ = writeln!(out, "\nkept but ignored (no effect in devtables)");
        for w in schema.warnings() {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

/// `show`'s text: the model's replication, then one line per field (nested ones indented).
fn model_report(schema: &Schema, m: &Model) -> String {
    let mut out = String::new();
    let p = m.process();
    let _ = writeln!(
        out,
        "model {}: lives on {}, sync {}{}",
        m.name(),
        lives_on(p),
        sync(p),
        m.ttl_field()
            .map(|f| format!(", expires by {f}"))
            .unwrap_or_default()
    );
    if let Some(d) = m.description() {
        let _ = writeln!(out, "  {d}");
    }
    let mut rows = vec![["field".to_string(), "type".into(), "rules".into()]];
    for f in m.fields() {
        field_rows(f, 0, &mut rows);
    }
    for (what, f) in [
        ("created", m.created_field()),
        ("updated", m.updated_field()),
    ] {
        if let Some(f) = f {
            rows.push([
                f.name().to_string(),
                f.field_type().name().into(),
                format!("set by devtables ({what} timestamp)"),
            ]);
        }
    }
    let _ = writeln!(out);
    out.push_str(&columns(&rows));
    let mine: Vec<String> = schema
        .warnings()
        .iter()
        .filter(|w| w.path.starts_with(&format!("models.{}", m.name())))
        .map(ToString::to_string)
        .collect();
    if !mine.is_empty() {
        let _ = writeln!(out, "\nkept but ignored");
        for w in mine {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

fn field_rows(f: &Field, depth: usize, rows: &mut Vec<[String; 3]>) {
    let mut rules = Vec::new();
    if f.required() {
        rules.push("required".to_string());
    }
    if let Some(t) = f.value_template() {
        rules.push(format!("value {t}"));
    }
    if let Some(d) = f.default_value() {
        rules.push(format!("default {d}"));
    }
    if let Some(e) = f.enum_values() {
        let values: Vec<String> = e.iter().map(ToString::to_string).collect();
        rules.push(format!("enum [{}]", values.join(", ")));
    }
    if let Some(v) = f.validate_pattern() {
        rules.push(format!("validate {v}"));
    }
    if let Some(g) = f.generate() {
        rules.push(match g {
            Generate::Ulid => "generate ulid".into(),
            Generate::Uuid => "generate uuid".into(),
            Generate::Uid(n) => format!("generate uid({n})"),
        });
    }
    if f.unique() {
        rules.push(match f.unique_scope() {
            Some(scope) => format!("unique within {scope}"),
            None => "unique".into(),
        });
    }
    for (on, name) in [
        (f.hidden(), "hidden"),
        (f.readonly(), "readonly"),
        (f.is_ttl(), "ttl"),
        (f.partial(), "partial"),
    ] {
        if on {
            rules.push(name.into());
        }
    }
    if let Some(map) = f.map() {
        rules.push(format!("map {map} (ignored)"));
    }
    // The element rule of an array has no name of its own.
    let name = if f.name().is_empty() {
        "[items]"
    } else {
        f.name()
    };
    rows.push([
        format!("{}{name}", "  ".repeat(depth)),
        f.field_type().name().into(),
        rules.join(", "),
    ]);
    if let Some(nested) = f.nested_fields() {
        for n in nested {
            field_rows(n, depth + 1, rows);
        }
    }
    if let Some(items) = f.items() {
        field_rows(items, depth + 1, rows);
    }
}

fn lives_on(p: Process) -> &'static str {
    match p.enable {
        Enable::Device => "device",
        Enable::Cloud => "cloud",
        Enable::Both => "device and cloud",
    }
}

fn sync(p: Process) -> String {
    let dir = match p.sync {
        SyncDirection::Up => "up",
        SyncDirection::Down => "down",
        SyncDirection::Both => "both",
        SyncDirection::None => "none",
    };
    let mut s = dir.to_string();
    if p.broadcast {
        s.push_str(", broadcast");
    }
    if p.lossy {
        s.push_str(", lossy");
    }
    s
}

/// Rows as left-aligned columns, two spaces apart, indented by two.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(" ");
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, " {cell:<w$}");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}
