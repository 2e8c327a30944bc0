//! The errors of this crate: CIM status codes returned inside a response (DSP0200 table 1), and
//! the errors of starting the endpoint.

use std::fmt;

/// A CIM status code (DSP0200 / DSP0201 `ERROR CODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CimStatus {
    /// CIM_ERR_FAILED
    Failed = 1,
    /// CIM_ERR_ACCESS_DENIED
    AccessDenied = 2,
    /// CIM_ERR_INVALID_NAMESPACE
    InvalidNamespace = 3,
    /// CIM_ERR_INVALID_PARAMETER
    InvalidParameter = 4,
    /// CIM_ERR_INVALID_CLASS
    InvalidClass = 5,
    /// CIM_ERR_NOT_FOUND
    NotFound = 6,
    /// CIM_ERR_NOT_SUPPORTED
    NotSupported = 7,
    /// CIM_ERR_CLASS_HAS_CHILDREN
    ClassHasChildren = 8,
    /// CIM_ERR_CLASS_HAS_INSTANCES
    ClassHasInstances = 9,
    /// CIM_ERR_INVALID_SUPERCLASS
    InvalidSuperclass = 10,
    /// CIM_ERR_ALREADY_EXISTS
    AlreadyExists = 11,
    /// CIM_ERR_NO_SUCH_PROPERTY
    NoSuchProperty = 12,
    /// CIM_ERR_TYPE_MISMATCH
    TypeMismatch = 13,
    /// CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED
    QueryLanguageNotSupported = 14,
    /// CIM_ERR_INVALID_QUERY
    InvalidQuery = 15,
    /// CIM_ERR_METHOD_NOT_AVAILABLE
    MethodNotAvailable = 16,
    /// CIM_ERR_METHOD_NOT_FOUND
    MethodNotFound = 17,
    /// CIM_ERR_NAMESPACE_NOT_EMPTY
    NamespaceNotEmpty = 20,
    /// CIM_ERR_INVALID_ENUMERATION_CONTEXT
    InvalidEnumerationContext = 21,
    /// CIM_ERR_INVALID_OPERATION_TIMEOUT
    InvalidOperationTimeout = 22,
    /// CIM_ERR_PULL_HAS_BEEN_ABANDONED
    PullHasBeenAbandoned = 23,
    /// CIM_ERR_PULL_CANNOT_BE_ABANDONED
    PullCannotBeAbandoned = 24,
    /// CIM_ERR_FILTERED_ENUMERATION_NOT_SUPPORTED
    FilteredEnumerationNotSupported = 25,
    /// CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED
    ContinuationOnErrorNotSupported = 26,
    /// CIM_ERR_SERVER_LIMITS_EXCEEDED
    ServerLimitsExceeded = 27,
    /// CIM_ERR_SERVER_IS_SHUTTING_DOWN
    ServerIsShuttingDown = 28,
}

impl CimStatus {
    /// The symbolic name, as DSP0200 spells it.
    pub fn name(self) -> &'static str {
        match self {
            CimStatus::Failed => "CIM_ERR_FAILED",
            CimStatus::AccessDenied => "CIM_ERR_ACCESS_DENIED",
            CimStatus::InvalidNamespace => "CIM_ERR_INVALID_NAMESPACE",
            CimStatus::InvalidParameter => "CIM_ERR_INVALID_PARAMETER",
            CimStatus::InvalidClass => "CIM_ERR_INVALID_CLASS",
            CimStatus::NotFound => "CIM_ERR_NOT_FOUND",
            CimStatus::NotSupported => "CIM_ERR_NOT_SUPPORTED",
            CimStatus::ClassHasChildren => "CIM_ERR_CLASS_HAS_CHILDREN",
            CimStatus::ClassHasInstances => "CIM_ERR_CLASS_HAS_INSTANCES",
            CimStatus::InvalidSuperclass => "CIM_ERR_INVALID_SUPERCLASS",
            CimStatus::AlreadyExists => "CIM_ERR_ALREADY_EXISTS",
            CimStatus::NoSuchProperty => "CIM_ERR_NO_SUCH_PROPERTY",
            CimStatus::TypeMismatch => "CIM_ERR_TYPE_MISMATCH",
            CimStatus::QueryLanguageNotSupported => "CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED",
            CimStatus::InvalidQuery => "CIM_ERR_INVALID_QUERY",
            CimStatus::MethodNotAvailable => "CIM_ERR_METHOD_NOT_AVAILABLE",
            CimStatus::MethodNotFound => "CIM_ERR_METHOD_NOT_FOUND",
            CimStatus::NamespaceNotEmpty => "CIM_ERR_NAMESPACE_NOT_EMPTY",
            CimStatus::InvalidEnumerationContext => "CIM_ERR_INVALID_ENUMERATION_CONTEXT",
            CimStatus::InvalidOperationTimeout => "CIM_ERR_INVALID_OPERATION_TIMEOUT",
            CimStatus::PullHasBeenAbandoned => "CIM_ERR_PULL_HAS_BEEN_ABANDONED",
            CimStatus::PullCannotBeAbandoned => "CIM_ERR_PULL_CANNOT_BE_ABANDONED",
            CimStatus::FilteredEnumerationNotSupported => {
                "CIM_ERR_FILTERED_ENUMERATION_NOT_SUPPORTED"
            }
            CimStatus::ContinuationOnErrorNotSupported => {
                "CIM_ERR_CONTINUATION_ON_ERROR_NOT_SUPPORTED"
            }
            CimStatus::ServerLimitsExceeded => "CIM_ERR_SERVER_LIMITS_EXCEEDED",
            CimStatus::ServerIsShuttingDown => "CIM_ERR_SERVER_IS_SHUTTING_DOWN",
        }
    }
}

/// A CIM error returned to the client in the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CimFault {
    /// The status code.
    pub status: CimStatus,
    /// A description a person can act on.
    pub description: String,
}

impl CimFault {
    /// An error with a description.
    pub fn new(status: CimStatus, description: impl Into<String>) -> CimFault {
        CimFault {
            status,
            description: description.into(),
        }
    }
}

impl fmt::Display for CimFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.description)
    }
}

impl std::error::Error for CimFault {}

/// Result of a CIM operation.
pub type CimResult<T> = Result<T, CimFault>;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum CimError {
    /// The configuration is inconsistent.
    #[error("cim: {0}")]
    Config(String),
    /// A listening socket could not be opened.
    #[error("cim: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key could not be read, generated or used.
    #[error("cim: TLS: {0}")]
    Tls(String),
    /// A file in the state folder could not be written or read.
    #[error("cim: {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The built-in class definitions did not load (a bug).
    #[error("cim: schema: {0}")]
    Schema(#[from] crate::schema::SchemaError),
    /// The runtime thread could not be started.
    #[error("cim: cannot start the server thread: {0}")]
    Runtime(#[source] std::io::Error),
}
