//! `GET /v1/models` and `GET /v1/models/{id}`: the models a client may name in `model`.

use serde::{Deserialize, Serialize};

use crate::openai::tag::{ListObject, ModelObject};

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<Model>,
}

impl ModelList {
    pub fn new(data: Vec<Model>) -> Self {
        ModelList {
            object: ListObject,
            data,
        }
    }
}

/// One servable model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The name clients put in `model`.
    pub id: String,
    pub object: ModelObject,
    /// Unix time in seconds.
    pub created: u64,
    pub owned_by: String,
}

impl Model {
    pub fn new(id: impl Into<String>, created: u64, owned_by: impl Into<String>) -> Self {
        Model {
            id: id.into(),
            object: ModelObject,
            created,
            owned_by: owned_by.into(),
        }
    }
}
