//! `POST /v1/chat/completions`: the conversation a client sends (`message`), the request
//! around it (`request`), and what comes back, whole or as stream chunks (`response`).

pub mod message;
pub mod request;
pub mod response;

pub use message::*;
pub use request::*;
pub use response::*;
