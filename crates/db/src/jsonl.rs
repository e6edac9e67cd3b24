//! Import and export of all items as JSON lines: one complete item (hidden fields included) per
//! line, its model named by the type field, so an export loads back into an equal database.

use std::io::{BufRead, Read, Write};

use devtables_schema::Item;

use crate::{Db, DbError, Origin};

pub(crate) fn export(db: &Db, out: &mut impl Write) -> Result<u64, DbError> {
    let read = db.read()?;
    let mut count = 0;
    for model in db.schema().models() {
        for item in read.scan_model(model.name())? {
            serde_json::to_writer(&mut *out, &item)?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    out.flush()?;
    Ok(count)
}

pub(crate) fn import(db: &Db, input: &mut impl BufRead) -> Result<u64, DbError> {
    let batch_size = db.options().max_transaction_ops.max(1);
    // A line may hold one item plus some slack for whitespace; anything longer is refused before
    // it is read into memory whole.
    let max_line = db.options().max_item_bytes.saturating_mul(2).max(1024) as u64;
    let mut line_no = 0u64;
    let mut total = 0u64;
    let mut batch: Vec<(u64, String, Item)> = Vec::with_capacity(batch_size);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = input
            .by_ref()
            .take(max_line + 1)
            .read_until(b'\n', &mut buf)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        if buf.len() as u64 > max_line && !buf.ends_with(b"\n") {
            return Err(DbError::Import {
                line: line_no,
                source: Box::new(DbError::BadInput(format!(
                    "line longer than {max_line} bytes"
                ))),
            });
        }
        // Refused, not repaired: replacing bytes would import a different item than the file holds.
        let text = std::str::from_utf8(&buf).map_err(|e| DbError::Import {
            line: line_no,
            source: Box::new(DbError::BadInput(format!(
                "not valid UTF-8 (byte {} of the line)",
                e.valid_up_to() + 1
            ))),
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let at = |e: DbError| DbError::Import {
            line: line_no,
            source: Box::new(e),
        };
        // Exact: an integer past 64 bits is refused, not rounded to a float.
        let item: Item = match devtables_schema::parse_json_exact(text) {
            Ok(serde_json::Value::Object(item)) => item,
            Ok(_) => {
                return Err(at(DbError::BadInput(
                    "expected a JSON object (one item per line)".into(),
                )))
            }
            Err(devtables_schema::ExactJsonError::Syntax(e)) => return Err(at(e.into())),
            Err(e) => return Err(at(DbError::BadInput(e.to_string()))),
        };
        let type_field = &db.schema().params().type_field;
        let model = match item.get(type_field).and_then(|v| v.as_str()) {
            Some(m) => m.to_string(),
            None => {
                return Err(at(DbError::BadInput(format!(
                    "item has no string field {type_field} naming its model"
                ))))
            }
        };
        batch.push((line_no, model, item));
        if batch.len() >= batch_size {
            total += write_batch(db, &mut batch)?;
        }
    }
    total += write_batch(db, &mut batch)?;
    Ok(total)
}

fn write_batch(db: &Db, batch: &mut Vec<(u64, String, Item)>) -> Result<u64, DbError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let items = std::mem::take(batch);
    let n = items.len() as u64;
    db.write(Origin::Import, |t| {
        for (line, model, item) in items {
            t.put_stored(&model, item).map_err(|e| DbError::Import {
                line,
                source: Box::new(e),
            })?;
        }
        Ok(())
    })?;
    Ok(n)
}
