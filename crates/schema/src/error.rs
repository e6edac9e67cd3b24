//! Error types.
//!
//! Two families exist because they have different audiences: [`SchemaError`] is raised once,
//! while loading a schema file, and names the dotted path of the offending definition so the
//! schema author can fix it; [`ValidationError`] is raised per item (create, update, import,
//! query) and names the model and field that the caller got wrong, with a [`Reason`] that says
//! what to do about it.

use std::path::PathBuf;

/// A schema could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema file (or a blended file) could not be read.
    #[error("cannot read schema file {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not valid JSON5.
    #[error("schema is not valid JSON5: {0}")]
    Syntax(String),
    /// The schema is well-formed JSON5 but breaks a schema rule.
    #[error("schema error at {path}: {reason}")]
    Invalid {
        /// Dotted path of the offending definition, e.g. `models.Fault.severity.enum`.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl SchemaError {
    /// Shorthand for [`SchemaError::Invalid`].
    pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> SchemaError {
        SchemaError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// An item (or query) does not satisfy its model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{model}.{field}: {reason}")]
pub struct ValidationError {
    /// The model name.
    pub model: String,
    /// The field name; nested fields use a dotted path (`args.x`), array elements `tags[0]`.
    pub field: String,
    /// What is wrong.
    pub reason: Reason,
}

impl ValidationError {
    pub(crate) fn new(model: &str, field: impl Into<String>, reason: Reason) -> ValidationError {
        ValidationError {
            model: model.to_string(),
            field: field.into(),
            reason,
        }
    }
}

/// Why a value was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reason {
    /// A required field is missing (or null).
    #[error("a value is required: provide this field")]
    Required,
    /// The value cannot be cast to the field's type.
    #[error("expected a {expected} value, found {found}")]
    WrongType {
        /// The field type (or form) expected.
        expected: String,
        /// A short description of what was given.
        found: String,
    },
    /// The value is not one of the field's `enum` values.
    #[error("value {value} is not one of [{}]", allowed.join(", "))]
    NotInEnum {
        /// The rejected value, rendered as JSON.
        value: String,
        /// The allowed values.
        allowed: Vec<String>,
    },
    /// The value does not match the field's `validate` pattern.
    #[error("value does not match the validation pattern {pattern}")]
    Pattern {
        /// The pattern as written in the schema.
        pattern: String,
    },
    /// The field is not defined by the model.
    #[error(
        "unknown field: it is not defined in the model schema (remove it or add it to the schema)"
    )]
    UnknownField,
    /// An update tried to change a readonly field.
    #[error("the field is readonly: it cannot be changed by an update")]
    ReadOnly,
    /// An update would change the item's primary key.
    #[error("changing this field would change the item's primary key: delete and re-create the item instead")]
    KeyChange,
    /// A key could not be computed because a template variable has no value.
    #[error("the key cannot be resolved: provide a value for `{variable}`")]
    KeyUnresolved {
        /// The missing template variable (or key attribute).
        variable: String,
    },
    /// A key value contains a NUL character.
    #[error("key values must not contain a NUL character ('\\0')")]
    InvalidKeyValue,
    /// The item's type field names another model (or is missing).
    #[error("the item's type is {found}, expected {expected}")]
    WrongModel {
        /// The model that was expected.
        expected: String,
        /// What the type field holds (`none` when missing).
        found: String,
    },
    /// A templated field holds a value different from what its template computes.
    #[error("value {found} does not match its template, which computes {expected}: send consistent fields")]
    TemplateMismatch {
        /// The value computed from the template (or `unresolved`).
        expected: String,
        /// The value the item holds.
        found: String,
    },
    /// A query property uses an unknown or malformed operator.
    #[error("bad query operator {operator}: {detail}")]
    BadOperator {
        /// The operator key as given.
        operator: String,
        /// What is wrong and what is accepted.
        detail: String,
    },
    /// The value has the right JSON type but an invalid content (bad date, bad base64...).
    #[error("invalid value: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(err: ValidationError, expected: &str) {
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn enum_message_matches_documented_form() {
        check(
            ValidationError::new(
                "Fault",
                "severity",
                Reason::NotInEnum {
                    value: "\"x\"".into(),
                    allowed: vec!["info".into(), "warn".into(), "critical".into()],
                },
            ),
            "Fault.severity: value \"x\" is not one of [info, warn, critical]",
        );
    }

    #[test]
    fn key_unresolved_names_variable() {
        check(
            ValidationError::new(
                "Fault",
                "pk",
                Reason::KeyUnresolved {
                    variable: "deviceId".into(),
                },
            ),
            "Fault.pk: the key cannot be resolved: provide a value for `deviceId`",
        );
    }

    #[test]
    fn schema_error_names_path() {
        let e = SchemaError::invalid("models.Fault.sk.value", "unknown field `x`");
        assert_eq!(
            e.to_string(),
            "schema error at models.Fault.sk.value: unknown field `x`"
        );
    }
}
