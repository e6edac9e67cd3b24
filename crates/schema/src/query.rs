//! Query planning: `find` properties → key condition + filters.
//!
//! OneTable callers query with plain properties (`{deviceId: 'd1'}`) rather than key
//! expressions. This module turns them into what a key-value store can execute: the hash key
//! (resolved from templates when possible), a sort-key condition (explicit operator, exact
//! value, or the literal prefix of a partly resolved template) and typed filters for the rest.

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::error::{Reason, ValidationError};
use crate::field::{date_ms, describe, store_date, values_equal, FieldType};
use crate::model::Model;
use crate::settings::Index;
use crate::template::{render_value, Rendered};
use crate::Item;

/// A planned query.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The hash key value; None when it cannot be resolved (the caller scans the model).
    pub hash: Option<String>,
    /// The sort key condition.
    pub sort: SortCondition,
    /// Conditions on other fields, applied to each candidate item.
    pub filters: Vec<Filter>,
}

/// A condition on the sort key (values are rendered strings).
#[derive(Clone, Debug, PartialEq)]
pub enum SortCondition {
    /// Any sort key.
    Any,
    /// Exactly this sort key.
    Eq(String),
    /// Sort keys starting with this prefix.
    BeginsWith(String),
    /// Sort keys in `[lo, hi]` (inclusive).
    Between(String, String),
    /// Sort keys `<` the value.
    Lt(String),
    /// Sort keys `<=` the value.
    Le(String),
    /// Sort keys `>` the value.
    Gt(String),
    /// Sort keys `>=` the value.
    Ge(String),
}

/// A condition on one (non-key) field.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// The field name.
    pub field: String,
    /// The comparison.
    pub op: FilterOp,
    /// The operand in stored form (`[lo, hi]` for Between, a list for In).
    pub value: Value,
}

/// Filter comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterOp {
    /// Equal (`=` or a plain value).
    Eq,
    /// Not equal (`!=`, `<>`).
    Ne,
    /// Less than.
    Lt,
    /// Less than or equal.
    Le,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Ge,
    /// String prefix (`begins`, `begins_with`).
    BeginsWith,
    /// Inclusive range `[lo, hi]`.
    Between,
    /// One of a list.
    In,
}

impl Filter {
    /// Whether a stored item satisfies the filter. A missing field only satisfies `Ne`;
    /// numbers compare numerically, strings lexically, booleans false < true, dates by their
    /// stored form; values of different kinds are unequal and unordered.
    pub fn matches(&self, item: &Item) -> bool {
        let Some(actual) = item.get(&self.field) else {
            return self.op == FilterOp::Ne;
        };
        let ord = || compare(actual, &self.value);
        match self.op {
            FilterOp::Eq => values_equal(actual, &self.value),
            FilterOp::Ne => !values_equal(actual, &self.value),
            FilterOp::Lt => ord() == Some(Ordering::Less),
            FilterOp::Le => matches!(ord(), Some(Ordering::Less | Ordering::Equal)),
            FilterOp::Gt => ord() == Some(Ordering::Greater),
            FilterOp::Ge => matches!(ord(), Some(Ordering::Greater | Ordering::Equal)),
            FilterOp::BeginsWith => match (actual, &self.value) {
                (Value::String(a), Value::String(prefix)) => a.starts_with(prefix.as_str()),
                _ => false,
            },
            FilterOp::Between => match self.value.as_array().map(Vec::as_slice) {
                Some([lo, hi]) => {
                    matches!(
                        compare(actual, lo),
                        Some(Ordering::Greater | Ordering::Equal)
                    ) && matches!(compare(actual, hi), Some(Ordering::Less | Ordering::Equal))
                }
                _ => false,
            },
            FilterOp::In => self
                .value
                .as_array()
                .is_some_and(|list| list.iter().any(|v| values_equal(actual, v))),
        }
    }
}

fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => Some(i.cmp(&j)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// The single operator of `{op: value}`, if the object has exactly one key.
fn single_op(map: &Map<String, Value>) -> Option<(&str, &Value)> {
    let mut iter = map.iter();
    match (iter.next(), iter.next()) {
        (Some((k, v)), None) => Some((k.as_str(), v)),
        _ => None,
    }
}

const FILTER_OPS: &str = "=, !=, <>, <, <=, >, >=, begins, begins_with, between, in";
const SORT_OPS: &str = "=, <, <=, >, >=, begins, begins_with, between";

impl Model {
    fn bad_op(&self, field: &str, operator: &str, detail: String) -> ValidationError {
        self.err(
            field,
            Reason::BadOperator {
                operator: operator.to_string(),
                detail,
            },
        )
    }

    /// Cast a query operand to the stored form of `field` (fields, type field, timestamps).
    fn cast_operand(&self, field: &str, value: &Value) -> Result<Value, ValidationError> {
        if value.is_null() {
            return Ok(Value::Null);
        }
        if let Some(f) = self.field(field) {
            return f.cast(value, field, &self.ctx());
        }
        if field == self.params.type_field {
            return match value {
                Value::String(_) => Ok(value.clone()),
                _ => Err(self.err(
                    field,
                    Reason::WrongType {
                        expected: "string".into(),
                        found: describe(value),
                    },
                )),
            };
        }
        let stamp = self.stamp(field);
        date_ms(value)
            .and_then(|ms| match stamp {
                Some(stamp) => self.stamp_value(stamp, ms),
                None => store_date(ms, self.params.iso_dates),
            })
            .ok_or_else(|| {
                self.err(
                    field,
                    Reason::WrongType {
                        expected: stamp.map_or("date", |s| s.ty.name()).into(),
                        found: describe(value),
                    },
                )
            })
    }

    fn is_known(&self, field: &str) -> bool {
        self.field(field).is_some()
            || field == self.params.type_field
            || self.stamp(field).is_some()
    }

    /// Whether a property value is an operator object rather than a plain value.
    fn is_operator(&self, field: &str, value: &Value) -> bool {
        let object_field = self
            .field(field)
            .is_some_and(|f| f.field_type() == FieldType::Object);
        match value {
            Value::Object(map) if object_field => {
                single_op(map).is_some_and(|(op, _)| FILTER_OPS.split(", ").any(|o| o == op))
            }
            Value::Object(_) => true,
            _ => false,
        }
    }

    /// Rendered key operand.
    fn key_operand(
        &self,
        field: &str,
        operator: &str,
        value: &Value,
    ) -> Result<String, ValidationError> {
        let cast = self.cast_operand(field, value)?;
        render_value(&cast).ok_or_else(|| {
            self.bad_op(
                field,
                operator,
                format!("a key operand must be a scalar, found {}", describe(value)),
            )
        })
    }

    fn sort_condition(&self, field: &str, value: &Value) -> Result<SortCondition, ValidationError> {
        let Value::Object(map) = value else {
            return Ok(SortCondition::Eq(self.key_operand(field, "=", value)?));
        };
        let Some((op, operand)) = single_op(map) else {
            return Err(self.bad_op(
                field,
                "{..}",
                format!("expected an object with exactly one operator ({SORT_OPS})"),
            ));
        };
        let one = |this: &Model| this.key_operand(field, op, operand);
        Ok(match op {
            "=" => SortCondition::Eq(one(self)?),
            "<" => SortCondition::Lt(one(self)?),
            "<=" => SortCondition::Le(one(self)?),
            ">" => SortCondition::Gt(one(self)?),
            ">=" => SortCondition::Ge(one(self)?),
            "begins" | "begins_with" => match operand {
                Value::String(prefix) => SortCondition::BeginsWith(prefix.clone()),
                _ => {
                    return Err(self.bad_op(
                        field,
                        op,
                        "the operand must be a string prefix".into(),
                    ))
                }
            },
            "between" => match operand.as_array().map(Vec::as_slice) {
                Some([lo, hi]) => SortCondition::Between(
                    self.key_operand(field, op, lo)?,
                    self.key_operand(field, op, hi)?,
                ),
                _ => {
                    return Err(self.bad_op(
                        field,
                        op,
                        "the operand must be a list [low, high]".into(),
                    ))
                }
            },
            _ => {
                return Err(self.bad_op(
                    field,
                    op,
                    format!("unknown sort key operator (use {SORT_OPS})"),
                ))
            }
        })
    }

    fn filter(&self, field: &str, value: &Value) -> Result<Filter, ValidationError> {
        let make = |op, value| Filter {
            field: field.to_string(),
            op,
            value,
        };
        if !self.is_operator(field, value) {
            return Ok(make(FilterOp::Eq, self.cast_operand(field, value)?));
        }
        let Some((op, operand)) = value.as_object().and_then(single_op) else {
            return Err(self.bad_op(
                field,
                "{..}",
                format!("expected an object with exactly one operator ({FILTER_OPS})"),
            ));
        };
        let list = |this: &Model, operand: &Value| -> Result<Vec<Value>, ValidationError> {
            match operand {
                Value::Array(items) => items.iter().map(|v| this.cast_operand(field, v)).collect(),
                _ => Err(this.bad_op(field, op, "the operand must be a list".into())),
            }
        };
        let simple = |fop| -> Result<Filter, ValidationError> {
            Ok(make(fop, self.cast_operand(field, operand)?))
        };
        match op {
            "=" => simple(FilterOp::Eq),
            "!=" | "<>" => simple(FilterOp::Ne),
            "<" => simple(FilterOp::Lt),
            "<=" => simple(FilterOp::Le),
            ">" => simple(FilterOp::Gt),
            ">=" => simple(FilterOp::Ge),
            "begins" | "begins_with" => match operand {
                Value::String(_) => Ok(make(FilterOp::BeginsWith, operand.clone())),
                _ => Err(self.bad_op(field, op, "the operand must be a string prefix".into())),
            },
            "between" => {
                let items = list(self, operand)?;
                if items.len() != 2 {
                    return Err(self.bad_op(
                        field,
                        op,
                        "the operand must be a list [low, high]".into(),
                    ));
                }
                Ok(make(FilterOp::Between, Value::Array(items)))
            }
            "in" => Ok(make(FilterOp::In, Value::Array(list(self, operand)?))),
            _ => Err(self.bad_op(field, op, format!("unknown operator (use {FILTER_OPS})"))),
        }
    }

    /// Turn `find` properties into a query on `index` (primary when None); see the crate docs.
    pub fn query(&self, props: &Item, index: Option<&Index>) -> Result<Query, ValidationError> {
        let index = index.unwrap_or(&self.primary);
        let primary = index.name == self.primary.name;
        if let Some(unknown) = props.keys().find(|k| !self.is_known(k)) {
            return Err(self.err(unknown, Reason::UnknownField));
        }
        // Plain values, cast, for template resolution.
        let mut view = Item::new();
        for (key, value) in props {
            if value.is_null() || self.is_operator(key, value) || self.field(key).is_none() {
                continue;
            }
            let cast = match self.field(key) {
                Some(f) if f.has_template() && value.is_string() => value.clone(),
                _ => self.cast_operand(key, value)?,
            };
            view.insert(key.clone(), cast);
        }
        self.apply_templates(&mut view, true)?;

        let hash = match props.get(&index.hash) {
            Some(value) => match value {
                Value::Object(map) => match single_op(map) {
                    Some(("=", operand)) => Some(self.key_operand(&index.hash, "=", operand)?),
                    _ => {
                        return Err(self.bad_op(
                            &index.hash,
                            "{..}",
                            "the hash key only accepts a value or {'=': value}".into(),
                        ))
                    }
                },
                _ => Some(self.key_operand(&index.hash, "=", value)?),
            },
            None if self.field(&index.hash).is_some() => {
                view.get(&index.hash).and_then(render_value)
            }
            None if primary => Some(String::new()),
            None => None,
        };

        let sort = match &index.sort {
            None => SortCondition::Any,
            Some(attr) => match (props.get(attr), self.field(attr)) {
                (Some(value), _) => self.sort_condition(attr, value)?,
                (None, Some(field)) => match field.template() {
                    Some(template) => match template.render(|var| self.variable(&view, var)) {
                        Rendered::Full(text) => SortCondition::Eq(text),
                        Rendered::Partial { prefix, .. } if !prefix.is_empty() => {
                            SortCondition::BeginsWith(prefix)
                        }
                        Rendered::Partial { .. } => SortCondition::Any,
                    },
                    None => SortCondition::Any,
                },
                (None, None) if primary => SortCondition::Eq(String::new()),
                (None, None) => SortCondition::Any,
            },
        };

        let mut filters = Vec::new();
        for (key, value) in props {
            if *key == index.hash || index.sort.as_deref() == Some(key.as_str()) {
                continue;
            }
            filters.push(self.filter(key, value)?);
        }
        Ok(Query {
            hash,
            sort,
            filters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(v: Value) -> Item {
        v.as_object().cloned().unwrap_or_default()
    }

    fn check(op: FilterOp, value: Value, stored: Value, expected: bool) {
        let f = Filter {
            field: "f".into(),
            op,
            value: value.clone(),
        };
        assert_eq!(
            f.matches(&item(json!({"f": stored.clone()}))),
            expected,
            "{op:?} {value} vs {stored}"
        );
    }

    #[test]
    fn eq_and_ne() {
        check(FilterOp::Eq, json!("a"), json!("a"), true);
        check(FilterOp::Eq, json!("a"), json!("b"), false);
        check(FilterOp::Eq, json!(3), json!(3.0), true);
        check(FilterOp::Ne, json!("a"), json!("b"), true);
        check(FilterOp::Ne, json!("a"), json!("a"), false);
        check(FilterOp::Eq, json!({"x": 1}), json!({"x": 1}), true);
    }

    #[test]
    fn ordering_numbers_numerically() {
        check(FilterOp::Lt, json!(10), json!(9), true);
        check(FilterOp::Lt, json!(10), json!(10), false);
        check(FilterOp::Le, json!(10), json!(10), true);
        check(FilterOp::Gt, json!(10), json!(9.5), false);
        check(FilterOp::Gt, json!(2.5), json!(10), true);
        check(FilterOp::Ge, json!(10), json!(10.0), true);
    }

    #[test]
    fn ordering_strings_lexically() {
        check(FilterOp::Lt, json!("b"), json!("a"), true);
        check(FilterOp::Gt, json!("10"), json!("9"), true);
        check(
            FilterOp::Ge,
            json!("2026-01-01T00:00:00.000Z"),
            json!("2026-11-25T18:00:00.000Z"),
            true,
        );
    }

    #[test]
    fn ordering_bools_and_mixed() {
        check(FilterOp::Gt, json!(false), json!(true), true);
        check(FilterOp::Lt, json!(5), json!("1"), false);
        check(FilterOp::Ge, json!("a"), json!(5), false);
    }

    #[test]
    fn begins_with() {
        check(FilterOp::BeginsWith, json!("ab"), json!("abc"), true);
        check(FilterOp::BeginsWith, json!("b"), json!("abc"), false);
        check(FilterOp::BeginsWith, json!("1"), json!(12), false);
    }

    #[test]
    fn between_inclusive() {
        check(FilterOp::Between, json!([1, 3]), json!(1), true);
        check(FilterOp::Between, json!([1, 3]), json!(3), true);
        check(FilterOp::Between, json!([1, 3]), json!(4), false);
        check(FilterOp::Between, json!(["a", "c"]), json!("b"), true);
        check(FilterOp::Between, json!([1]), json!(1), false);
    }

    #[test]
    fn in_list() {
        check(FilterOp::In, json!(["a", "b"]), json!("b"), true);
        check(FilterOp::In, json!(["a", "b"]), json!("c"), false);
        check(FilterOp::In, json!([1, 2]), json!(2.0), true);
        check(FilterOp::In, json!("a"), json!("a"), false);
    }

    #[test]
    fn missing_field_matches_only_ne() {
        let empty = Item::new();
        for op in [
            FilterOp::Eq,
            FilterOp::Lt,
            FilterOp::Le,
            FilterOp::Gt,
            FilterOp::Ge,
            FilterOp::BeginsWith,
            FilterOp::Between,
            FilterOp::In,
        ] {
            assert!(
                !Filter {
                    field: "f".into(),
                    op,
                    value: json!("a")
                }
                .matches(&empty),
                "{op:?}"
            );
        }
        assert!(Filter {
            field: "f".into(),
            op: FilterOp::Ne,
            value: json!("a")
        }
        .matches(&empty));
    }

    const SCHEMA: &str = r#"{
      format: 'onetable:1.1.0', version: '1',
      indexes: {primary: {hash: 'pk', sort: 'sk'}, gs1: {hash: 'gs1pk', sort: 'gs1sk'}},
      params: {timestamps: true, isoDates: true},
      models: {
        Thing: {
          pk: {type: 'string', value: 'thing#${owner}'},
          sk: {type: 'string', value: 'thing#${kind}#${id}'},
          id: {type: 'string'},
          owner: {type: 'string'},
          kind: {type: 'string'},
          n: {type: 'number'},
          when: {type: 'date'},
          args: {type: 'object'},
          gs1pk: {type: 'string', value: 'kind#${kind}'},
          gs1sk: {type: 'string', value: 'n#${n}'},
        },
        Raw: {pk: {type: 'string'}, sk: {type: 'string'}, v: {type: 'number'}},
      }
    }"#;

    fn plan(model: &str, props: Value, index: Option<&str>) -> Result<Query, ValidationError> {
        let s = crate::Schema::from_json5(SCHEMA).unwrap();
        let m = s.model(model).unwrap();
        m.query(&item(props), index.and_then(|n| s.index(n)))
    }

    fn eq(field: &str, value: Value) -> Filter {
        Filter {
            field: field.into(),
            op: FilterOp::Eq,
            value,
        }
    }

    fn q(
        hash: Option<&str>,
        sort: SortCondition,
        filters: Vec<Filter>,
    ) -> Result<Query, ValidationError> {
        Ok(Query {
            hash: hash.map(str::to_string),
            sort,
            filters,
        })
    }

    #[test]
    fn partial_template_gives_prefix() {
        assert_eq!(
            plan("Thing", json!({"owner": "o"}), None),
            q(
                Some("thing#o"),
                SortCondition::BeginsWith("thing#".into()),
                vec![eq("owner", json!("o"))]
            )
        );
        assert_eq!(
            plan("Thing", json!({"owner": "o", "kind": "k"}), None).map(|q| q.sort),
            Ok(SortCondition::BeginsWith("thing#k#".into()))
        );
    }

    #[test]
    fn full_template_gives_eq() {
        let got = plan("Thing", json!({"owner": "o", "kind": "k", "id": "i"}), None).unwrap();
        assert_eq!(
            (got.hash.as_deref(), got.sort, got.filters.len()),
            (Some("thing#o"), SortCondition::Eq("thing#k#i".into()), 3)
        );
    }

    #[test]
    fn unresolved_hash_scans() {
        let got = plan("Thing", json!({"kind": "k"}), None).unwrap();
        assert_eq!(
            (got.hash, got.sort),
            (None, SortCondition::BeginsWith("thing#k#".into()))
        );
    }

    #[test]
    fn empty_prefix_is_any() {
        let got = plan("Thing", json!({"kind": "k"}), Some("gs1")).unwrap();
        assert_eq!(
            (got.hash.as_deref(), got.sort),
            (Some("kind#k"), SortCondition::BeginsWith("n#".into()))
        );
        let got = plan("Raw", json!({"pk": "p"}), None).unwrap();
        assert_eq!(
            (got.hash.as_deref(), got.sort),
            (Some("p"), SortCondition::Any)
        );
    }

    #[test]
    fn key_attributes_given_directly() {
        assert_eq!(
            plan("Thing", json!({"pk": "P", "sk": "S"}), None),
            q(Some("P"), SortCondition::Eq("S".into()), vec![])
        );
        assert_eq!(
            plan("Raw", json!({"pk": {"=": "P"}}), None),
            q(Some("P"), SortCondition::Any, vec![])
        );
        assert!(matches!(
            plan("Raw", json!({"pk": {">": "P"}}), None).map_err(|e| e.reason),
            Err(Reason::BadOperator { .. })
        ));
    }

    #[test]
    fn sort_operators() {
        let sort = |v: Value| plan("Raw", json!({"pk": "p", "sk": v}), None).map(|q| q.sort);
        assert_eq!(
            sort(json!({"begins": "a"})),
            Ok(SortCondition::BeginsWith("a".into()))
        );
        assert_eq!(
            sort(json!({"begins_with": "a"})),
            Ok(SortCondition::BeginsWith("a".into()))
        );
        assert_eq!(
            sort(json!({"between": ["a", "b"]})),
            Ok(SortCondition::Between("a".into(), "b".into()))
        );
        assert_eq!(sort(json!({"<": "a"})), Ok(SortCondition::Lt("a".into())));
        assert_eq!(sort(json!({"<=": "a"})), Ok(SortCondition::Le("a".into())));
        assert_eq!(sort(json!({">": "a"})), Ok(SortCondition::Gt("a".into())));
        assert_eq!(sort(json!({">=": "a"})), Ok(SortCondition::Ge("a".into())));
        assert_eq!(sort(json!({"=": "a"})), Ok(SortCondition::Eq("a".into())));
        assert_eq!(sort(json!("a")), Ok(SortCondition::Eq("a".into())));
        for bad in [
            json!({"~": "a"}),
            json!({"<": "a", ">": "b"}),
            json!({"between": ["a"]}),
            json!({"begins": 1}),
        ] {
            let reason = sort(bad.clone()).map_err(|e| e.reason);
            assert!(
                matches!(reason, Err(Reason::BadOperator { .. })),
                "{bad}: {reason:?}"
            );
        }
    }

    fn filter(field: &str, v: Value) -> Result<Filter, ValidationError> {
        let got = plan("Raw", json!({"pk": "p", field: v}), None)?;
        Ok(got
            .filters
            .into_iter()
            .next()
            .unwrap_or_else(|| eq("none", Value::Null)))
    }

    fn f(field: &str, op: FilterOp, value: Value) -> Result<Filter, ValidationError> {
        Ok(Filter {
            field: field.into(),
            op,
            value,
        })
    }

    #[test]
    fn filters_are_cast() {
        assert_eq!(filter("v", json!("5")), f("v", FilterOp::Eq, json!(5)));
        assert_eq!(
            filter("v", json!({">": "3"})),
            f("v", FilterOp::Gt, json!(3))
        );
        assert_eq!(
            filter("v", json!({">=": 3})),
            f("v", FilterOp::Ge, json!(3))
        );
        assert_eq!(filter("v", json!({"<": 3})), f("v", FilterOp::Lt, json!(3)));
        assert_eq!(
            filter("v", json!({"<=": 3})),
            f("v", FilterOp::Le, json!(3))
        );
        assert_eq!(
            filter("v", json!({"=": "3"})),
            f("v", FilterOp::Eq, json!(3))
        );
        assert_eq!(
            filter("v", json!({"!=": 3})),
            f("v", FilterOp::Ne, json!(3))
        );
        assert_eq!(
            filter("v", json!({"<>": 3})),
            f("v", FilterOp::Ne, json!(3))
        );
        assert_eq!(
            filter("v", json!({"between": [1, "2"]})),
            f("v", FilterOp::Between, json!([1, 2]))
        );
        assert_eq!(
            filter("v", json!({"in": ["1", 2]})),
            f("v", FilterOp::In, json!([1, 2]))
        );
        assert_eq!(
            filter("sk", json!({"begins": "a"})).map(|x| x.field),
            Ok("none".to_string()),
            "the sort attribute is not a filter"
        );
    }

    #[test]
    fn filter_dates_objects_and_system_fields() {
        let got = plan(
            "Thing",
            json!({"when": {">": 1_795_629_600_000i64}, "args": {"x": 1}, "_type": "Thing",
                                       "created": "2026-11-25T18:00:00Z"}),
            None,
        )
        .unwrap();
        assert_eq!(
            got.filters,
            vec![
                eq("_type", json!("Thing")),
                eq("args", json!({"x": 1})),
                eq("created", json!("2026-11-25T18:00:00.000Z")),
                Filter {
                    field: "when".into(),
                    op: FilterOp::Gt,
                    value: json!("2026-11-25T18:00:00.000Z")
                },
            ]
        );
        let got = plan("Thing", json!({"n": {"begins": "1"}}), None).unwrap();
        assert_eq!(
            got.filters,
            vec![Filter {
                field: "n".into(),
                op: FilterOp::BeginsWith,
                value: json!("1")
            }]
        );
    }

    #[test]
    fn filter_errors() {
        let reason = |field: &str, v: Value| filter(field, v).map_err(|e| e.reason);
        assert_eq!(
            plan("Raw", json!({"nope": 1}), None).map_err(|e| (e.field, e.reason)),
            Err(("nope".into(), Reason::UnknownField))
        );
        assert!(matches!(
            reason("v", json!("x")),
            Err(Reason::WrongType { .. })
        ));
        assert!(matches!(
            reason("v", json!({"like": 1})),
            Err(Reason::BadOperator { .. })
        ));
        assert!(matches!(
            reason("v", json!({">": 1, "<": 2})),
            Err(Reason::BadOperator { .. })
        ));
        assert!(matches!(
            reason("v", json!({"between": [1]})),
            Err(Reason::BadOperator { .. })
        ));
        assert!(matches!(
            reason("v", json!({"in": 1})),
            Err(Reason::BadOperator { .. })
        ));
        assert!(matches!(
            reason("v", json!({"begins": 1})),
            Err(Reason::BadOperator { .. })
        ));
    }

    #[test]
    fn planned_filters_match_items() {
        let got = plan("Raw", json!({"v": {"between": ["1", "5"]}}), None).unwrap();
        assert_eq!(got.hash, None, "pk not given: the caller scans");
        let filter = &got.filters[0];
        assert!(filter.matches(&item(json!({"v": 3}))));
        assert!(!filter.matches(&item(json!({"v": 6}))));
    }
}
