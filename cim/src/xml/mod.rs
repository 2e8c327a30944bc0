//! CIM-XML (DSP0201): reading requests and writing responses.

pub mod dom;
pub mod request;
pub mod writer;

pub use request::{parse_request, Call, Param, Request, RequestError, Target};
pub use writer::{Shape, XmlWriter};
