//! OpenAI wire types (requests, responses, stream chunks, errors); filled in below.
