//! `${field}` value templates.
//!
//! OneTable derives key attributes (pk, sk, gs1pk...) from other fields with templates such as
//! `device#${deviceId}`. The same template is evaluated when an item is created (full
//! resolution required for keys), checked when an item is imported (the stored value must equal
//! the computed one) and partially evaluated when a query is planned (the literal prefix up to
//! the first unknown variable becomes a `begins_with` condition).

use serde_json::Value;

/// Maximum template length in bytes (hostile schema bound).
pub(crate) const MAX_TEMPLATE_LEN: usize = 1024;

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// Literal text.
    Lit(String),
    /// A `${name}` variable.
    Var(String),
}

/// A parsed value template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    /// The template as written in the schema (for describing the schema).
    source: String,
    parts: Vec<Part>,
}

/// Result of evaluating a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rendered {
    /// Every variable had a value.
    Full(String),
    /// `missing` had no value; `prefix` is the rendered text before it.
    Partial { prefix: String, missing: String },
}

impl Template {
    /// Parse a template; the error is a human-readable reason.
    pub(crate) fn parse(text: &str) -> Result<Template, String> {
        if text.len() > MAX_TEMPLATE_LEN {
            return Err(format!("template is longer than {MAX_TEMPLATE_LEN} bytes"));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in template {text:?}"))?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err(format!("empty `${{}}` variable in template {text:?}"));
            }
            if name.contains("${") {
                return Err(format!("nested `${{` in template {text:?}"));
            }
            if name.contains(':') {
                // OneTable's `${name:size:pad}` pads the value; keys would differ from OneTable's.
                return Err(format!(
                    "padded variables (`${{{name}}}`) are not supported by devtables: \
                     store the value already padded and use `${{name}}`"
                ));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template {
            source: text.to_string(),
            parts,
        })
    }

    /// The template as written in the schema.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// The literal and variable parts, in order (a key plan resolves the variables once).
    pub(crate) fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The variable names, in order of appearance.
    pub(crate) fn variables(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Whether some values of the variables render this template to exactly `text`: the
    /// literal parts appear in `text` in order, the first at its start and the last at its end
    /// unless a variable stands there. Variables match any text, so this never refuses a value
    /// the template can produce; it refuses values that miss a literal (another model's prefix).
    pub(crate) fn could_render(&self, text: &str) -> bool {
        // Glob matching with `*` for each variable, backtracking to the last variable only:
        // linear in practice and never worse than O(len(text) * parts).
        let mut rest = text;
        let mut first = true;
        let mut after_var = false;
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Var(_) => after_var = true,
                Part::Lit(lit) => {
                    let last = i + 1 == self.parts.len();
                    if first && !after_var {
                        let Some(r) = rest.strip_prefix(lit.as_str()) else {
                            return false;
                        };
                        rest = r;
                        if last {
                            return rest.is_empty();
                        }
                    } else if last {
                        return rest.ends_with(lit.as_str());
                    } else {
                        let Some(at) = rest.find(lit.as_str()) else {
                            return false;
                        };
                        rest = &rest[at + lit.len()..];
                    }
                    after_var = false;
                }
            }
            first = false;
        }
        after_var || rest.is_empty()
    }

    /// Evaluate with `lookup` giving each variable's rendered value (None = unresolved). The
    /// value may be borrowed (`&str`, `Cow`) or owned: it is only copied into the result.
    pub(crate) fn render<S: AsRef<str>>(
        &self,
        mut lookup: impl FnMut(&str) -> Option<S>,
    ) -> Rendered {
        // Sized for the usual key (the literals plus a short value or two), so that rendering
        // grows the string at most once.
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Lit(text) => out.push_str(text),
                Part::Var(name) => match lookup(name) {
                    Some(value) => out.push_str(value.as_ref()),
                    None => {
                        return Rendered::Partial {
                            prefix: out,
                            missing: name.clone(),
                        }
                    }
                },
            }
        }
        Rendered::Full(out)
    }
}

