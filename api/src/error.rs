//! Errors in a VM config, each naming the field (or the place in the file) at fault.

use std::path::PathBuf;

use thiserror::Error;

/// Why a config was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file itself could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not well-formed JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// Well-formed JSON that does not fit the schema: an unknown key, a wrong type, a missing key.
    #[error("{field}: {message} (line {line}, column {column})")]
    Schema {
        /// Dotted path of the field, e.g. `machine-config.vcpu_count`.
        field: String,
        /// What is wrong with it.
        message: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// A value that parses but is out of range or names an unusable file.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with the value.
        message: String,
    },
}

/// Parses JSON strictly (nothing after the value); errors name the field at fault, or the line
/// and column of a syntax error. Every JSON input lockstep takes goes through here.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(ConfigError::from_serde)?;
    de.end()
        .map_err(|e| ConfigError::from_serde_json(String::new(), e))?;
    Ok(value)
}

impl ConfigError {
    /// A value that parsed but is not acceptable.
    pub fn invalid(field: impl Into<String>, message: String) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message,
        }
    }

    /// The dotted path of the field at fault, if the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Schema { field, .. } | ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn from_serde(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = err.path().to_string();
        Self::from_serde_json(path, err.into_inner())
    }

    pub(crate) fn from_serde_json(path: String, err: serde_json::Error) -> Self {
        use serde_json::error::Category;
        let (line, column) = (err.line(), err.column());
        // serde_json appends " at line L column C" to its message; we report those separately.
        let full = err.to_string();
        let message = match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        };
        match err.classify() {
            Category::Syntax | Category::Eof | Category::Io => ConfigError::Syntax {
                line,
                column,
                message,
            },
            Category::Data => ConfigError::Schema {
                field: if path.is_empty() || path == "." {
                    "(top level)".to_string()
                } else {
                    path
                },
                message,
                line,
                column,
            },
        }
    }
}