/// Render a stored scalar for a template or key: strings as is, integral numbers without a
/// fractional part, other numbers as serde_json prints them, booleans as `true`/`false`.
/// Null, objects and arrays have no rendering.
pub(crate) fn render_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                return Some(n.to_string());
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                    // Integral float: render like the integer (3.0 → "3").
                    Some(format!("{}", f as i64))
                }
                _ => Some(n.to_string()),
            }
        }
        Value::Null | Value::Object(_) | Value::Array(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn could_render_checks_the_literals_in_order() {
        let check =
            |template: &str, text: &str| Template::parse(template).unwrap().could_render(text);
        assert!(check("status#${id}", "status#42"));
        assert!(!check("status#${id}", "fault#42"));
        assert!(check("${a}#${b}", "x#y"));
        assert!(!check("${a}#${b}", "xy"));
        assert!(check("dev#${d}#log", "dev#1#log"));
        assert!(!check("dev#${d}#log", "dev#1#logx"));
        assert!(check("fixed", "fixed"));
        assert!(!check("fixed", "fixedx"));
        assert!(check("${id}", "anything"));
        assert!(check("a${x}a", "aa"), "an empty variable still renders");
        assert!(!check("a${x}a", "a"));
    }
    use serde_json::json;

    fn check(template: &str, vars: &[(&str, &str)], expected: Rendered) {
        let t = Template::parse(template).unwrap();
        let got = t.render(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(got, expected, "{template}");
    }

    fn full(s: &str) -> Rendered {
        Rendered::Full(s.to_string())
    }

    fn partial(prefix: &str, missing: &str) -> Rendered {
        Rendered::Partial {
            prefix: prefix.to_string(),
            missing: missing.to_string(),
        }
    }

    #[test]
    fn literal_only() {
        check("status#", &[], full("status#"));
    }

    #[test]
    fn single_variable() {
        check(
            "device#${deviceId}",
            &[("deviceId", "d1")],
            full("device#d1"),
        );
    }

    #[test]
    fn several_variables() {
        check(
            "fault#${deviceId}#${id}",
            &[("deviceId", "d1"), ("id", "x")],
            full("fault#d1#x"),
        );
    }

    #[test]
    fn partial_stops_at_first_missing() {
        check(
            "fault#${deviceId}#${id}",
            &[("deviceId", "d1")],
            partial("fault#d1#", "id"),
        );
        check(
            "fault#${deviceId}#${id}",
            &[("id", "x")],
            partial("fault#", "deviceId"),
        );
    }

    #[test]
    fn lone_dollar_is_literal() {
        check("a$b${x}$", &[("x", "1")], full("a$b1$"));
    }

    #[test]
    fn unclosed_is_error() {
        assert!(Template::parse("a${x").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn padded_variable_is_refused() {
        let err = Template::parse("n#${count:8:0}").unwrap_err();
        assert!(
            err.contains("`${count:8:0}`") && err.contains("not supported"),
            "{err}"
        );
        assert_eq!(
            Template::parse("n#${count}").map(|t| t.source().to_string()),
            Ok("n#${count}".to_string())
        );
    }

    #[test]
    fn empty_variable_is_error() {
        assert!(Template::parse("a${}").is_err());
    }

    #[test]
    fn too_long_is_error() {
        assert!(Template::parse(&"a".repeat(MAX_TEMPLATE_LEN + 1)).is_err());
    }

    #[test]
    fn variables_in_order() {
        let t = Template::parse("${b}-${a}").unwrap();
        assert_eq!(t.variables().collect::<Vec<_>>(), vec!["b", "a"]);
    }

    #[test]
    fn renders_values() {
        assert_eq!(render_value(&json!("x")).as_deref(), Some("x"));
        assert_eq!(render_value(&json!(3)).as_deref(), Some("3"));
        assert_eq!(render_value(&json!(3.0)).as_deref(), Some("3"));
        assert_eq!(render_value(&json!(-2.5)).as_deref(), Some("-2.5"));
        assert_eq!(render_value(&json!(true)).as_deref(), Some("true"));
        assert_eq!(render_value(&json!(null)), None);
        assert_eq!(render_value(&json!({})), None);
    }

    proptest::proptest! {
        /// `could_render` must never refuse a text the template renders (a model's table would
        /// then be skipped by a lookup that should have found the key there): random templates of
        /// literals from a small alphabet (so literals recur inside values) and random values.
        #[test]
        fn could_render_accepts_every_rendering(
            parts in proptest::collection::vec(("[#ab]{0,3}", proptest::bool::ANY), 1..6),
            values in proptest::collection::vec("[#ab]{0,4}", 6),
        ) {
            let source: String = parts
                .iter()
                .enumerate()
                .map(|(i, (lit, var))| if *var { format!("{lit}${{v{i}}}") } else { lit.clone() })
                .collect();
            proptest::prop_assume!(!source.is_empty());
            let template = Template::parse(&source).unwrap();
            let rendered = match template.render(|name| {
                let i: usize = name[1..].parse().unwrap();
                Some(values[i].clone())
            }) {
                Rendered::Full(text) => text,
                Rendered::Partial { .. } => unreachable!("every variable has a value"),
            };
            proptest::prop_assert!(
                template.could_render(&rendered),
                "{source:?} renders {rendered:?} but could_render refuses it"
            );
        }
    }
}
